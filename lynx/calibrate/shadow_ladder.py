"""``lynx-serve shadow-ladder``: a ladder from shadow statistics files (``LYNX_SHADOW``,
`lynx.sglang_plugin.shadow`), calibration from live traffic with routing mass as the proxy for
quality (issue 25). The format, its checks and the builder are torch-free and shared with the
controller (`lynx_protocol.shadow`, which documents the method); this is the file reading and
the command line.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from lynx_protocol.ladder import MASS_LOST
from lynx_protocol.shadow import (
    ShadowError,
    bucket_curves,
    check_shadow,
    ladder_from_shadow,
    merge_shadow,
)

__all__ = ["ShadowError", "add_parser", "bucket_curves", "ladder_from_shadow",
           "load_shadow_file", "read_shadow", "run"]


def load_shadow_file(path: Path) -> dict[str, Any]:
    """One file's statistics as data (`lynx_protocol.shadow.check_shadow`). Raises
    `ShadowError` (one line, naming the file) for a missing, damaged or inconsistent file."""
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise ShadowError(f"{path}: cannot read: {exc.strerror}") from None
    return check_shadow(raw, str(path))


def read_shadow(paths: list[Path]) -> dict[str, Any]:
    """The statistics of one or more files (a DP deployment writes one per DP rank), summed
    bucket by bucket. Raises `ShadowError` for a missing, damaged or mismatched file."""
    if not paths:
        raise ShadowError("no shadow statistics file given")
    return merge_shadow([(str(p), load_shadow_file(p)) for p in paths])


def add_parser(sub: Any) -> None:
    """``lynx-serve shadow-ladder``: the subcommand's arguments."""
    cmd = sub.add_parser("shadow-ladder", help="a ladder from shadow statistics (LYNX_SHADOW "
                         "files): routing mass as the quality proxy; review it, then PUT "
                         "/v1/ladder")
    cmd.add_argument("files", nargs="+", type=Path,
                     help="LYNX_SHADOW files (one per DP rank: <file>.dp<rank>)")
    cmd.add_argument("--means", help="comma-separated mean budgets (default: 3/4 of E down "
                     "to 1/8 of E, those >= 1.5 top_k)")
    cmd.add_argument("--min-steps", type=int, default=200,
                     help="measured decode steps (one in LYNX_SHADOW_EVERY) a batch bucket "
                     "needs to get a table")
    cmd.add_argument("--max-mass-lost", type=float, default=0.1,
                     help="floor: rungs losing more routing mass (a fraction) are dropped")
    cmd.add_argument("--name", default="", help="the model's name in the ladder")
    cmd.add_argument("--out", type=Path, help="write the ladder here (default: stdout)")


def run(args: Any) -> int:
    """Build, print a summary on stderr, write the ladder; exit 2 with one line on bad input."""
    import sys

    from lynx_protocol.ladder import encode_ladder

    try:
        means = [float(m) for m in args.means.split(",")] if args.means else None
        if means is not None and not all(math.isfinite(m) and m >= 1 for m in means):
            raise ShadowError(f"--means {args.means!r}: need finite means >= 1")
        if args.min_steps < 1 or not 0 < args.max_mass_lost <= 1:
            raise ShadowError("need --min-steps >= 1 and 0 < --max-mass-lost <= 1")
        if args.out is not None and not args.out.parent.is_dir():
            raise ShadowError(f"--out {args.out}: no such directory")
        ladder, _ = ladder_from_shadow(read_shadow(args.files), means, args.min_steps,
                                       args.max_mass_lost, args.name)
    except (ShadowError, ValueError) as exc:
        print(f"lynx-serve: error: shadow-ladder: {exc}".replace("\n", " "), file=sys.stderr)
        return 2
    for rung in ladder.rungs:
        print(f"  {rung.name}: {rung.experts():.2f} experts per layer-step, mass lost "
              f"{rung.cost(MASS_LOST):.4f}", file=sys.stderr)
    for gone in ladder.dropped:
        print(f"  dropped {gone.name}: {gone.reason}", file=sys.stderr)
    text = encode_ladder(ladder).decode()
    if args.out is None:
        print(text)
    else:
        args.out.write_text(text + "\n", encoding="utf-8")
        print(f"wrote {args.out}", file=sys.stderr)
    return 0
