"""RoPE scaling for long context: which variants exist, and the one llama_ref computes (a frozen dataclass)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

# RoPE variants with a fixed position -> rotation table that llama_ref computes exactly as transformers.
ROPE_SCALING_TYPES = ("llama3", "linear")
# Known variants that llama_ref refuses, and why (never silently plain RoPE).
UNSUPPORTED_ROPE_TYPES = {
    "dynamic": "dynamic NTK recomputes the frequencies from the longest sequence seen so far (state that "
               "depends on the history of calls), which a fixed position table does not reproduce",
    "yarn": "YaRN also rescales attention logits (mscale) and has several more parameters; not implemented",
    "longrope": "LongRoPE switches frequency sets by sequence length; not implemented",
    "proportional": "partial/proportional RoPE is not part of the Llama architecture",
}


def is_number(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float))


def positive_finite(value: Any) -> bool:
    """A real number (never a bool), finite and > 0: NaN, inf, 0, negatives, strings all fail."""
    if not is_number(value):
        return False
    try:
        return math.isfinite(float(value)) and value > 0
    except OverflowError:  # an int too large for a float (e.g. 400 digits in a JSON file)
        return False


@dataclass(frozen=True)
class RopeScaling:
    """How the RoPE *frequencies* are rescaled for long context. Positions stay integers; only the
    table ``e^{i * pos * inv_freq}`` changes (see :func:`llama_ref.model.scaled_inv_freq`).

    * ``"llama3"`` (Llama 3.1+; Meta's ``apply_scaling``, transformers' ``_compute_llama3_parameters``):
      wavelengths longer than ``original_max_position_embeddings / low_freq_factor`` are stretched by
      ``factor``, shorter than ``original_max_position_embeddings / high_freq_factor`` kept, and the band
      between interpolated smoothly.
    * ``"linear"`` (position interpolation): every frequency divided by ``factor``.
    """

    rope_type: str
    factor: float
    low_freq_factor: Optional[float] = None
    high_freq_factor: Optional[float] = None
    original_max_position_embeddings: Optional[int] = None

    def __post_init__(self) -> None:
        t = self.rope_type
        if not isinstance(t, str):
            raise ValueError(f"RopeScaling.rope_type must be a string, got {t!r}")
        if t == "default":
            raise ValueError("RopeScaling(rope_type='default') is plain RoPE: use rope_scaling=None")
        if t in UNSUPPORTED_ROPE_TYPES:
            raise ValueError(f"rope_type {t!r} is not supported: {UNSUPPORTED_ROPE_TYPES[t]}")
        if t not in ROPE_SCALING_TYPES:
            raise ValueError(f"unknown rope_type {t!r}; supported: {', '.join(ROPE_SCALING_TYPES)}")
        if not positive_finite(self.factor):
            raise ValueError(f"RopeScaling.factor must be a positive finite number, got {self.factor!r}")
        object.__setattr__(self, "factor", float(self.factor))
        extras = ("low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
        if t == "linear":
            given = [k for k in extras if getattr(self, k) is not None]
            if given:
                raise ValueError(f"RopeScaling(rope_type='linear') takes only factor; got {', '.join(given)}")
            return
        for name in ("low_freq_factor", "high_freq_factor"):
            value = getattr(self, name)
            if not positive_finite(value):
                raise ValueError(f"RopeScaling.{name} must be a positive finite number for 'llama3', got {value!r}")
            object.__setattr__(self, name, float(value))
        if not self.low_freq_factor < self.high_freq_factor:
            # Equal factors would divide by zero in the smoothing ramp (Meta's code asserts it).
            raise ValueError(f"RopeScaling: low_freq_factor ({self.low_freq_factor}) must be less than "
                             f"high_freq_factor ({self.high_freq_factor})")
        omax = self.original_max_position_embeddings
        if isinstance(omax, bool) or not isinstance(omax, int) or omax <= 0:
            raise ValueError(f"RopeScaling.original_max_position_embeddings must be a positive int for 'llama3', "
                             f"got {omax!r}")

    @classmethod
    def llama3(cls, factor: float = 8.0, low_freq_factor: float = 1.0, high_freq_factor: float = 4.0,
               original_max_position_embeddings: int = 8192) -> "RopeScaling":
        """Defaults are Meta's ``apply_scaling`` constants (Llama 3.1)."""
        return cls("llama3", factor, low_freq_factor, high_freq_factor, original_max_position_embeddings)

    @classmethod
    def linear(cls, factor: float) -> "RopeScaling":
        return cls("linear", factor)

    def to_hf(self) -> dict:
        """The ``rope_scaling`` / ``rope_parameters`` entries transformers expects (without ``rope_theta``)."""
        out: dict[str, Any] = {"rope_type": self.rope_type, "factor": self.factor}
        if self.rope_type == "llama3":
            out.update(low_freq_factor=self.low_freq_factor, high_freq_factor=self.high_freq_factor,
                       original_max_position_embeddings=self.original_max_position_embeddings)
        return out
