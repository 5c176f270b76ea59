"""The Grafana dashboard only queries metrics the engine exports (so it cannot silently rot)."""

import json
import re
from pathlib import Path

from cluster.metrics import EngineMetrics

DASHBOARD = Path(__file__).resolve().parents[2] / "deployments" / "grafana" / "specdec-dashboard.json"
SERIES = {"counter": ("_total",), "gauge": ("",), "histogram": ("_bucket", "_count", "_sum")}


def test_dashboard_queries_exported_metrics():
    exported = {family.name + suffix for family in EngineMetrics("model").registry.collect()
                for suffix in SERIES[family.type]}
    dashboard = json.loads(DASHBOARD.read_text())
    used = {name for panel in dashboard["panels"] for target in panel["targets"]
            for name in re.findall(r"specdec_[a-z_]+", target["expr"])}
    assert len(dashboard["panels"]) >= 10 and used
    assert used <= exported, used - exported
