"""Triton kernels for the selection hot path; `lynx.selection` (torch) is their specification.

- `stock_topk_kernel`: per-row softmax/sigmoid, top-K, and per-expert importance and top-1
  votes (the ``budget`` policy's and the statistics' input).
- `affinity_kernels`: AffinityBinning's exact batch-support keys and per-row re-ranked top-K.
- `launcher`: allocation, launch, and the drop-in `select_layer_step_triton`.
Importing this package does not import Triton; the launcher does.
"""
