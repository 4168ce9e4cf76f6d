"""WikiText-103 reader on the bundled sample, and the language model's softmax, perplexity and carried state."""
from __future__ import annotations

import collections
import math
import shutil
from pathlib import Path

import pytest
import torch

from learner.supervised import evaluate_segments, evaluate_sliding
from models.sequence import WT103_CUTOFFS, WT103_VOCAB_SIZE, LanguageModel, scaled_cutoffs
from tasks import wikitext
from tasks.wikitext import EOS, SAMPLE_DIR, batchify, iterate_segments, load_corpus, num_segments, sliding_windows


@pytest.fixture()
def sample_dir(tmp_path: Path) -> Path:
    """A private copy of the sample, so the cache is written beside it and never into the source tree."""
    return Path(shutil.copytree(SAMPLE_DIR, tmp_path / "wikitext"))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> wikitext.Corpus:
    return load_corpus(shutil.copytree(SAMPLE_DIR, tmp_path_factory.mktemp("wt") / "wikitext"), progress=False)


def _words_per_line(path: Path) -> list[list[str]]:
    return [line.split() + [EOS] for line in path.read_text(encoding="utf-8").splitlines()]


def test_sample_is_in_wikitext_format() -> None:
    for split in wikitext.SPLITS:
        path = wikitext.split_path(SAMPLE_DIR, split)
        text = path.read_text(encoding="utf-8")
        assert path.stat().st_size < 300_000
        lines = text.split("\n")
        assert lines[-1] == "" and all(line.startswith(" ") and line.endswith(" ") for line in lines[:-1])
        assert " \n = " in text and " = = " in text  # article and section headings between blank lines
        assert "<unk>" in text
    assert " @-@ " in wikitext.split_path(SAMPLE_DIR, "train").read_text(encoding="utf-8")


def test_vocabulary_counted_on_train_with_eos_at_every_line_end(corpus: wikitext.Corpus) -> None:
    lines = _words_per_line(wikitext.split_path(SAMPLE_DIR, "train"))
    counts = collections.Counter(word for line in lines for word in line)
    assert corpus.vocab[0] == EOS
    assert set(corpus.vocab) == set(counts)  # every training word, nothing else
    ranked = [counts[w] for w in corpus.vocab[1:]]
    assert ranked == sorted(ranked, reverse=True)  # by descending count, so cutoffs split frequent from rare
    train = corpus["train"]
    assert train.dtype == torch.int32 and train.numel() == sum(len(line) for line in lines)
    assert int((train == 0).sum()) == len(lines)  # one <eos> per line, blank lines included
    assert corpus.decode(train[: len(lines[0]) + len(lines[1])]) == lines[0] + lines[1]
    assert lines[0] == [EOS]  # the release starts with a blank line
    for split in ("valid", "test"):
        words = [w for line in _words_per_line(wikitext.split_path(SAMPLE_DIR, split)) for w in line]
        expected = [w if w in counts else "<unk>" for w in words]
        assert corpus.decode(corpus[split]) == expected


def test_words_outside_the_training_vocabulary(tmp_path: Path) -> None:
    for split, text in (("train", " a b <unk> \n"), ("valid", " a zebra \n"), ("test", " b \n")):
        wikitext.split_path(tmp_path, split).write_text(text, encoding="utf-8")
    corpus = load_corpus(tmp_path, use_cache=False, progress=False)
    assert corpus.decode(corpus["valid"]) == ["a", "<unk>", EOS]
    wikitext.split_path(tmp_path, "train").write_text(" a b \n", encoding="utf-8")
    with pytest.raises(ValueError, match="'zebra'.*not in the training vocabulary"):
        load_corpus(tmp_path, use_cache=False, progress=False)


def test_stream_batching() -> None:
    tokens = torch.arange(103, dtype=torch.int32)
    streams = batchify(tokens, 4)
    assert streams.shape == (25, 4)  # the remainder (3 tokens) is dropped
    for b in range(4):
        assert torch.equal(streams[:, b], tokens[25 * b : 25 * (b + 1)])  # contiguous streams
    segments = list(iterate_segments(streams, 7))
    assert len(segments) == num_segments(streams, 7) == 4  # 24 (input, target) pairs per stream
    assert [s[0].shape[0] for s in segments] == [7, 7, 7, 3]
    inputs = torch.cat([s[0] for s in segments])
    targets = torch.cat([s[1] for s in segments])
    assert inputs.dtype == torch.int64
    assert torch.equal(inputs, streams[:-1].long()) and torch.equal(targets, streams[1:].long())
    resumed = list(iterate_segments(streams, 7, start=2))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(resumed, segments[2:])) and len(resumed) == 2
    with pytest.raises(ValueError, match="too short"):
        batchify(tokens[:5], 4)


