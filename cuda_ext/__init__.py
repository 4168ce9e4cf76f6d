"""Fused kernels for the fast-weight update rules (being written; see issue 5).

Contract used by `models.ops`: `auto_backend(device_type) -> str` names the fastest backend that can run on
that device type ("cuda", "cpu" or "reference"); `load_backend(name) -> module` returns a module with the same
rule functions as `models.ops.reference`, or raises `BackendUnavailable` saying why it cannot run.
"""


class BackendUnavailable(RuntimeError):
    """An explicitly requested backend cannot run here; the message says why and what to do."""


def auto_backend(device_type: str) -> str:
    return "reference"


def load_backend(name: str):
    raise BackendUnavailable(f"the {name!r} backend is not built in this version; use backend='reference'")
