"""Great Expectations suites for generation data: raw table, split leakage, tokenisation."""

from __future__ import annotations

import dataclasses

import pandas as pd
import pytest

from peftflow.checks.generation_raw_data import validate_generation_raw
from peftflow.checks.generation_split_leakage import validate_generation_splits
from peftflow.checks.generation_tokenisation import validate_generation_tokenisation
from peftflow.checks.report import CheckReport
from peftflow.config.sections import DataConfig, GenerationConfig, SplitConfig
from peftflow.data.prompting import (
    EncodedGeneration,
    PromptFormat,
    encode_generation,
    prompt_format,
)
from peftflow.data.split import split_generation
from tests.conftest import minilm_folder

CFG = DataConfig(max_text_chars=60, max_duplicate_fraction=0.1)
MAX_LENGTH = 48


def make_table(n: int = 40) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "id": [f"g{k:03d}" for k in range(n)],
            "prompt": [f"the body of email {k}" for k in range(n)],
            "response": [f"subject {k % 20}" for k in range(n)],
            "source": "test",
        }
    )


def result(report: CheckReport, expectation: str, column: str | None = None):
    matches = [r for r in report.results if r.expectation == expectation and r.column == column]
    assert len(matches) == 1, f"{expectation} on {column}: {matches}"
    return matches[0]


def failed_names(report: CheckReport) -> set[tuple[str, str | None]]:
    return {(r.expectation, r.column) for r in report.failed}


# --- raw data ---------------------------------------------------------------------


def test_clean_generation_table_passes():
    report = validate_generation_raw(make_table(), CFG)
    assert report.suite == "generation_raw_data"
    assert report.success, report.to_markdown()
    assert len(report.results) == 12


def test_blank_missing_and_long_values_fail_with_row_ids():
    table = make_table().astype({"prompt": object, "response": object})
    table.loc[1, "prompt"] = "  \n "
    table.loc[2, "response"] = ""
    table.loc[3, "response"] = None
    table.loc[4, "prompt"] = "x" * 61

    report = validate_generation_raw(table, CFG)

    assert result(report, "expect_column_values_to_not_match_regex", "prompt").examples == ["g001"]
    assert result(report, "expect_column_values_to_not_match_regex", "response").examples == [
        "g002"
    ]
    assert result(report, "expect_column_values_to_not_be_null", "response").examples == ["g003"]
    long = result(report, "expect_column_value_lengths_to_be_between", "prompt")
    assert long.examples == ["g004"]
    assert "data.max_text_chars" in long.fix
    assert failed_names(report) == {
        ("expect_column_values_to_not_match_regex", "prompt"),
        ("expect_column_values_to_not_match_regex", "response"),
        ("expect_column_values_to_not_be_null", "response"),
        ("expect_column_value_lengths_to_be_between", "prompt"),
    }


def test_repeated_prompts_small_tables_and_bad_ids_fail():
    table = make_table(25)
    table.loc[[5, 6, 7], "prompt"] = "The body of  EMAIL 0"
    table.loc[9, "id"] = "g000"

    report = validate_generation_raw(table, CFG)

    duplicates = result(report, "expect_column_values_to_be_null", "duplicate_of")
    assert not duplicates.success
    assert duplicates.observed["duplicate_fraction"] == pytest.approx(3 / 25)
    assert "at most 10% of rows to repeat an earlier prompt" in duplicates.description
    assert result(report, "expect_table_row_count_to_be_between").observed == 25
    assert result(report, "expect_column_values_to_be_unique", "id").examples == ["g000", "g000"]
    with pytest.raises(Exception, match="at least 30 rows"):
        report.raise_if_failed()


def test_missing_columns_fail_once_without_crashing_the_column_checks():
    table = make_table().drop(columns=["response"])

    report = validate_generation_raw(table, CFG)

    columns = result(report, "expect_table_columns_to_match_set")
    assert not columns.success
    assert "response" in columns.examples
    assert "data.prompt_column / data.response_column" in columns.fix
    assert not [r for r in report.results if r.column == "response"]


