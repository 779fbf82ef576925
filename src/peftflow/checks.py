"""Great Expectations suites for raw data, split integrity and tokenisation (both tasks).

Every check is a native GX expectation run on an ephemeral context against a
whole-DataFrame batch. Aggregate properties with no native expectation (class
balance, duplicate share, leakage, labels per split, truncation) are turned
into a small derived table first, so they flow through GX too and every
result lands in the same :class:`CheckReport` format.

great_expectations takes ~5 s to import, so it is imported inside functions:
``import peftflow.checks`` stays cheap for the CLI and the Prefect workers.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from peftflow.config import DataConfig
from peftflow.data.subjects import GENERATION_COLUMNS
from peftflow.errors import DataCheckError, DataError
from peftflow.prompting import EncodedGeneration, PromptFormat
from peftflow.split import SPLITS, normalise_text

SCHEMA_COLUMNS = ("id", "text", "label", "subject", "source")
MAX_EXAMPLES = 5
_PREVIEW_CHARS = 80
_TOKENISE_BATCH = 256


# --- report -------------------------------------------------------------------


@dataclass(frozen=True)
class ExpectationResult:
    """One expectation's outcome, in words a data owner can act on."""

    expectation: str
    column: str | None
    description: str
    success: bool
    unexpected_count: int
    unexpected_percent: float
    # Ids of offending rows where the checked table has ids, else offending values.
    examples: list
    observed: Any
    fix: str

    def failure_line(self) -> str:
        where = f" on `{self.column}`" if self.column else ""
        if self.unexpected_count:
            size = f"{self.unexpected_count} offending{_percent(self.unexpected_percent)}"
        else:
            size = f"observed {_compact(self.observed)}"
        examples = f", e.g. {', '.join(map(str, self.examples))}" if self.examples else ""
        return (
            f"{self.expectation}{where}: expected {self.description}; "
            f"{size}{examples}. Fix: {self.fix}"
        )


@dataclass(frozen=True)
class CheckReport:
    """The outcome of one suite: written next to the run, raised on failure."""

    suite: str
    success: bool
    results: list[ExpectationResult]

    @property
    def failed(self) -> list[ExpectationResult]:
        return [result for result in self.results if not result.success]

    def to_dict(self) -> dict:
        return asdict(self)

    def to_markdown(self) -> str:
        verdict = "passed" if self.success else "FAILED"
        lines = [
            f"# Data checks: `{self.suite}` {verdict}",
            "",
            f"{len(self.failed)} of {len(self.results)} expectations failed.",
        ]
        if self.failed:
            lines += ["", "## What to fix", ""]
            lines += [f"- {result.failure_line()}" for result in self.failed]
        lines += ["", "## All expectations", "", _TABLE_HEADER, _TABLE_RULE]
        lines += [_table_row(result) for result in self.results]
        return "\n".join(lines) + "\n"

    def raise_if_failed(self, consequence: str = "") -> None:
        """Raise :class:`DataCheckError` listing each failed expectation and its fix.

        ``consequence`` (what the failure left undone, where the report is) ends the message.
        """
        if self.success:
            return
        details = "\n".join(f"  - {result.failure_line()}" for result in self.failed)
        ending = f"\n{consequence}" if consequence else ""
        raise DataCheckError(
            f"data check suite '{self.suite}' failed {len(self.failed)} of "
            f"{len(self.results)} expectations:\n{details}{ending}",
            report=self.to_dict(),
        )

    def write(self, path_dir: str | Path) -> list[Path]:
        """Write ``<suite>.json`` and ``<suite>.md`` atomically; returns both paths."""
        directory = Path(path_dir)
        directory.mkdir(parents=True, exist_ok=True)
        return [
            _write_atomic(directory / f"{self.suite}.json", json.dumps(self.to_dict(), indent=2)),
            _write_atomic(directory / f"{self.suite}.md", self.to_markdown()),
        ]


_TABLE_HEADER = "| result | expectation | column | description | offending | examples | observed |"
_TABLE_RULE = "|---|---|---|---|---|---|---|"


