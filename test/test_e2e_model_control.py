"""Controller v2 end to end: a real SGLang CPU server with the plugin, a real Prometheus
scraping it, the real controller, the operator's ``lynx-policy profile`` seeding the latency
model, then a load step (1 -> 32 -> 1 streams) under the model planner.

Asserted (no timings): the profile makes the model ready with a positive cost per expert;
under the high load the runtime prunes decode steps and ``GET /v1/model`` explains the pruned
bucket (predicted above target); after the drop new decode steps run unpruned, the one-stream
bucket being below ``adaptive.min_batch``.

The SLO is the median ITL (``e2e_control.QUANTILE`` says why not a tail quantile here).
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

# serial: the latency model is profiled and the SLO set from measured latency
pytestmark = [pytest.mark.slow, pytest.mark.serial]


def test_profile_then_load_step_prunes_only_while_needed(tmp_path: Path) -> None:
    with profiled_testbed(tmp_path) as bed:
        ctl, server, prometheus = bed.ctl, bed.server, bed.prometheus
        assert ctl.admin.get("/v1/mode").json()["mode"] == "static"  # profile restored it

        # Stock median ITL at both loads, then an SLO between them.
        itl = {}
        for n in (LOW, HIGH):
            with under_load(server.url, n, 8):
                itl[n] = itl_quantile_s(prometheus)
        assert itl[HIGH] > 1.3 * itl[LOW], itl
        target_ms = 1000 * (itl[LOW] * itl[HIGH]) ** 0.5
        slo = {"metric": "itl", "quantile": QUANTILE, "target_ms": target_ms}
        ctl.admin.put("/v1/slo", json={"targets": [slo]}).raise_for_status()
        ctl.admin.put("/v1/mode", json={"mode": "adaptive"}).raise_for_status()

        with under_load(server.url, HIGH, 2):
            before = decode_steps(server.url)
            bed.trace.wait_until("decode steps pruned under the high load",
                                 lambda: decode_steps(server.url)["true"] > before["true"] + 20,
                                 timeout_s=60)
            view = ctl.admin.get("/v1/model").json()
        assert view["planner"] == "model", view["reason"]
        (high,) = [w for w in view["why"] if w["max_batch"] == HIGH]
        assert high["budget"] < high["union"], view["why"]  # the high load's bucket prunes
        # ... because the model predicts its unpruned step above the relax band
        assert high["unpruned_ms"] > high["target_ms"] * (1 - 0.2) / (1 - 0.1), high
        for why in view["why"]:  # every bucket has a budget and a reason
            assert why["reason"] and why["budget"] >= 4, why

        with under_load(server.url, LOW, 8) as load:  # the drop; new steps stay unpruned
            settled = decode_steps(server.url)
            time.sleep(6)  # several control ticks under the low load...
            bed.trace.wait_until("unpruned decode steps under the low load",  # >20 new steps
                                 lambda: decode_steps(server.url)["false"] > settled["false"] + 20,
                                 timeout_s=60)
            after = decode_steps(server.url)
        assert after["true"] == settled["true"], (settled, after)
        (low,) = [w for w in ctl.admin.get("/v1/model").json()["why"] if w["max_batch"] == 2]
        assert low["budget"] >= low["union"] and "min_batch" in low["reason"], low
        assert load.failed == 0
