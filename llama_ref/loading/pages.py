"""Dropping the pages of a memory-mapped checkpoint from this process's resident set once they were read.

Reading a mapped page (the non-finite check, a converting copy) maps it into the process, and it counts
in RSS until the mapping goes away -- and a weight used as it is keeps its mapping for the model's life.
Those pages are the kernel's shared page cache, not private memory, but RSS (and ``ru_maxrss``) counts
them all the same. ``madvise(MADV_DONTNEED)`` takes them out of this process's page tables without
touching the page cache: the next access maps the same cached page again (a minor fault, measured here
at ~0.05 s per 6.7 GB), or reads it from the file if the kernel evicted it meanwhile.

Safe only on a *private file* mapping whose pages were never written: DONTNEED throws away a private
page's modifications (on an anonymous mapping it would zero the data). The loader calls it during
the load, before any weight is handed out, and only on ranges inside a private mapping of the
checkpoint file itself. Linux only: elsewhere these are no-ops (RSS then includes the pages read).
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import os
import sys
from typing import TYPE_CHECKING, Optional, Sequence

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

_ENABLED = sys.platform.startswith("linux") and hasattr(mmap, "MADV_DONTNEED")
_PAGE = mmap.PAGESIZE


def _whole_pages(start: int, end: int) -> tuple[int, int]:
    """The page-aligned sub-range of [start, end): only pages holding nothing but this range."""
    return -(-start // _PAGE) * _PAGE, end // _PAGE * _PAGE


def release_mmap_range(mm: mmap.mmap, start: int, nbytes: int) -> None:
    """Drop the whole pages of ``mm[start:start + nbytes]`` from the resident set (``mm``: a private file map)."""
    if not _ENABLED:
        return
    lo, hi = _whole_pages(start, start + nbytes)
    if hi > lo:
        mm.madvise(mmap.MADV_DONTNEED, lo, hi - lo)


def file_mappings(path: str) -> tuple[tuple[int, int], ...]:
    """Address ranges of this process's *private* mappings of ``path`` (from ``/proc/self/maps``),
    e.g. the one ``torch.load(mmap=True)`` just made. Empty where that file does not exist."""
    if not _ENABLED:
        return ()
    try:
        st = os.stat(path)
        real = os.path.realpath(path)
        with open("/proc/self/maps") as f:
            lines = f.readlines()
    except OSError:
        return ()
    ranges = []
    for line in lines:
        fields = line.split(maxsplit=5)
        if len(fields) < 6 or fields[1][3:4] != "p":
            continue
        addr, _, _, dev, inode, name = fields
        try:
            major, minor = (int(x, 16) for x in dev.split(":"))
            same_inode = int(inode) == st.st_ino and os.makedev(major, minor) == st.st_dev
        except ValueError:
            continue
        if same_inode or name.rstrip("\n") == real:
            lo, hi = (int(x, 16) for x in addr.split("-"))
            ranges.append((lo, hi))
    return tuple(ranges)


_madvise: Optional[object] = None


def _advise(lo: int, hi: int, advice: int, name: str) -> None:
    global _madvise
    if _madvise is None:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
        libc.madvise.restype = ctypes.c_int
        _madvise = libc.madvise
    if _madvise(lo, hi - lo, advice) != 0:  # advice only: failing costs speed or RSS, never data
        logger.debug("madvise(%s) failed: %s", name, os.strerror(ctypes.get_errno()))


def release_address_range(ptr: int, nbytes: int, mappings: Sequence[tuple[int, int]]) -> None:
    """Drop the whole pages of ``[ptr, ptr + nbytes)`` from the resident set, if (and only if) the range lies
    inside one of ``mappings`` (private file mappings, from :func:`file_mappings`)."""
    if not _ENABLED or nbytes <= 0 or not any(lo <= ptr and ptr + nbytes <= hi for lo, hi in mappings):
        return
    lo, hi = _whole_pages(ptr, ptr + nbytes)
    if hi > lo:
        _advise(lo, hi, mmap.MADV_DONTNEED, "MADV_DONTNEED")


_HUGE = 2 * 2**20  # x86-64 and arm64 (4 KiB base pages) transparent huge page size


def prefer_huge_pages(t: "torch.Tensor") -> None:
    """Ask for transparent huge pages under a freshly allocated CPU tensor, before it is first written.

    Writing a fresh multi-MB weight costs a page fault (and zeroing) per 4 KiB page; with THP in
    ``madvise`` mode (the common default) those become one per 2 MiB -- measured here, copying 2 GiB of
    bf16 (the 7B HF q/k weights) into fresh storage took 0.9-1.2 s of CPU instead of 1.2-1.4 s. Pure advice
    (``MADV_HUGEPAGE`` changes no data), a no-op where unsupported or for tensors under 4 MiB."""
    nbytes = t.numel() * t.element_size()
    if not _ENABLED or t.device.type != "cpu" or nbytes < 2 * _HUGE or not hasattr(mmap, "MADV_HUGEPAGE"):
        return
    lo = -(-t.data_ptr() // _HUGE) * _HUGE
    hi = (t.data_ptr() + nbytes) // _HUGE * _HUGE
    if hi > lo:
        _advise(lo, hi, mmap.MADV_HUGEPAGE, "MADV_HUGEPAGE")


__all__ = ["file_mappings", "prefer_huge_pages", "release_address_range", "release_mmap_range"]
