"""Great Expectations suites: each expectation fails on purposely bad data, reports say why."""

from __future__ import annotations

import json
import subprocess
import sys

import pandas as pd
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from peftflow.checks.raw_data import validate_raw
from peftflow.checks.report import CheckReport
from peftflow.checks.split_integrity import validate_splits
from peftflow.checks.tokenisation import token_length_stats, validate_tokenisation
from peftflow.config.sections import DataConfig, SplitConfig
from peftflow.data.split import split_dataset
from peftflow.errors import DataCheckError

CFG = DataConfig(max_text_chars=100, min_class_fraction=0.2, max_duplicate_fraction=0.1)


def make_table(n_ham: int = 14, n_spam: int = 6) -> pd.DataFrame:
    labels = ["ham"] * n_ham + ["spam"] * n_spam
    return pd.DataFrame(
        {
            "id": [f"r{k:02d}" for k in range(len(labels))],
            "text": [f"{label} hello world {k}" for k, label in enumerate(labels)],
            "label": labels,
            "subject": "subject",
            "source": "test",
        }
    )


def by_expectation(report: CheckReport, expectation: str, column: str | None = None):
    matches = [r for r in report.results if r.expectation == expectation and r.column == column]
    assert len(matches) == 1, f"{expectation} on {column}: {matches}"
    return matches[0]


def failed_names(report: CheckReport) -> set[tuple[str, str | None]]:
    return {(r.expectation, r.column) for r in report.failed}


# --- raw data ---------------------------------------------------------------------


def test_clean_table_passes_every_raw_expectation():
    report = validate_raw(make_table(), CFG)
    assert report.suite == "raw_data"
    assert report.success, report.to_markdown()
    assert len(report.results) == 12
    report.raise_if_failed()  # no exception


def test_empty_and_whitespace_text_fail_with_row_ids():
    table = make_table()
    table.loc[3, "text"] = "   \n"
    table.loc[7, "text"] = ""
    report = validate_raw(table, CFG)
    blank = by_expectation(report, "expect_column_values_to_not_match_regex", "text")
    assert not blank.success
    assert blank.unexpected_count == 2
    assert blank.unexpected_percent == pytest.approx(10.0)
    assert blank.examples == ["r03", "r07"]
    assert failed_names(report) == {("expect_column_values_to_not_match_regex", "text")}


def test_missing_and_non_string_text_fail():
    table = make_table().astype({"text": object})
    table.loc[2, "text"] = None
    table.loc[4, "text"] = 42
    report = validate_raw(table, CFG)
    assert by_expectation(report, "expect_column_values_to_not_be_null", "text").examples == ["r02"]
    assert by_expectation(report, "expect_column_values_to_be_of_type", "text").examples == ["r04"]


def test_unknown_label_fails_naming_rows_and_values():
    table = make_table()
    table.loc[[1, 5], "label"] = "eggs"
    report = validate_raw(table, CFG)
    in_set = by_expectation(report, "expect_column_values_to_be_in_set", "label")
    assert not in_set.success
    assert in_set.unexpected_count == 2
    assert in_set.examples == ["r01", "r05"]
    assert in_set.observed == [{"value": "eggs", "count": 2}]


def test_one_class_only_fails_presence_and_balance():
    report = validate_raw(make_table(n_ham=20, n_spam=0), CFG)
    present = by_expectation(report, "expect_column_distinct_values_to_contain_set", "label")
    assert not present.success
    assert present.examples == ["spam"]
    assert present.observed == {"label_counts": {"ham": 20}}
    balance = by_expectation(report, "expect_column_values_to_be_between", "fraction")
    assert not balance.success
    assert balance.examples == ["spam"]
    assert balance.observed == {"fractions": {"ham": 1.0, "spam": 0.0}}


def test_minority_class_below_min_fraction_fails():
    report = validate_raw(make_table(n_ham=18, n_spam=2), CFG)  # spam is 10% < 20%
    balance = by_expectation(report, "expect_column_values_to_be_between", "fraction")
    assert not balance.success
    assert balance.observed == {"fractions": {"ham": 0.9, "spam": 0.1}}
    assert failed_names(report) == {("expect_column_values_to_be_between", "fraction")}


def test_duplicates_over_the_bound_fail_listing_the_repeats():
    table = make_table()
    # Three rows (15%) repeat earlier texts up to case and whitespace; the bound is 10%.
    table.loc[[10, 11, 12], "text"] = [
        "HAM hello  world 0",
        " ham hello world 0",
        "ham Hello world 1",
    ]
    report = validate_raw(table, CFG)
    dupes = by_expectation(report, "expect_column_values_to_be_null", "duplicate_of")
    assert not dupes.success
    assert dupes.unexpected_count == 3
    assert dupes.examples == ["r10", "r11", "r12"]
    assert dupes.observed == {"duplicate_fraction": 0.15, "max_duplicate_fraction": 0.1}


