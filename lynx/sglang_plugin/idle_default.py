"""Say plainly, once, when the built-in default policy cuts (almost) nothing on this router.

The default `budget` max(2k + 1, E/2) is conservative for any checkpoint; on production-scale
fine-grained routers the stock union of an everyday decode batch stays below it (DeepSeek-V3
at B = 16-64: 81 -> 81 experts), so Lynx then runs its selection for nothing. After
`MIN_STEPS` decode steps under the default that cut less than `MAX_CUT` of the experts the
batches needed, the plugin logs one warning naming the numbers and how to calibrate, and
exports ``lynx_default_policy_cuts_nothing`` = 1 while the default stays applied (0 before,
and once another policy applies).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lynx_protocol.policy import PolicySpec

MIN_STEPS = 200  # pruned decode steps (layer-steps / layers) before judging
MAX_CUT = 0.01  # fraction of the stock union the default must drop to be worth its cost


@dataclass
class IdleDefaultWatch:
    """Running totals of the default policy's pruned layer-steps (one per replica)."""

    default: PolicySpec
    num_layers: int
    layer_steps: float = 0.0
    kept: float = 0.0
    union: float = 0.0
    said: bool = False

    def observe(self, policy: PolicySpec, layer_steps: torch.Tensor, kept: torch.Tensor,
                union: torch.Tensor) -> str | None:
        """Add one export window ([layer] sums of pruned layer-steps, experts kept, stock
        union) applied under ``policy``; the warning text the first time the verdict is
        reached, else None. Windows under any other policy are not counted."""
        if self.said or policy != self.default:
            return None
        self.layer_steps += float(layer_steps.sum())
        self.kept += float(kept.sum())
        self.union += float(union.sum())
        steps = self.layer_steps / max(1, self.num_layers)
        if steps < MIN_STEPS or not self.union:
            return None
        self.said = True  # the verdict is reached once; a default that cuts says nothing
        cut = 1.0 - self.kept / self.union
        if cut >= MAX_CUT:
            return None
        return (f"Lynx: the built-in default policy cut {100 * cut:.2f}% of the experts the "
                f"batches needed over {steps:.0f} pruned decode steps on this router (mean "
                f"{self.union / self.layer_steps:.1f} experts per layer-step): it buys nothing "
                "here. Calibrate this checkpoint: lynx-serve calibrate <model> --ladder "
                "--corpus <your text> --out <model>/lynx_ladder.json, then start on a rung "
                "(LYNX_LADDER_RUNG) or give the ladder to the controller (README, 'ladder')")

    @property
    def idle(self) -> bool:
        """The verdict was reached and the default cut (almost) nothing."""
        return self.said and self.union > 0 and 1.0 - self.kept / self.union < MAX_CUT
