"""The ingress policy sizes replicas on requests counted on gRPC and HTTP together."""

from ray.serve.config import AutoscalingConfig, AutoscalingContext

from deployments.autoscaling import IN_FLIGHT, POLICY, ingress_policy


def _context(replicas: int, serve_count: float, reported: dict | None) -> AutoscalingContext:
    config = AutoscalingConfig(min_replicas=1, max_replicas=8, target_ongoing_requests=8, policy={"policy_function": POLICY})
    return AutoscalingContext(
        deployment_id=None, deployment_name="SpecDecServer", app_name="specdec", current_num_replicas=replicas,
        target_num_replicas=replicas, running_replicas=[], total_num_requests=serve_count, total_queued_requests=0,
        aggregated_metrics={IN_FLIGHT: reported} if reported is not None else {}, raw_metrics={},
        capacity_adjusted_min_replicas=1, capacity_adjusted_max_replicas=8, policy_state={},
        last_scale_up_time=None, last_scale_down_time=None, current_time=0.0, config=config)


def test_grpc_streams_count_toward_the_replicas_wanted():
    # Serve's proxy saw 2 HTTP requests; the replicas hold 30 (28 of them gRPC streams): 30 / 8 replicas' worth
    desired, _ = ingress_policy(_context(2, serve_count=2, reported={"r1": 14.0, "r2": 16.0}))
    assert desired == 30 / 8


def test_before_any_report_it_falls_back_to_serves_count():
    desired, _ = ingress_policy(_context(1, serve_count=16, reported=None))
    assert desired == 2


def test_the_policy_path_in_the_config_resolves():
    config = AutoscalingConfig(min_replicas=1, max_replicas=2, policy={"policy_function": POLICY})
    policy = config.policy.get_policy()  # Serve's controller imports and pickles it
    assert policy.__module__ == "deployments.autoscaling" and policy.__name__ == "ingress_policy"
