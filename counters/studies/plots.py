"""Figures of the studies: every row on a roofline, and MACs per decoded token against context length
(for the schedules of one model, and for every preset of a model family).

matplotlib is imported when a figure is drawn, with the Agg backend chosen there: importing this
module changes no global state.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import NamedTuple, Optional, Sequence, Union

from llama_ref.config import FAMILIES, PRESETS, Family, LlamaConfig, family_of  # noqa: F401  (re-exported)
from llama_ref.schedule import PRESET_N_LAYERS, SCHEDULE_NAMES, resolve_schedule

from ..analytic import analyze, macs_polynomial
from .hardware import Hardware
from .roofline import RooflineRow, _si, attainable_flops

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
    """MACs to decode one token that attends to ``L`` positions (``start_pos = L - 1``), per schedule."""
    return {s: [analyze(config, seqlen=1, start_pos=L - 1, schedule=s).macs for L in contexts] for s in schedules}


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


# ---------------------------------------------------------------- the family view
class ContextCurve(NamedTuple):
    """MACs to decode one token at each context length ``L`` (``start_pos = L - 1``), and the exact line
    ``macs = a + b * L`` they lie on (``a``, ``b`` the coefficients of :func:`counters.analytic.macs_polynomial`:
    decoding at context L costs what one token of an L-token forward costs on average)."""

    contexts: list[int]
    macs: list[int]
    a: int
    b: int


def log_contexts(max_len: int, per_octave: int = 3) -> list[int]:
    """Context lengths from 1 to ``max_len`` (both included), ``per_octave`` points per doubling."""
    if isinstance(max_len, bool) or not isinstance(max_len, int) or max_len < 1:
        raise ValueError(f"max_len must be a positive int, got {max_len!r}")
    if isinstance(per_octave, bool) or not isinstance(per_octave, int) or per_octave < 1:
        raise ValueError(f"per_octave must be a positive int, got {per_octave!r}")
    steps = math.floor(math.log2(max_len) * per_octave)
    return sorted({1, max_len} | {min(max_len, round(2 ** (i / per_octave))) for i in range(steps + 1)})


def family_curves(family: Union[Family, str], *, per_octave: int = 3) -> dict[str, ContextCurve]:
    """For every preset of ``family``: MACs to decode one token against context length, up to the
    preset's own ``max_seq_len``, each point counted by :func:`counters.analytic.analyze`."""
    fam = FAMILIES[family] if isinstance(family, str) and family in FAMILIES else family
    if not isinstance(fam, Family):
        raise ValueError(f"unknown family {family!r}; known: {', '.join(FAMILIES)}")
    out = {}
    for name in fam.presets:
        config = PRESETS[name]
        contexts = log_contexts(config.max_seq_len, per_octave)
        macs = [analyze(config, seqlen=1, start_pos=L - 1).macs for L in contexts]
        out[name] = ContextCurve(contexts, macs, *macs_polynomial(config))
    return out


def plot_family_macs_vs_context(family: Union[Family, str], path: Union[str, os.PathLike], *,
                                highlight: Optional[str] = None,
                                per_octave: int = 3) -> tuple[Path, dict[str, ContextCurve]]:
    """One figure: MACs to decode one token vs context length for every preset of ``family``, each up to
    its own max context, log-log (contexts span 1 to 128k positions and models 1B to 405B). ``highlight``:
    a preset drawn thicker (the model the command was run on). Returns the path and the curves."""
    fam = FAMILIES[family] if isinstance(family, str) and family in FAMILIES else family
    curves = family_curves(fam, per_octave=per_octave)
    if highlight is not None and highlight not in curves:
        raise ValueError(f"highlight {highlight!r} is not a preset of {fam.title} ({', '.join(curves)})")
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, 5.5))
    styles = ["-", "--", "-.", ":"]
    drawn: dict[tuple, str] = {}
    for i, (name, c) in enumerate(curves.items()):
        label = f"{name}: {c.a / 1e9:.3g} G + {c.b:,}·L MACs, L up to {c.contexts[-1]:,}"
        same = drawn.setdefault((tuple(c.contexts), tuple(c.macs)), name)
        if same != name:  # e.g. Llama 3.1-70B and 3.3-70B: one shape, one curve
            label += f" (same curve as {same})"
        ax.plot(c.contexts, c.macs, ls=styles[i % len(styles)], lw=3.0 if name == highlight else 1.5,
                label=label + ("  <- this model" if name == highlight else ""))
        ax.plot([c.contexts[-1]], [c.macs[-1]], marker="o", ms=4, color=ax.lines[-1].get_color())  # max context
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("context length L (positions the new token attends to), up to each model's max context")
    ax.set_ylabel("MACs per decoded token")
    ax.set_title(f"{fam.title}: MACs to decode one token vs context length\n"
                 "(flat: weights dominate; rising: attention over the context, b·L)", fontsize=10)
    ax.grid(True, which="both", alpha=0.25)
    ax.legend(fontsize=7, loc="best")
    return save_figure(fig, path, dpi=120), curves
