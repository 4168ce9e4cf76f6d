"""Common data-set interface of the supervised tasks: generate once, cache in a data directory, batch.

    from tasks.data import load_or_generate, iterate_batches
    splits = load_or_generate("code_exec", Path("data"), num_variables=5)      # {"train", "valid", "test"}
    for batch in iterate_batches(splits["train"], batch_size=64, shuffle=True, seed=epoch):
        batch.inputs   # [L, B] int64 input-vocabulary ids, PAD_ID after each sequence's end
        batch.targets  # [L, B] int64 output-vocabulary ids, IGNORE_INDEX where no loss applies
        batch.lengths  # [B] int64; L = max(lengths) of this batch

Every generator parameter has a default (the paper's setting); `split_sizes` (train, valid, test) and
`seed` are common to all tasks. Each split has its own random stream, derived from (task, seed, split), so
a split never depends on the size of another and the data are identical on every machine.

The data of one (task, parameters) pair live in one `.npz` file (no pickled objects) with JSON metadata
(format version, task, parameters, vocabularies, SHA-256 of the arrays). A file that is damaged, or whose
metadata differ from what was asked for, is refused with `DataFileError`; nothing is overwritten silently.

A task module (registered in `TASKS`) provides:
    PARAMS: dict[str, int]                     its own generator parameters and their defaults
    check_params(params) -> None               ValueError naming a bad value and the allowed range
    vocabularies(params) -> (input_vocab, output_vocab), with input_vocab[PAD_ID] == PAD
    generate_split(params, rng, size) -> (tokens, targets, lengths): all sequences of a split joined
    metric_counts(pred [L, B], targets [L, B]) -> {"<name>_correct": int, "<name>_total": int, ...}
"""
from __future__ import annotations

import argparse
import hashlib
import importlib
import json
import random
import zipfile
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Iterator, NamedTuple

import numpy as np
import torch

from runio.files import atomic_path

FORMAT_VERSION = 1
SPLITS = ("train", "valid", "test")
PAD = "<pad>"
PAD_ID = 0  # input id after a sequence's end; a symbol of its own, never a real token
IGNORE_INDEX = -100  # target id where no loss applies (torch's cross_entropy default ignore_index)
COMMON_PARAMS: dict[str, Any] = {"split_sizes": (10_000, 1_000, 1_000), "seed": 42}
TASKS = {"code_exec": "tasks.code_exec", "listops": "tasks.listops"}


class DataFileError(RuntimeError):
    """A cached data file that cannot be used (damaged, or made for another task or parameters)."""


@dataclass
class SequenceDataset:
    """One split of a task.

    Attributes:
        inputs: [N, L] int64 input ids, right-padded with PAD_ID to the split's longest sequence.
        targets: [N, L] int64 output ids, IGNORE_INDEX where no loss applies (padding included).
        lengths: [N] int64 sequence lengths.
    """

    task: str
    split: str
    params: dict[str, Any]
    inputs: np.ndarray
    targets: np.ndarray
    lengths: np.ndarray
    input_vocab: list[str]
    output_vocab: list[str]

    def __len__(self) -> int:
        return len(self.lengths)

    def tokens(self, index: int) -> list[str]:
        """The input symbols of sequence `index` (no padding)."""
        return [self.input_vocab[i] for i in self.inputs[index, : self.lengths[index]]]


class Batch(NamedTuple):
    inputs: torch.Tensor  # [L, B] int64
    targets: torch.Tensor  # [L, B] int64
    lengths: torch.Tensor  # [B] int64


