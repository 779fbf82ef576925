"""Suite ``raw_data`` (classification): schema, ids, texts, labels, class balance, duplicates.

Gates the ingest: a table that fails is never DVC-tracked.

Depends on: config.
"""

from __future__ import annotations

import pandas as pd

from peftflow.checks.common import duplicates_batch, text_column_checks
from peftflow.checks.engine import Batch, Check, run_suite
from peftflow.checks.report import CheckReport
from peftflow.config import DataConfig

SCHEMA_COLUMNS = ("id", "text", "label", "subject", "source")


def validate_raw(df: pd.DataFrame, cfg: DataConfig) -> CheckReport:
    """Suite ``raw_data``: schema, ids, texts, labels, class balance, duplicate share.

    Checks that need a missing column are left to the schema check's failure.
    """
    present = [
        check
        for check in _table_checks(df, cfg)
        if getattr(check.expectation, "column", None) in (None, *df.columns)
    ]
    batches = [Batch("table", df, "id" if "id" in df.columns else None, present)]
    if "label" in df.columns:
        batches.append(_label_balance_batch(df["label"], cfg))
    if {"id", "text"} <= set(df.columns):
        batches.append(duplicates_batch(df, cfg))
    return run_suite("raw_data", batches)


def _table_checks(df: pd.DataFrame, cfg: DataConfig) -> list[Check]:
    label_counts = df["label"].value_counts().to_dict() if "label" in df.columns else {}
    return [
        *_shape_checks(),
        *text_column_checks("text", "an empty text cannot be classified"),
        _text_length_check(cfg.max_text_chars),
        *_label_checks(list(cfg.labels), label_counts),
    ]


def _shape_checks() -> list[Check]:
    """Rows at all, the standard columns, one row per id."""
    from great_expectations import expectations as gxe

    return [
        Check(
            gxe.ExpectTableRowCountToBeBetween(min_value=1, description="at least one row"),
            fix="the table is empty: check the data source and the ingestion step",
        ),
        Check(
            gxe.ExpectTableColumnsToMatchSet(
                column_set=list(SCHEMA_COLUMNS),
                exact_match=False,
                description=f"the columns {', '.join(SCHEMA_COLUMNS)}",
            ),
            fix="add or rename the missing columns listed in the examples",
        ),
        Check(
            gxe.ExpectColumnValuesToBeUnique(column="id", description="every id to be unique"),
            fix="give every row its own id (the listed ids repeat)",
        ),
    ]


def _text_length_check(max_chars: int) -> Check:
    from great_expectations import expectations as gxe

    return Check(
        gxe.ExpectColumnValueLengthsToBeBetween(
            column="text",
            max_value=max_chars,
            description=f"every text to have at most {max_chars} characters",
        ),
        fix="trim or drop the listed rows, or raise data.max_text_chars",
    )


def _label_checks(labels: list[str], label_counts: dict) -> list[Check]:
    """Every row labelled, with a configured label, and every configured label present."""
    from great_expectations import expectations as gxe

    return [
        Check(
            gxe.ExpectColumnValuesToNotBeNull(
                column="label", description="every row to have a label"
            ),
            fix="label the listed rows or drop them",
        ),
        Check(
            gxe.ExpectColumnValuesToBeInSet(
                column="label", value_set=labels, description=f"every label to be one of {labels}"
            ),
            fix="map the listed rows' labels onto data.labels, or add those labels to data.labels",
        ),
        Check(
            gxe.ExpectColumnDistinctValuesToContainSet(
                column="label",
                value_set=labels,
                description=f"each of {labels} to occur at least once",
            ),
            fix="add examples of the missing labels, or remove them from data.labels",
            observed={"label_counts": label_counts},
        ),
    ]


def _label_balance_batch(labels: pd.Series, cfg: DataConfig) -> Batch:
    """One row per configured label with its share of all rows."""
    from great_expectations import expectations as gxe

    counts = labels.value_counts()
    table = pd.DataFrame({"label": list(cfg.labels)})
    table["rows"] = [int(counts.get(label, 0)) for label in cfg.labels]
    table["fraction"] = table["rows"] / len(labels) if len(labels) else 0.0
    check = Check(
        gxe.ExpectColumnValuesToBeBetween(
            column="fraction",
            min_value=cfg.min_class_fraction,
            description=f"every label to make up at least {cfg.min_class_fraction:.1%} of rows",
        ),
        fix="add examples of the listed labels, or lower data.min_class_fraction",
        observed={"fractions": dict(zip(table["label"], table["fraction"].round(4), strict=True))},
    )
    return Batch("label_balance", table, "label", [check])
