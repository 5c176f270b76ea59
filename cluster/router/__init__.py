"""The distributed router: requests pinned to Ray worker actors, drafts pipelined against verification."""

from cluster.router.loop import Router

__all__ = ["Router"]
