"""Studies: config validation, variant expansion, the report, and one nested sweep end to end."""

from __future__ import annotations

import dataclasses
import json
import subprocess
from pathlib import Path
from typing import ClassVar

import pytest
import yaml
from typer.testing import CliRunner

from peftflow.cli.main import app
from peftflow.config.methods import IA3Settings
from peftflow.errors import ConfigError
from peftflow.models.methods.registry import METHODS
from peftflow.pipeline.study import REPORT_METRICS, describe_overrides, load_study, plan_study
from peftflow.reporting.study_report import (
    PLOT_VS_TIME,
    PLOT_VS_TRAINABLE,
    ReportHeader,
    methods_table,
    questions_table,
    write_report,
)
from tests.conftest import synthetic_spam_table

ROOT = Path(__file__).resolve().parents[2]
STUDIES = sorted((ROOT / "configs" / "studies").glob("*.yaml"))
SEVEN_QUESTIONS = (
    "Must all layers train?",
    "Last or first token?",
    "BERT-style vs GPT-style?",
    "Disable the causal mask?",
    "Larger model?",
    "What does LoRA buy?",
    "Pad or not?",
)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_study(folder: Path, study: dict, base: dict | None = None) -> Path:
    """A base experiment and a study pointing at it (relative path, as shipped studies do)."""
    folder.mkdir(parents=True, exist_ok=True)
    base = base or {"name": "base", "model": {"name": "minilm", "max_length": 64}}
    (folder / "base.yaml").write_text(yaml.safe_dump(base))
    path = folder / "study.yaml"
    path.write_text(yaml.safe_dump({"name": "s", "base": "base.yaml", **study}))
    return path


def study_project(tmp_path: Path) -> tuple[Path, str]:
    """A git project holding a 240-row spam table, and its SQLite tracking URI."""
    root = tmp_path / "project"
    root.mkdir()
    subprocess.run(["git", "init", "-q", str(root)], check=True)
    synthetic_spam_table(240)[["text", "label"]].to_csv(root / "messages.csv", index=False)
    return root, f"sqlite:///{root / 'mlflow.db'}"


def variant(name: str, question: str | list[str], **overrides) -> dict:
    return {"name": name, "question": question, "overrides": overrides}


# --- shipped studies ---------------------------------------------------------------------


def test_studies_are_shipped():
    shipped = {p.name for p in STUDIES}
    assert shipped >= {"seven_questions.yaml", "seven_questions_full.yaml", "methods.yaml"}


@pytest.mark.parametrize("path", STUDIES, ids=lambda p: p.name)
def test_every_shipped_study_validates_every_variant(path, monkeypatch):
    # The full study names a hub model: the checks read its config.json, which this
    # offline machine cannot fetch, so it is served with SmolLM2-360M's real values.
    import peftflow.models.facts

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    hub_config = {"model_type": "llama", "max_position_embeddings": 8192, "attention_bias": False}
    monkeypatch.setattr(peftflow.models.facts, "_model_config", lambda loc, rev: hub_config)
    plan = plan_study(path)
    assert all(v.config.name.startswith(f"{plan.study.name}-") for v in plan.variants)
    if plan.study.all_methods:
        in_table = {v.config.method.name for v in plan.variants if v.in_methods_table}
        assert in_table | set(plan.skipped_methods) == set(METHODS)
        return
    # Each question is asked by variants, or listed with a note saying why it is not.
    asked = {q for v in plan.variants for q in v.questions}
    explained = {q.question for q in plan.study.questions if q.note and not q.compare}
    assert set(SEVEN_QUESTIONS) <= asked | explained
    for question in plan.study.questions:
        for name in {n for pair in question.compare for n in pair}:
            asking = next(v for v in plan.variants if v.group == name)
            assert question.question in asking.questions


def test_cpu_study_budget_can_answer_with_three_seeds():
    """Issue 19's floor: 2,000 emails at 128+ tokens for encoders, 3 seeds, one split."""
    plan = plan_study(ROOT / "configs" / "studies" / "seven_questions.yaml")
    assert len(plan.study.seeds) >= 3 and plan.study.isolate
    for study_variant in plan.variants:
        cfg = study_variant.config
        assert cfg.data.split.max_train_examples == 2000 and cfg.train.epochs == 1
        assert cfg.train.seed in plan.study.seeds
        if cfg.model.name == "minilm":
            assert cfg.model.max_length >= 128 and cfg.train.max_examples is None
    groups = {v.group for v in plan.variants}
    assert all(sum(v.group == g for v in plan.variants) == 3 for g in groups)


