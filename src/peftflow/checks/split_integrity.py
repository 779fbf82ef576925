"""Suite ``split_integrity`` (classification): three non-empty splits, disjoint ids, no text in
two splits, every label in every split.

Depends on: nothing in peftflow beyond checks.
"""

from __future__ import annotations

import pandas as pd

from peftflow.checks.common import (
    labels_per_split_batch,
    other_splits_with_same,
    require_split_columns,
    split_presence_checks,
    text_key,
)
from peftflow.checks.engine import Batch, Check, run_suite
from peftflow.checks.report import CheckReport


def validate_splits(splits: dict[str, pd.DataFrame]) -> CheckReport:
    """Suite ``split_integrity``: all three splits, disjoint ids, no shared text, all labels."""
    from great_expectations import expectations as gxe

    require_split_columns(splits, ("id", "text", "label"))
    rows = _split_rows(splits)
    labels = sorted(rows["label"].dropna().astype(str).unique())
    row_checks = [
        *split_presence_checks(splits),
        Check(
            gxe.ExpectColumnValuesToBeNull(
                column="shared_with",
                description="no text (ignoring case and whitespace) in more than one split",
            ),
            fix="deduplicate before splitting (split_dataset does); the listed ids leak",
        ),
    ]
    return run_suite(
        "split_integrity",
        [Batch("rows", rows, "id", row_checks), labels_per_split_batch(splits, labels)],
    )


def _split_rows(splits: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """All rows with their split and the *other* splits holding the same normalised text."""
    rows = pd.concat(
        [
            pd.DataFrame(
                {
                    "split": name,
                    "id": frame["id"].astype(str).to_numpy(),
                    "label": frame["label"].to_numpy(),
                    "text_key": frame["text"].map(text_key).to_numpy(),
                }
            )
            for name, frame in splits.items()
        ],
        ignore_index=True,
    )
    rows["shared_with"] = other_splits_with_same(rows, "text_key")
    return rows
