"""scripts/make_synthetic_checkpoint.py: real layouts, exact values, streaming, and refusing to clobber."""

from __future__ import annotations

import json
import subprocess
import sys
import weakref

import pytest
import torch
from safetensors.torch import load_file

from llama_ref import PRESETS, LlamaConfig
from llama_ref.hf import convert_meta_tensor_to_hf, meta_to_hf_key
from llama_ref.loading import meta_split_dim

from _ckpt_helpers import SCRIPT, synth, tiny_config


@pytest.fixture(scope="module")
def ref():
    return synth().synthetic_state_dict("tiny", seed=0, dtype=torch.bfloat16)


# ---------------------------------------------------------------------------- configs
@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_meta_params_reproduce_the_preset(preset):
    config = PRESETS[preset]
    params = synth().meta_params(config)
    assert params["vocab_size"] == -1  # as in Meta's files
    # Meta's files have no tie flag (the loader reads it off the missing output.weight).
    back = LlamaConfig.from_meta(params, vocab_size=config.vocab_size, max_seq_len=config.max_seq_len,
                                 tie_word_embeddings=config.tie_word_embeddings)
    assert back == config


def test_meta_params_match_metas_published_files():
    # The values in Meta's own params.json files for Llama-2.
    s = synth()
    assert s.meta_params(PRESETS["llama-2-7b"]) == {"dim": 4096, "multiple_of": 256, "n_heads": 32, "n_layers": 32,
                                                     "norm_eps": 1e-05, "vocab_size": -1}
    p70 = s.meta_params(PRESETS["llama-2-70b"])
    assert (p70["multiple_of"], p70["ffn_dim_multiplier"], p70["n_kv_heads"]) == (4096, 1.3, 8)


@pytest.mark.parametrize("dim, hidden_dim", [(64, 176), (128, 344), (96, 1000), (4096, 11008), (8192, 28672), (32, 7)])
def test_meta_ffn_params_any_width(dim, hidden_dim):
    from llama_ref.config import meta_ffn_hidden_dim

    params = synth().meta_ffn_params(dim, hidden_dim)
    params = json.loads(json.dumps(params))  # must survive the trip through params.json
    assert meta_ffn_hidden_dim(dim, params["multiple_of"], params.get("ffn_dim_multiplier")) == hidden_dim


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_hf_config_round_trips(preset):
    config = PRESETS[preset]
    hf = synth().hf_config(config, torch.bfloat16)
    assert hf["torch_dtype"] == "bfloat16"
    assert LlamaConfig.from_hf(hf) == config


# ---------------------------------------------------------------------------- weights
def test_synthetic_tensors_are_deterministic_and_distinct():
    s = synth()
    a = s.synthetic_tensor("layers.0.attention.wq.weight", (8, 8), seed=0)
    assert torch.equal(a, s.synthetic_tensor("layers.0.attention.wq.weight", (8, 8), seed=0))
    assert not torch.equal(a, s.synthetic_tensor("layers.0.attention.wq.weight", (8, 8), seed=1))
    assert not torch.equal(a, s.synthetic_tensor("layers.0.attention.wk.weight", (8, 8), seed=0))
    emb = s.synthetic_tensor("tok_embeddings.weight", (256, 64))
    norm = s.synthetic_tensor("layers.0.ffn_norm.weight", (4096,))
    w = s.synthetic_tensor("layers.0.feed_forward.w1.weight", (256, 64))
    assert 0.9 < emb.std() < 1.1 and 0.018 < w.std() < 0.022
    assert (norm - 1).abs().max() < 0.2 and norm.std() > 0  # near ones, but not all equal


def test_shard_groups_are_contiguous_balanced_and_nonempty():
    groups = synth().shard_groups([100, 1, 1, 1, 1, 50, 50], 3)
    assert [list(g) for g in groups] == [[0], [1, 2, 3, 4, 5], [6]]
    sizes = [10] * 20
    groups = synth().shard_groups(sizes, 4)
    assert [len(g) for g in groups] == [5, 5, 5, 5]
    with pytest.raises(ValueError, match="cannot split"):
        synth().shard_groups([1, 2], 3)


# ---------------------------------------------------------------------------- HF layout
def test_hf_single_file(tmp_path, ref):
    files = synth().write_checkpoint("tiny", tmp_path, "hf")
    assert sorted(f.name for f in files) == ["config.json", "model.safetensors"]
    tensors = load_file(tmp_path / "model.safetensors")  # the safetensors library accepts our stream
    config = tiny_config()
    assert len(tensors) == len(ref)
    for name, want in ref.items():
        hf_name, hf_want = convert_meta_tensor_to_hf(name, want, config)  # q/k rows permuted as HF stores them
        assert tensors[hf_name].dtype == torch.bfloat16
        assert torch.equal(tensors[hf_name], hf_want), hf_name
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["torch_dtype"] == "bfloat16" and cfg["intermediate_size"] == 176


