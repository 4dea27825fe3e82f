"""Memory of one request, measured on the real model by code we did not write where possible.

* **Saved activations**: ``torch.autograd.graph.saved_tensors_hooks`` sees every tensor autograd saves for
  backward; the distinct storages, less the parameters, buffers and input tokens, attributed to the layer run
  (or module) that saved each first. With activation checkpointing autograd saves nothing inside a layer run:
  what the checkpoint keeps (its tensor arguments) is recorded at the ``torch.utils.checkpoint.checkpoint``
  call, and the total is checked against the bytes freed when the graph is dropped (MemTracker).
* **Live bytes and peak**: torch's ``torch.distributed._tools.mem_tracker.MemTracker`` (a ``TorchDispatchMode``:
  the storages of every op's outputs, freed by weak references), cross-checked by :class:`LiveBytes`, a small
  dispatch-mode tracker of our own that also says where the peak happened (phase, layer run, op).
* **The allocator** (CPU): ``torch.profiler`` with ``profile_memory=True`` records every allocation of the CPU
  allocator, with no dispatch mode in the way (a dispatch mode changes the program: see docs/memory.md).
  On CUDA, ``torch.cuda.max_memory_allocated`` (counters.studies.validate).
* **Weights, gradients, optimizer state, KV cache, logits**: the storages of the model's parameters, their
  ``.grad``, the optimizer's ``state`` and the caches, after the request.
"""

from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.weak import WeakIdKeyDictionary

from llama_ref.guards import mark_cache_filled

from .training import loss_of


def storage_key(t: torch.Tensor) -> int:
    """Identity of ``t``'s storage while it is alive (meta storages have no data pointer to compare)."""
    return t.untyped_storage()._cdata


def storage_bytes(t: torch.Tensor) -> int:
    return t.untyped_storage().nbytes()


def distinct_bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        if t is None:
            continue
        key = storage_key(t)
        if key not in seen:
            seen.add(key)
            total += storage_bytes(t)
    return total


