"""The target and draft actor pools of one engine config: a router's own, or a shared manager's."""

from __future__ import annotations

from dataclasses import dataclass

import ray

from cluster.core.cost_model import CostCurve
from cluster.drafters.registry import BuildContext
from cluster.executors.ray_executor import ActorPool
from cluster.workers.actors import start_draft_actor, start_target_actor


@dataclass
class BuiltPools:
    targets: ActorPool
    drafters: ActorPool | None
    info: dict  # vocabulary, context, EOS: from the model itself
    slots: int  # cache slots per target actor
    draft_slots: int
    curve: CostCurve | None  # the target's measured cost curve, when the config wants one


def build_pools(config, extra_eos: tuple[int, ...]) -> BuiltPools:
    spec, limits, cluster = config.speculation, config.limits, config.cluster
    slots = limits.max_batch_size  # per target actor
    # A draft actor has room for every request its pool may run, so one survivor can take a dead peer's
    # requests at the next step (with max_batch_size each it was full, and they verified without drafts)
    draft_slots = slots * cluster.target_pool.max_replicas
    capacity = limits.max_model_len + spec.k_max + 1  # a verify may run K+1 past the last token
    targets = ActorPool("target", lambda: start_target_actor(cluster.target_pool, config.target, slots, capacity,
                                                             extra_eos=extra_eos, rule=spec.rule),
                        cluster.target_pool.replicas, slots)
    first = next(iter(targets.handles.values()))
    info = ray.get(first.info.remote())
    drafters = None
    if spec.k > 0:
        context = BuildContext(draft_slots, capacity, info["vocab_size"], eos_ids=tuple(info["eos_ids"]), rule=spec.rule,
                               target=config.target, sections=config.drafter.sections)
        drafters = ActorPool("draft", lambda: start_draft_actor(cluster.draft_pool, config.drafter, context),
                             cluster.draft_pool.replicas, draft_slots)
    curve = None
    if spec.calibrate and spec.k > 0 and (spec.adaptive or cluster.pipelining == "auto"):
        measured = ray.get(first.calibrate.remote())
        curve = CostCurve(measured.a, measured.b, measured.c, measured.d, measured.samples)
    return BuiltPools(targets, drafters, info, slots, draft_slots, curve)
