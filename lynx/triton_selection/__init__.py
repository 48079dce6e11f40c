"""Triton kernels for the selection hot path; `lynx.selection` (torch) is their specification."""
