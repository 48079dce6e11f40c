# ruff: noqa: E501  (the table below is documentation)
"""The plugin's configuration, read once per process from the environment.

| variable | meaning | default |
|---|---|---|
| ``LYNX_ENABLED`` | ``1``/``true``/``yes`` turns the plugin on; otherwise it registers nothing | off |
| ``LYNX_POLICY`` | the start-up policy as JSON (`lynx_protocol.policy.PolicySpec`) | see below |
| ``LYNX_POLICY_FILE`` | path of a JSON file holding the start-up policy (instead of ``LYNX_POLICY``) | — |
| ``LYNX_LADDER_RUNG`` | start on this rung of the checkpoint's ladder, ``<model folder>/lynx_ladder.json`` (``lynx-serve calibrate <model> --ladder --out …``; instead of ``LYNX_POLICY``) | — |
| ``LYNX_CONTROLLER`` | ZMQ endpoint of the policy controller (``ipc://…`` or ``tcp://host:port``) | none |
| ``LYNX_REPLICA_ID`` | name this runtime registers under at the controller | host:pid |
| ``LYNX_CURVE_CLIENT_KEY`` | this runtime's CURVE key pair file (``NAME.key_secret``) for a ``tcp://`` controller | none |
| ``LYNX_CURVE_SERVER_KEY`` | the controller's CURVE public key file (``controller.key``) | none |
| ``LYNX_PLAINTEXT_TCP`` | ``1``: allow a ``tcp://`` controller without CURVE (logged as a warning) | off |
| ``LYNX_STALE_AFTER_S`` | controller silence [s] after which the safe policy applies | 10 |
| ``LYNX_SAFE_POLICY`` | ``keep`` (last good policy) or a JSON policy (default ``off``) | ``{"name":"off"}`` |
| ``LYNX_STATS_INTERVAL_S`` | how often step statistics are exported / sent [s] | 1.0 |
| ``LYNX_COMPILE`` | ``1``: compile the selection step on the CPU (AOTInductor; the start-up policy's graphs before serving, a policy switched to later on its first step; eager with one warning where no C++ compiler exists); ``0``: always eager | ``1`` |
| ``LYNX_COMPILE_CACHE`` | directory keeping the compiled selection packages between processes (`lynx.selection.compiled`; unwritable: compiled without it, one warning) | ``$XDG_CACHE_HOME/lynx/selection`` or ``~/.cache/lynx/selection`` |
| ``LYNX_EP_BALANCE`` | under expert parallelism (``--ep-size`` > 1), ``budget`` tables are spent per EP rank at one level so the busiest rank reads fewer experts (`lynx.selection.ep`); ``0``: one global budget per layer, as without EP | ``1`` |
| ``LYNX_SHADOW`` | shadow mode: serve stock (the start-up policy is ``off`` unless one is set) and measure what each candidate budget would keep, per layer and decode batch bucket (`lynx.sglang_plugin.shadow`): a path writes the sums into that JSON file, and also sends them to the controller when ``LYNX_CONTROLLER`` is set; ``1`` sends them to the controller only (needs ``LYNX_CONTROLLER``); ``0``: off | none |
| ``LYNX_SHADOW_EVERY`` | shadow mode measures one decode step in this many (the recorder costs ~0.6 ms per layer-step in eager torch on this CPU: 10-25% of a qwen3-moe-128 decode step measured every step) | 16 |
| ``LYNX_EVALUATION`` | ``prefill-as-decode``: evaluation mode, never for serving: prefill rows are pruned in groups by token position as decode steps of that many rows, so prompt logprobs measure the policy (`lynx.sglang_plugin.evaluation`; needs ``--disable-radix-cache``; ``lynx-serve calibrate --server`` uses it) | off |
| ``LYNX_APPLY_LOG`` | file every scheduler process appends a JSON line to per policy applied (``tp_rank``, ``dp_rank``, ``version``, ``step``): the TP ranks' same-step evidence | none |

The start-up policy: ``LYNX_POLICY``, ``LYNX_POLICY_FILE`` or ``LYNX_LADDER_RUNG`` if set (one
of them); else, when the served model is a local folder, the start rung of its ladder
(``<model folder>/lynx_ladder.json`` with a ``threshold``, as ``lynx-serve calibrate <model>
--ladder`` writes it: the furthest rung within it), else its calibrated table,
``<model folder>/lynx_policy.json`` (``lynx-serve calibrate <model> --out
<model>/lynx_policy.json``); else the conservative `default_policy` for the model's shape.

Bad values raise `LynxConfigError` with a one-line reason; the scheduler refuses to start rather
than silently serving a policy nobody asked for.
"""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lynx_protocol.policy import BudgetBucket, PolicyError, PolicySpec, decode_policy_json

