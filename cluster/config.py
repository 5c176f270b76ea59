"""Typed engine config, loaded from YAML and validated with the failing key's path in every error."""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from cluster.drafters.registry import DRAFTERS
from cluster.errors import ConfigError, UnknownDrafterError
from cluster.model_config import DTYPES, ModelConfig, check_model_dir  # noqa: F401 (re-exported)



@dataclass
class DrafterConfig:
    """`kind` names a drafter in cluster.drafters.registry; its settings live in a section of the same
    name (drafter.model for kind model, drafter.ngram for kind ngram). A section for another kind is
    refused rather than ignored."""

    kind: str = "ngram"
    sections: dict = field(default_factory=dict)  # kind -> that kind's config section

    @property
    def section(self):
        """The settings of the chosen kind (its defaults if the file gave none)."""
        if self.kind not in self.sections:
            self.sections[self.kind] = DRAFTERS[self.kind].config()
        return self.sections[self.kind]

    @classmethod
    def from_data(cls, data, key: str) -> DrafterConfig:
        if not isinstance(data, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(data).__name__}")
        kind = data.get("kind", "ngram")
        if not isinstance(kind, str) or kind not in DRAFTERS:
            raise UnknownDrafterError(f"{_join(key, 'kind')}: unknown drafter {kind!r}; known: {sorted(DRAFTERS)}")
        sections = {}
        for name, value in data.items():
            if name == "kind":
                continue
            if name not in DRAFTERS:
                raise ConfigError(f"{_join(key, name)}: unknown key; known: kind, {', '.join(sorted(DRAFTERS))}")
            sections[name] = from_dict(DRAFTERS[name].config, value or {}, _join(key, name))
        config = cls(kind, sections)
        config.check_sections(key)
        return config

    def kinds_in_use(self) -> list[str]:
        """The chosen kind, and for a multi drafter its members."""
        if self.kind == "multi":
            return ["multi", *(self.section.members or [])]
        return [self.kind]

    def check_sections(self, key: str) -> None:
        for name in self.sections:
            if name not in self.kinds_in_use():
                raise ConfigError(f"{key}.{name}: a section for kind {name!r}, but kind is {self.kind!r}")

    def validate(self, key: str, check_paths: bool = False) -> None:
        if self.kind not in DRAFTERS:
            raise UnknownDrafterError(f"{key}.kind: unknown drafter {self.kind!r}; known: {sorted(DRAFTERS)}")
        self.section.validate(f"{key}.{self.kind}", check_paths)
        for name in self.kinds_in_use():
            if name not in DRAFTERS:
                raise UnknownDrafterError(f"{key}.multi.members: unknown drafter {name!r}; known: {sorted(DRAFTERS)}")
            if name not in self.sections:
                self.sections[name] = DRAFTERS[name].config()
            self.sections[name].validate(f"{key}.{name}", check_paths)
        self.check_sections(key)


@dataclass
class SpeculationConfig:
    k: int = 4  # fixed draft length (adaptive: off), and the most a request drafts before it has history
    k_max: int = 8  # no request drafts more than this per step
    adaptive: bool = True  # the cost model chooses each request's draft length every step (0 included)
    rule: str = "coupled"  # sampled requests: "coupled" (same seed, same tokens, any K) or "rejection"
    prior_acceptance: float = 0.5  # acceptance assumed for a request before its first verify pass
    min_gain: float = 0.03  # draft only where the cost model predicts at least this gain over plain decoding
    calibrate: bool = True  # measure the target's pass-cost curve at start (the cost model needs it)
    # A new request's prompt rides in its first verify pass, after a draft from the prompt, instead of a
    # pass of its own: one target pass fewer a request, its first token one draft later. Pays where a pass
    # costs what reading the weights costs (an offloaded target); in-process and unpipelined only, and not
    # for drafters that read the target's hidden states (they need the prefill's).
    defer_prefill: bool = False

    def validate(self, key: str) -> None:
        if self.k_max < 0:
            raise ConfigError(f"{key}.k_max: must be >= 0")
        if not 0 <= self.k <= self.k_max:
            raise ConfigError(f"{key}.k: {self.k} outside [0, k_max={self.k_max}]")
        if self.rule not in ("coupled", "rejection"):
            raise ConfigError(f"{key}.rule: {self.rule!r} is not 'coupled' or 'rejection'")
        if not 0.0 < self.prior_acceptance < 1.0:
            raise ConfigError(f"{key}.prior_acceptance: must be in (0, 1)")
        if not 0.0 <= self.min_gain < 1.0:
            raise ConfigError(f"{key}.min_gain: must be in [0, 1)")


