"""Lynx's SGLang plugin: the one extension point, entry point ``sglang.srt.plugins: lynx``.

Contract of `install` (called by SGLang's ``load_plugins()`` in every process it starts; it
builds one `LynxRuntime`, the plugin's only state, and registers its bound methods):
- ``LYNX_ENABLED`` not set to 1/true/yes: registers nothing; SGLang runs stock.
- enabled: validates the configuration (`lynx.sglang_plugin.config`); a bad value stops the
  process with ``SystemExit`` and a one-line reason (SGLang swallows ordinary exceptions from
  plugins, which would silently serve stock SGLang). Then registers HookRegistry hooks:
  AROUND ``TopK.forward_native|forward_cuda|forward_cpu`` (prune decode rows per output
  format, see `lynx.sglang_plugin.formats`),
  AROUND ``ModelRunner.forward`` (per-step state: forward mode, real rows, decode rows, knobs),
  BEFORE ``ModelRunner.init_cuda_graphs`` (allocate device knobs before any graph capture),
  AROUND SGLang's batch-1 torch-compile MoE (``fused_moe_forward_native``: under expert
  parallelism it wrapped the other ranks' -1 ids to its last expert; see
  `lynx.cpu_compat.moe_native`).
SGLang applies the hooks right after all plugins ran. ``SGLANG_PLUGINS`` (a whitelist of entry
point names) is honoured by SGLang itself: leave ``lynx`` out of it and nothing is registered.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from lynx.sglang_plugin.config import LynxConfigError, load_config, plugin_enabled

if TYPE_CHECKING:
    from lynx.sglang_plugin.runtime import LynxRuntime

logger = logging.getLogger("lynx.plugin")

TOPK_TARGETS = {
    "sglang.srt.layers.moe.topk.TopK.forward_native": "native",
    "sglang.srt.layers.moe.topk.TopK.forward_cuda": "cuda",
    "sglang.srt.layers.moe.topk.TopK.forward_cpu": "cpu",
}
MODEL_RUNNER = "sglang.srt.model_executor.model_runner.ModelRunner"
FORWARD_BATCH_INIT = "sglang.srt.model_executor.forward_batch_info.ForwardBatch.init_new"
RECEIVER_PULL = ("sglang.srt.managers.scheduler_components.request_receiver."
                 "SchedulerRequestReceiver._pull_raw_reqs")
SCHEDULER_INPUT = "sglang.srt.managers.scheduler.Scheduler.process_input_requests"


def install() -> LynxRuntime | None:
    """Build this process's `LynxRuntime` and register its hooks (idempotent: a second call
    in the same process registers nothing and returns the runtime already registered)."""
    if not plugin_enabled():
        return None
    try:
        config = load_config()
    except LynxConfigError as exc:
        # SGLang's load_plugins logs and swallows exceptions, which would serve stock SGLang
        # while the operator asked for Lynx. SystemExit is not swallowed: refuse to start.
        logger.error("lynx: invalid configuration: %s", exc)
        raise SystemExit(f"lynx: invalid configuration: {exc}") from None
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    from lynx.sglang_plugin.runtime import LynxRuntime
    from lynx.sglang_plugin.step_state import around_forward_batch_init

    existing = registered_runtime()
    if existing is not None:
        return existing
    runtime = LynxRuntime(config)
    for target, path in TOPK_TARGETS.items():
        HookRegistry.register(target, runtime.topk_hook(path), HookType.AROUND)
    HookRegistry.register(f"{MODEL_RUNNER}.forward", runtime.around_model_runner_forward,
                          HookType.AROUND)
    HookRegistry.register(f"{MODEL_RUNNER}.init_cuda_graphs", runtime.before_init_cuda_graphs,
                          HookType.BEFORE)
    HookRegistry.register(FORWARD_BATCH_INIT, around_forward_batch_init,
                          HookType.AROUND)  # a mixed step's decode rows, as SGLang counted them
    from lynx.cpu_compat.moe_native import register_compile_path

    register_compile_path()  # EP: SGLang's batch-1 compiled MoE would wrap -1 ids silently
    if config.controller:
        HookRegistry.register(RECEIVER_PULL, runtime.after_pull_raw_reqs, HookType.AFTER)
        HookRegistry.register(SCHEDULER_INPUT, runtime.before_process_input_requests,
                              HookType.BEFORE)
    logger.info("Lynx plugin installed (policy=%s, controller=%s)",
                config.policy.name if config.policy else "default", config.controller or "none")
    return runtime


def registered_runtime() -> LynxRuntime | None:
    """The `LynxRuntime` whose hooks HookRegistry holds in this process, if any."""
    from sglang.srt.plugins.hook_registry import HookRegistry

    from lynx.sglang_plugin.runtime import LynxRuntime

    for _type, hook, _source in HookRegistry._hooks.get(f"{MODEL_RUNNER}.forward", []):
        owner = getattr(hook, "__self__", None)
        if isinstance(owner, LynxRuntime):
            return owner
    return None


def hooks_applied() -> bool:
    """True when every Lynx target is wrapped (HookRegistry only logs failures)."""
    import pkgutil

    targets = [*TOPK_TARGETS, f"{MODEL_RUNNER}.forward"]
    for target in targets:
        owner, attr = target.rsplit(".", 1)
        if not hasattr(getattr(pkgutil.resolve_name(owner), attr), "__wrapped__"):
            return False
    return True
