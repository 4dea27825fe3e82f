"""The one table of floating dtypes: their names (torch's, the short ones users type, the ones Hugging Face
``config.json`` and safetensors headers store) and the parser every entry point uses.

Integer, packed or quantised dtypes are not here on purpose: a Llama weight in them would need
dequantisation, which this reference implementation does not do.
"""

from __future__ import annotations

from typing import Iterable, Optional, Union

import torch

# name -> dtype: torch's own name first, then the short and the old names people type.
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "float64": torch.float64, "fp64": torch.float64, "double": torch.float64,
}
#: The short name of each dtype (what tables, JSON and the CLI print).
SHORT_NAMES: dict[torch.dtype, str] = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16",
                                       torch.float64: "fp64"}
#: The dtypes a weight may be stored in.
WEIGHT_DTYPES: tuple[torch.dtype, ...] = tuple(SHORT_NAMES)
#: The names ``config.json`` may give as ``dtype``/``torch_dtype``: transformers reads them with
#: ``getattr(torch, name)``, so only torch's own attribute names ("bf16" is not one).
HF_CONFIG_NAMES: tuple[str, ...] = tuple(n for n in DTYPES if isinstance(getattr(torch, n, None), torch.dtype))
#: safetensors header codes.
SAFETENSORS_CODES: dict[str, torch.dtype] = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
                                             "BF16": torch.bfloat16}


def torch_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"`` (the name ``config.json`` and torch use)."""
    return str(dtype).removeprefix("torch.")


def short_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bf16"``."""
    try:
        return SHORT_NAMES[dtype]
    except KeyError:
        raise ValueError(f"{dtype} is not a floating dtype llama_ref uses ({', '.join(map(str, WEIGHT_DTYPES))})") from None


def names(dtypes: Iterable[torch.dtype] = WEIGHT_DTYPES) -> list[str]:
    """Every name that parses to one of ``dtypes`` (for a command's ``choices``), sorted."""
    wanted = set(dtypes)
    return sorted(n for n, d in DTYPES.items() if d in wanted)


def parse_dtype(value: Union[None, str, torch.dtype], what: str,
                allowed: Iterable[torch.dtype] = WEIGHT_DTYPES) -> Optional[torch.dtype]:
    """A floating torch dtype from a dtype or a name like ``"bf16"`` or ``"torch.bfloat16"``; ``None``
    passes through. ``what`` names the setting in the error."""
    allowed = tuple(allowed)
    if value is None:
        return None
    if isinstance(value, torch.dtype):
        dtype = value
    elif isinstance(value, str) and value.strip().lower().removeprefix("torch.") in DTYPES:
        dtype = DTYPES[value.strip().lower().removeprefix("torch.")]
    else:
        raise ValueError(f"{what}={value!r} is not a dtype; use one of {', '.join(names(allowed))} "
                         "(or the torch.dtype)")
    if not dtype.is_floating_point:
        raise ValueError(f"{what}={dtype} is not a floating-point dtype (quantised weights are not supported)")
    if dtype not in allowed:
        raise ValueError(f"{what}={dtype} is not supported here; use one of "
                         f"{', '.join(short_name(d) for d in allowed)}")
    return dtype


__all__ = ["DTYPES", "HF_CONFIG_NAMES", "SAFETENSORS_CODES", "SHORT_NAMES", "WEIGHT_DTYPES", "names", "parse_dtype", "short_name",
           "torch_name"]