def task_module(task: str) -> ModuleType:
    """The module implementing `task`; an unknown name raises an error listing the known ones."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose one of {sorted(TASKS)}")
    return importlib.import_module(TASKS[task])


def _as_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"parameter {name} must be an integer, got {value!r}")
    return int(value)


def resolve_params(task: str, params: dict[str, Any]) -> dict[str, Any]:
    """All parameters of `task` with defaults filled in, checked, in canonical (JSON) form."""
    module = task_module(task)
    defaults = {**module.PARAMS, **COMMON_PARAMS}
    unknown = sorted(set(params) - set(defaults))
    if unknown:
        raise ValueError(f"unknown parameter(s) {unknown} for task {task!r}; valid ones: {sorted(defaults)}")
    merged = {**defaults, **params}
    sizes = merged["split_sizes"]
    if not isinstance(sizes, (list, tuple)) or len(sizes) != len(SPLITS):
        raise ValueError(f"split_sizes must hold {len(SPLITS)} integers (sizes of {SPLITS}), got {sizes!r}")
    sizes = [_as_int("split_sizes", s) for s in sizes]
    if min(sizes) < 1:
        raise ValueError(f"split_sizes must all be >= 1, got {sizes}")
    resolved = {name: _as_int(name, merged[name]) for name in module.PARAMS}
    module.check_params(resolved)
    resolved.update(split_sizes=sizes, seed=_as_int("seed", merged["seed"]))
    return dict(sorted(resolved.items()))


def data_path(data_dir: Path, task: str, params: dict[str, Any]) -> Path:
    """File holding the data of `task` with resolved `params`, e.g. `listops_depth=10_seed=42_...npz`."""
    parts = [f"{k}={'-'.join(map(str, v)) if isinstance(v, list) else v}" for k, v in params.items()]
    return Path(data_dir) / f"{task}_{'_'.join(parts)}.npz"


def _digest(arrays: dict[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    for key in sorted(arrays):
        a = np.ascontiguousarray(arrays[key])
        h.update(f"{key}|{a.dtype.str}|{a.shape}|".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _generate(task: str, params: dict[str, Any]) -> dict[str, np.ndarray]:
    """Flat on-disk arrays per split: `<split>_tokens`, `<split>_targets` (all sequences joined), `_lengths`."""
    module = task_module(task)
    arrays = {}
    for split, size in zip(SPLITS, params["split_sizes"]):
        # A string seed is hashed with SHA-512 by `random`: the same stream on every machine and run.
        rng = random.Random(f"{task}/seed={params['seed']}/{split}")
        tokens, targets, lengths = module.generate_split(params, rng, size)
        arrays[f"{split}_tokens"] = np.asarray(tokens, dtype=np.int16)
        arrays[f"{split}_targets"] = np.asarray(targets, dtype=np.int16)
        arrays[f"{split}_lengths"] = np.asarray(lengths, dtype=np.int32)
    return arrays


def _write(path: Path, arrays: dict[str, np.ndarray], metadata: dict[str, Any]) -> None:
    """Write atomically: a reader sees either no file or the complete one."""
    with atomic_path(path) as tmp:
        np.savez(tmp, metadata=np.array(json.dumps(metadata)), **arrays)


def _read(path: Path, expected: dict[str, Any]) -> dict[str, np.ndarray]:
    """The arrays of `path`, after checking it is intact and holds exactly the `expected` metadata."""
    fix = f"Delete {path} to regenerate it, or pass another --data-dir."
    try:
        with np.load(path, allow_pickle=False) as f:
            metadata = json.loads(str(f["metadata"][()]))
            arrays = {key: f[key] for key in f.files if key != "metadata"}
    except (OSError, EOFError, ValueError, KeyError, zipfile.BadZipFile) as e:
        raise DataFileError(f"{path} is damaged or not an rfwp data file ({type(e).__name__}: {e}). {fix}") from e
    if not isinstance(metadata, dict):
        raise DataFileError(f"{path} is damaged or not an rfwp data file (its metadata is not a JSON object). {fix}")
    found = {k: metadata.get(k) for k in ("format_version", "task", "params")}
    wanted = {k: expected[k] for k in found}
    if found != wanted:
        raise DataFileError(f"{path} holds other data than asked for: it has {found}, wanted {wanted}. {fix}")
    if metadata.get("digest") != _digest(arrays):
        raise DataFileError(f"{path} is damaged: its arrays do not match the checksum stored with them. {fix}")
    if (metadata.get("input_vocab"), metadata.get("output_vocab")) != (
        expected["input_vocab"],
        expected["output_vocab"],
    ):
        raise DataFileError(f"{path} was made with other vocabularies than this code uses. {fix}")
    return arrays


def _padded(flat: np.ndarray, lengths: np.ndarray, fill: int) -> np.ndarray:
    """[sum(lengths)] joined sequences -> [N, max(lengths)] int64, right-padded with `fill`."""
    out = np.full((len(lengths), int(lengths.max())), fill, dtype=np.int64)
    out[np.arange(out.shape[1]) < lengths[:, None]] = flat  # row-major order = the sequences one after another
    return out


def load_or_generate(task: str, data_dir: Path | str, **params: Any) -> dict[str, SequenceDataset]:
    """The splits of `task`, read from `data_dir` or generated there once (atomically) and then reused.

    Args:
        task: a name in TASKS.
        data_dir: cache directory (created if missing).
        **params: generator parameters (see the task module's PARAMS) plus `split_sizes` and `seed`.

    Raises:
        DataFileError: the cached file is damaged or was made for another task, parameters or format.
    """
    module = task_module(task)
    params = resolve_params(task, params)
    input_vocab, output_vocab = module.vocabularies(params)
    metadata = {
        "format_version": FORMAT_VERSION,
        "task": task,
        "params": params,
        "input_vocab": input_vocab,
        "output_vocab": output_vocab,
    }
    path = data_path(Path(data_dir), task, params)
    if path.exists():
        arrays = _read(path, metadata)
    else:
        arrays = _generate(task, params)
        _write(path, arrays, {**metadata, "digest": _digest(arrays)})
    splits = {}
    for split in SPLITS:
        lengths = arrays[f"{split}_lengths"].astype(np.int64)
        splits[split] = SequenceDataset(
            task=task,
            split=split,
            params=params,
            inputs=_padded(arrays[f"{split}_tokens"], lengths, PAD_ID),
            targets=_padded(arrays[f"{split}_targets"], lengths, IGNORE_INDEX),
            lengths=lengths,
            input_vocab=input_vocab,
            output_vocab=output_vocab,
        )
    return splits


def iterate_batches(
    dataset: SequenceDataset, batch_size: int, shuffle: bool = False, seed: int = 0
) -> Iterator[Batch]:
    """Time-major batches covering the split once (the last one may be smaller).

    Each batch is padded to its own longest sequence: inputs with PAD_ID, targets with IGNORE_INDEX.
    With `shuffle`, the order is a permutation drawn from `seed` (pass e.g. base_seed + epoch).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    n = len(dataset)
    order = np.random.default_rng(seed).permutation(n) if shuffle else np.arange(n)
    for start in range(0, n, batch_size):
        index = order[start : start + batch_size]
        lengths = dataset.lengths[index]
        width = int(lengths.max())
        yield Batch(
            inputs=torch.from_numpy(np.ascontiguousarray(dataset.inputs[index, :width].T)),
            targets=torch.from_numpy(np.ascontiguousarray(dataset.targets[index, :width].T)),
            lengths=torch.from_numpy(lengths.copy()),
        )


def accuracies(counts: dict[str, int]) -> dict[str, float]:
    """{"<name>_correct", "<name>_total"} counts (summed over batches) -> {"<name>_accuracy"}; nan if no total."""
    out = {}
    for key, correct in counts.items():
        if key.endswith("_correct"):
            name = key.removesuffix("_correct")
            total = counts[f"{name}_total"]
            out[f"{name}_accuracy"] = correct / total if total else float("nan")
    return out


def check_predictions(pred: torch.Tensor, targets: torch.Tensor) -> None:
    """Metrics compare per-position predictions [L, B] (output ids) with targets [L, B]."""
    if pred.shape != targets.shape or targets.dim() != 2:
        raise ValueError(
            f"pred {tuple(pred.shape)} and targets {tuple(targets.shape)} must both be [L, B] "
            "(take pred = logits.argmax(-1))"
        )


def _parse_param(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, [int(v) for v in value.split(",")] if "," in value else int(value)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Generate (or check) a task's cached data and print statistics.")
    parser.add_argument("task", choices=sorted(TASKS))
    parser.add_argument("--data-dir", type=Path, default=Path("data"))
    parser.add_argument(
        "params", nargs="*", type=_parse_param, help="KEY=VALUE, e.g. num_variables=5 or split_sizes=1000,100,100"
    )
    args = parser.parse_args(argv)
    splits = load_or_generate(args.task, args.data_dir, **dict(args.params))
    for split, data in splits.items():
        print(
            f"{split}: {len(data)} sequences, length mean {data.lengths.mean():.1f} "
            f"(min {data.lengths.min()}, max {data.lengths.max()}), "
            f"{len(data.input_vocab) - 1} input symbols + pad, {len(data.output_vocab)} output symbols"
        )


if __name__ == "__main__":
    main()
