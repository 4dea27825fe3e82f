"""Timing a forward per layer run (and per module): CUDA events on CUDA, ``perf_counter`` elsewhere."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Union

import torch

from ..table import TOP_ROWS_AFTER, TOP_ROWS_BEFORE, RowKey, timed_block_paths
from ..training import backward_context

# Top-level modules timed on their own (the embedding, the final norm, the output head).
TOP_MODULES = tuple(r.path for r in TOP_ROWS_BEFORE + TOP_ROWS_AFTER if r.kind.leaf)

def sync(device: Union[str, torch.device]) -> None:
    """Wait for the device's queued work (a no-op on CPU)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class WallClockTimer:
    """``perf_counter`` marks, synchronizing the device first (a no-op on CPU)."""

    def __init__(self, device: Union[str, torch.device] = "cpu") -> None:
        self.device = torch.device(device)

    def mark(self) -> float:
        sync(self.device)
        return time.perf_counter()

    def synchronize(self) -> None:
        sync(self.device)

    @staticmethod
    def seconds(start: float, end: float) -> float:
        return end - start


class CudaEventTimer:
    """CUDA events recorded on the current stream: marks do not stall the GPU."""

    def __init__(self, device: Union[str, torch.device] = "cuda") -> None:
        self.device = torch.device(device)

    def mark(self):
        ev = torch.cuda.Event(enable_timing=True)
        ev.record()
        return ev

    def synchronize(self) -> None:
        torch.cuda.synchronize(self.device)

    @staticmethod
    def seconds(start, end) -> float:
        return start.elapsed_time(end) / 1e3


def make_timer(device: Union[str, torch.device]):
    device = torch.device(device)
    return CudaEventTimer(device) if device.type == "cuda" else WallClockTimer(device)


class LayerTimer:
    """Times every layer *run* (schedule position) and the top-level modules of one forward.

    Forward pre/post hooks mark the start and end of ``tok_embeddings``, each decoder layer call,
    ``norm`` and ``output``; the root forward's marks give the total, and ``(root)`` is the time
    outside those modules (mask building, RoPE slicing). With ``level="module"`` the leaf modules
    of each block (``timed_block_paths()``) are timed too, keyed by the running block's position.
    Use as a context manager (hooks are removed on exit).
    """

    def __init__(self, model: torch.nn.Module, timer, *, level: str = "layer") -> None:
        if level not in ("layer", "module"):
            raise ValueError(f"level must be 'layer' or 'module', got {level!r}")
        self.model = model
        self.timer = timer
        self.level = level
        self._handles: list = []
        self._marks: list[tuple[RowKey, str, Any]] = []
        self._pos = -1

    def _hook(self, key_fn: Callable[[], RowKey], phase: str):
        def hook(*_args, **_kwargs):
            self._marks.append((key_fn(), phase, self.timer.mark()))
        return hook

    def __enter__(self) -> "LayerTimer":
        m = self.model
        self._handles.append(m.register_forward_pre_hook(self._hook(lambda: (None, "(total)"), "start")))
        self._handles.append(m.register_forward_hook(self._hook(lambda: (None, "(total)"), "end")))
        for name in TOP_MODULES:
            mod = getattr(m, name)
            self._handles.append(mod.register_forward_pre_hook(self._hook(lambda n=name: (None, n), "start")))
            self._handles.append(mod.register_forward_hook(self._hook(lambda n=name: (None, n), "end")))

        def block_pre(*_a):
            self._pos += 1
            self._marks.append(((self._pos, "block"), "start", self.timer.mark()))

        def block_post(*_a):
            self._marks.append(((self._pos, "block"), "end", self.timer.mark()))

        for layer_id in sorted(set(m.schedule)):
            block = m.layers[layer_id]
            self._handles.append(block.register_forward_pre_hook(block_pre))
            self._handles.append(block.register_forward_hook(block_post))
            if self.level == "module":
                for rel in timed_block_paths():
                    sub = block.get_submodule(rel)
                    self._handles.append(sub.register_forward_pre_hook(self._hook(lambda r=rel: (self._pos, r), "start")))
                    self._handles.append(sub.register_forward_hook(self._hook(lambda r=rel: (self._pos, r), "end")))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def forward(self, tokens: torch.Tensor, start_pos: int = 0) -> dict[RowKey, float]:
        """Run one forward; return seconds per row key, plus ``(None, "(total)")`` and ``(None, "(root)")``."""
        self._marks.clear()
        self._pos = -1
        with torch.inference_mode():
            self.model(tokens, start_pos)
        self.timer.synchronize()
        starts: dict[RowKey, Any] = {}
        out: dict[RowKey, float] = {}
        for key, phase, mark in self._marks:
            if phase == "start":
                starts[key] = mark
            else:
                out[key] = out.get(key, 0.0) + self.timer.seconds(starts.pop(key), mark)
        total = out[(None, "(total)")]
        inside = sum(v for (pos, name), v in out.items() if name in TOP_MODULES or name == "block")
        out[(None, "(root)")] = max(0.0, total - inside)
        return out


