"""The PyTorch opinion: ``torch.utils.flop_counter.FlopCounterMode``, completed and attributed per run.

``FlopCounterMode`` sees every dispatch-level op but has formulas only for matrix products and the
CUDA attention kernels (counting 2 FLOPs per MAC); everything else - element-wise work, softmax,
RoPE's complex multiply, and CPU attention (``_scaled_dot_product_flash_attention_for_cpu``) - it
counts as zero without a word. Its module tracker also merges the runs of a layer that a schedule
repeats. Here:

* the real ``FlopCounterMode`` runs (its total is what it *alone* would say, reported in ``notes``
  together with the ops it left at zero);
* an outer dispatch mode sees the same leaf ops right after ``FlopCounterMode`` and counts each:
  MACs by ``FlopCounterMode``'s own formula where it has one (converted exactly by
  :func:`counters.ops.torch_flops_to_macs`), and for the CPU attention kernel by torch's own registered
  SDPA formula (``sdpa_flop_count``, which FlopCounterMode applies to the CUDA kernels but not to this
  one): source ``outside:torch``; the non-matmul FLOPs by :data:`counters.ops.REGISTRY` on the op's
  real sizes: source ``shapes``; free-list ops are free; the rest is unknown;
* forward pre/post hooks keep a stack of ``(module, schedule position)`` so every op lands in a
  ``(position, row)`` row of :mod:`counters.table`;
* a function mode brackets ``F.scaled_dot_product_attention``: if no fused kernel ran (the meta
  device runs SDPA's math decomposition - scaled q and k, bmm, ``_safe_softmax``, bmm), the MACs are
  FlopCounterMode's bmm formula over that decomposition (``outside:torch``) and the non-matmul FLOPs
  are the fused op's (the registry's SDPA formula on the call's sizes, ``shapes``), so
  ``kernel="sdpa"`` agrees with ``kernel="math"`` on every device; the decomposition's own scaling and
  mask ops implement the meta fallback, not any real kernel, and are listed in ``notes``, not counted.

The sum of ``FlopCounterMode``'s formulas over the ops we saw is checked to equal its own total.
"""

from __future__ import annotations

import logging
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map
from torch.utils.flop_counter import FlopCounterMode

from .ops import (
    INTEGER_BOOKKEEPING,
    OUTSIDE_SDPA_OPS,
    REGISTRY,
    SDPA_BACKEND_OPS,
    OpCall,
    OpCount,
    TensorMeta,
    UncountableCall,
    canonical_op_name,
    raise_or_warn_unknown,
    torch_flops_to_macs,
    torch_sdpa_macs,
)
from .primitives import ZERO, Count
from .result import SOURCE_SHAPES, CounterResult, outside
from .table import RowKey, row_for_module, row_order

logger = logging.getLogger(__name__)

__all__ = ["count_torch"]

_SDPA_FUNCTIONS = {F.scaled_dot_product_attention, torch._C._nn.scaled_dot_product_attention}
_SDPA_SCHEMA = torch.ops.aten.scaled_dot_product_attention.default._schema


def _meta(x: Any) -> Any:
    return TensorMeta.of(x) if isinstance(x, torch.Tensor) else x


def _outputs(out: Any) -> tuple:
    if isinstance(out, (tuple, list)):
        return tuple(_meta(o) for o in out)
    return (_meta(out),)


@dataclass
class _Entry:
    name: str
    row: RowKey
    ours: OpCount
    outside_macs: Optional[int]  # MACs by a torch formula (None: torch has none for this op)
    by_flop_counter: bool = False  # FlopCounterMode itself counted it (else it left the op at zero)


@dataclass
class _SdpaRegion:
    row: RowKey
    call: OpCall
    entries: list[_Entry] = field(default_factory=list)


