"""Calibration through a running SGLang server (``lynx-serve calibrate --server``): per-layer
loss of each candidate budget measured from SGLang's own prompt logprobs, so a checkpoint is
calibrated on the machine and engine that serve it, whatever its size or router kind.

The server runs the plugin in evaluation mode (``LYNX_EVALUATION=prefill-as-decode``,
``--disable-radix-cache``; `lynx.sglang_plugin.evaluation`): B calibration windows sent as one
batch are prefilled together and their rows at each position pruned as one decode step of B
rows, as the transformers path prunes them (`calibrate.tables.RouterHook`). Each measured
policy is set through a controller dedicated to the calibration (its admin API, mode
``static``): the client waits until every replica acknowledged it, then sends the windows.
Experts computed per step come from the plugin's counters (``lynx_experts_kept_total``,
``lynx_layer_pruned_steps_total`` per layer; flushed after every evaluated forward).

Shape legend: N windows, P tokens per window, L MoE layers, C candidate budgets.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import httpx
import msgspec
import torch

from lynx.serving.metrics_reader import samples
from lynx_protocol.ladder_build import single_layer_policy
from lynx_protocol.policy import MAX_BATCH, BudgetBucket, PolicySpec


class ServerPathError(RuntimeError):
    """The server or its controller cannot run the calibration; one line."""


class ServerPath:
    """One SGLang server in evaluation mode and its calibration controller."""

    def __init__(self, server_url: str, admin_url: str, token: str, num_layers: int,
                 num_experts: int = 0, timeout_s: float = 600.0) -> None:
        self.server = server_url.rstrip("/")
        self.num_layers = num_layers
        self.num_experts = num_experts
        self.http = httpx.Client(timeout=timeout_s)
        self.admin = httpx.Client(base_url=admin_url.rstrip("/"), timeout=30.0,
                                  headers={"Authorization": f"Bearer {token}"})
        self._static = False

    def close(self) -> None:
        self.http.close()
        self.admin.close()

    def _admin(self, method: str, path: str, body: Any = None) -> dict[str, Any]:
        try:
            reply = self.admin.request(method, path, json=body)
        except httpx.HTTPError as exc:
            raise ServerPathError(f"controller {self.admin.base_url}: {exc}") from None
        if reply.status_code != 200:
            raise ServerPathError(f"controller {method} {path}: {reply.status_code} "
                                  f"{reply.text[:300]}".replace("\n", " "))
        result: dict[str, Any] = reply.json()
        return result

    def _server_call(self, url: str, body: Any = None) -> httpx.Response:
        """GET ``url`` (POST with a JSON ``body``); `ServerPathError` when unreachable."""
        try:
            return (self.http.get(url) if body is None else self.http.post(url, json=body))
        except httpx.HTTPError as exc:
            raise ServerPathError(f"server {url}: {exc}".replace("\n", " ")) from None

    def apply(self, spec: PolicySpec, timeout_s: float = 60.0) -> None:
        """Make ``spec`` the policy of every replica (acknowledged: applied at its next step).
        Raises `ServerPathError` when no replica is connected or one does not acknowledge."""
        if not self._static:
            self._admin("PUT", "/v1/mode", {"mode": "static"})
            self._static = True
        version = self._admin("PUT", "/v1/policy", msgspec.to_builtins(spec))["version"]
        deadline = time.monotonic() + timeout_s
        while True:
            replicas = [r for r in self._admin("GET", "/v1/replicas")["replicas"]
                        if r["connected"]]
            if replicas and all(r["acknowledged_policy_version"] >= version for r in replicas):
                return
            if time.monotonic() > deadline:
                raise ServerPathError(f"no replica acknowledged policy version {version} within "
                                      f"{timeout_s:.0f}s (is the server's LYNX_CONTROLLER this "
                                      "controller?)")
            time.sleep(0.05)

    def counters(self) -> tuple[list[float], list[float], list[float], tuple[float, float]]:
        """Per layer [L]: pruned layer-steps, experts kept and stock union, summed so far;
        and (routing mass kept, routing mass) of the pruned rows."""
        text = self._server_call(f"{self.server}/metrics").text
        out = []
        for name in ("lynx_layer_pruned_steps_total", "lynx_experts_kept_total",
                     "lynx_experts_stock_union_total"):
            values = [0.0] * self.num_layers
            for labels, value in samples(text, name):
                if "layer" in labels and int(labels["layer"]) < self.num_layers:
                    values[int(labels["layer"])] += value
            out.append(values)
        mass = tuple(sum(v for _, v in samples(text, name)) for name in (
            "lynx_routing_mass_kept_total", "lynx_routing_mass_total"))
        return out[0], out[1], out[2], (mass[0], mass[1])

    def nll(self, chunk: torch.Tensor) -> tuple[float, int]:
        """(summed next-token NLL [nats], tokens scored) of ``chunk`` [B,P] token ids, sent as
        one batch (prefilled together), from SGLang's ``input_token_logprobs``."""
        body = {"input_ids": chunk.tolist(), "return_logprob": True, "logprob_start_len": 0,
                "sampling_params": {"max_new_tokens": 1, "temperature": 0.0}}
        reply = self._server_call(f"{self.server}/generate", body)
        if reply.status_code != 200:
            raise ServerPathError(f"server /generate: {reply.status_code} {reply.text[:300]}"
                                  .replace("\n", " "))
        total, count = 0.0, 0
        for item in reply.json():
            logprobs = [entry[0] for entry in item["meta_info"]["input_token_logprobs"][1:]]
            total -= sum(logprobs)
            count += len(logprobs)
        return total, count

    def measure(self, windows: torch.Tensor, spec: PolicySpec, batch: int
                ) -> tuple[float, list[float | None], list[float | None], float]:
        """(mean next-token NLL [nats] of ``windows`` [N,P] under ``spec``, per layer the mean
        experts kept and the mean stock union per pruned position group (None where the layer
        was not pruned), routing mass kept of the pruned rows [fraction; 1.0: none])."""
        self.apply(spec)
        steps0, kept0, union0, mass0 = self.counters()
        total, count = 0.0, 0
        for chunk in windows.split(batch):
            nll, tokens = self.nll(chunk)
            total, count = total + nll, count + tokens
        steps1, kept1, union1, mass1 = self.counters()
        steps = [b - a for a, b in zip(steps0, steps1, strict=True)]
        kept = [(b - a) / s if s else None for a, b, s in zip(kept0, kept1, steps, strict=True)]
        union = [(b - a) / s if s else None
                 for a, b, s in zip(union0, union1, steps, strict=True)]
        mass_total = mass1[1] - mass0[1]
        mass = (mass1[0] - mass0[0]) / mass_total if mass_total > 0 else 1.0
        return total / max(count, 1), kept, union, min(max(mass, 0.0), 1.0)

    def measure_table(self, windows: torch.Tensor, spec: PolicySpec, batch: int,
                      unions: list[float | None]) -> tuple[float, float, float]:
        """`calibrate.ladder.measure_table` through the server: (mean NLL [nats], mean experts
        computed per layer and step, routing mass kept); a layer the table leaves unpruned
        computes its stock union (``unions`` [L], from `server_layer_sensitivity`)."""
        if spec.name == "off":  # the same routing, but evaluated: experts are counted
            spec = PolicySpec(name="budget", budgets=[BudgetBucket(
                max_batch=MAX_BATCH, all_layers=self.num_experts)])
        nll, kept, _, mass = self.measure(windows, spec, batch)
        experts = [k if k is not None else u for k, u in zip(kept, unions, strict=True)
                   if k is not None or u is not None]  # dense layers count in no mean
        return nll, sum(experts) / len(experts) if experts else 0.0, mass


