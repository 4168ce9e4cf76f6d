"""Code execution and ListOps data: statistics of docs/protocol.md §1-2, targets checked by an interpreter and an
evaluator written here from the task text, the cache (reuse, refusal of damaged or foreign files), batching
and metrics."""
from __future__ import annotations

import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from tasks import code_exec, data, listops
from tasks.data import IGNORE_INDEX, PAD, PAD_ID, DataFileError, SequenceDataset

SIZES = (1000, 100, 100)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("data")


@pytest.fixture(scope="module", params=[3, 5], ids=["3vars", "5vars"])
def programs(request: pytest.FixtureRequest, data_dir: Path) -> dict[str, SequenceDataset]:
    return data.load_or_generate("code_exec", data_dir, num_variables=request.param, split_sizes=SIZES)


@pytest.fixture(scope="module", params=[10, 15], ids=["depth10", "depth15"])
def expressions(request: pytest.FixtureRequest, data_dir: Path) -> dict[str, SequenceDataset]:
    return data.load_or_generate("listops", data_dir, depth=request.param, split_sizes=SIZES)


def sequences(split: SequenceDataset) -> list[tuple[list[str], list[int]]]:
    """(input symbols, target ids) of every sequence, padding cut off (checked to be padding)."""
    out = []
    for i in range(len(split)):
        n = split.lengths[i]
        assert (split.inputs[i, n:] == PAD_ID).all() and (split.targets[i, n:] == IGNORE_INDEX).all()
        out.append((split.tokens(i), split.targets[i, :n].tolist()))
    return out


# ---------------------------------------------------------------- code execution: an independent interpreter

def interpret(tokens: list[str], num_statements: int, quirks: dict[str, int]) -> list[str]:
    """Expected output symbols of a program, from its text and the rules of docs/protocol.md §1.1.

    Asserts the program is well formed (statement kinds, defined-before-use, bounds, first assign, last
    print) and counts in `quirks` how often each conditional quirk was exercised.
    """
    values: dict[str, int] = {}
    out: list[str] = []
    statements = 0
    pos = 0

    def simple(condition: bool, conditional: bool) -> None:
        nonlocal pos
        head = tokens[pos]
        if head == "print":
            var, end = tokens[pos + 1], tokens[pos + 2]
            assert end == ";" and var in values, tokens[pos : pos + 3]
            out.extend(["_", "_", str(values[var]) if condition else "_"])
            quirks["false_print"] += not condition
            pos += 3
        elif tokens[pos + 1] == "=":
            const, end = tokens[pos + 2], tokens[pos + 3]
            assert end == ";" and const in "0123456789" and head in "xyzab", tokens[pos : pos + 4]
            if not conditional or (condition and head not in values):
                values[head] = int(const)
            quirks["ignored_assign"] += conditional and condition and head in values
            out.extend(["_"] * 4)
            pos += 4
        else:
            op, end = tokens[pos + 1], tokens[pos + 2]
            assert op in ("++", "--") and end == ";" and head in values, tokens[pos : pos + 3]
            new = values[head] + (1 if op == "++" else -1)
            assert -8 <= new <= 16, f"{head} {op} from {values[head]} leaves [-8, 16]"  # even if not run
            if condition:
                values[head] = new
            quirks["false_incdec"] += not condition
            out.extend(["_"] * 3)
            pos += 3

    assert tokens[1] == "=", "the first statement must be an assignment"
    while pos < len(tokens):
        start = pos
        if tokens[pos] == "if":
            var, cmp, const, colon = tokens[pos + 1 : pos + 5]
            assert var in values and cmp in "<>" and const in "0123456789" and colon == ":"
            condition = values[var] < int(const) if cmp == "<" else values[var] > int(const)
            out.extend(["_"] * 5)
            pos += 5
            assert tokens[pos] != "if", "nested conditional"
            simple(condition, conditional=True)
        else:
            simple(True, conditional=False)
        statements += 1
    assert tokens[start] == "print", "the last statement must be a print"
    assert statements == num_statements
    return out


def test_code_exec_targets_match_interpreter(programs: dict[str, SequenceDataset]) -> None:
    quirks = {"false_print": 0, "ignored_assign": 0, "false_incdec": 0}
    checked = 0
    for split in programs.values():
        for tokens, targets in sequences(split):
            expected = interpret(tokens, split.params["num_statements"], quirks)
            assert [split.output_vocab[t] for t in targets] == expected
            checked += 1
    assert checked == sum(SIZES)
    assert min(quirks.values()) > 100, quirks  # the conditional quirks were all exercised


