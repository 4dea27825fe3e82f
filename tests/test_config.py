"""LlamaConfig: validation, derived values, presets (exact parameter counts), HF and Meta readers."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest

from llama_ref import PRESETS, Llama, LlamaConfig, RopeScaling, meta_ffn_hidden_dim
from llama_ref.hf import hf_config_dict

transformers = pytest.importorskip("transformers")

BASE = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=100, hidden_dim=96)

# Meta's params.json files, as shipped (Llama-2 says vocab_size -1: the tokenizer decides).
META_PARAMS = {
    "llama-2-7b": {"dim": 4096, "multiple_of": 256, "n_heads": 32, "n_layers": 32, "norm_eps": 1e-05, "vocab_size": -1},
    "llama-2-13b": {"dim": 5120, "multiple_of": 256, "n_heads": 40, "n_layers": 40, "norm_eps": 1e-05, "vocab_size": -1},
    "llama-2-70b": {"dim": 8192, "multiple_of": 4096, "ffn_dim_multiplier": 1.3, "n_heads": 64, "n_kv_heads": 8,
                    "n_layers": 80, "norm_eps": 1e-05, "vocab_size": -1},
    "llama-3-8b": {"dim": 4096, "n_layers": 32, "n_heads": 32, "n_kv_heads": 8, "vocab_size": 128256,
                   "multiple_of": 1024, "ffn_dim_multiplier": 1.3, "norm_eps": 1e-05, "rope_theta": 500000.0},
}


# ---------------------------------------------------------------- derived values, validation
def test_derived_values():
    c = LlamaConfig(**BASE)
    assert (c.head_dim, c.n_rep, c.kv_dim) == (16, 2, 32)
    mha = LlamaConfig(**{**BASE, "n_kv_heads": None})
    assert mha.n_kv_heads == 4 and mha.n_rep == 1 and mha == LlamaConfig(**{**BASE, "n_kv_heads": 4})


def test_derived_values_cannot_be_set_inconsistently():
    c = LlamaConfig(**BASE)
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.dim = 128  # frozen: changing dim alone would leave head_dim stale in a mutable design
    with pytest.raises(AttributeError):
        c.head_dim = 8
    with pytest.raises(ValueError, match="n_rep"):
        c.replace(n_rep=1)
    with pytest.raises(ValueError, match="kv_dim"):
        c.replace(kv_dim=64)
    # replace() re-derives a derived head_dim and re-validates.
    d = c.replace(dim=128)
    assert d.head_dim == 32 and c.head_dim == 16 and not d.head_dim_explicit
    with pytest.raises(ValueError, match="n_kv_heads=3"):
        c.replace(n_kv_heads=3)


@pytest.mark.parametrize(
    "changes, match",
    [
        ({"dim": 66}, "dim=66 is not divisible by n_heads=4"),
        ({"n_heads": 4, "n_kv_heads": 3}, "n_heads=4 is not divisible by n_kv_heads=3"),
        ({"n_kv_heads": 8}, "n_heads=4 is not divisible by n_kv_heads=8"),
        ({"dim": 60, "n_heads": 4, "n_kv_heads": 4}, "head_dim=15"),
        ({"dim": 0}, "dim must be positive, got 0"),
        ({"n_layers": -1}, "n_layers must be positive, got -1"),
        ({"n_heads": 0}, "n_heads must be positive"),
        ({"n_kv_heads": 0}, "n_kv_heads must be positive"),
        ({"vocab_size": 0}, "vocab_size must be positive"),
        ({"hidden_dim": -5}, "hidden_dim must be positive"),
        ({"max_seq_len": 0}, "max_seq_len must be positive"),
        ({"dim": 64.0}, "dim must be an int, got 64.0"),
        ({"n_layers": True}, "n_layers must be an int, got True"),
        ({"norm_eps": 0.0}, "norm_eps must be a positive number, got 0.0"),
        ({"norm_eps": float("nan")}, "norm_eps must be a positive number"),
        ({"rope_theta": -1.0}, "rope_theta must be a positive number"),
        ({"rope_theta": "10000"}, "rope_theta must be a positive number"),
    ],
)
def test_bad_config_raises_value_error_naming_the_value(changes, match):
    with pytest.raises(ValueError, match=match):
        LlamaConfig(**{**BASE, **changes})


def test_model_rejects_non_config():
    with pytest.raises(ValueError, match="config must be a LlamaConfig, got dict"):
        Llama(BASE)


# ---------------------------------------------------------------- presets
def test_preset_names_are_exact():
    assert LlamaConfig.from_preset("llama-2-7b") is PRESETS["llama-2-7b"]
    for bad in ("llama-2-7B", "llama2-7b", "7b", "llama-2-7b "):
        with pytest.raises(ValueError, match=f"unknown preset {bad!r}"):
            LlamaConfig.from_preset(bad)


@pytest.mark.parametrize(
    "name, expected",
    [
        ("llama-2-7b", 6_738_415_616),
        ("llama-2-13b", 13_015_864_320),
        ("llama-2-70b", 68_976_648_192),
        ("llama-3-8b", 8_030_261_248),
    ],
)
def test_preset_parameter_counts_exact_on_meta(name, expected):
    model = Llama.from_preset(name, device="meta")
    assert model.param_count() == expected
    # The buffers (RoPE table) and absent caches must not count as parameters.
    assert sum(p.numel() for p in model.parameters()) == expected


def test_tiny_parameter_count_by_formula(tiny_config):
    c = tiny_config
    per_layer = c.dim * c.dim * 2 + c.dim * c.kv_dim * 2 + 3 * c.dim * c.hidden_dim + 2 * c.dim
    expected = 2 * c.vocab_size * c.dim + c.n_layers * per_layer + c.dim
    assert Llama(c, device="meta").param_count() == expected


# ---------------------------------------------------------------- Meta params.json
@pytest.mark.parametrize(
    "dim, multiple_of, mult, expected",
    [(4096, 256, None, 11008), (5120, 256, None, 13824), (8192, 4096, 1.3, 28672), (4096, 1024, 1.3, 14336)],
)
def test_meta_ffn_hidden_dim(dim, multiple_of, mult, expected):
    assert meta_ffn_hidden_dim(dim, multiple_of, mult) == expected


def test_meta_ffn_hidden_dim_rejects_bad_values():
    with pytest.raises(ValueError, match="multiple_of must be a positive int, got 0"):
        meta_ffn_hidden_dim(4096, 0)
    with pytest.raises(ValueError, match="ffn_dim_multiplier must be a positive number or None, got -1.3"):
        meta_ffn_hidden_dim(4096, 256, -1.3)


@pytest.mark.parametrize("name", list(META_PARAMS))
def test_from_meta_matches_presets(name, tmp_path):
    params = META_PARAMS[name]
    vocab = None if params["vocab_size"] > 0 else 32000
    preset = PRESETS[name]
    from_dict = LlamaConfig.from_meta(params, vocab_size=vocab, max_seq_len=preset.max_seq_len)
    assert from_dict == preset  # names are not compared
    (tmp_path / "params.json").write_text(json.dumps(params))
    assert LlamaConfig.from_meta(tmp_path, vocab_size=vocab, max_seq_len=preset.max_seq_len) == preset
    assert LlamaConfig.from_meta(tmp_path / "params.json", vocab_size=vocab, max_seq_len=preset.max_seq_len) == preset


def test_from_meta_errors(tmp_path):
    llama2 = META_PARAMS["llama-2-7b"]
    with pytest.raises(ValueError, match="vocab_size is -1"):
        LlamaConfig.from_meta(llama2)
    with pytest.raises(ValueError, match="vocab_size 128256 does not match the given vocab_size=32000"):
        LlamaConfig.from_meta(META_PARAMS["llama-3-8b"], vocab_size=32000)
    with pytest.raises(ValueError, match="missing required field.*n_heads"):
        LlamaConfig.from_meta({"dim": 64, "n_layers": 2}, vocab_size=10)
    with pytest.raises(ValueError, match="n_kv_heads must be positive, got 0"):
        LlamaConfig.from_meta({**META_PARAMS["llama-2-70b"], "n_kv_heads": 0}, vocab_size=32000)
    with pytest.raises(ValueError, match="unknown key 'rope_scaling'.*use_scaled_rope"):
        LlamaConfig.from_meta({**META_PARAMS["llama-3-8b"], "rope_scaling": {"rope_type": "linear", "factor": 4}})
    with pytest.raises(FileNotFoundError, match="params.json"):
        LlamaConfig.from_meta(tmp_path, vocab_size=32000)
    with pytest.raises(FileNotFoundError):
        LlamaConfig.from_meta(tmp_path / "nope.json", vocab_size=32000)
    (tmp_path / "params.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        LlamaConfig.from_meta(tmp_path, vocab_size=32000)
    (tmp_path / "params.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="expected a JSON object, got list"):
        LlamaConfig.from_meta(tmp_path, vocab_size=32000)
    with pytest.raises(ValueError, match="got int"):
        LlamaConfig.from_meta(42, vocab_size=32000)


# ---------------------------------------------------------------- HF config.json
def _hf_kwargs(**overrides):
    kw = dict(hidden_size=96, intermediate_size=200, num_hidden_layers=3, num_attention_heads=6,
              num_key_value_heads=2, vocab_size=300, rope_theta=12345.0, rms_norm_eps=3e-4,
              max_position_embeddings=77)
    kw.update(overrides)
    return kw


EXPECTED_HF = LlamaConfig(dim=96, n_layers=3, n_heads=6, n_kv_heads=2, vocab_size=300, hidden_dim=200,
                          norm_eps=3e-4, rope_theta=12345.0, max_seq_len=77)


def test_from_hf_dict_object_file_and_dir(tmp_path):
    hf_cfg = transformers.LlamaConfig(**_hf_kwargs())
    assert LlamaConfig.from_hf(hf_cfg.to_dict()) == EXPECTED_HF
    assert LlamaConfig.from_hf(hf_cfg) == EXPECTED_HF  # a live transformers config
    hf_cfg.save_pretrained(tmp_path)
    assert LlamaConfig.from_hf(tmp_path) == EXPECTED_HF
    assert LlamaConfig.from_hf(str(tmp_path / "config.json")) == EXPECTED_HF
    # Exactly what transformers itself reads back from that file.
    reread = transformers.LlamaConfig.from_pretrained(tmp_path)
    assert reread.rope_parameters["rope_theta"] == EXPECTED_HF.rope_theta


def test_from_hf_mha_and_legacy_keys():
    # Pre-5.x files: top-level rope_theta, no head_dim, no num_key_value_heads (= MHA).
    legacy = {"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
              "vocab_size": 50, "intermediate_size": 128, "rope_theta": 500.0, "rms_norm_eps": 1e-5,
              "max_position_embeddings": 256, "rope_scaling": None}
    c = LlamaConfig.from_hf(legacy)
    assert (c.n_kv_heads, c.rope_theta, c.norm_eps, c.max_seq_len) == (4, 500.0, 1e-5, 256)


def test_hf_config_dict_round_trips(tiny_config):
    c = tiny_config.replace(rope_theta=777.0, norm_eps=1e-4)
    assert LlamaConfig.from_hf(hf_config_dict(c)) == c
    # ... and transformers reads the same model out of it.
    assert LlamaConfig.from_hf(transformers.LlamaConfig(**hf_config_dict(c)).to_dict()) == c


@pytest.mark.parametrize(
    "changes, match",
    [
        ({"model_type": "mistral"}, "model_type is 'mistral'"),
        ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
        ({"attention_bias": True}, "attention_bias"),
        ({"mlp_bias": True}, "mlp_bias"),
        # llama3 without its band factors: transformers raises KeyError, we name the missing field.
        ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}},
         "missing required field rope_parameters.low_freq_factor"),
        ({"rope_parameters": {"rope_type": "dynamic", "factor": 2.0}}, "'dynamic' is not supported"),
        ({"rope_parameters": {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 32}},
         "'yarn' is not supported"),
        ({"rope_parameters": {"rope_type": "longrope"}}, "'longrope' is not supported"),
        ({"rope_parameters": {"rope_type": "su"}}, "'su' is not a RoPE type llama_ref knows"),
        ({"head_dim": 7}, "head_dim=7 must be even"),
        ({"num_attention_heads": 5, "head_dim": 16}, "hidden_size=96 is not divisible by num_attention_heads=5"),
        ({"num_key_value_heads": 4}, "n_heads=6 is not divisible by n_kv_heads=4"),
        ({"num_key_value_heads": 0}, "num_key_value_heads must be positive, got 0"),
        ({"partial_rotary_factor": 0.5}, "partial_rotary_factor=0.5 is not supported"),
    ],
)
def test_from_hf_rejects_unsupported(changes, match):
    d = transformers.LlamaConfig(**_hf_kwargs()).to_dict()
    d.update(changes)
    with pytest.raises(ValueError, match=match):
        LlamaConfig.from_hf(d)


def test_from_hf_missing_and_bad_files(tmp_path):
    d = transformers.LlamaConfig(**_hf_kwargs()).to_dict()
    del d["intermediate_size"]
    with pytest.raises(ValueError, match="missing required field.*intermediate_size"):
        LlamaConfig.from_hf(d)
    with pytest.raises(FileNotFoundError, match="config.json"):
        LlamaConfig.from_hf(tmp_path)
    (tmp_path / "config.json").write_text("")
    with pytest.raises(ValueError, match="not valid JSON"):
        LlamaConfig.from_hf(tmp_path)


def test_presets_are_consistent_with_meta_arithmetic():
    # The literal hidden_dim in each preset is what Meta's formula gives for that model's params.json.
    for name, params in META_PARAMS.items():
        got = meta_ffn_hidden_dim(params["dim"], params["multiple_of"], params.get("ffn_dim_multiplier"))
        assert got == PRESETS[name].hidden_dim, name
    assert math.isclose(PRESETS["llama-3-8b"].rope_theta, 500000.0)


# ---------------------------------------------------------------- Llama 3.x / Code Llama / TinyLlama presets
# Published totals (model cards / HF parameter counts); Code Llama 13B/34B are computed from their
# config.json shapes (13B: Llama-2-13B with vocab 32016; 34B: dim 8192, 48 layers, 64 heads, 8 kv
# heads, FFN 22016, vocab 32000).
FAMILY_COUNTS = {
    "llama-3.1-8b": 8_030_261_248,
    "llama-3.1-70b": 70_553_706_496,
    "llama-3.1-405b": 405_853_388_800,
    "llama-3.2-1b": 1_235_814_400,
    "llama-3.2-3b": 3_212_749_824,
    "llama-3.3-70b": 70_553_706_496,
    "code-llama-7b": 6_738_546_688,
    "code-llama-13b": 13_016_028_160,
    "code-llama-34b": 33_743_970_304,
    "tinyllama-1.1b": 1_100_048_384,
}


@pytest.mark.parametrize("name, expected", list(FAMILY_COUNTS.items()))
def test_family_preset_parameter_counts_exact_on_meta(name, expected):
    import time

    t0 = time.perf_counter()
    model = Llama.from_preset(name, device="meta")
    assert time.perf_counter() - t0 < 30  # 405B builds in well under a second here; no storage at all
    assert model.param_count() == expected
    assert all(p.is_meta for p in model.parameters())


def _by_formula(c: LlamaConfig) -> int:
    per_layer = 2 * c.dim * c.q_dim + 2 * c.dim * c.kv_dim + 3 * c.dim * c.hidden_dim + 2 * c.dim
    embeddings = (1 if c.tie_word_embeddings else 2) * c.vocab_size * c.dim
    return embeddings + c.n_layers * per_layer + c.dim


def test_code_llama_totals_by_formula():
    # 13B: 13,015,864,320 (Llama-2-13B) + 2 x 16 extra tokens x 5120 = 13,016,028,160.
    assert FAMILY_COUNTS["code-llama-13b"] == 13_015_864_320 + 2 * 16 * 5120
    # 34B per layer: 2*8192*8192 + 2*8192*1024 + 3*8192*22016 + 2*8192 = 692,076,544;
    # x 48 + 2*32000*8192 + 8192 = 33,743,970,304.
    assert FAMILY_COUNTS["code-llama-34b"] == 48 * 692_076_544 + 2 * 32000 * 8192 + 8192
    for name, total in FAMILY_COUNTS.items():
        assert _by_formula(PRESETS[name]) == total, name


@pytest.mark.parametrize(
    "name, max_seq_len, theta, factor, tied",
    [
        ("llama-3.1-8b", 131072, 500000.0, 8.0, False),
        ("llama-3.1-70b", 131072, 500000.0, 8.0, False),
        ("llama-3.1-405b", 131072, 500000.0, 8.0, False),
        ("llama-3.3-70b", 131072, 500000.0, 8.0, False),
        ("llama-3.2-1b", 131072, 500000.0, 32.0, True),
        ("llama-3.2-3b", 131072, 500000.0, 32.0, True),
        ("code-llama-7b", 16384, 1e6, None, False),
        ("code-llama-13b", 16384, 1e6, None, False),
        ("code-llama-34b", 16384, 1e6, None, False),
        ("tinyllama-1.1b", 2048, 10000.0, None, False),
    ],
)
def test_family_preset_settings(name, max_seq_len, theta, factor, tied):
    c = PRESETS[name]
    assert (c.max_seq_len, c.rope_theta, c.tie_word_embeddings, c.norm_eps, c.name) == (max_seq_len, theta, tied, 1e-5, name)
    if factor is None:
        assert c.rope_scaling is None
    else:  # Llama 3.x: Meta's llama3 scaling constants, factor 8 (3.1, 3.3) or 32 (3.2)
        assert c.rope_scaling == RopeScaling("llama3", factor, 1.0, 4.0, 8192)
    assert not c.head_dim_explicit and c.head_dim == c.dim // c.n_heads


def test_llama33_is_llama31_70b():
    assert PRESETS["llama-3.3-70b"] == PRESETS["llama-3.1-70b"]  # names are not compared


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_round_trip_through_transformers(name):
    """hf_config_dict writes rope_scaling, tie_word_embeddings and head_dim; transformers reads the
    same model back (its own to_dict, in the 5.x spelling) and so do we."""
    c = PRESETS[name]
    d = hf_config_dict(c)
    assert LlamaConfig.from_hf(d) == c
    hf = transformers.LlamaConfig(**json.loads(json.dumps(d)))
    assert LlamaConfig.from_hf(hf.to_dict()) == c
    assert (hf.head_dim, hf.tie_word_embeddings) == (c.head_dim, c.tie_word_embeddings)


# ---------------------------------------------------------------- head_dim: derived or explicit
def test_head_dim_explicit_and_derived():
    derived = LlamaConfig(**BASE)
    explicit = LlamaConfig(**BASE, head_dim=16)
    assert derived == explicit and derived.head_dim == explicit.head_dim == 16  # the same model
    assert not derived.head_dim_explicit and explicit.head_dim_explicit
    wide = LlamaConfig(**BASE, head_dim=24)  # q: 4 heads x 24 = 96 wide for a 64-wide model
    assert (wide.head_dim, wide.q_dim, wide.kv_dim, wide.n_rep) == (24, 96, 48, 2)
    # dim need not divide by n_heads when head_dim is given (e.g. 3 heads of 32 on a 64-wide model).
    assert LlamaConfig(**{**BASE, "n_heads": 3, "n_kv_heads": 1}, head_dim=32).q_dim == 96


def test_replace_rederives_a_derived_head_dim_and_keeps_an_explicit_one():
    derived = LlamaConfig(**BASE)
    assert derived.replace(dim=128).head_dim == 32  # 128 / 4
    assert derived.replace(n_heads=8, n_kv_heads=4).head_dim == 8  # 64 / 8
    # Tensor-parallel rank: fewer heads, same head width.
    rank = LlamaConfig(**BASE, head_dim=16).replace(n_heads=2, n_kv_heads=1)
    assert (rank.head_dim, rank.q_dim, rank.head_dim_explicit) == (16, 32, True)
    assert LlamaConfig(**BASE, head_dim=24).replace(dim=128).head_dim == 24
    assert LlamaConfig(**BASE, head_dim=24).replace(head_dim=None).head_dim == 16  # derive again
    assert derived.replace(head_dim=8).head_dim == 8 and derived.replace(head_dim=8).head_dim_explicit


@pytest.mark.parametrize(
    "changes, match",
    [
        ({"head_dim": 0}, "head_dim must be a positive int or None, got 0"),
        ({"head_dim": 16.0}, "head_dim must be a positive int or None, got 16.0"),
        ({"head_dim": True}, "head_dim must be a positive int or None, got True"),
        ({"head_dim": 15}, "head_dim=15 must be even"),
        ({"tie_word_embeddings": 1}, "tie_word_embeddings must be a bool, got 1"),
        ({"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, "rope_scaling must be a RopeScaling or None"),
        ({"rope_theta": float("inf")}, "rope_theta must be a positive number, got inf"),
        ({"norm_eps": float("-inf")}, "norm_eps must be a positive number"),
    ],
)
def test_new_fields_are_validated(changes, match):
    with pytest.raises(ValueError, match=match):
        LlamaConfig(**{**BASE, **changes})


def test_model_with_explicit_head_dim_has_the_right_shapes(tiny_config):
    c = tiny_config.replace(head_dim=24)  # 4 heads x 24 = 96, 2 kv heads x 24 = 48 on a 64-wide model
    model = Llama(c, device="meta")
    attn = model.layers[0].attention
    assert tuple(attn.wq.weight.shape) == (96, 64) and tuple(attn.wo.weight.shape) == (64, 96)
    assert tuple(attn.wk.weight.shape) == (48, 64) and tuple(attn.wv.weight.shape) == (48, 64)
    assert model.param_count() == _by_formula(c)
    model.setup_cache(2, 16)
    assert tuple(model.caches[0].cache_k.shape) == (2, 16, 2, 24)
    assert model.freqs_cis.shape[1] == 12  # head_dim // 2 rotated pairs


# ---------------------------------------------------------------- RopeScaling
def test_rope_scaling_constructors_and_hf_form():
    assert RopeScaling.llama3() == RopeScaling("llama3", 8.0, 1.0, 4.0, 8192)  # Meta's apply_scaling constants
    assert RopeScaling.linear(4) == RopeScaling("linear", 4.0) and isinstance(RopeScaling.linear(4).factor, float)
    assert RopeScaling.llama3(factor=32).to_hf() == {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                                     "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    assert RopeScaling.linear(2.5).to_hf() == {"rope_type": "linear", "factor": 2.5}
    c = LlamaConfig(**BASE, rope_scaling=RopeScaling.llama3())
    assert c.to_dict()["rope_scaling"] == {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                           "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    assert json.loads(json.dumps(c.to_dict()))["head_dim"] == 16
    assert hash(c) == hash(LlamaConfig(**BASE, rope_scaling=RopeScaling.llama3()))


@pytest.mark.parametrize(
    "args, match",
    [
        (("default", 1.0), "plain RoPE: use rope_scaling=None"),
        (("dynamic", 2.0), "'dynamic' is not supported: dynamic NTK"),
        (("yarn", 2.0), "'yarn' is not supported"),
        (("ntk", 2.0), "unknown rope_type 'ntk'"),
        ((None, 2.0), "rope_type must be a string"),
        (("linear", 0.0), "factor must be a positive finite number, got 0.0"),
        (("linear", float("nan")), "factor must be a positive finite number"),
        (("linear", "4"), "factor must be a positive finite number, got '4'"),
        (("linear", True), "factor must be a positive finite number, got True"),
        (("linear", 4.0, 1.0), r"'linear'\) takes only factor; got low_freq_factor"),
        (("llama3", 8.0), "low_freq_factor must be a positive finite number for 'llama3', got None"),
        (("llama3", 8.0, 4.0, 1.0, 8192), r"low_freq_factor \(4.0\) must be less than high_freq_factor \(1.0\)"),
        (("llama3", 8.0, 2.0, 2.0, 8192), "must be less than"),
        (("llama3", 8.0, 1.0, 4.0, 8192.0), "original_max_position_embeddings must be a positive int"),
        (("llama3", 8.0, 1.0, 4.0, 0), "original_max_position_embeddings must be a positive int"),
    ],
)
def test_rope_scaling_is_validated(args, match):
    with pytest.raises(ValueError, match=match):
        RopeScaling(*args)
