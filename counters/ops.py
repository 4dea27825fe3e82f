"""Op-level counts: one registry mapping an op name to a pure formula of shapes (and dtypes).

The fvcore counter (jit trace nodes such as ``aten::linear``) and the torch counter (dispatch-level ops
such as ``aten.mm.default``) both describe each op they meet as an :class:`OpCall` - the op's canonical
name, its arguments bound to the op schema's argument names (tensors reduced to :class:`TensorMeta`:
shape and dtype), and its outputs - and ask :data:`REGISTRY` what it costs. Every formula here is built
from the op primitives of :mod:`counters.primitives` (the conventions live there, once), applied to the
sizes of the real call; the fused attention ops reuse the attention kind of :mod:`counters.table`.

Every op is in exactly one of four states, and nothing is ever counted as zero silently:

* **counted** - a formula from one of the op families below returns a :class:`Count`
  (``macs`` for matrix products, ``nonmatmul_flops`` for the per-element rest);
* **free** - the op is on the single reviewed free list :data:`FREE_OPS`, each entry with a
  one-line reason (views, copies, casts, allocation, mask construction, ...);
* **communication** - a collective of a tensor-parallel model, on the single reviewed list
  :data:`COMMUNICATION_OPS` (with a reason per entry): 0 FLOPs, and what it moves is returned as a
  :class:`counters.collectives.Collective` (op, numel, itemsize, world size) that the counters record per
  row with its bytes;
* **unknown** - none of these; the counters raise :class:`UncountedOpError` in strict mode and log a
  warning plus list the op in ``CounterResult.unknown_ops`` otherwise. A formula that meets a call
  it cannot count (a complex division, dropout, a shape the trace did not record) raises
  :class:`UncountableCall`, which makes that call unknown too.

Integer bookkeeping: the jit tracer records Python-int size arithmetic (``start_pos + seqlen``,
``n_heads * head_dim`` of traced sizes) as ``aten::add``/``aten::mul`` on 0-dim integer tensors,
and the eager guard (``llama_ref.guards.check_call``) runs ``tokens.min()``/``tokens.max()`` on CPU token ids. For
ops registered with ``integer_free=True`` (the element-wise and reduction registrations) a call
whose tensors are *all* integer/bool is classified free with the reason
:data:`INTEGER_BOOKKEEPING` (model FLOPs are floating-point arithmetic); a float operand anywhere
makes the call counted. The matmul and attention families have no such rule (an int8 matmul is work).

The matrix products' MACs computed here are *our* opinion; the counters take the MACs of every matrix
product (and of the fused attention kernels) from the outside tool instead and keep ours only to
report a disagreement.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence, Union

import torch

from . import primitives as P
from .collectives import ALL_GATHER, ALL_REDUCE, Collective
from .primitives import COMPLEX_FLOPS_PER_ELEMENT, FLOPS_PER_ELEMENT, REDUCTION_FLOPS, ZERO, Count

__all__ = [
    "COMMUNICATION_OPS", "DuplicateRegistrationError", "FREE_OPS", "INTEGER_BOOKKEEPING", "OpCall", "OpCount", "OpFormula", "OpRegistry",
    "OUTSIDE_SDPA_OPS", "REGISTRY", "SDPA_BACKEND_OPS", "TensorMeta", "UNKNOWN", "UncountableCall", "UncountedOpError",
    "canonical_op_name", "elementwise", "fvcore_to_macs", "matmul", "raise_or_warn_unknown", "reduction", "sdpa",
    "torch_flops_to_macs", "torch_sdpa_backward_macs", "torch_sdpa_macs", "SDPA_BACKWARD_OPS",
]

# ---------------------------------------------------------------- errors
class UncountedOpError(RuntimeError):
    """Strict mode: ops were met that no formula and no free-list entry covers."""

    def __init__(self, counter: str, unknown_ops: Mapping[str, int],
                 reasons: Optional[Mapping[str, Iterable[str]]] = None) -> None:
        self.counter = counter
        self.unknown_ops = dict(unknown_ops)
        self.reasons = {k: sorted(set(v)) for k, v in (reasons or {}).items()}
        listing = _listing(self.unknown_ops, reasons)
        super().__init__(
            f"{counter}: {sum(self.unknown_ops.values())} op call(s) have no formula in counters.ops and are not on "
            f"its free list: {listing}. Register a formula (or a reviewed free-list entry) for them; "
            "strict=False counts the rest and lists these in CounterResult.unknown_ops."
        )

    def __reduce__(self):  # picklable: a tensor-parallel rank sends it to the process that reports it
        return (type(self), (self.counter, self.unknown_ops, self.reasons))


class UncountableCall(Exception):
    """Raised by a formula for a call it cannot count exactly (the call then counts as unknown)."""


class DuplicateRegistrationError(ValueError):
    """An op name was registered twice (as a formula or on the free list)."""


def _listing(unknown_ops: Mapping[str, int], reasons: Optional[Mapping[str, Iterable[str]]] = None) -> str:
    parts = []
    for op, n in sorted(unknown_ops.items()):
        why = sorted(set((reasons or {}).get(op, ())))
        parts.append(f"{op} x{n}" + (f" ({'; '.join(why)})" if why else ""))
    return ", ".join(parts)


def raise_or_warn_unknown(counter: str, unknown_ops: Mapping[str, int], strict: bool, logger,
                          reasons: Optional[Mapping[str, Iterable[str]]] = None) -> None:
    """The single policy for unknown ops: raise in strict mode, otherwise one listed warning.
    ``reasons``: op -> why its calls could not be counted (shown next to the op)."""
    if not unknown_ops:
        return
    if strict:
        raise UncountedOpError(counter, unknown_ops, reasons)
    listing = _listing(unknown_ops, reasons)
    logger.warning("%s: op(s) without a formula were NOT counted (listed in CounterResult.unknown_ops): %s",
                   counter, listing)


# ---------------------------------------------------------------- op descriptions
class _Unknown:
    """A value the jit trace did not record as a constant (e.g. a traced Python int)."""

    _instance = None

    def __new__(cls):
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "UNKNOWN"


UNKNOWN = _Unknown()


@dataclass(frozen=True)
class TensorMeta:
    """What a formula may know about a tensor: its shape (None if the trace lost it) and dtype."""

    shape: Optional[tuple[int, ...]]
    dtype: Optional[torch.dtype]

    @classmethod
    def of(cls, t: torch.Tensor) -> "TensorMeta":
        return cls(tuple(int(s) for s in t.shape), t.dtype)

    @property
    def numel(self) -> int:
        if self.shape is None:
            raise UncountableCall("tensor shape unknown")
        return math.prod(self.shape)

    @property
    def is_complex(self) -> bool:
        return self.dtype is not None and self.dtype.is_complex

    @property
    def is_integral(self) -> bool:
        """Integer or bool (and known): index/size bookkeeping, not floating-point work."""
        return self.dtype is not None and not self.dtype.is_floating_point and not self.dtype.is_complex


def _tensors_in(value: Any) -> Iterable[TensorMeta]:
    if isinstance(value, TensorMeta):
        yield value
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _tensors_in(v)


@dataclass(frozen=True)
class OpCall:
    """One op call: canonical name, arguments by schema name (in schema order), outputs."""

    op: str
    args: Mapping[str, Any] = field(default_factory=dict)
    outputs: tuple[Any, ...] = ()

    def get(self, name: str, default: Any = None) -> Any:
        return self.args.get(name, default)

    def tensor(self, name: str) -> TensorMeta:
        value = self.args.get(name)
        if not isinstance(value, TensorMeta):
            raise UncountableCall(f"{self.op}: argument {name!r} is not a tensor ({value!r})")
        if value.shape is None:
            raise UncountableCall(f"{self.op}: shape of {name!r} unknown")
        return value

    def tensors(self) -> list[TensorMeta]:
        """All tensor inputs and outputs, in order."""
        out: list[TensorMeta] = []
        for v in self.args.values():
            out.extend(_tensors_in(v))
        out.extend(_tensors_in(self.outputs))
        return out

    @property
    def out(self) -> TensorMeta:
        """The first output (every counted op here has a tensor first output)."""
        if not self.outputs or not isinstance(self.outputs[0], TensorMeta) or self.outputs[0].shape is None:
            raise UncountableCall(f"{self.op}: output shape unknown")
        return self.outputs[0]

    @classmethod
    def from_schema(cls, op: str, schema: "torch._C.FunctionSchema", args: Sequence[Any],
                    kwargs: Optional[Mapping[str, Any]] = None, outputs: Sequence[Any] = ()) -> "OpCall":
        """Bind positional ``args`` and ``kwargs`` to the schema's argument names; fill defaults."""
        kwargs = dict(kwargs or {})
        bound: dict[str, Any] = {}
        for i, arg in enumerate(schema.arguments):
            if i < len(args):
                bound[arg.name] = args[i]
            elif arg.name in kwargs:
                bound[arg.name] = kwargs.pop(arg.name)
            elif arg.has_default_value():
                bound[arg.name] = arg.default_value
        bound.update(kwargs)  # anything the schema did not name (should not happen) is kept
        return cls(op, bound, tuple(outputs))