TRUE_VALUES = ("1", "true", "yes", "on")
FALSE_VALUES = ("0", "false", "no", "off")
EVALUATION_MODE = "prefill-as-decode"  # LYNX_EVALUATION's one value (`evaluation`)


def default_policy(num_experts: int, top_k: int) -> PolicySpec:
    """The default operating point for a model shape (a conservative one, for any checkpoint).

    ``budget``; no pruning below 4 decode rows (little to gain there); above, at most
    max(2*top_k + 1, E/2) experts per layer (at most E), with every token's top-1 expert kept
    on top of that. E/2 is what keeps every reference model within 2% held-out perplexity and
    1 point exact match at batch 4..64 (`test/test_default_quality.py`): E/4, the earlier
    default, cost +2.4..4.5% on qwen3-moe-128 (E=128, k=8) and +3.3% on qwen3-moe-mini at
    batch 16. The floor 2k + 1 (was 2k) matters only where E <= 4k + 1 (Mixtral's 8 experts, top
    2: 5 instead of 4): through bf16 servers at 32 requests in flight, the lm-eval gate
    measured -1.17 +/- 0.67 points on mixtral-mini's 3-digit additions at 4 of 8 (a fail at 1
    point; policy off against stock: identical) and +0.00 at 5 (`benchmark/eval_gate.py`).
    Faster operating points come from the controller or a calibrated table.
    """
    budget = min(max(num_experts, 1), max(2 * top_k + 1, num_experts // 2))
    return PolicySpec(
        name="budget",
        budgets=[
            BudgetBucket(max_batch=3, all_layers=max(num_experts, 1)),
            BudgetBucket(max_batch=1_000_000, all_layers=budget),
        ],
    )


def moe_shape(hf_config: Any) -> tuple[int, int, int]:
    """(layers, routed experts, routed top_k) of a Hugging Face config; ValueError if the
    model has no routed experts."""
    text_config = getattr(hf_config, "text_config", None) or hf_config
    experts = getattr(text_config, "num_local_experts", None) or getattr(
        text_config, "num_experts", None) or getattr(text_config, "n_routed_experts", None)
    if not experts:
        raise ValueError(
            f"Lynx: model {getattr(hf_config, 'architectures', '?')} has no routed experts "
            "(num_local_experts / num_experts / n_routed_experts); disable Lynx for it"
        )
    return int(text_config.num_hidden_layers), int(experts), int(text_config.num_experts_per_tok)


class LynxConfigError(ValueError):
    """Invalid Lynx configuration; the message names the variable and the problem."""


CHECKPOINT_POLICY = "lynx_policy.json"
CHECKPOINT_LADDER = "lynx_ladder.json"
NO_PRUNING_BELOW = 4  # decode rows; as `default_policy` and the calibrated tables


def ladder_rung_policy(model_path: str, rung: str | None, num_layers: int, num_experts: int
                       ) -> tuple[PolicySpec, Path] | None:
    """Rung ``rung`` of the ladder shipped in a local checkpoint folder
    (``<model>/lynx_ladder.json``) as a start-up policy (the ladder's batch rule, no pruning
    below `NO_PRUNING_BELOW` rows) and the ladder's path. ``rung`` None: the ladder's
    `start_rung` (the furthest within its ``threshold``), and None when the folder ships no
    ladder or its ladder sets no threshold. Raises `LynxConfigError` (naming the file) when a
    named rung's ladder is missing, or the ladder is damaged, made for another shape, or lacks
    the rung."""
    from lynx_protocol.ladder import (
        LadderError,
        batch_rule_edges,
        decode_ladder,
        rung_policy,
        start_rung,
        validate_ladder,
    )

    path = Path(model_path) / CHECKPOINT_LADDER
    if not model_path or not path.is_file():
        if rung is None:
            return None
        where = model_path or "no local folder"
        raise LynxConfigError(f"LYNX_LADDER_RUNG={rung}: the served model ({where}) ships no "
                              f"{CHECKPOINT_LADDER}")
    try:
        try:
            raw = path.read_bytes()
        except OSError as exc:
            raise LadderError(f"{path}: cannot read: {exc.strerror}") from None
        ladder = decode_ladder(raw, where=str(path))
        name = rung
        if name is None:
            start = start_rung(ladder)
            if start is None:
                return None
            name = start.name
        validate_ladder(ladder, where=str(path), num_layers=num_layers,
                        num_experts=num_experts)
        return rung_policy(ladder, name, batch_rule_edges(ladder, NO_PRUNING_BELOW),
                           NO_PRUNING_BELOW), path
    except LadderError as exc:
        message = str(exc)
        raise LynxConfigError(message if str(path) in message else f"{path}: {message}"
                              ) from None


def checkpoint_policy(model_path: str) -> tuple[PolicySpec, Path] | None:
    """The calibrated start-up policy shipped in a local checkpoint folder
    (``<model>/lynx_policy.json``, as ``lynx-serve calibrate <model> --out`` writes it) and its
    path; None when there is none (e.g. a hub id). ``LYNX_POLICY`` / ``LYNX_POLICY_FILE`` take
    precedence. Raises `LynxConfigError` when the file is unreadable or not a policy."""
    path = Path(model_path) / CHECKPOINT_POLICY if model_path else None
    if path is None or not path.is_file():
        return None
    try:
        raw = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise LynxConfigError(f"{path}: cannot read the checkpoint's policy: {exc.strerror}"
                              ) from None
    return _policy_from(f"{path} (the checkpoint's calibrated policy)", raw), path


@dataclass(frozen=True)
class PluginConfig:
    enabled: bool
    policy: PolicySpec | None  # None: `default_policy` for the served model's shape
    controller: str | None
    replica_id: str
    stale_after_s: float
    safe_policy: PolicySpec | None  # None: keep the last good policy
    stats_interval_s: float
    apply_log: Path | None = None
    curve_client_key: str = ""
    curve_server_key: str = ""
    plaintext_tcp: bool = False
    time_moe: bool = False  # LYNX_TIME_MOE: benchmark instrument (`moe_timer`)
    compile: bool = True  # LYNX_COMPILE: `lynx.selection.compiled` on the CPU
    compile_cache: Path | None = None  # LYNX_COMPILE_CACHE (None: the default directory)
    ladder_rung: str = ""  # LYNX_LADDER_RUNG: start on this rung of the checkpoint's ladder
    ep_balance: bool = True  # LYNX_EP_BALANCE: budget per EP rank under expert parallelism
    shadow: Path | None = None  # LYNX_SHADOW=<file>: shadow statistics file (`shadow`)
    shadow_link: bool = False  # LYNX_SHADOW=1: shadow mode, statistics to the controller only
    shadow_every: int = 16  # LYNX_SHADOW_EVERY: one decode step measured in this many
    evaluation: bool = False  # LYNX_EVALUATION=prefill-as-decode (`evaluation`)
    step_trace: Path | None = None  # LYNX_STEP_TRACE=<file>: benchmark instrument (`step_trace`)

    @property
    def shadow_on(self) -> bool:
        """Shadow mode, with a file, to the controller, or both."""
        return self.shadow is not None or self.shadow_link


def plugin_enabled(env: Mapping[str, str] = os.environ) -> bool:
    return env.get("LYNX_ENABLED", "").strip().lower() in TRUE_VALUES


def _policy_from(name: str, raw: str) -> PolicySpec:
    try:
        return decode_policy_json(raw)
    except PolicyError as exc:
        raise LynxConfigError(f"{name}: {exc}") from None


def _positive_float(env: Mapping[str, str], name: str, default: float) -> float:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise LynxConfigError(f"{name}={raw!r} is not a number") from None
    if not value > 0:
        raise LynxConfigError(f"{name}={raw!r} must be > 0")
    return value


def _switch(env: Mapping[str, str], name: str, *, default: bool) -> bool:
    raw = env.get(name, "").strip().lower()
    if raw == "":
        return default
    if raw not in {*TRUE_VALUES, *FALSE_VALUES}:
        raise LynxConfigError(f"{name}={raw!r}: expected 1 or 0")
    return raw in TRUE_VALUES


def _check_file_in_a_directory(name: str, path: Path | None) -> None:
    """LynxConfigError unless ``path`` (when set) can be a file the plugin writes."""
    if path is not None and (path.is_dir() or not path.parent.is_dir()):
        raise LynxConfigError(f"{name}={path}: expected a file in an existing directory")


def load_config(env: Mapping[str, str] = os.environ) -> PluginConfig:
    enabled = plugin_enabled(env)
    chosen = [n for n in ("LYNX_POLICY", "LYNX_POLICY_FILE", "LYNX_LADDER_RUNG") if env.get(n)]
    if len(chosen) > 1:
        raise LynxConfigError(f"set one of LYNX_POLICY, LYNX_POLICY_FILE, LYNX_LADDER_RUNG, "
                              f"not {' and '.join(chosen)}")
    policy: PolicySpec | None = None
    if env.get("LYNX_POLICY"):
        policy = _policy_from("LYNX_POLICY", env["LYNX_POLICY"])
    elif env.get("LYNX_POLICY_FILE"):
        path = Path(env["LYNX_POLICY_FILE"])
        try:
            raw = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise LynxConfigError(f"LYNX_POLICY_FILE: cannot read {path}: {exc.strerror}") from None
        policy = _policy_from(f"LYNX_POLICY_FILE ({path})", raw)
    controller = env.get("LYNX_CONTROLLER") or None
    if controller is not None and not controller.startswith(("ipc://", "tcp://")):
        raise LynxConfigError(f"LYNX_CONTROLLER={controller!r}: expected ipc://PATH or tcp://HOST:PORT")
    client_key, server_key = env.get("LYNX_CURVE_CLIENT_KEY", ""), env.get(
        "LYNX_CURVE_SERVER_KEY", "")
    if bool(client_key) != bool(server_key):
        raise LynxConfigError("set both LYNX_CURVE_CLIENT_KEY and LYNX_CURVE_SERVER_KEY, or neither")
    for name, path in (("LYNX_CURVE_CLIENT_KEY", client_key), ("LYNX_CURVE_SERVER_KEY", server_key)):
        if path and not Path(path).is_file():
            raise LynxConfigError(f"{name}: no such file {path}")
    plaintext = env.get("LYNX_PLAINTEXT_TCP", "").strip().lower() in TRUE_VALUES
    if controller is not None and controller.startswith("tcp://") and not (client_key or plaintext):
        raise LynxConfigError(f"LYNX_CONTROLLER={controller}: a tcp:// controller needs CURVE keys "
                              "(LYNX_CURVE_CLIENT_KEY, LYNX_CURVE_SERVER_KEY) or LYNX_PLAINTEXT_TCP=1")
    time_moe = _switch(env, "LYNX_TIME_MOE", default=False)
    cache = Path(env["LYNX_COMPILE_CACHE"]) if env.get("LYNX_COMPILE_CACHE", "").strip() else None
    if cache is not None and cache.exists() and not cache.is_dir():
        raise LynxConfigError(f"LYNX_COMPILE_CACHE={cache}: exists and is not a directory")
    shadow_raw = env.get("LYNX_SHADOW", "").strip()
    shadow_link = shadow_raw.lower() in TRUE_VALUES
    if shadow_link and controller is None:
        raise LynxConfigError(f"LYNX_SHADOW={shadow_raw}: sends shadow statistics to the "
                              "controller; set LYNX_CONTROLLER, or give a file to write them to")
    shadow = (None if shadow_link or shadow_raw.lower() in ("", *FALSE_VALUES)
              else Path(shadow_raw))
    _check_file_in_a_directory("LYNX_SHADOW", shadow)
    every = env.get("LYNX_SHADOW_EVERY", "").strip() or "16"
    if not re.fullmatch(r"[0-9]{1,7}", every) or not 1 <= int(every) <= 1_000_000:
        raise LynxConfigError(f"LYNX_SHADOW_EVERY={every!r}: expected an integer in "
                              "[1, 1000000] (measure one decode step in this many)")
    evaluation = env.get("LYNX_EVALUATION", "").strip()
    if evaluation not in ("", EVALUATION_MODE):
        raise LynxConfigError(f"LYNX_EVALUATION={evaluation!r}: the only evaluation mode is "
                              f"{EVALUATION_MODE!r} (never for serving)")
    trace_raw = env.get("LYNX_STEP_TRACE", "").strip()
    step_trace = Path(trace_raw) if trace_raw else None
    _check_file_in_a_directory("LYNX_STEP_TRACE", step_trace)
    safe_raw = env.get("LYNX_SAFE_POLICY", '{"name": "off"}')
    safe_policy = None if safe_raw.strip() == "keep" else _policy_from("LYNX_SAFE_POLICY", safe_raw)
    return PluginConfig(
        enabled=enabled,
        policy=policy,
        controller=controller,
        replica_id=env.get("LYNX_REPLICA_ID") or f"{socket.gethostname()}:{os.getpid()}",
        stale_after_s=_positive_float(env, "LYNX_STALE_AFTER_S", 10.0),
        safe_policy=safe_policy,
        stats_interval_s=_positive_float(env, "LYNX_STATS_INTERVAL_S", 1.0),
        apply_log=Path(env["LYNX_APPLY_LOG"]) if env.get("LYNX_APPLY_LOG") else None,
        curve_client_key=client_key, curve_server_key=server_key, plaintext_tcp=plaintext,
        time_moe=time_moe, compile=_switch(env, "LYNX_COMPILE", default=True),
        compile_cache=cache, ladder_rung=env.get("LYNX_LADDER_RUNG", "").strip(),
        ep_balance=_switch(env, "LYNX_EP_BALANCE", default=True), shadow=shadow,
        shadow_link=shadow_link, evaluation=bool(evaluation),
        shadow_every=int(every), step_trace=step_trace,
    )