def server_layer_sensitivity(path: ServerPath, windows: torch.Tensor, batch: int,
                             candidates: Sequence[int], num_experts: int,
                             unions: list[float | None] | None = None
                             ) -> tuple[list[dict[int, float]], list[dict[int, float]]]:
    """`calibrate.tables.layer_sensitivity` through the server: per layer, {budget: mean NLL
    rise [nats] with only that layer pruned to it} and {budget: mean distinct experts that
    layer computes per step under it} (the unpruned candidate E: the measured stock union,
    also appended per layer to ``unions`` when given, None for a layer without). A layer
    that records no pruned step (a dense layer such as DeepSeek-V3's first three, or one Lynx
    passes through) gets empty curves, as in `layer_sensitivity`: never pruned, in no mean
    (`tables.allocate_routed`). Raises `ServerPathError` when no layer records a step (the
    server is not in evaluation mode)."""
    layers = path.num_layers
    stock = path.measure(windows, PolicySpec(name="off"), batch)[0]
    rise: list[dict[int, float]] = [{} for _ in range(layers)]
    kept: list[dict[int, float]] = [{} for _ in range(layers)]
    measured = False
    for layer in range(layers):
        union: float | None = None
        for m in sorted(candidates):
            if m >= num_experts:
                continue
            nll, computed, stock_unions, _ = path.measure(
                windows, single_layer_policy(layer, m, layers, num_experts), batch)
            if computed[layer] is None:  # not a routed layer here: no pruning to measure
                break
            rise[layer][m], kept[layer][m] = max(0.0, nll - stock), float(computed[layer])
            union, measured = stock_unions[layer], True
        if unions is not None:
            unions.append(None if union is None else float(union))
        if num_experts in candidates and union is not None:
            rise[layer][num_experts] = 0.0
            kept[layer][num_experts] = float(union)
    if not measured:
        raise ServerPathError("no layer recorded a pruned step: is the server in evaluation "
                              "mode (LYNX_EVALUATION=prefill-as-decode)?")
    return rise, kept


def open_server_path(folder: Any, server_url: str, admin_url: str, token: str
                     ) -> tuple[ServerPath, Any, int, int]:
    """(the `ServerPath`, the checkpoint's tokenizer, E, K) for the checkpoint in ``folder``:
    only its config and tokenizer are read (the server holds the weights); the layer count
    is the runtime's (`sglang_plugin.config.moe_shape`). Raises ValueError (one line) for a
    folder with no routed experts or no tokenizer."""
    from transformers import AutoConfig, AutoTokenizer

    from lynx.sglang_plugin.config import moe_shape

    try:
        layers, experts, top_k = moe_shape(AutoConfig.from_pretrained(folder))
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except (OSError, KeyError) as exc:
        raise ValueError(f"{folder}: cannot read its config and tokenizer "
                         f"({str(exc).splitlines()[0]})") from None
    return ServerPath(server_url, admin_url, token, layers, experts), tokenizer, experts, top_k
