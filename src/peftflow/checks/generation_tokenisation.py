"""Suite ``generation_tokenisation``: prompt + response within max_length and the model's
context, text truncation, non-empty targets, the template around every prompt.

Depends on: data.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from peftflow.checks.common import describe_lengths
from peftflow.checks.engine import Batch, Check, run_suite
from peftflow.checks.report import CheckReport
from peftflow.data.prompting import EncodedGeneration, PromptFormat


def validate_generation_tokenisation(
    encoded: dict[str, EncodedGeneration],
    fmt: PromptFormat,
    *,
    max_length: int,
    max_new_tokens: int,
    context_length: int | None,
    max_truncation_rate: float,
) -> CheckReport:
    """Suite ``generation_tokenisation``: lengths, context, truncation, targets, template."""
    examples = _generation_token_table(encoded, fmt)
    with_targets = examples[examples["split"].isin(_splits_with_targets(encoded))]
    batches = [
        Batch(
            "examples",
            examples,
            "id",
            [_fits_max_length_check(examples, max_length), _template_check(examples, fmt)],
        ),
        _truncation_batch(examples, fmt, max_length, max_truncation_rate),
        Batch("targets", with_targets, "id", [_empty_response_check()]),
        _prompt_format_batch(fmt, max_length, max_new_tokens, context_length),
    ]
    return run_suite("generation_tokenisation", batches)


def _generation_token_table(
    encoded: dict[str, EncodedGeneration], fmt: PromptFormat
) -> pd.DataFrame:
    """One row per example: token counts and what is wrong with its template, if anything."""
    frames = [
        pd.DataFrame(
            {
                "split": name,
                "id": [f"{name}/{index}" for index in range(len(enc))],
                "text_tokens": np.asarray(enc.text_tokens, dtype=np.int64),
                "response_tokens": np.asarray(enc.response_tokens, dtype=np.int64),
                "length": np.asarray(enc.lengths, dtype=np.int64),
                "template_problem": pd.Series(
                    [_template_problem(ids, fmt) for ids in enc.prompt_ids], dtype=object
                ),
            }
        )
        for name, enc in encoded.items()
    ]
    columns = ["split", "id", "text_tokens", "response_tokens", "length", "template_problem"]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=columns)


def _template_problem(prompt_ids: list[int], fmt: PromptFormat) -> str | None:
    """None when the prompt is wrapped in the format's pieces, else what is missing."""
    head = fmt.prefix_ids + fmt.instruction_ids
    tail = fmt.suffix_ids
    if len(prompt_ids) < len(head) + len(tail):
        return "shorter than the template"
    problems = []
    if prompt_ids[: len(head)] != head:
        problems.append("no template prefix/instruction")
    if tail and prompt_ids[len(prompt_ids) - len(tail) :] != tail:
        problems.append("no template suffix")
    return "; ".join(problems) or None


def _splits_with_targets(encoded: dict[str, EncodedGeneration]) -> list[str]:
    return [name for name, enc in encoded.items() if any(enc.response_ids)]


def _fits_max_length_check(examples: pd.DataFrame, max_length: int) -> Check:
    from great_expectations import expectations as gxe

    longest = int(examples["length"].max()) if len(examples) else 0
    return Check(
        gxe.ExpectColumnValuesToBeBetween(
            column="length",
            max_value=max_length,
            description=f"every prompt + response to fit model.max_length={max_length} tokens",
        ),
        fix=(
            "encode with prompt_format(..., max_length=model.max_length) so prompts are cut "
            "to fit; the listed examples are too long"
        ),
        observed={"max_length": max_length, "longest": longest},
    )


def _template_check(examples: pd.DataFrame, fmt: PromptFormat) -> Check:
    from great_expectations import expectations as gxe

    problems = examples["template_problem"].dropna().value_counts().to_dict()
    return Check(
        gxe.ExpectColumnValuesToBeNull(
            column="template_problem",
            description=(
                f"every prompt to start with the {fmt.template} template's prefix and "
                "instruction and end with its suffix"
            ),
        ),
        fix=(
            "encode every split with encode_generation and the same PromptFormat; the "
            "listed prompts were built another way"
        ),
        observed={"template": fmt.template, "problems": problems},
    )


