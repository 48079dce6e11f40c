"""Misses pruning cannot fix: the share of SLO misses that come from steps with prefill rows,
on the SLO Pareto's trace replay on the decode-bound testbed, with SGLang's default schedule
and with the testbed's (before / after).

    python benchmark/prefill_share.py [--quick] [--reps 2] [--rung m40] [--chunk 64]

Schedules (one server each: Lynx with the controller, policy switched live, ``LYNX_STEP_TRACE``):
- ``default``: SGLang 0.5.23's own (chunked prefill 4096 on a machine without a GPU, no mixed
  chunks): a new request's prefill is a step of its own, and every running request waits for
  it (its token gap holds the prefill step and its own decode step).
- ``mixed``: ``--enable-mixed-chunk --chunked-prefill-size <chunk>``: prefill chunks run in
  the same step as the running decode rows, so a prefill costs the decode rows its extra
  work only.
Each replays the excerpt of `benchmark/slo_pareto.py` (same arguments, same offered rate:
``--load`` x the ``default`` server's closed-loop capacity) ``--reps`` times with pruning off
and at ``--rung``, interleaved. Misses of the per-request TPOT target and of a per-token ITL
target of the same bound (default: the medium target of the last Pareto on the same checkpoint,
``results/slo_pareto.json``; its oracle rung is the default ``--rung``) are
attributed to prefill (`benchmark.miss_attribution`). Writes ``results/prefill_share.json``.
"""

from __future__ import annotations

import argparse
import json
import signal
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmark import miss_attribution, slo_pareto, slo_pareto_score
from benchmark.common import RESULTS_DIR, machine_description, models_dir, rounded, write_json
from benchmark.serving_pair import ServingPair
from benchmark.slo_pareto_runs import apply_mode, replay

SCHEDULES = {"default": (), "mixed": ("--enable-mixed-chunk",)}


def pareto_defaults(served: str) -> tuple[float | None, str | None]:
    """The medium target [ms] and its oracle rung of the last full SLO Pareto on the same
    served checkpoint (``results/slo_pareto.json``), else (None, None)."""
    path = RESULTS_DIR / "slo_pareto.json"
    if not path.exists():
        return None, None
    pareto = json.loads(path.read_text())
    if pareto.get("served") != served:
        return None, None
    oracle = pareto["summary"]["medium"]["oracle"]["mode"]
    return pareto["targets_ms"]["medium"], oracle.split(":", 1)[1] if ":" in oracle else None


