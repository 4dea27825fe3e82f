"""Exception types for refusals that are not plain bad arguments.

Each subclasses ``ValueError`` so callers that already treat bad input as a ``ValueError`` (the
CLI maps it to exit status 2) keep working; the memory error is a ``MemoryError`` as well.
"""

from __future__ import annotations


class DeviceUnavailableError(ValueError):
    """A device was requested that this torch build or machine does not have (CUDA on a CPU-only
    build, ``cuda:7`` with one GPU, ...). Raised before anything is allocated."""


class InsufficientMemoryError(MemoryError, ValueError):
    """An allocation was refused before it was attempted: the estimate exceeds the memory the
    device has available. The message names the estimate and what is available."""


class NonFiniteError(ValueError):
    """Weights or logits hold NaN or infinity: every number computed from them would be meaningless."""


__all__ = ["DeviceUnavailableError", "InsufficientMemoryError", "NonFiniteError"]
