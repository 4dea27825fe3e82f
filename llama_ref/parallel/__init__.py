"""Tensor parallelism over ``torch.distributed`` in Meta's layout (the layout of ``consolidated.NN.pth``).

    from llama_ref.parallel import init_torchrun, load_tp_pretrained, parallelize
    group = init_torchrun()                                    # under torchrun (gloo on CPU, NCCL on CUDA)
    model = load_tp_pretrained(ckpt, group=group)              # each rank reads only its part
    model = parallelize(llama_ref.Llama(config), group)        # or: shard a built model in place
    logits = model(tokens)                                     # every rank: the full fp32 logits

Tensor parallelism is a transform of a built :class:`llama_ref.Llama` (:func:`parallelize`); the model
itself knows nothing of it.
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
from .tp import parallelize, tensor_parallel_llama, tp_group_of

__all__ = [
    "ColumnParallelLinear", "CopyToTensorParallel", "GatherFromTensorParallel",
    "ParallelEmbedding", "ReduceFromTensorParallel",
    "RowParallelLinear", "SHARD_PER_RANK", "SLICED", "TPGroup", "TPLayout",
    "all_gather_last_dim", "all_reduce_sum", "check_device", "check_fits", "check_world_size", "copy_to_tensor_parallel",
    "default_backend", "fake_world", "gather_from_tensor_parallel", "in_torchrun", "init_torchrun",
    "load_tp_pretrained", "parallelize", "plan_rank", "reduce_from_tensor_parallel", "spawn", "tensor_parallel_llama",
    "tp_group_of", "tp_split_dim",
]
