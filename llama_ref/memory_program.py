"""The Llama program of ``llama_ref/model.py``, line by line, on the simulated tensors of
:mod:`llama_ref.memory_autograd`: every allocation the real forward, loss, backward and optimizer step make, in
their order, with the references the real code holds (so CPython frees each simulated storage when torch frees
the real one). Each function is the model function of the same name; comments name the line mirrored.

:func:`run` executes one request (a forward with or without KV cache, or a training step) and returns what the
algebra reports (:mod:`llama_ref.memory_algebra`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch

from . import memory_ops as op
from .memory_autograd import (Sim, Storage, T, backward, expand, external, module_inputs, narrow, new, reshape, transpose,
                              unsqueeze, view, view_as_complex, view_as_real)

#: Bytes of the CPU random-number-generator state ``torch.get_rng_state()`` returns (mt19937: 624 words and
#: bookkeeping), which non-reentrant checkpointing stashes for every checkpointed call (host memory).
CPU_RNG_STATE_BYTES = 5056


@dataclass(frozen=True)
class Shapes:
    """One rank's sizes of every tensor kind (the whole model for a single process)."""

    dim: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    hidden_dim: int
    vocab_size: int
    norm_eps: float = 1e-5
    embed_dim: int = 0  # embedding columns this rank holds (tensor parallel: dim / tp; default dim)
    vocab_shard: int = 0  # output-head rows this rank holds (tensor parallel: vocab_size / tp; default all)

    @property
    def n_rep(self) -> int:
        return self.n_heads // self.n_kv_heads


@dataclass(frozen=True)
class Program:
    """What runs: ``batch`` sequences of ``tokens`` new tokens after ``cached`` ones; weights in
    ``weight_dtype``, activations in ``compute_dtype``; ``attn_kernel`` math or sdpa (``sdpa_backend``: which kernel
    the sdpa call dispatches to on the device: ``flash`` (the CPU's), or ``math`` where no fused kernel exists,
    e.g. meta); a KV cache of ``cache_positions`` positions (0: none) in ``cache_dtype``; or a training step.
    Built by :meth:`llama_ref.memory_algebra.MemoryRequest.program`."""

    shapes: Shapes
    n_runs: int
    runs: tuple = ()  # the layer index of every run (default: each layer once)
    n_layers: int = 0  # layers holding weights (default: n_runs)
    batch: int = 1
    seqlen: int = 1
    start_pos: int = 0
    weight_dtype: torch.dtype = torch.float32
    compute_dtype: torch.dtype = torch.float32
    attn_kernel: str = "math"
    sdpa_backend: str = "flash"
    cache_positions: int = 0
    cache_batch: int = 0
    cache_dtype: Optional[torch.dtype] = None
    rope_positions: int = 0
    tied: bool = False
    last_only: bool = False
    train: bool = False
    loss: str = "cross-entropy"
    recompute: bool = False
    optimizer: str = "none"
    optimizer_impl: str = "single-tensor"  # torch.optim's default: "foreach" on CUDA, "single-tensor" elsewhere
    tp: int = 1  # tensor-parallel ranks (shapes are then one rank's)
    round_to: int = 1  # the allocator's granularity: CUDA's caching allocator rounds every block up to 512 bytes
    device_type: str = "cpu"  # on meta the fake backend's wait_tensor returns a new tensor
    token_check: bool = False  # the guards read min and max of CPU tokens (two 0-dim int64 tensors)
    host_is_device: bool = True  # the model is on the CPU, where host tensors (AdamW's step) also live


@dataclass
class Outcome:
    """What the simulated request held, by category (bytes), per layer run, and its peak."""

    start: int = 0
    weights: int = 0
    rope_table: int = 0
    kv_cache: int = 0
    inputs: int = 0
    logits: int = 0
    saved: dict = field(default_factory=dict)  # scope -> bytes of the distinct storages first saved there
    loss: int = 0
    gradients: int = 0
    optimizer: int = 0
    peak: int = 0
    where: object = None
    layer_starts: dict = field(default_factory=dict)  # run -> bytes alive when its forward began
    layer_peaks: dict = field(default_factory=dict)  # run -> most bytes alive during its forward
    sim: Optional[Sim] = None


