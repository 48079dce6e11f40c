"""The hook functions SGLang calls (thin glue: all math lives in `lynx.selection`)."""

from __future__ import annotations

import logging
import time
from typing import Any

import torch

from lynx.sglang_plugin.config import PluginConfig, default_policy
from lynx.sglang_plugin.selection_glue import STAT_FIELDS, select_for_layer
from lynx.sglang_plugin.step_state import RuntimeState, layout_from_forward_batch

logger = logging.getLogger("lynx.plugin")

_config: PluginConfig | None = None
_state: RuntimeState | None = None
_exporter: Any = None
_unsupported_logged: set[str] = set()


def configure(config: PluginConfig) -> None:
    global _config
    _config = config


def state() -> RuntimeState | None:
    return _state


def exporter() -> Any:
    return _exporter


def _moe_shape(hf_config: Any) -> tuple[int, int, int]:
    text_config = getattr(hf_config, "text_config", None) or hf_config
    experts = getattr(text_config, "num_local_experts", None) or getattr(
        text_config, "num_experts", None) or getattr(text_config, "n_routed_experts", None)
    if not experts:
        raise ValueError(
            f"Lynx: model {getattr(hf_config, 'architectures', '?')} has no routed experts "
            "(num_local_experts / num_experts / n_routed_experts); disable Lynx for it"
        )
    return int(text_config.num_hidden_layers), int(experts), int(text_config.num_experts_per_tok)


def prepare(model_runner: Any) -> RuntimeState:
    """Allocate the process's state from the served model's config (before any graph capture)."""
    global _state, _exporter
    if _state is not None:
        return _state
    assert _config is not None, "lynx plugin not configured"
    layers, experts, top_k = _moe_shape(model_runner.model_config.hf_config)
    policy = _config.policy or default_policy(experts, top_k)
    device = torch.device(model_runner.device)
    _state = RuntimeState(layers, experts, top_k, device, policy)
    _state.stage_policy(policy, 0)  # validates against the model shape (clear error if not)
    from lynx.sglang_plugin.exporter import StatsExporter

    _exporter = StatsExporter(_state, _config, tp_rank=int(getattr(model_runner, "tp_rank", 0)))
    if _config.controller:
        from lynx.sglang_plugin import controller_glue

        model = str(getattr(model_runner.model_config, "model_path", "") or "")
        controller_glue.configure(controller_glue.ControllerGlue(
            _config.controller, _config.replica_id, _config.stale_after_s, _config.safe_policy,
            model=model[-512:]))
    logger.info("Lynx ready: %d layers, %d experts, top-%d, policy %s on %s",
                layers, experts, top_k, policy.name, device)
    return _state


def before_init_cuda_graphs(model_runner: Any, *args: Any, **kwargs: Any) -> None:
    if not getattr(model_runner, "is_draft_worker", False):
        prepare(model_runner)
    return None


def around_model_runner_forward(original: Any, model_runner: Any, forward_batch: Any,
                                *args: Any, **kwargs: Any) -> Any:
    if getattr(model_runner, "is_draft_worker", False):
        return original(model_runner, forward_batch, *args, **kwargs)
    runtime = _state or prepare(model_runner)
    if _exporter is not None:
        _exporter.before_step(runtime)
    layout = layout_from_forward_batch(forward_batch)
    runtime.begin_step(layout)
    start = time.perf_counter()
    try:
        return original(model_runner, forward_batch, *args, **kwargs)
    finally:
        if _exporter is not None:
            _exporter.after_step(runtime, layout, time.perf_counter() - start)
        runtime.step_active = False


def _capturing() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def around_topk_forward(original: Any, topk: Any, hidden_states: torch.Tensor,
                        router_logits: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
    runtime = _state
    if runtime is None or getattr(topk, "is_draft", False) or not (
        runtime.step_active or _capturing()
    ):
        return original(topk, hidden_states, router_logits, *args, **kwargs)
    config = topk.topk_config
    if config.scoring_func not in ("softmax", "sigmoid") or config.custom_routing_function:
        _log_unsupported_once(f"scoring={config.scoring_func}, custom routing function")
        return original(topk, hidden_states, router_logits, *args, **kwargs)
    layer = int(topk.layer_id)
    bias, stats = select_for_layer(runtime, router_logits, config, layer)
    if _exporter is not None:
        _exporter.accumulate(layer, stats)
    if config.correction_bias is not None:
        return _call_with_masked_correction_bias(original, topk, hidden_states, router_logits,
                                                 bias, layer, runtime, *args, **kwargs)
    masked_logits = (router_logits.float() + bias).to(router_logits.dtype)
    output = original(topk, hidden_states, masked_logits, *args, **kwargs)
    if config.scoring_func == "softmax" and not config.renormalize and hasattr(
            output, "topk_weights"):
        output = _restore_gate_mass(output, router_logits, config.top_k, runtime)
    if hasattr(output, "router_logits") and hasattr(output, "_replace"):
        output = output._replace(router_logits=router_logits)
    return output


def _call_with_masked_correction_bias(
    original: Any, topk: Any, hidden_states: torch.Tensor, router_logits: torch.Tensor,
    expert_bias: torch.Tensor, layer: int, runtime: RuntimeState, *args: Any, **kwargs: Any,
) -> Any:
    """Sigmoid + correction-bias routers select by ``score + bias``: masking logits would let a
    masked expert win on its bias alone, so mask the bias. The effective bias lives in a
    per-layer buffer written in place (a captured graph keeps reading the same memory)."""
    config = topk.topk_config
    stock_bias = config.correction_bias
    effective = runtime.effective_bias.get(layer)
    if effective is None or effective.shape != stock_bias.shape:
        effective = runtime.effective_bias[layer] = torch.empty_like(stock_bias)
    effective.copy_(stock_bias + expert_bias.to(stock_bias.dtype))
    config.correction_bias = effective
    try:
        return original(topk, hidden_states, router_logits, *args, **kwargs)
    finally:
        config.correction_bias = stock_bias


def _restore_gate_mass(output: Any, router_logits: torch.Tensor, top_k: int,
                       runtime: RuntimeState) -> Any:
    """renormalize=False routers: keep each pruned row's original top-k gate mass."""
    probs = torch.softmax(router_logits.float(), dim=-1)
    original_mass = probs.topk(top_k, dim=-1).values.sum(-1, keepdim=True)
    weights = output.topk_weights.float()
    kept_mass = weights.sum(-1, keepdim=True).clamp_min(1e-20)
    rows = torch.arange(weights.shape[0], device=weights.device)
    prunable = (rows >= runtime.knobs.prunable_start) & (rows < runtime.knobs.n_valid)
    prunable = prunable & runtime.knobs.enabled
    rescaled = torch.where(prunable[:, None], weights * (original_mass / kept_mass), weights)
    return output._replace(topk_weights=rescaled.to(output.topk_weights.dtype))


def _log_unsupported_once(what: str) -> None:
    if what not in _unsupported_logged:
        _unsupported_logged.add(what)
        logger.warning("Lynx: router kind (%s) not handled by the SGLang glue yet; passing through",
                       what)


__all__ = ["STAT_FIELDS", "around_model_runner_forward", "around_topk_forward", "configure"]