def canonical_op_name(op: Any) -> str:
    """``aten.mm.default`` / ``aten.mm`` / ``"aten::mm"`` -> ``"mm"``; other namespaces keep theirs
    (``"prim::Constant"``). The registry and the free list are keyed by these names."""
    if isinstance(op, torch._ops.OpOverload):
        op = op.overloadpacket
    if isinstance(op, torch._ops.OpOverloadPacket):
        qualified = op._qualified_op_name  # "aten::mm"
    elif isinstance(op, str):
        qualified = op
    else:
        qualified = getattr(op, "__name__", str(op))
    if qualified.startswith("aten::"):
        return qualified[len("aten::"):]
    return qualified


# ---------------------------------------------------------------- unit conversions
def torch_flops_to_macs(flops: Any) -> int:
    """FlopCounterMode counts 2 per MAC: exact, even Python/NumPy int -> MACs (no float division)."""
    if isinstance(flops, bool):
        raise TypeError(f"FlopCounterMode returned a bool count {flops!r}")
    if not isinstance(flops, int):
        if hasattr(flops, "__index__"):
            flops = flops.__index__()
        else:
            raise TypeError(f"FlopCounterMode returned a non-integer count {flops!r}")
    if flops % 2:
        raise ValueError(f"FlopCounterMode count {flops} is odd: it counts 2 FLOPs per MAC, so it cannot be MACs")
    return flops // 2


