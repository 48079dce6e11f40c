"""Selection packages compiled off the serving thread, in a worker process.

A policy the controller sends while the server runs may need a package that is not cached yet
(20-30 s of AOTInductor on this 2-core machine). Compiled on the scheduler's thread, that stalls
every request in flight; on another thread of the same process it is unsafe (``torch.export``
patches ``torch.nn.Module.__call__`` process-wide). So `BackgroundCompiles` starts one worker
process per package (``python -m lynx.selection.compile_worker``: a plain subprocess, so it
works from SGLang's scheduler processes, daemonic or not), the step runs eagerly meanwhile, and
the package is loaded (milliseconds) at the first step after the worker wrote it into the cache.
`compile_packages`: a benchmark's warm-up, several packages side by side before timing.
"""

from __future__ import annotations

import base64
import pickle
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import IO, Any


class BackgroundCompiles:
    """Worker processes compiling packages into ``cache_dir``, one per key."""

    def __init__(self, cache_dir: Path) -> None:
        self.cache_dir = cache_dir
        self.running: dict[Any, subprocess.Popen[bytes]] = {}
        self._logs: dict[Any, IO[bytes]] = {}  # each worker's output (a file: a pipe could
        # fill up with Inductor's logging and block the worker before it exits)

    def start(self, key: Any) -> None:
        """Start compiling ``key``'s package (a `compiled.GraphKey`) unless already started."""
        if key in self.running:
            return
        blob = base64.b64encode(pickle.dumps(key)).decode()
        log = tempfile.TemporaryFile()  # noqa: SIM115 (closed in `finished`)
        self._logs[key] = log
        self.running[key] = subprocess.Popen(
            [sys.executable, "-m", "lynx.selection.compile_worker", str(self.cache_dir), blob],
            stdout=subprocess.DEVNULL, stderr=log)

    def finished(self, key: Any) -> tuple[bool, str]:
        """(done, error) without waiting: done with error "" when the package is in the cache;
        not done while the worker runs (or was never started)."""
        worker = self.running.get(key)
        if worker is None or worker.poll() is None:
            return False, ""
        del self.running[key]
        log = self._logs.pop(key)
        log.seek(0)
        lines = log.read().decode(errors="replace").strip().splitlines()
        log.close()
        if worker.returncode == 0:
            return True, ""
        return True, lines[-1] if lines else f"compile worker exited {worker.returncode}"


def _compile_into(key: Any, cache_dir: Path) -> str:
    from lynx.selection.compiled import compile_step

    try:
        compile_step(key, cache_dir)
        return ""
    except Exception as error:
        return f"{type(error).__name__}: {error}"


def compile_packages(keys: list[Any], cache_dir: Path, jobs: int = 2) -> list[str]:
    """Compile the packages of ``keys`` missing from ``cache_dir`` in ``jobs`` processes side
    by side (a benchmark's warm-up: one compile uses one core). Returns one error per key
    that failed (its `CompiledSelection` tries again, then runs eagerly)."""
    from lynx.selection.compiled import package_name

    missing = [k for k in dict.fromkeys(keys) if not (cache_dir / package_name(k)).is_file()]
    if jobs < 2 or len(missing) < 2:
        return [e for e in (_compile_into(k, cache_dir) for k in missing) if e]
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        return [e for e in pool.map(_compile_into, missing, [cache_dir] * len(missing)) if e]


def main(argv: list[str]) -> int:
    """Worker: compile the pickled key ``argv[1]`` into the cache directory ``argv[0]``."""
    from lynx.selection.compiled import compile_step

    key = pickle.loads(base64.b64decode(argv[1]))  # written by BackgroundCompiles.start
    compile_step(key, Path(argv[0]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
