"""The only place workers become Ray actors. Placement (custom resources, accelerator type, GPUs)
comes from the pool's config, so one config puts drafts on cheap GPUs and targets on large ones."""

from __future__ import annotations

import os

import ray
import torch

from cluster.config import PoolConfig
from cluster.workers.draft_worker import DraftWorker
from cluster.workers.target_worker import TargetWorker


def actor_options(pool: PoolConfig) -> dict:
    options = {"num_cpus": pool.num_cpus, "num_gpus": pool.num_gpus, "max_restarts": 0}
    if pool.resources:
        options["resources"] = dict(pool.resources)
    if pool.accelerator_type:
        options["accelerator_type"] = pool.accelerator_type
    return options


class _Placed:
    """Mixed into each actor: where it runs and a cheap liveness probe."""

    def node_id(self) -> str:
        return ray.get_runtime_context().get_node_id()


def _setup(pool: PoolConfig) -> str:
    # Ray sets OMP_NUM_THREADS from the actor's num_cpus (1 when 0), which starves a CPU model: by
    # default a model actor uses every core of its node; pinned to cores, as many threads as cores.
    if pool.cpus:
        os.sched_setaffinity(0, pool.cpus)
    torch.set_num_threads(pool.torch_threads or len(pool.cpus) or os.cpu_count() or 1)
    return "cuda" if pool.num_gpus > 0 and torch.cuda.is_available() else "cpu"


class _TargetActor(TargetWorker, _Placed):
    def __init__(self, pool: PoolConfig, *args, **kwargs):
        super().__init__(*args, device=_setup(pool), **kwargs)


class _DraftActor(DraftWorker, _Placed):
    def __init__(self, pool: PoolConfig, drafter_cfg, context):
        context.device = _setup(pool)
        super().__init__(drafter_cfg.kind, drafter_cfg.section, context)


def start_target_actor(pool: PoolConfig, model_cfg, num_slots: int, capacity: int, name: str | None = None,
                       extra_eos: tuple[int, ...] = (), rule: str = "coupled"):
    options = actor_options(pool) | ({"name": name} if name else {})
    return ray.remote(_TargetActor).options(**options).remote(pool, model_cfg, num_slots, capacity,
                                                              extra_eos=extra_eos, rule=rule)


def start_draft_actor(pool: PoolConfig, drafter_cfg, context, name: str | None = None):
    options = actor_options(pool) | ({"name": name} if name else {})
    return ray.remote(_DraftActor).options(**options).remote(pool, drafter_cfg, context)
