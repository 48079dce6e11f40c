"""Sparse upcycling with fine-grained expert segmentation: start a many-expert model from a
trained coarser one (Komatsuzaki et al. 2022, "Sparse Upcycling"; DeepSeekMoE's segmentation).

Every source expert with FFN width ``I`` becomes ``r * m`` target experts of width ``I / r``: its
neurons are cut into ``r`` segments and each segment is copied ``m`` times (``E' = E * r * m``).
A child's router row is its parent's plus a little noise, its weights are its segment's plus a
little noise (copies must differ to specialise), and its down projection is multiplied by ``r``:
when the router picks all children of a parent with equal weights, the parent's contribution and
weight are the same as before. Top-k then spreads over fewer parents, so the start is close to,
not equal to, the source model; training continues from there. Attention, embeddings, norms and
the head are copied unchanged.
"""

from __future__ import annotations

import re

import torch

_EXPERT = re.compile(r"\.mlp\.(experts\.(gate_up_proj|down_proj)|gate\.weight)$")


def upcycle_state(source: dict[str, torch.Tensor], target: dict[str, torch.Tensor],
                  noise: float = 0.01, seed: int = 0) -> dict[str, torch.Tensor]:
    """A state dict of the target's shapes built from ``source``.

    Fused expert layout: ``gate_up_proj`` ``[E, 2I, H]``, ``down_proj`` ``[E, H, I]``, router
    ``gate.weight`` ``[E, H]``. ``noise`` is relative to each tensor's standard deviation."""
    gen = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for key, want in target.items():
        if key not in source:
            raise KeyError(f"upcycle: source has no {key}")
        src = source[key].float()
        match = _EXPERT.search(key)
        if match is None:
            if src.shape != want.shape:
                raise ValueError(f"upcycle: {key} is {tuple(src.shape)}, target "
                                 f"{tuple(want.shape)}")
            out[key] = src.clone()
            continue
        experts = src.shape[0]
        if key.endswith("gate.weight"):
            factor = want.shape[0] // experts
            child = src.repeat_interleave(factor, dim=0)
        elif key.endswith("gate_up_proj"):
            segments = (src.shape[1] // 2) // (want.shape[1] // 2)
            copies = want.shape[0] // (experts * segments)
            gate, up = src.chunk(2, dim=1)  # [E, I, H] each
            parts = [torch.cat([g, u], dim=1) for g, u in
                     zip(gate.chunk(segments, dim=1), up.chunk(segments, dim=1), strict=True)]
            child = torch.stack(parts, dim=1).repeat_interleave(copies, dim=1)
            child = child.reshape(-1, *want.shape[1:])
        else:  # down_proj [E, H, I]
            segments = src.shape[2] // want.shape[2]
            copies = want.shape[0] // (experts * segments)
            parts = torch.stack(src.chunk(segments, dim=2), dim=1) * segments
            child = parts.repeat_interleave(copies, dim=1).reshape(-1, *want.shape[1:])
        if child.shape != want.shape:
            raise ValueError(f"upcycle: {key} cannot map {tuple(src.shape)} to "
                             f"{tuple(want.shape)}")
        jitter = torch.randn(child.shape, generator=gen) * (noise * src.std().item())
        out[key] = (child + jitter).to(want.dtype)
    return out
