"""Data integrity: corrupted DVC cache objects are found and restored; old versions reproduce.

The corruption here is what bit rot looks like: bytes flipped in place, with the
file's mode and mtime kept, so DVC's own state cache (inode, mtime, size) still
vouches for it and ``dvc status`` reports nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import pandas as pd
import pytest
from mlflow import MlflowClient
from typer.testing import CliRunner

from peftflow.cli.main import app
from peftflow.config.experiment import ExperimentConfig
from peftflow.config.loading import load_config, parse_config
from peftflow.data.dvc_integrity import (
    ASIDE_SUFFIX,
    MANIFEST,
    checkout_version,
    file_md5,
    repair,
    repair_cache,
    repair_remote,
    verify,
    verify_remote,
)
from peftflow.data.dvc_repo import cache_dir, data_md5
from peftflow.data.dvc_store import ensure_dvc_repo, pull, push, track
from peftflow.errors import ConfigError, DataError, PeftflowError
from peftflow.pipeline import definition
from peftflow.pipeline.reproduce import (
    CONFIG_ARTIFACT,
    CONFIG_HASH_TAG,
    REPRODUCES_TAG,
    Reproduction,
    compare_metrics,
    reproduce,
    run_config,
)
from peftflow.pipeline.results import RunContext
from peftflow.tracking.runs import RunResult, RunTracker, standard_tags
from tests.conftest import synthetic_spam_table

runner = CliRunner()
ROWS = "id,text\n" + "".join(f"{i},message number {i}\n" for i in range(200))


def tracked_project(root: Path, rows: str = ROWS) -> Path:
    """A git + DVC repo whose data/ (two files) is tracked and pushed to the local remote."""
    root.mkdir(parents=True)
    subprocess.run(["git", "init", "-q", str(root)], check=True)
    ensure_dvc_repo(root, None)
    write_data(root, rows)
    track(root)
    push(root)
    return root


def write_data(root: Path, rows: str) -> None:
    (root / "data").mkdir(exist_ok=True)
    (root / "data" / "rows.csv").write_text(rows)
    (root / "data" / "manifest.json").write_text(json.dumps({"rows": rows.count("\n")}))


def rot(path: Path) -> None:
    """Flip one byte in place, keeping mode and mtime (DVC's state cache then trusts it)."""
    stat = path.stat()
    os.chmod(path, 0o644)
    with path.open("r+b") as handle:
        handle.seek(5)
        byte = handle.read(1)
        handle.seek(5)
        handle.write(bytes([byte[0] ^ 0xFF]))
    os.chmod(path, stat.st_mode)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def cache_object(root: Path, relpath: str = "rows.csv") -> Path:
    md5 = file_md5(root / "data" / relpath)
    return cache_dir(root) / md5[:2] / md5[2:]


def remote_copy(root: Path, cache_path: Path) -> Path:
    return root / ".dvc-storage" / "files" / "md5" / cache_path.parent.name / cache_path.name


def test_verify_passes_on_freshly_tracked_data(tmp_path):
    root = tracked_project(tmp_path / "project")
    check = verify(root)
    assert check.ok and check.n_files == 2
    assert check.data_md5 == data_md5(root)
    assert repair(root) == [] and repair_cache(root, check.data_md5) == []


def test_md5s_follow_dvc_semantics(tmp_path):
    """Files hash as raw md5 (DVC 3) and a folder's md5 is its manifest object's md5 + .dir."""
    root = tracked_project(tmp_path / "project")
    md5 = data_md5(root)
    manifest = cache_dir(root) / md5[:2] / md5[2:]
    assert file_md5(manifest) + ".dir" == md5
    assert cache_object(root).read_text() == ROWS


def test_corrupted_cache_object_is_named_and_restored_from_the_remote(tmp_path):
    root = tracked_project(tmp_path / "project")
    obj = cache_object(root)
    original = obj.read_bytes()
    shutil.rmtree(root / "data")  # no workspace copy to heal from: the remote must serve
    rot(obj)

    check = verify(root)
    assert not check.ok
    [bad] = check.cache
    assert bad.name == "rows.csv" and bad.path == obj
    assert bad.expected == file_md5(remote_copy(root, obj)) and bad.actual == file_md5(obj)
    assert "rows.csv" in bad.describe() and bad.expected in bad.describe()

    restored = repair(root)

    assert any("rows.csv: cache object restored from the remote" in line for line in restored)
    assert verify(root).ok
    assert obj.read_bytes() == original
    assert (root / "data" / "rows.csv").read_bytes() == original  # workspace checked out
    assert not list(cache_dir(root).rglob(f"*{ASIDE_SUFFIX}"))


def test_object_corrupted_in_cache_and_missing_on_remote_is_a_data_error(tmp_path):
    root = tracked_project(tmp_path / "project")
    obj = cache_object(root)
    remote_copy(root, obj).unlink()
    rot(obj)
    (root / "data" / "rows.csv").write_text("edited by hand\n")  # no good workspace copy either
    corrupted = obj.read_bytes()

    with pytest.raises(DataError) as err:
        repair(root)

    message = str(err.value)
    assert "rows.csv" in message and str(obj) in message
    assert f"expected md5 {hashlib.md5(ROWS.encode()).hexdigest()}" in message
    assert f"found md5 {file_md5(obj)}" in message and "has no copy" in message
    assert "dvc push" in message and "peftflow ingest" in message
    # Nothing overwritten: the corrupted object, the edited file and data.dvc are as they were.
    assert obj.read_bytes() == corrupted
    assert (root / "data" / "rows.csv").read_text() == "edited by hand\n"
    assert not list(cache_dir(root).rglob(f"*{ASIDE_SUFFIX}"))


def test_corrupted_copy_on_the_remote_is_refused_too(tmp_path):
    root = tracked_project(tmp_path / "project")
    obj = cache_object(root)
    shutil.rmtree(root / "data")
    rot(obj)
    rot(remote_copy(root, obj))
    corrupted = obj.read_bytes()

    with pytest.raises(DataError, match=r"has a corrupted copy too \(md5 [0-9a-f]{32}\)"):
        repair(root)
    assert obj.read_bytes() == corrupted


def test_good_workspace_copy_heals_the_cache_without_a_remote(tmp_path):
    """Re-ingesting unchanged data: DVC keeps the rotted object; track() replaces it."""
    root = tracked_project(tmp_path / "project")
    obj = cache_object(root)
    remote_copy(root, obj).unlink()
    rot(obj)

    track(root)  # what `peftflow ingest` runs after writing data/ from the source

    assert obj.read_text() == ROWS
    assert verify(root).ok


def test_corrupted_manifest_is_restored(tmp_path):
    root = tracked_project(tmp_path / "project")
    md5 = data_md5(root)
    manifest = cache_dir(root) / md5[:2] / md5[2:]
    rot(manifest)
    assert [bad.name for bad in verify(root).cache] == [MANIFEST]

    assert repair(root)  # rebuilt from data/, which hashes to the recorded md5
    assert verify(root).ok

    rot(manifest)
    shutil.rmtree(root / "data")
    assert any("restored from the remote" in line for line in repair(root))
    assert verify(root).ok


def test_push_refuses_to_upload_a_corrupted_object(tmp_path):
    root = tracked_project(tmp_path / "project")
    obj = cache_object(root)
    remote_copy(root, obj).unlink()
    rot(obj)
    with pytest.raises(DataError, match=r"(?s)refusing to push data: rows.csv.*--repair"):
        push(root)
    assert not remote_copy(root, obj).exists()


def test_pull_never_leaves_corrupted_bytes_in_the_workspace(tmp_path):
    root = tracked_project(tmp_path / "project")
    rot(cache_object(root))
    shutil.rmtree(root / "data")
    pull(root)  # DVC alone checks the rotted object out as it is
    assert (root / "data" / "rows.csv").read_text() == ROWS
    assert verify(root).ok


def test_hand_edited_workspace_file_is_reported_and_restored(tmp_path):
    root = tracked_project(tmp_path / "project")
    (root / "data" / "rows.csv").write_text("edited by hand\n")
    [bad] = verify(root).workspace
    assert bad.name == "rows.csv" and bad.place == "workspace"
    assert repair(root) == [f"rows.csv: {root / 'data'} copy restored from the cache"]
    assert (root / "data" / "rows.csv").read_text() == ROWS


def test_older_version_checks_out_into_a_new_folder_from_the_remote(tmp_path):
    root = tracked_project(tmp_path / "project")
    v1 = data_md5(root)
    write_data(root, "id,text\n1,second version\n")
    v2 = track(root)
    push(root)
    shutil.rmtree(root / ".dvc" / "cache")  # only the remote still has v1

    out = checkout_version(root, v1, tmp_path / "v1")

    assert (out / "rows.csv").read_text() == ROWS
    assert data_md5(root) == v2  # data.dvc and data/ still hold v2
    assert (root / "data" / "rows.csv").read_text() == "id,text\n1,second version\n"
    with pytest.raises(DataError, match="is not empty"):
        checkout_version(root, v1, out)


def test_unknown_version_names_the_missing_manifest(tmp_path):
    root = tracked_project(tmp_path / "project")
    with pytest.raises(DataError, match=rf"(?s){MANIFEST.replace('(', '.').replace(')', '.')}"):
        checkout_version(root, "0" * 32 + ".dir", tmp_path / "nowhere")


def test_dvc2_files_are_refused_with_the_migration_command(tmp_path):
    root = tracked_project(tmp_path / "project")
    dvc_file = root / "data.dvc"
    dvc_file.write_text(dvc_file.read_text().replace("  hash: md5\n", ""))
    with pytest.raises(DataError, match=r"written by DVC 2.*dvc cache migrate --dvc-files"):
        verify(root)


@pytest.mark.parametrize("command", [["data", "verify"], ["reproduce"]])
def test_integrity_commands_have_help(command):
    result = runner.invoke(app, [*command, "--help"])
    assert result.exit_code == 0 and "Usage" in result.output


def test_cli_data_verify_exit_codes(tmp_path):
    root = tracked_project(tmp_path / "project")
    ok = runner.invoke(app, ["data", "verify", "--root", str(root)])
    assert ok.exit_code == 0, ok.output
    assert "ok" in ok.output

    rot(cache_object(root))
    shutil.rmtree(root / "data")
    found = runner.invoke(app, ["data", "verify", "--root", str(root)])
    assert found.exit_code == 2
    assert "rows.csv" in found.output and "peftflow data verify --repair" in found.output

    repaired = runner.invoke(app, ["data", "verify", "--root", str(root), "--repair"])
    assert repaired.exit_code == 0, repaired.output
    assert "restored" in repaired.output and verify(root).ok


# --- the remote's copies ----------------------------------------------------------------


def manifest_object(root: Path) -> Path:
    md5 = data_md5(root)
    return cache_dir(root) / md5[:2] / md5[2:]


def test_the_remote_is_verified_object_by_object(tmp_path):
    root = tracked_project(tmp_path / "project")
    check = verify_remote(root)
    assert check.ok and check.n_objects == 3  # the manifest and two files
    assert check.data_md5 == data_md5(root)
    assert Path(check.url) == (root / ".dvc-storage" / "files" / "md5").resolve()
    assert repair_remote(root) == ([], check)  # nothing to upload: the remote is read once


def test_a_rotted_and_a_missing_remote_copy_are_named_and_uploaded_again(tmp_path):
    root = tracked_project(tmp_path / "project")
    rows, manifest = cache_object(root), cache_object(root, "manifest.json")
    rot(remote_copy(root, rows))
    remote_copy(root, manifest).unlink()
    assert verify(root).ok  # the local copies are fine: only the remote's are not

    check = verify_remote(root)
    assert {(bad.place, bad.name) for bad in check.bad} == {
        ("remote", "rows.csv"),
        ("remote", "manifest.json"),
    }
    missing = next(bad for bad in check.bad if bad.name == "manifest.json")
    assert missing.actual is None and "it is missing" in missing.describe()
    assert str(remote_copy(root, rows)) in next(b.describe() for b in check.bad if b.actual)

    restored, final = repair_remote(root)
    assert final.ok and final.n_objects == 3
    assert sorted(restored) == [
        "manifest.json: remote copy restored from the cache",
        "rows.csv: remote copy restored from the cache",
    ]
    assert verify_remote(root).ok
    assert remote_copy(root, rows).read_bytes() == rows.read_bytes()


def test_a_rotted_remote_manifest_still_lets_every_file_be_checked(tmp_path):
    root = tracked_project(tmp_path / "project")
    rot(remote_copy(root, manifest_object(root)))
    rot(remote_copy(root, cache_object(root)))
    names = {bad.name for bad in verify_remote(root).bad}
    assert names == {MANIFEST, "rows.csv"}  # files listed by the local manifest instead
    assert repair_remote(root)[1].ok
    assert verify_remote(root).ok


def test_data_never_pushed_is_reported_missing_from_the_remote(tmp_path):
    root = tracked_project(tmp_path / "project")
    shutil.rmtree(root / ".dvc-storage")
    check = verify_remote(root)
    assert check.n_objects == 3  # the files are listed by the local manifest
    assert {bad.name for bad in check.bad} == {MANIFEST, "rows.csv", "manifest.json"}
    assert all(bad.actual is None for bad in check.bad)
    assert len(repair_remote(root)[0]) == 3 and verify_remote(root).ok


def test_the_remote_only_ever_receives_bytes_that_hash_right(tmp_path):
    root = tracked_project(tmp_path / "project")
    rot(cache_object(root))  # the cache rotted too; data/ still holds the good bytes
    rot(remote_copy(root, cache_object(root)))
    restored, _ = repair_remote(root)
    assert "rows.csv: cache object restored from" in restored[0]
    assert verify(root).ok and verify_remote(root).ok

    rot(cache_object(root))
    rot(remote_copy(root, cache_object(root)))
    shutil.rmtree(root / "data")  # now no good copy is left anywhere
    with pytest.raises(DataError, match=r"rows\.csv.*corrupted copy too"):
        repair_remote(root)


def test_verifying_without_a_remote_says_how_to_add_one(tmp_path):
    root = tracked_project(tmp_path / "project")
    with (root / ".dvc" / "config").open("w") as handle:
        handle.write("[core]\n    analytics = false\n")
    fix = r"(?s)read the default remote.*dvc remote add -d.*dvc remote list"
    with pytest.raises(DataError, match=fix):
        verify_remote(root)


def test_an_unreadable_remote_copy_is_an_error_not_a_mismatch(tmp_path, monkeypatch):
    """Permissions or the network failing say nothing about the bytes: no repair is offered."""
    from dvc_objects.fs.local import LocalFileSystem

    root = tracked_project(tmp_path / "project")
    real_open = LocalFileSystem.open

    def denied(self, path, *args, **kwargs):
        if ".dvc-storage" in str(path):  # the remote; DVC's own config files stay readable
            raise PermissionError(13, "Permission denied", path)
        return real_open(self, path, *args, **kwargs)

    monkeypatch.setattr(LocalFileSystem, "open", denied)
    with pytest.raises(DataError, match=r"could not read .*Permission denied.*dvc remote list"):
        verify_remote(root)


def test_cli_data_verify_remote(tmp_path):
    root = tracked_project(tmp_path / "project")
    ok = runner.invoke(app, ["data", "verify", "--root", str(root), "--remote"])
    assert ok.exit_code == 0, ok.output
    assert "remote " in ok.output and "3 objects ok" in ok.output

    rot(remote_copy(root, cache_object(root)))
    found = runner.invoke(app, ["data", "verify", "--root", str(root), "--remote"])
    assert found.exit_code == 2, found.output
    assert "rows.csv (remote copy" in found.output
    assert "peftflow data verify --repair --remote" in found.output

    args = ["data", "verify", "--root", str(root), "--remote", "--repair"]
    repaired = runner.invoke(app, args)
    assert repaired.exit_code == 0, repaired.output
    assert "restored rows.csv: remote copy restored from the cache" in repaired.output
    assert "3 objects ok" in repaired.output  # the repair's own final verification


# --- reproduce ------------------------------------------------------------------------


def experiment(root: Path, model_dir: Path, table: pd.DataFrame) -> ExperimentConfig:
    """A tiny BERT + LoRA run on a user table under ``root`` (the table is the data source)."""
    source = root / "messages.csv"
    table[["text", "label"]].to_csv(source, index=False)
    return parse_config(
        {
            "name": "tiny-repro",
            "seed": 3,
            "data": {"source": "table", "path": str(source), "min_class_fraction": 0.1},
            "model": {"name": str(model_dir), "max_length": 32},
            "method": {"name": "lora", "r": 4, "alpha": 8},
            "train": {"epochs": 3, "batch_size": 16, "lr": 5e-2, "progress": False},
            "tracking": {
                "experiment": "reproduce",
                "tracking_uri": f"sqlite:///{root / 'mlflow.db'}",
                "register_model": False,
            },
        }
    )


def train_once(cfg: ExperimentConfig, root: Path) -> RunResult:
    """What `peftflow run` does up to training: ingest (DVC add + push), checks, split, train."""
    pipeline = definition.FULL.without("baseline", "register-model", "promote-model")
    return definition.run(pipeline, RunContext(cfg, root)).trained


@pytest.mark.slow
def test_reproduce_restores_the_old_data_version_and_matches_the_metrics(
    tiny_models, empty_store, tmp_path
):
    root = tmp_path / "project"
    root.mkdir()
    subprocess.run(["git", "init", "-q", str(root)], check=True)
    shutil.copy(empty_store, root / "mlflow.db")
    cfg = experiment(root, tiny_models["bert"], synthetic_spam_table(240, seed=0))
    run_a = train_once(cfg, root)
    v1 = data_md5(root)
    assert run_a.metrics["test_f1"] > 0.8  # a model that learned: metrics worth comparing

    experiment(root, tiny_models["bert"], synthetic_spam_table(260, seed=1))  # the source moves on
    v2 = definition.run(definition.FULL.only("ingest"), RunContext(cfg, root)).data_md5
    assert v2 != v1
    v2_bytes = (root / "data" / "dataset.parquet").read_bytes()
    shutil.rmtree(root / ".dvc" / "cache")  # a fresh clone: v1 exists only on the remote

    result = runner.invoke(app, ["reproduce", run_a.run_id, "--root", str(root)])

    assert result.exit_code == 0, result.output
    assert "REPRODUCED" in result.output and "test_f1" in result.output
    client = MlflowClient(cfg.tracking.tracking_uri)
    [new] = client.search_runs(
        [client.get_experiment_by_name("reproduce").experiment_id],
        f"tags.`{REPRODUCES_TAG}` = '{run_a.run_id}'",
    )
    assert new.data.tags["peftflow.data_md5"] == v1
    assert new.data.tags["peftflow.run_key"] == run_a.run_key
    assert new.data.tags["peftflow.kind"] == "reproduction"
    assert new.data.tags["peftflow.reproduced"] == "true"
    for name, value in run_a.metrics.items():
        if name.startswith("test_"):
            assert new.data.metrics[name] == pytest.approx(value, abs=1e-6), name
    # The user's data stays on v2: data.dvc, the table, and its verification.
    assert data_md5(root) == v2
    assert (root / "data" / "dataset.parquet").read_bytes() == v2_bytes
    assert verify(root).workspace == ()


def finetune_record(uri: str, cfg: ExperimentConfig, root: Path, **tags) -> str:
    """A FINISHED run logged the way train_stage logs one (tags, flat params, a test metric)."""
    experiment_id = MlflowClient(uri).create_experiment("records")
    base_tags = {
        **standard_tags(cfg.run_key("abc.dir"), "abc.dir", cfg.config_hash(), root),
        "peftflow.kind": "finetune",
    }
    with RunTracker(uri) as tracker:
        tracker.start(experiment_id, cfg.name, {**base_tags, **tags}, cfg.flat_params())
        tracker.log_metrics({"test_f1": 0.5})
    return tracker.run_id


def test_config_is_rebuilt_exactly_from_params_or_the_artifact(tracking_uri, tmp_path):
    client = MlflowClient(tracking_uri)
    cfg = load_config("configs/experiments/demo.yaml", {"model.revision": "123", "name": "1e5"})
    run_id = finetune_record(tracking_uri, cfg, tmp_path)

    rebuilt, source = run_config(client, client.get_run(run_id))
    assert (rebuilt, source) == (cfg, "params")

    with RunTracker(tracking_uri) as tracker:
        tracker.start(client.get_run(run_id).info.experiment_id, "with-artifact", {}, {})
        tracker.log_dict(cfg.model_dump(mode="json"), CONFIG_ARTIFACT)
        tracker.set_tags({CONFIG_HASH_TAG: cfg.config_hash()})
    rebuilt, source = run_config(client, client.get_run(tracker.run_id))
    assert (rebuilt, source) == (cfg, "artifact")


def test_a_config_that_does_not_hash_to_the_run_is_refused(tracking_uri, tmp_path):
    client = MlflowClient(tracking_uri)
    cfg = load_config("configs/experiments/demo.yaml")
    run_id = finetune_record(tracking_uri, cfg, tmp_path, **{CONFIG_HASH_TAG: "0123456789abcdef"})
    with pytest.raises(ConfigError, match=r"hashes to [0-9a-f]{16}, not to the run's 0123456789"):
        run_config(client, client.get_run(run_id))


def test_reproduce_refuses_unknown_runs_and_runs_without_identity(tracking_uri, tmp_path):
    root = tmp_path
    unknown = runner.invoke(app, ["reproduce", "f" * 32, "--tracking-uri", tracking_uri])
    assert unknown.exit_code == 2
    assert "no MLflow run 'ffff" in unknown.output and "--tracking-uri" in unknown.output

    nowhere = runner.invoke(app, ["reproduce", "f" * 32, "--root", str(tmp_path / "elsewhere")])
    assert nowhere.exit_code == 2 and "there is no MLflow store at" in nowhere.output
    assert not (tmp_path / "elsewhere" / "mlflow.db").exists()

    client = MlflowClient(tracking_uri)
    bare = client.create_run(client.create_experiment("bare")).info.run_id
    with pytest.raises(
        PeftflowError, match="has no tag peftflow.kind, peftflow.data_md5, peftflow"
    ):
        reproduce(bare, root, tracking_uri=tracking_uri)

    cfg = load_config("configs/experiments/demo.yaml")
    baseline = finetune_record(tracking_uri, cfg, root, **{"peftflow.kind": "baseline"})
    with pytest.raises(PeftflowError, match="is a 'baseline' run, not a fine-tuning run"):
        reproduce(baseline, root, tracking_uri=tracking_uri)


def test_metrics_outside_the_tolerance_fail_with_exit_1(monkeypatch):
    checks = compare_metrics(
        {"test_f1": 0.9, "test_accuracy": 0.95, "val_f1": 0.1}, {"test_f1": 0.8}
    )
    assert [c.name for c in checks] == ["test_accuracy", "test_f1"]
    outcome = Reproduction("a" * 32, "b" * 32, "abc.dir", "params", 1e-6, checks, "c1", "c2")
    assert not outcome.reproduced
    assert "NOT REPRODUCED" in outcome.table() and "<-- differs" in outcome.table()
    assert Reproduction("a", "b", "m", "params", 0.2, checks[1:], "c", "c").reproduced

    monkeypatch.setattr("peftflow.pipeline.reproduce.reproduce", lambda *args, **kwargs: outcome)
    result = runner.invoke(app, ["reproduce", "a" * 32])
    assert result.exit_code == 1
    assert "test_accuracy" in result.output and "missing" in result.output
