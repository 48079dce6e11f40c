"""Evaluation mode (``LYNX_EVALUATION=prefill-as-decode``): prune *prefill* rows, grouped by
token position, as if each group were one decode step, so that prompt log-likelihoods (SGLang's
``input_token_logprobs``, lm-eval's loglikelihood tasks) measure a policy. Never for serving:
Lynx leaves every prefill row stock otherwise, so through a normal server a prompt's logprobs
are stock's under every policy.

A prefill forward of R requests holds their prompt tokens; the rows at one position p (one
per request long enough) form one group, as `lynx.calibrate.tables.RouterHook` groups B
calibration windows in transformers: the same request count at the same position, a batch of
B "decode rows". Each group is selected on its own with the policy's table for its size
(`calibrate.tables.knob_values`), judged on SGLang's own top-K (STANDARD output), and its
statistics are added to the exporter (a group the table leaves unpruned adds its layer-step and
its stock union as experts computed, nothing else: so ``lynx_layer_pruned_steps_total`` counts
evaluated layer-steps here, and experts cover every layer as the transformers path counts
them; under policy ``off`` nothing is evaluated), which is flushed after every evaluated
forward so that ``/metrics`` holds them when the response returns
(`lynx.calibrate.server_path` reads them).

Shape legend: T prefill rows, E experts, K top_k, G groups (distinct positions).

Refused at start-up unless SGLang runs with ``--disable-radix-cache``: a cached prefix would
carry KV computed under another policy. Layers whose output is not STANDARD (packed ids,
logits-routing kernels) are passed through and counted (``evaluation_format``).
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from lynx.calibrate.tables import knob_values, spec_knobs
from lynx.selection import NO_BUDGET_LIMIT, make_knobs, select_layer_step
from lynx.selection.statistics import STAT_FIELDS
from lynx.sglang_plugin.formats import LayerPlan, merge_standard_output, standard_routed
from lynx.sglang_plugin.step_state import RuntimeState, StepLayout

logger = logging.getLogger("lynx.plugin")


def position_groups(positions: torch.Tensor) -> list[torch.Tensor]:
    """Row indices [B_g] int64 per distinct position of ``positions`` [T] (ascending position;
    rows in their order within a group): the "decode steps" of one prefill forward."""
    order = torch.argsort(positions, stable=True)
    _, counts = torch.unique_consecutive(positions[order], return_counts=True)
    return list(torch.split(order, counts.tolist()))


class PrefillAsDecode:
    """The runtime's evaluation mode: groups of the current prefill forward, and their routing."""

    def __init__(self) -> None:
        self.groups: list[torch.Tensor] | None = None  # this forward's, when it is evaluated
        # a group a layer leaves unpruned still counts its layer-step, experts and union (a
        # table's experts computed covers every layer), but no row, mass or rerouting
        self._counting: dict[torch.device, tuple[Any, torch.Tensor]] = {}  # per device
        self._knobs: dict[tuple, Any] = {}  # (device, policy knob values): made once each

    def _knobs_for(self, device: torch.device, spec: Any, budget: int) -> Any:
        """The selection knobs of ``spec`` at ``budget`` on ``device``, made once per value
        set (not per position group and layer: no allocation, no device sync per group)."""
        key = (device, spec.name, budget, spec.alpha, spec.beta, spec.k0, spec.coverage)
        if key not in self._knobs:
            if len(self._knobs) >= 1024:  # a long calibration: many policies, few at a time
                self._knobs.clear()
            self._knobs[key] = spec_knobs(spec, True, budget, device)
        return self._knobs[key]

    def _count_only(self, device: torch.device) -> tuple[Any, torch.Tensor]:
        """(knobs that prune nothing, the [S] mask of the statistics such a group counts), on
        the router logits' device (made once per device, outside any graph)."""
        if device not in self._counting:
            self._counting[device] = (
                make_knobs(device, enabled=True, budget=NO_BUDGET_LIMIT, policy="budget"),
                torch.tensor([float(f in ("layer_steps", "kept", "stock_union"))
                              for f in STAT_FIELDS], device=device))
        return self._counting[device]

    def check(self, model_runner: Any) -> None:
        """At start-up: refuse SGLang's settings that cannot evaluate (`LynxConfigError`);
        otherwise say loudly, once, that this server is not for serving."""
        from lynx.sglang_plugin.config import LynxConfigError

        refused = check_server_args(getattr(model_runner, "server_args", None))
        if refused:
            raise LynxConfigError(refused)
        logger.warning("Lynx: EVALUATION MODE (LYNX_EVALUATION): prefill rows are pruned by "
                       "position groups; do not serve traffic with this server")

    def begin(self, state: RuntimeState, forward_batch: Any, layout: StepLayout) -> None:
        """Group a pure prefill forward's rows by position (one host copy of the positions);
        any other forward, or policy ``off``, is served as usual."""
        self.groups = None
        positions = getattr(forward_batch, "positions", None)
        if layout.mode != "prefill" or state.policy.name == "off" or positions is None:
            return
        self.groups = position_groups(positions[: layout.n_valid].to("cpu"))

    def around_topk(self, runtime: Any, original: Any, topk: Any, hidden_states: torch.Tensor,
                    router_logits: torch.Tensor, args: tuple, kwargs: dict, path: str) -> Any:
        """``TopK.forward_*`` in an evaluated forward: SGLang routes, then `route`; a layer
        that is not STANDARD-routed passes through (counted)."""
        layer = int(topk.layer_id)
        output = original(topk, hidden_states, router_logits, *args, **kwargs)
        plan = runtime.plan_for(topk, layer, path)
        if plan.mode == "pass":
            return output
        if plan.mode == "logits" or not standard_routed(output, plan.router) or (
                kwargs.get("dynamic_expert_bias") is not None):
            runtime.record_plan(layer, path, LayerPlan("pass", "evaluation_format"))
            return output
        return self.route(runtime.state, plan, topk, router_logits, output, layer,
                          runtime.exporter)

    def route(self, state: RuntimeState, plan: LayerPlan, topk: Any,
              router_logits: torch.Tensor, output: Any, layer: int, exporter: Any) -> Any:
        """SGLang's STANDARD ``output`` for ``router_logits`` [T,E] with every group's rows
        rerouted as the policy would at a decode step of that many rows; rows with nothing
        dropped stay SGLang's own. The groups' statistics go to ``exporter`` (if any)."""
        assert self.groups is not None and plan.router is not None
        router = plan.router
        own_ids = output.topk_ids[:, : router.top_k]
        ids = own_ids.clone()
        weights = output.topk_weights[:, : router.top_k].clone()
        rerouted = torch.zeros(own_ids.shape[0], dtype=torch.bool, device=own_ids.device)
        bias = topk.topk_config.correction_bias if router.has_correction_bias else None
        for group in self.groups:
            device = router_logits.device
            enabled, budget = knob_values(state.policy, group.numel(), layer,
                                          state.num_experts)
            index = group.to(device)
            rows = torch.ones(index.numel(), dtype=torch.bool, device=device)
            if not enabled:  # unpruned here: count its experts (the stock union)
                if exporter is not None:
                    count_knobs, mask = self._count_only(device)
                    step = select_layer_step("budget", router_logits[index], router,
                                             count_knobs, rows, rows, bias,
                                             stock_ids=own_ids[index])
                    exporter.accumulate(layer, step.stats * mask)
                continue
            knobs = self._knobs_for(device, state.policy, budget)
            step = select_layer_step(state.policy.name, router_logits[index], router, knobs,
                                     rows, rows, bias, stock_ids=own_ids[index])
            ids[index] = step.topk_ids.to(ids.dtype)
            weights[index] = step.topk_weights.to(weights.dtype)
            rerouted[index] = step.rerouted
            if exporter is not None:
                exporter.accumulate(layer, step.stats)
        return merge_standard_output(output, weights, ids, rerouted, router.top_k)


def check_server_args(server_args: Any) -> str | None:
    """Why SGLang's ``server_args`` cannot run evaluation mode (None: they can)."""
    if server_args is not None and not getattr(server_args, "disable_radix_cache", False):
        return ("LYNX_EVALUATION needs --disable-radix-cache: a cached prefix would carry KV "
                "computed under another policy")
    return None
