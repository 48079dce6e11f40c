"""Start-up helpers of `LynxRuntime.prepare`: the model's selection graphs to compile, and the
``LYNX_APPLY_LOG`` writer."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from lynx.sglang_plugin.formats import plan_layer
from lynx.sglang_plugin.step_state import RuntimeState


def selection_graph_keys(model_runner: Any, state: RuntimeState, ep_layout: tuple[int, bool]
                         ) -> list[Any]:
    """One `GraphKey` per distinct router of the model's TopK layers, in the model's dtype
    (the policy field is filled in by `LynxRuntime.compile_selection`); ``ep_layout``:
    `plan_layer`'s EP arguments."""
    from sglang.srt.layers.moe.topk import TopK

    from lynx.selection.compiled import GraphKey

    dtype = getattr(model_runner.model_config, "dtype", torch.float32)
    keys = []
    for module in model_runner.model.modules():
        if isinstance(module, TopK):
            plan = plan_layer(module, "native", *ep_layout)
            if plan.router is not None:  # CPU paths are STANDARD: SGLang's ids go in
                keys.append(GraphKey("", plan.router, state.num_experts, dtype,
                                     plan.router.has_correction_bias, False, True))
    return list(dict.fromkeys(keys))


def apply_logger(path: Path, labels: dict[str, Any]) -> Callable[[Any, int, int], None]:
    """`RuntimeState.on_apply` for ``LYNX_APPLY_LOG``: appends this rank's ``labels``, pid,
    version, step and policy name as one JSON line per policy applied."""

    def log_apply(policy: Any, version: int, step: int) -> None:
        record = {**labels, "pid": os.getpid(), "version": version, "step": step,
                  "policy": policy.name}
        with path.open("a", encoding="utf-8") as log:
            log.write(json.dumps(record) + "\n")

    return log_apply
