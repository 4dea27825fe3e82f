"""llama_ref.dtypes: the one dtype table, and every other table derived from it."""

from __future__ import annotations

import pytest
import torch

from llama_ref.dtypes import (DTYPES, HF_CONFIG_NAMES, SAFETENSORS_CODES, WEIGHT_DTYPES, names, parse_dtype,
                              short_name, torch_name)


@pytest.mark.parametrize("text, dtype", [
    ("bf16", torch.bfloat16), ("BFloat16", torch.bfloat16), ("torch.bfloat16", torch.bfloat16),
    ("fp32", torch.float32), ("float", torch.float32), (" half ", torch.float16), ("double", torch.float64),
])
def test_names_parse(text, dtype):
    assert parse_dtype(text, "dtype") is dtype


def test_none_and_dtypes_pass_through():
    assert parse_dtype(None, "dtype") is None
    assert parse_dtype(torch.float16, "dtype") is torch.float16


@pytest.mark.parametrize("value, needle", [
    ("int8", "is not a dtype"), ("", "is not a dtype"), (3, "is not a dtype"),
    (torch.int32, "not a floating-point dtype"), (torch.float8_e4m3fn, "not supported here"),
])
def test_refused(value, needle):
    with pytest.raises(ValueError, match=needle) as e:
        parse_dtype(value, "--dtype")
    assert str(e.value).startswith("--dtype=")


def test_allowed_subset():
    assert parse_dtype("bf16", "dtype", allowed=(torch.bfloat16,)) is torch.bfloat16
    with pytest.raises(ValueError, match="use one of bf16"):
        parse_dtype("fp32", "dtype", allowed=(torch.bfloat16,))


def test_the_tables_agree():
    assert set(DTYPES.values()) == set(WEIGHT_DTYPES) == set(SAFETENSORS_CODES.values())
    for dtype in WEIGHT_DTYPES:
        assert DTYPES[short_name(dtype)] is dtype and DTYPES[torch_name(dtype)] is dtype
    for name in HF_CONFIG_NAMES:  # what transformers does with config.json's dtype
        assert getattr(torch, name) is DTYPES[name]
    assert "bf16" not in HF_CONFIG_NAMES
    assert names((torch.float16,)) == ["float16", "fp16", "half"]


def test_the_commands_use_it():
    from counters.commands.models import DTYPES as COMMAND_DTYPES
    from counters.studies.hardware import DTYPE_BYTES, DTYPE_NAMES

    assert all(DTYPES[n] is d for n, d in COMMAND_DTYPES.items())
    assert set(COMMAND_DTYPES.values()) == {torch.float32, torch.bfloat16, torch.float16}
    assert DTYPE_NAMES["tf32"] is torch.float32 and DTYPE_BYTES == {"bf16": 2, "fp16": 2, "fp32": 4, "tf32": 4}
