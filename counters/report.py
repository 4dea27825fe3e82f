"""Render a :class:`~counters.crosscheck.CrosscheckReport` as a table, one JSON object, or CSV.

Every column and key names its unit: ``macs`` (multiply-accumulates of matrix products),
``flops`` (= 2 x macs), ``nonmatmul_flops`` (everything else, kept apart), ``bytes``.
"""

from __future__ import annotations

import csv
import io
from typing import Any, Optional, Sequence

from llama_ref.schedule import format_schedule

from .crosscheck import CrosscheckReport, CrosscheckRow

JSON_SCHEMA = "llama-ref.count/1"

CONVENTIONS = (
    "MAC = one multiply+accumulate of a matrix product (q, k, v, o, w1, w3, w2, output head, QK^T, "
    "attention x V); attention counted dense over the n_tokens x (n_cached + n_tokens) score matrix of every "
    "query head (GQA shares k/v heads, not the products); embedding lookup = 0 MACs. FLOPs = 2 x MACs. "
    "Non-matmul FLOPs (RMSNorm, RoPE, scale, mask, softmax, SiLU gate, residual adds) per element with the "
    "op primitives of counters.primitives, kept apart. flops_exact = M*N*(2K-1) per matrix product; "
    "macs_causal counts only the score entries a causal mask keeps. All counts are exact integers. "
    "Sources: formula = our closed form on config sizes; shapes = our formula on sizes read from the run's "
    "tensors; outside:<tool> = the tool's own count (fvcore's handles, torch's registered formulas)."
)


def fmt(n: Optional[int]) -> str:
    """An integer with thousands separators; ``-`` for a quantity a counter does not count."""
    return "-" if n is None else f"{n:,}"


def counted_line(report: CrosscheckReport) -> str:
    """One line saying what was counted and how."""
    kvlen = report.n_cached + report.n_tokens
    step = "prefill" if report.n_cached == 0 else "step"
    return (f"Counted: one forward ({step}) of batch {report.batch} x {report.n_tokens} new tokens after "
            f"{report.n_cached} cached, {len(report.schedule)} layer runs; attention dense over "
            f"{report.n_tokens} x {kvlen} scores per query head; by {', '.join(report.counters)}"
            + (f" on device {report.device}" if report.device else "") + ".")


def _check_cell(report: CrosscheckReport, row: CrosscheckRow) -> str:
    n = len(report.counters)
    if n == 1:
        return ""
    return f"ok {n}/{n}" if row.agree else "MISMATCH"


def _sources_cell(row: CrosscheckRow) -> str:
    """Independent sources behind the row's MACs / non-matmul FLOPs ("-": nothing to confirm)."""
    return "/".join(str(row.n_sources(q)) if row.n_sources(q) else "-" for q in ("macs", "nonmatmul_flops"))


def render_table(report: CrosscheckReport, *, detail: bool = False, title: Optional[str] = None,
                 max_mismatches: int = 20) -> str:
    """Readable at a glance: one line per layer run (``detail``: per module), totals, verdict."""
    ref = report.reference
    rows = report.rows if detail else report.layer_runs()
    lines: list[str] = []
    if title:
        lines.append(title)
    lines.append(counted_line(report))
    header = (f"{'run':>5} {'layer':>5}  {'module':<18} {'MACs':>22} {'FLOPs (2xMACs)':>22} "
              f"{'non-matmul FLOPs':>20}  {'check':<8} sources")
    lines.append(header)
    lines.append("-" * len(header))
    for r in rows:
        if detail is False and r.module in ("(root)",) and not r.macs[ref] and not r.nonmatmul_flops.get(ref):
            continue
        pos = "-" if r.position is None else str(r.position)
        layer = "-" if r.layer is None else str(r.layer)
        lines.append(f"{pos:>5} {layer:>5}  {r.module:<18} {fmt(r.macs[ref]):>22} {fmt(2 * r.macs[ref]):>22} "
                     f"{fmt(r.nonmatmul_flops[ref]):>20}  {_check_cell(report, r):<8} {_sources_cell(r)}")
    lines.append("-" * len(header))
    t = report.totals[ref]
    lines.append(f"{'TOTAL':>11}  {'':<18} {fmt(t['macs']):>22} {fmt(t['flops']):>22} "
                 f"{fmt(t['nonmatmul_flops']):>20}  ({ref})")
    lines.append("")
    lines.append(f"{'counter':<10} {'MACs':>22} {'FLOPs':>22} {'non-matmul FLOPs':>20}  {'unknown ops':<12} "
                 "sources of its MACs | non-matmul FLOPs")
    sources = report.sources()
    for name in report.counters:
        t = report.totals[name]
        unknown = report.unknown_ops.get(name) or {}
        src = " | ".join(", ".join(sources[name].get(q, {})) or "-" for q in ("macs", "nonmatmul_flops"))
        lines.append(f"{name:<10} {fmt(t['macs']):>22} {fmt(t['flops']):>22} {fmt(t['nonmatmul_flops']):>20}  "
                     + f"{(', '.join(f'{op} x{k}' for op, k in sorted(unknown.items())) if unknown else 'none'):<12} "
                     + src)
    a = report.analytic
    lines.append("")
    if a is not None:
        t = a.total
        lines.append(f"params {fmt(report.params)} | KV cache {fmt(a.kv_cache_bytes)} bytes | causal-useful MACs "
                     f"{fmt(a.macs_causal)} | exact FLOPs M*N*(2K-1) {fmt(a.flops_exact)}")
        lines.append(f"bytes moved {fmt(t.bytes)} = weights {fmt(t.weight_bytes)} + activations {fmt(t.act_bytes)} "
                     f"+ KV read {fmt(t.kv_read_bytes)} + KV write {fmt(t.kv_write_bytes)} "
                     f"({a.weight_dtype_bytes}-byte weights, {a.act_dtype_bytes}-byte activations); "
                     f"intensity {t.intensity:.1f} FLOPs/byte")
    else:
        lines.append(f"params {fmt(report.params)}")
    lines.append("")
    n_rows = len(report.rows)
    if report.agree:
        what = " and ".join(f"{label} ({len(report.compared[q])} counters)"
                            for q, label in (("macs", "MACs"), ("nonmatmul_flops", "non-matmul FLOPs"))
                            if report.compared[q])
        lines.append(f"AGREE: {len(report.counters)} counter(s) equal exactly on {what} in all {n_rows} rows "
                     "and in total.")
        lines.append("sources column: independent sources behind each row's MACs / non-matmul FLOPs "
                     "(formula, shapes, outside:<tool>; see README).")
    else:
        lines.append(f"DISAGREE: {len(report.mismatches)} mismatch(es):")
        for m in report.mismatches[:max_mismatches]:
            lines.append(f"  {m}")
        if len(report.mismatches) > max_mismatches:
            lines.append(f"  ... {len(report.mismatches) - max_mismatches} more (see --format json)")
    for note in report.notes:
        if "does not measure" in note:
            lines.append(f"note: {note}")
    return "\n".join(lines)


