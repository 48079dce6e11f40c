"""Expert parallelism served on this CPU: four arms, interleaved.

    python benchmark/ep_serving.py [--model qwen3-moe-128] [--widen 64] [--reps 3]
        [--budget 32] [--aware-budget 36] [--concurrency 16] [--quick]

Arms, each its own SGLang server (``--tp-size 2``, one core per rank), started once; every
repetition times them in a shuffled order:

- ``tp2``: ``--tp-size 2``, ``LYNX_ENABLED=0`` (stock SGLang);
- ``ep2``: ``--tp-size 2 --ep-size 2``, Lynx with policy ``off``: stock routing. The plugin
  must be on: SGLang 0.5.23's CPU MoE cannot skip the other rank's -1 ids and crashes at the
  first prefill without `lynx.cpu_compat.moe_native`;
- ``ep2-global``: EP with a ``budget`` policy spent globally (``LYNX_EP_BALANCE=0``);
- ``ep2-aware``: a budget spent per EP rank (``LYNX_EP_BALANCE=1``, the default), at
  ``--aware-budget`` (default: ``--budget``). At the same m the per-rank level keeps a little
  less routing mass than the global budget (a rank with fewer union experts than the level
  cannot fill up: 0.874 vs 0.897 at m = 32), so the comparison at equal routing mass runs it
  at a higher m; `mass_matched` says whether it kept at least the global arm's mass. Four
  servers of the x64 testbed fill this machine's memory (a fifth was OOM-killed).

Per arm and repetition:
- quality: greedy answers to held-out additions, batched ``--concurrency`` at a time: the share
  identical to ``tp2``'s answer text, and exact match (EM) on the problems;
- TPOT: SGLang's serving benchmark at ``--concurrency`` (random-ids prompts, fixed lengths);
- per-rank expert time before the combine (``LYNX_TIME_MOE=1``, the EP arms): ms per decode
  step of each rank; an MoE step waits for the slowest (``busiest_rank_ms``);
- the EP gauges, sampled every second during the timed run (medians): experts and token pairs
  on the busiest rank, Lynx's routing and the batch's stock routing; routing mass kept.

Writes ``results/ep_serving.json`` (medians over repetitions per arm, and every run).
"""

from __future__ import annotations

import argparse
import contextlib
import random
import statistics
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx

from benchmark.common import RESULTS_DIR, machine_description, rounded, write_json
from benchmark.serving_bench import serving_benchmark
from lynx.reference.tasks import arithmetic_prompt, heldout_problems, parse_answer
from lynx.serving.client import generate_greedy
from lynx.serving.metrics_reader import samples
from lynx.serving.server import DECODE_BOUND_FLAGS, SglangServer, free_port

ARMS = ("tp2", "ep2", "ep2-global", "ep2-aware")
GAUGES = ("lynx_ep_rank_experts_max", "lynx_ep_rank_experts_mean", "lynx_ep_rank_pairs_max",
          "lynx_ep_rank_pairs_mean")


def arm_server(arm: str, model: Path, budget: int, work: Path,
               aware_budget: int | None = None) -> SglangServer:
    """The server of one arm (not started); ``ep2-aware`` at ``aware_budget`` if given."""
    if arm == "ep2-aware" and aware_budget is not None:
        budget = aware_budget
    env = {"OMP_NUM_THREADS": "1", "SGLANG_CPU_OMP_THREADS_BIND": "0|1",
           "SGLANG_NCCL_SO_PATH": str(work / "no-nccl" / "libnccl.so.2")}
    args = ("--tp-size", "2", *DECODE_BOUND_FLAGS)
    if arm == "tp2":
        env["LYNX_ENABLED"] = "0"
    else:
        args = (*args, "--ep-size", "2")
        policy = ('{"name":"off"}' if arm == "ep2" else '{"name":"budget","budgets":'
                  f'[{{"max_batch":1048576,"all_layers":{budget}}}]}}')
        env.update(LYNX_ENABLED="1", LYNX_POLICY=policy, LYNX_TIME_MOE="1",
                   LYNX_STATS_INTERVAL_S="0.5",
                   LYNX_EP_BALANCE="0" if arm == "ep2-global" else "1")
    return SglangServer(model, free_port(), env=env, extra_args=args,
                        log_path=work / f"sglang-{arm}.log", ready_timeout_s=900)


