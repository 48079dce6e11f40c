"""The accuracy gate (`lynx.evaluate`): lm-eval task definitions of the held-out tasks, the
paired deltas, one-line refusals, and the gate end to end against real CPU servers (slow):
the default policy passes, a planted policy that breaks accuracy (budget 1 on a top-4 model)
fails."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lynx.evaluate.gate import GateError, TaskScores, check_tasks, paired_delta, primary_metric
from lynx.evaluate.tasks import task_names, write_tasks
from lynx.reference.tasks import TASKS, answer_text, arithmetic_prompt


def test_the_task_files_hold_the_heldout_problems_and_lm_eval_loads_them(tmp_path: Path
                                                                         ) -> None:
    names = write_tasks(tmp_path, limit=8)
    assert names == task_names() == ["lynx_add3", "lynx_add4"]
    rows = [json.loads(line) for line in (tmp_path / "lynx_add4.jsonl").read_text().splitlines()]
    a, b = TASKS["add4"].heldout_problems(8)[3]
    assert rows[3] == {"prompt": arithmetic_prompt(a, b), "answer": answer_text(a, b)}
    config = yaml.safe_load((tmp_path / "lynx_add3.yaml").read_text())
    assert config["output_type"] == "generate_until" and config["tag"] == ["lynx_heldout"]
    # the group expands to both tasks, read from the files (offline)
    assert check_tasks(["lynx_heldout"], [tmp_path]) == ["lynx_add3", "lynx_add4"]
    with pytest.raises(ValueError, match="limit"):
        write_tasks(tmp_path, limit=0)


def test_tasks_that_cannot_reach_lynx_are_refused_in_one_line(tmp_path: Path) -> None:
    write_tasks(tmp_path, limit=4)
    scored = {**yaml.safe_load((tmp_path / "lynx_add3.yaml").read_text()),
              "task": "prefill_scored", "output_type": "loglikelihood", "tag": []}
    (tmp_path / "prefill_scored.yaml").write_text(yaml.safe_dump(scored))
    for tasks, message in ((["prefill_scored"], "only generate_until"),
                           (["no_such_task"], "unknown lm-eval task")):
        with pytest.raises(GateError, match=message) as info:
            check_tasks(tasks, [tmp_path])
        assert "\n" not in str(info.value)


def test_the_paired_delta_and_its_standard_error() -> None:
    stock = TaskScores("t", "exact_match,f", {i: 1.0 for i in range(10)})
    lynx = TaskScores("t", "exact_match,f", {**{i: 1.0 for i in range(8)}, 8: 0.0, 9: 0.0,
                                             10: 1.0})  # doc 10: scored on one side only
    delta = paired_delta(stock, lynx, threshold=1.0)
    assert delta.n == 10 and delta.stock == 100.0 and delta.lynx == 80.0
    assert delta.delta == -20.0 and not delta.passed
    # d = [0]*8 + [-1, -1]: stdev 0.4216, / sqrt(10) -> 13.33 points
    assert delta.stderr == pytest.approx(13.333, abs=1e-3)
    assert paired_delta(stock, stock, threshold=0.0).passed  # no drop passes at 0
    assert primary_metric({"alias": "t", "exact_match,f": 1, "exact_match_stderr,f": 0}) == \
        "exact_match,f"
    with pytest.raises(GateError, match="no common document"):
        paired_delta(stock, TaskScores("t", "exact_match,f", {99: 1.0}), threshold=1.0)


def _evaluate(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "lynx.serving.cli", "evaluate",
                           "--model", "qwen3-moe-mini", "--tasks", "lynx_add3",
                           "--limit", "64", "--concurrency", "16", *args],
                          capture_output=True, text=True, timeout=900)


def test_bad_gate_input_is_one_line_and_exit_2(tmp_path: Path) -> None:
    for args, message in ((("--concurrency", "4"), "--concurrency >= 16"),
                          (("--include-path", str(tmp_path / "none")), "is not a folder"),
                          (("--policy", '{"name": "budget"}'), "LYNX_POLICY")):
        done = _evaluate(*args)
        assert done.returncode == 2, done.stderr[-500:]
        assert done.stderr.startswith("lynx-serve: error: ") and message in done.stderr


@pytest.mark.slow  # three CPU servers (one stock, two Lynx) and lm-eval
def test_the_gate_passes_the_default_and_fails_a_policy_that_breaks_accuracy(
        tmp_path: Path) -> None:
    from lynx.serving.models import resolve_model
    from lynx.serving.server import SglangServer, free_port

    with SglangServer(resolve_model("qwen3-moe-mini"), free_port(),
                      env={"LYNX_ENABLED": "0"}) as stock:
        passed = _evaluate("--stock-url", stock.url, "--out", str(tmp_path / "default.json"))
        broken = _evaluate("--stock-url", stock.url, "--out", str(tmp_path / "budget1.json"),
                           "--policy", '{"name": "budget", "budgets": '
                           '[{"max_batch": 1048576, "all_layers": 1}]}')
    assert passed.returncode == 0, passed.stdout + passed.stderr[-3000:]
    good = json.loads((tmp_path / "default.json").read_text())
    assert good["passed"] and good["lynx_server"]["pruned_rows"] > 0  # it did prune
    (task,) = good["tasks"]
    assert task["task"] == "lynx_add3" and task["n"] == 64 and task["stock"] > 90
    assert broken.returncode == 1, broken.stdout + broken.stderr[-3000:]
    bad = json.loads((tmp_path / "budget1.json").read_text())
    (task,) = bad["tasks"]
    assert not bad["passed"] and task["delta"] < -10 and task["stderr"] > 0
    assert "FAIL" in broken.stdout
