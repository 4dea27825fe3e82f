"""Render a :class:`~counters.crosscheck.CrosscheckReport` as a table, one JSON object, or CSV.

Every column and key names its unit: ``macs`` (multiply-accumulates of matrix products),
``flops`` (= 2 x macs), ``nonmatmul_flops`` (everything else, kept apart), ``bytes``. A training step's
numbers are split by phase (``forward_macs``, ``backward_macs``, ...); ``macs`` is then the model work,
forward + backward.
"""

from __future__ import annotations

import csv
import io
from typing import Any, Optional

from llama_ref.schedule import format_schedule

from .crosscheck import CrosscheckReport, CrosscheckRow
from .result import BACKWARD, DECODE, FORWARD, KERNEL_RECOMPUTE, PREFILL, QUANTITIES, RECOMPUTE

JSON_SCHEMA = "llama-ref.count/2"

CONVENTIONS = (
    "MAC = one multiply+accumulate of a matrix product (q, k, v, o, w1, w3, w2, output head, QK^T, "
    "attention x V); attention counted dense over the tokens x (cached + tokens) score matrix of every "
    "query head (GQA shares k/v heads, not the products); embedding lookup = 0 MACs. FLOPs = 2 x MACs. "
    "Non-matmul FLOPs (RMSNorm, RoPE, scale, mask, softmax, SiLU gate, residual adds) per element with the "
    "op primitives of counters.primitives, kept apart. flops_exact = M*N*(2K-1) per matrix product; "
    "macs_causal counts only the score entries a causal mask keeps. All counts are exact integers. "
    "Sources: formula = our closed form on config sizes; shapes = our formula on sizes read from the run's "
    "tensors; outside:<tool> = the tool's own count (fvcore's handles, torch's registered formulas). "
    "Training step: forward + loss + backward, every parameter trained; backward as autograd runs it (two "
    "products per forward product; the non-matmul backward ops with the primitives' backward constants); "
    "recompute = the forward of checkpointed layers run again (executed, not model work)."
)


def fmt(n: Optional[int]) -> str:
    """An integer with thousands separators; ``-`` for a quantity a counter does not count."""
    return "-" if n is None else f"{n:,}"


def counted_line(report: CrosscheckReport) -> str:
    """One line saying what was counted and how."""
    kvlen = report.start_pos + report.seqlen
    where = f" on device {report.device}" if report.device else ""
    if report.generation is not None:
        g = report.generation
        return (f"Counted: a generation task, run through the real generation loop: prefill of batch {report.batch} "
                f"x {g.prompt} prompt tokens (the output head on "
                + ("every position: --all-logits" if g.all_logits else "the last position only, as generation runs it")
                + f"), then {g.new_tokens - 1} decode step(s) of 1 token (the last attending "
                f"to {g.length - 1} positions) for {g.new_tokens} new tokens, {len(report.schedule)} layer runs "
                f"each; by {', '.join(report.counters)}{where}.")
    if report.training is not None:
        t = report.training
        return (f"Counted: one training step (forward + {t.loss} loss + backward, every parameter trained"
                + (", activation checkpointing per layer" if t.recompute else "")
                + f") of batch {report.batch} x {report.seqlen} tokens, {len(report.schedule)} layer runs; "
                f"attention dense over {report.seqlen} x {kvlen} scores per query head; by "
                f"{', '.join(report.counters)}{where}.")
    step = "prefill" if report.start_pos == 0 else "step"
    return (f"Counted: one forward ({step}) of batch {report.batch} x {report.seqlen} new tokens after "
            f"{report.start_pos} cached, {len(report.schedule)} layer runs; attention dense over "
            f"{report.seqlen} x {kvlen} scores per query head; by {', '.join(report.counters)}{where}.")


def _check_cell(report: CrosscheckReport, row: CrosscheckRow) -> str:
    n = len(report.counters)
    if n == 1:
        return ""
    return f"ok {n}/{n}" if row.agree else "MISMATCH"


