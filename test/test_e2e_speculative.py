"""End to end: NGRAM speculative decoding on the CPU engine, stock and with Lynx (slow).

SGLang's verify steps (TARGET_VERIFY) run on the CPU through Lynx's stand-in ops and the
tree-attention hook (`lynx.cpu_compat`). Checked here:
- speculative serving gives exactly the non-speculative greedy outputs (fp32 reference
  model), Lynx on with the default ``prune_verify=false``: verify steps are classified as
  such (``lynx_steps_total{mode="verify"}``) and never pruned;
- with ``prune_verify``, verify steps are pruned (kept experts below the stock union, every
  row's top-1 kept) and SGLang still reports its acceptance statistics.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import httpx
import pytest

from lynx.reference.tasks import arithmetic_prompt, heldout_problems
from lynx.serving.metrics_reader import metric_sum, samples
from lynx.serving.models import REFERENCE_MODELS
from lynx.serving.server import SglangServer

pytestmark = pytest.mark.slow
MODEL = "qwen3-moe-mini"
PROMPTS = [arithmetic_prompt(a, b) for a, b in heldout_problems(8)]
NGRAM = ("--speculative-algorithm", "NGRAM", "--speculative-num-draft-tokens", "4",
         "--dtype", "float32")
BUDGET = [{"max_batch": 1 << 20, "all_layers": 6}]


def _generate(url: str) -> list[dict]:
    body = {"text": PROMPTS, "sampling_params": {"max_new_tokens": 8, "temperature": 0}}
    return httpx.post(f"{url}/generate", json=body, timeout=600).json()


def _metrics(url: str) -> str:
    time.sleep(0.6)  # one statistics window (LYNX_STATS_INTERVAL_S=0.2) closes
    httpx.post(f"{url}/generate", json={"text": PROMPTS[:1], "sampling_params": {
        "max_new_tokens": 1, "temperature": 0}}, timeout=120)
    time.sleep(0.3)
    return httpx.get(f"{url}/metrics", timeout=10).text


def _steps(text: str, mode: str, pruned: str) -> float:
    return sum(v for labels, v in samples(text, "lynx_steps_total")
               if labels == {"mode": mode, "pruned": pruned})


@pytest.fixture(scope="module")
def servers(tmp_path_factory) -> Iterator[dict[str, SglangServer]]:
    """The plain reference server and the two NGRAM servers, started side by side."""
    from conftest import spawn_servers, wait_all_ready

    names = ("plain", "ngram", "ngram_prune_verify")
    started = spawn_servers(tmp_path_factory.mktemp("spec"), MODEL, [
        ({"LYNX_ENABLED": "0"}, ("--dtype", "float32")),
        (_env(False), NGRAM), (_env(True), NGRAM)])
    try:
        yield dict(zip(names, wait_all_ready(started), strict=True))
    finally:
        for server in started:
            server.stop()


@pytest.fixture(scope="module")
def reference(servers: dict[str, SglangServer]) -> list[str]:
    plain = servers["plain"]
    texts = [item["text"] for item in _generate(plain.url)]
    plain.stop()
    return texts


def _env(prune_verify: bool) -> dict[str, str]:
    policy = {"name": "budget", "budgets": BUDGET, "prune_verify": prune_verify}
    return {"LYNX_ENABLED": "1", "LYNX_POLICY": json.dumps(policy),
            "LYNX_STATS_INTERVAL_S": "0.2", "LYNX_TIME_MOE": "1"}


def test_ngram_serves_the_non_speculative_outputs_and_verify_steps_stay_stock_by_default(
        servers: dict[str, SglangServer], reference: list[str]) -> None:
    server = servers["ngram"]
    items = _generate(server.url)
    assert [item["text"] for item in items] == reference
    assert sum(item["meta_info"]["spec_verify_ct"] for item in items) > 0
    text = _metrics(server.url)
    assert _steps(text, "verify", "false") > 0
    assert _steps(text, "verify", "true") == 0
    assert metric_sum(text, "lynx_pruned_rows_total") == 0


def test_prune_verify_prunes_every_verify_step_and_keeps_each_rows_top1(
        servers: dict[str, SglangServer]) -> None:
    server = servers["ngram_prune_verify"]
    items = _generate(server.url)
    assert all(item["meta_info"]["completion_tokens"] > 0 for item in items)
    assert all(item["meta_info"]["spec_accept_length"] >= 1.0 for item in items)
    text = _metrics(server.url)
    assert _steps(text, "verify", "true") > 0
    assert _steps(text, "verify", "false") == 0
    assert _steps(text, "prefill", "true") == 0
    kept = metric_sum(text, "lynx_experts_kept_total")
    union = metric_sum(text, "lynx_experts_stock_union_total")
    assert 0 < kept < union
    rows = metric_sum(text, "lynx_pruned_rows_total")
    assert rows > 0 and metric_sum(text, "lynx_top1_kept_rows_total") == rows
    # LYNX_TIME_MOE: every MoE block of every verify step timed, under the verify mode
    layers = json.loads((REFERENCE_MODELS[MODEL] / "config.json").read_text())["num_hidden_layers"]
    calls = {labels["mode"]: v for labels, v in samples(text, "lynx_moe_calls_total")}
    assert calls["verify"] == layers * _steps(text, "verify", "true")
    assert sum(v for labels, v in samples(text, "lynx_moe_seconds_total")
               if labels["mode"] == "verify") > 0