def fvcore_to_macs(count: Any) -> int:
    """fvcore counts 1 per MAC: exact integer (Python/NumPy int, or a float with no fraction) -> MACs."""
    if isinstance(count, bool):
        raise TypeError(f"fvcore returned a bool count {count!r}")
    if isinstance(count, int):
        return count
    if hasattr(count, "__index__"):
        return count.__index__()
    if isinstance(count, float) and count.is_integer() and abs(count) < 2**53:
        return int(count)
    raise TypeError(f"fvcore returned a non-integer MAC count {count!r}")


# ---------------------------------------------------------------- the registry
OpFormula = Callable[[OpCall], Count]


@dataclass(frozen=True)
class OpCount:
    """How the registry classified one call: ``status`` is "counted", "free", "communication" or "unknown".
    ``collective``: what a communication op moves (``None`` for the completion of one, ``wait_tensor``)."""

    status: str
    count: Count = ZERO
    reason: str = ""
    collective: Optional[Collective] = None


#: A communication op's description of one call: the collective it runs, or None (a wait for one).
CommunicationFormula = Callable[[OpCall], Optional[Collective]]


INTEGER_BOOKKEEPING = ("integer bookkeeping: no floating-point operand, only integer/bool tensors or Python "
                       "scalars (jit-traced size arithmetic, token-id range checks), not model work")


def _all_integral(call: OpCall) -> bool:
    """No floating/complex tensor among inputs and outputs (vacuously true for scalar-only calls)."""
    return all(t.is_integral for t in call.tensors())


class OpRegistry:
    """op name -> formula, plus the reviewed free list. Rejects any name registered twice."""

    def __init__(self) -> None:
        self._formulas: dict[str, OpFormula] = {}
        self._integer_free: set[str] = set()
        self._free: dict[str, str] = {}
        self._communication: dict[str, tuple[CommunicationFormula, str]] = {}

    def _check_new(self, name: str) -> None:
        if name in self._formulas or name in self._free or name in self._communication:
            where = (f"formula {self._formulas[name].__name__}" if name in self._formulas
                     else "free list" if name in self._free else "communication list")
            raise DuplicateRegistrationError(f"op {name!r} is already registered ({where})")

    def _new_names(self, names: Union[str, Iterable[str]]) -> list[str]:
        """The names of one registration, each checked to be registered nowhere yet."""
        names = [names] if isinstance(names, str) else list(names)
        if len(set(names)) != len(names):
            raise DuplicateRegistrationError(f"op names repeated in one registration: {names}")
        for name in names:
            self._check_new(name)
        return names

    def register(self, names: Union[str, Iterable[str]], formula: OpFormula, *,
                 integer_free: bool = False) -> OpFormula:
        """Register ``formula`` for ``names``. ``integer_free``: calls whose tensors are all
        integer/bool are free (:data:`INTEGER_BOOKKEEPING`) instead of going to the formula."""
        names = self._new_names(names)
        for name in names:
            self._formulas[name] = formula
            if integer_free:
                self._integer_free.add(name)
        return formula

    def register_free(self, names: Union[str, Iterable[str]], reason: str) -> None:
        if not reason or not reason.strip():
            raise ValueError("every free-list entry needs a one-line reason")
        names = self._new_names(names)
        for name in names:
            self._free[name] = reason

    def register_communication(self, names: Union[str, Iterable[str]], describe: CommunicationFormula,
                               reason: str) -> None:
        """A collective (0 FLOPs): ``describe(call)`` says what it moves, ``reason`` why it is communication."""
        if not reason or not reason.strip():
            raise ValueError("every communication-list entry needs a one-line reason")
        for name in self._new_names(names):
            self._communication[name] = (describe, reason)

    # ------------------------------------------------------------ queries
    def has_formula(self, name: str) -> bool:
        return name in self._formulas

    def is_free(self, name: str) -> bool:
        return name in self._free

    def is_communication(self, name: str) -> bool:
        return name in self._communication

    @property
    def communication(self) -> Mapping[str, str]:
        """op name -> why it is communication (read-only)."""
        return MappingProxyType({k: reason for k, (_, reason) in self._communication.items()})

    @property
    def formulas(self) -> Mapping[str, OpFormula]:
        return MappingProxyType(self._formulas)

    @property
    def free(self) -> Mapping[str, str]:
        return MappingProxyType(self._free)

    def classify(self, call: OpCall) -> OpCount:
        formula = self._formulas.get(call.op)
        if formula is not None:
            if call.op in self._integer_free and _all_integral(call):
                return OpCount("free", ZERO, INTEGER_BOOKKEEPING)
            try:
                count = formula(call)
            except UncountableCall as e:
                return OpCount("unknown", ZERO, str(e))
            values = (count.macs, count.nonmatmul_flops) if isinstance(count, Count) else (None,)
            if not all(type(v) is int and v >= 0 for v in values):
                raise TypeError(f"formula for {call.op!r} returned {count!r}, not a Count of non-negative ints")
            return OpCount("counted", count)
        if call.op in self._free:
            return OpCount("free", ZERO, self._free[call.op])
        if call.op in self._communication:
            describe, reason = self._communication[call.op]
            try:
                return OpCount("communication", ZERO, reason, describe(call))
            except UncountableCall as e:
                return OpCount("unknown", ZERO, str(e))
        return OpCount("unknown", ZERO, "no formula, not on the free list and not communication")

    def count(self, call: OpCall) -> Optional[Count]:
        """The call's Count (ZERO if free or communication), or None if it is unknown."""
        result = self.classify(call)
        return None if result.status == "unknown" else result.count


