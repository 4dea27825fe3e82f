"""Reading ``config.json`` (Hugging Face) and ``params.json`` (Meta) into a :class:`LlamaConfig`.

Both formats are read with the same strictness: every field has one type (no ``"64"`` for an int,
no ``true`` for a number, no ``null``/NaN/inf/negative where a size or rate is meant), and an error
names the field and the file. Settings that change the model are never ignored: they are honoured,
or refused with a ``ValueError`` saying why.

Fields that can be spelled two ways are resolved the way ``transformers`` resolves them, and
refused when the spellings disagree (transformers would silently pick one):

* ``rope_scaling`` (transformers 4.x) vs ``rope_parameters`` (5.x): transformers uses
  ``rope_scaling`` when it is a non-empty dict and drops ``rope_parameters`` whole (its
  ``rope_theta`` too); we refuse unless both say the same.
* ``rope_theta`` at top level vs inside the RoPE dict: the dict's value wins in transformers; we
  refuse different values.
* ``type`` vs ``rope_type`` inside one dict (legacy spelling): ``rope_type`` wins; we refuse
  different values.
* top-level ``original_max_position_embeddings`` vs the one in the dict (``llama3``): transformers
  ends up with the top-level value; we refuse different values. Neither given: transformers uses
  ``max_position_embeddings``; so do we.
* ``dtype`` vs ``torch_dtype``: transformers keeps ``dtype``; we refuse different values.
"""

from __future__ import annotations

import json
import logging
import math
import os
import stat
from typing import Any, Mapping, Optional, Union

from .dtypes import HF_CONFIG_NAMES
from .rope_scaling import UNSUPPORTED_ROPE_TYPES, RopeScaling, positive_finite

PathOrDict = Union[str, os.PathLike, Mapping[str, Any]]

logger = logging.getLogger(__name__)

_MISSING = object()


# ---------------------------------------------------------------------------- files
#: The largest value of a size field (dim, n_layers, ..., max_seq_len): torch's sizes and positions are int64.
MAX_SIZE = 2**63 - 1
#: A Llama config.json is about 1 KB and a 405B shard index about 100 KB: a JSON file larger than this is not
#: one of ours (and would be read whole).
MAX_JSON_BYTES = 64 * 1024 * 1024


def read_json(path_or_dict: PathOrDict, default_name: str) -> tuple[dict, str]:
    """``(object, source)``: a JSON object from a dict, a file, or a directory holding ``default_name``.

    Every failure is one line naming the file: missing (``FileNotFoundError``), unreadable
    (``PermissionError``), not a regular file, not UTF-8, not JSON, not an object (``ValueError``).
    """
    if isinstance(path_or_dict, Mapping):
        return dict(path_or_dict), "config dict"
    if not isinstance(path_or_dict, (str, os.PathLike)):
        raise ValueError(f"expected a path to {default_name}, its directory, or a dict; got {type(path_or_dict).__name__}")
    path = os.fspath(path_or_dict)
    if os.path.isdir(path):
        inner = os.path.join(path, default_name)
        if os.path.basename(os.path.normpath(path)) == default_name and not os.path.lexists(inner):
            raise ValueError(f"{path} is a directory, expected the {default_name} file")
        path = inner
    data = load_json_file(path, default_name)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data, path


