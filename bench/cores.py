"""Time and memory of every core with a chosen backend (default: the reference loops) on the CPU.

    python -m bench.cores                    # RL shape T=50 B=32 (2 layers, 4 heads x 32) + single steps B=1, B=32
    python -m bench.cores --cores delta_net lstm --repeats 5

Each case runs in a fresh subprocess so that its peak memory (the rise of the process's peak resident set over
its baseline after building the model and inputs) is not polluted by earlier cases. Times are medians.
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch

from models import CORE_NAMES, make_core

RL_SIZES = dict(hidden_size=128, num_layers=2, num_heads=4, head_dim=32, ff_size=512)
LSTM_SIZES = dict(hidden_size=256, num_layers=1)
INPUT_SIZE = 257
CASES = [("train", 50, 32), ("step", 1, 1), ("step", 1, 32)]


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def measure(core_name: str, mode: str, T: int, B: int, backend: str, repeats: int) -> dict:
    """Median forward (and, for training, forward+backward) seconds for one case; the peak memory rise in MiB."""
    torch.manual_seed(0)
    sizes = LSTM_SIZES if core_name == "lstm" else RL_SIZES
    core = make_core(core_name, input_size=INPUT_SIZE, backend=backend, **sizes)
    x = torch.randn(T, B, INPUT_SIZE, requires_grad=True)
    state = core.initial_state(B)
    reset = torch.zeros(T, B, dtype=torch.bool)
    baseline_rss = _peak_rss_mib()

    def forward():
        with torch.no_grad():
            core(x, state, reset)

    def forward_backward():
        y, _ = core(x, state, reset)
        y.sum().backward()

    result = {"core": core_name, "mode": mode, "T": T, "B": B, "backend": backend}
    timed = [("fwd_s", forward)] + ([("fwd_bwd_s", forward_backward)] if mode == "train" else [])
    for key, fn in timed:
        fn()  # warm-up
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        result[key] = statistics.median(times)
    result["peak_mib"] = _peak_rss_mib() - baseline_rss
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cores", nargs="+", default=list(CORE_NAMES), choices=CORE_NAMES)
    parser.add_argument("--backend", default="reference", help="reference | cpu | auto")
    parser.add_argument("--repeats", type=int, default=10)
    # One thread by default: actors run single-threaded, and on a shared 2-core box OpenMP spinning makes
    # multi-threaded timings of small ops erratic.
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--case", help=argparse.SUPPRESS)  # internal: run one case in this process
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    if args.case:
        core_name, mode, T, B = args.case.split(",")
        print(json.dumps(measure(core_name, mode, int(T), int(B), args.backend, args.repeats)))
        return

    print(f"backend={args.backend} threads={args.threads} torch={torch.__version__} repeats={args.repeats}")
    print(f"{'core':<20}{'case':<16}{'forward ms':>12}{'fwd+bwd ms':>12}{'peak MiB':>10}")
    for core_name in args.cores:
        for mode, T, B in CASES:
            cmd = [sys.executable, "-m", "bench.cores", "--case", f"{core_name},{mode},{T},{B}",
                   "--backend", args.backend, "--repeats", str(args.repeats), "--threads", str(args.threads)]
            r = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
            case = f"{mode} T{T} B{B}"
            fwd_bwd = f"{r['fwd_bwd_s'] * 1e3:.2f}" if "fwd_bwd_s" in r else "-"
            print(f"{core_name:<20}{case:<16}{r['fwd_s'] * 1e3:>12.2f}{fwd_bwd:>12}"
                  f"{r['peak_mib']:>10.1f}", flush=True)


if __name__ == "__main__":
    main()
