"""SLO attainment against quality cost: stock (``off``), every rung of the ladder as a static
policy, and the ``adaptive`` controller planning over the ladder, on a replay of the Azure LLM
inference trace on the decode-bound testbed.

    python benchmark/slo_pareto.py [--quick] [--model qwen3-moe-128] [--reps 5]

1. One SGLang + Lynx server on the testbed (`benchmark.testbed`; ``--quick``: qwen3-moe-mini
   widened x16), the controller given the checkpoint's ladder (``PUT /v1/ladder``) and its
   latency model made ready by ``lynx-policy profile``.
2. Capacity: requests/s completed by 32 closed-loop clients sending the replay's own request
   mix with pruning off; one replay with pruning off as a warm-up (discarded); the replay
   (`benchmark.trace_replay`: ``--excerpt-s`` of the trace from ``--start-s``, clock
   compressed ``--time-scale``x) offers ``--load`` x that on average, its per-minute shape kept.
3. ``--reps`` repetitions, modes rotated in each: ``off`` and every ``static:<rung>`` once,
   scored against every target; ``adaptive`` once per target (SLO: P90 TPOT <= target).
   After the first repetition's statics the three targets are chosen from their P90 TPOTs
   (`benchmark.slo_pareto_score.choose_targets`), medians over a pilot (`pilot_passes`):
   those statics, ``off`` once more, and, while the pilot does not separate pruning from
   none, up to ``--pilot-passes`` more passes (unscored).
4. Non-stationary replay: the medium target, tightened to the tight one through the admin
   API at half time, and a CPU-hog neighbour (one busy process, started and stopped by this
   benchmark) for [25%, 60%) of the replay; adaptive against the first phase's oracle static
   and the tight target's, each request scored against the target in force when it was sent.
5. Step load (4 -> 48 -> 4 streams) under adaptive, at a median-ITL target of its own
   (`benchmark.slo_step`: between `off` and the lowest usable rung at 48 streams).
   ``--step-load-only`` runs steps 1 and 5 alone (~5 min) and writes only their keys.
Quality cost of a replay: the controller's ``lynx_controller_expected_quality_cost`` (ladder
costs of the tables applied, over the steps' batch mix) sampled every second, weighted by the
tokens generated in that second; routing mass kept from the plugin's counters.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmark import slo_pareto_score, trace_replay
from benchmark.common import OFF, RESULTS_DIR, machine_description, models_dir, rounded, write_json
from benchmark.serving_pair import ServingPair
from benchmark.slo_pareto_runs import apply_mode, nonstationary, replay, scored
from benchmark.slo_ramp import profile
from benchmark.slo_step import step_load

QUICK_MODEL, QUICK_WIDEN = "qwen3-moe-mini", 16


def controller_overrides(top_k: int, num_experts: int) -> dict[str, Any]:
    """1 s control loop; latency windows of 4 s, widened (doubling, up to 32 s) until a P90
    has 20 observations (min_tail_samples 2): at the replay's ~2.4 requests/s a 4 s window
    holds ~10 per-request TPOTs, so the default (50 for a P90) read no data in most ticks and
    adaptive held. The floor at top_k experts per layer."""
    return {"observe": {"rate_window_s": 4.0, "max_window_s": 32.0, "min_tail_samples": 2.0},
            "loop": {"interval_s": 1.0, "backoff_s": [1.0, 2.0], "stats_window_s": 5.0},
            "adaptive": {"relax_after_ticks": 3, "margin": 0.1, "headroom": 0.2,
                         "min_batch": 4, "max_step_experts": num_experts},
            "floor": {"min_budget": top_k}}


def capacity_rps(pair: ServingPair, unit: list[trace_replay.ReplayRequest], vocab: int,
                 seconds: float) -> float:
    """Requests/s that 32 closed-loop clients complete with the replay's request mix (its
    prompt and output lengths), pruning off: the capacity the offered load is a share of."""
    pair.set_policy(OFF)
    return asyncio.run(trace_replay.closed_loop_rps(pair.lynx.url, unit, vocab, 32, seconds))


def schedule_for(args: argparse.Namespace, rps: float) -> list[trace_replay.ReplayRequest]:
    return trace_replay.scale_trace(
        trace_replay.load_trace(), start_s=args.start_s, duration_s=args.excerpt_s,
        time_scale=args.time_scale, offered_rps=args.load * rps, max_context=args.max_context,
        max_prompt=args.max_prompt, max_output=args.max_output, prompt_scale=args.prompt_scale,
        output_scale=args.output_scale)


def pilot_passes(pair: ServingPair, schedule: list[trace_replay.ReplayRequest], vocab: int,
                 layers: int, statics: list[str], first: dict[str, dict[str, Any]],
                 ladder_order: list[str], usable: list[str], passes: int
                 ) -> dict[str, list[float]]:
    """P90 TPOTs [ms] the targets are chosen from: rep 0's statics (``first``), ``off`` once
    more after them (linear drift then weighs on ``off`` as on the rungs between its two
    replays), and, while the medians do not separate pruning from none
    (`slo_pareto_score.separated`), up to ``passes`` more passes of the statics in reverse
    order and ``off`` (discarded: not scored)."""
    samples = {m: [slo_pareto_score.p90_tpot_ms(r["timings"])] for m, r in first.items()}
    extra: list[list[str]] = [["off"]] + [[*reversed(statics[1:]), "off"]] * passes
    for number, modes in enumerate(extra):
        if number and slo_pareto_score.separated(slo_pareto_score.medians(samples),
                                                 ladder_order, usable):
            break
        for mode in modes:
            apply_mode(pair, mode, None)
            p90 = slo_pareto_score.p90_tpot_ms(replay(pair, schedule, vocab, layers)["timings"])
            samples.setdefault(mode, []).append(p90)
            print(f"[slo_pareto] pilot {mode}: P90 TPOT {p90:.1f} ms", flush=True)
    return samples


def run(pair: ServingPair, args: argparse.Namespace) -> dict[str, Any]:
    """Steps 1-5 of the module doc on a launched server and controller."""
    from lynx.serving.models import moe_shape, read_config
    from lynx_policy.config import QualityFloor
    from lynx_policy.rungs import usable_rungs
    from lynx_protocol.ladder import load_ladder

    config = read_config(pair.model_path)
    layers, experts, top_k = moe_shape(config)
    vocab = int(config["vocab_size"])
    ladder = load_ladder(pair.model_path / "lynx_ladder.json")
    pair.controller.admin.put("/v1/ladder", content=(
        pair.model_path / "lynx_ladder.json").read_bytes()).raise_for_status()
    usable = [ladder.rungs[i].name for i in usable_rungs(ladder, QualityFloor(min_budget=top_k))]
    prof = profile(pair, top_k, max(top_k, experts // 4), args.quick)
    if prof["rc"] != 0:  # adaptive would plan without a latency model
        if not args.quick:
            raise RuntimeError(f"lynx-policy profile failed (exit {prof['rc']}): see its output "
                               "above")
        # the smoke run goes on: a 2-core machine's noise can leave no model
        print("[slo_pareto] quick: the latency model is NOT ready (see the profile's reason "
              "above); adaptive runs on the controller's reactive rules", flush=True)
    if args.step_load_only:
        return {"model": args.model, "served": pair.model_path.name, "usable_rungs": usable,
                "profile": prof, "step_load": step_load(pair, usable[-1], args)}
    rps = capacity_rps(pair, schedule_for(args, 1.0), vocab, args.capacity_s)
    schedule = schedule_for(args, rps)
    print(f"[slo_pareto] {pair.model_path.name}: capacity {rps:.2f} req/s at C=32, replay of "
          f"{len(schedule)} requests over {schedule[-1].at_s:.0f} s, rungs {usable}", flush=True)
    apply_mode(pair, "off", None)  # warm-up, discarded: the first replay after start-up ran
    replay(pair, schedule, vocab, layers)  # 2x slower in P90 TPOT here and set the targets
    statics = ["off", *(f"static:{r}" for r in usable if r != "none")]
    adaptive = [f"adaptive:{t}" for t in slo_pareto_score.TARGETS]
    runs: list[dict[str, Any]] = []
    targets: dict[str, float] = {}
    apart = False
    pilot_p90: dict[str, list[float]] = {}
    for rep in range(args.reps):
        # rep 0: the statics first (the targets come from them); later: every mode rotated
        modes = statics + adaptive
        order = statics + adaptive if rep == 0 else modes[rep % len(modes):] + \
            modes[:rep % len(modes)]
        pilot: dict[str, dict[str, Any]] = {}
        for mode in order:
            target = mode.split(":", 1)[1] if mode in adaptive else None
            if target and not targets:
                order_names = [r.name for r in ladder.rungs]
                pilot_p90 = pilot_passes(pair, schedule, vocab, layers, statics, pilot,
                                         order_names, usable, args.pilot_passes)
                pilot_medians = slo_pareto_score.medians(pilot_p90)
                targets = slo_pareto_score.choose_targets(pilot_medians, order_names, usable)
                apart = slo_pareto_score.separated(pilot_medians, order_names, usable)
                print(f"[slo_pareto] targets (P90 TPOT, ms): {targets}"
                      + ("" if apart else " -- NOT SEPARATED: the pilot did not tell the "
                         "targets apart; this run cannot rank the modes"), flush=True)
                runs += [row for m, r in pilot.items() for row in scored(m, rep, r, targets)]
            apply_mode(pair, "adaptive" if target else mode,
                       targets[target] if target else None)
            result = replay(pair, schedule, vocab, layers)
            if target:
                runs += scored("adaptive", rep, result, targets, only=target)
            elif targets:
                runs += scored(mode, rep, result, targets)
            else:
                pilot[mode] = result
            print(f"[slo_pareto] rep {rep} {mode}: P90 TPOT "
                  f"{slo_pareto_score.p90_tpot_ms(result['timings']):.1f} ms, cost "
                  f"{result['quality_cost_ppl']}, mass kept {result['mass_kept']}, failed "
                  f"{result['failed']}", flush=True)
    pair.set_policy(OFF)
    summary = slo_pareto_score.summarize(runs)
    first_oracle = summary["medium"]["oracle"]["mode"]
    tight_oracle = summary["tight"]["oracle"]["mode"]
    ns = nonstationary(pair, schedule, vocab, layers, targets,
                       [first_oracle] if args.quick else [first_oracle, tight_oracle],
                       args.ns_reps)
    step = step_load(pair, usable[-1], args) if args.step_high_s > 0 else None
    return {"model": args.model, "served": pair.model_path.name, "capacity_rps": rounded(rps, 3),
            "load": args.load, "excerpt": {"start_s": args.start_s, "duration_s": args.excerpt_s,
                                           "time_scale": args.time_scale},
            "requests": len(schedule), "attribution": trace_replay.ATTRIBUTION,
            "targets_ms": targets, "targets_separated": apart,
            "pilot_p90_tpot_ms": {m: [rounded(v, 2) for v in vs] for m, vs in pilot_p90.items()},
            "usable_rungs": usable, "reps": args.reps,
            "rung_costs": {r.name: rounded(r.cost(), 6) for r in ladder.rungs},
            "profile": prof, "runs": runs, "summary": summary, "nonstationary": ns,
            "step_load": step}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one repetition, a short replay")
    parser.add_argument("--model", default=None, help="default: qwen3-moe-128 (quick: mini)")
    parser.add_argument("--widen", type=int, default=None, help="default: the testbed's")
    parser.add_argument("--reps", type=int, default=None, help="default 5 (quick 1)")
    parser.add_argument("--ns-reps", type=int, default=None, help="non-stationary: 2 (quick 1)")
    parser.add_argument("--pilot-passes", type=int, default=None,
                        help="extra pilot passes of the statics while the pilot does not "
                        "separate pruning from none (default 2, quick 0)")
    parser.add_argument("--load", type=float, default=0.9, help="offered / capacity")
    parser.add_argument("--start-s", type=float, default=2400.0)
    parser.add_argument("--excerpt-s", type=float, default=600.0)
    parser.add_argument("--time-scale", type=float, default=None, help="default 10 (quick 60)")
    parser.add_argument("--max-context", type=int, default=512)
    parser.add_argument("--max-prompt", type=int, default=64)
    parser.add_argument("--max-output", type=int, default=None, help="default 64 (quick 16)")
    parser.add_argument("--prompt-scale", type=float, default=0.05)
    parser.add_argument("--output-scale", type=float, default=None,
                        help="default 0.25 (quick 0.1)")
    parser.add_argument("--capacity-s", type=float, default=None, help="default 20 (quick 6)")
    parser.add_argument("--step-high-s", type=float, default=None,
                        help="step load's high stage; 0 skips it (default 20, quick 6)")
    parser.add_argument("--step-output-len", type=int, default=32)
    parser.add_argument("--step-load-only", action="store_true",
                        help="steps 1 and 5 only (module doc); writes only their keys")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="keep the server's and controller's logs here (default: a "
                        "temporary directory, removed)")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "slo_pareto.json")
    args = parser.parse_args(argv)
    q = args.quick
    for name, quick, full in (("model", QUICK_MODEL, "qwen3-moe-128"), ("reps", 1, 5),
                              ("ns_reps", 1, 2), ("pilot_passes", 0, 2),
                              ("time_scale", 60.0, 10.0),
                              ("max_output", 16, 64), ("output_scale", 0.1, 0.25),
                              ("capacity_s", 6.0, 20.0), ("step_high_s", 6.0, 20.0)):
        if getattr(args, name) is None:
            setattr(args, name, quick if q else full)
    bad = [name for name, ok in (
        ("--reps >= 1", args.reps >= 1), ("--ns-reps >= 1", args.ns_reps >= 1),
        ("--pilot-passes >= 0", args.pilot_passes >= 0),
        ("0 < --load <= 4", 0 < args.load <= 4), ("--excerpt-s > 0", args.excerpt_s > 0),
        ("--time-scale > 0", args.time_scale > 0), ("--capacity-s > 0", args.capacity_s > 0),
        ("--step-high-s >= 0", args.step_high_s >= 0),
        ("--step-high-s > 0 with --step-load-only",
         args.step_high_s > 0 or not args.step_load_only),
        ("--widen a power of two", args.widen is None or (
            args.widen >= 1 and not args.widen & (args.widen - 1))))
        if not ok]
    if bad:
        parser.error("need " + ", ".join(bad))
    return args


def main(argv: list[str] | None = None) -> int:
    from benchmark import slo_pareto_report, testbed
    from benchmark.e2e_decode import widened

    args = parse_args(argv)
    # SIGTERM (a CI timeout, `kill`) unwinds like Ctrl-C: the server and controller stop
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if not (models_dir() / args.model / "config.json").is_file():
        print(f"slo_pareto: no checkpoint {args.model} under {models_dir()}", file=sys.stderr)
        return 2
    try:  # the trace file and the excerpt, before any server starts
        schedule_for(args, 1.0)
    except (OSError, ValueError) as exc:
        print(f"slo_pareto: {exc}", file=sys.stderr)
        return 2
    from lynx.serving.models import moe_shape, read_config

    _, experts, top_k = moe_shape(read_config(models_dir() / args.model))
    folder = (widened(args.model, args.widen or QUICK_WIDEN) if args.quick
              else testbed.build(args.model, args.widen))
    if args.workdir:
        args.workdir.mkdir(parents=True, exist_ok=True)
    with ServingPair.launch(folder, args.workdir, with_stock=False,
                            extra_args=testbed.SERVER_FLAGS,
                            controller_overrides=controller_overrides(top_k, experts)) as pair:
        result = run(pair, args)
    result["machine"] = machine_description()
    write_json(args.out, result)
    if args.step_load_only:
        print(slo_pareto_report.step_line(result["step_load"]))
        return 0
    png = slo_pareto_report.plot(result, args.out.with_suffix(".png"))
    print(slo_pareto_report.markdown(result, png.name))
    return 0


if __name__ == "__main__":
    sys.exit(main())