def load_json_file(path: Union[str, os.PathLike], what: str) -> Any:
    """The JSON value in the file ``path`` (``what`` says what it should be, for messages).

    Refused, in one line naming the file, before anything is opened when that would hang or take all
    memory: missing (``FileNotFoundError``), not inspectable, a directory, FIFO or device, larger than
    :data:`MAX_JSON_BYTES` (``ValueError``); then unreadable (``PermissionError``), not UTF-8, not
    JSON, nested too deeply, a number too long for Python, or a key given twice (``json`` would
    silently keep the last value) (``ValueError``).
    """
    path = os.fspath(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        broken = " (a broken symbolic link)" if os.path.islink(path) else ""
        raise FileNotFoundError(f"no {what} at {path}{broken}") from None
    except PermissionError:
        raise PermissionError(f"{path}: permission denied (cannot read {what})") from None
    except (OSError, ValueError) as e:  # ValueError: a NUL byte in the path
        raise ValueError(f"{path!r}: cannot access ({getattr(e, 'strerror', None) or e})") from None
    if stat.S_ISDIR(st.st_mode):
        raise ValueError(f"{path} is a directory, expected the {what} file")
    if not stat.S_ISREG(st.st_mode):
        # Opening a FIFO or a device would block or stream forever: refuse before opening.
        kind = "a FIFO (named pipe)" if stat.S_ISFIFO(st.st_mode) else "a device or socket"
        raise ValueError(f"{path} is not a regular file but {kind} (expected {what})")
    if st.st_size > MAX_JSON_BYTES:
        raise ValueError(f"{path} is {st.st_size:,} bytes, too large to be {what} (limit {MAX_JSON_BYTES:,} bytes)")
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_JSON_BYTES + 1)
    except PermissionError:
        raise PermissionError(f"{path}: permission denied (cannot read {what})") from None
    except OSError as e:
        raise ValueError(f"{path}: cannot read ({e.strerror or e})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text, is it a binary file? (byte {e.start}: {e.reason})") from None
    try:
        return json.loads(text, object_pairs_hook=no_duplicate_keys)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    except RecursionError:
        raise ValueError(f"{path}: not valid JSON (nested too deeply)") from None
    except DuplicateKeyError as e:
        raise ValueError(f"{path}: the key {e.args[0]!r} appears more than once in one object; "
                         "which value is meant is ambiguous") from None
    except ValueError as e:  # int() of a number with thousands of digits
        raise ValueError(f"{path}: not usable JSON ({e})") from None


class DuplicateKeyError(ValueError):
    """A JSON object names the same key twice (``json`` would silently keep the last value)."""


def no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict:
    """``object_pairs_hook`` for ``json.loads`` that refuses duplicate keys (every JSON file we read uses it)."""
    out: dict = {}
    for key, value in pairs:
        if key in out:
            raise DuplicateKeyError(key)
        out[key] = value
    return out


# ---------------------------------------------------------------------------- typed fields
def _present(d: Mapping, key: str, source: str, default: Any, label: str, nullable: bool) -> tuple[bool, Any]:
    """``(True, value)`` when ``d[key]`` needs checking; ``(False, result)`` for an absent key (its
    ``default``, or an error when it is required) and for an allowed null."""
    if key not in d:
        if default is _MISSING:
            raise ValueError(f"{source}: missing required field {label}")
        return False, default
    if d[key] is None and nullable:
        return False, None
    return True, d[key]


def _int(d: Mapping, key: str, source: str, default: Any = _MISSING, *, where: str = "",
         positive: bool = True, nullable: bool = False) -> Any:
    """An int (not a bool, not a float) from ``d[key]``; ``default`` when absent."""
    label = f"{where}{key}"
    check, value = _present(d, key, source, default, label, nullable)
    if not check:
        return value
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{source}: {label} must be an int{' or null' if nullable else ''}, got {value!r}")
    if positive and value <= 0:
        raise ValueError(f"{source}: {label} must be positive, got {value}")
    return value


def _number(d: Mapping, key: str, source: str, default: Any = _MISSING, *, where: str = "",
            nullable: bool = False) -> Any:
    """A positive finite number (int or float, not a bool) from ``d[key]``."""
    label = f"{where}{key}"
    check, value = _present(d, key, source, default, label, nullable)
    if not check:
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{source}: {label} must be a number{' or null' if nullable else ''}, got {value!r}")
    if not positive_finite(value):
        shown = value if isinstance(value, float) or abs(value) < 10**30 else f"an int of {len(str(value))} digits"
        raise ValueError(f"{source}: {label} must be a positive finite number, got {shown!r}")
    return value


def _bool(d: Mapping, key: str, source: str, default: bool) -> bool:
    value = d.get(key, default)
    if not isinstance(value, bool):
        raise ValueError(f"{source}: {key} must be true or false, got {value!r}")
    return value


def _str(d: Mapping, key: str, source: str, default: str, *, where: str = "") -> str:
    value = d.get(key, default)
    if not isinstance(value, str):
        raise ValueError(f"{source}: {where}{key} must be a string, got {value!r}")
    return value


def _check_full_rotary(d: Mapping, source: str, where: str = "") -> None:
    value = d.get("partial_rotary_factor", 1.0)
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != 1.0:
        raise ValueError(f"{source}: {where}partial_rotary_factor={value!r} is not supported "
                         "(Llama rotates every channel pair)")