def test_hf_sharded_index(tmp_path, ref):
    synth().write_checkpoint("tiny", tmp_path, "hf", shards=3)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = sorted({*index["weight_map"].values()})
    assert shards == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    seen = {}
    for shard in shards:
        raw = (tmp_path / shard).read_bytes()
        assert int.from_bytes(raw[:8], "little") % 8 == 0  # data section 8-byte aligned
        for key in load_file(tmp_path / shard):
            assert index["weight_map"][key] == shard
            seen[key] = shard
    assert set(seen) == {meta_to_hf_key(n) for n in ref}
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in ref.values())


def test_hf_bin(tmp_path, ref):
    synth().write_checkpoint("tiny", tmp_path, "hf-bin", shards=2, dtype="fp32")
    index = json.loads((tmp_path / "pytorch_model.bin.index.json").read_text())
    state = {}
    for shard in sorted({*index["weight_map"].values()}):
        state.update(torch.load(tmp_path / shard, weights_only=True))
    fp32 = synth().synthetic_state_dict("tiny", dtype=torch.float32)
    assert torch.equal(state["model.layers.3.mlp.down_proj.weight"], fp32["layers.3.feed_forward.w2.weight"])
    assert len(state) == len(fp32)


def test_hf_writer_streams_one_tensor_at_a_time(tmp_path, monkeypatch):
    # Every generated tensor must be gone before the next one is generated.
    s = synth()
    alive, worst = [], [0]
    original = s.synthetic_tensor

    def tracked(*args, **kwargs):
        # Plain refcounting frees tensors (no cycles), so no gc.collect() (slow with torch loaded).
        worst[0] = max(worst[0], sum(r() is not None for r in alive))
        t = original(*args, **kwargs)
        alive.append(weakref.ref(t))
        return t

    monkeypatch.setattr(s, "synthetic_tensor", tracked)
    s.write_checkpoint("tiny", tmp_path, "hf", shards=2, dtype=torch.float32)  # fp32: .to() keeps the object
    assert len(alive) == len(s.param_specs(tiny_config()))
    assert worst[0] == 0


# ---------------------------------------------------------------------------- Meta layout
@pytest.mark.parametrize("shards", [1, 2])
def test_meta_shards_hold_their_slices(tmp_path, ref, shards):
    synth().write_checkpoint("tiny", tmp_path, "meta", shards=shards)
    parts = [torch.load(tmp_path / f"consolidated.{k:02d}.pth", weights_only=True) for k in range(shards)]
    for name, want in ref.items():
        dim = meta_split_dim(name)
        pieces = [p[name] for p in parts]
        if dim is None:
            assert all(torch.equal(p, want) for p in pieces), name
        else:
            assert torch.equal(torch.cat(pieces, dim=dim), want), name
    for p in parts:
        assert set(p) == set(ref) | {"rope.freqs"}
    params = json.loads((tmp_path / "params.json").read_text())
    assert params == synth().meta_params(tiny_config())


def test_meta_refuses_indivisible_shards(tmp_path):
    with pytest.raises(ValueError, match="cannot be split into 3"):
        synth().write_checkpoint("tiny", tmp_path, "meta", shards=3)


# ---------------------------------------------------------------------------- output directory
def test_refuses_non_empty_directory_without_force(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="--force"):
        synth().write_checkpoint("tiny", tmp_path, "hf")
    assert [f.name for f in tmp_path.iterdir()] == ["notes.txt"]


def test_force_replaces_only_checkpoint_files(tmp_path):
    s = synth()
    s.write_checkpoint("tiny", tmp_path, "hf", shards=3)
    (tmp_path / "notes.txt").write_text("mine")
    s.write_checkpoint("tiny", tmp_path, "meta", force=True)
    assert sorted(f.name for f in tmp_path.iterdir()) == ["consolidated.00.pth", "notes.txt", "params.json"]


def test_bad_arguments(tmp_path):
    s = synth()
    with pytest.raises(ValueError, match="unknown format"):
        s.write_checkpoint("tiny", tmp_path / "a", "gguf")
    with pytest.raises(ValueError, match="shards"):
        s.write_checkpoint("tiny", tmp_path / "b", "hf", shards=0)
    with pytest.raises(ValueError, match="unknown preset"):
        s.write_checkpoint("llama-9b", tmp_path / "c", "hf")


def test_cli_runs_as_a_script(tmp_path):
    out = tmp_path / "ck"
    cmd = [sys.executable, str(SCRIPT), "tiny", str(out), "--format", "meta", "--shards", "2", "--dtype", "fp32"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert sorted(f.name for f in out.iterdir()) == ["consolidated.00.pth", "consolidated.01.pth", "params.json"]


def test_cli_refuses_non_empty_out(tmp_path, capsys):
    (tmp_path / "model.safetensors").write_bytes(b"precious")
    assert synth().main(["tiny", str(tmp_path), "--format", "hf", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--force" in err  # one line
    assert (tmp_path / "model.safetensors").read_bytes() == b"precious"
    assert synth().main(["tiny", str(tmp_path), "--format", "hf", "--force", "--no-progress"]) == 0
    assert "wrote tiny" in capsys.readouterr().out
