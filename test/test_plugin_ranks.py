"""Ranks from SGLang's own parallel state (not a ModelRunner attribute that does not exist),
and the per-rank record of which policy version was applied at which step."""

from __future__ import annotations

import pytest
import torch

from lynx.sglang_plugin.ranks import ParallelRanks, RankError, ranks_from_sglang
from lynx.sglang_plugin.step_state import RuntimeState, StepLayout
from lynx_protocol.policy import PolicySpec

pytest.importorskip("sglang.srt.runtime_context")


@pytest.mark.parametrize(("world_rank", "dp_rank"), [(0, None), (1, None), (1, 1)])
def test_ranks_come_from_sglangs_parallel_state(world_rank: int, dp_rank: int | None) -> None:
    from sglang.test.test_utils import published_topology

    dp_size = 2 if dp_rank is not None else 1
    with published_topology(ranks={"world_rank": world_rank, "dp_rank": dp_rank},
                            tp_size=2, dp_size=dp_size):
        ranks = ranks_from_sglang()
    assert ranks == ParallelRanks(world_rank, 2, dp_rank or 0, dp_size)
    assert ranks.exports == (world_rank == 0)  # only TP rank 0 exports and owns the link
    expected = f"r/dp{dp_rank}" if dp_rank is not None else "r"
    assert ranks.replica_id("r") == expected


def test_the_expert_parallel_size_comes_from_sglangs_parallel_state() -> None:
    from sglang.test.test_utils import published_topology

    with published_topology(ranks={"world_rank": 1}, tp_size=2, ep_size=2):
        ranks = ranks_from_sglang()
    assert ranks == ParallelRanks(1, 2, 0, 1, ep_size=2)
    with published_topology(tp_size=2):
        assert ranks_from_sglang().ep_size == 1


def test_missing_parallel_state_is_a_start_up_error_not_rank_zero() -> None:
    from sglang.srt.runtime_context import reset_context

    reset_context()
    with pytest.raises(RankError, match="parallel state is not available"):
        ranks_from_sglang()


def test_every_applied_version_is_recorded_with_its_step() -> None:
    state = RuntimeState(2, 8, 2, torch.device("cpu"), PolicySpec(name="off"))
    seen: list[tuple[str, int, int]] = []
    state.on_apply = lambda policy, version, step: seen.append((policy.name, version, step))
    decode = StepLayout("decode", 4, 0)
    state.begin_step(decode)
    state.stage_policy(PolicySpec(name="affinity"), 3)
    assert state.applied == [(0, 0)]  # staged, not applied before the next step
    state.begin_step(decode)
    state.begin_step(decode)
    state.stage_policy(PolicySpec(name="piggyback", k0=1), 4)
    state.begin_step(decode)
    assert state.applied == [(0, 0), (3, 2), (4, 4)]
    assert seen == [("affinity", 3, 2), ("piggyback", 4, 4)]
