"""Count with forward hooks: one hook per row of :mod:`counters.table`, sizes from the real tensors.

Each row's module gets a hook that reads the sizes of the call it sees (never the config) and evaluates
the row kind's op decomposition on them (source ``shapes``), so a counted forward says what *this*
forward computed: the batch and token count given, the key/value length the cache really returned, the
heads the tensors really have. Hooks do shape arithmetic only (no tensor work), so they cost
microseconds per module and run on ``meta`` models.

A module whose type or ``forward`` is not the one its row describes, and a module that runs but has no
row, is unknown work: an error in strict mode, a listed warning otherwise (never a silent zero).

Tensor-parallel ranks: the parallel layers the table's TP plan names are covered by their base kinds (the
hooks read this rank's local sizes), and each records the collective the plan says it sends, with the
payload of its real output tensor (:meth:`counters.table.Row.measured_collective`).

Positions: a pre-hook on the root resets the run counter, a pre-hook on every decoder layer takes the
next schedule position, so a layer that runs twice is counted once per run.

Training (``training=``): full backward hooks on the same modules evaluate each row's backward ops on the
sizes of the real gradient tensors (phase ``backward``); a checkpointed layer's forward running again
inside the backward is counted by the same forward hooks (phase ``recompute``); the loss row is
evaluated on the logits' size. A weight used more than once in the step (a repeated layer, a tied
embedding) gets its gradient adds in the backward of every use but the last, as autograd runs them.
"""

from __future__ import annotations

import logging
import warnings
from contextlib import AbstractContextManager
from typing import Any, Callable, Optional

import torch
from torch import nn

from . import table as T
from .result import BACKWARD, DECODE, FORWARD, PREFILL, RECOMPUTE, SOURCE_SHAPES, CounterResult
from .training import Training, backward_context, loss_of, trainable

logger = logging.getLogger(__name__)


class UncountedModuleError(RuntimeError):
    """Strict mode: a module ran that no row of the work table covers."""


def _module_name(module: nn.Module, fqn: str) -> str:
    return f"module {type(module).__module__}.{type(module).__qualname__} ({fqn or '<root>'})"


