"""The compiled backends of the update rules on a machine without a GPU (docs/kernels.md §5); each test names
the backend it tests, so what it exercises never depends on a build someone else left in the cache:

- the C++ CPU backend against the float64 reference (float64: to rounding; float32: to fp32 accuracy) on random
  shapes (head sizes 1 to 64, T = 1, 2 and long unrolls, resets at random steps), with every output poisoned
  before each call, plus gradcheck, determinism, state continuity and single-step inference;
- the CUDA kernels' own code, compiled for the CPU under the emulator (csrc/cuda/emulator.h), against the
  reference on small shapes that reach every kernel instantiation;
- each model core built with backend="cpu" against backend="reference";
- the loader (cache folders, builds waiting for each other, `ensure_built`) and dispatch errors, and an
  `nvcc -c` compile check of every .cu file for sm_80 and sm_90.

Both extensions are built once per install (about 40 s each on a 2-core machine; cached afterwards).
"""
from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import sys
import time

import pytest
import torch

import cuda_ext
import kernel_cases as cases
from cuda_ext import functions, loader
from models import make_core, ops
from models.ops import reference
from models.ops.rules import RULE_NAMES, RULES, example_inputs, example_reset


@pytest.fixture(scope="session")
def cpu():
    cuda_ext.load_backend("cpu")  # built (or found) here, once
    return ops.Rules("cpu")


@pytest.fixture(scope="session")
def emulated():
    return cases.KernelRules("emulated")


# (T, B, H, d): head sizes 1..64 incl. non-powers of two, T = 1, 2 and longer unrolls, B*H from 1 to 150.
SHAPES = [(1, 3, 2, 1), (2, 2, 3, 15), (40, 2, 2, 16), (3, 4, 1, 17), (25, 2, 2, 32), (2, 1, 1, 63),
          (12, 2, 2, 64), (3, 50, 3, 4)]


@pytest.mark.parametrize("rule", RULE_NAMES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "T{}-B{}-H{}-d{}".format(*s))
def test_cpu_backend_equals_reference_in_float64(cpu, rule, shape):
    T, B, H, d = shape
    inputs = example_inputs(rule, T, B, H, d, seed=T * d)
    cases.check_against_reference(cpu, rule, inputs, example_reset(T, B, seed=d), rtol=1e-10)


@pytest.mark.parametrize("rule", RULE_NAMES)
def test_cpu_backend_float32_over_a_long_unroll(cpu, rule):
    # 128 steps with resets: the backward rebuilds the state by subtraction, so rounding accumulates over T.
    T, B, H, d = 128, 2, 2, 16
    inputs = example_inputs(rule, T, B, H, d, dtype=torch.float32, seed=1)
    cases.check_against_reference(cpu, rule, inputs, example_reset(T, B, p=0.02, seed=1), rtol=2e-4)


@pytest.mark.parametrize("rule", ["sum_rule", "delta_rule"])
@pytest.mark.parametrize("E,M", [(3, 12), (12, 3), (16, 64)])
def test_cpu_backend_key_and_value_sizes_differ(cpu, rule, E, M):
    inputs = example_inputs(rule, 6, 2, 2, E, value_size=M, seed=E)
    cases.check_against_reference(cpu, rule, inputs, example_reset(6, 2, seed=M), rtol=1e-10)


@pytest.mark.parametrize("rule", RULE_NAMES)
def test_cpu_backend_gradcheck(cpu, rule):
    inputs = [x.requires_grad_() for x in example_inputs(rule, 5, 2, 2, 3, seed=2)]
    reset = torch.tensor([[False, False], [False, True], [True, False], [False, False], [False, True]])
    assert torch.autograd.gradcheck(lambda *xs: getattr(cpu, rule)(*xs, reset), inputs, eps=1e-6, atol=1e-8)


