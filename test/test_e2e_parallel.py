"""End to end: Lynx under SGLang's tensor and data parallel modes on the CPU (slow).

- Ranks come from SGLang's parallel state: at TP=2 / DP=2 Lynx's counters equal the single
  process's for the same requests (before, every TP rank exported as "rank 0": 2x counters).
- Every TP rank of a replica applies every policy version at the same forward step
  (``LYNX_APPLY_LOG`` records (rank, version, step) per scheduler process).
- One controller replica per DP rank (``<replica_id>/dp<rank>``), one per TP group.
CPU recipe (README): ``SGLANG_CPU_OMP_THREADS_BIND='0|1'`` gives each rank a core;
``SGLANG_NCCL_SO_PATH`` at a missing file keeps the CUDA build of torch from loading NCCL.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import httpx
import pytest

from lynx.deploy.dashboard import referenced_metric_names
from lynx.reference.tasks import arithmetic_prompt, heldout_problems
from lynx.serving.client import generate_greedy
from lynx.serving.metrics_reader import metric_sum, samples
from lynx.serving.server import SglangServer
from lynx_policy.testing import ControllerProcess, wait_until

pytestmark = pytest.mark.slow
POLICY = {"name": "budget", "budgets": [{"max_batch": 100000, "all_layers": 2}]}
COUNTERS = ("lynx_steps_total", "lynx_pruned_rows_total", "lynx_experts_kept_total",
            "lynx_experts_stock_union_total", "lynx_top1_kept_rows_total")
PROMPTS = [arithmetic_prompt(a, b) for a, b in heldout_problems(6)]


def _env(tmp_path: Path, name: str, controller: ControllerProcess | None = None,
         cores: str = "0|1") -> dict[str, str]:
    env = {"LYNX_ENABLED": "1", "LYNX_POLICY": json.dumps(POLICY),
           "LYNX_STATS_INTERVAL_S": "0.2", "LYNX_APPLY_LOG": str(tmp_path / f"{name}.jsonl"),
           "SGLANG_CPU_OMP_THREADS_BIND": cores,
           "SGLANG_NCCL_SO_PATH": str(tmp_path / "no-nccl" / "libnccl.so.2")}
    if controller:  # the link sealed with CURVE on tcp://, as deployed
        env.update(**controller.runtime_env(), LYNX_REPLICA_ID=name)
    return env


def _flush(url: str) -> dict[str, float]:
    """Counters once every rank's statistics window is closed. lynx_steps_total moves at
    every step and is read first; the others are windowed: a batched 1-token request after
    the interval closes the window on every rank that runs it (DP: its two requests go to
    both ranks) and, having no decode step, adds nothing to them itself."""
    time.sleep(0.5)
    steps = metric_sum(httpx.get(f"{url}/metrics", timeout=10).text, COUNTERS[0])
    generate_greedy(url, PROMPTS[:2], 1)
    time.sleep(0.5)
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return {COUNTERS[0]: steps, **{name: metric_sum(text, name) for name in COUNTERS[1:]}}


def _sequential(url: str) -> tuple[list[str], dict[str, float]]:
    """The same requests one at a time (a deterministic step sequence): outputs and the
    counters they moved (start-up warm-up excluded)."""
    before = _flush(url)
    steps_before = metric_sum(httpx.get(f"{url}/metrics", timeout=10).text, COUNTERS[0])
    texts = []
    for prompt in PROMPTS:
        completions, _ = generate_greedy(url, [prompt], 6)
        texts.append(completions[0].text)
    after = _flush(url)
    delta = {name: after[name] - before[name] for name in COUNTERS}
    delta[COUNTERS[0]] = after[COUNTERS[0]] - steps_before
    return texts, delta


def _applied(path: Path) -> dict[tuple[str, str], dict[int, int]]:
    """(dp_rank, tp_rank) -> {version: step} from an apply log."""
    out: dict[tuple[str, str], dict[int, int]] = {}
    for line in path.read_text().splitlines():
        record = json.loads(line)
        out.setdefault((record["dp_rank"], record["tp_rank"]), {})[record["version"]] = \
            record["step"]
    return out


@pytest.fixture(scope="module")
def single_process(tmp_path_factory) -> tuple[list[str], dict[str, float]]:
    from conftest import start_server

    tmp = tmp_path_factory.mktemp("single")
    server = start_server(tmp, "mixtral-mini", _env(tmp, "single", cores="0-1"))
    try:
        return _sequential(server.url)
    finally:
        server.stop()


@pytest.fixture
def parallel(tmp_path: Path, server_factory, single_process):  # type: ignore[no-untyped-def]
    """``start(name, args, replicas)``: a controller (CURVE on tcp://) and a server started
    with SGLang's parallel ``args``; once ``replicas`` replicas registered, the sequential
    requests give the single process's outputs and counters. Returns (controller, server,
    counters); controllers are stopped at the end."""
    controllers: list[ControllerProcess] = []

    def start(name: str, args: tuple[str, ...], replicas: int, extra_env: dict | None = None
              ) -> tuple[ControllerProcess, SglangServer, dict]:
        ctl = ControllerProcess.launch(tmp_path / "controller",
                                       overrides={"mode": "static", "policy": POLICY},
                                       curve=True)
        controllers.append(ctl)
        server = server_factory("mixtral-mini", env={**_env(tmp_path, name, ctl),
                                                     **(extra_env or {})}, extra_args=args)
        wait_until(f"{replicas} replica(s) registered", lambda: len(
            ctl.admin.get("/v1/replicas").json()["replicas"]) >= replicas, timeout_s=60)
        texts, counters = _sequential(server.url)
        assert texts == single_process[0]  # fp32 reference model: identical greedy outputs
        # DP: each request runs on one rank, the ranks' counters add up to the single process's
        assert counters == single_process[1], (counters, single_process[1])
        return ctl, server, counters

    yield start
    for ctl in controllers:
        ctl.stop()


def test_tensor_parallel_counts_once_and_switches_policy_on_the_same_step(
        tmp_path: Path, parallel) -> None:
    ctl, server, counters = parallel("tp2", ("--tp-size", "2"), replicas=1)
    assert counters["lynx_pruned_rows_total"] > 0
    replicas = ctl.admin.get("/v1/replicas").json()["replicas"]
    assert [r["replica_id"] for r in replicas] == ["tp2"]  # one link per TP group

    stop = threading.Event()

    def load() -> None:
        while not stop.is_set():
            generate_greedy(server.url, PROMPTS, 6, timeout_s=60)

    thread = threading.Thread(target=load, daemon=True)
    thread.start()
    versions = []
    try:  # the load stops also when an assertion fails
        for budget in (3, 2, 4, 2):
            policy = {"name": "budget",
                      "budgets": [{"max_batch": 100000, "all_layers": budget}]}
            assert ctl.admin.put("/v1/policy", json=policy).status_code == 200
            versions.append(ctl.admin.get("/v1/policy").json()["version"])
            wait_until("both ranks applied it", lambda v=versions[-1]: all(
                v in steps for steps in _applied(tmp_path / "tp2.jsonl").values())
                and len(_applied(tmp_path / "tp2.jsonl")) == 2, timeout_s=60)
    finally:
        stop.set()
        thread.join(timeout=120)
    applied = _applied(tmp_path / "tp2.jsonl")
    assert set(applied) == {("0", "0"), ("0", "1")}
    assert applied[("0", "0")] == applied[("0", "1")]  # every version, the same step
    assert set(versions) <= set(applied[("0", "0")])


def test_data_parallel_registers_one_replica_per_dp_rank_and_counts_once(
        tmp_path: Path, parallel) -> None:
    ctl, _, _ = parallel("dp2", ("--dp-size", "2"), replicas=2)
    names = sorted(r["replica_id"] for r in ctl.admin.get("/v1/replicas").json()["replicas"])
    assert names == ["dp2/dp0", "dp2/dp1"]
    applied = _applied(tmp_path / "dp2.jsonl")
    assert set(applied) == {("0", "0"), ("1", "0")}


def test_expert_parallel_serves_the_single_process_outputs_with_lynx(
        tmp_path: Path, parallel) -> None:
    """``--tp-size 2 --ep-size 2`` on the CPU engine (SGLang alone crashed at the first prefill:
    its native MoE cannot skip the other rank's -1 ids; `lynx.cpu_compat.moe_native`). With
    Lynx at budget 2 spent per EP rank (the default): the single process's greedy outputs and
    counters for one request at a time (TP rank 0 counts), both ranks apply the start-up
    policy at the same step, and under a batch the busiest rank's experts are exported for
    stock and Lynx routing, and each rank's expert time before the combine (LYNX_TIME_MOE)."""
    ctl, server, counters = parallel("ep2", ("--tp-size", "2", "--ep-size", "2"), replicas=1,
                                     extra_env={"LYNX_TIME_MOE": "1"})
    assert counters["lynx_pruned_rows_total"] > 0
    generate_greedy(server.url, PROMPTS, 6)  # one batch of 6 rows: a keep set per rank
    time.sleep(0.5)
    generate_greedy(server.url, PROMPTS[:2], 1)  # closes the window (no decode step)
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    busiest = {lab["routing"]: v for lab, v in samples(text, "lynx_ep_rank_experts_max")}
    mean = {lab["routing"]: v for lab, v in samples(text, "lynx_ep_rank_experts_mean")}
    assert 0 < busiest["lynx"] <= busiest["stock"] <= 4, busiest  # 8 experts on 2 ranks
    assert 0 < mean["lynx"] <= busiest["lynx"] and mean["stock"] <= busiest["stock"]
    pairs_max = {lab["routing"]: v for lab, v in samples(text, "lynx_ep_rank_pairs_max")}
    pairs_mean = {lab["routing"]: v for lab, v in samples(text, "lynx_ep_rank_pairs_mean")}
    assert pairs_mean["lynx"] == pairs_mean["stock"] > 0  # every row routes top-2 either way
    for routing in ("lynx", "stock"):  # the busiest of 2 ranks: between the mean and all
        assert pairs_mean[routing] <= pairs_max[routing] <= 2 * pairs_mean[routing], pairs_max
    # each rank times its own experts before the combine (the block timer includes the
    # all-reduce, so both ranks' block times converge to the slowest's)
    expert_s = {lab["tp_rank"]: v for lab, v in samples(text, "lynx_moe_expert_seconds_total")
                if lab.get("mode") == "decode"}
    assert set(expert_s) == {"0", "1"} and min(expert_s.values()) > 0, expert_s
    exported = {line.split("{")[0].split(" ")[0] for line in text.splitlines()
                if line and not line.startswith("#")}
    ep_panels = referenced_metric_names("ep")  # the dashboard's EP row reads live series
    assert ep_panels and ep_panels <= exported, ep_panels - exported
    assert [r["replica_id"] for r in ctl.admin.get("/v1/replicas").json()["replicas"]] == ["ep2"]
    applied = _applied(tmp_path / "ep2.jsonl")
    assert set(applied) == {("0", "0"), ("0", "1")}
    assert applied[("0", "0")] == applied[("0", "1")]
