"""Where one training step's time goes: torch.profiler over the throughput harness's runs.

Runs one side of ``benchmarks/train_throughput.py`` (the same model, data, batch and
settings; its arguments pass through) under ``torch.profiler`` and profiles the
optimizer steps after the warm-up. Every op's *self* time is charged to

- a **phase**: forward, backward (under autograd's engine), optimizer (AdamW step and
  zero_grad, gradient clipping), or other (collation, Python between ops);
- a **category** (:data:`CATEGORIES`, first match wins): large GEMMs, small GEMMs (one
  dimension at most :data:`SMALL_DIM`: LoRA factors, the label head), attention, casts
  and copies, normalisation, loss, embedding, elementwise.

GEMMs report their achieved GFLOP/s from the profiler's FLOP counts. The step's wall time
is the profiler's ``ProfilerStep`` span; what no op covers is Python and collation.

    python -m benchmarks.profile_step --side ours --model smollm2-135m --method lora \\
        --batch-size 16 --max-length 192 --out benchmarks/results/profiles

Writes ``<stem>-<side>.md`` and ``.json`` (and ``--trace`` a Chrome trace) under ``--out``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import functools
import json
import re
import shlex
import sys
from collections import defaultdict
from pathlib import Path

from benchmarks import train_throughput as bench

SMALL_DIM = 64  # a GEMM with an inner or outer dimension this small is "small" (LoRA r, 2 labels)
GEMMS = re.compile(r"^aten::(mm|addmm|bmm|baddbmm|addbmm|_addmm_activation|matmul|linear)$")
CATEGORIES = (  # (category, op-name pattern), first match wins; GEMMs are split by shape
    ("attention", re.compile(r"scaled_dot_product|flash_attention|_efficient_attention")),
    ("casts and copies", re.compile(r"^aten::(to|_to_copy|copy_|clone|contiguous)$")),
    ("normalisation", re.compile(r"layer_norm|rms_norm|rsqrt|native_batch_norm")),
    ("loss", re.compile(r"cross_entropy|log_softmax|nll_loss|_log_softmax")),
    ("embedding", re.compile(r"embedding")),
)
# torch marks the optimizer's step and zero_grad itself; gradient clipping and the total norm
# (no mark of their own) are marked while profiling by :func:`marked_clipping`.
CLIPPING = ("clip_grad_norm_", "get_total_norm")
OPTIMIZER_MARKS = ("Optimizer.step", "Optimizer.zero_grad", *CLIPPING)


def phase_of(event) -> str:
    """forward, backward or optimizer, from the event's ancestors ("other" is the step's
    time no op covers, see :func:`summarise`)."""
    node = event
    while node is not None:
        name = node.name
        if name.startswith("autograd::engine::evaluate_function"):
            return "backward"
        if name.startswith(OPTIMIZER_MARKS):
            return "optimizer"
        node = node.cpu_parent
    return "forward"


def category_of(event) -> str:
    name = event.name
    if GEMMS.match(name):
        return "small GEMMs" if _small(event) else "large GEMMs"
    for category, pattern in CATEGORIES:
        if pattern.search(name):
            return category
    return "elementwise and other ops"


def _small(event) -> bool:
    shapes = [s for s in (event.input_shapes or []) if isinstance(s, list) and len(s) >= 2]
    return any(min(s[-2:]) <= SMALL_DIM for s in shapes[:2])


def summarise(events, steps: int) -> dict:
    """Per-step milliseconds by phase and category, the top ops, and GEMM rates."""
    wall = [e.cpu_time_total for e in events if e.name.startswith("ProfilerStep")]
    by_phase, by_category, ops = defaultdict(float), defaultdict(float), defaultdict(list)
    flops = defaultdict(float)
    for event in events:
        if event.name.startswith("ProfilerStep") or not event.name.startswith("aten::"):
            continue
        ms = event.self_cpu_time_total / 1000 / steps
        phase, category = phase_of(event), category_of(event)
        by_phase[phase] += ms
        by_category[category] += ms
        ops[(event.name, category)].append(ms)
        flops[category] += (getattr(event, "flops", 0) or 0) / steps
    step_ms = sum(wall) / 1000 / max(len(wall), 1)
    by_phase["other (Python, collation)"] = step_ms - sum(by_phase.values())
    top = sorted(ops.items(), key=lambda item: -sum(item[1]))[:15]
    return {
        "steps": len(wall),
        "step_ms": step_ms,
        "phases": dict(by_phase),
        "categories": dict(sorted(by_category.items(), key=lambda kv: -kv[1])),
        "gemm_gflops": {
            c: flops[c] / (by_category[c] / 1000) / 1e9
            for c in ("large GEMMs", "small GEMMs")
            if by_category.get(c)
        },
        "top_ops": [
            {"op": name, "category": cat, "calls": len(v), "ms_per_step": sum(v)}
            for (name, cat), v in top
        ],
    }


@contextlib.contextmanager
def marked_clipping():
    """Run ``torch.nn.utils``' clipping and total-norm functions under a profiler mark of
    their own name (both sides call them through ``torch.nn.utils``), so their ops count
    as optimizer work rather than forward."""
    import torch

    originals = {name: getattr(torch.nn.utils, name) for name in CLIPPING}

    def marked(name, function):
        @functools.wraps(function)
        def wrapper(*args, **kwargs):
            with torch.profiler.record_function(name):
                return function(*args, **kwargs)

        return wrapper

    try:
        for name, function in originals.items():
            setattr(torch.nn.utils, name, marked(name, function))
        yield
    finally:
        for name, function in originals.items():
            setattr(torch.nn.utils, name, function)


def profile(args: argparse.Namespace, side: str, trace: Path | None) -> tuple[dict, dict]:
    """Run ``side`` under the profiler; its throughput metrics and the profile's summary."""
    import torch
    from torch.profiler import ProfilerActivity, schedule

    # Step marks come as each optimizer step starts; the last timed step is left out (its
    # span would end in the harness's bookkeeping), so ``steps - 1`` steps are profiled.
    plan = schedule(wait=args.warmup, warmup=1, active=args.steps - 1, repeat=1)
    activities = [ProfilerActivity.CPU]
    if torch.cuda.is_available() and args.device != "cpu":
        activities.append(ProfilerActivity.CUDA)
    with (
        marked_clipping(),
        torch.profiler.profile(
            activities=activities, schedule=plan, record_shapes=True, with_flops=True
        ) as prof,
    ):
        result = bench.RUNNERS[side](args, on_step=prof.step)
    if trace:
        prof.export_chrome_trace(str(trace))
    return result, summarise(prof.events(), args.steps - 1)