# ---------------------------------------------------------------------------- our own live-bytes tracker
class LiveBytes(TorchDispatchMode):
    """Bytes of the storages alive, as a dispatch mode sees them: every op's output storages from the op on,
    each until its last tensor is freed (a weak reference's callback), plus the tensors registered with
    :meth:`track`. The peak is sampled after every op, with where it happened: ``phase`` and ``scope`` (set
    by the caller and the layer hooks) and the op."""

    def __init__(self, device: torch.device, record: bool = False) -> None:
        super().__init__()
        self.device = torch.device(device)
        self.live = 0
        self.peak = 0
        self.where = ("start", "-", "-")
        self.phase = "start"
        self.scope = "-"
        self.events: Optional[list] = [] if record else None
        self._info = WeakIdKeyDictionary()
        self.scope_peaks: dict[str, int] = {}

    def track(self, t: torch.Tensor, op: str = "external") -> None:
        if t.device.type != self.device.type:
            return  # host tensors of a model elsewhere (an optimizer's step counters) are not device memory
        st = t.untyped_storage()
        if st in self._info:
            return
        n = st.nbytes()
        if self.device.type == "cuda":  # the caching allocator's blocks, as MemTracker counts them
            n = -(-n // 512) * 512
        self._info[st] = (n, weakref.ref(st, lambda _ref, n=n, op=op: self._freed(n, op)))
        self.live += n
        if self.live > self.peak:
            self.peak, self.where = self.live, (self.phase, self.scope, op)
        key = f"{self.phase}:{self.scope}"
        if self.live > self.scope_peaks.get(key, -1):
            self.scope_peaks[key] = self.live
        if self.events is not None:
            self.events.append(("alloc", op, n, self.live, self.phase, self.scope))

    def _freed(self, n: int, op: str) -> None:
        self.live -= n
        if self.events is not None:
            self.events.append(("free", op, n, self.live, self.phase, self.scope))

    def mark(self, what: str) -> None:
        if self.events is not None:
            self.events.append(("mark", what, 0, self.live, self.phase, self.scope))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if self.phase == "backward":  # the module whose backward node is running (tagged by layer_scopes)
            node = torch._C._current_autograd_node()
            self.scope = "-" if node is None else node.metadata.get(SCOPE_KEY, "-")
        name = func.overloadpacket.__name__ if func.overloadpacket else str(func)
        overload = func._overloadname
        op = name if overload == "default" else f"{name}.{overload}"
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(t, torch.Tensor):
                self.track(t, op)
        return out


# ---------------------------------------------------------------------------- the layer runs
SCOPE_KEY = "llama_ref.memory_scope"


def tag_graph(output, scope: str, stop=()) -> None:
    """Mark the backward nodes behind ``output`` as ``scope`` (``metadata``), down to ``stop`` (the nodes of the
    module's inputs) and to nodes already marked; gradient accumulators stay unmarked."""
    stop_ids = {id(n) for n in stop if n is not None}
    roots = [t.grad_fn for t in (output if isinstance(output, (tuple, list)) else (output,))
             if isinstance(t, torch.Tensor) and t.grad_fn is not None]
    seen = set()
    while roots:
        node = roots.pop()
        if node is None or id(node) in seen or id(node) in stop_ids or type(node).__name__ == "AccumulateGrad":
            continue
        seen.add(id(node))
        if SCOPE_KEY in node.metadata:
            continue
        node.metadata[SCOPE_KEY] = scope
        roots.extend(n for n, _ in node.next_functions)


@contextlib.contextmanager
def layer_scopes(model, tracker: LiveBytes, on_layer: Optional[Callable] = None):
    """Name the tracker's scope after the module running: ``layers.<run>`` for the decoder-layer runs (in
    schedule order), ``tok_embeddings``, ``norm``, ``output``; and mark each one's backward nodes, so that the
    backward is named after the module whose node runs. Yields a dict whose ``"n"`` counts the runs."""
    handles, runs = [], {"n": 0}
    inputs: dict = {}

    def pre(name):
        def hook(module, args):
            if torch._C._current_graph_task_id() != -1:
                return  # a checkpointed layer recomputed in backward keeps the backward's scope
            inputs[id(module)] = [a.grad_fn for a in args if isinstance(a, torch.Tensor)]
            if name == "layer":
                tracker.scope = f"layers.{runs['n']}"
                runs["n"] += 1
                if on_layer is not None:
                    on_layer(tracker.scope)
            else:
                tracker.scope = name
        return hook

    def post(module, args, output):
        if torch._C._current_graph_task_id() == -1:
            tag_graph(output, tracker.scope, inputs.pop(id(module), ()))
            tracker.scope = "-"

    for layer in model.layers:
        handles.append(layer.register_forward_pre_hook(pre("layer")))
        handles.append(layer.register_forward_hook(post))
    for name in ("tok_embeddings", "norm", "output"):
        module = getattr(model, name)
        handles.append(module.register_forward_pre_hook(pre(name)))
        handles.append(module.register_forward_hook(post))
    try:
        yield runs
    finally:
        for h in handles:
            h.remove()


@dataclass
class MeasuredMemory:
    """Bytes measured for one request (see the module docstring)."""

    weights: int = 0
    rope_table: int = 0
    kv_cache: int = 0
    inputs: int = 0
    logits: int = 0
    saved: dict = field(default_factory=dict)
    loss: int = 0
    graph_bytes: Optional[int] = None  # what dropping the graph frees (MemTracker)
    gradients: int = 0
    optimizer: int = 0
    peak_memtracker: int = 0
    peak: int = 0
    where: tuple = ()
    start: int = 0
    layer_starts: dict = field(default_factory=dict)
    layer_peaks: dict = field(default_factory=dict)
    allocator_peak: Optional[int] = None
    threads: int = 1  # torch's intra-op threads during the allocator run (kernels' scratch scales with them)
    events: Optional[list] = None


# ---------------------------------------------------------------------------- one request
def make_tokens(model, batch: int, seqlen: int, seed: int = 0) -> torch.Tensor:
    if model.device.type == "meta":
        return torch.zeros((batch, seqlen), dtype=torch.long, device="meta")
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.config.vocab_size, (batch, seqlen), generator=gen).to(model.device)


def make_optimizer(model, name: str):
    if name == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=1e-3)
    if name == "sgd":
        return torch.optim.SGD(model.parameters(), lr=1e-3)
    if name == "none":
        return None
    raise ValueError(f"unknown optimizer {name!r}; choose adamw, sgd or none")


