"""The Ray router: the engine's step loop (cluster/engine.py) with a RayExecutor over actor pools.

Target actors and draft actors are placed by the pools' Ray resources (custom resources, accelerator
type, GPUs), so one config puts drafts on cheap GPUs and targets on large ones. Per-step calls go
straight to actors. Drafts for one group of requests run on the draft actors while the target verifies
the other group, whenever the cost model predicts that pays.
"""

from __future__ import annotations

import ray

from cluster.config import EngineConfig
from cluster.core.cost_model import CostCurve
from cluster.drafters.registry import DRAFTERS, BuildContext
from cluster.engine import Engine
from cluster.executors.ray_executor import ActorPool, RayExecutor
from cluster.models.loader import load_tokenizer
from cluster.workers.actors import start_draft_actor, start_target_actor


class Router(Engine):
    def __init__(self, config: EngineConfig, tokenizer=None):
        spec, limits, cluster = config.speculation, config.limits, config.cluster
        tokenizer = tokenizer if tokenizer is not None else load_tokenizer(config.target)
        slots = limits.max_batch_size  # per target actor
        # A draft actor has room for every running request, so one survivor can take a dead peer's requests
        # at the next step (with max_batch_size each it was full, and they verified without drafts)
        draft_slots = slots * cluster.target_pool.replicas
        capacity = limits.max_model_len + spec.k_max + 1  # a verify may run K+1 past the last token
        extra_eos = tuple({tokenizer.eos_token_id} - {None})
        targets = ActorPool("target", lambda: start_target_actor(cluster.target_pool, config.target, slots, capacity,
                                                                 extra_eos=extra_eos, rule=spec.rule),
                            cluster.target_pool.replicas)
        first = next(iter(targets.handles.values()))
        info = ray.get(first.info.remote())  # vocabulary, context, EOS: from the model itself
        drafters = None
        if spec.k > 0:
            context = BuildContext(draft_slots, capacity, info["vocab_size"], eos_ids=tuple(info["eos_ids"]), rule=spec.rule,
                                   target=config.target, sections=config.drafter.sections)
            drafters = ActorPool("draft", lambda: start_draft_actor(cluster.draft_pool, config.drafter, context),
                                 cluster.draft_pool.replicas)
        curve = None
        if spec.calibrate and spec.k > 0 and (spec.adaptive or cluster.pipelining == "auto"):
            curve = ray.get(first.calibrate.remote())
            curve = CostCurve(curve.a, curve.b, curve.c, curve.d, curve.samples)
        self.targets, self.drafts = targets, drafters
        executor = RayExecutor(targets, drafters, slots, info["vocab_size"], cluster.draft_timeout_s, draft_slots)
        super().__init__(config, executor, tokenizer, info["vocab_size"], info["max_context"], set(info["eos_ids"]),
                         curve, sequential_draft=DRAFTERS[config.drafter.kind].model_based)
        if cluster.metrics_port:
            self.metrics.serve(cluster.metrics_port)

    def wait_ready(self, timeout: float = 600.0) -> None:
        self.targets.wait_ready(timeout)
        if self.drafts is not None:
            self.drafts.wait_ready(timeout)

    def worker_loads(self) -> dict[str, list[dict]]:
        """Each actor's own account: sequences held, cache slots in use, compute time."""
        return self.executor.loads()