def _table_row(result: ExpectationResult) -> str:
    cells = [
        "pass" if result.success else "**FAIL**",
        result.expectation,
        result.column or "",
        result.description,
        f"{result.unexpected_count}{_percent(result.unexpected_percent)}",
        ", ".join(map(str, result.examples)),
        _compact(result.observed),
    ]
    return "| " + " | ".join(cell.replace("|", "\\|").replace("\n", " ") for cell in cells) + " |"


def _percent(value: float) -> str:
    # Set-style expectations (columns, labels) have a count but no row share.
    return f" ({value:.1f}%)" if value else ""


def _compact(value: Any, limit: int = 160) -> str:
    text = json.dumps(value, separators=(", ", ": "))
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _write_atomic(path: Path, text: str) -> Path:
    """Write via a temp file in the same folder so a crash never leaves half a report."""
    fd, staging = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.chmod(staging, 0o644)  # mkstemp makes it owner-only; reports are for everyone
        os.replace(staging, path)
    except BaseException:
        Path(staging).unlink(missing_ok=True)
        raise
    return path


# --- running expectations through GX --------------------------------------------


@dataclass(frozen=True)
class _Check:
    """A GX expectation (its ``description`` is the human sentence) and how to fix a failure."""

    expectation: Any  # a great_expectations.expectations.Expectation
    fix: str
    # Replaces GX's observed value where a derived summary says more (e.g. fractions).
    observed: Any = None


@dataclass(frozen=True)
class _Batch:
    """One table and the checks run against it."""

    name: str
    frame: pd.DataFrame
    # Column whose values name offending rows in `examples` (None: report the values).
    id_column: str | None
    checks: list[_Check]


def _run_suite(suite: str, batches: list[_Batch]) -> CheckReport:
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    # A fresh in-memory context per suite (about 20 ms): no state shared between runs.
    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False, metric_calculations=False)
    source = context.data_sources.add_pandas(suite)
    results = [result for batch in batches for result in _validate_batch(source, suite, batch)]
    return CheckReport(suite=suite, success=all(r.success for r in results), results=results)


def _validate_batch(source: Any, suite: str, batch: _Batch) -> list[ExpectationResult]:
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


def _to_result(check: _Check, gx_result: Any, id_column: str | None) -> ExpectationResult:
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


def _observed(check: _Check, raw: dict, error: str | None) -> Any:
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


# --- raw data -------------------------------------------------------------------


def validate_raw(df: pd.DataFrame, cfg: DataConfig) -> CheckReport:
    """Suite ``raw_data``: schema, ids, texts, labels, class balance, duplicate share.

    Checks that need a missing column are left to the schema check's failure.
    """
    present = [
        check
        for check in _table_checks(df, cfg)
        if getattr(check.expectation, "column", None) in (None, *df.columns)
    ]
    batches = [_Batch("table", df, "id" if "id" in df.columns else None, present)]
    if "label" in df.columns:
        batches.append(_label_balance_batch(df["label"], cfg))
    if {"id", "text"} <= set(df.columns):
        batches.append(_duplicates_batch(df, cfg))
    return _run_suite("raw_data", batches)


def _table_checks(df: pd.DataFrame, cfg: DataConfig) -> list[_Check]:
    from great_expectations import expectations as gxe

    labels = list(cfg.labels)
    label_counts = df["label"].value_counts().to_dict() if "label" in df.columns else {}
    return [
        _Check(
            gxe.ExpectTableRowCountToBeBetween(min_value=1, description="at least one row"),
            fix="the table is empty: check the data source and the ingestion step",
        ),
        _Check(
            gxe.ExpectTableColumnsToMatchSet(
                column_set=list(SCHEMA_COLUMNS),
                exact_match=False,
                description=f"the columns {', '.join(SCHEMA_COLUMNS)}",
            ),
            fix="add or rename the missing columns listed in the examples",
        ),
        _Check(
            gxe.ExpectColumnValuesToBeUnique(column="id", description="every id to be unique"),
            fix="give every row its own id (the listed ids repeat)",
        ),
        _Check(
            gxe.ExpectColumnValuesToNotBeNull(
                column="text", description="every row to have a text"
            ),
            fix="drop the listed rows or fill in their text",
        ),
        _Check(
            gxe.ExpectColumnValuesToBeOfType(
                column="text", type_="str", description="every text to be a string"
            ),
            fix="convert the listed rows' text to strings in the ingestion step",
        ),
        _Check(
            gxe.ExpectColumnValuesToNotMatchRegex(
                column="text", regex=r"^\s*$", description="no text to be empty or only whitespace"
            ),
            fix="drop the listed rows: an empty text cannot be classified",
        ),
        _Check(
            gxe.ExpectColumnValueLengthsToBeBetween(
                column="text",
                max_value=cfg.max_text_chars,
                description=f"every text to have at most {cfg.max_text_chars} characters",
            ),
            fix="trim or drop the listed rows, or raise data.max_text_chars",
        ),
        _Check(
            gxe.ExpectColumnValuesToNotBeNull(
                column="label", description="every row to have a label"
            ),
            fix="label the listed rows or drop them",
        ),
        _Check(
            gxe.ExpectColumnValuesToBeInSet(
                column="label", value_set=labels, description=f"every label to be one of {labels}"
            ),
            fix="map the listed rows' labels onto data.labels, or add those labels to data.labels",
        ),
        _Check(
            gxe.ExpectColumnDistinctValuesToContainSet(
                column="label",
                value_set=labels,
                description=f"each of {labels} to occur at least once",
            ),
            fix="add examples of the missing labels, or remove them from data.labels",
            observed={"label_counts": label_counts},
        ),
    ]


