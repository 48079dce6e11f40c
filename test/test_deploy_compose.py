"""The compose stacks: schema-valid (compose-spec parser, docker-compose if present), every
reference resolves, and the wiring is right (replicas behind the router, scraped, GPUs, CPU)."""

from __future__ import annotations

import ast
import importlib.util
import itertools
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from lynx.deploy import constants as c
from lynx.deploy.compose import build_compose, runtime_services
from lynx.serving.server import CPU_DEFAULT_FLAGS, LATENCY_BUCKET_FLAGS, SGLANG_ITL_BUCKETS_S

STACKS = {"compose.yaml": c.DEFAULT_REPLICAS, "compose.cpu.yaml": c.CPU_REPLICAS}
_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def _load(name: str) -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((c.DOCKER_DIR / name).read_text())
    return data


def _interpolate(text: str) -> str:
    """Compose's ``${VAR:-default}`` with an empty environment."""
    return _VAR.sub(lambda m: m.group(2) or "", text)


@pytest.mark.parametrize("name", STACKS)
def test_compose_spec_parser_accepts_the_stack(name: str) -> None:
    compose_spec = pytest.importorskip("compose_spec")
    parsed = compose_spec.PyCompose.from_yaml(_interpolate((c.DOCKER_DIR / name).read_text()))
    assert set(parsed.service_names()) == set(_load(name)["services"])


def test_compose_spec_parser_rejects_an_unknown_key() -> None:
    compose_spec = pytest.importorskip("compose_spec")
    with pytest.raises(ValueError, match="bogus"):
        compose_spec.PyCompose.from_yaml("services:\n  a:\n    image: x\n    bogus: 1\n")


@pytest.mark.skipif(shutil.which("docker-compose") is None,
                    reason="docker-compose client missing (apt-get install docker-compose)")
