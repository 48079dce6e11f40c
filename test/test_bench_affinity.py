"""`benchmark/affinity_bias.py` (issue 22): AffinityBinning's scores on routers with a
correction bias. Kept out of ``test_selection_*`` (those also run against the installed wheel
on Python 3.12, where the repository's ``benchmark`` package is not importable)."""

from __future__ import annotations


def test_affinity_bias_benchmark_shows_the_shipped_scores_invariant() -> None:
    """`benchmark/affinity_bias.py` (quick): the shipped scores (log gate) give the same
    experts kept and routing mass kept at every bias offset; the former ones
    (log(sigmoid + bias)) did not, and at DeepSeek-V3's real offset (+5) kept less mass."""
    from benchmark.affinity_bias import run

    cells = run([16], draws=2, alpha=3.0, beta=2.0)["cells"]
    for router in ("DeepSeek-V3", "Kimi-K2"):
        def by_offset(variant: str, router: str = router) -> dict[float, tuple]:
            return {c["bias_offset"]: (c["kept"], c["mass_kept"]) for c in cells
                    if c["router"] == router and c["variant"] == variant}

        shipped, former = by_offset("gate_log"), by_offset("choice_log")
        assert len(set(shipped.values())) == 1, shipped
        assert len(set(former.values())) > 1, former
        assert former[5.0][1] < shipped[5.0][1]
