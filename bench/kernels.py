"""Time every update rule on every backend that can run here, at the shapes of docs/kernels.md §6.

    python -m bench.kernels                       # all rules, shapes and backends; markdown table on stdout
    python -m bench.kernels --shapes infer-b1 infer-b256 --rules delta_rule
    python -m bench.kernels --device cuda --max-seconds 2
    python -m bench.kernels --threads 1           # on a shared CPU: robust to other processes

Per (rule, shape, backend): the best time of the forward without autograd (the actors' path) and of
forward+backward (gradients into every input, the initial state included), the speed-up over the reference
backend on the same device, and on a GPU the floor of docs/kernels.md §6 (max of the fp32-compute, memory and
per-step-chain floors, for the delta rule and RDN, the rules it models) with the ratio to it.
"""
from __future__ import annotations

import argparse
import platform
import time
from dataclasses import dataclass
from typing import Callable

import torch

from models.ops import Rules
from models.ops.rules import RULE_NAMES, example_inputs, example_reset

# name: (T, B, H, d) — docs/kernels.md §6: RL training unrolls, a large RL batch, single steps of the RL core
# (H4 d32) and the language model
SHAPES = {
    "rl-train-a": (50, 32, 4, 32),
    "rl-train-c": (100, 256, 8, 64),
    "infer-b1": (1, 1, 4, 32),
    "infer-b256": (1, 256, 4, 32),
    "lm": (256, 96, 8, 16),
}

# docs/kernels.md §6: FLOPs per head-step (x d^2) and elements moved per head-step (x d) for forward+backward,
# and the estimated per-step chain (µs per step, forward+backward); forward alone is about a third of each.
FLOOR_MODEL = {"delta_rule": (20, 11, 0.3), "rdn_rule": (38, 17, 1.5)}
# NVIDIA's data-sheet figures (vendor specifications, not measured here): HBM bytes/s and fp32 (non-tensor-core)
# FLOP/s. First match in the device name wins, so "H100 PCIe" comes before "H100" (the SXM part).
GPU_SPECS = {"H100 PCIe": (2.0e12, 51e12), "H100": (3.35e12, 67e12), "H200": (4.8e12, 67e12)}


def floor_us(rule: str, shape: tuple[int, int, int, int], backward: bool) -> float | None:
    """The docs/kernels.md §6 floor on this GPU, or None (no model for this rule or GPU)."""
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else ""
    spec = next((spec for key, spec in GPU_SPECS.items() if key in name), None)
    if rule not in FLOOR_MODEL or spec is None:
        return None
    bandwidth, fp32_flops = spec
    flops_d2, elems_d, chain = FLOOR_MODEL[rule]
    T, B, H, d = shape
    share = 1.0 if backward else 1 / 3
    compute = share * flops_d2 * d * d * T * B * H / fp32_flops
    memory = (share * elems_d * d * T + (5 if backward else 2) * d * d) * B * H * 4 / bandwidth
    return max(compute * 1e6, memory * 1e6, share * chain * T)


