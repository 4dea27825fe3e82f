"""Tensor parallelism over ``torch.distributed`` in Meta's layout (the layout of ``consolidated.NN.pth``).

    from llama_ref.parallel import TensorParallelLlama, init_torchrun
    group = init_torchrun()                                    # under torchrun (gloo on CPU, NCCL on CUDA)
    model = TensorParallelLlama.from_pretrained(ckpt, group=group)   # each rank reads only its part
    logits = model(tokens)                                     # every rank: the full fp32 logits

The single-process :class:`llama_ref.Llama` stays the default; nothing here is imported by it.
"""

from .collectives import (
    CopyToTensorParallel,
    GatherFromTensorParallel,
    ReduceFromTensorParallel,
    TPGroup,
    all_gather_last_dim,
    all_reduce_sum,
    copy_to_tensor_parallel,
    gather_from_tensor_parallel,
    reduce_from_tensor_parallel,
)
from .launch import default_backend, fake_world, in_torchrun, init_torchrun, spawn
from .layers import ColumnParallelLinear, ParallelEmbedding, RowParallelLinear
from .layout import TPLayout, check_world_size, tp_split_dim
from .load import SHARD_PER_RANK, SLICED, load_tp_pretrained, plan_rank
from .memory import check_device, check_fits
from .model import ParallelAttention, ParallelFeedForward, ParallelTransformerBlock, TensorParallelLlama

__all__ = [
    "ColumnParallelLinear", "CopyToTensorParallel", "GatherFromTensorParallel", "ParallelAttention",
    "ParallelEmbedding", "ParallelFeedForward", "ParallelTransformerBlock", "ReduceFromTensorParallel",
    "RowParallelLinear", "SHARD_PER_RANK", "SLICED", "TPGroup", "TPLayout", "TensorParallelLlama",
    "all_gather_last_dim", "all_reduce_sum", "check_device", "check_fits", "check_world_size", "copy_to_tensor_parallel",
    "default_backend", "fake_world", "gather_from_tensor_parallel", "in_torchrun", "init_torchrun",
    "load_tp_pretrained", "plan_rank", "reduce_from_tensor_parallel", "spawn", "tp_split_dim",
]
