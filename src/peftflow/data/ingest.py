"""The ingestion stage: source -> ``<data_dir>/dataset.parquet`` -> DVC version (md5).

Output files depend only on the input content (rows sorted by id, no
timestamps), so re-ingesting unchanged data reproduces the same bytes and the
same DVC md5, which keeps run keys and caches stable.

Depends on: config.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

import peftflow
from peftflow.config import DataConfig
from peftflow.data import dvc_store
from peftflow.data.loaders import load_dataset
from peftflow.data.spamassassin import SPAMASSASSIN_PACKAGE, SPAMASSASSIN_VERSION

TABLE_NAME = "dataset.parquet"
MANIFEST_NAME = "manifest.json"


@dataclass(frozen=True)
class IngestResult:
    table_path: Path
    data_md5: str
    n_rows: int
    label_counts: dict[str, int]
    source: str


def ingest(
    cfg: DataConfig,
    root: Path,
    cache_dir: Path | None = None,
    remote_url: str | None = None,
    push: bool = True,
    layout: str = "labelled",
    accept: Callable[[pd.DataFrame], None] | None = None,
) -> IngestResult:
    """Load the configured source, write it under ``root/cfg.data_dir`` and version it with DVC.

    Everything that can fail (loading, ``accept``, writing, DVC setup) happens
    before the new files replace the old ones, so a failed ingest leaves the
    previous data and its ``.dvc`` file untouched. ``accept(table)`` is the data
    gate: it raises to refuse the new table (the pipeline runs the raw-data suite
    there). ``layout`` picks how a user's table is read (see
    :func:`~peftflow.data.loaders.load_dataset`).
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    table = load_dataset(cfg, cache_dir or root / ".cache" / "peftflow", layout=layout)
    if accept is not None:
        accept(table)
    label_counts = _label_counts(table)
    data_dir = root / cfg.data_dir
    # Staged under root (not data_dir) so a crash never leaves stray files inside
    # the DVC-tracked folder; same filesystem, so os.replace is atomic.
    with tempfile.TemporaryDirectory(dir=root, prefix=".ingest-") as staging:
        staged = _write_staged(Path(staging), table, _manifest(cfg, table, label_counts))
        dvc_store.ensure_dvc_repo(root, remote_url)
        data_dir.mkdir(parents=True, exist_ok=True)
        for path in staged:
            os.replace(path, data_dir / path.name)
    md5 = dvc_store.track(root, cfg.data_dir)
    if push:
        dvc_store.push(root, cfg.data_dir)
    return IngestResult(
        table_path=data_dir / TABLE_NAME,
        data_md5=md5,
        n_rows=len(table),
        label_counts=label_counts,
        source=cfg.source,
    )


def _label_counts(table: pd.DataFrame) -> dict[str, int]:
    """Rows per label; {} for a table without labels (a prompt/response table)."""
    if "label" not in table.columns:
        return {}
    return {str(k): int(v) for k, v in sorted(table["label"].value_counts().items())}


def _manifest(cfg: DataConfig, table: pd.DataFrame, label_counts: dict[str, int]) -> dict:
    """A human-readable summary stored (and versioned) next to the table; no timestamps."""
    return {
        "source": cfg.source,
        "origin": _origin(cfg),
        "n_rows": len(table),
        "label_counts": label_counts,
        "columns": list(table.columns),
        "peftflow_version": peftflow.__version__,
    }


def _write_staged(staging: Path, table: pd.DataFrame, manifest: dict) -> list[Path]:
    table_path = staging / TABLE_NAME
    table.to_parquet(table_path, index=False)
    manifest_path = staging / MANIFEST_NAME
    manifest_path.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return [table_path, manifest_path]


def _origin(cfg: DataConfig) -> str:
    """Where the rows came from; a file name, not an absolute path, which would vary by machine."""
    if cfg.source == "spamassassin":
        return f"npm:{SPAMASSASSIN_PACKAGE}@{SPAMASSASSIN_VERSION}"
    if cfg.url and not cfg.path:
        return cfg.url
    return Path(cfg.path).name
