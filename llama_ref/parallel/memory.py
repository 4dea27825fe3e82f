"""Refuse, before allocating, what would not fit: a rank's share of the weights on its device.

(``llama_ref.memory`` is being added on another branch with a general ``available_memory_bytes``;
these two helpers can use it once both are merged.)
"""

from __future__ import annotations

import os
from typing import Optional

import torch

from .collectives import TPGroup


def available_bytes(device: torch.device) -> Optional[int]:
    """Free memory of ``device`` in bytes: CUDA's free memory, or the host's ``MemAvailable``;
    ``None`` when unknown (then nothing is refused)."""
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return None
        return torch.cuda.mem_get_info(device)[0]
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        return None
    return None


def check_device(device: Optional[torch.device]) -> None:
    """A clear error for a CUDA device this machine does not have (instead of torch's assertion)."""
    if device is None or device.type != "cuda":
        return
    if not torch.cuda.is_available():
        raise ValueError(f"device={device} requested but CUDA is not available on this machine")
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"device={device} requested but only {torch.cuda.device_count()} CUDA device(s) exist")


def check_fits(nbytes: int, device: torch.device, group: TPGroup, what: str = "its share of the weights") -> None:
    """Refuse ``nbytes`` on ``device`` when they exceed its free memory. On the CPU the ranks on this
    host share the memory, so the check is for all of them (``LOCAL_WORLD_SIZE``, set by torchrun and
    by :func:`llama_ref.parallel.spawn`)."""
    if device.type == "meta":
        return
    available = available_bytes(device)
    ranks_here = 1
    if device.type == "cpu":
        try:
            ranks_here = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
        except ValueError:
            ranks_here = 1
    if available is not None and nbytes * ranks_here > available:
        raise ValueError(
            f"rank {group.rank}: {what} needs {nbytes / 2**30:.2f} GiB on {device}"
            + (f" (x {ranks_here} ranks on this host)" if ranks_here > 1 else "")
            + f" but only {available / 2**30:.2f} GiB are available; nothing was allocated"
        )
