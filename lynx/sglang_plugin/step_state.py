"""Per-process runtime state: the applied policy, its device knobs and the per-step row layout.

Host side (`StepLayout`, `RuntimeState.begin_step`) runs once per forward in the
``ModelRunner.forward`` hook; device side (`DeviceKnobs`) is what the TopK hook's static-shape
math reads, so a CUDA graph captured once keeps following knob changes (``fill_``/``copy_``
into preallocated tensors; no recapture).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from lynx.selection.policies import POLICY_NAMES, SelectionKnobs
from lynx.selection.speculative import draft_depths, verify_row_weights
from lynx_protocol.policy import PolicySpec, bucket_for

NO_LIMIT = 1 << 30
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)  # decode rows, inclusive upper bounds
# decode buckets, "above the last edge", mixed steps, speculative verify steps
STAT_SLOTS = len(BATCH_BUCKETS) + 3
MIXED_SLOT = STAT_SLOTS - 2
VERIFY_SLOT = STAT_SLOTS - 1


MIXED_DECODE_ROWS = "lynx_mixed_decode_rows"
"""Attribute the plugin sets on a mixed step's ForwardBatch: SGLang's running decode requests
mixed into it (``len(batch.decoding_reqs)``)."""


def batch_slot(n_decode_rows: int) -> int:
    """Index of the decode batch-size bucket (len(BATCH_BUCKETS): above the last edge)."""
    return next((i for i, b in enumerate(BATCH_BUCKETS) if n_decode_rows <= b),
                len(BATCH_BUCKETS))


@dataclass(frozen=True)
class StepLayout:
    """Rows of one forward: ``[0, prunable_start)`` never pruned, ``[prunable_start, n_valid)``
    are decode rows that may be pruned, rows ``>= n_valid`` are padding. A verify step's rows
    are its requests' draft tokens, ``draft_tokens`` per request, with their vote weights
    (`lynx.selection.speculative`); they are prunable only under ``prune_verify``."""

    mode: str  # "decode" | "mixed" | "prefill" | "verify" | "draft" | "idle"
    n_valid: int
    prunable_start: int
    draft_tokens: int = 0
    row_weight: torch.Tensor | None = None  # [n_valid] fp32, verify steps only

    @property
    def n_decode_rows(self) -> int:
        return max(self.n_valid - self.prunable_start, 0)


def layout_from_forward_batch(forward_batch: object) -> StepLayout:
    """Read the row layout of an SGLang ``ForwardBatch`` (no device sync)."""
    mode = forward_batch.forward_mode  # type: ignore[attr-defined]
    if mode.is_idle():
        return StepLayout("idle", 0, 0)
    if mode.is_decode():
        n = int(forward_batch.batch_size)  # type: ignore[attr-defined]
        return StepLayout("decode", n, 0)
    if mode.is_target_verify():
        return verify_layout(forward_batch)
    if mode.is_draft_extend_v2():  # EAGLE's draft model extending (its own steps)
        return StepLayout("draft", 0, 0)
    lens = getattr(forward_batch, "extend_seq_lens_cpu", None) or []
    total = int(sum(lens))
    if mode.is_mixed():
        # mix_with_running appends the running decode requests last, one token each; how
        # many, SGLang's batch says (`around_forward_batch_init`). Without it, the
        # trailing one-token rows, which also take in a prefill chunk of one token that
        # precedes them (one prompt token of 152 read as a decode row, and pruned, in
        # test_e2e_step_trace): kept as the fallback of a ForwardBatch built elsewhere.
        n_decode = getattr(forward_batch, MIXED_DECODE_ROWS, None)
        if n_decode is None:
            n_decode = 0
            for length in reversed(lens):
                if length != 1:
                    break
                n_decode += 1
        n_decode = min(int(n_decode), len(lens))
        return StepLayout("mixed", total, total - n_decode)
    return StepLayout("prefill", total, total)


def around_forward_batch_init(original: Any, cls: Any, batch: Any, *args: Any,
                              **kwargs: Any) -> Any:
    """``ForwardBatch.init_new``: a mixed step's ForwardBatch gets the number of running
    decode requests SGLang mixed in (`MIXED_DECODE_ROWS`; SGLang's AROUND hook on the
    classmethod: ``original(cls, batch, model_runner, ...)``); its row lengths
    alone cannot tell a one-token prefill chunk from a decode row. Only when they are
    the batch's last requests, as ``mix_with_running`` appends them; else 0 (nothing
    pruned): a copy of a mixed batch with other rows (SGLang's encoder-SWA replay keeps
    the mode and ``decoding_reqs`` but holds prompt rows only) must not prune those."""
    forward_batch = original(cls, batch, *args, **kwargs)
    decoding = getattr(batch, "decoding_reqs", None)
    if decoding is not None and forward_batch.forward_mode.is_mixed():
        reqs = list(getattr(batch, "reqs", None) or ())
        n = len(decoding)
        ours = 0 < n <= len(reqs) and all(a is b for a, b in zip(reqs[-n:], decoding, strict=True))
        setattr(forward_batch, MIXED_DECODE_ROWS, n if ours else 0)
    return forward_batch


def verify_layout(forward_batch: object) -> StepLayout:
    """Layout of a TARGET_VERIFY step: R requests x n draft rows, weighted per request by
    draft depth (uniform when the spec info carries no positions)."""
    spec = forward_batch.spec_info  # type: ignore[attr-defined]
    n = int(getattr(spec, "draft_token_num", 0) or 0)
    requests = int(forward_batch.batch_size)  # type: ignore[attr-defined]
    rows = requests * n
    if n < 1:
        return StepLayout("verify", 0, 0)
    positions = getattr(spec, "positions", None)
    seq_lens = forward_batch.seq_lens  # type: ignore[attr-defined]
    if positions is not None and positions.numel() == rows and seq_lens.numel() == requests:
        depths = draft_depths(positions, seq_lens, n)
    else:
        depths = torch.zeros(rows, dtype=torch.int64, device=seq_lens.device)
    return StepLayout("verify", rows, 0, n, verify_row_weights(depths, n))


class DeviceKnobs:
    """Preallocated device tensors the selection math reads (never reallocated)."""

    def __init__(self, num_layers: int, device: torch.device) -> None:
        def scalar(value: float | int, dtype: torch.dtype) -> torch.Tensor:
            return torch.tensor(value, dtype=dtype, device=device)

        self.budget = torch.full((num_layers,), NO_LIMIT, dtype=torch.int64, device=device)
        self.enabled = scalar(False, torch.bool)
        self.alpha = scalar(3.0, torch.float32)
        self.beta = scalar(2.0, torch.float32)
        self.k0 = scalar(1, torch.int64)
        self.n_valid = scalar(0, torch.int64)
        self.prunable_start = scalar(0, torch.int64)
        # index into lynx.selection's POLICY_NAMES, the table ``by_code`` reads
        self.policy_code = scalar(0, torch.int64)
        self.coverage = scalar(0.9, torch.float32)
        self.shadow_on = scalar(False, torch.bool)  # shadow mode measures this step
        # statistics slot of this step (batch-size bucket, or MIXED_SLOT): a device index, so
        # a captured graph accumulates each step's statistics into the right bucket
        self.stat_slot = torch.zeros(1, dtype=torch.int64, device=device)
        self._per_layer = [SelectionKnobs(self.enabled, self.budget[layer], self.alpha,
                                          self.beta, self.k0, self.policy_code, self.coverage)
                           for layer in range(num_layers)]

    def for_layer(self, layer: int) -> SelectionKnobs:
        """The library's knob tuple for one layer (views of these tensors, built once)."""
        return self._per_layer[layer]