class Drifting(random.Random):
    """Every statement an inc/dec, always drawing the same direction: the value runs into a bound."""

    def __init__(self, direction: int) -> None:
        super().__init__(0)
        self.direction = direction

    def randrange(self, start: int, stop: int | None = None, step: int = 1) -> int:
        if stop is None and start == 4:  # statement kind
            return code_exec._INCDEC
        if stop is None and start == 2:  # ++ or --
            return self.direction
        return super().randrange(start, stop, step)


@pytest.mark.parametrize("direction", [0, 1])
def test_code_exec_values_turn_back_at_the_bounds(direction: int) -> None:
    """Quirk: an inc/dec that would leave [-8, 16] is emitted and applied the other way round."""
    params = {"num_variables": 1, "num_statements": 60}
    tokens, targets, _ = code_exec.generate_split(params, Drifting(direction), 1)
    symbols = [code_exec.INPUT_SYMBOLS[i] for i in tokens]
    quirks = {"false_print": 0, "ignored_assign": 0, "false_incdec": 0}
    assert interpret(symbols, 60, quirks)[-1] in (["15", "16"], ["-8", "-7"])[direction]
    assert "++" in symbols and "--" in symbols  # the direction did turn


def test_code_exec_statistics(programs: dict[str, SequenceDataset]) -> None:
    train = programs["train"]
    num_variables = train.params["num_variables"]
    # docs/protocol.md §1.2: 22 / 24 input symbols, all of them used; `_` plus the values -8..16 as outputs.
    assert train.input_vocab[PAD_ID] == PAD
    used = {s for i in range(len(train)) for s in train.tokens(i)}
    assert used == set(train.input_vocab) - {PAD}
    assert len(used) == {3: 22, 5: 24}[num_variables]
    assert train.output_vocab == ["_"] + [str(v) for v in range(-8, 17)]
    # 456.1 tokens (377-548) and 29.2 printed values per program; printed values within [-8, 16].
    printed = (train.targets > 0).sum(axis=1)
    assert abs(train.lengths.mean() - 456.1) < 4 and 360 <= train.lengths.min() and train.lengths.max() <= 570
    assert abs(printed.mean() - 29.2) < 0.8 and printed.min() >= 8 and printed.max() <= 52
    values = np.array([int(train.output_vocab[t]) for t in train.targets[train.targets > 0]])
    assert values.min() >= -8 and values.max() <= 16
    # Roughly flat over 0..9 (about 8-11% each), a thin tail outside.
    share = np.array([(values == v).mean() for v in range(10)])
    assert share.min() > 0.06 and share.max() < 0.13 and (values < 0).mean() < 0.06 and (values > 9).mean() < 0.06


# ---------------------------------------------------------------- ListOps: an independent evaluator

OPERATIONS = {"[MIN": min, "[MAX": max, "[FIRST": lambda args: args[0]}


def evaluate(tokens: list[str]) -> tuple[int, int, list[int]]:
    """(value, number of nested operator levels, argument counts) of a prefix expression."""
    stack: list[tuple[str, list[int]]] = []
    levels = 0
    arities = []
    value = None
    for i, tok in enumerate(tokens):
        assert value is None, "tokens after the root's closing bracket"
        if tok in OPERATIONS:
            stack.append((tok, []))
            levels = max(levels, len(stack))
        elif tok == "]":
            op, args = stack.pop()
            arities.append(len(args))
            result = OPERATIONS[op](args)
            if stack:
                stack[-1][1].append(result)
            else:
                value = result
        else:
            assert stack, "the root must be an operator"
            stack[-1][1].append(int(tok))
    assert value is not None
    return value, levels, arities


def test_listops_labels_match_evaluator(expressions: dict[str, SequenceDataset]) -> None:
    for split in expressions.values():
        for tokens, targets in sequences(split):
            value, levels, arities = evaluate(tokens)
            assert levels == split.params["depth"]
            assert min(arities) >= 2 and max(arities) <= 5
            assert targets[:-1] == [IGNORE_INDEX] * (len(targets) - 1)
            assert split.output_vocab[targets[-1]] == str(value)


