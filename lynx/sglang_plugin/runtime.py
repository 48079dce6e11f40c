"""The plugin's one state object: `LynxRuntime` holds the configuration, the per-process step
state (device knobs), the statistics exporter and the controller link, and its methods are
the hooks SGLang calls. `lynx.sglang_plugin.install` builds one per process and registers its
bound methods; tests build their own and call the same methods.

All selection math lives in `lynx.selection`; what to do per TopK output format in
`lynx.sglang_plugin.formats`. Nothing here raises inside a forward: a layer Lynx cannot prune
is passed through unchanged and counted.
"""

from __future__ import annotations

import logging
import time
from functools import partial
from typing import Any

import torch

from lynx.selection import mask_rerouted_logits
from lynx.selection.compiled import CompiledSelection
from lynx.selection.step import LayerSelection
from lynx.sglang_plugin import eplb
from lynx.sglang_plugin.config import (
    LynxConfigError,
    PluginConfig,
    checkpoint_policy,
    default_policy,
    ladder_rung_policy,
    moe_shape,
)
from lynx.sglang_plugin.formats import (
    LayerPlan,
    merge_standard_output,
    plan_layer,
    standard_routed,
)
from lynx.sglang_plugin.idle_default import IdleDefaultWatch
from lynx.sglang_plugin.ranks import ParallelRanks, ranks_from_sglang
from lynx.sglang_plugin.startup import apply_logger, selection_graph_keys
from lynx.sglang_plugin.step_state import RuntimeState, layout_from_forward_batch
from lynx_protocol.policy import PolicyError, PolicySpec, validate_policy

logger = logging.getLogger("lynx.plugin")


def _capturing() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


