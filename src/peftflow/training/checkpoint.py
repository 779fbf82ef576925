"""Resumable training checkpoints: a killed run restarts where it stopped, with the same result.

A checkpoint is everything the training loop needs to go on as if it had never
stopped: the trainable weights, AdamW's state, the scheduler's, the python,
numpy and torch (+CUDA) random states, where the loop stands (epoch and
optimizer steps taken in it; the batch order is a pure function of (seed,
epoch), see ``training.batch_order``), the step losses of the epoch so far, the
epoch history and the best epoch (value and weights). AdaLoRA's rank allocator
keeps importance scores outside the model: they are saved too.

Layout, under ``outputs/checkpoints/<run key>/`` (a lock file ``<run key>.lock`` beside it
while a process trains that key)::

    epoch-0002-step-000000003/  one complete checkpoint: epoch 2, 3 optimizer steps into it
        meta.json               run key, MLflow run id, position, history, optimizer and
                                scheduler structure, RNG states, sha256 of every tensor file
        weights.safetensors     trainable weights
        best.safetensors        weights of the best epoch so far (restore_best_epoch)
        optimizer.safetensors   AdamW's moments and step counts
        state.safetensors       torch RNG states, the epoch's step losses, method state
    .staging-*/                 a checkpoint being written (never read; removed on sight)

Tensors are stored as safetensors and everything else as JSON: nothing is
pickled and nothing is loaded with ``torch.load``. A checkpoint is written into
a staging folder and renamed into place (atomic on one filesystem), so a kill
leaves either the previous checkpoint or the new one, never half of one; the
previous one is deleted only once the new one is in place. ``meta.json`` records
the run key, and every file's sha256: a checkpoint of another run key, or one
whose files changed, is refused with the path to delete.

A data-parallel launch checkpoints too: rank 0 writes, with every replica's RNG
states (gathered; their dropout masks differ), and on resume every rank reads the
same folder and restores its own RNG states, so the folder must be readable from
every rank (one machine, or a shared filesystem). A checkpoint resumes only under
the number of processes that wrote it.

Depends on: models.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import random
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from peftflow.errors import TrainingError
from peftflow.models.backbone import trained_state

logger = logging.getLogger("peftflow.training.checkpoint")

FORMAT_VERSION = 1
META_FILE = "meta.json"
FOLDER_PREFIX = "epoch-"
STAGING_PREFIX = ".staging-"
TENSOR_FILES = ("weights", "best", "optimizer", "state")


@dataclass
class Progress:
    """Where training stands; what a checkpoint restores besides model and optimizer tensors."""

    epoch: int = 1  # the epoch in progress, 1-based (epochs + 1 once every epoch is done)
    step: int = 0  # optimizer steps already taken in that epoch
    losses: list[torch.Tensor] = field(default_factory=list)  # those steps' losses, [] scalars
    history: list[dict[str, float]] = field(default_factory=list)  # one entry per done epoch
    best: float | None = None  # the best epoch's value of the objective's best_metric
    best_epoch: int = 0
    best_state: dict[str, torch.Tensor] | None = None  # that epoch's trainable weights (CPU)
    seconds: float = 0.0  # training time before this process (earlier, killed processes)
    layout: dict[str, int] = field(default_factory=dict)  # examples, steps per epoch

    def next_epoch(self) -> None:
        self.epoch, self.step, self.losses = self.epoch + 1, 0, []

    def position(self) -> str:
        return f"epoch {self.epoch} step {self.step}"


@dataclass(frozen=True)
class Pending:
    """A checkpoint waiting to be resumed: what the run stage needs before training starts."""

    folder: Path
    run_id: str | None
    position: str  # "epoch E step S"
    history: list[dict[str, float]]


@dataclass
class Checkpoints:
    """The checkpoints of one run key; ``run_id`` is the MLflow run they belong to.

    How often they are written is ``train.checkpoint_every_steps`` (see peftflow.training.loop).
    """

    folder: Path  # outputs/checkpoints/<run key>
    run_key: str
    run_id: str | None = None

    def latest(self) -> Path | None:
        """The newest complete checkpoint folder; staging leftovers of a kill are removed."""
        if not self.folder.is_dir():
            return None
        for leftover in self.folder.glob(f"{STAGING_PREFIX}*"):
            logger.warning("removing half-written checkpoint %s (the writer was stopped)", leftover)
            shutil.rmtree(leftover, ignore_errors=True)
        complete = sorted(self.folder.glob(f"{FOLDER_PREFIX}*"))
        return complete[-1] if complete else None

    def pending(self) -> Pending | None:
        """The checkpoint a run of this key would resume from (verified), or None."""
        folder = self.latest()
        if folder is None:
            return None
        meta = _verified_meta(folder, self.run_key)
        progress = meta["progress"]
        position = f"epoch {progress['epoch']} step {progress['step']}"
        return Pending(folder, meta.get("run_id"), position, progress["history"])

    def save(
        self,
        model: nn.Module,
        optimizer,
        scheduler,
        progress: Progress,
        seconds: float,
        replica_rngs: list[RngState] | None = None,
    ):
        """Write a checkpoint of the state after ``progress`` (atomically), drop older ones.

        ``replica_rngs``: every rank's :func:`rng_state`, in rank order (data-parallel).
        """
        tensors: dict[str, dict[str, torch.Tensor]] = {name: {} for name in TENSOR_FILES}
        tensors["weights"] = trained_state(model)
        tensors["best"] = progress.best_state or {}
        meta = {
            "format_version": FORMAT_VERSION,
            "run_key": self.run_key,
            "run_id": self.run_id,
            "progress": _progress_json(progress, seconds, tensors["state"]),
            "optimizer": _to_json(optimizer.state_dict(), "optimizer", tensors["optimizer"]),
            "scheduler": _to_json(scheduler.state_dict(), "scheduler", tensors["state"]),
            "rng": _rng_json(tensors["state"]),
            "method": _to_json(_method_state(model), "method", tensors["state"]),
        }
        if replica_rngs is not None:
            meta["replicas"] = [data for data, _ in replica_rngs]
            for rank, (_, rng_tensors) in enumerate(replica_rngs):
                tensors["state"].update({f"replica.{rank}.{k}": v for k, v in rng_tensors.items()})
        name = f"{FOLDER_PREFIX}{progress.epoch:04d}-step-{progress.step:09d}"  # sorts in order
        path = _write_atomically(self.folder, name, meta, tensors)
        for older in self.folder.glob(f"{FOLDER_PREFIX}*"):
            if older != path:
                shutil.rmtree(older, ignore_errors=True)
        return path

    def restore(
        self,
        model: nn.Module,
        optimizer,
        scheduler,
        replica: tuple[int, int] | None = None,
        folder: Path | None = None,
    ) -> Progress | None:
        """Load the latest checkpoint into model, optimizer, scheduler and RNGs; its progress.

        ``replica`` is (rank, processes) in a data-parallel launch, whose ranks all read
        ``folder`` (the one rank 0 chose) and each restores its own RNG states.
        """
        folder = self.latest() if folder is None else folder
        if folder is None:
            return None
        meta = _verified_meta(folder, self.run_key)
        self._require_same_processes(meta, folder, replica[1] if replica else 1)
        tensors = {name: load_file(str(folder / f"{name}.safetensors")) for name in TENSOR_FILES}
        device = next(model.parameters()).device
        try:
            _load_trainable(model, tensors["weights"])
            optimizer.load_state_dict(_from_json(meta["optimizer"], tensors["optimizer"]))
            scheduler.load_state_dict(_from_json(meta["scheduler"], tensors["state"]))
            _restore_method_state(model, _from_json(meta["method"], tensors["state"]))
        except (ValueError, KeyError, RuntimeError) as error:
            raise TrainingError(
                f"checkpoint {folder} does not fit this model ({error}); the code that builds "
                f"the model changed since it was written. Delete {self.folder} to start over"
            ) from None
        _restore_rng(*_own_rng(meta, tensors["state"], replica))
        progress = _progress_from_json(meta["progress"], tensors, device)
        logger.info("resuming run key %s from %s (%s)", self.run_key, progress.position(), folder)
        return progress

    def _require_same_processes(self, meta: dict, folder: Path, processes: int) -> None:
        """Each replica's dropout stream is in the checkpoint: resume with as many replicas."""
        wrote = len(meta.get("replicas", [])) or 1
        if wrote != processes:
            raise TrainingError(
                f"checkpoint {folder} was written by a launch of {wrote} process(es); this one "
                f"has {processes}. Launch {wrote} again to resume it exactly, or delete "
                f"{self.folder} to train this run key from the start"
            )

    def discard(self) -> None:
        """Delete every checkpoint of this run key (the run finished, or cannot succeed)."""
        shutil.rmtree(self.folder, ignore_errors=True)


