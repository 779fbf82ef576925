"""Training faults: a non-finite loss stops the run at once; a killed run resumes exactly."""

from __future__ import annotations

import fcntl
import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient

from peftflow.config.experiment import RUN_KEY_EXCLUDED
from peftflow.errors import TrainingError
from peftflow.models.backbone import trained_state
from peftflow.task.classification import classification_objective
from peftflow.task.registry import build_for_training
from peftflow.tracking.runs import ERROR_TAG, RESUMED_TAG, RunTracker, ensure_experiment
from peftflow.training import checkpoint, finite_guard
from peftflow.training import loop as training
from peftflow.training.checkpoint import Checkpoints, claimed
from peftflow.training.finite_guard import NonFiniteError
from peftflow.training.loop import train_model
from tests.models.test_methods import encoded_table
from tests.reliability.faults import (
    DATA_MD5,
    fresh_store,
    infinite_gradient_at,
    nan_loss_at,
    tiny_run_config,
    train_stage,
    trainable_weights,
    with_tracking,
    write_splits,
)

ROOT = Path(__file__).resolve().parents[2]
CHILD_TIMEOUT_S = 240
# Wall-clock and memory measurements: the only outcome numbers a resumed run may change.
TIMING_METRICS = {
    "train_seconds",
    "train_examples_per_second",
    "train_tokens_per_second",
    "peak_memory_mb",
    "run_seconds",
}


