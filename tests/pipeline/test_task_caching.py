"""Cacheable Prefect tasks persist their results (paths and metrics, JSON) and reuse them."""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict
from pathlib import Path

import pytest
from prefect import flow

from peftflow.config.loading import parse_config
from peftflow.data.split import SPLITS
from peftflow.pipeline.results import Ingested, PipelineState, RunContext
from peftflow.pipeline.stages import split_dir, split_written
from tasks import stages
from tests.conftest import synthetic_spam_table

pytestmark = pytest.mark.server


@flow
def split_twice(cfg, table_path: str, md5: str, root: Path) -> list:
    """Two split task runs of the same inputs; their states."""
    ctx = RunContext(cfg, root)
    state = PipelineState(ingested=Ingested(md5, table_path, 0, {}, "table"))
    first = stages.split(ctx, state, return_state=True)
    second = stages.split(ctx, state, return_state=True)
    return [(state.name, state.result()) for state in (first, second)]


def test_split_result_is_persisted_and_reused_while_its_files_exist(prefect_server, tmp_path):
    root = tmp_path / "project"
    root.mkdir()
    table = root / "table.parquet"
    synthetic_spam_table(120).to_parquet(table, index=False)
    cfg = parse_config({"name": "cached", "data": {"min_class_fraction": 0.1}})

    assert not split_written(cfg, "md5-a", root)
    (first, made), (second, reused) = split_twice(cfg, str(table), "md5-a", root)
    assert first == "Completed" and second == "Cached"
    assert reused == made and reused.summary["splits"]["train"]["rows"] > 0
    json.dumps(asdict(reused))  # paths and numbers only: JSON, never pickled objects

    shutil.rmtree(split_dir(cfg, "md5-a", root))  # outputs cleaned: the cache must not lie
    (again, remade), _ = split_twice(cfg, str(table), "md5-a", root)
    assert again == "Completed"
    assert all(Path(remade.paths[name]).is_file() for name in SPLITS)

    other = split_twice(cfg.model_copy(update={"seed": 7}), str(table), "md5-a", root)
    assert other[0][0] == "Completed"  # another seed is another split