@dataclass
class SamplingDefaults:
    max_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0


@dataclass
class LimitsConfig:
    max_batch_size: int = 8  # sequences decoded together (KV cache slots)
    max_model_len: int = 1024  # prompt + generated tokens, capped by the model's own context
    max_tokens: int = 1024  # largest max_tokens a request may ask for
    max_waiting: int = 256  # queued requests beyond the batch; more is EngineOverloadedError
    max_prompt_chars: int = 0  # longer prompts are refused before tokenising; 0: what can fit the context
    max_stop_strings: int = 16  # stop strings per request
    max_stop_chars: int = 256  # characters per stop string
    max_n: int = 8  # samples per request (OpenAI `n`)
    max_body_bytes: int = 1 << 20  # HTTP request bodies beyond this are refused (413)

    def validate(self, key: str) -> None:
        for name in ("max_batch_size", "max_model_len", "max_tokens", "max_waiting", "max_stop_strings",
                     "max_stop_chars", "max_n", "max_body_bytes"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{key}.{name}: must be >= 1")
        if self.max_prompt_chars < 0:
            raise ConfigError(f"{key}.max_prompt_chars: must be >= 0")


@dataclass
class PoolConfig:
    """A pool of Ray actors of one kind and where they may be placed."""

    replicas: int = 1  # actors at start (and the fewest a shared pool scales down to)
    max_replicas: int = 0  # the most a shared pool scales up to; 0: replicas (no scaling)
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    accelerator_type: str | None = None  # e.g. "L4" for drafts, "H100" for targets
    resources: dict[str, float] = field(default_factory=dict)  # custom Ray resources, e.g. {"draft_gpu": 1}
    torch_threads: int = 0  # 0: every core of the node (Ray would otherwise give torch num_cpus threads)
    # Pin the pool's actors to these CPU cores (os.sched_setaffinity; torch threads = their number). A
    # stand-in for separate devices on one machine, so draft and target compute truly in parallel; not
    # production advice. Empty: no pinning.
    cpus: list[int] = field(default_factory=list)

    def validate(self, key: str) -> None:
        if self.replicas < 1:
            raise ConfigError(f"{key}.replicas: must be >= 1")
        if self.max_replicas and self.max_replicas < self.replicas:
            raise ConfigError(f"{key}.max_replicas: must be >= replicas ({self.replicas}), or 0 for no scaling")
        self.max_replicas = self.max_replicas or self.replicas  # resolved once: one meaning from here on
        if self.num_cpus < 0 or self.num_gpus < 0 or any(v < 0 for v in self.resources.values()):
            raise ConfigError(f"{key}: resource amounts must be >= 0")
        if any(not isinstance(c, int) or c < 0 for c in self.cpus):
            raise ConfigError(f"{key}.cpus: CPU core numbers (>= 0)")


PIPELINING = ("auto", "split", "continue", "off")


@dataclass
class SharedPoolsConfig:
    """Draft and target pools as services shared by every router replica (cluster/pools/manager.py),
    each scaled apart between its pool's replicas and max_replicas. Off: each router owns its pools."""

    enabled: bool = False
    name: str = "specdec-pools"  # the manager's Ray actor name: replicas with one name share pools
    namespace: str = "specdec"
    scale_interval_s: float = 5.0  # one scaling decision per window
    draft_grow_at: float = 0.3  # the draft pool grows when steps spend more than this share waiting on drafts
    target_grow_at: float = 0.9  # the target pool grows when requests queue and its workers are this busy
    shrink_below: float = 0.1  # a pool shrinks when its workers are busy less than this share
    router_timeout_s: float = 10.0  # a router silent this long is dead: its leases and sequences are freed
    idle_exit_s: float = 600.0  # the manager frees its actors and exits after this long without routers; 0: never

    def validate(self, key: str) -> None:
        for name in ("scale_interval_s", "router_timeout_s"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{key}.{name}: must be > 0")
        for name in ("draft_grow_at", "target_grow_at", "shrink_below"):
            if not 0 <= getattr(self, name) <= 1:
                raise ConfigError(f"{key}.{name}: a share in [0, 1]")
        if self.shrink_below >= min(self.draft_grow_at, self.target_grow_at):
            raise ConfigError(f"{key}.shrink_below: must be below the grow thresholds (or pools flap)")
        if self.idle_exit_s < 0:
            raise ConfigError(f"{key}.idle_exit_s: must be >= 0")
        if not self.name:
            raise ConfigError(f"{key}.name: must not be empty")


@dataclass
class ClusterConfig:
    target_pool: PoolConfig = field(default_factory=lambda: PoolConfig(resources={"target_node": 1}))
    draft_pool: PoolConfig = field(default_factory=lambda: PoolConfig(resources={"draft_node": 1}))
    # Draft one group while the target verifies the other. auto: when the cost model predicts more tokens/s;
    # split / continue: every step (continue: each verified request's drafter drafts on from its proposal);
    # off. In one process (the local engine) drafting runs beside the verify on a thread only under split or
    # continue: there the two share the CPU, which pays where the verify waits on storage (an offloaded target).
    pipelining: str = "auto"
    draft_timeout_s: float = 30.0  # a draft later than this is dropped: that step runs without drafts
    metrics_port: int = 0  # serve Prometheus metrics on this port; 0: off
    shared_pools: SharedPoolsConfig = field(default_factory=SharedPoolsConfig)

    def validate(self, key: str) -> None:
        self.target_pool.validate(f"{key}.target_pool")
        self.draft_pool.validate(f"{key}.draft_pool")
        self.shared_pools.validate(f"{key}.shared_pools")
        for name in ("target_pool", "draft_pool"):
            pool = getattr(self, name)
            if pool.max_replicas > pool.replicas and not self.shared_pools.enabled:
                raise ConfigError(f"{key}.{name}.max_replicas: only shared pools scale (set {key}.shared_pools.enabled)")
        if self.draft_timeout_s <= 0:
            raise ConfigError(f"{key}.draft_timeout_s: must be > 0")
        if self.pipelining not in PIPELINING:
            raise ConfigError(f"{key}.pipelining: one of {', '.join(PIPELINING)} (got {self.pipelining!r})")


@dataclass
class EngineConfig:
    target: ModelConfig = field(default_factory=ModelConfig)
    drafter: DrafterConfig = field(default_factory=DrafterConfig)
    speculation: SpeculationConfig = field(default_factory=SpeculationConfig)
    sampling: SamplingDefaults = field(default_factory=SamplingDefaults)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)

    def validate(self, check_paths: bool = True) -> EngineConfig:
        self.target.validate("target")
        self.drafter.validate("drafter", check_paths)
        self.speculation.validate("speculation")
        self.limits.validate("limits")
        self.cluster.validate("cluster")
        if self.speculation.defer_prefill:
            from cluster.drafters.registry import DRAFTERS

            readers = [k for k in self.drafter.kinds_in_use() if DRAFTERS[k].reads_hidden]
            if readers:
                raise ConfigError(f"speculation.defer_prefill: drafter {readers[0]!r} drafts from the hidden state "
                                  "a prefill pass returns; deferring that pass leaves it nothing to draft from")
        if check_paths:
            check_model_dir("target", self.target)
        return self


def from_dict(cls, data, key: str = ""):
    """Build dataclass `cls` from plain data, rejecting unknown keys and wrong types by key path."""
    if hasattr(cls, "from_data"):  # a class that parses itself (e.g. sections chosen by a kind)
        return cls.from_data(data, key)
    if not isinstance(data, dict):
        raise ConfigError(f"{key or '<root>'}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for k in data:
        if k not in names:
            raise ConfigError(f"{_join(key, k)}: unknown key; known: {sorted(names)}")
    return cls(**{k: _coerce(hints[k], v, _join(key, k)) for k, v in data.items()})


def _coerce(tp, value, key: str):
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType):  # X | None
        if value is None and type(None) in args:
            return None
        tp = next(a for a in args if a is not type(None))
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, key)
    if typing.get_origin(tp) is list:
        (item_type,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__}")
        return [_coerce(item_type, v, f"{key}[{i}]") for i, v in enumerate(value)]
    if typing.get_origin(tp) is dict:
        key_type, value_type = typing.get_args(tp)
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__}")
        return {_coerce(key_type, k, f"{key}.{k}"): _coerce(value_type, v, f"{key}.{k}") for k, v in value.items()}
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
        raise ConfigError(f"{key}: expected {tp.__name__}, got {type(value).__name__} {value!r}")
    return value


def _join(key: str, name: str) -> str:
    return f"{key}.{name}" if key else name


def load_config(path: str | os.PathLike, check_paths: bool = True) -> EngineConfig:
    """Load and validate a YAML engine config. Relative model paths are relative to the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    data = yaml.safe_load(path.read_text()) or {}
    config = from_dict(EngineConfig, data)
    for section in [config.target, *config.drafter.sections.values()]:
        if hasattr(section, "resolve"):  # sections that name files: relative to this config file
            section.resolve(path.parent)
    return config.validate(check_paths)
