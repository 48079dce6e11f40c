"""``lynx-serve``: run SGLang on the CPU default with a reference model, with or without Lynx."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path

from lynx.evaluate.gate import GateError
from lynx.serving.models import ModelError, resolve_model
from lynx.serving.server import ServeError, SglangServer
from lynx.sglang_plugin.config import LynxConfigError, load_config


def lynx_env(
    enabled: bool, policy: str | None = None, controller: str | None = None
) -> dict[str, str]:
    """Environment that turns the plugin on (or leaves SGLang stock)."""
    env = {"LYNX_ENABLED": "1" if enabled else "0"}
    if policy:
        env["LYNX_POLICY"] = policy
    if controller:
        env["LYNX_CONTROLLER"] = controller
    return env


def _serve(args: argparse.Namespace) -> int:
    env = lynx_env(args.lynx, args.policy, args.controller)
    load_config(env)  # the plugin's own validation, before a server is started
    model = resolve_model(args.model)
    server = SglangServer(model, args.port, host=args.host, env=env)
    print(f"starting SGLang on the CPU: {model} at http://{args.host}:{args.port} "
          f"(Lynx {'on' if args.lynx else 'off'}; log {server.log_path or 'in /tmp'})", flush=True)
    with server:
        print(f"ready: {server.url}  (Ctrl-C to stop)", flush=True)
        stop = False

        def _stop(*_: object) -> None:
            nonlocal stop
            stop = True

        signal.signal(signal.SIGTERM, _stop)
        try:
            while not stop and server.process is not None and server.process.poll() is None:
                time.sleep(0.5)
        except KeyboardInterrupt:
            pass
    return 0


def _calibrate(args: argparse.Namespace) -> int:
    import msgspec

    from lynx.calibrate import NO_PRUNING_BELOW, calibrate
    from lynx.calibrate.corpus import CorpusError, read_documents

    try:
        batches = sorted({int(b) for b in args.batches.split(",") if b.strip()})
    except ValueError:
        raise ServeError(f"calibrate: --batches {args.batches!r} is not a list of integers"
                         ) from None
    if not batches or batches[0] < NO_PRUNING_BELOW or args.windows < batches[-1] or (
            args.window_len < 2):
        raise ServeError(f"calibrate: need batches >= {NO_PRUNING_BELOW}, --windows >= the "
                         "largest batch, --window-len >= 2")
    folder = resolve_model(args.model, cpu_serving=False)
    if not args.ladder and args.target_mean is None:
        raise ServeError("calibrate: give --target-mean (one policy) or --ladder")
    skipped: list[Path] = []
    try:  # the corpus is read before the model loads: a bad one fails at once
        documents = (read_documents(args.corpus, args.text_field, skipped) if args.corpus
                     else None)
    except CorpusError as exc:
        raise ServeError(f"calibrate: --corpus {exc}") from None
    if documents is not None:
        print(f"corpus: {len(documents)} documents" + (
            f", {len(skipped)} files skipped (not UTF-8 text; first: {skipped[0]})"
            if skipped else ""), file=sys.stderr)
    server = None
    if args.server:
        token = os.environ.get("LYNX_ADMIN_TOKEN", "")
        if not args.controller_admin or not token:
            raise ServeError("calibrate: --server needs --controller-admin URL and "
                             "LYNX_ADMIN_TOKEN (the calibration's own controller)")
        server = (args.server, args.controller_admin, token)
    if args.ladder:
        return _calibrate_ladder(args, folder, batches, documents, server)
    from lynx.calibrate.server_path import ServerPathError

    try:
        result = calibrate(folder, args.target_mean, batches, args.windows, args.window_len,
                           documents=documents, server=server)
    except (ValueError, ServerPathError) as exc:
        raise ServeError(f"calibrate: {exc}") from None
    for entry in result["per_batch"]:
        print(f"per-layer NLL rise [nats] on the calibration {result['data']} when only that "
              f"layer is pruned (batch "
              f"{entry['batch']}; table: mean {entry['mean_kept']:.1f} experts computed per "
              "layer and step):", file=sys.stderr)
        print("layer  " + " ".join(f"{m:>7}" for m in result["candidates"])
              + "   budget (experts computed)", file=sys.stderr)
        for layer, (row, budget) in enumerate(zip(entry["sensitivity_nats"], entry["budgets"],
                                                  strict=True)):
            if not row:  # no routed experts here: never pruned, in no mean
                print(f"{layer:>5}  dense (no routed experts): never pruned", file=sys.stderr)
                continue
            print(f"{layer:>5}  " + " ".join(f"{row[m]:7.4f}" for m in result["candidates"])
                  + f"   {budget:>6} ({entry['kept'][layer][budget]:.1f})", file=sys.stderr)
    return _emit(msgspec.json.encode(result["policy"]).decode(), args.out)


def _calibrate_ladder(args: argparse.Namespace, folder: Path, batches: list[int],
                      documents: list[str] | None, server: tuple[str, str, str] | None
                      ) -> int:
    import msgspec

    from lynx.calibrate.ladder import build_ladder
    from lynx.calibrate.server_path import ServerPathError
    from lynx_protocol.ladder import PPL_RISE, Threshold, encode_ladder, start_rung

    try:
        means = ([float(m) for m in args.means.split(",") if m.strip()] if args.means
                 else None)
    except ValueError:
        raise ServeError(f"calibrate: --means {args.means!r} is not a list of numbers"
                         ) from None
    if not 0 < args.max_ppl_rise <= 10 or args.heldout_windows < batches[-1]:
        raise ServeError("calibrate: need 0 < --max-ppl-rise <= 10 and --heldout-windows >= "
                         "the largest batch")
    if not 0 <= args.start_threshold <= args.max_ppl_rise:
        raise ServeError("calibrate: need 0 <= --start-threshold <= --max-ppl-rise")
    try:
        ladder, _ = build_ladder(folder, means, batches, args.windows, args.window_len,
                                 args.heldout_windows, max_ppl_rise=args.max_ppl_rise,
                                 documents=documents, server=server)
    except (ValueError, ServerPathError) as exc:
        raise ServeError(f"calibrate: {exc}") from None
    print("rung      " + "".join(f"  B={t.batch}: experts  mass   ppl" for t in
                                  ladder.rungs[0].tables), file=sys.stderr)
    for rung in ladder.rungs:
        print(f"{rung.name:<10}" + "".join(
            f"  {t.experts_computed:13.2f} {t.mass_kept:6.3f} "
            f"{100 * (t.cost(PPL_RISE) or 0):+5.2f}%"
            for t in rung.tables), file=sys.stderr)
    for gone in ladder.dropped:
        print(f"dropped {gone.name}: {gone.reason}", file=sys.stderr)
    if not args.no_start:
        ladder = msgspec.structs.replace(ladder, threshold=Threshold(value=args.start_threshold))
        start = start_rung(ladder)
        print(f"start rung: {start.name if start else '-'} (the furthest within ppl_rise <= "
              f"{args.start_threshold:g}; a runtime serving the folder that holds this file as "
              f"lynx_ladder.json starts on it)", file=sys.stderr)
    return _emit(encode_ladder(ladder).decode(), args.out)


def _emit(text: str, out: Path | None) -> int:
    """Write ``text`` to ``out`` (saying so on stderr), or to stdout."""
    if out is not None:
        out.write_text(text + "\n", encoding="utf-8")
        print(f"wrote {out}", file=sys.stderr)
    else:
        print(text)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lynx-serve", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run one SGLang server in the foreground")
    serve.add_argument("model", help="reference model (mixtral-mini, qwen3-moe-mini, "
                       "qwen3-moe-128) or folder")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=30000)
    serve.add_argument("--lynx", action="store_true", help="enable the Lynx plugin")
    serve.add_argument("--policy", help="start-up policy as JSON (see lynx_protocol.policy)")
    serve.add_argument("--controller", help="policy controller endpoint (ipc:// or tcp://)")
    demo = sub.add_parser("demo", help="stock vs Lynx on the same prompts")
    demo.add_argument("--model", default="qwen3-moe-128")
    demo.add_argument("--port", type=int, default=0, help="0: pick free ports")
    demo.add_argument("--widen", type=int, default=64,
                      help="expert widening of the served copy (1: the checkpoint itself)")
    cal = sub.add_parser("calibrate", help="per-layer budgets for a target mean of experts "
                         "(writes a policy JSON for LYNX_POLICY_FILE or PUT /v1/policy)")
    cal.add_argument("model", help="reference model name or checkpoint folder")
    cal.add_argument("--target-mean", type=float,
                     help="experts computed per layer and decode step, averaged over the "
                     "layers, at each calibration batch (a budget above a step's union costs "
                     "the union); without --ladder, required")
    cal.add_argument("--ladder", action="store_true",
                     help="write a ladder (lynx-ladder/1: one calibrated table per mean of "
                     "--means, each measured on held-out data) instead of one policy")
    cal.add_argument("--means", help="ladder: comma-separated mean budgets (default: 3/4 of "
                     "E down to 1/8 of E, those >= 1.5 top_k)")
    cal.add_argument("--max-ppl-rise", type=float, default=0.05,
                     help="ladder: quality floor, held-out perplexity rise as a fraction")
    cal.add_argument("--start-threshold", type=float, default=0.01,
                     help="ladder: a runtime serving the checkpoint starts on the furthest rung "
                     "with held-out perplexity rise at most this (a fraction; stored as the "
                     "ladder's threshold)")
    cal.add_argument("--no-start", action="store_true",
                     help="ladder: store no threshold (runtimes start unpruned or on "
                     "lynx_policy.json; the controller still plans over the rungs)")
    cal.add_argument("--heldout-windows", type=int, default=64)
    cal.add_argument("--batches", default="16,32,64",
                     help="decode batch sizes to calibrate (one per-layer table each)")
    cal.add_argument("--windows", type=int, default=64)
    cal.add_argument("--window-len", type=int, default=96)
    cal.add_argument("--corpus", help="calibrate on your own text: a text file, a folder of "
                     "them, a .jsonl file or hf:NAME[:SPLIT] from the local datasets cache "
                     "(default: the reference models' code splits); every 5th document is "
                     "held out")
    cal.add_argument("--text-field", default="text", help="--corpus: the JSONL / dataset field")
    cal.add_argument("--out", type=Path, help="write the policy JSON here (default: stdout)")
    cal.add_argument("--server", help="measure through this SGLang server (started with "
                     "LYNX_EVALUATION=prefill-as-decode, --disable-radix-cache and "
                     "LYNX_CONTROLLER) instead of transformers, one policy or --ladder; needs "
                     "--controller-admin")
    cal.add_argument("--controller-admin", help="--server: the admin URL of the controller "
                     "the server's LYNX_CONTROLLER names, used only for this calibration "
                     "(token: LYNX_ADMIN_TOKEN)")
    from lynx.calibrate import shadow_ladder
    from lynx.evaluate.cli import add_parser

    add_parser(sub)
    shadow_ladder.add_parser(sub)
    args = parser.parse_args(argv)
    try:
        if args.command == "serve":
            return _serve(args)
        if args.command == "evaluate":
            from lynx.evaluate.cli import run

            return run(args)
        if args.command == "calibrate":
            return _calibrate(args)
        if args.command == "shadow-ladder":
            return shadow_ladder.run(args)
        from lynx.serving.demo import run_demo

        return run_demo(args.model, args.port, args.widen)
    except (ModelError, ServeError, LynxConfigError, GateError) as exc:
        first_line = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        print(f"lynx-serve: error: {first_line}", file=sys.stderr)
        rest = str(exc).splitlines()[1:]
        if rest:
            print("\n".join(rest), file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
