"""Count with forward hooks: each llama_ref module's work, from the shapes of the tensors that flow.

Every formula takes its sizes from the hooked call's real inputs/outputs (never from the config),
so a counted forward says what *this* forward computed: the batch and token count given, the
key/value length the cache really returned, the heads the tensors really have. Hooks do shape
arithmetic only (no tensor work), so they cost microseconds per module and run on ``meta`` models.

Positions: a pre-hook on the root resets the run counter, a pre-hook on every ``TransformerBlock``
takes the next schedule position, so a layer that runs twice is counted once per run.
"""

from __future__ import annotations

import logging
import math
from contextlib import AbstractContextManager
from typing import Any, Callable, Optional

import torch
from torch import nn

from llama_ref.attention import Attention, AttentionCore, KVCache
from llama_ref.block import TransformerBlock
from llama_ref.layers import FeedForward, GatedSiLU, Linear, RMSNorm
from llama_ref.model import Llama
from llama_ref.rope import RotaryEmbedding

from . import formulas as F
from .formulas import Count
from .result import CounterResult, row_for_module

logger = logging.getLogger(__name__)


class UncountedModuleError(RuntimeError):
    """Strict mode: a module ran that no hook formula covers."""


def _rows(shape: torch.Size) -> int:
    """Number of vectors in a (..., features) tensor."""
    return math.prod(shape[:-1])


