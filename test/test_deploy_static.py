"""Deployment as code, without servers: generated files are fresh, the dashboard is well formed,
every PromQL expression parses (promtool), every referenced metric is one an exporter defines."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lynx.deploy import constants as c
from lynx.deploy.dashboard import (
    ROWS,
    build_dashboard,
    dashboard_queries,
    panels,
    raw_dashboard_queries,
    referenced_metric_names,
)
from lynx.deploy.generate import generated_files, stale_files
from lynx.deploy.prometheus import (
    alert_rules,
    render_prometheus_config,
    rule_expressions,
    rule_queries,
)
from lynx.deploy.promql import either_spelling, metric_names, substitute

PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="promtool missing: make prometheus")


def test_generated_files_equal_committed() -> None:
    stale = stale_files(generated_files())
    assert not stale, f"regenerate with `python -m lynx.deploy generate`: {stale}"


def test_check_mode_reports_a_stale_file(tmp_path: Path) -> None:
    files = generated_files(root=tmp_path)
    assert set(stale_files(files)) == set(files)  # nothing written yet
    for path, text in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    assert stale_files(files) == []
    dashboard = tmp_path / "grafana" / "dashboards" / "lynx.json"
    dashboard.write_text(dashboard.read_text().replace("Lynx", "Lnyx", 1))
    assert stale_files(files) == [dashboard]


def test_dashboard_structure() -> None:
    board = build_dashboard()
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids)) and 0 not in ids
    assert board["uid"] == c.DASHBOARD_UID
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for panel in board["panels"]:
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel["targets"] and panel["description"], panel["title"]
        assert isinstance(panel["options"], dict), panel["title"]
    rows = [p["title"] for p in board["panels"] if p["type"] == "row"]
    assert rows == [r.title for r in ROWS]


def test_datasource_uid_only_in_provisioning() -> None:
    hits = [p for p in c.DOCKER_DIR.rglob("*") if p.is_file() and p.suffix in
            (".json", ".yaml", ".yml") and c.DATASOURCE_UID in p.read_text()]
    assert hits == [c.DOCKER_DIR / "grafana" / "provisioning" / "datasources" / "prometheus.yaml"]
    provisioned = yaml.safe_load(hits[0].read_text())["datasources"][0]
    assert provisioned["uid"] == c.DATASOURCE_UID and provisioned["type"] == "prometheus"


def test_dashboard_covers_the_required_panels() -> None:
    exprs = " ".join(raw_dashboard_queries())
    for needle in ("lynx_experts_kept_mean", "lynx_experts_stock_union_mean",
                   "rate(lynx_experts_kept_total", "rate(lynx_experts_stock_union_total",
                   "rate(lynx_routing_mass_kept_total", "rate(lynx_routing_mass_total",
                   "lynx_policy_version", "lynx_controller_mode",
                   'histogram_quantile(0.5, sum by (le, instance) '
                   '(rate({__name__=~"sglang[:_]inter_token_latency_seconds_bucket"',
                   'histogram_quantile(0.99, sum by (le, instance) '
                   '(rate({__name__=~"sglang[:_]time_to_first_token_seconds_bucket"',
                   'lynx_controller_slo_target_seconds{metric="itl"}',
                   "lynx_controller_decisions_total", 'sglang[:_]num_running_reqs"',
                   'rate({__name__=~"sglang[:_]generation_tokens_total"'):
        assert needle in exprs, needle
    by_layer = [q for q in raw_dashboard_queries() if "layer" in q]
    assert by_layer, "no per-layer panel"


def test_metric_name_extraction() -> None:
    expr = ('histogram_quantile(0.99, sum by (le, instance) (rate(sglang:x_bucket{a="b:c"}[5m])))'
            ' > on() group_left() (max(lynx_t{metric="itl"}) or on() vector(0.1))')
    assert metric_names(expr) == {"sglang:x_bucket", "lynx_t"}
    assert metric_names('up{job="lynx-controller"} == 0') == {"up"}
    either = 'rate({__name__=~"sglang[:_]x_total", instance=~"$r"}[1m])'
    assert metric_names(either) == {"sglang:x_total"}
    assert either_spelling("sglang:x_total", 'a="b"') == '{__name__=~"sglang[:_]x_total", a="b"}'

    assert "lynx_pruned_rows_total" in referenced_metric_names()
    assert "up" not in referenced_metric_names()
    with pytest.raises(ValueError, match="unsubstituted"):
        substitute("rate(x[$__rate_interval]) + $unknown")


def test_referenced_metrics_are_the_declared_ones() -> None:
    declared = {*c.RUNTIME_METRICS, *c.CONTROLLER_METRICS, *c.SGLANG_METRICS, *c.ROUTER_METRICS}
    base = referenced_metric_names("base")
    assert base <= declared, base - declared
    assert declared - base == set()
    # the EP panels read the EP series only (a live EP server exports them: test_e2e_parallel)
    assert referenced_metric_names("ep") == set(c.EP_RUNTIME_METRICS)
    assert referenced_metric_names() == base | set(c.EP_RUNTIME_METRICS)


def _family(name: str) -> str:
    return re.sub(r"_(bucket|total|count|sum)$", "", name)


def _exported(name: str, families: set[str]) -> bool:
    """prometheus_client names a counter's family with or without ``_total`` by version."""
    return name in families or _family(name) in families


