"""Lynx changes only what it prunes, through SGLang's real ``TopK`` on this CPU (issue 22).

For every router kind of the real checkpoints (`conformance_configs.MODELS`, custom routing
excepted: it is passed through) and every output format the CPU can build (STANDARD through
``forward_native``, BYPASSED's masked logits, the raw-logit runner, fused shared slots), in
fp32 and bf16 logits:
- a budget that drops nothing (stock union <= budget < E) gives SGLang's TopK output and the
  MoE layer output (SGLang's ``moe_forward_native``) bit for bit, every row, padding included,
  with the eager selection step and, for the keys the server compiles, the AOTInductor one;
  the statistics still count the step (kept = union, no row rerouted);
- a budget that drops experts changes exactly the rows whose stock top-K holds a dropped
  expert; every other row stays bit for bit, and ``rerouted_rows`` counts the changed ones.

Shape legend: T rows, E routed experts, K routed top_k, S fused shared slots.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
import torch
from conformance_configs import BY_NAME, MODELS, ModelRouter, draw_inputs
from topk_harness import build_topk, call, make_runtime, policy_spec, sglang_topology, standard
from topk_harness import stock as stock_call

from lynx.selection import STAT_FIELDS
from lynx.selection.compiled import cxx_compiler
from lynx.sglang_plugin.runtime import LynxRuntime
from lynx.sglang_plugin.step_state import StepLayout
from lynx_protocol.policy import PolicySpec

pytest.importorskip("sglang.srt.layers.moe.topk")

PAD = 3  # garbage padding rows after the T real rows (CUDA-graph padding)
FIELD = {name: i for i, name in enumerate(STAT_FIELDS)}


def cells() -> list[tuple[str, str, bool, torch.dtype]]:
    """(model, format, fused shared slot, logits dtype): every router kind x every format the
    CPU builds for it, in both dtypes."""
    out = []
    for model in MODELS:
        if model.custom_routing:
            continue
        plain = not (model.grouped or model.correction_bias or model.scoring != "softmax")
        formats = ["native"] + (["bypassed"] if plain and model.renormalize else []) + (
            ["raw_logits"] if plain else [])
        for fmt in formats:
            for dtype in (torch.float32, torch.bfloat16):
                out.append((model.name, fmt, False, dtype))
        if model.shared_experts:
            out.append((model.name, "native", True, torch.bfloat16))
    return out


def build(model: ModelRouter, fmt: str, shared: int, bias: torch.Tensor | None) -> Any:
    kwargs: dict = {"renormalize": model.renormalize, "scoring_func": model.scoring,
                    "correction_bias": bias, "routed_scaling_factor": model.routed_scaling_factor}
    if model.grouped:
        kwargs.update(use_grouped_topk=True, num_expert_group=model.groups,
                      topk_group=model.topk_group)
    return build_topk(experts=model.experts, top_k=model.top_k, shared=shared,
                      fmt="BYPASSED" if fmt == "bypassed" else "STANDARD",
                      runner="flashinfer_trtllm_routed" if fmt == "raw_logits" else None,
                      **kwargs)


def inputs(model: ModelRouter, rows: int, dtype: torch.dtype, seed: int, ties: bool = False
           ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """[T + PAD, E] logits (padding rows hold NaN, inf and huge values) and the bias;
    ``ties``: logits on a coarse grid, so rows tie at their top-K boundary (bf16 routers do)."""
    logits, bias = draw_inputs(model, rows, seed=seed)
    if ties:
        logits = (logits * 2).round() / 2
    garbage = torch.randn(PAD, model.experts) * 1e4
    garbage[0, 0], garbage[1, :] = float("inf"), float("nan")
    return torch.cat([logits, garbage]).to(dtype), bias


def moe_output(topk_output: Any, experts: int, dtype: torch.dtype, rows: int) -> torch.Tensor:
    """SGLang's native MoE layer (random SiLU experts, E + S of them) on the first ``rows``."""
    from sglang.srt.layers.moe.fused_moe_native import moe_forward_native
    from sglang.srt.layers.moe.moe_runner import MoeRunnerConfig

    gen = torch.Generator().manual_seed(7)
    total = experts + 2  # room for fused shared slots
    layer = SimpleNamespace(num_experts=total,
                            w13_weight=(torch.randn(total, 32, 16, generator=gen)).to(dtype),
                            w2_weight=(torch.randn(total, 16, 16, generator=gen)).to(dtype))
    x = torch.randn(rows, 16, generator=gen).to(dtype)
    routed = topk_output._replace(topk_ids=topk_output.topk_ids[:rows],
                                  topk_weights=topk_output.topk_weights[:rows])
    return moe_forward_native(layer, x, routed, MoeRunnerConfig(activation="silu"))


