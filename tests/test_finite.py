"""llama_ref.finite: the one-reduction NaN/inf check (sum first, aminmax when the sum is not finite)."""

from __future__ import annotations

import pytest
import torch

from llama_ref import finite
from llama_ref.finite import all_finite, describe_nonfinite, nonfinite_counts


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("where", [0, 4097, -1])
def test_one_bad_element_anywhere_is_found(dtype, bad, where):
    t = torch.randn(3 * 4096 + 5, generator=torch.Generator().manual_seed(0)).to(dtype)
    assert all_finite(t)
    t[where] = bad
    assert not all_finite(t)


def test_plus_and_minus_inf_together_are_found():
    t = torch.zeros(1000)
    t[3], t[900] = float("inf"), float("-inf")
    assert not all_finite(t)


def test_a_sum_that_overflows_is_not_a_false_alarm(monkeypatch):
    # 3 * 60000 overflows fp16 (max 65504) in the sum; every element is finite: aminmax must decide.
    calls = []
    real = torch.aminmax
    monkeypatch.setattr(finite.torch, "aminmax", lambda t: (calls.append(1), real(t))[1])
    t = torch.full((3,), 60000.0, dtype=torch.float16)
    assert not torch.isfinite(t.sum())
    assert all_finite(t) and calls == [1]


def test_a_finite_sum_needs_no_second_pass(monkeypatch):
    monkeypatch.setattr(finite.torch, "aminmax", lambda t: pytest.fail("aminmax ran on a finite sum"))
    assert all_finite(torch.randn(10_000).bfloat16())
    assert all_finite(torch.randn(100).bfloat16(), as_dtype=torch.float32)  # widening cannot overflow


@pytest.mark.parametrize("value, target, ok", [
    (1e6, torch.float16, False),      # > 65504
    (65519.0, torch.float16, True),   # rounds down to 65504
    (65520.0, torch.float16, False),  # rounds up to inf
    (-1e6, torch.float16, False),
    (3.4e38, torch.bfloat16, False),  # fp32 near its max: beyond bf16's largest finite value
    (1e38, torch.bfloat16, True),
    (1e6, torch.float32, True),
])
def test_as_dtype_catches_overflow_of_the_conversion(value, target, ok):
    t = torch.randn(1000, dtype=torch.float32)
    t[17] = value
    assert all_finite(t, as_dtype=target) == ok
    assert all_finite(t)  # finite as stored


def test_trivial_tensors():
    assert all_finite(torch.empty(0))
    assert all_finite(torch.tensor([1, 2, 3]))
    assert all_finite(torch.empty(5, device="meta"))
    z = torch.zeros(4, dtype=torch.complex64)
    assert all_finite(z)
    z[2] = complex(0, float("inf"))
    assert not all_finite(z)


def test_counts_and_description():
    t = torch.zeros(10)
    t[1], t[2], t[3] = float("nan"), float("inf"), 1e6
    assert nonfinite_counts(t) == (1, 1)
    assert nonfinite_counts(t, as_dtype=torch.float16) == (1, 2)  # 1e6 overflows fp16
    assert describe_nonfinite(t) == "1 NaN and 1 inf among 10 values"