class _Tally:
    """Everything one ``count_torch`` call accumulates."""

    def __init__(self, torch_registry: dict) -> None:
        self.torch_registry = torch_registry
        self.result = CounterResult("torch")
        self.unknown: Counter[str] = Counter()
        self.stack: list[tuple[str, Optional[int]]] = []
        self.layer_ids: list[int] = []
        self.sdpa: Optional[_SdpaRegion] = None
        self.torch_seen_flops = 0  # sum of FlopCounterMode formulas over the ops we saw
        self.missed: dict[str, list] = {}  # op -> [calls, Count FlopCounterMode left at zero]
        self.torch_only: Counter[str] = Counter()
        self.decomposed_sdpa = 0
        self.decomposition_ops: Counter[str] = Counter()  # meta SDPA fallback ops, not counted
        self.sdpa_by_torch_formula: Counter[str] = Counter()
        self.mac_disagreements: Counter[str] = Counter()
        self.bookkeeping: Counter[str] = Counter()
        self.unknown_reasons: dict[str, set[str]] = {}

    # ------------------------------------------------------------ attribution
    def row(self) -> RowKey:
        if not self.stack:
            return (None, "(root)")
        fqn, position = self.stack[-1]
        return row_for_module(fqn, position)

    # ------------------------------------------------------------ ops
    def add_unknown(self, name: str, reason: str) -> None:
        self.unknown[name] += 1
        self.unknown_reasons.setdefault(name, set()).add(reason)

    def on_op(self, func: torch._ops.OpOverload, args: tuple, kwargs: dict, out: Any) -> None:
        name = canonical_op_name(func)
        packet = func.overloadpacket
        outside_macs = None
        if packet in self.torch_registry:
            flops = self.torch_registry[packet](*args, **kwargs, out_val=out)
            self.torch_seen_flops += flops
            outside_macs = torch_flops_to_macs(flops)
        if REGISTRY.is_free(name) and outside_macs is None:
            ours = OpCount("free")
        else:
            call = OpCall.from_schema(name, func._schema, tree_map(_meta, tuple(args)), tree_map(_meta, dict(kwargs)),
                                      _outputs(out))
            ours = REGISTRY.classify(call)
            if outside_macs is None and name in OUTSIDE_SDPA_OPS and ours.status == "counted":
                # FlopCounterMode registers torch's SDPA formula for the CUDA kernels only; applied here
                # to the CPU kernel, the attention MACs still come from torch's code, not ours.
                try:
                    outside_macs = torch_sdpa_macs(call)
                    self.sdpa_by_torch_formula[name] += 1
                except UncountableCall as e:
                    ours = OpCount("unknown", ZERO, str(e))
        entry = _Entry(name, self.row(), ours, outside_macs, by_flop_counter=packet in self.torch_registry)
        if self.sdpa is not None:
            self.sdpa.entries.append(entry)
        else:
            self.commit(entry)

    def commit(self, entry: _Entry) -> None:
        ours = entry.ours
        if entry.outside_macs is not None:
            macs = entry.outside_macs
            if ours.status == "counted":
                if ours.count.macs != macs:
                    self.mac_disagreements[entry.name] += 1
                shapes = Count(nonmatmul_flops=ours.count.nonmatmul_flops)
            else:  # torch knows it, counters.ops does not: its MACs, nothing else known
                shapes = ZERO
                self.torch_only[entry.name] += 1
            self.result.add(entry.row, Count(macs=macs), outside("torch"))
            left = shapes if entry.by_flop_counter else shapes + Count(macs=macs)
        elif ours.status == "unknown":
            self.add_unknown(entry.name, ours.reason)
            return
        elif ours.status == "free":
            if ours.reason == INTEGER_BOOKKEEPING:
                self.bookkeeping[entry.name] += 1
            return
        else:
            shapes = left = ours.count
        self.result.add(entry.row, shapes, SOURCE_SHAPES)
        if left != ZERO:
            slot = self.missed.setdefault(entry.name, [0, ZERO])
            slot[0] += 1
            slot[1] = slot[1] + left

    @contextmanager
    def sdpa_region(self, args: tuple, kwargs: dict):
        if self.sdpa is not None:  # pragma: no cover - SDPA does not nest
            yield
            return
        call = OpCall.from_schema("scaled_dot_product_attention", _SDPA_SCHEMA,
                                  tree_map(_meta, tuple(args)), tree_map(_meta, dict(kwargs)))
        region = self.sdpa = _SdpaRegion(self.row(), call)
        try:
            yield region
        finally:
            self.sdpa = None
        if any(e.name in SDPA_BACKEND_OPS for e in region.entries):
            for e in region.entries:  # a fused kernel ran: count op by op
                self.commit(e)
            return
        # The math decomposition (meta device): its matrix products by FlopCounterMode, the rest as the
        # fused op it implements.
        self.decomposed_sdpa += 1
        for e in region.entries:
            if e.outside_macs is None and e.ours.status == "unknown":
                self.add_unknown(e.name, e.ours.reason)
            elif e.outside_macs is None and e.ours.status == "counted" and e.ours.count != ZERO:
                self.decomposition_ops[e.name] += 1
        fused = REGISTRY.classify(call)
        if fused.status == "unknown":
            self.add_unknown(call.op, fused.reason)
            return
        torch_macs = sum(e.outside_macs for e in region.entries if e.outside_macs is not None)
        try:
            if torch_macs != torch_sdpa_macs(call):
                self.mac_disagreements[call.op] += 1
        except UncountableCall:
            pass
        self.commit(_Entry(call.op, region.row, fused, torch_macs, by_flop_counter=True))


class _Recorder(TorchDispatchMode):
    """Outermost dispatch mode: sees each leaf op right after FlopCounterMode did."""

    def __init__(self, tally: _Tally) -> None:
        super().__init__()
        self.tally = tally

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        self.tally.on_op(func, args, kwargs, out)
        return out


class _SdpaWatcher(TorchFunctionMode):
    def __init__(self, tally: _Tally) -> None:
        super().__init__()
        self.tally = tally

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _SDPA_FUNCTIONS:
            with self.tally.sdpa_region(args, kwargs):
                return func(*args, **kwargs)
        return func(*args, **kwargs)