@pytest.mark.parametrize("name", STACKS)
def test_docker_compose_config_validates(name: str, tmp_path: Path) -> None:
    result = subprocess.run(["docker-compose", "-f", str(c.DOCKER_DIR / name), "config", "-q"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text("services:\n  a:\n    image: x\n    healthcheck:\n      bogus: 1\n")
    result = subprocess.run(["docker-compose", "-f", str(bad), "config", "-q"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode != 0


@pytest.mark.parametrize("name", STACKS)
def test_references_resolve(name: str) -> None:
    data = _load(name)
    services, secrets, volumes = data["services"], data["secrets"], data["volumes"]
    for svc_name, svc in services.items():
        for secret in svc.get("secrets", []):
            assert secret in secrets, (svc_name, secret)
        for dep in svc.get("depends_on", {}):
            assert dep in services, (svc_name, dep)
        for mount in svc.get("volumes", []):
            source = _interpolate(mount).split(":")[0]
            if source.startswith("."):
                assert (c.DOCKER_DIR / source).exists(), (svc_name, source)
            else:
                assert source in volumes, (svc_name, source)
        if "build" in svc:
            build = svc["build"]
            context = c.DOCKER_DIR / build["context"]
            assert (context / build["dockerfile"]).is_file()
    for secret in secrets.values():
        path = Path(secret["file"])
        assert path.parts[:2] == (".", "secrets") or path.parts[0] == "secrets", path
    ignore = (c.DOCKER_DIR / ".gitignore").read_text()
    assert "/secrets/*" in ignore


@pytest.mark.parametrize("name", STACKS)
def test_no_secret_value_in_environment(name: str) -> None:
    text = (c.DOCKER_DIR / name).read_text()
    assert "LYNX_ADMIN_TOKEN" not in text
    controller = _load(name)["services"]["controller"]
    assert c.ADMIN_TOKEN_SECRET in controller["secrets"]
    env = controller["environment"]
    assert env["LYNX_POLICY__ADMIN__TOKEN_FILE"] == c.ADMIN_TOKEN_FILE_IN_CONTAINER
    grafana = _load(name)["services"]["grafana"]["environment"]
    assert "GF_SECURITY_ADMIN_PASSWORD" not in grafana
    assert grafana["GF_SECURITY_ADMIN_PASSWORD__FILE"].startswith("/run/secrets/")


@pytest.mark.parametrize("name", STACKS)
def test_router_scrape_and_replicas_agree(name: str) -> None:
    data = _load(name)
    runtimes = runtime_services(data)
    assert len(runtimes) == STACKS[name]
    router = data["services"]["router"]
    command = router["command"]
    workers = command[command.index("--worker-urls") + 1:command.index("--policy")]
    assert workers == [f"http://{r}:{c.RUNTIME_PORT}" for r in runtimes]
    assert set(router["depends_on"]) == set(runtimes)
    mount = next(v for v in data["services"]["prometheus"]["volumes"]
                 if v.endswith(":/etc/prometheus/prometheus.yml:ro"))
    prom = yaml.safe_load((c.DOCKER_DIR / mount.split(":")[0]).read_text())
    jobs = {j["job_name"]: j["static_configs"][0]["targets"] for j in prom["scrape_configs"]}
    assert jobs[c.RUNTIME_JOB] == [f"{r}:{c.RUNTIME_PORT}" for r in runtimes]
    assert jobs[c.CONTROLLER_JOB] == [f"controller:{c.CONTROLLER_ADMIN_PORT}"]
    assert jobs[c.ROUTER_JOB] == [f"router:{c.ROUTER_METRICS_PORT}"]
    for runtime in runtimes:
        env = data["services"][runtime]["environment"]
        assert env["LYNX_ENABLED"] == "1"
        assert env["LYNX_CONTROLLER"] == f"tcp://controller:{c.CONTROLLER_LINK_PORT}"
        assert env["LYNX_REPLICA_ID"] == runtime


def test_gpu_replicas_reserve_distinct_gpus() -> None:
    data = _load("compose.yaml")
    seen: list[str] = []
    for runtime in runtime_services(data):
        devices = data["services"][runtime]["deploy"]["resources"]["reservations"]["devices"]
        assert devices[0]["driver"] == "nvidia" and devices[0]["capabilities"] == ["gpu"]
        seen += devices[0]["device_ids"]
    assert len(seen) == len(set(seen)) == c.DEFAULT_REPLICAS
    wide = build_compose(3, gpus_per_replica=2)
    ids = [wide["services"][f"runtime-{i}"]["deploy"]["resources"]["reservations"]["devices"][0]
           ["device_ids"] for i in (1, 2, 3)]
    assert ids == [["0", "1"], ["2", "3"], ["4", "5"]]
    assert wide["services"]["runtime-3"]["command"] == ["--tp-size", "2",
                                                        *LATENCY_BUCKET_FLAGS]
    assert data["services"]["router"]["image"] == c.SGLANG_IMAGE


def test_cpu_stack_runs_the_cpu_engine_on_the_reference_model() -> None:
    data = _load("compose.cpu.yaml")
    for runtime in runtime_services(data):
        svc = data["services"][runtime]
        assert "reservations" not in svc.get("deploy", {}).get("resources", {})
        assert svc["environment"]["SGLANG_USE_CPU_ENGINE"] == "1"
        assert svc["environment"]["MODEL_PATH"] == f"/models/{c.CPU_REFERENCE_MODEL}"
        assert "../models:/models:ro" in svc["volumes"]
        assert svc["build"]["target"] == "runtime-cpu"
        # The entrypoint adds --enable-metrics; the rest are the project's CPU defaults,
        # the latency buckets the controller needs among them.
        assert svc["command"] == [*c.CPU_ENGINE_FLAGS, *LATENCY_BUCKET_FLAGS]
        defaults = (*c.CPU_ENGINE_FLAGS, "--enable-metrics", *LATENCY_BUCKET_FLAGS)
        assert defaults == CPU_DEFAULT_FLAGS
    # buckets at most 9.2% apart from 1 ms to 8 s: a quantile the controller can bound
    edges = [float(v) for v in LATENCY_BUCKET_FLAGS[1:]]
    assert edges[0] <= 0.001 and edges[-1] >= 8.0 and edges == sorted(edges)
    assert max(b / a for a, b in itertools.pairwise(edges)) < 1.092
    # SGLang's default edges among them, spelled as SGLang's own flag values would be (the
    # ``le`` labels Prometheus matches on), so that a fleet half on each layout shares them
    defaults = sglang_default_itl_buckets()
    assert defaults == list(SGLANG_ITL_BUCKETS_S)
    assert {f"{b:g}" for b in defaults} <= set(LATENCY_BUCKET_FLAGS[1:])
    entrypoint = (c.DOCKER_DIR / "runtime-entrypoint.sh").read_text()
    assert "--enable-metrics" in entrypoint and "sglang.launch_server" in entrypoint
    assert (c.REPO_ROOT / "models").is_dir()


def sglang_default_itl_buckets() -> list[float]:
    """The list SGLang's tokenizer metrics collector falls back to without
    ``--bucket-inter-token-latency``, read from the installed source (constructing the
    collector needs a running server's config)."""
    spec = importlib.util.find_spec("sglang.srt.observability.metrics_collector")
    assert spec is not None and spec.origin is not None
    for node in ast.walk(ast.parse(Path(spec.origin).read_text())):
        if (isinstance(node, ast.Assign) and isinstance(node.value, ast.List)
                and any(isinstance(t, ast.Name) and t.id == "bucket_inter_token_latency"
                        for t in node.targets)):
            return [float(ast.literal_eval(v)) for v in node.value.elts]
    raise AssertionError("SGLang's default inter-token buckets not found")


def test_admin_ports_bound_to_loopback() -> None:
    for name in STACKS:
        services = _load(name)["services"]
        for svc in ("controller", "prometheus", "grafana"):
            for port in services[svc]["ports"]:
                assert port.startswith("127.0.0.1:"), (name, svc, port)