# ---------------------------------------------------------------- per-module formulas from real shapes
def _linear(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Count:
    x = args[0] if args else kwargs["input"]
    return F.linear(_rows(output.shape), x.shape[-1], output.shape[-1])


def _rmsnorm(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Count:
    x = args[0] if args else kwargs["x"]
    return F.rmsnorm(_rows(x.shape), x.shape[-1])


def _rope(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Count:
    xq, xk = output  # (bsz, seqlen, n_heads, head_dim), (bsz, seqlen, n_kv_heads, head_dim)
    bsz, seqlen, n_heads, head_dim = xq.shape
    return F.rope(bsz * seqlen, n_heads, xk.shape[2], head_dim)


def _attention_core(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Count:
    names = ("xq", "keys", "values", "mask")
    bound = dict(zip(names, args))
    bound.update(kwargs)
    xq, keys, values = bound["xq"], bound["keys"], bound["values"]
    bsz, seqlen, n_heads, head_dim = xq.shape
    kvlen = keys.shape[1]
    if values.shape[1] != kvlen:
        raise ValueError(f"attention core got {kvlen} keys but {values.shape[1]} values")
    return F.attention_core(bsz, n_heads, seqlen, kvlen, head_dim)


def _gated_silu(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Count:
    return F.gated_silu(_rows(output.shape), output.shape[-1])


def _embedding(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Count:
    return F.embedding(_rows(output.shape), output.shape[-1])


# Leaf modules: one formula covers the module and everything below it.
HOOK_FORMULAS: dict[type, Callable[..., Count]] = {
    Linear: _linear,
    nn.Linear: _linear,
    RMSNorm: _rmsnorm,
    RotaryEmbedding: _rope,
    AttentionCore: _attention_core,
    GatedSiLU: _gated_silu,
    nn.Embedding: _embedding,
}
# Containers whose own forward does no arithmetic (views, dtype casts, mask building, cache copies).
# TransformerBlock's own work, the two residual adds, is counted by its post-hook.
NO_ARITHMETIC_MODULES: tuple[type, ...] = (Llama, Attention, FeedForward, nn.ModuleList, KVCache)


def _covers(cls: type, module: nn.Module) -> bool:
    """A formula written for ``cls`` covers ``module`` if it is a ``cls`` whose forward is ``cls``'s own
    (a subclass that overrides ``forward`` may do other work: it gets no formula by inheritance)."""
    return isinstance(module, cls) and type(module).forward is cls.forward


def _does_no_arithmetic(module: nn.Module) -> bool:
    return any(_covers(cls, module) for cls in NO_ARITHMETIC_MODULES)


def _classify(module: nn.Module) -> tuple[str, Optional[type]]:
    """("leaf", class whose formula applies) | ("block", None) | ("block-unknown", None) |
    ("container", None) | ("unknown", None). Depends on the module's type only."""
    for cls in type(module).__mro__:
        if cls in HOOK_FORMULAS and _covers(cls, module):
            return "leaf", cls
    if isinstance(module, TransformerBlock):
        return ("block" if _covers(TransformerBlock, module) else "block-unknown"), None
    if _does_no_arithmetic(module):
        return "container", None
    return "unknown", None


class HookCounter(AbstractContextManager):
    """Context manager: hooks installed on ``__enter__``, removed on ``__exit__``; counts of every
    forward run inside accumulate in :attr:`result`."""

    def __init__(self, model: nn.Module, *, strict: bool = False) -> None:
        self.model = model
        self.strict = strict
        self.result = CounterResult(name="hooks")
        self._handles: list[Any] = []
        self._position: Optional[int] = None
        self._next_position = 0
        self._layers_run: list[int] = []

    # ------------------------------------------------------------ install / remove
    def __enter__(self) -> "HookCounter":
        kinds: dict[type, tuple[str, Optional[type]]] = {}  # per-type decision, made once per type
        root = self.model
        self._handles.append(root.register_forward_pre_hook(self._on_forward_start))
        self._handles.append(root.register_forward_hook(self._on_forward_end))
        stack: list[tuple[str, nn.Module]] = [("", root)]
        while stack:
            fqn, module = stack.pop()
            cls = type(module)
            if cls not in kinds:
                kinds[cls] = _classify(module)
            kind, formula_cls = kinds[cls]
            if kind == "leaf":  # one formula covers the module and everything below it
                formula = HOOK_FORMULAS[formula_cls]
                self._handles.append(module.register_forward_hook(self._make_leaf_hook(fqn, formula), with_kwargs=True))
                continue
            if kind == "block":
                self._handles.append(module.register_forward_pre_hook(self._make_block_pre_hook(module)))
                self._handles.append(module.register_forward_hook(self._make_block_post_hook(fqn)))
            elif kind == "block-unknown":
                # Positions advance for any block; its own work only has a formula if forward is
                # TransformerBlock's.
                self._handles.append(module.register_forward_pre_hook(self._make_block_pre_hook(module)))
                self._handles.append(module.register_forward_hook(self._make_unknown_hook(fqn, end_run=True)))
            elif kind == "unknown":
                self._handles.append(module.register_forward_hook(self._make_unknown_hook(fqn)))
            prefix = fqn + "." if fqn else ""
            stack.extend((prefix + name, child) for name, child in module._modules.items() if child is not None)
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._position = None

    # ------------------------------------------------------------ hooks
    def _on_forward_start(self, module: nn.Module, args: tuple) -> None:
        self._position = None
        self._next_position = 0
        self._layers_run = []

    def _on_forward_end(self, module: nn.Module, args: tuple, output: Any) -> None:
        expected = getattr(module, "schedule", None)
        if expected is not None and tuple(self._layers_run) != tuple(expected):
            msg = f"hooks saw layer runs {self._layers_run} but the model's schedule is {list(expected)}"
            if self.strict:
                raise UncountedModuleError(msg)
            logger.warning(msg)
            self.result.notes.append(msg)

    def _make_block_pre_hook(self, block: TransformerBlock) -> Callable:
        def hook(module: nn.Module, args: tuple) -> None:
            self._position = self._next_position
            self._next_position += 1
            self._layers_run.append(getattr(block, "layer_id", -1))
        return hook

    def _make_block_post_hook(self, fqn: str) -> Callable:
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            # The block's own work: h = x + attention(...), out = h + feed_forward(...).
            self.result.add(row_for_module(fqn, self._position), F.residuals(_rows(output.shape), output.shape[-1]))
            self._position = None
        return hook

    def _make_leaf_hook(self, fqn: str, formula: Callable[..., Count]) -> Callable:
        keys: dict[Optional[int], tuple] = {}  # position -> row key, so names are parsed once

        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            pos = self._position
            key = keys.get(pos)
            if key is None:
                key = keys[pos] = row_for_module(fqn, pos)
            self.result.add(key, formula(module, args, kwargs, output))
        return hook

    def _make_unknown_hook(self, fqn: str, end_run: bool = False) -> Callable:
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            if end_run:
                self._position = None
            name = f"module {type(module).__module__}.{type(module).__qualname__} ({fqn or '<root>'})"
            if self.strict:
                raise UncountedModuleError(f"no hook formula for {name}; its work would go uncounted")
            self.result.unknown_ops[name] = self.result.unknown_ops.get(name, 0) + 1
            logger.warning("hooks: no formula for %s: its work is NOT counted", name)
        return hook


def count_hooks(model: nn.Module, tokens: torch.Tensor, start_pos: int = 0, *, strict: bool = False) -> CounterResult:
    """Run one forward of ``model(tokens, start_pos)`` under hooks and return the per-row counts.

    For ``start_pos > 0`` the model must hold a KV cache (``setup_cache``) already filled up to
    ``start_pos``; the keys/values the cache returns set the attention length that is counted.
    """
    with HookCounter(model, strict=strict) as counter, torch.no_grad():
        model(tokens, start_pos)
    return counter.result