def test_controller_metrics_exist_in_the_controller() -> None:
    from lynx_policy.metrics import ControllerMetrics

    text = ControllerMetrics().render().decode()
    families = set(re.findall(r"^# TYPE (\S+) ", text, flags=re.M))
    for name in c.CONTROLLER_METRICS:
        assert _exported(name, families), name


def test_runtime_metrics_exist_in_the_plugin_exporter() -> None:
    # In a child process: the exporter registers in prometheus_client's global registry.
    code = ("from prometheus_client import REGISTRY, generate_latest\n"
            "from lynx.sglang_plugin.exporter import _Metrics\n"
            "_Metrics()\nprint(generate_latest(REGISTRY).decode())\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=120).stdout
    families = set(re.findall(r"^# TYPE (\S+) ", out, flags=re.M))
    for name in c.RUNTIME_METRICS:
        assert _exported(name, families), name
    for name in c.EP_RUNTIME_METRICS[:-1]:  # the EP gauges (the expert timer is moe_timer's)
        assert _exported(name, families), name


def test_sglang_metrics_exist_in_sglang_source() -> None:
    import importlib.util

    spec = importlib.util.find_spec("sglang")  # no import: sglang's __init__ is slow
    assert spec is not None and spec.origin is not None
    source = (Path(spec.origin).parent / "srt" / "observability" /
              "metrics_collector.py").read_text()
    for name in c.SGLANG_METRICS:
        base = re.sub(r"_bucket$", "", name)
        assert f'name="{base}"' in source or f'name="{_family(base)}"' in source, name


def test_router_metrics_exist_in_sglang_router() -> None:
    router = pytest.importorskip("sglang_router")
    binaries = list(Path(router.__file__).parent.glob("*.so"))
    assert binaries
    blob = b"".join(p.read_bytes() for p in binaries)
    for name in c.ROUTER_METRICS:
        assert _family(name).encode() in blob, name


def _promtool(*args: str) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run([PROMTOOL, *args], capture_output=True, text=True, timeout=60)


@needs_promtool
def test_rules_file_passes_promtool() -> None:
    result = _promtool("check", "rules", str(c.DOCKER_DIR / "prometheus" / "rules.yml"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{len(alert_rules())} rules found" in result.stdout


def _recording_rules(exprs: list[str], path: Path) -> Path:
    rules = [{"record": f"lynx:check_{i}", "expr": e} for i, e in enumerate(exprs)]
    path.write_text(yaml.safe_dump({"groups": [{"name": "check", "rules": rules}]}))
    return path


@needs_promtool
def test_every_dashboard_and_rule_expression_parses(tmp_path: Path) -> None:
    exprs = [*dashboard_queries(), *rule_queries(), *rule_expressions()]
    result = _promtool("check", "rules", str(_recording_rules(exprs, tmp_path / "q.yml")))
    assert result.returncode == 0, result.stdout + result.stderr
    broken = _promtool("check", "rules",
                       str(_recording_rules(["sum(rate(x[1m])"], tmp_path / "bad.yml")))
    assert broken.returncode != 0  # the harness does catch a syntax error


@needs_promtool
@pytest.mark.parametrize("committed", ["prometheus.yml", "prometheus.cpu.yml", None])
def test_prometheus_config_passes_promtool(tmp_path: Path, committed: str | None) -> None:
    rules = str(c.DOCKER_DIR / "prometheus" / "rules.yml")
    if committed is None:  # the CI topology's config: loopback targets
        text = render_prometheus_config(["127.0.0.1:30001", "127.0.0.1:30002"],
                                        "127.0.0.1:5791", "127.0.0.1:29000", "1s",
                                        rule_files=[rules])
    else:
        text = (c.DOCKER_DIR / "prometheus" / committed).read_text()
        text = text.replace("/etc/prometheus/rules.yml", rules)
    config = tmp_path / "prometheus.yml"
    config.write_text(text)
    result = _promtool("check", "config", str(config))
    assert result.returncode == 0, result.stdout + result.stderr
    jobs = {j["job_name"] for j in yaml.safe_load(text)["scrape_configs"]}
    assert jobs == {c.RUNTIME_JOB, c.CONTROLLER_JOB, c.ROUTER_JOB}


def test_render_prometheus_config_targets() -> None:
    data = yaml.safe_load(render_prometheus_config(["a:1", "b:2"], "ctl:3", scrape_interval="2s"))
    jobs = {j["job_name"]: j for j in data["scrape_configs"]}
    assert jobs[c.RUNTIME_JOB]["static_configs"][0]["targets"] == ["a:1", "b:2"]
    assert jobs[c.CONTROLLER_JOB]["static_configs"][0]["targets"] == ["ctl:3"]
    assert c.ROUTER_JOB not in jobs and data["global"]["scrape_interval"] == "2s"
    with pytest.raises(ValueError):
        render_prometheus_config([], "ctl:3")


def test_readme_describes_every_panel_and_alert() -> None:
    readme = (c.DOCKER_DIR / "README.md").read_text()
    for panel in panels():
        assert f"**{panel.title}**" in readme, panel.title
    for rule in alert_rules():
        assert rule.name in readme, rule.name


def test_dashboard_json_is_valid_json() -> None:
    path = c.DOCKER_DIR / "grafana" / "dashboards" / "lynx.json"
    assert json.loads(path.read_text())["title"].startswith("Lynx")
