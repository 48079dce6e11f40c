"""The CPU engine's SGLang hooks: entry point ``sglang.srt.plugins: lynx_cpu_compat``.

Active only with ``SGLANG_USE_CPU_ENGINE=1`` (and ``LYNX_CPU_COMPAT`` not 0), independent of
``LYNX_ENABLED``: they make stock SGLang run on this CPU, Lynx or not.
- `verify_attention`: tree attention for speculative (NGRAM) verify steps;
- `moe_native`: the native MoE paths with non-local (-1) expert ids, so ``--ep-size`` serves;
- `decode_attention`: the torch-native backend's decode attention in one batched call instead
  of a loop over the requests;
- `shared_gate`: Qwen2-MoE's gated shared expert in torch (SGLang calls a Triton kernel).
"""

from __future__ import annotations

import logging
import os
from typing import Any

logger = logging.getLogger("lynx.cpu_compat")


def register_once(target: str, hook: Any) -> None:
    """AROUND ``hook`` on ``target`` with SGLang's HookRegistry, unless a hook of that name is
    already registered there (plugins may install more than once per process)."""
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    if not any(getattr(h, "__name__", "") == hook.__name__
               for _t, h, _s in HookRegistry._hooks.get(target, [])):
        HookRegistry.register(target, hook, HookType.AROUND)


def install() -> None:
    """SGLang plugin entry point: register the CPU engine's hooks (no-op elsewhere)."""
    if os.environ.get("SGLANG_USE_CPU_ENGINE", "0") != "1" or \
            os.environ.get("LYNX_CPU_COMPAT", "1") == "0":
        return
    from lynx.cpu_compat import decode_attention, moe_native, shared_gate, verify_attention

    verify_attention.register()
    moe_native.register()
    decode_attention.register()
    shared_gate.register()
    logger.info("Lynx CPU compat: speculative verify attention, expert-parallel native MoE "
                "(-1 expert ids), batched decode attention and Qwen2-MoE's shared-expert gate "
                "registered")
