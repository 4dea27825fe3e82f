"""Model configuration: one frozen dataclass with Meta's names, RoPE scaling, presets, and the
entry points for HF ``config.json`` and Meta ``params.json`` (parsed in :mod:`llama_ref.config_files`)."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any, Mapping, Optional

from .config_files import (MAX_SIZE, PathOrDict, hf_config_fields, meta_config_fields, meta_ffn_hidden_dim, read_json,
                           with_source)
from .hub import hub_config_path, is_hub_id
from .rope_scaling import RopeScaling, positive_finite

__all__ = ["FAMILIES", "Family", "LlamaConfig", "MAX_SIZE", "PRESETS", "RopeScaling", "family_of", "meta_ffn_hidden_dim"]



def _show_int(value: int) -> str:
    """An int for a message: in full up to 30 digits, else by its digit count (str() of an int of more
    than 4300 digits raises, and a message must stay one readable line)."""
    if abs(value) < 10**30:
        return str(value)
    if abs(value) < 10**4000:
        return f"an int of {len(str(abs(value)))} digits"
    return "an int of over 4000 digits"

@dataclass(frozen=True)
class LlamaConfig:
    """Shape of a Llama-2/3 model.

    Frozen on purpose: ``n_rep`` and ``kv_dim`` are properties, and ``head_dim`` is derived as
    ``dim // n_heads`` unless given explicitly (transformers' ``head_dim``; e.g. a tensor-parallel
    rank with fewer heads of the same width). Use :meth:`replace` for a modified copy: it re-derives
    a derived ``head_dim`` and keeps an explicit one. (``dataclasses.replace`` passes the current
    ``head_dim`` back in, which makes it explicit: prefer :meth:`replace`.)

    ``rope_scaling``: ``None`` is plain RoPE, else a :class:`RopeScaling`.
    ``tie_word_embeddings``: the output head reuses the token-embedding matrix (one parameter).
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
    rope_scaling: Optional[RopeScaling] = None
    tie_word_embeddings: bool = False
    head_dim: Optional[int] = None  # None: dim // n_heads
    name: str = dataclasses.field(default="custom", compare=False)
    # Whether head_dim was given (kept by replace) or derived (re-derived by replace). Two configs
    # with the same head_dim describe the same model either way, hence compare=False.
    _head_dim_explicit: bool = dataclasses.field(default=False, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.n_kv_heads is None:
            object.__setattr__(self, "n_kv_heads", self.n_heads)
        for field in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "hidden_dim", "max_seq_len"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"LlamaConfig.{field} must be an int, got {value!r}")
            if value <= 0:
                raise ValueError(f"LlamaConfig.{field} must be positive, got {_show_int(value)}")
            if value > MAX_SIZE:
                raise ValueError(f"LlamaConfig.{field} must be at most 2**63 - 1 (torch sizes and positions are "
                                 f"64-bit), got {_show_int(value)}")
        for field in ("norm_eps", "rope_theta"):
            value = getattr(self, field)
            if not positive_finite(value):
                raise ValueError(f"LlamaConfig.{field} must be a positive number, got {value!r}")
        if not isinstance(self.tie_word_embeddings, bool):
            raise ValueError(f"LlamaConfig.tie_word_embeddings must be a bool, got {self.tie_word_embeddings!r}")
        if self.rope_scaling is not None and not isinstance(self.rope_scaling, RopeScaling):
            raise ValueError(f"LlamaConfig.rope_scaling must be a RopeScaling or None, got {self.rope_scaling!r} "
                             "(e.g. RopeScaling.llama3(factor=8.0))")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} is not divisible by n_kv_heads={self.n_kv_heads}")
        self._set_head_dim()

    def _set_head_dim(self) -> None:
        hd = self.head_dim
        explicit = hd is not None
        if explicit:
            if isinstance(hd, bool) or not isinstance(hd, int) or hd <= 0:
                raise ValueError(f"LlamaConfig.head_dim must be a positive int or None, got {hd!r}")
            if hd > MAX_SIZE:
                raise ValueError(f"LlamaConfig.head_dim must be at most 2**63 - 1 (torch sizes are 64-bit), "
                                 f"got {_show_int(hd)}")
            if hd % 2:
                raise ValueError(f"head_dim={hd} must be even: RoPE rotates pairs of channels")
        else:
            if self.dim % self.n_heads:
                raise ValueError(f"dim={self.dim} is not divisible by n_heads={self.n_heads} "
                                 "(give head_dim explicitly for heads narrower or wider than dim / n_heads)")
            hd = self.dim // self.n_heads
            if hd % 2:
                raise ValueError(f"head_dim={hd} (dim {self.dim} / n_heads {self.n_heads}) must be even: "
                                 "RoPE rotates pairs of channels")
        object.__setattr__(self, "head_dim", hd)
        object.__setattr__(self, "_head_dim_explicit", explicit)

    # Derived values: properties, never fields, so they cannot be set inconsistently.
    @property
    def n_rep(self) -> int:
        """How many query heads share one key/value head (1 for MHA)."""
        return self.n_heads // self.n_kv_heads

    @property
    def kv_dim(self) -> int:
        """Width of the k and v projections: n_kv_heads * head_dim."""
        return self.n_kv_heads * self.head_dim

    @property
    def q_dim(self) -> int:
        """Width of the q projection (and input of wo): n_heads * head_dim (= dim unless head_dim is explicit)."""
        return self.n_heads * self.head_dim

    @property
    def head_dim_explicit(self) -> bool:
        """True when head_dim was given rather than derived from dim // n_heads."""
        return self._head_dim_explicit

    def replace(self, **changes: Any) -> "LlamaConfig":
        """A copy with ``changes``, re-validated. A derived ``head_dim`` is re-derived from the new
        ``dim``/``n_heads``; an explicit one is kept (pass ``head_dim=None`` to derive it again)."""
        fields = {f.name for f in dataclasses.fields(self) if f.init}
        unknown = sorted(set(changes) - fields)
        if unknown:
            derived = {"n_rep", "kv_dim", "q_dim"}
            hint = " (derived from dim, n_heads, n_kv_heads and head_dim; change those instead)" if set(unknown) & derived else ""
            raise ValueError(f"LlamaConfig has no settable field {', '.join(unknown)}{hint}")
        if "head_dim" not in changes and not self._head_dim_explicit:
            changes["head_dim"] = None
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        """Every field (``head_dim`` as its value, ``rope_scaling`` as a dict or None): JSON-ready."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.init}
        out["rope_scaling"] = None if self.rope_scaling is None else dataclasses.asdict(self.rope_scaling)
        return out

    # ------------------------------------------------------------------ readers
    @classmethod
    def from_preset(cls, name: str) -> "LlamaConfig":
        try:
            return PRESETS[name]
        except (KeyError, TypeError):
            raise ValueError(f"unknown preset {name!r}; known presets: {', '.join(sorted(PRESETS))}") from None

    @classmethod
    def from_hf(cls, path_or_dict: PathOrDict, *, source: Optional[str] = None,
                revision: Optional[str] = None) -> "LlamaConfig":
        """Read a Hugging Face ``config.json`` (a directory holding one, the file, a dict, a live
        ``transformers.LlamaConfig``, or a Hub model id ``"org/name"``, of which only ``config.json`` is
        fetched, at ``revision``), resolving RoPE settings the way transformers does and refusing
        settings that conflict. See :func:`llama_ref.config_files.hf_config_fields` and
        :mod:`llama_ref.hub`. ``source`` names where a dict came from, for messages."""
        if not isinstance(path_or_dict, (Mapping, str, os.PathLike)) and hasattr(path_or_dict, "to_dict"):
            path_or_dict = path_or_dict.to_dict()  # a live transformers.LlamaConfig
        hub_id = None
        if is_hub_id(path_or_dict):
            hub_id = path_or_dict
            path_or_dict = hub_config_path(hub_id, revision=revision)
        elif revision is not None:
            raise ValueError(f"revision={revision!r} applies to a Hub model id ('org/name'), not to {path_or_dict!r}")
        cfg, read_from = read_json(path_or_dict, "config.json")
        if hub_id is not None:
            read_from = f"{hub_id} ({read_from})"
            if not cfg.get("_name_or_path"):
                cfg = {**cfg, "_name_or_path": hub_id}  # else the model is named after a snapshot hash
        source = source or read_from
        return with_source(source, cls, **hf_config_fields(cfg, source))

    @classmethod
    def from_meta(
        cls,
        path_or_dict: PathOrDict,
        *,
        vocab_size: Optional[int] = None,
        max_seq_len: Optional[int] = None,
        tie_word_embeddings: bool = False,
        source: Optional[str] = None,
    ) -> "LlamaConfig":
        """Read Meta's ``params.json``.

        Meta's Llama-2 files say ``"vocab_size": -1`` (the tokenizer decides); pass ``vocab_size``
        then (the checkpoint loader reads it off ``tok_embeddings``). ``max_seq_len`` is not in
        Meta's files: default 4096 (Llama-2's training length). Meta's files have no tie flag:
        ``tie_word_embeddings=True`` when the checkpoint has no ``output.weight`` (the loader
        decides). See :func:`llama_ref.config_files.meta_config_fields` for every key.
        """
        params, read_from = read_json(path_or_dict, "params.json")
        source = source or read_from
        return with_source(source, cls, **meta_config_fields(params, source, vocab_size=vocab_size,
                                                             max_seq_len=max_seq_len,
                                                             tie_word_embeddings=tie_word_embeddings))


# Llama 3.1 / 3.3: Meta's apply_scaling constants. Llama 3.2 1B/3B: factor 32 (their config.json).
_LLAMA31_ROPE = RopeScaling.llama3(factor=8.0)
_LLAMA32_ROPE = RopeScaling.llama3(factor=32.0)


def _llama3x(name: str, **shape: Any) -> LlamaConfig:
    return LlamaConfig(name=name, vocab_size=128256, norm_eps=1e-5, rope_theta=500000.0, max_seq_len=131072,
                       **shape)


def _code_llama(name: str, **shape: Any) -> LlamaConfig:
    # Code Llama: Llama-2 shapes, rope_theta 1e6, 16k context (its config.json max_position_embeddings).
    return LlamaConfig(name=name, rope_theta=1_000_000.0, max_seq_len=16384, norm_eps=1e-5, **shape)


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
    "llama-3.1-8b": _llama3x("llama-3.1-8b", dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, hidden_dim=14336,
                             rope_scaling=_LLAMA31_ROPE),
    "llama-3.1-70b": _llama3x("llama-3.1-70b", dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, hidden_dim=28672,
                              rope_scaling=_LLAMA31_ROPE),
    "llama-3.1-405b": _llama3x("llama-3.1-405b", dim=16384, n_layers=126, n_heads=128, n_kv_heads=8,
                               hidden_dim=53248, rope_scaling=_LLAMA31_ROPE),
    "llama-3.2-1b": _llama3x("llama-3.2-1b", dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, hidden_dim=8192,
                             rope_scaling=_LLAMA32_ROPE, tie_word_embeddings=True),
    "llama-3.2-3b": _llama3x("llama-3.2-3b", dim=3072, n_layers=28, n_heads=24, n_kv_heads=8, hidden_dim=8192,
                             rope_scaling=_LLAMA32_ROPE, tie_word_embeddings=True),
    "llama-3.3-70b": _llama3x("llama-3.3-70b", dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, hidden_dim=28672,
                              rope_scaling=_LLAMA31_ROPE),
    # 7B and 13B add 16 infilling tokens to Llama-2's 32000; 34B does not, and uses GQA (8 kv heads).
    "code-llama-7b": _code_llama("code-llama-7b", dim=4096, n_layers=32, n_heads=32, vocab_size=32016,
                                 hidden_dim=11008),
    "code-llama-13b": _code_llama("code-llama-13b", dim=5120, n_layers=40, n_heads=40, vocab_size=32016,
                                  hidden_dim=13824),
    "code-llama-34b": _code_llama("code-llama-34b", dim=8192, n_layers=48, n_heads=64, n_kv_heads=8,
                                  vocab_size=32000, hidden_dim=22016),
    "tinyllama-1.1b": LlamaConfig(name="tinyllama-1.1b", dim=2048, n_layers=22, n_heads=32, n_kv_heads=4,
                                  vocab_size=32000, hidden_dim=5632, norm_eps=1e-5, max_seq_len=2048),
    # Small grouped-query config for tests: 4 query heads share 2 kv heads (n_rep=2).
    "tiny": LlamaConfig(
        name="tiny", dim=64, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=256, hidden_dim=176, max_seq_len=128
    ),
}


# ---------------------------------------------------------------- families of presets
@dataclass(frozen=True)
class Family:
    """Presets released together under one name: ``key`` (for files and JSON), ``title``, preset names."""

    key: str
    title: str
    presets: tuple[str, ...]


#: Every preset in exactly one family (tests/test_family_counts.py checks it, so a new preset needs a family).
FAMILIES: dict[str, Family] = {f.key: f for f in (
    Family("llama-2", "Llama 2", ("llama-2-7b", "llama-2-13b", "llama-2-70b")),
    Family("llama-3", "Llama 3 / 3.1 / 3.2 / 3.3", ("llama-3-8b", "llama-3.1-8b", "llama-3.1-70b", "llama-3.1-405b",
                                                    "llama-3.2-1b", "llama-3.2-3b", "llama-3.3-70b")),
    Family("code-llama", "Code Llama", ("code-llama-7b", "code-llama-13b", "code-llama-34b")),
    Family("tinyllama", "TinyLlama", ("tinyllama-1.1b",)),
    Family("test", "test preset", ("tiny",)),
)}


def family_of(config: LlamaConfig) -> Optional[tuple[Family, str]]:
    """``(family, preset)`` of the preset ``config`` describes, else ``None``.

    The shape decides first (``LlamaConfig`` equality ignores the name, so an HF directory or Hub id holding
    a preset's config.json finds it; Llama 3.1-70B and 3.3-70B share a shape, and the first listed wins),
    then the exact preset name (a preset whose file differs in a detail such as ``norm_eps``)."""
    match = next((n for n, c in PRESETS.items() if c == config), None)
    if match is None and config.name in PRESETS:
        match = config.name
    if match is None:
        return None
    family = next((f for f in FAMILIES.values() if match in f.presets), None)
    return None if family is None else (family, match)
