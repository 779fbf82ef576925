"""Training throughput: peftflow's loop vs. a stock ``transformers.Trainer`` + peft baseline.

Both sides train the same model, method, data (tokenised once, identically), batch size
and number of optimizer steps; the first ``--warmup`` steps are excluded from timing.

- ``ours``: ``peftflow.training.loop.train_model`` with ``classification_objective``, the model
  built by ``task.registry.build_for_training`` exactly as ``task.run.train_and_evaluate`` builds
  it (only the end-of-epoch validation is replaced by a constant, as the baseline does
  no evaluation either).
- ``trainer``: ``AutoModelForSequenceClassification`` (+ ``get_peft_model(LoraConfig(
  task_type=SEQ_CLS))`` for LoRA, the same target modules, r, alpha and dropout as ours)
  trained by ``Trainer`` with ``TrainingArguments`` defaults except batch size, steps,
  learning rate, seed, no evaluation, no saving, ``report_to="none"``; batches padded by
  ``DataCollatorWithPadding`` to their longest, like ours. Weights load in float32 like ours
  (transformers 5 would otherwise load the checkpoint's own dtype). ``--baseline`` says how
  the Trainer is configured (BASELINES): ``fair`` (the default and the headline) is what a
  user would set for this job, ``bf16=True`` and ``train_sampling_strategy="group_by_length"``
  (ours groups by length too); ``bf16`` and ``fp32`` are secondary rows.

MFU: the FLOPs-per-token rule (:func:`flops_per_token`) over a peak. On a GPU the peak is
the card's dense bf16 figure (PEAK_TFLOPS or ``--peak-tflops``); on a CPU it is measured
at start by a matmul microbenchmark in the run's precision (:func:`matmul_peak`), since no
datasheet gives a VM's share of a core.

Each (side, repeat) runs in a fresh Python process (so peak memory is that run's own and
neither side inherits the other's allocator or thread state); the sides alternate order
between repeats. See benchmarks/README.md for the metrics and the MFU formula.

    python benchmarks/train_throughput.py --model smollm2-135m --method lora \
        --batch-size 16 --max-length 192 --steps 8 --repeats 3 --out benchmarks/results/
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SIDES = ("ours", "trainer")

# How the Trainer is configured: (bf16, length-grouped batches), as a user would set it.
BASELINES = {
    "fair": (True, True),  # bf16=True, train_sampling_strategy="group_by_length"
    "bf16": (True, False),
    "fp32": (False, False),  # TrainingArguments defaults
}
BASELINE_TEXT = {
    "fair": "bf16=True, group_by_length",
    "bf16": "bf16=True, random order",
    "fp32": "TrainingArguments defaults (fp32, random order)",
}

# Dense bf16 peak TFLOP/s (no sparsity) of known cards, matched against the CUDA device name.
PEAK_TFLOPS = {
    "H200": 989.0,
    "H100": 989.0,  # SXM; the PCIe card is 756
    "A100": 312.0,
    "L40S": 362.0,
    "A10G": 70.0,
    "L4": 121.0,
}

# The synthetic texts' vocabulary (each word is one or two tokens for BPE/WordPiece).
WORDS = (
    "the meeting project report offer free money click prize team budget review "
    "schedule account update please thanks regards information available service "
    "price order today new time email list message mortgage rate people business "
    "subscribe unsubscribe internet software linux server mailing version"
)

# Metrics whose median over repeats is the summary of a side.
SUMMARY_KEYS = (
    "tokens_per_s",
    "padded_tokens_per_s",
    "examples_per_s",
    "mean_step_s",
    "peak_memory_mb",
    "mfu",
)


# ----------------------------------------------------------------------------- data


def synthetic_texts(n: int, seed: int) -> tuple[list[str], list[int]]:
    """``n`` emails of made-up words whose lengths follow SpamAssassin's shape.

    Word counts are log-normal with a median of 230 words (~300 tokens, the corpus
    median quoted in configs/experiments/demo.yaml) and sigma 0.9, so about 70% of
    texts exceed 192 tokens, as in the real table. Labels alternate.
    """
    import numpy as np

    rng = np.random.default_rng(seed)
    vocab = WORDS.split()
    lengths = np.clip(rng.lognormal(math.log(230), 0.9, n), 5, 4000).astype(int)
    texts = [" ".join(rng.choice(vocab, size=int(k))) for k in lengths]
    return texts, [i % 2 for i in range(n)]


DEFAULT_TABLE = REPO / "data" / "dataset.parquet"


def load_texts(
    n: int, seed: int, labels: list[str], data: str = "auto"
) -> tuple[list[str], list[int], str]:
    """Texts and label ids: ``data`` is "auto" (the SpamAssassin table, data/dataset.parquet
    in the repo root, if present, else synthetic), "synthetic", or a parquet table's path."""
    if data == "synthetic" or (data == "auto" and not DEFAULT_TABLE.is_file()):
        texts, ids = synthetic_texts(n, seed)
        return texts, ids, "synthetic (log-normal lengths, median 230 words)"
    table = DEFAULT_TABLE if data == "auto" else Path(data).resolve()
    if not table.is_file():
        raise SystemExit(f"--data {data}: no such table; give a parquet file, auto or synthetic")
    import pandas as pd

    frame = pd.read_parquet(table)
    unknown = set(frame["label"]) - set(labels)
    if unknown:
        raise SystemExit(f"--data {data}: labels {sorted(unknown)} are not {labels}")
    frame = frame.sample(n=n, random_state=seed, replace=len(frame) < n)  # n rows, always
    name = table.relative_to(REPO) if table.is_relative_to(REPO) else table
    return frame["text"].tolist(), [labels.index(x) for x in frame["label"]], f"table {name}"


