"""Building and loading the compiled backends.

Each backend ("cpu": the C++ loops, "cuda": the CUDA kernels) is looked for first as an ahead-of-time build made
by `setup.py` (`cuda_ext._cpu`, `cuda_ext._cuda`), used only if it was compiled from the current sources, and
otherwise built just in time with `torch.utils.cpp_extension.load` into a per-user cache:
`$RFWP_CACHE_DIR`, else `$XDG_CACHE_HOME/rfwp`, else `~/.cache/rfwp`. Each build has its own folder, named by
the hash of its sources, flags and torch/Python versions and by the Python environment and torch install that
build it, so a changed source never reuses a stale build and two virtualenvs (or two torch installs) never
share a folder or rebuild over each other. A process that finds another one building the same folder waits,
saying for whom and for how long. A failure is remembered for the process and raised as `BackendUnavailable`
with the reason: no GPU, no compiler, or the compiler's own output.

`auto_backend` decides what `backend="auto"` runs; `ensure_built` builds the CPU kernels up front so that it
runs them (docs/kernels.md §4).
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
import time
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


def install_hash() -> str:
    """Hash of the Python environment and the torch install a build is made with: the extension links against
    this torch's libraries and is compiled with its headers, so another virtualenv or another torch (even of
    the same version) must not load it or build into its folder."""
    identity = (sys.prefix, sys.executable, Path(torch.__file__).resolve().parent, torch.version.git_version)
    return hashlib.sha256(repr(identity).encode()).hexdigest()[:8]


def cache_root() -> Path:
    if "RFWP_CACHE_DIR" in os.environ:
        return Path(os.environ["RFWP_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "rfwp"


def extension_name(name: str) -> str:
    return f"rfwp_{name}"


def build_directory(name: str) -> Path:
    return cache_root() / f"{extension_name(name)}_{source_hash(name)}_{install_hash()}"


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


WAIT_REPORT_S = 15.0  # how often a process waiting for another's build says it is still waiting


@contextlib.contextmanager
def _build_lock(directory: Path) -> Iterator[None]:
    """Serialise builds of one directory across processes. The holder writes its PID and command line into the
    lock file, so that a process that has to wait says for whom, and how long it has waited so far. torch's own
    `lock` file is left behind when a build is killed and then makes every later `load()` wait forever
    (pytorch#189245); holding this OS lock (released by the kernel when its holder dies) proves no build is
    running, so such a file is stale and is removed."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / ".rfwp-build.lock"
    with open(path, "a+") as f:  # "a+": opening must not erase the holder's line
        start = time.monotonic()
        next_report = 0.0
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                waited = time.monotonic() - start
                if waited >= next_report:
                    holder = path.read_text().strip() or "a process that has not said who it is"
                    log.warning("waiting for %s, which is building %s (%.0f s so far)", holder, directory, waited)
                    next_report += WAIT_REPORT_S
                time.sleep(0.2)
        f.truncate(0)
        f.write(f"PID {os.getpid()} ({' '.join(sys.argv) or sys.executable})\n")
        f.flush()
        (directory / "lock").unlink(missing_ok=True)
        try:
            yield
        finally:
            f.truncate(0)
            fcntl.flock(f, fcntl.LOCK_UN)


@contextlib.contextmanager
def _reporting_progress(what: str, every: float) -> Iterator[None]:
    """Log "`what`: N s so far" every `every` seconds while the body runs, then how long it took."""
    done = threading.Event()
    start = time.monotonic()

    def tick() -> None:
        while not done.wait(every):
            log.warning("%s: %.0f s so far", what, time.monotonic() - start)

    thread = threading.Thread(target=tick, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
    log.warning("%s: done in %.0f s", what, time.monotonic() - start)


BUILD_REPORT_S = 10.0  # how often a build in progress says so


def _jit_build(name: str, progress: bool) -> ModuleType:
    from torch.utils import cpp_extension

    directory = build_directory(name)
    flags = compile_flags(name)
    with _build_lock(directory):
        built = (directory / f"{extension_name(name)}.so").exists()
        if not built and progress:
            log.warning("building the rfwp %s kernels once for this install, into %s", name, directory)
        reporting = _reporting_progress(f"building the rfwp {name} kernels", BUILD_REPORT_S)
        with reporting if progress and not built else contextlib.nullcontext():
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


def load(name: str, progress: bool = True) -> ModuleType:
    """The compiled extension of backend `name`, built if needed (saying so, with progress, unless `progress` is
    False); raises BackendUnavailable saying why not."""
    if name not in BACKENDS:
        raise ValueError(f"unknown compiled backend {name!r}; valid: {', '.join(BACKENDS)}")
    with _lock:
        if name not in _loaded:
            why = _why_not_buildable(name)
            if why is not None:
                _loaded[name] = BackendUnavailable(f"the {name!r} backend cannot run here: {why}")
            else:
                try:
                    _loaded[name] = _aot_module(name) or _jit_build(name, progress)
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
    - "cpu" tensors: the C++ backend when it is already built (by `ensure_built`, which the training driver
      calls before its actors start; by `python -m cuda_ext build`; ahead of time; or cached by an earlier
      process), or when `RFWP_BUILD_CPU=1` allows building it now. Otherwise the reference: a first build in
      the middle of a run would stall that process (each Ray actor, each test session) for about a minute.

    Decided once per device type and process; `ensure_built` decides again after building.
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


def ensure_built(device_type: str = "cpu", *, progress: bool = True) -> str:
    """Build the compiled kernels of `device_type` tensors now unless they are built already, so that
    `backend="auto"` runs them from here on: in this process and in every process started afterwards from the
    same install (the training driver calls this once, before its actors start). A build says so, with its
    folder, and reports every 10 s how long it has taken (unless `progress` is False); a backend that cannot
    be built here is logged with the reason. Returns what `backend="auto"` now runs on `device_type` tensors:
    "cpu" or "cuda", or "reference"."""
    auto_backend.cache_clear()
    try:
        load(device_type, progress)
    except BackendUnavailable as e:
        log.warning("%s; backend='auto' runs the reference loops", e)
        return "reference"
    return auto_backend(device_type)


def load_backend(name: str):
    """The rules computed by compiled backend `name` (a `functions.KernelBackend`)."""
    from cuda_ext.functions import KernelBackend

    return KernelBackend.get(name, load(name))