def answers(url: str, problems: int, batch: int) -> list[str]:
    """Greedy answer texts to the first ``problems`` held-out additions, ``batch`` per call."""
    pairs = heldout_problems(problems)
    texts: list[str] = []
    for start in range(0, len(pairs), batch):
        chunk = pairs[start:start + batch]
        done, _ = generate_greedy(url, [arithmetic_prompt(a, b) for a, b in chunk], 12,
                                  timeout_s=900)
        texts += [c.text for c in done]
    return texts


def exact_match(texts: list[str]) -> float:
    pairs = heldout_problems(len(texts))
    return sum(parse_answer(t) == a + b for t, (a, b) in zip(texts, pairs, strict=True)
               ) / len(texts)


def metric_sums(url: str) -> dict[str, Any]:
    """Per-rank decode expert seconds, decode steps, routing mass counters and EP gauges."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    out: dict[str, Any] = {"expert_s": {}, "steps": 0.0, "mass_kept": 0.0, "mass": 0.0}
    for labels, value in samples(text, "lynx_moe_expert_seconds_total"):
        if labels.get("mode") == "decode":
            rank = labels.get("tp_rank", "0")
            out["expert_s"][rank] = out["expert_s"].get(rank, 0.0) + value
    out["steps"] = sum(v for lab, v in samples(text, "lynx_step_duration_seconds_count")
                       if lab.get("mode") == "decode")
    out["mass_kept"] = sum(v for _, v in samples(text, "lynx_routing_mass_kept_total"))
    out["mass"] = sum(v for _, v in samples(text, "lynx_routing_mass_total"))
    for name in GAUGES:
        for labels, value in samples(text, name):
            out[f"{name}:{labels.get('routing', '')}"] = value
    return out


class GaugeSampler:
    """Samples the EP gauges every ``period_s`` while a timed run goes on (they describe the
    last statistics window only)."""

    def __init__(self, url: str, period_s: float = 1.0) -> None:
        self.url, self.period_s = url, period_s
        self.values: dict[str, list[float]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.period_s):
            with contextlib.suppress(httpx.HTTPError):
                for key, value in metric_sums(self.url).items():
                    if ":" in key:
                        self.values.setdefault(key, []).append(float(value))

    def __enter__(self) -> GaugeSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def medians(self) -> dict[str, float]:
        return {k: rounded(statistics.median(v), 3) for k, v in sorted(self.values.items())}


def one_run(arm: str, server: SglangServer, args: argparse.Namespace, work: Path, rep: int,
            reference: list[str] | None) -> tuple[dict[str, Any], list[str]]:
    """One timed run of one arm: (its row, its answer texts)."""
    texts = answers(server.url, args.problems, args.concurrency)
    before = metric_sums(server.url) if arm != "tp2" else None
    with GaugeSampler(server.url) as sampler:
        result = serving_benchmark(
            server.url, args.model_path, work / f"{arm}-{rep}.jsonl", prompts=args.prompts,
            input_len=args.input_len, output_len=args.output_len,
            max_concurrency=args.concurrency, seed=rep)
    run: dict[str, Any] = {
        "arm": arm, "rep": rep, "median_tpot_ms": rounded(result["median_tpot_ms"], 3),
        "completed": int(result["completed"]), "exact_match": rounded(exact_match(texts)),
        "same_as_tp2": (rounded(sum(a == b for a, b in zip(texts, reference, strict=True))
                                / len(texts)) if reference is not None else 1.0)}
    if before is not None:
        after = metric_sums(server.url)
        steps = after["steps"] - before["steps"]
        per_rank = {rank: rounded((after["expert_s"][rank] - before["expert_s"].get(rank, 0.0))
                                  * 1e3 / max(steps, 1.0), 4)
                    for rank in sorted(after["expert_s"])}
        mass = after["mass"] - before["mass"]
        run.update(decode_steps=steps, rank_expert_ms=per_rank,
                   busiest_rank_ms=max(per_rank.values()) if per_rank else None,
                   mass_kept=rounded((after["mass_kept"] - before["mass_kept"]) / mass)
                   if mass else 1.0, gauges=sampler.medians())
    return run, texts


def mass_matched(summary: dict[str, dict[str, Any]]) -> bool | None:
    """Did the per-rank arm keep at least the global budget's median routing mass (then the
    two compare at equal routing mass)? None when either arm is missing."""
    glob, aware = summary.get("ep2-global", {}), summary.get("ep2-aware", {})
    if "mass_kept" not in glob or "mass_kept" not in aware:
        return None
    return bool(aware["mass_kept"] >= glob["mass_kept"])


def summarise(runs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for arm in ARMS:
        mine = [r for r in runs if r["arm"] == arm]
        if not mine:
            continue
        row: dict[str, Any] = {}
        for key in ("median_tpot_ms", "exact_match", "same_as_tp2", "busiest_rank_ms",
                    "mass_kept"):
            values = [r[key] for r in mine if r.get(key) is not None]
            if values:
                row[key] = rounded(statistics.median(values), 4)
        gauges = {k for r in mine for k in r.get("gauges", {})}
        for key in sorted(gauges):
            values = [r["gauges"][key] for r in mine if key in r.get("gauges", {})]
            row[key.replace("lynx_ep_rank_", "")] = rounded(statistics.median(values), 3)
        out[arm] = row
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="qwen3-moe-128")
    parser.add_argument("--widen", type=int, default=64)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--budget", type=int, default=32, help="experts per layer (global m)")
    parser.add_argument("--aware-budget", type=int, default=None,
                        help="experts per layer of the per-rank arm (default: --budget; "
                        "higher to compare at the global arm's routing mass)")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--problems", type=int, default=64)
    parser.add_argument("--input-len", type=int, default=64)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--quick", action="store_true", help="1 repetition, small runs")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "ep_serving.json")
    args = parser.parse_args(argv)
    if args.quick:
        args.reps, args.prompts, args.problems, args.output_len = 1, 16, 16, 16
    if args.aware_budget is None:
        args.aware_budget = args.budget
    for name in ("reps", "budget", "aware_budget", "concurrency", "prompts", "problems",
                 "input_len", "output_len", "widen"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    from benchmark.testbed import build

    args.model_path = build(args.model, args.widen)
    runs: list[dict[str, Any]] = []
    rng = random.Random(0)
    with tempfile.TemporaryDirectory(prefix="lynx-ep-serving-") as tmp:
        work = Path(tmp)
        servers = {arm: arm_server(arm, args.model_path, args.budget, work, args.aware_budget)
                   for arm in ARMS}
        try:
            for server in servers.values():  # one at a time: loading peaks stay apart
                server.start()
            reference = answers(servers["tp2"].url, args.problems, args.concurrency)
            for rep in range(args.reps):
                order = list(servers)
                rng.shuffle(order)
                for arm in order:
                    run, _ = one_run(arm, servers[arm], args, work, rep, reference)
                    runs.append(run)
                    print(f"[ep] rep {rep} {arm}: TPOT {run['median_tpot_ms']:.1f} ms, "
                          f"busiest rank {run.get('busiest_rank_ms')} ms/step, EM "
                          f"{run['exact_match']:.3f}, same as tp2 {run['same_as_tp2']:.3f}",
                          flush=True)
        finally:
            for server in servers.values():
                server.stop()
    summary = summarise(runs)
    payload = {"machine": machine_description(), "model": f"{args.model}-wide{args.widen}-f32",
               "budget": args.budget, "aware_budget": args.aware_budget,
               "mass_matched": mass_matched(summary), "concurrency": args.concurrency,
               "reps": args.reps,
               "input_len": args.input_len, "output_len": args.output_len,
               "problems": args.problems,
               "summary": summary, "runs": runs}
    write_json(args.out, payload)
    for arm, row in summary.items():
        print(arm, row)


if __name__ == "__main__":
    main()