def run_cell(model: ModelRouter, fmt: str, shared: int, dtype: torch.dtype, rows: int,
             policy: PolicySpec | None, *, seed: int = 0, compile: bool = False, drop: int = 0,
             ties: bool = False) -> tuple[Any, Any, torch.Tensor, LynxRuntime, torch.Tensor]:
    """(stock output, Lynx output, stats [field], runtime, logits) of one decode step of
    ``rows`` real rows; ``policy`` None: a budget of the stock union less ``drop``."""
    logits, bias = inputs(model, rows, dtype, seed, ties)
    topk = build(model, fmt, shared, bias)
    path = "cuda" if fmt != "native" else "native"
    reference = standard(stock_call(topk, logits, path))
    if policy is None:
        union = reference.topk_ids[:rows, : model.top_k].long().unique().numel()
        assert union < model.experts, "the cell's rows cover every expert: nothing to test"
        policy = policy_spec("budget", budget=union - drop)
    runtime = make_runtime(policy, model.experts, model.top_k, compile=compile)
    seen: list[Any] = []  # the selection the hook computed (its keep set)
    select = runtime.select
    runtime.select = lambda *a, **k: seen.append(select(*a, **k)) or seen[-1]  # type: ignore
    out = standard(call(runtime, topk, logits, StepLayout("decode", rows, 0), path))
    runtime.selection = seen[-1] if seen else None  # type: ignore[attr-defined]
    return reference, out, runtime.exporter.layer_totals()[0], runtime, logits


def assert_bitwise(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True, msg=lambda m: f"{what}: {m}")


