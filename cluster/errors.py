"""Typed errors. Each names what was wrong so a front door can map it to a status code."""


class SpecDecError(Exception):
    """Base class for every error this package raises on purpose."""


class ConfigError(SpecDecError):
    """A config file or value is invalid; the message starts with the key path."""


class InvalidRequestError(SpecDecError, ValueError):
    """A request parameter is invalid. `field` names the offending request field."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


class UnknownDrafterError(ConfigError):
    """The drafter kind is not in the registry."""


class ModelNotFoundError(ConfigError):
    """A model directory does not exist or holds no loadable model."""


class EngineOverloadedError(SpecDecError):
    """The waiting queue is full; the caller should retry later."""


class ServerDrainingError(SpecDecError):
    """The server is shutting down and takes no new requests; the caller should retry elsewhere."""