def _sources_cell(row: CrosscheckRow) -> str:
    """Independent sources behind the row's MACs / non-matmul FLOPs ("-": nothing to confirm)."""
    return "/".join(str(row.n_sources(q)) if row.n_sources(q) else "-" for q in QUANTITIES)


def _columns(report: CrosscheckReport) -> list[tuple[str, str, Optional[str]]]:
    """(header, quantity, phase) of the number columns: one forward has MACs, FLOPs and non-matmul FLOPs;
    a training step each quantity per model phase."""
    if report.generation is not None:
        return [("prefill MACs", "macs", PREFILL), ("decode MACs", "macs", DECODE),
                ("prefill non-matmul", "nonmatmul_flops", PREFILL), ("decode non-matmul", "nonmatmul_flops", DECODE)]
    if report.training is None:
        return [("MACs", "macs", None), ("FLOPs (2xMACs)", "flops", None),
                ("non-matmul FLOPs", "nonmatmul_flops", None)]
    return [("fwd MACs", "macs", FORWARD), ("bwd MACs", "macs", BACKWARD),
            ("fwd non-matmul", "nonmatmul_flops", FORWARD), ("bwd non-matmul", "nonmatmul_flops", BACKWARD)]


def _cell(row: CrosscheckRow, ref: str, quantity: str, phase: Optional[str]) -> Optional[int]:
    if quantity == "flops":
        macs = row.get("macs", phase).get(ref)
        return None if macs is None else 2 * macs
    return row.get(quantity, phase).get(ref)


def render_table(report: CrosscheckReport, *, detail: bool = False, title: Optional[str] = None,
                 max_mismatches: int = 20) -> str:
    """Readable at a glance: one line per layer run (``detail``: per module), totals, verdict."""
    ref = report.reference
    rows = report.rows if detail else report.layer_runs()
    columns = _columns(report)
    width = 22 if len(columns) == 3 else 20
    lines: list[str] = []
    if title:
        lines.append(title)
    lines.append(counted_line(report))
    header = (f"{'run':>5} {'layer':>5}  {'module':<18} " + " ".join(f"{h:>{width}}" for h, _, _ in columns)
              + f"  {'check':<8} sources")
    lines.append(header)
    lines.append("-" * len(header))
    for r in rows:
        if not detail and r.module == "(root)" and not r.macs.get(ref) and not r.nonmatmul_flops.get(ref):
            continue
        pos = "-" if r.position is None else str(r.position)
        layer = "-" if r.layer is None else str(r.layer)
        cells = " ".join(f"{fmt(_cell(r, ref, q, p)):>{width}}" for _, q, p in columns)
        lines.append(f"{pos:>5} {layer:>5}  {r.module:<18} {cells}  {_check_cell(report, r):<8} {_sources_cell(r)}")
    lines.append("-" * len(header))
    t = report.totals[ref]
    total_cells = " ".join(f"{fmt(_total(t, q, p)):>{width}}" for _, q, p in columns)
    lines.append(f"{'TOTAL':>11}  {'':<18} {total_cells}  ({ref})")
    lines.append("")
    lines.extend(_counter_lines(report))
    lines.append("")
    lines.extend(_analytic_lines(report))
    lines.append("")
    n_rows = len(report.rows)
    if report.agree:
        compared = [f"{label} ({len(report.compared[(p, q)])} counters{'' if p == FORWARD else ', ' + p})"
                    for p in report.phases for q, label in (("macs", "MACs"), ("nonmatmul_flops", "non-matmul FLOPs"))
                    if len(report.compared[(p, q)]) > 1]
        lines.append(f"AGREE: {len(report.counters)} counter(s) equal exactly on {', '.join(compared) or 'nothing'} "
                     f"in all {n_rows} rows and in total.")
        lines.append("sources column: independent sources behind each row's MACs / non-matmul FLOPs "
                     "(formula, shapes, outside:<tool>; see docs/counting.md).")
    else:
        lines.append(f"DISAGREE: {len(report.mismatches)} mismatch(es):")
        for m in report.mismatches[:max_mismatches]:
            lines.append(f"  {m}")
        if len(report.mismatches) > max_mismatches:
            lines.append(f"  ... {len(report.mismatches) - max_mismatches} more (see --format json)")
    for note in report.notes:
        if "does not measure" in note or "measured by" in note or "cannot" in note or "recomputes the scores" in note:
            lines.append(f"note: {note}")
    return "\n".join(lines)


