"""Checks on the live CPU compose stack that ``scripts/compose_smoke.sh`` brings up.

    python scripts/compose_smoke_check.py --compose "docker-compose -p P -f A -f B" \\
        --token-file docker/secrets/lynx_admin_token

In order: every service healthy; runtime-1 registered at the controller; Prometheus scrapes the
runtime, the controller and the router; a request through the router answered correctly; an
admin ``PUT /v1/policy`` reaching the runtime under streamed load (its ``lynx_policy_version``,
read through Prometheus); every Grafana panel and alert query returning data; then the controller
container killed (SIGKILL to its process: a crash, so compose's restart policy applies) under
load: no failed request, and the controller back with runtime-1 registered again.
Exit 0 when all pass; otherwise the first failure is printed and the exit status is 1.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from lynx.deploy import constants as c
from lynx.deploy.dashboard import live_stack_queries
from lynx.serving.client import StreamedTraffic

SERVICES = ("runtime-1", "router", "controller", "prometheus")
BUDGET = {"name": "budget", "budgets": [{"max_batch": 100000, "all_layers": 2}]}
T0 = time.monotonic()


class CheckFailed(Exception):
    pass


def say(text: str) -> None:
    print(f"[check {time.monotonic() - T0:5.0f}s] {text}", flush=True)


def wait_for(what: str, check: Callable[[], Any], timeout_s: float) -> Any:
    deadline, last = time.monotonic() + timeout_s, "no answer"
    while time.monotonic() < deadline:
        try:
            result = check()
            if result:
                return result
            last = repr(result)
        except (httpx.HTTPError, ValueError, KeyError, subprocess.SubprocessError) as error:
            last = repr(error)
        time.sleep(1.0)
    raise CheckFailed(f"timed out after {timeout_s:.0f}s waiting for {what} (last: {last})")


class Stack:
    def __init__(self, args: argparse.Namespace) -> None:
        self.compose = shlex.split(args.compose)
        self.docker = args.docker
        self.router = f"http://127.0.0.1:{c.ROUTER_PORT}"
        self.controller = f"http://127.0.0.1:{c.CONTROLLER_ADMIN_PORT}"
        self.prometheus = f"http://127.0.0.1:{c.PROMETHEUS_PORT}"
        token = Path(args.token_file).read_text().strip()
        self.admin = httpx.Client(base_url=self.controller, timeout=10,
                                  headers={"Authorization": f"Bearer {token}"})

    def container(self, service: str) -> str:
        out = subprocess.run([*self.compose, "ps", "-q", service], capture_output=True,
                             text=True, check=True, timeout=60).stdout.split()
        if not out:
            raise CheckFailed(f"no container for service {service}")
        return out[0]

    def inspect(self, service: str, template: str) -> str:
        return subprocess.run([self.docker, "inspect", "-f", template, self.container(service)],
                              capture_output=True, text=True, check=True,
                              timeout=60).stdout.strip()

    def query(self, expr: str) -> list[dict[str, Any]]:
        body = httpx.get(f"{self.prometheus}/api/v1/query", params={"query": expr},
                         timeout=10).json()
        if body.get("status") != "success":
            raise CheckFailed(f"Prometheus rejected {expr!r}: {body}")
        result: list[dict[str, Any]] = body["data"]["result"]
        return result

    def registered(self) -> bool:
        replicas = self.admin.get("/v1/replicas").raise_for_status().json()["replicas"]
        return any(r.get("replica_id") == "runtime-1" and r.get("connected") for r in replicas)

    def generate(self, prompt: str, max_new_tokens: int = 6) -> str:
        reply = httpx.post(f"{self.router}/generate", timeout=60, json={
            "text": prompt, "sampling_params": {"max_new_tokens": max_new_tokens,
                                                "temperature": 0}})
        reply.raise_for_status()
        text: str = reply.json()["text"]
        return text


def check_up(stack: Stack) -> None:
    for service in SERVICES:
        wait_for(f"{service} healthy", lambda s=service: stack.inspect(
            s, "{{.State.Health.Status}}") == "healthy", 300)
    say(f"healthy: {', '.join(SERVICES)}")
    wait_for("runtime-1 registered at the controller", stack.registered, 60)
    say("runtime-1 registered at the controller (GET /v1/replicas)")

    def targets_up() -> bool:
        active = httpx.get(f"{stack.prometheus}/api/v1/targets", timeout=5).json()["data"][
            "activeTargets"]
        return {t["labels"]["job"] for t in active if t["health"] == "up"} >= {
            c.RUNTIME_JOB, c.CONTROLLER_JOB, c.ROUTER_JOB}
    wait_for("Prometheus targets runtime, controller and router up", targets_up, 90)
    say("Prometheus scrapes lynx-runtime, lynx-controller, sglang-router")


def check_request(stack: Stack) -> None:
    # mixtral-mini answers a+b= with the digits of the sum least-significant first
    text = wait_for("an answer through the router", lambda: stack.generate("123+456="), 120)
    if not text.startswith("975"):
        raise CheckFailed(f"router answered {text!r} to 123+456= (expected 975...)")
    say(f"router: 123+456= -> {text!r}")


def check_policy(stack: Stack) -> None:
    version = stack.admin.put("/v1/policy", json=BUDGET).raise_for_status().json()["version"]
    version = stack.admin.put("/v1/mode", json={"mode": "static"}).raise_for_status().json()[
        "version"]
    expr = f'lynx_policy_version{{job="{c.RUNTIME_JOB}"}}'
    wait_for(f"runtime-1's lynx_policy_version to reach {version}", lambda: any(
        float(r["value"][1]) >= version for r in stack.query(expr)), 60)
    say(f"PUT /v1/policy + /v1/mode static: version {version} applied by runtime-1")


def check_panels(stack: Stack) -> None:
    # the EP panels stay empty on this stack; `test_e2e_parallel` checks their metrics on a
    # live --ep-size 2 server
    queries = live_stack_queries()
    missing = list(queries)

    def all_return_data() -> bool:
        missing[:] = [q for q in missing if not stack.query(q)]
        return not missing
    try:
        wait_for("every panel and alert query to return data", all_return_data, 180)
    except CheckFailed as error:
        raise CheckFailed(f"{error}; queries without data: {missing}") from None
    say(f"all {len(queries)} dashboard panel and alert-rule queries return data")


def check_controller_crash(stack: Stack, traffic: StreamedTraffic) -> None:
    before = traffic.ok
    pid = stack.inspect("controller", "{{.State.Pid}}")
    restarts = int(stack.inspect("controller", "{{.RestartCount}}"))
    subprocess.run(["kill", "-9", pid], check=True)
    say(f"controller killed (SIGKILL to pid {pid}) under load")
    time.sleep(15)  # past LYNX_STALE_AFTER_S: runtime-1 falls back to its safe policy
    wait_for("the controller restarted by compose", lambda: int(stack.inspect(
        "controller", "{{.RestartCount}}")) > restarts, 120)
    wait_for("runtime-1 registered again", stack.registered, 120)
    wait_for("controller healthy again", lambda: stack.inspect(
        "controller", "{{.State.Health.Status}}") == "healthy", 120)
    served = traffic.ok - before
    if served < 4:
        raise CheckFailed(f"only {served} requests served while the controller was down")
    say(f"controller back; {served} requests served meanwhile, runtime-1 registered again")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--compose", required=True, help="compose command prefix (-p, -f)")
    parser.add_argument("--token-file", required=True, help="the controller's admin token")
    parser.add_argument("--docker", default="docker", help="docker client")
    args = parser.parse_args(argv)
    if not Path(args.token_file).is_file():
        parser.error(f"--token-file {args.token_file}: no such file")
    stack = Stack(args)
    traffic = StreamedTraffic(stack.router, max_new_tokens=12, workers=4)
    try:
        check_up(stack)
        check_request(stack)
        traffic.start()  # a runtime applies a new policy at its next forward step
        check_policy(stack)
        check_panels(stack)
        check_controller_crash(stack, traffic)
    except CheckFailed as error:
        print(f"compose-smoke check FAILED: {error}", file=sys.stderr)
        return 1
    finally:
        traffic.finish()
    if traffic.failed or not traffic.ok:
        print(f"compose-smoke check FAILED: {traffic.failed} of {traffic.ok + traffic.failed} "
              f"requests failed: {traffic.errors[:5]}", file=sys.stderr)
        return 1
    say(f"{traffic.ok} streamed requests through the router, none failed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
