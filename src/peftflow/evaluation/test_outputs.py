"""A run's answer for every test example: what the promotion gate compares, example by example.

Every fine-tuned run logs ``evaluation/test_outputs.json``: per test example its id, its
input text, its reference (label name or target text) and the model's prediction. Two runs
whose files hold the same examples are compared on them directly; otherwise the champion is
re-scored on the candidate's examples (``peftflow.pipeline.gate``).

Depends on: nothing in peftflow.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

ARTIFACT_DIR = "evaluation"
FILE_NAME = "test_outputs.json"
ARTIFACT_PATH = f"{ARTIFACT_DIR}/{FILE_NAME}"


@dataclass(frozen=True)
class ExampleOutputs:
    """One model's outputs on one test split, row by row (all lists the same length)."""

    task: str  # classification or generation
    ids: list[str]
    inputs: list[str]
    references: list[str]
    predictions: list[str]
    labels: list[str] = field(default_factory=list)  # class names in logit order ([] generation)
    positive_label: str | None = None

    def __post_init__(self) -> None:
        lengths = {len(self.ids), len(self.inputs), len(self.references), len(self.predictions)}
        if len(lengths) != 1:
            raise ValueError(f"test outputs need one value per example; got lengths {lengths}")

    def __len__(self) -> int:
        return len(self.ids)

    def same_examples(self, other: ExampleOutputs) -> bool:
        """The same test examples, in the same order, with the same references."""
        return (self.task, self.ids, self.inputs, self.references) == (
            other.task,
            other.ids,
            other.inputs,
            other.references,
        )

    def write(self, folder: Path) -> Path:
        path = Path(folder) / FILE_NAME
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(asdict(self)))
        return path

    @classmethod
    def read(cls, path: Path) -> ExampleOutputs:
        return cls(**json.loads(Path(path).read_text()))