@pytest.fixture(autouse=True)
def keep_thread_count():
    """The runs here set train.threads=1 (bit-exact on CPU); give the session its threads back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def tiny_objective(cfg):
    model, tokenizer, _ = build_for_training(cfg)
    data = encoded_table(cfg, tokenizer)  # 48 examples: 6 steps of 8 per epoch
    return model, classification_objective(data, data, cfg, tokenizer.pad_token_id)


def client_status(tracking_uri: str, run_id: str) -> str:
    return MlflowClient(tracking_uri).get_run(run_id).info.status


def same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --- a non-finite loss -------------------------------------------------------------------


def test_non_finite_loss_stops_before_the_optimizer_applies_it(tiny_models):
    cfg = tiny_run_config(tiny_models["bert"], epochs=1)
    model, objective = tiny_objective(cfg)
    initial = trained_state(model)
    before_bad_step: dict[str, dict] = {}
    objective = nan_loss_at(objective, 3, lambda: before_bad_step.update(w=trained_state(model)))

    with pytest.raises(NonFiniteError) as caught:
        train_model(model, objective, cfg, on_epoch=None)

    message = str(caught.value)
    assert "non-finite loss in epoch 1 at optimizer step 3 of 6" in message
    assert "Lower train.lr" in message and "train.max_grad_norm" in message
    assert not same_tensors(before_bad_step["w"], initial)  # steps 1 and 2 did train
    assert same_tensors(trained_state(model), before_bad_step["w"])  # step 3 changed nothing


def test_gpu_mode_defers_the_check_but_skips_every_step_from_the_bad_one(tiny_models, monkeypatch):
    """The GPU path (fused AdamW, flags read every 20 steps and at the epoch end), on the CPU.

    Fused AdamW runs on CPUs too (make_optimizer fuses it there), so the deferred check is
    exercised here by deciding as on a GPU: the NaN at step 3 is reported at the epoch end
    (step 6), yet steps 3-6 changed no weight.
    """
    cfg = tiny_run_config(tiny_models["bert"], epochs=1)
    model, objective = tiny_objective(cfg)
    assert training.make_optimizer(model, cfg.train, torch.device("cpu")).defaults["fused"]
    monkeypatch.setattr(  # the decision a CUDA device gets: defer with fused AdamW
        finite_guard, "defers_on", lambda optimizer: bool(optimizer.defaults.get("fused"))
    )
    before_bad_step: dict[str, dict] = {}
    objective = nan_loss_at(objective, 3, lambda: before_bad_step.update(w=trained_state(model)))
    steps = []
    real_step = training._optimizer_step
    monkeypatch.setattr(training, "_optimizer_step", lambda *a: (steps.append(1), real_step(*a)))

    with pytest.raises(NonFiniteError, match="non-finite loss in epoch 1 at optimizer step 3 "):
        train_model(model, objective, cfg, on_epoch=None)
    assert len(steps) == 6  # deferred: the epoch ran on, with every step from 3 skipped
    assert same_tensors(trained_state(model), before_bad_step["w"])


@pytest.mark.parametrize("max_grad_norm", [1.0, None])
def test_non_finite_gradient_with_a_finite_loss_is_never_applied(tiny_models, max_grad_norm):
    cfg = tiny_run_config(tiny_models["bert"], epochs=1, max_grad_norm=max_grad_norm)
    model, objective = tiny_objective(cfg)
    snapshots = []
    objective = infinite_gradient_at(objective, 2)
    real_step = training._optimizer_step

    def recording_step(*args):
        snapshots.append(trained_state(model))
        real_step(*args)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(training, "_optimizer_step", recording_step)
        with pytest.raises(NonFiniteError, match="non-finite gradient norm in epoch 1 at "):
            train_model(model, objective, cfg, on_epoch=None)
    assert len(snapshots) == 2  # the second step raised inside the optimizer step
    assert same_tensors(trained_state(model), snapshots[1])
    assert all(torch.isfinite(w).all() for w in trained_state(model).values())


def test_non_finite_loss_fails_the_mlflow_run_and_registers_nothing(
    tiny_models, tracking_uri, tmp_path, monkeypatch
):
    cfg = with_tracking(
        tiny_run_config(tiny_models["bert"], checkpoint_every_steps=1), tracking_uri
    )
    real_objective = classification_objective
    monkeypatch.setattr(  # NaN at global step 8: epoch 2, step 2 (6 steps per epoch)
        "peftflow.task.classification.classification_objective",
        lambda *args: nan_loss_at(real_objective(*args), 8),
    )
    split_paths = write_splits(tmp_path / "splits")

    with pytest.raises(TrainingError, match="non-finite loss in epoch 2 at optimizer step 2"):
        train_stage(cfg, split_paths, tmp_path)

    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name(cfg.tracking.experiment)
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FAILED"
    assert "non-finite loss in epoch 2 at optimizer step 2" in run.data.tags[ERROR_TAG]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "epoch/val_f1")] == [1]
    assert "peftflow.checks_passed" not in run.data.tags
    assert client.search_registered_models() == []
    assert client.search_model_versions() == []
    run_dir = tmp_path / "outputs" / "runs" / run.info.run_id
    assert not (run_dir / "model").exists()  # no model folder, complete-looking or not
    assert list(run_dir.glob(".model-*")) == []  # nor a staging copy of one
    # The same run key would replay the same steps into the same NaN: nothing to resume.
    assert not (tmp_path / "outputs" / "checkpoints" / cfg.run_key(DATA_MD5)).exists()


# --- kill and resume ----------------------------------------------------------------------


def outcome_of(client: MlflowClient, run_id: str) -> dict:
    run = client.get_run(run_id)
    history = client.get_metric_history(run_id, "epoch/val_f1")
    return {"run": run, "val_f1_steps": [m.step for m in history]}


@pytest.mark.slow
def test_killed_training_resumes_in_the_same_run_with_the_same_result(
    tiny_models, empty_store, tmp_path
):
    """SIGKILL while a checkpoint is half-written in epoch 2; resume; compare to no kill."""
    split_paths = write_splits(tmp_path / "splits")
    root_a, root_b = tmp_path / "uninterrupted", tmp_path / "killed"
    cfg_a = with_tracking(tiny_run_config(tiny_models["bert"]), fresh_store(empty_store, root_a))
    # Same computation, a checkpoint after every step (the cadence is not in the run key).
    cfg_b = with_tracking(
        tiny_run_config(tiny_models["bert"], checkpoint_every_steps=1),
        fresh_store(empty_store, root_b),
    )
    uninterrupted = train_stage(cfg_a, split_paths, root_a)

    run_file = tmp_path / "run.json"
    run_file.write_text(
        json.dumps(
            {
                "config": cfg_b.model_dump(mode="json"),
                "split_paths": split_paths,
                "root": str(root_b),
                "kill_while_writing": "epoch-0002-step-000000004",
            }
        )
    )
    child = subprocess.run(
        [sys.executable, "-m", "tests.reliability.faults", str(run_file)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=CHILD_TIMEOUT_S,
    )
    assert child.returncode == -signal.SIGKILL, child.stderr[-3000:]
    folder = root_b / "outputs" / "checkpoints" / cfg_b.run_key(DATA_MD5)
    assert (folder / "epoch-0002-step-000000003").is_dir()  # the last complete checkpoint
    assert len(list(folder.glob(".staging-epoch-0002-step-000000004*"))) == 1  # half-written

    client = MlflowClient(cfg_b.tracking.tracking_uri)
    experiment = client.get_experiment_by_name(cfg_b.tracking.experiment)
    (killed,) = client.search_runs([experiment.experiment_id])
    assert killed.info.status == "RUNNING"  # nobody was left to end it

    resumed = train_stage(cfg_b, split_paths, root_b)

    assert resumed.run_id == killed.info.run_id  # the same MLflow run, continued
    after = outcome_of(client, resumed.run_id)
    assert after["run"].info.status == "FINISHED"
    assert after["run"].data.tags[RESUMED_TAG] == "epoch 2 step 3"
    assert after["val_f1_steps"] == [1, 2]  # epoch 1 from the killed process, 2 from this one
    assert resumed.history == uninterrupted.history
    quality = set(uninterrupted.metrics) - TIMING_METRICS
    assert {k: resumed.metrics[k] for k in quality} == {
        k: uninterrupted.metrics[k] for k in quality
    }
    assert same_tensors(
        trainable_weights(resumed.model_dir), trainable_weights(uninterrupted.model_dir)
    )
    assert not folder.exists()  # deleted once the run succeeded


def allocator_state(model) -> dict:
    """AdaLoRA's importance scores (tensors per adapter weight) and its rank pattern."""
    allocator = model.base_model.rankallocator
    scores = {
        f"{name}/{key}": value.clone()
        for name in ("ipt", "exp_avg_ipt", "exp_avg_unc")
        for key, value in getattr(allocator, name).items()
    }
    return {"scores": scores, "rank_pattern": model.peft_config["default"].rank_pattern}