# --- split leakage ------------------------------------------------------------------


def test_split_generation_output_passes_the_leakage_suite():
    splits = split_generation(make_table(60), SplitConfig(), seed=0)
    report = validate_generation_splits(splits)
    assert report.suite == "generation_split_leakage"
    assert report.success, report.to_markdown()


def test_shared_responses_and_prompts_are_reported_as_leaks():
    splits = split_generation(make_table(60), SplitConfig(), seed=0)
    train, test = splits["train"].copy(), splits["test"].copy()
    test.loc[0, "response"] = train.loc[0, "response"].upper()
    test.loc[1, "prompt"] = "  " + train.loc[1, "prompt"]

    report = validate_generation_splits({**splits, "train": train, "test": test})

    responses = result(report, "expect_column_values_to_be_null", "response_shared_with")
    prompts = result(report, "expect_column_values_to_be_null", "prompt_shared_with")
    same_response = train["response"] == train.loc[0, "response"]
    assert set(responses.examples) == {*train.loc[same_response, "id"], test.loc[0, "id"]}
    assert set(prompts.examples) == {train.loc[1, "id"], test.loc[1, "id"]}
    assert not responses.success and not prompts.success


def test_an_empty_split_fails():
    splits = split_generation(make_table(60), SplitConfig(), seed=0)
    splits["val"] = splits["val"].iloc[0:0]

    report = validate_generation_splits(splits)

    non_empty = result(report, "expect_column_distinct_values_to_equal_set", "split")
    assert not non_empty.success
    assert non_empty.examples == ["val"]
    assert non_empty.observed["rows"]["val"] == 0


# --- tokenisation ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(minilm_folder()))


@pytest.fixture(scope="module")
def fmt(tokenizer) -> PromptFormat:
    # MiniLM has no chat template, so this is the plain one.
    return prompt_format(tokenizer, GenerationConfig(template="plain", max_response_tokens=6), 48)


def encode(tokenizer, fmt: PromptFormat, rows: dict[str, list[tuple[str, str]]]) -> dict:
    return {
        name: encode_generation(tokenizer, fmt, [p for p, _ in pairs], [r for _, r in pairs])
        for name, pairs in rows.items()
    }


SHORT = {
    "train": [("please review the budget", "budget review"), ("lunch on friday", "lunch")],
    "val": [("the build failed again on every machine we tried, so we rolled back", "build")],
    "test": [("minutes of the meeting", "minutes")],
}


def check(encoded, fmt, **overrides) -> CheckReport:
    options = dict(
        max_length=MAX_LENGTH, max_new_tokens=16, context_length=512, max_truncation_rate=0.5
    )
    return validate_generation_tokenisation(encoded, fmt, **{**options, **overrides})


def test_well_formed_examples_pass_and_report_length_stats(tokenizer, fmt):
    report = check(encode(tokenizer, fmt, SHORT), fmt)

    assert report.suite == "generation_tokenisation"
    assert report.success, report.to_markdown()
    assert len(report.results) == 6
    observed = next(r.observed for r in report.results if "token_lengths" in (r.observed or {}))
    assert set(observed["token_lengths"]) == {"train", "val", "test"}
    train = observed["token_lengths"]["train"]
    assert set(train) == {"text", "response", "prompt_response"}
    assert train["text"]["count"] == 2.0
    assert train["response"]["max"] == 2.0  # "budget review": two word pieces
    assert observed["truncation_rate"] == {"train": 0.0, "val": 0.0, "test": 0.0}
    assert observed["text_budget"] == fmt.text_budget


def test_empty_responses_fail_in_splits_with_targets(tokenizer, fmt):
    rows = {**SHORT, "val": [("the build failed again", ""), ("another body", "fine")]}

    report = check(encode(tokenizer, fmt, rows), fmt)

    empty = result(report, "expect_column_values_to_be_between", "response_tokens")
    assert not empty.success
    assert empty.examples == ["val/0"]
    assert failed_names(report) == {("expect_column_values_to_be_between", "response_tokens")}


