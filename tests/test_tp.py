"""Tensor parallelism (llama_ref.parallel): 2 gloo ranks on the CPU against the single-process model.

Process start-up dominates (each rank imports torch), so the 2-rank checks run in one spawn (the
``battery`` fixture) and the tests below compare its results; the check script runs once under torchrun.
Everything that needs no communication (layout, validation, per-rank loading, the meta device with a
fake process group, what counters see) runs in this process.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
import warnings
from collections import Counter
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import _tp_workers as W
from _ckpt_helpers import REPO, edit_torch_file, synth
import llama_ref
from llama_ref import Llama, LlamaConfig
from llama_ref.loading import CheckpointError, find_checkpoint_files
from llama_ref.loading.readers import OpenFiles
from llama_ref.parallel import (
    SHARD_PER_RANK,
    SLICED,
    tensor_parallel_llama,
    TPGroup,
    TPLayout,
    fake_world,
    load_tp_pretrained,
    plan_rank,
    spawn,
)
from llama_ref import memory as llama_memory

pytestmark = pytest.mark.usefixtures("single_thread")

ATOL = 1e-5  # fp32: the same arithmetic as one process, summed in another order across ranks

# name -> (config, format, shards, storage dtype) of the checkpoints the ranks load.
CHECKPOINTS = {
    "meta-2-shards": (W.TINY, "meta", 2, torch.bfloat16),  # shard k -> rank k, no merge; bf16 storage, fp32 compute
    "meta-1-shard": (W.TINY, "meta", 1, torch.float32),  # sliced per rank
    "meta-4-shards": (W.MHA, "meta", 4, torch.float32),  # more shards than ranks: rank k merges two
    "hf-single": (W.TINY, "hf", 1, torch.float32),  # q/k un-permuted per head after slicing
    "hf-3-shards": (W.TINY, "hf", 3, torch.bfloat16),
    "hf-bin-2-shards": (W.TINY, "hf-bin", 2, torch.float32),
    # Llama-3's VocabParallelEmbedding: tok_embeddings split by vocabulary rows, gathered from both shards.
    "meta-2-shards-vocab-split": (W.TINY, "meta", 2, torch.float32),
}


def _split_embedding_by_vocabulary(path: Path) -> None:
    shards = [torch.load(path / f"consolidated.0{k}.pth", weights_only=True) for k in range(2)]
    full = torch.cat([s["tok_embeddings.weight"] for s in shards], dim=1)  # (vocab, dim)
    for k, shard in enumerate(shards):
        shard["tok_embeddings.weight"] = full.chunk(2, dim=0)[k].clone()
        torch.save(shard, path / f"consolidated.0{k}.pth")


@pytest.fixture(scope="module")
def ckpt_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tp_ckpts")
    out = {}
    for name, (config, fmt, shards, dtype) in CHECKPOINTS.items():
        synth().write_checkpoint(config, root / name, fmt, shards, dtype=dtype)
        if name.endswith("vocab-split"):
            _split_embedding_by_vocabulary(root / name)
        out[name] = root / name
    return out


@pytest.fixture(scope="module")
def battery(ckpt_dirs):
    t0 = time.perf_counter()
    results = spawn(W.battery, 2, {k: str(v) for k, v in ckpt_dirs.items()}, threads=1)
    print(f"2-rank battery: {time.perf_counter() - t0:.1f} s")
    return results


@pytest.fixture(scope="module")
def single_tiny() -> Llama:
    return W.build_single(W.TINY)


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


# ================================================================ 2 ranks against one process
@pytest.mark.parametrize("rank", [0, 1])
def test_full_forward_matches_single_process(battery, single_tiny, rank):
    with torch.no_grad():
        ref = single_tiny(W.tokens(W.TINY))
    assert _max_diff(battery[rank]["full"], ref) <= ATOL


def test_every_rank_gets_identical_logits(battery):
    # Gathered logits are the same bytes on every rank, so lockstep decisions (argmax, eos) agree.
    for key in ("full", "cached", "repeat_cached", "sdpa_cached", "mha_full"):
        assert torch.equal(battery[0][key], battery[1][key]), key


@pytest.mark.parametrize("key, build, prefill", [
    ("cached", lambda: W.build_single(W.TINY), 5),
    ("sdpa_cached", lambda: W.build_single(W.TINY, attn_kernel="sdpa"), 5),
    ("mha_cached", lambda: W.build_single(W.MHA, seed=3), 3),
])
def test_cached_decode_matches_single_full_forward(battery, key, build, prefill):
    single = build()
    toks = W.tokens(single.config)
    with torch.no_grad():
        ref = single(toks)
    for rank in (0, 1):
        assert _max_diff(battery[rank][key], ref) <= ATOL


@pytest.mark.parametrize("key, build", [
    ("sdpa_full", lambda: W.build_single(W.TINY, attn_kernel="sdpa")),
    ("mha_full", lambda: W.build_single(W.MHA, seed=3)),
])
def test_kernel_and_mha_forward(battery, key, build):
    single = build()
    with torch.no_grad():
        ref = single(W.tokens(single.config))
    assert _max_diff(battery[0][key], ref) <= ATOL


def test_schedule_with_a_repeated_layer(battery):
    single = W.build_single(W.TINY, schedule=W.REPEAT_SCHEDULE)
    toks = W.tokens(W.TINY)
    with torch.no_grad():
        ref = single(toks)
        baseline = W.build_single(W.TINY)(toks)
    assert (ref - baseline).abs().max() > 1e-2  # the repeat really changes the output
    for rank in (0, 1):
        assert _max_diff(battery[rank]["repeat_full"], ref) <= ATOL
        assert _max_diff(battery[rank]["repeat_cached"], ref) <= ATOL


def test_generation_matches_single_process(battery, single_tiny):
    want = W.generations(single_tiny)
    assert len(want["greedy"][0]) == W.MAX_NEW
    for rank in (0, 1):
        assert battery[rank]["generate"] == want


def test_rank_shapes_are_meta_layout_halves(battery, single_tiny):
    full = {n: tuple(p.shape) for n, p in single_tiny.named_parameters()}
    # tiny: dim 64, 4 heads x 16, 2 kv heads, FFN 176, vocab 256 -> per rank 2 heads, 1 kv head, 88, 128.
    expected = {
        "tok_embeddings.weight": (256, 32),
        "layers.0.attention.wq.weight": (32, 64),
        "layers.0.attention.wk.weight": (16, 64),
        "layers.0.attention.wv.weight": (16, 64),
        "layers.0.attention.wo.weight": (64, 32),
        "layers.0.feed_forward.w1.weight": (88, 64),
        "layers.0.feed_forward.w2.weight": (64, 88),
        "layers.0.feed_forward.w3.weight": (88, 64),
        "layers.0.attention_norm.weight": (64,),
        "output.weight": (128, 64),
    }
    for rank in (0, 1):
        shapes = battery[rank]["local_shapes"]
        assert list(shapes) == list(full)  # the single-process names, in the same order
        for name, shape in expected.items():
            assert shapes[name] == shape, name


def test_backward_through_collectives_gives_sharded_single_process_grads(battery, single_tiny):
    model = W.build_single(W.TINY).requires_grad_(True)
    logits = model(W.tokens(W.TINY))
    (logits * W.loss_weights(logits.shape)).sum().backward()
    layout = TPLayout(W.TINY, 2)
    for rank in (0, 1):
        grads = battery[rank]["grads"]
        for name, p in model.named_parameters():
            want = layout.shard(name, p.grad, rank)
            scale = p.grad.abs().max().item()
            # Replicated norms get the full gradient on every rank; split weights their slice.
            assert _max_diff(grads[name], want) <= 1e-5 * max(1.0, scale), name


@pytest.mark.parametrize("name", list(CHECKPOINTS))
def test_loaded_checkpoint_logits_match_single_process(battery, ckpt_dirs, name):
    config, fmt, shards, dtype = CHECKPOINTS[name]
    ref_model = llama_ref.load(ckpt_dirs[name], compute_dtype=torch.float32)  # as the ranks: fp32, comparable
    with torch.no_grad():
        ref = ref_model(W.tokens(config))
    for rank in (0, 1):
        got = battery[rank]["loads"][name]
        assert got["dtype"] == dtype
        assert _max_diff(got["logits"], ref) <= ATOL


def test_meta_shard_per_rank_reads_only_its_own_file(battery):
    for rank in (0, 1):
        own = [f"consolidated.0{rank}.pth"]
        assert battery[rank]["loads"]["meta-2-shards"]["opened"] == own  # not even the other shard's header
        assert battery[rank]["loads"]["meta-2-shards"]["read"] == own
    # Vocabulary-split embedding: its columns come from both shards, every other weight from the own one.
    for rank in (0, 1):
        assert battery[rank]["loads"]["meta-2-shards-vocab-split"]["read"] == ["consolidated.00.pth",
                                                                            "consolidated.01.pth"]
    # 4 shards, 2 ranks: every header is read to plan, weights only from the two shards of this rank's half.
    assert battery[0]["loads"]["meta-4-shards"]["read"] == ["consolidated.00.pth", "consolidated.01.pth"]
    assert battery[1]["loads"]["meta-4-shards"]["read"] == ["consolidated.02.pth", "consolidated.03.pth"]


def test_spawn_reraises_a_rank_error_and_stops_the_others():
    # Rank 1 raised while rank 0 is stuck: spawn must stop rank 0 (not wait for it) and re-raise rank 1's error.
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match="deliberate failure on rank 1") as info:
        spawn(W.fail_on_rank_1, 2, threads=1, timeout_s=120)
    assert time.perf_counter() - t0 < 30
    assert any("rank 1 of 2" in note for note in info.value.__notes__)


# ================================================================ the check script under torchrun
def _torchrun(args, nproc: int, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
           str(REPO / "scripts" / "tp_check.py"), *map(str, args)]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_tp_check_script_two_ranks_meta_shards(ckpt_dirs, tmp_path):
    toks = W.tokens(W.TINY, bsz=2, seqlen=7, seed=5)
    torch.save(toks, tmp_path / "tokens.pt")
    proc = _torchrun([ckpt_dirs["meta-2-shards"], "--tokens-file", tmp_path / "tokens.pt",
                      "--save-logits", tmp_path / "logits.pt", "--json", tmp_path / "out.json"], 2, tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads((tmp_path / "out.json").read_text())
    assert report["world_size"] == 2 and report["backend"] == "gloo" and report["load_mode"] == "shard-per-rank"
    for rank, stats in enumerate(report["ranks"]):  # each rank opened and read its own shard only
        assert stats["files_opened"] == stats["files_read"] == [f"consolidated.0{rank}.pth"]
        assert stats["weight_bytes"] == sum(  # bf16: half of every split weight, all of every norm
            math.prod(TPLayout(W.TINY, 2).local_shape(n, p.shape)) * 2 for n, p in Llama(W.TINY, device="meta").named_parameters())
    ref = report["reference"]
    assert ref["ran"] and ref["max_abs_diff"] <= ATOL
    assert ref["hf_ran"] and ref["max_abs_diff_hf"] <= 1e-4  # transformers' own forward on the same weights
    assert report["passed"] and "PASS" in proc.stdout
    saved = torch.load(tmp_path / "logits.pt")
    assert saved.dtype == torch.float32 and saved.shape == (2, 7, W.TINY.vocab_size)
    with torch.no_grad():
        want = llama_ref.load(ckpt_dirs["meta-2-shards"], compute_dtype=torch.float32)(toks)  # tp_check's fp32
    assert _max_diff(saved, want) <= ATOL


def test_tp_check_script_rejects_a_bad_world_size(ckpt_dirs):
    # The script's main() on 3 spawned ranks (torchrun's start-up is paid once, above); tiny has 4 heads.
    results = spawn(W.run_tp_check, 3, [ckpt_dirs["meta-2-shards"]], threads=1)
    assert [code for code, _, _ in results] == [2, 2, 2]
    err = results[0][2]  # rank 0 reports for every rank, one line per distinct error
    assert err.startswith("tp_check: ranks 0, 1, 2: ValueError: cannot split") and err.count("\n") == 1
    assert "not divisible by 3" in err and "n_heads=4" in err and "n_kv_heads=2" in err
    assert results[1][2] == "" and results[2][2] == ""


# ================================================================ in this process: layout and validation
@pytest.mark.parametrize("world_size, fragments", [
    (0, ["at least 1", "0"]),
    (-2, ["at least 1", "-2"]),
    (True, ["must be an int"]),
    (2.0, ["must be an int"]),
    (3, ["not divisible by 3", "n_heads=4", "n_kv_heads=2", "hidden_dim=176", "vocab_size=256", "dim=64"]),
    (8, ["more ranks than attention heads", "n_heads=4"]),
])
def test_bad_world_sizes_are_rejected_with_the_numbers(world_size, fragments):
    with pytest.raises(ValueError) as info:
        TPLayout(W.TINY, world_size)
    for fragment in fragments:
        assert fragment in str(info.value)


@pytest.mark.parametrize("changes, fragment", [
    (dict(n_heads=4, n_kv_heads=1), "n_kv_heads=1 (key/value heads; replicating"),  # GQA groups cannot split
    (dict(hidden_dim=175), "hidden_dim=175"),
    (dict(vocab_size=255), "vocab_size=255"),
])
def test_each_indivisible_size_is_named(changes, fragment):
    with pytest.raises(ValueError, match="not divisible by 2") as info:
        TPLayout(W.TINY.replace(**changes), 2)
    assert fragment in str(info.value)
    assert "is not divisible" in str(info.value)  # exactly one problem


def test_tied_embeddings_are_refused():
    with pytest.raises(ValueError, match="tied embeddings .* cannot be tensor-parallel"):
        TPLayout(W.TINY.replace(tie_word_embeddings=True), 2)


def test_layout_sizes_and_shards():
    layout = TPLayout(LlamaConfig.from_preset("llama-2-70b"), 8)
    # 70B: 64 heads, 8 kv heads, FFN 28672, vocab 32000, dim 8192 -> per rank 8, 1, 3584, 4000, 1024.
    assert (layout.n_heads, layout.n_kv_heads, layout.hidden_dim, layout.vocab_size, layout.embed_dim) == (
        8, 1, 3584, 4000, 1024)
    w = torch.arange(24.0).reshape(4, 6)
    assert torch.equal(layout.shard("layers.0.attention.wo.weight", torch.arange(16.0).reshape(2, 8), 3),
                       torch.tensor([[3.0], [11.0]]))  # row-parallel: column 3 of 8
    two = TPLayout(W.TINY, 2)
    assert torch.equal(two.shard("layers.1.feed_forward.w1.weight", w, 1), w[2:])  # column-parallel: rows
    assert two.shard("norm.weight", w, 1) is w  # replicated
    assert two.full_shape("tok_embeddings.weight", (256, 32)) == (256, 64)
    with pytest.raises(ValueError, match="rank 2 is outside"):
        two.shard("output.weight", w, 2)


def test_group_without_a_world_is_a_clear_error():
    assert not torch.distributed.is_initialized()
    with pytest.raises(ValueError, match="torch.distributed is not initialized"):
        tensor_parallel_llama(W.TINY, device="meta")
    with pytest.raises(ValueError, match="outside a tensor-parallel world of size 2"):
        TPGroup("g", 2, 2)


# ================================================================ meta device with a fake process group
class _OpLog(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func)] += 1
        return func(*args, **(kwargs or {}))


def test_meta_device_with_fake_world_runs_a_70b_layout():
    config = LlamaConfig.from_preset("llama-2-70b")
    with fake_world(8, rank=3) as group:
        assert (group.rank, group.world_size) == (3, 8)
        model = tensor_parallel_llama(config, device="meta", dtype=torch.bfloat16)
        toks = torch.zeros(1, 4, dtype=torch.long, device="meta")
        logits = model(toks)
        assert logits.shape == (1, 4, 32000) and logits.device.type == "meta"
        model.setup_cache(1, 16)
        assert model.caches[0].cache_k.shape == (1, 16, 1, 128)  # 8 kv heads / 8 ranks
        assert model(toks[:, :1], start_pos=0).shape == (1, 1, 32000)
        per_rank = model.param_count()
    full = Llama(config, device="meta").param_count()
    norms = (2 * config.n_layers + 1) * config.dim  # replicated on every rank
    # Every split weight is divided exactly by 8; the norms are held 8 times.
    assert 8 * per_rank == full + 7 * norms
    assert not torch.distributed.is_initialized()  # fake_world cleaned up


def _python_ops(model, toks) -> Counter:
    """The autograd.Function nodes of a jit trace (what fvcore sees as ``prim::PythonOp.<name>``)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        graph, _ = torch.jit._get_trace_graph(model, (toks,))
    return Counter(n.pyname() for n in graph.nodes() if n.kind() == "prim::PythonOp")