@pytest.mark.parametrize("kill_at", [(2, 2), (2, 5), (3, 0)])
def test_adalora_resumes_exactly_with_its_rank_allocator(tiny_models, tmp_path, kill_at):
    """AdaLoRA keeps importance scores outside the weights; a resume must restore them too.

    12 steps: ranks are re-allocated at steps 2-10, then held by the rank pattern.
    (2, 2): step 8, scores in use; (2, 5): step 11, the pattern in use; (3, 0): all done.
    """
    adalora = {"init_r": 6, "target_r": 2, "delta_t": 1}
    cfg = tiny_run_config(tiny_models["bert"], "adalora", adalora, checkpoint_every_steps=1)
    model, objective = tiny_objective(cfg)
    reference = train_model(model, objective, cfg, on_epoch=None)
    expected = trained_state(model)

    class Killed(Exception):
        pass

    checkpoints = Checkpoints(tmp_path / "ckpt" / "key", "key")
    real_save = Checkpoints.save
    at_kill = {}

    def save_then_die(self, model, optimizer, scheduler, progress, *rest):
        real_save(self, model, optimizer, scheduler, progress, *rest)
        if (progress.epoch, progress.step) == kill_at:
            at_kill.update(allocator_state(model))
            raise Killed

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Checkpoints, "save", save_then_die)
        model, objective = tiny_objective(cfg)
        with pytest.raises(Killed):
            train_model(model, objective, cfg, None, checkpoints)

    model, objective = tiny_objective(cfg)  # a fresh model, as a new process would build
    optimizer, scheduler = training._optimizer_and_schedule(
        model, objective, cfg, torch.device("cpu")
    )
    progress = checkpoints.restore(model, optimizer, scheduler)
    assert (progress.epoch, progress.step) == kill_at
    restored = allocator_state(model)
    assert same_tensors(restored["scores"], at_kill["scores"])
    assert restored["rank_pattern"] == at_kill["rank_pattern"]

    model, objective = tiny_objective(cfg)
    resumed = train_model(model, objective, cfg, None, checkpoints)
    assert resumed.history == reference.history
    assert resumed.best_epoch == reference.best_epoch
    assert same_tensors(trained_state(model), expected)


