"""A training step, as the counters run it: forward + loss + backward of one batch, every parameter
requiring gradients (full fine-tuning), optionally with activation checkpointing per decoder layer."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn.functional as F

from .table import LOSS_KINDS

LOSSES = tuple(LOSS_KINDS)


@dataclass(frozen=True)
class Training:
    """What one training step is.

    ``loss``: ``"cross-entropy"`` of every position's logits against the batch's own token ids (the
    count does not depend on which ids), or ``"sum"`` of the logits. ``recompute``: activation
    checkpointing per decoder layer (each layer's forward runs again during backward).
    """

    loss: str = "cross-entropy"
    recompute: bool = False

    def __post_init__(self) -> None:
        if self.loss not in LOSSES:
            raise ValueError(f"unknown loss {self.loss!r}; choose one of {', '.join(LOSSES)}")
        if not isinstance(self.recompute, bool):
            raise ValueError(f"recompute must be a bool, got {self.recompute!r}")


def loss_of(logits: torch.Tensor, tokens: torch.Tensor, loss: str) -> torch.Tensor:
    """The step's scalar loss from ``logits`` (bsz, seqlen, vocab) and the ``tokens`` they came from."""
    if loss == "sum":
        return logits.sum()
    vocab = logits.shape[-1]
    return F.cross_entropy(logits.reshape(-1, vocab), tokens.reshape(-1))  # (bsz * seqlen, vocab) vs (bsz * seqlen,)


@contextmanager
def trainable(model, training: Training) -> Iterator[None]:
    """Every parameter requires grad, activation checkpointing as ``training`` says, no KV cache; all three
    restored afterwards (and the gradients dropped)."""
    if model.caches is not None:
        raise ValueError("a training step runs without a KV cache: clear_cache() first (or count a forward)")
    grads = {p: p.requires_grad for p in model.parameters()}
    checkpointing = model.activation_checkpointing
    try:
        for p in grads:
            p.requires_grad_(True)
        model.set_activation_checkpointing(training.recompute)
        yield
    finally:
        model.set_activation_checkpointing(checkpointing)
        for p, flag in grads.items():
            p.grad = None
            p.requires_grad_(flag)


def backward_context() -> bool:
    """True while autograd's engine runs a backward pass (the op being dispatched is backward work, or
    the recomputation of a checkpointed forward)."""
    return torch._C._current_graph_task_id() != -1
