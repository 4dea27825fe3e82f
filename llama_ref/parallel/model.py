"""One rank of a tensor-parallel Llama: the single-process modules with fewer heads and a narrower FFN.

Every ``forward`` here is the single-process one (``Attention.forward``, ``FeedForward.forward``,
``TransformerBlock.forward``, ``Llama.forward``): a rank simply has ``n_heads / N`` query heads,
``n_kv_heads / N`` kv heads, ``hidden_dim / N`` FFN channels, ``dim / N`` embedding columns and
``vocab_size / N`` output rows, and its parallel layers communicate. Parameter names are the
single-process (Meta) names, so rank k's state dict has exactly the keys of Meta's ``consolidated.k.pth``.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from ..attention import Attention, AttentionCore
from ..block import TransformerBlock
from ..config import LlamaConfig
from ..layers import FeedForward, GatedSiLU, RMSNorm
from ..model import DeviceLike, Llama
from ..rope import RotaryEmbedding
from ..schedule import ScheduleSpec
from .collectives import GroupLike, TPGroup
from .layers import ColumnParallelLinear, ParallelEmbedding, RowParallelLinear
from .layout import TPLayout
from .memory import check_device, check_fits


class ParallelAttention(Attention):
    """This rank's heads: wq/wk/wv split by head (column-parallel), wo by input channel (row-parallel)."""

    def __init__(self, config: LlamaConfig, group: TPGroup, kernel: str = "math", device=None, dtype=None) -> None:
        nn.Module.__init__(self)
        layout = TPLayout(config, group.world_size)
        self.n_heads = layout.n_heads
        self.n_kv_heads = layout.n_kv_heads
        self.n_rep = config.n_rep  # a rank holds whole groups: its query heads and the kv heads they share
        self.head_dim = config.head_dim
        q_dim = config.n_heads * config.head_dim
        self.wq = ColumnParallelLinear(config.dim, q_dim, group, device=device, dtype=dtype)
        self.wk = ColumnParallelLinear(config.dim, config.kv_dim, group, device=device, dtype=dtype)
        self.wv = ColumnParallelLinear(config.dim, config.kv_dim, group, device=device, dtype=dtype)
        self.wo = RowParallelLinear(q_dim, config.dim, group, device=device, dtype=dtype)
        self.rope = RotaryEmbedding()
        self.core = AttentionCore(config.n_rep, kernel)


class ParallelFeedForward(FeedForward):
    """SwiGLU on this rank's FFN channels: w1/w3 column-parallel, w2 row-parallel (one all-reduce)."""

    def __init__(self, dim: int, hidden_dim: int, group: TPGroup, device=None, dtype=None) -> None:
        nn.Module.__init__(self)
        self.w1 = ColumnParallelLinear(dim, hidden_dim, group, device=device, dtype=dtype)
        self.w2 = RowParallelLinear(hidden_dim, dim, group, device=device, dtype=dtype)
        self.w3 = ColumnParallelLinear(dim, hidden_dim, group, device=device, dtype=dtype)
        self.act = GatedSiLU()


class ParallelTransformerBlock(TransformerBlock):
    """A decoder layer with parallel attention and FFN; the norms and residuals are replicated work."""

    def __init__(self, layer_id: int, config: LlamaConfig, group: TPGroup, kernel: str = "math",
                 device=None, dtype=None) -> None:
        nn.Module.__init__(self)
        self.layer_id = layer_id
        self.attention = ParallelAttention(config, group, kernel, device=device, dtype=dtype)
        self.feed_forward = ParallelFeedForward(config.dim, config.hidden_dim, group, device=device, dtype=dtype)
        self.attention_norm = RMSNorm(config.dim, config.norm_eps, device=device, dtype=dtype)
        self.ffn_norm = RMSNorm(config.dim, config.norm_eps, device=device, dtype=dtype)


