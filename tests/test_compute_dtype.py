"""llama_ref.compute_dtype: "auto" picks the weight dtype where the device multiplies it natively, fp32
otherwise; explicit values win; bad values are refused naming them. Both CPU branches, the CUDA branches
and the probe are exercised by mocking the capability; the real machine is only asked for consistency."""

from __future__ import annotations

import contextlib

import pytest
import torch

from llama_ref import compute_dtype as cd
from llama_ref.compute_dtype import AUTO, CpuFlags, parse_compute_dtype, resolve_compute_dtype

BF16, FP16, FP32, FP64 = torch.bfloat16, torch.float16, torch.float32, torch.float64


@pytest.fixture
def cpu(monkeypatch):
    """Pretend this is an x86 CPU with the given /proc/cpuinfo flags (and oneDNN support as given)."""

    def _set(*flags, onednn=True):
        monkeypatch.setattr(cd, "cpu_flags", lambda: CpuFlags(frozenset(flags), "/proc/cpuinfo"))
        monkeypatch.setattr(cd, "mkldnn_supports", lambda dtype: onednn)
        monkeypatch.setattr(cd, "probe_cpu_matmul", lambda dtype: pytest.fail("probed although the flags decide"))

    return _set


@pytest.fixture
def no_capability_queries(monkeypatch):
    def fail(*args):
        pytest.fail("a device capability was queried")

    for name in ("cpu_native", "cuda_native", "cpu_flags", "probe_cpu_matmul"):
        monkeypatch.setattr(cd, name, fail)


# ---------------------------------------------------------------------------- explicit values win
@pytest.mark.parametrize("requested, want", [(BF16, BF16), ("fp16", FP16), ("torch.float32", FP32), (" BF16 ", BF16),
                                             ("double", FP64), (FP32, FP32)])
@pytest.mark.parametrize("device", ["cpu", "meta", "cuda:3"])
def test_explicit_dtype_wins_everywhere(no_capability_queries, requested, want, device):
    dtype, reason = resolve_compute_dtype(requested, device, BF16)
    assert dtype == want and "requested explicitly" in reason


def test_explicit_bf16_on_a_cpu_without_native_bf16_is_still_bf16(cpu):
    cpu("avx2")
    assert resolve_compute_dtype("bf16", "cpu", FP32)[0] == BF16


@pytest.mark.parametrize("value", [None, "auto", "AUTO", " Auto "])
def test_auto_spellings(value):
    assert parse_compute_dtype(value) == AUTO


@pytest.mark.parametrize("bad", ["fp8", "int8", "", "autox", 3, 2.0, True, torch.int32, torch.complex64, [BF16]])
def test_bad_requests_are_refused_naming_the_value(bad):
    with pytest.raises(ValueError, match="compute_dtype") as e:
        resolve_compute_dtype(bad, "cpu", BF16)
    assert repr(bad) in str(e.value) or str(bad) in str(e.value)


def test_bad_device_and_weight_dtype_are_refused():
    with pytest.raises(ValueError, match="device='gpu'"):
        resolve_compute_dtype("auto", "gpu", BF16)
    with pytest.raises(ValueError, match="weight_dtype=torch.int8"):
        resolve_compute_dtype("auto", "cpu", torch.int8)
    with pytest.raises(ValueError, match="weight_dtype=None"):
        resolve_compute_dtype("auto", "cpu", None)


# ---------------------------------------------------------------------------- fp32/fp64 weights, meta, others
@pytest.mark.parametrize("weight", [FP32, FP64])
@pytest.mark.parametrize("device", ["cpu", "cuda", "meta", "mps"])
def test_wide_weights_compute_in_their_own_dtype(no_capability_queries, weight, device):
    dtype, reason = resolve_compute_dtype("auto", device, weight)
    assert dtype == weight and "the weights are" in reason


@pytest.mark.parametrize("weight", [BF16, FP16])
def test_meta_device_computes_in_the_weight_dtype(no_capability_queries, weight):
    dtype, reason = resolve_compute_dtype("auto", "meta", weight)
    assert dtype == weight and "meta device runs no kernels" in reason


