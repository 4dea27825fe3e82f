"""Which dtype a model computes in: ``resolve_compute_dtype(requested, device, weight_dtype)``.

Why it depends on the machine. A bf16 (or fp16) weight can be multiplied as it is, or upcast to fp32
on every call and multiplied in fp32. Which is faster depends on whether the device has native
matmuls for the weight dtype:

* On a CPU with AMX-BF16 (this project's 2-core test machine; issue 16), oneDNN's native bf16 matmul
  is 5-8x faster than upcasting. For one 11008x4096 weight, the issue measured 82 ms native against
  651 ms upcast at 256 tokens, and 42 ms against 333 ms at 16 tokens. Measured again here (other jobs
  running): 32-92 ms against 272-430 ms at 256 tokens, and 12-24 ms against 132-251 ms at 16. Plain
  fp32 weights took 180-261 ms and 41-59 ms: native bf16 even beats an fp32 model.
  A whole 7B 16-token forward took 0.64 s in bf16 against 8.96 s upcast.
* On a CPU without native bf16 (AVX2 only), bf16 matmuls are emulated and hundreds of times slower
  than fp32: there the upcast is right.
* fp16 follows the same rule with AMX-FP16 or AVX512-FP16. Measured here (AVX512-FP16, no AMX-FP16):
  native fp16 took 22-48 ms against 124 ms upcast at 16 tokens, and 161-326 ms against 272 ms at 256.
* CUDA has native fp16 matmuls on every GPU, and native bf16 from compute capability 8.0 (Ampere).

So ``"auto"`` picks the weight dtype where the device multiplies it natively, and fp32 otherwise.
fp32 and fp64 weights compute in their own dtype everywhere. An explicit dtype always wins.

How a CPU is judged. On x86 the instruction-set extensions decide, read from ``/proc/cpuinfo`` (Linux)
or from torch's cpuinfo queries (``torch.cpu._is_avx512_bf16_supported``, ``_is_amx_tile_supported``,
``_is_amx_fp16_supported``; other systems). torch must also be able to use them through oneDNN
(``torch.ops.mkldnn._is_mkldnn_bf16_supported``). On other CPUs (ARM, ...) the flags do not tell how
torch's kernels behave, so a one-off probe times a small matmul both ways. The probe is cached per
process: it runs at most once per dtype.

The meta device runs no kernels and has no capabilities. A meta model computes in the weight dtype,
which is what a device with native matmuls (CUDA, an AMX CPU) would run. Shape-only runs (counting
MACs, memory estimates) then see the activations a real bf16 run would have, whatever the host.
"""

from __future__ import annotations

import functools
import logging
import platform
import sys
import time
from dataclasses import dataclass
from typing import Callable, Optional, Union

import torch

from .devices import DeviceLike, parse_device
from .dtypes import DTYPES, names, parse_dtype, short_name
from .errors import DeviceUnavailableError

logger = logging.getLogger(__name__)

AUTO = "auto"
ComputeDtypeLike = Union[None, str, torch.dtype]

# The CPU extensions that give native matmuls in each low-precision dtype, best first.
NATIVE_CPU_FLAGS: dict[torch.dtype, tuple[str, ...]] = {
    torch.bfloat16: ("amx_bf16", "avx512_bf16"),
    torch.float16: ("amx_fp16", "avx512_fp16"),
}
_FLAG_NAMES = {"amx_bf16": "AMX-BF16", "avx512_bf16": "AVX512-BF16", "amx_fp16": "AMX-FP16",
               "avx512_fp16": "AVX512-FP16"}
CUDA_BF16_CAPABILITY = (8, 0)
_X86 = {"x86_64", "amd64", "i386", "i686", "x86"}


# ---------------------------------------------------------------------------- the decision
def parse_compute_dtype(value: ComputeDtypeLike) -> Union[str, torch.dtype]:
    """``AUTO`` for ``"auto"`` (any case) or ``None``; otherwise a validated floating dtype (a
    ``torch.dtype`` or a name from :mod:`llama_ref.dtypes`). ``ValueError`` naming the value otherwise."""
    if value is None or (isinstance(value, str) and value.strip().lower() == AUTO):
        return AUTO
    if isinstance(value, str) and value.strip().lower().removeprefix("torch.") not in DTYPES:
        raise ValueError(f"compute_dtype={value!r} is not 'auto' or a dtype; use 'auto' or one of "
                         f"{', '.join(names())}")
    return parse_dtype(value, "compute_dtype")


