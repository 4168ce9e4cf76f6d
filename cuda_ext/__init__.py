"""Fused kernels of the fast-weight update rules: CUDA kernels and a C++ CPU backend, with their loader and
autograd functions (design.md §7, kernels.md).

Contract used by `models.ops`: `auto_backend(device_type)` names the backend `backend="auto"` runs ("cuda",
"cpu" or "reference"); `load_backend(name)` returns an object with the rule functions of
`models.ops.reference` computed by the compiled backend `name`, or raises `BackendUnavailable` saying why it
cannot run. Nothing is compiled at import; `python -m cuda_ext build` builds ahead of first use.
"""
from cuda_ext.loader import BackendUnavailable, auto_backend, is_built, load_backend

__all__ = ["BackendUnavailable", "auto_backend", "is_built", "load_backend"]
