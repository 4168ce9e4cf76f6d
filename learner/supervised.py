"""The supervised training loop shared by code execution, ListOps and WikiText-103.

    task = TaggingTask("listops", splits, batch_size=64, seed=1, device=device)   # or LanguageModelTask(...)
    results = train(model, task, OptimConfig.from_config(config), total_steps=..., eval_every=task.steps_per_epoch,
                    run_dir=Path("runs/x"), identity={...}, log_every=50)

Adam with a linear warm-up and a constant or cosine schedule, optional global gradient-norm clipping, a
progress bar (steps/s, ETA, loss, tokens/s), logs to `logs.csv` and TensorBoard (`runio.logs.RunLogger`,
x axis = optimiser steps), validation every `eval_every` steps, `best.pt` kept by the task's selection metric,
`checkpoint.pt` for resumption (model, optimiser, schedule, RNG, the task's carried state), and a final
evaluation of the best model on validation and test data.
"""
from __future__ import annotations

import dataclasses
import itertools
import math
import time
from pathlib import Path
from typing import Any, Iterator, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from runio.checkpoint import check_identity, load_checkpoint, load_latest, rng_state, save_checkpoint, set_rng_state
from runio.logs import RunLogger
from models.sequence import LanguageModel, SequenceTagger
from tasks import data as task_data
from tasks.wikitext import Corpus, batchify, iterate_segments, num_segments, sliding_windows

SCHEDULES = ("constant", "cosine")
# The metric each algorithmic task selects its best checkpoint by (docs/protocol.md §1.4, §2.2).
SELECTION_METRICS = {"code_exec": "sequence_accuracy", "listops": "label_accuracy"}


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """Adam and its schedule; the values come from the task's file in configs/."""

    learning_rate: float
    adam_betas: tuple[float, float]
    adam_eps: float
    grad_norm_clip: float  # global gradient-norm bound; 0 = no clipping
    warmup_steps: int  # linear warm-up from learning_rate / warmup_steps
    lr_schedule: str  # "constant" or "cosine": lr * (1 + cos(pi * step / total_steps)) / 2 after warm-up

    def __post_init__(self) -> None:
        if self.lr_schedule not in SCHEDULES:
            raise ValueError(f"unknown lr_schedule {self.lr_schedule!r}; choose one of {SCHEDULES}")

    @classmethod
    def from_config(cls, config: dict) -> OptimConfig:
        """The fields of a resolved run config (a flat dict) that configure the optimiser."""
        return cls(**{f.name: config[f.name] for f in dataclasses.fields(cls)})


def lr_factor(optim: OptimConfig, step: int, total_steps: int) -> float:
    """Multiplier of the base learning rate for update number `step` (0-based).

    Warm-up is linear; the cosine runs on the absolute step count down to 0 at `total_steps`, as in the
    Transformer-XL code the paper's LM runs used.
    """
    if step < optim.warmup_steps:
        return (step + 1) / optim.warmup_steps
    if optim.lr_schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * min(step, total_steps) / total_steps))
    return 1.0


class Task(Protocol):
    """What `train` needs from a task."""

    selection_metric: str  # key of `evaluate`'s result that picks the best checkpoint
    higher_is_better: bool
    steps_per_epoch: int
    device: torch.device

    def train_batches(self, epoch: int, start: int) -> Iterator[Any]:
        """The batches of `epoch` from the `start`-th on (a deterministic order, so resumption is exact)."""

    def loss(self, model: nn.Module, batch: Any) -> tuple[Tensor, int]:
        """Mean training loss of one batch and the number of input tokens it read (for tokens/s)."""

    def evaluate(self, model: nn.Module, split: str) -> dict[str, float]:
        """Validation metrics (called in eval mode, without gradients)."""

    def final_metrics(self, model: nn.Module) -> dict[str, float]:
        """Metrics of the final evaluation, keyed "<split>/<metric>"."""

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