@pytest.mark.parametrize("rule", RULE_NAMES)
def test_cpu_backend_is_deterministic_and_leaves_inputs_alone(cpu, rule):
    # B = 20: RDN sums its slow weights' gradients over three groups of samples
    T, B, H, d = 9, 20, 2, 17
    inputs = example_inputs(rule, T, B, H, d, dtype=torch.float32, seed=3)
    copies = [x.clone() for x in inputs]
    reset = example_reset(T, B, seed=3)
    first = cases.forward_backward(getattr(cpu, rule), inputs, reset)
    # the second run must not depend on what the allocator hands back, nor on how the chains are dealt to threads
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with functions.poisoned():
            second = cases.forward_backward(getattr(cpu, rule), inputs, reset)
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(first[0] + first[1], second[0] + second[1]):
        assert torch.equal(a, b)
    assert all(torch.equal(x, c) for x, c in zip(inputs, copies))


@pytest.mark.parametrize("rule", RULE_NAMES)
def test_cpu_backend_takes_non_contiguous_inputs(cpu, rule):
    T, B, H, d = 5, 3, 2, 6
    inputs = example_inputs(rule, T, B, H, d, seed=4)
    n_seq = RULES[rule].n_per_step
    # per-step inputs as strided views of [B, T, ...] storage, as a batch-major caller would pass them
    strided = [x.transpose(0, 1).contiguous().transpose(0, 1) if i < n_seq else x for i, x in enumerate(inputs)]
    assert not strided[0].is_contiguous()
    reset = example_reset(T, B, seed=4)
    expected = cases.forward_backward(getattr(cpu, rule), inputs, reset)
    actual = cases.forward_backward(getattr(cpu, rule), strided, reset)
    for a, e in zip(actual[0] + actual[1], expected[0] + expected[1]):
        assert torch.equal(a, e)


def _split_run(backend, rule, inputs, reset, t1):
    """Run the first t1 steps, then the rest from the carried state; gradients flow across the split."""
    n_seq, states = RULES[rule].n_per_step, RULES[rule].state_inputs
    fn = getattr(backend, rule)
    first = fn(*[x[:t1] if i < n_seq else x for i, x in enumerate(inputs)], reset[:t1])
    carried = iter(first[1:])  # the final states, in the order of the initial ones
    second_inputs = [x[t1:] if i < n_seq else next(carried) if i in states else x for i, x in enumerate(inputs)]
    second = fn(*second_inputs, reset[t1:])
    return (torch.cat([first[0], second[0]]), *second[1:])


@pytest.mark.parametrize("rule", RULE_NAMES)
def test_cpu_backend_state_continuity(cpu, rule):
    # T steps at once = T1 steps then T - T1 from the carried state, outputs and every gradient; and T
    # single-step calls (the actors' path) reproduce the unroll bitwise in float32.
    T, B, H, d = 8, 3, 2, 5
    inputs = example_inputs(rule, T, B, H, d, dtype=torch.float32, seed=5)
    reset = example_reset(T, B, seed=5)
    whole = cases.forward_backward(getattr(cpu, rule), inputs, reset)
    split = cases.forward_backward(lambda *xs: _split_run(cpu, rule, xs[:-1], xs[-1], 3), inputs, reset)
    for a, e in zip(split[0] + split[1], whole[0] + whole[1]):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6)
    spec = RULES[rule]
    state = [inputs[i] for i in spec.state_inputs]
    with torch.no_grad():
        for t in range(T):
            it = iter(state)
            step_inputs = [x[t : t + 1] if i < spec.n_per_step else next(it) if i in spec.state_inputs else x
                           for i, x in enumerate(inputs)]
            out = getattr(cpu, rule)(*step_inputs, reset[t : t + 1])
            assert torch.equal(out[0][0], whole[0][0][t])
            state = out[1:]


# Emulated CUDA kernels: one shape per instantiation (d <= 8, <= 16, <= 32, <= 64 for the recurrent rules;
# rows and columns per thread 1, 2, 4, 8 for the sum and delta rules). The emulator runs every CUDA thread as a
# fiber, so the shapes stay small.
EMULATED_SHAPES = [(4, 3, 2, 5), (3, 2, 1, 16), (2, 2, 1, 17), (2, 1, 2, 40)]


