"""The ladder end to end: a real SGLang CPU server with the plugin, a real Prometheus, the
real controller planning over the checkpoint's ladder (``PUT /v1/ladder``).

After ``lynx-policy profile`` makes the latency model ready, the SLO (median ITL) is set from the
model so that at 32 streams the unpruned step misses it and the ladder's lowest rung meets
it. Asserted (no timings): under the high load the buckets serving it (16 rows and up) apply
a pruning rung and `GET /v1/model` names it with its measured quality cost; after the drop
to one stream new decode steps run unpruned and the one-stream bucket is on rung ``none``.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from e2e_control import (
    HIGH,
    LOW,
    QUANTILE,
    decode_steps,
    itl_quantile_s,
    profiled_testbed,
    under_load,
)

from lynx_policy.model import expected_union
from lynx_policy.rungs import rung_experts
from lynx_protocol.ladder import load_ladder

# serial: the SLO is set from latency the test measures; a neighbour's load would move it
pytestmark = [pytest.mark.slow, pytest.mark.serial]


def test_a_load_step_moves_the_applied_rung_up_and_back(tmp_path: Path) -> None:
    with profiled_testbed(tmp_path, before_profile="ladder") as bed:
        ctl, server, fit = bed.ctl, bed.server, bed.fit
        ladder = load_ladder(bed.folder / "lynx_ladder.json")

        # An SLO that no pruning misses and the lowest rung meets. The planning line, target x
        # (1 - margin), sits 2% below the unpruned median ITL measured over 12 s: most 8 s
        # windows confirm the miss, and the lowest rung, ~20% faster by the model, closes the
        # gap with room to spare for the seconds after a table change, when the median rose
        # (56 -> 72-77 ms here, kappa 1.2 -> 1.6) before the pruned steps caught up.
        def step_ms(experts: float) -> float:
            return fit["a_ms"] + fit["b_ms_per_row"] * HIGH + fit["c_ms_per_expert"] * experts

        union = expected_union(32, 4, HIGH)
        lowest = rung_experts(ladder.rungs[-1], HIGH, union, ladder.model.num_experts)
        ratio = step_ms(lowest) / step_ms(union)
        assert ratio < 0.97, ratio  # the ladder's lowest rung shortens the step

        # A second try with a target from a fresh reading when the first one's unpruned steps
        # met it: this machine's speed drifts by more than the 2% the target sits below (on
        # 2026-12-08 a reading of 164 ms, then 107-157 ms under the same load, every tick
        # "none meets the SLO unpruned"). A controller that never prunes fails both tries.
        for attempt in (1, 2):
            with under_load(server.url, HIGH, 14):
                observed_ms = 1000 * itl_quantile_s(bed.prometheus, window_s=12)
            target_ms = 0.98 * observed_ms / 0.9
            slo = {"metric": "itl", "quantile": QUANTILE, "target_ms": target_ms}
            ctl.admin.put("/v1/slo", json={"targets": [slo]}).raise_for_status()
            ctl.admin.put("/v1/mode", json={"mode": "adaptive"}).raise_for_status()
            with under_load(server.url, HIGH, 2):
                pruned_before = decode_steps(server.url)["true"]
                try:
                    bed.trace.wait_until(
                        "decode steps pruned under the high load",
                        lambda start=pruned_before: decode_steps(server.url)["true"] > start + 20,
                        timeout_s=90)
                except AssertionError:
                    met = "none meets the SLO unpruned" in ctl.admin.get("/v1/model").text
                    if attempt == 2 or not met:
                        raise
                    ctl.admin.put("/v1/mode", json={"mode": "static"}).raise_for_status()
                    continue
                view = ctl.admin.get("/v1/model").json()
                cost = ctl.metric("lynx_controller_expected_quality_cost", {"kind": "ppl_rise"})
            break
        assert view["planner"] == "model", view["reason"]
        # 32 streams of 16 tokens fill the buckets from 16 rows up (requests come and go); the
        # top one may hold at none when the model says no rung closes its gap at 32 rows
        busy = [w for w in view["why"] if w["max_batch"] >= HIGH // 2]
        pruned = [w for w in busy if w["rung"] not in (None, "none")]
        assert pruned and all(w["quality_cost"] > 0 for w in pruned), (view["reason"], busy)
        assert not cost < 0  # exported (NaN while a window's steps meet another table)

        with under_load(server.url, LOW, 8) as load:
            settled = decode_steps(server.url)
            time.sleep(6)
            bed.trace.wait_until("unpruned decode steps under the low load",
                                 lambda: decode_steps(server.url)["false"] > settled["false"] + 20,
                                 timeout_s=60)
            after = decode_steps(server.url)
        assert after["true"] == settled["true"], (settled, after)
        (low,) = [w for w in ctl.admin.get("/v1/model").json()["why"] if w["max_batch"] == 2]
        assert low["rung"] == "none" and low["quality_cost"] == 0, low
        assert load.failed == 0
