"""The hardware peak table (datasheet figures) and the on-the-spot CPU measurement."""

from __future__ import annotations

import math

import pytest

from counters.studies import hardware as hwmod
from counters.studies.hardware import (HARDWARE_NAMES, Hardware, detect_table_name, get_hardware, measure_copy_bandwidth,
                               measure_device, measure_matmul_peak, table_hardware)


@pytest.mark.parametrize("name, peak, bw", [
    ("h100-sxm", 989e12, 3.35e12),     # H100 SXM: BF16 1,979 TFLOPS sparse -> 989 dense (torchtitan's); 3.35 TB/s HBM3
    ("h100-pcie", 756e12, 2.0e12),     # H100 PCIe: BF16 1,513 sparse -> 756 dense; 2 TB/s
    ("a100-80g", 312e12, 2.039e12),    # A100 80GB SXM: BF16 312 dense (624 sparse); 2,039 GB/s
])
def test_table_entries_are_the_dense_datasheet_figures(name, peak, bw):
    hw = table_hardware(name)
    assert hw.dtype == "bf16" and not hw.measured
    assert hw.peak_flops == pytest.approx(peak, rel=1e-12)
    assert hw.mem_bw == pytest.approx(bw, rel=1e-12)
    assert "Datasheet" in hw.source and "NVIDIA" in hw.source
    assert hw.ridge_point == pytest.approx(peak / bw)
    assert get_hardware(name) == hw  # GPUs default to bf16
    d = hw.to_dict()
    assert d["ridge_point"] == pytest.approx(peak / bw) and d["name"] == name


def test_h100_sxm_peak_is_989e12_as_torchtitan_uses():
    # the figure MFU reports divide by; the datasheet's 1,979 TFLOPS is with 2:4 sparsity
    hw = table_hardware("h100-sxm")
    assert hw.peak_flops == 989 * 10 ** 12 == table_hardware("h100-sxm", "fp16").peak_flops
    assert "1,979" in hw.source and "sparsity" in hw.source and "torchtitan" in hw.source and "989 " in hw.source
    assert "989e12" in hwmod.__doc__ and "torchtitan" in hwmod.__doc__


def test_table_figures_are_exact_integers():
    # a Fraction of the peak is the decimal figure itself: 494.7e12 is exactly 494,700,000,000,000
    # (494.7 * 1e12 would not be), so an MFU against it is an exact ratio of integers
    for name in HARDWARE_NAMES:
        if name == "cpu":
            continue
        for dtype in ("bf16", "fp16", "tf32", "fp32"):
            hw = table_hardware(name, dtype)
            assert hw.peak_flops.is_integer() and hw.mem_bw.is_integer(), (name, dtype)
    assert table_hardware("h100-sxm", "tf32").peak_flops == 494_700_000_000_000
    assert table_hardware("a100-80g").mem_bw == 2_039_000_000_000


def test_fp16_equals_bf16_and_fp32_is_much_lower():
    for name in ("h100-sxm", "h100-pcie", "a100-80g"):
        bf16, fp16, fp32 = (table_hardware(name, d) for d in ("bf16", "fp16", "fp32"))
        assert fp16.peak_flops == bf16.peak_flops
        assert fp32.peak_flops < bf16.peak_flops / 10
        assert fp32.mem_bw == bf16.mem_bw


def test_unknown_names_and_dtypes_are_refused():
    with pytest.raises(ValueError, match="unknown hardware"):
        table_hardware("tpu-v9")
    with pytest.raises(ValueError, match="no int8 peak"):
        table_hardware("h100-sxm", "int8")
    with pytest.raises(ValueError, match="unknown dtype"):
        measure_device("cpu", "int4")
    assert set(HARDWARE_NAMES) == {"h100-sxm", "h100-pcie", "a100-80g", "cpu"}


@pytest.mark.parametrize("device_name, expected", [
    ("NVIDIA H100 80GB HBM3", "h100-sxm"),
    ("NVIDIA H100 PCIe", "h100-pcie"),
    ("NVIDIA A100-SXM4-80GB", "a100-80g"),
    ("NVIDIA A100-SXM4-40GB", None),
    ("NVIDIA A100 80GB PCIe", None),
    ("Tesla T4", None),
])
def test_detect_table_name(device_name, expected):
    assert detect_table_name(device_name) == expected


def test_cpu_measurement_is_positive_finite_and_cached(monkeypatch):
    monkeypatch.setattr(hwmod, "_MEASURED", {})
    hw = measure_device("cpu", "fp32", n=128, repeats=2, nbytes=4 * 2**20)
    assert isinstance(hw, Hardware) and hw.measured and hw.name == "cpu" and hw.dtype == "fp32"
    assert math.isfinite(hw.peak_flops) and hw.peak_flops > 1e6
    assert math.isfinite(hw.mem_bw) and hw.mem_bw > 1e6
    assert "measured" in hw.source and hw.details["threads"] >= 1
    # Same parameters: the cached object, not a new measurement.
    assert measure_device("cpu", "fp32", n=128, repeats=2, nbytes=4 * 2**20) is hw
    assert get_hardware("cpu", n=128, repeats=2, nbytes=4 * 2**20) is hw  # cpu defaults to fp32


def test_measure_primitives():
    assert measure_matmul_peak("cpu", n=64, repeats=1) > 0
    assert measure_copy_bandwidth("cpu", nbytes=2**20, repeats=1) > 0
