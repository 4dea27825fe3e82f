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
  :func:`counters.ops.torch_flops_to_macs`), and for the CPU attention kernels by torch's own registered
  SDPA formulas (``sdpa_flop_count``, ``sdpa_backward_flop_count``, which FlopCounterMode applies to the
  CUDA kernels but not to these): source ``outside:torch``; the non-matmul FLOPs by
  :data:`counters.ops.REGISTRY` on the op's real sizes: source ``shapes``; free-list ops are free; the
  rest is unknown;
* the collectives of a tensor-parallel rank (``_c10d_functional`` all_reduce / all_gather_into_tensor, on
  :data:`counters.ops.COMMUNICATION_OPS`) are 0 FLOPs, recorded per row with their bytes; each must be
  completed by one ``wait_tensor`` in the same row;
* forward pre/post hooks keep a stack of ``(module, schedule position)`` so every forward op lands in a
  ``(position, row)`` row of :mod:`counters.table`;
* a function mode brackets ``F.scaled_dot_product_attention``: if no fused kernel ran (the meta
  device runs SDPA's math decomposition - scaled q and k, bmm, ``_safe_softmax``, bmm), the MACs are
  FlopCounterMode's bmm formula over that decomposition (``outside:torch``) and the non-matmul FLOPs
  are the fused op's (the registry's SDPA formula on the call's sizes, ``shapes``), so
  ``kernel="sdpa"`` agrees with ``kernel="math"`` on every device; the decomposition's own scaling and
  mask ops implement the meta fallback, not any real kernel, and are listed in ``notes``, not counted.

Training (``training=``): the same modes stay on through the loss and ``backward()``. Each module's
forward post-hook labels the autograd nodes its forward created (walking back from its outputs to its
inputs; children label first, so a node gets the innermost module); during backward an op belongs to
the row of ``torch._C._current_autograd_node()`` (phase ``backward``), and a checkpointed layer's
forward running again inside the backward is attributed by the forward hooks (phase ``recompute``). A
fused attention kernel's backward is split by torch's own formulas into the model work (2 x the
forward's products) and its recomputation of the scores (phase ``kernel_recompute``, executed only).

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
from torch.utils._pytree import tree_flatten, tree_map
from torch.utils.flop_counter import FlopCounterMode

from llama_ref.model import AttentionCore

from .ops import (
    INTEGER_BOOKKEEPING,
    OUTSIDE_SDPA_OPS,
    REGISTRY,
    SDPA_BACKEND_OPS,
    SDPA_BACKWARD_OPS,
    OpCall,
    OpCount,
    TensorMeta,
    UncountableCall,
    canonical_op_name,
    raise_or_warn_unknown,
    torch_flops_to_macs,
    torch_sdpa_backward_macs,
    torch_sdpa_macs,
)
from .primitives import ZERO, Count
from .result import (
    BACKWARD,
    DECODE,
    FORWARD,
    KERNEL_RECOMPUTE,
    PREFILL,
    RECOMPUTE,
    SOURCE_SHAPES,
    CounterResult,
    outside,
)
from .table import LOSS_ROW_NAME, Attn, RowKey, attention_fused_backward_ops, row_for_module, row_order, sum_ops
from .training import Training, backward_context, loss_of, trainable

logger = logging.getLogger(__name__)

__all__ = ["count_torch"]

_SDPA_FUNCTIONS = {F.scaled_dot_product_attention, torch._C._nn.scaled_dot_product_attention}
_SDPA_SCHEMA = torch.ops.aten.scaled_dot_product_attention.default._schema
_ROOT: RowKey = (None, "(root)")
_LOSS: RowKey = (None, LOSS_ROW_NAME)


def _meta(x: Any) -> Any:
    return TensorMeta.of(x) if isinstance(x, torch.Tensor) else x


def _outputs(out: Any) -> tuple:
    if isinstance(out, (tuple, list)):
        return tuple(_meta(o) for o in out)
    return (_meta(out),)


def _tensors(x: Any) -> list[torch.Tensor]:
    return [t for t in tree_flatten(x)[0] if isinstance(t, torch.Tensor)]


@dataclass
class _Entry:
    name: str
    row: RowKey
    phase: str
    ours: OpCount
    outside_macs: Optional[int]  # MACs by a torch formula (None: torch has none for this op)
    by_flop_counter: bool = False  # FlopCounterMode itself counted it (else it left the op at zero)
    recompute_macs: int = 0  # a fused attention backward's own recomputation of the scores (torch's formula)


@dataclass
class _SdpaRegion:
    row: RowKey
    call: OpCall
    entries: list[_Entry] = field(default_factory=list)
    backward: list[_Entry] = field(default_factory=list)


class _Tally:
    """Everything one ``count_torch`` call accumulates."""

    def __init__(self, torch_registry: dict) -> None:
        self.torch_registry = torch_registry
        self.result = CounterResult("torch")
        self.unknown: Counter[str] = Counter()
        self.stack: list[tuple[str, Optional[int]]] = []
        self.layer_ids: list[int] = []  # the layers the current forward ran, in order
        self.forwards: list[list[int]] = []  # every forward's layer runs
        self.layer_positions: dict[int, list[int]] = {}
        self.forward_phase = FORWARD  # generation: prefill / decode, set per forward
        self.by_start_pos = False
        self.outside_model: Counter[str] = Counter()  # a generation loop's own ops (sampling), not counted
        self.sdpa: Optional[_SdpaRegion] = None
        self.sdpa_regions: list[_SdpaRegion] = []
        self.in_loss = False
        self.training = False
        self.node_rows: dict[Any, RowKey] = {}  # autograd node -> row of the module that created it
        self.sdpa_nodes: dict[Any, _SdpaRegion] = {}  # autograd node -> the SDPA call that created it
        self.unlabelled: Counter[str] = Counter()
        self.torch_seen_flops = 0  # sum of FlopCounterMode formulas over the ops we saw
        self.missed: dict[str, list] = {}  # op -> [calls, Count FlopCounterMode left at zero]
        self.torch_only: Counter[str] = Counter()
        self.decomposed_sdpa = 0
        self.decomposition_ops: Counter[str] = Counter()  # meta SDPA fallback ops, not counted
        self.sdpa_by_torch_formula: Counter[str] = Counter()
        self.mac_disagreements: Counter[str] = Counter()
        self.bookkeeping: Counter[str] = Counter()
        self.unknown_reasons: dict[str, set[str]] = {}
        self.waits: Counter[tuple[str, RowKey]] = Counter()  # (phase, row) -> wait_tensor calls

    # ------------------------------------------------------------ attribution
    def row(self) -> RowKey:
        if not self.stack:
            return _LOSS if self.in_loss else _ROOT
        fqn, position = self.stack[-1]
        return row_for_module(fqn, position)

    def where(self, name: str) -> tuple[str, RowKey, Optional[_SdpaRegion]]:
        """(phase, row, the SDPA call whose backward this is) of the op being dispatched now."""
        if not backward_context():
            return self.forward_phase, self.row(), None
        if self.stack:  # a checkpointed layer's forward, recomputed inside the backward
            return RECOMPUTE, self.row(), None
        node = torch._C._current_autograd_node()
        row = self.node_rows.get(node)
        if row is None:
            self.unlabelled[name] += 1  # e.g. the engine's seed gradient (ones_like): no node runs it
            return BACKWARD, _ROOT, None
        return BACKWARD, row, self.sdpa_nodes.get(node)

    def label(self, outputs: Any, inputs: Any, row: RowKey, sdpa: Optional[_SdpaRegion] = None) -> None:
        """Label the autograd nodes a forward created: walk back from ``outputs`` to ``inputs``; a node
        already labelled (by a child, which finishes first) is walked through, not relabelled."""
        stop = {t.grad_fn for t in _tensors(inputs) if t.grad_fn is not None}
        todo = [t.grad_fn for t in _tensors(outputs) if t.grad_fn is not None]
        seen: set[int] = set()
        while todo:
            node = todo.pop()
            if node is None or node in stop or id(node) in seen:
                continue
            seen.add(id(node))
            if type(node).__name__ == "AccumulateGrad":  # a parameter: its gradient adds run in the producer
                continue
            if node not in self.node_rows:
                self.node_rows[node] = row
                if sdpa is not None:
                    self.sdpa_nodes[node] = sdpa
            todo.extend(fn for fn, _ in node.next_functions if fn is not None)

    # ------------------------------------------------------------ ops
    def add_unknown(self, name: str, reason: str) -> None:
        self.unknown[name] += 1
        self.unknown_reasons.setdefault(name, set()).add(reason)

    def start_forward(self, start_pos: int) -> None:
        self.layer_ids = []
        self.forwards.append(self.layer_ids)
        if self.by_start_pos:
            self.forward_phase = PREFILL if start_pos == 0 else DECODE

    def on_op(self, func: torch._ops.OpOverload, args: tuple, kwargs: dict, out: Any) -> None:
        name = canonical_op_name(func)
        if self.by_start_pos and not self.stack:  # the generation loop's own work between forwards
            if not REGISTRY.is_free(name):
                self.outside_model[name] += 1
            return
        packet = func.overloadpacket
        outside_macs = None
        recompute_macs = 0
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
            try:
                if name in SDPA_BACKWARD_OPS and ours.status == "counted":
                    # torch's formula counts the kernel's recomputation of the scores too: split it off
                    model_macs, recompute_macs = torch_sdpa_backward_macs(call)
                    if outside_macs is not None and outside_macs != model_macs + recompute_macs:
                        self.mac_disagreements[name] += 1
                    outside_macs = model_macs
                    self.sdpa_by_torch_formula[name] += 1
                elif outside_macs is None and name in OUTSIDE_SDPA_OPS and ours.status == "counted":
                    # FlopCounterMode registers torch's SDPA formula for the CUDA kernels only; applied here
                    # to the CPU kernel, the attention MACs still come from torch's code, not ours.
                    outside_macs = torch_sdpa_macs(call)
                    self.sdpa_by_torch_formula[name] += 1
            except UncountableCall as e:
                ours, outside_macs, recompute_macs = OpCount("unknown", ZERO, str(e)), None, 0
        phase, row, region = self.where(name)
        entry = _Entry(name, row, phase, ours, outside_macs, by_flop_counter=packet in self.torch_registry,
                       recompute_macs=recompute_macs)
        if self.sdpa is not None:
            self.sdpa.entries.append(entry)
        elif region is not None:
            region.backward.append(entry)
        else:
            self.commit(entry)

    def check_waits(self) -> None:
        """Every collective is completed by exactly one ``wait_tensor`` in the same row; anything else is
        listed as unknown work (a collective half seen is not a collective counted)."""
        rows = set(self.waits) | {(p, k) for p, per in self.result.collectives.items() for k in per}
        for phase, key in sorted(rows, key=lambda pk: (pk[0], -1 if pk[1][0] is None else pk[1][0], pk[1][1])):
            calls = sum(self.result.collectives.get(phase, {}).get(key, {}).values())
            if calls != self.waits[(phase, key)]:
                self.add_unknown("_c10d_functional::wait_tensor",
                                 f"row {key} ({phase}): {calls} collective(s) but {self.waits[(phase, key)]} wait(s)")

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
            self.result.add(entry.row, Count(macs=macs), outside("torch"), entry.phase)
            if entry.recompute_macs:
                self.result.add(entry.row, Count(macs=entry.recompute_macs), outside("torch"), KERNEL_RECOMPUTE)
            left = shapes if entry.by_flop_counter else shapes + Count(macs=macs + entry.recompute_macs)
        elif ours.status == "communication":  # 0 FLOPs: recorded with its bytes, or (a wait) paired below
            if ours.collective is None:
                self.waits[(entry.phase, entry.row)] += 1
            else:
                self.result.add_collective(entry.row, ours.collective, entry.phase)
            return
        elif ours.status == "unknown":
            self.add_unknown(entry.name, ours.reason)
            return
        elif ours.status == "free":
            if ours.reason == INTEGER_BOOKKEEPING:
                self.bookkeeping[entry.name] += 1
            return
        else:
            shapes = left = ours.count
        self.result.add(entry.row, shapes, SOURCE_SHAPES, entry.phase)
        if left != ZERO:
            slot = self.missed.setdefault(entry.name, [0, ZERO])
            slot[0] += 1
            slot[1] = slot[1] + left

    @contextmanager
    def sdpa_region(self, args: tuple, kwargs: dict):
        if self.sdpa is not None:  # pragma: no cover - SDPA does not nest
            yield None
            return
        call = OpCall.from_schema("scaled_dot_product_attention", _SDPA_SCHEMA,
                                  tree_map(_meta, tuple(args)), tree_map(_meta, dict(kwargs)))
        region = self.open_region(call)
        try:
            yield region
        finally:
            self.close_region()

    def open_region(self, call: OpCall) -> _SdpaRegion:
        region = self.sdpa = _SdpaRegion(self.row(), call)
        return region

    def close_region(self) -> None:
        region, self.sdpa = self.sdpa, None
        self.sdpa_regions.append(region)
        if any(e.name in SDPA_BACKEND_OPS for e in region.entries):
            for e in region.entries:  # a fused kernel ran: count op by op
                self.commit(e)
            return
        # The math decomposition (meta device): its matrix products by FlopCounterMode, the rest as the
        # fused op it implements.
        self._commit_decomposition(region.entries, REGISTRY.classify(region.call), region.row,
                                   region.entries[0].phase if region.entries else FORWARD, region.call)

    def _commit_decomposition(self, entries: list[_Entry], fused: OpCount, row: RowKey, phase: str,
                              call: OpCall, check_outside: bool = True) -> None:
        self.decomposed_sdpa += 1
        for e in entries:
            if e.outside_macs is None and e.ours.status == "unknown":
                self.add_unknown(e.name, e.ours.reason)
            elif e.ours.status == "communication":  # pragma: no cover - no collective runs inside attention
                self.commit(e)
            elif e.outside_macs is None and e.ours.status == "counted" and e.ours.count != ZERO:
                self.decomposition_ops[e.name] += 1
        if fused.status == "unknown":
            self.add_unknown(call.op, fused.reason)
            return
        torch_macs = sum(e.outside_macs for e in entries if e.outside_macs is not None)
        if check_outside:
            try:
                if torch_macs != torch_sdpa_macs(call):
                    self.mac_disagreements[call.op] += 1
            except UncountableCall:
                pass
        self.commit(_Entry(call.op, row, phase, fused, torch_macs, by_flop_counter=True))

    def finish_backward(self) -> None:
        """Commit the backward of every SDPA call: op by op if a fused backward kernel ran, else (the meta
        decomposition's backward) its products by FlopCounterMode and the rest by the fused convention."""
        for region in self.sdpa_regions:
            if not region.backward:
                continue
            if any(e.name in SDPA_BACKWARD_OPS for e in region.backward):
                for e in region.backward:
                    self.commit(e)
                continue
            q, k = region.call.tensor("query"), region.call.tensor("key")
            heads = 1
            for d in q.shape[:-2]:
                heads *= d
            rest = sum_ops(attention_fused_backward_ops(Attn(heads, q.shape[-2], k.shape[-2], 1, 1, q.shape[-1], False)))
            fused = OpCount("counted", rest)
            self._commit_decomposition(region.backward, fused, region.row, BACKWARD,
                                       OpCall("scaled_dot_product_attention_backward"), check_outside=False)
            model_macs = 2 * torch_sdpa_macs(region.call)  # two products per forward product, by torch's formula
            if sum(e.outside_macs for e in region.backward if e.outside_macs is not None) != model_macs:
                self.mac_disagreements["scaled_dot_product_attention_backward"] += 1


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
            with self.tally.sdpa_region(args, kwargs) as region:
                out = func(*args, **kwargs)
                if region is not None and self.tally.training and not backward_context():
                    self.tally.label(out, (args, kwargs), region.row, sdpa=region)
                return out
        return func(*args, **kwargs)


def _recomputed_sdpa_call(mod: AttentionCore, args: tuple) -> OpCall:
    """The ``scaled_dot_product_attention`` call an sdpa-kernel AttentionCore makes, from its inputs.

    Needed for a checkpointed layer's recomputation inside the backward, where torch's function modes are
    off, so the function-level bracket cannot see the call (the dispatch-level ops still can)."""
    xq, keys, values, mask = (tuple(args) + (None,) * 4)[:4]
    bsz, seqlen, n_heads, head_dim = xq.shape
    q = TensorMeta((bsz, n_heads, seqlen, head_dim), xq.dtype)  # after the transpose
    kv = TensorMeta((bsz, n_heads, keys.shape[1], head_dim), keys.dtype)  # after repeat_kv and the transpose
    masked = isinstance(mask, torch.Tensor)
    return OpCall("scaled_dot_product_attention", {"query": q, "key": kv, "value": kv,
                                                   "attn_mask": TensorMeta.of(mask) if masked else None,
                                                   "dropout_p": 0.0, "is_causal": not masked and seqlen > 1})


def _install_module_stack(model: nn.Module, tally: _Tally) -> list:
    """Forward pre/post hooks on every module keeping ``tally.stack`` of (name, schedule position); in
    training the post-hooks also label the autograd nodes each module's forward created."""
    handles: list = []
    layers = getattr(model, "layers", None)
    layer_index = {id(layer): i for i, layer in enumerate(layers)} if layers is not None else {}

    def start(mod, args, kwargs):
        if not backward_context():
            tally.start_forward(args[1] if len(args) > 1 else kwargs.get("start_pos", 0))

    handles.append(model.register_forward_pre_hook(start, with_kwargs=True))
    for fqn, module in model.named_modules():
        def pre(mod, args, fqn=fqn):
            if id(mod) in layer_index:
                if backward_context():  # recomputing a checkpointed run: backward runs the runs in reverse
                    position = tally.layer_positions[layer_index[id(mod)]].pop()
                else:
                    position = len(tally.layer_ids)
                    tally.layer_ids.append(layer_index[id(mod)])
                    tally.layer_positions.setdefault(layer_index[id(mod)], []).append(position)
            else:
                position = tally.stack[-1][1] if tally.stack else None
            tally.stack.append((fqn, position))
            if isinstance(mod, AttentionCore) and mod.attn_kernel == "sdpa" and backward_context():
                tally.open_region(_recomputed_sdpa_call(mod, args))

        def post(mod, args, output, fqn=fqn):
            if isinstance(mod, AttentionCore) and tally.sdpa is not None and backward_context():
                tally.close_region()
            if tally.training and not backward_context() and tally.stack and tally.stack[-1][0] == fqn:
                tally.label(output, args, tally.row())
            if tally.stack and tally.stack[-1][0] == fqn:
                tally.stack.pop()

        handles.append(module.register_forward_pre_hook(pre))
        handles.append(module.register_forward_hook(post, always_call=True))
    return handles


class TorchCounter:
    """The torch counter as a context manager: the modes and hooks are on inside the ``with`` block, over
    any code (one forward, a training step, a whole generation loop); :meth:`finish` gives the result.

    ``by_start_pos``: a generation task: each forward is phase ``prefill`` (``start_pos == 0``) or
    ``decode``, and the ops the loop runs between forwards (sampling) are listed, not counted."""

    def __init__(self, model: nn.Module, *, strict: bool = False, training: bool = False,
                 by_start_pos: bool = False) -> None:
        self.model = model
        self.strict = strict
        self.flop_mode = FlopCounterMode(display=False)
        self.tally = _Tally(self.flop_mode.flop_registry)
        self.tally.training = training
        self.tally.by_start_pos = by_start_pos
        self._hooks: list = []
        self._modes: list = []

    def __enter__(self) -> "TorchCounter":
        self._hooks = _install_module_stack(self.model, self.tally)
        self._modes = [_SdpaWatcher(self.tally), _Recorder(self.tally), self.flop_mode]
        for m in self._modes:
            m.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        for m in reversed(self._modes):
            m.__exit__(*exc)
        for h in self._hooks:
            h.remove()

    def finish(self, *, loss: bool = False) -> CounterResult:
        tally = self.tally
        schedule = tuple(getattr(self.model, "schedule", ()))
        for run in tally.forwards:
            if tuple(run) != schedule:
                raise RuntimeError(f"a forward ran layers {run}, but the model's schedule is {list(schedule)}")
        result = tally.result
        tally.check_waits()
        for phase in result.phases or (FORWARD,):
            result.ensure_rows(row_order(len(schedule), loss=loss), phase)
        _notes(result, tally, self.flop_mode)
        result.unknown_ops = dict(sorted(tally.unknown.items()))
        raise_or_warn_unknown("torch", result.unknown_ops, self.strict, logger, tally.unknown_reasons)
        return result


def count_torch(model: nn.Module, tokens: torch.Tensor, start_pos: int = 0, *, strict: bool = False,
                training: Optional[Training] = None) -> CounterResult:
    """Count one forward ``model(tokens, start_pos)`` (or with ``training``, one training step: forward, loss,
    backward) with ``FlopCounterMode`` plus ``counters.ops``.

    Rows are keyed ``(position, module)`` as :mod:`counters.table` says. For ``start_pos > 0`` the
    caller has set up and pre-filled the KV cache (the forward writes the cache as a real call
    would). Works on CPU, CUDA and the meta device.

    ``strict``: raise :class:`counters.ops.UncountedOpError` if an op has no formula; otherwise log a
    warning and list it in ``unknown_ops``. ``notes`` say what FlopCounterMode alone would report.
    """
    if training is not None and start_pos:
        raise ValueError(f"a training step starts at position 0, got start_pos={start_pos}")
    counter = TorchCounter(model, strict=strict, training=training is not None)
    tally = counter.tally
    with (trainable(model, training) if training is not None else torch.no_grad()), counter:
        logits = model(tokens, start_pos)
        if training is not None:
            tally.in_loss = True
            loss = loss_of(logits, tokens, training.loss)
            tally.label(loss, logits, _LOSS)
            tally.in_loss = False
            loss.backward()
            tally.finish_backward()
    if training is not None:
        for phase in (BACKWARD,) + ((RECOMPUTE,) if training.recompute else ()):
            tally.result.ensure_rows(row_order(len(model.schedule), loss=True), phase)
    return counter.finish(loss=training is not None)


def _notes(result: CounterResult, tally: _Tally, flop_mode: FlopCounterMode) -> None:
    raw_flops = flop_mode.get_total_flops()
    if raw_flops != tally.torch_seen_flops:  # pragma: no cover - would mean the modes saw different ops
        raise RuntimeError(f"FlopCounterMode total {raw_flops} != {tally.torch_seen_flops} summed over the ops seen")
    raw_macs = torch_flops_to_macs(raw_flops)
    executed = sum((result.phase_total(p) for p in result.phases), ZERO)
    result.notes.append(
        f"FlopCounterMode alone: {raw_flops} FLOPs = {raw_macs} MACs (it counts 2 per MAC and only matrix "
        f"products / GPU attention kernels); counted here: {executed.macs} MACs + {executed.nonmatmul_flops} "
        f"non-matmul FLOPs executed, so it misses {executed.macs - raw_macs} MACs and "
        f"{executed.nonmatmul_flops} non-matmul FLOPs."
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
            "MACs by torch's sdpa_flop_count / sdpa_backward_flop_count (FlopCounterMode registers them for the "
            "CUDA kernels only): " + ", ".join(f"{k} x{v}" for k, v in sorted(tally.sdpa_by_torch_formula.items())))
    if result.phase_total(KERNEL_RECOMPUTE) != ZERO:
        result.notes.append(
            f"the fused attention backward recomputes the scores QK^T before its four products: "
            f"{result.phase_total(KERNEL_RECOMPUTE).macs} MACs executed (phase {KERNEL_RECOMPUTE}, by torch's "
            "formula), not model work")
    if tally.decomposed_sdpa:
        result.notes.append(
            f"scaled_dot_product_attention ran as its math decomposition {tally.decomposed_sdpa} time(s) (forward "
            "and backward, no fused kernel on this device): MACs by FlopCounterMode's bmm formula over it, "
            "non-matmul FLOPs as the fused op's (counters.ops SDPA formulas on the call's sizes); the "
            "decomposition's own element-wise ops ("
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
        result.notes.append("counted with torch's MACs only (no formula in counters.ops): "
                            + ", ".join(f"{k} x{v}" for k, v in sorted(tally.torch_only.items())))
    costly_unlabelled = {k: v for k, v in tally.unlabelled.items() if not REGISTRY.is_free(k)}
    if costly_unlabelled:
        result.notes.append("backward ops run by no labelled autograd node, counted in (root): "
                            + ", ".join(f"{k} x{v}" for k, v in sorted(costly_unlabelled.items())))
    if tally.outside_model:
        result.notes.append("the generation loop's own ops between forwards (choosing tokens), not model work, "
                            "not counted: " + ", ".join(f"{k} x{v}" for k, v in sorted(tally.outside_model.items())))