def test_listops_statistics(expressions: dict[str, SequenceDataset]) -> None:
    train = expressions["train"]
    depth = train.params["depth"]
    assert train.input_vocab[PAD_ID] == PAD and len(train.input_vocab) - 1 == 14
    assert {s for i in range(len(train)) for s in train.tokens(i)} == set(train.input_vocab) - {PAD}
    # docs/protocol.md §2.1: mean length 98.2 (depth 10) and 185.4-193.9 (depth 15, across the splits).
    mean, low, high = {10: (98.2, 37, 334), 15: (188.0, 61, 676)}[depth]
    assert abs(train.lengths.mean() - mean) < 0.08 * mean
    assert train.lengths.min() >= low - 5 and train.lengths.max() <= high * 1.5
    # U-shaped labels: 0 and 9 about 18% each (majority class 18-20%), 5 about 5%.
    labels = train.targets[np.arange(len(train)), train.lengths - 1]
    share = np.bincount(labels, minlength=10) / len(labels)
    assert 0.15 < share.max() < 0.23 and share.argmax() in (0, 9)
    assert min(share[0], share[9]) > 0.14 and share[5] < 0.09


def reference_tree(rng: random.Random, depth: int = 1) -> tuple[list[str], int]:
    """The reference procedure of docs/protocol.md §2.1 (no conditioning): (tokens, deepest leaf depth)."""
    if depth > 1 and (depth == 20 or rng.random() > 0.25):
        return [str(rng.randint(0, 9))], depth
    children = [reference_tree(rng, depth + 1) for _ in range(rng.randint(2, 5))]
    tokens = [rng.choice(list(OPERATIONS))] + [t for c in children for t in c[0]] + ["]"]
    return tokens, max(c[1] for c in children)


def features(trees: list[list[str]]) -> dict[str, np.ndarray]:
    parsed = [evaluate(t) for t in trees]
    return {
        "length": np.array([len(t) for t in trees]),
        "root arity": np.array([p[2][-1] for p in parsed]),
        "operators": np.array([len(p[2]) for p in parsed]),
        "label": np.array([p[0] for p in parsed]),
    }


def test_listops_sampler_matches_rejection_sampling() -> None:
    """The generator conditions on the depth directly; its trees must be distributed as the kept ones of
    plain rejection sampling (the reference procedure)."""
    depth, n = 5, 3000
    rng = random.Random(0)
    rejected = []
    while len(rejected) < n:
        tokens, leaf_depth = reference_tree(rng)
        if leaf_depth == depth + 1:
            rejected.append(tokens)
    ids, _, lengths = listops.generate_split({"depth": depth}, random.Random(1), n)
    offsets = np.cumsum([0] + lengths)
    direct = [[listops.INPUT_SYMBOLS[i] for i in ids[a:b]] for a, b in zip(offsets[:-1], offsets[1:])]
    ours, theirs = features(direct), features(rejected)
    for name in ("length", "operators"):
        standard_error = np.sqrt((ours[name].var() + theirs[name].var()) / n)
        assert abs(ours[name].mean() - theirs[name].mean()) < 4 * standard_error, name
    for name, categories in (("root arity", range(2, 6)), ("label", range(10))):
        p = np.array([(ours[name] == c).mean() for c in categories])
        q = np.array([(theirs[name] == c).mean() for c in categories])
        assert np.abs(p - q).max() < 4 * np.sqrt(0.25 * 2 / n), (name, p, q)


# ---------------------------------------------------------------- determinism and the cache

def test_generation_is_deterministic(tmp_path: Path) -> None:
    a = data.load_or_generate("code_exec", tmp_path / "a", num_statements=8, split_sizes=(20, 5, 5))
    b = data.load_or_generate("code_exec", tmp_path / "b", num_statements=8, split_sizes=(20, 5, 5))
    for split in data.SPLITS:
        np.testing.assert_array_equal(a[split].inputs, b[split].inputs)
        np.testing.assert_array_equal(a[split].targets, b[split].targets)
    # Each split has its own stream: a larger train split starts with the same programs, valid is unchanged.
    c = data.load_or_generate("code_exec", tmp_path / "c", num_statements=8, split_sizes=(30, 5, 5))
    np.testing.assert_array_equal(c["train"].inputs[:20, : a["train"].inputs.shape[1]], a["train"].inputs)
    np.testing.assert_array_equal(c["valid"].inputs, a["valid"].inputs)
    d = data.load_or_generate("code_exec", tmp_path / "d", num_statements=8, split_sizes=(20, 5, 5), seed=7)
    assert not np.array_equal(d["train"].inputs[:, :30], a["train"].inputs[:, :30])
    assert not np.array_equal(a["train"].inputs[:5, :30], a["valid"].inputs[:, :30])
    # Pinned: the same data on every machine and Python version (a change here must bump FORMAT_VERSION).
    assert " ".join(a["train"].tokens(0)) == (
        "z = 5 ; z ++ ; x = 8 ; if x > 8 : x ++ ; print x ; if z > 8 : print x ; z = 3 ; print z ;"
    )
    e = data.load_or_generate("listops", tmp_path / "e", depth=3, split_sizes=(2, 1, 1))
    assert " ".join(e["train"].tokens(0)) == "[MAX [MAX 3 [MAX 4 1 ] ] 6 4 [MIN [MIN 0 6 9 ] 3 ] ]"