@pytest.mark.parametrize("stride", [1, 3, 8])
def test_sliding_windows_score_every_token_once(stride: int) -> None:
    tokens = torch.randint(0, 50, (41,), generator=torch.Generator().manual_seed(0))
    scored_targets, scored_positions = [], []
    for i, (inputs, targets, scored) in enumerate(sliding_windows(tokens, window=8, batch_size=5, stride=stride)):
        assert inputs.shape == targets.shape == scored.shape and inputs.shape[0] == 8
        assert torch.equal(inputs[1:], targets[:-1])  # targets are the next tokens
        scored_targets.append(targets.t()[scored.t()])
        scored_positions.append(scored.t().nonzero()[:, 1])
        if i == 0:
            assert bool(scored[:, 0].all())  # the first window scores all its positions
    assert torch.equal(torch.cat(scored_targets), tokens[1:].long())
    if stride == 1:  # after the first window, only the last position: 7 tokens of context each
        assert bool((torch.cat(scored_positions)[8:] == 7).all())


def test_cache_is_written_once_and_reused(sample_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = load_corpus(sample_dir, progress=False)
    cache = sample_dir / wikitext.CACHE_NAME
    assert cache.is_file() and not list(sample_dir.glob(".*tmp"))

    def must_not_run(*args, **kwargs):
        raise AssertionError("the corpus was re-encoded although the cache is valid")

    monkeypatch.setattr(wikitext, "_encode_train", must_not_run)
    again = load_corpus(sample_dir, progress=False)
    assert again.vocab == first.vocab
    assert all(torch.equal(again[s], first[s]) for s in wikitext.SPLITS)
    monkeypatch.undo()

    with open(wikitext.split_path(sample_dir, "train"), "a", encoding="utf-8") as f:
        f.write(" a brandnewword \n")
    changed = load_corpus(sample_dir, progress=False)  # the files changed: the cache is rebuilt
    assert "brandnewword" in changed.vocab and changed["train"].numel() == first["train"].numel() + 3

    cache.write_bytes(b"not a checkpoint")
    with pytest.warns(UserWarning, match="unreadable cache"):
        rebuilt = load_corpus(sample_dir, progress=False)
    assert rebuilt.vocab == changed.vocab


def test_missing_files_say_where_to_get_them(tmp_path: Path) -> None:
    wikitext.split_path(tmp_path, "train").write_text(" a \n", encoding="utf-8")
    with pytest.raises(FileNotFoundError) as error:
        load_corpus(tmp_path, progress=False)
    message = str(error.value)
    missing = {wikitext.split_path(tmp_path, s) for s in ("valid", "test")}
    assert all(str(path) in message for path in missing)
    assert str(wikitext.split_path(tmp_path, "train")) not in message  # only the missing files are named
    assert "wikitext-103-v1.zip" in message and "--data-dir" in message and str(SAMPLE_DIR) in message


def test_cutoffs_scale_with_the_vocabulary() -> None:
    assert scaled_cutoffs(WT103_VOCAB_SIZE) == list(WT103_CUTOFFS)
    assert scaled_cutoffs(1645) == [123, 246, 1229]
    assert scaled_cutoffs(3) == [1, 2]
    with pytest.raises(ValueError, match="at least 2 words"):
        scaled_cutoffs(1)


def _tiny_lm(vocab_size: int, core: str = "delta_net", seed: int = 0, **layout) -> LanguageModel:
    torch.manual_seed(seed)
    # init_std 0.2 (not the paper's 0.02): a random model whose state visibly changes its predictions.
    layout = {"positional_encoding": True, "pre_norm": True, **layout}
    return LanguageModel(vocab_size, core, hidden_size=16, num_layers=2, num_heads=2, ff_size=32, dropout=0.0,
                         tie_weights=True, init_std=0.2, backend="reference", **layout).eval()


def test_adaptive_softmax_is_a_distribution_and_tied_to_the_embedding(corpus: wikitext.Corpus) -> None:
    model = _tiny_lm(corpus.vocab_size).double()
    assert model.softmax.cutoffs[:-1] == scaled_cutoffs(corpus.vocab_size)
    h = torch.randn(6, 16, dtype=torch.float64) * 3
    log_probs = model.log_probs(h)
    assert log_probs.shape == (6, corpus.vocab_size)
    torch.testing.assert_close(log_probs.exp().sum(-1), torch.ones(6, dtype=torch.float64))
    targets = torch.tensor([0, 5, 200, 300, 1300, corpus.vocab_size - 1])  # head word and each tail cluster
    torch.testing.assert_close(model.target_log_probs(h, targets), log_probs.gather(1, targets[:, None])[:, 0])
    # Tied: the embedding is the softmax's word vectors, one set of parameters.
    vectors = model.word_vectors()
    assert vectors.shape == (corpus.vocab_size, 16)
    assert torch.equal(vectors[300], model.softmax.tail[1][1].weight[300 - 246])
    nll, _ = model(torch.tensor([[300]]), torch.tensor([[1]]))
    nll.sum().backward()
    assert model.softmax.tail[1][1].weight.grad[300 - 246].abs().sum() > 0  # reached through the input side
    assert model.embedding is None


def test_perplexity_is_exp_of_mean_token_loss(corpus: wikitext.Corpus) -> None:
    model = _tiny_lm(corpus.vocab_size)
    tokens = corpus["valid"][:120]
    with torch.no_grad():
        losses = []
        for inputs, targets in iterate_segments(batchify(tokens, 1), 16):
            h, _ = model.hidden(inputs)
            full = model.log_probs(h.flatten(0, 1))  # [N, V]: the whole distribution, not the library's loss
            losses.append(-full.gather(1, targets.flatten()[:, None])[:, 0].double())
        by_hand = torch.cat(losses)
    assert by_hand.numel() == 119
    metrics = evaluate_segments(model, tokens, segment_len=16, batch_size=1, carry_state=False)
    assert metrics["tokens"] == 119
    assert metrics["ppl"] == pytest.approx(math.exp(by_hand.mean().item()), rel=1e-5)
    # A window as long as the split scores every token once in one pass: the same as one long segment.
    sliding = evaluate_sliding(model, tokens, window=200, batch_size=4)
    assert sliding["ppl"] == pytest.approx(evaluate_segments(model, tokens, 200, 1, False)["ppl"], rel=1e-5)


@pytest.mark.parametrize("core", ["delta_net", "rec_delta", "lstm"])
def test_carried_state_equals_one_pass(corpus: wikitext.Corpus, core: str) -> None:
    # The full-context layout: positions relative to a segment's end would differ between the two splits.
    model = _tiny_lm(corpus.vocab_size, core, positional_encoding=False, pre_norm=False).double()
    tokens = corpus["test"][:150]
    one_pass = evaluate_segments(model, tokens, segment_len=200, batch_size=1, carry_state=True)
    segmented = evaluate_segments(model, tokens, segment_len=13, batch_size=1, carry_state=True)
    truncated = evaluate_segments(model, tokens, segment_len=13, batch_size=1, carry_state=False)
    assert segmented["tokens"] == one_pass["tokens"] == 149
    assert segmented["ppl"] == pytest.approx(one_pass["ppl"], rel=1e-9)
    assert truncated["ppl"] != pytest.approx(one_pass["ppl"], rel=1e-6)  # the state does carry information


def test_transformer_cannot_carry_state(corpus: wikitext.Corpus) -> None:
    model = _tiny_lm(corpus.vocab_size, "transformer")
    assert model.initial_state(2) == ()
    with pytest.raises(ValueError, match="cannot carry state"):
        model.hidden(torch.zeros(3, 1, dtype=torch.long), state=(torch.zeros(1),))


def test_positional_encoding_by_hand(corpus: wikitext.Corpus) -> None:
    """The `none` core passes its input through, so the hidden state is √D · embedding + encoding. The encoding
    of position p in dimension i < D/2 is sin(p / 10000^(2i/D)), in D/2 + i the cosine; positions count down to
    the segment's last token, at 0."""
    model = _tiny_lm(corpus.vocab_size, "none").double()
    inputs = torch.tensor([[3], [7], [3]])
    h, _ = model.hidden(inputs)
    encoding = h[:, 0] - 4.0 * model.word_vectors()[inputs[:, 0]]  # √16 = 4
    by_hand = torch.tensor([
        [math.sin(2.0), math.sin(2.0 / 10000 ** (2 / 16)), math.cos(2.0), math.cos(2.0 / 10000 ** (2 / 16))],
        [math.sin(1.0), math.sin(1.0 / 10000 ** (2 / 16)), math.cos(1.0), math.cos(1.0 / 10000 ** (2 / 16))],
        [0.0, 0.0, 1.0, 1.0],
    ], dtype=torch.float64)
    torch.testing.assert_close(encoding[:, [0, 1, 8, 9]], by_hand, rtol=1e-12, atol=1e-12)
    plain = _tiny_lm(corpus.vocab_size, "none", positional_encoding=False).double()
    h, _ = plain.hidden(inputs)
    torch.testing.assert_close(h[:, 0], 4.0 * plain.word_vectors()[inputs[:, 0]], rtol=0, atol=0)


@pytest.mark.parametrize("core", ["delta_net", "transformer"])
def test_post_ln_blocks_end_in_a_layer_norm(corpus: wikitext.Corpus, core: str) -> None:
    """Post-LN blocks end in LayerNorm (unit gain, zero bias at initialisation): every hidden state has mean 0
    and variance 1 over its features; pre-LN blocks leave the residual stream unnormalised."""
    inputs = torch.randint(0, corpus.vocab_size, (9, 2))
    for pre_norm in (False, True):
        model = _tiny_lm(corpus.vocab_size, core, pre_norm=pre_norm).double()
        if core == "transformer":  # its final LayerNorm would normalise either way
            model.core.encoder.norm = torch.nn.Identity()
        h, _ = model.hidden(inputs)
        normalised = torch.allclose(h.mean(-1), torch.zeros(9, 2, dtype=torch.float64), atol=1e-9) and \
            torch.allclose(h.var(-1, unbiased=False), torch.ones(9, 2, dtype=torch.float64), atol=1e-3)
        assert normalised != pre_norm