def test_inputs_without_targets_are_not_empty_responses(tokenizer, fmt):
    encoded = encode(tokenizer, fmt, SHORT)
    encoded["test"] = encode_generation(tokenizer, fmt, ["a body to summarise"])

    report = check(encoded, fmt)

    assert result(report, "expect_column_values_to_be_between", "response_tokens").success
    assert report.success, report.to_markdown()


def test_long_texts_and_responses_report_truncation(tokenizer, fmt):
    long_text = " ".join(["word"] * (fmt.text_budget + 10))
    long_response = " ".join(["word"] * (fmt.max_response_tokens + 4))
    rows = {**SHORT, "train": [(long_text, long_response), (long_text, "short")]}

    report = check(encode(tokenizer, fmt, rows), fmt, max_truncation_rate=0.4)

    truncation = result(report, "expect_column_values_to_be_between", "text_truncation_rate")
    assert not truncation.success
    assert truncation.examples == ["train"]
    assert truncation.observed["truncation_rate"]["train"] == 1.0
    assert truncation.observed["response_truncation_rate"]["train"] == 0.5
    # Truncation keeps every example within max_length.
    assert result(report, "expect_column_values_to_be_between", "length").success


def test_over_long_examples_and_a_too_small_context_fail(tokenizer, fmt):
    encoded = encode(tokenizer, fmt, SHORT)

    report = check(encoded, fmt, max_length=12, max_new_tokens=16, context_length=20)

    too_long = result(report, "expect_column_values_to_be_between", "length")
    assert not too_long.success
    assert too_long.unexpected_count == 4
    context = result(report, "expect_column_values_to_be_between", "needed")
    assert not context.success
    assert context.observed == {
        "max_length": 12,
        "max_new_tokens": 16,
        "needed": 28,
        "context_length": 20,
    }
    assert "generation.max_new_tokens" in context.fix


def test_unknown_context_length_skips_only_that_check(tokenizer, fmt):
    report = check(encode(tokenizer, fmt, SHORT), fmt, context_length=None)
    assert report.success
    assert len(report.results) == 5
    assert not [r for r in report.results if r.column == "needed"]


def test_prompts_without_the_template_pieces_fail(tokenizer, fmt):
    encoded = encode(tokenizer, fmt, SHORT)
    val = encoded["val"]
    body = val.prompt_ids[0][len(fmt.prefix_ids) + len(fmt.instruction_ids) : -len(fmt.suffix_ids)]
    encoded["val"] = dataclasses.replace(val, prompt_ids=[body])  # no instruction, no suffix
    test = encoded["test"]
    encoded["test"] = dataclasses.replace(test, prompt_ids=[test.prompt_ids[0][:-1]])

    report = check(encoded, fmt)

    template = result(report, "expect_column_values_to_be_null", "template_problem")
    assert not template.success
    assert template.examples == ["val/0", "test/0"]
    assert template.observed["problems"] == {
        "no template prefix/instruction; no template suffix": 1,
        "no template suffix": 1,
    }


def test_a_chat_format_without_a_suffix_fails(tokenizer, fmt):
    chat = dataclasses.replace(fmt, template="chat", suffix_ids=[])
    encoded = {
        name: EncodedGeneration(
            [p[: -len(fmt.suffix_ids)] for p in enc.prompt_ids],
            enc.response_ids,
            enc.text_tokens,
            enc.response_tokens,
        )
        for name, enc in encode(tokenizer, fmt, SHORT).items()
    }

    report = check(encoded, chat)

    suffix = result(report, "expect_column_values_to_be_between", "suffix_tokens")
    assert not suffix.success
    assert suffix.observed == {"template": "chat", "suffix_tokens": 0}
    assert failed_names(report) == {("expect_column_values_to_be_between", "suffix_tokens")}