# --------------------------------------------------------------------------- config


def make_config(args: argparse.Namespace):
    """The experiment config both sides train: one epoch of (warmup + steps) batches."""
    from peftflow.config.loading import parse_config

    return parse_config(
        {
            "name": "throughput",
            "seed": args.seed,
            "model": {
                "name": args.model,
                "max_length": args.max_length,
                "pretrained": not args.random_init,
            },
            "method": {"name": args.method},
            "train": {
                "epochs": 1,
                "batch_size": args.batch_size,
                "lr": args.lr,
                "precision": args.precision,
                "device": args.device,
                "progress": False,
                "checkpoint_every_steps": 0,
                "restore_best_epoch": False,
                "compile": args.compile,
            },
        }
    )


def n_examples(args: argparse.Namespace) -> int:
    return args.batch_size * (args.warmup + args.steps)


def encoded_data(cfg, tokenizer, args: argparse.Namespace):
    """The training split, tokenised once with peftflow's ``encode`` (shared by both sides)."""
    from peftflow.data.encoding import encode

    texts, labels, source = load_texts(
        n_examples(args), args.seed, list(cfg.data.labels), args.data
    )
    return encode(tokenizer, texts, labels, cfg.model.max_length), source


# --------------------------------------------------------------------- measurements


def rss_mb() -> float:
    """Current resident set size of this process, MiB (Linux /proc)."""
    with open("/proc/self/statm") as handle:
        pages = int(handle.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_memory(device) -> tuple[float, str]:
    """The peak since training started, read as the training task reads it.

    CUDA: ``max_memory_allocated`` (tensors only). CPU: the process's RSS high-water mark,
    reset when training starts (``peftflow.training.memory.reset_peak_memory``), so model loading
    and tokenisation before it are not charged to training.
    """
    from peftflow.training.memory import peak_memory_mb

    kind = "cuda_max_allocated" if device.type == "cuda" else "process_peak_rss"
    return peak_memory_mb(device), kind


def flops_per_token(method: str, n_params: int, n_trainable: int) -> float:
    """Training FLOPs per token: forward 2N; backward 2N for input grads + 2N_w weight grads.

    full: 6N. Frozen-base PEFT (LoRA): ~4N (every layer still back-propagates input
    gradients; the weight gradients are only the adapters'). last_block: the backward
    pass stops below the last block, so ~2N + 4*N_trainable. N excludes embedding
    tables (a lookup, no matmul); attention-score FLOPs are ignored.
    """
    if method == "full":
        return 6.0 * n_params
    if method in ("last_block", "last_n_blocks", "last_layer"):
        return 2.0 * n_params + 4.0 * n_trainable
    return 4.0 * n_params


def matmul_params(model) -> int:
    """Parameters outside embedding tables (the N of the 6N rule)."""
    from torch import nn

    seen, total = set(), 0
    embedding_params = {
        id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()
    }
    for param in model.parameters():
        if id(param) in seen or id(param) in embedding_params:
            continue
        seen.add(id(param))
        total += param.numel()
    return total


def peak_tflops(args: argparse.Namespace, device) -> float | None:
    """A GPU's datasheet bf16 peak; None on a CPU (its peak is measured: :func:`matmul_peak`)."""
    import torch

    if device.type != "cuda":
        return None
    if args.peak_tflops:
        return args.peak_tflops
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


def matmul_shapes(args: argparse.Namespace) -> list[tuple[int, int, int]]:
    """The microbenchmark's (m, k, n): a square 3072 and the model's own MLP up-projection
    over one full batch, [batch * max_length, hidden] @ [hidden, intermediate]."""
    from transformers import AutoConfig

    from peftflow.models.assets import resolve_model

    config = AutoConfig.from_pretrained(resolve_model(args.model).location)
    hidden = config.hidden_size
    intermediate = getattr(config, "intermediate_size", None) or 4 * hidden
    return [(3072, 3072, 3072), (args.batch_size * args.max_length, hidden, intermediate)]


def matmul_peak(shapes, device_request: str, seconds: float) -> dict[str, dict[str, float]]:
    """Achieved GFLOP/s of one dense matmul per (dtype, shape): best sustained rate over
    ``seconds`` after two untimed calls. The CPU's MFU divides by the best of a dtype."""
    import torch

    device = torch.device(
        "cuda" if device_request != "cpu" and torch.cuda.is_available() else "cpu"
    )
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    rates: dict[str, dict[str, float]] = {}
    for dtype in (torch.bfloat16, torch.float32):
        rates[str(dtype).removeprefix("torch.")] = per_shape = {}
        for m, k, n in shapes:
            a = torch.randn(m, k, dtype=dtype, device=device)
            b = torch.randn(k, n, dtype=dtype, device=device)
            for _ in range(2):
                a @ b
            sync()
            calls, start = 0, time.perf_counter()
            while calls == 0 or time.perf_counter() - start < seconds:
                a @ b
                calls += 1
                sync()
            per_shape[f"{m}x{k}@{k}x{n}"] = (
                2 * m * k * n * calls / (time.perf_counter() - start) / 1e9
            )
    return rates


def cpu_mfu(run: dict, peaks: dict[str, dict[str, float]]) -> float | None:
    """A CPU run's MFU against the best measured matmul rate of its compute dtype."""
    rates = peaks.get(run["compute_dtype"])
    if not rates:
        return None
    return run["flops_per_token"] * run["tokens_per_s"] / (max(rates.values()) * 1e9)


def finish(args, device, model, seconds, real, padded, baseline_rss, bf16: bool) -> dict:
    """The metrics of one timed run (a CPU run's MFU is filled in by :func:`main`)."""
    from peftflow.models.backbone import count_parameters

    trainable, total = count_parameters(model)
    n_matmul = matmul_params(model)
    memory, memory_kind = peak_memory(device)
    per_token = flops_per_token(args.method, n_matmul, trainable)
    peak = peak_tflops(args, device)
    tokens_per_s = real / seconds
    return {
        "seconds": seconds,
        "steps": args.steps,
        "examples": args.steps * args.batch_size,
        "real_tokens": real,
        "padded_tokens": padded,
        "tokens_per_s": tokens_per_s,
        "padded_tokens_per_s": padded / seconds,
        "examples_per_s": args.steps * args.batch_size / seconds,
        "mean_step_s": seconds / args.steps,
        "peak_memory_mb": memory,
        "memory_kind": memory_kind,
        "rss_after_imports_mb": baseline_rss,
        "params_total": total,
        "params_trainable": trainable,
        "params_matmul": n_matmul,
        "flops_per_token": per_token,
        # MFU counts the real tokens' FLOPs (padding is wasted work, not useful work).
        "mfu": per_token * tokens_per_s / (peak * 1e12) if peak else None,
        "compute_dtype": "bfloat16" if bf16 else "float32",
        "device": str(device),
        "threads": _threads(),
    }


def _threads() -> int:
    import torch

    return torch.get_num_threads()


# ----------------------------------------------------------------------- the sides


def run_ours(args: argparse.Namespace, on_step: Callable[[], None] | None = None) -> dict:
    """peftflow's loop, built as ``task.run.train_and_evaluate`` builds it; warmup untimed.

    ``on_step`` is called as each optimizer step starts (the profiler's step marks)."""
    import torch

    import peftflow  # noqa: F401  (offline switches)
    from peftflow.task.classification import classification_objective
    from peftflow.task.registry import build_for_training
    from peftflow.task.run import predicted_peak_memory_mb
    from peftflow.training.loop import train_model
    from peftflow.training.precision import autocasts

    baseline_rss = rss_mb()
    cfg = make_config(args)
    model, tokenizer, _ = build_for_training(cfg)
    predicted = predicted_peak_memory_mb(model, cfg)  # what the training task logs
    train, source = encoded_data(cfg, tokenizer, args)
    pad_id = tokenizer.pad_token_id
    val = replace(train, input_ids=train.input_ids[:1], labels=train.labels[:1])
    objective = classification_objective(train, val, cfg, pad_id)
    calls: list[tuple[float, int, int]] = []  # (start time, real, padded tokens) per micro-batch
    ended: list[float] = []

    def timed_loss(model, idx, device):
        lengths = [len(train.input_ids[i]) for i in idx]
        calls.append((time.perf_counter(), sum(lengths), max(lengths) * len(lengths)))
        if on_step:
            on_step()
        return objective.summed_loss(model, idx, device)

    def no_validation(model) -> dict[str, float]:
        if next(model.parameters()).device.type == "cuda":
            torch.cuda.synchronize()
        ended.append(time.perf_counter())  # called right after the epoch's last step
        return {"val_f1": 0.0}

    timed = replace(objective, summed_loss=timed_loss, validate=no_validation)
    train_model(model, timed, cfg, on_epoch=None)  # resets the peak-memory counter itself
    device = next(model.parameters()).device
    if len(calls) != args.warmup + args.steps:
        raise RuntimeError(f"expected {args.warmup + args.steps} micro-batches, ran {len(calls)}")
    measured = calls[args.warmup :]
    result = finish(
        args,
        device,
        model,
        ended[0] - measured[0][0],
        sum(c[1] for c in measured),
        sum(c[2] for c in measured),
        baseline_rss,
        autocasts(device, cfg.train.precision),
    )
    result["data_source"] = source
    result["epoch_real_tokens"] = train.n_tokens
    result["predicted_peak_memory_mb"] = predicted
    result["predicted_over_measured"] = predicted / result["peak_memory_mb"]
    return result


def run_trainer(args: argparse.Namespace, on_step: Callable[[], None] | None = None) -> dict:
    """Stock Trainer + peft, configured as ``--baseline`` says; warmup untimed.

    ``on_step`` is called as each optimizer step starts (the profiler's step marks)."""
    import torch
    from transformers import (
        DataCollatorWithPadding,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    import peftflow  # noqa: F401  (offline switches)
    from peftflow.models.assets import resolve_model
    from peftflow.models.backbone import load_tokenizer
    from peftflow.training.memory import reset_peak_memory

    baseline_rss = rss_mb()
    cfg = make_config(args)
    base = resolve_model(cfg.model.name, cfg.model.revision)
    tokenizer = load_tokenizer(base, cfg.model.padding_side)
    train, source = encoded_data(cfg, tokenizer, args)
    model = _stock_model(base.location, len(cfg.data.labels), args)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    model = _baseline_method(model, cfg)
    dataset = [
        {"input_ids": ids, "labels": label}
        for ids, label in zip(train.input_ids, train.labels, strict=True)
    ]
    collator = DataCollatorWithPadding(tokenizer)
    batches: list[tuple[int, int]] = []  # (real, padded tokens) in collation order

    def counting_collator(features):
        batch = collator(features)
        batches.append((int(batch["attention_mask"].sum()), batch["attention_mask"].numel()))
        return batch

    marks: list[float] = []
    bf16, grouped = BASELINES[args.baseline]

    class StepClock(TrainerCallback):
        def on_train_begin(self, targs, state, control, **kwargs):
            reset_peak_memory(targs.device)  # as our loop does when training starts

        def on_step_begin(self, targs, state, control, **kwargs):
            if on_step:
                on_step()

        def on_step_end(self, targs, state, control, **kwargs):
            if torch.cuda.is_available() and not targs.use_cpu:
                torch.cuda.synchronize()
            marks.append(time.perf_counter())

    with tempfile.TemporaryDirectory() as out_dir:
        targs = TrainingArguments(
            output_dir=out_dir,
            per_device_train_batch_size=args.batch_size,
            max_steps=args.warmup + args.steps,
            learning_rate=args.lr,
            eval_strategy="no",
            save_strategy="no",
            report_to="none",
            seed=args.seed,
            use_cpu=args.device == "cpu" or not torch.cuda.is_available(),
            bf16=bf16,
            train_sampling_strategy="group_by_length" if grouped else "random",
        )
        trainer = Trainer(
            model=model,
            args=targs,
            processing_class=tokenizer,  # the length sampler reads its input name
            train_dataset=dataset,
            data_collator=counting_collator,
            callbacks=[StepClock()],
        )
        trainer.train()
    device = next(model.parameters()).device
    if len(marks) != args.warmup + args.steps:
        raise RuntimeError(f"expected {args.warmup + args.steps} steps, Trainer ran {len(marks)}")
    # From the end of the last warm-up step (the next batch's fetch included) to the end.
    start = marks[args.warmup - 1] if args.warmup else marks[0]
    measured = batches[args.warmup : args.warmup + args.steps]
    if not args.warmup:  # no warm-up: the first step cannot be timed from its start
        raise RuntimeError("--warmup must be >= 1")
    result = finish(
        args,
        device,
        model,
        marks[-1] - start,
        sum(b[0] for b in measured),
        sum(b[1] for b in measured),
        baseline_rss,
        bf16,
    )
    result["data_source"] = source
    result["epoch_real_tokens"] = train.n_tokens
    return result


def _stock_model(location: str, num_labels: int, args: argparse.Namespace):
    """AutoModelForSequenceClassification in float32: the checkpoint, or random from its config."""
    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification

    if not args.random_init:
        return AutoModelForSequenceClassification.from_pretrained(
            location, num_labels=num_labels, dtype=torch.float32
        )
    torch.manual_seed(args.seed)
    config = AutoConfig.from_pretrained(location, num_labels=num_labels)
    return AutoModelForSequenceClassification.from_config(config, dtype=torch.float32)


def _baseline_method(model, cfg):
    """The method on the stock model: peft LoRA (SEQ_CLS), or freezing for full/last_block."""
    from peft import LoraConfig, TaskType, get_peft_model

    from peftflow.models.methods.peft_based import LORA_TARGETS

    name = cfg.method.name
    if name == "lora":
        lora = cfg.method  # LoRA settings: r, alpha, dropout
        return get_peft_model(
            model,
            LoraConfig(
                task_type=TaskType.SEQ_CLS,
                r=lora.r,
                lora_alpha=lora.alpha,
                lora_dropout=lora.dropout,
                target_modules=list(LORA_TARGETS[model.config.model_type]),
            ),
        )
    if name == "full":
        return model
    if name == "last_block":
        from peftflow.models.backbone import final_norm, transformer_blocks

        backbone = model.base_model
        for param in model.parameters():
            param.requires_grad_(False)
        trained = [transformer_blocks(backbone)[-1], final_norm(backbone), _stock_head(model)]
        for module in trained:
            if module is not None:
                module.requires_grad_(True)
        return model
    raise SystemExit(f"the baseline supports lora, full and last_block, not {name!r}")


def _stock_head(model):
    for attr in ("score", "classifier"):
        if hasattr(model, attr):
            return getattr(model, attr)
    raise SystemExit(f"no classification head found on {type(model).__name__}")


RUNNERS = {"ours": run_ours, "trainer": run_trainer}


# ------------------------------------------------------------------------ reporting


def machine_info(device_request: str) -> dict:
    import peft
    import torch
    import transformers

    from peftflow.training.allocator import loaded_allocator

    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cuda = torch.cuda.is_available() and device_request != "cpu"
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "gpu": torch.cuda.get_device_name(0) if cuda else None,
        "allocator": loaded_allocator(),
    }


def summarise(runs: list[dict]) -> dict:
    summary = {}
    for side in SIDES:
        mine = [r for r in runs if r["side"] == side]
        if not mine:
            continue
        summary[side] = {
            key: statistics.median(r[key] for r in mine) if mine[0][key] is not None else None
            for key in SUMMARY_KEYS
        }
        summary[side]["repeats"] = len(mine)
        summary[side]["real_tokens_per_run"] = mine[0]["real_tokens"]
        summary[side]["padded_tokens_per_run"] = mine[0]["padded_tokens"]
        summary[side]["params_trainable"] = mine[0]["params_trainable"]
        summary[side]["params_total"] = mine[0]["params_total"]
        if "predicted_peak_memory_mb" in mine[0]:  # ours: the estimator against the measure
            for key in ("predicted_peak_memory_mb", "predicted_over_measured"):
                summary[side][key] = statistics.median(r[key] for r in mine)
    if "ours" in summary and "trainer" in summary:
        summary["speedup_tokens_per_s"] = (
            summary["ours"]["tokens_per_s"] / summary["trainer"]["tokens_per_s"]
        )
    return summary


def _peak_line(report: dict) -> str:
    """The matmul microbenchmark's rates, the CPU's MFU denominators."""
    parts = [
        f"{dtype} {shape} {rate:.0f}"
        for dtype, shapes in report.get("matmul_gflops", {}).items()
        for shape, rate in shapes.items()
    ]
    where = (
        "the best of each dtype is the CPU's MFU peak"
        if report["machine"]["gpu"] is None
        else ("the GPU's MFU uses its datasheet peak")
    )
    return f"- matmul microbenchmark at start, GFLOP/s: {'; '.join(parts)} ({where})"


def markdown(report: dict) -> str:
    s, m, a = report["summary"], report["machine"], report["settings"]
    lines = [
        f"# Training throughput: {a['model']} / {a['method']} "
        f"(batch {a['batch_size']}, max length {a['max_length']})",
        "",
        f"- date: {report['date']}",
        f"- command: `{report['command']}`",
        f"- machine: {m['cpu']}, {m['cores']} cores ({m['torch_threads']} torch threads), "
        f"GPU: {m['gpu'] or 'none'}; torch {m['torch']}, transformers {m['transformers']}, "
        f"peft {m['peft']}; C allocator: {m.get('allocator', 'glibc')}",
        f"- load average (1 min) before/after each run: {report['load_average_range']}"
        + (" (taken under load from other processes)" if report["under_load"] else ""),
        f"- data: {report['data_source']}; {a['steps']} timed steps after {a['warmup']} "
        f"warm-up steps, median of {a['repeats']} repeats, "
        + ("all runs in one process" if a.get("in_process") else "each run in its own process")
        + ("; random weights from the config" if a.get("random_init") else ""),
        f"- precision: ours `train.precision={a['precision']}`"
        + (", `train.compile=true`" if a.get("compile") else "")
        + f"; baseline Trainer: {BASELINE_TEXT[a['baseline']]}",
        _peak_line(report),
        "",
        "| side | real tokens/s | padded tokens/s | examples/s | mean step (s) "
        "| peak memory (MiB) | MFU | trainable / total params |",
        "|---|---|---|---|---|---|---|---|",
    ]
    names = {"ours": "peftflow loop", "trainer": "transformers.Trainer + peft"}
    for side in SIDES:
        if side not in s:
            continue
        r = s[side]
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
        lines.append(
            f"| {names[side]} | {r['tokens_per_s']:.1f} | {r['padded_tokens_per_s']:.1f} "
            f"| {r['examples_per_s']:.2f} | {r['mean_step_s']:.3f} | {r['peak_memory_mb']:.0f} "
            f"| {mfu} | {r['params_trainable']:,} / {r['params_total']:,} |"
        )
    if "speedup_tokens_per_s" in s:
        lines += ["", f"Ours / baseline, real tokens/s: **{s['speedup_tokens_per_s']:.2f}x**"]
    kind = report["runs"][0]["memory_kind"]
    lines += [
        "",
        f"Peak memory: {kind}"
        + (
            " (whole process: includes Python, torch and transformers, "
            f"~{report['runs'][0]['rss_after_imports_mb']:.0f} MiB after imports)"
            if kind == "process_peak_rss"
            else ""
        )
        + ".",
    ]
    if "predicted_peak_memory_mb" in s.get("ours", {}):
        o = s["ours"]
        lines += [
            "",
            f"Memory estimator (`peftflow estimate`'s model, as the training task logs it): "
            f"predicted {o['predicted_peak_memory_mb']:.0f} MiB for our loop, measured "
            f"{o['peak_memory_mb']:.0f} MiB; predicted / measured "
            f"**{o['predicted_over_measured']:.2f}** (median of the repeats).",
        ]
    lines += [
        "",
        "Per run:",
        "",
        "| side | repeat | seconds | real tokens | padded tokens | tokens/s | load before/after |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in report["runs"]:
        lines.append(
            f"| {r['side']} | {r['repeat']} | {r['seconds']:.1f} | {r['real_tokens']} "
            f"| {r['padded_tokens']} | {r['tokens_per_s']:.1f} "
            f"| {r['load_before']:.2f} / {r['load_after']:.2f} |"
        )
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m", help="alias, hub id or local folder")
    parser.add_argument("--method", default="lora", choices=["lora", "full", "last_block"])
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=192)
    parser.add_argument("--steps", type=int, default=8, help="timed optimizer steps per run")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps before those")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--precision", default="bf16", choices=["auto", "fp32", "bf16"])
    parser.add_argument(
        "--baseline",
        default="fair",
        choices=list(BASELINES),
        help="the Trainer's settings: fair (bf16=True + group_by_length, as a user would set "
        "them), bf16 (bf16=True alone) or fp32 (TrainingArguments defaults)",
    )
    parser.add_argument(
        "--peak-seconds",
        type=float,
        default=2.0,
        help="seconds per (dtype, shape) of the matmul microbenchmark measured at start",
    )
    parser.add_argument(
        "--data",
        default="auto",
        help="auto (data/dataset.parquet if ingested, else synthetic), synthetic, or a "
        "parquet table with text and label columns",
    )
    parser.add_argument(
        "--random-init",
        action="store_true",
        help="random weights from the model's config (a folder needs only config + tokenizer): "
        "the same speed and memory, for machines the weights cannot be copied to",
    )
    parser.add_argument(
        "--compile", action="store_true", help="ours with train.compile (torch.compile)"
    )
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--peak-tflops", type=float, default=None, help="for MFU on a GPU")
    parser.add_argument("--sides", default="ours,trainer", help="comma-separated subset")
    parser.add_argument("--out", default="benchmarks/results/")
    parser.add_argument("--tag", default="", help="suffix of the result file names")
    parser.add_argument(
        "--in-process", action="store_true", help="run every side in this process (tests)"
    )
    parser.add_argument("--worker", choices=SIDES, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.warmup < 1:
        parser.error("--warmup must be at least 1 (the first step is never timed)")
    return args


def _one_run(side: str, args: argparse.Namespace, argv: list[str]) -> dict:
    if args.in_process:
        result = RUNNERS[side](args)
        _release_memory()  # the next run's peak must not include this run's leftovers
        return result
    cmd = [sys.executable, str(Path(__file__).resolve()), *argv, "--worker", side]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    if proc.returncode != 0:
        raise RuntimeError(f"{side} run failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _release_memory() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(RUNNERS[args.worker](args)))
        return {}
    sides = [s for s in args.sides.split(",") if s]
    # Before any run, on the idle machine: the peak the CPU's MFU is measured against.
    peaks = matmul_peak(matmul_shapes(args), args.device, args.peak_seconds)
    runs = []
    for repeat in range(args.repeats):
        order = sides if repeat % 2 == 0 else sides[::-1]  # alternate to spread drift
        for side in order:
            before = os.getloadavg()[0]
            result = _one_run(side, args, argv)
            after = os.getloadavg()[0]
            result.update(side=side, repeat=repeat, load_before=before, load_after=after)
            if result["mfu"] is None and result["device"] == "cpu":
                result["mfu"] = cpu_mfu(result, peaks)
            runs.append(result)
            print(f"{side} repeat {repeat}: {result['tokens_per_s']:.1f} real tokens/s", flush=True)
    loads = [r["load_before"] for r in runs] + [r["load_after"] for r in runs]
    report = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "command": "python benchmarks/train_throughput.py " + shlex.join(argv),
        "machine": machine_info(args.device),
        "matmul_gflops": peaks,
        "settings": {k: v for k, v in vars(args).items() if k not in ("worker", "out", "tag")},
        "data_source": runs[0]["data_source"],
        "load_average_range": f"{min(loads):.2f}-{max(loads):.2f}",
        # A run keeps about torch_threads cores busy itself: more than that is someone else.
        "under_load": runs[0]["load_before"] > 0.5
        or max(r["load_after"] for r in runs) > runs[0]["threads"] + 0.5,
        "runs": runs,
        "summary": summarise(runs),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{Path(args.model).name}-{args.method}-b{args.batch_size}-t{args.max_length}"
    stem += f"-{args.tag}" if args.tag else ""
    (out / f"{stem}.json").write_text(json.dumps(report, indent=2))
    (out / f"{stem}.md").write_text(markdown(report))
    print(markdown(report))
    return report


if __name__ == "__main__":
    sys.path.insert(0, str(REPO / "src"))
    from peftflow.training.allocator import reexec_under_tcmalloc

    reexec_under_tcmalloc()  # as the peftflow command does; both sides inherit the allocator
    main()