def resolve_compute_dtype(requested: ComputeDtypeLike, device: DeviceLike,
                          weight_dtype: torch.dtype) -> tuple[torch.dtype, str]:
    """(compute dtype, one-line reason) for weights of ``weight_dtype`` on ``device``.

    ``requested``: ``"auto"`` (or ``None``) chooses per machine (see the module docstring); a dtype or
    dtype name is used as given. The reason says which rule decided, for ``-v`` logs and JSON reports.
    """
    choice = parse_compute_dtype(requested)
    dev = parse_device(device, "device")
    weight = parse_dtype(weight_dtype, "weight_dtype")
    if weight is None:
        raise ValueError("weight_dtype=None: the weights' dtype is needed to choose a compute dtype")
    if choice != AUTO:
        return choice, f"{short_name(choice)}: requested explicitly"
    w = short_name(weight)
    if weight not in NATIVE_CPU_FLAGS:  # fp32, fp64: native everywhere
        return weight, f"{w}: the weights are {w} (auto)"
    if dev.type == "meta":
        return weight, (f"{w}: the meta device runs no kernels; computing in the weight dtype, as a device "
                        f"with native {w} matmuls would (auto)")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceUnavailableError(f"device={str(dev)!r}: CUDA is not available here, so its native matmuls "
                                         "cannot be known; choose an explicit compute_dtype")
        native, why = cuda_native(dev, weight)
    elif dev.type == "cpu":
        native, why = cpu_native(weight)
    else:
        return weight, f"{w}: {dev.type} device, computing in the weight dtype (auto)"
    if native:
        return weight, f"{w}: {why} (auto)"
    return torch.float32, f"fp32: {why}; the {w} weights are upcast to fp32 per matmul (auto)"


# ---------------------------------------------------------------------------- CUDA
def cuda_native(device: torch.device, dtype: torch.dtype) -> tuple[bool, str]:
    """Native ``dtype`` matmuls on this CUDA (or ROCm) device: fp16 always, bf16 from compute capability 8.0."""
    if dtype == torch.float16:
        return True, f"CUDA device {device} has native fp16 matmuls"
    index = device.index if device.index is not None else torch.cuda.current_device()
    if torch.version.hip is not None:  # ROCm: no compute capability to compare; ask torch
        with torch.cuda.device(index):
            ok = torch.cuda.is_bf16_supported(including_emulation=False)
        return ok, f"ROCm device cuda:{index} {'has' if ok else 'has no'} native bf16 matmuls"
    cap = tuple(torch.cuda.get_device_capability(index))
    have = f"{cap[0]}.{cap[1]}"
    need = f"{CUDA_BF16_CAPABILITY[0]}.{CUDA_BF16_CAPABILITY[1]}"
    if cap >= CUDA_BF16_CAPABILITY:
        return True, f"CUDA device cuda:{index} (compute capability {have}) has native bf16 matmuls"
    return False, f"CUDA device cuda:{index} has compute capability {have} < {need}: no native bf16 matmuls"


# ---------------------------------------------------------------------------- CPU
@dataclass(frozen=True)
class CpuFlags:
    """The instruction-set extensions known for this CPU (``/proc/cpuinfo`` names) and where they came from."""

    flags: frozenset[str]
    source: str


def parse_cpuinfo_flags(text: str) -> Optional[frozenset[str]]:
    """The ``flags`` of the first processor in ``/proc/cpuinfo`` text (x86 Linux); ``None`` if absent."""
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() == "flags":
            return frozenset(value.split())
    return None


@functools.lru_cache(maxsize=None)
def cpu_flags() -> Optional[CpuFlags]:
    """This x86 CPU's extensions (cached per process); ``None`` on other CPUs, where a probe decides."""
    if platform.machine().lower() not in _X86:
        return None
    if sys.platform.startswith("linux"):
        try:
            with open("/proc/cpuinfo") as f:
                flags = parse_cpuinfo_flags(f.read())
        except OSError:
            flags = None
        if flags is not None:
            return CpuFlags(flags, "/proc/cpuinfo")
    # Elsewhere torch's cpuinfo answers for what it knows (no query for AVX512-FP16).
    queries = {"avx512_bf16": "_is_avx512_bf16_supported", "amx_bf16": "_is_amx_tile_supported",
               "amx_fp16": "_is_amx_fp16_supported", "avx2": "_is_avx2_supported", "avx512f": "_is_avx512_supported"}
    found = set()
    for flag, query in queries.items():
        fn = getattr(torch.cpu, query, None)
        try:
            if fn is not None and fn():
                found.add(flag)
        except (RuntimeError, TypeError):  # a private API: a failing query means "not known to be there"
            logger.debug("torch.cpu.%s() failed; assuming no %s", query, flag)
    return CpuFlags(frozenset(found), "torch.cpu")