def middle_rung(folder: Path, model: str) -> str:
    """The middle pruning rung within the floor (top_k experts) of the served ladder."""
    from lynx.serving.models import moe_shape, read_config
    from lynx_policy.config import QualityFloor
    from lynx_policy.rungs import usable_rungs
    from lynx_protocol.ladder import load_ladder

    ladder = load_ladder(folder / "lynx_ladder.json")
    top_k = moe_shape(read_config(models_dir() / model))[2]
    pruning = [ladder.rungs[i].name for i in usable_rungs(ladder, QualityFloor(min_budget=top_k))
               if ladder.rungs[i].name != "none"]
    return pruning[len(pruning) // 2]


def itl_percentile(timings: list[Any], q: float) -> float:
    gaps = sorted(g * 1e3 for t in timings if t.ok for g in t.itl_s)
    return gaps[min(len(gaps) - 1, int(q * len(gaps)))] if gaps else float("nan")


def served_folder(args: argparse.Namespace) -> Path:
    """The widened checkpoint the Pareto serves (built once, cached)."""
    from benchmark import testbed
    from benchmark.e2e_decode import widened

    return (widened(args.model, args.widen or slo_pareto.QUICK_WIDEN) if args.quick
            else testbed.build(args.model, args.widen))


def one_schedule(name: str, args: argparse.Namespace, rps: float | None,
                 target_ms: float | None, workdir: Path
                 ) -> tuple[float, float, list[dict[str, Any]]]:
    """Launch the ``name`` schedule's server, replay ``--reps`` x (off, rung); returns the
    capacity used (measured here when ``rps`` is None), the target (when None: 1.25 x the
    warm-up replay's median decode step) and one row per replay."""
    from benchmark import testbed
    from lynx.serving.models import moe_shape, read_config

    _, experts, top_k = moe_shape(read_config(models_dir() / args.model))
    folder = served_folder(args)
    flags = (*testbed.SERVER_FLAGS, *SCHEDULES[name],
             *(("--chunked-prefill-size", str(args.chunk)) if name != "default" else ()))
    trace = workdir / f"steps-{name}.jsonl"
    rows = []
    with ServingPair.launch(folder, workdir / name, with_stock=False, extra_args=flags,
                            controller_overrides=slo_pareto.controller_overrides(top_k, experts),
                            extra_lynx_env={"LYNX_STEP_TRACE": str(trace)}) as pair:
        config = read_config(folder)
        vocab, layers = int(config["vocab_size"]), moe_shape(config)[0]
        pair.controller.admin.put("/v1/ladder", content=(
            folder / "lynx_ladder.json").read_bytes()).raise_for_status()
        if rps is None:
            rps = slo_pareto.capacity_rps(pair, slo_pareto.schedule_for(args, 1.0), vocab,
                                          args.capacity_s)
        schedule = slo_pareto.schedule_for(args, rps)
        apply_mode(pair, "off", None)
        warm = replay(pair, schedule, vocab, layers)  # warm-up, discarded (as the Pareto's)
        if target_ms is None:  # 1.25 decode steps: the first replay's TPOTs run ~2x slow
            decode = [st.ms for st in miss_attribution.load_steps(trace) if st.mode == "decode"
                      and warm["start"] <= st.end_s <= warm["start"] + warm["duration_s"]]
            target_ms = round(1.25 * statistics.median(decode), 2)
        for rep in range(args.reps):
            modes = ["off", f"static:{args.rung}"]
            for mode in modes if rep % 2 == 0 else modes[::-1]:
                apply_mode(pair, mode, None)
                run = replay(pair, schedule, vocab, layers)
                timings = run["timings"]
                steps = [s for s in miss_attribution.load_steps(trace)
                         if run["start"] <= s.end_s <= run["start"] + run["duration_s"]]
                found = miss_attribution.attribute(
                    timings, miss_attribution.PrefillTime(steps), target_ms, target_ms)
                row = {"schedule": name, "mode": mode, "rep": rep,
                       "p90_tpot_ms": rounded(slo_pareto_score.p90_tpot_ms(timings), 2),
                       "p90_itl_ms": rounded(itl_percentile(timings, 0.9), 2),
                       "p99_itl_ms": rounded(itl_percentile(timings, 0.99), 2),
                       **slo_pareto_score.score(timings, target_ms, run["duration_s"]),
                       "failed": run["failed"], **found}
                rows.append(row)
                print(f"[prefill_share] {name} rep {rep} {mode}: P90 TPOT {row['p90_tpot_ms']} "
                      f"ms, attainment {row['attainment']}, TPOT misses {row['tpot_misses']} "
                      f"(prefill {row['tpot_miss_share_prefill']}), ITL misses "
                      f"{row['itl_misses']} (prefill {row['itl_miss_share_prefill']})",
                      flush=True)
    assert rps is not None and target_ms is not None
    return rps, target_ms, rows


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Medians per (schedule, mode) over repetitions (shares over pooled misses)."""
    out = []
    for key in dict.fromkeys((r["schedule"], r["mode"]) for r in rows):
        group = [r for r in rows if (r["schedule"], r["mode"]) == key]

        def pooled(kind: str, group: list[dict[str, Any]] = group) -> float | None:
            misses = sum(r[f"{kind}_misses"] for r in group)
            owned = sum((r[f"{kind}_miss_share_prefill"] or 0) * r[f"{kind}_misses"]
                        for r in group)
            return rounded(owned / misses, 3) if misses else None

        out.append({"schedule": key[0], "mode": key[1], "reps": len(group),
                    **{k: rounded(statistics.median(r[k] for r in group), 3) for k in (
                        "p90_tpot_ms", "p90_itl_ms", "p99_itl_ms", "attainment",
                        "decode_step_median_ms")},
                    "tpot_miss_share_prefill": pooled("tpot"),
                    "itl_miss_share_prefill": pooled("itl"),
                    "prefill_steps": sum(r["prefill_steps"] for r in group),
                    "mixed_steps": sum(r["mixed_steps"] for r in group)})
    return out


def markdown(result: dict[str, Any]) -> str:
    """The RESULTS.md section."""
    lines = [
        "\n## Misses pruning cannot fix: prefill's share (`benchmark/prefill_share.py`)\n",
        f"{result['served']}, the SLO Pareto's replay ({result['requests']} requests at "
        f"{result['offered_rps']:.2f} req/s); target {result['target_ms']} ms for a request's "
        "TPOT and for each token gap; a miss comes from prefill when the prefill time inside "
        "it (pure prefill steps whole, mixed steps' excess over "
        f"{result.get('mixed_baseline', 'the median decode step of their batch-size bucket')}"
        f") is what puts it over. {result['reps']} repetitions, medians; shares over pooled misses."
        f" `mixed` = `{' '.join(result['flags']['mixed'])}`.\n",
        "| schedule | mode | P90 TPOT ms | attainment | TPOT misses from prefill | P90 ITL ms "
        "| P99 ITL ms | ITL misses from prefill | prefill / mixed steps |",
        "|---|---|---|---|---|---|---|---|---|"]
    by = {(s["schedule"], s["mode"]): s for s in result["summary"]}
    off, rung = "off", f"static:{result['rung']}"
    if all((k, m) in by for k in SCHEDULES for m in (off, rung)):
        d, m = by[("default", off)], by[("mixed", off)]
        lines.insert(2, (
            f"With SGLang's default schedule, {d['tpot_miss_share_prefill']} of `off`'s TPOT "
            f"misses and {d['itl_miss_share_prefill']} of its ITL misses come from prefill "
            f"({by[('default', rung)]['tpot_miss_share_prefill']} and "
            f"{by[('default', rung)]['itl_miss_share_prefill']} at {rung}, whose shorter "
            "decode steps leave prefill a larger part): the misses are decode-bound, which "
            "pruning moves. Mixed chunks change `off`'s P90 TPOT from "
            f"{d['p90_tpot_ms']} to {m['p90_tpot_ms']} ms.\n"))
    for s in result["summary"]:
        lines.append(f"| {s['schedule']} | {s['mode']} | {s['p90_tpot_ms']} | "
                     f"{s['attainment']} | {s['tpot_miss_share_prefill']} | {s['p90_itl_ms']} | "
                     f"{s['p99_itl_ms']} | {s['itl_miss_share_prefill']} | "
                     f"{s['prefill_steps']} / {s['mixed_steps']} |")
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--rung", default=None, help="the pruned mode's ladder rung (default: "
                        "the last Pareto's medium oracle, else the middle usable rung)")
    parser.add_argument("--chunk", type=int, default=64, help="mixed: --chunked-prefill-size")
    parser.add_argument("--target-ms", type=float, default=None,
                        help="default: the last Pareto's medium target on this checkpoint "
                        "(results/slo_pareto.json), else 1.25 x the warm-up's median decode step")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "prefill_share.json")
    ours, rest = parser.parse_known_args(argv)
    args = slo_pareto.parse_args(rest)  # the replay's arguments: --quick, --model, --load, ...
    for key, value in vars(ours).items():
        setattr(args, key, value)
    if args.reps < 1 or args.chunk < 1 or (args.target_ms is not None and args.target_ms <= 0):
        parser.error("need --reps >= 1, --chunk >= 1 and --target-ms > 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if not (models_dir() / args.model / "config.json").is_file():
        print(f"prefill_share: no checkpoint {args.model} under {models_dir()}", file=sys.stderr)
        return 2
    folder = served_folder(args)
    target, rung = pareto_defaults(folder.name)
    target = args.target_ms if args.target_ms is not None else target
    args.rung = args.rung or rung or middle_rung(folder, args.model)
    names = [r["name"] for r in json.loads((folder / "lynx_ladder.json").read_text())["rungs"]]
    if args.rung not in names:
        print(f"prefill_share: --rung {args.rung} is not a rung of {folder.name}'s ladder "
              f"({', '.join(names)})", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="lynx-prefill-") as tmp:
        rps, target, rows = one_schedule("default", args, None, target, Path(tmp))
        _, _, more = one_schedule("mixed", args, rps, target, Path(tmp))
    rows += more
    result = {"model": args.model, "served": served_folder(args).name,
              "offered_rps": rounded(args.load * rps, 3), "load": args.load,
              "requests": len(slo_pareto.schedule_for(args, rps)), "target_ms": target,
              "reps": args.reps, "rung": args.rung,
              "flags": {k: [*v, *(("--chunked-prefill-size", str(args.chunk)) if v else ())]
                        for k, v in SCHEDULES.items()},
              "mixed_baseline": "the median decode step of their batch-size bucket",
              "runs": rows, "summary": summarize(rows), "machine": machine_description()}
    write_json(args.out, result)
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
