"""The roofline, per row: FLOPs, bytes, intensity, bound and predicted time on a device.

Model (the classic roofline, per row, no overlap between rows)::

    t_compute = flops / peak_flops          flops = 2 * MACs + non-matmul FLOPs (analytic)
    t_memory  = bytes / mem_bw              bytes = weights + activations + KV read + KV write (analytic)
    predicted = max(t_compute, t_memory)
    bound     = "compute" if t_compute >= t_memory else "memory"
              (equivalently: intensity = flops / bytes >= ridge point = peak_flops / mem_bw)

Rows run one after another, so the predicted time of a forward is the *sum* of the rows' predicted
times (which is >= the max of the summed roofs: a memory-bound layer cannot lend its idle compute
to a compute-bound one).

Tensor parallelism (a rank of an N-way model, rows from ``analyze(..., tp=N)``): each row's collectives add
their time on the link, not overlapped with the row's own work::

    t_comm    = ring_bytes / link_bandwidth + collectives * link_latency
    predicted = max(t_compute, t_memory) + t_comm
    bound     = "comm" when t_comm > max(t_compute, t_memory)

``ring_bytes`` is what each rank sends with the ring algorithm (nccl-tests' bus-bandwidth bytes, see
:mod:`counters.collectives`) and the link bandwidth is unidirectional per GPU (:class:`~.hardware.Link`).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Iterable, Mapping, Optional, Sequence

from ..collectives import Collective
from ..table import RowKey
from .hardware import Hardware, Link

def bound(flops: float, nbytes: float, peak_flops: float, mem_bw: float) -> str:
    """``"compute"`` if the compute roof takes at least as long as the memory roof, else ``"memory"``;
    ``"none"`` for a row that neither computes nor moves bytes."""
    if flops == 0 and nbytes == 0:
        return "none"
    # flops/peak >= bytes/bw, cross-multiplied to stay exact for integer inputs.
    return "compute" if flops * mem_bw >= nbytes * peak_flops else "memory"


def attainable_flops(intensity: float, peak_flops: float, mem_bw: float) -> float:
    """The roof at an arithmetic intensity: ``min(peak_flops, intensity * mem_bw)`` FLOP/s."""
    return min(peak_flops, intensity * mem_bw)


@dataclass
class RooflineRow:
    position: Optional[int]
    layer: Optional[int]
    module: str
    macs: int
    nonmatmul_flops: int
    flops: int  # 2 * macs + nonmatmul_flops
    bytes: int
    weight_bytes: int
    act_bytes: int
    kv_read_bytes: int
    kv_write_bytes: int
    intensity: float  # flops / bytes (inf when bytes == 0 < flops, 0 when both are 0)
    bound: str
    t_compute_s: float
    t_memory_s: float
    predicted_s: float
    measured_s: Optional[float] = None
    collectives: int = 0  # tensor parallelism: collectives this row runs on a rank
    comm_bytes: int = 0  # their ring bytes (what the rank sends)
    t_comm_s: float = 0.0

    @property
    def key(self) -> RowKey:
        return (self.position, self.module)

    @property
    def label(self) -> str:
        if self.position is None:
            return self.module
        return f"{self.position}:L{self.layer}.{self.module}"

    @property
    def predicted_flops_per_s(self) -> float:
        return self.flops / self.predicted_s if self.predicted_s > 0 else 0.0

    @property
    def achieved_flops_per_s(self) -> Optional[float]:
        if self.measured_s is None or self.measured_s <= 0:
            return None
        return self.flops / self.measured_s

    @property
    def achieved_bytes_per_s(self) -> Optional[float]:
        if self.measured_s is None or self.measured_s <= 0:
            return None
        return self.bytes / self.measured_s

    def to_dict(self) -> dict:
        d = asdict(self)
        d["intensity"] = _json_float(self.intensity)
        d["label"] = self.label
        d["predicted_flops_per_s"] = self.predicted_flops_per_s
        d["achieved_flops_per_s"] = self.achieved_flops_per_s
        d["achieved_bytes_per_s"] = self.achieved_bytes_per_s
        return d


def _json_float(x: float):
    return x if math.isfinite(x) else None


def roofline_row(row: Any, hw: Hardware, measured_s: Optional[float] = None,
                 collectives: Optional[Mapping[Collective, int]] = None, link: Optional[Link] = None) -> RooflineRow:
    """One analytic ``RowCost`` (or anything with its fields) on hardware ``hw``; with ``collectives`` (a
    tensor-parallel rank's, collective -> calls) their time on ``link`` is added."""
    flops = 2 * row.macs + row.nonmatmul_flops
    nbytes = row.weight_bytes + row.act_bytes + row.kv_read_bytes + row.kv_write_bytes
    if nbytes:
        intensity = flops / nbytes
    else:
        intensity = 0.0 if flops == 0 else math.inf
    t_c = flops / hw.peak_flops
    t_m = nbytes / hw.mem_bw
    calls = sum((collectives or {}).values())
    ring = sum(c.ring_bytes * k for c, k in (collectives or {}).items())
    if calls and link is None:
        raise ValueError(f"row {row.module!r} runs {calls} collective(s): give the link they run over")
    t_comm = link.time(ring, calls) if calls else 0.0
    work = max(t_c, t_m)
    verdict = "comm" if calls and t_comm > work else bound(flops, nbytes, hw.peak_flops, hw.mem_bw)
    return RooflineRow(
        position=row.position, layer=row.layer, module=row.module, macs=row.macs,
        nonmatmul_flops=row.nonmatmul_flops, flops=flops, bytes=nbytes, weight_bytes=row.weight_bytes,
        act_bytes=row.act_bytes, kv_read_bytes=row.kv_read_bytes, kv_write_bytes=row.kv_write_bytes,
        intensity=intensity, bound=verdict, t_compute_s=t_c, t_memory_s=t_m, predicted_s=work + t_comm,
        measured_s=measured_s, collectives=calls, comm_bytes=ring, t_comm_s=t_comm,
    )


def roofline_table(rows: Iterable[Any], hw: Hardware, measured: Optional[Mapping[RowKey, float]] = None,
                   collectives: Optional[Mapping[RowKey, Mapping[Collective, int]]] = None,
                   link: Optional[Link] = None) -> list[RooflineRow]:
    """``collectives``: per row key (a tensor-parallel rank's, ``AnalyticReport.collectives``); a layer-run
    row (``module="block"``) gets every collective of its position."""
    measured = measured or {}
    per_key: dict[RowKey, dict[Collective, int]] = {}
    for (pos, module), per_row in (collectives or {}).items():
        for key in ((pos, module), (pos, "block")) if pos is not None else ((pos, module),):
            slot = per_key.setdefault(key, {})
            for c, k in per_row.items():
                slot[c] = slot.get(c, 0) + k
    return [roofline_row(r, hw, measured.get((r.position, r.module)), per_key.get((r.position, r.module)), link)
            for r in rows]


def summarize(table: Sequence[RooflineRow], *, batch: int = 1, seqlen: int = 1,
              link: Optional[Link] = None) -> dict:
    flops = sum(r.flops for r in table)
    nbytes = sum(r.bytes for r in table)
    predicted = sum(r.predicted_s for r in table)
    out = {
        "flops": flops, "macs": sum(r.macs for r in table), "bytes": nbytes,
        "intensity": _json_float(flops / nbytes) if nbytes else None,
        "predicted_s": predicted,
        "predicted_tokens_per_s": batch * seqlen / predicted if predicted > 0 else None,
        "compute_bound_rows": sum(r.bound == "compute" for r in table),
        "memory_bound_rows": sum(r.bound == "memory" for r in table),
    }
    calls = sum(r.collectives for r in table)
    if calls:
        comm = sum(r.t_comm_s for r in table)
        work = sum(max(r.t_compute_s, r.t_memory_s) for r in table)
        ring = sum(r.comm_bytes for r in table)
        out.update({
            "comm_bound_rows": sum(r.bound == "comm" for r in table),
            "collectives": calls, "comm_ring_bytes": ring,
            "comm_s": comm, "work_s": work, "comm_fraction": comm / predicted if predicted > 0 else None,
            # the phase: the collectives take longer than the rank's own work
            "communication_bound": comm > work,
        })
        if link is not None:
            # The per-collective latency at which the collectives would take as long as the work: above it
            # the phase is communication-bound (0: the bandwidth alone already makes it so).
            out["break_even_latency_s"] = max(0.0, (work - ring / link.bandwidth) / calls)
    timed = [r for r in table if r.measured_s is not None]
    if timed:
        measured = sum(r.measured_s for r in timed)
        out.update({
            "measured_s": measured,
            "measured_rows": len(timed),
            "measured_tokens_per_s": batch * seqlen / measured if measured > 0 else None,
            "achieved_flops_per_s": sum(r.flops for r in timed) / measured if measured > 0 else None,
            "achieved_bytes_per_s": sum(r.bytes for r in timed) / measured if measured > 0 else None,
            "predicted_s_of_measured_rows": sum(r.predicted_s for r in timed),
        })
    return out

# ====================================================================== formatting
def _si(x: Optional[float], unit: str = "", digits: int = 3) -> str:
    if x is None:
        return "-"
    if x == 0:
        return f"0{unit}"
    if not math.isfinite(x):
        return "inf"
    for scale, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= scale:
            return f"{x / scale:.{digits}g}{prefix}{unit}"
    return f"{x:.{digits}g}{unit}"


def _time(s: Optional[float]) -> str:
    if s is None:
        return "-"
    if s == 0:
        return "0"
    if s >= 1:
        return f"{s:.3g} s"
    if s >= 1e-3:
        return f"{s * 1e3:.3g} ms"
    return f"{s * 1e6:.3g} us"


def format_table(table: Sequence[RooflineRow], hw: Hardware, summary: Optional[dict] = None,
                 link: Optional[Link] = None) -> str:
    has_measured = any(r.measured_s is not None for r in table)
    has_comm = any(r.collectives for r in table)
    header = ["pos", "layer", "module", "FLOPs", "bytes", "FLOP/B", "bound", "predicted"]
    if has_comm:
        header[7:7] = ["work", "comm B", "comm"]  # max(compute, memory), ring bytes sent, their time
    if has_measured:
        header += ["measured", "achieved", "meas/pred"]
    lines = [header]
    for r in table:
        line = [
            "-" if r.position is None else str(r.position), "-" if r.layer is None else str(r.layer), r.module,
            _si(r.flops), _si(r.bytes, "B"), "inf" if math.isinf(r.intensity) else f"{r.intensity:.3g}",
            r.bound, _time(r.predicted_s),
        ]
        if has_comm:
            line[7:7] = [_time(max(r.t_compute_s, r.t_memory_s)), _si(r.comm_bytes, "B") if r.collectives else "-",
                         _time(r.t_comm_s) if r.collectives else "-"]
        if has_measured:
            ratio = (r.measured_s / r.predicted_s) if (r.measured_s is not None and r.predicted_s > 0) else None
            line += [_time(r.measured_s), _si(r.achieved_flops_per_s, "FLOP/s"),
                     "-" if ratio is None else f"{ratio:.2f}x"]
        lines.append(line)
    widths = [max(len(row[i]) for row in lines) for i in range(len(header))]
    out = [
        f"hardware {hw.name} ({hw.dtype}): peak {_si(hw.peak_flops, 'FLOP/s')}, bandwidth {_si(hw.mem_bw, 'B/s')}, "
        f"ridge {hw.ridge_point:.3g} FLOP/B{' [measured]' if hw.measured else ''}"
    ]
    if link is not None:
        out.append(f"link {link.name}: {_si(link.bandwidth, 'B/s')} per GPU and direction, latency "
                   f"{_time(link.latency)} per collective; comm = ring bytes / bandwidth + latency x collectives")
    for i, row in enumerate(lines):
        out.append("  ".join(c.rjust(w) if j not in (2, 6) else c.ljust(w) for j, (c, w) in enumerate(zip(row, widths))))
        if i == 0:
            out.append("  ".join("-" * w for w in widths))
    if summary:
        s = (f"total: {_si(summary['flops'])}FLOP, {_si(summary['bytes'], 'B')}, predicted {_time(summary['predicted_s'])}"
             f" ({summary['compute_bound_rows']} compute-bound, {summary['memory_bound_rows']} memory-bound rows)")
        if summary.get("predicted_tokens_per_s"):
            s += f", {summary['predicted_tokens_per_s']:.4g} tokens/s predicted"
        out.append(s)
        if "comm_s" in summary:
            verdict = "COMMUNICATION-BOUND" if summary["communication_bound"] else "not communication-bound"
            c = (f"per rank: work {_time(summary['work_s'])} + {summary['collectives']} collectives "
                 f"{_time(summary['comm_s'])} ({100 * (summary['comm_fraction'] or 0):.3g}% of the time, "
                 f"{_si(summary['comm_ring_bytes'], 'B')} sent): {verdict}; {summary['comm_bound_rows']} row(s) "
                 "communication-bound")
            if "break_even_latency_s" in summary:
                c += (f"; with a latency above {_time(summary['break_even_latency_s'])} per collective the "
                      "collectives would take longer than the work")
            out.append(c)
        if "measured_s" in summary:
            out.append(
                f"measured ({summary['measured_rows']} rows): {_time(summary['measured_s'])} vs predicted "
                f"{_time(summary['predicted_s_of_measured_rows'])}; achieved "
                f"{_si(summary['achieved_flops_per_s'], 'FLOP/s')} "
                f"({100 * summary['achieved_flops_per_s'] / hw.peak_flops:.3g}% of peak), "
                f"{_si(summary['achieved_bytes_per_s'], 'B/s')} "
                f"({100 * summary['achieved_bytes_per_s'] / hw.mem_bw:.3g}% of bandwidth)"
            )
    return "\n".join(out)

