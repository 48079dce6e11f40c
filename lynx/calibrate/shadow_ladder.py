"""``lynx-serve shadow-ladder FILE...``: a ladder from shadow statistics files (``LYNX_SHADOW``,
`lynx.sglang_plugin.shadow`), calibration from live traffic with routing mass as the proxy for
quality (issue 25). The format, its checks, the builder and this command's body are torch-free
and shared with the controller (`lynx_protocol.shadow`, which documents the method;
`lynx_protocol.shadow_cli`; ``lynx-policy ladder --from-shadow`` is the same command there).
"""

from __future__ import annotations

from typing import Any

from lynx_protocol import shadow_cli
from lynx_protocol.shadow import ShadowError, bucket_curves, ladder_from_shadow
from lynx_protocol.shadow_cli import load_shadow_file, read_shadow

__all__ = ["ShadowError", "add_parser", "bucket_curves", "ladder_from_shadow",
           "load_shadow_file", "read_shadow", "run"]


def add_parser(sub: Any) -> None:
    """``lynx-serve shadow-ladder``: the subcommand's arguments."""
    cmd = sub.add_parser("shadow-ladder", help="a ladder from shadow statistics (LYNX_SHADOW "
                         "files): routing mass as the quality proxy; review it, then PUT "
                         "/v1/ladder")
    shadow_cli.add_arguments(cmd, "files")


def run(args: Any) -> int:
    """Build, print a summary on stderr, write the ladder; exit 2 with one line on bad input."""
    return shadow_cli.run(args, args.files, "lynx-serve: error: shadow-ladder",
                          "lynx-serve shadow-ladder")
