"""Checkpoint loading: every layout reproduces the synthetic weights exactly, dtypes, the meta
device, and one clear error (naming file and tensor) per kind of bad file."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import torch

import llama_ref
from llama_ref.loading import CheckpointError, detect_format, load_pretrained
from llama_ref.loading import api as loading_api

from _ckpt_helpers import (LAYOUTS, copy_ckpt, edit_json, edit_safetensors, edit_safetensors_header, edit_torch_file,
                           logits, reference_model, snapshot, synth, tiny_config, tokens, truncate)

EXPECTED_FORMAT = {"hf-single": "hf-safetensors", "hf-3-shards": "hf-safetensors", "hf-bin": "hf-bin",
                   "meta-1-shard": "meta", "meta-2-shards": "meta"}


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> dict[str, Path]:
    """The tiny preset (GQA: 4 heads, 2 kv heads) written in every layout, fp32 so loads are exact."""
    root = tmp_path_factory.mktemp("ckpts")
    out = {}
    for name, (fmt, shards) in LAYOUTS.items():
        synth().write_checkpoint("tiny", root / name, fmt, shards=shards, dtype=torch.float32, seed=0)
        out[name] = root / name
    return out


@pytest.fixture(scope="module")
def reference():
    config = tiny_config()
    toks = tokens(config)
    model = reference_model(config)
    return model, toks, logits(model, toks)


@pytest.fixture(scope="module")
def layout_logits(ckpts, reference):
    _, toks, _ = reference
    return {name: logits(load_pretrained(path), toks) for name, path in ckpts.items()}


# ---------------------------------------------------------------------------- formats
@pytest.mark.parametrize("layout", LAYOUTS)
def test_detect_format(ckpts, layout):
    assert detect_format(ckpts[layout]) == EXPECTED_FORMAT[layout]


def test_detect_prefers_safetensors_over_bin(ckpts, tmp_path):
    # The meta-llama/*-hf repos ship both copies; transformers reads the safetensors one.
    d = copy_ckpt(ckpts["hf-single"], tmp_path / "both")
    for f in ckpts["hf-bin"].iterdir():
        if f.name.startswith("pytorch_model"):
            (d / f.name).write_bytes(f.read_bytes())
    assert detect_format(d) == "hf-safetensors"


@pytest.mark.parametrize("layout", LAYOUTS)
def test_layout_reproduces_weights_exactly(ckpts, reference, layout):
    ref, _, _ = reference
    model = load_pretrained(ckpts[layout])
    loaded = model.state_dict()
    for name, want in ref.state_dict().items():
        if name == "freqs_cis":
            continue
        assert loaded[name].dtype == torch.float32, name
        assert torch.equal(loaded[name], want), f"{layout}: {name} differs"


@pytest.mark.parametrize("layout", LAYOUTS)
def test_layout_gives_reference_logits(layout_logits, reference, layout):
    _, _, want = reference
    assert torch.equal(layout_logits[layout], want)


@pytest.mark.parametrize("a, b", list(itertools.combinations(LAYOUTS, 2)))
def test_layouts_agree_with_each_other(layout_logits, a, b):
    assert torch.equal(layout_logits[a], layout_logits[b])


def test_from_pretrained_is_load_pretrained(ckpts, reference):
    _, toks, want = reference
    model = llama_ref.load(ckpts["meta-2-shards"], device="cpu", attn_kernel="sdpa", schedule="0-1,3")
    assert model.schedule == (0, 1, 3)
    assert model.layers[0].attention.core.attn_kernel == "sdpa"
    assert not torch.equal(logits(model, toks), want)  # a skipped layer must change the output


def test_meta_sharded_uses_shard_dims(ckpts):
    # A fairscale tok_embeddings is split on the embedding dim, wo/w2 on their input dim.
    shard = torch.load(ckpts["meta-2-shards"] / "consolidated.01.pth", weights_only=True)
    assert shard["tok_embeddings.weight"].shape == (256, 32)
    assert shard["layers.0.attention.wo.weight"].shape == (64, 32)
    assert shard["layers.0.attention.wk.weight"].shape == (16, 64)  # 2 kv heads x 16 over 2 shards
    assert shard["layers.0.attention_norm.weight"].shape == (64,)


def test_transformers_save_pretrained_loads(tmp_path, hf_llama_factory):
    # hf_llama_factory (conftest): random HF model, norms randomized too, global RNG untouched.
    hf = hf_llama_factory(num_hidden_layers=4)
    hf.save_pretrained(tmp_path / "hf")
    toks = tokens(tiny_config())
    with torch.no_grad():
        want = hf(toks).logits
    got = logits(load_pretrained(tmp_path / "hf"), toks)
    assert want.std() > 0.1  # not a degenerate comparison
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


# ---------------------------------------------------------------------------- dtypes and devices
@pytest.mark.parametrize("fmt", ["hf", "meta"])
def test_bf16_storage_fp32_compute(tmp_path, reference, fmt, monkeypatch):
    from llama_ref import compute_dtype

    # A CPU without native bf16 (mocked): "auto" computes in fp32, the weights upcast per matmul.
    monkeypatch.setattr(compute_dtype, "cpu_native", lambda dtype: (False, "no AMX-BF16 (mocked)"))
    _, toks, _ = reference
    synth().write_checkpoint("tiny", tmp_path / "ck", fmt, shards=2, dtype=torch.bfloat16)
    model = load_pretrained(tmp_path / "ck")  # dtype=None: the checkpoint's own dtype
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.compute_dtype == torch.float32
    out = logits(model, toks)
    assert out.dtype == torch.float32
    want = logits(reference_model(tiny_config(), dtype=torch.bfloat16), toks)
    assert torch.equal(out, want)


def test_dtype_from_hf_config(ckpts, tmp_path):
    d = copy_ckpt(ckpts["hf-single"], tmp_path / "ck")
    edit_json(d / "config.json", lambda c: c.update(torch_dtype="float16"))
    assert load_pretrained(d).output.weight.dtype == torch.float16
    edit_json(d / "config.json", lambda c: (c.pop("torch_dtype"), c.update(dtype="bfloat16")))
    assert load_pretrained(d).output.weight.dtype == torch.bfloat16
    edit_json(d / "config.json", lambda c: c.pop("dtype"))  # not stated: the stored dtype
    assert load_pretrained(d).output.weight.dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.bfloat16, "fp16", torch.float64])
def test_dtype_conversion_on_load(ckpts, reference, dtype):
    ref, _, _ = reference
    want_dtype = {"fp16": torch.float16}.get(dtype, dtype)
    model = load_pretrained(ckpts["meta-2-shards"], dtype=dtype)
    for name, p in model.named_parameters():
        assert p.dtype == want_dtype
        assert torch.equal(p, ref.get_parameter(name).to(want_dtype)), name


def test_upcast_bf16_checkpoint_is_exact(tmp_path):
    synth().write_checkpoint("tiny", tmp_path / "ck", "hf", dtype=torch.bfloat16)
    model = load_pretrained(tmp_path / "ck", dtype=torch.float32)
    ref = synth().synthetic_state_dict("tiny", dtype=torch.bfloat16)
    for name, p in model.named_parameters():
        assert p.dtype == torch.float32 and torch.equal(p, ref[name].float()), name


@pytest.mark.parametrize("layout", ["hf-3-shards", "meta-2-shards"])
def test_meta_device_is_shape_only(ckpts, layout):
    model = load_pretrained(ckpts[layout], device="meta")
    config = tiny_config()
    assert all(p.device.type == "meta" for p in model.parameters())
    assert model.tok_embeddings.weight.shape == (config.vocab_size, config.dim)
    out = model(torch.zeros(1, 5, dtype=torch.long, device="meta"))
    assert out.shape == (1, 5, config.vocab_size) and out.device.type == "meta"


def test_meta_device_still_validates(ckpts, tmp_path):
    d = copy_ckpt(ckpts["hf-single"], tmp_path / "ck")
    edit_json(d / "config.json", lambda c: c.update(intermediate_size=192))
    with pytest.raises(CheckpointError, match="gate_proj"):
        load_pretrained(d, device="meta")


def test_weights_frozen_unless_asked(ckpts):
    assert not any(p.requires_grad for p in load_pretrained(ckpts["hf-single"]).parameters())
    assert all(p.requires_grad for p in load_pretrained(ckpts["hf-single"], requires_grad=True).parameters())


def test_rope_table_on_weights_device(ckpts):
    model = load_pretrained(ckpts["meta-1-shard"], max_seq_len=64)
    assert model.freqs_cis.device.type == "cpu" and model.freqs_cis.shape == (64, tiny_config().head_dim // 2)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_loading_writes_nothing(ckpts, layout):
    before = snapshot(ckpts[layout])
    load_pretrained(ckpts[layout])
    load_pretrained(ckpts[layout], device="meta")
    assert snapshot(ckpts[layout]) == before


def test_progress_bar_only_when_asked(ckpts, capsys):
    load_pretrained(ckpts["hf-single"], progress=False)
    load_pretrained(ckpts["hf-single"])  # stderr is not a terminal under pytest: quiet
    assert capsys.readouterr().err == ""
    load_pretrained(ckpts["hf-single"], progress=True)
    assert "B" in capsys.readouterr().err


def test_bad_arguments(ckpts):
    with pytest.raises(ValueError, match="dtype"):
        load_pretrained(ckpts["hf-single"], dtype="int8")
    with pytest.raises(ValueError, match="floating"):
        load_pretrained(ckpts["hf-single"], dtype=torch.int32)
    with pytest.raises(ValueError, match="device"):
        load_pretrained(ckpts["hf-single"], device="nodevice")


# ---------------------------------------------------------------------------- bad directories
def test_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_pretrained(tmp_path / "nope")


def test_file_instead_of_directory(ckpts):
    with pytest.raises(ValueError, match="pass the checkpoint directory"):
        load_pretrained(ckpts["hf-single"] / "model.safetensors")


def test_empty_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a Llama checkpoint"):
        detect_format(tmp_path)


def test_config_without_weights(ckpts, tmp_path):
    d = tmp_path / "ck"
    d.mkdir()
    (d / "config.json").write_text((ckpts["hf-single"] / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match="no weights"):
        load_pretrained(d)


def test_hf_shards_without_index(ckpts, tmp_path):
    d = copy_ckpt(ckpts["hf-3-shards"], tmp_path / "ck")
    (d / "model.safetensors.index.json").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors.index.json"):
        load_pretrained(d)


# ---------------------------------------------------------------------------- bad HF files
def _raises(path, exc, *fragments):
    with pytest.raises(exc) as info:
        load_pretrained(path)
    for fragment in fragments:
        assert fragment in str(info.value), f"{fragment!r} not in: {info.value}"
    return info.value


def test_missing_tensor(ckpts, tmp_path):
    d = copy_ckpt(ckpts["hf-single"], tmp_path / "ck")
    edit_safetensors(d / "model.safetensors", lambda t: t.pop("model.layers.1.self_attn.k_proj.weight"))
    _raises(d, CheckpointError, "missing tensor 'model.layers.1.self_attn.k_proj.weight'", "model.safetensors")


def test_unexpected_tensor(ckpts, tmp_path):
    d = copy_ckpt(ckpts["hf-single"], tmp_path / "ck")
    edit_safetensors(d / "model.safetensors", lambda t: t.update({"model.layers.0.self_attn.extra.weight": torch.ones(2)}))
    _raises(d, CheckpointError, "unexpected tensor 'model.layers.0.self_attn.extra.weight'", "model.safetensors")


def test_hf_rotary_inv_freq_is_ignored(ckpts, reference, tmp_path):
    _, toks, want = reference
    d = copy_ckpt(ckpts["hf-single"], tmp_path / "ck")
    edit_safetensors(d / "model.safetensors",
                     lambda t: t.update({"model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(8)}))
    assert torch.equal(logits(load_pretrained(d), toks), want)


def test_wrong_shape_in_a_shard(ckpts, tmp_path, monkeypatch):
    d = copy_ckpt(ckpts["hf-3-shards"], tmp_path / "ck")
    last = d / "model-00003-of-00003.safetensors"
    name = next(k for k in json.loads((d / "model.safetensors.index.json").read_text())["weight_map"].items()
                if k[1] == last.name and "gate_proj" in k[0])[0]
    edit_safetensors(last, lambda t: t.update({name: torch.zeros(100, 64)}))

    def must_not_run(*args, **kwargs):
        raise AssertionError("weights were read before the checkpoint was validated")

    monkeypatch.setattr(loading_api, "materialize", must_not_run)
    _raises(d, CheckpointError, name, last.name, "(100, 64)", "(176, 64)")


@pytest.mark.parametrize("field, value, fragment", [
    ("intermediate_size", 192, "mlp.gate_proj.weight"),
    ("vocab_size", 300, "model.embed_tokens.weight"),
    ("num_hidden_layers", 5, "missing tensor 'model.layers.4."),
    ("num_hidden_layers", 3, "unexpected tensor 'model.layers.3."),
    ("num_key_value_heads", 4, "k_proj.weight"),
])
def test_config_does_not_match_weights(ckpts, tmp_path, field, value, fragment):
    d = copy_ckpt(ckpts["hf-3-shards"], tmp_path / "ck")
    edit_json(d / "config.json", lambda c: c.update({field: value}))
    _raises(d, CheckpointError, fragment, "config.json")


def test_missing_hf_shard(ckpts, tmp_path):
    d = copy_ckpt(ckpts["hf-3-shards"], tmp_path / "ck")
    (d / "model-00002-of-00003.safetensors").unlink()
    _raises(d, FileNotFoundError, "model-00002-of-00003.safetensors", "model.safetensors.index.json")


def test_index_points_to_wrong_shard(ckpts, tmp_path):
    d = copy_ckpt(ckpts["hf-3-shards"], tmp_path / "ck")
    edit_json(d / "model.safetensors.index.json",
              lambda i: i["weight_map"].update({"lm_head.weight": "model-00001-of-00003.safetensors"}))
    _raises(d, CheckpointError, "'lm_head.weight'", "model-00001-of-00003.safetensors")


def test_index_escaping_the_directory(ckpts, tmp_path):
    d = copy_ckpt(ckpts["hf-3-shards"], tmp_path / "ck")
    edit_json(d / "model.safetensors.index.json",
              lambda i: i["weight_map"].update({"lm_head.weight": "../model-00001-of-00003.safetensors"}))
    _raises(d, CheckpointError, "'lm_head.weight'", "expected a shard file name")


@pytest.mark.parametrize("layout, file", [
    ("hf-single", "model.safetensors"),
    ("hf-3-shards", "model-00002-of-00003.safetensors"),
    ("hf-bin", "pytorch_model-00002-of-00002.bin"),
    ("meta-2-shards", "consolidated.01.pth"),
])
def test_truncated_file(ckpts, tmp_path, layout, file):
    d = copy_ckpt(ckpts[layout], tmp_path / "ck")
    truncate(d / file)
    err = _raises(d, CheckpointError, file)
    assert "truncated" in str(err)


def test_corrupt_safetensors_header_length(ckpts, tmp_path):
    d = copy_ckpt(ckpts["hf-single"], tmp_path / "ck")
    raw = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(b"\xff" * 8 + raw[8:])
    _raises(d, CheckpointError, "model.safetensors", "corrupt safetensors header")


def test_corrupt_safetensors_header_json(ckpts, tmp_path):
    d = copy_ckpt(ckpts["hf-single"], tmp_path / "ck")
    raw = bytearray((d / "model.safetensors").read_bytes())
    raw[8:12] = b"#!?!"
    (d / "model.safetensors").write_bytes(bytes(raw))
    _raises(d, CheckpointError, "model.safetensors", "not valid JSON")


def test_garbage_torch_file(ckpts, tmp_path):
    d = copy_ckpt(ckpts["hf-bin"], tmp_path / "ck")
    (d / "pytorch_model-00001-of-00002.bin").write_bytes(b"this is not a checkpoint" * 10)
    _raises(d, CheckpointError, "pytorch_model-00001-of-00002.bin", "not a PyTorch checkpoint")


def test_weight_file_without_llama_tensors(ckpts, tmp_path):
    d = copy_ckpt(ckpts["hf-single"], tmp_path / "ck")
    from safetensors.torch import save_file

    save_file({"classifier.weight": torch.zeros(2, 2)}, d / "model.safetensors")
    _raises(d, CheckpointError, "model.safetensors", "no Llama weight tensors", "'classifier.weight'")


def test_unknown_safetensors_dtype(ckpts, tmp_path):
    d = copy_ckpt(ckpts["hf-single"], tmp_path / "ck")
    edit_safetensors_header(d / "model.safetensors",
                            lambda h: h["model.layers.2.mlp.up_proj.weight"].update(dtype="Q4_K"))
    _raises(d, CheckpointError, "model.safetensors", "'model.layers.2.mlp.up_proj.weight'", "'Q4_K'")


def test_integer_dtype_in_torch_file(ckpts, tmp_path):
    d = copy_ckpt(ckpts["meta-1-shard"], tmp_path / "ck")
    edit_torch_file(d / "consolidated.00.pth",
                    lambda s: s.update({"layers.0.attention.wq.weight": s["layers.0.attention.wq.weight"].to(torch.int8)}))
    _raises(d, CheckpointError, "consolidated.00.pth", "'layers.0.attention.wq.weight'", "torch.int8")


def test_non_tensor_in_torch_file(ckpts, tmp_path):
    d = copy_ckpt(ckpts["hf-bin"], tmp_path / "ck")
    edit_torch_file(d / "pytorch_model-00002-of-00002.bin", lambda s: s.update({"step": 7}))
    _raises(d, CheckpointError, "pytorch_model-00002-of-00002.bin", "'step'")


def test_bad_config_dtype(ckpts, tmp_path):
    d = copy_ckpt(ckpts["hf-single"], tmp_path / "ck")
    edit_json(d / "config.json", lambda c: c.update(torch_dtype="int4"))
    _raises(d, CheckpointError, "config.json", "'int4'")


# ---------------------------------------------------------------------------- bad Meta files
def test_meta_missing_first_shard(ckpts, tmp_path):
    d = copy_ckpt(ckpts["meta-2-shards"], tmp_path / "ck")
    (d / "consolidated.00.pth").unlink()
    _raises(d, FileNotFoundError, "consolidated.00.pth")


def test_meta_missing_last_shard(ckpts, tmp_path):
    d = copy_ckpt(ckpts["meta-2-shards"], tmp_path / "ck")
    (d / "consolidated.01.pth").unlink()
    _raises(d, CheckpointError, "2-shard checkpoint", "consolidated.01.pth", "params.json")


def test_meta_unexpected_tensor(ckpts, tmp_path):
    d = copy_ckpt(ckpts["meta-1-shard"], tmp_path / "ck")
    edit_torch_file(d / "consolidated.00.pth", lambda s: s.update({"layers.0.attention.bias": torch.zeros(64)}))
    _raises(d, CheckpointError, "unexpected tensor 'layers.0.attention.bias'", "consolidated.00.pth")


def test_meta_rope_freqs_is_a_known_extra(ckpts):
    assert "rope.freqs" in torch.load(ckpts["meta-1-shard"] / "consolidated.00.pth", weights_only=True)
    load_pretrained(ckpts["meta-1-shard"])  # and loads without complaint


def test_meta_tensor_missing_from_one_shard(ckpts, tmp_path):
    d = copy_ckpt(ckpts["meta-2-shards"], tmp_path / "ck")
    edit_torch_file(d / "consolidated.01.pth", lambda s: s.pop("layers.3.feed_forward.w2.weight"))
    _raises(d, CheckpointError, "'layers.3.feed_forward.w2.weight'", "missing from consolidated.01.pth")


def test_meta_replicas_disagree(ckpts, tmp_path):
    d = copy_ckpt(ckpts["meta-2-shards"], tmp_path / "ck")
    edit_torch_file(d / "consolidated.01.pth", lambda s: s.update({"layers.2.ffn_norm.weight": torch.ones(32)}))
    _raises(d, CheckpointError, "'layers.2.ffn_norm.weight'", "consolidated.00.pth", "consolidated.01.pth")


def test_meta_shards_disagree_on_other_dims(ckpts, tmp_path):
    d = copy_ckpt(ckpts["meta-2-shards"], tmp_path / "ck")
    edit_torch_file(d / "consolidated.01.pth", lambda s: s.update({"layers.1.attention.wq.weight": torch.zeros(32, 60)}))
    _raises(d, CheckpointError, "'layers.1.attention.wq.weight'", "split on dim 0")


def test_meta_params_do_not_match(ckpts, tmp_path):
    d = copy_ckpt(ckpts["meta-1-shard"], tmp_path / "ck")
    edit_json(d / "params.json", lambda p: p.update(n_layers=6))
    _raises(d, CheckpointError, "params.json", "missing tensor 'layers.5.attention.wq.weight'")


def test_meta_vocab_from_embeddings(ckpts, tmp_path):
    d = copy_ckpt(ckpts["meta-1-shard"], tmp_path / "ck")
    edit_json(d / "params.json", lambda p: p.update(vocab_size=300))  # a stated vocab must agree
    _raises(d, ValueError, "params.json", "300")


# ---------------------------------------------------------------------------- non-finite weights
def test_check_finite_opt_out_loads_nan_weights(ckpts, tmp_path):
    from llama_ref.errors import NonFiniteError

    d = copy_ckpt(ckpts["hf-single"], tmp_path / "ck")

    def poison(t):
        t["model.norm.weight"] = t["model.norm.weight"].clone()
        t["model.norm.weight"][3] = float("nan")

    edit_safetensors(d / "model.safetensors", poison)
    with pytest.raises(NonFiniteError, match="'model.norm.weight' holds NaN or inf in model.safetensors"):
        load_pretrained(d)
    model = load_pretrained(d, check_finite=False)  # explicit opt-out: loads as stored
    assert torch.isnan(model.norm.weight[3]) and torch.isfinite(model.norm.weight[:3]).all()
    with pytest.raises(NonFiniteError, match="norm.weight"):
        model.check_finite()


@pytest.mark.parametrize("layout", ["meta-2-shards", "hf-3-shards"])
def test_finite_check_reads_each_stored_part_once(ckpts, reference, monkeypatch, layout):
    # One aminmax per stored part used (its mapped bytes, before any copy); it must not alter or copy them.
    from llama_ref.loading import materialize as mat

    seen = []
    real = mat.all_finite
    monkeypatch.setattr(mat, "all_finite", lambda t, **kw: (seen.append(tuple(t.shape)), real(t, **kw))[1])
    parts = []
    real_fill = mat.OpenFiles.tensor
    monkeypatch.setattr(mat.OpenFiles, "tensor", lambda self, s: (parts.append(s.shape), real_fill(self, s))[1])
    ref, _, _ = reference
    model = load_pretrained(ckpts[layout])
    assert seen == parts  # every part opened was checked, once, in the order it was used
    # Split weights are checked per shard; replicated norms only in the shard they are taken from.
    assert len(seen) == (sum(2 if p.dim() == 2 else 1 for p in model.parameters()) if layout == "meta-2-shards"
                         else len(list(model.parameters())))
    for name, p in model.named_parameters():
        assert torch.equal(p, ref.get_parameter(name)), name


def test_memory_check_before_materialising(ckpts, monkeypatch):
    from llama_ref import memory
    from llama_ref.errors import InsufficientMemoryError

    # tiny fp32: 217,664 weights * 4 + RoPE 128 positions * 8 pairs * 8 bytes = 878,848 bytes (HF config: 128)
    monkeypatch.setattr(memory, "available_memory_bytes", lambda device: 878_848)
    load_pretrained(ckpts["hf-single"])  # fits exactly
    monkeypatch.setattr(memory, "available_memory_bytes", lambda device: 878_847)

    def must_not_run(*args, **kwargs):
        raise AssertionError("weights were materialised before the memory check")

    monkeypatch.setattr(loading_api, "materialize", must_not_run)
    with pytest.raises(InsufficientMemoryError, match="878,848 bytes"):
        load_pretrained(ckpts["hf-single"])
    load_pretrained(ckpts["hf-single"], device="meta")  # no weights, no check


# ---------------------------------------------------------------------------- deterministic discovery
def test_discovery_ignores_directory_order(ckpts, monkeypatch):
    from llama_ref.loading import detect

    want = {layout: detect.find_checkpoint_files(path) for layout, path in ckpts.items()}
    real = detect.os.listdir
    for order in (lambda names: names[::-1], lambda names: names[1:] + names[:1]):
        monkeypatch.setattr(detect.os, "listdir", lambda p, order=order: order(sorted(real(p))))
        for layout, path in ckpts.items():
            assert detect.find_checkpoint_files(path) == want[layout], layout


def test_single_file_with_an_index_listing_only_it(ckpts, reference, tmp_path):
    # Some tools write an index for one file; it names exactly model.safetensors: no ambiguity.
    _, toks, want = reference
    d = copy_ckpt(ckpts["hf-single"], tmp_path / "ck")
    from safetensors import safe_open

    with safe_open(d / "model.safetensors", framework="pt") as f:
        keys = list(f.keys())
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {k: "model.safetensors" for k in keys}}))
    assert detect_format(d) == "hf-safetensors"
    assert torch.equal(logits(load_pretrained(d), toks), want)


def test_shards_of_another_set_are_ignored_with_a_warning(ckpts, reference, tmp_path, caplog):
    # Leftovers of an older 2-shard download next to a complete 3-shard checkpoint: the index rules.
    _, toks, want = reference
    d = copy_ckpt(ckpts["hf-3-shards"], tmp_path / "ck")
    (d / "model-00001-of-00002.safetensors").write_bytes(b"old download")
    with caplog.at_level("WARNING", logger="llama_ref.loading.hf_files"):
        model = load_pretrained(d)
    assert torch.equal(logits(model, toks), want)
    assert "ignoring model-00001-of-00002.safetensors" in caplog.text


def test_meta_shard_numbers_beyond_the_count_do_not_hang(ckpts, tmp_path):
    # The first hole is searched among 0..N, never up to the largest number found.
    d = copy_ckpt(ckpts["meta-1-shard"], tmp_path / "ck")
    (d / f"consolidated.{10**18}.pth").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="consolidated.01.pth is missing"):
        load_pretrained(d)
