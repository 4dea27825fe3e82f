"""``llama-ref roofline``: per-layer FLOPs, bytes, intensity, bound and predicted time on a device.

Model (the classic roofline, per row, no overlap between rows)::

    t_compute = flops / peak_flops          flops = 2 * MACs + non-matmul FLOPs (analytic)
    t_memory  = bytes / mem_bw              bytes = weights + activations + KV read + KV write (analytic)
    predicted = max(t_compute, t_memory)
    bound     = "compute" if t_compute >= t_memory else "memory"
              (equivalently: intensity = flops / bytes >= ridge point = peak_flops / mem_bw)

Rows run one after another, so the predicted time of a forward is the *sum* of the rows' predicted
times (which is >= the max of the summed roofs: a memory-bound layer cannot lend its idle compute
to a compute-bound one).

Measurement (``--measure``) times every layer run of a locally built model with forward pre/post
hooks (CUDA events on CUDA, ``perf_counter`` elsewhere), median over warm repeats. Weights are
random (timings do not depend on their values). A model is only measured when it fits in the
device's free memory: 7B in fp32 needs ~27 GB, more than a 24 GiB CPU box; use ``--layers K`` to
measure the first K layers of the same shape (every decoder layer of a model costs the same), or
drop ``--measure`` for the prediction alone, which needs no memory (no model is built).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence, Union

import torch

from llama_ref.config import PRESETS, LlamaConfig
from llama_ref.schedule import PRESET_N_LAYERS, SCHEDULE_NAMES, resolve_schedule

from .hardware import DTYPE_BYTES, DTYPE_NAMES, HARDWARE_NAMES, Hardware, available_memory_bytes, get_hardware

RowKey = tuple[Optional[int], str]

# Modules timed at --level module, relative to a decoder layer (leaves of the row table).
TIMED_BLOCK_MODULES = (
    "attention_norm", "attention.wq", "attention.wk", "attention.wv", "attention.rope", "attention.core",
    "attention.wo", "ffn_norm", "feed_forward.w1", "feed_forward.w3", "feed_forward.act", "feed_forward.w2",
)
TOP_MODULES = ("tok_embeddings", "norm", "output")


# ====================================================================== pure roofline math
def predicted_time(flops: float, nbytes: float, peak_flops: float, mem_bw: float) -> float:
    """Roofline time of one kernel: ``max(flops / peak_flops, nbytes / mem_bw)`` seconds."""
    if peak_flops <= 0 or mem_bw <= 0:
        raise ValueError(f"peaks must be positive, got peak_flops={peak_flops}, mem_bw={mem_bw}")
    return max(flops / peak_flops, nbytes / mem_bw)


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


def roofline_row(row: Any, hw: Hardware, measured_s: Optional[float] = None) -> RooflineRow:
    """One analytic ``RowCost`` (or anything with its fields) on hardware ``hw``."""
    flops = 2 * row.macs + row.nonmatmul_flops
    nbytes = row.weight_bytes + row.act_bytes + row.kv_read_bytes + row.kv_write_bytes
    if nbytes:
        intensity = flops / nbytes
    else:
        intensity = 0.0 if flops == 0 else math.inf
    t_c = flops / hw.peak_flops
    t_m = nbytes / hw.mem_bw
    return RooflineRow(
        position=row.position, layer=row.layer, module=row.module, macs=row.macs,
        nonmatmul_flops=row.nonmatmul_flops, flops=flops, bytes=nbytes, weight_bytes=row.weight_bytes,
        act_bytes=row.act_bytes, kv_read_bytes=row.kv_read_bytes, kv_write_bytes=row.kv_write_bytes,
        intensity=intensity, bound=bound(flops, nbytes, hw.peak_flops, hw.mem_bw), t_compute_s=t_c,
        t_memory_s=t_m, predicted_s=max(t_c, t_m), measured_s=measured_s,
    )


def roofline_table(rows: Iterable[Any], hw: Hardware,
                   measured: Optional[Mapping[RowKey, float]] = None) -> list[RooflineRow]:
    measured = measured or {}
    return [roofline_row(r, hw, measured.get((r.position, r.module))) for r in rows]


def summarize(table: Sequence[RooflineRow], *, batch: int = 1, n_tokens: int = 1) -> dict:
    flops = sum(r.flops for r in table)
    nbytes = sum(r.bytes for r in table)
    predicted = sum(r.predicted_s for r in table)
    out = {
        "flops": flops, "macs": sum(r.macs for r in table), "bytes": nbytes,
        "intensity": _json_float(flops / nbytes) if nbytes else None,
        "predicted_s": predicted,
        "predicted_tokens_per_s": batch * n_tokens / predicted if predicted > 0 else None,
        "compute_bound_rows": sum(r.bound == "compute" for r in table),
        "memory_bound_rows": sum(r.bound == "memory" for r in table),
    }
    timed = [r for r in table if r.measured_s is not None]
    if timed:
        measured = sum(r.measured_s for r in timed)
        out.update({
            "measured_s": measured,
            "measured_rows": len(timed),
            "measured_tokens_per_s": batch * n_tokens / measured if measured > 0 else None,
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


def format_table(table: Sequence[RooflineRow], hw: Hardware, summary: Optional[dict] = None) -> str:
    has_measured = any(r.measured_s is not None for r in table)
    header = ["pos", "layer", "module", "FLOPs", "bytes", "FLOP/B", "bound", "predicted"]
    if has_measured:
        header += ["measured", "achieved", "meas/pred"]
    lines = [header]
    for r in table:
        line = [
            "-" if r.position is None else str(r.position), "-" if r.layer is None else str(r.layer), r.module,
            _si(r.flops), _si(r.bytes, "B"), "inf" if math.isinf(r.intensity) else f"{r.intensity:.3g}",
            r.bound, _time(r.predicted_s),
        ]
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


# ====================================================================== plots
def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # set here, not at import: importing this module must not change the backend
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Union[str, os.PathLike], *, dpi: int = 120) -> Path:
    """Lay out, write (creating the folder) and close a figure; returns the path."""
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    _pyplot().close(fig)
    return path


_MODULE_COLORS = {
    "block": "tab:blue", "output": "tab:red", "norm": "tab:gray", "attention.core": "tab:purple",
    "attention_norm": "tab:gray", "ffn_norm": "tab:gray", "attention.rope": "tab:olive",
    "feed_forward.act": "tab:brown", "residual": "tab:pink",
}


def plot_roofline(table: Sequence[RooflineRow], hw: Hardware, path: Union[str, os.PathLike], *,
                  title: str = "", detail: Sequence[RooflineRow] = ()) -> Path:
    """Every row on the roofline of ``hw`` (log-log); measured points beside the predicted ones.

    ``detail``: optional extra rows (e.g. the modules of one layer run) drawn as small hollow markers,
    so a layer-level plot also shows where the pieces of a layer sit.
    """
    plt = _pyplot()
    pts = [r for r in table if r.flops > 0 and r.bytes > 0]
    extra = [r for r in detail if r.flops > 0 and r.bytes > 0]
    fig, ax = plt.subplots(figsize=(9, 6))
    xs = [r.intensity for r in pts + extra] or [hw.ridge_point]
    lo = min(min(xs), hw.ridge_point) / 10
    hi = max(max(xs), hw.ridge_point) * 10
    grid = [lo * (hi / lo) ** (i / 200) for i in range(201)]
    ax.plot(grid, [attainable_flops(x, hw.peak_flops, hw.mem_bw) for x in grid], color="black", lw=2,
            label=f"roof: {_si(hw.peak_flops, 'FLOP/s')}, {_si(hw.mem_bw, 'B/s')}")
    ax.axvline(hw.ridge_point, color="black", ls=":", lw=1)
    ax.text(hw.ridge_point, 0.02, f" ridge {hw.ridge_point:.3g} FLOP/B", transform=ax.get_xaxis_transform(),
            ha="left", fontsize=8)
    seen_labels: set[str] = set()
    for i, r in enumerate(extra):
        ax.scatter([r.intensity], [r.predicted_flops_per_s], marker="s", s=18, facecolors="none",
                   edgecolors="tab:gray", linewidths=0.8, zorder=2,
                   label="modules of one layer run (predicted)" if i == 0 else None)
    for r in pts:
        color = _MODULE_COLORS.get(r.module, "tab:green" if r.module.startswith("feed_forward") else "tab:cyan")
        lab = f"{r.module} (predicted)"
        ax.scatter([r.intensity], [r.predicted_flops_per_s], marker="o", s=40, color=color, alpha=0.8,
                   edgecolors="black", linewidths=0.5, label=lab if lab not in seen_labels else None, zorder=3)
        seen_labels.add(lab)
        if r.achieved_flops_per_s is not None:
            lab = f"{r.module} (measured)"
            ax.scatter([r.intensity], [r.achieved_flops_per_s], marker="x", s=50, color=color,
                       label=lab if lab not in seen_labels else None, zorder=4)
            ax.plot([r.intensity, r.intensity], [r.achieved_flops_per_s, r.predicted_flops_per_s], color=color,
                    lw=0.6, alpha=0.5)
            seen_labels.add(lab)
    # One label per cluster of points (same intensity within ~10%), listing the modules in it.
    for rows_, style in ((pts, dict(xytext=(6, -12), fontsize=7, color="black", ha="left")),
                         (extra, dict(xytext=(-6, 6), fontsize=6, color="dimgray", ha="right"))):
        clusters: dict[float, list[RooflineRow]] = {}
        for r in rows_:
            clusters.setdefault(round(math.log10(r.intensity) / 0.04), []).append(r)
        for members in clusters.values():
            names = list(dict.fromkeys(m.module.split(".")[-1] for m in members))
            text = ", ".join(names[:6]) + (", ..." if len(names) > 6 else "")
            ax.annotate(text, (members[0].intensity, members[0].predicted_flops_per_s),
                        textcoords="offset points", **style)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_ylim(top=hw.peak_flops * 4)
    ax.set_xlabel("arithmetic intensity (FLOP / byte)")
    ax.set_ylabel("FLOP/s")
    ax.set_title(title or f"roofline on {hw.name}", fontsize=10)
    ax.grid(True, which="both", alpha=0.2)
    ax.legend(fontsize=7, loc="lower right")
    return save_figure(fig, path, dpi=120)


def macs_per_token_curves(config: LlamaConfig, schedules: Sequence[str], contexts: Sequence[int]) -> dict[str, list[int]]:
    """MACs to decode one token that attends to ``L`` positions (``n_cached = L - 1``), per schedule."""
    from .analytic import analyze

    return {s: [analyze(config, n_tokens=1, n_cached=L - 1, schedule=s).macs for L in contexts] for s in schedules}


def default_schedules(config: LlamaConfig, extra: Optional[str] = None) -> list[str]:
    names = list(SCHEDULE_NAMES) if config.n_layers == PRESET_N_LAYERS else ["baseline"]
    if extra and extra not in names:
        names.append(extra)
    return names


def default_contexts(max_len: int, n: int = 33) -> list[int]:
    pts = sorted({max(1, round(1 + (max_len - 1) * i / (n - 1))) for i in range(n)})
    return pts


def plot_macs_vs_context(config: LlamaConfig, path: Union[str, os.PathLike], *, schedules: Sequence[str],
                         contexts: Sequence[int]) -> tuple[Path, dict[str, list[int]]]:
    curves = macs_per_token_curves(config, schedules, contexts)
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 5))
    styles = ["-", "--", ":", "-."]
    for i, (name, ys) in enumerate(curves.items()):
        runs = len(resolve_schedule(name, config.n_layers))
        ax.plot(contexts, [y / 1e9 for y in ys], label=f"{name} ({runs} layer runs)", lw=1.6,
                ls=styles[i % len(styles)])
    ax.set_xlabel("context length L (positions the new token attends to)")
    ax.set_ylabel("GMACs per decoded token")
    ax.set_title(f"{config.name}: MACs to decode one token vs context length, per layer schedule\n"
                 "(schedules with the same number of layer runs coincide)", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    return save_figure(fig, path, dpi=120), curves


# ====================================================================== timing
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class WallClockTimer:
    """``perf_counter`` marks, synchronizing the device first (a no-op on CPU)."""

    def __init__(self, device: Union[str, torch.device] = "cpu") -> None:
        self.device = torch.device(device)

    def mark(self) -> float:
        _sync(self.device)
        return time.perf_counter()

    def synchronize(self) -> None:
        _sync(self.device)

    @staticmethod
    def seconds(start: float, end: float) -> float:
        return end - start


class CudaEventTimer:
    """CUDA events recorded on the current stream: marks do not stall the GPU."""

    def __init__(self, device: Union[str, torch.device] = "cuda") -> None:
        self.device = torch.device(device)

    def mark(self):
        ev = torch.cuda.Event(enable_timing=True)
        ev.record()
        return ev

    def synchronize(self) -> None:
        torch.cuda.synchronize(self.device)

    @staticmethod
    def seconds(start, end) -> float:
        return start.elapsed_time(end) / 1e3


def make_timer(device: Union[str, torch.device]):
    device = torch.device(device)
    return CudaEventTimer(device) if device.type == "cuda" else WallClockTimer(device)


class LayerTimer:
    """Times every layer *run* (schedule position) and the top-level modules of one forward.

    Forward pre/post hooks mark the start and end of ``tok_embeddings``, each decoder layer call,
    ``norm`` and ``output``; the root forward's marks give the total, and ``(root)`` is the time
    outside those modules (mask building, RoPE slicing). With ``level="module"`` the leaf modules
    of each block (``TIMED_BLOCK_MODULES``) are timed too, keyed by the running block's position.
    Use as a context manager (hooks are removed on exit).
    """

    def __init__(self, model: torch.nn.Module, timer, *, level: str = "layer") -> None:
        if level not in ("layer", "module"):
            raise ValueError(f"level must be 'layer' or 'module', got {level!r}")
        self.model = model
        self.timer = timer
        self.level = level
        self._handles: list = []
        self._marks: list[tuple[RowKey, str, Any]] = []
        self._pos = -1

    def _hook(self, key_fn: Callable[[], RowKey], phase: str):
        def hook(*_args, **_kwargs):
            self._marks.append((key_fn(), phase, self.timer.mark()))
        return hook

    def __enter__(self) -> "LayerTimer":
        m = self.model
        self._handles.append(m.register_forward_pre_hook(self._hook(lambda: (None, "(total)"), "start")))
        self._handles.append(m.register_forward_hook(self._hook(lambda: (None, "(total)"), "end")))
        for name in TOP_MODULES:
            mod = getattr(m, name)
            self._handles.append(mod.register_forward_pre_hook(self._hook(lambda n=name: (None, n), "start")))
            self._handles.append(mod.register_forward_hook(self._hook(lambda n=name: (None, n), "end")))

        def block_pre(*_a):
            self._pos += 1
            self._marks.append(((self._pos, "block"), "start", self.timer.mark()))

        def block_post(*_a):
            self._marks.append(((self._pos, "block"), "end", self.timer.mark()))

        for layer_id in sorted(set(m.schedule)):
            block = m.layers[layer_id]
            self._handles.append(block.register_forward_pre_hook(block_pre))
            self._handles.append(block.register_forward_hook(block_post))
            if self.level == "module":
                for rel in TIMED_BLOCK_MODULES:
                    sub = block.get_submodule(rel)
                    self._handles.append(sub.register_forward_pre_hook(self._hook(lambda r=rel: (self._pos, r), "start")))
                    self._handles.append(sub.register_forward_hook(self._hook(lambda r=rel: (self._pos, r), "end")))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def forward(self, tokens: torch.Tensor, start_pos: int = 0) -> dict[RowKey, float]:
        """Run one forward; return seconds per row key, plus ``(None, "(total)")`` and ``(None, "(root)")``."""
        self._marks.clear()
        self._pos = -1
        with torch.inference_mode():
            self.model(tokens, start_pos)
        self.timer.synchronize()
        starts: dict[RowKey, Any] = {}
        out: dict[RowKey, float] = {}
        for key, phase, mark in self._marks:
            if phase == "start":
                starts[key] = mark
            else:
                out[key] = out.get(key, 0.0) + self.timer.seconds(starts.pop(key), mark)
        total = out[(None, "(total)")]
        inside = sum(v for (pos, name), v in out.items() if name in TOP_MODULES or name == "block")
        out[(None, "(root)")] = max(0.0, total - inside)
        return out


@dataclass
class Timing:
    """Per-row medians over ``repeats`` forwards after ``warmup`` forwards (seconds)."""

    median: dict[RowKey, float]
    samples: dict[RowKey, list[float]] = field(repr=False)
    warmup: int
    repeats: int

    @property
    def total_s(self) -> float:
        return self.median[(None, "(total)")]

    def rows_dict(self) -> list[dict]:
        return [{"position": k[0], "module": k[1], "measured_s": v} for k, v in self.median.items()]


def time_forward(model: torch.nn.Module, tokens: torch.Tensor, start_pos: int = 0, *, timer=None,
                 warmup: int = 1, repeats: int = 3, level: str = "layer") -> Timing:
    """Median per-row times of ``model(tokens, start_pos)``. A KV cache, if needed, must be set up
    already (each repeat rewrites the same cache slots, so repeats are identical work)."""
    if repeats < 1 or warmup < 0:
        raise ValueError(f"need repeats >= 1 and warmup >= 0, got repeats={repeats}, warmup={warmup}")
    timer = timer or make_timer(tokens.device)
    samples: dict[RowKey, list[float]] = {}
    with LayerTimer(model, timer, level=level) as lt:
        for _ in range(warmup):
            lt.forward(tokens, start_pos)
        for _ in range(repeats):
            for k, v in lt.forward(tokens, start_pos).items():
                samples.setdefault(k, []).append(v)
    return Timing({k: statistics.median(v) for k, v in samples.items()}, samples, warmup, repeats)


# ====================================================================== building / measuring
def random_model(config: LlamaConfig, *, schedule=None, device="cpu", dtype=torch.float32, seed: int = 0,
                 attn_kernel: str = "math", compute_dtype: Optional[torch.dtype] = None, std: float = 0.02):
    """A model with random weights made directly on ``device`` (no CPU detour, no default init):
    N(0, std) matrices, norm weights 1 + N(0, 0.1) so that swapped norms would show."""
    from llama_ref.model import Llama

    model = Llama(config, schedule=schedule, device="meta", dtype=dtype, attn_kernel=attn_kernel,
                  compute_dtype=compute_dtype)
    model.to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:  # RMSNorm weights
                p.normal_(1.0, 0.1, generator=gen)
            else:
                p.normal_(0.0, std, generator=gen)
    model.requires_grad_(False)
    model.init_buffers()
    model.eval()
    return model


def estimate_forward_memory(config: LlamaConfig, *, batch: int, n_tokens: int, n_cached: int, n_runs: int,
                            dtype_bytes: int) -> int:
    """Weights + KV cache + the largest transient activations of one forward, in bytes (an upper-ish estimate)."""
    from .analytic import kv_cache_bytes, param_count

    rows = batch * n_tokens
    kvlen = n_cached + n_tokens
    weights = param_count(config) * dtype_bytes
    kv = kv_cache_bytes(config, batch=batch, n_positions=kvlen, n_runs=n_runs, kv_dtype_bytes=dtype_bytes)
    scores = 3 * batch * config.n_heads * n_tokens * kvlen * 4  # scores, softmax (fp32), mask sum (math kernel)
    mlp = 3 * rows * config.hidden_dim * dtype_bytes
    logits = 2 * rows * config.vocab_size * 4
    return weights + kv + scores + mlp + logits + 8 * rows * config.dim * dtype_bytes


def measure(config: LlamaConfig, *, device, dtype: torch.dtype, batch: int, n_tokens: int, n_cached: int,
            schedule=None, attn_kernel: str = "math", warmup: int = 1, repeats: int = 3, level: str = "layer",
            seed: int = 0, check_memory: bool = True) -> Timing:
    """Build a random-weight model on ``device`` and time one forward of the requested shape."""
    device = torch.device(device)
    n_runs = len(resolve_schedule(schedule, config.n_layers))
    if check_memory:
        need = estimate_forward_memory(config, batch=batch, n_tokens=n_tokens, n_cached=n_cached, n_runs=n_runs,
                                       dtype_bytes=torch.finfo(dtype).bits // 8)
        avail = available_memory_bytes(device)
        if avail is not None and need > 0.9 * avail:
            raise MemoryError(
                f"measuring {config.name} ({config.n_layers} layers) in {dtype} on {device} needs about "
                f"{need / 2**30:.1f} GiB but {avail / 2**30:.1f} GiB are available; measure fewer layers of the "
                f"same shape with --layers K (every decoder layer costs the same), or drop --measure to get "
                f"the prediction alone"
            )
    model = random_model(config, schedule=schedule, device=device, dtype=dtype, seed=seed, attn_kernel=attn_kernel,
                         compute_dtype=dtype)
    model.setup_cache(batch, n_cached + n_tokens)
    gen = torch.Generator(device="cpu").manual_seed(seed + 1)
    tokens = torch.randint(0, config.vocab_size, (batch, n_tokens), generator=gen).to(device)
    try:
        return time_forward(model, tokens, n_cached, warmup=warmup, repeats=repeats, level=level)
    finally:
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()


def load_timings(path: Union[str, os.PathLike], *, n_tokens: Optional[int] = None,
                 n_cached: Optional[int] = None, kernel: Optional[str] = None) -> dict[RowKey, float]:
    """Measured seconds per row from a JSON file written by ``llama-ref roofline --measure`` or
    ``scripts/validate_gpu.py``: a top-level ``"layers"`` list of ``{position, module, measured_s}``,
    or ``"phases"`` (a list of such objects with ``n_tokens``/``n_cached``; the one matching is used)."""
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    if isinstance(data, dict) and "phases" in data:
        phases = data["phases"]
        match = [p for p in phases
                 if (n_tokens is None or p.get("n_tokens") == n_tokens)
                 and (n_cached is None or p.get("n_cached") == n_cached)
                 and (kernel is None or p.get("attn_kernel", kernel) == kernel)]
        if not match:
            have = ", ".join(f"N={p.get('n_tokens')} C={p.get('n_cached')}" for p in phases)
            raise ValueError(f"{path}: no timings for N={n_tokens} C={n_cached} (file has: {have})")
        data = match[0]
    rows = data.get("layers") if isinstance(data, dict) else data
    if not isinstance(rows, list):
        raise ValueError(f"{path}: expected a 'layers' list of {{position, module, measured_s}}")
    out: dict[RowKey, float] = {}
    for r in rows:
        s = r.get("measured_s", r.get("seconds"))
        if s is not None:
            out[(r.get("position"), r["module"])] = float(s)
    return out


# ====================================================================== CLI
def resolve_config(model: str, *, vocab_size: Optional[int] = None) -> LlamaConfig:
    """A preset name, or a path to a HF ``config.json`` / Meta ``params.json`` (or a checkpoint directory):
    the same resolution as ``llama-ref count`` (:func:`counters.cli.resolve_model`)."""
    if model in PRESETS:
        return PRESETS[model]
    from .cli import BadInput, resolve_model

    try:
        return resolve_model(model, vocab_size=vocab_size).config
    except BadInput as e:
        raise ValueError(str(e)) from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="preset name (e.g. llama-2-7b) or path to config.json / params.json / checkpoint dir")
    parser.add_argument("--hardware", default="h100-sxm", choices=HARDWARE_NAMES,
                        help="peak table entry, or 'cpu' to measure this machine (default: h100-sxm)")
    parser.add_argument("--tokens", "-N", type=int, default=2048, help="new tokens per sequence (default 2048)")
    parser.add_argument("--cached", "-C", type=int, default=0, help="cached positions before them (default 0)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--schedule", default=None, help="layer schedule: preset name or list like '0-23,27-31'")
    parser.add_argument("--dtype", choices=sorted(DTYPE_NAMES), default=None,
                        help="compute/weight dtype: bytes per element and which peak (default bf16 on GPUs, fp32 on cpu)")
    parser.add_argument("--kv-dtype", choices=sorted(DTYPE_NAMES), default=None, help="KV cache dtype (default: --dtype)")
    parser.add_argument("--level", choices=("layer", "module"), default="layer",
                        help="one row per layer run (default) or per module")
    parser.add_argument("--layers", type=int, default=None,
                        help="use only the first K decoder layers (same shapes): lets --measure fit in memory")
    parser.add_argument("--vocab-size", type=int, default=None, help="for Meta params.json files with vocab_size -1")
    parser.add_argument("--measure", action="store_true",
                        help="also time each layer run on this machine (cpu for --hardware cpu, else CUDA)")
    parser.add_argument("--timings", default=None, help="JSON with measured per-layer seconds to plot beside the prediction")
    parser.add_argument("--attn-kernel", choices=("math", "sdpa"), default="math", help="kernel for --measure")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads for CPU measurement")
    parser.add_argument("--out", default="out/roofline",
                        help="directory for roofline.json and the PNGs (default out/roofline)")
    parser.add_argument("--no-plot", action="store_true", help="skip the PNGs")


def run(args: argparse.Namespace) -> int:
    try:
        return _run(args)
    except (ValueError, FileNotFoundError, MemoryError, RuntimeError) as e:
        print(f"llama-ref roofline: error: {e}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    from .analytic import analyze

    if args.threads:
        torch.set_num_threads(args.threads)
    config = resolve_config(args.model, vocab_size=args.vocab_size)
    if args.layers is not None:
        if args.layers < 1:
            raise ValueError(f"--layers must be >= 1, got {args.layers}")
        if args.layers > config.n_layers:
            raise ValueError(f"--layers {args.layers} exceeds the model's {config.n_layers} layers")
        config = config.replace(n_layers=args.layers, name=f"{config.name}[:{args.layers} layers]")
    for name in ("tokens", "batch"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be >= 1")
    if args.cached < 0:
        raise ValueError("--cached must be >= 0")
    dtype = args.dtype or ("fp32" if args.hardware == "cpu" else "bf16")
    kv_dtype = args.kv_dtype or dtype
    if args.measure and args.hardware != "cpu" and not torch.cuda.is_available():
        raise RuntimeError(f"--measure with --hardware {args.hardware} needs a CUDA device and none is available; "
                           "use --hardware cpu to measure this machine")
    hw = get_hardware(args.hardware, dtype)
    report = analyze(config, batch=args.batch, n_tokens=args.tokens, n_cached=args.cached, schedule=args.schedule,
                     weight_dtype_bytes=DTYPE_BYTES[dtype], act_dtype_bytes=DTYPE_BYTES[dtype],
                     kv_dtype_bytes=DTYPE_BYTES[kv_dtype])
    rows = report.layer_runs() if args.level == "layer" else report.rows

    measured = None
    measurement = None
    if args.measure:
        device = "cpu" if args.hardware == "cpu" else "cuda"
        if dtype == "tf32":
            torch.backends.cuda.matmul.allow_tf32 = True
        timing = measure(config, device=device, dtype=DTYPE_NAMES[dtype], batch=args.batch, n_tokens=args.tokens,
                         n_cached=args.cached, schedule=args.schedule, attn_kernel=args.attn_kernel,
                         warmup=args.warmup, repeats=args.repeats, level=args.level)
        measured = timing.median
        measurement = {"device": device, "attn_kernel": args.attn_kernel, "warmup": args.warmup,
                       "repeats": args.repeats, "threads": torch.get_num_threads(), "total_s": timing.total_s,
                       "weights": "random (timings do not depend on values)"}
    elif args.timings:
        measured = load_timings(args.timings, n_tokens=args.tokens, n_cached=args.cached)
        measurement = {"source": str(args.timings)}

    table = roofline_table(rows, hw, measured)
    summary = summarize(table, batch=args.batch, n_tokens=args.tokens)
    title = (f"{config.name} on {hw.name} ({dtype}): batch {args.batch}, N={args.tokens} new, C={args.cached} cached, "
             f"schedule {report.schedule_str}")
    print(title)
    print(format_table(table, hw, summary))

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    plots = {}
    curves = None
    if not args.no_plot:
        detail = []
        if args.level == "layer":  # the modules of the first layer run, for orientation
            detail = roofline_table([r for r in report.rows if r.position == 0], hw)
        plots["roofline"] = str(plot_roofline(table, hw, out / "roofline.png", title=title, detail=detail))
        schedules = default_schedules(config, args.schedule)
        contexts = default_contexts(config.max_seq_len)
        path, curves = plot_macs_vs_context(config, out / "macs_vs_context.png", schedules=schedules,
                                            contexts=contexts)
        plots["macs_vs_context"] = str(path)
    doc = {
        "model": {**config.to_dict(), "name": config.name},
        "schedule": report.schedule_str,
        "batch": args.batch, "n_tokens": args.tokens, "n_cached": args.cached,
        "dtype": dtype, "kv_dtype": kv_dtype, "level": args.level,
        "hardware": hw.to_dict(),
        "layers": [r.to_dict() for r in table],
        "total": summary,
        "measurement": measurement,
        "macs_per_token_vs_context": None if curves is None else {"contexts": contexts, "schedules": curves},
        "plots": plots,
    }
    json_path = out / "roofline.json"
    json_path.write_text(json.dumps(doc, indent=2))
    print(f"wrote {json_path}" + "".join(f", {p}" for p in plots.values()))
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="llama-ref roofline", description=__doc__.split("\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