def test_other_accelerators_keep_the_weight_dtype(no_capability_queries):
    assert resolve_compute_dtype("auto", "mps", BF16)[0] == BF16


# ---------------------------------------------------------------------------- CPU: both branches, mocked
def test_avx2_only_cpu_computes_bf16_weights_in_fp32(cpu):
    cpu("sse4_2", "avx", "avx2", "fma", "f16c")
    dtype, reason = resolve_compute_dtype("auto", "cpu", BF16)
    assert dtype == FP32
    assert "no AMX-BF16 or AVX512-BF16" in reason and "/proc/cpuinfo" in reason and "upcast" in reason


def test_avx512_without_bf16_is_not_enough(cpu):
    cpu("avx2", "avx512f", "avx512bw", "avx512_vnni")
    assert resolve_compute_dtype("auto", "cpu", BF16)[0] == FP32


@pytest.mark.parametrize("flags, named", [(("avx2", "avx512f", "amx_tile", "amx_bf16", "avx512_bf16"), "AMX-BF16"),
                                          (("avx2", "avx512f", "avx512_bf16"), "AVX512-BF16")])
def test_cpu_with_native_bf16_computes_in_bf16(cpu, flags, named):
    cpu(*flags)
    dtype, reason = resolve_compute_dtype("auto", "cpu", BF16)
    assert dtype == BF16 and named in reason and "native" in reason


def test_native_flag_without_onednn_support_falls_back(cpu):
    cpu("amx_bf16", onednn=False)
    dtype, reason = resolve_compute_dtype("auto", "cpu", BF16)
    assert dtype == FP32 and "AMX-BF16" in reason and "oneDNN" in reason


@pytest.mark.parametrize("flags, want", [(("amx_fp16",), FP16), (("avx512_fp16",), FP16),
                                         (("amx_bf16", "avx512_bf16", "avx2"), FP32)])
def test_fp16_weights_need_fp16_extensions(cpu, flags, want):
    cpu(*flags)
    dtype, reason = resolve_compute_dtype("auto", "cpu", FP16)
    assert dtype == want
    if want == FP32:
        assert "no AMX-FP16 or AVX512-FP16" in reason


def test_cpuinfo_parsing():
    text = "processor\t: 0\nvendor_id\t: GenuineIntel\nflags\t\t: fpu sse2 avx2 amx_bf16\nbugs\t\t: spectre_v1\n"
    assert cd.parse_cpuinfo_flags(text) == frozenset({"fpu", "sse2", "avx2", "amx_bf16"})
    assert cd.parse_cpuinfo_flags("processor : 0\nFeatures : fp asimd bf16\n") is None  # ARM: the probe decides


def test_this_machine_is_self_consistent():
    # Not a hard-coded answer: whatever this CPU is, the flags (or the probe) and the choice agree.
    native, _ = cd.cpu_native(BF16)
    dtype, reason = resolve_compute_dtype("auto", "cpu", BF16)
    assert dtype == (BF16 if native else FP32) and reason.endswith("(auto)")
    assert cd.cpu_flags() is cd.cpu_flags()  # cached per process


# ---------------------------------------------------------------------------- the probe (non-x86 CPUs)
@pytest.fixture
def probe(monkeypatch):
    """Non-x86 CPU: the probe decides. Returns the list of timed shapes; timings come from ``times``."""
    monkeypatch.setattr(cd, "cpu_flags", lambda: None)
    cd.probe_cpu_matmul.cache_clear()
    calls = []
    times = {}

    def fake(dtype, shape, reps=3):
        calls.append((dtype, shape))
        return times[shape]

    monkeypatch.setattr(cd, "_time_matmuls", fake)
    yield calls, times
    cd.probe_cpu_matmul.cache_clear()


def test_probe_finds_an_emulated_dtype_with_the_tiny_matmul_alone(probe):
    calls, times = probe
    times[cd._TINY] = (5e-3, 1e-5)  # 500x slower than the upcast: emulated
    dtype, reason = resolve_compute_dtype("auto", "cpu", BF16)
    assert dtype == FP32 and "probe" in reason and "8x128x128" in reason
    assert calls == [(BF16, cd._TINY)]