def test_hub_only_variant_is_refused_offline_by_name(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError, match="variant 'smollm2-360m-lora-last-seed1'.*HF_HUB_OFFLINE"):
        plan_study(ROOT / "configs" / "studies" / "seven_questions_full.yaml")


# --- validation ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("study", "message"),
    [
        ({"variants": [variant("a", "q")], "budgett": {}}, "budgett: unknown field"),
        ({}, "needs `variants` or `all_methods: true`"),
        ({"variants": [variant("a", "q"), variant("a", "r")]}, "repeated: ['a']"),
        ({"all_methods": True, "method_overrides": {"lorra": {}}}, "unknown methods ['lorra']"),
        ({"variants": [{"name": "a", "question": ""}]}, "needs a non-empty `question`"),
        ({"variants": [{"name": "bad name", "question": "q"}]}, "variants.0.name"),
    ],
)
def test_invalid_study_names_the_problem(tmp_path, study, message):
    path = write_study(tmp_path, study)
    with pytest.raises(ConfigError, match="invalid study config") as err:
        load_study(path)
    assert message in str(err.value)


def test_bad_variant_fails_the_study_up_front_naming_it(tmp_path):
    path = write_study(
        tmp_path, {"variants": [variant("ok", "q"), variant("typo", "q", **{"train.lr": -1})]}
    )
    with pytest.raises(ConfigError) as err:
        plan_study(path)
    text = str(err.value)
    assert "variant 'typo'" in text and "train.lr" in text and "-1" in text


def test_variant_may_not_change_the_shared_split(tmp_path):
    changed = variant("b", "q", **{"data.split.test_fraction": 0.3})
    path = write_study(tmp_path, {"variants": [variant("a", "q"), changed]})
    with pytest.raises(ConfigError, match="variant 'b' changes `data`.*`budget`"):
        plan_study(path)


def test_two_variants_with_one_config_are_refused(tmp_path):
    same = {"method.name": "lora"}
    variants = [variant("a", "q", **same), variant("b", "r", **same)]
    path = write_study(tmp_path, {"variants": variants})
    with pytest.raises(ConfigError, match="'a' and 'b' are the same run.*list both questions"):
        plan_study(path)


def test_missing_base_is_reported(tmp_path):
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump({"name": "s", "base": "nope.yaml", "all_methods": True}))
    with pytest.raises(ConfigError, match="base experiment .*nope.yaml does not exist"):
        plan_study(path)


# --- expansion ----------------------------------------------------------------------------


def test_overrides_layer_base_budget_method_and_variant(tmp_path):
    study = {
        "budget": {"train.epochs": 1, "train.lr": 1e-5, "model": {"max_length": 32}},
        "method_overrides": {"lora": {"train.lr": 1e-3, "train.batch_size": 4}},
        "variants": [
            variant("head", "q", **{"method.name": "last_layer"}),
            variant("lora", "q", **{"method.name": "lora", "train.batch_size": 2}),
            {"name": "first", "question": ["q", "r"], "overrides": {"model": {"pooling": "first"}}},
        ],
    }
    plan = plan_study(write_study(tmp_path, study))
    head, lora, first = (v.config for v in plan.variants)
    assert (head.name, head.train.epochs, head.train.lr, head.model.max_length) == (
        "s-head",
        1,
        1e-5,
        32,
    )
    assert (lora.train.lr, lora.train.batch_size) == (1e-3, 2)  # the variant's own value wins
    # A nested section changes one field, not the whole section.
    assert (first.model.pooling, first.model.max_length) == ("first", 32)
    assert first.model.name == "minilm"
    assert plan.variants[2].questions == ("q", "r")
    assert plan.variants[1].overrides == {"method.name": "lora", "train.batch_size": 2}


