"""SGLang's own serving benchmark (``python -m sglang.benchmark.serving``) as one call.

Random token-id prompts (``--dataset-name random-ids``: no dataset download), fixed input and
output lengths, a tokenizer from a local checkpoint folder. Its JSON result line carries the
metrics a serving engineer reads (``median_tpot_ms``, ``p99_itl_ms``, ``output_throughput``,
``request_goodput`` with ``--goodput``...); this module adds nothing to them.

The tool runs in this process (its command-line entry point with our arguments): importing it
takes ~20 s on this CPU, once per process instead of once per run.
"""

from __future__ import annotations

import contextlib
import io
import json
import sys
from pathlib import Path
from typing import Any


def serving_benchmark(url: str, tokenizer: Path, out: Path, *, prompts: int, input_len: int,
                      output_len: int, request_rate: float = float("inf"),
                      max_concurrency: int | None = None, goodput_tpot_ms: float | None = None,
                      seed: int = 1) -> dict[str, Any]:
    """One run against the server at ``url``; returns its JSON result (``out`` keeps it).

    ``request_rate``: Poisson arrivals [req/s] (inf: all at once); ``max_concurrency``: at
    most that many requests in flight (a closed loop at fixed concurrency with rate inf).
    Raises RuntimeError with the tool's stderr tail when it fails."""
    cmd = ["sglang.benchmark.serving", "--backend", "sglang",
           "--base-url", url, "--dataset-name", "random-ids", "--tokenizer", str(tokenizer),
           "--random-input-len", str(input_len), "--random-output-len", str(output_len),
           "--random-range-ratio", "1.0", "--num-prompts", str(prompts),
           "--request-rate", str(request_rate), "--output-file", str(out), "--disable-tqdm",
           "--seed", str(seed)]
    if max_concurrency is not None:
        cmd += ["--max-concurrency", str(max_concurrency)]
    if goodput_tpot_ms is not None:
        cmd += ["--goodput", f"tpot:{goodput_tpot_ms}"]
    from sglang.benchmark import serving

    out.unlink(missing_ok=True)  # the tool appends
    saved, sys.argv = sys.argv, cmd
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):
            serving.cli_main()
    except (Exception, SystemExit) as error:
        raise RuntimeError(f"sglang.benchmark.serving failed ({type(error).__name__}: "
                           f"{error}): {printed.getvalue()[-2000:]}") from None
    finally:
        sys.argv = saved
    if not out.is_file():
        raise RuntimeError(f"sglang.benchmark.serving wrote no result: "
                           f"{printed.getvalue()[-2000:]}")
    return dict(json.loads(out.read_text().splitlines()[-1]))