class HookCounter(AbstractContextManager):
    """Context manager: hooks installed on ``__enter__``, removed on ``__exit__``; counts of every
    forward run inside accumulate in :attr:`result`."""

    def __init__(self, model: nn.Module, *, strict: bool = False, backward: bool = False,
                 by_start_pos: bool = False) -> None:
        self.model = model
        self.strict = strict
        self.backward = backward
        # a generation task: each forward is phase "prefill" (start_pos 0) or "decode"
        self.by_start_pos = by_start_pos
        self._phase = FORWARD
        self.result = CounterResult(name="hooks")
        self._handles: list[Any] = []
        self._position: Optional[int] = None
        self._next_position = 0
        self._layers_run: list[int] = []
        # training: per layer, the positions its forward ran at (a checkpointed layer's recomputation
        # pops the latest: backward runs the runs in reverse); per module, its calls (position, call index)
        # for its backward hook; per parameter, the index of its last use in the forward
        self._layer_positions: dict[int, list[int]] = {}
        self._calls: dict[int, list[tuple[Optional[int], int]]] = {}
        self._n_calls = 0
        self._last_use: dict[int, int] = {}

    # ------------------------------------------------------------ install / remove
    def __enter__(self) -> "HookCounter":
        model = self.model
        self._tp = T.tp_world_size(model)  # the collectives a rank sends are the table's TP plan
        covered: dict[str, bool] = {}  # module path -> is a leaf row (covering everything below it)
        for row in T.TOP_ROWS_BEFORE + T.TOP_ROWS_AFTER:
            self._install(model, row.path, row, covered)
        layers = getattr(model, T.LAYERS_PATH, None)
        for i, layer in enumerate(layers if layers is not None else ()):
            prefix = f"{T.LAYERS_PATH}.{i}"
            self._handles.append(layer.register_forward_pre_hook(self._make_block_pre_hook(i)))
            for row in T.BLOCK_ROWS:
                self._install(model, f"{prefix}.{row.path}" if row.path else prefix, row, covered)
        self._handles.append(model.register_forward_pre_hook(self._on_forward_start, with_kwargs=True))
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
        if not row.covers(module):
            self._handles.append(module.register_forward_hook(self._make_unknown_hook(path)))
            return
        if row.kind.read is not None:  # kinds without a reader do no arithmetic of their own
            self._handles.append(module.register_forward_hook(self._make_row_hook(row), with_kwargs=True))
        if self.backward and row.kind.read_backward is not None:
            self._handles.append(module.register_full_backward_hook(self._make_backward_hook(row)))

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._position = None

    # ------------------------------------------------------------ hooks
    def _on_forward_start(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self._position = None
        self._next_position = 0
        self._layers_run = []
        if self.by_start_pos:
            start_pos = args[1] if len(args) > 1 else kwargs.get("start_pos", 0)
            self._phase = PREFILL if start_pos == 0 else DECODE

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
            if backward_context():  # a checkpointed layer recomputing its forward inside the backward
                self._position = self._layer_positions[layer_index].pop()
                return
            self._position = self._next_position
            self._next_position += 1
            self._layers_run.append(layer_index)
            self._layer_positions.setdefault(layer_index, []).append(self._position)
        return hook

    def _make_row_hook(self, row: T.Row) -> Callable:
        kind = row.kind
        block_row = any(row is r for r in T.BLOCK_ROWS)
        has_backward_hook = self.backward and kind.read_backward is not None

        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            key = (self._position if block_row else None, row.name)
            recomputing = backward_context()
            phase = RECOMPUTE if recomputing else self._phase
            self.result.add(key, kind.count(kind.read(module, args, kwargs, output)), SOURCE_SHAPES, phase)
            collective = row.measured_collective(module, output, self._tp)  # a tensor-parallel rank's communication
            if collective is not None:
                self.result.add_collective(key, collective, phase)
            if has_backward_hook and not recomputing:
                self._calls.setdefault(id(module), []).append((key[0], self._n_calls))
                for p in module.parameters():
                    self._last_use[id(p)] = self._n_calls
                self._n_calls += 1
        return hook

    def _make_backward_hook(self, row: T.Row) -> Callable:
        kind = row.kind
        block_row = any(row is r for r in T.BLOCK_ROWS)

        def hook(module: nn.Module, grad_input: tuple, grad_output: tuple) -> None:
            position, call = self._calls[id(module)].pop()  # backward runs a module's calls in reverse
            count = T.sum_ops(row.backward_ops(kind.read_backward(module, grad_input, grad_output)))
            # the gradient of a weight used again later in the step is added to the later use's
            reused = sum(p.numel() for p in module.parameters() if self._last_use[id(p)] > call)
            if reused:
                count = count + T.sum_ops((T._ew("add", reused),))
            self.result.add((position if block_row else None, row.name), count, SOURCE_SHAPES, BACKWARD)
        return hook

    def count_loss(self, logits: torch.Tensor, loss: str) -> None:
        """The loss row, forward and backward, on the logits' real size."""
        row = T.loss_row(loss)
        sizes = T.Elems(int(logits.shape[:-1].numel()), int(logits.shape[-1]))
        self.result.add((None, row.name), row.kind.count(sizes), SOURCE_SHAPES, FORWARD)
        if self.backward:
            self.result.add((None, row.name), T.sum_ops(row.backward_ops(sizes)), SOURCE_SHAPES, BACKWARD)

    def _make_unknown_hook(self, fqn: str) -> Callable:
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            name = _module_name(module, fqn)
            if self.strict:
                raise UncountedModuleError(f"no row of the work table covers {name}; its work would go uncounted")
            self.result.unknown_ops[name] = self.result.unknown_ops.get(name, 0) + 1
            logger.warning("hooks: no row of the work table covers %s: its work is NOT counted", name)
        return hook


def count_hooks(model: nn.Module, tokens: torch.Tensor, start_pos: int = 0, *, strict: bool = False,
                training: Optional[Training] = None) -> CounterResult:
    """Run one forward of ``model(tokens, start_pos)`` (or with ``training``, one training step: forward,
    loss, backward) under hooks and return the per-row counts.

    For ``start_pos > 0`` the model must hold a KV cache (``setup_cache``) already filled up to
    ``start_pos``; the keys/values the cache returns set the attention length that is counted.
    """
    if training is None:
        with HookCounter(model, strict=strict) as counter, torch.no_grad():
            model(tokens, start_pos)
        return counter.result
    if start_pos:
        raise ValueError(f"a training step starts at position 0, got start_pos={start_pos}")
    with trainable(model, training), HookCounter(model, strict=strict, backward=True) as counter,\
            warnings.catch_warnings():
        # The embedding's input (token ids) needs no gradient, so its backward hook fires on the output's:
        # exactly what we want (the sizes of the gradient it scatters), not worth a warning.
        warnings.filterwarnings("ignore", message="Full backward hook is firing when gradients are computed with "
                                "respect to module outputs")
        logits = model(tokens, 0)
        counter.count_loss(logits, training.loss)
        loss_of(logits, tokens, training.loss).backward()
    if any(counter._calls.values()):  # pragma: no cover - a backward hook that never fired
        raise RuntimeError("hooks: a module's backward hook did not fire for every forward call")
    return counter.result
