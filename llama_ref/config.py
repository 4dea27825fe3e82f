"""Model configuration: one frozen dataclass with Meta's names, presets, HF and Meta readers."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Union

PathOrDict = Union[str, os.PathLike, Mapping[str, Any]]


@dataclass(frozen=True)
class LlamaConfig:
    """Shape of a Llama-2/3 model.

    Frozen on purpose: ``head_dim`` and ``n_rep`` are derived properties, so they can never
    disagree with ``dim``/``n_heads``/``n_kv_heads``. Use ``dataclasses.replace`` (or
    :meth:`replace`) to get a modified copy; it re-runs validation.
    """

    dim: int
    n_layers: int
    n_heads: int
    vocab_size: int
    hidden_dim: int  # FFN inner width (HF: intermediate_size)
    n_kv_heads: Optional[int] = None  # None means multi-head attention (= n_heads)
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_seq_len: int = 4096
    name: str = dataclasses.field(default="custom", compare=False)

    def __post_init__(self) -> None:
        if self.n_kv_heads is None:
            object.__setattr__(self, "n_kv_heads", self.n_heads)
        for field in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "hidden_dim", "max_seq_len"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"LlamaConfig.{field} must be an int, got {value!r}")
            if value <= 0:
                raise ValueError(f"LlamaConfig.{field} must be positive, got {value}")
        for field in ("norm_eps", "rope_theta"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"LlamaConfig.{field} must be a positive number, got {value!r}")
        if self.dim % self.n_heads:
            raise ValueError(f"dim={self.dim} is not divisible by n_heads={self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} is not divisible by n_kv_heads={self.n_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(
                f"head_dim={self.head_dim} (dim {self.dim} / n_heads {self.n_heads}) must be even: "
                "RoPE rotates pairs of channels"
            )

    # Derived values: properties, never fields, so they cannot be set inconsistently.
    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def n_rep(self) -> int:
        """How many query heads share one key/value head (1 for MHA)."""
        return self.n_heads // self.n_kv_heads

    @property
    def kv_dim(self) -> int:
        """Width of the k and v projections: n_kv_heads * head_dim."""
        return self.n_kv_heads * self.head_dim

    def replace(self, **changes: Any) -> "LlamaConfig":
        fields = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(changes) - fields)
        if unknown:
            derived = {"head_dim", "n_rep", "kv_dim"}
            hint = " (derived from dim, n_heads and n_kv_heads; change those instead)" if set(unknown) & derived else ""
            raise ValueError(f"LlamaConfig has no settable field {', '.join(unknown)}{hint}")
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    # ------------------------------------------------------------------ readers
    @classmethod
    def from_preset(cls, name: str) -> "LlamaConfig":
        try:
            return PRESETS[name]
        except KeyError:
            raise ValueError(f"unknown preset {name!r}; known presets: {', '.join(sorted(PRESETS))}") from None

    @classmethod
    def from_hf(cls, path_or_dict: PathOrDict) -> "LlamaConfig":
        """Read a Hugging Face ``config.json`` (a directory holding one, the file, or a dict)."""
        if not isinstance(path_or_dict, (Mapping, str, os.PathLike)) and hasattr(path_or_dict, "to_dict"):
            path_or_dict = path_or_dict.to_dict()  # a live transformers.LlamaConfig
        cfg, source = _read_json(path_or_dict, "config.json")
        model_type = cfg.get("model_type", "llama")
        if model_type != "llama":
            raise ValueError(f"{source}: model_type is {model_type!r}, only 'llama' is supported")
        required = ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size", "intermediate_size")
        missing = [k for k in required if k not in cfg]
        if missing:
            raise ValueError(f"{source}: missing required field(s) {', '.join(missing)}")
        act = cfg.get("hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"{source}: hidden_act={act!r} is not supported (Llama uses 'silu')")
        for flag in ("attention_bias", "mlp_bias", "tie_word_embeddings"):
            if cfg.get(flag):
                raise ValueError(f"{source}: {flag}=true is not supported by the Llama-2 architecture here")
        # transformers >= 4.45 may nest RoPE settings in rope_parameters; older files use rope_theta/rope_scaling.
        rope_params = cfg.get("rope_parameters") or {}
        rope_scaling = cfg.get("rope_scaling") or {}
        rope_type = rope_params.get("rope_type") or rope_scaling.get("rope_type") or rope_scaling.get("type") or "default"
        if rope_type != "default":
            raise ValueError(f"{source}: rope scaling type {rope_type!r} is not supported (only plain RoPE)")
        # transformers 5.x writes only rope_parameters.rope_theta; older files only a top-level rope_theta.
        rope_theta = rope_params.get("rope_theta")
        if rope_theta is None:
            rope_theta = cfg.get("rope_theta")
        if rope_theta is None:
            rope_theta = 10000.0
        if isinstance(rope_theta, bool) or not isinstance(rope_theta, (int, float)):
            raise ValueError(f"{source}: rope_theta must be a number, got {rope_theta!r}")
        n_heads = cfg["num_attention_heads"]
        head_dim = cfg.get("head_dim")
        if head_dim is not None and head_dim * n_heads != cfg["hidden_size"]:
            raise ValueError(
                f"{source}: head_dim={head_dim} with {n_heads} heads does not equal hidden_size="
                f"{cfg['hidden_size']}; decoupled head_dim is not supported"
            )
        return cls(
            dim=cfg["hidden_size"],
            n_layers=cfg["num_hidden_layers"],
            n_heads=n_heads,
            # Absent or null means MHA; an explicit 0 is passed on so validation rejects it (no silent MHA).
            n_kv_heads=n_heads if cfg.get("num_key_value_heads") is None else cfg["num_key_value_heads"],
            vocab_size=cfg["vocab_size"],
            hidden_dim=cfg["intermediate_size"],
            norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope_theta),
            # 2048 is transformers' LlamaConfig default, i.e. what HF would assume for this file.
            max_seq_len=cfg.get("max_position_embeddings", 2048),
            name=cfg.get("_name_or_path") or "hf",
        )

    @classmethod
    def from_meta(
        cls,
        path_or_dict: PathOrDict,
        *,
        vocab_size: Optional[int] = None,
        max_seq_len: int = 4096,
    ) -> "LlamaConfig":
        """Read Meta's ``params.json``.

        Meta's Llama-2 files say ``"vocab_size": -1`` (the tokenizer decides); pass
        ``vocab_size`` then (the checkpoint loader reads it off ``tok_embeddings``).
        ``max_seq_len`` is not in the file: Llama-2 was trained with 4096.
        """
        params, source = _read_json(path_or_dict, "params.json")
        missing = [k for k in ("dim", "n_layers", "n_heads") if k not in params]
        if missing:
            raise ValueError(f"{source}: missing required field(s) {', '.join(missing)}")
        if params.get("use_scaled_rope"):
            raise ValueError(f"{source}: use_scaled_rope=true (Llama-3.1 RoPE scaling) is not supported")
        file_vocab = params.get("vocab_size", -1)
        if file_vocab is not None and (isinstance(file_vocab, bool) or not isinstance(file_vocab, int)):
            raise ValueError(f"{source}: vocab_size must be an int, got {file_vocab!r}")
        if vocab_size is None:
            if file_vocab is None or file_vocab <= 0:
                raise ValueError(
                    f"{source}: vocab_size is {file_vocab!r}; pass vocab_size= (the tokenizer's size, "
                    "or tok_embeddings.weight.shape[0] of the checkpoint)"
                )
            vocab_size = file_vocab
        elif file_vocab not in (None, -1) and file_vocab != vocab_size:
            raise ValueError(f"{source}: vocab_size {file_vocab} does not match the given vocab_size={vocab_size}")
        return cls(
            dim=params["dim"],
            n_layers=params["n_layers"],
            n_heads=params["n_heads"],
            n_kv_heads=params["n_heads"] if params.get("n_kv_heads") is None else params["n_kv_heads"],
            vocab_size=vocab_size,
            hidden_dim=meta_ffn_hidden_dim(
                params["dim"], params.get("multiple_of", 256), params.get("ffn_dim_multiplier")
            ),
            norm_eps=params.get("norm_eps", 1e-5),
            rope_theta=float(params.get("rope_theta", 10000.0)),
            max_seq_len=max_seq_len,
            name="meta",
        )


def meta_ffn_hidden_dim(dim: int, multiple_of: int, ffn_dim_multiplier: Optional[float] = None) -> int:
    """FFN width exactly as Meta's ``FeedForward.__init__`` computes it.

    SwiGLU has three matrices instead of two, so the nominal 4*dim is scaled by 2/3 to keep the
    parameter count, optionally multiplied, then rounded *up* to a multiple of ``multiple_of``.
    """
    if isinstance(multiple_of, bool) or not isinstance(multiple_of, int) or multiple_of <= 0:
        raise ValueError(f"multiple_of must be a positive int, got {multiple_of!r}")
    if ffn_dim_multiplier is not None and (
        isinstance(ffn_dim_multiplier, bool) or not isinstance(ffn_dim_multiplier, (int, float)) or not ffn_dim_multiplier > 0
    ):
        raise ValueError(f"ffn_dim_multiplier must be a positive number or None, got {ffn_dim_multiplier!r}")
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def _read_json(path_or_dict: PathOrDict, default_name: str) -> tuple[dict, str]:
    if isinstance(path_or_dict, Mapping):
        return dict(path_or_dict), "config dict"
    if not isinstance(path_or_dict, (str, os.PathLike)):
        raise ValueError(f"expected a path to {default_name}, its directory, or a dict; got {type(path_or_dict).__name__}")
    path = os.fspath(path_or_dict)
    if os.path.isdir(path):
        path = os.path.join(path, default_name)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no {default_name} at {path}")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data, path


PRESETS: dict[str, LlamaConfig] = {
    "llama-2-7b": LlamaConfig(
        name="llama-2-7b", dim=4096, n_layers=32, n_heads=32, n_kv_heads=32, vocab_size=32000, hidden_dim=11008
    ),
    "llama-2-13b": LlamaConfig(
        name="llama-2-13b", dim=5120, n_layers=40, n_heads=40, n_kv_heads=40, vocab_size=32000, hidden_dim=13824
    ),
    "llama-2-70b": LlamaConfig(
        name="llama-2-70b", dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, vocab_size=32000, hidden_dim=28672
    ),
    "llama-3-8b": LlamaConfig(
        name="llama-3-8b", dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, vocab_size=128256, hidden_dim=14336,
        rope_theta=500000.0, max_seq_len=8192,
    ),
    # Small grouped-query config for tests: 4 query heads share 2 kv heads (n_rep=2).
    "tiny": LlamaConfig(
        name="tiny", dim=64, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=256, hidden_dim=176, max_seq_len=128
    ),
}