def measure_request(model, *, batch: int, seqlen: int, start_pos: int = 0, train: bool = False,
                    loss: str = "cross-entropy", recompute: bool = False, optimizer: str = "none",
                    last_only: bool = False, kv_cache: bool = True, record: bool = False,
                    allocator: bool = False, memtracker: bool = True, seed: int = 0) -> MeasuredMemory:
    """Run one request on ``model`` (a forward of ``batch`` x ``seqlen`` after ``start_pos`` cached positions,
    with a KV cache unless ``kv_cache`` is False; or with ``train`` one training step, ``optimizer`` stepping)
    and measure it: once under :class:`LiveBytes` with the saved-tensor hooks, once under MemTracker
    (``memtracker``), once under the profiler (``allocator``, CPU). Each run starts from the same state."""
    m = MeasuredMemory()
    end = start_pos + seqlen
    model.reserve_positions(end)
    tokens = make_tokens(model, batch, seqlen, seed)
    params = list(model.parameters())
    request = _Request(model, tokens, batch, start_pos, train, loss, recompute, optimizer, last_only, kv_cache)
    request.prepare()
    m.weights = distinct_bytes(params)
    m.rope_table = storage_bytes(model.freqs_cis)
    m.kv_cache = distinct_bytes(b for c in (model.caches or []) for b in c.buffers())
    m.inputs = storage_bytes(tokens)
    exclude = {storage_key(t) for t in [*params, *model.buffers(), tokens]}

    if allocator and model.device.type == "cpu":
        m.threads = torch.get_num_threads()
        m.allocator_peak = allocator_peak(lambda: request.run())
        request.prepare()

    tracker = LiveBytes(model.device, record=record)
    for t in [*params, *model.buffers(), tokens, *request.optimizer_state()]:
        tracker.track(t)
    m.start = tracker.live
    tracker.peak, tracker.where = tracker.live, ("start", "-", "-")
    saved = SavedTensors(exclude, tracker)
    scopes = layer_scopes(model, tracker, on_layer=lambda scope: _layer_start(m, tracker, scope))
    with tracker, scopes as runs, _checkpoint_scope(saved, tracker, runs) if train and recompute\
            else contextlib.nullcontext():
        request.run(tracker, saved, m)
        _layer_end(m, tracker)
    m.peak, m.where, m.events = tracker.peak, tracker.where, tracker.events
    if train:
        m.gradients = distinct_bytes(p.grad for p in params)
        if request.opt is not None:
            m.optimizer = distinct_bytes(request.optimizer_state())
    if memtracker:
        from torch.distributed._tools.mem_tracker import MemTracker

        request.prepare()
        mem = MemTracker()
        mem.track_external(model, tokens, *([request.opt] if request.opt is not None else []))
        with mem:
            request.run()
        m.peak_memtracker = _device_total(mem.get_tracker_snapshot("peak"), model.device)
    request.finish()
    return m


class _Request:
    """One request, runnable several times from the same state (gradients dropped, optimizer new, cache
    marks reset)."""

    def __init__(self, model, tokens, batch, start_pos, train, loss, recompute, optimizer, last_only, kv_cache):
        self.model, self.seqlen, self.batch, self.start_pos = model, tokens, batch, start_pos
        self.train, self.loss, self.recompute, self.optimizer = train, loss, recompute, optimizer
        self.last_only, self.kv_cache = last_only, kv_cache
        self.opt = None
        self.flags = [(p, p.requires_grad) for p in model.parameters()]
        self.checkpointing = model.activation_checkpointing

    def prepare(self) -> None:
        model, params = self.model, list(self.model.parameters())
        self.opt = None
        for p in params:
            p.grad = None
            # MemTracker hooks every parameter's gradient, so they require grad; no_grad keeps inference graph-free.
            p.requires_grad_(True)
        if self.train:
            model.clear_cache()
            model.set_activation_checkpointing(self.recompute)
            self.opt = make_optimizer(model, self.optimizer)
        elif self.kv_cache:
            if model.caches is None:
                model.setup_cache(self.batch, self.start_pos + self.seqlen.shape[1])
            model.reset_cache()
            if self.start_pos:
                mark_cache_filled(model, self.start_pos, self.batch)
        else:
            model.clear_cache()

    def optimizer_state(self) -> list:
        if self.opt is None:
            return []
        return [v for state in self.opt.state.values() for v in state.values() if isinstance(v, torch.Tensor)]

    def finish(self) -> None:
        """Leave the model as it was: no gradients, its own requires_grad flags and checkpointing."""
        for p, flag in self.flags:
            p.grad = None
            p.requires_grad_(flag)
        self.model.set_activation_checkpointing(self.checkpointing)
        self.opt = None

    def run(self, tracker: Optional[LiveBytes] = None, saved: Optional["SavedTensors"] = None,
            m: Optional[MeasuredMemory] = None) -> None:
        model, tokens = self.model, self.seqlen

        def phase(name):
            if tracker is not None:
                tracker.phase, tracker.scope = name, "-"

        phase("forward")
        if not self.train:
            with torch.no_grad():
                logits = model(tokens, self.start_pos, last_only=self.last_only)
            if m is not None:
                m.logits = storage_bytes(logits)
            del logits
            phase("end")
            return
        with saved.hooks() if saved is not None else contextlib.nullcontext():
            logits = model(tokens, last_only=self.last_only)
            phase("loss")
            if saved is not None:
                saved.scope_override = "loss"
            value = loss_of(logits, tokens, self.loss)
        if tracker is not None:
            tag_graph(logits, "-")
            tag_graph(value, "loss")
        if m is not None:
            m.logits = storage_bytes(logits)
            m.saved, m.loss = saved.by_scope(), saved.loss_bytes()
        del logits
        phase("backward")
        value.backward()
        del value
        if self.opt is not None:
            phase("optimizer")
            self.opt.step()
        phase("end")


