"""Ladders for the tests: a hand-built one shaped like a calibrated qwen3-moe-mini ladder
(4 layers, 32 experts, top-4; rung costs and experts as `lynx-serve calibrate --ladder`
measures them) and a hypothesis strategy of valid ones."""

from __future__ import annotations

from hypothesis import strategies as st

from lynx_protocol.ladder import (
    LADDER_FORMAT,
    PPL_RISE,
    Ladder,
    LadderModel,
    Rung,
    RungCost,
    RungTable,
    pareto_filter,
)

LAYERS, EXPERTS, TOP_K = 4, 32, 4
BATCHES = (16, 32, 64)
STOCK_EXPERTS = {16: 19.1, 32: 22.3, 64: 26.0}


def table(batch: int, per_layer: list[int], experts: float, mass: float, rise: float
          ) -> RungTable:
    return RungTable(batch=batch, per_layer=per_layer, experts_computed=experts,
                     mass_kept=mass, costs=[RungCost(kind=PPL_RISE, value=rise,
                                                     source="test")])


def rung(name: str, budgets: list[int], rise: float, mass: float = 0.9) -> Rung:
    """One rung: the same ``budgets`` at every batch, experts capped by the stock union."""
    return Rung(name=name, tables=[
        table(b, budgets, sum(min(x, STOCK_EXPERTS[b]) for x in budgets) / len(budgets),
              1.0 if name == "none" else mass, rise) for b in BATCHES])


def small_ladder(layers: int = 2, experts: int = 8, top_k: int = 2) -> Ladder:
    """Three rungs for a small registered shape (the admin tests' replica)."""
    def flat(name: str, budget: int, rise: float) -> Rung:
        return Rung(name=name, tables=[table(b, [budget] * layers, float(min(budget, experts)),
                                             1.0 if budget >= experts else 0.9, rise)
                                       for b in BATCHES])
    return Ladder(format=LADDER_FORMAT,
                  model=LadderModel(num_layers=layers, num_experts=experts, top_k=top_k),
                  rungs=[flat("none", experts, 0.0), flat("m6", 6, 0.003),
                         flat("m4", 4, 0.012), flat("m2", 2, 0.050)])


def mini_ladder() -> Ladder:
    return Ladder(format=LADDER_FORMAT,
                  model=LadderModel(num_layers=LAYERS, num_experts=EXPERTS, top_k=TOP_K,
                                    name="qwen3-moe-mini"),
                  rungs=[rung("none", [EXPERTS] * LAYERS, 0.0),
                         rung("m20", [24, 16, 24, 16], 0.002, 0.97),
                         rung("m16", [16, 12, 24, 12], 0.004, 0.93),
                         rung("m12", [12, 8, 16, 12], 0.010, 0.87),
                         rung("m8", [8, 6, 12, 6], 0.030, 0.75)])


@st.composite
def ladders(draw: st.DrawFn) -> Ladder:
    """Valid ladders: rungs with falling per-layer budgets, Pareto-filtered."""
    layers = draw(st.integers(1, 6))
    count = draw(st.integers(1, 6))
    rungs = [rung("none", [EXPERTS] * layers, 0.0)]
    budgets = [EXPERTS] * layers
    rise = 0.0
    for index in range(count):
        budgets = [max(TOP_K, b - draw(st.integers(1, 8))) for b in budgets]
        rise += draw(st.floats(0.0, 0.02))
        rungs.append(rung(f"r{index}", budgets, rise, draw(st.floats(0.5, 1.0))))
    kept, dropped = pareto_filter(rungs)
    return Ladder(format=LADDER_FORMAT,
                  model=LadderModel(num_layers=layers, num_experts=EXPERTS, top_k=TOP_K),
                  rungs=kept, dropped=dropped)
