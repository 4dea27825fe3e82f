"""The one exception type of the loaders, and a helper to keep long lists of problems readable."""

from __future__ import annotations

from typing import Sequence

from ..errors import NonFiniteError


class CheckpointError(ValueError):
    """A checkpoint file is unreadable, or its tensors do not match its config.

    A ``ValueError`` subclass so callers that already catch bad input keep working. The message
    always names the file and, where there is one, the tensor. Missing files raise
    ``FileNotFoundError`` instead.
    """


def problems_message(header: str, problems: Sequence[str], limit: int = 12) -> str:
    """``header`` followed by one problem per line, cut after ``limit`` (a 70B mismatch can list 700)."""
    lines = [header] + [f"  - {p}" for p in problems[:limit]]
    if len(problems) > limit:
        lines.append(f"  ... and {len(problems) - limit} more")
    return "\n".join(lines)


def fmt_shape(shape: Sequence[int]) -> str:
    return "(" + ", ".join(str(int(s)) for s in shape) + ")"


class NonFiniteWeightError(CheckpointError, NonFiniteError):
    """A checkpoint tensor holds NaN or inf (or overflows the requested dtype). Both a
    ``CheckpointError`` and a :class:`llama_ref.errors.NonFiniteError`."""
