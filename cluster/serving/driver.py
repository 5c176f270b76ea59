"""A thread-safe driver: runs the step loop of a SpecEngine or a Router on a background thread, so
front doors (gRPC, HTTP) can submit requests and read their deltas from many threads."""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Iterator

from cluster.types import FinalDelta, SamplingParams, StreamDelta

log = logging.getLogger(__name__)


class EngineDriver:
    def __init__(self, engine):
        self.engine = engine  # anything with add_request / step / abort / has_unfinished
        self._lock = threading.Condition()
        self._queues: dict[str, queue.Queue] = {}
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="engine-driver", daemon=True)
        self._thread.start()

    def submit(self, prompt, params: SamplingParams) -> tuple[str, queue.Queue]:
        """Queue a request; raises the engine's typed errors in the caller's thread."""
        with self._lock:
            if self._closed:
                raise RuntimeError("driver is closed")
            request_id = self.engine.add_request(prompt, params)
            self._queues[request_id] = deltas = queue.Queue()
            self._lock.notify()
        return request_id, deltas

    def cancel(self, request_id: str) -> None:
        with self._lock:
            if self._queues.pop(request_id, None) is not None:
                self.engine.abort(request_id)

    def stream(self, prompt, params: SamplingParams, is_active: Callable[[], bool] = lambda: True,
               poll_s: float = 0.05) -> Iterator[StreamDelta]:
        """Submit now (typed errors raise here, before any output) and return an iterator over the
        request's deltas; closing it, or is_active() turning false, cancels the request."""
        request_id, deltas = self.submit(prompt, params)
        return DeltaStream(self, request_id, self._iterate(request_id, deltas, is_active, poll_s))

    def _iterate(self, request_id: str, deltas: queue.Queue, is_active, poll_s: float) -> Iterator[StreamDelta]:
        finished = False
        try:
            while not finished:
                try:
                    delta = deltas.get(timeout=poll_s)
                except queue.Empty:
                    if not is_active():
                        return
                    continue
                if isinstance(delta, BaseException):
                    raise delta
                finished = delta.finish_reason is not None
                yield delta
        finally:
            if not finished:
                self.cancel(request_id)

    def generate(self, prompt, params: SamplingParams, is_active: Callable[[], bool] = lambda: True) -> FinalDelta | None:
        """Run to completion; returns the final delta (full text, totals) or None if cancelled."""
        return last_delta(self.stream(prompt, params, is_active))

    def call(self, fn: Callable):
        """Run fn(engine) under the lock, between steps (e.g. to read cache occupancy)."""
        with self._lock:
            return fn(self.engine)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._lock.notify()
        self._thread.join(timeout=30)

    def _loop(self) -> None:
        while True:
            with self._lock:
                while not self._closed and not self.engine.has_unfinished():
                    self._lock.wait()
                if self._closed:
                    return
                try:
                    deltas = self.engine.step()
                except Exception as error:  # never leave callers hanging: fail what is in flight
                    log.exception("engine step failed; failing the requests in flight")
                    for request_id, q in list(self._queues.items()):
                        self.engine.abort(request_id)
                        q.put(RuntimeError(f"engine failure: {error}"))
                    self._queues.clear()
                    continue
                routed = [(self._queues.get(d.request_id), d) for d in deltas]
                for d in deltas:
                    if d.finish_reason is not None:
                        self._queues.pop(d.request_id, None)
            for q, d in routed:
                if q is not None:
                    q.put(d)


class DeltaStream:
    """An iterator over one request's deltas that can also be cancelled from any thread, even while
    another thread is blocked inside next() (closing a running generator would raise there)."""

    def __init__(self, driver: EngineDriver, request_id: str, deltas: Iterator[StreamDelta]):
        self.driver, self.request_id, self._deltas = driver, request_id, deltas

    def __iter__(self) -> DeltaStream:
        return self

    def __next__(self) -> StreamDelta:
        return next(self._deltas)

    def close(self) -> None:
        self._deltas.close()

    def cancel(self) -> None:
        self.driver.cancel(self.request_id)  # no-op once the request has finished


def last_delta(stream: Iterator[StreamDelta]) -> FinalDelta | None:
    """Drain a stream; the final delta (full text and totals), or None if it ended without one."""
    final = None
    for delta in stream:
        if isinstance(delta, FinalDelta):
            final = delta
    return final
