"""Reading config.json and params.json: the same strictness for both, every conflict between two
spellings either resolved exactly as transformers resolves it or refused, odd files refused in
one line naming the file."""

from __future__ import annotations

import copy
import json
import logging
import os

import pytest
import torch

from llama_ref import Llama, LlamaConfig, RopeScaling, rope_inv_freq
from llama_ref.config_files import read_hf_dtype
from llama_ref.hf import convert_hf_state_dict

transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.usefixtures("single_thread")

HF_BASE = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 1,
           "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 100, "max_position_embeddings": 128,
           "rms_norm_eps": 1e-5, "rope_theta": 10000.0}
META_BASE = {"dim": 64, "n_layers": 1, "n_heads": 4, "n_kv_heads": 2, "vocab_size": 100, "multiple_of": 32,
             "norm_eps": 1e-5, "rope_theta": 10000.0}
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 32}


def _write(tmp_path, name, data) -> str:
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return str(path)


def _one_line_naming(excinfo, path):
    msg = str(excinfo.value)
    assert "\n" not in msg and str(path) in msg, msg


# ---------------------------------------------------------------- the same strictness for both formats
# (field, bad value, expected message fragment): each written to a real file, so the message must
# name the file too.
HF_BAD = [
    ("hidden_size", "64", "hidden_size must be an int, got '64'"),
    ("hidden_size", 64.0, "hidden_size must be an int, got 64.0"),
    ("hidden_size", True, "hidden_size must be an int, got True"),
    ("hidden_size", -64, "hidden_size must be positive, got -64"),
    ("hidden_size", None, "hidden_size must be an int, got None"),
    ("num_hidden_layers", 0, "num_hidden_layers must be positive, got 0"),
    ("num_key_value_heads", "2", "num_key_value_heads must be an int or null, got '2'"),
    ("max_position_embeddings", 1.5, "max_position_embeddings must be an int, got 1.5"),
    ("head_dim", "16", "head_dim must be an int or null, got '16'"),
    ("rope_theta", None, "rope_theta must be a number, got None"),
    ("rope_theta", "500", "rope_theta must be a number, got '500'"),
    ("rope_theta", True, "rope_theta must be a number, got True"),
    ("rope_theta", float("nan"), "rope_theta must be a positive finite number, got nan"),
    ("rope_theta", float("inf"), "rope_theta must be a positive finite number, got inf"),
    ("rope_theta", -1.0, "rope_theta must be a positive finite number, got -1.0"),
    ("rms_norm_eps", float("nan"), "rms_norm_eps must be a positive finite number"),
    ("rms_norm_eps", 0, "rms_norm_eps must be a positive finite number, got 0"),
    ("mlp_bias", "false", "mlp_bias must be true or false, got 'false'"),
    ("attention_bias", 0, "attention_bias must be true or false, got 0"),
    ("tie_word_embeddings", "true", "tie_word_embeddings must be true or false, got 'true'"),
    ("tie_word_embeddings", None, "tie_word_embeddings must be true or false, got None"),
    ("hidden_act", None, "hidden_act must be a string, got None"),
    ("model_type", 1, "model_type must be a string, got 1"),
    ("rope_scaling", "linear", "rope_scaling must be an object or null, got 'linear'"),
    ("rope_scaling", ["linear", 4], r"rope_scaling must be an object or null, got \['linear', 4\]"),
    ("rope_scaling", 4, "rope_scaling must be an object or null, got 4"),
    ("rope_parameters", "default", "rope_parameters must be an object or null, got 'default'"),
    ("rope_scaling", {"rope_type": "linear", "factor": "4"}, "rope_scaling.factor must be a number, got '4'"),
    ("rope_scaling", {"rope_type": "linear", "factor": None}, "rope_scaling.factor must be a number, got None"),
    ("rope_scaling", {"rope_type": "linear"}, "missing required field rope_scaling.factor"),
    ("rope_scaling", {"rope_type": "linear", "factor": -4}, "rope_scaling.factor must be a positive finite number"),
    ("rope_scaling", {"rope_type": 3, "factor": 4}, "rope_scaling.rope_type must be a string, got 3"),
    ("rope_scaling", {**LLAMA3, "original_max_position_embeddings": 32.0},
     "rope_scaling.original_max_position_embeddings must be an int, got 32.0"),
    ("rope_scaling", {**LLAMA3, "high_freq_factor": float("inf")}, "rope_scaling.high_freq_factor must be a positive"),
    ("rope_scaling", {**LLAMA3, "low_freq_factor": 4.0, "high_freq_factor": 1.0}, "must be less than high_freq_factor"),
]