def test_collectives_are_visible_to_dispatch_modes_and_jit():
    with fake_world(2):
        model = tensor_parallel_llama(W.TINY, device="meta").requires_grad_(False)
        toks = torch.zeros(2, 5, dtype=torch.long, device="meta")
        with _OpLog() as log:
            model(toks)
        # Per layer: wo and w2 all-reduce (4 layers -> 8); embedding and logits all-gather (2).
        assert log.ops["_c10d_functional.all_reduce.default"] == 8
        assert log.ops["_c10d_functional.all_gather_into_tensor.default"] == 2
        assert log.ops["_c10d_functional.wait_tensor.default"] == 10
        assert _python_ops(model, toks) == {"ReduceFromTensorParallel": 8, "GatherFromTensorParallel": 2}
        # With trainable weights the identity-forward CopyToTensorParallel is recorded before each
        # column-parallel layer (5 per layer + the output head): it all-reduces only in backward.
        assert _python_ops(model.requires_grad_(True), toks)["CopyToTensorParallel"] == 5 * 4 + 1


def test_fake_world_refuses_bad_arguments_and_nesting():
    with pytest.raises(ValueError, match="rank 2 is outside a world of size 2"):
        with fake_world(2, rank=2):
            pass
    with fake_world(2):
        with pytest.raises(ValueError, match="already initialized"):
            with fake_world(2):
                pass
    assert not torch.distributed.is_initialized()


