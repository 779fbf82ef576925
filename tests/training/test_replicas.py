"""Data-parallel replicas: shard math in one process, two gloo replicas, exact resume."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from pathlib import Path

import pytest
import torch

from peftflow.errors import TrainingError
from peftflow.models.backbone import trained_state
from peftflow.task.classification import classification_objective
from peftflow.task.registry import build_for_training
from peftflow.training.batching import batch_order, optimizer_steps
from peftflow.training.checkpoint import Checkpoints
from peftflow.training.loop import _accumulate_gradients, _replica_share
from peftflow.training.replicas import Replicas, data_parallel
from tests.conftest import train_classifier
from tests.models.test_methods import encoded_table, tiny_config
from tests.servers import free_port

ROOT = Path(__file__).resolve().parents[2]
LAUNCH_TIMEOUT_S = 150
CPU_ONLY = {"CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}


def no_dropout_lora(model_dir, **train_fields):
    """Tiny LoRA classifier config; dropout off so shards and one process see the same masks."""
    cfg = tiny_config(model_dir, "lora", r=4, alpha=8, dropout=0.0)
    train = cfg.train.model_copy(update={"restore_best_epoch": False, **train_fields})
    return cfg.model_copy(update={"train": train})


def build_without_dropout(cfg):
    model, tokenizer, _ = build_for_training(cfg)
    model.dropout.p = 0.0  # the classifier head's dropout
    return model, tokenizer


def fake_rank(rank: int, size: int = 2) -> Replicas:
    """A rank for the shard arithmetic only (no process group behind it)."""
    return Replicas(rank, size, torch.device("cpu"), "none")


# --- one process ---------------------------------------------------------------------------


def test_a_single_process_has_no_replicas(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert data_parallel() is None
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert data_parallel() is None


def test_shards_split_every_micro_batch_once_even_when_short_or_empty():
    for batch in ([0, 1, 2, 3, 4], [7], []):
        shards = [fake_rank(rank, 3).shard(batch) for rank in range(3)]
        assert sorted(i for shard in shards for i in shard) == sorted(batch)
    assert fake_rank(1).shard([9]) == []


class Unsynced(torch.nn.Module):
    """The one-process stand-in of the DDP wrapper: the same forward, a ``no_sync`` that
    does nothing (there is nothing to synchronise), and no averaging over ranks."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, *args):
        return self.model(*args)

    def no_sync(self):
        return contextlib.nullcontext()


def test_every_rank_runs_as_many_forwards_and_a_rank_short_of_examples_adds_nothing():
    single = [[0], [1], [2]]  # padding "none": micro-batches of one example, dealt out whole
    assert _replica_share(single, fake_rank(0)) == [([0], 1.0), ([2], 1.0)]
    assert _replica_share(single, fake_rank(1)) == [([1], 1.0), ([0], 0.0)]
    split = [[0, 1, 2], [3]]  # the short last micro-batch leaves rank 1 without an example
    assert _replica_share(split, fake_rank(0)) == [([0, 2], 1.0), ([3], 1.0)]
    assert _replica_share(split, fake_rank(1)) == [([1], 1.0), ([0], 0.0)]


@pytest.mark.parametrize("padding", ["longest", "none"])
def test_shard_gradients_sum_to_the_one_process_gradient(tiny_models, padding):
    """What DDP averages (each rank's share over the step's units, times the ranks) is the
    full gradient."""
    cfg = no_dropout_lora(tiny_models["llama"], grad_accum_steps=2)
    cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"padding": padding})})
    model, tokenizer = build_without_dropout(cfg)
    data = encoded_table(cfg, tokenizer, n=21)  # 21 = short last batch, odd shards
    objective = classification_objective(data, data, cfg, tokenizer.pad_token_id)
    batches = batch_order(objective.lengths, cfg.train.batch_size, cfg.seed, 1, True)
    step = optimizer_steps(batches, 2, unpadded=padding == "none")[-1]
    trainable = [p for p in model.parameters() if p.requires_grad]
    model.train()
    with torch.no_grad():  # LoRA's B starts at zero, which would zero A's gradient
        for param in trainable:
            param.add_(0.01 * torch.randn_like(param))

    def grads(rank=None):
        model.zero_grad(set_to_none=True)
        replicas = None if rank is None else fake_rank(rank)
        forward = model if rank is None else Unsynced(model)
        loss = _accumulate_gradients(forward, objective, step, torch.device("cpu"), replicas)
        return loss, [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in trainable]

    full_loss, full = grads()
    (loss0, part0), (loss1, part1) = grads(0), grads(1)
    assert torch.allclose(loss0 + loss1, full_loss, atol=1e-6)
    for whole, first, second in zip(full, part0, part1, strict=True):
        assert torch.allclose((first + second) / 2, whole, atol=1e-6)  # DDP's mean of 2


def test_resume_failures_of_the_ranks_are_one_error_each_reason_once():
    from peftflow.training.replicas import _raise_any

    _raise_any([None, None])  # every rank resumed
    with pytest.raises(TrainingError) as err:
        _raise_any(["launch of 1 process(es)", "launch of 1 process(es)", None, "not here"])
    assert str(err.value) == "ranks 0, 1: launch of 1 process(es); rank 3: not here"


# --- two gloo processes ----------------------------------------------------------------------


def _replica(rank: int, size: int, port: int, model_dir: str, out_dir: str, fields: dict) -> None:
    """One of ``size`` spawned processes: the training loop joins a gloo group of ``size``."""
    env = {"RANK": rank, "LOCAL_RANK": rank, "WORLD_SIZE": size, "LOCAL_WORLD_SIZE": size}
    os.environ.update({k: str(v) for k, v in env.items()})
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), **CPU_ONLY)
    torch.set_num_threads(1)
    outcome, model = _train(Path(model_dir), fields)
    saved = {"history": outcome.history, "state": trained_state(model)}
    saved.update(digest=outcome.weights_digest, processes=outcome.processes)
    torch.save(saved, Path(out_dir) / f"rank{rank}.pt")
    torch.distributed.destroy_process_group()


