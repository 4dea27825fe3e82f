"""Tied embeddings (Llama 3.2 1B/3B): one Parameter for tok_embeddings and output, counted once,
kept through conversions, and loaded from every file layout that expresses it."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import llama_ref
from llama_ref import Llama
from llama_ref.hf import convert_meta_tensor_to_hf, hf_config_dict, to_hf_model
from llama_ref.loading import CheckpointError, load_pretrained

from _ckpt_helpers import edit_torch_file, synth

transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture
def tied_config(tiny_config):
    return tiny_config.replace(tie_word_embeddings=True)


def _tokens(config, bsz=2, seqlen=12, seed=0):
    return torch.randint(0, config.vocab_size, (bsz, seqlen), generator=torch.Generator().manual_seed(seed))


def _logits(model, tokens):
    with torch.no_grad():
        return model(tokens)


def _hf_state(model) -> dict[str, torch.Tensor]:
    """HF names/layout, every tensor its own contiguous copy (safetensors refuses shared storage)."""
    out = {}
    for name, t in model.state_dict().items():
        hf_name, hf_t = convert_meta_tensor_to_hf(name, t, model.config)
        out[hf_name] = hf_t.clone().contiguous()
    return out


def _write_hf(directory, model, state) -> None:
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps(hf_config_dict(model.config)))
    save_file(state, directory / "model.safetensors", metadata={"format": "pt"})


# ---------------------------------------------------------------- the model
def test_one_parameter_counted_once(tied_config, tiny_config):
    model = Llama(tied_config, device="meta")
    assert model.output.weight is model.tok_embeddings.weight
    untied = Llama(tiny_config, device="meta").param_count()
    # 256 x 64 = 16,384 fewer parameters than the untied tiny model.
    assert model.param_count() == untied - tied_config.vocab_size * tied_config.dim
    assert [n for n, _ in model.named_parameters()].count("tok_embeddings.weight") == 1
    assert "output.weight" not in dict(model.named_parameters())
    assert {"tok_embeddings.weight", "output.weight"} <= set(model.state_dict())  # as transformers' state_dict


def test_the_head_uses_the_embedding(tied_config, make_model):
    model = make_model(tied_config)
    tokens = _tokens(tied_config)
    before = _logits(model, tokens)
    with torch.no_grad():
        model.tok_embeddings.weight[:, 0] += 1.0  # changes the embedding *and* the head
    after = _logits(model, tokens)
    assert not torch.equal(after, before)
    untied = make_model(tied_config.replace(tie_word_embeddings=False))
    untied.load_state_dict(model.state_dict())  # both copies equal: untied model, same numbers
    assert torch.equal(_logits(untied, tokens), after)


@pytest.mark.parametrize("convert", ["to-bf16", "half-float", "to_empty", "deepcopy"])
def test_conversions_keep_the_tie(tied_config, make_model, convert):
    import copy

    model = make_model(tied_config)
    if convert == "to-bf16":
        model.to(torch.bfloat16)
    elif convert == "half-float":
        model.half().float()
    elif convert == "to_empty":
        model = Llama(tied_config, device="meta")
        model.to_empty(device="cpu")
    else:
        model = copy.deepcopy(model)
    assert model.output.weight is model.tok_embeddings.weight


def test_load_state_dict_embedding_only_both_equal_or_refused(tied_config, make_model):
    ref = make_model(tied_config)
    tokens = _tokens(tied_config)
    expected = _logits(ref, tokens)
    full = {k: v.clone() for k, v in ref.state_dict().items()}
    for assign in (False, True):
        # The embedding only (what transformers' save_pretrained keeps), strict loading.
        model = Llama(tied_config)
        model.load_state_dict({k: v for k, v in full.items() if k != "output.weight"}, strict=True, assign=assign)
        assert model.output.weight is model.tok_embeddings.weight
        assert torch.equal(_logits(model, tokens), expected)
        # Both, equal (two separate tensors): loaded once, tied again.
        model = Llama(tied_config)
        model.load_state_dict(dict(full), strict=True, assign=assign)
        assert model.output.weight is model.tok_embeddings.weight and torch.equal(_logits(model, tokens), expected)
    # Both, different: refused (which of the two would the model be?).
    bad = dict(full, **{"output.weight": full["output.weight"] + 1e-3})
    with pytest.raises(ValueError, match="'tok_embeddings.weight' and 'output.weight' differ"):
        Llama(tied_config).load_state_dict(bad)
    with pytest.raises(ValueError, match="has 'output.weight' without 'tok_embeddings.weight'"):
        Llama(tied_config).load_state_dict({k: v for k, v in full.items() if k != "tok_embeddings.weight"})


# ---------------------------------------------------------------- HF files
def test_save_pretrained_stores_the_embedding_only_and_loads_tied(tmp_path, hf_llama_factory):
    hf = hf_llama_factory(tie_word_embeddings=True, rope_scaling={"rope_type": "linear", "factor": 2.0})
    assert hf.lm_head.weight is hf.model.embed_tokens.weight
    hf.save_pretrained(tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
    assert "model.embed_tokens.weight" in keys and "lm_head.weight" not in keys
    ours = llama_ref.load(tmp_path)
    assert ours.config.tie_word_embeddings and ours.output.weight is ours.tok_embeddings.weight
    tokens = _tokens(ours.config, seqlen=20)
    with torch.no_grad():
        assert (ours(tokens) - hf(tokens).logits).abs().max().item() <= 1e-4


def test_hf_checkpoint_with_both_copies(tmp_path, tied_config, make_model):
    ref = make_model(tied_config)
    tokens = _tokens(tied_config)
    state = _hf_state(ref)
    assert torch.equal(state["lm_head.weight"], state["model.embed_tokens.weight"])
    _write_hf(tmp_path / "equal", ref, state)
    model = load_pretrained(tmp_path / "equal")
    assert model.output.weight is model.tok_embeddings.weight
    assert model.param_count() == ref.param_count()
    assert torch.equal(_logits(model, tokens), _logits(ref, tokens))
    # Different copies: refused, naming the tensor and the file; also on the meta device.
    _write_hf(tmp_path / "differ", ref, dict(state, **{"lm_head.weight": state["lm_head.weight"] * 2}))
    for device in ("cpu", "meta"):
        with pytest.raises(CheckpointError, match="'lm_head.weight' in model.safetensors differs from "
                                                  "'model.embed_tokens.weight'"):
            load_pretrained(tmp_path / "differ", device=device)
    # The head without the embedding.
    _write_hf(tmp_path / "head-only", ref, {k: v for k, v in state.items() if k != "model.embed_tokens.weight"})
    with pytest.raises(CheckpointError, match="has 'lm_head.weight' without 'model.embed_tokens.weight'"):
        load_pretrained(tmp_path / "head-only")


def test_untied_config_still_needs_its_head(tmp_path, tiny_config, make_model):
    ref = make_model(tiny_config)
    state = _hf_state(ref)
    del state["lm_head.weight"]
    _write_hf(tmp_path / "ck", ref, state)
    with pytest.raises(CheckpointError, match="missing tensor 'lm_head.weight'"):
        load_pretrained(tmp_path / "ck")


# ---------------------------------------------------------------- Meta files
def test_meta_checkpoint_without_output_is_tied(tmp_path, tied_config):
    tokens = _tokens(tied_config)
    synth().write_checkpoint(tied_config, tmp_path / "ck", format="meta", shards=2, dtype=torch.float32)
    # The writer follows the model's own parameters: no output.weight in any shard.
    for k in range(2):
        assert "output.weight" not in torch.load(tmp_path / "ck" / f"consolidated.{k:02d}.pth", weights_only=True)
    loaded = load_pretrained(tmp_path / "ck")
    assert loaded.config.tie_word_embeddings and loaded.output.weight is loaded.tok_embeddings.weight
    synthetic = Llama(tied_config)
    synthetic.load_state_dict(synth().synthetic_state_dict(tied_config))
    assert torch.equal(_logits(loaded, tokens), _logits(synthetic, tokens))


def test_meta_checkpoint_with_output_is_untied(tmp_path, tiny_config):
    # Meta's Llama 3.2 files store output.weight (a copy) and Meta's model code keeps it separate.
    synth().write_checkpoint(tiny_config, tmp_path / "ck", format="meta", shards=1, dtype=torch.float32)
    model = load_pretrained(tmp_path / "ck")
    assert not model.config.tie_word_embeddings and model.output.weight is not model.tok_embeddings.weight


def test_meta_llama3_vocab_split_embedding(tmp_path, tiny_config):
    """Llama-3's VocabParallelEmbedding splits tok_embeddings by vocabulary rows (dim 0), Llama-2's
    ParallelEmbedding by width (dim 1): both load, with the right vocabulary size."""
    synth().write_checkpoint(tiny_config, tmp_path / "ck", format="meta", shards=2, dtype=torch.float32)
    reference = load_pretrained(tmp_path / "ck")  # Llama-2 style (dim 1)
    full = reference.tok_embeddings.weight.detach().clone()
    for k in range(2):
        edit_torch_file(tmp_path / "ck" / f"consolidated.{k:02d}.pth",
                        lambda s, k=k: s.__setitem__("tok_embeddings.weight", full[k * 128:(k + 1) * 128].clone()))
    model = load_pretrained(tmp_path / "ck")
    assert model.config.vocab_size == 256
    assert torch.equal(model.tok_embeddings.weight, full)
    tokens = _tokens(tiny_config)
    assert torch.equal(_logits(model, tokens), _logits(reference, tokens))


# ---------------------------------------------------------------- HF <-> Meta conversion
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_to_hf_model_round_trip(tied_config, make_model, attn):
    from llama_ref import RopeScaling

    config = tied_config.replace(rope_scaling=RopeScaling.llama3(factor=4.0, original_max_position_embeddings=16),
                                 head_dim=24)
    ours = make_model(config, gain=1.0)
    hf = to_hf_model(ours, attn_implementation=attn)
    assert hf.lm_head.weight is hf.model.embed_tokens.weight
    assert hf.config.tie_word_embeddings and hf.config.head_dim == 24
    tokens = _tokens(config, seqlen=40)
    with torch.no_grad():
        assert (hf(tokens).logits - ours(tokens)).abs().max().item() <= 1e-4
    back = llama_ref.from_hf(hf)
    assert back.config == config and back.output.weight is back.tok_embeddings.weight
    assert torch.equal(_logits(back, tokens), _logits(ours, tokens))