def mkldnn_supports(dtype: torch.dtype) -> bool:
    """Whether this torch build runs ``dtype`` matmuls through oneDNN on this CPU."""
    if not torch.backends.mkldnn.is_available():
        return False
    query = {torch.bfloat16: "_is_mkldnn_bf16_supported", torch.float16: "_is_mkldnn_fp16_supported"}[dtype]
    try:
        return bool(getattr(torch.ops.mkldnn, query)())
    except (AttributeError, RuntimeError):
        return False


def cpu_native(dtype: torch.dtype) -> tuple[bool, str]:
    """Native ``dtype`` (bf16/fp16) matmuls on this CPU, and why: from its flags on x86, else by the probe."""
    known = cpu_flags()
    if known is None:
        return probe_cpu_matmul(dtype)
    short = short_name(dtype)
    wanted = NATIVE_CPU_FLAGS[dtype]
    missing = " or ".join(_FLAG_NAMES[f] for f in wanted)
    found = [f for f in wanted if f in known.flags]
    if not found:
        return False, (f"this CPU has no {missing} (per {known.source}; vector ISA "
                       f"{torch.backends.cpu.get_cpu_capability()}), so {short} matmuls would be emulated")
    if not mkldnn_supports(dtype):
        return False, (f"this CPU has {_FLAG_NAMES[found[0]]} but this torch build has no oneDNN {short} "
                       "matmuls to use it")
    return True, f"this CPU has {_FLAG_NAMES[found[0]]} (native {short} matmuls through oneDNN)"


# ---------------------------------------------------------------------------- the probe
_TINY = (8, 128, 128)  # (tokens, in, out): cheap even where the dtype is emulated hundreds of times slower
_SMALL = (64, 1024, 1024)  # large enough that call overheads do not decide


def _time_matmuls(dtype: torch.dtype, shape: tuple[int, int, int], reps: int = 3) -> tuple[float, float]:
    """Best-of-``reps`` seconds of (a ``dtype`` matmul, upcasting the ``dtype`` weight and an fp32 matmul)."""
    m, k, n = shape
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(m, k, generator=gen)
    w = (torch.randn(n, k, generator=gen) * 0.02).to(dtype)
    x_low = x.to(dtype)

    def best(fn: Callable[[], torch.Tensor]) -> float:
        fn()  # first call: kernel selection / JIT, not timed
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return min(times)

    # One thread: the probe compares kernels, not thread scheduling. With two threads on a busy machine
    # every call waits for the second thread to be scheduled (~8 ms measured here, whatever the size).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            return (best(lambda: torch.nn.functional.linear(x_low, w)),
                    best(lambda: torch.nn.functional.linear(x, w.float())))
    finally:
        torch.set_num_threads(threads)


@functools.lru_cache(maxsize=None)
def probe_cpu_matmul(dtype: torch.dtype) -> tuple[bool, str]:
    """Time a ``dtype`` matmul against the upcast fp32 one, once per process and dtype (cached).

    A tiny shape first, so a CPU that emulates ``dtype`` (hundreds of times slower) is found out in
    milliseconds; then a small one, where call overheads no longer decide and native wins only if it is
    not slower than the upcast. (Measured here, one thread, AMX-BF16: 8x128x128 bf16 0.04 ms against
    0.016 ms upcast -- overheads; 64x1024x1024 bf16 0.50 ms against 1.66 ms.)"""
    short = short_name(dtype)
    native, upcast = _time_matmuls(dtype, _TINY)
    if native > 10 * upcast:
        shape = _TINY
    else:
        shape = _SMALL
        native, upcast = _time_matmuls(dtype, _SMALL)
    ok = native <= upcast
    why = (f"a probe on this {platform.machine() or 'unknown'} CPU timed a {'x'.join(map(str, shape))} {short} "
           f"matmul at {native * 1e3:.3f} ms against {upcast * 1e3:.3f} ms upcast to fp32")
    logger.debug("compute dtype probe: %s", why)
    return ok, why


__all__ = ["AUTO", "CUDA_BF16_CAPABILITY", "NATIVE_CPU_FLAGS", "CpuFlags", "cpu_flags", "cpu_native", "cuda_native",
           "mkldnn_supports", "parse_compute_dtype", "parse_cpuinfo_flags", "probe_cpu_matmul", "resolve_compute_dtype"]
