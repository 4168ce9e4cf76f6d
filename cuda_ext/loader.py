"""Building and loading the compiled backends.

Each backend ("cpu": the C++ loops, "cuda": the CUDA kernels) is looked for first as an ahead-of-time build made
by `setup.py` (`cuda_ext._cpu`, `cuda_ext._cuda`), used only if it was compiled from the current sources, and
otherwise built just in time with `torch.utils.cpp_extension.load` into a per-user cache:
`$RFWP_CACHE_DIR`, else `$XDG_CACHE_HOME/rfwp`, else `~/.cache/rfwp`, one folder per source hash (so a changed
source, flag, torch or Python version never reuses a stale build). A failure is remembered for the process and
raised as `BackendUnavailable` with the reason: no GPU, no compiler, or the compiler's own output.

`auto_backend` decides what `backend="auto"` runs (see its docstring for the CPU policy).
"""
from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import importlib
import logging
import os
import shutil
import sys
import threading
from pathlib import Path
from types import ModuleType
from typing import Iterator

import torch

log = logging.getLogger(__name__)

CSRC = Path(__file__).resolve().parent / "csrc"
# "emulated" is the CUDA kernels compiled for the CPU under csrc/cuda/emulator.h: a test tool, not a backend
# that models.ops offers.
BACKENDS = ("cpu", "cuda", "emulated")


class BackendUnavailable(RuntimeError):
    """An explicitly requested backend cannot run here; the message says why and what to do."""


def sources(name: str) -> list[Path]:
    """The translation units of backend `name`."""
    if name == "cpu":
        return [CSRC / "cpu" / "rules.cpp"]
    if name == "emulated":
        return [CSRC / "emulator.cpp"]
    return [CSRC / "binding_cuda.cpp", *sorted((CSRC / "cuda").glob("*.cu"))]


def _headers(name: str) -> list[Path]:
    """Files the sources include (part of the source hash)."""
    if name == "cpu":
        return [CSRC / "binding.h"]
    cuda = sorted((CSRC / "cuda").glob("*.h*"))
    if name == "emulated":
        return [CSRC / "binding.h", CSRC / "binding_cuda.cpp", *cuda, *sorted((CSRC / "cuda").glob("*.cu"))]
    return [CSRC / "binding.h", *cuda]


def compile_flags(name: str) -> dict[str, list[str]]:
    """Flags for `cpp_extension.load` / `setup.py`. OpenMP makes `at::parallel_for` run the chains on all cores
    (torch's CPU build uses OpenMP; the extension links the libgomp torch has already loaded). The CPU loops
    use AVX2 and FMA where this CPU has them (as torch's own kernels do); the flags are part of the build's
    hash, so a cache or an ahead-of-time build made on another machine is never run on a CPU that lacks them.
    `-fno-trapping-math` lets the clamps of the inlined exp vectorize (nothing here reads FP exception flags)."""
    if name == "cpu":
        vector = ["-mavx2", "-mfma"] if torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512") else []
        return {"cxx": ["-O3", "-fopenmp", "-fno-trapping-math", *vector], "ld": ["-fopenmp"]}
    if name == "emulated":
        return {"cxx": ["-O1", "-DRFWP_EMULATE"], "ld": []}
    return {"cxx": ["-O3"], "nvcc": ["-O3", "-lineinfo", "-std=c++17"], "ld": []}


def source_hash(name: str) -> str:
    """Hash of everything a build of `name` depends on: sources, headers, flags, torch and Python versions."""
    h = hashlib.sha256()
    for path in sources(name) + _headers(name):
        h.update(path.name.encode())
        h.update(path.read_bytes())
    h.update(repr((compile_flags(name), torch.__version__, torch.version.cuda, sys.version_info[:2])).encode())
    return h.hexdigest()[:16]


