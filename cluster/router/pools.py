"""A pool of Ray actors of one kind: pinning counts, readiness, replacement of dead actors."""

from __future__ import annotations

import logging
from collections.abc import Callable

import ray

log = logging.getLogger(__name__)


class WorkerPool:
    def __init__(self, name: str, start: Callable[[int], "ray.actor.ActorHandle"], size: int):
        self.name, self._start = name, start
        self.handles = [start(i) for i in range(size)]
        self._ready_probe = [h.ping.remote() for h in self.handles]  # model loading ends when ping answers
        self.pinned = [0] * size  # live requests pinned to each actor
        self.restarts = 0

    def __len__(self) -> int:
        return len(self.handles)

    def is_ready(self, i: int, timeout: float = 0.0) -> bool:
        probe = self._ready_probe[i]
        if probe is None:
            return True
        done, _ = ray.wait([probe], timeout=timeout)
        if not done:
            return False
        try:
            ray.get(done[0])
        except ray.exceptions.RayError:
            log.exception("%s actor %d failed to start", self.name, i)
            return False
        self._ready_probe[i] = None
        return True

    def wait_ready(self, timeout: float = 600.0) -> None:
        for i in range(len(self)):
            if not self.is_ready(i, timeout):
                raise RuntimeError(f"{self.name} actor {i} did not become ready in {timeout:.0f}s")

    def least_loaded(self, limit: int | None = None, ready_only: bool = True) -> int:
        """Index of the ready actor with the fewest pinned requests (below `limit`), or -1."""
        best = -1
        for i in range(len(self)):
            if (ready_only and not self.is_ready(i)) or (limit is not None and self.pinned[i] >= limit):
                continue
            if best < 0 or self.pinned[i] < self.pinned[best]:
                best = i
        return best

    def replace(self, i: int) -> None:
        """Start a fresh actor in slot i; it is not used until it answers a ping."""
        log.warning("replacing %s actor %d", self.name, i)
        try:
            ray.kill(self.handles[i])
        except Exception:  # already gone
            pass
        self.handles[i] = self._start(i)
        self._ready_probe[i] = self.handles[i].ping.remote()
        self.restarts += 1