# --- checkpoints that must not be used ----------------------------------------------------


@pytest.fixture(scope="module")
def one_checkpoint(tiny_models, tmp_path_factory) -> Checkpoints:
    """A run key's checkpoint after one 6-step epoch (train_model leaves it in place)."""
    cfg = tiny_run_config(tiny_models["bert"], epochs=1)
    checkpoints = Checkpoints(tmp_path_factory.mktemp("ckpt") / "key-a", "key-a")
    model, objective = tiny_objective(cfg)
    threads = torch.get_num_threads()
    train_model(model, objective, cfg, None, checkpoints)
    torch.set_num_threads(threads)
    assert checkpoints.pending().position == "epoch 2 step 0"
    return checkpoints


def copy_of(checkpoints: Checkpoints, folder: Path, run_key: str) -> Checkpoints:
    shutil.copytree(checkpoints.folder, folder)
    return Checkpoints(folder, run_key)


def test_a_corrupted_checkpoint_is_refused_with_the_fix(one_checkpoint, tiny_models, tmp_path):
    copy = copy_of(one_checkpoint, tmp_path / "key-a", "key-a")
    latest = copy.latest()
    weights = latest / "weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # one flipped bit pattern in the last weight
    weights.write_bytes(bytes(data))

    with pytest.raises(TrainingError, match=r"is corrupt \(weights.safetensors changed\)") as err:
        copy.pending()
    assert f"delete {copy.folder}" in str(err.value)
    cfg = tiny_run_config(tiny_models["bert"], epochs=1)
    model, objective = tiny_objective(cfg)
    with pytest.raises(TrainingError, match="is corrupt"):
        train_model(model, objective, cfg, None, copy)

    (latest / "meta.json").write_text('{"run_key": "key-a", "progr')  # cut short
    with pytest.raises(TrainingError, match="is unreadable"):
        copy.pending()


def test_a_checkpoint_resumes_only_under_as_many_processes(one_checkpoint, tiny_models, tmp_path):
    """Each replica's dropout stream is saved: a different count could not resume exactly."""
    copy = copy_of(one_checkpoint, tmp_path / "key-a", "key-a")
    cfg = tiny_run_config(tiny_models["bert"], epochs=1)
    model, objective = tiny_objective(cfg)
    optimizer = torch.optim.AdamW(p for p in model.parameters() if p.requires_grad)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    with pytest.raises(TrainingError, match=r"launch of 1 process\(es\); this one has 2") as err:
        copy.restore(model, optimizer, scheduler, replica=(1, 2))
    assert "Launch 1 again" in str(err.value) and f"delete {copy.folder}" in str(err.value)


def test_a_half_written_checkpoint_is_ignored_and_removed(tmp_path):
    checkpoints = Checkpoints(tmp_path / "key-a", "key-a")
    staging = checkpoints.folder / ".staging-epoch-0001-step-000000002-123"
    staging.mkdir(parents=True)
    (staging / "weights.safetensors").write_bytes(b"\x00" * 10)
    assert checkpoints.pending() is None  # nothing complete: train from the start
    assert not staging.exists()


def test_a_checkpoint_of_another_run_key_is_never_used(one_checkpoint, tiny_models, tmp_path):
    assert Checkpoints(tmp_path / "key-b", "key-b").pending() is None  # its own, empty folder
    moved = copy_of(one_checkpoint, tmp_path / "key-b", "key-b")  # key-a's, copied over
    with pytest.raises(TrainingError, match="belongs to run key 'key-a', not 'key-b'"):
        moved.pending()
    cfg = tiny_run_config(tiny_models["bert"], epochs=1)
    model, objective = tiny_objective(cfg)
    with pytest.raises(TrainingError, match="belongs to run key"):
        train_model(model, objective, cfg, None, moved)


