"""Classification metrics and the confusion-matrix plot, shared by every model.

Depends on: nothing in peftflow.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support


def classification_metrics(
    y_true: Sequence[int], y_pred: Sequence[int], positive: int = 1, prefix: str = ""
) -> dict[str, float]:
    """Accuracy plus precision/recall/F1 of the positive class (binary) or macro (multi-class)."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    binary = len(set(y_true.tolist()) | set(y_pred.tolist()) | {positive}) <= 2
    precision, recall, f1, _ = precision_recall_fscore_support(
        y_true,
        y_pred,
        average="binary" if binary else "macro",
        pos_label=positive,
        zero_division=0,
    )
    values = {
        "accuracy": accuracy_score(y_true, y_pred),
        "precision": precision,
        "recall": recall,
        "f1": f1,
    }
    return {f"{prefix}{k}": float(v) for k, v in values.items()}


def confusion(y_true: Sequence[int], y_pred: Sequence[int], n_labels: int) -> list[list[int]]:
    """Rows = true label id, columns = predicted label id."""
    return confusion_matrix(y_true, y_pred, labels=list(range(n_labels))).tolist()


def plot_confusion(matrix: list[list[int]], labels: Sequence[str], title: str, path: Path) -> Path:
    """Write an annotated confusion-matrix PNG and return its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = np.asarray(matrix)
    fig, ax = plt.subplots(figsize=(3.2 + 0.4 * len(labels), 3.0 + 0.4 * len(labels)))
    ax.imshow(counts, cmap="Blues")
    ax.set_xticks(range(len(labels)), labels)
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    threshold = counts.max() / 2 if counts.size else 0
    for (row, col), value in np.ndenumerate(counts):
        color = "white" if value > threshold else "black"
        ax.text(col, row, str(value), ha="center", va="center", color=color)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