def test_cache_is_reused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = data.load_or_generate("listops", tmp_path, depth=4, split_sizes=(50, 10, 10))
    (path,) = tmp_path.iterdir()  # one file, no temporary left behind
    assert path == path_of(tmp_path, "listops", depth=4, split_sizes=(50, 10, 10))
    stamp = path.stat().st_mtime_ns

    def fail(*args: object) -> None:
        raise AssertionError("regenerated although the file exists")

    monkeypatch.setattr(listops, "generate_split", fail)
    second = data.load_or_generate("listops", tmp_path, depth=4, split_sizes=[50, 10, 10])
    assert path.stat().st_mtime_ns == stamp
    for split in data.SPLITS:
        np.testing.assert_array_equal(first[split].inputs, second[split].inputs)
        np.testing.assert_array_equal(first[split].targets, second[split].targets)
        assert first[split].params == second[split].params


def test_failed_write_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken_savez(*args: object, **kwargs: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(np, "savez", broken_savez)
    with pytest.raises(OSError, match="disk full"):
        data.load_or_generate("listops", tmp_path, depth=2, split_sizes=(5, 2, 2))
    assert list(tmp_path.iterdir()) == []


def path_of(directory: Path, task: str, **params: object) -> Path:
    return data.data_path(directory, task, data.resolve_params(task, params))


def make_file(directory: Path, task: str, **params: object) -> Path:
    data.load_or_generate(task, directory, **params)
    return path_of(directory, task, **params)


@pytest.mark.parametrize("damage", ["truncate", "flip", "garbage", "empty", "tampered"])
def test_damaged_file_is_refused(tmp_path: Path, damage: str) -> None:
    path = make_file(tmp_path, "code_exec", num_statements=5, split_sizes=(40, 5, 5))
    raw = bytearray(path.read_bytes())
    if damage == "tampered":  # a valid archive whose arrays no longer match the stored checksum
        with np.load(path) as f:
            arrays = {k: f[k] for k in f.files}
        arrays["valid_targets"][0] = 3
        with open(path, "wb") as f:
            np.savez(f, **arrays)
        raw = bytearray(path.read_bytes())
    elif damage == "truncate":
        raw = raw[: len(raw) // 2]
    elif damage == "flip":
        raw[len(raw) // 2] ^= 0x01  # inside the train tokens
    elif damage == "garbage":
        raw = bytearray(b"not a zip file at all" * 10)
    else:
        raw = bytearray()
    path.write_bytes(bytes(raw))
    with pytest.raises(DataFileError, match="damaged") as info:
        data.load_or_generate("code_exec", tmp_path, num_statements=5, split_sizes=(40, 5, 5))
    assert str(path) in str(info.value) and "Delete" in str(info.value) and "--data-dir" in str(info.value)


def test_file_of_other_task_or_params_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    listops_file = make_file(tmp_path / "l", "listops", depth=3, split_sizes=(5, 2, 2))
    shutil.copy(listops_file, path_of(tmp_path, "code_exec", num_statements=5, split_sizes=(5, 2, 2)))
    with pytest.raises(DataFileError, match="other data than asked for.*'task': 'listops'.*Delete.*--data-dir"):
        data.load_or_generate("code_exec", tmp_path, num_statements=5, split_sizes=(5, 2, 2))
    shutil.copy(listops_file, path_of(tmp_path, "listops", depth=4, split_sizes=(5, 2, 2)))
    with pytest.raises(DataFileError, match="'depth': 3.*'depth': 4"):
        data.load_or_generate("listops", tmp_path, depth=4, split_sizes=(5, 2, 2))
    # Same parameters, but the code's vocabulary has changed since the file was written.
    monkeypatch.setattr(listops, "vocabularies", lambda params: (["<pad>", "?"], ["0"]))
    with pytest.raises(DataFileError, match="other vocabularies"):
        data.load_or_generate("listops", tmp_path / "l", depth=3, split_sizes=(5, 2, 2))


def test_defaults_are_the_papers() -> None:
    assert data.resolve_params("code_exec", {}) == {
        "num_statements": 100, "num_variables": 3, "seed": 42, "split_sizes": [10_000, 1_000, 1_000]
    }
    assert data.resolve_params("listops", {"split_sizes": (9_999, 999, 999)}) == {
        "depth": 10, "seed": 42, "split_sizes": [9_999, 999, 999]
    }


@pytest.mark.parametrize(
    "task, params, message",
    [
        ("sorting", {}, "unknown task 'sorting'; choose one of"),
        ("code_exec", {"depth": 10}, r"unknown parameter\(s\) \['depth'\].*valid ones"),
        ("code_exec", {"num_variables": 6}, "num_variables must be in 1..5"),
        ("code_exec", {"num_statements": 1}, "num_statements must be >= 2"),
        ("listops", {"depth": 20}, "depth must be in 1..19"),
        ("listops", {"depth": 2.5}, "depth must be an integer"),
        ("listops", {"split_sizes": (10, 10)}, "split_sizes must hold 3 integers"),
        ("listops", {"split_sizes": (10, 0, 1)}, "split_sizes must all be >= 1"),
        ("listops", {"split_sizes": 100}, "split_sizes must hold 3 integers"),
    ],
)
def test_bad_parameters_are_named(tmp_path: Path, task: str, params: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        data.load_or_generate(task, tmp_path, **params)
    assert not tmp_path.exists() or list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- batching and metrics

def test_batches_are_time_major_and_padded(tmp_path: Path) -> None:
    split = data.load_or_generate("listops", tmp_path, depth=3, split_sizes=(23, 2, 2))["train"]
    batches = list(data.iterate_batches(split, batch_size=5))
    assert [b.inputs.shape[1] for b in batches] == [5, 5, 5, 5, 3]
    seen = []
    for k, batch in enumerate(batches):
        assert batch.inputs.dtype == batch.targets.dtype == torch.int64
        assert batch.inputs.shape == batch.targets.shape == (int(batch.lengths.max()), batch.lengths.numel())
        for b in range(batch.lengths.numel()):
            i, n = 5 * k + b, int(batch.lengths[b])
            assert batch.inputs[:n, b].tolist() == split.inputs[i, :n].tolist()
            assert batch.targets[:n, b].tolist() == split.targets[i, :n].tolist()
            assert (batch.inputs[n:, b] == PAD_ID).all() and (batch.targets[n:, b] == IGNORE_INDEX).all()
            seen.append(tuple(batch.inputs[:n, b].tolist()))
    assert len(seen) == 23
    # Shuffling: a permutation fixed by the seed.
    def order(seed: int) -> list[tuple[int, ...]]:
        return [
            tuple(b.inputs[: int(b.lengths[j]), j].tolist())
            for b in data.iterate_batches(split, 4, shuffle=True, seed=seed)
            for j in range(b.lengths.numel())
        ]
    assert order(3) == order(3) and order(3) != order(4) and sorted(order(3)) == sorted(seen)
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        next(data.iterate_batches(split, 0))


def test_code_exec_metrics() -> None:
    noop, ignore = code_exec.NOOP_ID, IGNORE_INDEX
    seven = code_exec.value_id(7)
    targets = torch.tensor([[noop, noop, noop], [seven, noop, noop], [noop, seven, ignore]])  # [L=3, B=3]
    assert code_exec.metrics(targets.clone(), targets) == {
        "sequence_accuracy": 1.0, "noop_accuracy": 1.0, "print_accuracy": 1.0
    }
    pred = targets.clone()
    pred[2, 2] = seven  # padding: not scored
    pred[1, 0] = noop  # a missed print in sequence 0
    pred[0, 1] = seven  # a spurious value in sequence 1
    counts = code_exec.metric_counts(pred, targets)
    assert counts == {
        "sequence_correct": 1, "sequence_total": 3,
        "noop_correct": 5, "noop_total": 6,
        "print_correct": 1, "print_total": 2,
    }
    assert data.accuracies(counts) == {"sequence_accuracy": 1 / 3, "noop_accuracy": 5 / 6, "print_accuracy": 0.5}
    with pytest.raises(ValueError, match="must both be \\[L, B\\]"):
        code_exec.metrics(pred[:2], targets)


def test_listops_accuracy() -> None:
    targets = torch.full((4, 3), IGNORE_INDEX)
    targets[3, 0], targets[1, 1], targets[2, 2] = 4, 9, 0  # labels at each sequence's last token
    pred = torch.zeros(4, 3, dtype=torch.int64)  # wrong everywhere except sequence 2
    assert listops.accuracy(pred, targets) == pytest.approx(1 / 3)
    pred[3, 0] = 4
    assert listops.accuracy(pred, targets) == pytest.approx(2 / 3)
    assert listops.accuracy(targets.clamp(min=0), targets) == 1.0