def _label_balance_batch(labels: pd.Series, cfg: DataConfig) -> _Batch:
    """One row per configured label with its share of all rows."""
    from great_expectations import expectations as gxe

    counts = labels.value_counts()
    table = pd.DataFrame({"label": list(cfg.labels)})
    table["rows"] = [int(counts.get(label, 0)) for label in cfg.labels]
    table["fraction"] = table["rows"] / len(labels) if len(labels) else 0.0
    check = _Check(
        gxe.ExpectColumnValuesToBeBetween(
            column="fraction",
            min_value=cfg.min_class_fraction,
            description=f"every label to make up at least {cfg.min_class_fraction:.1%} of rows",
        ),
        fix="add examples of the listed labels, or lower data.min_class_fraction",
        observed={"fractions": dict(zip(table["label"], table["fraction"].round(4), strict=True))},
    )
    return _Batch("label_balance", table, "label", [check])


def _duplicates_batch(df: pd.DataFrame, cfg: DataConfig, column: str = "text") -> _Batch:
    """Each row with the id of the earlier row (by id) whose normalised ``column`` it repeats."""
    from great_expectations import expectations as gxe

    table = _duplicate_table(df, column)
    fraction = float(table["duplicate_of"].notna().mean()) if len(table) else 0.0
    check = _Check(
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
    return _Batch("duplicates", table, "id", [check])


def _duplicate_table(df: pd.DataFrame, column: str = "text") -> pd.DataFrame:
    ordered = pd.DataFrame({"id": df["id"].astype(str), "value": df[column]}).sort_values(
        "id", kind="stable"
    )
    key = ordered["value"].map(_text_key)
    first_id = ordered.groupby(key)["id"].transform("first")
    repeats = key.notna() & key.duplicated(keep="first")
    return pd.DataFrame({"id": ordered["id"], "duplicate_of": first_id.where(repeats)}).reset_index(
        drop=True
    )


def _text_key(text: Any) -> str | None:
    return normalise_text(text) if isinstance(text, str) else None


# --- split integrity ------------------------------------------------------------


def validate_splits(splits: dict[str, pd.DataFrame]) -> CheckReport:
    """Suite ``split_integrity``: all three splits, disjoint ids, no shared text, all labels."""
    from great_expectations import expectations as gxe

    _require_split_columns(splits, ("id", "text", "label"))
    rows = _split_rows(splits)
    labels = sorted(rows["label"].dropna().astype(str).unique())
    row_checks = [
        *_split_presence_checks(splits),
        _Check(
            gxe.ExpectColumnValuesToBeNull(
                column="shared_with",
                description="no text (ignoring case and whitespace) in more than one split",
            ),
            fix="deduplicate before splitting (split_dataset does); the listed ids leak",
        ),
    ]
    return _run_suite(
        "split_integrity",
        [_Batch("rows", rows, "id", row_checks), _labels_per_split_batch(splits, labels)],
    )


def _require_split_columns(splits: dict[str, pd.DataFrame], columns: Sequence[str]) -> None:
    for name, frame in splits.items():
        missing = [c for c in columns if c not in frame.columns]
        if missing:
            raise DataError(
                f"split {name!r} lacks column(s) {missing}; pass the frames split_dataset returns"
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
                    "text_key": frame["text"].map(_text_key).to_numpy(),
                }
            )
            for name, frame in splits.items()
        ],
        ignore_index=True,
    )
    rows["shared_with"] = _other_splits_with_same(rows, "text_key")
    return rows