# ---------------------------------------------------------------------------- Hugging Face config.json
def hf_config_fields(cfg: Mapping[str, Any], source: str = "config dict") -> dict[str, Any]:
    """The :class:`~llama_ref.config.LlamaConfig` fields of an HF ``config.json``'s contents (``source``
    names the file)."""
    model_type = _str(cfg, "model_type", source, "llama")
    if model_type != "llama":
        raise ValueError(f"{source}: model_type is {model_type!r}, only 'llama' is supported")
    required = ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size", "intermediate_size")
    missing = [k for k in required if k not in cfg]
    if missing:
        raise ValueError(f"{source}: missing required field(s) {', '.join(missing)}")
    dim, n_layers, n_heads, vocab_size, hidden_dim = (_int(cfg, k, source) for k in required)
    # Absent or null means MHA (transformers' default); anything else must be a positive int.
    n_kv_heads = _int(cfg, "num_key_value_heads", source, None, nullable=True)
    act = _str(cfg, "hidden_act", source, "silu")
    if act != "silu":
        raise ValueError(f"{source}: hidden_act={act!r} is not supported (Llama uses 'silu')")
    for flag in ("attention_bias", "mlp_bias"):
        if _bool(cfg, flag, source, False):
            raise ValueError(f"{source}: {flag}=true is not supported by the Llama architecture here")
    tie = _bool(cfg, "tie_word_embeddings", source, False)
    norm_eps = _number(cfg, "rms_norm_eps", source, 1e-6)
    # 2048 is transformers' LlamaConfig default, i.e. what HF would assume for this file.
    max_seq_len = _int(cfg, "max_position_embeddings", source, 2048)
    head_dim = _int(cfg, "head_dim", source, None, nullable=True)
    if dim % n_heads:
        # transformers.LlamaConfig refuses this too, even with an explicit head_dim.
        raise ValueError(f"{source}: hidden_size={dim} is not divisible by num_attention_heads={n_heads} "
                         "(transformers refuses this config as well)")
    _check_full_rotary(cfg, source)
    rope_theta, rope_scaling = resolve_hf_rope(cfg, source, max_seq_len)
    name = cfg.get("_name_or_path")
    return dict(
        dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv_heads, vocab_size=vocab_size,
        hidden_dim=hidden_dim, norm_eps=norm_eps, rope_theta=float(rope_theta), max_seq_len=max_seq_len,
        rope_scaling=rope_scaling, tie_word_embeddings=tie, head_dim=head_dim,
        name=name if isinstance(name, str) and name else "hf",
    )


def with_source(source: str, build, *args, **kwargs):
    """``build(*args, **kwargs)``, with a validation error prefixed by the file it came from."""
    try:
        return build(*args, **kwargs)
    except ValueError as e:
        raise ValueError(f"{source}: {e}") from None


# Keys transformers reads from a RoPE dict, per type (its _validate_*_rope_parameters); others it ignores.
_HF_ROPE_KEYS = {
    "default": {"rope_type", "type", "rope_theta", "partial_rotary_factor"},
    "linear": {"rope_type", "type", "rope_theta", "partial_rotary_factor", "factor"},
    "llama3": {"rope_type", "type", "rope_theta", "partial_rotary_factor", "factor", "low_freq_factor",
               "high_freq_factor", "original_max_position_embeddings"},
}
_SCALING_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


def _rope_type(d: Mapping, key: str, source: str) -> str:
    """``rope_type``, or the legacy ``type``, or ``"default"``; refuses the two spellings disagreeing."""
    if "rope_type" in d and "type" in d and d["rope_type"] != d["type"]:
        raise ValueError(f"{source}: {key} has rope_type={d['rope_type']!r} and type={d['type']!r}; "
                         "transformers uses rope_type and ignores type: remove one")
    value = d["rope_type"] if "rope_type" in d else d.get("type", "default")
    if not isinstance(value, str):
        raise ValueError(f"{source}: {key}.rope_type must be a string, got {value!r}")
    return value


