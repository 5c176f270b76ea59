"""Draft and target pools as services shared by every router replica.

One PoolManager (a named, detached Ray actor) owns the target actors and the draft actors. Routers
(one per Serve replica) join it and, once a step, send a report: what they hold on each worker, how
many requests wait, how long their steps took and waited on drafts. The answer is a PoolView: the
live workers' handles and this router's lease of cache slots on each (policy.grant), so routers that
admit independently never over-commit a worker. Per-step calls still go straight from routers to
workers; the manager is off the data path.

Each pool is sized apart (policy.target_replicas): the draft pool grows when steps wait on drafts and
shrinks when its workers idle; the target pool grows when requests queue at busy workers. A target
leaves only once drained. The actors ask for their pool's Ray resources (`draft_gpu` / `target_gpu`),
so Ray's autoscaler (and KubeRay's worker groups) provision nodes for each pool apart.

A router that stops reporting (its replica died) is dropped after `router_timeout_s`: its leases
return to the pool and its sequences are released on every worker (their ids carry its prefix).
With no router for `idle_exit_s`, the manager frees its actors and exits.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field

import ray

from cluster.pools.policy import PoolLoad, ScalingRule, grant, target_replicas

log = logging.getLogger(__name__)

KINDS = ("target", "draft")


@dataclass
class RouterReport:
    usage: dict[str, int] = field(default_factory=dict)  # worker -> sequences this router holds there
    held: dict[str, int] = field(default_factory=dict)  # worker -> the lease it is honouring
    demand: dict[str, int] = field(default_factory=dict)  # pool -> its requests waiting for a slot there
    step_s: float = 0.0  # step time since its last report
    draft_wait_s: float = 0.0  # of which waiting on drafts


@dataclass
class PoolView:
    """What a router may use: per pool, worker -> (handle, its lease of slots there)."""

    workers: dict[str, dict[str, tuple[object, int]]]


@dataclass
class _Router:
    last_seen: float
    report: RouterReport = field(default_factory=RouterReport)
    offers: dict[str, int] = field(default_factory=dict)


class PoolManager:
    """A plain class (tests drive it directly); `connect` starts it as the named actor.

    pools: kind -> ActorPool; rules: kind -> ScalingRule; slots: kind -> cache slots per worker."""

    def __init__(self, pools: dict, slots: dict[str, int], rules: dict[str, ScalingRule], info: dict,
                 scale_interval_s: float = 2.0, router_timeout_s: float = 10.0, idle_exit_s: float = 0.0):
        self.pools, self.slots, self.rules, self._info = pools, slots, rules, info
        self.kinds = [kind for kind in KINDS if pools.get(kind) is not None]  # no draft pool at K = 0
        self.scale_interval_s, self.router_timeout_s, self.idle_exit_s = scale_interval_s, router_timeout_s, idle_exit_s
        self.routers: dict[str, _Router] = {}
        self.draining: set[str] = set()  # target workers that take no new requests, removed once empty
        # draft workers scaled away: out of every view at once, killed once routers have seen that
        self.retiring: dict[str, float] = {}  # worker -> when to kill it
        self.retire_grace_s = 5.0
        self.window = {kind: PoolLoad() for kind in self.kinds}
        self._busy = {}  # worker -> busy_s at the last scaling decision
        self._window_start = time.monotonic()
        self._idle_since = time.monotonic()
        self.scaling_log: list[tuple[float, str, int]] = []  # (time, pool, new size)
        self._lock = threading.RLock()

    # --- what routers call -------------------------------------------------------------------------
    def info(self) -> dict:
        return dict(self._info)

    def sync(self, router_id: str, report: RouterReport) -> PoolView:
        with self._lock:
            router = self.routers.setdefault(router_id, _Router(time.monotonic()))
            router.last_seen, router.report = time.monotonic(), report
            if "draft" in self.window:
                self.window["draft"].step_s += report.step_s
                self.window["draft"].draft_wait_s += report.draft_wait_s
            self.window["target"].waiting = sum(r.report.demand.get("target", 0) for r in self.routers.values())
            workers = {}
            for kind in self.kinds:
                workers[kind] = {}
                for worker in self._live(kind):
                    lease = self._lease(kind, worker, router_id, router)
                    router.offers[worker] = lease
                    workers[kind][worker] = (self.pools[kind].handles[worker], lease)
            return PoolView(workers)

    def heartbeat(self, router_id: str) -> None:
        with self._lock:
            if router_id in self.routers:
                self.routers[router_id].last_seen = time.monotonic()

    def leave(self, router_id: str) -> None:
        with self._lock:
            self._drop(router_id, reason="left")

    def lost(self, worker: str) -> None:
        """A router saw `worker` die: replace it once (other routers' reports of it are no-ops)."""
        with self._lock:
            if worker in self.retiring:
                return
            for kind in self.kinds:
                if worker in self.pools[kind].handles:
                    self.pools[kind].replace(worker)
                    self.draining.discard(worker)

    def handles(self) -> dict[str, dict[str, object]]:
        """Every live worker's handle, per pool (operators and tests read their loads)."""
        with self._lock:
            return {kind: {w: self.pools[kind].handles[w] for w in self._live(kind)} for kind in self.kinds}

    def sizes(self) -> dict[str, int]:
        return {kind: len(self.pools[kind].handles) - len((self.draining if kind == "target" else self.retiring))
                for kind in self.kinds}

    def status(self) -> dict:
        with self._lock:
            return {"sizes": self.sizes(), "routers": sorted(self.routers), "draining": sorted(self.draining),
                    "scaling_log": list(self.scaling_log),
                    "leases": {r: dict(s.offers) for r, s in self.routers.items()}}

    # --- leases ------------------------------------------------------------------------------------
    def _live(self, kind: str) -> list[str]:
        return [w for w in self.pools[kind].ready() if w not in self.retiring]

    def _lease(self, kind: str, worker: str, router_id: str, router: _Router) -> int:
        usage = router.report.usage.get(worker, 0)
        if worker in self.draining:
            return usage  # finishing what it holds; nothing new
        others = [s for r, s in self.routers.items() if r != router_id]
        reserved = sum(max(s.offers.get(worker, 0), s.report.held.get(worker, 0), s.report.usage.get(worker, 0))
                       for s in others)
        contenders = 1 + sum(1 for s in others if s.report.demand.get(kind, 0) or s.report.usage.get(worker, 0))
        return grant(self.slots[kind], reserved, usage, router.report.demand.get(kind, 0), contenders)

    # --- the manager's own loop --------------------------------------------------------------------
    def tick(self, now: float | None = None) -> None:
        """Drop silent routers, finish draining targets, and every scale_interval_s resize the pools."""
        now = time.monotonic() if now is None else now
        busy = self._worker_busy() if now - self._window_start >= self.scale_interval_s else None  # unlocked: 1 s at most
        with self._lock:
            for router_id, router in list(self.routers.items()):
                if now - router.last_seen > self.router_timeout_s:
                    self._drop(router_id, reason=f"silent for {now - router.last_seen:.0f}s")
            self._finish_draining()
            for worker, when in list(self.retiring.items()):
                if now >= when:
                    del self.retiring[worker]
                    self._kill("draft", worker)
            if self.routers:
                self._idle_since = now
            if busy is not None:
                self._scale(now, busy)

    def idle_too_long(self, now: float | None = None) -> bool:
        now = time.monotonic() if now is None else now
        return bool(self.idle_exit_s) and not self.routers and now - self._idle_since > self.idle_exit_s

    def _scale(self, now: float, busy: dict[str, float]) -> None:
        seconds = now - self._window_start
        for kind in self.kinds:
            load = self.window[kind]
            load.seconds = seconds
            load.busy_s = sum(busy.get(w, 0.0) - self._busy.get(w, 0.0) for w in self.pools[kind].handles)  # a new worker from 0
            current = self.sizes()[kind]
            wanted = target_replicas(current, load, self.rules[kind], draft_pool=kind == "draft")
            if wanted > current:
                self._grow(kind)
            elif wanted < current:
                self._shrink(kind)
        self._busy = busy
        self.window = {kind: PoolLoad() for kind in self.kinds}
        self._window_start = now

    def _worker_busy(self) -> dict[str, float]:
        """Each worker's compute seconds so far (its own account); a worker that does not answer in a
        second counts as idle this window."""
        with self._lock:
            handles = {w: self.pools[kind].handles[w] for kind in self.kinds for w in self._live(kind)}
        refs = {w: h.load.remote() for w, h in handles.items()}
        done, _ = ray.wait(list(refs.values()), num_returns=len(refs), timeout=1.0)
        busy = {}
        for worker, ref in refs.items():
            if ref in done:
                try:
                    busy[worker] = ray.get(ref)["busy_s"]
                except ray.exceptions.RayError:
                    pass
        return busy

    def _grow(self, kind: str) -> None:
        if kind == "target" and self.draining:  # take a draining worker back before starting one
            self.draining.discard(sorted(self.draining)[-1])
        else:
            self.pools[kind].spawn()
        self._logged(kind)

    def _shrink(self, kind: str) -> None:
        live = [w for w in self._live(kind) if w not in self.draining]
        if len(live) <= 1:
            return
        victim = min(live[1:], key=lambda w: (self._held(w), w))  # the least held, never the first
        if kind == "draft":  # drafts are soft state: routers move its requests at their next step
            self.retiring[victim] = time.monotonic() + self.retire_grace_s
        else:
            self.draining.add(victim)
        self._logged(kind)

    def _finish_draining(self) -> None:
        for worker in list(self.draining):
            if not self._held(worker):
                self.draining.discard(worker)
                self._kill("target", worker)

    def _held(self, worker: str) -> int:
        return sum(max(r.report.usage.get(worker, 0), r.offers.get(worker, 0) if worker in self.draining else 0)
                   for r in self.routers.values())

    def _kill(self, kind: str, worker: str) -> None:
        handle = self.pools[kind].handles.pop(worker, None)
        if handle is not None:
            ray.kill(handle)
        for router in self.routers.values():
            router.offers.pop(worker, None)

    def _logged(self, kind: str) -> None:
        size = self.sizes()[kind]
        log.info("%s pool -> %d actors", kind, size)
        self.scaling_log.append((time.time(), kind, size))

    def _drop(self, router_id: str, reason: str) -> None:
        router = self.routers.pop(router_id, None)
        if router is None:
            return
        log.warning("router %s dropped (%s): releasing its sequences and leases", router_id, reason)
        for kind in self.kinds:
            for handle in self.pools[kind].handles.values():
                handle.release_prefix.remote(f"{router_id}.")

    def shutdown(self) -> None:
        with self._lock:
            for kind in self.kinds:
                self.pools[kind].shutdown()


class _ManagerActor(PoolManager):
    """The named actor: builds the pools from the engine config and runs tick() on a thread."""

    def __init__(self, config, extra_eos: tuple[int, ...]):
        from cluster.pools.build import build_pools

        built = build_pools(config, extra_eos)
        pools_cfg, cluster = config.cluster.shared_pools, config.cluster
        rules = {"target": ScalingRule(cluster.target_pool.replicas, cluster.target_pool.max_replicas,
                                       pools_cfg.target_grow_at, pools_cfg.shrink_below),
                 "draft": ScalingRule(cluster.draft_pool.replicas, cluster.draft_pool.max_replicas,
                                      pools_cfg.draft_grow_at, pools_cfg.shrink_below)}
        super().__init__({"target": built.targets, "draft": built.drafters}, {"target": built.slots, "draft": built.draft_slots},
                         rules, built.info, pools_cfg.scale_interval_s, pools_cfg.router_timeout_s, pools_cfg.idle_exit_s)
        self.curve = built.curve
        threading.Thread(target=self._run, name="pool-manager", daemon=True).start()

    def verify_curve(self):
        return self.curve

    def _run(self) -> None:
        while True:
            time.sleep(0.25)
            try:
                self.tick()
            except Exception:  # the loop must outlive one bad tick
                log.exception("pool manager tick failed")
            if self.idle_too_long():
                log.warning("no router for %.0fs: freeing the pools and exiting", self.idle_exit_s)
                self.shutdown()
                ray.kill(ray.get_runtime_context().current_actor)


def connect(config, extra_eos: tuple[int, ...] = ()):
    """The pool manager named in config.cluster.shared_pools, started if no replica has started it yet.
    Detached, so it outlives the replica that started it; it exits after idle_exit_s without routers."""
    pools = config.cluster.shared_pools
    return ray.remote(_ManagerActor).options(
        name=pools.name, namespace=pools.namespace, lifetime="detached", get_if_exists=True,
        num_cpus=0, max_concurrency=32, max_restarts=0,
    ).remote(config, extra_eos)