def markdown(report: dict) -> str:
    s = report["profile"]
    step = s["step_ms"]
    lines = [
        f"# One training step, profiled: {report['title']}",
        "",
        f"- date: {report['date']}; command: `{report['command']}`",
        f"- machine: {report['machine']['cpu']}, {report['machine']['cores']} cores; "
        f"torch {report['machine']['torch']}",
        f"- {s['steps']} profiled steps after the warm-up; mean step **{step:.0f} ms** "
        f"(profiled: the profiler itself adds some); {report['tokens_per_s']:.1f} real tokens/s "
        "over the run's timed steps",
        "",
        "| phase | ms per step | share |",
        "|---|---|---|",
        *[f"| {k} | {v:.0f} | {100 * v / step:.1f}% |" for k, v in s["phases"].items()],
        "",
        "| category (ops' self time) | ms per step | share | achieved GFLOP/s |",
        "|---|---|---|---|",
    ]
    for category, ms in s["categories"].items():
        rate = s["gemm_gflops"].get(category)
        lines.append(
            f"| {category} | {ms:.0f} | {100 * ms / step:.1f}% | {f'{rate:.0f}' if rate else ''} |"
        )
    lines += ["", "| top ops | category | calls per step | ms per step | share |"]
    lines += ["|---|---|---|---|---|"]
    for op in s["top_ops"]:
        lines.append(
            f"| `{op['op']}` | {op['category']} | {op['calls'] / s['steps']:.0f} "
            f"| {op['ms_per_step']:.0f} | {100 * op['ms_per_step'] / step:.1f}% |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--side", choices=bench.SIDES, default="ours")
    parser.add_argument("--trace", action="store_true", help="also write a Chrome trace")
    own, rest = parser.parse_known_args(argv)
    args = bench.parse_args([*rest, "--repeats", "1"])
    if args.steps < 2:
        parser.error("--steps must be at least 2 (the last one is not profiled)")
    stem = f"{Path(args.model).name}-{args.method}-b{args.batch_size}-t{args.max_length}"
    stem += f"-{args.tag}" if args.tag else ""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    trace = out / f"{stem}-{own.side}.trace.json" if own.trace else None
    result, summary = profile(args, own.side, trace)
    setting = (
        f"ours, train.precision={args.precision}"
        if own.side == "ours"
        else f"Trainer, {bench.BASELINE_TEXT[args.baseline]}"
    )
    report = {
        "title": f"{args.model} / {args.method}, batch {args.batch_size} x {args.max_length}, "
        f"{setting}",
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "command": "python -m benchmarks.profile_step " + shlex.join(argv),
        "machine": bench.machine_info(args.device),
        "tokens_per_s": result["tokens_per_s"],
        "profile": summary,
    }
    (out / f"{stem}-{own.side}.json").write_text(json.dumps(report, indent=2))
    (out / f"{stem}-{own.side}.md").write_text(markdown(report))
    print(markdown(report))
    return report


if __name__ == "__main__":
    from peftflow.training.allocator import reexec_under_tcmalloc

    reexec_under_tcmalloc()  # as the harness and the peftflow command do
    main()
