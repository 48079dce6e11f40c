"""Shared fixtures: reference models and real SGLang servers on 127.0.0.1."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from lynx.serving.models import REFERENCE_MODELS
from lynx.serving.server import PortTaken, SglangServer, free_port

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Test servers select eagerly (compiling adds ~10 s to every server start); the compiled step
# is proven equal to the eager one in test_selection_compiled.py and served for real in
# test_e2e_lynx.py, which turns it back on.
os.environ.setdefault("LYNX_COMPILE", "0")


# Tests that start several servers at once (~3 GB each): `make test`'s pytest-xdist workers run
# them one at a time, as one scheduling unit (`pytest_xdist_make_scheduler`). xdist's own
# `--dist loadgroup` cannot do it under pytest 9 (it rewrites `Item._nodeid`, which pytest 9
# no longer reads). Node-id prefixes, relative to the repository.
SERVER_GROUP = (
    "test/test_e2e_lynx.py::",  # stock, off, shadow and Lynx side by side
    "test/test_e2e_parallel.py::",  # TP=2 / EP=2 / DP=2 next to a single process
    "test/test_e2e_speculative.py::",  # NGRAM stock and Lynx
    "test/test_eval_gate.py::test_the_gate_passes_the_default_with_real_pruning",
    "test/test_e2e_calibrate_kinds.py::test_qwen2_moe_and_deepseek_v3_serve_and_prune",
)


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):  # type: ignore[no-untyped-def]
    """``-n N`` (``--dist load``): per-test load balancing, except that `SERVER_GROUP`'s tests
    form one unit. Any other ``--dist`` keeps xdist's own scheduler."""
    if config.getvalue("dist") != "load":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class ServerGroupScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return "servers" if nodeid.startswith(SERVER_GROUP) else nodeid

    return ServerGroupScheduling(config, log)


def reference_model(name: str) -> Path:
    path = REFERENCE_MODELS[name]
    if not (path / "config.json").is_file():
        pytest.fail(f"reference model {name} missing at {path}: run `make models`")
    return path


def model_card_scores(name: str) -> dict:
    return json.loads((reference_model(name) / "eval.json").read_text())


def start_server(tmp_path: Path, model: str | Path, env: dict[str, str] | None = None,
                 extra_args: tuple[str, ...] = ()) -> SglangServer:
    """One server, started and ready (the plugin off unless ``env`` says otherwise)."""
    return wait_all_ready(spawn_servers(tmp_path, model, [
        (env or {"LYNX_ENABLED": "0"}, extra_args)]))[0]


def spawn_servers(tmp_path: Path, model: str | Path,
                  specs: list[tuple[dict[str, str], tuple[str, ...]]]) -> list[SglangServer]:
    """One server per (env, extra_args), launched without waiting (distinct ports); pair
    with `wait_all_ready`. ``model``: a reference model's name or a checkpoint folder.
    Start-up dominates the end-to-end tests, and it overlaps. If a launch fails, the servers
    already launched are stopped."""
    path = model if isinstance(model, Path) else reference_model(model)
    ports: list[int] = []
    while len(ports) < len(specs):
        port = free_port()
        if port not in ports:
            ports.append(port)
    servers: list[SglangServer] = []
    try:
        for port, (env, extra_args) in zip(ports, specs, strict=True):
            server = SglangServer(path, port, env=env, extra_args=extra_args,
                                  log_path=tmp_path / f"sglang-{path.name}-{port}.log")
            server.ready_timeout_s *= len(specs)  # they share the CPUs while they start
            servers.append(server.spawn())
    except BaseException:
        for server in servers:
            server.stop()
        raise
    return servers


def wait_all_ready(servers: list[SglangServer]) -> list[SglangServer]:
    """Wait for every server of `spawn_servers`; on a failure all of them are stopped. A
    server whose port another process took while it started (a controller started just
    before picks its ports the same way) is started again once on a fresh port."""
    try:
        for server in servers:
            try:
                server.wait_ready()
            except PortTaken:
                server.stop()
                server.port = free_port()
                assert server.log_path is not None
                server.log_path = server.log_path.with_name(f"{server.log_path.stem}-retry.log")
                server.spawn().wait_ready()
    except BaseException:
        for server in servers:
            server.stop()
        raise
    return servers


@pytest.fixture
def server_factory(tmp_path: Path) -> Iterator:
    started: list[SglangServer] = []

    def factory(model: str | Path, env: dict[str, str] | None = None,
                extra_args: tuple[str, ...] = ()) -> SglangServer:
        server = start_server(tmp_path, model, env, extra_args)
        started.append(server)
        return server

    def side_by_side(model: str | Path, envs: list[dict[str, str]]) -> list[SglangServer]:
        """One server per env, launched together (start-up dominates these tests)."""
        servers = spawn_servers(tmp_path, model, [(env, ()) for env in envs])
        started.extend(servers)
        return wait_all_ready(servers)

    factory.side_by_side = side_by_side  # type: ignore[attr-defined]
    yield factory
    for server in started:
        server.stop()
