"""Train a sequence model on a supervised task with any core of the registry or the Transformer baseline.

    python -m agent.supervised --task code_exec --variables 5 --core delta_rnn
    python -m agent.supervised --task listops --depth 15 --core rec_delta
    python -m agent.supervised --task wikitext103 --core delta_net --data-dir data/wikitext-103 [--carry-state]

Defaults are the paper's (configs/supervised_algorithmic.yaml, configs/wikitext103_small.yaml); a --config file
overrides them and flags override both. Everything lives in `runs/<name>/`: config.yaml, logs.csv, TensorBoard
events, checkpoint.pt (resumption), best.pt (best validation) and results.yaml (the final evaluation of the
best model). Running the same command again resumes the run.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from agent.config import ConfigError, add_core_size_flags, check_ranges, load_defaults, merge_config, resolve_device
from learner.supervised import SCHEDULES, LanguageModelTask, OptimConfig, TaggingTask, train
from models.ops import BACKEND_NAMES
from models.sequence import SUPERVISED_CORE_NAMES, LanguageModel, SequenceTagger, build_core
from tasks.data import DataFileError, load_or_generate
from runio.checkpoint import CheckpointMismatchError
from runio.files import RunFileError, write_yaml
from runio.lock import RunLock, RunLockedError
from tasks.wikitext import load_corpus

TASK_CONFIGS = {
    "code_exec": "supervised_algorithmic.yaml",
    "listops": "supervised_algorithmic.yaml",
    "wikitext103": "wikitext103_small.yaml",
}
# Keys that only one task reads: giving them for another task is an error rather than silently ignored.
TASK_ONLY_KEYS = {"variables": "code_exec", "statements": "code_exec", "depth": "listops"}
MODEL_KEYS = ("hidden_size", "num_layers", "num_heads", "ff_size")
POSITIONAL_ENCODINGS = ("auto", "sinusoidal", "none")
BLOCK_ORDERS = ("auto", "pre_ln", "post_ln")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m agent.supervised",
        description="Train a sequence model (token embedding -> core -> head) on code execution, sequential "
        "ListOps or WikiText-103. Defaults are the paper's (configs/supervised_algorithmic.yaml, "
        "configs/wikitext103_small.yaml); a --config file overrides them and flags override both. Running "
        "the same command again resumes the run.",
    )
    p.add_argument("--task", required=True, choices=sorted(TASK_CONFIGS), help="the supervised task")
    p.add_argument("--core", help=f"sequence model: {', '.join(SUPERVISED_CORE_NAMES)}")
    p.add_argument("--config", help="YAML file with config keys (those of the task's file in configs/)")
    p.add_argument("--name", help="run name; the run lives in RUNS_DIR/NAME (default: <task>_<core>, with the "
                   "number of variables or the depth)")
    p.add_argument("--runs-dir", help="parent directory of runs (default: runs)")
    p.add_argument("--data-dir", help="code_exec/listops: where data sets are generated and cached (default: "
                   "data); wikitext103: the folder holding wiki.{train,valid,test}.tokens (default: "
                   "data/wikitext-103)")
    data = p.add_argument_group("task parameters")
    data.add_argument("--variables", type=int, help="code_exec: variables per program (default: 3)")
    data.add_argument("--statements", type=int, help="code_exec: statements per program (default: 100)")
    data.add_argument("--depth", type=int, help="listops: nesting depth (default: 10)")
    data.add_argument("--split-sizes", type=int, nargs=3, metavar=("TRAIN", "VALID", "TEST"),
                      help="code_exec/listops: sequences per split (default: 10000 1000 1000)")
    train_args = p.add_argument_group("training")
    train_args.add_argument("--epochs", type=int, help="passes over the training data (algorithmic default: 200)")
    train_args.add_argument("--steps", type=int, help="updates to train for; replaces --epochs (wikitext103 "
                            "default: 500000)")
    train_args.add_argument("--batch-size", type=int, help="sequences (wikitext103: parallel streams) per update "
                            "(defaults: 64, 96)")
    train_args.add_argument("--learning-rate", type=float, help="Adam learning rate (defaults: 3e-4, 2.5e-4)")
    train_args.add_argument("--grad-norm-clip", type=float, help="global gradient-norm bound, 0 = none (defaults: "
                            "0, 0.25)")
    train_args.add_argument("--warmup-steps", type=int, help="linear warm-up updates (defaults: 0, 2000)")
    train_args.add_argument("--lr-schedule", choices=SCHEDULES, help="after warm-up (defaults: constant, cosine)")
    train_args.add_argument("--eval-every", type=int, help="validation interval in updates, 0 = each epoch "
                            "(defaults: 0, 4000)")
    train_args.add_argument("--segment-len", type=int, help="wikitext103: tokens per segment and evaluation "
                            "window (default: 256)")
    train_args.add_argument("--sliding-stride", type=int, help="wikitext103: tokens the final sliding-window "
                            "evaluation moves on by; 1 is the paper's protocol, larger is faster (default: 1)")
    train_args.add_argument("--carry-state", action="store_true", default=None,
                            help="wikitext103: carry each core's final state, detached, into the next segment "
                            "of the same stream (the paper's 'full context' setting; default: off)")
    train_args.add_argument("--positional-encoding", choices=POSITIONAL_ENCODINGS,
                            help="wikitext103: sinusoidal encoding of the position in the segment, or none; auto: "
                            "the paper's choice, none with --carry-state, else sinusoidal (default: auto)")
    train_args.add_argument("--block-order", choices=BLOCK_ORDERS,
                            help="wikitext103: LayerNorm before each sub-layer (pre_ln) or after its residual sum "
                            "(post_ln); auto: the paper's choice, post_ln with --carry-state, else pre_ln "
                            "(default: auto)")
    train_args.add_argument("--device", help="auto, cpu, cuda, cuda:N (default: auto)")
    train_args.add_argument("--backend", choices=BACKEND_NAMES, help="fast-weight rule backend (default: auto)")
    train_args.add_argument("--seed", type=int, help="seeds the model and the data order (defaults: 11, 1111)")
    add_core_size_flags(p, (*MODEL_KEYS, "dropout"), "defaults: 4 x 256, 16 heads, ff 1024, dropout 0.1 "
                        "(algorithmic); 16 x 128, 8 heads, ff 2048, dropout 0.1 (wikitext103)")
    return p.parse_args(argv)


def resolve_config(task: str, config_file: str | Path | None = None, overrides: dict | None = None) -> dict:
    """The task's defaults, then `config_file`, then `overrides` (flag values; None = not given), merged and
    checked by `agent.config.merge_config` like every entry point's.

    Unknown keys, values of the wrong type or outside their range, task parameters given for another task and
    inconsistent sizes raise ConfigError saying what to change, before any data is read.
    """
    if task not in TASK_CONFIGS:
        raise ConfigError(f"unknown task {task!r}; choose one of {sorted(TASK_CONFIGS)}")
    config, _, where = merge_config(load_defaults(TASK_CONFIGS[task]), config_file, overrides)
    for key, source in where.items():
        if TASK_ONLY_KEYS.get(key, task) != task:
            raise ConfigError(f"{key} is a parameter of --task {TASK_ONLY_KEYS[key]}, not of {task} (given in {source})")
    config["task"] = task
    if config["core"] is None:
        raise ConfigError(f"no core given: pass --core ({', '.join(SUPERVISED_CORE_NAMES)})")
    check_ranges(config, where)
    try:
        build_core(config["core"], 1, *(config[k] for k in MODEL_KEYS), dropout=0.0)  # bad name or sizes fail early
        OptimConfig.from_config(config)  # an unknown lr_schedule fails here, early
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if config["steps"] < 1 and config["epochs"] < 1:
        raise ConfigError("give a training length: --steps N or --epochs N (at least 1)")
    if config.get("carry_state") and config["core"] in ("transformer", "none"):
        raise ConfigError(
            f"--carry-state needs a core with a state to carry; {config['core']!r} has none. Use a fast-weight "
            "core (e.g. delta_net, rec_delta, delta_rnn) or the lstm"
        )
    if task == "wikitext103":
        if config["sliding_stride"] > config["segment_len"]:
            raise ConfigError(f"sliding_stride {config['sliding_stride']} is larger than segment_len "
                              f"{config['segment_len']}: the sliding evaluation would skip tokens; lower "
                              "--sliding-stride")
        resolve_lm_layout(config)
    resolve_device(config["device"])
    if config["name"] is None:
        variant = config.get({"code_exec": "variables", "listops": "depth"}.get(task), "")
        config["name"] = f"{task}{variant}_{config['core']}"
    return config


def resolve_lm_layout(config: dict) -> None:
    """Check `positional_encoding` and `block_order`, and replace `auto` by the paper's choice for the context
    handling: its full-context models (carry_state) have no positional encoding and post-LN blocks, its
    truncated-context ones sinusoidal encoding and pre-LN blocks."""
    for key, choices in (("positional_encoding", POSITIONAL_ENCODINGS), ("block_order", BLOCK_ORDERS)):
        if config[key] not in choices:
            raise ConfigError(f"{key} must be one of {', '.join(choices)}, got {config[key]!r}")
    if config["positional_encoding"] == "auto":
        config["positional_encoding"] = "none" if config["carry_state"] else "sinusoidal"
    if config["block_order"] == "auto":
        config["block_order"] = "post_ln" if config["carry_state"] else "pre_ln"


def identity(config: dict) -> dict:
    """The settings a checkpoint must share with the run that resumes it: task, data and model."""
    keys = ["task", "core", *MODEL_KEYS]
    keys += {"code_exec": ["variables", "statements", "split_sizes", "data_seed"],
             "listops": ["depth", "split_sizes", "data_seed"],
             "wikitext103": ["cutoffs", "tie_weights", "positional_encoding", "block_order"]}[config["task"]]
    return {key: config[key] for key in keys}


def run(config: dict, progress: bool = True) -> dict[str, float]:
    """Train (or resume) the run `config` (from `resolve_config`) describes; returns the final metrics."""
    device = resolve_device(config["device"])
    optim = OptimConfig.from_config(config)
    torch.manual_seed(config["seed"])
    sizes = {key: config[key] for key in (*MODEL_KEYS, "dropout")}
    if config["task"] == "wikitext103":
        corpus = load_corpus(config["data_dir"], progress=progress)
        model = LanguageModel(corpus.vocab_size, config["core"], cutoffs=config["cutoffs"] or None,
                              tie_weights=config["tie_weights"], backend=config["backend"],
                              positional_encoding=config["positional_encoding"] == "sinusoidal",
                              pre_norm=config["block_order"] == "pre_ln", **sizes)
        task = LanguageModelTask(
            corpus, config["batch_size"], config["segment_len"], device, carry_state=config["carry_state"],
            eval_batch_size=config["eval_batch_size"], sliding_stride=config["sliding_stride"],
            sliding_batch_size=config["sliding_batch_size"],
        )
    else:
        params = {"code_exec": {"num_variables": config["variables"], "num_statements": config["statements"]},
                  "listops": {"depth": config["depth"]}}[config["task"]]
        splits = load_or_generate(config["task"], config["data_dir"], split_sizes=config["split_sizes"],
                                  seed=config["data_seed"], **params)
        train_set = splits["train"]
        model = SequenceTagger(len(train_set.input_vocab), len(train_set.output_vocab), config["core"],
                               backend=config["backend"], **sizes)
        task = TaggingTask(config["task"], splits, config["batch_size"], config["seed"], device,
                           eval_batch_size=config["eval_batch_size"])
    total_steps = config["steps"] if config["steps"] > 0 else config["epochs"] * task.steps_per_epoch
    run_dir = Path(config["runs_dir"]) / config["name"]
    write_yaml(config, run_dir / "config.yaml")
    print(f"{config['task']} with {config['core']}: {sum(p.numel() for p in model.parameters()):,} parameters, "
          f"{total_steps:,} updates ({task.steps_per_epoch:,} per epoch) on {device}; run in {run_dir}", flush=True)
    results = train(
        model.to(device), task, optim, total_steps=total_steps,
        eval_every=config["eval_every"] or task.steps_per_epoch, run_dir=run_dir, identity=identity(config),
        log_every=config["log_every"], progress=progress,
    )
    write_yaml(results, run_dir / "results.yaml")
    return results


def main(argv: list[str] | None = None) -> dict[str, float]:
    args = vars(parse_args(argv))
    task, config_file = args.pop("task"), args.pop("config")
    try:
        config = resolve_config(task, config_file, args)
        with RunLock(Path(config["runs_dir"]) / config["name"]):
            results = run(config)
    except (ConfigError, FileNotFoundError, DataFileError, CheckpointMismatchError, RunFileError, RunLockedError) as e:
        sys.exit(f"error: {e}")
    for key, value in results.items():
        print(f"{key}: {value:.4f}" if isinstance(value, float) else f"{key}: {value}")
    return results


if __name__ == "__main__":
    main()
