"""Per-layer expert budgets calibrated offline: ``lynx-serve calibrate <model>``.

Shape legend: N calibration windows, P positions per window, B windows decoded together (one
decode batch per position), L MoE layers, E experts, K top_k.

Layers are not equally sensitive to pruning: one budget for every layer spends experts where
they buy nothing. This command measures, on a calibration set (windows of the *training*
split, never the held-out data the quality checks use), how much each layer alone raises the
mean next-token loss when pruned to each candidate budget, and how many experts it then
computes per step (a budget above the step's union costs only the union), then allocates the
per-layer budgets that minimise the summed loss rise for a target mean of experts computed per
layer and step (exact, dynamic programming over layers), once per calibration batch size: a
budget prunes more when fewer rows share the step, so a table fitted at batch 32 does not
carry over to 16.
The result is a ``budget`` `PolicySpec` with one ``per_layer`` table per batch bucket, which
the plugin (``LYNX_POLICY_FILE``) and the controller's admin API (``PUT /v1/policy``) accept
as is.

The router hook applies the plugin's own selection step (`lynx.selection.select_layer_step`)
to a transformers MoE router, every position of the B windows being one decode step (every
row prunable: slightly pessimistic against a server, which never prunes prefill rows); as in
the server, only rerouted rows change (`lynx.selection.merge_rerouted`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from lynx.calibrate.hf_routers import model_shape, moe_routers, router_spec
from lynx.selection import NO_BUDGET_LIMIT, RouterSpec, SelectionKnobs, make_knobs
from lynx.selection.statistics import STAT_FIELDS
from lynx_protocol.ladder_build import allocate, single_layer_policy
from lynx_protocol.policy import BudgetBucket, PolicySpec, bucket_for

NO_PRUNING_BELOW = 4  # decode rows, as the default policy


def knob_values(spec: PolicySpec, batch: int, layer: int, num_experts: int
                ) -> tuple[bool, int]:
    """(whether the plugin would prune, the budget [experts]) for ``spec`` at a pure-decode
    step of ``batch`` rows in ``layer``, on the host: not for policy off, or a budget >= E."""
    budget = NO_BUDGET_LIMIT
    if spec.name == "budget":
        bucket = bucket_for(spec, batch)
        budget = bucket.budget_for_layer(layer) if bucket is not None else NO_BUDGET_LIMIT
    enabled = spec.name != "off" and not (spec.name == "budget" and budget >= num_experts)
    return enabled, min(budget, NO_BUDGET_LIMIT)


def spec_knobs(spec: PolicySpec, enabled: bool, budget: int,
               device: torch.device | str = "cpu") -> SelectionKnobs:
    """``spec``'s selection knobs at ``budget`` [experts] on ``device`` (new tensors)."""
    return make_knobs(device, enabled=enabled, budget=budget, alpha=spec.alpha,
                      beta=float(spec.beta), k0=spec.k0, policy=spec.name,
                      coverage=spec.coverage)


def policy_knobs(spec: PolicySpec, batch: int, layer: int, num_experts: int) -> SelectionKnobs:
    """The knobs the plugin would set for ``spec`` at a pure-decode step of ``batch`` rows in
    ``layer`` (``enabled`` False where it would not prune: `knob_values`), on the CPU."""
    return spec_knobs(spec, *knob_values(spec, batch, layer, num_experts))


