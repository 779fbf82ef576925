"""Smoke test of benchmarks/train_throughput.py: both sides, 2 timed steps, a 2-layer model."""

from __future__ import annotations

import json

import pytest
from benchmarks import train_throughput as bench

RUN_FIELDS = {
    "seconds",
    "steps",
    "examples",
    "real_tokens",
    "padded_tokens",
    "tokens_per_s",
    "examples_per_s",
    "mean_step_s",
    "peak_memory_mb",
    "memory_kind",
    "params_total",
    "params_trainable",
    "flops_per_token",
    "mfu",
    "side",
    "repeat",
    "load_before",
    "load_after",
}


@pytest.mark.slow
def test_harness_times_both_sides_on_the_same_work(tiny_models, tmp_path):
    argv = [
        "--model",
        str(tiny_models["llama"]),
        "--method",
        "lora",
        "--batch-size",
        "4",
        "--max-length",
        "32",
        "--steps",
        "2",
        "--warmup",
        "1",
        "--repeats",
        "1",
        "--device",
        "cpu",
        "--in-process",
        "--data",
        "synthetic",
        "--peak-seconds",
        "0.01",
        "--out",
        str(tmp_path),
    ]
    report = bench.main(argv)
    written = json.loads((tmp_path / "llama-lora-b4-t32.json").read_text())
    assert written["summary"] == report["summary"]
    assert (tmp_path / "llama-lora-b4-t32.md").read_text().startswith("# Training throughput")
    assert written["data_source"].startswith("synthetic")
    assert written["machine"]["cores"] and written["machine"]["torch"]
    assert written["command"].startswith("python benchmarks/train_throughput.py --model")
    ours, trainer = (next(r for r in written["runs"] if r["side"] == s) for s in bench.SIDES)
    for run in (ours, trainer):
        assert run.keys() >= RUN_FIELDS
        assert run["steps"] == 2 and run["examples"] == 8
        assert run["seconds"] > 0 and run["mean_step_s"] == pytest.approx(run["seconds"] / 2)
        assert 0 < run["real_tokens"] <= run["padded_tokens"] <= 8 * 32
        assert run["memory_kind"] == "process_peak_rss"
        # On the CPU, MFU is measured against the microbenchmark's best rate of the run's dtype.
        peak = max(written["matmul_gflops"][run["compute_dtype"]].values())
        useful = run["flops_per_token"] * run["tokens_per_s"]
        assert run["mfu"] == pytest.approx(useful / peak / 1e9)
    assert ours["compute_dtype"] == trainer["compute_dtype"] == "bfloat16"  # the fair baseline
    assert written["settings"]["baseline"] == "fair"
    # Same data, same examples over the epoch; the same adapters and a 2-label head
    # (ours has a bias, LlamaForSequenceClassification's score layer has none).
    assert ours["epoch_real_tokens"] == trainer["epoch_real_tokens"]
    assert ours["params_trainable"] - trainer["params_trainable"] == 2
    # Our side records the estimator's prediction next to its measured peak.
    assert ours["predicted_peak_memory_mb"] > 0 and "predicted_peak_memory_mb" not in trainer
    ratio = ours["predicted_peak_memory_mb"] / ours["peak_memory_mb"]
    assert ours["predicted_over_measured"] == pytest.approx(ratio)
    assert "Memory estimator" in (tmp_path / "llama-lora-b4-t32.md").read_text()
    speedup = written["summary"]["speedup_tokens_per_s"]
    assert speedup == pytest.approx(ours["tokens_per_s"] / trainer["tokens_per_s"])


def test_flops_per_token_rules():
    assert bench.flops_per_token("full", 100, 100) == 600
    assert bench.flops_per_token("lora", 100, 1) == 400
    assert bench.flops_per_token("last_block", 100, 10) == 240


def test_synthetic_lengths_look_like_emails():
    texts, labels = bench.synthetic_texts(400, seed=0)
    words = sorted(len(t.split()) for t in texts)
    assert 150 < words[200] < 320  # median near 230 words
    assert sum(w > 150 for w in words) > 0.6 * len(words)  # most exceed 192 tokens
    assert set(labels) == {0, 1}


def test_data_table_is_sampled_with_its_labels_and_bad_tables_are_refused(tmp_path):
    import pandas as pd

    table = tmp_path / "emails.parquet"
    pd.DataFrame({"text": ["hello there", "win money now"], "label": ["ham", "spam"]}).to_parquet(
        table
    )
    texts, ids, source = bench.load_texts(4, 0, ["ham", "spam"], str(table))
    assert len(texts) == 4 and source == f"table {table}"
    assert all(ids[i] == ["hello there", "win money now"].index(t) for i, t in enumerate(texts))
    with pytest.raises(SystemExit, match="labels \\['spam'\\] are not \\['ham', 'other'\\]"):
        bench.load_texts(2, 0, ["ham", "other"], str(table))
    with pytest.raises(SystemExit, match="no such table"):
        bench.load_texts(2, 0, ["ham", "spam"], str(tmp_path / "missing.parquet"))


