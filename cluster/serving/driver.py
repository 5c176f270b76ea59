"""A thread-safe driver: runs the step loop of a SpecEngine or a Router on a background thread, so
front doors (gRPC, HTTP) can submit requests and read their deltas from many threads.

The step thread only steps. Validation and tokenisation run in the submitting thread before the lock
is taken; detokenisation and stop strings run in the thread that reads the request's stream.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator

from cluster.errors import ServerDrainingError
from cluster.text import TextStream
from cluster.types import FINISH_CANCELLED, FINISH_ERROR, FinalDelta, SamplingParams, StreamDelta, TokenDelta

log = logging.getLogger(__name__)


class EngineDriver:
    def __init__(self, engine):
        self.engine = engine  # anything with build / enqueue / step / abort / has_unfinished
        self._lock = threading.Condition()
        self._queues: dict[str, queue.Queue] = {}
        self._closed = False
        self._draining = False
        self._thread = threading.Thread(target=self._loop, name="engine-driver", daemon=True)
        self._thread.start()

    # --- what front doors call ---------------------------------------------------------------------
    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    @property
    def limits(self):
        return self.engine.config.limits

    @property
    def metrics(self):
        return self.engine.metrics

    def default_params(self, **overrides) -> SamplingParams:
        return self.engine.default_params(**overrides)

    def submit(self, prompt, params: SamplingParams) -> tuple[str, queue.Queue, TextStream]:
        """Validate and tokenise here, in the caller's thread; then queue the request. Raises typed errors."""
        return self.submit_many([(prompt, params)])[0]

    def submit_many(self, requests: list[tuple]) -> list[tuple[str, queue.Queue, TextStream]]:
        """Several requests at once (the samples of one API call): built here, then queued together
        under one lock, so they join the same step; if any cannot be queued, none stays queued."""
        if self._draining or self._closed:
            raise ServerDrainingError("the server is shutting down; retry on another replica")
        seqs = [self.engine.build(prompt, params) for prompt, params in requests]
        texts = [self.engine.text_stream(seq) for seq in seqs]
        out = []
        with self._lock:
            if self._closed or self._draining:
                raise ServerDrainingError("the server is shutting down; retry on another replica")
            try:
                for seq, text in zip(seqs, texts):
                    request_id = self.engine.enqueue(seq)
                    self._queues[request_id] = deltas = queue.Queue()
                    out.append((request_id, deltas, text))
            except BaseException:
                for request_id, _, _ in out:
                    self._queues.pop(request_id, None)
                    self.engine.abort(request_id)
                raise
            self._lock.notify()
        return out

    def cancel(self, request_id: str, reason: str = FINISH_CANCELLED):
        """Finish a request now; returns its sequence (for its statistics) or None once it has finished."""
        with self._lock:
            if self._queues.pop(request_id, None) is not None:
                return self.engine.abort(request_id, reason)
        return None

    def stream(self, prompt, params: SamplingParams, is_active: Callable[[], bool] = lambda: True,
               poll_s: float = 0.05) -> DeltaStream:
        """Submit now (typed errors raise here, before any output) and return an iterator over the
        request's text deltas; closing it, or is_active() turning false, cancels the request."""
        return self.stream_many([(prompt, params)], is_active, poll_s)[0]

    def stream_many(self, requests: list[tuple], is_active: Callable[[], bool] = lambda: True,
                    poll_s: float = 0.05) -> list[DeltaStream]:
        """submit_many, with a DeltaStream for each request."""
        return [DeltaStream(self, request_id, deltas, text, is_active, poll_s)
                for request_id, deltas, text in self.submit_many(requests)]

    def generate(self, prompt, params: SamplingParams, is_active: Callable[[], bool] = lambda: True) -> FinalDelta | None:
        """Run to completion; returns the final delta (full text, totals) or None if cancelled."""
        return last_delta(self.stream(prompt, params, is_active))

    def call(self, fn: Callable):
        """Run fn(engine) under the lock, between steps (e.g. to read cache occupancy)."""
        with self._lock:
            return fn(self.engine)

    @property
    def in_flight(self) -> int:
        return len(self._queues)

    def drain(self, timeout_s: float) -> bool:
        """Stop taking requests and wait for those in flight to finish; True if all finished in time."""
        self._draining = True
        deadline = time.monotonic() + timeout_s
        while self._queues and time.monotonic() < deadline:
            time.sleep(0.05)
        return not self._queues

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._lock.notify()
        self._thread.join(timeout=30)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    # --- the step thread ---------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._lock:
                while not self._closed and not self.engine.has_unfinished():
                    self._lock.wait()
                if self._closed:
                    return
                try:
                    deltas = self.engine.step()
                except Exception:  # a bug in the loop itself: fail what is in flight, free it, go on
                    log.exception("engine step failed; failing the requests in flight")
                    deltas = []
                    for request_id in list(self._queues):
                        seq = self.engine.abort(request_id, FINISH_ERROR)
                        deltas.append(TokenDelta(request_id, [], None, FINISH_ERROR,
                                                 seq.num_prompt if seq else 0, seq.stats if seq else None,
                                                 "engine step failed"))
                routed = [(self._queues.get(d.request_id), d) for d in deltas]
                for d in deltas:
                    if d.finish_reason is not None:
                        self._queues.pop(d.request_id, None)
            for q, d in routed:
                if q is not None:
                    q.put(d)


class DeltaStream:
    """An iterator over one request's text deltas, made from its token deltas in the reading thread.
    It can be cancelled from any thread, even while another is blocked inside next()."""

    def __init__(self, driver: EngineDriver, request_id: str, deltas: queue.Queue, text: TextStream,
                 is_active: Callable[[], bool], poll_s: float):
        self.driver, self.request_id, self.text = driver, request_id, text
        self._deltas, self._is_active, self._poll_s = deltas, is_active, poll_s
        self._done = False

    @property
    def seed(self) -> int:
        return self.text.seed

    @property
    def prompt_tokens(self) -> int:
        return self.text.prompt_tokens

    def __iter__(self) -> DeltaStream:
        return self

    def __next__(self) -> StreamDelta:
        while not self._done:
            if not self._is_active():  # checked on every read: a busy stream never runs dry
                self.close()
                break
            try:
                delta = self._deltas.get(timeout=self._poll_s)
            except queue.Empty:
                continue
            out = self.text.feed(delta)
            if self.text.stopped:  # a stop string: end it in the engine too, and report its statistics
                seq = self.driver.cancel(self.request_id, out.finish_reason)
                if seq is not None:
                    out.stats = seq.stats
            self._done = isinstance(out, FinalDelta)
            return out
        raise StopIteration

    def close(self) -> None:
        """Stop reading; cancels the request if it has not finished."""
        if not self._done:
            self._done = True
            self.driver.cancel(self.request_id)

    def cancel(self) -> None:
        self.driver.cancel(self.request_id)  # no-op once the request has finished


def last_delta(stream: Iterator[StreamDelta]) -> FinalDelta | None:
    """Drain a stream; the final delta (full text and totals), or None if it ended without one."""
    final = None
    for delta in stream:
        if isinstance(delta, FinalDelta):
            final = delta
    return final