class RouterHook:
    """Forward hook on a transformers MoE router (output ``(logits, scores, ids)``): the
    selection step per position, every row of the B windows' position one decode batch.
    ``router``: the module's routing rule, ``correction_bias`` [E] its bias where it has one
    (`hf_routers.router_spec`)."""

    def __init__(self, spec: PolicySpec, batch: int, layer: int, num_experts: int,
                 router: RouterSpec, correction_bias: torch.Tensor | None = None) -> None:
        self.spec, self.batch = spec, batch
        self.router, self.correction_bias = router, correction_bias
        self.knobs = policy_knobs(spec, batch, layer, num_experts)
        self.rows = 0  # rows routed through the hook
        self.top1_kept = 0  # of which kept their stock top-1 expert
        self.steps = 0  # decode steps (positions) seen
        self.experts = 0  # distinct experts computed, summed over the steps
        self.mass_kept = 0.0  # stock top-K gate mass of pruned rows on kept experts
        self.mass_total = 0.0  # stock top-K gate mass of pruned rows

    def _count_experts(self, ids: torch.Tensor, experts: int) -> None:
        """``ids`` [B*P, K]: distinct experts per position, added up."""
        per_pos = ids.view(self.batch, -1, ids.shape[-1]).transpose(0, 1).reshape(
            -1, self.batch * ids.shape[-1])  # [P, B*K]
        hit = torch.zeros(per_pos.shape[0], experts, dtype=torch.bool)
        hit.scatter_(1, per_pos.long(), True)
        self.steps += per_pos.shape[0]
        self.experts += int(hit.sum())

    def __call__(self, module: Any, inputs: Any, output: Any) -> Any:
        from lynx.selection import merge_rerouted, select_layer_step

        router_logits, scores, stock_ids = output
        if not bool(self.knobs.enabled):
            self._count_experts(stock_ids, router_logits.shape[-1])
            return output
        z = router_logits.float()
        per_pos = z.view(self.batch, -1, z.shape[-1])  # [B, P, E]
        rows = torch.ones(self.batch, dtype=torch.bool)
        own = stock_ids.view(self.batch, -1, stock_ids.shape[-1])  # transformers' own top-K
        steps = [select_layer_step(self.spec.name, per_pos[:, t], self.router, self.knobs,
                                   rows, rows, self.correction_bias, stock_ids=own[:, t])
                 for t in range(per_pos.shape[1])]
        top_k = self.router.top_k  # [B, P, K] -> rows ordered like router_logits
        weights = torch.stack([s.topk_weights for s in steps], dim=1).reshape(-1, top_k)
        ids = torch.stack([s.topk_ids for s in steps], dim=1).reshape(-1, top_k)
        rerouted = torch.stack([s.rerouted for s in steps], dim=1).reshape(-1)
        stats = torch.stack([s.stats for s in steps]).sum(0)
        self.mass_kept += float(stats[STAT_FIELDS.index("mass_kept")])
        self.mass_total += float(stats[STAT_FIELDS.index("mass_total")])
        # As the server: rows with nothing dropped keep transformers' own routing bit for bit.
        ids, weights = merge_rerouted(stock_ids, scores, ids, weights, rerouted)
        stock_top1 = z.argmax(-1, keepdim=True)
        self.rows += stock_top1.numel()
        self.top1_kept += int((ids == stock_top1).any(-1).sum())
        self._count_experts(ids, z.shape[-1])
        return router_logits, weights, ids


@contextmanager
def router_hooks(model: Any, spec: PolicySpec, batch: int,
                 factory: Callable[..., RouterHook] = RouterHook) -> Iterator[list[RouterHook]]:
    """``spec`` applied to every router of ``model`` while the context is open."""
    experts, _ = model_shape(model)
    routers = moe_routers(model)
    hooks = [factory(spec, batch, layer, experts, *router_spec(module))
             for layer, module in routers.items()]
    handles = [r.register_forward_hook(h) for r, h in zip(routers.values(), hooks, strict=True)]
    try:
        yield hooks
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def mean_nll(model: Any, windows: torch.Tensor, spec: PolicySpec, batch: int
             ) -> tuple[float, list[float]]:
    """(mean next-token negative log-likelihood [nats] of ``windows`` [N,P] under ``spec``,
    mean distinct experts computed per step in each MoE layer, in layer order)."""
    total, count = 0.0, 0
    with router_hooks(model, spec, batch) as hooks:
        for chunk in windows.split(batch):
            nll, tokens, _ = window_nll(model, chunk)
            total, count = total + nll, count + tokens
    return total / count, [h.experts / max(h.steps, 1) for h in hooks]


def window_nll(model: Any, chunk: torch.Tensor) -> tuple[float, int, torch.Tensor]:
    """(summed next-token NLL [nats], tokens scored, logits [B,P-1,V] fp32) of ``chunk``
    [B,P] token ids, teacher-forced."""
    logits = model(input_ids=chunk).logits[:, :-1].float()
    target = chunk[:, 1:]
    nll = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="sum").item()
    return nll, target.numel(), logits


def layer_sensitivity(model: Any, windows: torch.Tensor, batch: int, candidates: Sequence[int]
                      ) -> tuple[list[dict[int, float]], list[dict[int, float]]]:
    """Per decoder layer [L], {budget: mean NLL rise [nats] with only that layer pruned to
    it} and {budget: mean distinct experts that layer computes per step under it}; both
    empty for a dense layer (no router: never pruned, see `allocate_routed`)."""
    experts, _ = model_shape(model)
    layers = model.config.num_hidden_layers
    stock, _ = mean_nll(model, windows, PolicySpec(name="off"), batch)
    rise: list[dict[int, float]] = [{} for _ in range(layers)]
    kept: list[dict[int, float]] = [{} for _ in range(layers)]
    for position, layer in enumerate(moe_routers(model)):
        for m in candidates:
            nll, computed = mean_nll(model, windows,
                                     single_layer_policy(layer, m, layers, experts), batch)
            rise[layer][m], kept[layer][m] = max(0.0, nll - stock), computed[position]
    return rise, kept


def allocate_routed(sensitivity: Sequence[dict[int, float]], target_mean: float,
                    kept: Sequence[dict[int, float]], num_experts: int) -> list[int]:
    """`allocate` over the layers with routed experts (a non-empty ``kept`` curve): per
    decoder layer [L] budgets [experts], E for a dense layer (never pruned, in no mean).
    Raises ValueError as `allocate` does, or when no layer is routed."""
    routed = [i for i, curve in enumerate(kept) if curve]
    if not routed:
        raise ValueError("no layer has routed experts to prune")
    chosen = allocate([sensitivity[i] for i in routed], target_mean, [kept[i] for i in routed])
    budgets = [num_experts] * len(kept)
    for layer, budget in zip(routed, chosen, strict=True):
        budgets[layer] = budget
    return budgets


