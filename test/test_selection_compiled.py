"""The compiled selection step (`lynx.selection.compiled`) against the eager specification.

Expert ids, keep sets, pruned and rerouted rows must be bitwise equal (they decide which weights are
read); weights and statistics equal to float rounding. Each case compiles one Inductor graph
(seconds) that serves every row count, so the cases are chosen to cover the router kinds, the
policies, row counts, padding rows, bf16 logits, a correction bias and row weights with few
graphs.

Shape legend: T rows, E experts, K top_k."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from lynx.selection import RouterSpec, make_knobs, select_layer_step
from lynx.selection import compiled as compiled_mod
from lynx.selection.compiled import CompiledSelection, GraphKey
from lynx.selection.step import LayerSelection

pytestmark = pytest.mark.skipif(compiled_mod.cxx_compiler() is None,
                                reason="no C++ compiler for Inductor")

QWEN3 = RouterSpec(top_k=8, renormalize=True)  # Qwen3-30B-A3B / 235B: E=128
DEEPSEEK_V3 = RouterSpec(top_k=8, renormalize=True, scoring="sigmoid", num_expert_group=8,
                         topk_group=4, has_correction_bias=True, routed_scaling_factor=2.5)
OLMOE = RouterSpec(top_k=8, renormalize=False)  # E=64
GPT_OSS = RouterSpec(top_k=4)  # E=32, as qwen3-moe-mini


def _inputs(rows: int, experts: int, seed: int, dtype: torch.dtype = torch.float32
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    skew = torch.randn(experts, generator=gen) * 1.5
    logits = (skew[None, :] + torch.randn(rows, experts, generator=gen) * 1.5).to(dtype)
    valid = torch.ones(rows, dtype=torch.bool)
    valid[-1] = False  # one padding row: must neither vote nor be pruned
    prunable = torch.ones(rows, dtype=torch.bool)
    prunable[0] = False  # one prefill row: routed stock
    return logits, valid, prunable


def assert_same(compiled: LayerSelection, eager: LayerSelection) -> None:
    for name in ("keep", "apply_rows", "rerouted", "allowed", "topk_ids"):
        assert torch.equal(getattr(compiled, name), getattr(eager, name)), name
    torch.testing.assert_close(compiled.topk_weights, eager.topk_weights)
    torch.testing.assert_close(compiled.stats, eager.stats)


CASES = [  # (policy, router, E, logits dtype, with bias, with row weights)
    ("budget", QWEN3, 128, torch.float32, False, False),
    ("coverage", DEEPSEEK_V3, 256, torch.bfloat16, True, False),
    ("affinity", OLMOE, 64, torch.float32, False, False),
    ("by_code", QWEN3, 128, torch.float32, False, True),
    ("budget", GPT_OSS, 32, torch.float32, False, False),  # bench-quick's key: cached
]
ROW_COUNTS = (2, 3, 8, 20, 32, 33, 64, 128, 130)  # = E and != E for every E above


@pytest.mark.parametrize("case", CASES, ids=[f"{c[0]}-E{c[2]}" for c in CASES])
def test_compiled_graph_matches_the_eager_step(case: tuple) -> None:
    policy, router, experts, dtype, with_bias, with_weight = case
    selection = CompiledSelection()
    knobs = make_knobs(policy="piggyback" if policy == "by_code" else policy,
                       budget=2 * router.top_k, coverage=0.8, k0=2)
    bias = torch.randn(experts, generator=torch.Generator().manual_seed(1)) * 0.05 + 5.0 \
        if with_bias else None
    for seed in range(27):  # one graph, many steps (row counts, knob values) through it
        rows = ROW_COUNTS[seed % len(ROW_COUNTS)]
        weight = torch.linspace(0.2, 1.0, rows) if with_weight else None
        logits, valid, prunable = _inputs(rows, experts, seed, dtype)
        knobs.budget.fill_(router.top_k + seed % 24)
        knobs.enabled.fill_(seed % 7 != 0)
        got = selection(policy, logits, router, knobs, valid, prunable, bias, row_weight=weight)
        want = select_layer_step(policy, logits, router, knobs, valid, prunable, bias,
                                 row_weight=weight)
        assert_same(got, want)
    assert len(selection.graphs) == 1 and not selection.failed


def test_graph_serves_real_router_ties_bitwise() -> None:
    # bf16 logits tie often; the graph must break ties exactly like the specification.
    selection = CompiledSelection()
    knobs = make_knobs(policy="budget", budget=16)
    for seed in range(40):
        logits, valid, prunable = _inputs(32, 128, seed, torch.bfloat16)
        logits = (logits * 4).round() / 4  # few distinct values: many exact ties
        got = selection("budget", logits, QWEN3, knobs, valid, prunable)
        assert_same(got, select_layer_step("budget", logits, QWEN3, knobs, valid, prunable))


def test_graph_judges_on_the_engines_own_ids_as_served() -> None:
    """The plugin's STANDARD call: SGLang's own top-K (unsorted, ties broken its way) is the
    stock routing; one row goes through the graph with a padding row added."""
    selection = CompiledSelection()
    knobs = make_knobs(policy="budget", budget=12)
    for seed, rows in enumerate((1, 2, 5, 33, 64)):
        logits, valid, prunable = _inputs(rows, 128, seed, torch.bfloat16)
        logits = (logits * 4).round() / 4  # exact ties at the top-K boundary
        own = logits.float().topk(8, sorted=False).indices.flip(-1).to(torch.int32)
        got = selection("budget", logits, QWEN3, knobs, valid, prunable, stock_ids=own)
        want = select_layer_step("budget", logits, QWEN3, knobs, valid, prunable,
                                 stock_ids=own)
        assert_same(got, want)
        judged = valid & prunable  # rerouted exactly where the engine's own ids leave keep
        assert torch.equal(got.rerouted, judged & ~got.keep[own.long()].all(-1))
    assert len(selection.graphs) == 1 and not selection.failed


def test_a_graph_that_raises_is_dropped_and_the_step_goes_eager(
        caplog: pytest.LogCaptureFixture) -> None:
    selection = CompiledSelection()
    knobs = make_knobs(policy="budget", budget=12)
    logits, valid, prunable = _inputs(16, 128, 7)
    selection("budget", logits, QWEN3, knobs, valid, prunable)  # compiles
    (key,) = selection.graphs

    def broken(*inputs: torch.Tensor) -> None:
        raise RuntimeError("expected size 128==128, stride 32==128 at dim=0")

    selection.graphs[key] = broken  # e.g. a stride or shape assumption that does not hold
    with caplog.at_level(logging.WARNING, logger="lynx.selection"):
        for _ in range(2):
            got = selection("budget", logits, QWEN3, knobs, valid, prunable)
            assert_same(got, select_layer_step("budget", logits, QWEN3, knobs, valid,
                                               prunable))
    assert selection.graphs == {} and "stride" in selection.failed[key]
    assert len([r for r in caplog.records if "compiled selection step" in r.message]) == 1


def test_warm_up_compiles_before_use_and_serves_every_row_count() -> None:
    selection = CompiledSelection()
    key = GraphKey("budget", QWEN3, 128, torch.float32, False, False)
    selection.warm_up([key, key])
    assert list(selection.graphs) == [key]
    knobs = make_knobs(policy="budget", budget=12)
    for rows in (1, 9, 128):
        logits, valid, prunable = _inputs(rows, 128, rows)
        valid[-1] = True  # T=1: the single row is real
        got = selection("budget", logits, QWEN3, knobs, valid, prunable)
        assert_same(got, select_layer_step("budget", logits, QWEN3, knobs, valid, prunable))
    wide = torch.randn(9, 256)[:, ::2]  # a strided view, as a fused gate's output can be
    got = selection("budget", wide, QWEN3, knobs, *_inputs(9, 128, 0)[1:])
    assert_same(got, select_layer_step("budget", wide, QWEN3, knobs, *_inputs(9, 128, 0)[1:]))
    assert list(selection.graphs) == [key] and not selection.failed  # no further compile


def test_no_compiler_means_eager_with_one_warning(monkeypatch: pytest.MonkeyPatch,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(compiled_mod, "cxx_compiler", lambda: None)
    with caplog.at_level(logging.WARNING, logger="lynx.selection"):
        selection = CompiledSelection()
    assert not selection.enabled
    assert [r.message for r in caplog.records if "no C++ compiler" in r.message] != []
    logits, valid, prunable = _inputs(16, 128, 3)
    knobs = make_knobs(policy="budget", budget=12)
    got = selection("budget", logits, QWEN3, knobs, valid, prunable)
    assert_same(got, select_layer_step("budget", logits, QWEN3, knobs, valid, prunable))
    assert selection.graphs == {}


def test_a_failed_compile_stays_eager_and_warns_once(monkeypatch: pytest.MonkeyPatch,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    def broken(key: object, cache_dir: object) -> None:
        raise RuntimeError("inductor exploded")

    monkeypatch.setattr(compiled_mod, "compile_step", broken)
    selection = CompiledSelection()
    knobs = make_knobs(policy="budget", budget=12)
    with caplog.at_level(logging.WARNING, logger="lynx.selection"):
        for rows in (3, 17, 17):
            logits, valid, prunable = _inputs(rows, 128, rows)
            got = selection("budget", logits, QWEN3, knobs, valid, prunable)
            assert_same(got, select_layer_step("budget", logits, QWEN3, knobs, valid, prunable))
    warnings = [r for r in caplog.records if "compiling the selection step failed" in r.message]
    assert len(warnings) == 1 and "inductor exploded" in warnings[0].message
    assert len(selection.failed) == 1 and selection.graphs == {}  # tried once, not per step


def test_a_package_is_compiled_once_then_loaded_from_the_cache(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    key = GraphKey("budget", GPT_OSS, 32, torch.float32, False, False)
    knobs = make_knobs(policy="budget", budget=6)
    logits, valid, prunable = _inputs(12, 32, 5)
    want = select_layer_step("budget", logits, GPT_OSS, knobs, valid, prunable)
    shared = CompiledSelection()  # the default cache (CASES compiled this key)
    shared.warm_up([key])
    good = (shared.cache_dir / compiled_mod.package_name(key)).read_bytes()
    exported: list[Path] = []  # the compiler's output: that package (no second compile)
    monkeypatch.setattr(compiled_mod, "export_package",
                        lambda key, path: exported.append(path) or path.write_bytes(good))
    first = CompiledSelection(cache_dir=tmp_path)
    first.warm_up([key])
    assert len(exported) == 1 and exported[0].parent == tmp_path  # compiled in the cache
    (package,) = tmp_path.glob("*.pt2")  # one package, no partial file left
    assert package.name == compiled_mod.package_name(key)
    assert_same(first("budget", logits, GPT_OSS, knobs, valid, prunable), want)

    def no_compiling(*args: object) -> None:
        raise AssertionError("compiled although a package was cached")

    monkeypatch.setattr(compiled_mod, "export_package", no_compiling)
    second = CompiledSelection(cache_dir=tmp_path)  # another process, in effect
    second.warm_up([key])
    assert list(second.graphs) == [key] and not second.failed
    assert_same(second("budget", logits, GPT_OSS, knobs, valid, prunable), want)

    package.write_bytes(b"not a package")  # damaged: compiled afresh, with a warning
    exported.clear()
    monkeypatch.setattr(compiled_mod, "export_package",
                        lambda key, path: exported.append(path) or path.write_bytes(good))
    third = CompiledSelection(cache_dir=tmp_path)
    with caplog.at_level(logging.WARNING, logger="lynx.selection"):
        third.warm_up([key])
    assert any("unusable" in r.message for r in caplog.records)
    assert_same(third("budget", logits, GPT_OSS, knobs, valid, prunable), want)
    assert len(exported) == 1 and exported[0].parent == tmp_path
    assert package.read_bytes() == good and list(tmp_path.glob("*.pt2")) == [package]


def test_package_names_follow_everything_the_code_depends_on() -> None:
    key = GraphKey("budget", QWEN3, 128, torch.float32, False, False)
    names = {compiled_mod.package_name(k) for k in (
        key, key._replace(policy="coverage"), key._replace(experts=64),
        key._replace(dtype=torch.bfloat16), key._replace(has_bias=True),
        key._replace(has_row_weight=True), key._replace(router=OLMOE))}
    assert len(names) == 7
    assert compiled_mod.package_name(key) == compiled_mod.package_name(
        GraphKey("budget", RouterSpec(top_k=8, renormalize=True), 128, torch.float32, False,
                 False))


def test_an_unwritable_cache_compiles_without_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    blocked = tmp_path / "file"
    blocked.write_text("")
    exported: list[Path] = []

    def export(key: GraphKey, path: Path) -> None:  # records where; no compiler run
        exported.append(path)
        raise RuntimeError("stop here")

    monkeypatch.setattr(compiled_mod, "export_package", export)
    selection = CompiledSelection(cache_dir=blocked / "cache")  # cannot be created
    key = GraphKey("budget", GPT_OSS, 32, torch.float32, False, False)
    with caplog.at_level(logging.WARNING, logger="lynx.selection"):
        selection.warm_up([key])
    assert any("not writable" in r.message for r in caplog.records)
    assert len(exported) == 1 and blocked not in exported[0].parents  # a scratch directory
    assert "stop here" in selection.failed[key]


def test_steps_above_the_exported_rows_run_eagerly(monkeypatch: pytest.MonkeyPatch) -> None:
    selection = CompiledSelection()
    key = GraphKey("budget", QWEN3, 128, torch.float32, False, False)  # cached by CASES
    selection.warm_up([key])
    calls = []
    graph = selection.graphs[key]
    selection.graphs[key] = lambda *inputs: calls.append(inputs[0].shape[0]) or graph(*inputs)
    monkeypatch.setattr(compiled_mod, "MAX_ROWS", 16)
    knobs = make_knobs(policy="budget", budget=16)
    for rows in (16, 17):
        logits, valid, prunable = _inputs(rows, 128, rows)
        got = selection("budget", logits, QWEN3, knobs, valid, prunable)
        assert_same(got, select_layer_step("budget", logits, QWEN3, knobs, valid, prunable))
    assert calls == [16] and not selection.failed