REGISTRY = OpRegistry()


# ---------------------------------------------------------------- op families (factories)
def elementwise(primitive: str, *, unit_args: Sequence[str] = ()) -> OpFormula:
    """An element-wise op costing :data:`counters.primitives.FLOPS_PER_ELEMENT` ``[primitive]`` per
    *output* element (so a broadcast ``scores + mask`` costs the scores' numel), or on a complex output
    :data:`~counters.primitives.COMPLEX_FLOPS_PER_ELEMENT` ``[primitive]`` per complex element
    (:class:`UncountableCall` where that convention does not exist). ``unit_args`` (add's ``alpha``) must
    be 1: other values are extra work not counted here."""
    FLOPS_PER_ELEMENT[primitive]  # KeyError at registration for a primitive that does not exist

    def formula(call: OpCall) -> Count:
        for arg in unit_args:
            if call.get(arg, 1) != 1:
                raise UncountableCall(f"{call.op}: {arg}={call.get(arg)!r} (only 1 is counted)")
        out = call.out
        if out.is_complex:
            if primitive not in COMPLEX_FLOPS_PER_ELEMENT:
                raise UncountableCall(f"{call.op} on complex tensors has no formula")
            return P.complex_elementwise(primitive, out.numel)
        return P.elementwise(primitive, out.numel)

    formula.__name__ = f"elementwise({primitive})"
    return formula


def reduction(primitive: str, *, input_arg: str = "self") -> OpFormula:
    """A reduction of ``input_arg`` to the output, costed by :data:`counters.primitives.REDUCTION_FLOPS`."""
    REDUCTION_FLOPS[primitive]

    def formula(call: OpCall) -> Count:
        x = call.tensor(input_arg)
        if x.is_complex:
            raise UncountableCall(f"{call.op} on complex tensors has no formula")
        return P.reduction(primitive, x.numel, call.out.numel)

    formula.__name__ = f"reduction({primitive})"
    return formula


def matmul(a_arg: str, b_arg: str, *, bias_arg: Optional[str] = None, b_is_weight: bool = False,
           scale_args: Sequence[str] = (), name: str = "") -> OpFormula:
    """Matrix product family: ``numel(output) * K`` MACs, K the contracted size (``a.shape[-1]``).
    ``b_is_weight``: b is an (out, in) weight as in ``linear``. A bias (addmm's ``self``, linear's
    ``bias``) is one add per output element. ``alpha``/``beta`` other than 1 and complex operands are
    not counted here (:class:`UncountableCall`)."""

    def formula(call: OpCall) -> Count:
        a, b = call.tensor(a_arg), call.tensor(b_arg)
        if a.is_complex or b.is_complex:
            raise UncountableCall(f"{call.op}: complex matrix product has no formula")
        for s in scale_args:
            if call.get(s, 1) != 1:
                raise UncountableCall(f"{call.op}: {s}={call.get(s)!r} (only 1 is counted)")
        k = a.shape[-1]
        if b_is_weight:
            k_b = b.shape[-1]
        else:
            k_b = b.shape[0] if len(b.shape) == 1 else b.shape[-2]
        if k != k_b:
            raise UncountableCall(f"{call.op}: contracted sizes differ ({a.shape} x {b.shape})")
        out = call.out
        count = P.matmul(out.numel, k, 1)  # numel(out) outputs, k MACs each
        if bias_arg is not None and isinstance(call.get(bias_arg), TensorMeta):
            count = count + P.elementwise("add", out.numel)
        return count

    formula.__name__ = name or f"matmul({a_arg}, {b_arg})"
    return formula