def cache_root() -> Path:
    if "RFWP_CACHE_DIR" in os.environ:
        return Path(os.environ["RFWP_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "rfwp"


def extension_name(name: str) -> str:
    return f"rfwp_{name}"


def build_directory(name: str) -> Path:
    return cache_root() / f"{extension_name(name)}_{source_hash(name)}"


_lock = threading.Lock()
_loaded: dict[str, ModuleType | BackendUnavailable] = {}


def _aot_module(name: str) -> ModuleType | None:
    """The module built by setup.py, if there is one and it matches the current sources."""
    try:
        module = importlib.import_module(f"cuda_ext._{name}")
    except ImportError:
        return None
    if getattr(module, "source_hash", None) != source_hash(name):
        log.warning("ignoring cuda_ext._%s: it was built from other sources; building just in time instead", name)
        return None
    return module


def _why_not_buildable(name: str) -> str | None:
    """The reason backend `name` cannot be built or run on this machine, or None."""
    from torch.utils import cpp_extension

    if name == "cuda":
        if torch.version.cuda is None:
            return f"no GPU support: this PyTorch ({torch.__version__}) is a CPU-only build"
        if not torch.cuda.is_available():
            return "no GPU: torch.cuda.is_available() is False"
        if cpp_extension.CUDA_HOME is None:
            return "nvcc not found: set CUDA_HOME to the CUDA toolkit used to build the kernels"
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        return f"no C++ compiler: {compiler!r} is not on PATH (set CXX)"
    if not cpp_extension.is_ninja_available():
        return "ninja is not installed (pip install ninja); torch.utils.cpp_extension needs it to build"
    return None


@contextlib.contextmanager
def _build_lock(directory: Path) -> Iterator[None]:
    """Serialise builds of one directory across processes. torch's own `lock` file is left behind when a build is
    killed and then makes every later `load()` wait forever (pytorch#189245); holding this OS lock (released by the
    kernel when its holder dies) proves no build is running, so such a file is stale and is removed."""
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / ".rfwp-build.lock", "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.warning("waiting for another process that is building %s", directory)
            fcntl.flock(f, fcntl.LOCK_EX)
        (directory / "lock").unlink(missing_ok=True)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _jit_build(name: str) -> ModuleType:
    from torch.utils import cpp_extension

    directory = build_directory(name)
    flags = compile_flags(name)
    with _build_lock(directory):
        if not (directory / f"{extension_name(name)}.so").exists():
            log.warning("building the rfwp %s extension (first use; takes about a minute) in %s", name, directory)
        return cpp_extension.load(
            name=extension_name(name),
            sources=[str(p) for p in sources(name)],
            extra_cflags=flags["cxx"],
            extra_cuda_cflags=flags.get("nvcc"),
            extra_ldflags=flags["ld"],
            build_directory=str(directory),
            verbose=os.environ.get("RFWP_VERBOSE_BUILD") == "1",
            with_cuda=name == "cuda",
        )


def load(name: str) -> ModuleType:
    """The compiled extension of backend `name`, built if needed; raises BackendUnavailable saying why not."""
    if name not in BACKENDS:
        raise ValueError(f"unknown compiled backend {name!r}; valid: {', '.join(BACKENDS)}")
    with _lock:
        if name not in _loaded:
            why = _why_not_buildable(name)
            if why is not None:
                _loaded[name] = BackendUnavailable(f"the {name!r} backend cannot run here: {why}")
            else:
                try:
                    _loaded[name] = _aot_module(name) or _jit_build(name)
                except Exception as e:  # the compiler's message is in str(e)
                    _loaded[name] = BackendUnavailable(f"building the {name!r} backend failed: {e}")
        result = _loaded[name]
    if isinstance(result, BackendUnavailable):
        raise result
    return result


def is_built(name: str) -> bool:
    """Whether backend `name` is loaded, or can be loaded without compiling anything."""
    with _lock:
        if name in _loaded:
            return not isinstance(_loaded[name], BackendUnavailable)
    if _aot_module(name) is not None:
        return True
    return (build_directory(name) / f"{extension_name(name)}.so").exists()


@functools.lru_cache(maxsize=None)
def auto_backend(device_type: str) -> str:
    """The backend `backend="auto"` runs on tensors of `device_type`.

    - "cuda" tensors: the CUDA kernels, built on first use (a GPU training run amortises the build); if they
      cannot be built, a warning (once) and the reference.
    - "cpu" tensors: the C++ backend when it is already built (ahead of time, or cached by an earlier process,
      e.g. by `python -m cuda_ext build`), or when `RFWP_BUILD_CPU=1` allows building it now. Otherwise the
      reference: a silent first build would stall every fresh process (each Ray actor, each test session) for
      20-60 s, which is worse than the reference's cost for short CPU jobs.

    Decided once per device type and process (cached: this runs on every call of a rule).
    """
    if device_type == "cuda" or (
        device_type == "cpu" and (os.environ.get("RFWP_BUILD_CPU") == "1" or is_built("cpu"))
    ):
        try:
            load(device_type)
            return device_type
        except BackendUnavailable as e:
            log.warning("%s; backend='auto' falls back to the reference", e)
    return "reference"


def load_backend(name: str):
    """An object with the rule functions of `models.ops.reference`, computed by compiled backend `name`."""
    from cuda_ext.functions import KernelBackend

    return KernelBackend.get(name, load(name))
