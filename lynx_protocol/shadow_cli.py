"""Reading shadow statistics files and building a ladder from them on the command line, shared
by ``lynx-serve shadow-ladder FILE...`` (the runtime's side) and ``lynx-policy ladder
--from-shadow FILE...`` (the controller's side). Files: the runtimes' ``LYNX_SHADOW`` files (one
per DP rank) or the controller's ``shadow.json`` (`lynx_policy.shadow_store`). Exit 0 with the
ladder written, 2 with one line on stderr for bad input.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any

from lynx_protocol.ladder import MASS_LOST, encode_ladder
from lynx_protocol.shadow import ShadowError, check_shadow, ladder_from_shadow, merge_shadow


def load_shadow_file(path: Path) -> dict[str, Any]:
    """One file's statistics as data (`lynx_protocol.shadow.check_shadow`). Raises
    `ShadowError` (one line, naming the file) for a missing, damaged or inconsistent file."""
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise ShadowError(f"{path}: cannot read: {exc.strerror}") from None
    return check_shadow(raw, str(path))


def read_shadow(paths: list[Path]) -> dict[str, Any]:
    """The statistics of one or more files, summed bucket by bucket. Raises `ShadowError`
    for a missing, damaged or mismatched file."""
    if not paths:
        raise ShadowError("no shadow statistics file given")
    return merge_shadow([(str(p), load_shadow_file(p)) for p in paths])


def add_arguments(cmd: argparse.ArgumentParser, files: str) -> None:
    """The builder's options; ``files``: the option (or positional) naming the files."""
    text = ("shadow statistics files: LYNX_SHADOW files (one per DP rank, <file>.dp<rank>) or "
            "the controller's shadow.json")
    if files.startswith("-"):
        cmd.add_argument(files, nargs="+", type=Path, required=True, metavar="FILE", help=text)
    else:
        cmd.add_argument(files, nargs="+", type=Path, metavar="FILE", help=text)
    cmd.add_argument("--means", help="comma-separated mean budgets (default: 3/4 of E down "
                     "to 1/8 of E, those >= 1.5 top_k)")
    cmd.add_argument("--min-steps", type=int, default=200,
                     help="measured decode steps (one in LYNX_SHADOW_EVERY) a batch bucket "
                     "needs to get a table")
    cmd.add_argument("--max-mass-lost", type=float, default=0.1,
                     help="floor: rungs losing more routing mass (a fraction) are dropped")
    cmd.add_argument("--name", default="", help="the model's name in the ladder")
    cmd.add_argument("--out", type=Path, help="write the ladder here (default: stdout)")


def run(args: Any, files: list[Path], prog: str, built_by: str) -> int:
    """Build, print a summary on stderr, write the ladder; exit 2 with one line (prefixed
    ``prog``) on bad input."""
    try:
        means = [float(m) for m in args.means.split(",")] if args.means else None
        if means is not None and not all(math.isfinite(m) and m >= 1 for m in means):
            raise ShadowError(f"--means {args.means!r}: need finite means >= 1")
        if args.min_steps < 1 or not 0 < args.max_mass_lost <= 1:
            raise ShadowError("need --min-steps >= 1 and 0 < --max-mass-lost <= 1")
        if args.out is not None and (args.out.is_dir() or not args.out.parent.is_dir()):
            raise ShadowError(f"--out {args.out}: expected a file in an existing directory")
        ladder, _ = ladder_from_shadow(read_shadow(files), means, args.min_steps,
                                       args.max_mass_lost, args.name, built_by)
    except (ShadowError, ValueError) as exc:
        print(f"{prog}: {exc}".replace("\n", " "), file=sys.stderr)
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