def sdpa(mask_arg: Optional[str], name: str = "") -> OpFormula:
    """Scaled dot-product attention, fused or not: the attention kind of :mod:`counters.table`
    (the same decomposition the hooks counter evaluates) on the call's sizes.

    q ``(..., S, E)``, k ``(..., L, E)``, v ``(..., L, E)``: the query's leading dims are folded into
    one batch of heads (all query heads: GQA shares k/v heads, not products). The mask add is counted if
    a mask is given or ``is_causal`` (a fused causal kernel adds no mask, but counting it keeps
    ``attn_kernel="sdpa"`` equal to ``attn_kernel="math"``; see docs/counting.md). ``mask_arg`` names the op's mask argument
    (``attn_mask``, ``attn_bias``; None: none). Dropout, a value width other than E, and a key/value
    batch other than the query's (the kernel's own GQA broadcast) are not counted (:class:`UncountableCall`)."""
    from .table import ATTENTION_CORE, Attn  # the table imports llama_ref; keep this module light to import

    def formula(call: OpCall) -> Count:
        q, k, v = call.tensor("query"), call.tensor("key"), call.tensor("value")
        if q.is_complex or k.is_complex or v.is_complex:
            raise UncountableCall(f"{call.op}: complex attention has no formula")
        dropout = call.get("dropout_p", 0.0)
        if dropout is UNKNOWN or dropout != 0:
            raise UncountableCall(f"{call.op}: dropout_p={dropout!r} (only 0 is counted)")
        is_causal = call.get("is_causal", False)
        mask = call.get(mask_arg) if mask_arg is not None else None
        if is_causal is UNKNOWN or mask is UNKNOWN:
            raise UncountableCall(f"{call.op}: is_causal/mask not recorded")
        if (len(q.shape) < 2 or k.shape[-1] != q.shape[-1] or v.shape[-1] != q.shape[-1]
                or k.shape[-2] != v.shape[-2] or k.shape[:-2] != q.shape[:-2] or v.shape[:-2] != q.shape[:-2]):
            raise UncountableCall(f"{call.op}: q/k/v shapes {q.shape}, {k.shape}, {v.shape} are not counted "
                                  "(key/value must have the query's batch and heads and its head size)")
        seqlen, head_dim, kvlen = q.shape[-2], q.shape[-1], k.shape[-2]
        heads = math.prod(q.shape[:-2])
        masked = bool(is_causal) or isinstance(mask, TensorMeta)
        return ATTENTION_CORE.count(Attn(heads, seqlen, kvlen, 1, 1, head_dim, masked))

    formula.__name__ = name or f"sdpa(mask={mask_arg})"
    return formula


# ---------------------------------------------------------------- registrations
# Matrix products. Dispatch level (FlopCounterMode): mm, bmm, addmm (linear/matmul decompose to
# these); jit level (fvcore): linear, matmul.
REGISTRY.register("mm", matmul("self", "mat2", name="mm"))
REGISTRY.register("bmm", matmul("self", "mat2", name="bmm"))
REGISTRY.register("matmul", matmul("self", "other", name="matmul"))
REGISTRY.register("linear", matmul("input", "weight", bias_arg="bias", b_is_weight=True, name="linear"))
REGISTRY.register("addmm", matmul("mat1", "mat2", bias_arg="self", scale_args=("alpha", "beta"), name="addmm"))
REGISTRY.register("baddbmm", matmul("batch1", "batch2", bias_arg="self", scale_args=("alpha", "beta"),
                                    name="baddbmm"))

# Element-wise arithmetic. Covers the RMSNorm x*x (pow 2), + eps, x * rsqrt, * weight; the scale (div)
# and mask add of attention; the residual adds; the SwiGLU gate multiply; RoPE's complex multiply.
# The in-place forms (mul_, ...) come from decompositions FlopCounterMode applies (e.g. silu_backward's).
REGISTRY.register(["mul", "mul_"], elementwise("mul"), integer_free=True)
REGISTRY.register(["add", "add_"], elementwise("add", unit_args=("alpha",)), integer_free=True)
REGISTRY.register(["sub", "sub_", "rsub"], elementwise("sub", unit_args=("alpha",)), integer_free=True)
REGISTRY.register(["div", "div_"], elementwise("div"), integer_free=True)
REGISTRY.register("pow", elementwise("pow"), integer_free=True)
REGISTRY.register("rsqrt", elementwise("rsqrt"), integer_free=True)
REGISTRY.register("maximum", elementwise("maximum"), integer_free=True)
REGISTRY.register("minimum", elementwise("minimum"), integer_free=True)
# torch.where(cond, a, b): one select per element (seen only inside SDPA's math decomposition).
REGISTRY.register("where", elementwise("where"), integer_free=True)
REGISTRY.register("silu", elementwise("silu"))
REGISTRY.register("sigmoid", elementwise("sigmoid"))
# _safe_softmax is softmax with fully masked rows set to 0 (SDPA's math decomposition uses it).
REGISTRY.register(["softmax", "_softmax", "_safe_softmax"], elementwise("softmax"))

# Reductions.
REGISTRY.register("mean", reduction("mean"), integer_free=True)
REGISTRY.register("sum", reduction("sum"), integer_free=True)
_MAX_REDUCTION, _MIN_REDUCTION = reduction("max"), reduction("min")
_MAXIMUM, _MINIMUM = elementwise("maximum"), elementwise("minimum")


