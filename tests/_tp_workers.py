"""Functions the tensor-parallel tests run on spawned gloo ranks (importable by the child processes),
and the deterministic models both the ranks and the single-process references are built from."""

from __future__ import annotations

import time

import torch

from llama_ref import Llama, LlamaConfig, generate
from llama_ref.checks.tp_check import recording_file_access  # the check script's own recorder

TINY = LlamaConfig.from_preset("tiny")  # 4 query heads sharing 2 kv heads: 2 ranks get 2 + 1 each
MHA = LlamaConfig(name="mha-tiny", dim=64, n_layers=2, n_heads=4, n_kv_heads=4, vocab_size=256, hidden_dim=176,
                  max_seq_len=64)
REPEAT_SCHEDULE = (0, 1, 1, 2, 3)  # layer 1 runs twice: two cache slots
PROMPTS = [[1, 5, 9], [7, 3, 11, 42, 8]]  # ragged: the generation scheme prefills then steps
MAX_NEW = 6


def build_single(config: LlamaConfig, seed: int = 0, **kwargs) -> Llama:
    """The single-process model every comparison starts from (random, reproducible, fp32)."""
    from conftest import randomize_

    return randomize_(Llama(config, **kwargs), seed, gain=1.0).eval()


def tokens(config: LlamaConfig, bsz: int = 2, seqlen: int = 9, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, config.vocab_size, (bsz, seqlen), generator=torch.Generator().manual_seed(seed))


def loss_weights(logits_shape) -> torch.Tensor:
    """A fixed random cotangent: loss = (logits * w).sum() gives every logit a different gradient."""
    return torch.randn(logits_shape, generator=torch.Generator().manual_seed(7))


def cached_logits(model, toks: torch.Tensor, prefill: int) -> torch.Tensor:
    """Prefill ``prefill`` tokens, then one token per step; the logits of every position."""
    model.setup_cache(toks.shape[0], toks.shape[1])
    try:
        outs = [model(toks[:, :prefill])]
        for pos in range(prefill, toks.shape[1]):
            outs.append(model(toks[:, pos : pos + 1], start_pos=pos))
    finally:
        model.clear_cache()
    return torch.cat(outs, dim=1)  # (bsz, seqlen, vocab)


def generations(model) -> dict:
    sampled_gen = torch.Generator().manual_seed(123)
    return {
        "greedy": generate(model, PROMPTS, MAX_NEW),
        "sampled": generate(model, PROMPTS, MAX_NEW, temperature=0.8, top_p=0.9, generator=sampled_gen),
    }


# ---------------------------------------------------------------------------- rank functions
def battery(rank: int, checkpoints: dict) -> dict:
    """Everything the 2-rank tests compare, computed in one spawn (process start-up dominates)."""
    from llama_ref.parallel import load_tp_pretrained, parallelize

    out: dict = {"rank": rank}
    toks = tokens(TINY)
    with torch.no_grad():
        tp = parallelize(build_single(TINY))
        out["full"] = tp(toks)
        out["cached"] = cached_logits(tp, toks, prefill=5)
        out["local_shapes"] = {n: tuple(p.shape) for n, p in tp.named_parameters()}
        tp.set_schedule(REPEAT_SCHEDULE)
        out["repeat_full"] = tp(toks)
        out["repeat_cached"] = cached_logits(tp, toks, prefill=4)
        tp.set_schedule(None)
        out["generate"] = generations(tp)

        sdpa = parallelize(build_single(TINY, attn_kernel="sdpa"))
        out["sdpa_full"] = sdpa(toks)
        out["sdpa_cached"] = cached_logits(sdpa, toks, prefill=5)

        mha = parallelize(build_single(MHA, seed=3))
        out["mha_full"] = mha(tokens(MHA))
        out["mha_cached"] = cached_logits(mha, tokens(MHA), prefill=3)

    # Backward through every collective: gradients of this rank's shards.
    tp = parallelize(build_single(TINY)).requires_grad_(True)
    logits = tp(toks)
    (logits * loss_weights(logits.shape)).sum().backward()
    out["grads"] = {n: p.grad.clone() for n, p in tp.named_parameters()}

    # Loading: each checkpoint layout, recording which files this rank opened and read weights from.
    out["loads"] = {}
    for name, path in checkpoints.items():
        with recording_file_access() as (opened, read):
            model = load_tp_pretrained(path, compute_dtype=torch.float32)  # fp32: comparable across summation orders
        with torch.no_grad():
            out["loads"][name] = {"logits": model(tokens(model.config)), "opened": sorted(opened),
                                  "read": sorted(read), "dtype": model.tok_embeddings.weight.dtype}
    return out


def run_tp_check(rank: int, argv: list) -> tuple:
    """``scripts/tp_check.py``'s ``main(argv)`` on this rank (the world is already up, as under torchrun):
    (exit status, stdout, stderr)."""
    import io
    from contextlib import redirect_stderr, redirect_stdout

    from llama_ref.checks.tp_check import main

    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


def fail_on_rank_1(rank: int) -> str:
    """Rank 1 raises; rank 0 is stuck (as if waiting in a collective that never completes) and must be
    stopped by the parent rather than waited for."""
    if rank == 1:
        raise ValueError("deliberate failure on rank 1")
    time.sleep(3600)
    return "unreachable"