def _install_module_stack(model: nn.Module, tally: _Tally) -> list:
    """Forward pre/post hooks on every module keeping ``tally.stack`` of (name, schedule position)."""
    handles: list = []
    layers = getattr(model, "layers", None)
    layer_index = {id(layer): i for i, layer in enumerate(layers)} if layers is not None else {}
    for fqn, module in model.named_modules():
        def pre(mod, args, fqn=fqn):
            if id(mod) in layer_index:
                position = len(tally.layer_ids)
                tally.layer_ids.append(layer_index[id(mod)])
            else:
                position = tally.stack[-1][1] if tally.stack else None
            tally.stack.append((fqn, position))

        def post(mod, args, output, fqn=fqn):
            if tally.stack and tally.stack[-1][0] == fqn:
                tally.stack.pop()

        handles.append(module.register_forward_pre_hook(pre))
        handles.append(module.register_forward_hook(post, always_call=True))
    return handles


def count_torch(model: nn.Module, tokens: torch.Tensor, start_pos: int = 0, *, strict: bool = False) -> CounterResult:
    """Count one forward ``model(tokens, start_pos)`` with ``FlopCounterMode`` plus ``counters.ops``.

    Rows are keyed ``(position, module)`` as :mod:`counters.result` says. For ``start_pos > 0`` the
    caller has set up and pre-filled the KV cache (the forward writes the cache as a real call
    would). Works on CPU, CUDA and the meta device.

    ``strict``: raise :class:`counters.ops.UncountedOpError` if an op has no formula; otherwise log a
    warning and list it in ``unknown_ops``. ``notes`` say what FlopCounterMode alone would report.
    """
    flop_mode = FlopCounterMode(display=False)
    tally = _Tally(flop_mode.flop_registry)
    hooks = _install_module_stack(model, tally)
    try:
        with torch.no_grad(), _SdpaWatcher(tally), _Recorder(tally), flop_mode:
            model(tokens, start_pos)
    finally:
        for h in hooks:
            h.remove()

    schedule = tuple(getattr(model, "schedule", tally.layer_ids))
    if tuple(tally.layer_ids) != schedule:
        raise RuntimeError(f"forward ran layers {tally.layer_ids}, but the model's schedule is {list(schedule)}")

    result = CounterResult("torch")
    for key in row_order(len(tally.layer_ids)):
        result.rows[key] = ZERO
    for key, count in tally.result.rows.items():
        result.rows[key] = result.rows.get(key, ZERO) + count
    result.sources = tally.result.sources

    raw_flops = flop_mode.get_total_flops()
    if raw_flops != tally.torch_seen_flops:  # pragma: no cover - would mean the modes saw different ops
        raise RuntimeError(f"FlopCounterMode total {raw_flops} != {tally.torch_seen_flops} summed over the ops seen")
    raw_macs = torch_flops_to_macs(raw_flops)
    total = result.total
    result.notes.append(
        f"FlopCounterMode alone: {raw_flops} FLOPs = {raw_macs} MACs (it counts 2 per MAC and only matrix "
        f"products / GPU attention kernels); counted here: {total.macs} MACs + {total.nonmatmul_flops} non-matmul "
        f"FLOPs, so it misses {total.macs - raw_macs} MACs and {total.nonmatmul_flops} non-matmul FLOPs."
    )
    if tally.missed:
        listing = "; ".join(
            f"{name} x{calls} ({c.macs} MACs + {c.nonmatmul_flops} FLOPs)" if c.macs else
            f"{name} x{calls} ({c.nonmatmul_flops} FLOPs)"
            for name, (calls, c) in sorted(tally.missed.items())
        )
        result.notes.append("FlopCounterMode left at zero (silently): " + listing)
    if tally.sdpa_by_torch_formula:
        result.notes.append(
            "MACs by torch's sdpa_flop_count (FlopCounterMode registers it for the CUDA kernels only): "
            + ", ".join(f"{k} x{v}" for k, v in sorted(tally.sdpa_by_torch_formula.items())))
    if tally.decomposed_sdpa:
        result.notes.append(
            f"scaled_dot_product_attention ran as its math decomposition {tally.decomposed_sdpa} time(s) (no fused "
            "kernel on this device): MACs by FlopCounterMode's bmm formula over it, non-matmul FLOPs as the fused "
            "op's (counters.ops SDPA formula on the call's sizes); the decomposition's own element-wise ops ("
            + ", ".join(f"{k} x{v}" for k, v in sorted(tally.decomposition_ops.items()))
            + ") implement the meta fallback and are not counted."
        )
    if tally.mac_disagreements:
        result.notes.append("torch's MACs differ from counters.ops' own formula for: "
                            + ", ".join(f"{k} x{v}" for k, v in sorted(tally.mac_disagreements.items())))
    if tally.bookkeeping:
        result.notes.append("free as integer bookkeeping (integer-only operands, e.g. the token-id range check): "
                            + ", ".join(f"{k} x{v}" for k, v in sorted(tally.bookkeeping.items())))
    if tally.torch_only:
        result.notes.append("counted with FlopCounterMode's MACs only (no formula in counters.ops): "
                            + ", ".join(f"{k} x{v}" for k, v in sorted(tally.torch_only.items())))
    result.unknown_ops = dict(sorted(tally.unknown.items()))
    raise_or_warn_unknown("torch", result.unknown_ops, strict, logger, tally.unknown_reasons)
    return result