def calibrated_policy(tables: Sequence[tuple[int, Sequence[int]]], num_experts: int
                      ) -> PolicySpec:
    """The plugin policy: no pruning below NO_PRUNING_BELOW rows, then per batch bucket its
    per-layer budgets. ``tables``: (calibration batch, budgets per layer), ascending batch;
    a bucket reaches up to the geometric middle between its batch and the next one."""
    buckets = [BudgetBucket(max_batch=NO_PRUNING_BELOW - 1, all_layers=num_experts)]
    for i, (batch, budgets) in enumerate(tables):
        upper = (int(math.sqrt(batch * tables[i + 1][0])) if i + 1 < len(tables)
                 else 1_000_000)
        buckets.append(BudgetBucket(max_batch=max(upper, NO_PRUNING_BELOW),
                                    per_layer=list(budgets)))
    return PolicySpec(name="budget", budgets=buckets)


def default_candidates(num_experts: int, top_k: int) -> list[int]:
    """Budgets tried per layer: K, 1.5K, 2K, 3K, 4K, E/4, 3E/8, E/2, 3E/4 (< E), and E."""
    values = {top_k, top_k + top_k // 2, 2 * top_k, 3 * top_k, 4 * top_k, num_experts // 4,
              3 * num_experts // 8, num_experts // 2, 3 * num_experts // 4, num_experts}
    return sorted(v for v in values if top_k <= v <= num_experts)


def calibrate(folder: Path, target_mean: float, batches: Sequence[int] = (16, 32, 64),
              windows: int = 64, window_len: int = 96, seed: int = 11,
              documents: list[str] | None = None,
              server: tuple[str, str, str] | None = None) -> dict[str, Any]:
    """Sensitivities, allocations and policy for the checkpoint in ``folder``, one per-layer
    table per calibration batch size (how many rows share a step changes how much a budget
    prunes; see the module doc). ``target_mean``: experts computed per layer and decode step,
    averaged over the layers, at each calibration batch (what the MoE layers read; a budget
    at or above a step's union costs the union). ``windows`` is rounded down to a multiple of
    each batch. ``documents``: the user's corpus (`lynx.calibrate.corpus`; default: the
    reference models' training code). ``server``: (SGLang URL, controller admin URL, admin
    token) to measure through a running server in evaluation mode (`server_path`) instead of
    transformers: only the tokenizer and config are read here. Raises ValueError when the
    target is below the cheapest table, `CorpusError` when the corpus is too small,
    `server_path.ServerPathError` when the server path cannot measure."""
    from lynx.calibrate.corpus import calibration_streams, corpus_windows

    if server is None:
        from lynx.reference.loading import load_reference

        model, tok = load_reference(folder, dtype=torch.float32)
        experts, top_k = model_shape(model)

        def sensitivity_of(data: torch.Tensor, batch: int, candidates: list[int]) -> Any:
            return layer_sensitivity(model, data, batch, candidates)
    else:
        from lynx.calibrate.server_path import open_server_path

        path, tok, experts, top_k = open_server_path(folder, *server)

        def sensitivity_of(data: torch.Tensor, batch: int, candidates: list[int]) -> Any:
            from lynx.calibrate.server_path import server_layer_sensitivity

            return server_layer_sensitivity(path, data, batch, candidates, experts)
    if target_mean < top_k:  # every step computes at least its rows' top-k distinct experts
        raise ValueError(f"target mean {target_mean} is below the cheapest table: a step "
                         f"computes at least top_k = {top_k} experts")
    stream, _, what = calibration_streams(tok, documents)
    candidates = default_candidates(experts, top_k)
    per_batch = []
    for batch in sorted(batches):
        data = corpus_windows(stream, windows - windows % batch, window_len,
                              torch.Generator().manual_seed(seed), f"the calibration {what}")
        sensitivity, kept = sensitivity_of(data, batch, candidates)
        budgets = allocate_routed(sensitivity, target_mean, kept, experts)
        computed = [k[m] for k, m in zip(kept, budgets, strict=True) if k]
        per_batch.append({"batch": batch, "sensitivity_nats": sensitivity, "kept": kept,
                          "budgets": budgets, "mean_kept": sum(computed) / len(computed)})
    return {"model": str(folder), "data": what, "target_mean": target_mean, "windows": windows,
            "path": "transformers" if server is None else f"server {server[0]}",
            "window_len": window_len, "candidates": candidates, "per_batch": per_batch,
            "policy": calibrated_policy([(b["batch"], b["budgets"]) for b in per_batch],
                                        experts)}