def _device_total(snapshot: dict, device: torch.device) -> int:
    return sum(dev.get("Total", 0) for d, dev in snapshot.items() if torch.device(d).type == device.type)


def _layer_start(m: MeasuredMemory, tracker: LiveBytes, scope: str) -> None:
    _layer_end(m, tracker)
    run = int(scope.split(".")[1])
    m.layer_starts[run] = tracker.live
    tracker.scope_peaks.pop(f"{tracker.phase}:{scope}", None)
    m._current = run  # type: ignore[attr-defined]


def _layer_end(m: MeasuredMemory, tracker: LiveBytes) -> None:
    run = getattr(m, "_current", None)
    if run is not None:
        m.layer_peaks[run] = tracker.scope_peaks.get(f"forward:layers.{run}", m.layer_starts[run])
        m._current = None  # type: ignore[attr-defined]


class SavedTensors:
    """Distinct storages autograd saves (``saved_tensors_hooks``), per scope, less ``exclude`` (parameters,
    buffers, tokens). ``extra``: what a checkpoint keeps for its recomputation."""

    def __init__(self, exclude: set, tracker: LiveBytes) -> None:
        self.exclude = exclude
        self.tracker = tracker
        self.scope_override: Optional[str] = None
        # Keyed by the storage object itself, weakly: holding a saved storage would change what is freed.
        self._seen = WeakIdKeyDictionary()

    def add(self, t: torch.Tensor) -> None:
        st = t.untyped_storage()
        if st._cdata in self.exclude or st in self._seen:
            return
        self._seen[st] = (self.scope_override or self.tracker.scope, st.nbytes())

    def hooks(self):
        def pack(t):
            self.add(t)
            return t
        return torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)

    def by_scope(self) -> dict:
        """Call while the graph is alive (every saved storage is)."""
        out: dict = {}
        for scope, n in self._seen.values():
            if scope != "loss":
                out[scope] = out.get(scope, 0) + n
        return out

    def loss_bytes(self) -> int:
        return sum(n for scope, n in self._seen.values() if scope == "loss")


@contextlib.contextmanager
def _checkpoint_scope(saved: SavedTensors, tracker: LiveBytes, runs: dict):
    """A non-reentrant checkpoint saves its tensor arguments (``_CheckpointFrame.save_inputs``, through the
    saved-tensor hooks) before the layer's own hooks run: attribute them to the layer run they serve."""
    import torch.utils.checkpoint as checkpoint_module

    real = checkpoint_module.checkpoint

    def scoped(fn, *args, **kwargs):
        saved.scope_override = f"layers.{runs['n']}"
        try:
            return real(fn, *args, **kwargs)
        finally:
            saved.scope_override = None

    checkpoint_module.checkpoint = scoped
    try:
        yield
    finally:
        checkpoint_module.checkpoint = real


@contextlib.contextmanager
def _quiet_stderr():
    """The profiler's C++ side announces its start and stop on file descriptor 2: keep the command's stderr for
    its own messages."""
    import os
    import sys

    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError, AttributeError):
        yield
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def allocator_events(fn: Callable[[], None]) -> list[tuple[int, str]]:
    """Every allocation (positive size) and free (negative) of the CPU allocator during ``fn()``, in order, with
    the op it happened in, from ``torch.profiler``'s memory events (no dispatch mode)."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        if node.tag == _EventType.Allocation:
            events.append((node.start_time_ns, node.extra_fields.alloc_size, node.parent.name if node.parent else "-"))
        stack.extend(node.children)
    return [(size, op) for _t, size, op in sorted(events)]


def allocator_peak(fn: Callable[[], None]) -> int:
    """The most bytes the CPU allocator held during ``fn()`` beyond what it held at the start."""
    live = peak = 0
    for size, _op in allocator_events(fn):
        live += size
        peak = max(peak, live)
    return peak
