"""Controller benchmark: StepStats ingest rate and policy propagation latency.

    python benchmark/controller_bench.py [--duration-s 5] [--replicas 4] [--iterations 200]

1. Ingest: ``--replicas`` RuntimeLinks (one sender thread, round-robin, as fast as ZMQ takes
   them) send StepStats to a real controller process for ``--duration-s``; the rate is what
   the controller counted (``lynx_controller_messages_received_total{type="step_stats"}``).
2. Propagation: an admin ``PUT /v1/policy`` → the moment a RuntimeLink polled every 0.5 ms
   (like an idle scheduler loop) returns that version from ``poll_update``. Median and p99
   over ``--iterations``, next to the bare PUT round trip.

Prints a table and writes JSON (default ``benchmark/results/controller.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lynx_policy.testing import ControllerProcess
from lynx_protocol.link import LinkSettings, RuntimeLink
from lynx_protocol.messages import Register, StepStats, encode

LAYERS = 16
EDGES = [1, 2, 4, 8, 16, 32, 64, 128, 256]


def registration(index: int) -> Register:
    return Register(replica_id=f"bench-{index}", model="bench", num_layers=LAYERS,
                    num_experts=64, top_k=8, policies=["off", "budget"])


def stats(replica_id: str, seq: int) -> StepStats:
    return StepStats(replica_id=replica_id, seq=seq, window_s=1.0, batch_size_edges=EDGES,
                     batch_size_counts=[0, 1, 2, 4, 40, 30, 10, 3, 0, 0], decode_steps=90,
                     prefill_steps=3, mixed_steps=7, experts_kept_mean=[30.5] * LAYERS,
                     stock_union_mean=[48.25] * LAYERS, routing_mass_kept=0.94,
                     step_latency_p50_ms=21.0, step_latency_p99_ms=55.0,
                     applied_policy_version=1)


def connect(link: RuntimeLink, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not link.registered:
        if time.monotonic() > deadline:
            raise TimeoutError("link did not register")
        link.poll_update()
        time.sleep(0.005)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def bench_ingest(ctl: ControllerProcess, replicas: int, duration_s: float) -> dict[str, float]:
    links = [RuntimeLink(registration(i), LinkSettings(endpoint=ctl.endpoint, send_queue=1000,
                                                       staleness_s=30.0, heartbeat_s=1.0))
             for i in range(replicas)]
    try:
        for link in links:
            connect(link)
        label = {"type": "step_stats"}
        received_before = ctl.metric("lynx_controller_messages_received_total", label)
        messages = [stats(link.registration.replica_id, 1) for link in links]
        message_bytes = len(encode(messages[0]))
        sent = dropped = 0
        started = time.monotonic()
        while time.monotonic() - started < duration_s:
            for link, message in zip(links, messages, strict=True):
                for _ in range(50):
                    if link.send(message):
                        sent += 1
                    else:
                        dropped += 1
                link.poll_update()  # keep heartbeats flowing, drain acks
        offered_s = time.monotonic() - started
        received_in_window = ctl.metric("lynx_controller_messages_received_total",
                                        label) - received_before
        # Let the controller finish what is still queued, then check nothing was lost.
        previous, settled = -1.0, ctl.metric("lynx_controller_messages_received_total", label)
        while settled != previous:
            time.sleep(0.3)
            previous, settled = settled, ctl.metric("lynx_controller_messages_received_total",
                                                    label)
        received = settled - received_before
        return {"replicas": replicas, "duration_s": round(offered_s, 3),
                "message_bytes": message_bytes, "sent": sent, "dropped_by_link": dropped,
                "received_by_controller": int(received),
                "lost_after_send": int(sent - received),
                "received_per_s": round(received_in_window / offered_s, 1),
                "offered_per_s": round((sent + dropped) / offered_s, 1)}
    finally:
        for link in links:
            link.close()


def bench_propagation(ctl: ControllerProcess, iterations: int) -> dict[str, float]:
    link = RuntimeLink(registration(999), LinkSettings(endpoint=ctl.endpoint, heartbeat_s=0.5,
                                                       staleness_s=10.0))
    seen: dict[int, float] = {}
    stop = threading.Event()

    def pump() -> None:
        while not stop.is_set():
            update = link.poll_update()
            if update is not None:
                seen[update.version] = time.perf_counter()
                link.mark_acknowledged(update.version)
                link.mark_applied(update.version)
            time.sleep(0.0005)

    connect(link)
    thread = threading.Thread(target=pump, daemon=True)
    thread.start()
    propagation_ms: list[float] = []
    put_ms: list[float] = []
    try:
        with ctl.admin as admin:
            for i in range(iterations):
                body = {"name": "budget", "budgets": [{"max_batch": 4096,
                                                       "all_layers": 8 + i % 2}]}
                started = time.perf_counter()
                response = admin.put("/v1/policy", json=body)
                put_ms.append((time.perf_counter() - started) * 1000)
                version = response.json()["version"]
                deadline = time.monotonic() + 5
                while version not in seen:
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"version {version} never reached the link")
                    time.sleep(0.0002)
                propagation_ms.append((seen[version] - started) * 1000)
    finally:
        stop.set()
        thread.join(5)
        link.close()
    return {"iterations": iterations,
            "propagation_ms_median": round(statistics.median(propagation_ms), 3),
            "propagation_ms_p99": round(percentile(propagation_ms, 0.99), 3),
            "admin_put_ms_median": round(statistics.median(put_ms), 3),
            "admin_put_ms_p99": round(percentile(put_ms, 0.99), 3)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration-s", type=float, default=5.0)
    parser.add_argument("--replicas", type=int, default=4)
    parser.add_argument("--iterations", type=int, default=200)
    parser.add_argument("--output", type=Path,
                        default=Path(__file__).resolve().parent / "results" / "controller.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="lynx-bench-") as workdir, \
            ControllerProcess.launch(Path(workdir), {"mode": "static",
                                                     "link": {"send_queue": 10000}}) as ctl:
        ingest = bench_ingest(ctl, args.replicas, args.duration_s)
        propagation = bench_propagation(ctl, args.iterations)
    result = {"benchmark": "controller", "ingest": ingest, "propagation": propagation,
              "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                          "platform": platform.platform()},
              "transport": "ipc", "unix_time": round(time.time())}
    print(f"{'StepStats received by the controller':<44}{ingest['received_per_s']:>12,.0f} /s")
    print(f"{'StepStats offered (sent + dropped by link)':<44}{ingest['offered_per_s']:>12,.0f} /s")
    print(f"{'dropped by the link (queue full)':<44}{ingest['dropped_by_link']:>12,d}")
    print(f"{'propagation PUT → poll_update, median':<44}"
          f"{propagation['propagation_ms_median']:>12.2f} ms")
    print(f"{'propagation PUT → poll_update, p99':<44}"
          f"{propagation['propagation_ms_p99']:>12.2f} ms")
    print(f"{'admin PUT round trip, median':<44}{propagation['admin_put_ms_median']:>12.2f} ms")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
