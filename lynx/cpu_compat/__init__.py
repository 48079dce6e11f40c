"""CPU compatibility layer: a pure-torch ``sgl_kernel`` stand-in for SGLang's CPU engine.

Activated only when ``SGLANG_USE_CPU_ENGINE=1`` and the real ``sgl_kernel`` cannot import
(see `lynx.cpu_compat.finder`). Start-up wiring: ``lynx_cpu_compat.pth`` runs
`lynx.cpu_compat.boot` in every interpreter of the environment.
"""
