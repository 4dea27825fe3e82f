"""The fvcore opinion: ``FlopCountAnalysis`` over a jit trace, attributed per schedule position.

fvcore traces the model with ``torch.jit`` and pushes one scope per module call, so a node's scope
names the module that ran it. Its ``by_module`` merges the runs of a layer that a schedule repeats,
so we push one more scope per decoder-layer *run* (``@pos<k>``) while fvcore traces, capture the
graph fvcore analysed, and attribute its nodes to ``(position, row)`` rows of :mod:`counters.table`:

* matrix products fvcore has handles for (``aten::linear``, ``aten::matmul``, ``aten::mm``,
  ``aten::bmm``, ``aten::addmm``, ``aten::einsum``): fvcore's own count, 1 per MAC (converted exactly by
  :func:`counters.ops.fvcore_to_macs`): source ``outside:fvcore``;
* ``aten::scaled_dot_product_attention`` (fvcore has no handle): MACs by torch's own registered SDPA
  formula on the node's shapes: source ``outside:torch``;
* every non-matmul FLOP (element-wise ops, softmax, RoPE's complex multiply, the SDPA scale/mask/softmax,
  a bias add): :data:`counters.ops.REGISTRY` on the sizes the trace recorded: source ``shapes``;
* free ops: the registry's reviewed free list;
* a tensor-parallel rank's communication steps (``prim::PythonOp.ReduceFromTensorParallel`` /
  ``GatherFromTensorParallel``, on :data:`counters.ops.COMMUNICATION_OPS`): 0 FLOPs, recorded per row as
  collectives with their bytes (the traced output shape, the Function's TPGroup);
* anything else is an unknown op.

``FlopCountAnalysis`` itself runs with its own matrix-product handles and every other op of ours set to
"ignored", and the sum of the ``outside:fvcore`` MACs over all rows is checked to equal its ``total()``
exactly (attribution neither lost nor duplicated work). fvcore's own ignore list (which drops e.g.
``aten::max``, ``aten::clamp``, ``aten::relu``) is *not* used to decide what is free.
"""

from __future__ import annotations

import logging
import warnings
from collections import Counter
from typing import Any, Optional
from unittest import mock

import torch
from torch import nn


from .ops import (
    INTEGER_BOOKKEEPING,
    OUTSIDE_SDPA_OPS,
    REGISTRY,
    UNKNOWN,
    OpCall,
    TensorMeta,
    UncountableCall,
    canonical_op_name,
    fvcore_to_macs,
    raise_or_warn_unknown,
    torch_sdpa_macs,
)
from .primitives import ZERO, Count
from .result import FORWARD, QUANTITIES, SOURCE_SHAPES, CounterResult, outside
from .table import LOSS_ROW_NAME, RowKey, row_for_module, row_order
from .training import Training, loss_of

logger = logging.getLogger(__name__)

__all__ = ["count_fvcore", "POSITION_SCOPE_PREFIX", "FVCORE_MATMUL_KINDS"]

#: jit scope pushed around each decoder-layer run: "@pos3" is schedule position 3.
POSITION_SCOPE_PREFIX = "@pos"
#: fvcore's default handles that count matrix-product MACs (its other handles - norms, pooling,
#: upsampling - count something else and are never used here).
FVCORE_MATMUL_KINDS = ("aten::addmm", "aten::bmm", "aten::matmul", "aten::mm", "aten::linear", "aten::einsum")
_WRAPPED = "model"  # attribute name of the model inside the tracing wrapper

class _StartPosWrapper(nn.Module):
    """jit traces tensors only: ``start_pos`` (a Python int) is bound here. With ``loss``, the traced
    function is a training step's forward: the model, then the loss of its logits (traced in the wrapper's
    own scope, the loss row)."""

    def __init__(self, model: nn.Module, start_pos: int, loss: Optional[str] = None) -> None:
        super().__init__()
        self.model = model
        self.start_pos = start_pos
        self.loss = loss

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        logits = self.model(tokens, self.start_pos)
        return logits if self.loss is None else loss_of(logits, tokens, self.loss)


# ---------------------------------------------------------------- jit node -> OpCall
def _jit_value(v: "torch._C.Value") -> Any:
    t = v.type()
    kind = t.kind()
    if kind == "TensorType":
        dtype = t.dtype() if t.scalarType() is not None else None
        shape = tuple(int(s) for s in t.sizes()) if v.isCompleteTensor() else None
        return TensorMeta(shape, dtype)
    if kind == "NoneType":
        return None
    node = v.node()
    if node.kind() == "prim::Constant":
        try:
            return v.toIValue()
        except RuntimeError:  # pragma: no cover - exotic constant types
            return UNKNOWN
    if node.kind() == "prim::ListConstruct":
        return [_jit_value(i) for i in node.inputs()]
    return UNKNOWN  # a traced Python scalar (e.g. a size): its value is not in the graph