# ================================================================ per-rank loading, in this process
def _load_rank(path, rank, world_size=2, **kwargs):
    # Loading communicates nothing: a TPGroup by value is enough (forward would need a real group).
    return load_tp_pretrained(path, group=TPGroup("unused", rank, world_size), **kwargs)


@pytest.mark.parametrize("name", list(CHECKPOINTS))
def test_each_rank_loads_exactly_its_slice(ckpt_dirs, name):
    config, fmt, shards, dtype = CHECKPOINTS[name]
    full = llama_ref.load(ckpt_dirs[name]).state_dict()
    layout = TPLayout(config, 2)
    for rank in (0, 1):
        state = _load_rank(ckpt_dirs[name], rank).state_dict()
        want = layout.shard_state_dict(full, rank)
        assert list(state) == list(want)
        for key in state:
            assert torch.equal(state[key], want[key]), key


def test_load_modes(ckpt_dirs):
    with OpenFiles() as opener:
        for name, mode in (("meta-2-shards", SHARD_PER_RANK), ("meta-1-shard", SLICED), ("hf-single", SLICED),
                           ("meta-2-shards-vocab-split", SLICED)):
            plan = plan_rank(find_checkpoint_files(ckpt_dirs[name]), opener, 1, 2)
            assert plan.mode == mode, name
        plan = plan_rank(find_checkpoint_files(ckpt_dirs["meta-2-shards"]), opener, 1, 2)
        assert plan.files.shards == (str(ckpt_dirs["meta-2-shards"] / "consolidated.01.pth"),)


