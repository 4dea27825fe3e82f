"""Autoregressive generation over the KV cache: greedy, or temperature + nucleus (top-p) sampling."""

from __future__ import annotations

import numbers
from typing import Optional, Sequence, Union

import torch

Prompts = Union[torch.Tensor, Sequence[Sequence[int]]]


def sample_top_p(probs: torch.Tensor, p: float, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Sample from the smallest set of tokens whose probability mass reaches ``p``. probs: (bsz, vocab)."""
    probs_sort, probs_idx = torch.sort(probs, dim=-1, descending=True)
    probs_sum = torch.cumsum(probs_sort, dim=-1)
    # Drop a token when the mass *before* it already reaches p; the top token always survives.
    probs_sort[(probs_sum - probs_sort) > p] = 0.0
    probs_sort.div_(probs_sort.sum(dim=-1, keepdim=True))
    next_token = torch.multinomial(probs_sort, num_samples=1, generator=generator)  # (bsz, 1)
    return torch.gather(probs_idx, -1, next_token).squeeze(-1)  # (bsz,)


@torch.inference_mode()
def generate(model, prompts: Prompts, max_new_tokens: int, *, temperature: float = 0.0, top_p: float = 1.0,
             eos_id: Optional[int] = None, generator: Optional[torch.Generator] = None) -> list[list[int]]:
    """Continue each prompt by up to ``max_new_tokens`` tokens; returns only the new tokens per prompt.

    Prompts may differ in length (Meta's scheme: prefill the shortest common prefix, then step one
    position at a time, keeping prompt tokens where a row's prompt is not finished). Sets up a fresh
    KV cache for the batch and leaves the model without one afterwards.
    """
    if isinstance(prompts, torch.Tensor):
        if prompts.dim() != 2:
            raise ValueError(f"prompt tensor must have shape (bsz, seqlen), got {tuple(prompts.shape)}")
        prompts = prompts.tolist()
    try:
        prompts = [list(p) for p in prompts]
    except TypeError:
        raise ValueError(f"prompts must be a (bsz, seqlen) tensor or a list of token-id lists, got {prompts!r}") from None
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("empty prompt: every prompt needs at least one token")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be a non-negative int, got {max_new_tokens!r}")
    # Written as "not (valid)" so that NaN is rejected too.
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real) or not temperature >= 0:
        raise ValueError(f"temperature must be a number >= 0, got {temperature!r}")
    if isinstance(top_p, bool) or not isinstance(top_p, numbers.Real) or not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
    vocab = model.config.vocab_size
    for p in prompts:
        for t in p:
            if isinstance(t, bool) or not isinstance(t, numbers.Integral):
                raise ValueError(f"token ids must be ints, got {t!r}")
            if not 0 <= t < vocab:
                raise ValueError(f"token id {t} is outside the vocabulary [0, {vocab})")
    if eos_id is not None and (isinstance(eos_id, bool) or not isinstance(eos_id, numbers.Integral)
                               or not 0 <= eos_id < vocab):
        raise ValueError(f"eos_id {eos_id!r} is not a token id in the vocabulary [0, {vocab})")
    bsz = len(prompts)
    min_len, max_len = min(map(len, prompts)), max(map(len, prompts))
    total_len = max_len + max_new_tokens
    if total_len > model.config.max_seq_len:
        raise ValueError(
            f"longest prompt ({max_len}) + max_new_tokens ({max_new_tokens}) = {total_len} exceeds "
            f"max_seq_len={model.config.max_seq_len}"
        )
    if max_new_tokens == 0:
        return [[] for _ in prompts]

    device = model.device
    pad = 0
    tokens = torch.full((bsz, total_len), pad, dtype=torch.long, device=device)
    for i, p in enumerate(prompts):
        tokens[i, : len(p)] = torch.tensor(p, dtype=torch.long, device=device)
    is_prompt = torch.zeros_like(tokens, dtype=torch.bool)
    for i, p in enumerate(prompts):
        is_prompt[i, : len(p)] = True
    finished = torch.zeros(bsz, dtype=torch.bool, device=device)
    # Last position each row needs: rows with short prompts are done before total_len, and only
    # their first max_new_tokens are returned, so with an eos they need not hold up the batch.
    last_pos = torch.tensor([len(p) + max_new_tokens - 1 for p in prompts], device=device)  # (bsz,)

    model.setup_cache(bsz, total_len)
    try:
        prev_pos = 0
        for cur_pos in range(min_len, total_len):
            logits = model(tokens[:, prev_pos:cur_pos], start_pos=prev_pos)[:, -1]  # (bsz, vocab)
            if temperature > 0:
                probs = torch.softmax(logits / temperature, dim=-1)
                next_token = sample_top_p(probs, top_p, generator)
            else:
                next_token = torch.argmax(logits, dim=-1)
            # Rows still inside their prompt keep the prompt token.
            next_token = torch.where(is_prompt[:, cur_pos], tokens[:, cur_pos], next_token)
            tokens[:, cur_pos] = next_token
            if eos_id is not None:
                finished |= ((~is_prompt[:, cur_pos]) & (next_token == eos_id)) | (last_pos <= cur_pos)
                if bool(finished.all()):
                    break
            prev_pos = cur_pos
    finally:
        model.clear_cache()

    out = []
    for i, p in enumerate(prompts):
        new = tokens[i, len(p) : len(p) + max_new_tokens].tolist()
        if eos_id is not None and eos_id in new:
            new = new[: new.index(eos_id) + 1]
        out.append(new)
    return out