META_BAD = [
    ("dim", "64", "dim must be an int, got '64'"),
    ("dim", 64.0, "dim must be an int, got 64.0"),
    ("dim", True, "dim must be an int, got True"),
    ("dim", -64, "dim must be positive, got -64"),
    ("n_layers", None, "n_layers must be an int, got None"),
    ("n_kv_heads", "2", "n_kv_heads must be an int or null, got '2'"),
    ("multiple_of", "32", "multiple_of must be an int, got '32'"),
    ("ffn_dim_multiplier", "1.3", "ffn_dim_multiplier must be a number or null, got '1.3'"),
    ("ffn_dim_multiplier", True, "ffn_dim_multiplier must be a number or null, got True"),
    ("norm_eps", "1e-5", "norm_eps must be a number, got '1e-5'"),
    ("norm_eps", float("nan"), "norm_eps must be a positive finite number"),
    ("norm_eps", -1e-5, "norm_eps must be a positive finite number"),
    # Accepted silently from params.json before (while config.json refused it): now refused by both.
    ("rope_theta", "500000", "rope_theta must be a number, got '500000'"),
    ("rope_theta", None, "rope_theta must be a number, got None"),
    ("rope_theta", float("inf"), "rope_theta must be a positive finite number, got inf"),
    ("rope_theta", 10**400, "rope_theta must be a positive finite number, got 'an int of 401 digits'"),
    ("vocab_size", "100", "vocab_size must be an int, got '100'"),
    ("use_scaled_rope", "true", "use_scaled_rope must be true or false, got 'true'"),
    ("use_scaled_rope", 1, "use_scaled_rope must be true or false, got 1"),
    ("head_dim", 8, r"head_dim=8 differs from dim // n_heads \(64 // 4\)"),
    ("max_seq_len", "4096", "max_seq_len must be an int, got '4096'"),
]


@pytest.mark.parametrize("field, value, match", HF_BAD, ids=[f"{f}={v!r}" for f, v, _ in HF_BAD])
def test_config_json_wrong_types_name_field_and_file(tmp_path, field, value, match):
    path = _write(tmp_path, "config.json", {**HF_BASE, field: value})
    with pytest.raises(ValueError, match=match) as excinfo:
        LlamaConfig.from_hf(path)
    _one_line_naming(excinfo, path)


@pytest.mark.parametrize("field, value, match", META_BAD, ids=[f"{f}={v!r}" for f, v, _ in META_BAD])
def test_params_json_wrong_types_name_field_and_file(tmp_path, field, value, match):
    path = _write(tmp_path, "params.json", {**META_BASE, field: value})
    with pytest.raises(ValueError, match=match) as excinfo:
        LlamaConfig.from_meta(path)
    _one_line_naming(excinfo, path)


def test_nan_and_infinity_literals_in_json_are_refused(tmp_path):
    # Python's json accepts NaN / Infinity literals; the field checks must catch them.
    (tmp_path / "params.json").write_text('{"dim": 64, "n_layers": 1, "n_heads": 4, "vocab_size": 100, "norm_eps": NaN}')
    with pytest.raises(ValueError, match="norm_eps must be a positive finite number, got nan"):
        LlamaConfig.from_meta(tmp_path)
    without_eps = {k: v for k, v in HF_BASE.items() if k != "rms_norm_eps"}
    (tmp_path / "config.json").write_text(json.dumps(without_eps)[:-1] + ', "rms_norm_eps": Infinity}')
    with pytest.raises(ValueError, match="rms_norm_eps must be a positive finite number, got inf"):
        LlamaConfig.from_hf(tmp_path)