def test_all_methods_adds_each_method_once_and_reuses_explicit_twins(tmp_path, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)

    class DecoderOnlyIA3(IA3Settings):  # as if IA3 applied to decoders only
        model_families: ClassVar[frozenset[str]] = frozenset({"decoder"})

    monkeypatch.setitem(
        METHODS, "ia3", dataclasses.replace(METHODS["ia3"], settings=DecoderOnlyIA3)
    )
    study = {"all_methods": True, "variants": [variant("mine", "q", **{"method.name": "lora"})]}
    plan = plan_study(write_study(tmp_path, study))

    names = [v.name for v in plan.variants]
    assert names[0] == "mine" and "method-lora" not in names  # same config: not trained twice
    assert plan.variants[0].in_methods_table
    cuda_only = {m for m, s in METHODS.items() if s.requires_cuda}
    expected = set(METHODS) - {"lora", "ia3"} - cuda_only
    assert {v.config.method.name for v in plan.variants[1:]} == expected
    assert all(v.in_methods_table and v.questions == () for v in plan.variants[1:])
    assert plan.skipped_methods["ia3"] == "does not apply to encoder models"
    assert all(plan.skipped_methods[m] == "needs a CUDA GPU" for m in cuda_only)


def test_settings_column_names_each_override_and_shortens_model_folders():
    overrides = {"model.name": "/tmp/models/llama", "model.causal_mask": False, "train.lr": 0.001}
    assert describe_overrides(overrides) == (
        "model.name=llama, model.causal_mask=false, train.lr=0.001"
    )


# --- report --------------------------------------------------------------------------------


def result(name, questions, f1, share, seconds, methods=False, **extra) -> dict:
    row = {
        "variant": name,
        "questions": questions,
        "in_methods_table": methods,
        "note": "",
        "settings": "",
        "model": "minilm",
        "method": name.split("-")[-1],
        "run_id": f"{name:0<32}",
        "status": "trained",
        "error": "",
        "test_accuracy": f1 + 0.01,
        "test_f1": f1,
        "trainable_percent": share,
        "trainable_params": share * 1000,
        "train_seconds": seconds,
        "train_examples_per_second": 500 / seconds,
        "peak_memory_mb": 1500.0,
    }
    return {**row, **extra}


RESULTS = [
    result("minilm-full", ["Must all layers train?", "What does LoRA buy?"], 0.95, 100.0, 60.0),
    result("minilm-head", ["Must all layers train?"], 0.80, 0.01, 20.0, methods=True),
    result("minilm-lora", ["What does LoRA buy?"], 0.9375, 1.25, 40.0, methods=True),
    {
        **result("method-ia3", [], 0.0, 0.1, 1.0, methods=True),
        **dict.fromkeys(REPORT_METRICS),
        "status": "failed",
        "error": "TrainingError: loss | nan",
    },
]
BASELINE = {
    "variant": "tfidf-logreg",
    "method": "TF-IDF + logistic regression",
    "run_id": "b" * 32,
    "status": "trained",
    "test_accuracy": 0.98,
    "test_f1": 0.97,
    "train_seconds": 11.0,
}


def test_questions_table_groups_rows_and_ends_with_the_baseline():
    lines = questions_table(RESULTS, BASELINE)
    body = lines[2:]
    assert [line.split("|")[2].strip() for line in body] == [
        "minilm-full",
        "minilm-head",
        "minilm-full",
        "minilm-lora",
        "tfidf-logreg",
    ]
    assert body[0].startswith("| **Must all layers train?** | minilm-full")
    assert body[2].startswith("| **What does LoRA buy?** | minilm-full")
    assert "| 93.75% |" in body[3] and "| 1.25% |" in body[3] and "| 40.0 s |" in body[3]
    assert "| 12.5 |" in body[3] and "| 1,500 MB |" in body[3]
    assert "| 97.00% |" in body[4] and "| 11.0 s |" in body[4]


def test_methods_table_lists_only_method_rows_and_shows_failures():
    body = methods_table(RESULTS, BASELINE)[2:]
    assert [line.split("|")[2].strip() for line in body] == [
        "minilm-head",
        "minilm-lora",
        "method-ia3",
        "tfidf-logreg",
    ]
    assert "failed: TrainingError: loss \\| nan" in body[2] and "| — |" in body[2]