@pytest.mark.parametrize("rule", RULE_NAMES)
@pytest.mark.parametrize("shape", EMULATED_SHAPES, ids=lambda s: "T{}-B{}-H{}-d{}".format(*s))
def test_emulated_cuda_kernels_equal_reference(emulated, rule, shape):
    T, B, H, d = shape
    inputs = example_inputs(rule, T, B, H, d, dtype=torch.float32, seed=d)
    cases.check_against_reference(emulated, rule, inputs, example_reset(T, B, p=0.4, seed=d), rtol=1e-5)


@pytest.mark.parametrize("rule", ["sum_rule", "delta_rule"])
# (E, M) covering every (rows per lane, columns per warp) instantiation of the sum/delta kernels not reached above.
@pytest.mark.parametrize("E,M", [(1, 33), (16, 64), (40, 20), (3, 100), (50, 100), (40, 130), (70, 3), (100, 50),
                                 (100, 100), (200, 10), (130, 40), (3, 256)])
def test_emulated_linear_kernels_with_key_and_value_sizes(emulated, rule, E, M):
    inputs = example_inputs(rule, 2, 1, 1, E, value_size=M, dtype=torch.float32, seed=E)
    cases.check_against_reference(emulated, rule, inputs, torch.tensor([[False], [True]]), rtol=1e-5)


def test_emulated_kernels_refuse_sizes_they_were_not_built_for(emulated):
    with pytest.raises(RuntimeError, match="head dimension between 1 and 64"):
        emulated.delta_rnn_rule(*example_inputs("delta_rnn_rule", 1, 1, 1, 65, dtype=torch.float32))
    with pytest.raises(RuntimeError, match="between 1 and 256"):
        emulated.delta_rule(*example_inputs("delta_rule", 1, 1, 1, 257, dtype=torch.float32))


# Every core on the CPU backend equals the reference backend (outputs, parameter and state gradients).
@pytest.mark.parametrize("core_name", cases.FAST_WEIGHT_CORES)
def test_cores_with_cpu_backend_equal_reference(cpu, core_name):
    actual = cases.core_forward_backward(core_name, "cpu")
    expected = cases.core_forward_backward(core_name, "reference")
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, rtol=1e-9, atol=1e-11)


def test_cuda_backend_without_gpu_says_why():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(cuda_ext.BackendUnavailable, match="no GPU"):
        cuda_ext.load_backend("cuda")
    with pytest.raises(cuda_ext.BackendUnavailable, match="no GPU"):
        ops.Rules("cuda").delta_rule(*example_inputs("delta_rule", 2, 1, 1, 3))


def test_unknown_compiled_backend_is_refused():
    with pytest.raises(ValueError, match="unknown compiled backend 'gpu'.*cpu, cuda"):
        cuda_ext.load_backend("gpu")


def test_unsupported_dtypes_and_empty_unrolls_are_refused(cpu, emulated):
    with pytest.raises(TypeError, match="takes float32, float64, float16, bfloat16 inputs; got int64"):
        cpu.sum_rule(*[x.long() for x in example_inputs("sum_rule", 2, 1, 1, 3)])
    with pytest.raises(TypeError, match="takes float32, float16, bfloat16 inputs; got float64"):
        emulated.sum_rule(*example_inputs("sum_rule", 2, 1, 1, 3))
    q, k, v, W0 = example_inputs("sum_rule", 2, 1, 1, 3)
    with pytest.raises(ValueError, match="at least one time step"):
        cpu.sum_rule(q[:0], k[:0], v[:0], W0)


@pytest.mark.parametrize("dtypes", [(torch.bfloat16, torch.bfloat16), (torch.float16, torch.float32),
                                    (torch.float32, torch.float64)])
