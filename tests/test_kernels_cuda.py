"""The CUDA kernels on a GPU (marked `cuda`; skipped where there is none): against the float64 reference on
random shapes (head sizes 1 to 64, T = 1, 2 and long unrolls, B*H above the number of multiprocessors,
resets at random steps, every output poisoned), determinism, streams, the model cores, and compute-sanitizer
memcheck/racecheck on one small case per kernel. Each test names the backend it tests. The CPU-side tests are in
test_kernels.py; the test design is in docs/kernels.md §5."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import cuda_ext
import kernel_cases as cases
from models import ops
from models.ops.rules import RULE_NAMES, RULES, example_inputs, example_reset

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


@pytest.fixture(scope="module")
def gpu():
    cuda_ext.load_backend("cuda")  # on a GPU machine this must build: no skip on failure
    return ops.Rules("cuda")


def _sm_count() -> int:
    return torch.cuda.get_device_properties(0).multi_processor_count


# (T, B, H, d): head sizes 1..64 incl. non-powers of two, T = 1, 2, long unrolls, and B*H above the SM count.
SHAPES = [(1, 3, 2, 1), (2, 2, 3, 15), (50, 32, 4, 16), (3, 4, 1, 17), (50, 32, 4, 32), (2, 1, 1, 63),
          (100, 8, 8, 64), (256, 8, 8, 16), (5, 100, 4, 8)]


@pytest.mark.parametrize("rule", RULE_NAMES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "T{}-B{}-H{}-d{}".format(*s))
def test_cuda_equals_reference(gpu, rule, shape):
    T, B, H, d = shape
    inputs = example_inputs(rule, T, B, H, d, dtype=torch.float32, device="cuda", seed=T + d)
    reset = example_reset(T, B, p=0.05 if T > 20 else 0.3, seed=d, device="cuda")
    cases.check_against_reference(gpu, rule, inputs, reset, rtol=2e-4 if T > 60 else 5e-5)


def test_a_shape_has_more_chains_than_multiprocessors():
    assert max(B * H for _, B, H, _ in SHAPES) > _sm_count()


@pytest.mark.parametrize("rule", ["sum_rule", "delta_rule"])
@pytest.mark.parametrize("E,M", [(16, 64), (32, 128), (64, 256), (256, 64), (128, 128)])
def test_cuda_linear_rules_with_delta_mlp_sizes(gpu, rule, E, M):
    inputs = example_inputs(rule, 20, 8, 4, E, value_size=M, dtype=torch.float32, device="cuda", seed=E)
    cases.check_against_reference(gpu, rule, inputs, example_reset(20, 8, seed=M, device="cuda"), rtol=5e-5)


@pytest.mark.parametrize("rule", RULE_NAMES)
def test_cuda_is_deterministic_and_per_sample(gpu, rule):
    T, B, H, d = 30, 40, 4, 32
    inputs = example_inputs(rule, T, B, H, d, dtype=torch.float32, device="cuda", seed=7)
    copies = [x.clone() for x in inputs]
    reset = example_reset(T, B, seed=7, device="cuda")
    first = cases.forward_backward(getattr(gpu, rule), inputs, reset)
    torch.randn(4096, 4096, device="cuda").matmul(torch.randn(4096, 4096, device="cuda"))  # unrelated work
    second = cases.forward_backward(getattr(gpu, rule), inputs, reset)
    for a, b in zip(first[0] + first[1], second[0] + second[1]):
        assert torch.equal(a, b)
    assert all(torch.equal(x, c) for x, c in zip(inputs, copies))
    # Sample 0 alone gives its outputs bitwise: chains never mix.
    n_seq = RULES[rule].n_per_step
    shared = {"rdn_rule": (4, 5, 6, 7)}.get(rule, ())  # per-head slow weights, not per sample
    alone = [x if i in shared else x[:, :1] if i < n_seq else x[:1] for i, x in enumerate(inputs)]
    with torch.no_grad():
        out_alone = getattr(gpu, rule)(*alone, reset[:, :1])
    assert torch.equal(out_alone[0][:, 0], first[0][0][:, 0])


def test_cuda_runs_on_the_current_stream(gpu):
    inputs = example_inputs("delta_rule", 20, 16, 4, 32, dtype=torch.float32, device="cuda")
    expected = gpu.delta_rule(*inputs)
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        actual = gpu.delta_rule(*inputs)
    stream.synchronize()
    assert all(torch.equal(a, e) for a, e in zip(actual, expected))


@pytest.mark.parametrize("rule", RULE_NAMES)
def test_cuda_agrees_with_cpu_backend(gpu, rule):
    T, B, H, d = 20, 4, 2, 24
    inputs = example_inputs(rule, T, B, H, d, dtype=torch.float32, seed=8)
    reset = example_reset(T, B, seed=8)
    on_cpu = cases.forward_backward(getattr(ops.Rules("cpu"), rule), inputs, reset)
    on_gpu = cases.forward_backward(getattr(gpu, rule), [x.cuda() for x in inputs], reset.cuda())
    for a, e in zip(on_gpu[0] + on_gpu[1], on_cpu[0] + on_cpu[1]):
        torch.testing.assert_close(a.cpu(), e, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("core_name", cases.FAST_WEIGHT_CORES)
def test_cores_with_cuda_backend_equal_reference(gpu, core_name):
    actual = cases.core_forward_backward(core_name, "cuda", dtype=torch.float32, device="cuda")
    expected = cases.core_forward_backward(core_name, "reference")
    for a, e in zip(actual, expected):
        assert cases.relative_error(a, e) < 1e-4


def test_auto_picks_cuda_for_gpu_tensors(gpu, monkeypatch):
    monkeypatch.delenv("RFWP_BACKEND", raising=False)
    cuda_ext.loader.auto_backend.cache_clear()
    assert cuda_ext.auto_backend("cuda") == "cuda"
    rules = ops.Rules("auto")
    rules.delta_rule(*example_inputs("delta_rule", 2, 1, 1, 3, dtype=torch.float32, device="cuda"))
    assert rules.ran == {"cuda": "cuda"}


SANITIZED = """
import torch
from models.ops import Rules
from models.ops.rules import RULE_NAMES, example_inputs, example_reset
gpu = Rules("cuda")
for rule in RULE_NAMES:
    for d in (5, 17, 40):
        inputs = [x.requires_grad_() for x in example_inputs(rule, 6, 3, 2, d, dtype=torch.float32, device="cuda",
                                                             seed=d)]
        outs = getattr(gpu, rule)(*inputs, example_reset(6, 3, p=0.4, seed=d, device="cuda"))
        torch.autograd.backward(outs, [torch.randn_like(o) for o in outs])
torch.cuda.synchronize()
"""


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("compute-sanitizer") is None, reason="compute-sanitizer is not installed")
@pytest.mark.parametrize("tool", ["memcheck", "racecheck", "initcheck", "synccheck"])
def test_compute_sanitizer(gpu, tool):
    result = subprocess.run(
        ["compute-sanitizer", f"--tool={tool}", "--error-exitcode=1", sys.executable, "-c", SANITIZED],
        capture_output=True, text=True, timeout=1800, cwd=Path(__file__).resolve().parent.parent,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