def resolve_hf_rope(cfg: Mapping[str, Any], source: str, max_position_embeddings: int
                    ) -> tuple[float, Optional[RopeScaling]]:
    """``(rope_theta, rope_scaling)`` exactly as transformers 5 computes its RoPE table from ``cfg``,
    or a ``ValueError`` when the file states two different values for one setting."""
    dicts = {}
    for key in ("rope_scaling", "rope_parameters"):
        value = cfg.get(key)
        if value is not None and not isinstance(value, Mapping):
            raise ValueError(f"{source}: {key} must be an object or null, got {value!r}")
        dicts[key] = value or {}
    # transformers: `self.rope_parameters = rope_scaling or self.rope_parameters`.
    eff_key = "rope_scaling" if dicts["rope_scaling"] else "rope_parameters"
    eff = dicts[eff_key]
    rope_type = _rope_type(eff, eff_key, source)
    _check_full_rotary(eff, source, f"{eff_key}.")

    # rope_theta: the dict's own value, else the top-level one, else transformers' default 10000.
    top_theta = _number(cfg, "rope_theta", source, None)
    theta = _number(eff, "rope_theta", source, None, where=f"{eff_key}.")
    if theta is not None and top_theta is not None and theta != top_theta:
        raise ValueError(f"{source}: rope_theta={top_theta} disagrees with {eff_key}.rope_theta={theta} "
                         f"(transformers uses {theta} and ignores the top-level value): remove one")
    if theta is None:
        theta = 10000.0 if top_theta is None else top_theta

    scaling = _scaling_from_dict(eff, eff_key, rope_type, source, cfg, max_position_embeddings)

    if eff_key == "rope_scaling" and dicts["rope_parameters"]:
        # transformers silently drops rope_parameters here: accept it only when it says the same.
        other = dicts["rope_parameters"]
        other_type = _rope_type(other, "rope_parameters", source)
        other_theta = _number(other, "rope_theta", source, None, where="rope_parameters.")
        same = other_type == rope_type and (other_theta is None or other_theta == theta)
        if same and rope_type != "default":
            same = all(other.get(k, eff.get(k)) == eff.get(k) for k in _SCALING_KEYS)
        if not same:
            raise ValueError(
                f"{source}: rope_scaling {dict(eff)} and rope_parameters {dict(other)} disagree; transformers "
                "applies rope_scaling and silently ignores rope_parameters: keep only one of them")

    unused = sorted(set(eff) - _HF_ROPE_KEYS.get(rope_type, set(eff)))
    if unused:
        logger.warning("%s: %s keys %s are not used by rope_type %r (transformers ignores them too)",
                       source, eff_key, ", ".join(unused), rope_type)
    return theta, scaling


def _scaling_from_dict(d: Mapping, key: str, rope_type: str, source: str, cfg: Mapping,
                       max_position_embeddings: int) -> Optional[RopeScaling]:
    where = f"{key}."
    if rope_type == "default":
        return None
    if rope_type in UNSUPPORTED_ROPE_TYPES:
        raise ValueError(f"{source}: {key} rope_type {rope_type!r} is not supported: {UNSUPPORTED_ROPE_TYPES[rope_type]}")
    if rope_type == "linear":
        return with_source(source, RopeScaling.linear, _number(d, "factor", source, where=where))
    if rope_type == "llama3":
        # transformers moves a top-level original_max_position_embeddings over the dict's value
        # (standardize_rope_params runs again when the RoPE table is built), else it defaults to
        # max_position_embeddings.
        top = _int(cfg, "original_max_position_embeddings", source, None)
        inner = _int(d, "original_max_position_embeddings", source, None, where=where)
        if top is not None and inner is not None and top != inner:
            raise ValueError(f"{source}: original_max_position_embeddings={top} disagrees with "
                             f"{where}original_max_position_embeddings={inner} (transformers uses {top}): remove one")
        original = top if top is not None else inner if inner is not None else max_position_embeddings
        return with_source(
            source, RopeScaling.llama3,
            factor=_number(d, "factor", source, where=where),
            low_freq_factor=_number(d, "low_freq_factor", source, where=where),
            high_freq_factor=_number(d, "high_freq_factor", source, where=where),
            original_max_position_embeddings=original,
        )
    raise ValueError(f"{source}: {key} rope_type {rope_type!r} is not a RoPE type llama_ref knows "
                     "(supported: default, linear, llama3)")




