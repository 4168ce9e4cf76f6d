"""`python -m cuda_ext build [cpu] [cuda]` builds compiled backends into the per-user cache ahead of first use
(by default the CPU backend, and the CUDA one where there is a GPU); `python -m cuda_ext info` says which are
built and what backend="auto" runs. Exit status 1 if a backend named on the command line cannot be built."""
from __future__ import annotations

import argparse
import sys

import torch

from cuda_ext import loader

PUBLIC = ("cpu", "cuda")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cuda_ext", description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=["build", "info"])
    parser.add_argument("backends", nargs="*", help="cpu and/or cuda (default: cpu, and cuda if there is a GPU)")
    args = parser.parse_args(argv)
    if unknown := set(args.backends) - set(PUBLIC):
        parser.error(f"unknown backend(s) {', '.join(sorted(unknown))}; valid: {', '.join(PUBLIC)}")
    if args.command == "info":
        for name in PUBLIC:
            print(f"{name}: {'built' if loader.is_built(name) else 'not built'} ({loader.build_directory(name)})")
        for device in ("cpu", "cuda"):
            print(f"backend='auto' on {device} tensors runs: {loader.auto_backend(device)}")
        return 0
    names = args.backends or ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]
    status = 0
    for name in names:
        try:
            module = loader.load(name)
            print(f"{name}: ready ({module.__file__})")
        except loader.BackendUnavailable as e:
            print(f"{name}: {e}", file=sys.stderr)
            status = 1
    return status


if __name__ == "__main__":
    sys.exit(main())