# ---------------------------------------------------------------- params.json: every key honoured or refused
@pytest.mark.parametrize(
    "extra, match",
    [
        ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "unknown key 'rope_scaling'.*use_scaled_rope"),
        ({"rope_type": "linear"}, "unknown key 'rope_type'"),
        ({"foo": 1}, "unknown key 'foo'"),
        ({"use_qk_norm": True}, "use_qk_norm=True is not supported"),
        ({"use_qk_norm": 0}, "use_qk_norm=0 is not supported"),
        ({"attention_chunk_size": 8192}, "attention_chunk_size=8192 is not supported"),
        ({"nope_layer_interval": 4}, "nope_layer_interval=4 is not supported"),
        ({"moe_args": {"num_experts": 16}}, "moe_args=.* is not supported"),
        ({"vision_chunk_size": 560}, "vision_chunk_size=560 is not supported"),
        ({"vision_num_cross_attention_layers": 8}, "vision_num_cross_attention_layers=8 is not supported"),
        ({"quantization_args": {"scheme": "int4_weight_int8_dynamic_activation"}}, "quantization_args=.* is not supported"),
        ({"lora_args": {"rank": 8, "scale": 2.0}}, "lora_args=.* is not supported"),
        ({"ffn_exp": 4.0}, "ffn_exp=4.0 is not supported"),
        ({"attn_temperature_tuning": True}, "attn_temperature_tuning=True is not supported"),
        ({"rope_scaling_factor": 16.0}, "rope_scaling_factor given without use_scaled_rope=true"),
        ({"use_scaled_rope": False, "rope_high_freq_factor": 2.0}, "rope_high_freq_factor given without use_scaled_rope"),
    ],
)
def test_params_json_keys_that_change_the_model_are_never_ignored(tmp_path, extra, match):
    path = _write(tmp_path, "params.json", {**META_BASE, **extra})
    with pytest.raises(ValueError, match=match) as excinfo:
        LlamaConfig.from_meta(path)
    _one_line_naming(excinfo, path)


def test_params_json_neutral_and_runtime_keys_are_accepted():
    neutral = {"max_batch_size": 32, "use_qk_norm": False, "attn_temperature_tuning": False, "vision_chunk_size": -1,
               "vision_num_cross_attention_layers": -1, "moe_args": None, "quantization_args": None,
               "attention_chunk_size": None, "nope_layer_interval": None, "floor_scale": 8192.0, "attn_scale": 0.1,
               "vision_max_num_chunks": 4, "lora_args": None, "ffn_exp": None, "head_dim": 16}
    assert LlamaConfig.from_meta({**META_BASE, **neutral}) == LlamaConfig.from_meta(META_BASE)


def test_params_json_scaled_rope_follows_metas_model_args():
    # Llama 3.1 params.json: use_scaled_rope with Meta's apply_scaling constants (8, 1, 4, 8192).
    c = LlamaConfig.from_meta({**META_BASE, "use_scaled_rope": True})
    assert c.rope_scaling == RopeScaling("llama3", 8.0, 1.0, 4.0, 8192)
    # Llama 4's ModelArgs spelling for the factor and the high-frequency factor.
    c = LlamaConfig.from_meta({**META_BASE, "use_scaled_rope": True, "rope_scaling_factor": 32.0,
                               "rope_high_freq_factor": 2.0})
    assert c.rope_scaling == RopeScaling("llama3", 32.0, 1.0, 2.0, 8192)
    assert LlamaConfig.from_meta({**META_BASE, "use_scaled_rope": False}).rope_scaling is None


def test_params_json_max_seq_len_and_tie():
    assert LlamaConfig.from_meta(META_BASE).max_seq_len == 4096  # Llama-2's length when nothing says otherwise
    assert LlamaConfig.from_meta({**META_BASE, "max_seq_len": 512}).max_seq_len == 512
    assert LlamaConfig.from_meta({**META_BASE, "max_seq_len": 512}, max_seq_len=512).max_seq_len == 512
    with pytest.raises(ValueError, match="max_seq_len 512 does not match the given max_seq_len=1024"):
        LlamaConfig.from_meta({**META_BASE, "max_seq_len": 512}, max_seq_len=1024)
    assert LlamaConfig.from_meta(META_BASE, tie_word_embeddings=True).tie_word_embeddings