def test_report_files_answers_header_and_plots(tmp_path):
    header = ReportHeader(
        study="demo-study",
        command="peftflow study configs/studies/x.yaml",
        description="Why we ran it.",
        budget={"train.epochs": 1},
        skipped_methods={"qlora": "needs a CUDA GPU"},
    )
    paths = write_report(header, RESULTS, BASELINE, tmp_path / "out")
    names = {p.name for p in paths}
    assert names == {"report.md", "results.json", PLOT_VS_TRAINABLE, PLOT_VS_TIME}

    report = (tmp_path / "out" / "report.md").read_text()
    assert report.startswith("# Study `demo-study`\n\nWhy we ran it.")
    assert "Command: `peftflow study configs/studies/x.yaml`" in report
    assert f"{header.machine['cpu_count']} CPUs" in report and "torch" in report
    assert "`train.epochs=1`" in report and "`qlora` (needs a CUDA GPU)" in report
    assert "## Table 1" in report and "## Table 2" in report
    assert (
        "**What does LoRA buy?** best `minilm-full` (test F1 95.00%, trainable 100%), "
        "worst `minilm-lora` (93.75%): a gap of 1.25 F1 points." in report
    )
    assert f"]({PLOT_VS_TRAINABLE})" in report

    for plot in (PLOT_VS_TRAINABLE, PLOT_VS_TIME):
        data = (tmp_path / "out" / plot).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5_000
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved["results"] == RESULTS and saved["baseline"] == BASELINE


# --- command line --------------------------------------------------------------------------


