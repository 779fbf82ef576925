"""Building blocks several suites share: text keys, duplicates, split presence, length stats.

Depends on: config, data.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from peftflow.checks.engine import Batch, Check
from peftflow.config import DataConfig
from peftflow.data.split import SPLITS, normalise_text
from peftflow.errors import DataError


def text_key(text: Any) -> str | None:
    return normalise_text(text) if isinstance(text, str) else None


def duplicates_batch(df: pd.DataFrame, cfg: DataConfig, column: str = "text") -> Batch:
    """Each row with the id of the earlier row (by id) whose normalised ``column`` it repeats."""
    from great_expectations import expectations as gxe

    table = duplicate_table(df, column)
    fraction = float(table["duplicate_of"].notna().mean()) if len(table) else 0.0
    check = Check(
        gxe.ExpectColumnValuesToBeNull(
            column="duplicate_of",
            mostly=1.0 - cfg.max_duplicate_fraction,
            description=(
                f"at most {cfg.max_duplicate_fraction:.0%} of rows to repeat an earlier {column} "
                "(ignoring case and whitespace)"
            ),
        ),
        fix=(
            "remove the repeated rows at the source (the examples are repeats), or raise "
            "data.max_duplicate_fraction; splitting drops duplicates either way"
        ),
        observed={
            "duplicate_fraction": round(fraction, 4),
            "max_duplicate_fraction": cfg.max_duplicate_fraction,
        },
    )
    return Batch("duplicates", table, "id", [check])


def duplicate_table(df: pd.DataFrame, column: str = "text") -> pd.DataFrame:
    ordered = pd.DataFrame({"id": df["id"].astype(str), "value": df[column]}).sort_values(
        "id", kind="stable"
    )
    key = ordered["value"].map(text_key)
    first_id = ordered.groupby(key)["id"].transform("first")
    repeats = key.notna() & key.duplicated(keep="first")
    return pd.DataFrame({"id": ordered["id"], "duplicate_of": first_id.where(repeats)}).reset_index(
        drop=True
    )


def require_split_columns(splits: dict[str, pd.DataFrame], columns: Sequence[str]) -> None:
    for name, frame in splits.items():
        missing = [c for c in columns if c not in frame.columns]
        if missing:
            raise DataError(
                f"split {name!r} lacks column(s) {missing}; pass the frames split_dataset returns"
            )


def other_splits_with_same(rows: pd.DataFrame, key_column: str) -> list[str | None]:
    """Per row: the other splits (comma-joined) holding the same ``key_column`` value, or None."""
    splits_by_key = rows.dropna(subset=[key_column]).groupby(key_column)["split"].agg(frozenset)
    return [
        ", ".join(sorted(splits_by_key.get(key, frozenset()) - {own})) or None
        for key, own in zip(rows[key_column], rows["split"], strict=True)
    ]


def split_presence_checks(splits: dict[str, pd.DataFrame]) -> list[Check]:
    """All three splits non-empty, and every id in exactly one of them (both task suites)."""
    from great_expectations import expectations as gxe

    return [
        Check(
            gxe.ExpectColumnDistinctValuesToEqualSet(
                column="split",
                value_set=list(SPLITS),
                description=f"non-empty splits {list(SPLITS)}",
            ),
            fix="re-run the split step: a split is missing or empty",
            observed={"rows": {name: len(frame) for name, frame in splits.items()}},
        ),
        Check(
            gxe.ExpectColumnValuesToBeUnique(
                column="id", description="every id in exactly one split"
            ),
            fix="re-run the split step on a table with unique ids; the listed ids repeat",
        ),
    ]


def labels_per_split_batch(splits: dict[str, pd.DataFrame], labels: Sequence[str]) -> Batch:
    """One row per (split, label) with its row count; every count must be >= 1."""
    from great_expectations import expectations as gxe

    counts = {
        name: {label: int((frame["label"] == label).sum()) for label in labels}
        for name, frame in splits.items()
    }
    table = pd.DataFrame(
        [
            {"split_label": f"{name}/{label}", "rows": n}
            for name, per_label in counts.items()
            for label, n in per_label.items()
        ],
        columns=["split_label", "rows"],
    )
    check = Check(
        gxe.ExpectColumnValuesToBeBetween(
            column="rows", min_value=1, description=f"each of {list(labels)} in every split"
        ),
        fix="add examples of the listed labels (split/label) or use larger val/test fractions",
        observed={"label_counts": counts},
    )
    return Batch("labels_per_split", table, "split_label", [check])


def describe_lengths(values: np.ndarray) -> dict[str, float]:
    """count, mean, p50/p90/p99 and max of a non-empty array of token counts."""
    p50, p90, p99 = np.percentile(values, [50, 90, 99])
    return {
        "count": float(len(values)),
        "mean": round(float(values.mean()), 2),
        "p50": float(p50),
        "p90": float(p90),
        "p99": float(p99),
        "max": float(values.max()),
    }


def text_column_checks(column: str, why_empty_is_bad: str) -> list[Check]:
    """Present, a string and not blank: the same three checks for texts, prompts, responses."""
    from great_expectations import expectations as gxe

    return [
        Check(
            gxe.ExpectColumnValuesToNotBeNull(
                column=column, description=f"every row to have a {column}"
            ),
            fix=f"drop the listed rows or fill in their {column}",
        ),
        Check(
            gxe.ExpectColumnValuesToBeOfType(
                column=column, type_="str", description=f"every {column} to be a string"
            ),
            fix=f"convert the listed rows' {column} to strings in the ingestion step",
        ),
        Check(
            gxe.ExpectColumnValuesToNotMatchRegex(
                column=column,
                regex=r"^\s*$",
                description=f"no {column} to be empty or only whitespace",
            ),
            fix=f"drop the listed rows: {why_empty_is_bad}",
        ),
    ]
