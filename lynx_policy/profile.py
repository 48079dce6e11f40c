"""``lynx-policy profile``: seed the latency model with a sweep of budgets x concurrencies.

    LYNX_ADMIN_TOKEN=... lynx-policy profile --admin-url http://127.0.0.1:5791 \\
        --server-url http://127.0.0.1:30000 --budgets off,16,8,4 --concurrency 4,16,32 \\
        --seconds 6 --slice-s 2

For each concurrency the server (or a router in front of several) gets closed-loop greedy
``/generate`` requests for ``--seconds`` x the number of budgets, while the running controller,
put in ``static`` mode, cycles its policy through the budgets (a one-bucket ``budget`` table,
or ``off``) every ``--slice-s`` seconds (admin API). Interleaving under one running load, not
one budget after another, is what makes the fit trustworthy on a shared machine: a slow spell
of the host (a noisy neighbour, a thermal or frequency change) lands on every budget alike
instead of on one of them, where it would read as a cost or a saving of pruning. The
controller learns from the StepStats the replicas send meanwhile, as it does from live
traffic; the sweep only makes sure the samples spread over batch sizes and experts kept. At the
end the previous mode and policy are restored (also on Ctrl-C or an error) and the fitted
models are printed (``GET /v1/model``). Budgets below the controller's quality floor are
refused by the admin API and skipped with the reason.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from typing import Any

import httpx

PROMPTS = ("def fibonacci(n):", "The capital of France is", "123+456=", "import numpy as np\n",
           "Once upon a time", "SELECT name FROM users WHERE", "for i in range(10):",
           "Mixture-of-experts models route each token")
TABLE_MAX_BATCH = 1 << 20


def policy_for(budget: str) -> dict[str, Any]:
    """The PolicySpec document for one sweep point (``off`` or an expert budget)."""
    if budget == "off":
        return {"name": "off"}
    return {"name": "budget", "budgets": [{"max_batch": TABLE_MAX_BATCH,
                                           "all_layers": int(budget)}]}


async def closed_loop(server_url: str, concurrency: int, seconds: float, output_len: int
                      ) -> tuple[int, int]:
    """``concurrency`` clients, each sending its next request when the last one is answered,
    for ``seconds``; returns (requests ok, requests failed)."""
    deadline = time.monotonic() + seconds
    counts = [0, 0]
    limits = httpx.Limits(max_connections=concurrency + 2)
    async with httpx.AsyncClient(timeout=httpx.Timeout(120.0), limits=limits) as client:
        async def worker(index: int) -> None:
            n = index
            while time.monotonic() < deadline:
                body = {"text": PROMPTS[n % len(PROMPTS)], "sampling_params": {
                    "max_new_tokens": output_len, "temperature": 0.0, "ignore_eos": True}}
                try:
                    reply = await client.post(f"{server_url}/generate", json=body)
                    reply.raise_for_status()
                    counts[0] += 1
                except httpx.HTTPError:
                    counts[1] += 1
                n += concurrency

        await asyncio.gather(*(worker(i) for i in range(concurrency)))
    return counts[0], counts[1]


def accepted_budgets(admin: Admin, budgets: list[str]) -> list[str]:
    """The budgets the controller accepts (each is applied once; a refused one, e.g. below the
    quality floor, is skipped with the reason)."""
    kept = []
    for budget in budgets:
        try:
            admin.call("PUT", "/v1/policy", policy_for(budget))
        except ProfileError as exc:
            print(f"profile: budget {budget} skipped: {exc}", file=sys.stderr)
            continue
        kept.append(budget)
    return kept


async def interleaved(admin: Admin, budgets: list[str], args: argparse.Namespace,
                      concurrency: int) -> tuple[int, int]:
    """Closed-loop load at ``concurrency`` for ``args.seconds`` per budget while the policy
    cycles through ``budgets`` every ``args.slice_s`` seconds; returns (ok, failed)."""
    total = args.seconds * len(budgets)

    async def cycle() -> None:
        deadline = time.monotonic() + total
        turn = 0
        while time.monotonic() < deadline:
            budget = budgets[turn % len(budgets)]
            await asyncio.to_thread(admin.call, "PUT", "/v1/policy", policy_for(budget))
            turn += 1
            await asyncio.sleep(min(args.slice_s, max(0.0, deadline - time.monotonic())))

    load = asyncio.create_task(closed_loop(args.server_url, concurrency, total,
                                           args.output_len))
    await cycle()
    return await load


class Admin:
    def __init__(self, url: str, token: str) -> None:
        self.client = httpx.Client(base_url=url.rstrip("/"), timeout=10.0,
                                   headers={"Authorization": f"Bearer {token}"})

    def call(self, method: str, path: str, body: Any = None) -> dict[str, Any]:
        reply = self.client.request(method, path, json=body)
        if reply.status_code >= 400:
            try:  # the API answers JSON; a proxy or a crash may not
                detail = reply.json().get("detail", reply.text)
            except ValueError:
                detail = reply.text[:200]
            raise ProfileError(f"{method} {path}: {reply.status_code} {detail}")
        return dict(reply.json())


class ProfileError(RuntimeError):
    """The sweep cannot go on (admin API refused or unreachable)."""


def run_profile(args: argparse.Namespace, token: str) -> int:
    admin = Admin(args.admin_url, token)
    state = admin.call("GET", "/v1/state")
    if state["replicas_connected"] == 0:
        raise ProfileError("no replica is connected to the controller: nothing to profile")
    if args.reset:
        admin.call("POST", "/v1/model/reset", {})
    saved_mode, saved_policy = state["mode"], state["policy"]
    try:
        admin.call("PUT", "/v1/mode", {"mode": "static"})
        budgets = accepted_budgets(admin, args.budgets)
        if not budgets:
            raise ProfileError("every budget was refused: nothing to profile")
        for concurrency in args.concurrency:
            ok, failed = asyncio.run(interleaved(admin, budgets, args, concurrency))
            print(f"profile: concurrency {concurrency:>3}, budgets {','.join(budgets)} "
                  f"cycled every {args.slice_s:g} s for {args.seconds * len(budgets):g} s: "
                  f"{ok} requests ok, {failed} failed", flush=True)
        time.sleep(args.settle_s)  # the last stats window reaches the controller's loop
    finally:
        admin.call("PUT", "/v1/policy", saved_policy)
        admin.call("PUT", "/v1/mode", {"mode": saved_mode})
    view = admin.call("GET", "/v1/model")
    for replica, info in view["replicas"].items():
        fit = info["fit"]
        print(f"profile: {replica}: t = {fit['a_ms']:.2f} + {fit['b_ms_per_row']:.3f} B + "
              f"{fit['c_ms_per_expert']:.3f} m ms, rmse {fit['rmse_ms']:.2f} ms of "
              f"{fit['mean_ms']:.2f}, {info['samples']} samples, "
              f"{'ready' if fit['ready'] else 'NOT ready: ' + fit['reason']}")
    ready = any(info["fit"]["ready"] for info in view["replicas"].values())
    return 0 if ready else 1


def add_parser(commands: Any) -> None:
    sub = commands.add_parser("profile", help="seed the latency model (budget x concurrency "
                                              "sweep through a running controller)")
    sub.add_argument("--admin-url", default="http://127.0.0.1:5791")
    sub.add_argument("--server-url", required=True,
                     help="SGLang server or router the load goes to")
    sub.add_argument("--budgets", default="off,16,8,4",
                     help="comma-separated: 'off' or experts per layer")
    sub.add_argument("--concurrency", default="4,16,32")
    sub.add_argument("--seconds", type=float, default=6.0,
                     help="per budget and concurrency")
    sub.add_argument("--slice-s", type=float, default=2.0,
                     help="how long each budget holds before the next [s]; keep it >= 2 x the "
                          "replicas' LYNX_STATS_INTERVAL_S")
    sub.add_argument("--output-len", type=int, default=32)
    sub.add_argument("--settle-s", type=float, default=3.0)
    sub.add_argument("--reset", action="store_true", help="forget learnt samples first")
    sub.add_argument("--log-level", default="WARNING")


def main(args: argparse.Namespace) -> int:
    """Entry of ``lynx-policy profile``; exit 0 when a model is ready, 1 when not, 2 when the
    sweep could not run."""
    token = os.environ.get("LYNX_ADMIN_TOKEN", "")
    if not token:
        print("lynx-policy profile: set LYNX_ADMIN_TOKEN", file=sys.stderr)
        return 2
    try:
        args.budgets = [b.strip() for b in args.budgets.split(",") if b.strip()]
        args.concurrency = [int(c) for c in args.concurrency.split(",") if c.strip()]
        bad = [b for b in args.budgets if b != "off" and not (b.isdigit() and int(b) > 0)]
        if bad or not args.budgets or not args.concurrency or min(args.concurrency) < 1:
            raise ValueError(f"budgets must be 'off' or positive integers (got {bad}), "
                             "concurrency positive integers")
        if not (args.slice_s > 0 and args.seconds > 0):
            raise ValueError("--seconds and --slice-s must be positive")
    except ValueError as exc:
        print(f"lynx-policy profile: {exc}", file=sys.stderr)
        return 2
    try:
        return run_profile(args, token)
    except (ProfileError, httpx.HTTPError) as exc:
        print(f"lynx-policy profile: {exc}", file=sys.stderr)
        return 2