def _train(model_dir: Path, fields: dict):
    cfg = no_dropout_lora(model_dir, **fields)
    model, tokenizer = build_without_dropout(cfg)
    data = encoded_table(cfg, tokenizer, n=45)
    return train_classifier(model, data, data, cfg, tokenizer.pad_token_id), model


def _spawn(size: int, *args, replica=_replica) -> None:
    """Start ``size`` replicas; fail (and stop them) if they do not finish in time.

    A replica that dies makes ``join`` stop the others and raise ProcessExitedException.
    """
    context = torch.multiprocessing.start_processes(
        replica, args=(size, *args), nprocs=size, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + LAUNCH_TIMEOUT_S
    while not context.join(timeout=5):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"replicas did not finish in {LAUNCH_TIMEOUT_S} s")


@pytest.mark.slow
def test_two_gloo_replicas_stay_identical_and_match_one_process(tiny_models, tmp_path):
    fields = {"epochs": 2, "grad_accum_steps": 2}
    _spawn(2, free_port(), str(tiny_models["llama"]), str(tmp_path), fields)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]

    assert ranks[0]["processes"] == 2 and ranks[0]["digest"] == ranks[1]["digest"]
    assert ranks[0]["history"] == ranks[1]["history"]  # rank 0's validation, broadcast
    for name, tensor in ranks[0]["state"].items():
        assert torch.equal(tensor, ranks[1]["state"][name]), name

    # One process, same config, same global batch: the same run up to float summation order.
    outcome, model = _train(tiny_models["llama"], fields)
    assert outcome.processes == 1 and outcome.weights_digest == ""
    for single, parallel in zip(outcome.history, ranks[0]["history"], strict=True):
        assert parallel["train_loss"] == pytest.approx(single["train_loss"], rel=1e-5)
        assert parallel["val_f1"] == pytest.approx(single["val_f1"], abs=1e-9)
    for name, tensor in trained_state(model).items():
        assert torch.allclose(ranks[0]["state"][name], tensor, atol=1e-5), name


def _checkpointing_replica(
    rank: int, size: int, port: int, model_dir: str, out_dir: str, kill_at: str | None
) -> None:
    """A replica of a run with dropout on, checkpointing every step into ``out_dir``.

    With ``kill_at``, rank 0 SIGKILLs itself right after writing that checkpoint.
    """
    env = {"RANK": rank, "LOCAL_RANK": rank, "WORLD_SIZE": size, "LOCAL_WORLD_SIZE": size}
    os.environ.update({k: str(v) for k, v in env.items()})
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), **CPU_ONLY)
    torch.set_num_threads(1)
    cfg = tiny_config(Path(model_dir), "lora", r=4, alpha=8, dropout=0.1)
    train = cfg.train.model_copy(update={"epochs": 2, "checkpoint_every_steps": 1})
    cfg = cfg.model_copy(update={"train": train})
    model, tokenizer, _ = build_for_training(cfg)
    data = encoded_table(cfg, tokenizer, n=45)
    checkpoints = None
    if rank == 0:  # rank 0 holds the run key's checkpoints, as pipeline.train_stage does
        checkpoints = Checkpoints(Path(out_dir) / "checkpoints" / "key", "key")
        if kill_at:
            checkpoints.save = killed_after(checkpoints.save, kill_at)
    outcome = train_classifier(model, data, data, cfg, tokenizer.pad_token_id, None, checkpoints)
    saved = {"history": outcome.history, "state": trained_state(model)}
    torch.save(saved, Path(out_dir) / f"rank{rank}.pt")
    torch.distributed.destroy_process_group()


def killed_after(save, name: str):
    def save_then_die(*args, **kwargs):
        path = save(*args, **kwargs)
        if path.name == name:
            os.kill(os.getpid(), signal.SIGKILL)
        return path

    return save_then_die


def _spawn_checkpointing(*args) -> None:
    _spawn(2, *args, replica=_checkpointing_replica)


@pytest.mark.slow
def test_a_killed_data_parallel_run_resumes_exactly(tiny_models, tmp_path):
    """Rank 0 dies after the epoch 2 step 2 checkpoint; relaunched, both ranks resume from it
    (rank 1 with its own dropout RNG) and end bit-identical to a launch never killed."""
    model_dir = str(tiny_models["llama"])
    whole, killed = tmp_path / "uninterrupted", tmp_path / "killed"
    whole.mkdir(), killed.mkdir()
    _spawn_checkpointing(free_port(), model_dir, str(whole), None)
    with pytest.raises(torch.multiprocessing.ProcessExitedException, match="SIGKILL"):
        _spawn_checkpointing(free_port(), model_dir, str(killed), "epoch-0002-step-000000002")
    folder = killed / "checkpoints" / "key"
    assert [path.name for path in folder.glob("epoch-*")] == ["epoch-0002-step-000000002"]
    meta = json.loads((folder / "epoch-0002-step-000000002" / "meta.json").read_text())
    assert len(meta["replicas"]) == 2  # both ranks' RNG states

    _spawn_checkpointing(free_port(), model_dir, str(killed), None)
    for rank in (0, 1):
        expected = torch.load(whole / f"rank{rank}.pt")
        resumed = torch.load(killed / f"rank{rank}.pt")
        assert resumed["history"] == expected["history"]
        for name, tensor in expected["state"].items():
            assert torch.equal(resumed["state"][name], tensor), (rank, name)
