"""Peak memory step by step on a CPU: the estimate against the process's RSS, per step.

Builds the model as the training task does (``task.registry.build_for_training``, frozen weights
stored for autocast), then runs forward / backward / AdamW steps on random ids at the full
width (B x T, the batch the estimate sizes) and prints, after each step, the RSS, its
high-water mark since training started, the bytes autograd saved for the backward pass
(``estimate.SavedTensorMeter``) and the step time. Run it under different C allocators to
see what they do to the RSS (docs/memory.md):

    .venv/bin/python benchmarks/memory_steps.py --model minilm --method full --steps 14
    PEFTFLOW_ALLOCATOR=system .venv/bin/python benchmarks/memory_steps.py ...   # glibc
    PEFTFLOW_ALLOCATOR=system MALLOC_MMAP_THRESHOLD_=1048576 .venv/bin/python ...  # live memory
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="minilm", help="alias, hub id or local folder")
    parser.add_argument("--method", default="full")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=192)
    parser.add_argument("--precision", default="bf16", choices=["fp32", "bf16"])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--json", dest="json_path", help="also write the rows here")
    return parser.parse_args(argv)


def build(args: argparse.Namespace):
    """Model, optimizer and the training task's prediction, as the training task builds them."""
    import torch

    from peftflow.config.loading import parse_config
    from peftflow.task.registry import build_for_training
    from peftflow.task.run import predicted_peak_memory_mb
    from peftflow.training.loop import make_optimizer
    from peftflow.training.precision import store_frozen_weights_for_autocast

    cfg = parse_config(
        {
            "name": "memory-steps",
            "model": {"name": args.model, "max_length": args.max_length},
            "method": {"name": args.method},
            "train": {"batch_size": args.batch_size, "precision": args.precision, "device": "cpu"},
        }
    )
    model, _, _ = build_for_training(cfg)
    predicted = predicted_peak_memory_mb(model, cfg)
    cpu = torch.device("cpu")
    store_frozen_weights_for_autocast(model, cpu, args.precision)
    return model, make_optimizer(model, cfg.train, cpu), predicted, len(cfg.data.labels)


def one_step(model, optimizer, args: argparse.Namespace, labels: int) -> tuple[float, int]:
    """Forward (saved tensors metered) + backward + AdamW on random ids [B, T]; (seconds, bytes)."""
    import torch

    from peftflow.training.estimate import SavedTensorMeter
    from peftflow.training.precision import autocast

    ids = torch.randint(5, 1000, (args.batch_size, args.max_length))
    started = time.perf_counter()
    with SavedTensorMeter(model) as meter, autocast(torch.device("cpu"), args.precision):
        logits = model(ids, torch.ones_like(ids))  # [B, labels]
    target = torch.randint(0, labels, (args.batch_size,))
    torch.nn.functional.cross_entropy(logits.float(), target).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - started, meter.bytes


def main(argv: list[str] | None = None) -> list[dict]:
    import torch

    from benchmarks.train_throughput import rss_mb
    from peftflow.training.allocator import loaded_allocator
    from peftflow.training.memory import peak_memory_mb, reset_peak_memory

    args = parse_args(argv)
    model, optimizer, predicted, labels = build(args)
    model.train()
    print(f"allocator {loaded_allocator()}; predicted peak {predicted:.0f} MiB", flush=True)
    reset_peak_memory(torch.device("cpu"))
    rows = []
    for step in range(args.steps):
        seconds, saved = one_step(model, optimizer, args, labels)
        row = {
            "step": step,
            "rss_mb": rss_mb(),
            "peak_rss_mb": peak_memory_mb(torch.device("cpu")),
            "saved_activations_mb": saved / 2**20,
            "seconds": seconds,
        }
        rows.append(row)
        print(json.dumps({k: round(v, 2) for k, v in row.items()}), flush=True)
    if args.json_path:
        report = {"settings": vars(args), "allocator": loaded_allocator()}
        report.update(predicted_mb=predicted, steps=rows)
        Path(args.json_path).write_text(json.dumps(report, indent=2))
    return rows


if __name__ == "__main__":
    sys.path[:0] = [str(REPO / "src"), str(REPO)]
    from peftflow.training.allocator import reexec_under_tcmalloc

    reexec_under_tcmalloc()
    main()