def _max(call: OpCall) -> Count:
    """``max``: a reduction (``max.default``, ``max.dim``), or with a second tensor (``max.other``) an
    element-wise maximum."""
    return (_MAXIMUM if isinstance(call.get("other"), TensorMeta) else _MAX_REDUCTION)(call)


def _min(call: OpCall) -> Count:
    return (_MINIMUM if isinstance(call.get("other"), TensorMeta) else _MIN_REDUCTION)(call)


REGISTRY.register("max", _max, integer_free=True)
REGISTRY.register("min", _min, integer_free=True)

# Attention. The composite (jit records it), its math decomposition's entry point, and the fused
# backends FlopCounterMode sees at dispatch level (CPU flash, CUDA flash/efficient/cuDNN).
SDPA_BACKEND_OPS = (
    "_scaled_dot_product_flash_attention_for_cpu",
    "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_cudnn_attention",
)
REGISTRY.register(["scaled_dot_product_attention", "_scaled_dot_product_attention_math"], sdpa("attn_mask", name="sdpa"))
REGISTRY.register("_scaled_dot_product_flash_attention_for_cpu", sdpa("attn_mask", name="sdpa_flash_cpu"))
REGISTRY.register("_scaled_dot_product_flash_attention", sdpa(None, name="sdpa_flash"))
REGISTRY.register(["_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention"],
                  sdpa("attn_bias", name="sdpa_efficient/cudnn"))

# Training: the loss and the backward ops autograd runs for llama_ref (see counters.table's backward kinds).
REGISTRY.register("_log_softmax", elementwise("log_softmax"))
REGISTRY.register("silu_backward", elementwise("silu_backward"))
REGISTRY.register("_softmax_backward_data", elementwise("softmax_backward"))
REGISTRY.register("_log_softmax_backward_data", elementwise("log_softmax_backward"))


def _per_element_of(arg: str, primitive: str, name: str) -> OpFormula:
    """``primitive`` once per element of the call's ``arg`` (not of its output)."""

    def formula(call: OpCall) -> Count:
        return P.elementwise(primitive, call.tensor(arg).numel)

    formula.__name__ = name
    return formula


def _cross_entropy(call: OpCall) -> Count:
    """``cross_entropy_loss`` (what jit records for F.cross_entropy): log_softmax over the classes, then
    nll_loss over the targets (mean reduction, no weights, no label smoothing)."""
    if call.get("weight") is not None or call.get("label_smoothing", 0.0) != 0.0 or call.get("reduction", 1) != 1:
        raise UncountableCall(f"{call.op}: only the plain mean cross-entropy is counted")
    return P.elementwise("log_softmax", call.tensor("self").numel) + P.reduction("nll_loss", call.tensor("target").numel, 1)


REGISTRY.register("cross_entropy_loss", _cross_entropy)
# nll_loss: each target's log-probability picked (free), summed and averaged: one FLOP per target.
REGISTRY.register("nll_loss_forward", reduction("nll_loss", input_arg="target"))
REGISTRY.register("nll_loss_backward", _per_element_of("target", "nll_loss_backward", "nll_loss_backward"))
# A scatter-add of the output gradient's rows into the (zeroed) weight gradient: one add per element.
REGISTRY.register("embedding_dense_backward",
                  _per_element_of("grad_output", "embedding_backward", "embedding_dense_backward"))


def sdpa_backward(name: str) -> OpFormula:
    """A fused attention kernel's backward, by the model's convention (what the math kernel's backward runs:
    :func:`counters.table.attention_fused_backward_ops`). The kernel's own recomputation of the scores is
    executed work, not model work; the counters report it apart."""
    from .table import Attn, attention_fused_backward_ops, sum_ops

    def formula(call: OpCall) -> Count:
        q, k, v = call.tensor("query"), call.tensor("key"), call.tensor("value")
        if (len(q.shape) < 2 or k.shape[-1] != q.shape[-1] or v.shape[-1] != q.shape[-1]
                or k.shape[:-2] != q.shape[:-2] or k.shape[-2] != v.shape[-2]):
            raise UncountableCall(f"{call.op}: q/k/v shapes {q.shape}, {k.shape}, {v.shape} are not counted")
        heads = math.prod(q.shape[:-2])
        return sum_ops(attention_fused_backward_ops(Attn(heads, q.shape[-2], k.shape[-2], 1, 1, q.shape[-1], False)))

    formula.__name__ = name
    return formula


SDPA_BACKWARD_OPS = (
    "_scaled_dot_product_flash_attention_for_cpu_backward",
    "_scaled_dot_product_flash_attention_backward",
    "_scaled_dot_product_efficient_attention_backward",
    "_scaled_dot_product_cudnn_attention_backward",
)
REGISTRY.register(list(SDPA_BACKWARD_OPS), sdpa_backward("sdpa_backward"))

# ---------------------------------------------------------------- torch's own formulas (an outside source)
#: Fused attention ops whose MACs the counters take from torch's registered SDPA formula
#: (``torch.utils.flop_counter.sdpa_flop_count``), never from ours: the jit composite fvcore sees, and
#: the kernels FlopCounterMode sees (it has a formula for the CUDA kernels, none for the CPU one).
OUTSIDE_SDPA_OPS = ("scaled_dot_product_attention", *SDPA_BACKEND_OPS)


