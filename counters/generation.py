"""A whole inference task: the prefill of a prompt and the decode steps that generate new tokens, counted
by running the real generation loop (:func:`llama_ref.generate.decode_loop`, the loop of
:func:`llama_ref.generate`) under the counters, per phase (``prefill``, ``decode``), with a closed form
checked against it.

``G`` new tokens take ``G`` forwards: the prefill of the ``P``-token prompt (which predicts the first new
token) and ``G - 1`` decode steps of one token each, the ``j``-th attending to ``P + j`` positions. The last
generated token is never fed back, so it costs nothing.

The prefill's output head runs on each sequence's last position only, as ``llama_ref.generate`` (and
transformers' ``generate``, ``logits_to_keep=1``) runs it: the logits of the other ``P - 1`` positions would
predict tokens that are already known. That is ``(P - 1) * B * dim * vocab_size`` MACs fewer than a forward of
``P`` tokens. ``Generation(all_logits=True)`` (``count --all-logits``) counts a prefill that keeps every
position's logits, as scoring the prompt does (e.g. its perplexity) before generating."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from llama_ref.config import LlamaConfig
from llama_ref.generate import decode_loop, generate
from llama_ref.schedule import ScheduleSpec, resolve_schedule

from .analytic import analyze, macs_polynomial
from .hooks import HookCounter
from .primitives import Count
from .result import DECODE, PREFILL, SOURCE_FORMULA, CounterResult
from .table import row_order
from .torch_counter import TorchCounter

__all__ = ["Generation", "analyze_generation", "count_generation", "generation_forwards", "generation_macs"]


@dataclass(frozen=True)
class Generation:
    """``prompt`` tokens per sequence, then ``new_tokens`` generated (greedy; the count does not depend on
    which tokens); ``all_logits``: the prefill keeps every position's logits (scoring), not the last only."""

    prompt: int
    new_tokens: int
    all_logits: bool = False

    def __post_init__(self) -> None:
        for name in ("prompt", "new_tokens"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an int >= 1, got {v!r}")
        if not isinstance(self.all_logits, bool):
            raise ValueError(f"all_logits must be a bool, got {self.all_logits!r}")

    @property
    def length(self) -> int:
        """Positions the cache holds at the end: the prompt and every generated token."""
        return self.prompt + self.new_tokens


def generation_forwards(generation: Generation) -> list[tuple[int, int]]:
    """``(start_pos, seqlen)`` of every forward the loop runs, in order."""
    p, g = generation.prompt, generation.new_tokens
    return [(0, p)] + [(p + j - 1, 1) for j in range(1, g)]


def generation_macs(config: LlamaConfig, generation: Generation, *, batch: int = 1,
                    schedule: ScheduleSpec = None) -> dict[str, int]:
    """The closed form, per phase: with ``a*N + b*N^2`` the MACs of one N-token forward
    (:func:`counters.analytic.macs_polynomial`), prefill = ``B (a P + b P^2 - (P-1) dim V)`` (the output head on
    the last position only; without the ``- (P-1) dim V`` with ``all_logits``) and
    decode = ``B sum_{j=1}^{G-1} (a + b (P + j)) = B ((G-1) a + b ((G-1) P + G (G-1) / 2))``."""
    a, b = macs_polynomial(config, schedule)
    p, g = generation.prompt, generation.new_tokens
    skipped_head = 0 if generation.all_logits else (p - 1) * config.dim * config.vocab_size
    return {PREFILL: batch * (a * p + b * p * p - skipped_head),
            DECODE: batch * ((g - 1) * a + b * ((g - 1) * p + g * (g - 1) // 2))}


def analyze_generation(config: LlamaConfig, *, batch: int = 1, generation: Generation,
                       schedule: ScheduleSpec = None) -> CounterResult:
    """Every row of every forward of the task, per phase, from the table (source ``formula``).

    The decode steps are summed in closed form: a row of a one-token step is affine in the positions it
    attends to, so its sum over the steps is ``(G-1) c_1 + (c_2 - c_1) sum_j (P + j - 1)``, checked for
    affinity on three points."""
    order = resolve_schedule(schedule, config.n_layers)
    result = CounterResult("analytic")
    for r in analyze(config, batch=batch, seqlen=generation.prompt, schedule=order,
                     last_only=not generation.all_logits).rows:
        result.add(r.key, r.count, SOURCE_FORMULA, PREFILL)
    steps = generation.new_tokens - 1
    if steps:
        c1, c2, c3 = ({r.key: r.count for r in analyze(config, batch=batch, seqlen=1, start_pos=k,
                                                       schedule=order).rows} for k in (0, 1, 2))
        offsets = steps * (generation.prompt - 1) + steps * (steps + 1) // 2  # sum over j of (P + j - 1) - 0
        for key, one in c1.items():
            slope = Count(c2[key].macs - one.macs, c2[key].nonmatmul_flops - one.nonmatmul_flops)
            if c3[key] != c2[key] + slope:  # pragma: no cover - a row would not be affine in the context
                raise ArithmeticError(f"row {key} of a decode step is not affine in its context length")
            result.add(key, one * steps + slope * offsets, SOURCE_FORMULA, DECODE)
    else:
        result.ensure_rows(row_order(len(order)), DECODE)
    result.notes.append(f"closed form: prompt {generation.prompt}, {generation.new_tokens} new tokens, batch {batch}, "
                        + ("every position's logits in the prefill" if generation.all_logits
                           else "the prefill's logits for the last position only"))
    return result


def _prompts(config: LlamaConfig, batch: int, generation: Generation, seed: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, config.vocab_size, (batch, generation.prompt), generator=gen).tolist()


def run_generation(model, prompts: list[list[int]], new_tokens: int, all_logits: bool = False) -> None:
    """The real loop: :func:`llama_ref.generate` (greedy). On the meta device, where there are no values to
    choose tokens from, or with ``all_logits``, the same loop (:func:`llama_ref.generate.decode_loop`) with a
    placeholder or greedy pick (the forwards are identical)."""
    if model.device.type == "meta":
        decode_loop(model, prompts, new_tokens,
                    lambda logits: torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device),
                    all_logits=all_logits)
    elif all_logits:
        decode_loop(model, prompts, new_tokens, lambda logits: torch.argmax(logits, dim=-1), all_logits=True)
    else:
        generate(model, prompts, new_tokens)


def count_generation(model, *, batch: int, generation: Generation, counters: Sequence[str] = ("hooks", "torch"),
                     strict: bool = False, seed: int = 0) -> dict[str, CounterResult]:
    """Run the generation loop once under each of ``counters`` (``hooks``, ``torch``) and return their
    per-phase counts."""
    if model.caches is not None:
        raise ValueError("the model holds a KV cache: generation sets up its own; clear_cache() first")
    config = model.config
    if generation.length > config.max_seq_len:
        raise ValueError(f"prompt {generation.prompt} + {generation.new_tokens} new tokens = {generation.length} "
                         f"exceeds max_seq_len={config.max_seq_len}")
    prompts = _prompts(config, batch, generation, seed)
    model.reserve_positions(generation.length)
    out: dict[str, CounterResult] = {}
    for name in counters:
        if name == "hooks":
            with HookCounter(model, strict=strict, by_start_pos=True) as counter:
                run_generation(model, prompts, generation.new_tokens, generation.all_logits)
            result = counter.result
        elif name == "torch":
            counter = TorchCounter(model, strict=strict, by_start_pos=True)
            with counter:
                run_generation(model, prompts, generation.new_tokens, generation.all_logits)
            result = counter.finish()
        else:
            raise ValueError(f"counter {name!r} cannot follow a generation loop (fvcore traces one forward); "
                             "use analytic, hooks, torch")
        for phase in (PREFILL, DECODE):
            result.ensure_rows(row_order(len(model.schedule)), phase)
        out[name] = result
    return out
