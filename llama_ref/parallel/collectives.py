"""The three communication steps of Meta's tensor-parallel layout, on ``torch.distributed``.

They use PyTorch's *functional* collectives (the ``_c10d_functional`` ops behind
``torch.distributed._functional_collectives``): they return new tensors, work with gloo (CPU) and NCCL
(CUDA), have meta-device kernels (so a 70B/405B layout runs on ``meta`` with a fake process group), and
each is one dispatcher op with its tensor, so a ``TorchDispatchMode`` (``FlopCounterMode``) sees it:

* all-reduce: ``_c10d_functional.all_reduce.default`` then ``_c10d_functional.wait_tensor.default``;
* all-gather: ``_c10d_functional.all_gather_into_tensor.default`` (gathers on dim 0), ``wait_tensor``,
  then ``aten.view`` / ``aten.permute`` / ``aten.clone`` / ``aten._unsafe_view`` to put the pieces on the
  last dimension.

Each step is a ``torch.autograd.Function`` (Megatron's conjugate pairs, so backward is exact for a loss
computed identically on every rank): copy-to (identity; backward all-reduces the gradient), reduce-from
(all-reduce; backward identity) and gather-from (all-gather on the last dim; backward keeps this rank's
slice). ``torch.jit.trace`` (which fvcore uses) cannot record the collective ops themselves (their group
argument has schema type ``Any``), so the collective runs with the tracer paused and the trace holds one
``prim::PythonOp`` node per step, named after the Function (fvcore: ``prim::PythonOp.ReduceFromTensorParallel``)
with its input and output shapes.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Optional, Union

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives  # noqa: F401  (registers the meta kernels and autograd of the ops)

from .layout import check_world_size

_ops = torch.ops._c10d_functional


@dataclass(frozen=True)
class TPGroup:
    """The process group a tensor-parallel model communicates over: its registered name (what the
    functional collectives take), this process's rank in it and its size. Plain values, so modules
    holding one can be copied and pickled."""

    name: str
    rank: int
    world_size: int

    def __post_init__(self) -> None:
        check_world_size(self.world_size)
        if isinstance(self.rank, bool) or not isinstance(self.rank, numbers.Integral) or not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank!r} is outside a tensor-parallel world of size {self.world_size}")

    @classmethod
    def of(cls, group: Union[None, "TPGroup", dist.ProcessGroup] = None) -> "TPGroup":
        """The ``TPGroup`` of a process group (``None``: the default group of an initialized world)."""
        if isinstance(group, TPGroup):
            return group
        if not dist.is_available() or not dist.is_initialized():
            raise ValueError(
                "torch.distributed is not initialized: run under torchrun (llama_ref.parallel.init_torchrun()), "
                "start ranks with llama_ref.parallel.spawn(...), or use llama_ref.parallel.fake_world(N) for a "
                "meta-device model"
            )
        if group is None:
            group = dist.group.WORLD
        if not isinstance(group, dist.ProcessGroup):
            raise ValueError(f"group must be a torch.distributed ProcessGroup or a TPGroup, got {type(group).__name__}")
        rank = dist.get_rank(group)
        if rank < 0:
            raise ValueError("this process is not a member of the given process group")
        return cls(str(group.group_name), rank, dist.get_world_size(group))


# ---------------------------------------------------------------------------- the collectives
def _outside_tracer(collective, x: torch.Tensor, group: "TPGroup") -> torch.Tensor:
    """``collective(x, group)``, run with ``torch.jit``'s tracer paused (see the module docstring)."""
    state = torch._C._get_tracing_state()
    if state is None:
        return collective(x, group)
    torch._C._set_tracing_state(None)
    try:
        y = collective(x, group)
    finally:
        torch._C._set_tracing_state(state)
    # The tracer must find the Function's output in its record: a view taken with the tracer active is
    # recorded (on the untraced ``y``); ``y`` itself would be unknown, and once autograd marks it as
    # requiring grad the tracer refuses to insert it as a constant.
    return y.view_as(y)


def all_reduce_sum(x: torch.Tensor, group: TPGroup) -> torch.Tensor:
    """Elementwise sum of ``x`` over the ranks, on every rank (a new tensor)."""
    return _ops.wait_tensor(_ops.all_reduce(x.contiguous(), "sum", group.name))


def all_gather_last_dim(x: torch.Tensor, group: TPGroup) -> torch.Tensor:
    """Concatenate every rank's ``x`` along the last dimension, in rank order: (..., d) -> (..., world_size * d)."""
    n = group.world_size
    gathered = _ops.wait_tensor(_ops.all_gather_into_tensor(x.contiguous(), n, group.name))  # (n * x.shape[0], ...)
    gathered = gathered.view(n, *x.shape)  # (n, ..., d)
    return gathered.movedim(0, -2).reshape(*x.shape[:-1], n * x.shape[-1])  # (..., n, d) -> (..., n * d)


class CopyToTensorParallel(torch.autograd.Function):
    """Identity forward. Backward all-reduces the gradient: each rank's column-parallel matmul sees only
    its own slice of the weights, so it computes only its part of d(input)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: TPGroup) -> torch.Tensor:
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return all_reduce_sum(grad, ctx.group), None


class ReduceFromTensorParallel(torch.autograd.Function):
    """All-reduce (sum of the row-parallel partial sums). Backward: identity (every rank already holds
    the full gradient of the replicated output)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: TPGroup) -> torch.Tensor:
        return _outside_tracer(all_reduce_sum, x, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


class GatherFromTensorParallel(torch.autograd.Function):
    """All-gather along the last dimension. Backward: this rank's slice of the gradient."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: TPGroup) -> torch.Tensor:
        ctx.group = group
        return _outside_tracer(all_gather_last_dim, x, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        group = ctx.group
        chunk = grad.shape[-1] // group.world_size
        return grad.narrow(-1, group.rank * chunk, chunk), None


def copy_to_tensor_parallel(x: torch.Tensor, group: TPGroup) -> torch.Tensor:
    # Only when a gradient will flow back: inference runs no op at all here.
    if torch.is_grad_enabled() and x.requires_grad:
        return CopyToTensorParallel.apply(x, group)
    return x


def reduce_from_tensor_parallel(x: torch.Tensor, group: TPGroup) -> torch.Tensor:
    return ReduceFromTensorParallel.apply(x, group)


def gather_from_tensor_parallel(x: torch.Tensor, group: TPGroup) -> torch.Tensor:
    return GatherFromTensorParallel.apply(x, group)


GroupLike = Optional[Union[TPGroup, dist.ProcessGroup]]
