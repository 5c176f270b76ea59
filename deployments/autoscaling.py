"""Ingress replicas scaled on requests counted on every front door.

Serve's own count sees requests that reach a replica through its HTTP proxy or a handle; our gRPC
server runs inside the replica and bypasses both. Each replica therefore reports its driver's
in-flight count (gRPC and HTTP together) through `record_autoscaling_stats`, and this policy sizes the
deployment on that count. Serve applies min/max_replicas, the scaling factors and the delays around it.
"""

from __future__ import annotations

IN_FLIGHT = "specdec_in_flight_requests"
POLICY = "deployments.autoscaling:ingress_policy"


def ingress_policy(ctx) -> tuple[float, dict]:
    """Desired replicas = requests in flight on every front door / target_ongoing_requests. Until the
    replicas have reported, Serve's own count (HTTP and handles only)."""
    counts = (ctx.aggregated_metrics or {}).get(IN_FLIGHT) or {}
    total = sum(counts.values()) if counts else ctx.total_num_requests
    if ctx.current_num_replicas == 0:
        return ctx.target_num_replicas, {}
    return total / ctx.config.get_target_ongoing_requests(), {}
