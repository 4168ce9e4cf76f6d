"""Fused kernels of the fast-weight update rules: CUDA kernels and a C++ CPU backend, with their loader and
autograd glue (docs/kernels.md).

Contract used by `models.ops`: `auto_backend(device_type)` names the backend `backend="auto"` runs ("cuda",
"cpu" or "reference"); `load_backend(name).run(rule, inputs, reset)` computes a rule declared in
`models.ops.rules` (handed in by the caller: nothing here imports the models) with the compiled backend `name`,
or `load_backend` raises `BackendUnavailable` saying why it cannot run. Nothing is compiled at import;
`ensure_built()` (what the training driver calls) or `python -m cuda_ext build` builds ahead of first use.
"""
from cuda_ext.loader import BackendUnavailable, auto_backend, ensure_built, is_built, load_backend

__all__ = ["BackendUnavailable", "auto_backend", "ensure_built", "is_built", "load_backend"]