def _other_splits_with_same(rows: pd.DataFrame, key_column: str) -> list[str | None]:
    """Per row: the other splits (comma-joined) holding the same ``key_column`` value, or None."""
    splits_by_key = rows.dropna(subset=[key_column]).groupby(key_column)["split"].agg(frozenset)
    return [
        ", ".join(sorted(splits_by_key.get(key, frozenset()) - {own})) or None
        for key, own in zip(rows[key_column], rows["split"], strict=True)
    ]


def _labels_per_split_batch(splits: dict[str, pd.DataFrame], labels: Sequence[str]) -> _Batch:
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
    check = _Check(
        gxe.ExpectColumnValuesToBeBetween(
            column="rows", min_value=1, description=f"each of {list(labels)} in every split"
        ),
        fix="add examples of the listed labels (split/label) or use larger val/test fractions",
        observed={"label_counts": counts},
    )
    return _Batch("labels_per_split", table, "split_label", [check])


# --- tokenisation -----------------------------------------------------------------


def validate_tokenisation(
    splits: dict[str, pd.DataFrame],
    tokenizer: Any,
    max_length: int,
    padding_side: str,
    labels: Sequence[str],
    max_truncation_rate: float = 0.5,
) -> CheckReport:
    """Suite ``tokenisation``: truncation rate, pad token, padding side, labels per split."""
    _require_split_columns(splits, ("id", "text", "label"))
    lengths = _token_length_table(splits, tokenizer)
    return _run_suite(
        "tokenisation",
        [
            _Batch(
                "token_lengths",
                lengths,
                "id",
                [_truncation_check(lengths, max_length, max_truncation_rate)],
            ),
            _Batch("tokenizer", _tokenizer_table(tokenizer), None, _tokenizer_checks(padding_side)),
            _labels_per_split_batch(splits, labels),
        ],
    )


def token_length_stats(
    splits: dict[str, pd.DataFrame], tokenizer: Any
) -> dict[str, dict[str, float]]:
    """Per split: count, mean, p50/p90/p99 and max tokens (special tokens included)."""
    return _length_stats(_token_length_table(splits, tokenizer))


def _token_length_table(splits: dict[str, pd.DataFrame], tokenizer: Any) -> pd.DataFrame:
    frames = [
        pd.DataFrame(
            {
                "split": name,
                "id": frame["id"].astype(str).to_numpy(),
                "n_tokens": _token_lengths(frame["text"].astype(str).tolist(), tokenizer),
            }
        )
        for name, frame in splits.items()
    ]
    columns = ["split", "id", "n_tokens"]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=columns)


def _token_lengths(texts: list[str], tokenizer: Any) -> np.ndarray:
    """Untruncated, unpadded lengths as the model would see them (special tokens included)."""
    lengths: list[int] = []
    for start in range(0, len(texts), _TOKENISE_BATCH):
        encoded = tokenizer(texts[start : start + _TOKENISE_BATCH], padding=False, truncation=False)
        lengths.extend(len(ids) for ids in encoded["input_ids"])
    return np.asarray(lengths, dtype=np.int64)


def _length_stats(lengths: pd.DataFrame) -> dict[str, dict[str, float]]:
    return {
        str(name): _describe(group["n_tokens"].to_numpy())
        for name, group in lengths.groupby("split", sort=False)
    }


def _describe(values: np.ndarray) -> dict[str, float]:
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