@dataclass
class Timing:
    """Per-row medians over ``repeats`` forwards after ``warmup`` forwards (seconds)."""

    median: dict[RowKey, float]
    samples: dict[RowKey, list[float]] = field(repr=False)
    warmup: int
    repeats: int

    @property
    def total_s(self) -> float:
        return self.median[(None, "(total)")]

    def rows_dict(self) -> list[dict]:
        return [{"position": k[0], "module": k[1], "measured_s": v} for k, v in self.median.items()]


def time_forward(model: torch.nn.Module, tokens: torch.Tensor, start_pos: int = 0, *, timer=None,
                 warmup: int = 1, repeats: int = 3, level: str = "layer") -> Timing:
    """Median per-row times of ``model(tokens, start_pos)``. A KV cache, if needed, must be set up
    already (each repeat rewrites the same cache slots, so repeats are identical work)."""
    if repeats < 1 or warmup < 0:
        raise ValueError(f"need repeats >= 1 and warmup >= 0, got repeats={repeats}, warmup={warmup}")
    timer = timer or make_timer(tokens.device)
    samples: dict[RowKey, list[float]] = {}
    with LayerTimer(model, timer, level=level) as lt:
        for _ in range(warmup):
            lt.forward(tokens, start_pos)
        for _ in range(repeats):
            for k, v in lt.forward(tokens, start_pos).items():
                samples.setdefault(k, []).append(v)
    return Timing({k: statistics.median(v) for k, v in samples.items()}, samples, warmup, repeats)


# ---------------------------------------------------------------------------- training steps
@dataclass
class StepTiming:
    """Per-part times of the median repeat of a timed training step (seconds): the repeat whose whole step
    took the median time, so the parts add up. ``forward``/``backward`` map a row key
    (``(position, "block")`` for a decoder-layer run, ``(None, "output")`` for the head) to its time;
    ``totals`` holds ``forward`` (the model's forward and the loss), ``backward`` and ``step``;
    ``step_samples`` every repeat's step time."""

    forward: dict[RowKey, float]
    backward: dict[RowKey, float]
    totals: dict[str, float]
    step_samples: list[float] = field(repr=False)
    warmup: int
    repeats: int


