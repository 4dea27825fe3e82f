"""Refuse, before allocating, what would not fit: a rank's share of the weights on its device."""

from __future__ import annotations

import os
from typing import Optional

import torch

from ..devices import resolve_device
from ..memory import check_memory
from .collectives import TPGroup


def check_device(device: Optional[torch.device]) -> None:
    """A clear error for a device this machine does not have (instead of torch's assertion)."""
    if device is not None:
        resolve_device(device)


def check_fits(nbytes: int, device: torch.device, group: TPGroup, what: str = "its share of the weights") -> None:
    """Refuse ``nbytes`` on ``device`` when they exceed its free memory. On the CPU the ranks on this
    host share the memory, so the check is for all of them (``LOCAL_WORLD_SIZE``, set by torchrun and
    by :func:`llama_ref.parallel.spawn`)."""
    if device.type == "meta":
        return
    ranks_here = 1
    if device.type == "cpu":
        try:
            ranks_here = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
        except ValueError:
            ranks_here = 1
    check_memory(nbytes * ranks_here, device,
                 f"rank {group.rank}: {what}" + (f" (x {ranks_here} ranks on this host)" if ranks_here > 1 else ""))
