"""End to end: a budget table that drops nothing is indistinguishable from stock through a
real SGLang CPU server (issue 22).

Reported: qwen3-moe-128 in bf16, held-out ``add4`` at batch 32, budget 64: the stock union
stayed near 27 experts per layer (nothing dropped, 100% routing mass kept), yet 3 of 512
greedy answers changed, because every pruned row was rewritten with the library's routing,
equal to SGLang's only to rounding. Now such a row keeps SGLang's own output.

Per reference model, one server (bf16, the selection step compiled as served) with the real
controller: greedy answers under ``off`` (which is stock: `test_e2e_lynx`), then the
controller switches to a non-binding budget table (budget < E at batch sizes whose stock
union stays below it: by construction ``--max-running-requests`` x top_k <= budget for the
small models; measured for qwen3-moe-128 at 32) and the same answers must come back. The
server's own counters prove the premise: rows were pruned, kept = union, no row rerouted.
The table's selection package is not cached (an empty ``LYNX_COMPILE_CACHE``): a worker
process compiles it while the steps run eagerly, and the server then serves from it.
"""

from __future__ import annotations

import time

import pytest
from conftest import start_server

from lynx.reference.tasks import TASKS, arithmetic_prompt
from lynx.serving.client import generate_greedy
from lynx.serving.metrics_reader import metric_sum
from lynx_policy.testing import ControllerProcess, wait_until

pytestmark = pytest.mark.slow
PROBLEMS = 192
# model -> (decode batch cap, budget per layer < E): 3 x top-2 <= 7 < 8, 7 x top-4 <= 31 < 32;
# qwen3-moe-128 (E128 top-8) at 32 rows: the reported cell (stock union ~27 per layer).
CELLS = {"mixtral-mini": (3, 7), "qwen3-moe-mini": (7, 31), "qwen3-moe-128": (32, 64)}


def _answers(url: str) -> list[str]:
    prompts = [arithmetic_prompt(a, b) for a, b in TASKS["add4"].heldout_problems(PROBLEMS)]
    completions, _ = generate_greedy(url, prompts, 7, timeout_s=600)
    return [c.text for c in completions]


def _counters(url: str) -> dict[str, float]:
    import httpx

    text = httpx.get(f"{url}/metrics", timeout=10).text
    names = ("lynx_pruned_rows_total", "lynx_rerouted_rows_total", "lynx_experts_kept_total",
             "lynx_experts_stock_union_total", "lynx_policy_version")
    return {name: metric_sum(text, name) for name in names}


def _graphs(url: str) -> dict[str, float]:
    """lynx_selection_graphs by state, after a one-token request (a scheduler iteration
    loads a finished worker's package, steps export; no decode step is needed)."""
    import httpx

    from lynx.serving.metrics_reader import samples

    generate_greedy(url, [arithmetic_prompt(3, 4)], 1)
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return {labels["state"]: value for labels, value in samples(text, "lynx_selection_graphs")}


def _applied(url: str) -> float:
    """The runtime's policy version after a one-token request (the scheduler takes policies
    off SGLang's request path and exports between steps)."""
    generate_greedy(url, [arithmetic_prompt(1, 2)], 1)
    return _counters(url)["lynx_policy_version"]


@pytest.mark.parametrize("model", sorted(CELLS))
def test_a_budget_that_drops_nothing_serves_stock_answers(tmp_path, model: str) -> None:
    batch, budget = CELLS[model]
    ctl = ControllerProcess.launch(tmp_path / "ctl", overrides={
        "mode": "static", "policy": {"name": "off"}})
    server = None
    try:
        server = start_server(tmp_path, model, env={
            "LYNX_ENABLED": "1", **ctl.runtime_env(), "LYNX_POLICY": '{"name":"off"}',
            "LYNX_SAFE_POLICY": "keep", "LYNX_STATS_INTERVAL_S": "0.2", "LYNX_COMPILE": "1",
            "LYNX_COMPILE_CACHE": str(tmp_path / "packages")},  # empty: compiled while serving
            extra_args=("--dtype", "bfloat16", "--max-running-requests", str(batch)))
        wait_until("replica registered",
                   lambda: len(ctl.admin.get("/v1/replicas").json()["replicas"]) == 1)
        stock = _answers(server.url)

        table = {"name": "budget", "budgets": [{"max_batch": 100000, "all_layers": budget}]}
        reply = ctl.admin.put("/v1/policy", json=table)
        assert reply.status_code == 200, reply.text
        version = ctl.admin.get("/v1/policy").json()["version"]
        wait_until("the runtime applies the table",
                   lambda: _applied(server.url) == version)  # on the request path
        before = _counters(server.url)
        lynx = _answers(server.url)
        time.sleep(0.3)  # a statistics window (0.2 s) closes; the next step flushes it
        _applied(server.url)
        after = _counters(server.url)
        # the table's package was compiled by a worker process while steps ran eagerly
        wait_until("the compiled selection step is served", lambda: _graphs(server.url).get(
            "ready", 0) >= 1, timeout_s=300)
        assert _graphs(server.url).get("failed", 0) == 0
    finally:
        if server is not None:
            server.stop()
        ctl.stop()
    delta = {name: after[name] - before[name] for name in after}
    assert delta["lynx_pruned_rows_total"] > 0, "the table never reached a decode step"
    assert delta["lynx_rerouted_rows_total"] == 0, delta  # the premise: nothing dropped
    assert delta["lynx_experts_kept_total"] == delta["lynx_experts_stock_union_total"] > 0
    changed = [i for i, (a, b) in enumerate(zip(stock, lynx, strict=True)) if a != b]
    assert not changed, f"{len(changed)} of {PROBLEMS} answers changed, first {changed[:5]}"
