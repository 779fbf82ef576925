"""A run's peak memory: CUDA's allocator peak, or the CPU process's RSS high-water mark.

Depends on: nothing in peftflow.
"""

from __future__ import annotations

import contextlib
import resource
from pathlib import Path

import torch

_PROC_STATUS = Path("/proc/self/status")

_PROC_CLEAR_REFS = Path("/proc/self/clear_refs")


def reset_peak_memory(device: torch.device) -> None:
    """Start counting this run's peak: CUDA's allocator peak, or the RSS high-water mark.

    A flow process runs many stages (and a study many variants): the process's
    lifetime peak would charge a run for what ran before it. Linux resets VmHWM
    when "5" is written to /proc/self/clear_refs; elsewhere the lifetime peak stays.
    """
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    # Not Linux, or not allowed: peak_memory_mb then reads the lifetime peak.
    with contextlib.suppress(OSError):
        _PROC_CLEAR_REFS.write_text("5")


def peak_memory_mb(device: torch.device) -> float:
    """CUDA max allocated on GPU; on CPU the RSS high-water mark since reset_peak_memory."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        status = _PROC_STATUS.read_text()
        return int(status.split("VmHWM:")[1].split()[0]) / 1024  # "VmHWM:  123 kB"
    except (OSError, IndexError, ValueError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