def test_a_checkpoint_for_another_batch_layout_is_refused(one_checkpoint, tiny_models, tmp_path):
    """Its epoch/step would point at other batches (the code that batches changed)."""
    copy = copy_of(one_checkpoint, tmp_path / "key-a", "key-a")
    cfg = tiny_run_config(tiny_models["bert"], epochs=1)
    model, tokenizer, _ = build_for_training(cfg)
    data = encoded_table(cfg, tokenizer, n=40)  # 5 steps per epoch, not 6
    objective = classification_objective(data, data, cfg, tokenizer.pad_token_id)
    with pytest.raises(TrainingError, match="'steps_per_epoch': 6}, but this run has"):
        train_model(model, objective, cfg, None, copy)


def test_the_checkpoint_cadence_is_not_part_of_the_run_key(tiny_models):
    assert {"checkpoint_every_steps", "devices"} == RUN_KEY_EXCLUDED["train"]
    every_step = tiny_run_config(tiny_models["bert"], checkpoint_every_steps=1)
    never = tiny_run_config(tiny_models["bert"], checkpoint_every_steps=0)
    other_lr = tiny_run_config(tiny_models["bert"], checkpoint_every_steps=1, lr=1e-3)
    assert every_step.run_key(DATA_MD5) == never.run_key(DATA_MD5)
    assert every_step.run_key(DATA_MD5) != other_lr.run_key(DATA_MD5)


def test_a_run_key_trained_by_another_process_gets_no_checkpoints(tmp_path):
    checkpoints = Checkpoints(tmp_path / "key-a", "key-a")
    with (
        claimed(checkpoints) as first,
        claimed(Checkpoints(tmp_path / "key-a", "key-a")) as second,
    ):
        assert first is checkpoints and second is None
        assert (tmp_path / "key-a.lock").exists()
    assert not (tmp_path / "key-a.lock").exists()  # a finished run leaves no lock file
    with claimed(checkpoints) as again:  # released when the first run ended
        assert again is checkpoints


def test_a_lock_taken_on_a_deleted_lock_file_is_retried(tmp_path, monkeypatch):
    """Opened just before its holder deleted it, locked just after: that lock guards nothing."""
    lock_path = tmp_path / "key-a.lock"
    real_flock, calls = fcntl.flock, []

    def holder_finishes_in_between(handle, operation):
        calls.append(operation)
        if len(calls) == 1:  # the holder deletes the file this process has just opened
            lock_path.unlink()
        real_flock(handle, operation)

    monkeypatch.setattr(checkpoint.fcntl, "flock", holder_finishes_in_between)
    with claimed(Checkpoints(tmp_path / "key-a", "key-a")) as mine:
        assert mine is not None and len(calls) == 2  # locked, found stale, opened again
        monkeypatch.setattr(checkpoint.fcntl, "flock", real_flock)
        with claimed(Checkpoints(tmp_path / "key-a", "key-a")) as other:
            assert other is None  # the file now at the path is the one held


def test_a_failed_run_is_continued_and_a_finished_one_never(tracking_uri, tmp_path):
    experiment_id = ensure_experiment("resume", tracking_uri, tmp_path)
    with pytest.raises(RuntimeError), RunTracker(tracking_uri) as tracker:
        failed = tracker.start(experiment_id, "r", tags={}, params={"a": 1})
        raise RuntimeError("disk full")
    with RunTracker(tracking_uri) as tracker:
        assert tracker.resume(failed, experiment_id)
        assert client_status(tracking_uri, failed) == "RUNNING"
    client = MlflowClient(tracking_uri)
    run = client.get_run(failed)
    assert run.info.status == "FINISHED" and run.data.params == {"a": "1"}
    assert ERROR_TAG not in run.data.tags
    assert run.data.tags[f"{RESUMED_TAG}_after_error"] == "RuntimeError: disk full"
    assert not RunTracker(tracking_uri).resume(failed, experiment_id)  # FINISHED stays so
    assert not RunTracker(tracking_uri).resume("0" * 32, experiment_id)  # unknown run
