"""The ATen ops the Llama program runs, for :mod:`llama_ref.memory_autograd`: what each allocates, what it saves
for backward (only for inputs that require grad, as the autograd codegen does), and its backward formula from
``tools/autograd/derivatives.yaml`` with the allocations it makes. The generated ``apply`` computes the gradient of
the *last* differentiable input first; C++ temporaries of a formula live until the end of its expression.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from .memory_autograd import (Sim, T, contiguous, dense, expand, like, new, permute, record, reshape, t, transpose,
                              unsafe_view, view)

Shape = tuple[int, ...]


def _promote(a: T, b: T) -> torch.dtype:
    return torch.promote_types(a.dtype, b.dtype)


def _broadcast(a: Shape, b: Shape) -> Shape:
    """NumPy broadcasting of two shapes, in plain Python (``torch.broadcast_shapes`` imports sympy, half a
    second of the first guarded request)."""
    n = max(len(a), len(b))
    a, b = (1,) * (n - len(a)) + tuple(a), (1,) * (n - len(b)) + tuple(b)
    out = []
    for x, y in zip(a, b):
        if x != y and 1 not in (x, y):
            raise ValueError(f"shapes {a} and {b} do not broadcast")
        out.append(y if x == 1 else x)
    return tuple(out)


# ---------------------------------------------------------------------------- elementwise
def to(x: T, dtype: torch.dtype) -> T:
    """``x.to(dtype)`` / ``.float()`` / ``.type_as``: the tensor itself in its own dtype, else a copy."""
    if x.dtype == dtype:
        return x
    out = like(x, "_to_copy", dtype)
    record("ToCopyBackward0", [x], [out], lambda g, d=x.dtype: [like(g[0], "_to_copy", d)])
    return out


def pow2(x: T) -> T:
    out = new(x.sim, x.shape, x.dtype, "pow.Tensor_Scalar")

    def backward(g, shape=x.shape, dtype=x.dtype):
        # grad * (2 * self.pow(1)): the closure keeps shapes only, never a tensor (that would hold its storage)
        p = new(g[0].sim, shape, dtype, "pow.Tensor_Scalar")
        m = new(g[0].sim, shape, dtype, "mul.Scalar")
        r = new(g[0].sim, shape, dtype, "mul.Tensor")
        del p, m
        return [r]
    record("PowBackward0", [x], [out], backward, saved=[x])
    return out


def mean_last(x: T) -> T:
    out = new(x.sim, x.shape[:-1] + (1,), x.dtype, "mean.dim")
    record("MeanBackward1", [x], [out], lambda g, s=x.shape: [new(g[0].sim, s, g[0].dtype, "div.Scalar")])
    return out


def add_scalar(x: T) -> T:
    out = new(x.sim, x.shape, x.dtype, "add.Tensor")
    record("AddBackward1", [x], [out], lambda g: [g[0]])
    return out


def rsqrt(x: T) -> T:
    out = new(x.sim, x.shape, x.dtype, "rsqrt")

    def backward(g):
        # -0.5 * grad * result.pow(3)
        p = like(g[0], "pow.Tensor_Scalar")
        m = like(g[0], "mul.Scalar")
        r = like(g[0], "mul.Tensor")
        del p, m
        return [r]
    record("RsqrtBackward0", [x], [out], backward, saved=[out])
    return out


def mul(a: T, b: T) -> T:
    out = new(a.sim, _broadcast(a.shape, b.shape), _promote(a, b), "mul.Tensor")
    saved = ([b] if a.requires_grad else []) + ([a] if b.requires_grad else [])

    def backward(g, a_grad=a.requires_grad, b_grad=b.requires_grad):
        gb = like(g[0], "mul.Tensor") if b_grad else None  # grad * self
        ga = like(g[0], "mul.Tensor") if a_grad else None  # grad * other
        return [ga, gb]
    record("MulBackward0", [a, b], [out], backward, saved=saved)
    return out


def mul_complex(a: T, freqs: T) -> T:
    """``a * freqs`` of complex tensors, ``freqs`` a constant (the RoPE table): its gradient is
    ``grad * freqs.conj()``, and multiplying by a conjugate view first materializes it (``resolve_conj``)."""
    out = new(a.sim, _broadcast(a.shape, freqs.shape), a.dtype, "mul.Tensor")

    def backward(g, f_shape=freqs.shape, f_dtype=freqs.dtype):
        conj = new(g[0].sim, f_shape, f_dtype, "clone")
        r = new(g[0].sim, g[0].shape, g[0].dtype, "mul.Tensor")
        del conj
        return [r, None]
    record("MulBackward0", [a, freqs], [out], backward, saved=[freqs])
    return out


def div_scalar(x: T) -> T:
    """``x / python_float``: the divisor is a wrapped number, not saved."""
    out = new(x.sim, x.shape, x.dtype, "div.Tensor")
    record("DivBackward0", [x], [out], lambda g: [like(g[0], "div.Tensor")])
    return out


def add(a: T, b: T) -> T:
    out = new(a.sim, _broadcast(a.shape, b.shape), _promote(a, b), "add.Tensor")
    record("AddBackward0", [a, b], [out], lambda g: [g[0], g[0]])
    return out


def silu(x: T) -> T:
    out = new(x.sim, x.shape, x.dtype, "silu")
    record("SiluBackward0", [x], [out], lambda g: [like(g[0], "silu_backward")], saved=[x])
    return out


def softmax(x: T, name: str = "_softmax") -> T:
    out = new(x.sim, x.shape, x.dtype, name)
    record("SoftmaxBackward0", [x], [out], lambda g: [like(g[0], "_softmax_backward_data")], saved=[out])
    return out


# ---------------------------------------------------------------------------- products
def mm(a: T, b: T) -> T:
    out = new(a.sim, (a.shape[0], b.shape[1]), _promote(a, b), "mm")
    saved = ([b] if a.requires_grad else []) + ([a] if b.requires_grad else [])

    def backward(g, a_shape=a.shape, a_stride=a.stride, b_shape=b.shape, b_stride=b.stride,
                 a_grad=a.requires_grad, b_grad=b.requires_grad):
        grad = g[0]
        gb = _mm_grad(grad.sim, b_shape, b_stride, grad.dtype) if b_grad else None
        ga = _mm_grad(grad.sim, a_shape, a_stride, grad.dtype) if a_grad else None
        return [ga, gb]
    record("MmBackward0", [a, b], [out], backward, saved=saved)
    return out


def _mm_grad(sim: Sim, shape: Shape, stride: Shape, dtype: torch.dtype) -> T:
    """``mm_mat1_backward``/``mm_mat2_backward``: the gradient of a column-major input is computed transposed
    and returned column-major, of anything else row-major."""
    if stride[0] == 1 and stride[1] == shape[0] and shape[0] * shape[1] > 0:
        return t(new(sim, shape[::-1], dtype, "mm"))
    return new(sim, shape, dtype, "mm")


def bmm(a: T, b: T) -> T:
    out = new(a.sim, (a.shape[0], a.shape[1], b.shape[2]), _promote(a, b), "bmm")
    saved = ([b] if a.requires_grad else []) + ([a] if b.requires_grad else [])

    def backward(g, a_shape=a.shape, b_shape=b.shape, a_grad=a.requires_grad, b_grad=b.requires_grad):
        grad = g[0]
        gb = new(grad.sim, b_shape, grad.dtype, "bmm") if b_grad else None  # self^T @ grad
        ga = new(grad.sim, a_shape, grad.dtype, "bmm") if a_grad else None  # grad @ mat2^T
        return [ga, gb]
    record("BmmBackward0", [a, b], [out], backward, saved=saved)
    return out


def _should_fold(t1: T, t2: T) -> bool:
    """``should_fold`` of ATen's matmul (torch/_decomp/decompositions.py mirrors it) for ``t1`` of 3+ dims and
    a matrix ``t2``: fold the batch into rows when that needs no copy, or when ``t2`` requires grad."""
    if t2.requires_grad and t2.sim.grad_enabled:
        return True
    expected = [1]
    for n in reversed(t1.shape[1:]):
        expected.append(n * expected[-1])
    return all(n == 1 or s == e for s, e, n in zip(t1.stride, reversed(expected), t1.shape))


def matmul(a: T, b: T) -> T:
    """``torch.matmul`` for the model's cases: (..., n, m) @ (m, p) and (B..., n, m) @ (B..., m, p)."""
    if len(b.shape) == 2 and len(a.shape) >= 3 and _should_fold(a, b):
        out_shape = a.shape[:-1] + (b.shape[1],)
        folded = reshape(a, (math.prod(a.shape[:-1]), a.shape[-1]))
        return unsafe_view(mm(folded, b), out_shape)
    batch = _broadcast(a.shape[:-2], b.shape[:-2])
    n, m, p = a.shape[-2], a.shape[-1], b.shape[-1]
    nb = math.prod(batch)
    a3 = reshape(expand(a, batch + (n, m)), (nb, n, m))
    b3 = reshape(expand(b, batch + (m, p)), (nb, m, p))
    return view(bmm(a3, b3), batch + (n, p))


