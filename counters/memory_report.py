"""``llama-ref memory`` output: JSON (schema ``llama-ref.memory/1``), CSV and a table, from :class:`MemoryCheck`s
(one per tensor-parallel rank, or one)."""

from __future__ import annotations

import csv
import io
from typing import Optional, Sequence

from llama_ref.memory import format_bytes

from .memory_check import MemoryCheck

JSON_SCHEMA = "llama-ref.memory/1"


def _where(where) -> Optional[dict]:
    if where is None:
        return None
    if isinstance(where, tuple):
        phase, scope, op = where
    else:
        phase, scope, op = where.phase, where.scope, where.op
    return {"phase": phase, "scope": scope, "op": op}


def request_json(check: MemoryCheck) -> dict:
    r = check.breakdown.request
    return {"model": r.config.name, "batch": r.batch, "tokens": r.seqlen, "cached": r.start_pos,
            "weight_dtype": str(r.weight_dtype).replace("torch.", ""),
            "compute_dtype": str(r.compute_dtype or r.weight_dtype).replace("torch.", ""),
            "kernel": r.attn_kernel, "device_type": r.device_type, "kv_cache": r.kv_cache and not r.train,
            "last_only": r.last_only, "train": r.train,
            **({"loss": r.loss, "recompute": r.recompute, "optimizer": r.optimizer} if r.train else {}),
            "tp": r.tp}


def check_json(check: MemoryCheck) -> dict:
    b = check.breakdown
    return {
        "bytes": {row.category: row.to_dict() for row in check.rows},
        "saved_by_scope": {"analytic": b.saved_by_scope,
                           "measured": None if check.measured is None else check.measured.saved},
        "start_bytes": b.start,
        "peak_where": {"analytic": _where(b.where),
                       "measured": None if check.measured is None else _where(check.measured.where)},
        "layers": check.layers,
        "agree": check.agree,
        "mismatches": check.mismatches(),
    }


def to_json(checks: Sequence[MemoryCheck], *, extra: Optional[dict] = None) -> dict:
    first = checks[0]
    doc = {"schema": JSON_SCHEMA, "request": request_json(first)}
    if len(checks) == 1 and first.breakdown.request.tp == 1:
        doc.update(check_json(first))
    else:
        doc["ranks"] = [{"rank": i, **check_json(c)} for i, c in enumerate(checks)]
        doc["agree"] = all(c.agree for c in checks)
    doc.update(extra or {})
    return doc


def render_csv(checks: Sequence[MemoryCheck]) -> str:
    out = io.StringIO()
    w = csv.writer(out, lineterminator="\n")
    w.writerow(["rank", "row", "analytic_bytes", "measured_bytes", "agree", "source"])
    for rank, c in enumerate(checks):
        for row in c.rows:
            w.writerow([rank, row.category, row.analytic, "" if row.measured is None else row.measured, row.agree,
                        row.source])
        for layer in c.layers:
            for key in ("saved_activation_bytes", "transient_peak_bytes"):
                v = layer[key]
                w.writerow([rank, f"layers.{layer['run']}.{key}", v["analytic"],
                            "" if v["measured"] is None else v["measured"], v["measured"] in (None, v["analytic"]),
                            "per layer run"])
    return out.getvalue()


def _n(v: Optional[int]) -> str:
    return "-" if v is None else f"{v:,}"


def render_table(checks: Sequence[MemoryCheck], *, title: str, footer: Sequence[str] = ()) -> str:
    lines = [title]
    for rank, c in enumerate(checks):
        b = c.breakdown
        if len(checks) > 1 or b.request.tp > 1:
            lines.append(f"-- rank {rank} of {b.request.tp}")
        lines.append(f"{'category':<18} {'analytic bytes':>18} {'measured bytes':>18}  ok  readable")
        for row in c.rows:
            shown = row.expected if row.expected is not None else row.analytic
            ok = "yes" if row.agree else "NO"
            if row.measured is None:
                ok = "  -"
            elif row.informational:
                ok = "info"
            note = ""
            if row.expected is not None and row.expected != row.analytic:
                note = f" (as MemTracker observes the program: {row.expected:,})"
            lines.append(f"{row.category:<18} {_n(row.analytic):>18} {_n(row.measured):>18}  {ok:>3}  "
                         f"{format_bytes(row.analytic)}{note}" if shown is not None else row.category)
        lines.append(f"peak at: {b.where} (measured: "
                     f"{'-' if c.measured is None else ', '.join(map(str, c.measured.where))})")
        lines.append(f"{'layer run':<10} {'saved activations':>18} {'measured':>14} {'transient peak':>16} "
                     f"{'measured':>14}")
        for layer in c.layers:
            s, t = layer["saved_activation_bytes"], layer["transient_peak_bytes"]
            lines.append(f"{layer['run']:<10} {_n(s['analytic']):>18} {_n(s['measured']):>14} "
                         f"{_n(t['analytic']):>16} {_n(t['measured']):>14}")
        if c.measured is not None:
            lines.append("agree: yes" if c.agree else "agree: NO: " + "; ".join(c.mismatches()[:5]))
    lines.extend(footer)
    return "\n".join(lines) + "\n"


__all__ = ["JSON_SCHEMA", "check_json", "render_csv", "render_table", "to_json"]
