"""Hardware peaks for the roofline: a small table of datasheet figures, and a local measurement.

Peaks are *dense* math (no 2:4 structured sparsity): NVIDIA's datasheets print the sparse figure
first and mark it with an asterisk; the dense figure is half of it.

=========  ==========================  ==================  ==============================================
name       dense bf16/fp16 Tensor      memory bandwidth    source
=========  ==========================  ==================  ==============================================
h100-sxm   989 TFLOP/s (1,979 sp.)     3.35 TB/s HBM3      NVIDIA H100 Tensor Core GPU Datasheet (SXM5)
h100-pcie  756 TFLOP/s (1,513 sp.)     2.0 TB/s HBM2e      NVIDIA H100 Tensor Core GPU Datasheet (PCIe)
a100-80g   312 TFLOP/s (624 sp.)       2.039 TB/s HBM2e    NVIDIA A100 Tensor Core GPU Datasheet (80GB SXM)
=========  ==========================  ==================  ==============================================

The H100 SXM bf16/fp16 peak is **989e12** FLOP/s: the figure torchtitan's ``get_peak_flops`` and most
MFU reports divide by, so an MFU computed here compares with theirs digit for digit. The datasheet
says 1,979 TFLOPS *with sparsity*, i.e. about 989.5 dense; NVIDIA's H100 whitepaper computes 989.4
from the boost clock. The three differ by 0.05% at most.

The same datasheets give fp32 (CUDA cores, no Tensor Cores): 67 / 51 / 19.5 TFLOP/s, and dense
TF32 Tensor Core: 494.7 / 378 / 156 TFLOP/s.

Every table figure is a float literal holding an integer exactly (``494.7e12``; the product
``494.7 * 1e12`` would round), so an exact ratio (``Fraction(peak_flops)``) uses the decimal figure itself.

``cpu`` is measured on the spot (:func:`measure_device`): the matmul peak is the best of a few
large square matmuls (``2 n^3`` FLOPs each) and the bandwidth is the best of a few large tensor
copies counted as bytes read + bytes written (``2 * nbytes``; a write-allocate cache adds a hidden
third stream, so this is what a kernel *can use*, not what the DRAM bus carries). Both are
achievable figures, not theoretical ones, so a roofline against them is tight.

Links between tensor-parallel ranks (``roofline --tp N --link-bandwidth X``, :class:`Link`) are given per
GPU and per direction: ``nvlink4`` 450 GB/s (H100 SXM, 900 GB/s both ways), ``nvlink3`` 300 GB/s (A100
SXM, 600 GB/s), ``pcie5`` 64 GB/s and ``pcie4`` 32 GB/s (x16; 128 and 64 GB/s both ways), ``ib-ndr`` 50 GB/s
(400 Gb/s) and ``ib-hdr`` 25 GB/s (200 Gb/s); sources in :data:`_LINKS`.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Iterator, Optional, Union

import torch

from llama_ref.dtypes import short_name

from .timing import sync

TFLOP = 1e12
TB = 1e12

# The compute modes peaks are quoted for: the dtypes (llama_ref.dtypes) plus tf32, an fp32 storage mode
# whose matmuls run on tensor cores.
DTYPE_NAMES = {**{short_name(d): d for d in (torch.bfloat16, torch.float16, torch.float32)}, "tf32": torch.float32}
DTYPE_BYTES = {name: dtype.itemsize for name, dtype in DTYPE_NAMES.items()}


@dataclass(frozen=True)
class Hardware:
    """Peaks of one device for one compute dtype. ``peak_flops`` in FLOP/s, ``mem_bw`` in bytes/s."""

    name: str
    peak_flops: float
    mem_bw: float
    dtype: str
    source: str
    measured: bool = False
    details: dict = field(default_factory=dict, compare=False)

    @property
    def ridge_point(self) -> float:
        """Arithmetic intensity (FLOP/byte) where the compute and memory roofs meet."""
        return self.peak_flops / self.mem_bw

    def to_dict(self) -> dict:
        d = asdict(self)
        d["ridge_point"] = self.ridge_point
        return d


# name -> (dense peak FLOP/s per dtype, bandwidth B/s, memory kind, datasheet)
_TABLE: dict[str, tuple[dict[str, float], float, str, str]] = {
    "h100-sxm": (
        {"bf16": 989e12, "fp16": 989e12, "tf32": 494.7e12, "fp32": 67e12},
        3.35e12,
        "HBM3",
        "NVIDIA H100 Tensor Core GPU Datasheet, H100 SXM column: BF16 Tensor Core 1,979 TFLOPS with "
        "sparsity; dense bf16/fp16 taken as 989 TFLOPS, the figure torchtitan and most MFU reports use "
        "(datasheet ~989.5 dense, whitepaper 989.4); GPU memory bandwidth 3.35 TB/s",
    ),
    "h100-pcie": (
        {"bf16": 756e12, "fp16": 756e12, "tf32": 378e12, "fp32": 51e12},
        2.0e12,
        "HBM2e",
        "NVIDIA H100 Tensor Core GPU Datasheet, H100 PCIe column: BF16 Tensor Core 1,513 TFLOPS with "
        "sparsity (756 dense), GPU memory bandwidth 2 TB/s",
    ),
    "a100-80g": (
        {"bf16": 312e12, "fp16": 312e12, "tf32": 156e12, "fp32": 19.5e12},
        2.039e12,
        "HBM2e",
        "NVIDIA A100 Tensor Core GPU Datasheet, A100 80GB SXM column: BF16 Tensor Core 312 TFLOPS "
        "(624 with sparsity), GPU memory bandwidth 2,039 GB/s",
    ),
}
HARDWARE_NAMES = (*_TABLE, "cpu")

# name -> (device memory in bytes, source). The datasheets say "80GB": five 16 GiB HBM stacks, 80 GiB. CUDA
# reports somewhat less as total memory (a driver reserve; ECC on HBM costs nothing extra), and a process can
# allocate less still (its CUDA context): for the bytes a run can really use, give --device-memory (the second
# value of torch.cuda.mem_get_info on the device).
_MEMORY: dict[str, tuple[int, str]] = {
    "h100-sxm": (80 * 2**30, "NVIDIA H100 Tensor Core GPU Datasheet, H100 SXM: GPU memory 80GB (HBM3, 5 x 16 GiB)"),
    "h100-pcie": (80 * 2**30, "NVIDIA H100 Tensor Core GPU Datasheet, H100 PCIe: GPU memory 80GB (HBM2e)"),
    "a100-80g": (80 * 2**30, "NVIDIA A100 Tensor Core GPU Datasheet, A100 80GB SXM: GPU memory 80GB (HBM2e)"),
}


def table_memory_bytes(name: str) -> int:
    """Device memory of a hardware-table entry, in bytes (see :data:`_MEMORY` for what the figure is)."""
    if name not in _MEMORY:
        raise ValueError(f"no memory size for hardware {name!r}; known: {', '.join(_MEMORY)} (or give the bytes)")
    return _MEMORY[name][0]


def table_hardware(name: str, dtype: str = "bf16") -> Hardware:
    """A datasheet entry. ``dtype``: one of bf16, fp16, tf32, fp32."""
    if name not in _TABLE:
        raise ValueError(f"unknown hardware {name!r}; choose one of {', '.join(HARDWARE_NAMES)}")
    peaks, bw, mem, source = _TABLE[name]
    if dtype not in peaks:
        raise ValueError(f"no {dtype} peak for {name}; known: {', '.join(peaks)}")
    return Hardware(name=name, peak_flops=peaks[dtype], mem_bw=bw, dtype=dtype, source=source,
                    details={"memory": mem})


def measure_matmul_peak(device: Union[str, torch.device] = "cpu", dtype: torch.dtype = torch.float32, *,
                        n: int = 2048, repeats: int = 5) -> float:
    """Best FLOP/s of ``repeats`` (n x n) @ (n x n) matmuls after one warm-up: 2 n^3 FLOPs each."""
    device = torch.device(device)
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    c = torch.empty(n, n, device=device, dtype=dtype)
    torch.mm(a, b, out=c)  # warm-up: thread pool, kernel selection
    sync(device)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, b, out=c)
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def measure_copy_bandwidth(device: Union[str, torch.device] = "cpu", *, nbytes: int = 256 * 2**20,
                           repeats: int = 5) -> float:
    """Best bytes/s of ``repeats`` copies of an ``nbytes`` buffer, counted as read + write (2 * nbytes)."""
    device = torch.device(device)
    n = nbytes // 4
    src = torch.ones(n, device=device, dtype=torch.float32)
    dst = torch.empty_like(src)
    dst.copy_(src)  # warm-up: fault in the pages
    sync(device)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        dst.copy_(src)
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n * 4 / best


_MEASURED: dict[tuple, Hardware] = {}


@contextlib.contextmanager
def _matmul_mode(device: torch.device, dtype: str) -> Iterator[None]:
    """fp32 matmuls on TF32 tensor cores for ``dtype="tf32"`` (CUDA only), restored afterwards; else nothing.

    Without it a "tf32" measurement times IEEE fp32 matmuls: torch runs fp32 matmuls in full fp32 unless
    ``torch.backends.cuda.matmul.allow_tf32`` is set. A CPU has no TF32 mode: refused (ValueError)."""
    if dtype != "tf32":
        yield
        return
    if device.type != "cuda":
        raise ValueError(f"dtype tf32 on {device.type}: TF32 is a mode of CUDA tensor cores, and this device's fp32 "
                         "matmuls are plain fp32 (a 'tf32 peak' measured here would be its fp32 peak); use fp32")
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous


def measure_device(device: Union[str, torch.device] = "cpu", dtype: str = "fp32", *, n: int = 2048,
                   repeats: int = 5, nbytes: int = 256 * 2**20, cache: bool = True) -> Hardware:
    """Measure this device's matmul peak (``dtype``; ``tf32``: fp32 matmuls with TF32 enabled, CUDA only) and
    copy bandwidth. Cached per process."""
    device = torch.device(device)
    if dtype not in DTYPE_NAMES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPE_NAMES)}")
    key = (str(device), dtype, n, repeats, nbytes, torch.get_num_threads())
    if cache and key in _MEASURED:
        return _MEASURED[key]
    t0 = time.perf_counter()
    with _matmul_mode(device, dtype):
        peak = measure_matmul_peak(device, DTYPE_NAMES[dtype], n=n, repeats=repeats)
    bw = measure_copy_bandwidth(device, nbytes=nbytes, repeats=repeats)
    name = "cpu" if device.type == "cpu" else f"{device.type}-measured"
    hw = Hardware(
        name=name, peak_flops=peak, mem_bw=bw, dtype=dtype, measured=True,
        source=(f"measured on this machine: best of {repeats} {n}x{n} {dtype} matmuls (2n^3 FLOPs); "
                f"best of {repeats} copies of {nbytes // 2**20} MiB counted as read+write"),
        details={"threads": torch.get_num_threads(), "device": str(device),
                 "device_name": device_name(device), "seconds": time.perf_counter() - t0},
    )
    if cache:
        _MEASURED[key] = hw
    return hw


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask, which a container or taskset narrows)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def device_name(device: Union[str, torch.device]) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "cpu":
        try:
            with open("/proc/cpuinfo", encoding="utf-8") as f:
                for line in f:
                    if line.startswith("model name"):
                        return line.split(":", 1)[1].strip()
        except OSError:
            pass
        import platform

        return platform.processor() or "cpu"
    return device.type


def detect_table_name(device_name_: str) -> Optional[str]:
    """Table entry for a CUDA device name (``torch.cuda.get_device_name``), or None if not in the table.

    ``"NVIDIA H100 80GB HBM3"`` is the SXM part; ``"NVIDIA H100 PCIe"`` the PCIe one;
    ``"NVIDIA A100-SXM4-80GB"`` the A100 80GB SXM.
    """
    n = device_name_.upper()
    if "H100" in n:
        return "h100-pcie" if "PCIE" in n else "h100-sxm"
    if "A100" in n and "80G" in n and "PCIE" not in n:
        return "a100-80g"
    return None


def get_hardware(name: str, dtype: Optional[str] = None, **measure_kwargs) -> Hardware:
    """``name`` from the table, or ``"cpu"`` (measured now). ``dtype`` defaults to bf16 for GPUs, fp32 for cpu."""
    if name == "cpu":
        dtype = dtype or "fp32"
        if dtype in ("bf16", "fp16"):  # hundreds of times slower than fp32 on most CPUs: keep it short
            measure_kwargs.setdefault("n", 512)
            measure_kwargs.setdefault("repeats", 2)
        return measure_device("cpu", dtype, **measure_kwargs)
    return table_hardware(name, dtype or "bf16")


# ====================================================================== links between tensor-parallel ranks
@dataclass(frozen=True)
class Link:
    """The link a tensor-parallel rank communicates over: ``bandwidth`` in bytes/s, *unidirectional, per GPU*
    (what one GPU can send while it receives as much), which is what nccl-tests' bus bandwidth is compared
    with (NVIDIA/nccl-tests doc/PERFORMANCE.md: "the bus bandwidth should reflect the speed of the hardware
    bottleneck: NVLink, PCI, QPI, or network"); ``latency`` in seconds per collective (0: the pure bandwidth
    model, nccl-tests' large-message asymptote)."""

    name: str
    bandwidth: float
    source: str
    latency: float = 0.0

    def time(self, ring_bytes: int, calls: int) -> float:
        """Seconds for ``calls`` collectives moving ``ring_bytes`` per rank in total."""
        return ring_bytes / self.bandwidth + calls * self.latency

    def to_dict(self) -> dict:
        return asdict(self)


GB = 1e9
# name -> (unidirectional bytes/s per GPU, source). Datasheets print NVLink and PCIe bandwidth as the total of
# both directions; a ring moves data one way round, so the per-direction figure is half of it. InfiniBand
# speeds are per port and per direction already (bits: /8).
_LINKS: dict[str, tuple[float, str]] = {
    "nvlink4": (450 * GB, "NVIDIA H100 Tensor Core GPU Datasheet, H100 SXM: NVLink 900 GB/s (18 fourth-generation "
                          "links, both directions) -> 450 GB/s per direction"),
    "nvlink3": (300 * GB, "NVIDIA A100 Tensor Core GPU Datasheet, A100 SXM: NVLink 600 GB/s (12 third-generation "
                          "links, both directions) -> 300 GB/s per direction"),
    "pcie5": (64 * GB, "PCIe Gen5 x16: 128 GB/s both directions (NVIDIA H100 PCIe datasheet) -> 64 GB/s per "
                       "direction (32 GT/s x 16 lanes / 8; about 63 GB/s after 128b/130b encoding)"),
    "pcie4": (32 * GB, "PCIe Gen4 x16: 64 GB/s both directions (NVIDIA A100 PCIe datasheet) -> 32 GB/s per "
                       "direction (16 GT/s x 16 lanes / 8; about 31.5 GB/s after 128b/130b encoding)"),
    "ib-ndr": (50 * GB, "InfiniBand NDR, 400 Gb/s per port and direction (NVIDIA ConnectX-7) = 50 GB/s, one "
                        "port per GPU"),
    "ib-hdr": (25 * GB, "InfiniBand HDR, 200 Gb/s per port and direction (NVIDIA ConnectX-6) = 25 GB/s, one "
                        "port per GPU"),
}
LINK_NAMES = tuple(_LINKS)


def get_link(spec: Union[str, float], latency_s: float = 0.0) -> Link:
    """A preset name (:data:`LINK_NAMES`) or a bandwidth in GB/s (``"200"``, ``"12.5"``); ``latency_s`` per
    collective. A ValueError names a bad spec."""
    if not isinstance(latency_s, (int, float)) or isinstance(latency_s, bool) or not latency_s >= 0\
            or latency_s == float("inf"):
        raise ValueError(f"link latency must be a finite number of seconds >= 0, got {latency_s!r}")
    if isinstance(spec, str) and spec.strip().lower() in _LINKS:
        name = spec.strip().lower()
        bw, source = _LINKS[name]
        return Link(name, bw, source, float(latency_s))
    try:
        gbs = float(spec)
    except (TypeError, ValueError):
        raise ValueError(f"link bandwidth {spec!r}: give GB/s (a number, per GPU and direction) or a preset: "
                         f"{', '.join(LINK_NAMES)}") from None
    if not (gbs > 0 and gbs != float("inf")):
        raise ValueError(f"link bandwidth must be a positive number of GB/s, got {spec!r}")
    return Link(f"{gbs:g} GB/s", gbs * GB, "given on the command line (GB/s per GPU and direction)", float(latency_s))