def _truncation_rates(examples: pd.DataFrame, fmt: PromptFormat) -> pd.DataFrame:
    """One row per split: the share of texts and of responses longer than their budget."""
    per_split = examples.assign(
        text_truncated=examples["text_tokens"] > fmt.text_budget,
        response_truncated=examples["response_tokens"] > fmt.max_response_tokens,
    ).groupby("split", sort=False)
    rates = per_split[["text_truncated", "response_truncated"]].mean().round(4)
    rates.columns = ["text_truncation_rate", "response_truncation_rate"]
    return rates.reset_index()


def _truncation_batch(
    examples: pd.DataFrame, fmt: PromptFormat, max_length: int, max_rate: float
) -> Batch:
    """Per-split text truncation rates against the bound; length stats ride along as observed."""
    from great_expectations import expectations as gxe

    table = _truncation_rates(examples, fmt)
    rates = table.set_index("split")
    check = Check(
        gxe.ExpectColumnValuesToBeBetween(
            column="text_truncation_rate",
            max_value=max_rate,
            description=(
                f"at most {max_rate:.0%} of texts per split to exceed the text budget of "
                f"{fmt.text_budget} tokens (longer ones lose their end to truncation)"
            ),
        ),
        fix=(
            "raise model.max_length (costs memory and time), lower "
            "generation.max_response_tokens, or raise model.max_truncation_rate; the "
            "examples are the splits over the bound"
        ),
        observed={
            "max_length": max_length,
            "text_budget": fmt.text_budget,
            "max_response_tokens": fmt.max_response_tokens,
            "truncation_rate": rates["text_truncation_rate"].to_dict(),
            "response_truncation_rate": rates["response_truncation_rate"].to_dict(),
            "token_lengths": _generation_length_stats(examples),
        },
    )
    return Batch("truncation", table, "split", [check])


def _generation_length_stats(examples: pd.DataFrame) -> dict[str, dict[str, dict[str, float]]]:
    """Per split: stats of text, response and prompt + response token counts."""
    columns = {"text": "text_tokens", "response": "response_tokens", "prompt_response": "length"}
    return {
        str(name): {
            label: describe_lengths(group[column].to_numpy()) for label, column in columns.items()
        }
        for name, group in examples.groupby("split", sort=False)
    }


def _empty_response_check() -> Check:
    from great_expectations import expectations as gxe

    return Check(
        gxe.ExpectColumnValuesToBeBetween(
            column="response_tokens",
            min_value=1,
            description="every response in splits with targets to have at least one token",
        ),
        fix=(
            "drop the listed examples or give them a response: an empty target teaches "
            "the model to stop at once"
        ),
    )


def _prompt_format_batch(
    fmt: PromptFormat, max_length: int, max_new_tokens: int, context_length: int | None
) -> Batch:
    """One row describing the format and the context a generation needs."""
    from great_expectations import expectations as gxe

    needed = max_length + max_new_tokens
    table = pd.DataFrame(
        {"template": [fmt.template], "suffix_tokens": [len(fmt.suffix_ids)], "needed": [needed]}
    )
    checks = [
        Check(
            gxe.ExpectColumnValuesToBeBetween(
                column="suffix_tokens",
                min_value=1,
                description=(
                    f"the {fmt.template} template to end every prompt with a non-empty "
                    "suffix (where the response starts), so generation starts at a known point"
                ),
            ),
            fix="use a tokenizer whose chat template has a generation prompt, or template: plain",
            observed={"template": fmt.template, "suffix_tokens": len(fmt.suffix_ids)},
        )
    ]
    if context_length is not None:
        checks.append(
            Check(
                gxe.ExpectColumnValuesToBeBetween(
                    column="needed",
                    max_value=context_length,
                    description=(
                        f"model.max_length + generation.max_new_tokens to fit the model's "
                        f"context of {context_length} tokens"
                    ),
                ),
                fix="lower model.max_length or generation.max_new_tokens",
                observed={
                    "max_length": max_length,
                    "max_new_tokens": max_new_tokens,
                    "needed": needed,
                    "context_length": context_length,
                },
            )
        )
    return Batch("prompt_format", table, None, checks)