_SCHEMAS: dict[str, Optional["torch._C.FunctionSchema"]] = {}


def _jit_kind(node: "torch._C.Node") -> str:
    kind = node.kind()
    if kind == "prim::PythonOp":  # a torch.autograd.Function: as fvcore names it
        kind = kind + "." + node.pyname()
    return kind


def _is_process_group(value: Any) -> bool:
    """A tensor-parallel layer's group among a Function's Python arguments (``llama_ref.parallel.TPGroup``,
    recognised by its fields: the counting core does not import the parallel package)."""
    return all(hasattr(value, a) for a in ("name", "rank", "world_size")) and not isinstance(value, type)


def _jit_call(node: "torch._C.Node", name: str) -> OpCall:
    inputs = [_jit_value(v) for v in node.inputs()]
    outputs = tuple(_jit_value(v) for v in node.outputs())
    if node.kind() == "prim::PythonOp":
        # An autograd Function (schema "prim::PythonOp(...)"): its tensor inputs, and its process group
        # among the Python objects it was called with (a tensor-parallel step).
        args: dict[str, Any] = {f"arg{i}": v for i, v in enumerate(inputs)}
        groups = [a for a in node.scalar_args() if _is_process_group(a)]
        if groups:
            args["group"] = groups[0]
        return OpCall(name, args, outputs)
    text = node.schema()
    if text not in _SCHEMAS:
        _SCHEMAS[text] = None if text == "(no schema)" else torch._C.parse_schema(text)
    schema = _SCHEMAS[text]
    if schema is None:
        return OpCall(name, {f"arg{i}": v for i, v in enumerate(inputs)}, outputs)
    return OpCall.from_schema(name, schema, inputs, None, outputs)


# ---------------------------------------------------------------- scope -> row
def _row_for_scope(scope: str, cache: dict[str, RowKey]) -> RowKey:
    row = cache.get(scope)
    if row is not None:
        return row
    position: Optional[int] = None
    module = ""
    for part in scope.split("/"):
        if not part:
            continue
        if part.startswith(POSITION_SCOPE_PREFIX):
            position = int(part[len(POSITION_SCOPE_PREFIX):])
        else:
            module = part
    if module == _WRAPPED:
        fqn = ""
    elif module.startswith(_WRAPPED + "."):
        fqn = module[len(_WRAPPED) + 1:]
    else:  # the wrapper itself: the loss of a training step
        cache[scope] = (None, LOSS_ROW_NAME)
        return cache[scope]
    row = row_for_module(fqn, position)
    cache[scope] = row
    return row


def _install_position_scopes(model: nn.Module) -> tuple[list, list[int]]:
    """Pre/post hooks on every decoder layer pushing/popping an ``@pos<k>`` jit scope per run."""
    handles: list = []
    layer_ids: list[int] = []
    layers = getattr(model, "layers", None)
    if layers is None:
        return handles, layer_ids

    for index, layer in enumerate(layers):
        def pre(module, args, index=index):
            state = torch._C._get_tracing_state()
            if state:
                state.push_scope(f"{POSITION_SCOPE_PREFIX}{len(layer_ids)}")
                layer_ids.append(index)

        def post(module, args, output):
            state = torch._C._get_tracing_state()
            if state:
                state.pop_scope()

        # prepend: the position scope goes *under* fvcore's module scope, so fvcore's innermost
        # scope stays a module name (its own attribution needs that).
        handles.append(layer.register_forward_pre_hook(pre, prepend=True))
        handles.append(layer.register_forward_hook(post, prepend=True))
    return handles, layer_ids


def _no_flops(inputs, outputs) -> int:
    """An fvcore handle for communication steps: 0 FLOPs (they move bytes, recorded by us)."""
    return 0


