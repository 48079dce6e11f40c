"""The controller's side of shadow statistics, torch-free (it runs in the controller's own
environment too, `scripts/python_versions.sh`): `ShadowStats` decoding refuses malformed
messages as ``invalid``; the store sums, refuses what does not fit, persists, reloads and will
not guess from a damaged file. The runtime's side and the real link: test_shadow_link.py."""

from __future__ import annotations

from pathlib import Path

import msgspec
import pytest

from lynx_policy.shadow_store import ShadowStore
from lynx_policy.state import StateError
from lynx_protocol.messages import ProtocolError, Register, ShadowStats, decode
from lynx_protocol.shadow import ShadowError, ladder_from_shadow, shadow_width

EXPERTS, TOP_K, LAYERS, BUDGETS = 128, 8, 3, [8, 16, 32]
EDGES = [1, 2, 4, 8, 16, 32, 64]


def register(name: str) -> Register:
    return Register(replica_id=name, model="m", num_layers=LAYERS, num_experts=EXPERTS,
                    top_k=TOP_K, policies=["off", "budget"])


def layer_row(steps: float, concentration: float) -> list[float]:
    """Sums a runtime could have measured: ``steps`` steps of 24 rows; the budgets keep
    more of the mass the more concentrated the layer."""
    rows, mass = 24 * steps, 24 * steps
    per = []
    for budget in BUDGETS:
        share = min(1.0, 0.6 + concentration * budget / EXPERTS)
        per += [budget * steps, share * mass, rows * min(1.0, share + 0.1)]
    return [steps, rows, 90 * steps, mass, *per]


def message(name: str, steps: float = 10.0, **change: object) -> ShadowStats:
    fields = {"replica_id": name, "max_batch": 32, "batch_buckets": EDGES, "budgets": BUDGETS,
              "every": 16, "layers": [layer_row(steps, c) for c in (2.0, 1.0, 0.5)], **change}
    return ShadowStats(**fields)  # type: ignore[arg-type]


@pytest.mark.parametrize(("change", "match"), [
    ({"layers": [[1.0] * 5]}, "values for"),
    ({"budgets": [8, 4]}, "strictly increasing"),
    ({"max_batch": 3}, "not one of batch_buckets"),
    ({"layers": [[float("nan")] * shadow_width(2)]}, ">= 0.0"),
    ({"layers": [[-1.0] * shadow_width(2)]}, ">= 0.0"),
    # sums of finite values overflowed to inf, and a persisted Infinity stopped a restart
    ({"layers": [[float("inf")] * shadow_width(2)]}, r"<= 1000000000000000\.0"),
    ({"layers": [[1e308] * shadow_width(2)]}, r"<= 1000000000000000\.0"),
    # an edge beyond the ladder format's batch limit made an accepted ladder unloadable
    ({"batch_buckets": [1, 2**21]}, "<= 1048576"),
])
def test_a_malformed_shadow_message_is_rejected_as_invalid(change: dict, match: str) -> None:
    good = {"type": "shadow_stats", "v": 2, "replica_id": "r", "max_batch": 0,
            "batch_buckets": [1, 2], "budgets": [4, 8], "every": 1,
            "layers": [[1.0] * shadow_width(2)]}
    decode(msgspec.msgpack.encode(good))
    with pytest.raises(ProtocolError, match=match) as bad:
        decode(msgspec.msgpack.encode({**good, **change}))
    assert bad.value.reason == "invalid"


def test_the_store_sums_refuses_what_does_not_fit_persists_and_will_not_guess(
        tmp_path: Path) -> None:
    store = ShadowStore(str(tmp_path / "state"))
    assert store.add(register("r0"), message("r0")) is None
    assert store.add(register("r1"), message("r1", steps=5.0)) is None
    assert store.steps(32) == 15.0 and store.contributors == {"r0": 1, "r1": 1}
    assert "another model shape" in (store.add(register("r2"), message("r2", every=4)) or "")
    shallow = message("r2", layers=message("r2").layers[:2])
    assert "2 layers" in (store.add(register("r2"), shallow) or "")
    boasting = [list(row) for row in message("r2").layers]
    boasting[1][2] = (EXPERTS + 1) * boasting[1][0]  # more experts a step than exist
    assert "inconsistent" in (store.add(register("r2"), message("r2", layers=boasting)) or "")
    small = Register(replica_id="r3", model="m", num_layers=LAYERS, num_experts=16, top_k=8,
                     policies=["off"])
    assert "not within" in (store.add(small, message("r3")) or "")
    assert store.refused == 4 and "r2" not in store.contributors
    data = store.data()
    assert data is not None
    ladder, _ = ladder_from_shadow(data, min_steps=15, max_mass_lost=0.5)
    lost = [r.cost("mass_lost") for r in ladder.rungs]
    assert len(lost) >= 2 and lost == sorted(lost) and lost[-1] > 0  # from the summed data
    with pytest.raises(ShadowError, match="within"):  # a mean of 1e300 asked for 48 GB
        ladder_from_shadow(data, means=[1e300], min_steps=1)
    store.persist()
    again = ShadowStore(str(tmp_path / "state"))  # a restarted controller
    assert again.data() == data and again.steps(32) == 15.0
    generation = store.generation
    store.reset()
    assert store.generation == generation + 1  # a build straddling the reset is not kept
    assert not (tmp_path / "state" / "shadow.json").exists() and store.data() is None
    (tmp_path / "state" / "shadow.json").write_text('{"format": "lynx-shadow/1"}')
    with pytest.raises(StateError, match="will not guess"):
        ShadowStore(str(tmp_path / "state"))