def linear(x: T, w: T) -> T:
    """``F.linear(x, w)`` without bias: ``matmul(x, w.t())``."""
    return matmul(x, t(w))


def embedding(weight: T, tokens: T) -> T:
    out = new(weight.sim, tokens.shape + (weight.shape[1],), weight.dtype, "embedding")

    def backward(g, shape=weight.shape):
        return [new(g[0].sim, shape, g[0].dtype, "embedding_dense_backward"), None]
    record("EmbeddingBackward0", [weight, tokens], [out], backward, saved=[tokens])
    return out


# ---------------------------------------------------------------------------- attention kernels
def sdpa_flash_cpu(q: T, k: T, v: T, mask: Optional[T]) -> T:
    """``_scaled_dot_product_flash_attention_for_cpu``: the output in (bsz, seqlen, heads, head_dim) memory
    order and the fp32 logsumexp (bsz, heads, seqlen), both saved with q, k, v (and the mask); backward: one
    gradient per input, laid out as that input (``zeros_like``)."""
    sim = q.sim
    bsz, heads, seqlen, head_dim = q.shape
    out = new(sim, q.shape, q.dtype, "_scaled_dot_product_flash_attention_for_cpu",
              stride=(seqlen * heads * head_dim, head_dim, heads * head_dim, 1))
    lse = new(sim, (bsz, heads, seqlen), torch.float32, "_scaled_dot_product_flash_attention_for_cpu")
    saved = [q, k, v, out, lse] + ([mask] if mask is not None else [])

    def backward(g, q=(q.shape, q.stride), k=(k.shape, k.stride), v=(v.shape, v.stride)):
        grads = [new(sim, s, g[0].dtype, "_scaled_dot_product_flash_attention_for_cpu_backward",
                     stride=st if dense(s, st) else None) for s, st in (q, k, v)]
        return grads + [None]
    record("ScaledDotProductFlashAttentionForCpuBackward0", [q, k, v, mask], [out], backward, saved=saved)
    del lse
    return out


