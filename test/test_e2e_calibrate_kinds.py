"""Production router kinds end to end on SGLang's CPU engine (issue 25: calibration of any
checkpoint): tiny randomly initialised checkpoints with the real checkpoints' router values
(`lynx.reference.tiny`; none can be downloaded here), served by SGLang with the plugin.

- DeepSeek-V3's router (8 groups / 4, sigmoid + correction bias, routed scaling 2.5, a fused
  shared expert, a dense first layer) in GLM-4.5's body: calibration through the server gives
  the transformers path's sensitivities, experts computed, tables and costs. (SGLang's CPU
  forward of DeepSeek's MLA attention differs from transformers', so the router is checked in
  GLM's body, whose forward the two compute alike.) This is the test that found GLM-4.5's
  routing rule misread (`test_conformance_model_files`).
- Qwen2-MoE (gated shared expert, `lynx.cpu_compat.shared_gate`) and DeepSeek-V3 itself serve,
  and prune: Qwen2-MoE's mean prompt log-probability equals transformers'.
"""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
import torch

from lynx.calibrate.ladder import build_ladder
from lynx.calibrate.tables import window_nll
from lynx.reference.loading import load_reference
from lynx.reference.tiny import write_tiny
from lynx_policy.testing import DEFAULT_TOKEN, ControllerProcess
from lynx_protocol.ladder import PPL_RISE

LADDER = {"means": [100.0, 60.0], "batches": (16,), "windows": 16, "window_len": 48,
          "heldout_windows": 16}
BUDGET = '{"name": "budget", "budgets": [{"max_batch": 100000, "all_layers": 12}]}'


@pytest.mark.slow
def test_server_calibration_of_a_deepseek_v3_router_equals_the_transformers_path(
        server_factory, tmp_path: Path) -> None:
    folder = write_tiny("GLM-4.5-DSV3-router", tmp_path / "glm-dsv3")
    with ControllerProcess.launch(tmp_path / "ctl", {"mode": "off"}) as ctl:
        server = server_factory(folder, {
            "LYNX_ENABLED": "1", "LYNX_EVALUATION": "prefill-as-decode",
            "LYNX_STATS_INTERVAL_S": "3600", **ctl.runtime_env()},
            ("--disable-radix-cache", "--dtype", "float32"))
        ladder, report = build_ladder(folder, **LADDER, server=(server.url, ctl.admin_url,
                                                                 DEFAULT_TOKEN))
    want_ladder, want_report = build_ladder(folder, **LADDER)
    (mine,), (theirs,) = report["per_batch"], want_report["per_batch"]
    assert mine["kept"][0] == {} == theirs["kept"][0]  # the dense first layer
    for layer in (1, 2):
        for m, want in theirs["sensitivity_nats"][layer].items():
            assert mine["sensitivity_nats"][layer][m] == pytest.approx(want, abs=2e-5)
            assert mine["kept"][layer][m] == pytest.approx(theirs["kept"][layer][m], abs=0.05)
        assert theirs["kept"][layer][24] < theirs["kept"][layer][256] - 10
    assert max(v for row in theirs["sensitivity_nats"] for v in row.values()) > 2e-4
    assert [r.name for r in ladder.rungs] == [r.name for r in want_ladder.rungs]
    assert len(ladder.rungs) >= 2
    for got, want in zip(ladder.rungs, want_ladder.rungs, strict=True):
        (g,), (w,) = got.tables, want.tables
        assert g.per_layer == w.per_layer and g.per_layer[0] == 256
        assert g.experts_computed == pytest.approx(w.experts_computed, abs=0.05)
        assert g.cost(PPL_RISE) == pytest.approx(w.cost(PPL_RISE), abs=5e-5)


@pytest.mark.slow
def test_qwen2_moe_and_deepseek_v3_serve_and_prune(tmp_path: Path) -> None:
    from conftest import spawn_servers, wait_all_ready

    qwen2 = write_tiny("Qwen2-57B-A14B", tmp_path / "qwen2")
    deepseek = write_tiny("DeepSeek-V3", tmp_path / "deepseek-v3")
    env = {"LYNX_ENABLED": "1", "LYNX_POLICY": BUDGET, "LYNX_STATS_INTERVAL_S": "3600"}
    servers = wait_all_ready([*spawn_servers(tmp_path, qwen2, [(env, ("--dtype", "float32"))]),
                              *spawn_servers(tmp_path, deepseek, [(env, ("--dtype", "float32"))])])
    windows = torch.randint(0, 1000, (4, 24), generator=torch.Generator().manual_seed(1))
    try:
        for server in servers:  # a batch of 8 decodes 6 steps each: pruned at budget 12
            reply = httpx.post(f"{server.url}/generate", timeout=300, json={
                "text": ["def f(x):", "123+456="] * 4,
                "sampling_params": {"max_new_tokens": 6, "temperature": 0}})
            assert reply.status_code == 200
            metrics = httpx.get(f"{server.url}/metrics", timeout=30).text
            pruned = [line for line in metrics.splitlines()
                      if line.startswith("lynx_steps_total") and 'pruned="true"' in line]
            assert pruned and float(pruned[0].split()[-1]) >= 5, metrics[-2000:]
        # Qwen2-MoE's prefill (never pruned) is transformers' forward, shared gate included
        reply = httpx.post(f"{servers[0].url}/generate", timeout=300, json={
            "input_ids": windows.tolist(), "return_logprob": True, "logprob_start_len": 0,
            "sampling_params": {"max_new_tokens": 1, "temperature": 0.0}}).json()
    finally:
        for server in servers:
            server.stop()
    served = [-e[0] for item in reply for e in item["meta_info"]["input_token_logprobs"][1:]]
    model, _ = load_reference(qwen2, dtype=torch.float32)
    nll, count, _ = window_nll(model, windows)
    assert len(served) == count
    assert sum(served) / count == pytest.approx(nll / count, abs=1e-5)
