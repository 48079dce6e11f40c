"""Lynx's SGLang plugin: the one extension point, entry point ``sglang.srt.plugins: lynx``.

Contract of `install` (called by SGLang's ``load_plugins()`` in every process it starts):
- ``LYNX_ENABLED`` not set to 1/true/yes: registers nothing; SGLang runs stock.
- enabled: validates the configuration (`lynx.sglang_plugin.config`); a bad value stops the
  process with ``SystemExit`` and a one-line reason (SGLang swallows ordinary exceptions from
  plugins, which would silently serve stock SGLang). Then registers HookRegistry hooks:
  AROUND ``TopK.forward_native|forward_cuda|forward_cpu`` (mask the router logits of prunable rows),
  AROUND ``ModelRunner.forward`` (per-step state: forward mode, real rows, decode rows, knobs),
  BEFORE ``ModelRunner.init_cuda_graphs`` (allocate device knobs before any graph capture).
SGLang applies the hooks right after all plugins ran. ``SGLANG_PLUGINS`` (a whitelist of entry
point names) is honoured by SGLang itself: leave ``lynx`` out of it and nothing is registered.
"""

from __future__ import annotations

import logging

from lynx.sglang_plugin.config import LynxConfigError, load_config, plugin_enabled

logger = logging.getLogger("lynx.plugin")

TOPK_TARGETS = (
    "sglang.srt.layers.moe.topk.TopK.forward_native",
    "sglang.srt.layers.moe.topk.TopK.forward_cuda",
    "sglang.srt.layers.moe.topk.TopK.forward_cpu",
)
MODEL_RUNNER = "sglang.srt.model_executor.model_runner.ModelRunner"
RECEIVER_PULL = ("sglang.srt.managers.scheduler_components.request_receiver."
                 "SchedulerRequestReceiver._pull_raw_reqs")
SCHEDULER_INPUT = "sglang.srt.managers.scheduler.Scheduler.process_input_requests"

_installed = False


def install() -> None:
    global _installed
    if not plugin_enabled() or _installed:
        return
    try:
        config = load_config()
    except LynxConfigError as exc:
        # SGLang's load_plugins logs and swallows exceptions, which would serve stock SGLang
        # while the operator asked for Lynx. SystemExit is not swallowed: refuse to start.
        logger.error("lynx: invalid configuration: %s", exc)
        raise SystemExit(f"lynx: invalid configuration: {exc}") from None
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    from lynx.sglang_plugin import hooks

    hooks.configure(config)
    for target in TOPK_TARGETS:
        HookRegistry.register(target, hooks.around_topk_forward, HookType.AROUND)
    HookRegistry.register(f"{MODEL_RUNNER}.forward", hooks.around_model_runner_forward,
                          HookType.AROUND)
    HookRegistry.register(f"{MODEL_RUNNER}.init_cuda_graphs", hooks.before_init_cuda_graphs,
                          HookType.BEFORE)
    if config.controller:
        from lynx.sglang_plugin import controller_glue

        HookRegistry.register(RECEIVER_PULL, controller_glue.after_pull_raw_reqs, HookType.AFTER)
        HookRegistry.register(SCHEDULER_INPUT, controller_glue.before_process_input_requests,
                              HookType.BEFORE)
    _installed = True
    logger.info("Lynx plugin installed (policy=%s, controller=%s)",
                config.policy.name if config.policy else "default", config.controller or "none")


def hooks_applied() -> bool:
    """True when every Lynx target is wrapped (HookRegistry only logs failures)."""
    import pkgutil

    targets = [*TOPK_TARGETS, f"{MODEL_RUNNER}.forward"]
    for target in targets:
        owner, attr = target.rsplit(".", 1)
        if not hasattr(getattr(pkgutil.resolve_name(owner), attr), "__wrapped__"):
            return False
    return True