class TaggingTask:
    """Code execution and ListOps: cross-entropy at every position with a target (IGNORE_INDEX elsewhere).

    Code execution scores every position; ListOps only the last token. Metrics are the task module's
    (`tasks.code_exec.metric_counts`, `tasks.listops.metric_counts`).
    """

    higher_is_better = True

    def __init__(
        self,
        task: str,
        splits: dict[str, task_data.SequenceDataset],
        batch_size: int,
        seed: int,
        device: torch.device,
        eval_batch_size: int | None = None,
    ) -> None:
        self.module = task_data.task_module(task)
        self.selection_metric = SELECTION_METRICS[task]
        self.splits, self.batch_size, self.seed, self.device = splits, batch_size, seed, device
        self.eval_batch_size = eval_batch_size or batch_size
        self.steps_per_epoch = -(-len(splits["train"]) // batch_size)

    def train_batches(self, epoch: int, start: int) -> Iterator[task_data.Batch]:
        batches = task_data.iterate_batches(self.splits["train"], self.batch_size, shuffle=True, seed=self.seed + epoch)
        return itertools.islice(batches, start, None)

    def _forward(self, model: SequenceTagger, batch: task_data.Batch) -> tuple[Tensor, Tensor, Tensor, int]:
        """Logits [L, B, C], targets [L, B], the summed cross-entropy and the number of scored positions."""
        targets = batch.targets.to(self.device)
        logits = model(batch.inputs.to(self.device))
        nll_sum = F.cross_entropy(
            logits.flatten(0, 1), targets.flatten(), ignore_index=task_data.IGNORE_INDEX, reduction="sum"
        )
        return logits, targets, nll_sum, int((targets != task_data.IGNORE_INDEX).sum())

    def loss(self, model: SequenceTagger, batch: task_data.Batch) -> tuple[Tensor, int]:
        _, _, nll_sum, scored = self._forward(model, batch)
        return nll_sum / scored, int(batch.lengths.sum())

    def evaluate(self, model: SequenceTagger, split: str) -> dict[str, float]:
        """Mean loss over scored positions and the task's accuracies on `split`."""
        counts: dict[str, int] = {}
        loss_sum, scored = 0.0, 0
        for batch in task_data.iterate_batches(self.splits[split], self.eval_batch_size):
            logits, targets, nll_sum, batch_scored = self._forward(model, batch)
            loss_sum, scored = loss_sum + float(nll_sum), scored + batch_scored
            for key, value in self.module.metric_counts(logits.argmax(-1), targets).items():
                counts[key] = counts.get(key, 0) + value
        return {"loss": loss_sum / scored, **task_data.accuracies(counts)}

    def final_metrics(self, model: SequenceTagger) -> dict[str, float]:
        return {f"{split}/{k}": v for split in ("valid", "test") for k, v in self.evaluate(model, split).items()}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def _nll_to_metrics(nll_sum: float, count: int) -> dict[str, float]:
    return {"loss": nll_sum / count, "ppl": math.exp(nll_sum / count), "tokens": count}


@torch.no_grad()
def evaluate_segments(
    model: LanguageModel, tokens: Tensor, segment_len: int, batch_size: int = 1, carry_state: bool = True
) -> dict[str, float]:
    """Perplexity over consecutive segments of `batch_size` parallel streams of `tokens` [N].

    With `carry_state` each segment starts from the previous one's final state (with batch size 1 the state
    runs through the whole split: unlimited context); otherwise from the zero state (context truncated to
    the segment). Returns the mean loss, its exponential (`ppl`) and the number of scored tokens.
    """
    device = next(model.parameters()).device
    streams = batchify(tokens, batch_size).to(device)
    state = model.initial_state(batch_size, device)
    nll_sum, count = 0.0, 0
    for inputs, targets in iterate_segments(streams, segment_len):
        nll, state = model(inputs, targets, state if carry_state else None)
        nll_sum += float(nll.sum(dtype=torch.float64))
        count += nll.numel()
    return _nll_to_metrics(nll_sum, count)


@torch.no_grad()
def evaluate_sliding(
    model: LanguageModel, tokens: Tensor, window: int, batch_size: int, stride: int = 1
) -> dict[str, float]:
    """Perplexity with a sliding window (`tasks.wikitext.sliding_windows`): every token after the first is
    scored once, with `window - 1` tokens of context except in the first window. Each window starts from the
    zero state."""
    device = next(model.parameters()).device
    nll_sum, count = 0.0, 0
    for inputs, targets, scored in sliding_windows(tokens, window, batch_size, stride):
        scored = scored.to(device)
        h, _ = model.hidden(inputs.to(device))
        log_probs = model.target_log_probs(h[scored], targets.to(device)[scored])
        nll_sum -= float(log_probs.sum(dtype=torch.float64))
        count += log_probs.numel()
    return _nll_to_metrics(nll_sum, count)


class LanguageModelTask:
    """WikiText-103: `batch_size` contiguous streams of the training split cut into `segment_len` segments.

    With `carry_state` each core's final state is detached and carried into the same streams' next segment
    (the paper's "full context" setting); otherwise every segment starts from the zero state. Validation runs
    the same way over the validation split (`eval_batch_size` streams). The final evaluation reports, on
    valid and test, that perplexity (`ppl`), the sliding-window one (`ppl_sliding`: window `segment_len`,
    stride `sliding_stride`, the paper uses 1) and, for cores with a state, the one with the state carried
    through the whole split in one stream (`ppl_carried`).
    """

    selection_metric = "ppl"
    higher_is_better = False

    def __init__(
        self,
        corpus: Corpus,
        batch_size: int,
        segment_len: int,
        device: torch.device,
        *,
        carry_state: bool,
        eval_batch_size: int,
        sliding_stride: int,
        sliding_batch_size: int,
    ) -> None:
        self.corpus, self.segment_len, self.device, self.carry_state = corpus, segment_len, device, carry_state
        self.eval_batch_size, self.sliding_stride, self.sliding_batch_size = (
            eval_batch_size, sliding_stride, sliding_batch_size,
        )
        self.streams = batchify(corpus["train"], batch_size)
        self.steps_per_epoch = num_segments(self.streams, segment_len)
        self.carried: tuple[Tensor, ...] | None = None  # the streams' state after the last training segment

    def train_batches(self, epoch: int, start: int) -> Iterator[tuple[Tensor, Tensor]]:
        if start == 0:
            self.carried = None  # each epoch reads the streams from their beginning
        yield from iterate_segments(self.streams, self.segment_len, start)

    def loss(self, model: LanguageModel, batch: tuple[Tensor, Tensor]) -> tuple[Tensor, int]:
        inputs, targets = (t.to(self.device) for t in batch)
        nll, state = model(inputs, targets, self.carried if self.carry_state else None)
        if self.carry_state:
            # Truncated backpropagation: the next segment starts from this state but sends no gradient back.
            self.carried = tuple(s.detach() for s in state)
        return nll.mean(), targets.numel()

    def evaluate(self, model: LanguageModel, split: str) -> dict[str, float]:
        return evaluate_segments(
            model, self.corpus[split], self.segment_len, self.eval_batch_size, carry_state=self.carry_state
        )

    def final_metrics(self, model: LanguageModel) -> dict[str, float]:
        results: dict[str, float] = {}
        for split in ("valid", "test"):
            tokens = self.corpus[split]
            metrics = {
                **self.evaluate(model, split),
                "ppl_sliding": evaluate_sliding(
                    model, tokens, self.segment_len, self.sliding_batch_size, self.sliding_stride
                )["ppl"],
            }
            if model.initial_state(1, self.device):
                metrics["ppl_carried"] = evaluate_segments(model, tokens, self.segment_len, 1, True)["ppl"]
            results.update({f"{split}/{k}": v for k, v in metrics.items()})
        return results

    def state_dict(self) -> dict:
        return {"carried": list(self.carried) if self.carried is not None else None}

    def load_state_dict(self, state: dict) -> None:
        carried = state["carried"]
        self.carried = tuple(s.to(self.device) for s in carried) if carried is not None else None


def _is_better(task: Task, value: float, best: float | None) -> bool:
    if best is None:
        return not math.isnan(value)
    return value > best if task.higher_is_better else value < best


def train(
    model: nn.Module,
    task: Task,
    optim: OptimConfig,
    total_steps: int,
    eval_every: int,
    run_dir: Path,
    identity: dict,
    log_every: int,
    progress: bool = True,
) -> dict[str, float]:
    """Train `model` (already on the task's device) for `total_steps` updates, resuming from
    `run_dir/checkpoint.pt` when it exists; then evaluate the best checkpoint.

    Args:
        identity: what makes a checkpoint this run's (task, model sizes, data); a checkpoint saved with
            other values raises CheckpointMismatchError instead of being resumed.
        eval_every: validation interval in updates (also after the last update); each validation writes
            `checkpoint.pt` and, when the selection metric improves, `best.pt`.

    Returns:
        The final metrics ("valid/<metric>", "test/<metric>") of the best model, plus "step" and "best_step".
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    checkpoint_path, best_path = run_dir / "checkpoint.pt", run_dir / "best.pt"
    optimizer = torch.optim.Adam(
        model.parameters(), lr=optim.learning_rate, betas=tuple(optim.adam_betas), eps=optim.adam_eps
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(optim, step, total_steps))
    step, best, best_step = 0, None, 0
    checkpoint = load_latest(checkpoint_path, map_location=task.device,
                             required_keys=("model", "optimizer", "scheduler", "task", "rng", "step", "identity"))
    resumed = checkpoint is not None
    if resumed:
        check_identity(checkpoint["identity"], identity, checkpoint_path)
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        task.load_state_dict(checkpoint["task"])
        set_rng_state(checkpoint["rng"])
        step, best, best_step = checkpoint["step"], checkpoint["best"], checkpoint["best_step"]
        print(f"Resuming {run_dir} at step {step} of {total_steps}", flush=True)
        del checkpoint

    def save() -> None:
        save_checkpoint(
            {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
             "task": task.state_dict(), "rng": rng_state(), "step": step, "best": best, "best_step": best_step,
             "identity": identity},
            checkpoint_path,
        )

    # Rows up to the checkpoint's step were logged before it was saved; later ones are dropped and redone.
    logger = RunLogger(run_dir, start=step, x_key="step")

    def validate() -> dict[str, float]:
        model.eval()
        with torch.no_grad():
            metrics = task.evaluate(model, "valid")
        model.train()
        return {f"valid/{k}": v for k, v in metrics.items()}

    train_keys = ("train/loss", "train/lr", "train/grad_norm", "train/tokens_per_s")
    if step == 0:
        # The untrained model's validation: a baseline, and the first row names every CSV column.
        logger.log({"step": 0, "epoch": 0, **dict.fromkeys(train_keys, math.nan), **validate()})
    params = [p for p in model.parameters() if p.requires_grad]
    clip = optim.grad_norm_clip if optim.grad_norm_clip > 0 else math.inf
    bar = tqdm(total=total_steps, initial=step, unit="step", dynamic_ncols=True, disable=not progress)
    loss_sum, token_sum, steps_done, seconds = 0.0, 0, 0, 0.0  # since the last log row
    try:
        model.train()
        while step < total_steps:
            epoch, offset = divmod(step, task.steps_per_epoch)
            for batch in task.train_batches(epoch, offset):
                start = time.perf_counter()
                loss, tokens = task.loss(model, batch)
                loss_value = loss.item()
                if not math.isfinite(loss_value):
                    raise FloatingPointError(
                        f"training loss became {loss_value} at step {step}; lower the learning rate "
                        "(--learning-rate) or bound the gradient norm (--grad-norm-clip)"
                    )
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                grad_norm = float(nn.utils.clip_grad_norm_(params, clip))
                optimizer.step()
                scheduler.step()
                step += 1
                loss_sum, token_sum, steps_done = loss_sum + loss_value, token_sum + tokens, steps_done + 1
                seconds += time.perf_counter() - start
                bar.update(1)
                if step % log_every == 0 or step == total_steps:
                    row = dict(zip(train_keys, (loss_sum / steps_done, scheduler.get_last_lr()[0], grad_norm,
                                                token_sum / seconds)))
                    logger.log({"step": step, "epoch": epoch, **row})
                    bar.set_postfix(loss=f"{row['train/loss']:.4f}", lr=f"{row['train/lr']:.2e}",
                                    tok_s=f"{row['train/tokens_per_s']:.0f}")
                    loss_sum, token_sum, steps_done, seconds = 0.0, 0, 0, 0.0
                if step % eval_every == 0 or step == total_steps:
                    metrics = validate()
                    value = metrics[f"valid/{task.selection_metric}"]
                    if _is_better(task, value, best):
                        best, best_step = value, step
                        save_checkpoint({"model": model.state_dict(), "step": step, "metrics": metrics}, best_path)
                    logger.log({"step": step, "epoch": epoch, **metrics})
                    bar.write(f"step {step}: valid {task.selection_metric} {value:.4f} "
                              f"(best {best if best is not None else math.nan:.4f} at step {best_step})")
                    save()
                if step >= total_steps:
                    break
        if best_path.exists():
            model.load_state_dict(load_checkpoint(best_path, map_location=task.device)["model"])
        model.eval()
        with torch.no_grad():
            results = task.final_metrics(model)
        # TensorBoard only: the CSV holds the time series (its columns are fixed by its first row).
        for key, value in results.items():
            logger.writer.add_scalar(f"final/{key}", value, global_step=step)
    finally:
        bar.close()
        logger.close()
    return {**results, "step": step, "best_step": best_step}


__all__ = [
    "SCHEDULES", "SELECTION_METRICS", "OptimConfig", "lr_factor", "Task", "TaggingTask", "LanguageModelTask",
    "evaluate_segments", "evaluate_sliding", "train",
]
