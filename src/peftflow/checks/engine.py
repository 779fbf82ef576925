"""Running checks through Great Expectations: one ephemeral context per suite, one batch per table.

Every check is a native GX expectation run against a whole-DataFrame batch.
Aggregate properties with no native expectation (class balance, duplicate share,
leakage, labels per split, truncation) are turned into a small derived table
first by the suites, so they flow through GX too and every result lands in the
same :class:`~peftflow.checks.report.CheckReport` format.

great_expectations takes ~5 s to import, so it is imported inside functions:
``import peftflow.checks`` stays cheap for the CLI and the Prefect workers.

Depends on: nothing in peftflow beyond checks.report.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from peftflow.checks.report import CheckReport, ExpectationResult

MAX_EXAMPLES = 5


_PREVIEW_CHARS = 80


@dataclass(frozen=True)
class Check:
    """A GX expectation (its ``description`` is the human sentence) and how to fix a failure."""

    expectation: Any  # a great_expectations.expectations.Expectation
    fix: str
    # Replaces GX's observed value where a derived summary says more (e.g. fractions).
    observed: Any = None


@dataclass(frozen=True)
class Batch:
    """One table and the checks run against it."""

    name: str
    frame: pd.DataFrame
    # Column whose values name offending rows in `examples` (None: report the values).
    id_column: str | None
    checks: list[Check]


def run_suite(suite: str, batches: list[Batch]) -> CheckReport:
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    # A fresh in-memory context per suite (about 20 ms): no state shared between runs.
    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False, metric_calculations=False)
    source = context.data_sources.add_pandas(suite)
    results = [result for batch in batches for result in _validate_batch(source, suite, batch)]
    return CheckReport(suite=suite, success=all(r.success for r in results), results=results)


def _validate_batch(source: Any, suite: str, batch: Batch) -> list[ExpectationResult]:
    import great_expectations as gx

    definition = source.add_dataframe_asset(batch.name).add_batch_definition_whole_dataframe(
        "whole"
    )
    gx_batch = definition.get_batch(batch_parameters={"dataframe": batch.frame})
    expectations = [check.expectation for check in batch.checks]
    outcome = gx_batch.validate(
        gx.ExpectationSuite(name=f"{suite}.{batch.name}", expectations=expectations),
        result_format=_result_format(batch.id_column),
    )
    # GX reorders results; descriptions are unique within a batch, so map them back.
    by_description = {r.expectation_config.description: r for r in outcome.results}
    return [
        _to_result(check, by_description[check.expectation.description], batch.id_column)
        for check in batch.checks
    ]


def _result_format(id_column: str | None) -> dict:
    result_format: dict = {"result_format": "SUMMARY", "partial_unexpected_count": MAX_EXAMPLES}
    if id_column:
        result_format["unexpected_index_column_names"] = [id_column]
    return result_format


def _to_result(check: Check, gx_result: Any, id_column: str | None) -> ExpectationResult:
    config = gx_result.expectation_config
    raw = dict(gx_result.result or {})
    n_missing, missing = _set_misses(raw)
    return ExpectationResult(
        expectation=config.type,
        column=config.kwargs.get("column"),
        description=config.description,
        success=bool(gx_result.success),
        unexpected_count=int(raw.get("unexpected_count", 0)) + n_missing,
        unexpected_percent=float(raw.get("unexpected_percent") or 0.0),
        examples=_jsonable(_examples(raw, id_column, missing)),
        observed=_jsonable(_observed(check, raw, _exception_message(gx_result.exception_info))),
        fix=check.fix,
    )


def _set_misses(raw: dict) -> tuple[int, list[str]]:
    """How many values a set-style expectation wanted but did not find, and which (sorted)."""
    if "partial_missing_list" in raw:
        return int(raw.get("missing_count", 0)), sorted(map(str, raw["partial_missing_list"]))
    missing = raw.get("details", {}).get("mismatched", {}).get("missing") or []
    return len(missing), sorted(map(str, missing))


def _examples(raw: dict, id_column: str | None, missing: list[str]) -> list:
    if id_column and raw.get("partial_unexpected_index_list"):
        return [row[id_column] for row in raw["partial_unexpected_index_list"]][:MAX_EXAMPLES]
    unexpected = [_preview(value) for value in raw.get("partial_unexpected_list", [])]
    return (unexpected + missing)[:MAX_EXAMPLES]


def _observed(check: Check, raw: dict, error: str | None) -> Any:
    if error:
        return {"error": error}
    if check.observed is not None:
        return check.observed
    if "observed_value" in raw:
        return raw["observed_value"]
    # Row-level expectations: the offending values and how often each occurs.
    return [
        {"value": _preview(item["value"]), "count": item["count"]}
        for item in raw.get("partial_unexpected_counts", [])
    ]


def _exception_message(info: Any) -> str | None:
    """GX nests errors per metric during suite runs; return the first message."""
    if not isinstance(info, dict):
        return None
    if "exception_message" in info:
        return info["exception_message"]
    messages = [v.get("exception_message") for v in info.values() if isinstance(v, dict)]
    return next((m for m in messages if m), None)


def _preview(value: Any) -> Any:
    if isinstance(value, str) and len(value) > _PREVIEW_CHARS:
        return value[: _PREVIEW_CHARS - 1] + "…"
    return value


def _jsonable(value: Any) -> Any:
    """Plain JSON types only (numpy scalars unwrapped, NaN/NA as None)."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset | np.ndarray):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    return None if pd.isna(value) else str(value)