def test_cli_dry_run_lists_variants_and_trains_nothing(tmp_path):
    path = write_study(tmp_path, {"variants": [variant("a", "Pad or not?")]})
    result = CliRunner().invoke(app, ["study", str(path), "--dry-run", "--root", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "study s: 1 variants, all valid" in result.output and "Pad or not?" in result.output
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "reports").exists()


def test_cli_bad_study_exits_2_naming_the_field(tmp_path):
    path = write_study(tmp_path, {"variants": [variant("a", "q")], "extra": 1})
    result = CliRunner().invoke(app, ["study", str(path)])
    assert result.exit_code == 2
    assert "extra: unknown field" in result.output


# --- end to end ------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.server
def test_study_nests_variant_runs_and_logs_the_report(prefect_server, tiny_models, tmp_path):
    from mlflow.tracking import MlflowClient

    from flows.study import study

    root, uri = study_project(tmp_path)
    base = {
        "name": "base",
        "seed": 3,
        "data": {"source": "table", "path": str(root / "messages.csv"), "min_class_fraction": 0.1},
        "model": {"name": str(tiny_models["llama"]), "max_length": 48},
        "method": {"name": "lora", "r": 4, "alpha": 8},
        "train": {"epochs": 2, "batch_size": 16, "lr": 5e-3, "progress": False},
        "tracking": {"experiment": "study-it", "tracking_uri": uri, "register_model": False},
    }
    plan = {
        "name": "tiny",
        "budget": {"data.split.max_train_examples": 120},
        "variants": [
            variant(
                "llama-last",
                ["Last or first token?", "BERT-style vs GPT-style?"],
                **{"model.pooling": "last"},
            ),
            variant("llama-first", "Last or first token?", **{"model.pooling": "first"}),
            variant(
                "bert",
                "BERT-style vs GPT-style?",
                **{"model.name": str(tiny_models["bert"]), "method.name": "full"},
            ),
        ],
    }
    study_path = write_study(tmp_path / "configs", plan, base)

    summary = study(study_path=str(study_path), root=str(root), command="peftflow study x")

    assert summary.failed == [] and [r["status"] for r in summary.results] == ["trained"] * 3
    client = MlflowClient(uri)
    parent = client.get_run(summary.parent_run_id)
    assert parent.data.tags["peftflow.kind"] == "study" and parent.info.status == "FINISHED"
    children = client.search_runs(
        [parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'"
    )
    assert {run.info.run_name for run in children} == {
        "tiny-llama-last",
        "tiny-llama-first",
        "tiny-bert",
        "baseline-tfidf-logreg",
    }
    logged = {a.path for a in client.list_artifacts(parent.info.run_id, "report")}
    assert {"report/report.md", f"report/{PLOT_VS_TRAINABLE}", f"report/{PLOT_VS_TIME}"} <= logged

    report = (root / "reports" / "tiny" / "report.md").read_text()
    assert "Command: `peftflow study x`" in report
    for name in ("llama-last", "llama-first", "bert", "tfidf-logreg"):
        assert f"| {name} |" in report
    by_name = {row["variant"]: row for row in summary.results}
    assert by_name["bert"]["trainable_percent"] == pytest.approx(100.0)
    assert by_name["llama-last"]["test_f1"] is not None

    # Same study again: every variant comes from the run-key cache, nothing retrains.
    again = study(study_path=str(study_path), root=str(root), command="peftflow study x")
    assert [r["status"] for r in again.results] == ["cached"] * 3
    assert [r["run_id"] for r in again.results] == [r["run_id"] for r in summary.results]


def test_a_worker_finds_its_variant_by_name_or_is_told_the_names(tmp_path):
    from peftflow.pipeline.study import study_variant

    two = [variant("a", "q"), variant("b", "q", **{"model.pooling": "first"})]
    plan = plan_study(write_study(tmp_path, {"variants": two}))
    assert study_variant(plan, "b").config.model.pooling == "first"
    with pytest.raises(ConfigError, match=r"study s has no variant 'c' \(it has: a, b\)"):
        study_variant(plan, "c")


def test_workers_get_the_study_path_as_their_checkout_has_it(tmp_path):
    from flows.study import _as_in_checkout

    root = tmp_path / "project"
    (root / "configs").mkdir(parents=True)
    inside = root / "configs" / "s.yaml"
    assert _as_in_checkout(str(inside), root) == "configs/s.yaml"
    outside = tmp_path / "elsewhere.yaml"
    assert _as_in_checkout(str(outside), root) == str(outside)


@pytest.mark.slow
@pytest.mark.server
def test_seeded_study_isolates_runs_and_answers_each_pair(prefect_server, tiny_models, tmp_path):
    """Two seeds of two variants, each trained in its own process: the answer compares the
    pair over both seeds on the same test emails, and the baseline is compared too."""
    from flows.study import study

    root, uri = study_project(tmp_path)
    base = {
        "name": "base",
        "seed": 3,
        "data": {"source": "table", "path": str(root / "messages.csv"), "min_class_fraction": 0.1},
        "model": {"name": str(tiny_models["bert"]), "max_length": 48},
        "method": {"name": "full"},
        "train": {"epochs": 1, "batch_size": 16, "lr": 5e-3, "progress": False},
        "tracking": {"experiment": "seeded", "tracking_uri": uri, "register_model": False},
    }
    plan = {
        "name": "seeded",
        "seeds": [1, 2],
        "isolate": True,
        "reference_source": "A made-up reference.",
        "questions": [
            {"question": "Must all layers train?", "compare": [["full", "head"]]},
            {"question": "Larger model?", "note": "no pair here"},
        ],
        "variants": [
            {
                **variant("full", "Must all layers train?"),
                "reference": {"label": "all", "accuracy": 0.9},
            },
            {
                **variant("head", "Must all layers train?", **{"method.name": "last_layer"}),
                "reference": {"label": "head", "accuracy": 0.7},
            },
        ],
    }
    study_path = write_study(tmp_path / "configs", plan, base)

    summary = study(study_path=str(study_path), root=str(root), command="peftflow study s")

    assert [r["variant"] for r in summary.results] == [
        "full-seed1",
        "full-seed2",
        "head-seed1",
        "head-seed2",
    ]
    assert summary.failed == []
    by_seed = {r["variant"]: r for r in summary.results}
    # Seeds change what training draws: the two seeds of one variant differ.
    assert by_seed["full-seed1"]["run_id"] != by_seed["full-seed2"]["run_id"]
    for row in summary.results:
        assert row["predicted_peak_memory_mb"] > 0 and row["run_seconds"] > 0
    saved = json.loads((root / "reports" / "seeded" / "results.json").read_text())
    (pair,) = saved["evidence"]["questions"]
    assert (pair["a"], pair["b"], pair["seeds"]) == ("full", "head", {"full": 2, "head": 2})
    means = {v["variant"]: v["test_f1"] for v in saved["variants"]}
    assert (
        pair["a_mean"] == pytest.approx(means["full"])
        and pair["low"] <= pair["delta"] <= pair["high"]
    )
    assert pair["reference"]["delta_accuracy"] == pytest.approx(0.2) and pair["agreement"]
    assert (
        saved["evidence"]["baseline"]["b"] == "tfidf-logreg"
        and "n" in saved["evidence"]["baseline"]
    )
    report = (root / "reports" / "seeded" / "report.md").read_text()
    assert "`full` vs `head`: test F1" in report and "paired bootstrap over" in report
    assert "**Larger model?** not answered here: no pair here" in report
    assert "## The reference side by side" in report and "A made-up reference." in report
    assert "Compute: " in report and "min measured over 4 runs" in report