def _total(totals: dict, quantity: str, phase: Optional[str]) -> Optional[int]:
    return totals.get(quantity if phase is None else f"{phase}_{quantity}")


def _counter_lines(report: CrosscheckReport) -> list[str]:
    training = report.training is not None
    lines = [f"{'counter':<10} {'MACs':>22} {'FLOPs':>22} {'non-matmul FLOPs':>20}  {'unknown ops':<12} "
             "sources of its MACs | non-matmul FLOPs"
             + ("   (model work: forward + backward)" if training else "")]
    sources = report.sources()
    for name in report.counters:
        t = report.totals[name]
        unknown = report.unknown_ops.get(name) or {}
        src = " | ".join(", ".join(sources[name].get(q, {})) or "-" for q in QUANTITIES)
        macs, nonmm, scope = t["macs"], t["nonmatmul_flops"], ""
        if training and macs is None and t.get("forward_macs") is not None:  # a counter that sees the forward only
            macs, nonmm, scope = t["forward_macs"], t["forward_nonmatmul_flops"], "   (forward only)"
        lines.append(f"{name:<10} {fmt(macs):>22} {fmt(None if macs is None else 2 * macs):>22} {fmt(nonmm):>20}  "
                     + f"{(', '.join(f'{op} x{k}' for op, k in sorted(unknown.items())) if unknown else 'none'):<12} "
                     + src + scope)
    if training:
        ref = report.totals[report.reference]
        lines.append(f"loss ({report.training.loss}): {fmt(ref.get('loss_nonmatmul_flops'))} non-matmul FLOPs "
                     "(forward + backward, not in the totals above)")
        for name in report.counters:
            t = report.totals[name]
            extra = [f"{p} {fmt(t.get(f'{p}_macs'))} MACs" for p in (RECOMPUTE, KERNEL_RECOMPUTE)
                     if t.get(f"{p}_macs")]
            if extra:
                lines.append(f"executed by {name}: {fmt(t.get('executed_macs'))} MACs = model {fmt(t['macs'])} + "
                             + " + ".join(extra))
    return lines


def _analytic_lines(report: CrosscheckReport) -> list[str]:
    a = report.analytic
    if a is None:
        return [f"params {fmt(report.params)}"]
    if report.training is not None:
        return [f"params {fmt(report.params)} | forward exact FLOPs M*N*(2K-1) {fmt(a.flops_exact)} | forward "
                f"causal-useful MACs {fmt(a.macs_causal)}"]
    t = a.total
    return [f"params {fmt(report.params)} | KV cache {fmt(a.kv_cache_bytes)} bytes | causal-useful MACs "
            f"{fmt(a.macs_causal)} | exact FLOPs M*N*(2K-1) {fmt(a.flops_exact)}",
            f"bytes moved {fmt(t.bytes)} = weights {fmt(t.weight_bytes)} + activations {fmt(t.act_bytes)} "
            f"+ KV read {fmt(t.kv_read_bytes)} + KV write {fmt(t.kv_write_bytes)} "
            f"({a.weight_dtype_bytes}-byte weights, {a.act_dtype_bytes}-byte activations); "
            f"intensity {t.intensity:.1f} FLOPs/byte"]


def _row_dict(report: CrosscheckReport, r: CrosscheckRow) -> dict:
    d = {"position": r.position, "layer": r.layer, "module": r.module,
         "macs": dict(r.macs), "nonmatmul_flops": dict(r.nonmatmul_flops), "agree": r.agree}
    if len(report.phases) > 1:
        for p in report.phases:
            for q in QUANTITIES:
                d[f"{p}_{q}"] = dict(r.get(q, p))
    d["independent_sources"] = {(q if p == FORWARD and len(report.phases) == 1 else f"{p}_{q}"): list(v)
                                for (p, q), v in r.sources.items()}
    return d