@contextmanager
def claimed(checkpoints: Checkpoints | None) -> Iterator[Checkpoints | None]:
    """``checkpoints`` while this process alone trains its run key; else None (no checkpoints).

    An advisory lock (flock) on ``<run key>.lock`` next to the folder: two processes
    training the same key at once (a study listing one variant twice) must not resume
    or overwrite each other's checkpoints. The kernel drops the lock of a killed
    process, so a resumed run is never locked out by the run it resumes. The holder
    deletes the lock file when done, so finished runs leave none behind.
    """
    if checkpoints is None:
        yield None
        return
    checkpoints.folder.parent.mkdir(parents=True, exist_ok=True)
    lock_path = checkpoints.folder.with_name(f"{checkpoints.folder.name}.lock")
    lock = _lock_exclusively(lock_path)
    if lock is None:
        logger.warning(
            "another process is training run key %s now: this run writes no checkpoints",
            checkpoints.run_key,
        )
        yield None
        return
    try:
        yield checkpoints
    finally:
        lock_path.unlink(missing_ok=True)  # still held: no one can take it in between
        lock.close()  # closing releases the flock


def _lock_exclusively(path: Path) -> IO | None:
    """The open, flock-ed file at ``path``; None when another process holds it.

    A holder deletes the file when done; a file opened just before that deletion is
    no longer the one at ``path``, so its lock would guard nothing: open it again.
    """
    while True:
        lock = open(path, "a")  # noqa: SIM115 - held open by the caller
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.close()
            return None
        if _same_file(lock, path):
            return lock
        lock.close()


