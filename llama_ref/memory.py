"""The memory a device has, and a refusal *before* an allocation that cannot fit.

Without it, ``Llama(llama-2-70b config, device="cpu")`` (276 GB in fp32) or ``setup_cache(10**6, ...)`` ends
in an allocator error deep inside torch or, on Linux, in the OOM killer with no message at all. The check
is a necessary condition: it refuses what cannot fit, not what fits tightly. What a model needs comes from
:mod:`llama_ref.shapes`.
"""

from __future__ import annotations

import logging
import os
from typing import Optional, Union

import torch

from .errors import InsufficientMemoryError

logger = logging.getLogger(__name__)


def available_memory_bytes(device: Union[str, torch.device]) -> Optional[int]:
    """Memory a new allocation on ``device`` can use now, in bytes; ``None`` when unknown.

    CUDA: free device memory (``torch.cuda.mem_get_info``). CPU: the kernel's ``MemAvailable`` (free plus
    reclaimable page cache) from ``/proc/meminfo``, else free physical pages. The meta device and other
    backends: ``None`` (nothing to check).
    """
    device = torch.device(device)
    if device.type == "cuda":
        try:
            free, _total = torch.cuda.mem_get_info(device)
        except (RuntimeError, AssertionError, ValueError):
            return None
        return int(free)
    if device.type == "cpu":
        try:
            with open("/proc/meminfo", encoding="utf-8") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except (OSError, ValueError, IndexError):
            pass
        try:
            return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            return None
    return None


def format_bytes(n: int) -> str:
    """'122.07 GiB (131,072,000,000 bytes)': readable, and exact for tests and bug reports."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:,.2f} {unit} ({n:,} bytes)"
    return f"{n:,} bytes"


def check_memory(need_bytes: int, device: Union[str, torch.device], what: str, *, freeable_bytes: int = 0) -> None:
    """Raise :class:`InsufficientMemoryError` when ``need_bytes`` exceed what ``device`` has available.

    ``freeable_bytes``: memory the caller releases before allocating (e.g. the old KV cache it replaces),
    counted as available. Nothing is checked on the meta device or when the amount available is unknown.
    """
    device = torch.device(device)
    available = available_memory_bytes(device)
    if available is None:
        logger.debug("%s: available memory on %s unknown; not checked", what, device)
        return
    available += freeable_bytes
    if need_bytes > available:
        source = "torch.cuda.mem_get_info" if device.type == "cuda" else "MemAvailable in /proc/meminfo"
        raise InsufficientMemoryError(
            f"{what} needs about {format_bytes(need_bytes)} on {device}, but only {format_bytes(available)} "
            f"is available ({source}); nothing was allocated"
        )


__all__ = ["available_memory_bytes", "check_memory", "format_bytes"]
