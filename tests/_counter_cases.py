"""Shared cases for the op-level counter tests (fvcore and torch): small configs, a schedule with a
repeated layer, the three step shapes, and the expected rows from the module-level formulas."""

from __future__ import annotations

import torch
from torch import nn

from counters import table as T
from llama_ref import PRESETS, Llama

TINY = PRESETS["tiny"]  # GQA: 4 query heads, 2 kv heads
TINY_MHA = TINY.replace(n_kv_heads=4, name="tiny-mha")
CONFIGS = {"tiny": TINY, "tiny-mha": TINY_MHA}
SCHEDULE = "0,1,1,2,3"  # layer 1 runs twice: positions 1 and 2
BSZ = 2
# (start_pos, seqlen): causal prefill; a cached chunk (explicit mask over prefix + new tokens); decode
MODES = {"prefill": (0, 5), "cached-chunk": (4, 3), "decode": (7, 1)}


def expected_rows(config, schedule_len: int, bsz: int, start_pos: int, seqlen: int) -> dict:
    """Every row of one forward, in execution order: the work table's kinds on sizes from the config
    (the hand-derived values of single rows are checked in test_analytic.py)."""
    shape = T.RunShape(bsz, seqlen, start_pos)
    rows = {r.name: r.kind.count(r.sizes(config, shape)) for r in T.TOP_ROWS_BEFORE + T.BLOCK_ROWS + T.TOP_ROWS_AFTER}
    return {(pos, name): rows[name] for pos, name in T.row_order(schedule_len)}


def make_model(config, attn_kernel: str, device: str, start_pos: int, schedule=SCHEDULE) -> tuple[Llama, torch.Tensor]:
    """A model and ``tokens`` for one step; for start_pos > 0 the KV cache is set up and pre-filled."""
    torch.manual_seed(0)
    model = Llama(config, device=device, attn_kernel=attn_kernel, schedule=schedule)
    tokens = torch.randint(0, config.vocab_size, (BSZ, 16)).to(device)
    if start_pos > 0:
        model.setup_cache(BSZ, 16)
        with torch.no_grad():
            model(tokens[:, :start_pos], 0)
    return model, tokens


# Every combination on meta (cheap); on CPU (real kernels, slower) all of GQA and MHA's cached chunk.
CASES = [(p, m, k, "meta") for p in CONFIGS for m in MODES for k in ("math", "sdpa")] +\
        [("tiny", m, k, "cpu") for m in MODES for k in ("math", "sdpa")] +\
        [("tiny-mha", "cached-chunk", k, "cpu") for k in ("math", "sdpa")]


def make_bf16_meta_model(attn_kernel: str) -> tuple[Llama, torch.Tensor]:
    """bf16 weights on meta (compute dtype = weight dtype), cache pre-filled for the cached-chunk step."""
    start_pos, _ = MODES["cached-chunk"]
    model = Llama(TINY, device="meta", dtype=torch.bfloat16, attn_kernel=attn_kernel, schedule=SCHEDULE)
    model.setup_cache(BSZ, 16)
    tokens = torch.zeros(BSZ, 16, dtype=torch.long, device="meta")
    with torch.no_grad():
        model(tokens[:, :start_pos], 0)
    return model, tokens


class SinGate(nn.Module):
    """A gate with an op that has no formula (sin)."""

    def forward(self, gate, up):
        return torch.sin(gate) * up