# ---------------------------------------------------------------------------- the model's parameters
class Weights:
    """The parameters as external tensors, in ``model.parameters()`` order, and the buffers."""

    def __init__(self, sim: Sim, p: Program) -> None:
        s, wd, g = p.shapes, p.weight_dtype, p.train
        q_dim, kv_dim = s.n_heads * s.head_dim, s.n_kv_heads * s.head_dim

        def param(*shape):
            return external(sim, shape, wd, "parameter", requires_grad=g)
        self.tok_embeddings = param(s.vocab_size, s.embed_dim or s.dim)
        n_layers = p.n_layers or p.n_runs
        self.layers = []
        for _ in range(n_layers):
            self.layers.append(dict(wq=param(q_dim, s.dim), wk=param(kv_dim, s.dim), wv=param(kv_dim, s.dim),
                                    wo=param(s.dim, q_dim), w1=param(s.hidden_dim, s.dim),
                                    w2=param(s.dim, s.hidden_dim), w3=param(s.hidden_dim, s.dim),
                                    attention_norm=param(s.dim), ffn_norm=param(s.dim)))
        self.norm = param(s.dim)
        self.output = self.tok_embeddings if p.tied else param(s.vocab_shard or s.vocab_size, s.dim)
        self.freqs_cis = external(sim, (p.rope_positions, s.head_dim // 2), torch.complex64, "buffer")
        self.caches = []
        if p.cache_positions:
            shape = (p.cache_batch, p.cache_positions, s.n_kv_heads, s.head_dim)
            for _ in range(p.n_runs):
                self.caches.append((external(sim, shape, p.cache_dtype, "buffer"),
                                    external(sim, shape, p.cache_dtype, "buffer")))

    def parameters(self) -> list:
        out = [self.tok_embeddings]
        for layer in self.layers:
            out += [layer[k] for k in ("wq", "wk", "wv", "wo", "w1", "w2", "w3", "attention_norm", "ffn_norm")]
        out.append(self.norm)
        if self.output is not self.tok_embeddings:
            out.append(self.output)
        return out

    def buffers(self) -> list:
        return [self.freqs_cis] + [c for pair in self.caches for c in pair]


# ---------------------------------------------------------------------------- building blocks (model.py)
def linear(x: T, weight: T) -> T:
    # Linear.forward: F.linear(x, self.weight.to(x.dtype))
    return op.linear(x, op.to(weight, x.dtype))


# ---------------------------------------------------------------------------- tensor parallel (llama_ref.parallel)
def column_linear(p: Program, x: T, weight: T, gather: bool = False) -> T:
    # ColumnParallelLinear.forward: y = super().forward(copy_to_tensor_parallel(x)); gathered if gather_output
    if p.tp == 1:
        return linear(x, weight)
    y = linear(copy_to(p, x), weight)
    return gather_last_dim(p, y) if gather else y


def row_linear(p: Program, x: T, weight: T) -> T:
    # RowParallelLinear.forward: partial = super().forward(x); return reduce_from_tensor_parallel(partial)
    if p.tp == 1:
        return linear(x, weight)
    partial = linear(x, weight)
    return reduce_from(p, partial)


def _no_grad(sim: Sim):
    class Guard:
        def __enter__(self):
            self.was, sim.grad_enabled = sim.grad_enabled, False

        def __exit__(self, *exc):
            sim.grad_enabled = self.was
    return Guard()


def all_reduce_sum(p: Program, x: T) -> T:
    # wait_tensor(all_reduce(x.contiguous(), "sum", group)): a new tensor; the fake backend's wait_tensor on meta
    # returns yet another (MemTracker's note on wait_tensor)
    y = new(x.sim, x.shape, x.dtype, "all_reduce")
    return _wait(p, y)


def _wait(p: Program, y: T) -> T:
    return new(y.sim, y.shape, y.dtype, "wait_tensor") if p.device_type == "meta" else y


def copy_to(p: Program, x: T) -> T:
    # CopyToTensorParallel: identity forward (only when a gradient will flow); backward all-reduces
    if not (x.sim.grad_enabled and x.requires_grad):
        return x
    out = T(x.st, x.shape, x.stride, x.dtype)
    op.record("CopyToTensorParallelBackward", [x], [out], lambda g: [all_reduce_sum(p, op.contiguous(g[0]))])
    return out


def reduce_from(p: Program, x: T) -> T:
    with _no_grad(x.sim):
        y = all_reduce_sum(p, op.contiguous(x))
    op.record("ReduceFromTensorParallelBackward", [x], [y], lambda g: [g[0]])
    return y


def gather_last_dim(p: Program, x: T) -> T:
    # all_gather_last_dim: gather on dim 0, view (n, ...), movedim(0, -2), reshape (..., n * d): a copy
    n, sim = p.tp, x.sim
    with _no_grad(sim):
        gathered = _wait(p, new(sim, (n * x.shape[0],) + x.shape[1:], x.dtype, "all_gather_into_tensor"))
        gathered = view(gathered, (n,) + x.shape)
        dims = list(range(1, len(x.shape))) + [0, len(x.shape)]
        y = reshape(op.permute(gathered, dims), x.shape[:-1] + (n * x.shape[-1],))
        del gathered
    chunk = x.shape[-1]
    op.record("GatherFromTensorParallelBackward", [x], [y],
              lambda g: [T(g[0].st, g[0].shape[:-1] + (chunk,), g[0].stride, g[0].dtype)])
    return y


def rms_norm(x: T, weight: T) -> T:
    # RMSNorm.forward: output = self._norm(x.float()).type_as(x); return output * self.weight.to(x.dtype)
    output = op.to(_norm(op.to(x, torch.float32)), x.dtype)
    return op.mul(output, op.to(weight, x.dtype))


def _norm(x: T) -> T:
    # x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
    return op.mul(x, op.rsqrt(op.add_scalar(op.mean_last(op.pow2(x)))))


def apply_rotary_emb(xq: T, xk: T, freqs_cis: T) -> tuple:
    module_inputs(xq, xk, freqs_cis)  # RotaryEmbedding
    xq_ = view_as_complex(reshape(op.to(xq, torch.float32), xq.shape[:-1] + (-1, 2)))
    xk_ = view_as_complex(reshape(op.to(xk, torch.float32), xk.shape[:-1] + (-1, 2)))
    freqs = view(freqs_cis, (1, xq_.shape[1], 1, xq_.shape[-1]))
    xq_out = _flatten3(view_as_real(op.mul_complex(xq_, freqs)))
    xk_out = _flatten3(view_as_real(op.mul_complex(xk_, freqs)))
    return op.to(xq_out, xq.dtype), op.to(xk_out, xk.dtype)


def _flatten3(x: T) -> T:
    return reshape(x, x.shape[:3] + (math.prod(x.shape[3:]),))


def repeat_kv(x: T, n_rep: int) -> T:
    if n_rep == 1:
        return x
    bsz, seqlen, n_kv_heads, head_dim = x.shape
    return reshape(expand(unsqueeze(x, 3), (bsz, seqlen, n_kv_heads, n_rep, head_dim)),
                   (bsz, seqlen, n_kv_heads * n_rep, head_dim))


def attention_core(p: Program, xq: T, keys: T, values: T, mask: Optional[T]) -> T:
    module_inputs(xq, keys, values, mask)  # AttentionCore
    bsz, seqlen, n_heads, head_dim = xq.shape
    keys = repeat_kv(keys, p.shapes.n_rep)
    values = repeat_kv(values, p.shapes.n_rep)
    q = transpose(xq, 1, 2)
    k = transpose(keys, 1, 2)
    v = transpose(values, 1, 2)
    if p.attn_kernel == "math":
        scores = op.div_scalar(op.matmul(q, transpose(k, 2, 3)))
        if mask is not None:
            scores = op.add(scores, mask)
        scores = op.to(op.softmax(op.to(scores, torch.float32)), q.dtype)
        output = op.matmul(scores, v)
    else:
        causal = mask is None and seqlen > 1
        output = sdpa(p, q, k, v, mask, causal)
    return reshape(transpose(output, 1, 2), (bsz, seqlen, n_heads * head_dim))


def sdpa(p: Program, q: T, k: T, v: T, mask: Optional[T], causal: bool) -> T:
    if p.sdpa_backend == "flash":
        return op.sdpa_flash_cpu(q, k, v, mask)
    if p.sdpa_backend == "math":
        return op.sdpa_math(q, k, v, mask, causal)
    raise ValueError(f"no memory model of the {p.sdpa_backend!r} scaled_dot_product_attention kernel")


def attention(p: Program, w: dict, x: T, start_pos: int, freqs_cis: T, mask: Optional[T], cache) -> T:
    s = p.shapes
    bsz, seqlen, _ = x.shape
    xq = view(column_linear(p, x, w["wq"]), (bsz, seqlen, s.n_heads, s.head_dim))
    xk = view(column_linear(p, x, w["wk"]), (bsz, seqlen, s.n_kv_heads, s.head_dim))
    xv = view(column_linear(p, x, w["wv"]), (bsz, seqlen, s.n_kv_heads, s.head_dim))
    xq, xk = apply_rotary_emb(xq, xk, freqs_cis)
    if cache is not None:
        keys, values = cache_update(cache, start_pos, xk, xv)
        keys, values = op.to(keys, xq.dtype), op.to(values, xq.dtype)
    else:
        keys, values = xk, xv
    return row_linear(p, attention_core(p, xq, keys, values, mask), w["wo"])


def cache_update(cache, start_pos: int, xk: T, xv: T) -> tuple:
    # KVCache.update: cache[:bsz, start:end] = x.to(cache dtype) (a copy into the buffer), then views of it
    cache_k, cache_v = cache
    bsz, seqlen = xk.shape[:2]
    k = op.to(xk, cache_k.dtype)
    del k
    v = op.to(xv, cache_v.dtype)
    del v
    end = start_pos + seqlen
    return _prefix(cache_k, bsz, end), _prefix(cache_v, bsz, end)


def _prefix(cache: T, bsz: int, end: int) -> T:
    return T(cache.st, (bsz, end) + cache.shape[2:], cache.stride, cache.dtype)


def feed_forward(p: Program, w: dict, x: T) -> T:
    # self.w2(self.act(self.w1(x), self.w3(x)))
    return row_linear(p, gated_silu(column_linear(p, x, w["w1"]), column_linear(p, x, w["w3"])), w["w2"])


def gated_silu(gate: T, up: T) -> T:
    module_inputs(gate, up)  # GatedSiLU
    return op.mul(op.silu(gate), up)


def transformer_block(p: Program, w: dict, x: T, start_pos: int, freqs_cis: T, mask: Optional[T], cache) -> T:
    h = op.add(x, attention(p, w, rms_norm(x, w["attention_norm"]), start_pos, freqs_cis, mask, cache))
    return op.add(h, feed_forward(p, w, rms_norm(h, w["ffn_norm"])))


# ---------------------------------------------------------------------------- the model
def llama_forward(sim: Sim, p: Program, W: Weights, tokens: T, out: Outcome) -> T:
    cd = p.compute_dtype
    start_pos = p.start_pos
    if p.token_check:  # guards.check_token_values: int(tokens.min()), int(tokens.max())
        for name in ("min", "max"):
            m = new(sim, (), torch.int64, name)
            del m
    bsz, seqlen = tokens.shape
    # Scopes are the modules' (forward hooks name them): what Llama.forward does between modules is "-".
    sim.scope = "tok_embeddings"
    h = embedding(p, W.tok_embeddings, tokens)
    sim.scope = "-"
    h = op.to(h, cd)
    freqs_cis = narrow(W.freqs_cis, 0, start_pos, seqlen)
    mask = None
    if seqlen > 1 and not (start_pos == 0 and p.attn_kernel == "sdpa"):  # sdpa's own is_causal: no mask tensor
        mask = new(sim, (seqlen, seqlen), cd, "full")
        mask = new(sim, (seqlen, seqlen), cd, "triu")
        zeros = new(sim, (seqlen, start_pos), cd, "zeros")
        mask = _hstack(zeros, mask)
        del zeros
    checkpointed = p.recompute and p.train
    for run, layer_id in enumerate(p.runs or range(p.n_runs)):
        sim.scope = f"layers.{run}"
        out.layer_starts[run] = sim.live
        sim.scope_peaks.pop(f"{sim.phase}:{sim.scope}", None)
        cache = W.caches[run] if W.caches else None
        if checkpointed:
            h = checkpoint(p, W.layers[layer_id], h, start_pos, freqs_cis, mask)
        else:
            h = transformer_block(p, W.layers[layer_id], h, start_pos, freqs_cis, mask, cache)
        out.layer_peaks[run] = sim.scope_peaks.get(f"{sim.phase}:{sim.scope}", sim.live)
        sim.scope = "-"
    sim.scope = "norm"
    h = rms_norm(h, W.norm)
    sim.scope = "-"
    if p.last_only:
        h = narrow(h, 1, seqlen - 1, 1)
    sim.scope = "output"
    logits = column_linear(p, h, W.output, gather=True)
    sim.scope = "-"
    return op.to(logits, torch.float32)


def embedding(p: Program, weight: T, tokens: T) -> T:
    # ParallelEmbedding.forward: local = super().forward(tokens); return gather_from_tensor_parallel(local)
    if p.tp == 1:
        return op.embedding(weight, tokens)
    local = op.embedding(weight, tokens)
    return gather_last_dim(p, local)


def _hstack(zeros: T, mask: T) -> T:
    return new(mask.sim, (mask.shape[0], zeros.shape[1] + mask.shape[1]), mask.dtype, "cat")


class CheckpointFrame:
    """``torch.utils.checkpoint.checkpoint(layer, h, ...)``, non-reentrant, early stop off (``_CheckpointFrame``):
    keeps the layer's tensor arguments and the CPU RNG state; inside the layer autograd saves holders, not
    tensors. The first backward node of the layer that unpacks one runs the whole layer forward again; each
    recomputed saved tensor lives until the node that saved it has run. The frame (and the layer input) is
    freed with the last of the layer's nodes that saved something."""

    def __init__(self, p: Program, w: dict, h: T, start_pos: int, freqs_cis: T, mask: Optional[T]) -> None:
        self.p, self.w, self.start_pos = p, w, start_pos
        self.args = (h, freqs_cis, mask)
        self.recomputed = False
        self.nodes: list = []
        self.rng_state = _rng_state(h.sim, p)  # torch.get_rng_state(), kept for the recomputation


    def forward(self) -> T:
        sim = self.args[0].sim
        sim.frame, sim.node_log = self, self.nodes
        try:
            return transformer_block(self.p, self.w, *self._call_args())
        finally:
            sim.frame, sim.node_log = None, None

    def _call_args(self) -> tuple:
        h, freqs_cis, mask = self.args
        return h, self.start_pos, freqs_cis, mask, None

    def recompute(self) -> None:
        sim = self.args[0].sim
        again: list = []
        was_grad, sim.grad_enabled = sim.grad_enabled, True
        sim.node_log = again
        forked = _rng_state(sim, self.p)  # torch.random.fork_rng keeps the current state meanwhile
        try:
            out = transformer_block(self.p, self.w, *self._call_args())
        finally:
            sim.node_log, sim.grad_enabled = None, was_grad
        del forked
        for first, second in zip(self.nodes, again):
            if first.saved:
                first.saved = second.saved + (self,)
            second.saved = ()
        del out, again
        self.recomputed = True


def _rng_state(sim: Sim, p: Program) -> Optional[Storage]:
    """The CPU generator's state: a tensor on the CPU made without a dispatched op, so a dispatch mode never sees
    it; device memory only for a model on the CPU."""
    if sim.dispatch_mode or not p.host_is_device:
        return None
    return Storage(sim, CPU_RNG_STATE_BYTES, "get_rng_state")


def checkpoint(p: Program, w: dict, h: T, start_pos: int, freqs_cis: T, mask: Optional[T]) -> T:
    return CheckpointFrame(p, w, h, start_pos, freqs_cis, mask).forward()


# ---------------------------------------------------------------------------- one request
def run(p: Program, *, dispatch_mode: bool = False, module_hooks: bool = False, record: bool = False) -> Outcome:
    """Simulate the request ``p`` and return its categories and peak (see :class:`Sim` for the flags)."""
    sim = Sim(dispatch_mode=dispatch_mode, module_hooks=module_hooks, record=record, round_to=p.round_to)
    out = Outcome(sim=sim)
    W = Weights(sim, p)
    params = W.parameters()
    out.weights = sum(t.nbytes for t in params)
    out.rope_table = W.freqs_cis.nbytes
    out.kv_cache = sum(t.nbytes for t in W.buffers()) - out.rope_table
    tokens = external(sim, (p.batch, p.seqlen), torch.int64, "tokens")
    out.inputs = tokens.nbytes
    out.start = sim.live
    sim.peak, sim.where = sim.live, None
    sim.grad_enabled = p.train
    sim.phase = "forward"
    logits = llama_forward(sim, p, W, tokens, out)
    out.logits = logits.nbytes
    if p.train:
        sim.phase = "loss"
        sim.scope = "loss"
        loss = op.cross_entropy(logits, tokens) if p.loss == "cross-entropy" else op.total_sum(logits)
        sim.scope = "-"
        out.saved = saved_by_scope(loss, exclude=[t.st for t in params + W.buffers() + [tokens]])
        out.loss = out.saved.pop("loss", 0)
        del logits
        sim.phase = "backward"
        backward(loss)
        sim.scope = "-"
        del loss
        out.gradients = sum(t.grad.nbytes for t in params if t.grad is not None)
        if p.optimizer != "none":
            sim.phase = "optimizer"
            out.optimizer = optimizer_step(sim, p, params)
    else:
        del logits
    out.peak, out.where = sim.peak, sim.where
    return out


def saved_by_scope(root: T, exclude: list) -> dict:
    """Bytes of the distinct storages the graph behind ``root`` holds, attributed to the scope of the first
    node (in forward order) that saved each."""
    nodes, stack, seen = [], [root.grad_fn], {id(root.grad_fn)}
    while stack:
        node = stack.pop()
        nodes.append(node)
        for edge in node.edges:
            if edge is not None and id(edge[0]) not in seen:
                seen.add(id(edge[0]))
                stack.append(edge[0])
    taken = {id(st) for st in exclude}
    out: dict = {}
    for node in sorted(nodes, key=lambda n: n.seq):
        for s in node.saved or ():
            for t in ([a for a in s.args if a is not None] if isinstance(s, CheckpointFrame) else [s]):
                if id(t.st) in taken or t.st.device != "model":
                    continue
                taken.add(id(t.st))
                out[node.scope] = out.get(node.scope, 0) + t.st.nbytes
    return out


def optimizer_step(sim: Sim, p: Program, params: list) -> int:
    """One step of ``torch.optim.AdamW`` (or SGD) on CPU or meta: the single-tensor implementation (the
    foreach kernels serve CUDA). Returns the bytes of the optimizer state it creates.

    AdamW: ``_init_group`` makes each parameter's state, in parameter order: ``step``, a 0-dim fp32 tensor on
    the CPU (host memory unless the model is on the CPU), and ``exp_avg``, ``exp_avg_sq`` shaped and typed as
    the parameter. Then per parameter ``denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)``: the
    square root and the quotient are allocated while the previous parameter's ``denom`` is still bound.
    SGD without momentum or weight decay updates in place and keeps nothing."""
    if p.optimizer == "sgd":
        return 0
    if p.optimizer != "adamw":
        raise ValueError(f"unknown optimizer {p.optimizer!r}")
    state = []
    for param in params:
        if param.grad is None:
            continue
        step = new(sim, (), torch.float32, "lift_fresh") if p.host_is_device else None
        state.append((step, new(sim, param.shape, param.dtype, "zeros_like"),
                      new(sim, param.shape, param.dtype, "zeros_like")))
    if p.optimizer_impl == "foreach":
        # _multi_tensor_adam: exp_avg_sq_sqrt = torch._foreach_sqrt(exp_avg_sqs), one tensor per parameter, all
        # alive until the update (div_, add_ and addcdiv_ are in place).
        roots = [new(sim, param.shape, param.dtype, "_foreach_sqrt") for param in params if param.grad is not None]
        del roots
        return sum(t.nbytes for entry in state for t in entry if t is not None) + _host_steps(p, params)
    denom = None
    for param in params:
        if param.grad is None:
            continue
        root = new(sim, param.shape, param.dtype, "sqrt")
        quotient = new(sim, param.shape, param.dtype, "div.Tensor")
        del root
        denom = quotient
        del quotient
    del denom
    return sum(t.nbytes for entry in state for t in entry if t is not None) + _host_steps(p, params)


def _host_steps(p: Program, params: list) -> int:
    """AdamW's ``step`` counters live on the CPU: outside device memory unless the model is on the CPU, but
    part of the optimizer's state."""
    return 0 if p.host_is_device else 4 * sum(1 for t in params if t.grad is not None)
