"""Data-parallel replicas: this process's place among N, and the collectives the loop needs.

Every process of a launch (``train.devices`` > 1; :mod:`peftflow.pipeline.launch` starts
them through accelerate) holds a replica of the model. ``train.batch_size`` stays the
*global* batch: each process takes every N-th example of every micro-batch
(:meth:`Replicas.shard`). The training forward runs through torch's
``DistributedDataParallel``, wrapped by accelerate (:meth:`Replicas.prepare`): it starts
every replica from rank 0's weights, and during the backward pass of a step's last
micro-batch it all-reduces the gradients in buckets as they become ready, overlapped
with the rest of the backward (earlier micro-batches accumulate under ``no_sync``).
Every replica then takes the same optimizer step, so a run computes the same thing as
one process with the same config (up to float summation order) and keeps its run key.
Rank 0 alone validates, logs and saves; at the end the replicas must hold bit-identical
trainable weights. Rank 0 also writes the checkpoints, with every rank's RNG states, and
a relaunch resumes every rank from them (:func:`resume_replicas`).

The training loop (:mod:`peftflow.training.loop`) asks :func:`data_parallel` for the
replicas and gets ``None`` in a single process, so that path is unchanged.

Depends on: nothing in peftflow beyond errors.
"""

from __future__ import annotations

import hashlib
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch

from peftflow.errors import TrainingError
from peftflow.training.checkpoint import Checkpoints, Progress

# Ranks > 0 wait in a collective while rank 0 ingests and checks the data, and
# while it validates each epoch: allow for a slow first ingest.
PROCESS_GROUP_TIMEOUT = timedelta(hours=2)


def world_size() -> int:
    """Processes in this launch (``WORLD_SIZE``, set by accelerate launch / torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


@dataclass(frozen=True)
class Replicas:
    """This process's place among the N replicas, and the collectives the loop needs."""

    rank: int
    size: int
    device: torch.device
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, idx: Sequence[int]) -> list[int]:
        """This rank's share of a micro-batch: every ``size``-th example (may be empty)."""
        return list(idx[self.rank :: self.size])

    def broadcast(self, value: Any) -> Any:
        """Rank 0's ``value`` (any picklable object) on every rank."""
        box = [value]
        torch.distributed.broadcast_object_list(box, src=0, device=self._comm_device)
        return box[0]

    def prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        """``model`` in ``DistributedDataParallel`` (through accelerate), for training forwards.

        The wrapper shares ``model``'s parameters: the optimizer, validation, method hooks
        (AdaLoRA) and checkpoints keep using ``model``. ``find_unused_parameters``: a
        method may hold trainable weights a forward does not reach (a pooling choice, a
        method's spare modules); DDP would otherwise wait for their gradients forever.
        """
        from accelerate import Accelerator  # deferred: only a multi-process launch needs it
        from accelerate.utils import DistributedDataParallelKwargs

        ddp = DistributedDataParallelKwargs(find_unused_parameters=True, broadcast_buffers=False)
        accelerator = Accelerator(cpu=self.device.type == "cpu", kwargs_handlers=[ddp])
        return accelerator.prepare_model(model)

    def sum(self, value: torch.Tensor) -> torch.Tensor:
        """``value`` summed over the ranks (a step's loss), the same on every rank."""
        total = value.detach().clone()
        torch.distributed.all_reduce(total)
        return total

    def all_gather(self, value: Any) -> list[Any]:
        """Every rank's ``value`` (any picklable object), in rank order, on every rank."""
        values = [None] * self.size
        torch.distributed.all_gather_object(values, value)
        return values

    def require_in_sync(self, model: torch.nn.Module) -> str:
        """sha256 of the trainable weights; raises unless every replica has the same."""
        digest = trainable_digest(model)
        digests = self.all_gather(digest)
        # One write per line: the ranks share the launcher's stdout.
        sys.stdout.write(f"peftflow ddp rank {self.rank}/{self.size} weights sha256 {digest}\n")
        sys.stdout.flush()
        if len(set(digests)) != 1:
            raise TrainingError(
                f"data-parallel replicas diverged (weight digests {digests}); every rank must "
                "run the same config and code"
            )
        return digest

    @property
    def _comm_device(self) -> torch.device | None:
        return self.device if self.backend == "nccl" else None