def test_low_precision_and_mixed_inputs_are_promoted(cpu, dtypes):
    # e.g. bfloat16 projections under autocast with a float32 carried state: computed in float32 (float64 if
    # any input is float64) and returned in the promoted dtype.
    per_step, state = dtypes
    inputs = [x.to(state if i == 4 else per_step) for i, x in enumerate(example_inputs("delta_rule", 4, 2, 2, 5))]
    outs = cpu.delta_rule(*inputs)
    expected = reference.delta_rule(*[x.double() for x in inputs])
    for a, e in zip(outs, expected):
        assert a.dtype == torch.promote_types(per_step, state)
        torch.testing.assert_close(a.double(), e, rtol=1e-2, atol=1e-2)


def test_extension_checks_its_arguments(cpu):
    # A call that bypasses models.ops with a wrong size fails with an error instead of touching bad memory.
    q, k, v, W0 = example_inputs("sum_rule", 2, 1, 1, 3)
    with pytest.raises(RuntimeError, match="tensor argument 0 has 6 elements, expected 4"):
        cuda_ext.load_backend("cpu").extension.sum_rule_forward(q, k[..., :2].contiguous(), v, W0, None, False, 0)


def test_build_failure_reports_the_compiler_message(monkeypatch, tmp_path):
    broken = tmp_path / "broken.cpp"
    broken.write_text("int f() { return undefined_name_in_rfwp_test; }\n")
    monkeypatch.setenv("RFWP_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(loader, "_loaded", {})
    monkeypatch.setattr(loader, "sources", lambda name: [broken])
    with pytest.raises(cuda_ext.BackendUnavailable, match="(?s)building the 'cpu' backend failed.*"
                                                          "undefined_name_in_rfwp_test"):
        loader.load("cpu")


def test_ensure_built_says_what_it_builds_and_why_it_failed(monkeypatch, tmp_path, caplog):
    broken = tmp_path / "broken.cpp"
    broken.write_text("int f() { return undefined_name_in_rfwp_test; }\n")
    monkeypatch.setenv("RFWP_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(loader, "_loaded", {})
    monkeypatch.setattr(loader, "sources", lambda name: [broken])
    monkeypatch.setattr(loader, "is_built", lambda name: False)
    with caplog.at_level(logging.WARNING, logger="cuda_ext.loader"):
        assert cuda_ext.ensure_built("cpu") == "reference"
    lines = [r.getMessage() for r in caplog.records]
    assert any(line.startswith("building the rfwp cpu kernels once for this install, into " + str(tmp_path))
               for line in lines), lines
    assert any("building the 'cpu' backend failed" in line and "runs the reference loops" in line for line in lines)
    loader.auto_backend.cache_clear()


def test_a_build_reports_its_progress(caplog):
    with caplog.at_level(logging.WARNING, logger="cuda_ext.loader"):
        with loader._reporting_progress("building x", every=0.1):
            time.sleep(0.45)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) >= 4 and all(re.fullmatch(r"building x: \d+ s so far", line) for line in lines[:-1]), lines
    assert re.fullmatch(r"building x: done in \d+ s", lines[-1]), lines


def test_ensure_built_makes_auto_run_the_cpu_kernels(cpu, monkeypatch):
    monkeypatch.delenv("RFWP_BACKEND", raising=False)
    assert cuda_ext.ensure_built("cpu", progress=False) == "cpu"
    core = make_core("delta_net", input_size=3, hidden_size=4, num_heads=2, ff_size=8)  # backend="auto"
    assert ops.backends_ran(core) == set()
    core(torch.zeros(2, 1, 3), core.initial_state(1), None)
    assert ops.backends_ran(core) == {"cpu"}


def test_cache_folders_differ_between_python_environments_and_torch_installs(monkeypatch):
    here = loader.build_directory("cpu")
    monkeypatch.setattr(sys, "prefix", "/another/venv")
    other_venv = loader.build_directory("cpu")
    monkeypatch.undo()
    monkeypatch.setattr(torch, "__file__", "/another/site-packages/torch/__init__.py")
    other_torch = loader.build_directory("cpu")
    assert len({here, other_venv, other_torch}) == 3
    assert here.name.startswith(f"rfwp_cpu_{loader.source_hash('cpu')}_")


HOLD_LOCK = """
import sys, time
from pathlib import Path
from cuda_ext import loader
with loader._build_lock(Path(sys.argv[1])):
    print("locked", flush=True)
    time.sleep(float(sys.argv[2]))
"""


def test_a_build_that_waits_says_for_whom_and_how_long(monkeypatch, tmp_path, caplog):
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(tmp_path), "1.5"], stdout=subprocess.PIPE,
                              text=True, cwd=loader.CSRC.parent.parent)
    try:
        assert holder.stdout.readline().strip() == "locked"
        monkeypatch.setattr(loader, "WAIT_REPORT_S", 0.5)
        with caplog.at_level(logging.WARNING, logger="cuda_ext.loader"):
            with loader._build_lock(tmp_path):
                assert f"PID {os.getpid()} " in (tmp_path / ".rfwp-build.lock").read_text()
    finally:
        holder.wait(timeout=30)
    waits = [r.getMessage() for r in caplog.records if r.getMessage().startswith("waiting for ")]
    assert len(waits) >= 2, waits  # at once, then every WAIT_REPORT_S
    assert all(f"PID {holder.pid} (-c {tmp_path} 1.5)" in w and str(tmp_path) in w for w in waits), waits
    assert waits[0].endswith("(0 s so far)") and waits[-1].endswith(" s so far)") and waits[-1] != waits[0]


