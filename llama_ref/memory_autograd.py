"""Live tensor bytes of a tensor program, from shapes alone: a small model of torch's storages, views,
autograd graph and backward engine (the model's own program is :mod:`llama_ref.memory_program`).

Why a model of the runtime and not a formula per category: a peak is a property of *when* each storage is
freed, and that is decided by references (Python locals, autograd's saved variables, the engine's gradient
buffers). So each simulated tensor here is a Python object holding its :class:`Storage`, and CPython's own
reference counting frees a simulated storage at the moment torch frees the real one, provided the simulated
program keeps the same references as the real one (the program mirrors ``llama_ref/model.py`` line by line,
and the backward formulas mirror ATen's ``derivatives.yaml``, including C++'s rule that temporaries live to the
end of the full expression). Storages are counted in whole bytes (``numel * itemsize``); a view shares its base's
storage; strides follow ATen's ``computeStride`` so that ``reshape`` copies exactly when torch's does.

The engine follows ``torch/csrc/autograd/engine.cpp``: a node runs when every gradient for it has arrived, the
ready node with the highest sequence number first (gradient accumulation into leaves before anything else);
after ``apply`` the engine reduces broadcast gradients (``sum_to``) and casts dtypes (``validate_outputs``),
then frees the node's inputs, then its saved variables, then routes each output into the next node's input
buffer, adding two gradients for the same input in place when one of them is held only there. Under a Python
``TorchDispatchMode`` (``MemTracker``, any dispatch-level tracker) the engine cannot prove that, and adds out of
place: ``Sim(dispatch_mode=True)`` is the program such a tracker measures (see docs/memory.md).
"""

from __future__ import annotations

import heapq
import math
import weakref
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

Shape = tuple[int, ...]


@dataclass(frozen=True)
class Where:
    """Where a peak happened: the phase (forward, loss, backward, optimizer), the scope (``layers.3``,
    ``output``, ...; a layer *run*) and the op whose output reached it."""

    phase: str
    scope: str
    op: str

    def __str__(self) -> str:
        return f"{self.phase}, {self.scope}, {self.op}"