def _truncation_check(lengths: pd.DataFrame, max_length: int, max_rate: float) -> _Check:
    from great_expectations import expectations as gxe

    too_long = lengths["n_tokens"] > max_length
    rates = too_long.groupby(lengths["split"], sort=False).mean().round(4).to_dict()
    return _Check(
        gxe.ExpectColumnValuesToBeBetween(
            column="n_tokens",
            max_value=max_length,
            mostly=1.0 - max_rate,
            description=(
                f"at most {max_rate:.0%} of texts to exceed max_length={max_length} tokens "
                "(longer ones lose their end to truncation)"
            ),
        ),
        fix=(
            "raise model.max_length (costs memory and time) or accept more truncation; "
            "the examples are ids of over-long texts"
        ),
        observed={
            "max_length": max_length,
            "truncation_rate": rates,
            "token_lengths": _length_stats(lengths),
        },
    )


def _tokenizer_table(tokenizer: Any) -> pd.DataFrame:
    return pd.DataFrame(
        {"pad_token": [tokenizer.pad_token], "padding_side": [tokenizer.padding_side]},
        dtype=object,
    )


def _tokenizer_checks(padding_side: str) -> list[_Check]:
    from great_expectations import expectations as gxe

    return [
        _Check(
            gxe.ExpectColumnValuesToNotBeNull(
                column="pad_token", description="the tokenizer to define a pad token"
            ),
            fix=(
                "set tokenizer.pad_token before batching (GPT-style models: "
                "tokenizer.pad_token = tokenizer.eos_token) and the model's pad_token_id"
            ),
        ),
        _Check(
            gxe.ExpectColumnValuesToBeInSet(
                column="padding_side",
                value_set=[padding_side],
                description=f"the tokenizer to pad on the {padding_side} (model.padding_side)",
            ),
            fix=(
                f"load the tokenizer with padding_side={padding_side!r}, "
                "or change model.padding_side"
            ),
        ),
    ]


# --- generation: raw data -----------------------------------------------------------

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
    batches = [_Batch("table", df, "id" if "id" in df.columns else None, present)]
    if {"id", "prompt"} <= set(df.columns):
        batches.append(_duplicates_batch(df, cfg, column="prompt"))
    return _run_suite("generation_raw_data", batches)


