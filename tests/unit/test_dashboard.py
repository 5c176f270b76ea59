"""The Grafana dashboard only queries metrics the engine exports (so it cannot silently rot)."""

import json
import re
from pathlib import Path
from types import SimpleNamespace

from cluster.metrics import EngineMetrics

DASHBOARD = Path(__file__).resolve().parents[2] / "deployments" / "grafana" / "specdec-dashboard.json"
SERIES = {"counter": ("_total",), "gauge": ("",), "histogram": ("_bucket", "_count", "_sum")}


def test_dashboard_queries_exported_metrics():
    metrics = EngineMetrics("model")
    # an offloaded target's gauges exist once an engine watches one; the names are what matter here
    metrics.watch_storage(SimpleNamespace(reader=SimpleNamespace(bytes_read=0), embed_rows=None, io_wait_s=0.0,
                                          passes=0, held_bytes=0))
    exported = {family.name + suffix for family in metrics.registry.collect() for suffix in SERIES[family.type]}
    dashboard = json.loads(DASHBOARD.read_text())
    used = {name for panel in dashboard["panels"] for target in panel["targets"]
            for name in re.findall(r"specdec_[a-z_]+", target["expr"])}
    assert len(dashboard["panels"]) >= 10 and used
    assert used <= exported, used - exported
