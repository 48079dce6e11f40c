"""Shared fixtures: reference models and real SGLang servers on 127.0.0.1."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from lynx.serving.models import REFERENCE_MODELS
from lynx.serving.server import SglangServer, free_port

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Test servers select eagerly (compiling adds ~10 s to every server start); the compiled step
# is proven equal to the eager one in test_selection_compiled.py and served for real in
# test_e2e_lynx.py, which turns it back on.
os.environ.setdefault("LYNX_COMPILE", "0")


def reference_model(name: str) -> Path:
    path = REFERENCE_MODELS[name]
    if not (path / "config.json").is_file():
        pytest.fail(f"reference model {name} missing at {path}: run `make models`")
    return path


def model_card_scores(name: str) -> dict:
    return json.loads((reference_model(name) / "eval.json").read_text())


def start_server(tmp_path: Path, model: str, env: dict[str, str] | None = None,
                 extra_args: tuple[str, ...] = ()) -> SglangServer:
    port = free_port()
    server = SglangServer(reference_model(model), port, env=env or {"LYNX_ENABLED": "0"},
                          extra_args=extra_args, log_path=tmp_path / f"sglang-{model}-{port}.log")
    return server.start()


@pytest.fixture
def server_factory(tmp_path: Path) -> Iterator:
    started: list[SglangServer] = []

    def factory(model: str, env: dict[str, str] | None = None,
                extra_args: tuple[str, ...] = ()) -> SglangServer:
        server = start_server(tmp_path, model, env, extra_args)
        started.append(server)
        return server

    yield factory
    for server in started:
        server.stop()
