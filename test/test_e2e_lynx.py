"""End to end: the Lynx plugin inside a real SGLang CPU server with each reference model."""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
import pytest

from lynx.calibrate.shadow_ladder import ladder_from_shadow, read_shadow
from lynx.reference.tasks import arithmetic_prompt, heldout_problems, parse_answer
from lynx.serving.client import generate_greedy
from lynx.serving.metrics_reader import metric_sum, read_layer_gauges, samples

pytestmark = pytest.mark.slow
N_PROBLEMS = 128  # one batched request: decode batches well above 16 rows
STOCK_WITHOUT_PLUGIN = {"SGLANG_PLUGINS": "none-but-this-name", "LYNX_ENABLED": "1"}
SHADOW_MODEL = "qwen3-moe-mini"


def _exact_match(url: str) -> tuple[float, list[str]]:
    problems = heldout_problems(N_PROBLEMS)
    completions, _ = generate_greedy(url, [arithmetic_prompt(a, b) for a, b in problems], 6)
    texts = [c.text for c in completions]
    correct = sum(parse_answer(t) == a + b for t, (a, b) in zip(texts, problems, strict=True))
    return correct / len(problems), texts


def _next_window(url: str) -> None:
    """A step after the statistics window (0.2 s) closed: it flushes that window."""
    time.sleep(0.3)
    generate_greedy(url, [arithmetic_prompt(1, 2)], 2)


@pytest.fixture
def ctl(tmp_path: Path):
    """A controller in mode off (the shadow server's link: it must keep serving stock)."""
    from lynx_policy.testing import ControllerProcess

    with ControllerProcess.launch(tmp_path / "ctl", {"mode": "off"}) as controller:
        yield controller


@pytest.mark.parametrize("model", ["mixtral-mini", "qwen3-moe-mini"])
def test_lynx_off_is_stock_and_default_policy_prunes_without_accuracy_loss(
    server_factory, model: str, tmp_path: Path, ctl
) -> None:
    # Started side by side, queried one at a time (an idle server costs next to nothing).
    # Shadow mode on one model (its statistics do not depend on the router family).
    shadow_file = tmp_path / "shadow.json"
    with_shadow = model == SHADOW_MODEL
    stock, off, *shadows, lynx = server_factory.side_by_side(model, [
        STOCK_WITHOUT_PLUGIN, {"LYNX_ENABLED": "0"},
        *([{"LYNX_ENABLED": "1", "LYNX_SHADOW": str(shadow_file), "LYNX_SHADOW_EVERY": "1",
            "LYNX_STATS_INTERVAL_S": "0.2", **ctl.runtime_env()}] if with_shadow else []),
        {"LYNX_ENABLED": "1", "LYNX_STATS_INTERVAL_S": "0.2", "LYNX_COMPILE": "1"}])
    stock_em, stock_texts = _exact_match(stock.url)
    stock.stop()

    _, off_texts = _exact_match(off.url)
    assert "lynx_" not in httpx.get(f"{off.url}/metrics", timeout=10).text
    off.stop()
    assert off_texts == stock_texts  # plugin installed but off: byte-identical greedy outputs

    for shadow in shadows:
        _, shadow_texts = _exact_match(shadow.url)
        _next_window(shadow.url)  # the file is rewritten between steps, once per interval
        check_shadow_link(ctl, json.loads(shadow_file.read_text()))
        shadow.stop()
        assert shadow_texts == stock_texts  # shadow mode serves stock, byte for byte
        check_shadow_file(json.loads(shadow_file.read_text()))
        check_shadow_ladder(shadow_file)

    lynx_em, _ = _exact_match(lynx.url)
    _next_window(lynx.url)  # the exporter flushes the window of the measured steps
    metrics = httpx.get(f"{lynx.url}/metrics", timeout=10).text
    kept_total = metric_sum(metrics, "lynx_experts_kept_total")
    union_total = metric_sum(metrics, "lynx_experts_stock_union_total")
    assert union_total > 0, "no pruned decode step was recorded"
    assert kept_total < union_total  # fewer experts computed than the stock router's union
    assert read_layer_gauges(metrics, "lynx_experts_kept_mean")
    rows = metric_sum(metrics, "lynx_pruned_rows_total")
    assert metric_sum(metrics, "lynx_top1_kept_rows_total") == rows  # top-1 always kept
    assert lynx_em >= stock_em - 0.01, (lynx_em, stock_em)

    # The selection step was compiled before serving; the server pruned through its graph.
    graphs = _wait_for_compiled_graph(lynx.url)
    assert graphs.get("ready", 0) >= 1 and graphs.get("failed", 0) == 0, graphs


def check_shadow_file(shadow: dict) -> None:
    """The decode batches of 128 requests were measured at every layer: more experts at a
    larger budget, the stock union an upper bound, all rows' top-1 kept (``budget``)."""
    fields = shadow["fields"]["base"] + shadow["fields"]["per_budget"] * len(shadow["budgets"])
    busiest = max(shadow["buckets"], key=lambda b: b["layers"][0][1])
    assert len(busiest["layers"]) == shadow["model"]["num_layers"]
    for layer in busiest["layers"]:
        assert len(layer) == len(fields)
        steps, rows, union, mass = layer[:4]
        assert steps > 0 and rows >= 16 * steps and mass > 0
        kept = layer[4::3]
        assert kept == sorted(kept) and kept[-1] <= union
        assert all(0 < m <= mass * (1 + 1e-6) for m in layer[5::3])
        assert all(t == rows for t in layer[6::3])


def check_shadow_link(ctl, file: dict) -> None:
    """The same statistics reached the controller over the link (sent when due, also while
    idle; the file is rewritten only between steps, so it may hold fewer), and the
    controller's proposal is a ladder of the served model's shape."""
    from lynx_policy.testing import wait_until

    def steps() -> dict[str, float]:
        return ctl.admin.get("/v1/shadow").json()["steps_by_bucket"]

    in_file = {str(b["max_batch"] or "inf"): b["layers"][0][0] for b in file["buckets"]}
    wait_until("the controller never held the file's shadow steps", lambda: all(
        steps().get(edge, 0) >= count for edge, count in in_file.items()), 30)
    proposal = ctl.admin.post("/v1/ladder/proposal", json={"min_steps": 1,
                                                            "max_mass_lost": 1.0})
    assert proposal.status_code == 200, proposal.text
    assert proposal.json()["ladder"]["model"]["num_layers"] == file["model"]["num_layers"]


def check_shadow_ladder(path: Path) -> None:
    """The runtime's own file builds a valid ladder (``lynx-serve shadow-ladder``)."""
    ladder, _ = ladder_from_shadow(read_shadow([path]), min_steps=1, max_mass_lost=1.0)
    assert ladder.cost_kind == "mass_lost" and len(ladder.rungs) >= 2
    assert ladder.rungs[-1].experts() < ladder.rungs[0].experts()


def _wait_for_compiled_graph(url: str, timeout_s: float = 60.0) -> dict[str, float]:
    """lynx_selection_graphs by state, once exported (steps flush the exporter)."""
    deadline = time.monotonic() + timeout_s
    graphs: dict[str, float] = {}
    while time.monotonic() < deadline:
        generate_greedy(url, [arithmetic_prompt(1, 2)], 2)
        text = httpx.get(f"{url}/metrics", timeout=10).text
        graphs = {labels["state"]: value
                  for labels, value in samples(text, "lynx_selection_graphs")}
        if graphs.get("ready") or graphs.get("failed"):
            return graphs
        time.sleep(1.0)
    return graphs