def to_json(report: CrosscheckReport, *, extra: Optional[dict] = None) -> dict:
    """One JSON-ready object. Keys: ``params``, ``totals`` {counter: {macs, flops, nonmatmul_flops, ...}},
    ``layers`` (a row per module per schedule position, top-level rows with position null; each with
    every counter's macs and nonmatmul_flops), ``layer_runs`` (per run), ``agree``, ``mismatches``,
    ``sources`` {counter: {quantity: {source: amount}}}, ..."""
    cfg = report.config
    doc: dict[str, Any] = {
        "schema": JSON_SCHEMA,
        "model": getattr(cfg, "name", None),
        "config": cfg.to_dict() if hasattr(cfg, "to_dict") else None,
        "task": "train" if report.training is not None else "generate" if report.generation is not None else "forward",
        "schedule": format_schedule(report.schedule),
        "schedule_layers": list(report.schedule),
        "layer_runs_count": len(report.schedule),
        "tokens": report.seqlen,
        "cached": report.start_pos,
        "batch": report.batch,
        "device": report.device,
        "dtype": report.dtype,
        "compute_dtype": report.compute_dtype,
        "compute_dtype_reason": report.compute_dtype_reason,
        "kernel": report.attn_kernel,
        "counters": list(report.counters),
        "phases": list(report.phases),
        "conventions": CONVENTIONS,
        "counted": counted_line(report),
        "params": report.params,
        "totals": {n: dict(t) for n, t in report.totals.items()},
        "agree": report.agree,
        "complete": report.complete,
        "compared": {f"{p}_{q}" if len(report.phases) > 1 else q: list(v) for (p, q), v in report.compared.items()},
        "sources": report.sources(),
        "mismatches": [
            {"position": m.key[0], "module": m.key[1], "phase": m.phase, "quantity": m.quantity,
             "reference": m.reference, "expected": m.expected, "counter": m.counter, "got": m.got}
            for m in report.mismatches
        ],
        "unknown_ops": {n: dict(u) for n, u in report.unknown_ops.items()},
        "layers": [_row_dict(report, r) for r in report.rows],
        "layer_runs": [_row_dict(report, r) for r in report.layer_runs()],
        "notes": list(report.notes),
    }
    if report.training is not None:
        doc["training"] = {"loss": report.training.loss, "recompute": report.training.recompute}
    if report.generation is not None:
        doc["generation"] = {"prompt": report.generation.prompt, "new_tokens": report.generation.new_tokens,
                             "prefill_logits": "all positions" if report.generation.all_logits else "last position"}
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
        if report.training is not None:
            doc["analytic"]["scope"] = "the step's forward (bytes, exact and causal FLOPs are forward figures)"
    if extra:
        doc.update(extra)
    return doc


def render_csv(report: CrosscheckReport, *, detail: bool = True) -> str:
    """One line per row (``detail``) or per layer run: position, layer, module, then per phase
    ``<phase>_macs_<counter>`` and ``<phase>_nonmatmul_flops_<counter>`` (for one forward simply
    ``macs_<counter>``, ``nonmatmul_flops_<counter>``), and ``agree``."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    names = report.counters
    single = len(report.phases) == 1
    columns = [(p, q) for p in report.phases for q in QUANTITIES]
    columns.sort(key=lambda pq: (QUANTITIES.index(pq[1]), report.phases.index(pq[0])))
    w.writerow(["position", "layer", "module",
                *(f"{q}_{n}" if single else f"{p}_{q}_{n}" for p, q in columns for n in names), "agree"])
    for r in (report.rows if detail else report.layer_runs()):
        w.writerow(["" if r.position is None else r.position, "" if r.layer is None else r.layer, r.module,
                    *("" if r.get(q, p).get(n) is None else r.get(q, p)[n] for p, q in columns for n in names),
                    int(r.agree)])
    return buf.getvalue()


__all__ = ["CONVENTIONS", "JSON_SCHEMA", "counted_line", "fmt", "render_csv", "render_table", "to_json"]