class LynxRuntime:
    """One per scheduler process: config, step state, exporter, controller link, hooks."""

    def __init__(self, config: PluginConfig) -> None:
        self.config = config
        self.state: RuntimeState | None = None
        self.exporter: Any = None  # StatsExporter, built with the state
        self.controller: Any = None  # ControllerGlue when a controller is configured
        self.ranks = ParallelRanks(0, 1, 0, 1)  # replaced from SGLang's state in `prepare`
        self.plans: dict[tuple[int, str], LayerPlan] = {}  # (layer, call path) -> plan
        self._reasons_logged: set[str] = set()
        self.moe_timer: Any = None  # MoeTimer when LYNX_TIME_MOE=1
        self.step_trace: Any = None  # StepTrace when LYNX_STEP_TRACE is set (TP rank 0)
        self.shadow: Any = None  # ShadowRecorder when LYNX_SHADOW is set
        self.compiled = CompiledSelection(enabled=config.compile,  # CPU steps (AOTInductor)
                                          cache_dir=config.compile_cache)
        self._graph_keys: list[Any] = []  # the model's selection graphs (`compile_selection`)
        self.evaluation: Any = None  # PrefillAsDecode under LYNX_EVALUATION (never serving)
        if config.evaluation:
            from lynx.sglang_plugin.evaluation import PrefillAsDecode

            self.evaluation = PrefillAsDecode()

    @property
    def ep_layout(self) -> tuple[int, bool]:
        """(EP ranks, whether budgets are spent per rank): `plan_layer`'s EP arguments."""
        return self.ranks.ep_size, self.config.ep_balance

    # -- start-up ---------------------------------------------------------------------------
    def prepare(self, model_runner: Any, ranks: ParallelRanks | None = None) -> RuntimeState:
        """Allocate the state from the served model's config (before any graph capture).

        ``ranks``: this process's place in the parallel layout (default: SGLang's own parallel
        state; `RankError` at start-up if it is missing)."""
        if self.state is not None:
            return self.state
        self.ranks = ranks or ranks_from_sglang()
        layers, experts, top_k = moe_shape(model_runner.model_config.hf_config)
        model = str(getattr(model_runner.model_config, "model_path", "") or "")
        shipped = (ladder_rung_policy(model, self.config.ladder_rung, layers, experts)
                   if self.config.ladder_rung else None
                   if self.config.policy or self.config.shadow_on else
                   ladder_rung_policy(model, None, layers, experts) or checkpoint_policy(model))
        policy = self.config.policy or (shipped[0] if shipped else PolicySpec(name="off")
                                        if self.config.shadow_on else
                                        default_policy(experts, top_k))
        if shipped:
            logger.info("Lynx: start-up policy from %s (the checkpoint's calibration)",
                        shipped[1])
        if self.evaluation is not None:
            self.evaluation.check(model_runner)
        device = torch.device(model_runner.device)
        state = RuntimeState(layers, experts, top_k, device, policy)
        try:
            validate_policy(policy, num_layers=layers, num_experts=experts, top_k=top_k)
        except PolicyError as exc:
            if shipped:  # name the file: it was not set by the operator
                raise LynxConfigError(f"{shipped[1]}: {exc}") from None
            raise
        from lynx.sglang_plugin.exporter import StatsExporter

        self.state = state
        if self.config.apply_log is not None:
            state.on_apply = apply_logger(self.config.apply_log, self.ranks.labels())
            state.on_apply(state.policy, state.policy_version, state.step_index)
        self.exporter = StatsExporter(state, self.config, tp_rank=self.ranks.tp_rank,
                                      ep_ranks=self.ranks.ep_size)
        self.exporter.selection_graphs = self.compiled.counts
        if not (self.config.policy or shipped):  # the built-in default: say if it is idle
            self.exporter.idle_default = IdleDefaultWatch(policy, layers)
        if device.type == "cpu" and self.compiled.enabled:
            try:
                self._graph_keys = selection_graph_keys(model_runner, state, self.ep_layout)
                self.compile_selection(policy.name)
            except Exception:  # a warm-up problem must not stop the server: eager until use
                logger.exception("Lynx: selection warm-up failed; compiling on first use")
        if self.config.shadow_on:
            from lynx.sglang_plugin.shadow import ShadowRecorder

            state.shadow, state.shadow_every = True, self.config.shadow_every
            file = self.config.shadow
            self.shadow = ShadowRecorder(
                state, file and self.ranks.replica_file(file),
                self.config.stats_interval_s, write=self.ranks.tp_rank == 0)
        if self.config.time_moe:
            from lynx.sglang_plugin.moe_timer import MoeTimer

            self.moe_timer = MoeTimer(model_runner.model, lambda: state.layout.mode,
                                      export=self.ranks.tp_rank == 0,
                                      tp_rank=self.ranks.tp_rank)
        if self.config.step_trace is not None and self.ranks.exports:
            from lynx.sglang_plugin.step_trace import StepTrace

            self.step_trace = StepTrace(self.ranks.replica_file(self.config.step_trace))
        if self.config.controller:
            from lynx.sglang_plugin.controller_glue import ControllerGlue

            self.controller = ControllerGlue(self, model=model[-512:])
        logger.info("Lynx ready: %d layers, %d experts, top-%d, policy %s on %s (TP rank %d/%d, "
                    "DP rank %d/%d, EP %d, budgets per EP rank: %s)", layers, experts, top_k,
                    policy.name, device, self.ranks.tp_rank, self.ranks.tp_size,
                    self.ranks.dp_rank, self.ranks.dp_size, *self.ep_layout)
        return state

    def compile_selection(self, policy: str, *, background: bool = False) -> None:
        """Make ``policy``'s selection graphs ready: before serving (the start-up policy),
        compiled now; with ``background`` (a policy the controller sends while serving), a
        cached package loads now and a missing one compiles in a worker process while the
        steps run eagerly, so no request waits on a compile (`selection.compile_worker`)."""
        if policy != "off":
            keys = [key._replace(policy=policy) for key in self._graph_keys]
            if background:
                self.compiled.prefetch(keys)
            else:
                self.compiled.warm_up(keys)

    def before_init_cuda_graphs(self, model_runner: Any, *args: Any, **kwargs: Any) -> None:
        if not getattr(model_runner, "is_draft_worker", False):
            self.prepare(model_runner)
        return None

    # -- per step ---------------------------------------------------------------------------
    def around_model_runner_forward(self, original: Any, model_runner: Any, forward_batch: Any,
                                    *args: Any, **kwargs: Any) -> Any:
        if getattr(model_runner, "is_draft_worker", False):
            return original(model_runner, forward_batch, *args, **kwargs)
        state = self.state or self.prepare(model_runner)
        if self.exporter is not None:
            self.exporter.before_step(state)
        if self.shadow is not None:
            self.shadow.maybe_write()
        layout = layout_from_forward_batch(forward_batch)
        state.begin_step(layout)
        evaluation = self.evaluation
        if evaluation is not None:
            evaluation.begin(state, forward_batch, layout)
        start = time.perf_counter()
        try:
            return original(model_runner, forward_batch, *args, **kwargs)
        finally:
            end = time.perf_counter()
            if self.exporter is not None:
                self.exporter.after_step(state, layout, end - start)
                if evaluation is not None and evaluation.groups is not None:
                    self.exporter.flush(state)  # /metrics complete when the response returns
            if self.step_trace is not None:
                self.step_trace.record(end, end - start, layout, state.step_active)
            if evaluation is not None:
                evaluation.groups = None  # never left for another forward (a draft model's)
            state.step_active = False

    # -- per layer --------------------------------------------------------------------------
    def topk_hook(self, path: str) -> Any:
        """The AROUND hook for ``TopK.forward_<path>`` (path: "native", "cpu", "cuda")."""
        return partial(self.around_topk_forward, path=path)

    def around_topk_forward(self, original: Any, topk: Any, hidden_states: torch.Tensor,
                            router_logits: torch.Tensor, *args: Any, path: str = "native",
                            **kwargs: Any) -> Any:
        state = self.state
        if state is not None and self.evaluation is not None and self.evaluation.groups:
            return self.evaluation.around_topk(self, original, topk, hidden_states,
                                               router_logits, args, kwargs, path)
        if state is None or not (state.step_active or state.shadow_step or _capturing()):
            return original(topk, hidden_states, router_logits, *args, **kwargs)
        layer = int(topk.layer_id)
        if not state.step_active and not _capturing():  # served stock, measured (shadow)
            output = original(topk, hidden_states, router_logits, *args, **kwargs)
            self.shadow.observe_call(topk, self.plan_for(topk, layer, path), router_logits,
                                     output, kwargs)
            return output
        if kwargs.get("dynamic_expert_bias") is not None:  # a per-call [T,E] bias: SGLang's
            self.record_plan(layer, path, LayerPlan("pass", "dynamic_expert_bias"))
            return original(topk, hidden_states, router_logits, *args, **kwargs)
        plan = self.plan_for(topk, layer, path)
        if plan.mode == "pass":
            return original(topk, hidden_states, router_logits, *args, **kwargs)
        assert plan.router is not None
        if plan.mode == "logits":  # the kernel routes: mask only the rows Lynx reroutes
            selection = self.select(state, router_logits, plan, topk.topk_config, layer)
            masked = mask_rerouted_logits(router_logits, selection.allowed, selection.rerouted)
            output = original(topk, hidden_states, masked, *args, **kwargs)
        else:  # SGLang routes first; its own top-K is the stock routing Lynx judges rows on
            info = eplb.call_dispatch_info(topk, kwargs)  # physical ids under EPLB (`eplb`)
            if info is not None and info.ep_dispatch_algorithm not in eplb.MAPPED:
                self.record_plan(layer, path, LayerPlan("pass", "eplb_dispatch"))
                return original(topk, hidden_states, router_logits, *args, **kwargs)
            output = original(topk, hidden_states, router_logits, *args, **kwargs)
            if not standard_routed(output, plan.router):
                self.record_plan(layer, path, LayerPlan("pass", "packed_ids" if hasattr(
                    output, "packed_topk_ids") else "unexpected_output"))
                return output
            own_ids = output.topk_ids[:, : plan.router.top_k]
            selection = self.select(state, router_logits, plan, topk.topk_config, layer,
                                    stock_ids=own_ids if info is None else eplb.to_logical(
                                        own_ids, info))
            ids = selection.topk_ids if info is None else eplb.consolidated(
                selection.topk_ids, own_ids, selection.rerouted, info, self.ep_layout[0])
            output = merge_standard_output(output, selection.topk_weights, ids,
                                           selection.rerouted, plan.router.top_k)
        if self.exporter is not None:
            self.exporter.accumulate(layer, selection.stats)
        if self.shadow is not None and _capturing():  # a replayed graph: measured unpruned
            self.shadow.observe(layer, router_logits, plan.router, topk.topk_config
                                .correction_bias if plan.router.has_correction_bias else None,
                                None, gate=~state.knobs.enabled & state.knobs.shadow_on)
        return output

    def plan_for(self, topk: Any, layer: int, path: str) -> LayerPlan:
        """The layer's plan, decided on its first call (the output format is fixed per layer)."""
        plan = self.plans.get((layer, path))
        if plan is None or plan.reason in ("dynamic_expert_bias", "eplb_dispatch"):  # per call
            plan = plan_layer(topk, path, *self.ep_layout)
            self.record_plan(layer, path, plan)
        return plan

    def record_plan(self, layer: int, path: str, plan: LayerPlan) -> None:
        """Remember a layer's plan; a pass-through is logged once per reason and counted."""
        self.plans[(layer, path)] = plan
        if plan.mode != "pass":
            return
        if plan.reason not in self._reasons_logged:
            self._reasons_logged.add(plan.reason)
            logger.warning("Lynx: passing TopK layers through unpruned (%s); first: layer %d",
                           plan.reason, layer)
        if self.exporter is not None:
            passed = {key[0] for key, p in self.plans.items()
                      if p.mode == "pass" and p.reason == plan.reason}
            self.exporter.set_passed_through(plan.reason, len(passed))

    def select(self, state: RuntimeState, router_logits: torch.Tensor, plan: LayerPlan,
               config: Any, layer: int, stock_ids: torch.Tensor | None = None
               ) -> LayerSelection:
        """`lynx.selection.select_layer_step` for one layer: its Triton variant on CUDA, its
        compiled graph on the CPU once ready (`lynx.selection.compiled`). ``stock_ids``
        [T,K]: SGLang's own routed ids (STANDARD format), the stock routing to judge on."""
        assert plan.router is not None
        knobs = state.knobs
        rows = torch.arange(router_logits.shape[0], device=router_logits.device)
        valid = rows < knobs.n_valid
        prunable = rows >= knobs.prunable_start
        step: Any = self.compiled
        if router_logits.is_cuda:
            from lynx.triton_selection.launcher import select_layer_step_triton as step
        # Under CUDA graphs the policy is picked on the device (by_code reads policy_code), so
        # a controller's switch reaches replayed graphs without recapture.
        policy = "by_code" if state.graph_safe else state.policy.name
        bias = config.correction_bias if plan.router.has_correction_bias else None
        weight = state.row_weight
        if weight is not None and weight.shape[0] != router_logits.shape[0]:  # padded rows
            weight = torch.nn.functional.pad(weight, (0, router_logits.shape[0] - weight.shape[0]))
        return step(policy, router_logits, plan.router, knobs.for_layer(layer), valid,
                    prunable, bias, row_weight=weight, stock_ids=stock_ids)

    # -- controller link (on SGLang's request path) -----------------------------------------
    def after_pull_raw_reqs(self, result: list | None, *args: Any, **kwargs: Any
                            ) -> list | None:
        if result is None or self.controller is None:
            return result
        try:
            messages = self.controller.poll()
        except Exception:  # the link must never take the scheduler down
            logger.exception("Lynx: controller link poll failed; keeping the current policy")
            return result
        return [*result, *messages] if messages else result

    def before_process_input_requests(self, scheduler: Any, recv_reqs: list, *args: Any,
                                      **kwargs: Any) -> tuple[tuple, dict] | None:
        from lynx.sglang_plugin.controller_glue import PolicyMessage

        if self.compiled.background.running:  # every scheduler iteration, steps or not
            self.compiled.collect()
        if not any(isinstance(r, PolicyMessage) for r in recv_reqs):
            return None
        for message in (r for r in recv_reqs if isinstance(r, PolicyMessage)):
            if self.state is not None:
                self.compile_selection(message.policy.name, background=True)
                self.state.stage_policy(message.policy, message.version)
                logger.info("Lynx: staged policy %s v%d (%s)", message.policy.name,
                            message.version, message.reason)
        kept = [r for r in recv_reqs if not isinstance(r, PolicyMessage)]
        return (scheduler, kept, *args), kwargs
