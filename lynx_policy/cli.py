"""``lynx-policy``: run or check the policy controller.

    lynx-policy serve --config controller.toml      # run until SIGTERM/SIGINT
    lynx-policy check-config --config controller.toml
    lynx-policy keys generate --dir keys/ --name controller   # CURVE key pair (.key, .key_secret)
    lynx-policy profile --server-url http://127.0.0.1:30000   # seed the latency model
    lynx-policy ladder --from-shadow state/shadow.json --out ladder.json  # review, then PUT

Exit codes: 0 clean stop, 2 bad configuration or state (one line on stderr), 1 crash.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys

import msgspec

from lynx_policy.config import ConfigError, load_config, read_admin_token
from lynx_policy.state import StateError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lynx-policy", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    for name, text in (("serve", "run the controller"),
                       ("check-config", "validate the config and print it as JSON")):
        sub = commands.add_parser(name, help=text)
        sub.add_argument("--config", help="TOML or JSON file (env LYNX_POLICY__* overrides)")
        sub.add_argument("--log-level", default="INFO",
                         choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    keys = commands.add_parser("keys", help="CURVE key files for the controller link")
    keys.add_argument("action", choices=["generate"])
    keys.add_argument("--dir", required=True, help="directory to write NAME.key(_secret) into")
    keys.add_argument("--name", required=True,
                      help="'controller', or a runtime's name (its .key goes into the "
                           "controller's link.curve_clients_dir)")
    keys.add_argument("--log-level", default="INFO")
    ladder = commands.add_parser("ladder", help="a mass_lost ladder from shadow statistics "
                                 "(the controller's shadow.json or LYNX_SHADOW files); review "
                                 "it, then PUT /v1/ladder")
    from lynx_protocol.shadow_cli import add_arguments

    add_arguments(ladder, "--from-shadow")
    ladder.add_argument("--log-level", default="WARNING")
    from lynx_policy import profile

    profile.add_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command == "ladder":
        from lynx_protocol.shadow_cli import run

        return run(args, args.from_shadow, "lynx-policy: ladder", "lynx-policy ladder")
    if args.command == "profile":
        from lynx_policy import profile

        return profile.main(args)
    if args.command == "keys":
        from pathlib import Path

        from lynx_protocol.security import KeyError_, generate_keypair

        try:
            public, secret = generate_keypair(Path(args.dir), args.name)
        except (KeyError_, OSError) as exc:
            print(f"lynx-policy: {exc}", file=sys.stderr)
            return 2
        print(f"public key (share it): {public}\nkey pair (keep it, mode 0600): {secret}")
        return 0
    try:
        config = load_config(args.config)
        if args.command == "check-config":
            sys.stdout.write(msgspec.json.format(msgspec.json.encode(config)).decode() + "\n")
            return 0
        token = read_admin_token(config)
    except ConfigError as exc:
        print(f"lynx-policy: {exc}", file=sys.stderr)
        return 2
    return _serve(config, token)


def _serve(config: object, token: str) -> int:
    from lynx_policy.service import Controller

    async def run() -> None:
        controller = Controller(config, token)  # type: ignore[arg-type]
        loop = asyncio.get_running_loop()
        # uvicorn takes over SIGINT/SIGTERM while it serves and re-raises them afterwards;
        # these handlers cover the time before and after, so a stop is always graceful.
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: loop.call_soon_threadsafe(controller.request_stop))
        await controller.run()

    try:
        asyncio.run(run())
    except StateError as exc:
        print(f"lynx-policy: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