def test_duplicates_within_the_bound_pass():
    table = make_table()
    table.loc[10, "text"] = "HAM hello world 0"  # 5% <= 10%
    dupes = by_expectation(
        validate_raw(table, CFG), "expect_column_values_to_be_null", "duplicate_of"
    )
    assert dupes.success
    assert dupes.unexpected_count == 1


def test_long_text_fails_length_bound():
    table = make_table()
    table.loc[9, "text"] = "x" * 101
    long = by_expectation(
        validate_raw(table, CFG), "expect_column_value_lengths_to_be_between", "text"
    )
    assert not long.success
    assert long.examples == ["r09"]
    # Offending values are shortened in the report.
    assert long.observed[0]["value"].endswith("…") and len(long.observed[0]["value"]) == 80


def test_repeated_ids_fail_uniqueness():
    table = make_table()
    table.loc[1, "id"] = "r00"
    unique = by_expectation(validate_raw(table, CFG), "expect_column_values_to_be_unique", "id")
    assert not unique.success
    assert unique.examples == ["r00", "r00"]


def test_empty_table_gives_a_failing_report_not_a_crash():
    report = validate_raw(make_table().iloc[:0], CFG)
    assert not report.success
    assert ("expect_table_row_count_to_be_between", None) in failed_names(report)
    assert ("expect_column_distinct_values_to_contain_set", "label") in failed_names(report)


def test_missing_columns_fail_the_schema_check_only():
    report = validate_raw(pd.DataFrame({"text": ["a b c"]}), CFG)
    schema = by_expectation(report, "expect_table_columns_to_match_set")
    assert not schema.success
    assert schema.examples == ["id", "label", "source", "subject"]
    # Column checks on absent columns are skipped instead of failing with GX errors.
    assert all(r.column in (None, "text") for r in report.results)


def test_failed_report_raises_with_fix_instructions():
    table = make_table()
    table.loc[[1, 5], "label"] = "eggs"
    report = validate_raw(table, CFG)
    with pytest.raises(DataCheckError) as err:
        report.raise_if_failed()
    message = str(err.value)
    assert message.startswith("data check suite 'raw_data' failed 1 of 12 expectations:")
    assert "expect_column_values_to_be_in_set on `label`" in message
    assert "2 offending (10.0%), e.g. r01, r05" in message
    assert "Fix: map the listed rows' labels onto data.labels" in message
    assert err.value.report == report.to_dict()
    assert err.value.report["results"][8]["examples"] == ["r01", "r05"]


def test_markdown_lists_failures_then_every_expectation():
    table = make_table()
    table.loc[3, "text"] = " "
    markdown = validate_raw(table, CFG).to_markdown()
    assert markdown.startswith("# Data checks: `raw_data` FAILED\n\n1 of 12 expectations failed.")
    fix_section = markdown.split("## What to fix")[1].split("## All expectations")[0]
    assert fix_section.strip().startswith("- expect_column_values_to_not_match_regex on `text`")
    table_rows = [line for line in markdown.splitlines() if line.startswith("| ")]
    assert len(table_rows) == 1 + 12  # header + one row per expectation
    assert sum("**FAIL**" in row for row in table_rows) == 1


def test_write_creates_json_and_markdown_without_temp_files(tmp_path):
    report = validate_raw(make_table(), CFG)
    paths = report.write(tmp_path / "reports")
    assert [p.name for p in paths] == ["raw_data.json", "raw_data.md"]
    assert json.loads(paths[0].read_text()) == report.to_dict()
    assert paths[1].read_text() == report.to_markdown()
    assert sorted(p.name for p in (tmp_path / "reports").iterdir()) == [
        "raw_data.json",
        "raw_data.md",
    ]


@pytest.mark.slow
def test_importing_checks_does_not_import_great_expectations():
    code = "import sys, peftflow.checks; print('great_expectations' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# --- split integrity ----------------------------------------------------------------


@pytest.fixture
def splits() -> dict[str, pd.DataFrame]:
    return split_dataset(make_table(n_ham=35, n_spam=15), SplitConfig(), seed=0)


def test_splits_from_split_dataset_pass_integrity(splits):
    report = validate_splits(splits)
    assert report.suite == "split_integrity"
    assert report.success, report.to_markdown()


def test_text_shared_between_train_and_test_is_leakage(splits):
    leaked_id = splits["test"]["id"].iloc[0]
    splits["test"].loc[0, "text"] = "  " + splits["train"]["text"].iloc[0].upper()
    report = validate_splits(splits)
    leak = by_expectation(report, "expect_column_values_to_be_null", "shared_with")
    assert not leak.success
    assert leak.unexpected_count == 2
    assert set(leak.examples) == {splits["train"]["id"].iloc[0], leaked_id}
    assert {item["value"] for item in leak.observed} == {"test", "train"}
    assert failed_names(report) == {("expect_column_values_to_be_null", "shared_with")}


