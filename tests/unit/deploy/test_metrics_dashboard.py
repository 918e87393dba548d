"""deploy/grafana-dashboard.json graphs every metric cluster/metrics.py exports, and nothing else."""
from __future__ import annotations


def test_the_grafana_dashboard_graphs_only_metrics_the_cluster_exports():
    import json
    import re
    from pathlib import Path

    from cluster import metrics

    dashboard = json.loads((Path(__file__).parents[3] / "deploy" / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    used = {re.sub(r"_(bucket|count|sum)$", "", n) for e in exprs for n in re.findall(r"ray_(llama_\w+)", e)}
    source = Path(metrics.__file__).read_text()
    exported = set(re.findall(r'"(llama_\w+)"', source))
    assert used and used <= exported, used - exported
    assert exported <= used, f"not graphed: {exported - used}"