def read_hf_dtype(cfg: Mapping[str, Any], source: str) -> Optional[str]:
    """The weight dtype name ``config.json`` states (``dtype``, or ``torch_dtype`` before
    transformers 5), or ``None`` for absent/``"auto"``. Refuses the two disagreeing."""
    values = {}
    for key in ("dtype", "torch_dtype"):
        value = cfg.get(key)
        if value is None:
            continue
        if not isinstance(value, str):
            raise ValueError(f"{source}: {key} must be a string like 'bfloat16', got {value!r}")
        name = value.removeprefix("torch.")
        if name != "auto" and name not in HF_CONFIG_NAMES:
            raise ValueError(f"{source}: unknown {key} {value!r} (expected float32, float16 or bfloat16)")
        values[key] = name
    if len(set(values.values())) > 1:
        raise ValueError(f"{source}: dtype={values['dtype']!r} disagrees with torch_dtype={values['torch_dtype']!r} "
                         "(transformers uses dtype): remove one")
    name = next(iter(values.values()), None)
    return None if name == "auto" else name


# ---------------------------------------------------------------------------- Meta params.json
# Meta's llama3 ModelArgs.apply_scaling constants; llama4's ModelArgs adds rope_scaling_factor and
# rope_high_freq_factor (low_freq_factor and the original length stay fixed).
META_ROPE_DEFAULTS = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 8192}
# Keys of Meta's ModelArgs (llama 2/3/4) we honour.
_META_HONOURED = {"dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of", "ffn_dim_multiplier",
                  "norm_eps", "rope_theta", "use_scaled_rope", "rope_scaling_factor", "rope_high_freq_factor",
                  "head_dim", "max_seq_len"}
# Runtime-only settings that do not change the model's math.
_META_RUNTIME = {"max_batch_size"}
# ModelArgs keys for features llama_ref does not implement: accepted only at their "off" value.
_META_OFF_VALUES = {
    "use_qk_norm": (False,), "attn_temperature_tuning": (False,), "nope_layer_interval": (None,),
    "attention_chunk_size": (None,), "moe_args": (None,), "vision_args": (None,), "quantization_args": (None,),
    "lora_args": (None,), "ffn_exp": (None,), "vision_chunk_size": (-1,), "vision_num_cross_attention_layers": (-1,),
}
# Only read when a refused feature is on (vision, temperature tuning): any value is harmless.
_META_INERT = {"vision_max_num_chunks", "floor_scale", "attn_scale"}