def _generation_table_checks(cfg: DataConfig) -> list[_Check]:
    from great_expectations import expectations as gxe

    return [
        _Check(
            gxe.ExpectTableRowCountToBeBetween(
                min_value=MIN_GENERATION_ROWS, description=f"at least {MIN_GENERATION_ROWS} rows"
            ),
            fix="add examples: fewer rows cannot fill train, val and test usefully",
        ),
        _Check(
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
        _Check(
            gxe.ExpectColumnValuesToBeUnique(column="id", description="every id to be unique"),
            fix="give every row its own id (the listed ids repeat)",
        ),
        _Check(
            gxe.ExpectColumnValuesToNotBeNull(column="id", description="every row to have an id"),
            fix="give the rows without an id one (re-ingesting assigns ids)",
        ),
        *_text_column_checks("prompt", "an empty prompt gives the model nothing to work from"),
        _Check(
            gxe.ExpectColumnValueLengthsToBeBetween(
                column="prompt",
                max_value=cfg.max_text_chars,
                description=f"every prompt to have at most {cfg.max_text_chars} characters",
            ),
            fix="trim or drop the listed rows, or raise data.max_text_chars",
        ),
        *_text_column_checks("response", "an empty target teaches the model to say nothing"),
    ]


def _text_column_checks(column: str, why_empty_is_bad: str) -> list[_Check]:
    """Present, a string and not blank: the same three checks for prompts and responses."""
    from great_expectations import expectations as gxe

    return [
        _Check(
            gxe.ExpectColumnValuesToNotBeNull(
                column=column, description=f"every row to have a {column}"
            ),
            fix=f"drop the listed rows or fill in their {column}",
        ),
        _Check(
            gxe.ExpectColumnValuesToBeOfType(
                column=column, type_="str", description=f"every {column} to be a string"
            ),
            fix=f"convert the listed rows' {column} to strings in the ingestion step",
        ),
        _Check(
            gxe.ExpectColumnValuesToNotMatchRegex(
                column=column,
                regex=r"^\s*$",
                description=f"no {column} to be empty or only whitespace",
            ),
            fix=f"drop the listed rows: {why_empty_is_bad}",
        ),
    ]


# --- generation: split leakage --------------------------------------------------------


def _split_presence_checks(splits: dict[str, pd.DataFrame]) -> list[_Check]:
    """All three splits non-empty, and every id in exactly one of them (both task suites)."""
    from great_expectations import expectations as gxe

    return [
        _Check(
            gxe.ExpectColumnDistinctValuesToEqualSet(
                column="split",
                value_set=list(SPLITS),
                description=f"non-empty splits {list(SPLITS)}",
            ),
            fix="re-run the split step: a split is missing or empty",
            observed={"rows": {name: len(frame) for name, frame in splits.items()}},
        ),
        _Check(
            gxe.ExpectColumnValuesToBeUnique(
                column="id", description="every id in exactly one split"
            ),
            fix="re-run the split step on a table with unique ids; the listed ids repeat",
        ),
    ]


def validate_generation_splits(splits: dict[str, pd.DataFrame]) -> CheckReport:
    """Suite ``generation_split_leakage``: non-empty splits, no prompt or response shared."""
    from great_expectations import expectations as gxe

    _require_split_columns(splits, ("id", "prompt", "response"))
    rows = _generation_split_rows(splits)
    checks = [
        *_split_presence_checks(splits),
        _Check(
            gxe.ExpectColumnValuesToBeNull(
                column="prompt_shared_with",
                description="no prompt (ignoring case and whitespace) in more than one split",
            ),
            fix="drop repeated prompts before splitting (split_generation does); the ids leak",
        ),
        _Check(
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
    return _run_suite("generation_split_leakage", [_Batch("rows", rows, "id", checks)])


def _generation_split_rows(splits: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """All rows with their split and the *other* splits sharing their prompt or response."""
    frames = [
        pd.DataFrame(
            {
                "split": name,
                "id": frame["id"].astype(str).to_numpy(),
                "prompt_key": frame["prompt"].map(_text_key).to_numpy(),
                "response_key": frame["response"].map(_text_key).to_numpy(),
            }
        )
        for name, frame in splits.items()
    ]
    columns = ["split", "id", "prompt_key", "response_key"]
    rows = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=columns)
    rows["prompt_shared_with"] = _other_splits_with_same(rows, "prompt_key")
    rows["response_shared_with"] = _other_splits_with_same(rows, "response_key")
    return rows


# --- generation: tokenisation -----------------------------------------------------------


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
        _Batch(
            "examples",
            examples,
            "id",
            [_fits_max_length_check(examples, max_length), _template_check(examples, fmt)],
        ),
        _truncation_batch(examples, fmt, max_length, max_truncation_rate),
        _Batch("targets", with_targets, "id", [_empty_response_check()]),
        _prompt_format_batch(fmt, max_length, max_new_tokens, context_length),
    ]
    return _run_suite("generation_tokenisation", batches)


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


def _fits_max_length_check(examples: pd.DataFrame, max_length: int) -> _Check:
    from great_expectations import expectations as gxe

    longest = int(examples["length"].max()) if len(examples) else 0
    return _Check(
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


def _template_check(examples: pd.DataFrame, fmt: PromptFormat) -> _Check:
    from great_expectations import expectations as gxe

    problems = examples["template_problem"].dropna().value_counts().to_dict()
    return _Check(
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
) -> _Batch:
    """Per-split text truncation rates against the bound; length stats ride along as observed."""
    from great_expectations import expectations as gxe

    table = _truncation_rates(examples, fmt)
    rates = table.set_index("split")
    check = _Check(
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
    return _Batch("truncation", table, "split", [check])


def _generation_length_stats(examples: pd.DataFrame) -> dict[str, dict[str, dict[str, float]]]:
    """Per split: stats of text, response and prompt + response token counts."""
    columns = {"text": "text_tokens", "response": "response_tokens", "prompt_response": "length"}
    return {
        str(name): {label: _describe(group[column].to_numpy()) for label, column in columns.items()}
        for name, group in examples.groupby("split", sort=False)
    }


def _empty_response_check() -> _Check:
    from great_expectations import expectations as gxe

    return _Check(
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
) -> _Batch:
    """One row describing the format and the context a generation needs."""
    from great_expectations import expectations as gxe

    needed = max_length + max_new_tokens
    table = pd.DataFrame(
        {"template": [fmt.template], "suffix_tokens": [len(fmt.suffix_ids)], "needed": [needed]}
    )
    checks = [
        _Check(
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
            _Check(
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
    return _Batch("prompt_format", table, None, checks)