# ---------------------------------------------------------------- the counter
def _import_fvcore():
    """fvcore lazily (only this counter needs it); its import scripts a loss function with
    ``torch.jit.script``, which recent torch flags as deprecated - noise for a user of this counter."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.* is deprecated", category=DeprecationWarning)
        from fvcore.nn import FlopCountAnalysis, jit_analysis
        from fvcore.nn.flop_count import _DEFAULT_SUPPORTED_OPS
    return FlopCountAnalysis, jit_analysis, _DEFAULT_SUPPORTED_OPS


def count_fvcore(model: nn.Module, tokens: torch.Tensor, start_pos: int = 0, *, strict: bool = False,
                 training: Optional[Training] = None) -> CounterResult:
    """Count one forward ``model(tokens, start_pos)`` with fvcore's ``FlopCountAnalysis``.

    Rows are keyed ``(position, row)`` as :mod:`counters.table` says. For ``start_pos > 0`` the
    caller has set up and pre-filled the KV cache (the trace runs the forward once, writing the
    cache exactly as a real call would). Works on CPU, CUDA and the meta device.

    ``strict``: raise :class:`counters.ops.UncountedOpError` if an op has no formula; otherwise log
    a warning and list it in ``unknown_ops``.

    ``training``: fvcore traces with ``torch.jit``, which records a forward only: the step's forward and
    loss are counted, and the result claims the forward phase only (its backward is not faked).
    """
    if training is not None and start_pos:
        raise ValueError(f"a training step starts at position 0, got start_pos={start_pos}")
    FlopCountAnalysis, jit_analysis, _DEFAULT_SUPPORTED_OPS = _import_fvcore()
    fvcore_matmul = {k: _DEFAULT_SUPPORTED_OPS[k] for k in FVCORE_MATMUL_KINDS if k in _DEFAULT_SUPPORTED_OPS}

    wrapper = _StartPosWrapper(model, start_pos, None if training is None else training.loss)
    analysis = FlopCountAnalysis(wrapper, (tokens,))
    analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False).tracer_warnings("no_tracer_warning")
    # fvcore counts with its own matrix-product handles only; every other op we know is "ignored" by it
    # (we count those ourselves in the walk below), so its total() is fvcore's own number.
    ignored = {f"aten::{name}": None for name in REGISTRY.formulas if f"aten::{name}" not in fvcore_matmul}
    ignored.update({name if "::" in name else f"aten::{name}": None for name in REGISTRY.free})
    analysis.set_op_handle(**ignored)
    # Communication: fvcore ignores a node by its bare kind, "prim::PythonOp", which it never ignores; a
    # handle counting 0 keeps these out of its unsupported list (they are recorded as collectives below).
    analysis.set_op_handle(**{name: _no_flops for name in REGISTRY.communication if name.startswith("prim::")})

    graphs: list = []
    original_trace = jit_analysis._get_scoped_trace_graph

    def capture(*args, **kwargs):
        graph = original_trace(*args, **kwargs)
        graphs.append(graph)
        return graph

    hooks, layer_ids = _install_position_scopes(model)
    try:
        with torch.no_grad(), mock.patch.object(jit_analysis, "_get_scoped_trace_graph", capture):
            fvcore_total = analysis.total()
            fvcore_unsupported = dict(analysis.unsupported_ops())
    finally:
        for h in hooks:
            h.remove()
    if len(graphs) != 1:  # pragma: no cover - fvcore internals changed
        raise RuntimeError(f"expected fvcore to trace once, it traced {len(graphs)} times")
    graph = graphs[0]

    schedule = tuple(getattr(model, "schedule", layer_ids))
    if tuple(layer_ids) != schedule:
        raise RuntimeError(f"fvcore trace ran layers {layer_ids}, but the model's schedule is {list(schedule)}")

    result = CounterResult("fvcore")
    result.ensure_rows(row_order(len(layer_ids), loss=training is not None))
    if training is not None:
        result.claims = frozenset({(FORWARD, q) for q in QUANTITIES})
        result.notes.append("fvcore traces with torch.jit, which records a forward only: it counts the training "
                            "step's forward and loss, not its backward (not claimed, not compared)")
    unknown: Counter[str] = Counter()
    scope_rows: dict[str, RowKey] = {}
    fvcore_alone_total = 0  # what FlopCountAnalysis with its defaults would return
    fvcore_alone_unsupported: Counter[str] = Counter()
    mac_disagreements: Counter[str] = Counter()
    bookkeeping: Counter[str] = Counter()
    unknown_reasons: dict[str, set[str]] = {}
    fvcore_row_macs = 0
    sdpa_calls = 0

    for node in graph.nodes():
        kind = _jit_kind(node)
        name = canonical_op_name(kind)
        if kind in _DEFAULT_SUPPORTED_OPS:
            fvcore_alone_total += _DEFAULT_SUPPORTED_OPS[kind](list(node.inputs()), list(node.outputs()))
        elif kind not in jit_analysis._IGNORED_OPS and not (
            kind.startswith("prim::") and not kind.startswith(("prim::PythonOp", "prim::CallFunction"))
        ):
            fvcore_alone_unsupported[kind] += 1
        if REGISTRY.is_free(name):
            continue
        call = _jit_call(node, name)
        classified = REGISTRY.classify(call)
        if classified.status == "free":
            if classified.reason == INTEGER_BOOKKEEPING:
                bookkeeping[kind] += 1
            continue
        if classified.status == "communication":  # 0 FLOPs: a tensor-parallel step, recorded with its bytes
            if classified.collective is not None:
                result.add_collective(_row_for_scope(node.scopeName(), scope_rows), classified.collective)
            continue
        if classified.status == "counted" and name in OUTSIDE_SDPA_OPS:
            try:
                outside_macs, tool = torch_sdpa_macs(call), "torch"
            except UncountableCall as e:
                classified = type(classified)("unknown", ZERO, str(e))
            else:
                sdpa_calls += 1
        elif kind in fvcore_matmul:
            outside_macs, tool = fvcore_to_macs(fvcore_matmul[kind](list(node.inputs()), list(node.outputs()))), "fvcore"
        else:
            tool = None
        if classified.status == "unknown":
            unknown[name] += 1
            unknown_reasons.setdefault(name, set()).add(classified.reason)
            continue
        ours = classified.count
        row = _row_for_scope(node.scopeName(), scope_rows)
        if tool is None:
            result.add(row, ours, SOURCE_SHAPES)
            continue
        if outside_macs != ours.macs:
            mac_disagreements[name] += 1
        if tool == "fvcore":
            fvcore_row_macs += outside_macs
        result.add(row, Count(macs=outside_macs), outside(tool))
        result.add(row, Count(nonmatmul_flops=ours.nonmatmul_flops), SOURCE_SHAPES)

    fvcore_total_macs = fvcore_to_macs(fvcore_total)
    unsupported = ", ".join(f"{k} x{v}" for k, v in sorted(fvcore_unsupported.items())) or "none"
    result.notes.append(
        f"fvcore FlopCountAnalysis.total() = {fvcore_total_macs} MACs from its own handles for "
        f"{', '.join(sorted(set(fvcore_matmul) & set(_kinds(graph))) or 'no op here')} (1 per MAC); "
        + (f"scaled_dot_product_attention x{sdpa_calls}: MACs by torch's sdpa_flop_count (fvcore has no handle); "
           if sdpa_calls else "")
        + f"non-matmul FLOPs by counters.ops on the traced sizes. Its unsupported_ops(): {unsupported}."
    )
    if fvcore_row_macs != fvcore_total_macs:
        message = (f"fvcore: its MACs attributed to rows sum to {fvcore_row_macs} but FlopCountAnalysis.total() "
                   f"is {fvcore_total_macs}")
        if not unknown:
            raise RuntimeError(message + ": node attribution lost or duplicated work")
        result.notes.append(message + " (unknown ops present)")
    our_unknown_kinds = {f"aten::{n}" if "::" not in n else n for n in unknown}
    stray = set(fvcore_unsupported) - our_unknown_kinds
    if stray:  # pragma: no cover - would mean our handles and our walk disagree
        raise RuntimeError(f"fvcore reports unsupported ops {sorted(stray)} that counters.ops classifies")
    if mac_disagreements:
        result.notes.append("the outside MACs differ from counters.ops' own formula for: "
                            + ", ".join(f"{k} x{v}" for k, v in sorted(mac_disagreements.items())))
    row_macs = result.total.macs
    alone = (f"fvcore alone (default handles and ignore list) would report total() = {fvcore_alone_total} "
             f"(1 per MAC), {row_macs - fvcore_alone_total} MACs fewer than counted here, and none of the "
             f"{result.total.nonmatmul_flops} non-matmul FLOPs")
    if fvcore_alone_unsupported:
        alone += "; it would flag as unsupported (warning only): " + ", ".join(
            f"{k} x{v}" for k, v in sorted(fvcore_alone_unsupported.items()))
    result.notes.append(alone)
    if bookkeeping:
        result.notes.append("free as integer bookkeeping (traced Python-int size arithmetic on 0-dim integer "
                            "tensors): " + ", ".join(f"{k} x{v}" for k, v in sorted(bookkeeping.items())))

    result.unknown_ops = dict(sorted(unknown.items()))
    raise_or_warn_unknown("fvcore", result.unknown_ops, strict, logger, unknown_reasons)
    return result


def _kinds(graph) -> set[str]:
    return {n.kind() for n in graph.nodes()}