class RuntimeState:
    """The scheduler process's Lynx state (one per process; TP ranks each own one)."""

    def __init__(self, num_layers: int, num_experts: int, top_k: int,
                 device: torch.device, policy: PolicySpec) -> None:
        self.num_layers = num_layers
        self.num_experts = num_experts
        self.top_k = top_k
        self.device = device
        self.knobs = DeviceKnobs(num_layers, device)
        self.lock = threading.Lock()  # guards staged policy (set from the controller link)
        self.policy = policy
        self.policy_version = 0
        self._staged: tuple[PolicySpec, int] | None = None
        # Captured CUDA graphs bake Python constants in: there the selection picks the policy
        # on the device (``by_code`` reading ``knobs.policy_code``), so a controller's policy
        # switch reaches a replayed graph. Eager CPU steps use the named policy (cheaper).
        self.graph_safe = device.type == "cuda"
        self.step_active = False
        self.shadow = False  # shadow mode: decode steps are measured (`sglang_plugin.shadow`)
        self.shadow_every = 1  # one decode step in this many
        self.decode_steps = 0  # decode forwards seen (what shadow mode samples from)
        self.shadow_step = False  # this step is measured
        self.layout = StepLayout("idle", 0, 0)
        self.row_weight: torch.Tensor | None = None  # [rows] verify steps' vote weights
        self.step_index = 0  # forwards seen; equal on every TP rank of a replica
        # (version, step_index) of every policy applied, in order: TP ranks must agree
        self.applied: list[tuple[int, int]] = []
        self.on_apply: Callable[[PolicySpec, int, int], None] | None = None
        self._apply(policy, 0)

    # -- policy -----------------------------------------------------------------------------
    def stage_policy(self, policy: PolicySpec, version: int) -> None:
        """Stage a policy already validated at a trust boundary (the runtime link, or the
        start-up config); it takes effect at the start of the next step."""
        with self.lock:
            self._staged = (policy, version)

    def _apply(self, policy: PolicySpec, version: int) -> None:
        self.policy = policy
        self.policy_version = version
        self.applied.append((version, self.step_index))
        if self.on_apply is not None:
            self.on_apply(policy, version, self.step_index)
        self.knobs.policy_code.fill_(POLICY_NAMES.index(policy.name))
        self.knobs.alpha.fill_(policy.alpha)
        self.knobs.beta.fill_(float(policy.beta))
        self.knobs.k0.fill_(policy.k0)
        self.knobs.coverage.fill_(policy.coverage)

    def budget_row(self, n_decode_rows: int) -> list[int]:
        bucket = bucket_for(self.policy, n_decode_rows)
        if bucket is None:
            return [NO_LIMIT] * self.num_layers
        return [min(bucket.budget_for_layer(i), NO_LIMIT) for i in range(self.num_layers)]

    # -- per step ---------------------------------------------------------------------------
    def begin_step(self, layout: StepLayout) -> bool:
        """Apply a staged policy and write this step's knobs; returns whether rows get pruned."""
        self.step_index += 1
        with self.lock:
            staged, self._staged = self._staged, None
        if staged is not None:
            self._apply(*staged)
        prune = self.policy.name != "off" and layout.n_decode_rows > 0 and (
            layout.mode == "decode" or (layout.mode == "mixed" and self.policy.prune_mixed)
            or (layout.mode == "verify" and self.policy.prune_verify)
        )
        if prune and self.policy.name == "budget":
            row = self.budget_row(layout.n_decode_rows)
            prune = any(b < self.num_experts for b in row)
            if prune:
                self.knobs.budget.copy_(torch.tensor(row, dtype=torch.int64))
        self.knobs.enabled.fill_(prune)
        self.knobs.stat_slot.fill_({"mixed": MIXED_SLOT, "verify": VERIFY_SLOT}.get(
            layout.mode, batch_slot(layout.n_decode_rows)))
        self.knobs.n_valid.fill_(layout.n_valid)
        self.knobs.prunable_start.fill_(layout.prunable_start)
        self.layout = layout
        self.row_weight = layout.row_weight if prune else None
        self.step_active = prune
        decode = layout.mode == "decode" and layout.n_decode_rows > 0
        self.decode_steps += decode
        # counted in decode steps, not forwards: a schedule alternating prefill and decode
        # forwards would otherwise put every decode step between the samples
        self.shadow_step = (self.shadow and decode
                            and self.decode_steps % self.shadow_every == 0)
        if self.shadow:
            self.knobs.shadow_on.fill_(self.shadow_step)
        return prune
