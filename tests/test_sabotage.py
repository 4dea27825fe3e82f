"""Sabotage: change what the model computes and the counters must disagree.

The analytic and hooks counters evaluate the work table's formulas (on config sizes and on real tensor
sizes); the fvcore and torch counters count the ops that really run. A model that does different work
than the table says must therefore fail the cross-check, in the row where the work changed."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import llama_ref.model
from counters.crosscheck import crosscheck
from llama_ref import Llama, LlamaConfig
from llama_ref.model import AttentionCore
from llama_ref.model import Linear, RMSNorm

pytestmark = pytest.mark.usefixtures("single_thread")

SMALL = LlamaConfig(name="small", dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=64, hidden_dim=48,
                    max_seq_len=32)


def _report(device="cpu", attn_kernel="math", start_pos=0, seqlen=3):
    model = Llama(SMALL, device=device, attn_kernel=attn_kernel)
    tokens = torch.zeros((1, seqlen), dtype=torch.long, device=device)
    return crosscheck(model, tokens, start_pos=start_pos)


def _disagreeing(report) -> set:
    """(row name, quantity, counter) of every row-level mismatch."""
    return {(m.key[1], m.quantity, m.counter) for m in report.mismatches if m.key[1] != "TOTAL"}


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_the_unsabotaged_model_agrees(device):
    report = _report(device)
    assert report.agree and report.complete


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_silu_replaced_by_identity(monkeypatch, device):
    monkeypatch.setattr(llama_ref.model.F, "silu", lambda x: x)
    report = _report(device)
    assert not report.agree
    # analytic (the reference) and hooks still count SiLU; the op counters see only the gate's multiply
    assert _disagreeing(report) == {("feed_forward.act", "nonmatmul_flops", "fvcore"),
                                    ("feed_forward.act", "nonmatmul_flops", "torch")}


def test_norm_without_rsqrt(monkeypatch):
    def no_rsqrt(self, x):
        return x * (x.pow(2).mean(-1, keepdim=True) + self.eps)

    monkeypatch.setattr(RMSNorm, "_norm", no_rsqrt)
    report = _report()
    rows = {row for row, _, _ in _disagreeing(report)}
    assert rows == {"attention_norm", "ffn_norm", "norm"}
    assert {q for _, q, _ in _disagreeing(report)} == {"nonmatmul_flops"}


def test_an_extra_matmul(monkeypatch):
    real = Linear.forward

    def twice(self, x):
        y = real(self, x)
        return y + 0 * torch.matmul(x, self.weight.to(x.dtype).t())  # the same product again, discarded

    monkeypatch.setattr(Linear, "forward", twice)
    report = _report()
    assert not report.agree
    macs = {(row, c) for row, q, c in _disagreeing(report) if q == "macs"}
    assert ("attention.wq", "torch") in macs and ("output", "fvcore") in macs
    assert not {c for _, c in macs} & {"analytic", "hooks"}


@pytest.mark.parametrize("attn_kernel", ["math", "sdpa"])
def test_rope_skipped(monkeypatch, attn_kernel):
    monkeypatch.setattr(llama_ref.model, "apply_rotary_emb", lambda xq, xk, freqs: (xq, xk))
    report = _report(attn_kernel=attn_kernel)
    assert {(row, q) for row, q, _ in _disagreeing(report)} == {("attention.rope", "nonmatmul_flops")}


def test_softmax_twice(monkeypatch):
    real = AttentionCore.forward

    def forward(self, xq, keys, values, mask):
        F.softmax(torch.zeros(xq.shape[0], xq.shape[2], xq.shape[1], keys.shape[1], device=xq.device), dim=-1)
        return real(self, xq, keys, values, mask)

    monkeypatch.setattr(AttentionCore, "forward", forward)
    report = _report(start_pos=2)
    assert {(row, q) for row, q, _ in _disagreeing(report)} == {("attention.core", "nonmatmul_flops")}


def test_attention_over_the_wrong_length_in_hooks_and_ops_but_not_in_the_formula(monkeypatch):
    """A cache that drops the newest position: every counter that reads real sizes sees the shorter
    attention, the closed form does not."""
    from llama_ref.model import KVCache

    real = KVCache.update

    def update(self, start_pos, xk, xv):
        keys, values = real(self, start_pos, xk, xv)
        if xk.shape[1] > 1:  # the (uncounted, masked) prefill is left alone
            return keys, values
        n = keys.shape[1] - 1
        return self.cache_k[: xk.shape[0], :n], self.cache_v[: xk.shape[0], :n]

    monkeypatch.setattr(KVCache, "update", update)
    report = _report(start_pos=2, seqlen=1)  # a decode step: no mask to disagree with the length
    counters = {c for row, _, c in _disagreeing(report) if row == "attention.core"}
    assert counters == {"hooks", "fvcore", "torch"}  # all disagree with analytic, the reference
