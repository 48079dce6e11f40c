"""Deployment as code: compose stacks, Prometheus config and alert rules, Grafana dashboard.

Generates the files under ``docker/`` (``python -m lynx.deploy generate``) and exposes the
PromQL they contain, so tests can check it against live servers:

- `render_prometheus_config` (CI points it at 127.0.0.1 targets),
- `dashboard_queries`, `rule_queries`, `referenced_metric_names`.

Imports no torch and no SGLang; the dashboard needs grafana-foundation-sdk (dev dependency).
"""

from lynx.deploy.dashboard import dashboard_queries, referenced_metric_names
from lynx.deploy.prometheus import render_prometheus_config, rule_queries

__all__ = ["dashboard_queries", "referenced_metric_names", "render_prometheus_config",
           "rule_queries"]
