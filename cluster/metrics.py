"""Prometheus metrics of one engine (in-process or Ray router) and its front doors. Each engine has its
own registry (tests build several); front doors add their request counters to the same registry, and
the HTTP app serves it at /metrics."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, start_http_server

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class EngineMetrics:
    def __init__(self, drafter: str):
        self.registry = CollectorRegistry()
        self.drafter = drafter
        r = self.registry
        self.requests = Counter("specdec_requests", "Finished requests", ["finish_reason"], registry=r)
        self.errors = Counter("specdec_request_errors", "Requests failed inside the server (each alone)",
                              registry=r)
        self.tokens = Counter("specdec_generated_tokens", "Tokens emitted", registry=r)
        self.drafted = Counter("specdec_draft_tokens", "Draft tokens proposed", ["drafter"], registry=r)
        self.accepted = Counter("specdec_accepted_tokens", "Draft tokens accepted", ["drafter"], registry=r)
        self.verifies = Counter("specdec_verify_passes", "Per-request verify passes", ["drafter"], registry=r)
        self.accepted_per_verify = Histogram("specdec_accepted_per_verify", "Draft tokens accepted per verify pass",
                                             ["drafter"], buckets=tuple(range(17)), registry=r)
        self.acceptance = Gauge("specdec_acceptance_rate", "Accepted / drafted, cumulative", ["drafter"], registry=r)
        self.accepted_length = Gauge("specdec_mean_accepted_length", "Tokens emitted per verify, cumulative",
                                     ["drafter"], registry=r)
        self.draft_failures = Counter("specdec_draft_failures", "Draft calls that failed (output stays exact)",
                                      registry=r)
        self.drafting = Gauge("specdec_drafting_enabled", "1 while speculation is on, 0 once drafting is off",
                              registry=r)
        self.target_busy = Gauge("specdec_target_busy_fraction", "Fraction of wall time the target computed",
                                 registry=r)
        self.step_seconds = Histogram("specdec_step_seconds", "Step time by part", ["part"],
                                      buckets=_LATENCY_BUCKETS, registry=r)
        self.step_predicted = Histogram("specdec_step_predicted_seconds", "Step time the cost model predicted",
                                        buckets=_LATENCY_BUCKETS, registry=r)
        self.step_measured = Histogram("specdec_step_measured_seconds", "Step time measured",
                                       buckets=_LATENCY_BUCKETS, registry=r)
        self.step_time_error = Gauge("specdec_step_time_error", "Median relative error of predicted step times",
                                     registry=r)
        self.queue_depth = Gauge("specdec_queue_depth", "Requests waiting for a cache slot", registry=r)
        self.running = Gauge("specdec_running_requests", "Requests being decoded", registry=r)
        self.ttft = Histogram("specdec_time_to_first_token_seconds", "Arrival to first token",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram("specdec_time_per_output_token_seconds", "Decode time per token after the first",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.continued = Counter("specdec_continued_drafts", "Drafts made on from a proposal under verification: "
                                 "used (the next proposal) or dropped (not all accepted, or a wrong guess)",
                                 ["outcome"], registry=r)
        self.failovers = Counter("specdec_worker_failures", "Worker failures handled", ["pool"], registry=r)
        self.api_requests = Counter("specdec_api_requests", "Front-door requests by protocol, route and status",
                                    ["protocol", "route", "status"], registry=r)
        self.drafting.set(1 if drafter != "none" else 0)

    def watch_storage(self, backend) -> None:
        """An offloaded target in this process: its reads from storage, read at scrape time."""
        r = self.registry
        Gauge("specdec_offload_read_bytes", "Bytes the offloaded target read from storage, cumulative",
              registry=r).set_function(lambda: backend.reader.bytes_read + getattr(backend.embed_rows, "bytes_read", 0))
        Gauge("specdec_offload_io_wait_seconds", "Seconds the offloaded target's compute waited on storage, cumulative",
              registry=r).set_function(lambda: backend.io_wait_s)
        Gauge("specdec_offload_passes", "Weight passes of the offloaded target (each streams its FFN once)",
              registry=r).set_function(lambda: backend.passes)
        Gauge("specdec_offload_dram_bytes", "Weight bytes the offloaded target holds in DRAM (its budget bounds this)",
              registry=r).set_function(lambda: backend.held_bytes)

    def observe_verify(self, drafted: int, accepted: int) -> None:
        d, a, v = (m.labels(self.drafter) for m in (self.drafted, self.accepted, self.verifies))
        d.inc(drafted)
        a.inc(accepted)
        v.inc()
        self.accepted_per_verify.labels(self.drafter).observe(accepted)
        if d._value.get():
            self.acceptance.labels(self.drafter).set(a._value.get() / d._value.get())
        self.accepted_length.labels(self.drafter).set((a._value.get() + v._value.get()) / v._value.get())

    def value(self, name: str, **labels) -> float:
        """A sample's current value (0 if absent): tests and benchmarks read metrics by value."""
        got = self.registry.get_sample_value(name, labels)
        return 0.0 if got is None else got

    def serve(self, port: int) -> None:
        start_http_server(port, registry=self.registry)

    def text(self) -> str:
        return generate_latest(self.registry).decode()
