"""A suite's outcome as a data owner reads it: every expectation, what failed and how to fix it.

Written next to the run (JSON + markdown) and raised as a :class:`DataCheckError` on failure.

Depends on: nothing in peftflow beyond errors and fsutil.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from peftflow.errors import DataCheckError
from peftflow.fsutil import atomic_write_text


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
            atomic_write_text(
                directory / f"{self.suite}.json", json.dumps(self.to_dict(), indent=2)
            ),
            atomic_write_text(directory / f"{self.suite}.md", self.to_markdown()),
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
