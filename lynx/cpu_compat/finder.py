"""Import hook: falls back to the pure-torch ``sgl_kernel`` stand-in, never shadowing a real build.

On the first ``import sgl_kernel`` the finder imports the real package. If that raises
(ImportError or OSError, e.g. ``libcuda.so.1: cannot open shared object file``), the
half-imported modules are removed and the stand-in (`lynx.cpu_compat.stand_in`) is served
for ``sgl_kernel`` and every ``sgl_kernel.<submodule>``. If the real package imports, the
finder steps aside for good.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import logging
import sys
import types
from collections.abc import Sequence

logger = logging.getLogger("lynx.cpu_compat")

PACKAGE = "sgl_kernel"


class _StandInLoader(importlib.abc.Loader):
    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        from lynx.cpu_compat.stand_in import build_module

        return build_module(spec.name)

    def exec_module(self, module: types.ModuleType) -> None:
        return None


class SglKernelFallbackFinder(importlib.abc.MetaPathFinder):
    """Decides once per process between the real ``sgl_kernel`` and the stand-in."""

    def __init__(self) -> None:
        self.decision: str | None = None  # "real" or "stand-in"
        self.real_error: str | None = None
        self._probing = False

    def _decide(self) -> str:
        if self.decision is None:
            self._probing = True
            try:
                importlib.import_module(PACKAGE)
                self.decision = "real"
            except (ImportError, OSError) as exc:
                self.real_error = f"{type(exc).__name__}: {exc}".splitlines()[0]
                for name in [m for m in sys.modules if m == PACKAGE or m.startswith(PACKAGE + ".")]:
                    del sys.modules[name]
                self.decision = "stand-in"
                logger.warning(
                    "real sgl_kernel cannot load on this machine (%s); using Lynx's pure-torch "
                    "CPU stand-in for the SGLang CPU engine",
                    self.real_error,
                )
            finally:
                self._probing = False
        return self.decision

    def find_spec(
        self,
        fullname: str,
        path: Sequence[str] | None = None,
        target: types.ModuleType | None = None,
    ) -> importlib.machinery.ModuleSpec | None:
        if self._probing or not (fullname == PACKAGE or fullname.startswith(PACKAGE + ".")):
            return None
        if self._decide() == "real":
            return None  # the real package is in sys.modules already or loads normally
        is_package = fullname == PACKAGE or fullname.count(".") == 1
        return importlib.util.spec_from_loader(
            fullname, _StandInLoader(), is_package=is_package
        )


def install_finder() -> SglKernelFallbackFinder:
    for finder in sys.meta_path:
        if isinstance(finder, SglKernelFallbackFinder):
            return finder
    finder = SglKernelFallbackFinder()
    sys.meta_path.insert(0, finder)
    return finder


def active_finder() -> SglKernelFallbackFinder | None:
    return next((f for f in sys.meta_path if isinstance(f, SglKernelFallbackFinder)), None)
