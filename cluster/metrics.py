"""Prometheus metrics for the router. Each router has its own registry (tests build several)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, start_http_server

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class RouterMetrics:
    def __init__(self, drafter: str):
        self.registry = CollectorRegistry()
        self.drafter = drafter
        r = self.registry
        self.requests = Counter("specdec_requests", "Finished requests", ["finish_reason"], registry=r)
        self.tokens = Counter("specdec_generated_tokens", "Tokens emitted", registry=r)
        self.drafted = Counter("specdec_draft_tokens", "Draft tokens proposed", ["drafter"], registry=r)
        self.accepted = Counter("specdec_accepted_tokens", "Draft tokens accepted", ["drafter"], registry=r)
        self.acceptance = Gauge("specdec_acceptance_rate", "Accepted / drafted, cumulative", ["drafter"], registry=r)
        self.accepted_length = Gauge("specdec_mean_accepted_length", "Tokens emitted per verify, cumulative",
                                     ["drafter"], registry=r)
        self.target_busy = Gauge("specdec_target_busy_fraction", "Fraction of wall time the target computed",
                                 registry=r)
        self.step_seconds = Histogram("specdec_step_seconds", "Router step time by part", ["part"],
                                      buckets=_LATENCY_BUCKETS, registry=r)
        self.queue_depth = Gauge("specdec_queue_depth", "Requests waiting for a cache slot", registry=r)
        self.running = Gauge("specdec_running_requests", "Requests being decoded", registry=r)
        self.ttft = Histogram("specdec_time_to_first_token_seconds", "Arrival to first token",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram("specdec_time_per_output_token_seconds", "Decode time per token after the first",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.failovers = Counter("specdec_worker_failures", "Worker failures handled", ["pool"], registry=r)
        self._verifies = 0
        self._verify_tokens = 0

    def observe_verify(self, drafted: int, accepted: int) -> None:
        self.drafted.labels(self.drafter).inc(drafted)
        self.accepted.labels(self.drafter).inc(accepted)
        self._verifies += 1
        self._verify_tokens += accepted + 1
        total_drafted = self.drafted.labels(self.drafter)._value.get()
        if total_drafted:
            self.acceptance.labels(self.drafter).set(self.accepted.labels(self.drafter)._value.get() / total_drafted)
        self.accepted_length.labels(self.drafter).set(self._verify_tokens / self._verifies)

    def serve(self, port: int) -> None:
        start_http_server(port, registry=self.registry)

    def text(self) -> str:
        return generate_latest(self.registry).decode()
