"""Count with forward hooks: one hook per row of :mod:`counters.table`, sizes from the real tensors.

Each row's module gets a hook that reads the sizes of the call it sees (never the config) and evaluates
the row kind's op decomposition on them (source ``shapes``), so a counted forward says what *this*
forward computed: the batch and token count given, the key/value length the cache really returned, the
heads the tensors really have. Hooks do shape arithmetic only (no tensor work), so they cost
microseconds per module and run on ``meta`` models.

A module whose type or ``forward`` is not the one its row describes, and a module that runs but has no
row, is unknown work: an error in strict mode, a listed warning otherwise (never a silent zero).

Positions: a pre-hook on the root resets the run counter, a pre-hook on every decoder layer takes the
next schedule position, so a layer that runs twice is counted once per run.
"""

from __future__ import annotations

import logging
from contextlib import AbstractContextManager
from typing import Any, Callable, Optional

import torch
from torch import nn

from . import table as T
from .result import SOURCE_SHAPES, CounterResult

logger = logging.getLogger(__name__)


class UncountedModuleError(RuntimeError):
    """Strict mode: a module ran that no row of the work table covers."""


def _module_name(module: nn.Module, fqn: str) -> str:
    return f"module {type(module).__module__}.{type(module).__qualname__} ({fqn or '<root>'})"


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
        model = self.model
        covered: dict[str, bool] = {}  # module path -> is a leaf row (covering everything below it)
        for row in T.TOP_ROWS_BEFORE + T.TOP_ROWS_AFTER:
            self._install(model, row.path, row, covered)
        layers = getattr(model, T.LAYERS_PATH, None)
        for i, layer in enumerate(layers if layers is not None else ()):
            prefix = f"{T.LAYERS_PATH}.{i}"
            self._handles.append(layer.register_forward_pre_hook(self._make_block_pre_hook(i)))
            for row in T.BLOCK_ROWS:
                self._install(model, f"{prefix}.{row.path}" if row.path else prefix, row, covered)
        self._handles.append(model.register_forward_pre_hook(self._on_forward_start))
        self._handles.append(model.register_forward_hook(self._on_forward_end))
        # Anything else that runs is work no row describes.
        leaves = tuple(p + "." for p, leaf in covered.items() if leaf)
        for fqn, module in model.named_modules():
            if fqn in covered or fqn.startswith(leaves) or fqn == T.LAYERS_PATH or fqn.split(".")[0] in T.STATE_PATHS:
                continue  # the layer list and the KV caches are containers / state, never called
            self._handles.append(module.register_forward_hook(self._make_unknown_hook(fqn)))
        return self

    def _install(self, model: nn.Module, path: str, row: T.Row, covered: dict[str, bool]) -> None:
        try:
            module = model.get_submodule(path)
        except AttributeError:
            return  # the model has no such module (e.g. a pruned variant): it cannot run, so it costs nothing
        covered[path] = row.kind.leaf
        if not row.kind.covers(module):
            self._handles.append(module.register_forward_hook(self._make_unknown_hook(path)))
        elif row.kind.read is not None:  # kinds without a reader do no arithmetic of their own
            self._handles.append(module.register_forward_hook(self._make_row_hook(row), with_kwargs=True))

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

    def _make_block_pre_hook(self, layer_index: int) -> Callable:
        def hook(module: nn.Module, args: tuple) -> None:
            self._position = self._next_position
            self._next_position += 1
            self._layers_run.append(layer_index)
        return hook

    def _make_row_hook(self, row: T.Row) -> Callable:
        kind = row.kind
        block_row = any(row is r for r in T.BLOCK_ROWS)

        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            key = (self._position if block_row else None, row.name)
            self.result.add(key, kind.count(kind.read(module, args, kwargs, output)), SOURCE_SHAPES)
        return hook

    def _make_unknown_hook(self, fqn: str) -> Callable:
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            name = _module_name(module, fqn)
            if self.strict:
                raise UncountedModuleError(f"no row of the work table covers {name}; its work would go uncounted")
            self.result.unknown_ops[name] = self.result.unknown_ops.get(name, 0) + 1
            logger.warning("hooks: no row of the work table covers %s: its work is NOT counted", name)
        return hook


def count_hooks(model: nn.Module, tokens: torch.Tensor, start_pos: int = 0, *, strict: bool = False) -> CounterResult:
    """Run one forward of ``model(tokens, start_pos)`` under hooks and return the per-row counts.

    For ``start_pos > 0`` the model must hold a KV cache (``setup_cache``) already filled up to
    ``start_pos``; the keys/values the cache returns set the attention length that is counted.
    """
    with HookCounter(model, strict=strict) as counter, torch.no_grad():
        model(tokens, start_pos)
    return counter.result