def _same_file(handle: IO, path: Path) -> bool:
    try:
        on_disk = path.stat()
    except FileNotFoundError:
        return False
    held = os.fstat(handle.fileno())
    return (held.st_dev, held.st_ino) == (on_disk.st_dev, on_disk.st_ino)


# --- files ------------------------------------------------------------------------------


def _write_atomically(parent: Path, name: str, meta: dict, tensors: dict) -> Path:
    """Write every file into a staging folder, fsync, then rename it to ``parent/name``."""
    parent.mkdir(parents=True, exist_ok=True)
    staging = parent / f"{STAGING_PREFIX}{name}-{os.getpid()}"
    staging.mkdir()
    try:
        meta["files"] = {}
        for file, values in tensors.items():
            path = staging / f"{file}.safetensors"
            save_file({k: v.detach().cpu().contiguous() for k, v in values.items()}, str(path))
            meta["files"][path.name] = _sha256(path)
        (staging / META_FILE).write_text(json.dumps(meta))
        for path in staging.iterdir():  # on disk before the rename makes them visible
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
        target = parent / name
        os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _fsync_dir(parent)
    return target


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _verified_meta(folder: Path, run_key: str) -> dict:
    """meta.json of ``folder`` once its run key, format and file checksums are confirmed."""
    remove = f"delete {folder.parent} to train this run key from the start"
    try:
        meta = json.loads((folder / META_FILE).read_text())
    except (OSError, ValueError) as error:
        raise TrainingError(f"checkpoint {folder} is unreadable ({error}); {remove}") from None
    if meta.get("run_key") != run_key:
        raise TrainingError(
            f"checkpoint {folder} belongs to run key {meta.get('run_key')!r}, not {run_key!r}: "
            f"it was copied or moved there and is never used for another run; {remove}"
        )
    if meta.get("format_version") != FORMAT_VERSION:
        raise TrainingError(
            f"checkpoint {folder} has format {meta.get('format_version')!r}; this peftflow "
            f"reads format {FORMAT_VERSION}; {remove}"
        )
    for name in (f"{file}.safetensors" for file in TENSOR_FILES):
        path = folder / name
        if not path.is_file() or _sha256(path) != meta.get("files", {}).get(name):
            raise TrainingError(f"checkpoint {folder} is corrupt ({name} changed); {remove}")
    return meta


# --- tensors as safetensors, structure as JSON -----------------------------------------


def _to_json(obj: Any, key: str, tensors: dict[str, torch.Tensor]) -> Any:
    """``obj`` with each tensor moved into ``tensors`` (under a path-like key) as a reference.

    Dicts become key/value pairs (optimizer state is keyed by int) and tuples are
    marked, so ``_from_json`` rebuilds exactly what ``state_dict()`` returned.
    """
    if isinstance(obj, torch.Tensor):
        tensors[key] = obj
        return {"__tensor__": key}
    if isinstance(obj, dict):
        return {"__dict__": [[k, _to_json(v, f"{key}.{k}", tensors)] for k, v in obj.items()]}
    if isinstance(obj, list | tuple):
        items = [_to_json(v, f"{key}.{i}", tensors) for i, v in enumerate(obj)]
        return {"__tuple__": items} if isinstance(obj, tuple) else items
    if obj is None or isinstance(obj, bool | int | float | str):
        return obj
    raise TrainingError(f"cannot checkpoint {key} of type {type(obj).__name__}")


