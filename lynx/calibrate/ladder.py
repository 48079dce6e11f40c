"""The ladder (``lynx-serve calibrate --ladder``): calibrated per-layer tables at a set of mean
budgets, each measured on held-out data, as the controller's knob (`lynx_protocol.ladder`).

Shape legend: N windows, P positions per window, B windows decoded together, L MoE layers,
E experts, K top_k.

Per calibration batch B the per-layer sensitivities are measured once on the *training*
split (`lynx.calibrate.tables.layer_sensitivity`); every rung's tables are then exact
allocations (`allocate`) for its mean budget, so one sensitivity pass serves every rung. Each
table is measured on *held-out* windows (never the calibration data) with the whole table
applied: the perplexity rise over no pruning (cost kind ``ppl_rise``), the mean distinct
experts computed per layer and step, and the routing mass kept. Rungs that cost more than a
faster one (measurement noise on a flat stretch) and rungs beyond ``max_ppl_rise`` (the
quality floor) are dropped and listed with the reason.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from lynx.calibrate.tables import (
    allocate_routed,
    default_candidates,
    layer_sensitivity,
    model_shape,
    router_hooks,
    window_nll,
)
from lynx_protocol.ladder import (
    LADDER_FORMAT,
    PPL_RISE,
    Ladder,
    LadderModel,
    RungCost,
    RungTable,
    validate_ladder,
)
from lynx_protocol.ladder_build import STOCK_RUNG, assemble_rungs, default_means
from lynx_protocol.policy import BudgetBucket, PolicySpec

__all__ = ["STOCK_RUNG", "assemble_rungs", "build_ladder", "default_means", "measure_table",
           "table_policy"]


def table_policy(per_layer: Sequence[int]) -> PolicySpec:
    """One per-layer table for every batch size."""
    return PolicySpec(name="budget", budgets=[BudgetBucket(max_batch=1_000_000,
                                                           per_layer=list(per_layer))])


@torch.no_grad()
def measure_table(model: Any, windows: torch.Tensor, spec: PolicySpec, batch: int
                  ) -> tuple[float, float, float]:
    """(mean next-token NLL [nats], mean distinct experts computed per layer and step,
    routing mass kept [fraction]) of ``windows`` [N,P] decoded B at a time under ``spec``."""
    total, count = 0.0, 0
    with router_hooks(model, spec, batch) as hooks:
        for chunk in windows.split(batch):
            nll, tokens, _ = window_nll(model, chunk)
            total, count = total + nll, count + tokens
    experts = sum(h.experts / max(h.steps, 1) for h in hooks) / len(hooks)
    mass_total = sum(h.mass_total for h in hooks)
    mass = sum(h.mass_kept for h in hooks) / mass_total if mass_total > 0 else 1.0
    return total / count, experts, min(max(mass, 0.0), 1.0)


def build_ladder(folder: Path, means: Sequence[float] | None = None,
                 batches: Sequence[int] = (16, 32, 64), windows: int = 64,
                 window_len: int = 96, heldout_windows: int = 64, seed: int = 11,
                 max_ppl_rise: float = 0.05, documents: list[str] | None = None,
                 server: tuple[str, str, str] | None = None) -> tuple[Ladder, dict[str, Any]]:
    """The ladder of the checkpoint in ``folder`` and a report (sensitivities, every measured
    rung before filtering). ``means``: mean budgets [experts per layer] of the candidate
    rungs (default `default_means`); ``max_ppl_rise``: the quality floor, as a fraction.
    ``documents``: the user's corpus, split into calibration and held-out documents
    (`lynx.calibrate.corpus`; default: the reference models' code splits). Deterministic for
    a seed. ``server``: (SGLang URL, controller admin URL, admin token) to measure through a
    running server in evaluation mode (`server_path`) instead of transformers. Raises
    ValueError when no mean is at or above top_k, `CorpusError` when the corpus is too small,
    `server_path.ServerPathError` when the server path cannot measure."""
    from lynx.calibrate.corpus import calibration_streams, corpus_windows

    torch.manual_seed(seed)
    unions: list[float | None] = []  # server path: per layer, None where nothing routes
    if server is None:
        from lynx.reference.loading import load_reference

        model, tok = load_reference(folder, dtype=torch.float32)
        experts, top_k = model_shape(model)
        layers = model.config.num_hidden_layers

        def sensitivity_of(data: torch.Tensor, batch: int) -> Any:
            return layer_sensitivity(model, data, batch, candidates)

        def table_of(held: torch.Tensor, spec: PolicySpec, batch: int) -> Any:
            return measure_table(model, held, spec, batch)
    else:
        from lynx.calibrate.server_path import open_server_path, server_layer_sensitivity

        path, tok, experts, top_k = open_server_path(folder, *server)
        layers = path.num_layers

        def sensitivity_of(data: torch.Tensor, batch: int) -> Any:
            unions.clear()
            return server_layer_sensitivity(path, data, batch, candidates, experts, unions)

        def table_of(held: torch.Tensor, spec: PolicySpec, batch: int) -> Any:
            return path.measure_table(held, spec, batch, unions)
    means = sorted(set(means or default_means(experts, top_k)), reverse=True)
    if not means or means[-1] < top_k:
        raise ValueError(f"mean budgets {means} must be >= top_k = {top_k} (a step computes "
                         "at least its rows' top-k experts)")
    train, heldout, what = calibration_streams(tok, documents)
    candidates = default_candidates(experts, top_k)
    tables: dict[str, list[RungTable]] = {}
    unreachable: dict[str, str] = {}
    report: dict[str, Any] = {"candidates": candidates, "per_batch": []}
    for batch in sorted(batches):
        data = corpus_windows(train, windows - windows % batch, window_len,
                              torch.Generator().manual_seed(seed), f"the calibration {what}")
        held = corpus_windows(heldout, heldout_windows - heldout_windows % batch, window_len,
                              torch.Generator().manual_seed(seed + 1), f"the heldout {what}")
        sensitivity, kept = sensitivity_of(data, batch)
        stock_nll, stock_experts, _ = table_of(held, PolicySpec(name="off"), batch)
        source = (f"heldout {what}, {held.shape[0]} windows x {window_len} tokens decoded "
                  f"{batch} at a time, vs no pruning (stock NLL {stock_nll:.4f} nats)")
        tables.setdefault(STOCK_RUNG, []).append(RungTable(
            batch=batch, per_layer=[experts] * layers, experts_computed=round(stock_experts, 4),
            mass_kept=1.0, costs=[RungCost(kind=PPL_RISE, value=0.0, source=source)]))
        entry: dict[str, Any] = {"batch": batch, "stock_nll": stock_nll,
                                 "sensitivity_nats": sensitivity, "kept": kept, "rungs": {}}
        for mean in means:
            name = f"m{mean:g}"
            try:  # over the routed layers; a dense one is never pruned and in no mean
                budgets = allocate_routed(sensitivity, mean, kept, experts)
            except ValueError as exc:
                unreachable[name] = str(exc)
                continue
            nll, computed, mass = table_of(held, table_policy(budgets), batch)
            rise = math.expm1(nll - stock_nll)
            tables.setdefault(name, []).append(RungTable(
                batch=batch, per_layer=budgets, experts_computed=round(computed, 4),
                mass_kept=round(mass, 6), costs=[RungCost(kind=PPL_RISE, value=round(rise, 6),
                                                          source=source)]))
            entry["rungs"][name] = {"budgets": budgets, "experts_computed": computed,
                                    "mass_kept": mass, "ppl_rise": rise}
        report["per_batch"].append(entry)
    within, dropped = assemble_rungs(tables, len(batches), unreachable, PPL_RISE, max_ppl_rise)
    ladder = Ladder(
        format=LADDER_FORMAT,
        model=LadderModel(num_layers=layers, num_experts=experts, top_k=top_k,
                          name=Path(folder).name),
        rungs=within, dropped=dropped,
        source=(f"lynx-serve calibrate --ladder: sensitivities on {windows} training windows x "
                f"{window_len} tokens, costs on {heldout_windows} held-out windows, seed "
                f"{seed}, batches {sorted(batches)}, floor ppl_rise <= {max_ppl_rise:g}"))
    return validate_ladder(ladder, where=str(folder)), report