class StepTimer:
    """Times one training step per decoder-layer run, forward and backward, and the output head.

    A layer run's forward is timed by forward pre/post hooks; its backward by a full backward pre-hook
    (its output's gradient is ready) and a full backward hook (its input's gradient is done), which is
    where autograd runs that layer's backward - with activation checkpointing, the layer's recomputed
    forward included (that is the executed work). Decoder layers form one chain, so autograd runs their
    backwards in the reverse order of their forwards: the k-th block backward is layer run n-1-k.
    """

    def __init__(self, model: torch.nn.Module, timer) -> None:
        self.model = model
        self.timer = timer
        self._handles: list = []
        self._marks: list[tuple[str, RowKey, str, Any]] = []  # (pass, key, start|end, mark)
        self._fwd_pos = -1
        self._bwd_count = 0
        self._n_runs = len(model.schedule)

    def _mark(self, pass_: str, key_fn: Callable[[], RowKey], phase: str):
        def hook(*_args, **_kwargs):
            self._marks.append((pass_, key_fn(), phase, self.timer.mark()))
        return hook

    def __enter__(self) -> "StepTimer":
        m = self.model

        def block_pre(*_a):
            if not backward_context():  # a recomputed forward belongs to the backward
                self._fwd_pos += 1
                self._marks.append(("forward", (self._fwd_pos, "block"), "start", self.timer.mark()))

        def block_post(*_a):
            if not backward_context():
                self._marks.append(("forward", (self._fwd_pos, "block"), "end", self.timer.mark()))

        def bwd_key() -> RowKey:
            return (self._n_runs - 1 - self._bwd_count, "block")

        def bwd_end(*_a):
            self._marks.append(("backward", bwd_key(), "end", self.timer.mark()))
            self._bwd_count += 1

        for layer_id in sorted(set(m.schedule)):
            block = m.layers[layer_id]
            self._handles += [block.register_forward_pre_hook(block_pre), block.register_forward_hook(block_post),
                              block.register_full_backward_pre_hook(self._mark("backward", bwd_key, "start")),
                              block.register_full_backward_hook(bwd_end)]
        head = (None, "output")
        self._handles += [m.output.register_forward_pre_hook(self._mark("forward", lambda: head, "start")),
                          m.output.register_forward_hook(self._mark("forward", lambda: head, "end")),
                          m.output.register_full_backward_pre_hook(self._mark("backward", lambda: head, "start")),
                          m.output.register_full_backward_hook(self._mark("backward", lambda: head, "end"))]
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def step(self, tokens: torch.Tensor, loss_fn: Callable[[torch.Tensor], torch.Tensor]):
        """One forward, ``loss_fn(logits)`` and backward; returns ``(forward, backward, totals)`` seconds."""
        self._marks.clear()
        self._fwd_pos, self._bwd_count = -1, 0
        self.model.zero_grad(set_to_none=True)
        t0 = self.timer.mark()
        loss = loss_fn(self.model(tokens))
        t1 = self.timer.mark()
        loss.backward()
        t2 = self.timer.mark()
        self.timer.synchronize()
        if self._fwd_pos + 1 != self._n_runs or self._bwd_count != self._n_runs:
            raise RuntimeError(f"timed {self._fwd_pos + 1} forward and {self._bwd_count} backward layer runs of "
                               f"{self._n_runs}: a layer ran outside the chain the timer assumes")
        parts: dict[str, dict[RowKey, float]] = {"forward": {}, "backward": {}}
        starts: dict[tuple[str, RowKey], Any] = {}
        for pass_, key, phase, mark in self._marks:
            if phase == "start":
                starts[(pass_, key)] = mark
            else:
                seconds = self.timer.seconds(starts.pop((pass_, key)), mark)
                parts[pass_][key] = parts[pass_].get(key, 0.0) + seconds
        totals = {"forward": self.timer.seconds(t0, t1), "backward": self.timer.seconds(t1, t2),
                  "step": self.timer.seconds(t0, t2)}
        return parts["forward"], parts["backward"], totals


def time_training_step(model: torch.nn.Module, tokens: torch.Tensor, loss_fn: Callable[[torch.Tensor], torch.Tensor],
                       *, timer=None, warmup: int = 1, repeats: int = 3) -> StepTiming:
    """Per-part times of the median repeat of ``loss_fn(model(tokens)).backward()`` (parameters must
    require grad; their gradients are dropped before every step)."""
    if repeats < 1 or warmup < 0:
        raise ValueError(f"need repeats >= 1 and warmup >= 0, got repeats={repeats}, warmup={warmup}")
    timer = timer or make_timer(tokens.device)
    runs = []
    with StepTimer(model, timer) as st:
        for i in range(warmup + repeats):
            run = st.step(tokens, loss_fn)
            if i >= warmup:
                runs.append(run)
    model.zero_grad(set_to_none=True)
    steps = [totals["step"] for _, _, totals in runs]
    forward, backward, totals = runs[steps.index(statistics.median_low(steps))]
    return StepTiming(forward, backward, totals, steps, warmup, repeats)
