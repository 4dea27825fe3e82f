"""Autoregressive generation over the KV cache: greedy, or temperature + nucleus (top-p) sampling."""

from __future__ import annotations

import itertools
import math
import numbers
from typing import Optional, Sequence, Union

import torch

from .errors import NonFiniteError
from .finite import all_finite
from .guards import check_flag, check_forward_memory

Prompts = Union[torch.Tensor, Sequence[Union[Sequence[int], torch.Tensor]]]


def sample_top_p(probs: torch.Tensor, p: float, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Sample from the smallest set of tokens whose probability mass reaches ``p``. probs: (bsz, vocab)."""
    if not isinstance(probs, torch.Tensor) or probs.dim() != 2 or not probs.is_floating_point() or probs.is_meta:
        raise ValueError(f"probs must be a floating (bsz, vocab) tensor with data, got {_describe(probs)}"
                         + (" on the meta device" if isinstance(probs, torch.Tensor) and probs.is_meta else ""))
    if isinstance(p, bool) or not isinstance(p, numbers.Real) or not 0.0 < p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {p!r}")
    if not all_finite(probs) or bool((probs < 0).any()):
        raise NonFiniteError("probs hold NaN, inf or negative values: not a probability distribution")
    return _sample_top_p(probs, p, generator)


def _sample_top_p(probs: torch.Tensor, p: float, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """:func:`sample_top_p` for probabilities known to be valid (no host sync: the decode loop's own)."""
    probs_sort, probs_idx = torch.sort(probs, dim=-1, descending=True)
    probs_sum = torch.cumsum(probs_sort, dim=-1)
    # Drop a token when the mass *before* it already reaches p; the top token always survives.
    probs_sort[(probs_sum - probs_sort) > p] = 0.0
    probs_sort.div_(probs_sort.sum(dim=-1, keepdim=True))
    next_token = torch.multinomial(probs_sort, num_samples=1, generator=generator)  # (bsz, 1)
    return torch.gather(probs_idx, -1, next_token).squeeze(-1)  # (bsz,)


def _describe(x) -> str:
    if isinstance(x, torch.Tensor):
        return f"a {x.dtype} tensor of shape {tuple(x.shape)}"
    return type(x).__name__


def _as_prompt_list(prompts: Prompts, max_seq_len: int) -> list[list[int]]:
    """Prompts as lists of Python ints: a (bsz, seqlen) tensor, or a list of lists / 1-D tensors.

    A prompt is read up to one token past ``max_seq_len`` (enough to refuse it), so a huge tensor is
    never converted to Python ints and an endless iterator never consumed.
    """
    if isinstance(prompts, torch.Tensor):
        if prompts.dim() != 2:
            raise ValueError(f"prompt tensor must have shape (bsz, seqlen), got {tuple(prompts.shape)}")
        if prompts.is_meta:
            raise ValueError("prompt tensor is on the meta device: it has no token ids to read")
        if prompts.is_floating_point() or prompts.is_complex() or prompts.dtype == torch.bool:
            raise ValueError(f"prompt tensor must hold integer token ids, got {prompts.dtype}")
        return prompts[:, : max_seq_len + 1].tolist()
    if isinstance(prompts, (str, bytes)):
        raise ValueError(f"prompts must be token ids, not text: got {prompts[:40]!r}; tokenize first")
    out = []
    try:
        for p in prompts:
            if isinstance(p, torch.Tensor):
                if p.dim() != 1 or p.is_meta or p.is_floating_point() or p.is_complex() or p.dtype == torch.bool:
                    raise ValueError(f"a prompt given as a tensor must be a 1-D integer tensor, got {_describe(p)}")
                out.append(p[: max_seq_len + 1].tolist())
            elif isinstance(p, (str, bytes)):
                raise ValueError(f"prompts must be token ids, not text: got {p[:40]!r}; tokenize first")
            else:
                out.append(list(itertools.islice(p, max_seq_len + 1)))
    except TypeError:
        raise ValueError(
            f"prompts must be a (bsz, seqlen) tensor or a list of token-id lists, got {str(prompts)[:200]}"
        ) from None
    return out


@torch.inference_mode()
def generate(model, prompts: Prompts, max_new_tokens: int, *, temperature: float = 0.0, top_p: float = 1.0,
             eos_id: Optional[int] = None, generator: Optional[torch.Generator] = None,
             compile: bool = False) -> list[list[int]]:
    """Continue each prompt by up to ``max_new_tokens`` tokens; returns only the new tokens per prompt.

    Prompts may differ in length (Meta's scheme: prefill the shortest common prefix, then step one
    position at a time, keeping prompt tokens where a row's prompt is not finished). Sets up a fresh
    KV cache for the batch and leaves the model without one afterwards.

    ``compile``: the one-token decode step runs through ``torch.compile(model, fullgraph=True)`` with static
    shapes (the position goes in as a tensor; the cache, its length rounded up to a power of two, is read
    whole behind a mask, as gpt-fast does), so it compiles once per batch size and cache bucket, not once
    per step. The tokens are the same as eager's (greedy; up to float rounding). The first call pays the
    compilation (tens of seconds on a small CPU).

    Raises ``ValueError`` for bad arguments, and :class:`~llama_ref.errors.NonFiniteError` (a
    ``ValueError``) as soon as a step's logits hold NaN or inf (broken weights): sampling from them
    would return plausible-looking but meaningless token ids.
    """
    for attr in ("config", "device", "setup_cache", "clear_cache"):
        if not hasattr(model, attr):
            raise ValueError(f"model must be a llama_ref Llama, got {type(model).__name__} (no {attr!r})")
    if model.device.type == "meta":
        raise ValueError("generate() needs real weights: this model is on the meta device (shapes only, no data to "
                         "sample from); load or build it on 'cpu' or 'cuda'")
    max_seq_len = model.config.max_seq_len
    prompts = _as_prompt_list(prompts, max_seq_len)
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("empty prompt: every prompt needs at least one token")
    too_long = next((row for row, p in enumerate(prompts) if len(p) > max_seq_len), None)
    if too_long is not None:
        raise ValueError(f"prompt {too_long} is longer than the model's max_seq_len={max_seq_len}")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, numbers.Integral) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be a non-negative int, got {max_new_tokens!r}")
    max_new_tokens = int(max_new_tokens)
    # Written as "not (valid)" so that NaN is rejected too; inf would flatten every distribution to uniform.
    if (isinstance(temperature, bool) or not isinstance(temperature, numbers.Real) or not temperature >= 0
            or math.isinf(temperature)):
        raise ValueError(f"temperature must be a finite number >= 0, got {temperature!r}")
    if isinstance(top_p, bool) or not isinstance(top_p, numbers.Real) or not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
    if generator is not None:
        if not isinstance(generator, torch.Generator):
            raise ValueError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
        if temperature > 0 and generator.device.type != model.device.type:
            raise ValueError(f"generator is on {generator.device} but the model samples on {model.device}; "
                             f"use torch.Generator(device={str(model.device)!r})")
    max_len = max(map(len, prompts))
    total_len = max_len + max_new_tokens
    if total_len > max_seq_len:
        raise ValueError(
            f"longest prompt ({max_len}) + max_new_tokens ({max_new_tokens}) = {total_len} exceeds "
            f"max_seq_len={max_seq_len}"
        )
    vocab = model.config.vocab_size
    for row, p in enumerate(prompts):
        for t in p:
            if isinstance(t, bool) or not isinstance(t, numbers.Integral):
                raise ValueError(f"token ids must be ints, got {t!r} in prompt {row}")
            if not 0 <= t < vocab:
                raise ValueError(f"token id {t} is outside the vocabulary [0, {vocab}) (prompt {row})")
    if eos_id is not None and (isinstance(eos_id, bool) or not isinstance(eos_id, numbers.Integral)
                               or not 0 <= eos_id < vocab):
        raise ValueError(f"eos_id {eos_id!r} is not a token id in the vocabulary [0, {vocab})")
    if max_new_tokens == 0:
        return [[] for _ in prompts]

    def pick(logits: torch.Tensor) -> torch.Tensor:
        if temperature > 0:
            # Shift by the max before dividing: logits / tiny temperature would overflow to inf and
            # softmax(inf - inf) is NaN; shifted values are <= 0 and a tiny temperature gives one-hot.
            shifted = logits - logits.amax(dim=-1, keepdim=True)  # (bsz, vocab)
            return _sample_top_p(torch.softmax(shifted / temperature, dim=-1), top_p, generator)
        return torch.argmax(logits, dim=-1)

    check_flag("compile", compile)
    tokens = decode_loop(model, prompts, max_new_tokens, pick, eos_id=eos_id, compile=compile)
    out = []
    for i, p in enumerate(prompts):
        new = tokens[i, len(p) : len(p) + max_new_tokens].tolist()
        if eos_id is not None and eos_id in new:
            new = new[: new.index(eos_id) + 1]
        out.append(new)
    return out


def _raise_nonfinite(bad_pos: torch.Tensor, min_len: int) -> None:
    """Refuse the whole generation when a step's logits held NaN or inf (``bad_pos``: per row, the first
    position predicted from such logits, or -1), naming the step, position and batch rows."""
    if not bool((bad_pos >= 0).any()):  # the loop's one host sync for this check
        return
    cur_pos = int(bad_pos[bad_pos >= 0].min())
    rows = [int(r) for r in torch.nonzero(bad_pos == cur_pos).flatten().tolist()]
    shown = ", ".join(map(str, rows[:8])) + (", ..." if len(rows) > 8 else "")
    raise NonFiniteError(
        f"non-finite logits (NaN or inf) at generation step {cur_pos - min_len} (predicting position {cur_pos}) "
        f"in batch row(s) {shown}: the model's weights or activations hold NaN/inf, so no token can be sampled; "
        "check the weights with model.check_finite()"
    )


def decode_loop(model, prompts: list[list[int]], max_new_tokens: int, pick, *,
                eos_id: Optional[int] = None, all_logits: bool = False, compile: bool = False) -> torch.Tensor:
    """The loop :func:`generate` runs, for prompts it has checked: one prefill of the shortest prompt's
    length, then one forward per position, ``pick(logits) -> (bsz,)`` choosing each new token (rows still
    inside their prompt keep the prompt's). Returns the ``(bsz, longest prompt + max_new_tokens)`` tokens.

    Each forward's output head runs on the last position only (the other positions' tokens are known);
    ``all_logits`` makes the prefill compute every position's logits, as scoring the prompt would.
    ``compile``: the decode steps run compiled, with static shapes (see :func:`generate`).

    On the meta device (shapes only) ``pick`` can only return a placeholder and ``eos_id`` must be None:
    the loop then runs the very forwards a real generation would (what the counters count)."""
    device = model.device
    bsz = len(prompts)
    min_len, max_len = min(map(len, prompts)), max(map(len, prompts))
    total_len = max_len + max_new_tokens
    if device.type == "meta" and eos_id is not None:
        raise ValueError("eos_id needs token values, which a meta-device model does not have")
    if compile and device.type == "meta":
        raise ValueError("compile=True compiles a real decode step: a meta-device model has no data to run")
    # Static shapes: one cache length per power-of-two bucket, so calls of similar lengths share a compilation.
    cache_len = min(model.config.max_seq_len, max(16, 1 << (total_len - 1).bit_length())) if compile else total_len
    # Refuses (with the estimate) before anything is allocated when the prefill or the batch's cache cannot
    # fit; outside the try: a refused setup leaves the model as it was.
    check_forward_memory(model, bsz, min_len, kv_cache=True, last_only=not all_logits)
    model.setup_cache(bsz, cache_len)
    step = torch.compile(model, fullgraph=True, dynamic=False) if compile else None
    pos = torch.zeros((), dtype=torch.long, device=device)  # a compiled step's position, as data
    try:
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
        # Per row, the first position predicted from non-finite logits (-1: none). Tracked on the device and
        # read once at the end, not with a host sync per step; such logits are replaced by zeros, so sampling
        # never sees NaN, and no token of the run is returned.
        bad_pos = torch.full((bsz,), -1, dtype=torch.long, device=device)
        prev_pos = 0
        for cur_pos in range(min_len, total_len):
            if step is not None and prev_pos > 0:  # a one-token step, compiled: same shapes every step
                pos.fill_(prev_pos)
                # contiguous: a (bsz, 1) column's strides would otherwise follow total_len (another compilation)
                logits = step(tokens[:, prev_pos:cur_pos].contiguous(), pos, last_only=True)[:, -1]  # (bsz, vocab)
            else:
                last_only = not (all_logits and prev_pos == 0)
                logits = model(tokens[:, prev_pos:cur_pos], start_pos=prev_pos, last_only=last_only)[:, -1]
            if device.type != "meta":
                ok = torch.isfinite(logits).all(dim=-1)  # (bsz,)
                bad_pos = torch.where(~ok & (bad_pos < 0), cur_pos, bad_pos)
                logits = torch.where(ok[:, None], logits, 0.0)
            next_token = pick(logits)  # (bsz,)
            # Rows still inside their prompt keep the prompt token.
            next_token = torch.where(is_prompt[:, cur_pos], tokens[:, cur_pos], next_token)
            tokens[:, cur_pos] = next_token
            if eos_id is not None:
                finished |= ((~is_prompt[:, cur_pos]) & (next_token == eos_id)) | (last_pos <= cur_pos)
                if bool(finished.all()):
                    break
            prev_pos = cur_pos
        if device.type != "meta":
            _raise_nonfinite(bad_pos, min_len)
    finally:
        model.clear_cache()
    return tokens