class Sim:
    """The bytes alive, their peak and where it happened, for one simulated program. ``dispatch_mode``: the
    program as a Python dispatch mode observes it (gradient sums out of place); ``module_hooks``: also with
    ``ModTracker``'s hooks (MemTracker's): each module's input gradients held until all have arrived
    (:func:`module_inputs`). ``record``: keep an event list ``(kind, op, nbytes, live, phase, scope)``."""

    def __init__(self, *, dispatch_mode: bool = False, module_hooks: bool = False, record: bool = False,
                 round_to: int = 1) -> None:
        self.dispatch_mode = dispatch_mode
        self.round_to = round_to
        self.module_hooks = module_hooks
        self.live = 0
        self.peak = 0
        self.where = Where("start", "-", "-")
        self.phase = "start"
        self.scope = "-"
        self.grad_enabled = True
        self.events: Optional[list] = [] if record else None
        self._seq = 0
        self.scope_peaks: dict[str, int] = {}  # per scope: the most bytes alive while it ran
        self.frame: Optional[object] = None  # the checkpoint whose forward is running (saves nothing)
        self.node_log: Optional[list] = None  # nodes made while a checkpoint's forward runs or recomputes

    def next_seq(self) -> int:
        self._seq += 1
        return self._seq

    def footprint(self, nbytes: int) -> int:
        """Bytes the allocator holds for ``nbytes`` (CUDA's caching allocator: whole 512-byte blocks)."""
        r = self.round_to
        return nbytes if r == 1 else -(-nbytes // r) * r

    def _alloc(self, st: "Storage") -> None:
        self.live += self.footprint(st.nbytes)
        if self.live > self.peak:
            self.peak = self.live
            self.where = Where(self.phase, self.scope, st.op)
        key = f"{self.phase}:{self.scope}"
        if self.live > self.scope_peaks.get(key, -1):
            self.scope_peaks[key] = self.live
        if self.events is not None:
            self.events.append(("alloc", st.op, st.nbytes, self.live, self.phase, self.scope))

    def _free(self, st: "Storage") -> None:
        self.live -= self.footprint(st.nbytes)
        if self.events is not None:
            self.events.append(("free", st.op, st.nbytes, self.live, self.phase, self.scope))

    def mark(self, what: str) -> None:
        if self.events is not None:
            self.events.append(("mark", what, 0, self.live, self.phase, self.scope))


class Storage:
    """One allocation. Freed (its bytes taken off :attr:`Sim.live`) when the last tensor on it is dropped."""

    __slots__ = ("sim", "nbytes", "op", "n_tensors", "device", "__weakref__")

    def __init__(self, sim: Sim, nbytes: int, op: str, device: str = "model") -> None:
        self.sim, self.nbytes, self.op, self.n_tensors, self.device = sim, nbytes, op, 0, device
        if device == "model":
            sim._alloc(self)

    def __del__(self) -> None:
        if self.device == "model":
            self.sim._free(self)


def contiguous_strides(shape: Shape) -> Shape:
    strides, acc = [], 1
    for n in reversed(shape):
        strides.append(acc)
        acc *= max(n, 1)
    return tuple(reversed(strides))


def compute_stride(shape: Shape, stride: Shape, new_shape: Shape) -> Optional[Shape]:
    """Strides of ``new_shape`` viewing a tensor of ``shape``/``stride`` without a copy, or ``None`` when a copy
    is needed: ATen's ``computeStride`` (TensorUtils.cpp)."""
    numel = math.prod(shape)
    if numel == 0 or not shape:
        return contiguous_strides(new_shape) if shape == new_shape or numel == 0 else _scalar_view(new_shape)
    new_stride = [0] * len(new_shape)
    view_d = len(new_shape) - 1
    chunk_base_stride = stride[-1]
    tensor_numel, view_numel = 1, 1
    for tensor_d in range(len(shape) - 1, -1, -1):
        tensor_numel *= shape[tensor_d]
        if tensor_d == 0 or (shape[tensor_d - 1] != 1 and stride[tensor_d - 1] != tensor_numel * chunk_base_stride):
            while view_d >= 0 and (view_numel < tensor_numel or new_shape[view_d] == 1):
                new_stride[view_d] = view_numel * chunk_base_stride
                view_numel *= new_shape[view_d]
                view_d -= 1
            if view_numel != tensor_numel:
                return None
            if tensor_d > 0:
                chunk_base_stride = stride[tensor_d - 1]
                tensor_numel, view_numel = 1, 1
    if view_d != -1:
        return None
    return tuple(new_stride)


def _scalar_view(new_shape: Shape) -> Shape:
    return tuple([1] * len(new_shape))


def dense(shape: Shape, stride: Shape) -> bool:
    """Non-overlapping and dense (no expanded or skipped element), as ATen's ``is_non_overlapping_and_dense``."""
    expected = 1
    for s, n in sorted((s, n) for n, s in zip(shape, stride) if n != 1):
        if s != expected:
            return False
        expected *= n
    return True


class T:
    """A tensor: a view (shape, strides, dtype) of a :class:`Storage`, with its autograd edge."""

    __slots__ = ("st", "shape", "stride", "dtype", "grad_fn", "out_nr", "requires_grad", "leaf", "grad", "is_view",
                 "__weakref__")

    def __init__(self, st: Storage, shape: Shape, stride: Shape, dtype: torch.dtype, is_view: bool = False) -> None:
        self.st, self.shape, self.stride, self.dtype = st, tuple(shape), tuple(stride), dtype
        self.is_view = is_view  # made by a view op: torch tracks it as a view of its base (``_base``)
        self.grad_fn: Optional[Node] = None
        self.out_nr = 0
        self.requires_grad = False
        self.leaf: Optional[Node] = None  # AccumulateGrad node of a leaf that requires grad
        self.grad: Optional[T] = None
        st.n_tensors += 1

    def __del__(self) -> None:
        self.st.n_tensors -= 1

    @property
    def sim(self) -> Sim:
        return self.st.sim

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize

    def is_contiguous(self) -> bool:
        return all(n == 1 or s == c for n, s, c in zip(self.shape, self.stride, contiguous_strides(self.shape)))

    def is_dense(self) -> bool:
        return dense(self.shape, self.stride)

    def data(self) -> "T":
        """A handle on the same data without the autograd edge: what a saved variable holds."""
        return T(self.st, self.shape, self.stride, self.dtype)


# ---------------------------------------------------------------------------- making tensors
def new(sim: Sim, shape: Shape, dtype: torch.dtype, op: str, stride: Optional[Shape] = None) -> T:
    """A freshly allocated tensor (contiguous unless ``stride`` says otherwise)."""
    shape = tuple(shape)
    return T(Storage(sim, math.prod(shape) * dtype.itemsize, op), shape, stride or contiguous_strides(shape), dtype)


def like(x: T, op: str, dtype: Optional[torch.dtype] = None) -> T:
    """A new tensor shaped as ``x``, with ``x``'s strides when they are dense (``empty_like``/``zeros_like``,
    ``preserve_format``), else contiguous."""
    return new(x.sim, x.shape, dtype or x.dtype, op, x.stride if x.is_dense() else None)


def external(sim: Sim, shape: Shape, dtype: torch.dtype, op: str, *, requires_grad: bool = False) -> T:
    """A tensor that exists before the program (weights, buffers, inputs): counted in the starting bytes."""
    t = new(sim, shape, dtype, op)
    if requires_grad:
        t.requires_grad = True
        t.leaf = AccumulateGrad(t)
    return t


# ---------------------------------------------------------------------------- autograd graph
INF_SEQ = float("inf")


class Node:
    """A backward function: ``apply(grads) -> grads`` (one per edge), the tensors it saved, where its
    gradients go (``edges``: (node, input_nr) or ``None``) and the shape/dtype each input had. ``hooks``:
    (slot, group) pairs of :func:`module_inputs`."""

    __slots__ = ("name", "seq", "edges", "saved", "fn", "meta", "scope", "hooks", "__weakref__")

    def __init__(self, name: str, inputs: Sequence[Optional[T]], fn: Callable, saved: Sequence[T] = ()) -> None:
        sim = next(t.sim for t in inputs if t is not None)
        self.name, self.fn = name, fn
        self.seq = sim.next_seq()
        if sim.frame is not None:
            # Inside a checkpoint: a saved-tensor hook packs a holder, not the tensor; what the node keeps is
            # the checkpoint (its inputs), until it is released.
            self.saved: Optional[tuple] = (sim.frame,) if saved else ()
        else:
            self.saved = tuple(s.data() for s in saved)
        if sim.node_log is not None:
            sim.node_log.append(self)
        self.edges = [edge_of(t) for t in inputs]
        self.meta = [None if t is None else (t.shape, t.dtype) for t in inputs]
        self.scope = sim.scope
        self.hooks: list = []

    def __lt__(self, other: "Node") -> bool:
        return self.seq > other.seq


class AccumulateGrad(Node):
    """Stores a leaf's gradient: the incoming tensor itself when nothing else holds it, else a copy."""

    __slots__ = ("param",)

    def __init__(self, param: T) -> None:  # noqa: super not called: no inputs, never in forward order
        self.name, self.seq, self.edges, self.saved, self.meta = "AccumulateGrad", INF_SEQ, [], (), []
        self.fn = None
        self.scope = "-"
        self.hooks = []
        self.param = weakref.ref(param)


def edge_of(t: Optional[T]) -> Optional[tuple]:
    if t is None or not t.requires_grad:
        return None
    if t.grad_fn is not None:
        return (t.grad_fn, t.out_nr)
    return (t.leaf, 0)


def needs_grad(*inputs: Optional[T]) -> bool:
    sim = next(t.sim for t in inputs if t is not None)
    return sim.grad_enabled and any(t is not None and t.requires_grad for t in inputs)


def module_inputs(*inputs: Optional[T]) -> None:
    """A module is called with these inputs. ``ModTracker`` (inside MemTracker) registers a multi-grad hook on
    those that require grad (``register_multi_grad_hook``, mode "all"), in forward only: each input's gradient
    is kept in the hook's buffer from when it is computed until the last of them is."""
    tensors = [t for t in inputs if t is not None and t.requires_grad]
    if not tensors or not tensors[0].sim.module_hooks or not tensors[0].sim.grad_enabled\
            or tensors[0].sim.phase == "backward":
        return
    group = {"left": len(tensors), "held": []}
    for t in tensors:
        node = t.grad_fn if t.grad_fn is not None else t.leaf
        node.hooks.append((t.out_nr, group))


def attach(outputs: Sequence[T], node: Node) -> None:
    for i, out in enumerate(outputs):
        out.grad_fn, out.out_nr, out.requires_grad = node, i, True


def record(name: str, inputs: Sequence[Optional[T]], outputs: Sequence[T], fn: Callable,
           saved: Sequence[T] = ()) -> None:
    """Give ``outputs`` a backward node when grad mode is on and an input requires grad."""
    if needs_grad(*inputs):
        attach(outputs, Node(name, inputs, fn, saved))


# ---------------------------------------------------------------------------- views (no allocation)
def as_view(x: T, shape: Shape, stride: Shape, dtype: Optional[torch.dtype] = None) -> T:
    return T(x.st, shape, stride, dtype or x.dtype, is_view=True)


def view(x: T, shape: Shape, name: str = "ViewBackward0") -> T:
    shape = _infer(shape, x.numel)
    stride = compute_stride(x.shape, x.stride, shape)
    if stride is None:
        raise ValueError(f"view of {x.shape} with strides {x.stride} as {shape} needs a copy")
    out = as_view(x, shape, stride)
    record(name, [x], [out], lambda g, s=x.shape: [reshape(g[0], s)])
    return out


def _infer(shape: Shape, numel: int) -> Shape:
    shape = tuple(shape)
    if -1 in shape:
        known = math.prod(n for n in shape if n != -1)
        shape = tuple(numel // known if n == -1 else n for n in shape)
    return shape


def reshape(x: T, shape: Shape) -> T:
    """A view when ATen's ``computeStride`` finds one, else a contiguous copy (``clone`` + ``_unsafe_view``)."""
    shape = _infer(shape, x.numel)
    if compute_stride(x.shape, x.stride, shape) is not None:
        return view(x, shape)
    return unsafe_view(clone(x), shape)


def unsafe_view(x: T, shape: Shape) -> T:
    """``_unsafe_view``: the same storage, but not a view in autograd's sense."""
    out = view(x, shape, "UnsafeViewBackward0")
    out.is_view = False
    return out


def clone(x: T, op: str = "clone") -> T:
    out = new(x.sim, x.shape, x.dtype, op)
    record("CloneBackward0", [x], [out], lambda g: [g[0]])
    return out


def contiguous(x: T) -> T:
    return x if x.is_contiguous() else clone(x)


def transpose(x: T, a: int, b: int) -> T:
    n = len(x.shape)
    a, b = a % n, b % n
    shape, stride = list(x.shape), list(x.stride)
    shape[a], shape[b] = shape[b], shape[a]
    stride[a], stride[b] = stride[b], stride[a]
    out = as_view(x, tuple(shape), tuple(stride))
    record("TransposeBackward0", [x], [out], lambda g: [transpose(g[0], a, b)])
    return out


def t(x: T) -> T:
    out = as_view(x, x.shape[::-1], x.stride[::-1])
    record("TBackward0", [x], [out], lambda g: [t(g[0])])
    return out


def permute(x: T, dims: Sequence[int]) -> T:
    out = as_view(x, tuple(x.shape[d] for d in dims), tuple(x.stride[d] for d in dims))
    inverse = [dims.index(i) for i in range(len(dims))]
    record("PermuteBackward0", [x], [out], lambda g: [permute(g[0], inverse)])
    return out


def expand(x: T, shape: Shape) -> T:
    shape = tuple(shape)
    if shape == x.shape:
        out = as_view(x, x.shape, x.stride)
    else:
        lead = len(shape) - len(x.shape)
        stride = [0] * lead + [0 if (n != m and n == 1) else s for n, m, s in zip(x.shape, shape[lead:], x.stride)]
        out = as_view(x, shape, tuple(stride))
    record("ExpandBackward0", [x], [out], lambda g, s=x.shape: [sum_to(g[0], s)])
    return out


def unsqueeze(x: T, dim: int) -> T:
    dim = dim % (len(x.shape) + 1)
    stride_here = x.stride[dim] * x.shape[dim] if dim < len(x.shape) else 1
    out = as_view(x, x.shape[:dim] + (1,) + x.shape[dim:], x.stride[:dim] + (stride_here,) + x.stride[dim:])
    record("UnsqueezeBackward0", [x], [out], lambda g: [squeeze(g[0], dim)])
    return out


def squeeze(x: T, dim: int) -> T:
    out = as_view(x, x.shape[:dim] + x.shape[dim + 1:], x.stride[:dim] + x.stride[dim + 1:])
    record("SqueezeBackward1", [x], [out], lambda g: [unsqueeze(g[0], dim)])
    return out


def narrow(x: T, dim: int, start: int, length: int) -> T:
    """``x[..., start:start + length, ...]`` on ``dim``: a view; its gradient is a zero tensor of ``x``'s
    shape with the slice written (``slice_backward``)."""
    shape = list(x.shape)
    shape[dim] = length
    out = as_view(x, tuple(shape), x.stride)
    record("SliceBackward0", [x], [out], lambda g, s=x.shape, d=x.dtype: [new(g[0].sim, s, g[0].dtype, "zeros")])
    return out


def view_as_complex(x: T) -> T:
    out = as_view(x, x.shape[:-1], tuple(s // 2 for s in x.stride[:-1]), torch.complex64)
    record("ViewAsComplexBackward0", [x], [out], lambda g: [view_as_real(g[0])])
    return out


def view_as_real(x: T) -> T:
    out = as_view(x, x.shape + (2,), tuple(2 * s for s in x.stride) + (1,), torch.float32)
    record("ViewAsRealBackward0", [x], [out], lambda g: [view_as_complex(contiguous(g[0]))])
    return out


def sum_to(g: T, shape: Shape) -> T:
    """``at::sum_to``: sum the broadcast dimensions (one allocation, kept dims), then view as ``shape``."""
    if g.shape == tuple(shape):
        return g
    lead = len(g.shape) - len(shape)
    kept = tuple(1 if (i < lead or shape[i - lead] == 1) and n != 1 else n for i, n in enumerate(g.shape))
    reduced = new(g.sim, kept, g.dtype, "sum.dim_IntList")
    return view(reduced, shape) if kept != tuple(shape) else reduced


# ---------------------------------------------------------------------------- the engine
def backward(loss: T) -> None:
    """``loss.backward()``: the seed gradient, then every node in the engine's order (see the module docstring)."""
    sim = loss.sim
    was = sim.grad_enabled
    sim.grad_enabled = False  # backward formulas record nothing (create_graph=False)
    seed = new(sim, loss.shape, loss.dtype, "ones_like")
    root = loss.grad_fn
    deps: dict[Node, int] = {}
    stack, seen = [root], {root}
    while stack:
        node = stack.pop()
        for edge in node.edges:
            if edge is None:
                continue
            nxt = edge[0]
            deps[nxt] = deps.get(nxt, 0) + 1
            if nxt not in seen:
                seen.add(nxt)
                stack.append(nxt)
    buffers: dict[Node, list] = {root: [seed]}  # torch.autograd.backward holds the seed until it returns
    ready = [root]
    while ready:
        node = heapq.heappop(ready)
        inputs = buffers.pop(node)
        sim.scope = node.scope
        for slot, group in node.hooks:  # tensor pre-hooks: multi-grad hooks keep the gradient
            group["held"].append(inputs[slot])
            group["left"] -= 1
            if group["left"] == 0:
                group["held"].clear()
        _recompute_if_needed(node)
        if isinstance(node, AccumulateGrad):
            _accumulate_grad(node, inputs)
            del inputs
            continue
        outs = node.fn(inputs)
        if node.saved and not isinstance(node.saved[-1], T):
            # Checkpointed: apply unpacked the recomputed tensors into locals, which die when it returns.
            node.saved = node.saved[-1:]
        outs = _validate_outputs(node, outs)
        del inputs  # the engine drops the node's inputs, then its saved variables
        node.saved = None
        pending = list(outs)
        del outs
        for i, edge in enumerate(node.edges):
            grad = pending[i]
            pending[i] = None
            if edge is None or grad is None:
                del grad
                continue
            nxt, slot = edge
            buf = buffers.setdefault(nxt, [None] * max(len(nxt.edges), 1) if not isinstance(nxt, AccumulateGrad)
                                     else [None])
            if buf[slot] is None:
                buf[slot] = grad
            else:
                buf[slot] = _add_grads(buf[slot], grad, buffers, pending)
            del grad
            deps[nxt] -= 1
            if deps[nxt] == 0:
                heapq.heappush(ready, nxt)
        del pending
    del seed
    sim.grad_enabled = was


def _recompute_if_needed(node: Node) -> None:
    """The first unpack of a saved tensor of a checkpointed layer recomputes the layer (a function, so that no
    loop variable keeps a saved tensor alive)."""
    for frame in node.saved or ():
        if not isinstance(frame, T) and not frame.recomputed:
            frame.recompute()


def _validate_outputs(node: Node, outs: list) -> list:
    """The engine's ``validate_outputs``: a gradient broadcast beyond its input is summed back; one of another
    dtype is cast."""
    outs = list(outs)
    for i, meta in enumerate(node.meta):
        g = outs[i]
        if g is None or meta is None or node.edges[i] is None:
            continue
        shape, dtype = meta
        if g.shape != shape:
            outs[i] = g = sum_to(g, shape)
        if g.dtype != dtype:
            outs[i] = like(g, "_to_copy", dtype)
        del g
    return outs


def _holders(v: T, buffers: dict, pending: list) -> int:
    n = sum(1 for buf in buffers.values() for x in buf if x is v)
    return n + sum(1 for x in pending if x is v)


def _add_grads(old: T, var: T, buffers: dict, pending: list) -> T:
    """``InputBuffer::accumulate``: ``old.add_(var)`` when the buffer holds the last reference to ``old`` and to
    its storage (``can_accumulate_inplace``), else a new ``old + var``. A view never qualifies: torch keeps its
    base alive (``_base``), a second reference to the storage (so the sum of two projections' input gradients,
    each a view of an ``mm`` output, is a new tensor)."""
    sim = old.sim
    if not sim.dispatch_mode and not old.is_view and old.is_dense() and old.st.n_tensors == 1\
            and _holders(old, buffers, pending) == 1:
        return old
    return new(sim, old.shape, old.dtype, "add.Tensor")


def _accumulate_grad(node: AccumulateGrad, inputs: list) -> None:
    param = node.param()
    grad = inputs[0]
    if param is None or grad is None:
        return
    # AccumulateGrad steals a gradient nothing else holds and whose layout matches the parameter's.
    stealable = grad.st.n_tensors == 1 and grad.is_dense() and grad.stride == param.stride
    param.grad = grad if stealable else new(grad.sim, param.shape, grad.dtype, "clone")