def rows_for(model: ModelRouter) -> int:
    """Enough decode rows for a real batch, few enough that the union stays below E."""
    return min(16, (model.experts - 1) // model.top_k)


@pytest.mark.parametrize(("name", "fmt", "fused", "dtype"), cells(),
                         ids=lambda v: str(v).replace("torch.", ""))
def test_a_budget_that_drops_nothing_is_sglangs_own_output(name: str, fmt: str, fused: bool,
                                                           dtype: torch.dtype) -> None:
    model = BY_NAME[name]
    rows = rows_for(model)
    with sglang_topology():
        ref, out, stats, runtime, _ = run_cell(model, fmt, int(fused), dtype, rows, None)
    assert runtime.plans[(0, "cuda" if fmt != "native" else "native")].mode != "pass"
    assert_bitwise(out.topk_ids, ref.topk_ids, "ids")  # every row and column, padding too
    assert_bitwise(out.topk_weights, ref.topk_weights, "weights")
    assert torch.equal(moe_output(out, model.experts, dtype, rows),
                       moe_output(ref, model.experts, dtype, rows))
    # ... and the step still counts: pruned rows, kept = union, nothing rerouted, full mass.
    assert stats[FIELD["rows"]] == rows and stats[FIELD["rerouted_rows"]] == 0
    assert stats[FIELD["kept"]] == stats[FIELD["stock_union"]] > 0
    assert stats[FIELD["mass_kept"]] == stats[FIELD["mass_total"]]


@pytest.mark.parametrize(("name", "fmt"), [
    ("Qwen3-30B-A3B", "native"), ("Qwen3-30B-A3B", "bypassed"), ("Mixtral-8x7B", "raw_logits"),
    ("DeepSeek-V3", "native"), ("DeepSeek-V2-236B", "native"), ("GLM-4.5-Air", "native"),
    ("OLMoE-1B-7B", "native"), ("Qwen3-235B-A22B", "bypassed")])
def test_a_binding_budget_changes_exactly_the_rows_it_reroutes(name: str, fmt: str) -> None:
    """Over bf16 draws, every other one with many exact ties: no row computes a dropped expert; on
    STANDARD exactly the rows whose SGLang top-K holds a dropped expert change; on the masked
    format also the rows where a dropped expert ties with the K-th choice may be masked (the
    kernel routes after Lynx, and could break that tie toward the dropped expert)."""
    model = BY_NAME[name]
    rows = rows_for(model)
    for seed in range(4):
        with sglang_topology():  # a budget that drops the least important experts of the union
            ref, out, stats, runtime, _ = run_cell(
                model, fmt, 0, torch.bfloat16, rows, None, seed=seed, ties=seed % 2 == 1,
                drop=max(1, rows * model.top_k // 8))
        sel = runtime.selection
        routed = out.topk_ids[:rows, : model.top_k].long()
        assert bool(sel.keep[routed].all()), "a row computes a dropped expert"
        fits = sel.keep[ref.topk_ids[:rows, : model.top_k].long()].all(dim=-1)
        same = (out.topk_ids[:rows] == ref.topk_ids[:rows]).all(-1) & (
            out.topk_weights[:rows] == ref.topk_weights[:rows]).all(-1)
        rerouted = sel.rerouted[:rows]
        assert 0 < int(fits.sum()) < rows, "the draw should hold rows of both kinds"
        assert bool((same >= ~rerouted).all()), "a row changed although Lynx kept it"
        if fmt == "bypassed":  # masked rows: every row with a dropped expert, ties too
            assert bool((rerouted >= ~fits).all())
        else:  # rewritten rows: exactly those, and each of them changes
            assert torch.equal(rerouted, ~fits) and torch.equal(same, fits)
        assert stats[FIELD["rerouted_rows"]] == int(rerouted.sum())
        assert stats[FIELD["kept"]] < stats[FIELD["stock_union"]]


@pytest.mark.parametrize(("name", "fmt"), [
    ("Qwen3-30B-A3B", "native"), ("Qwen3-30B-A3B", "raw_logits"), ("OLMoE-1B-7B", "native"),
    ("DeepSeek-V2-236B", "native"), ("DeepSeek-V2-Lite", "native"), ("Mixtral-8x7B", "native")])
def test_near_ties_sglang_broke_its_own_way_change_nothing(name: str, fmt: str) -> None:
    """SGLang breaks exact ties its own way (torch.topk on the CPU, other kernels on a GPU;
    bf16 routers tie in ~3% of rows at the top-K boundary); the stock routing Lynx judges on
    is SGLang's own top-K, so a budget of SGLang's union still changes nothing."""
    from lynx.selection import stock_routing

    model = BY_NAME[name]
    rows, seeds_with_ties = rows_for(model), 0
    for seed in range(6):
        with sglang_topology():
            ref, out, stats, _, logits = run_cell(model, fmt, 0, torch.bfloat16, rows, None,
                                                  seed=seed, ties=True)
        assert_bitwise(out.topk_ids, ref.topk_ids, "ids")
        assert_bitwise(out.topk_weights, ref.topk_weights, "weights")
        assert stats[FIELD["rerouted_rows"]] == 0
        own = ref.topk_ids[:rows, : model.top_k].long().sort(-1).values
        lib = stock_routing(logits[:rows].float(), model.spec(), None if not
                            model.correction_bias else draw_inputs(model, rows, seed)[1])
        seeds_with_ties += int((own != lib.ids.sort(-1).values).any())
    assert seeds_with_ties > 0 or model.experts == 8, "no tie broken differently: no test"


COMPILED = [  # (model, logits dtype, policy): keys the server compiles (shared cache)
    ("Qwen3-30B-A3B", torch.float32, policy_spec("budget", budget=64)),
    ("Qwen3-30B-A3B", torch.bfloat16, policy_spec("budget", budget=64)),  # the reported cell
    ("DeepSeek-V3", torch.bfloat16, PolicySpec(name="coverage", coverage=1.0)),
    ("GPT-OSS-20B", torch.float32, policy_spec("budget", budget=31)),
]


@pytest.mark.skipif(cxx_compiler() is None, reason="no C++ compiler for Inductor")
@pytest.mark.parametrize(("name", "dtype", "policy"), COMPILED,
                         ids=[f"{n}-{str(d)[6:]}-{p.name}" for n, d, p in COMPILED])
def test_the_compiled_step_drops_nothing_bit_for_bit(name: str, dtype: torch.dtype,
                                                     policy: PolicySpec) -> None:
    """As the server runs it (LYNX_COMPILE=1): its weights differ from SGLang's by rounding
    (1.2e-7 in the reported bf16 cell), so only an untouched row can be bit for bit."""
    model = BY_NAME[name]
    rows = 6 if model.experts == 128 else rows_for(model)
    with sglang_topology():
        ref, out, stats, runtime, _ = run_cell(model, "native", 0, dtype, rows, policy,
                                               compile=True)
    assert len(runtime.compiled.graphs) == 1 and not runtime.compiled.failed
    assert stats[FIELD["kept"]] == stats[FIELD["stock_union"]]  # the premise: nothing dropped
    assert_bitwise(out.topk_ids, ref.topk_ids, "ids")
    assert_bitwise(out.topk_weights, ref.topk_weights, "weights")
    assert stats[FIELD["rerouted_rows"]] == 0
