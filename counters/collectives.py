"""Collectives: the communication of a tensor-parallel forward, recorded per row with its bytes.

A collective is communication, not arithmetic: 0 MACs and 0 FLOPs. What it costs is bytes over a link,
so every counter records each collective a row runs as a :class:`Collective` (the op, the elements and
bytes of the tensor it produces, the world size) and the cross-check compares them row by row exactly,
like the counts.

Two byte figures per collective, per rank:

* ``payload_bytes`` - numel x itemsize of the tensor the collective produces: the reduced tensor of an
  all-reduce, the gathered output of an all-gather. This is nccl-tests' message size ``S``.
* ``ring_bytes`` - what each rank sends (and receives) over its link with the standard ring algorithms:
  an all-reduce is a reduce-scatter plus an all-gather, ``2 (N-1)/N x S``; an all-gather ``(N-1)/N x S``
  of its *output* size. This is the "bus bandwidth" convention of nccl-tests (``doc/PERFORMANCE.md`` in
  NVIDIA/nccl-tests: ``busBw = algBw x 2(n-1)/n`` for all-reduce, ``x (n-1)/n`` for all-gather), so
  ``ring_bytes / link bandwidth`` is the collective's time at a link's unidirectional bandwidth. When
  ``S`` is not divisible by ``N`` (never in Meta's layout, which splits every dimension evenly) the ring
  sends chunks of ``ceil(numel / N)`` elements and the figure is that of the busiest rank.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping

__all__ = ["ALL_GATHER", "ALL_REDUCE", "COLLECTIVE_OPS", "Collective", "collectives_total", "format_collective"]

ALL_REDUCE = "all_reduce"
ALL_GATHER = "all_gather"
COLLECTIVE_OPS = (ALL_REDUCE, ALL_GATHER)


@dataclass(frozen=True, order=True)
class Collective:
    """One collective one rank runs: ``op`` producing ``numel`` elements of ``itemsize`` bytes over a world
    of ``world_size`` ranks."""

    op: str
    numel: int
    itemsize: int
    world_size: int

    def __post_init__(self) -> None:
        if self.op not in COLLECTIVE_OPS:
            raise ValueError(f"unknown collective {self.op!r}; known: {', '.join(COLLECTIVE_OPS)}")
        for name in ("numel", "itemsize", "world_size"):
            v = getattr(self, name)
            if type(v) is not int or v < (1 if name == "world_size" else 0):
                raise ValueError(f"collective {name} must be a non-negative int (world_size >= 1), got {v!r}")

    @property
    def payload_bytes(self) -> int:
        """Bytes of the tensor the collective produces (nccl-tests' message size)."""
        return self.numel * self.itemsize

    @property
    def ring_bytes(self) -> int:
        """Bytes each rank sends over its link with the ring algorithm (nccl-tests' bus-bandwidth bytes)."""
        n = self.world_size
        chunk = -(-self.numel // n) * self.itemsize  # ceil(numel / n) elements
        steps = 2 * (n - 1) if self.op == ALL_REDUCE else n - 1
        return steps * chunk

    def to_dict(self) -> dict:
        return {"op": self.op, "numel": self.numel, "itemsize": self.itemsize, "world_size": self.world_size,
                "payload_bytes": self.payload_bytes, "ring_bytes": self.ring_bytes}


def collectives_total(counts: Iterable[Mapping[Collective, int]]) -> dict[str, int]:
    """``{"calls", "payload_bytes", "ring_bytes"}`` summed over mappings of collective -> calls."""
    out = {"calls": 0, "payload_bytes": 0, "ring_bytes": 0}
    for per_row in counts:
        for c, k in per_row.items():
            out["calls"] += k
            out["payload_bytes"] += k * c.payload_bytes
            out["ring_bytes"] += k * c.ring_bytes
    return out


def format_collective(c: Collective) -> str:
    return f"{c.op} of {c.numel:,} x {c.itemsize} B over {c.world_size} ranks"
