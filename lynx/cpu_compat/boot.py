"""Start-up hook (run from ``lynx_cpu_compat.pth`` in every interpreter of the environment).

Costs one environment lookup when SGLang's CPU engine is not requested. When it is
(``SGLANG_USE_CPU_ENGINE=1``), installs `SglKernelFallbackFinder`, which lets the real
``sgl_kernel`` load whenever it can and serves Lynx's pure-torch stand-in only when the real
one fails to import (PyPI's sgl-kernel is the CUDA build: without libcuda it cannot load).
"""

from __future__ import annotations

import os


def cpu_engine_requested() -> bool:
    return os.environ.get("SGLANG_USE_CPU_ENGINE", "0") == "1"


def install() -> None:
    if not cpu_engine_requested() or os.environ.get("LYNX_CPU_COMPAT", "1") == "0":
        return
    from lynx.cpu_compat.finder import install_finder

    install_finder()


install()