class TensorParallelLlama(Llama):
    """Rank ``group.rank`` of a ``group.world_size``-way tensor-parallel Llama (Meta's layout).

    Every rank builds its own instance and runs every forward in lockstep with the others (same tokens,
    same ``start_pos``); every rank gets the full fp32 logits. Caches, schedules, both attention kernels,
    ``generate`` (give every rank the same prompts, and the same seeded generator when sampling) and the
    meta device work as for :class:`Llama`.

    Args:
        config: the *full* model's shape; ``self.config`` is that full config.
        group: a ``torch.distributed`` process group (default: the initialized default group) or a
            :class:`TPGroup`. Bad world sizes raise a ``ValueError`` naming the numbers (see ``TPLayout``).
        others: as for :class:`Llama`; ``device``/``dtype`` are those of this rank's weights.
    """

    def __init__(self, config: LlamaConfig, *, group: GroupLike = None, schedule: ScheduleSpec = None,
                 device: DeviceLike = None, dtype: Optional[torch.dtype] = None, attn_kernel: str = "math",
                 compute_dtype: Optional[torch.dtype] = None) -> None:
        if not isinstance(config, LlamaConfig):
            raise ValueError(f"config must be a LlamaConfig, got {type(config).__name__}")
        group = TPGroup.of(group)
        layout = TPLayout(config, group.world_size)  # every divisibility problem, before anything is built
        try:
            device = None if device is None else torch.device(device)
        except (RuntimeError, TypeError) as e:
            raise ValueError(f"device={device!r} is not a valid torch device ({e})") from None
        check_device(device)
        # Llama.__init__ sets up everything that is not a weight (schedule, cache slots, the RoPE table,
        # argument checks). Its full-size modules are built on the meta device (no memory) and replaced
        # below by this rank's shards, in the same places, so names and order are the single-process ones.
        super().__init__(config, schedule=schedule, device="meta", dtype=dtype, attn_kernel=attn_kernel,
                         compute_dtype=compute_dtype)
        self.group = group
        weight_dtype = dtype or torch.get_default_dtype()
        local_numel = sum(math.prod(layout.local_shape(n, p.shape)) for n, p in self.named_parameters())
        check_fits(local_numel * weight_dtype.itemsize, device or torch.device("cpu"), group)
        self.tok_embeddings = ParallelEmbedding(config.vocab_size, config.dim, group, device=device, dtype=dtype)
        self.layers = nn.ModuleList(
            ParallelTransformerBlock(i, config, group, attn_kernel, device=device, dtype=dtype)
            for i in range(config.n_layers)
        )
        self.norm = RMSNorm(config.dim, config.norm_eps, device=device, dtype=dtype)
        self.output = ColumnParallelLinear(config.dim, config.vocab_size, group, gather_output=True,
                                           device=device, dtype=dtype)
        self.init_buffers()  # the RoPE table next to this rank's weights

    @property
    def layout(self) -> TPLayout:
        return TPLayout(self.config, self.group.world_size)

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_single(cls, model: Llama, *, group: GroupLike = None, device: DeviceLike = None) -> "TensorParallelLlama":
        """This rank's shard of a single-process model (weights copied; same schedule, kernel, dtypes)."""
        if not isinstance(model, Llama) or isinstance(model, TensorParallelLlama):
            raise ValueError(f"from_single needs a single-process Llama, got {type(model).__name__}")
        group = TPGroup.of(group)
        device = model.device if device is None else torch.device(device)
        tp = cls(model.config, group=group, schedule=model.schedule, device="meta",
                 dtype=model.tok_embeddings.weight.dtype, attn_kernel=model.attn_kernel,
                 compute_dtype=model._compute_dtype)
        state = tp.layout.shard_state_dict(model.state_dict(), group.rank)
        tp.load_state_dict({k: v.to(device) for k, v in state.items()}, strict=True, assign=True)
        tp.init_buffers()
        return tp.train(model.training)

    @classmethod
    def from_pretrained(cls, path, *, group: GroupLike = None, device: DeviceLike = "cpu",
                        dtype: Optional[torch.dtype] = None, **kwargs) -> "TensorParallelLlama":
        """Load this rank's part of a checkpoint directory (see :func:`llama_ref.parallel.load_tp_pretrained`)."""
        from .load import load_tp_pretrained

        return load_tp_pretrained(path, group=group, device=device, dtype=dtype, **kwargs)

    @classmethod
    def from_hf(cls, hf_model, *, group: GroupLike = None, **kwargs) -> "TensorParallelLlama":
        """This rank's shard of a live ``transformers`` ``LlamaForCausalLM``."""
        return cls.from_single(Llama.from_hf(hf_model, **kwargs), group=group)
