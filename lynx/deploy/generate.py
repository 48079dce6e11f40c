"""Write (or check) every generated deployment file under ``docker/``.

    python -m lynx.deploy generate                   # committed defaults (2 GPU replicas)
    python -m lynx.deploy generate --replicas 4 --gpus-per-replica 2
    python -m lynx.deploy generate --check           # exit 1 if a committed file is stale

Generated: compose.yaml, compose.cpu.yaml, compose.smoke.yaml (test-only override),
prometheus/prometheus.yml, prometheus/prometheus.cpu.yml,
prometheus/rules.yml, grafana/dashboards/lynx.json and Grafana's provisioning files.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

from lynx.deploy import constants as c
from lynx.deploy.compose import render_compose, render_smoke_override
from lynx.deploy.dashboard import render_dashboard
from lynx.deploy.prometheus import HEADER, compose_prometheus_config, render_rules

DASHBOARDS_IN_CONTAINER = "/var/lib/grafana/dashboards"


def render_datasource() -> str:
    """Grafana datasource provisioning: the ONLY place the datasource uid is written."""
    data = {"apiVersion": 1, "datasources": [{
        "name": "Prometheus (Lynx)", "uid": c.DATASOURCE_UID, "type": "prometheus",
        "access": "proxy", "url": f"http://prometheus:{c.PROMETHEUS_PORT}", "isDefault": True,
        "editable": False, "jsonData": {"timeInterval": c.SCRAPE_INTERVAL},
    }]}
    return HEADER + yaml.safe_dump(data, sort_keys=False)


def render_dashboard_provider() -> str:
    data = {"apiVersion": 1, "providers": [{
        "name": "lynx", "folder": "Lynx", "type": "file", "disableDeletion": True,
        "allowUiUpdates": False, "updateIntervalSeconds": 30,
        "options": {"path": DASHBOARDS_IN_CONTAINER, "foldersFromFilesStructure": False},
    }]}
    return HEADER + yaml.safe_dump(data, sort_keys=False)


def generated_files(replicas: int = c.DEFAULT_REPLICAS, gpus_per_replica: int = 1,
                    root: Path = c.DOCKER_DIR) -> dict[Path, str]:
    return {
        root / "compose.yaml": render_compose(replicas, gpus_per_replica=gpus_per_replica),
        root / "compose.cpu.yaml": render_compose(c.CPU_REPLICAS, cpu=True),
        root / "compose.smoke.yaml": render_smoke_override(),
        root / "prometheus" / "prometheus.yml": compose_prometheus_config(replicas),
        root / "prometheus" / "prometheus.cpu.yml": compose_prometheus_config(c.CPU_REPLICAS),
        root / "prometheus" / "rules.yml": render_rules(),
        root / "grafana" / "dashboards" / "lynx.json": render_dashboard(),
        root / "grafana" / "provisioning" / "datasources" / "prometheus.yaml":
            render_datasource(),
        root / "grafana" / "provisioning" / "dashboards" / "lynx.yaml":
            render_dashboard_provider(),
    }


def stale_files(files: dict[Path, str]) -> list[Path]:
    return [path for path, text in files.items()
            if not path.is_file() or path.read_text() != text]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lynx.deploy",
                                     description="generate docker/ deployment files")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="write (or --check) the generated files")
    gen.add_argument("--replicas", type=int, default=c.DEFAULT_REPLICAS)
    gen.add_argument("--gpus-per-replica", type=int, default=1)
    gen.add_argument("--check", action="store_true", help="exit 1 if a file differs")
    args = parser.parse_args(argv)
    if args.replicas < 1 or args.gpus_per_replica < 1:
        print("lynx.deploy: --replicas and --gpus-per-replica must be >= 1", file=sys.stderr)
        return 2
    files = generated_files(args.replicas, args.gpus_per_replica)
    if args.check:
        stale = stale_files(files)
        for path in stale:
            print(f"stale: {path.relative_to(c.REPO_ROOT)}", file=sys.stderr)
        if stale:
            print("run: python -m lynx.deploy generate", file=sys.stderr)
        return 1 if stale else 0
    for path, text in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.is_file() or path.read_text() != text:
            path.write_text(text)
            print(f"wrote {path.relative_to(c.REPO_ROOT)}")
    return 0
