"""WikiText-103 reader: word-level vocabulary, encoded corpus cached beside the files, stream batching.

Follows the Transformer-XL / RFWP procedure (docs/protocol.md §3.1): the vocabulary is counted on the training
split only, case preserved, lines split on whitespace, `<eos>` appended to every line (blank lines included);
no minimum count and no size limit. `<eos>` gets id 0 and the other words follow by descending training count
(ties in order of first appearance), so the adaptive softmax's cutoffs split frequent from rare words.
"""
from __future__ import annotations

import os
import warnings
from array import array
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from tqdm import tqdm

from runio.files import atomic_path

SPLITS = ("train", "valid", "test")
EOS = "<eos>"
UNK = "<unk>"
CACHE_NAME = "cache.pt"
CACHE_VERSION = 1
SAMPLE_DIR = Path(__file__).resolve().parent / "samples" / "wikitext_sample"
DOWNLOAD_HINT = (
    "WikiText-103 is the standard release wikitext-103-v1.zip (Merity et al. 2016; the tokenised version, "
    "not the 'raw' one), originally at https://s3.amazonaws.com/research.metamind.io/wikitext/"
    "wikitext-103-v1.zip, the archive the Transformer-XL getdata.sh script fetches. Unzip it and pass the "
    "folder that holds wiki.train.tokens, wiki.valid.tokens and wiki.test.tokens as --data-dir. "
    f"For a quick check without the download, use the bundled sample: --data-dir {SAMPLE_DIR}"
)


def split_path(data_dir: str | os.PathLike, split: str) -> Path:
    """Path of one split's file in the WikiText release: `<data_dir>/wiki.<split>.tokens`."""
    return Path(data_dir) / f"wiki.{split}.tokens"


@dataclass(frozen=True)
class Corpus:
    """Encoded WikiText splits.

    Attributes:
        vocab: id -> word; `vocab[0] == "<eos>"`, then by descending training count.
        splits: split name -> token ids [N] (int32; ids index `vocab`).
    """

    vocab: tuple[str, ...]
    splits: dict[str, torch.Tensor]

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def __getitem__(self, split: str) -> torch.Tensor:
        if split not in self.splits:
            raise KeyError(f"unknown split {split!r}; the splits are {SPLITS}")
        return self.splits[split]

    def decode(self, ids: torch.Tensor) -> list[str]:
        """Words for a 1-D tensor of ids."""
        return [self.vocab[i] for i in ids.tolist()]


def _read_lines(path: Path, progress: bool) -> Iterator[list[str]]:
    """Yield the whitespace-split words of every line, `<eos>` appended, with a byte-based progress bar."""
    with open(path, "rb") as f, tqdm(
        total=path.stat().st_size, unit="B", unit_scale=True, desc=f"reading {path.name}",
        disable=not progress, leave=False,
    ) as bar:
        for raw in f:
            bar.update(len(raw))
            yield raw.decode("utf-8").split() + [EOS]


def _encode_train(path: Path, progress: bool) -> tuple[tuple[str, ...], np.ndarray]:
    """Count and encode the training split in one pass.

    Words get provisional ids in order of first appearance; they are then renumbered by rank, `<eos>` first.
    Returns the vocabulary and the encoded split [N] int32.
    """
    first_seen: dict[str, int] = {EOS: 0}
    ids = array("i")
    for words in _read_lines(path, progress):
        ids.extend([first_seen.setdefault(w, len(first_seen)) for w in words])
    provisional = np.frombuffer(ids, dtype=np.int32)
    counts = np.bincount(provisional, minlength=len(first_seen))
    counts[0] = np.iinfo(counts.dtype).max  # <eos> first, as Transformer-XL adds special symbols first
    order = np.argsort(-counts, kind="stable")  # stable: ties keep first-appearance order
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    words = list(first_seen)
    vocab = tuple(words[i] for i in order)
    return vocab, rank.astype(np.int32)[provisional]


def _encode_split(path: Path, index: dict[str, int], progress: bool) -> np.ndarray:
    """Encode a validation or test split with the training vocabulary; words outside it map to `<unk>`."""
    unk = index.get(UNK)
    ids = array("i")
    for words in _read_lines(path, progress):
        try:
            ids.extend([index[w] for w in words])
        except KeyError:
            if unk is None:
                missing = next(w for w in words if w not in index)
                raise ValueError(
                    f"{path} holds the word {missing!r}, which is not in the training vocabulary, and the "
                    f"vocabulary has no {UNK} to map it to. WikiText splits share one vocabulary: check that "
                    "the three files come from the same release."
                ) from None
            ids.extend([index.get(w, unk) for w in words])
    return np.frombuffer(ids, dtype=np.int32).copy()


def _source_signature(data_dir: Path) -> list[list[int]]:
    """Size and modification time of each split file: the cache is rebuilt when any of them changes."""
    return [[(s := split_path(data_dir, name).stat()).st_size, s.st_mtime_ns] for name in SPLITS]


def _load_cache(path: Path, signature: list[list[int]]) -> Corpus | None:
    if not path.exists():
        return None
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a damaged cache is rebuilt, not fatal
        warnings.warn(f"ignoring unreadable cache {path} ({error}); rebuilding it")
        return None
    if blob.get("version") != CACHE_VERSION or blob.get("sources") != signature:
        return None
    return Corpus(vocab=tuple(blob["vocab"]), splits={name: blob[name] for name in SPLITS})