def resume_replicas(
    replicas: Replicas, checkpoints: Checkpoints | None, model, optimizer, scheduler
) -> tuple[Progress | None, bool]:
    """Every rank resumes from the checkpoint rank 0 found; whether the launch checkpoints.

    Rank 0 alone holds ``checkpoints`` (the run key's lock is its). It names the
    folder; every rank loads the same weights, optimizer and schedule from it and
    its own RNG states. A rank that cannot (the folder is not on its machine) fails
    every rank with its reason, rather than leaving the others waiting in a collective.
    """
    plan = replicas.broadcast(_resume_plan(checkpoints) if replicas.is_main else None)
    progress, error = None, None
    if plan["folder"] is not None:
        folder = Path(plan["folder"])
        mine = checkpoints or Checkpoints(folder.parent, plan["run_key"])
        try:
            progress = _restore_replica(replicas, mine, folder, model, optimizer, scheduler)
        except TrainingError as err:
            error = str(err)
    _raise_any(replicas.all_gather(error))
    return progress, plan["checkpointing"]


def _raise_any(errors: list[str | None]) -> None:
    """One TrainingError naming the ranks that failed, each distinct reason once."""
    by_reason: dict[str, list[int]] = {}
    for rank, reason in enumerate(errors):
        if reason:
            by_reason.setdefault(reason, []).append(rank)
    if by_reason:
        raise TrainingError(
            "; ".join(
                f"rank{'s' if len(ranks) > 1 else ''} {', '.join(map(str, ranks))}: {reason}"
                for reason, ranks in by_reason.items()
            )
        )


def _resume_plan(checkpoints: Checkpoints | None) -> dict:
    """Rank 0: whether to checkpoint, and the folder every rank resumes from (or None)."""
    latest = checkpoints.latest() if checkpoints else None
    return {
        "checkpointing": checkpoints is not None,
        "folder": None if latest is None else str(latest),
        "run_key": checkpoints.run_key if checkpoints else None,
    }


def _restore_replica(replicas, checkpoints, folder: Path, model, optimizer, scheduler):
    if not folder.is_dir():
        raise TrainingError(
            f"checkpoint {folder} is not on this machine: data-parallel resumes need outputs/ "
            "on a filesystem every rank reads (or set train.checkpoint_every_steps: 0)"
        )
    replica = (replicas.rank, replicas.size)
    return checkpoints.restore(model, optimizer, scheduler, replica, folder)


def trainable_digest(model: torch.nn.Module) -> str:
    """A fingerprint of the trainable weights (bytes, in parameter order)."""
    sha = hashlib.sha256()
    for name, param in model.named_parameters():
        if param.requires_grad:
            sha.update(name.encode())
            sha.update(param.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return sha.hexdigest()


def data_parallel(requested_device: str = "auto") -> Replicas | None:
    """The replicas of a multi-process launch; ``None`` in a single process.

    Initialises the process group on first use through accelerate's
    ``PartialState``: NCCL with one GPU per process when CUDA is visible (and
    ``train.device`` is not "cpu"), else gloo on the CPU.
    """
    if world_size() <= 1:
        return None
    from accelerate import PartialState

    if requested_device == "cuda" and not torch.cuda.is_available():
        raise TrainingError("train.device is 'cuda' but no CUDA GPU is visible; use 'auto'")
    state = PartialState(cpu=_use_cpu(requested_device), timeout=PROCESS_GROUP_TIMEOUT)
    return Replicas(state.process_index, state.num_processes, state.device, str(state.backend))


def _use_cpu(requested_device: str) -> bool:
    forced = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
    return forced or requested_device == "cpu" or not torch.cuda.is_available()