def test_a_broken_shard_fails_only_the_rank_that_reads_it(ckpt_dirs, tmp_path):
    import shutil

    broken = Path(shutil.copytree(ckpt_dirs["meta-2-shards"], tmp_path / "broken"))
    edit_torch_file(broken / "consolidated.01.pth",
                    lambda s: s.__setitem__("layers.2.feed_forward.w1.weight", s["layers.2.feed_forward.w1.weight"][:-1]))
    _load_rank(broken, 0)  # rank 0 never opens shard 1
    with pytest.raises(CheckpointError, match=r"consolidated\.01\.pth.*\(87, 64\).*\(88, 64\)"):
        _load_rank(broken, 1)


def test_load_rejects_a_bad_world_size_before_reading_weights(ckpt_dirs):
    with pytest.raises(ValueError, match="not divisible by 3"):
        _load_rank(ckpt_dirs["hf-single"], 0, world_size=3)


def test_load_refuses_a_shard_that_does_not_fit(ckpt_dirs, monkeypatch):
    monkeypatch.setattr(llama_memory, "available_memory_bytes", lambda device: 1000)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    with pytest.raises(ValueError, match=r"rank 1: its share of the weights \(x 2 ranks on this host\) needs about .* \(436,480 bytes\) on cpu"):
        _load_rank(ckpt_dirs["meta-2-shards"], 1)


def test_building_refuses_a_shard_that_does_not_fit():
    # 70B in fp32 split 2 ways: about 69e9 / 2 * 4 bytes = 128 GiB per rank; this machine has less.
    with pytest.raises(ValueError, match=r"rank 0: its share of the weights needs about 12\d\.\d\d GiB"):
        tensor_parallel_llama(LlamaConfig.from_preset("llama-2-70b"), group=TPGroup("unused", 0, 2), device="cpu")


def test_a_missing_cuda_device_is_a_clear_error():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ValueError, match="CUDA is not available"):
        tensor_parallel_llama(W.TINY, group=TPGroup("unused", 0, 2), device="cuda")


def test_load_on_meta_checks_files_without_reading_weights(ckpt_dirs):
    model = _load_rank(ckpt_dirs["hf-3-shards"], 1, device="meta")
    assert model.layers[0].attention.wq.weight.device.type == "meta"
    assert model.layers[0].attention.wq.weight.shape == (32, 64)
