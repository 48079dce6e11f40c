"""Plugin configuration, registration and per-step state (no server)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import msgspec
import pytest
import torch
from conftest import reference_model

from lynx.sglang_plugin.config import LynxConfigError, default_policy, load_config
from lynx.sglang_plugin.step_state import NO_LIMIT, RuntimeState, StepLayout
from lynx_protocol.policy import (
    POLICY_NAMES,
    BudgetBucket,
    PolicyError,
    PolicySpec,
    validate_for_replica,
)


def test_disabled_by_default_and_enabled_by_env() -> None:
    assert not load_config({}).enabled
    assert load_config({"LYNX_ENABLED": "1"}).enabled
    assert not load_config({"LYNX_ENABLED": "0"}).enabled
    assert load_config({"LYNX_ENABLED": "1"}).compile_cache is None  # the default directory
    assert load_config({"LYNX_ENABLED": "1"}).ep_balance  # per EP rank unless switched off
    assert not load_config({"LYNX_ENABLED": "1", "LYNX_EP_BALANCE": "0"}).ep_balance
    assert load_config({"LYNX_ENABLED": "1", "LYNX_COMPILE_CACHE": "/srv/lynx"}).compile_cache \
        == Path("/srv/lynx")


@pytest.mark.parametrize(("env", "message"), [
    ({"LYNX_POLICY": '{"name": "magic"}'}, "LYNX_POLICY: invalid policy"),
    ({"LYNX_POLICY": '{"name": "affinity", "alpha": -1}'}, "Expected `float` > 0.0 - at `$.alpha`"),
    ({"LYNX_POLICY": '{"name": "budget"}'}, "needs at least one entry"),
    ({"LYNX_POLICY": "{oops"}, "not valid JSON"),
    ({"LYNX_POLICY": '{"name": "off", "typo": 1}'}, "invalid policy"),
    ({"LYNX_POLICY_FILE": "/nonexistent/policy.json"}, "cannot read /nonexistent/policy.json"),
    ({"LYNX_CONTROLLER": "http://x"}, "expected ipc://PATH or tcp://HOST:PORT"),
    ({"LYNX_STALE_AFTER_S": "-3"}, "must be > 0"),
    ({"LYNX_STATS_INTERVAL_S": "soon"}, "is not a number"),
    ({"LYNX_TIME_MOE": "maybe"}, "LYNX_TIME_MOE='maybe': expected 1 or 0"),
    ({"LYNX_POLICY": '{"name": "off", "prune_verify": "yes"}'}, "invalid policy"),
    ({"LYNX_COMPILE_CACHE": "/etc/hostname"}, "exists and is not a directory"),
    ({"LYNX_EP_BALANCE": "per-rank"}, "LYNX_EP_BALANCE='per-rank': expected 1 or 0"),
    ({"LYNX_STEP_TRACE": "/nonexistent/steps.jsonl"}, "expected a file in an existing directory"),
    ({"LYNX_STEP_TRACE": "/tmp"}, "LYNX_STEP_TRACE=/tmp: expected a file"),
    ({"LYNX_POLICY": '{"name": "off"}', "LYNX_LADDER_RUNG": "m12"},
     "not LYNX_POLICY and LYNX_LADDER_RUNG"),
])
def test_bad_config_is_a_clear_error(env: dict[str, str], message: str) -> None:
    with pytest.raises(LynxConfigError) as info:
        load_config({"LYNX_ENABLED": "1", **env})
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_plugin_registers_nothing_when_disabled_and_everything_when_enabled() -> None:
    code = (
        "import os, lynx.sglang_plugin as p\n"
        "from sglang.srt.plugins.hook_registry import HookRegistry\n"
        "p.install(); print(len(HookRegistry._hooks))\n"
        "os.environ['LYNX_ENABLED'] = '1'; p.install(); print(sorted(HookRegistry._hooks))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, env={"PATH": "/usr/bin:/bin"})
    lines = out.stdout.strip().splitlines()
    assert lines[0] == "0", out.stderr[-2000:]
    targets = eval(lines[1])  # a printed list of strings
    assert "sglang.srt.layers.moe.topk.TopK.forward_native" in targets
    assert "sglang.srt.layers.moe.topk.TopK.forward_cuda" in targets
    assert "sglang.srt.layers.moe.topk.TopK.forward_cpu" in targets
    assert "sglang.srt.model_executor.model_runner.ModelRunner.forward" in targets
    # a mixed step's decode rows as SGLang counted them
    assert "sglang.srt.model_executor.forward_batch_info.ForwardBatch.init_new" in targets
    # EP: SGLang's batch-1 compiled MoE path, -1 ids safe on every device
    assert "sglang.srt.layers.moe.fused_moe_native.fused_moe_forward_native" in targets


def test_entry_point_is_installed() -> None:
    from importlib.metadata import entry_points

    names = {ep.name: ep.value for ep in entry_points(group="sglang.srt.plugins")}
    assert names.get("lynx") == "lynx.sglang_plugin:install"
    assert names.get("lynx_cpu_compat") == "lynx.cpu_compat.hooks:install"


@pytest.mark.parametrize("engine", ["0", "1"])
def test_cpu_compat_hooks_register_on_the_cpu_engine_only(engine: str) -> None:
    """Verify attention, both native MoE paths (EP's -1 ids), batched decode attention and
    Qwen2-MoE's shared-expert gate on the CPU engine, nothing elsewhere; a second install adds
    nothing."""
    code = ("from lynx.cpu_compat.hooks import install\n"
            "from sglang.srt.plugins.hook_registry import HookRegistry\n"
            "install(); install(); print(sorted((k, len(v)) for k, v in "
            "HookRegistry._hooks.items()))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, env={"PATH": "/usr/bin:/bin",
                                           "SGLANG_USE_CPU_ENGINE": engine})
    hooks = dict(eval(out.stdout.strip().splitlines()[-1]))  # a printed list of pairs
    native = "sglang.srt.layers.moe.fused_moe_native"
    want = {f"{native}.moe_forward_native": 1, f"{native}.fused_moe_forward_native": 1,
            "sglang.srt.layers.attention.torch_native_backend.TorchNativeAttnBackend."
            "forward_extend": 1,
            "sglang.srt.layers.attention.torch_native_backend.TorchNativeAttnBackend."
            "_run_sdpa_forward_decode": 1,
            "sglang.kernels.ops.elementwise.elementwise.fused_gate_sigmoid_mul_add": 1}
    assert hooks == (want if engine == "1" else {}), out.stderr[-2000:]


def _state(policy: PolicySpec, layers: int = 3) -> RuntimeState:
    return RuntimeState(layers, 8, 2, torch.device("cpu"), policy)


def test_step_knobs_follow_layout_and_buckets() -> None:
    policy = PolicySpec(name="budget", budgets=[
        BudgetBucket(max_batch=3, all_layers=8),
        BudgetBucket(max_batch=16, per_layer=[4, 5, 6]),
        BudgetBucket(max_batch=1000, all_layers=3),
    ])
    state = _state(policy)
    assert not state.begin_step(StepLayout("decode", 2, 0))  # budget 8 = all experts: no pruning
    assert not bool(state.knobs.enabled)
    assert state.begin_step(StepLayout("decode", 10, 0))
    assert state.knobs.budget.tolist() == [4, 5, 6] and bool(state.knobs.enabled)
    assert state.begin_step(StepLayout("decode", 40, 0))
    assert state.knobs.budget.tolist() == [3, 3, 3]
    assert not state.begin_step(StepLayout("prefill", 40, 40))  # prefill rows never pruned
    assert state.begin_step(StepLayout("mixed", 50, 10))  # 40 decode rows at the tail
    assert int(state.knobs.prunable_start) == 10 and int(state.knobs.n_valid) == 50


def test_staged_policy_applies_at_next_step() -> None:
    state = _state(PolicySpec(name="off"))
    assert not state.begin_step(StepLayout("decode", 32, 0))
    state.stage_policy(PolicySpec(name="budget", budgets=[BudgetBucket(1000, all_layers=2)]), 7)
    assert state.policy_version == 0  # not before the step boundary
    assert state.begin_step(StepLayout("decode", 32, 0))
    assert state.policy_version == 7 and state.knobs.budget.tolist() == [2, 2, 2]
    # what reaches stage_policy was validated at a trust boundary, against this replica:
    bad = PolicySpec(name="budget", budgets=[BudgetBucket(9, per_layer=[1, 2])])
    with pytest.raises(PolicyError, match="per_layer has 2 entries"):
        validate_for_replica(bad, replica="r", policies=POLICY_NAMES, num_layers=3,
                             num_experts=8, top_k=2)
    state.stage_policy(PolicySpec(name="budget", prune_mixed=False,
                                  budgets=[BudgetBucket(1000, all_layers=2)]), 9)
    assert not state.begin_step(StepLayout("mixed", 50, 10))


def test_default_policy_scales_with_model_shape() -> None:
    mixtral = default_policy(8, 2)
    # 2k + 1 where E/2 is smaller: 4 of 8 cost mixtral-mini 1.2 points in the lm-eval gate
    assert mixtral.budgets[-1].all_layers == 5 and mixtral.budgets[0].all_layers == 8
    qwen = default_policy(64, 4)
    assert qwen.budgets[-1].all_layers == 32
    assert default_policy(32, 8).budgets[-1].all_layers == 17
    assert default_policy(4, 2).budgets[-1].all_layers == 4  # never above E
    assert NO_LIMIT > 1_000_000


def test_bad_config_stops_the_process_instead_of_serving_stock() -> None:
    # SGLang's load_plugins swallows ordinary exceptions; a bad Lynx config must not be ignored.
    code = "from sglang.srt.plugins import load_plugins; load_plugins(); print('served stock')"
    env = {"PATH": "/usr/bin:/bin", "LYNX_ENABLED": "1", "LYNX_POLICY": '{"name": "magic"}'}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, env=env)
    assert out.returncode != 0
    assert "served stock" not in out.stdout
    assert "lynx: invalid configuration: LYNX_POLICY: invalid policy" in out.stderr


def test_cli_rejects_bad_policy_before_starting_a_server() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "lynx.serving.cli", "serve", "mixtral-mini", "--lynx",
         "--policy", '{"name": "budget"}'], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert out.stderr.strip() == (
        "lynx-serve: error: LYNX_POLICY: policy 'budget' needs at least one entry in 'budgets'")


def _prepared(folder: Path, policy: PolicySpec | None = None, rung: str = "") -> RuntimeState:
    """`LynxRuntime.prepare` on a model runner whose checkpoint lives in ``folder`` (the
    reference qwen3-moe-mini's config: 4 MoE layers, 32 experts, top-4)."""
    from types import SimpleNamespace

    from transformers import AutoConfig

    from lynx.sglang_plugin.config import PluginConfig
    from lynx.sglang_plugin.ranks import ParallelRanks
    from lynx.sglang_plugin.runtime import LynxRuntime

    config = PluginConfig(enabled=True, policy=policy, controller=None, replica_id="t",
                          stale_after_s=10.0, safe_policy=None, stats_interval_s=3600.0,
                          compile=False, ladder_rung=rung)
    runner = SimpleNamespace(device="cpu", model=None, model_config=SimpleNamespace(
        hf_config=AutoConfig.from_pretrained(reference_model("qwen3-moe-mini")),
        model_path=str(folder)))
    return LynxRuntime(config).prepare(runner, ranks=ParallelRanks(1, 2, 0, 1))


def test_a_checkpoint_ships_its_calibrated_policy(tmp_path: Path) -> None:
    table = PolicySpec(name="budget", budgets=[
        BudgetBucket(max_batch=3, all_layers=32),
        BudgetBucket(max_batch=1_000_000, per_layer=[24, 8, 12, 16])])
    assert _prepared(tmp_path).policy == default_policy(32, 4)  # none shipped: the default
    (tmp_path / "lynx_policy.json").write_bytes(msgspec.json.encode(table))
    assert _prepared(tmp_path).policy == table  # the checkpoint's calibration
    explicit = PolicySpec(name="off")
    assert _prepared(tmp_path, explicit).policy == explicit  # LYNX_POLICY wins
    (tmp_path / "lynx_policy.json").write_text('{"name": "budget", "budgets": [{"max_batch": '
                                               '8, "per_layer": [4, 4]}]}')
    with pytest.raises(LynxConfigError, match=r"lynx_policy.json: .*layers"):
        _prepared(tmp_path)  # a table for another model: named, and the server stops
    (tmp_path / "lynx_policy.json").write_text("{not json")
    with pytest.raises(LynxConfigError, match="the checkpoint's calibrated policy"):
        _prepared(tmp_path)


def test_a_runtime_starts_on_a_rung_of_the_checkpoints_ladder(tmp_path: Path) -> None:
    """``LYNX_LADDER_RUNG``: the rung's tables under the ladder's batch rule; a missing,
    damaged or mismatched ladder, or an unknown rung, stops the server with the file named."""
    from ladders import mini_ladder, small_ladder

    from lynx_protocol.ladder import encode_ladder, rung_of_bucket

    with pytest.raises(LynxConfigError, match=r"ships no lynx_ladder\.json"):
        _prepared(tmp_path, rung="m12")
    ladder = mini_ladder()  # 4 layers x 32 experts, as the reference qwen3-moe-mini
    (tmp_path / "lynx_ladder.json").write_bytes(encode_ladder(ladder))
    policy = _prepared(tmp_path, rung="m12").policy
    assert [b.max_batch for b in policy.budgets] == [3, 31, 63, 1 << 20]  # batches 16/32/64
    assert [rung_of_bucket(ladder, b) for b in policy.budgets] == [0, 3, 3, 3]
    with pytest.raises(LynxConfigError, match=r"lynx_ladder.json: no rung 'm99'"):
        _prepared(tmp_path, rung="m99")
    (tmp_path / "lynx_ladder.json").write_bytes(encode_ladder(small_ladder()))
    with pytest.raises(LynxConfigError, match=r"lynx_ladder.json: made for 2 MoE layers"):
        _prepared(tmp_path, rung="m4")
    (tmp_path / "lynx_ladder.json").write_text("{")
    with pytest.raises(LynxConfigError, match=r"lynx_ladder.json: not valid JSON"):
        _prepared(tmp_path, rung="m4")


def test_a_runtime_starts_on_the_ladders_start_rung_unless_told_otherwise(tmp_path: Path
                                                                          ) -> None:
    """A shipped ladder with a threshold (as ``lynx-serve calibrate --ladder`` writes it):
    the runtime starts on the furthest rung within it, before the checkpoint's
    lynx_policy.json; LYNX_POLICY and LYNX_LADDER_RUNG still win; without a threshold the
    ladder is the controller's only, as before."""
    from ladders import mini_ladder

    from lynx_protocol.ladder import Threshold, encode_ladder, rung_of_bucket

    ladder = mini_ladder()
    table = PolicySpec(name="budget", budgets=[BudgetBucket(max_batch=8, all_layers=16)])
    (tmp_path / "lynx_policy.json").write_bytes(msgspec.json.encode(table))
    (tmp_path / "lynx_ladder.json").write_bytes(encode_ladder(ladder))
    assert _prepared(tmp_path).policy == table  # no threshold: the ladder is not read
    limited = msgspec.structs.replace(ladder, threshold=Threshold(value=0.005))
    (tmp_path / "lynx_ladder.json").write_bytes(encode_ladder(limited))
    started = _prepared(tmp_path).policy
    assert [rung_of_bucket(ladder, b) for b in started.budgets] == [0, 2, 2, 2]  # m16
    assert _prepared(tmp_path, rung="m8").policy != started  # a named rung wins
    assert _prepared(tmp_path, PolicySpec(name="off")).policy == PolicySpec(name="off")
    (tmp_path / "lynx_ladder.json").write_text('{"format": "lynx-ladder/1"')
    with pytest.raises(LynxConfigError, match=r"lynx_ladder.json: not valid JSON"):
        _prepared(tmp_path)  # a damaged shipped ladder stops the server, named
