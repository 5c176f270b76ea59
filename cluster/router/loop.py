"""The Ray router: the engine's step loop (cluster/engine.py) with a RayExecutor over actor pools.

Target actors and draft actors are placed by the pools' Ray resources (custom resources, accelerator
type, GPUs), so one config puts drafts on cheap GPUs and targets on large ones. Per-step calls go
straight to actors. Drafts for one group of requests run on the draft actors while the target verifies
the other group, whenever the cost model predicts that pays.
"""

from __future__ import annotations

import ray

from cluster.config import EngineConfig
from cluster.drafters.registry import DRAFTERS
from cluster.engine import Engine
from cluster.executors.ray_executor import RayExecutor
from cluster.models.loader import load_tokenizer
from cluster.pools.build import build_pools
from cluster.pools.manager import connect
from cluster.pools.shared import PoolClient


class Router(Engine):
    def __init__(self, config: EngineConfig, tokenizer=None):
        spec, cluster = config.speculation, config.cluster
        tokenizer = tokenizer if tokenizer is not None else load_tokenizer(config.target)
        extra_eos = tuple({tokenizer.eos_token_id} - {None})
        self.pool_client = None
        if cluster.shared_pools.enabled:  # pools served to every replica by one named manager
            manager = connect(config, extra_eos)
            self.pool_client = PoolClient(manager)
            info, curve = ray.get([manager.info.remote(), manager.verify_curve.remote()])
            targets, drafters = self.pool_client.pools["target"], self.pool_client.pools["draft"] if spec.k > 0 else None
        else:  # this router's own pools
            built = build_pools(config, extra_eos)
            targets, drafters, info, curve = built.targets, built.drafters, built.info, built.curve
        self.targets, self.drafts = targets, drafters
        executor = RayExecutor(targets, drafters, info["vocab_size"], cluster.draft_timeout_s, self.pool_client)
        super().__init__(config, executor, tokenizer, info["vocab_size"], info["max_context"], set(info["eos_ids"]),
                         curve, sequential_draft=DRAFTERS[config.drafter.kind].model_based)
        if self.pool_client is not None:  # workers release a dead router's sequences by this prefix
            self.requests.id_prefix = f"{self.pool_client.router_id}."
        if cluster.metrics_port:
            self.metrics.serve(cluster.metrics_port)

    def wait_ready(self, timeout: float = 600.0) -> None:
        self.targets.wait_ready(timeout)
        if self.drafts is not None:
            self.drafts.wait_ready(timeout)

    def worker_loads(self) -> dict[str, list[dict]]:
        """Each actor's own account: sequences held, cache slots in use, compute time."""
        return self.executor.loads()

    def shutdown(self) -> None:
        if self.pool_client is not None:
            self.pool_client.close()  # the manager frees this router's leases and sequences
        super().shutdown()
