"""End to end: the real SGLang server on the CPU serving each trained reference model."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import httpx
import pytest
from conftest import model_card_scores

from lynx.reference.tasks import arithmetic_prompt, heldout_problems, parse_answer
from lynx.serving.client import generate_greedy
from lynx.serving.metrics_reader import samples
from lynx.serving.server import port_is_free

pytestmark = pytest.mark.slow
N_PROBLEMS = 64


@pytest.mark.parametrize("model", ["mixtral-mini", "qwen3-moe-mini"])
def test_server_answers_arithmetic_and_exports_latency(server_factory, model: str) -> None:
    server = server_factory(model)
    problems = heldout_problems(N_PROBLEMS)
    prompts = [arithmetic_prompt(a, b) for a, b in problems]
    completions, _ = generate_greedy(server.url, prompts, 6)
    correct = sum(
        parse_answer(c.text) == a + b for c, (a, b) in zip(completions, problems, strict=True)
    )
    card = model_card_scores(model)["arithmetic_exact_match"]
    # Greedy decoding through SGLang agrees with transformers' batched generate (model card),
    # up to a few bf16 tie-breaks on this 64-problem sample.
    assert correct / N_PROBLEMS >= card - 0.05, (correct, card)

    a, b = problems[0]
    reply = httpx.post(f"{server.url}/v1/completions", timeout=60, json={
        "model": model, "prompt": arithmetic_prompt(a, b), "max_tokens": 6, "temperature": 0})
    reply.raise_for_status()
    assert parse_answer(reply.json()["choices"][0]["text"]) == a + b
    chat = httpx.post(f"{server.url}/v1/chat/completions", timeout=60, json={  # was a 400
        "model": model, "messages": [{"role": "user", "content": arithmetic_prompt(a, b)}],
        "max_tokens": 6, "temperature": 0})
    chat.raise_for_status()
    assert parse_answer(chat.json()["choices"][0]["message"]["content"]) == a + b

    # SGLang records inter-token latency for streamed requests only.
    with httpx.stream("POST", f"{server.url}/generate", timeout=60, json={
            "text": arithmetic_prompt(a, b), "stream": True,
            "sampling_params": {"max_new_tokens": 6, "temperature": 0}}) as streamed:
        streamed.raise_for_status()
        chunks = [line for line in streamed.iter_lines() if line.startswith("data:")]
    assert len(chunks) > 2, chunks

    metrics = httpx.get(f"{server.url}/metrics", timeout=10).text
    e2e = samples(metrics, "sglang:e2e_request_latency_seconds_count")
    assert e2e and sum(v for _, v in e2e) >= N_PROBLEMS + 2, e2e
    ttft = samples(metrics, "sglang:time_to_first_token_seconds_count")
    itl = samples(metrics, "sglang:inter_token_latency_seconds_bucket")
    assert ttft and sum(v for _, v in ttft) >= 1
    assert itl and max(v for _, v in itl) > 0

    # SGLang's workers write their metrics, and name their IPC sockets, in the server's scratch
    scratch = server.scratch_dir
    assert scratch is not None and list((scratch / "metrics").rglob("*.db")), scratch
    assert len([p for p in scratch.iterdir() if p.is_socket()]) >= 3, list(scratch.iterdir())
    pid = server.process.pid
    server.stop()
    assert server.process.poll() is not None
    assert not scratch.exists()  # a stopped server leaves nothing in /tmp
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert port_is_free(server.host, server.port)


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "lynx.serving.cli", *args],
                          capture_output=True, text=True, timeout=120)


def test_cli_rejects_bad_models_and_busy_port(tmp_path) -> None:
    missing = _cli("serve", str(tmp_path / "nope"))
    assert missing.returncode == 2
    assert missing.stderr.strip().splitlines() == [
        f"lynx-serve: error: model folder {tmp_path / 'nope'} does not exist"]
    unknown = _cli("serve", "gpt-17")
    assert unknown.returncode == 2 and "unknown model 'gpt-17'" in unknown.stderr
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "config.json").write_text("{not json")
    bad = _cli("serve", str(corrupt))
    assert bad.returncode == 2 and "corrupt JSON" in bad.stderr and "Traceback" not in bad.stderr

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as holder:  # any listener will do
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        busy = _cli("serve", "mixtral-mini", "--port", str(port))
    assert busy.returncode == 2
    assert f"port {port} on 127.0.0.1 is busy" in busy.stderr
    assert "Traceback" not in busy.stderr