def _from_json(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, list):
        return [_from_json(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if "__tensor__" in obj:
        return tensors[obj["__tensor__"]]
    if "__tuple__" in obj:
        return tuple(_from_json(v, tensors) for v in obj["__tuple__"])
    return {k: _from_json(v, tensors) for k, v in obj["__dict__"]}


def _load_trainable(model: nn.Module, weights: dict[str, torch.Tensor]) -> None:
    """Copy the saved trainable weights in; the names must be exactly the trainable ones."""
    expected = {name for name, param in model.named_parameters() if param.requires_grad}
    if set(weights) != expected:
        missing, extra = sorted(expected - set(weights))[:3], sorted(set(weights) - expected)[:3]
        raise ValueError(f"trainable weights differ: missing {missing}, unexpected {extra}")
    model.load_state_dict(weights, strict=False)


# --- progress, RNG and method state ------------------------------------------------------


def _progress_json(progress: Progress, seconds: float, tensors: dict) -> dict:
    if progress.losses:  # float32 step losses, stored exactly: the epoch mean comes out the same
        tensors["progress.losses"] = torch.stack(progress.losses).detach().cpu()  # [step]
    return {
        "epoch": progress.epoch,
        "step": progress.step,
        "history": progress.history,
        "best": progress.best,
        "best_epoch": progress.best_epoch,
        "has_best_state": progress.best_state is not None,
        "seconds": seconds,
        "layout": progress.layout,
    }


def _progress_from_json(data: dict, tensors: dict, device: torch.device) -> Progress:
    losses = tensors["state"].get("progress.losses")
    return Progress(
        epoch=data["epoch"],
        step=data["step"],
        losses=[] if losses is None else list(losses.to(device).unbind()),
        history=data["history"],
        best=data["best"],
        best_epoch=data["best_epoch"],
        best_state=tensors["best"] if data["has_best_state"] else None,
        seconds=data["seconds"],
        layout=data["layout"],
    )


RngState = tuple[dict, dict[str, torch.Tensor]]  # JSON part, uint8 tensors


def rng_state() -> RngState:
    """This process's RNG states (python, numpy, torch CPU and CUDA), as a checkpoint holds them."""
    tensors: dict[str, torch.Tensor] = {}
    return _rng_json(tensors), tensors


def _own_rng(meta: dict, state: dict[str, torch.Tensor], replica: tuple[int, int] | None):
    """The RNG states this process restores: its rank's entry in a data-parallel checkpoint."""
    if replica is None:
        return meta["rng"], state
    prefix = f"replica.{replica[0]}."
    mine = {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
    return meta["replicas"][replica[0]], mine


def _rng_json(tensors: dict[str, torch.Tensor]) -> dict:
    """Python and numpy states as JSON; torch's CPU and CUDA states as uint8 tensors."""
    version, state, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    tensors["rng.torch"] = torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
    for index, cuda_state in enumerate(cuda):
        tensors[f"rng.cuda.{index}"] = cuda_state
    return {
        "python": [version, list(state), gauss],
        "numpy": [kind, keys.tolist(), pos, has_gauss, cached],
        "cuda_devices": len(cuda),
    }


def _restore_rng(data: dict, tensors: dict[str, torch.Tensor]) -> None:
    version, state, gauss = data["python"]
    random.setstate((version, tuple(state), gauss))
    kind, keys, pos, has_gauss, cached = data["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(tensors["rng.torch"])
    cuda = [tensors[f"rng.cuda.{i}"] for i in range(data["cuda_devices"])]
    if cuda and torch.cuda.is_available() and torch.cuda.device_count() == len(cuda):
        torch.cuda.set_rng_state_all(cuda)
    elif cuda:
        logger.warning("checkpoint has %d CUDA RNG states; not restored on this host", len(cuda))


def _rank_allocator(model: nn.Module):
    """AdaLoRA's rank allocator (importance scores live there, not in the model's weights)."""
    return getattr(getattr(model, "base_model", None), "rankallocator", None)


def _method_state(model: nn.Module) -> dict:
    """State a method keeps outside the weights: AdaLoRA's scores and its rank pattern."""
    allocator = _rank_allocator(model)
    if allocator is None:
        return {}
    return {
        "ipt": allocator.ipt,
        "exp_avg_ipt": allocator.exp_avg_ipt,
        "exp_avg_unc": allocator.exp_avg_unc,
        "rank_pattern": model.peft_config[allocator.adapter_name].rank_pattern,
    }


def _restore_method_state(model: nn.Module, state: dict) -> None:
    allocator = _rank_allocator(model)
    if allocator is None or not state:
        return
    device = next(model.parameters()).device
    for name in ("ipt", "exp_avg_ipt", "exp_avg_unc"):
        setattr(allocator, name, {k: v.to(device) for k, v in state[name].items()})
    model.peft_config[allocator.adapter_name].rank_pattern = state["rank_pattern"]
