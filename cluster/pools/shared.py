"""A router's side of the shared pools: per pool, the live workers and this router's leases there, as
the last PoolView said, with the interface the RayExecutor uses for a router's own ActorPool."""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable

import ray

from cluster.pools.manager import KINDS, PoolView, RouterReport

log = logging.getLogger(__name__)


class SharedPool:
    def __init__(self, client: PoolClient, kind: str):
        self.client, self.kind = client, kind
        self.handles: dict[str, object] = {}
        self.leases: dict[str, int] = {}
        self.restarts = 0

    def ready(self) -> list[str]:
        return list(self.handles)

    def capacities(self) -> dict[str, int]:
        return dict(self.leases)

    def replace(self, worker: str) -> None:
        """It died under this router: the manager replaces it (once, however many routers report it)."""
        self.client.manager.lost.remote(worker)
        self.handles.pop(worker, None)
        self.leases.pop(worker, None)
        self.restarts += 1

    def wait_ready(self, timeout: float = 600.0) -> None:
        deadline = time.monotonic() + timeout
        while not self.handles:
            if time.monotonic() > deadline:
                raise RuntimeError(f"no {self.kind} worker in the shared pool after {timeout:.0f}s")
            self.client.apply(ray.get(self.client.manager.sync.remote(self.client.router_id, RouterReport())))
            time.sleep(0.1)

    def shutdown(self) -> None:
        pass  # the manager owns the actors


class PoolClient:
    """Joins the manager under a fresh id, heartbeats from a thread (an idle router still counts as
    alive), and syncs once a step without waiting: the view a step uses is at most one step old."""

    def __init__(self, manager, heartbeat_s: float = 1.0):
        self.manager = manager
        self.router_id = f"router-{uuid.uuid4().hex[:8]}"
        self.pools = {kind: SharedPool(self, kind) for kind in KINDS}
        self._pending = None
        self._stop = threading.Event()
        self._heartbeat = threading.Thread(target=self._beat, args=(heartbeat_s,), name="pool-heartbeat", daemon=True)
        self._heartbeat.start()

    def sync(self, report: Callable[[], RouterReport]) -> tuple[set[str], bool]:
        """Apply the answer to the previous report, if it came, and then send a new one, made after the
        answer is applied: it must say what the router honours from now on, or the manager could give
        the slots of a lease just raised to another router. Returns the workers that left the view (a
        draft worker scaled away: their requests move at this step) and whether a report was sent (not
        while the previous one is unanswered)."""
        gone: set[str] = set()
        if self._pending is not None:
            done, _ = ray.wait([self._pending], timeout=0)
            if not done:
                return gone, False
            try:
                gone = self.apply(ray.get(self._pending))
            except ray.exceptions.RayError as error:  # the manager is gone: keep the last view
                log.error("pool manager unreachable (%s); using the last view", type(error).__name__)
        self._pending = self.manager.sync.remote(self.router_id, report())
        return gone, True

    def apply(self, view: PoolView) -> set[str]:
        gone: set[str] = set()
        for kind, pool in self.pools.items():
            workers = view.workers.get(kind, {})
            gone |= set(pool.handles) - set(workers)
            pool.handles = {w: h for w, (h, _) in workers.items()}
            pool.leases = {w: lease for w, (_, lease) in workers.items()}
        return gone

    def _beat(self, every_s: float) -> None:
        while not self._stop.wait(every_s):
            try:
                self.manager.heartbeat.remote(self.router_id)
            except Exception:  # shutting down
                return

    def close(self) -> None:
        self._stop.set()
        try:
            ray.get(self.manager.leave.remote(self.router_id), timeout=5)
        except Exception:  # the manager is gone already: nothing to return
            pass
