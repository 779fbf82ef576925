"""Suite ``generation_split_leakage``: three non-empty splits, no prompt or response in two.

Depends on: nothing in peftflow beyond checks.
"""

from __future__ import annotations

import pandas as pd

from peftflow.checks.common import (
    other_splits_with_same,
    require_split_columns,
    split_presence_checks,
    text_key,
)
from peftflow.checks.engine import Batch, Check, run_suite
from peftflow.checks.report import CheckReport


def validate_generation_splits(splits: dict[str, pd.DataFrame]) -> CheckReport:
    """Suite ``generation_split_leakage``: non-empty splits, no prompt or response shared."""
    from great_expectations import expectations as gxe

    require_split_columns(splits, ("id", "prompt", "response"))
    rows = _generation_split_rows(splits)
    checks = [
        *split_presence_checks(splits),
        Check(
            gxe.ExpectColumnValuesToBeNull(
                column="prompt_shared_with",
                description="no prompt (ignoring case and whitespace) in more than one split",
            ),
            fix="drop repeated prompts before splitting (split_generation does); the ids leak",
        ),
        Check(
            gxe.ExpectColumnValuesToBeNull(
                column="response_shared_with",
                description="no response (ignoring case and whitespace) in more than one split",
            ),
            fix=(
                "split by response groups (split_generation does) so a response seen in "
                "training is never a val/test target; the listed ids leak"
            ),
        ),
    ]
    return run_suite("generation_split_leakage", [Batch("rows", rows, "id", checks)])


def _generation_split_rows(splits: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """All rows with their split and the *other* splits sharing their prompt or response."""
    frames = [
        pd.DataFrame(
            {
                "split": name,
                "id": frame["id"].astype(str).to_numpy(),
                "prompt_key": frame["prompt"].map(text_key).to_numpy(),
                "response_key": frame["response"].map(text_key).to_numpy(),
            }
        )
        for name, frame in splits.items()
    ]
    columns = ["split", "id", "prompt_key", "response_key"]
    rows = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=columns)
    rows["prompt_shared_with"] = other_splits_with_same(rows, "prompt_key")
    rows["response_shared_with"] = other_splits_with_same(rows, "response_key")
    return rows
