"""Suite ``generation_raw_data``: columns, ids, prompts, responses, lengths, repeated prompts.

Depends on: config, data.
"""

from __future__ import annotations

import pandas as pd

from peftflow.checks.common import duplicates_batch, text_column_checks
from peftflow.checks.engine import Batch, Check, run_suite
from peftflow.checks.report import CheckReport
from peftflow.config import DataConfig
from peftflow.data.subjects import GENERATION_COLUMNS

MIN_GENERATION_ROWS = 30


def validate_generation_raw(df: pd.DataFrame, cfg: DataConfig) -> CheckReport:
    """Suite ``generation_raw_data``: columns, ids, prompts, responses, lengths, duplicates.

    Checks that need a missing column are left to the column check's failure.
    """
    present = [
        check
        for check in _generation_table_checks(cfg)
        if getattr(check.expectation, "column", None) in (None, *df.columns)
    ]
    batches = [Batch("table", df, "id" if "id" in df.columns else None, present)]
    if {"id", "prompt"} <= set(df.columns):
        batches.append(duplicates_batch(df, cfg, column="prompt"))
    return run_suite("generation_raw_data", batches)


def _generation_table_checks(cfg: DataConfig) -> list[Check]:
    from great_expectations import expectations as gxe

    return [
        Check(
            gxe.ExpectTableRowCountToBeBetween(
                min_value=MIN_GENERATION_ROWS, description=f"at least {MIN_GENERATION_ROWS} rows"
            ),
            fix="add examples: fewer rows cannot fill train, val and test usefully",
        ),
        Check(
            gxe.ExpectTableColumnsToMatchSet(
                column_set=list(GENERATION_COLUMNS),
                exact_match=False,
                description=f"the columns {', '.join(GENERATION_COLUMNS)}",
            ),
            fix=(
                "add or rename the missing columns listed in the examples (for your own "
                "table: set data.prompt_column / data.response_column and re-ingest)"
            ),
        ),
        Check(
            gxe.ExpectColumnValuesToBeUnique(column="id", description="every id to be unique"),
            fix="give every row its own id (the listed ids repeat)",
        ),
        Check(
            gxe.ExpectColumnValuesToNotBeNull(column="id", description="every row to have an id"),
            fix="give the rows without an id one (re-ingesting assigns ids)",
        ),
        *text_column_checks("prompt", "an empty prompt gives the model nothing to work from"),
        Check(
            gxe.ExpectColumnValueLengthsToBeBetween(
                column="prompt",
                max_value=cfg.max_text_chars,
                description=f"every prompt to have at most {cfg.max_text_chars} characters",
            ),
            fix="trim or drop the listed rows, or raise data.max_text_chars",
        ),
        *text_column_checks("response", "an empty target teaches the model to say nothing"),
    ]