def timed(fn: Callable[[], object], device: str, max_seconds: float) -> float:
    """Best seconds of fn() over repeats that fit in max_seconds (at least 3; after 2 warm-up calls). The
    minimum, not the median: on a shared machine other processes only ever add time."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    times: list[float] = []
    for i in range(1000):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        if i >= 2:
            times.append(time.perf_counter() - start)
            if len(times) >= 3 and sum(times) > max_seconds:
                break
        elif time.perf_counter() - start > max_seconds:  # one call takes the whole budget: one sample
            return time.perf_counter() - start
    return min(times)


@dataclass
class Row:
    rule: str
    shape: str
    backend: str
    forward_s: float
    train_s: float  # NaN: not measured (the reference's autograd graph would not fit in --max-memory-gb)


def reference_graph_bytes(rule: str, shape: tuple[int, int, int, int]) -> int:
    """Rough size of what autograd keeps for the reference loop: a few fast-weight-sized tensors per step."""
    T, B, H, d = shape
    matrices = 3 * (3 if rule == "delta_lstm_rule" else 1)
    return 4 * matrices * T * B * H * d * d


def measure(
    rule: str, shape_name: str, backend_name: str, device: str, max_seconds: float, max_memory: float
) -> Row:
    T, B, H, d = SHAPES[shape_name]
    fn = getattr(Rules(backend_name), rule)
    inputs = example_inputs(rule, T, B, H, d, dtype=torch.float32, device=device)
    reset = example_reset(T, B, p=0.02, device=device)

    def forward() -> None:
        with torch.no_grad():
            fn(*inputs, reset)

    leaves = [x.clone().requires_grad_() for x in inputs]
    with torch.no_grad():
        grads = [torch.randn_like(o) for o in fn(*inputs, reset)]

    def train() -> None:
        torch.autograd.backward(fn(*leaves, reset), grads)

    too_big = backend_name == "reference" and reference_graph_bytes(rule, SHAPES[shape_name]) > max_memory
    train_s = float("nan") if too_big else timed(train, device, max_seconds)
    return Row(rule, shape_name, backend_name, timed(forward, device, max_seconds), train_s)


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    threads = torch.get_num_threads()
    return f"{cpu}, {threads} threads{gpu}; torch {torch.__version__}, Python {platform.python_version()}"


def fmt_ms(seconds: float) -> str:
    if seconds != seconds:
        return "not run"
    ms = seconds * 1e3
    return f"{ms:.3g}" if ms < 100 else f"{ms:.0f}"


def table(rows: list[Row], device: str) -> str:
    ref = {(r.rule, r.shape): r for r in rows if r.backend == "reference"}
    lines = [
        "| rule | shape (T,B,H,d) | backend | forward ms | fwd+bwd ms | speed-up fwd / fwd+bwd "
        "| floor fwd / fwd+bwd µs | × floor fwd / fwd+bwd |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        base = ref.get((r.rule, r.shape))
        speedup = "—" if base is None or r.backend == "reference" else (
            f"{base.forward_s / r.forward_s:.1f}× / "
            + ("—" if base.train_s != base.train_s else f"{base.train_s / r.train_s:.1f}×"))
        floors = [floor_us(r.rule, SHAPES[r.shape], b) if device == "cuda" else None for b in (False, True)]
        if floors[0] is None:
            floor = ratio = "—"
        else:
            floor = f"{floors[0]:.2g} / {floors[1]:.3g}"
            ratio = "—" if r.backend == "reference" else (
                f"{r.forward_s * 1e6 / floors[0]:.1f} / {r.train_s * 1e6 / floors[1]:.1f}")
        shape = ",".join(map(str, SHAPES[r.shape]))
        lines.append(f"| {r.rule} | {r.shape} ({shape}) | {r.backend} | {fmt_ms(r.forward_s)} | {fmt_ms(r.train_s)} "
                     f"| {speedup} | {floor} | {ratio} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--rules", nargs="+", default=list(RULE_NAMES), choices=RULE_NAMES)
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--backends", nargs="+", help="default: reference and the device's compiled backend")
    parser.add_argument("--max-seconds", type=float, default=1.0, help="time budget per measurement")
    parser.add_argument("--threads", type=int, help="CPU threads (torch.set_num_threads); default: torch's")
    parser.add_argument("--max-memory-gb", type=float, default=4.0,
                        help="skip the reference's fwd+bwd where its autograd graph would exceed this")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    backends = args.backends or ["reference", args.device]
    rows = []
    for rule in args.rules:
        for shape in args.shapes:
            for backend in backends:
                rows.append(measure(rule, shape, backend, args.device, args.max_seconds, args.max_memory_gb * 2**30))
                print(f"  {rule} {shape} {backend}: forward {fmt_ms(rows[-1].forward_s)} ms, "
                      f"fwd+bwd {fmt_ms(rows[-1].train_s)} ms", flush=True)
    print(f"\nMachine: {machine()}\n\n{table(rows, args.device)}")


if __name__ == "__main__":
    main()
