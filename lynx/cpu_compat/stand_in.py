"""The ``sgl_kernel`` stand-in module served by `lynx.cpu_compat.finder`.

Names SGLang imports at import time resolve (``from sgl_kernel import x`` must not fail on the
CPU path, where most of them are never called). Only the ops in `lynx.cpu_compat.ops.OPS` and
`lynx.cpu_compat.spec_ops.SPEC_OPS` do something; calling any other name raises
`StandInOpMissing` naming the op, so a new code path that needs a real kernel fails loudly
instead of computing garbage.
"""

from __future__ import annotations

import os
import types
from typing import Any, NoReturn

from lynx.cpu_compat import ops, spec_ops


class StandInOpMissing(NotImplementedError):
    """An ``sgl_kernel`` op SGLang called that the CPU stand-in does not provide."""


class MissingOp:
    """Placeholder for an op the stand-in does not implement: raises when called."""

    def __init__(self, qualified_name: str) -> None:
        self.qualified_name = qualified_name
        self.__name__ = qualified_name.rsplit(".", 1)[-1]

    def __call__(self, *args: Any, **kwargs: Any) -> NoReturn:
        _trace("called", self.qualified_name)
        raise StandInOpMissing(
            f"{self.qualified_name} is not implemented by Lynx's CPU stand-in for sgl_kernel "
            "(the real sgl_kernel could not load on this machine). This SGLang code path needs "
            "a real kernel build; add a pure-torch version to lynx/cpu_compat/ops.py."
        )

    def __getattr__(self, name: str) -> MissingOp:
        if name.startswith("__"):
            raise AttributeError(name)
        return MissingOp(f"{self.qualified_name}.{name}")

    def __repr__(self) -> str:
        return f"<missing sgl_kernel op {self.qualified_name}>"


def _trace(event: str, name: str) -> None:
    """Append to $LYNX_CPU_COMPAT_TRACE (a file) which stand-in names SGLang touched."""
    path = os.environ.get("LYNX_CPU_COMPAT_TRACE")
    if path:
        with open(path, "a", encoding="utf-8") as fh:
            fh.write(f"{os.getpid()} {event} {name}\n")


def build_module(fullname: str) -> types.ModuleType:
    module = types.ModuleType(fullname, "Lynx pure-torch CPU stand-in for sgl_kernel")
    module.__dict__["__lynx_stand_in__"] = True
    module.__dict__["__version__"] = "0.0.0+lynx-cpu-stand-in"
    module.__dict__["__path__"] = []  # every name may be a subpackage
    for name, fn in {**ops.OPS, **spec_ops.SPEC_OPS}.items():
        module.__dict__[name] = fn

    def __getattr__(name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        _trace("resolved", f"{fullname}.{name}")
        return MissingOp(f"{fullname}.{name}")

    module.__dict__["__getattr__"] = __getattr__
    return module
