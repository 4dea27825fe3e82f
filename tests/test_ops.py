"""Op-level registry: single ops with hand-derived counts, at dispatch level (what FlopCounterMode
sees) and jit level (what fvcore sees); the registry's rules; the unit conversions."""

from __future__ import annotations

import logging
import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map
from torch.utils.flop_counter import FlopCounterMode

from counters import table as T
from counters.fvcore_counter import _import_fvcore, _jit_call, _jit_kind, _StartPosWrapper
from counters.ops import (
    FREE_OPS,
    INTEGER_BOOKKEEPING,
    REGISTRY,
    SDPA_BACKEND_OPS,
    DuplicateRegistrationError,
    OpCall,
    OpRegistry,
    TensorMeta,
    UncountedOpError,
    canonical_op_name,
    elementwise,
    fvcore_to_macs,
    raise_or_warn_unknown,
    torch_flops_to_macs,
    torch_sdpa_macs,
)
from counters.primitives import ZERO, Count
from llama_ref import PRESETS, AttentionCore, GatedSiLU, Llama, RMSNorm, RotaryEmbedding, precompute_freqs_cis


# Thousands of tiny ops: one intra-op thread (see conftest.single_thread).
pytestmark = pytest.mark.usefixtures("single_thread")


# ---------------------------------------------------------------- helpers
class _Capture(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        self.calls.append((func, args, kwargs, out))
        return out


def _meta(x):
    return TensorMeta.of(x) if isinstance(x, torch.Tensor) else x


def dispatch_ops(fn, *args):
    """[(op name, OpCount)] for every dispatch-level op ``fn(*args)`` runs."""
    with torch.no_grad(), _Capture() as cap:
        fn(*args)
    result = []
    for func, a, k, out in cap.calls:
        name = canonical_op_name(func)
        outs = tuple(_meta(o) for o in out) if isinstance(out, (tuple, list)) else (_meta(out),)
        call = OpCall.from_schema(name, func._schema, tree_map(_meta, tuple(a)), tree_map(_meta, dict(k)), outs)
        result.append((name, REGISTRY.classify(call)))
    return result


class _Fn(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, *args):
        return self.fn(*args)


def jit_ops(fn, *args):
    """[(op name, OpCount)] for every node of the jit trace of ``fn(*args)`` (what fvcore walks)."""
    module = fn if isinstance(fn, nn.Module) else _Fn(fn)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        graph, _ = torch.jit._get_trace_graph(module, args)
    result = []
    for node in graph.nodes():
        name = canonical_op_name(_jit_kind(node))
        result.append((name, REGISTRY.classify(_jit_call(node, name))))
    return result


def total(ops) -> Count:
    unknown = [name for name, oc in ops if oc.status == "unknown"]
    assert not unknown, f"unknown ops: {unknown}"
    t = ZERO
    for _, oc in ops:
        t = t + oc.count
    return t


def by_op(ops) -> dict:
    out = {}
    for name, oc in ops:
        if oc.count != ZERO:
            out[name] = out.get(name, ZERO) + oc.count
    return out


BOTH = pytest.mark.parametrize("level", [dispatch_ops, jit_ops], ids=["dispatch", "jit"])


# ---------------------------------------------------------------- matrix products
@BOTH
def test_linear_3d(level):
    x, w = torch.randn(2, 3, 4), torch.randn(5, 4)
    # (2*3) rows x 4 in x 5 out = 120 MACs (dispatch: t + view + mm; jit: aten::linear)
    assert total(level(F.linear, x, w)) == Count(macs=120)


@BOTH
def test_linear_with_bias_is_addmm_plus_bias_adds(level):
    x, w, b = torch.randn(3, 4), torch.randn(5, 4), torch.randn(5)
    # 3*4*5 = 60 MACs; the bias add is one FLOP per output element: 3*5 = 15
    assert total(level(F.linear, x, w, b)) == Count(macs=60, nonmatmul_flops=15)


@BOTH
def test_batched_matmul(level):
    q, k = torch.randn(1, 2, 3, 4), torch.randn(1, 2, 5, 4)
    # batch 1*2, (3 x 4) @ (4 x 5): 2 * 3*4*5 = 120 MACs (dispatch: bmm; jit: aten::matmul)
    assert total(level(lambda a, b: torch.matmul(a, b.transpose(2, 3)), q, k)) == Count(macs=120)


def test_mm_and_bmm_direct():
    # mm: 6x7 @ 7x2 = 6*7*2 = 84 MACs; bmm: 3 x (6x7 @ 7x2) = 252 MACs
    assert total(dispatch_ops(torch.mm, torch.randn(6, 7), torch.randn(7, 2))) == Count(macs=84)
    assert total(dispatch_ops(torch.bmm, torch.randn(3, 6, 7), torch.randn(3, 7, 2))) == Count(macs=252)


# ---------------------------------------------------------------- element-wise, reductions, softmax
@BOTH
def test_rmsnorm_ops_sum_to_module_formula(level):
    norm = RMSNorm(8)
    x = torch.randn(2, 3, 8)
    ops = level(norm, x)
    # rows = 2*3 = 6, dim 8: pow 48 + mean 48 + add eps 6 + rsqrt 6 + mul 48 + mul weight 48 = 204 = 6*(4*8+2)
    assert total(ops) == Count(nonmatmul_flops=204) == T.RMSNORM.count(T.Norm(6, 8))
    assert by_op(ops) == {"pow": Count(0, 48), "mean": Count(0, 48), "add": Count(0, 6), "rsqrt": Count(0, 6),
                          "mul": Count(0, 96)}


@BOTH
def test_rope_complex_mul_sums_to_module_formula(level):
    rope = RotaryEmbedding()
    xq, xk = torch.randn(1, 3, 4, 8), torch.randn(1, 3, 2, 8)
    freqs = precompute_freqs_cis(8, 3)
    ops = level(rope, xq, xk, freqs)
    # complex elements: q 1*3*4*(8/2) = 48, k 1*3*2*4 = 24; 6 FLOPs each: 288 + 144 = 432
    assert total(ops) == Count(nonmatmul_flops=432) == T.ROPE.count(T.Rope(1, 3, 4, 2, 8))
    assert by_op(ops) == {"mul": Count(0, 432)}


def test_complex_mul_is_six_real_mul_is_one():
    a, b = torch.randn(3, 5), torch.randn(3, 5)
    # 15 real elements x 1
    assert total(dispatch_ops(torch.mul, a, b)) == Count(nonmatmul_flops=15)
    # 15 complex elements x COMPLEX_MUL_FLOPS (6) = 90
    assert total(dispatch_ops(torch.mul, a.to(torch.complex64), b.to(torch.complex64))) == Count(nonmatmul_flops=90)


def test_complex_division_is_unknown_not_zero():
    a = torch.randn(3, 5, dtype=torch.complex64)
    ops = dispatch_ops(torch.div, a, a)
    assert [(oc.status, oc.reason) for _, oc in ops] == [("unknown", "div on complex tensors has no formula")]


@BOTH
def test_broadcast_add_counts_output_elements(level):
    scores, mask = torch.randn(2, 4, 3, 5), torch.randn(3, 5)
    # output 2*4*3*5 = 120 elements, one add each
    assert total(level(torch.add, scores, mask)) == Count(nonmatmul_flops=120)


@BOTH
def test_scale_div(level):
    # 2*3*5 = 30 elements, one divide each
    assert total(level(lambda s: s / math.sqrt(16), torch.randn(2, 3, 5))) == Count(nonmatmul_flops=30)


@BOTH
def test_softmax(level):
    # 2*3*5 = 30 elements x SOFTMAX_FLOPS (5) = 150
    assert total(level(lambda s: F.softmax(s, dim=-1), torch.randn(2, 3, 5))) == Count(nonmatmul_flops=150)


@BOTH
def test_gated_silu_sums_to_module_formula(level):
    gate, up = torch.randn(4, 7), torch.randn(4, 7)
    ops = level(GatedSiLU(), gate, up)
    # 28 elements: silu 4 each (112) + gate mul 1 each (28) = 140
    assert total(ops) == Count(nonmatmul_flops=140) == T.GATED_SILU.count(T.Elems(4, 7))
    assert by_op(ops) == {"silu": Count(0, 112), "mul": Count(0, 28)}


def test_mean_and_sum_reductions():
    x = torch.randn(4, 6)
    # mean over 6: per row 5 adds + 1 divide = 6; 4 rows -> 24 = numel(input)
    assert total(dispatch_ops(lambda t: t.mean(-1), x)) == Count(nonmatmul_flops=24)
    # sum over 6: 5 adds per row -> 20 = numel(in) - numel(out)
    assert total(dispatch_ops(lambda t: t.sum(-1), x)) == Count(nonmatmul_flops=20)


def test_max_min_reduction_and_elementwise():
    x, y = torch.randn(4, 6), torch.randn(4, 6)
    # reduction over 6: 5 comparisons per row, 4 rows -> 20; full reduction: 24 - 1 = 23
    assert total(dispatch_ops(lambda t: t.max(-1), x)) == Count(nonmatmul_flops=20)
    assert total(dispatch_ops(torch.max, x)) == Count(nonmatmul_flops=23)
    # element-wise max of two tensors: one comparison per element -> 24 (dispatch: maximum; jit: max.other)
    assert total(dispatch_ops(torch.max, x, y)) == Count(nonmatmul_flops=24)
    assert total(jit_ops(torch.max, x, y)) == Count(nonmatmul_flops=24)


def test_integer_bookkeeping_is_free():
    tokens = torch.tensor([[3, 1, 4], [1, 5, 9]])
    # Token-id range check (Llama._check_inputs): integer min/max, read back to Python.
    ops = dispatch_ops(lambda t: (int(t.min()), int(t.max())), tokens)
    assert [(n, oc.status, oc.reason) for n, oc in ops] == [
        ("min", "free", INTEGER_BOOKKEEPING), ("_local_scalar_dense", "free", FREE_OPS["_local_scalar_dense"]),
        ("max", "free", INTEGER_BOOKKEEPING), ("_local_scalar_dense", "free", FREE_OPS["_local_scalar_dense"])]
    # jit records traced size arithmetic as integer 0-dim tensor ops: aten::mul / aten::add on Long.
    ops = jit_ops(lambda x: x.reshape((x.shape[0] + 1) * x.shape[1] - 3, -1), torch.randn(2, 3, 4))
    assert {n for n, oc in ops if oc.reason == INTEGER_BOOKKEEPING} == {"add", "mul", "sub"}
    assert all(oc.status == "free" for _, oc in ops) and total(ops) == ZERO
    # ... but a float operand makes it counted: 2 elements
    assert total(dispatch_ops(torch.add, tokens[0, :2], torch.randn(2))) == Count(nonmatmul_flops=2)


# ---------------------------------------------------------------- attention: sdpa == math == formula
def _attention_inputs(n_heads=4, n_kv_heads=2, bsz=2, seqlen=3, cached=4, head_dim=8, masked=True):
    kvlen = cached + seqlen
    xq = torch.randn(bsz, seqlen, n_heads, head_dim)
    k = torch.randn(bsz, kvlen, n_kv_heads, head_dim)
    v = torch.randn(bsz, kvlen, n_kv_heads, head_dim)
    mask = None
    if masked:
        mask = torch.hstack([torch.zeros(seqlen, cached), torch.full((seqlen, seqlen), float("-inf")).triu(1)])
    return xq, k, v, mask


@BOTH
@pytest.mark.parametrize("case", ["causal-prefill", "cached-prefill", "decode"])
def test_attention_core_kernels_agree_with_formula(level, case):
    bsz, n_heads, n_kv, head_dim = 2, 4, 2, 8
    seqlen, cached = {"causal-prefill": (5, 0), "cached-prefill": (3, 4), "decode": (1, 6)}[case]
    xq, k, v, mask = _attention_inputs(n_heads, n_kv, bsz, seqlen, cached, head_dim, masked=seqlen > 1)
    # scores = 2*4*S*L; MACs = 2*scores*8; FLOPs = scores * (scale 1 + mask 1 if S > 1 + softmax 5)
    scores = bsz * n_heads * seqlen * (cached + seqlen)
    expected = Count(macs=2 * scores * head_dim, nonmatmul_flops=scores * (1 + (seqlen > 1) + 5))
    assert expected == T.ATTENTION_CORE.count(T.Attn(bsz, seqlen, cached + seqlen, n_heads, n_kv, head_dim, seqlen > 1))
    counts = {attn_kernel: total(level(AttentionCore(n_heads // n_kv, attn_kernel), xq, k, v, mask))
              for attn_kernel in ("math", "sdpa")}
    assert counts == {"math": expected, "sdpa": expected}


def test_cpu_sdpa_is_one_fused_op():
    xq, k, v, mask = _attention_inputs(masked=True)
    ops = [(n, oc) for n, oc in dispatch_ops(AttentionCore(2, "sdpa"), xq, k, v, mask) if oc.count != ZERO]
    assert [n for n, _ in ops] == ["_scaled_dot_product_flash_attention_for_cpu"]


def test_sdpa_formula_mask_rules():
    q = TensorMeta((1, 2, 3, 8), torch.float32)
    kv = TensorMeta((1, 2, 7, 8), torch.float32)
    mask = TensorMeta((3, 7), torch.float32)
    f = REGISTRY.formulas["scaled_dot_product_attention"]
    call = lambda **kw: OpCall("scaled_dot_product_attention", {"query": q, "key": kv, "value": kv, **kw}, ())
    # scores = 1*2*3*7 = 42; MACs 2*42*8 = 672; FLOPs 42*(1+5) = 252, +42 with a mask or is_causal
    assert f(call()) == Count(672, 252)
    assert f(call(attn_mask=mask)) == Count(672, 294)
    assert f(call(is_causal=True)) == Count(672, 294)
    # the CUDA backends: flash has no mask argument, efficient/cuDNN call it attn_bias
    assert REGISTRY.formulas["_scaled_dot_product_efficient_attention"](
        OpCall("x", {"query": q, "key": kv, "value": kv, "attn_bias": mask}, ())) == Count(672, 294)
    assert REGISTRY.classify(call(dropout_p=0.1)).status == "unknown"  # dropout is not counted silently
    assert set(SDPA_BACKEND_OPS) <= set(REGISTRY.formulas)


# ---------------------------------------------------------------- the registry
def test_registry_rejects_duplicates():
    reg = OpRegistry()
    reg.register("foo", elementwise("mul"))
    with pytest.raises(DuplicateRegistrationError):
        reg.register("foo", elementwise("add"))
    with pytest.raises(DuplicateRegistrationError):
        reg.register_free("foo", "not free")
    reg.register_free("bar", "a view")
    with pytest.raises(DuplicateRegistrationError):
        reg.register(["baz", "bar"], elementwise("mul"))
    assert not reg.has_formula("baz")  # a rejected batch registers nothing
    with pytest.raises(ValueError):
        reg.register_free("qux", "")  # every free entry needs a reason
    # the global registry too
    with pytest.raises(DuplicateRegistrationError):
        REGISTRY.register("mul", elementwise("mul"))
    with pytest.raises(DuplicateRegistrationError):
        REGISTRY.register_free("view", "again")


# Ops that do arithmetic: none may ever be on the free list.
_COSTLY = {
    "add", "sub", "mul", "div", "pow", "rsqrt", "sqrt", "exp", "log", "neg", "silu", "gelu", "relu", "sigmoid", "tanh",
    "softmax", "_softmax", "_safe_softmax", "log_softmax", "mean", "sum", "max", "min", "amax", "amin", "var", "norm",
    "clamp", "where", "masked_fill", "cumsum", "mm", "bmm", "addmm", "baddbmm", "matmul", "linear", "einsum",
    "layer_norm", "native_layer_norm", "batch_norm", "group_norm", "convolution", "_convolution", "addcmul", "lerp",
    "scaled_dot_product_attention", *SDPA_BACKEND_OPS,
}


def test_free_list_has_no_costly_op():
    assert not set(FREE_OPS) & set(REGISTRY.formulas)
    assert not set(FREE_OPS) & _COSTLY
    torch_counted = {canonical_op_name(op) for op in FlopCounterMode(display=False).flop_registry
                     if isinstance(op, torch._ops.OpOverloadPacket)}
    assert not set(FREE_OPS) & torch_counted
    assert all(isinstance(r, str) and r.strip() for r in FREE_OPS.values())


# Dispatch-level op names -> the table's primitive names.
_PRIMITIVE = {"mm": "matmul", "bmm": "matmul", "_softmax": "softmax"}


def _primitive_calls(ops, complex_mul=False):
    out = []
    for name, oc in ops:
        if oc.count == ZERO:
            continue
        name = "complex_mul" if (complex_mul and name == "mul") else _PRIMITIVE.get(name, name)
        out.append((name, oc.count))
    return sorted(out, key=lambda x: (x[0], x[1].macs, x[1].nonmatmul_flops))


@pytest.mark.parametrize("kind, module, args, sizes", [
    (T.RMSNORM, RMSNorm(8), (torch.randn(2, 3, 8),), T.Norm(6, 8)),
    (T.LINEAR, __import__("llama_ref").Linear(8, 5), (torch.randn(2, 3, 8),), T.Mat(6, 8, 5)),
    (T.GATED_SILU, GatedSiLU(), (torch.randn(2, 3, 7), torch.randn(2, 3, 7)), T.Elems(6, 7)),
    (T.ROPE, RotaryEmbedding(), (torch.randn(2, 3, 4, 8), torch.randn(2, 3, 2, 8), precompute_freqs_cis(8, 3)),
     T.Rope(2, 3, 4, 2, 8)),
    (T.ATTENTION_CORE, AttentionCore(2, "math"), _attention_inputs(4, 2, 2, 3, 4, 8, True), T.Attn(2, 3, 7, 4, 2, 8, True)),
    (T.ATTENTION_CORE, AttentionCore(2, "math"), _attention_inputs(4, 2, 2, 1, 4, 8, False), T.Attn(2, 1, 5, 4, 2, 8, False)),
], ids=["rmsnorm", "linear", "gated_silu", "rope", "attention-masked", "attention-decode"])
def test_table_decompositions_are_the_ops_that_run(kind, module, args, sizes):
    """Each kind's op decomposition in the table is, op for op, what the module dispatches."""
    ran = _primitive_calls(dispatch_ops(module, *args), complex_mul=kind is T.ROPE)
    assert ran == sorted(((op.name, op.count) for op in kind.ops(sizes)),
                         key=lambda x: (x[0], x[1].macs, x[1].nonmatmul_flops))
    assert kind.read(module, args, {}, module(*args)) == sizes  # and the hooks read the same sizes


def test_torch_sdpa_formula_is_torch_own():
    q = TensorMeta((2, 4, 3, 8), torch.float32)
    kv = TensorMeta((2, 4, 7, 8), torch.float32)
    call = OpCall("_scaled_dot_product_flash_attention_for_cpu", {"query": q, "key": kv, "value": kv}, ())
    # torch.utils.flop_counter.sdpa_flop_count: 2 bmm of 2*(2*4)*3*8*7 = 2688 FLOPs each = 5376 FLOPs = 2688 MACs
    assert torch_sdpa_macs(call) == 2688 == REGISTRY.classify(call).count.macs
    bad = OpCall("x", {"query": TensorMeta((4, 3, 8), torch.float32), "key": kv, "value": kv}, ())
    with pytest.raises(Exception, match="4-d"):
        torch_sdpa_macs(bad)


def test_unknown_op_is_reported_never_zero(caplog):
    ops = dispatch_ops(torch.cumsum, torch.randn(3, 4), 1)
    assert [(n, oc.status) for n, oc in ops] == [("cumsum", "unknown")]
    ops = jit_ops(torch.sin, torch.randn(3))
    assert [(n, oc.status) for n, oc in ops] == [("sin", "unknown")]
    with pytest.raises(UncountedOpError, match=r"sin x2") as info:
        raise_or_warn_unknown("test", {"sin": 2}, True, logging.getLogger("t"))
    assert isinstance(info.value, RuntimeError) and info.value.unknown_ops == {"sin": 2}
    with caplog.at_level(logging.WARNING):
        raise_or_warn_unknown("test", {"sin": 2, "cumsum": 1}, False, logging.getLogger("t"))
    assert "cumsum x1, sin x2" in caplog.text


def test_canonical_names():
    assert canonical_op_name(torch.ops.aten.mm.default) == "mm"
    assert canonical_op_name(torch.ops.aten.mul) == "mul"
    assert canonical_op_name("aten::scaled_dot_product_attention") == "scaled_dot_product_attention"
    assert canonical_op_name("prim::Constant") == "prim::Constant"


# ---------------------------------------------------------------- conversions
def test_torch_flops_to_macs():
    # FlopCounterMode: mm of (6x7)@(7x2) = 2*6*7*2 = 168 FLOPs = 84 MACs
    with FlopCounterMode(display=False) as fcm:
        torch.mm(torch.randn(6, 7), torch.randn(7, 2))
    assert fcm.get_total_flops() == 168 and torch_flops_to_macs(fcm.get_total_flops()) == 84
    assert torch_flops_to_macs(np.int64(10)) == 5
    with pytest.raises(ValueError):
        torch_flops_to_macs(7)  # odd: not 2 per MAC
    with pytest.raises(TypeError):
        torch_flops_to_macs(10.0)  # no float division, no float inputs
    with pytest.raises(TypeError):
        torch_flops_to_macs(True)


def test_fvcore_to_macs():
    FlopCountAnalysis = _import_fvcore()[0]

    # fvcore: linear 3 rows x 4 in x 5 out = 60, 1 per MAC
    fca = FlopCountAnalysis(nn.Linear(4, 5, bias=False), (torch.randn(3, 4),))
    assert fvcore_to_macs(fca.total()) == 60
    assert fvcore_to_macs(np.int64(7)) == 7 and fvcore_to_macs(7.0) == 7
    with pytest.raises(TypeError):
        fvcore_to_macs(7.5)
    with pytest.raises(TypeError):
        fvcore_to_macs(False)


# ---------------------------------------------------------------- coverage of llama_ref
@pytest.mark.parametrize("device", ["cpu", "meta"])
@pytest.mark.parametrize("attn_kernel", ["math", "sdpa"])
def test_every_op_llama_ref_emits_is_known(device, attn_kernel):
    model = Llama(PRESETS["tiny"], device=device, attn_kernel=attn_kernel, schedule="0,1,1")
    model.setup_cache(1, 16)
    tokens = torch.zeros(1, 6, dtype=torch.long, device=device)
    with torch.no_grad():
        model(tokens[:, :4], 0)
    for start, n in ((0, 4), (4, 2), (4, 1)):  # causal prefill, cached prefill, decode
        ops = dispatch_ops(model, tokens[:, :n], start)
        assert not [name for name, oc in ops if oc.status == "unknown"]
        ops = jit_ops(_StartPosWrapper(model, start), tokens[:, :n])
        assert not [name for name, oc in ops if oc.status == "unknown"]