def _save_cache(path: Path, corpus: Corpus, signature: list[list[int]]) -> None:
    """Write the cache atomically."""
    blob = {"version": CACHE_VERSION, "sources": signature, "vocab": list(corpus.vocab), **corpus.splits}
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        torch.save(blob, f)


def load_corpus(data_dir: str | os.PathLike, use_cache: bool = True, progress: bool = True) -> Corpus:
    """Read WikiText-103 (or a folder in the same format) and encode it.

    Args:
        data_dir: folder holding wiki.train.tokens, wiki.valid.tokens and wiki.test.tokens.
        use_cache: reuse `<data_dir>/cache.pt` when it matches the files' sizes and times, and write it
            otherwise (skipped with a warning when the folder is read-only, and for the bundled sample).
        progress: show progress bars while reading.

    Raises:
        FileNotFoundError: a split file is missing; the message says where to get the release and where
            to put it.
    """
    data_dir = Path(data_dir)
    missing = [str(split_path(data_dir, s)) for s in SPLITS if not split_path(data_dir, s).is_file()]
    if missing:
        raise FileNotFoundError(f"WikiText-103 files not found: {', '.join(missing)}. {DOWNLOAD_HINT}")
    signature = _source_signature(data_dir)
    cache = data_dir / CACHE_NAME
    # The bundled sample lives in the source tree and encodes in milliseconds: never write a cache there.
    use_cache = use_cache and data_dir.resolve() != SAMPLE_DIR
    if use_cache and (corpus := _load_cache(cache, signature)) is not None:
        return corpus
    vocab, train = _encode_train(split_path(data_dir, "train"), progress)
    index = {w: i for i, w in enumerate(vocab)}
    splits = {"train": train}
    for name in SPLITS[1:]:
        splits[name] = _encode_split(split_path(data_dir, name), index, progress)
    corpus = Corpus(vocab=vocab, splits={k: torch.from_numpy(v) for k, v in splits.items()})
    if use_cache:
        try:
            _save_cache(cache, corpus, signature)
        except OSError as error:
            warnings.warn(f"could not write the cache {cache} ({error}); the corpus will be re-encoded next time")
    return corpus


def batchify(tokens: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Cut a token stream into `batch_size` contiguous parallel streams (the remainder is dropped).

    Args:
        tokens: [N] ids.

    Returns:
        [N // batch_size, batch_size]: column b is tokens[b * L:(b + 1) * L] with L = N // batch_size.
    """
    length = tokens.numel() // batch_size
    if length < 2:
        raise ValueError(
            f"a stream of {tokens.numel()} tokens is too short for {batch_size} parallel streams "
            "(each needs at least 2 tokens: an input and its target); lower the batch size"
        )
    return tokens[: length * batch_size].view(batch_size, length).t().contiguous()


def num_segments(streams: torch.Tensor, segment_len: int) -> int:
    """Number of segments `iterate_segments` yields for streams [L, B]."""
    return -(-(streams.shape[0] - 1) // segment_len)


def iterate_segments(
    streams: torch.Tensor, segment_len: int, start: int = 0
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Consecutive segments of the parallel streams, in order (so a carried state stays aligned).

    Args:
        streams: [L, B] ids from `batchify`.
        segment_len: tokens per segment; the last segment may be shorter.
        start: index of the first segment to yield (to resume mid-epoch).

    Yields:
        inputs [t, B] and targets [t, B] (int64), targets[i] being the token after inputs[i].
    """
    for begin in range(start * segment_len, streams.shape[0] - 1, segment_len):
        end = min(begin + segment_len, streams.shape[0] - 1)
        yield streams[begin:end].long(), streams[begin + 1 : end + 1].long()


def sliding_windows(
    tokens: torch.Tensor, window: int, batch_size: int, stride: int = 1
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Windows of `window` tokens that together score every token after the first exactly once.

    The first window scores all its positions; each later one moves on by `stride` tokens and scores only
    its last `stride` positions (fewer in the final window), so with stride 1 every scored token but those in
    the first window has `window - 1` tokens of context (the Transformer-XL sliding-window evaluation).

    Args:
        tokens: [N] ids.
        window: tokens per window.
        batch_size: windows per yielded batch.
        stride: tokens each window moves on by, 1 <= stride <= window.

    Yields:
        inputs [W, b], targets [W, b] (int64) and scored [W, b] bool, with W = min(window, N - 1).
    """
    if not 1 <= stride <= window:
        raise ValueError(f"stride must be in [1, window={window}], got {stride}")
    total = tokens.numel() - 1  # number of (input, target) pairs
    width = min(window, total)
    # Input position of each window's last step, and how many targets it scores.
    ends = torch.arange(width - 1, total, stride)
    if ends[-1] != total - 1:
        ends = torch.cat([ends, torch.tensor([total - 1])])
    counts = torch.cat([torch.tensor([width]), ends[1:] - ends[:-1]])
    offsets = torch.arange(width)
    for i in range(0, len(ends), batch_size):
        index = ends[i : i + batch_size, None] - width + 1 + offsets  # [b, W]
        scored = offsets >= width - counts[i : i + batch_size, None]
        yield tokens[index].t().long(), tokens[index + 1].t().long(), scored.t()


__all__ = [
    "SPLITS", "EOS", "UNK", "SAMPLE_DIR", "Corpus", "split_path", "load_corpus", "batchify",
    "num_segments", "iterate_segments", "sliding_windows",
]