@pytest.mark.slow
def test_random_init_needs_only_config_and_tokenizer(tiny_models, tmp_path):
    """--random-init: a folder without weights trains on both sides (weights too big to copy)."""
    import shutil

    skeleton = tmp_path / "skeleton"
    skeleton.mkdir()
    for item in tiny_models["llama"].iterdir():
        if item.is_file() and not item.name.endswith((".safetensors", ".bin")):
            shutil.copy(item, skeleton / item.name)
    argv = ["--model", str(skeleton), "--method", "full", "--batch-size", "2", "--max-length"]
    argv += ["16", "--steps", "1", "--warmup", "1", "--repeats", "1", "--device", "cpu"]
    argv += ["--data", "synthetic", "--in-process", "--random-init", "--out", str(tmp_path)]
    argv += ["--peak-seconds", "0.01"]
    report = bench.main(argv)
    ours, trainer = (report["summary"][side] for side in bench.SIDES)
    assert report["settings"]["random_init"] is True
    assert ours["tokens_per_s"] > 0 and trainer["tokens_per_s"] > 0
    assert ours["params_total"] - trainer["params_total"] == 2  # our head has a bias


def test_memory_steps_reports_each_step_against_the_prediction(tiny_models, tmp_path):
    from benchmarks import memory_steps

    out = tmp_path / "steps.json"
    argv = ["--model", str(tiny_models["bert"]), "--method", "lora", "--batch-size", "4"]
    rows = memory_steps.main([*argv, "--max-length", "32", "--steps", "2", "--json", str(out)])
    assert [row["step"] for row in rows] == [0, 1]
    for row in rows:
        assert row["peak_rss_mb"] >= row["rss_mb"] * 0.99 and row["seconds"] > 0
        assert row["saved_activations_mb"] > 0  # autograd saved the batch's activations
    written = json.loads(out.read_text())
    assert written["predicted_mb"] > 0 and written["allocator"] in ("tcmalloc", "jemalloc", "glibc")
    assert written["steps"] == rows


def test_gpu_scripts_parse_and_their_wheels_are_locked():
    """benchmarks/gpu/: valid bash, and every wheel prepare.sh stages has a version in uv.lock."""
    import re
    import subprocess
    from pathlib import Path

    gpu = Path(bench.REPO, "benchmarks", "gpu")
    for script in ("prepare.sh", "run_h200.sh"):
        checked = subprocess.run(["bash", "-n", str(gpu / script)], capture_output=True, text=True)
        assert checked.returncode == 0, checked.stderr
    packages = re.search(r'PACKAGES="([^"]+)"', (gpu / "prepare.sh").read_text()).group(1).split()
    lock = Path(bench.REPO, "uv.lock").read_text()
    assert "transformers" in packages and "pydantic" in packages
    for name in packages:
        assert re.search(rf'^name = "{name}"\nversion = "[^"]+"', lock, re.M), name


@pytest.mark.slow
def test_profile_step_charges_every_op_to_a_phase_and_a_category(tiny_models, tmp_path):
    import torch
    from benchmarks import profile_step

    torch_clipping = torch.nn.utils.clip_grad_norm_
    argv = ["--model", str(tiny_models["llama"]), "--method", "lora", "--batch-size", "4"]
    argv += ["--max-length", "32", "--steps", "3", "--warmup", "1", "--device", "cpu"]
    argv += ["--data", "synthetic", "--in-process", "--out", str(tmp_path), "--tag", "t"]
    report = profile_step.main(argv)
    profile = report["profile"]
    assert profile["steps"] == 2  # the last timed step is not profiled
    phases = profile["phases"]
    # Forward, backward and the optimizer (AdamW, and the clipping marked while profiling).
    assert phases["forward"] > 0 and phases["backward"] > 0 and phases["optimizer"] > 0
    ops_ms = sum(v for k, v in phases.items() if not k.startswith("other"))
    assert sum(profile["categories"].values()) == pytest.approx(ops_ms)
    assert ops_ms + phases["other (Python, collation)"] == pytest.approx(profile["step_ms"])
    # The tiny model's matmuls are all "small" (hidden size <= SMALL_DIM): a rate from FLOPs.
    assert profile["gemm_gflops"]["small GEMMs"] > 0
    shares = [op["ms_per_step"] for op in profile["top_ops"]]
    assert shares == sorted(shares, reverse=True)
    written = json.loads((tmp_path / "llama-lora-b4-t32-t-ours.json").read_text())
    assert written["profile"] == profile
    assert (tmp_path / "llama-lora-b4-t32-t-ours.md").read_text().startswith("# One training")
    assert torch.nn.utils.clip_grad_norm_ is torch_clipping  # torch's own again afterwards


def test_clipping_is_charged_to_the_optimizer_phase():
    import torch
    from benchmarks import profile_step

    param = torch.nn.Parameter(torch.randn(8, 8))
    param.grad = torch.randn(8, 8)
    with profile_step.marked_clipping(), torch.profiler.profile() as prof:
        torch.nn.utils.clip_grad_norm_([param], 1.0)
    phases = {profile_step.phase_of(e) for e in prof.events() if e.name.startswith("aten::")}
    assert phases == {"optimizer"}