def test_auto_backend_policy(cpu, monkeypatch):
    loader.auto_backend.cache_clear()
    try:
        if not torch.cuda.is_available():
            assert cuda_ext.auto_backend("cuda") == "reference"
        assert cuda_ext.auto_backend("cpu") == "cpu"  # built by the fixture: used
        loader.auto_backend.cache_clear()
        monkeypatch.setattr(loader, "is_built", lambda name: False)
        assert cuda_ext.auto_backend("cpu") == "reference"  # never a silent first build ...
        loader.auto_backend.cache_clear()
        monkeypatch.setenv("RFWP_BUILD_CPU", "1")
        assert cuda_ext.auto_backend("cpu") == "cpu"  # ... unless asked for
    finally:
        loader.auto_backend.cache_clear()


def test_cpu_build_uses_vector_instructions_only_where_the_cpu_has_them(monkeypatch):
    # The flags are part of the build's hash, so a cache shared with a CPU without AVX2 never hands it this build.
    builds = {}
    for capability in ("AVX2", "AVX512", "DEFAULT"):
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
        builds[capability] = (loader.compile_flags("cpu")["cxx"], loader.build_directory("cpu"))
    for capability in ("AVX2", "AVX512"):
        assert {"-mavx2", "-mfma"} <= set(builds[capability][0])
    assert not any(flag.startswith("-m") for flag in builds["DEFAULT"][0])
    assert builds["DEFAULT"][1] != builds["AVX2"][1]


def test_cached_build_is_found_without_compiling(cpu):
    assert loader.is_built("cpu")
    assert (loader.build_directory("cpu") / "rfwp_cpu.so").exists()


NVCC = shutil.which("nvcc")


@pytest.mark.skipif(NVCC is None, reason="nvcc is not installed")
@pytest.mark.parametrize("source", sorted((loader.CSRC / "cuda").glob("*.cu")), ids=lambda p: p.name)
def test_cuda_sources_compile_with_nvcc(source, tmp_path):
    # The kernels include no torch header, so they compile on a machine without a GPU or a CUDA torch.
    flags = loader.compile_flags("cuda")["nvcc"]
    arch = ["-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=sm_90"]
    result = subprocess.run([NVCC, "-c", *flags, *arch, str(source), "-o", str(tmp_path / "k.o")],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