def test_id_in_two_splits_fails(splits):
    splits["val"].loc[0, "id"] = splits["train"]["id"].iloc[0]
    unique = by_expectation(validate_splits(splits), "expect_column_values_to_be_unique", "id")
    assert not unique.success
    assert unique.examples == [splits["train"]["id"].iloc[0]] * 2


def test_label_missing_from_a_split_fails(splits):
    splits["val"] = splits["val"][splits["val"]["label"] == "ham"]
    report = validate_splits(splits)
    present = by_expectation(report, "expect_column_values_to_be_between", "rows")
    assert not present.success
    assert present.examples == ["val/spam"]
    assert present.observed["label_counts"]["val"] == {"ham": 7, "spam": 0}


def test_missing_split_fails(splits):
    del splits["val"]
    report = validate_splits(splits)
    names = by_expectation(report, "expect_column_distinct_values_to_equal_set", "split")
    assert not names.success
    assert names.examples == ["val"]


# --- tokenisation ---------------------------------------------------------------------


def make_tokenizer(pad: bool = True, padding_side: str = "right") -> PreTrainedTokenizerFast:
    """Whitespace word-level tokenizer over a toy vocab; unknown words map to [UNK]."""
    vocab = {"[UNK]": 0, "[PAD]": 1, "ham": 2, "spam": 3, "hello": 4, "world": 5}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    extra = {"pad_token": "[PAD]"} if pad else {}
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="[UNK]", padding_side=padding_side, **extra
    )


def test_token_length_stats_per_split(splits):
    splits["train"].loc[0, "text"] = "hello " * 40  # 40 tokens; every other text has 4
    stats = token_length_stats(splits, make_tokenizer())
    assert set(stats) == {"train", "val", "test"}
    assert stats["test"] == {
        "count": 10.0,
        "mean": 4.0,
        "p50": 4.0,
        "p90": 4.0,
        "p99": 4.0,
        "max": 4.0,
    }
    assert stats["train"]["max"] == 40.0
    assert stats["train"]["p50"] == 4.0


def test_tokenisation_suite_passes_for_a_good_setup(splits):
    report = validate_tokenisation(splits, make_tokenizer(), 8, "right", ("ham", "spam"))
    assert report.suite == "tokenisation"
    assert report.success, report.to_markdown()
    truncation = by_expectation(report, "expect_column_values_to_be_between", "n_tokens")
    assert truncation.observed["truncation_rate"] == {"train": 0.0, "val": 0.0, "test": 0.0}
    assert truncation.observed["token_lengths"]["val"]["p99"] == 4.0


def test_missing_pad_token_fails(splits):
    report = validate_tokenisation(splits, make_tokenizer(pad=False), 8, "right", ("ham", "spam"))
    assert failed_names(report) == {("expect_column_values_to_not_be_null", "pad_token")}
    with pytest.raises(DataCheckError, match="tokenizer.pad_token = tokenizer.eos_token"):
        report.raise_if_failed()


def test_wrong_padding_side_fails(splits):
    report = validate_tokenisation(splits, make_tokenizer(), 8, "left", ("ham", "spam"))
    side = by_expectation(report, "expect_column_values_to_be_in_set", "padding_side")
    assert not side.success
    assert side.examples == ["right"]


def test_truncation_rate_above_bound_fails(splits):
    # Every text is 4 tokens: with max_length 3 all of them would be truncated.
    report = validate_tokenisation(
        splits, make_tokenizer(), 3, "right", ("ham", "spam"), max_truncation_rate=0.5
    )
    truncation = by_expectation(report, "expect_column_values_to_be_between", "n_tokens")
    assert not truncation.success
    assert truncation.unexpected_count == 50
    assert truncation.unexpected_percent == pytest.approx(100.0)
    assert truncation.observed["truncation_rate"]["test"] == 1.0
    assert len(truncation.examples) == 5


def test_truncation_rate_within_bound_passes(splits):
    for frame in splits.values():
        frame.loc[0, "text"] = "hello " * 20
    report = validate_tokenisation(splits, make_tokenizer(), 8, "right", ("ham", "spam"), 0.1)
    truncation = by_expectation(report, "expect_column_values_to_be_between", "n_tokens")
    assert truncation.success
    assert truncation.unexpected_count == 3


def test_tokenisation_reports_labels_missing_from_a_split(splits):
    report = validate_tokenisation(splits, make_tokenizer(), 8, "right", ("ham", "spam", "eggs"))
    present = by_expectation(report, "expect_column_values_to_be_between", "rows")
    assert not present.success
    assert present.examples == ["train/eggs", "val/eggs", "test/eggs"]