def meta_config_fields(params: Mapping[str, Any], source: str = "config dict", *, vocab_size: Optional[int] = None,
                       max_seq_len: Optional[int] = None, tie_word_embeddings: bool = False) -> dict[str, Any]:
    """The :class:`~llama_ref.config.LlamaConfig` fields of Meta's ``params.json`` contents. Every key is
    honoured, known to be inert, or refused: nothing that changes the model is ignored."""
    params = params.get("model", params) if isinstance(params.get("model"), Mapping) else params
    for key, value in params.items():
        if key in _META_HONOURED or key in _META_RUNTIME or key in _META_INERT:
            continue
        if key in _META_OFF_VALUES:
            if not any(value is off or (value == off and type(value) is type(off)) for off in _META_OFF_VALUES[key]):
                raise ValueError(f"{source}: {key}={value!r} is not supported (a feature llama_ref does not implement)")
            continue
        hint = "; Meta's files turn on Llama-3.1 RoPE scaling with use_scaled_rope" if key.startswith("rope") else ""
        raise ValueError(f"{source}: unknown key {key!r} in params.json (not a Meta ModelArgs field llama_ref "
                         f"knows; refusing rather than guessing whether it changes the model){hint}")
    missing = [k for k in ("dim", "n_layers", "n_heads") if k not in params]
    if missing:
        raise ValueError(f"{source}: missing required field(s) {', '.join(missing)}")
    dim, n_layers, n_heads = (_int(params, k, source) for k in ("dim", "n_layers", "n_heads"))
    n_kv_heads = _int(params, "n_kv_heads", source, None, nullable=True)
    head_dim = _int(params, "head_dim", source, None, nullable=True)
    if head_dim is not None and (dim % n_heads or head_dim != dim // n_heads):
        # Meta's Attention always uses dim // n_heads; a different head_dim would not be honoured there.
        raise ValueError(f"{source}: head_dim={head_dim} differs from dim // n_heads ({dim} // {n_heads}), "
                         "which Meta's model code uses")
    vocab_size = _meta_vocab(params, source, vocab_size)
    file_max = _int(params, "max_seq_len", source, None)
    if max_seq_len is not None and file_max is not None and max_seq_len != file_max:
        raise ValueError(f"{source}: max_seq_len {file_max} does not match the given max_seq_len={max_seq_len}")
    max_seq_len = max_seq_len if max_seq_len is not None else file_max if file_max is not None else 4096
    multiple_of = _int(params, "multiple_of", source, 256)
    ffn_mult = _number(params, "ffn_dim_multiplier", source, None, nullable=True)
    hidden_dim = with_source(source, meta_ffn_hidden_dim, dim, multiple_of, ffn_mult)
    return dict(
        dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv_heads, vocab_size=vocab_size,
        hidden_dim=hidden_dim,
        norm_eps=_number(params, "norm_eps", source, 1e-5),
        rope_theta=float(_number(params, "rope_theta", source, 10000.0)),
        max_seq_len=max_seq_len, rope_scaling=_meta_rope_scaling(params, source),
        tie_word_embeddings=tie_word_embeddings, name="meta",
    )


def _meta_vocab(params: Mapping, source: str, vocab_size: Optional[int]) -> int:
    file_vocab = params.get("vocab_size", -1)
    if file_vocab is not None and (isinstance(file_vocab, bool) or not isinstance(file_vocab, int)):
        raise ValueError(f"{source}: vocab_size must be an int, got {file_vocab!r}")
    if vocab_size is None:
        if file_vocab is None or file_vocab <= 0:
            raise ValueError(
                f"{source}: vocab_size is {file_vocab!r}; pass vocab_size= (the tokenizer's size, "
                "or tok_embeddings.weight.shape[0] of the checkpoint)"
            )
        return file_vocab
    if file_vocab not in (None, -1) and file_vocab != vocab_size:
        raise ValueError(f"{source}: vocab_size {file_vocab} does not match the given vocab_size={vocab_size}")
    return vocab_size


def _meta_rope_scaling(params: Mapping, source: str) -> Optional[RopeScaling]:
    use_scaled = _bool(params, "use_scaled_rope", source, False)
    factor = _number(params, "rope_scaling_factor", source, None, nullable=True)
    high = _number(params, "rope_high_freq_factor", source, None, nullable=True)
    if not use_scaled:
        given = [k for k, v in (("rope_scaling_factor", factor), ("rope_high_freq_factor", high)) if v is not None]
        if given:
            raise ValueError(f"{source}: {', '.join(given)} given without use_scaled_rope=true "
                             "(Meta's code would ignore it): set use_scaled_rope or remove it")
        return None
    if factor is None:
        logger.info("%s: use_scaled_rope=true without rope_scaling_factor: factor %s as in Meta's llama3 "
                    "apply_scaling", source, META_ROPE_DEFAULTS["factor"])
    d = META_ROPE_DEFAULTS
    return with_source(
        source, RopeScaling.llama3,
        factor=d["factor"] if factor is None else factor,
        low_freq_factor=d["low_freq_factor"],
        high_freq_factor=d["high_freq_factor"] if high is None else high,
        original_max_position_embeddings=d["original_max_position_embeddings"],
    )


def meta_ffn_hidden_dim(dim: int, multiple_of: int, ffn_dim_multiplier: Optional[float] = None) -> int:
    """FFN width exactly as Meta's ``FeedForward.__init__`` computes it.

    SwiGLU has three matrices instead of two, so the nominal 4*dim is scaled by 2/3 to keep the
    parameter count, optionally multiplied, then rounded *up* to a multiple of ``multiple_of``.
    """
    if isinstance(dim, bool) or not isinstance(dim, int) or not 0 < dim <= MAX_SIZE:
        raise ValueError(f"dim must be a positive int of at most 2**63 - 1, got "
                         f"{dim if not isinstance(dim, int) or abs(dim) < 10**30 else 'a larger int'}")
    if isinstance(multiple_of, bool) or not isinstance(multiple_of, int) or multiple_of <= 0:
        raise ValueError(f"multiple_of must be a positive int, got {multiple_of!r}")
    if ffn_dim_multiplier is not None and not positive_finite(ffn_dim_multiplier):
        raise ValueError(f"ffn_dim_multiplier must be a positive number or None, got {ffn_dim_multiplier!r}")
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        scaled = ffn_dim_multiplier * hidden
        if not math.isfinite(scaled):  # e.g. 1e308 x a few hundred: int() of inf would raise OverflowError
            raise ValueError(f"ffn_dim_multiplier={ffn_dim_multiplier!r} makes the FFN width {scaled} "
                             f"(x {hidden}), not a size")
        hidden = int(scaled)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)