def test_probe_picks_native_when_the_small_matmul_is_faster(probe):
    calls, times = probe
    times[cd._TINY] = (4e-5, 1.6e-5)  # overheads at the tiny size: not conclusive
    times[cd._SMALL] = (5e-4, 1.66e-3)
    dtype, reason = resolve_compute_dtype("auto", "cpu", BF16)
    assert dtype == BF16 and "64x1024x1024" in reason
    assert calls == [(BF16, cd._TINY), (BF16, cd._SMALL)]


def test_probe_keeps_fp32_when_native_is_slower(probe):
    _, times = probe
    times[cd._TINY] = (4e-5, 1.6e-5)
    times[cd._SMALL] = (2e-3, 1.66e-3)
    assert resolve_compute_dtype("auto", "cpu", FP16)[0] == FP32


def test_probe_runs_once_per_process_and_dtype(probe):
    calls, times = probe
    times[cd._TINY] = (5e-3, 1e-5)
    for _ in range(3):
        resolve_compute_dtype("auto", "cpu", BF16)
    resolve_compute_dtype("auto", "cpu", FP16)
    resolve_compute_dtype("auto", "cpu", FP16)
    assert calls == [(BF16, cd._TINY), (FP16, cd._TINY)]


def test_real_probe_restores_the_thread_count():
    before = torch.get_num_threads()
    native, upcast = cd._time_matmuls(BF16, cd._TINY, reps=1)
    assert native > 0 and upcast > 0 and torch.get_num_threads() == before


# ---------------------------------------------------------------------------- CUDA, mocked
@pytest.fixture
def gpu(monkeypatch):
    def _set(capability, hip=None, rocm_bf16=False):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: capability)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
        monkeypatch.setattr(torch.version, "hip", hip)
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: rocm_bf16)
        monkeypatch.setattr(torch.cuda, "device", lambda index: contextlib.nullcontext())
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)

    return _set


@pytest.mark.parametrize("capability, want", [((7, 5), FP32), ((7, 0), FP32), ((8, 0), BF16), ((9, 0), BF16)])
def test_cuda_bf16_needs_compute_capability_8(gpu, capability, want):
    gpu(capability)
    dtype, reason = resolve_compute_dtype("auto", "cuda:0", BF16)
    assert dtype == want
    assert f"{capability[0]}.{capability[1]}" in reason
    if want == FP32:
        assert "< 8.0" in reason and "upcast" in reason


def test_cuda_without_index_asks_the_current_device(gpu):
    gpu((8, 6))
    want = "bf16: CUDA device cuda:0 (compute capability 8.6) has native bf16 matmuls (auto)"
    assert resolve_compute_dtype("auto", "cuda", BF16) == (BF16, want)


def test_cuda_fp16_is_always_native(gpu):
    gpu((6, 0))
    assert resolve_compute_dtype("auto", "cuda:1", FP16)[0] == FP16


@pytest.mark.parametrize("supported, want", [(True, BF16), (False, FP32)])
def test_rocm_asks_torch(gpu, supported, want):
    gpu((9, 0), hip="6.0", rocm_bf16=supported)
    dtype, reason = resolve_compute_dtype("auto", "cuda:0", BF16)
    assert dtype == want and "ROCm" in reason


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_real_cuda_device():
    cap = torch.cuda.get_device_capability(0)
    assert resolve_compute_dtype("auto", "cuda:0", BF16)[0] == (BF16 if cap >= (8, 0) else FP32)
    assert resolve_compute_dtype("auto", "cuda:0", FP16)[0] == FP16


def test_cuda_that_is_not_there_is_refused_not_guessed():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    from llama_ref.errors import DeviceUnavailableError

    with pytest.raises(DeviceUnavailableError, match="'cuda'.*CUDA is not available here"):
        resolve_compute_dtype("auto", "cuda", torch.bfloat16)
    assert resolve_compute_dtype(torch.float32, "cuda", torch.bfloat16)[0] == torch.float32  # explicit: no query
