"""docs/tensor-parallel.md: the embedding's collective in this layout and the figures the page prints."""

from __future__ import annotations

from pathlib import Path

from counters.analytic import analyze
from counters.collectives import ALL_GATHER, ALL_REDUCE, Collective
from llama_ref import PRESETS

DOC = (Path(__file__).resolve().parents[1] / "docs" / "tensor-parallel.md").read_text()


def test_the_embedding_is_all_gathered_here():
    # Llama-2-7B, batch 1, 2048 tokens, bf16, 8 ranks: one all-gather of the full (1, 2048, 4096) activation
    report = analyze(PRESETS["llama-2-7b"], seqlen=2048, tp=8, weight_dtype_bytes=2, act_dtype_bytes=2)
    embedding = report.collectives[(None, "tok_embeddings")]  # row key: (schedule position, module)
    assert embedding == {Collective(ALL_GATHER, 2048 * 4096, 2, 8): 1}


def test_same_payload_twice_the_ring_bytes():
    gather, reduce = (Collective(op, 1 * 2048 * 4096, 2, 8) for op in (ALL_GATHER, ALL_REDUCE))
    # S = 2048 x 4096 x 2 bytes; all-gather (8-1)/8 x S, all-reduce 2 x (8-1)/8 x S
    assert gather.payload_bytes == reduce.payload_bytes == 16_777_216
    assert (gather.ring_bytes, reduce.ring_bytes) == (14_680_064, 29_360_128)
    for n in (16_777_216, 14_680_064, 29_360_128):
        assert f"{n:,}" in DOC, n