def _row_dict(report: CrosscheckReport, r: CrosscheckRow) -> dict:
    return {
        "position": r.position, "layer": r.layer, "module": r.module,
        "macs": dict(r.macs), "nonmatmul_flops": dict(r.nonmatmul_flops), "agree": r.agree,
        "independent_sources": {q: list(v) for q, v in r.sources.items()},
    }


def to_json(report: CrosscheckReport, *, extra: Optional[dict] = None) -> dict:
    """One JSON-ready object. Keys: ``params``, ``totals`` {counter: {macs, flops, nonmatmul_flops}},
    ``layers`` (a row per module per schedule position, top-level rows with position null; each with
    every counter's macs and nonmatmul_flops), ``layer_runs`` (per run), ``agree``, ``mismatches``, ..."""
    cfg = report.config
    doc: dict[str, Any] = {
        "schema": JSON_SCHEMA,
        "model": getattr(cfg, "name", None),
        "config": cfg.to_dict() if hasattr(cfg, "to_dict") else None,
        "schedule": _schedule_str(report.schedule),
        "schedule_layers": list(report.schedule),
        "layer_runs_count": len(report.schedule),
        "tokens": report.n_tokens,
        "cached": report.n_cached,
        "batch": report.batch,
        "device": report.device,
        "dtype": report.dtype,
        "kernel": report.kernel,
        "counters": list(report.counters),
        "conventions": CONVENTIONS,
        "counted": counted_line(report),
        "params": report.params,
        "totals": {n: dict(t) for n, t in report.totals.items()},
        "agree": report.agree,
        "complete": report.complete,
        "compared": {q: list(v) for q, v in report.compared.items()},
        "sources": report.sources(),
        "mismatches": [
            {"position": m.key[0], "module": m.key[1], "quantity": m.quantity, "reference": m.reference,
             "expected": m.expected, "counter": m.counter, "got": m.got}
            for m in report.mismatches
        ],
        "unknown_ops": {n: dict(u) for n, u in report.unknown_ops.items()},
        "layers": [_row_dict(report, r) for r in report.rows],
        "layer_runs": [_row_dict(report, r) for r in report.layer_runs()],
        "notes": list(report.notes),
    }
    a = report.analytic
    if a is not None:
        t = a.total
        doc["analytic"] = {
            "macs": t.macs, "flops": t.flops, "nonmatmul_flops": t.nonmatmul_flops, "total_flops": t.total_flops,
            "flops_exact": t.flops_exact, "macs_causal": t.macs_causal,
            "weight_bytes": t.weight_bytes, "act_bytes": t.act_bytes, "kv_read_bytes": t.kv_read_bytes,
            "kv_write_bytes": t.kv_write_bytes, "bytes": t.bytes, "kv_cache_bytes": a.kv_cache_bytes,
            "intensity_flops_per_byte": t.intensity,
            "weight_dtype_bytes": a.weight_dtype_bytes, "act_dtype_bytes": a.act_dtype_bytes,
            "kv_dtype_bytes": a.kv_dtype_bytes,
        }
    if extra:
        doc.update(extra)
    return doc


def _schedule_str(schedule: Sequence[int]) -> str:
    return format_schedule(schedule)


def render_csv(report: CrosscheckReport, *, detail: bool = True) -> str:
    """One line per row (``detail``) or per layer run: position, layer, module, then
    ``macs_<counter>`` and ``nonmatmul_flops_<counter>`` for every counter, and ``agree``."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    names = report.counters
    w.writerow(["position", "layer", "module", *(f"macs_{n}" for n in names),
                *(f"nonmatmul_flops_{n}" for n in names), "agree"])
    for r in (report.rows if detail else report.layer_runs()):
        w.writerow(["" if r.position is None else r.position, "" if r.layer is None else r.layer, r.module,
                    *(r.macs[n] for n in names),
                    *("" if r.nonmatmul_flops[n] is None else r.nonmatmul_flops[n] for n in names),
                    int(r.agree)])
    return buf.getvalue()