# ---------------------------------------------------------------- odd files, one line naming the file
@pytest.mark.parametrize("reader, name", [(LlamaConfig.from_hf, "config.json"), (LlamaConfig.from_meta, "params.json")])
def test_unreadable_config_files(tmp_path, monkeypatch, reader, name):
    path = tmp_path / name
    # A directory where the file should be (given as the directory holding it, and as the path).
    path.mkdir()
    for arg in (tmp_path, path):
        with pytest.raises(ValueError, match="is a directory") as excinfo:
            reader(arg)
        _one_line_naming(excinfo, path)
    path.rmdir()
    # A binary file (a PNG header and bytes that are not UTF-8).
    path.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe\x00")
    with pytest.raises(ValueError, match="not UTF-8 text") as excinfo:
        reader(tmp_path)
    _one_line_naming(excinfo, path)
    # Latin-1 text (UTF-8 decode error in the middle of JSON).
    path.write_bytes('{"dim": 64, "name": "caf\xe9"}'.encode("latin-1"))
    with pytest.raises(ValueError, match="not UTF-8 text") as excinfo:
        reader(tmp_path)
    _one_line_naming(excinfo, path)
    # Empty, truncated, not an object.
    for text, match in (("", "not valid JSON"), ('{"dim": 6', "not valid JSON"), ("[1, 2]", "expected a JSON object")):
        path.write_text(text)
        with pytest.raises(ValueError, match=match) as excinfo:
            reader(tmp_path)
        _one_line_naming(excinfo, path)
    # Permission denied. (Tests may run as root, which may read anything: simulate the OS refusing.)
    path.write_text("{}")

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr("llama_ref.config_files.open", denied, raising=False)
    with pytest.raises(PermissionError, match="permission denied") as excinfo:
        reader(tmp_path)
    _one_line_naming(excinfo, path)
    monkeypatch.undo()
    # A FIFO would block a reader forever: refused without opening it.
    path.unlink()
    os.mkfifo(path)
    with pytest.raises(ValueError, match="is not a regular file") as excinfo:
        reader(tmp_path)
    _one_line_naming(excinfo, path)
    path.unlink()
    with pytest.raises(FileNotFoundError, match=f"no {name} at") as excinfo:
        reader(tmp_path)
    _one_line_naming(excinfo, path)


def test_unreadable_config_through_the_loader(tmp_path):
    from llama_ref.loading import load_pretrained

    (tmp_path / "model.safetensors").write_bytes(b"")
    (tmp_path / "config.json").write_bytes(b"\xff\xfe\x00binary")
    with pytest.raises(ValueError, match="not UTF-8 text") as excinfo:
        load_pretrained(tmp_path, device="meta")
    _one_line_naming(excinfo, tmp_path / "config.json")


# ---------------------------------------------------------------- two spellings: as transformers, or refused
def _hf_inv_freq(d: dict) -> torch.Tensor:
    """The frequencies transformers' Llama really uses for config dict ``d``."""
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    cfg = transformers.LlamaConfig.from_dict(copy.deepcopy(d))  # transformers edits the dicts it is given
    rotary = LlamaRotaryEmbedding(cfg)
    assert rotary.attention_scaling == 1.0
    return rotary.inv_freq


def _ours_inv_freq(c: LlamaConfig) -> torch.Tensor:
    return rope_inv_freq(c.head_dim, c.rope_theta, c.rope_scaling)


def _plain(theta=10000.0):
    return rope_inv_freq(16, theta)