def torch_sdpa_backward_macs(call: OpCall) -> tuple[int, int]:
    """(model MACs, recompute MACs) of a fused attention backward by torch's own formulas:
    ``sdpa_backward_flop_count`` counts five products, the first being the kernel's recomputation of the
    scores (torch's own comment: "Step 1: We recompute the scores matrix"), which torch's ``bmm_flop``
    gives on its own."""
    from torch.utils.flop_counter import bmm_flop, sdpa_backward_flop_count

    grad_name = next(iter(call.args))  # grad_out (grad_out_ for the efficient kernel)
    g, q, k, v = (call.tensor(n) for n in (grad_name, "query", "key", "value"))
    if not len(q.shape) == len(k.shape) == len(v.shape) == len(g.shape) == 4:
        raise UncountableCall(f"{call.op}: torch's SDPA formula needs 4-d tensors")
    b, h, s_q, d_q = q.shape
    s_k = k.shape[-2]
    try:
        total = sdpa_backward_flop_count(g.shape, q.shape, k.shape, v.shape)
        recompute = bmm_flop((b * h, s_q, d_q), (b * h, d_q, s_k))
    except AssertionError as e:
        raise UncountableCall(f"{call.op}: {e}") from None
    return torch_flops_to_macs(total - recompute), torch_flops_to_macs(recompute)


def torch_sdpa_macs(call: OpCall) -> int:
    """MACs of a fused attention call by torch's own ``sdpa_flop_count`` (QK^T and A.V over every query
    head), on the call's (batch, heads, seqlen, head_dim) query/key/value shapes."""
    from torch.utils.flop_counter import sdpa_flop_count

    q, k, v = call.tensor("query"), call.tensor("key"), call.tensor("value")
    if not len(q.shape) == len(k.shape) == len(v.shape) == 4:
        raise UncountableCall(f"{call.op}: torch's SDPA formula needs 4-d q/k/v, got {q.shape}, {k.shape}, {v.shape}")
    try:
        flops = sdpa_flop_count(q.shape, k.shape, v.shape)
    except AssertionError as e:  # torch states its shape preconditions as assertions
        raise UncountableCall(f"{call.op}: {e}") from None
    return torch_flops_to_macs(flops)


# ---------------------------------------------------------------- the reviewed free list
# One entry per op, with the reason it does no arithmetic. Nothing costly goes here: the test-suite
# checks this list against the registry, torch's flop registry and a list of arithmetic ops.
_FREE = {
    # views and shape changes: metadata only
    "view": "view: metadata only",
    "_unsafe_view": "view: metadata only",
    "reshape": "reshape: a view, or a copy when non-contiguous (a copy is data movement, not arithmetic)",
    "flatten": "view: metadata only",
    "unflatten": "view: metadata only",
    "unsqueeze": "view: metadata only",
    "squeeze": "view: metadata only",
    "expand": "broadcast view: metadata only",
    "transpose": "view: metadata only",
    "t": "view: metadata only",
    "permute": "view: metadata only",
    "slice": "view: metadata only (also the RoPE table slice and KV-cache reads)",
    "select": "view: metadata only",
    "alias": "view: metadata only",
    "as_strided": "view: metadata only",
    "view_as_complex": "reinterprets (.., 2) real pairs as complex: metadata only",
    "view_as_real": "reinterprets complex as (.., 2) real pairs: metadata only",
    "detach": "autograd bookkeeping: no data touched",
    "_conj": "sets the lazy conjugate bit (RoPE's backward multiplies by conj(freqs)): no data touched",
    # copies and casts: data movement, no arithmetic
    "clone": "copy (e.g. repeat_kv materialising expanded k/v): data movement",
    "contiguous": "copy into contiguous layout: data movement",
    "copy_": "copy (KV-cache writes): data movement",
    "_to_copy": "dtype/device cast (float(), to(), type_as()): data movement",
    "to": "dtype/device cast: data movement",
    "type_as": "dtype cast: data movement",
    "lift_fresh": "wraps a constant tensor: no data touched",
    "_local_scalar_dense": "reads one scalar to Python (token-id range check): no arithmetic",
    "_fused_sdp_choice": "SDPA backend selection: returns an enum, no tensor arithmetic",
    "constant_pad_nd": "padding copy (e.g. SDPA mask alignment on CUDA): data movement",
    # lookups, allocation, mask construction
    "embedding": "table lookup (formulas.embedding is zero): data movement",
    "empty": "allocation",
    "empty_like": "allocation",
    "zeros": "allocation + fill: mask construction (cached-prefix columns)",
    "ones": "allocation + fill: mask construction (SDPA causal mask)",
    "full": "allocation + fill: mask construction (-inf)",
    "zeros_like": "allocation + fill",
    "ones_like": "allocation + fill",
    "full_like": "allocation + fill",
    "scalar_tensor": "allocation of one scalar (SDPA mask values)",
    "fill_": "fill: no arithmetic",
    "zero_": "fill: no arithmetic",
    "triu": "keeps/zeroes elements by index (causal mask construction): no arithmetic",
    "tril": "keeps/zeroes elements by index (causal mask construction): no arithmetic",
    "cat": "concatenation (mask hstack): data movement",
    "hstack": "concatenation (mask construction): data movement",
    "stack": "concatenation: data movement",
    # jit trace plumbing (fvcore): Python values, not tensor arithmetic
    "size": "jit: reads a tensor size into a Python int",
    "Int": "jit: tensor -> Python int conversion of a traced size",
    "Float": "jit: tensor -> Python float conversion",
    "ScalarImplicit": "jit: 0-dim tensor -> scalar conversion",
    "prim::Constant": "jit: a constant",
    "prim::ListConstruct": "jit: builds an argument list",
    "prim::ListUnpack": "jit: unpacks a list",
    "prim::TupleConstruct": "jit: builds a tuple",
    "prim::TupleUnpack": "jit: unpacks a tuple",
    "prim::NumToTensor": "jit: wraps a traced Python int as a 0-dim tensor",
    "prim::device": "device query",
    "prim::dtype": "dtype query",
}
for _op, _reason in _FREE.items():
    REGISTRY.register_free(_op, _reason)