def mul_scalar(x: T) -> T:
    """``x * python_number``: laid out as ``x``; its gradient is ``grad * number``."""
    out = like(x, "mul.Scalar")
    record("MulBackward1", [x], [out], lambda g: [like(g[0], "mul.Scalar")])
    return out


def sdpa_math(q: T, k: T, v: T, mask: Optional[T], causal: bool) -> T:
    """``_scaled_dot_product_attention_math``, where no fused kernel serves the device (the meta device): reduced
    precision inputs are upcast to fp32; q and k^T are each scaled by sqrt(scale); a causal mask is built as
    ``where(ones(L, S, bool).tril(), 0, -inf)`` in fp32; then matmul, add, ``_safe_softmax``, matmul; the
    attention weights and the output are cast back."""
    sim = q.sim
    dtype = q.dtype
    reduced = dtype in (torch.bfloat16, torch.float16)
    # The upcast copies are locals of their own, alive to the end.
    q_acc, k, v = (to(q, torch.float32), to(k, torch.float32), to(v, torch.float32)) if reduced else (q, k, v)
    q = mul_scalar(q_acc)
    if causal:
        L, S = q.shape[-2], k.shape[-2]
        ones = new(sim, (L, S), torch.bool, "ones")
        tril = new(sim, (L, S), torch.bool, "tril")
        del ones
        zero, minus_inf = new(sim, (), torch.float32, "scalar_tensor"), new(sim, (), torch.float32, "scalar_tensor")
        mask = new(sim, (L, S), q.dtype, "where.self")
        del zero, minus_inf, tril
    attn = matmul(q, mul_scalar(transpose(k, -2, -1)))
    if mask is not None:
        attn = add(attn, mask)
    attn = softmax(attn, "_safe_softmax")
    weights = to(attn, dtype) if reduced else None
    out = matmul(attn, v)
    out = to(out, dtype)
    del weights
    return out


# ---------------------------------------------------------------------------- losses
def log_softmax(x: T) -> T:
    out = new(x.sim, x.shape, x.dtype, "_log_softmax")
    record("LogSoftmaxBackward0", [x], [out], lambda g: [like(g[0], "_log_softmax_backward_data")], saved=[out])
    return out


def nll_loss(x: T, target: T) -> T:
    """Mean NLL: the loss and ``total_weight`` (both 0-dim fp32); saved: the log-probabilities, the targets and
    ``total_weight``."""
    sim = x.sim
    out = new(sim, (), x.dtype, "nll_loss_forward")
    total_weight = new(sim, (), x.dtype, "nll_loss_forward")
    record("NllLossBackward0", [x, target], [out], lambda g, s=x.shape: [new(sim, s, g[0].dtype, "nll_loss_backward"),
                                                                        None],
           saved=[x, target, total_weight])
    del total_weight
    return out


def total_sum(x: T) -> T:
    out = new(x.sim, (), x.dtype, "sum")
    record("SumBackward0", [x], [out], lambda g, s=x.shape: [expand(g[0], s)])
    return out


def cross_entropy(logits: T, tokens: T) -> T:
    vocab = logits.shape[-1]
    return nll_loss(log_softmax(reshape(logits, (-1, vocab))), reshape(tokens, (-1,)))


__all__ = ["add", "add_scalar", "bmm", "contiguous", "cross_entropy", "div_scalar", "embedding", "linear",
           "log_softmax", "matmul", "mean_last", "mm", "mul", "mul_complex", "nll_loss", "pow2", "rsqrt",
           "permute", "record", "sdpa_flash_cpu", "sdpa_math", "silu", "softmax", "to", "total_sum", "transpose", "view"]