# Files transformers and we must read the same way: (extra keys, the scaling we must resolve to, theta).
AGREED = {
    "2024 file: top-level rope_theta + rope_scaling": (
        {"rope_theta": 500000.0, "rope_scaling": LLAMA3}, RopeScaling("llama3", 8.0, 1.0, 4.0, 32), 500000.0),
    "legacy 'type' key": ({"rope_scaling": {"type": "linear", "factor": 4.0}}, RopeScaling.linear(4.0), 10000.0),
    "'type' and 'rope_type' equal": (
        {"rope_scaling": {"type": "linear", "rope_type": "linear", "factor": 4.0}}, RopeScaling.linear(4.0), 10000.0),
    "transformers 5: rope_parameters with theta": (
        {"rope_theta": None, "rope_parameters": {**LLAMA3, "rope_theta": 5000.0}} , RopeScaling("llama3", 8.0, 1.0, 4.0, 32),
        5000.0),
    "rope_parameters theta equal to top-level": (
        {"rope_theta": 5000.0, "rope_parameters": {"rope_type": "default", "rope_theta": 5000.0}}, None, 5000.0),
    "both dicts, the same": (
        {"rope_scaling": {"rope_type": "linear", "factor": 2.0},
         "rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}}, RopeScaling.linear(2.0), 10000.0),
    "rope_scaling null, rope_parameters used": (
        {"rope_theta": None, "rope_scaling": None,
         "rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 300.0}},
        RopeScaling.linear(2.0), 300.0),
    "empty rope_scaling falls through to rope_parameters": (
        {"rope_scaling": {}, "rope_parameters": {"rope_type": "linear", "factor": 2.0}}, RopeScaling.linear(2.0), 10000.0),
    "llama3 without original_max: max_position_embeddings": (
        {"rope_scaling": {k: v for k, v in LLAMA3.items() if k != "original_max_position_embeddings"}},
        RopeScaling("llama3", 8.0, 1.0, 4.0, 128), 10000.0),
    "top-level original_max_position_embeddings only": (
        {"rope_scaling": {k: v for k, v in LLAMA3.items() if k != "original_max_position_embeddings"},
         "original_max_position_embeddings": 16}, RopeScaling("llama3", 8.0, 1.0, 4.0, 16), 10000.0),
    "top-level original_max equal to the dict's": (
        {"rope_scaling": LLAMA3, "original_max_position_embeddings": 32}, RopeScaling("llama3", 8.0, 1.0, 4.0, 32), 10000.0),
    "unused keys are ignored by both": (
        {"rope_scaling": {"rope_type": "linear", "factor": 2.0, "original_max_position_embeddings": 64}},
        RopeScaling.linear(2.0), 10000.0),
}


def _drop_none(d: dict) -> dict:
    return {k: v for k, v in d.items() if v is not None or k in ("rope_scaling", "rope_parameters")}


@pytest.mark.parametrize("case", list(AGREED))
def test_rope_spellings_read_as_transformers_reads_them(case):
    extra, scaling, theta = AGREED[case]
    d = _drop_none({**HF_BASE, **extra})
    ours = LlamaConfig.from_hf(d)
    assert (ours.rope_scaling, ours.rope_theta) == (scaling, theta)
    assert torch.equal(_ours_inv_freq(ours), _hf_inv_freq(d))  # bit for bit


@pytest.mark.parametrize("case", ["2024 file: top-level rope_theta + rope_scaling", "transformers 5: rope_parameters with theta",
                                  "top-level original_max_position_embeddings only"])
def test_rope_spellings_give_transformers_logits(case):
    """The whole model built from the raw dict (ours) and by transformers from the same dict."""
    d = _drop_none({**HF_BASE, **AGREED[case][0], "initializer_range": 0.3, "num_hidden_layers": 2})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        hf = transformers.LlamaForCausalLM(transformers.LlamaConfig.from_dict(copy.deepcopy(d))).eval()
    ours = Llama(LlamaConfig.from_hf(d))
    ours.load_state_dict(convert_hf_state_dict(hf.state_dict(), ours.config))
    tokens = torch.randint(0, 100, (2, 64), generator=torch.Generator().manual_seed(0))  # past original_max 32 / 16
    with torch.no_grad():
        assert (ours(tokens) - hf(tokens).logits).abs().max().item() <= 1e-4


# Files that say two different things: transformers silently picks one; we refuse, naming both.
CONFLICTS = {
    # Issue 8: loaded as plain RoPE while transformers applies the scaling (logits off by ~5-12).
    "issue 8: rope_parameters default vs rope_scaling linear": (
        {"rope_parameters": {"rope_type": "default"}, "rope_scaling": {"rope_type": "linear", "factor": 4}},
        "rope_scaling .* and rope_parameters .* disagree; transformers applies rope_scaling"),
    "rope_parameters llama3 vs rope_scaling linear": (
        {"rope_parameters": {**LLAMA3, "rope_theta": 10000.0}, "rope_scaling": {"rope_type": "linear", "factor": 4.0}},
        "disagree"),
    "same type, different factor": (
        {"rope_parameters": {"rope_type": "linear", "factor": 2.0}, "rope_scaling": {"rope_type": "linear", "factor": 4.0}},
        "disagree"),
    "rope_parameters theta dropped in favour of top-level": (
        {"rope_theta": 1000.0, "rope_parameters": {"rope_type": "default", "rope_theta": 500.0},
         "rope_scaling": {"rope_type": "linear", "factor": 4.0}}, "disagree"),
    "top-level rope_theta vs rope_parameters.rope_theta": (
        {"rope_theta": 1000.0, "rope_parameters": {"rope_type": "default", "rope_theta": 500.0}},
        r"rope_theta=1000.0 disagrees with rope_parameters.rope_theta=500.0 \(transformers uses 500.0"),
    "top-level rope_theta vs rope_scaling.rope_theta": (
        {"rope_theta": 1000.0, "rope_scaling": {"rope_type": "linear", "factor": 4.0, "rope_theta": 500.0}},
        "rope_theta=1000.0 disagrees with rope_scaling.rope_theta=500.0"),
    "type vs rope_type": (
        {"rope_scaling": {"type": "linear", "rope_type": "llama3", **{k: v for k, v in LLAMA3.items() if k != "rope_type"}}},
        "rope_type='llama3' and type='linear'; transformers uses rope_type"),
    "top-level original_max vs the dict's": (
        {"rope_scaling": LLAMA3, "original_max_position_embeddings": 16},
        r"original_max_position_embeddings=16 disagrees with rope_scaling.original_max_position_embeddings=32 "
        r"\(transformers uses 16\)"),
}


@pytest.mark.parametrize("case", list(CONFLICTS))
def test_conflicting_rope_spellings_are_refused(tmp_path, case):
    extra, match = CONFLICTS[case]
    d = _drop_none({**HF_BASE, **extra})
    path = _write(tmp_path, "config.json", d)
    with pytest.raises(ValueError, match=match) as excinfo:
        LlamaConfig.from_hf(path)
    _one_line_naming(excinfo, path)
    # transformers itself builds a model from this file without a word (it picks one reading).
    assert _hf_inv_freq(d).shape == (8,)


def test_issue_8_transformers_really_applies_the_scaling():
    d = {**HF_BASE, "rope_parameters": {"rope_type": "default"}, "rope_scaling": {"rope_type": "linear", "factor": 4}}
    assert torch.equal(_hf_inv_freq(d), _plain() / 4)  # not plain RoPE: refusing is right


def test_dtype_spellings():
    assert read_hf_dtype({"torch_dtype": "bfloat16"}, "f") == "bfloat16"
    assert read_hf_dtype({"dtype": "float16"}, "f") == "float16"
    assert read_hf_dtype({"dtype": "bfloat16", "torch_dtype": "bfloat16"}, "f") == "bfloat16"
    assert read_hf_dtype({"dtype": "auto"}, "f") is None and read_hf_dtype({}, "f") is None
    assert read_hf_dtype({"dtype": None, "torch_dtype": "float32"}, "f") == "float32"
    with pytest.raises(ValueError, match="f: dtype='float32' disagrees with torch_dtype='bfloat16' "
                                         r"\(transformers uses dtype\)"):
        read_hf_dtype({"dtype": "float32", "torch_dtype": "bfloat16"}, "f")
    with pytest.raises(ValueError, match="f: torch_dtype must be a string"):
        read_hf_dtype({"torch_dtype": 16}, "f")
    with pytest.raises(ValueError, match="f: unknown dtype 'int8'"):
        read_hf_dtype({"dtype": "int8"}, "f")


def test_head_dim_spellings_as_transformers():
    # Explicit head_dim equal to hidden/heads, different from it, and absent.
    for extra, head_dim in (({"head_dim": 16}, 16), ({"head_dim": 24}, 24), ({"head_dim": None}, 16), ({}, 16)):
        d = {**HF_BASE, **extra}
        assert LlamaConfig.from_hf(d).head_dim == transformers.LlamaConfig.from_dict(copy.deepcopy(d)).head_dim == head_dim


def test_unused_rope_keys_are_logged(caplog):
    d = {**HF_BASE, "rope_scaling": {"rope_type": "linear", "factor": 2.0, "beta_fast": 32}}
    with caplog.at_level(logging.WARNING, logger="llama_ref.config_files"):
        assert LlamaConfig.from_hf(d).rope_scaling == RopeScaling.linear(2.0)
    assert "beta_fast" in caplog.text and "transformers ignores them too" in caplog.text