#: The reviewed free list: op name -> one-line reason (read-only view of the registry's list).
FREE_OPS: Mapping[str, str] = REGISTRY.free


# ---------------------------------------------------------------- the reviewed communication list
# The collectives of llama_ref.parallel (see llama_ref/parallel/collectives.py). At dispatch level (torch) a
# collective is the functional c10d op plus the wait_tensor that completes it; an all-gather on the last
# dimension then reorders the pieces with aten view / permute / clone / _unsafe_view, which stay on the free
# list: the views are metadata; the clone is a local copy (data movement, 0 FLOPs, like repeat_kv's
# clone), an artifact of torch gathering on dim 0 that the roofline's kernel-agnostic bytes leave out, as
# they leave out repeat_kv's. At jit level (fvcore) the tracer records each step as one autograd Function
# node, ``prim::PythonOp.<Function>``, with its input and output shapes and its TPGroup.
def _world_size_of_group_name(name: Any) -> int:
    if not isinstance(name, str):
        raise UncountableCall(f"process group name {name!r} not recorded")
    try:
        from torch.distributed.distributed_c10d import _resolve_process_group

        return int(_resolve_process_group(name).size())
    except (ImportError, RuntimeError, ValueError, KeyError) as e:
        raise UncountableCall(f"process group {name!r}: {e}") from None


def _c10d_all_reduce(call: OpCall) -> Collective:
    if call.get("reduce_op") != "sum":
        raise UncountableCall(f"{call.op}: reduce op {call.get('reduce_op')!r} (only sum runs in a Llama)")
    x = call.tensor("input")
    return Collective(ALL_REDUCE, x.numel, x.dtype.itemsize, _world_size_of_group_name(call.get("group_name")))


def _c10d_all_gather(call: OpCall) -> Collective:
    n = call.get("group_size")
    if type(n) is not int:
        raise UncountableCall(f"{call.op}: group_size {n!r} not recorded")
    out = call.out
    return Collective(ALL_GATHER, out.numel, out.dtype.itemsize, n)


def _c10d_wait(call: OpCall) -> None:
    return None  # completes the collective that produced its input: nothing moves here


def _tp_group_size(call: OpCall) -> int:
    group = call.get("group")
    size = getattr(group, "world_size", None)
    if type(size) is not int:
        raise UncountableCall(f"{call.op}: its process group was not recorded ({group!r})")
    return size


def _jit_reduce_from_tp(call: OpCall) -> Collective:
    out = call.out
    return Collective(ALL_REDUCE, out.numel, out.dtype.itemsize, _tp_group_size(call))


def _jit_gather_from_tp(call: OpCall) -> Collective:
    out = call.out
    return Collective(ALL_GATHER, out.numel, out.dtype.itemsize, _tp_group_size(call))


REGISTRY.register_communication("_c10d_functional::all_reduce", _c10d_all_reduce,
                                "all-reduce (sum) of a row-parallel layer's partial sums over the ranks")
REGISTRY.register_communication("_c10d_functional::all_gather_into_tensor", _c10d_all_gather,
                                "all-gather of every rank's slice (stacked on dim 0)")
REGISTRY.register_communication("_c10d_functional::wait_tensor", _c10d_wait,
                                "waits for an asynchronous collective to complete: moves nothing itself")
REGISTRY.register_communication("prim::PythonOp.ReduceFromTensorParallel", _jit_reduce_from_tp,
                                "jit record of llama_ref's all-reduce step (the collective runs untraced)")
REGISTRY.register_communication("prim::PythonOp.GatherFromTensorParallel", _jit_gather_from_tp,
                                "jit record of llama_ref's all-gather step (the collective runs untraced)")

#: The reviewed communication list: op name -> why it is communication (read-only).
COMMUNICATION_OPS: Mapping[str, str] = REGISTRY.communication
