"""Battery: every bad input to the model API and the loaders gets a clear exception naming the problem.

One table, ``CASES``. Each case is a call, the exception type it must raise (or a subclass) and the
substrings its message must contain: the offending value, device or file. Every call runs under a
30 s alarm, so a hang (a FIFO opened for reading, a schedule expanded to 10**11 entries) fails the
test instead of stalling the suite.

To add a case: append ``Case("id", call, ExceptionType, "fragment", ...)``. ``call`` receives a
:class:`Ctx` with a fresh tiny model (``ctx.model()``), fresh copies of tiny checkpoints in every
layout (``ctx.ckpt("hf-3-shards")``), ``ctx.tmp`` and ``ctx.monkeypatch``.
"""

from __future__ import annotations

import builtins
import itertools
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import pytest
import torch

import llama_ref
from llama_ref import Llama, LlamaConfig, generate, parse_schedule, resolve_schedule, sample_top_p
from llama_ref import memory as llama_memory
from llama_ref.errors import DeviceUnavailableError, InsufficientMemoryError, NonFiniteError
from llama_ref.loading import CheckpointError, load_pretrained
from llama_ref.loading import detect as loading_detect
from llama_ref.loading import files as loading_files
from llama_ref.loading.errors import NonFiniteWeightError

from _deadline import deadline
from _ckpt_helpers import copy_ckpt, edit_json, edit_safetensors, edit_torch_file, synth
from conftest import randomize_

TINY = LlamaConfig.from_preset("tiny")  # dim 64, 4 layers, 4 heads / 2 kv heads (head_dim 16), vocab 256, max_seq_len 128
CKPT_LAYOUTS = {"hf-single": ("hf", 1), "hf-3-shards": ("hf", 3), "hf-bin": ("hf-bin", 2),
                "meta-1-shard": ("meta", 1), "meta-2-shards": ("meta", 2)}
HAS_CUDA = torch.cuda.is_available()


@dataclass(frozen=True)
class Case:
    id: str
    call: Callable[["Ctx"], Any]
    exc: type
    match: tuple[str, ...]
    skip: Optional[Callable[[], Optional[str]]] = None  # returns a reason to skip, or None

    def __init__(self, id: str, call, exc: type, *match: str, skip=None) -> None:
        object.__setattr__(self, "id", id)
        object.__setattr__(self, "call", call)
        object.__setattr__(self, "exc", exc)
        object.__setattr__(self, "match", match)
        object.__setattr__(self, "skip", skip)


@dataclass
class Ctx:
    tmp: Path
    monkeypatch: pytest.MonkeyPatch
    ckpts: dict[str, Path]
    _n: itertools.count = field(default_factory=itertools.count)

    def model(self, **kwargs) -> Llama:
        """A fresh tiny model with random weights (fp32, CPU, eval)."""
        return randomize_(Llama(TINY, **kwargs)).eval()

    def ckpt(self, layout: str) -> Path:
        """A private copy of a tiny fp32 checkpoint, free to break."""
        return copy_ckpt(self.ckpts[layout], self.tmp / f"{layout}-{next(self._n)}")


def _tokens(bsz: int, seqlen: int) -> torch.Tensor:
    return torch.randint(0, TINY.vocab_size, (bsz, seqlen), generator=torch.Generator().manual_seed(0))


def _no_cuda() -> Optional[str]:
    return "CUDA is available here" if HAS_CUDA else None


def _memory_at_least(n: int) -> Callable[[], Optional[str]]:
    def check():
        avail = llama_memory.available_memory_bytes("cpu")
        return f"this machine has {avail} bytes available, enough for the case" if avail is None or avail >= n else None
    return check


# ---------------------------------------------------------------------------- model: KV cache
def _decode_past_fill(ctx):
    model = ctx.model()
    model.setup_cache(1, 16)
    model(_tokens(1, 4))  # prefill positions 0..3
    model(_tokens(1, 1), start_pos=10)  # positions 4..9 never written


def _decode_without_prefill(ctx):
    model = ctx.model()
    model.setup_cache(1, 16)
    model(_tokens(1, 1), start_pos=5)


def _larger_batch_after_smaller_prefill(ctx):
    model = ctx.model()
    model.setup_cache(2, 16)
    model(_tokens(1, 4))  # fills row 0 only
    model(_tokens(2, 1), start_pos=4)  # row 1 holds nothing


def _rerun_then_skip(ctx):
    model = ctx.model()
    model.setup_cache(1, 16)
    model(_tokens(1, 8))
    model(_tokens(1, 1), start_pos=3)  # allowed: re-running step 3 makes 4..7 stale
    model(_tokens(1, 1), start_pos=6)


def _cache_list_of_wrong_length(ctx):
    model = ctx.model(schedule="0,1,1")
    model.setup_cache(1, 16)
    model.caches = torch.nn.ModuleList(list(model.caches)[:2])
    model(_tokens(1, 2))


def _set_schedule_then_cached_step(ctx):
    model = ctx.model()
    model.setup_cache(1, 16)
    model(_tokens(1, 4))
    model.set_schedule("0,1")  # drops the cache
    model(_tokens(1, 1), start_pos=4)


def _with_cache(ctx):
    model = ctx.model()
    model.setup_cache(1, 16)
    return model


def _nan_model(ctx):
    model = ctx.model()
    with torch.no_grad():
        model.layers[1].feed_forward.w2.weight[3, 5] = float("nan")
    return model


def _generate_with_nan_weights(ctx):
    generate(_nan_model(ctx), [[1, 2, 3]], max_new_tokens=4)


def _generate_with_inf_output_row(ctx):
    model = ctx.model()
    with torch.no_grad():
        model.output.weight[7] = float("inf")  # logit 7 is +-inf for every input
    generate(model, [[1, 2, 3], [4, 5]], max_new_tokens=2, temperature=0.8, generator=torch.Generator())


def _generate_low_memory(ctx):
    model = ctx.model()
    ctx.monkeypatch.setattr(llama_memory, "available_memory_bytes", lambda device: 100_000)
    generate(model, [[1]] * 4, 127)


def _check_finite_nan_model(ctx):
    _nan_model(ctx).check_finite()


# ---------------------------------------------------------------------------- loaders: helpers
def _mutate_safetensors_tensor(path: Path, name: str, value: float) -> None:
    def mutate(t):
        t[name] = t[name].clone()
        t[name].view(-1)[7] = value
    edit_safetensors(path, mutate)


def _hf_nan(ctx):
    d = ctx.ckpt("hf-single")
    _mutate_safetensors_tensor(d / "model.safetensors", "model.layers.1.mlp.down_proj.weight", float("nan"))
    load_pretrained(d)


def _hf_shard_inf(ctx):
    d = ctx.ckpt("hf-3-shards")
    _mutate_safetensors_tensor(d / "model-00003-of-00003.safetensors", "lm_head.weight", float("-inf"))
    load_pretrained(d)


def _meta_shard_nan(ctx):
    d = ctx.ckpt("meta-2-shards")

    def mutate(s):
        s["layers.2.attention.wo.weight"] = s["layers.2.attention.wo.weight"].clone()
        s["layers.2.attention.wo.weight"][0, 0] = float("nan")
    edit_torch_file(d / "consolidated.01.pth", mutate)
    load_pretrained(d)


def _overflow_fp16(ctx):
    d = ctx.ckpt("hf-single")
    _mutate_safetensors_tensor(d / "model.safetensors", "model.norm.weight", 1e6)  # finite in fp32, > 65504
    load_pretrained(d, dtype=torch.float16)


def _meta_duplicate_shard_index(ctx):
    d = ctx.ckpt("meta-2-shards")
    (d / "consolidated.0.pth").write_bytes((d / "consolidated.00.pth").read_bytes())
    load_pretrained(d)


def _meta_odd_shard_name(ctx):
    d = ctx.ckpt("meta-2-shards")
    (d / "consolidated.01.pth").rename(d / "consolidated.1.pth")
    load_pretrained(d)


def _meta_huge_shard_number(ctx):
    d = ctx.ckpt("meta-2-shards")
    (d / "consolidated.99999999999.pth").write_bytes(b"")
    load_pretrained(d)


def _hf_single_and_index(ctx):
    d = ctx.ckpt("hf-3-shards")
    (d / "model.safetensors").write_bytes((ctx.ckpts["hf-single"] / "model.safetensors").read_bytes())
    load_pretrained(d)


def _hf_single_and_stray_shard(ctx):
    d = ctx.ckpt("hf-single")
    (d / "model-00001-of-00002.safetensors").write_bytes(b"stale")
    load_pretrained(d)


def _hf_index_mixes_sets(ctx):
    d = ctx.ckpt("hf-3-shards")
    (d / "model-00003-of-00003.safetensors").rename(d / "model-00002-of-00002.safetensors")
    edit_json(d / "model.safetensors.index.json", lambda i: i["weight_map"].update(
        {k: "model-00002-of-00002.safetensors" for k, v in i["weight_map"].items() if v == "model-00003-of-00003.safetensors"}))
    load_pretrained(d)


def _hf_index_misses_a_shard_on_disk(ctx):
    # The index lists shards 1 and 2 of 3; shard 3 exists but its tensors would be ignored.
    d = ctx.ckpt("hf-3-shards")
    edit_json(d / "model.safetensors.index.json", lambda i: i.update(weight_map={
        k: v for k, v in i["weight_map"].items() if v != "model-00003-of-00003.safetensors"}))
    load_pretrained(d)


def _hf_shard_number_out_of_range(ctx):
    d = ctx.ckpt("hf-3-shards")
    (d / "model-00003-of-00003.safetensors").rename(d / "model-00004-of-00003.safetensors")
    edit_json(d / "model.safetensors.index.json", lambda i: i["weight_map"].update(
        {k: "model-00004-of-00003.safetensors" for k, v in i["weight_map"].items() if v == "model-00003-of-00003.safetensors"}))
    load_pretrained(d)


def _hf_index_duplicate_key(ctx):
    d = ctx.ckpt("hf-3-shards")
    text = (d / "model.safetensors.index.json").read_text()
    # A second "lm_head.weight" entry pointing elsewhere: json.load would silently keep the last one.
    text = text.replace('"weight_map": {', '"weight_map": {"lm_head.weight": "model-00001-of-00003.safetensors", ', 1)
    (d / "model.safetensors.index.json").write_text(text)
    load_pretrained(d)


def _safetensors_duplicate_header_key(ctx):
    d = ctx.ckpt("hf-single")
    path = d / "model.safetensors"
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = raw[8 : 8 + n].decode()
    first = header.index('"model.norm.weight"')
    entry_end = header.index("}", first) + 1
    dup = header[first:entry_end]
    new = header[:1] + dup + "," + header[1:]
    new += " " * (-len(new) % 8)
    path.write_bytes(len(new).to_bytes(8, "little") + new.encode() + raw[8 + n :])
    load_pretrained(d)


def _replace_with_dir(ctx, layout: str, name: str):
    d = ctx.ckpt(layout)
    (d / name).unlink()
    (d / name).mkdir()
    load_pretrained(d)


def _replace_with_fifo(ctx, layout: str, name: str):
    d = ctx.ckpt(layout)
    (d / name).unlink()
    os.mkfifo(d / name)
    load_pretrained(d)


def _replace_with_broken_symlink(ctx, layout: str, name: str):
    d = ctx.ckpt(layout)
    (d / name).unlink()
    (d / name).symlink_to(ctx.tmp / "blobs" / "gone")
    load_pretrained(d)


def _write_bytes(ctx, layout: str, name: str, data: bytes):
    d = ctx.ckpt(layout)
    (d / name).write_bytes(data)
    load_pretrained(d)


def _huge_index(ctx):
    d = ctx.ckpt("hf-3-shards")
    with open(d / "model.safetensors.index.json", "r+b") as f:
        f.truncate(loading_files.MAX_JSON_BYTES + 1)  # sparse: no disk used
    load_pretrained(d)


def _deny(ctx, layout: str, name: str):
    """Permission denied on one file. Tests run as root here, where chmod 000 does not deny reading,
    so ``open`` (the builtin, which every reader ends in) is patched to refuse that one path."""
    d = ctx.ckpt(layout)
    target = os.path.realpath(d / name)
    real_open = builtins.open

    def guarded_open(file, *args, **kwargs):
        if isinstance(file, (str, os.PathLike)) and os.path.realpath(file) == target:
            raise PermissionError(13, "Permission denied", os.fspath(file))
        return real_open(file, *args, **kwargs)

    ctx.monkeypatch.setattr(builtins, "open", guarded_open)
    load_pretrained(d)


def _deny_listing(ctx):
    d = ctx.ckpt("hf-single")

    def refuse(path):
        raise PermissionError(13, "Permission denied", os.fspath(path))

    ctx.monkeypatch.setattr(loading_detect.os, "listdir", refuse)
    load_pretrained(d)


def _low_memory_load(ctx):
    ctx.monkeypatch.setattr(llama_memory, "available_memory_bytes", lambda device: 100_000)
    load_pretrained(ctx.ckpt("meta-1-shard"))


def _config_claims_a_billion_layers(ctx):
    d = ctx.ckpt("hf-single")
    edit_json(d / "config.json", lambda c: c.update(num_hidden_layers=10**9))
    load_pretrained(d)


# ---------------------------------------------------------------------------- the table
CASES: list[Case] = [
    # --- KV cache fill tracking
    Case("decode-past-fill", _decode_past_fill, ValueError, "start_pos=10", "filled up to 4"),
    Case("decode-without-prefill", _decode_without_prefill, ValueError, "start_pos=5", "filled up to 0"),
    Case("larger-batch-after-smaller-prefill", _larger_batch_after_smaller_prefill, ValueError,
         "start_pos=4", "rows 0-1", "filled up to 0"),
    Case("rerun-marks-later-positions-stale", _rerun_then_skip, ValueError, "start_pos=6", "filled up to 4"),
    Case("cache-list-wrong-length", _cache_list_of_wrong_length, ValueError, "2 KV cache(s)", "3 layer runs"),
    Case("set-schedule-drops-cache", _set_schedule_then_cached_step, ValueError, "start_pos=4 needs a KV cache"),
    # --- forward arguments
    Case("start-pos-tensor-no-cache", lambda c: c.model()(_tokens(1, 2), start_pos=torch.tensor(0)), ValueError,
         "start_pos=tensor(0)", "needs a KV cache"),
    Case("start-pos-tensor-float", lambda c: _with_cache(c)(_tokens(1, 2), start_pos=torch.tensor(0.0)), ValueError,
         "0-dim integer tensor", "torch.float32"),
    Case("start-pos-tensor-1d", lambda c: _with_cache(c)(_tokens(1, 2), start_pos=torch.tensor([0])), ValueError,
         "0-dim integer tensor", "(1,)"),
    Case("start-pos-tensor-meta", lambda c: _with_cache(c)(_tokens(1, 2), start_pos=torch.tensor(0, device="meta")),
         ValueError, "model's device cpu", "meta"),
    Case("start-pos-tensor-past-fill", lambda c: _with_cache(c)(_tokens(1, 1), start_pos=torch.tensor(3)), ValueError,
         "start_pos=3", "filled up to 0"),
    Case("start-pos-tensor-negative", lambda c: _with_cache(c)(_tokens(1, 1), start_pos=torch.tensor(-2)), ValueError,
         "start_pos must be a non-negative int, got -2"),
    Case("start-pos-float", lambda c: c.model()(_tokens(1, 2), start_pos=0.0), ValueError, "got 0.0 (float)"),
    Case("start-pos-bool", lambda c: c.model()(_tokens(1, 2), start_pos=False), ValueError, "got False (bool)"),
    Case("start-pos-negative", lambda c: c.model()(_tokens(1, 2), start_pos=-1), ValueError, "got -1"),
    Case("tokens-bool", lambda c: c.model()(torch.ones(1, 3, dtype=torch.bool)), ValueError, "torch.bool"),
    Case("tokens-uint8", lambda c: c.model()(torch.ones(1, 3, dtype=torch.uint8)), ValueError, "torch.uint8"),
    Case("tokens-float", lambda c: c.model()(torch.ones(1, 3)), ValueError, "torch.float32"),
    Case("tokens-sparse", lambda c: c.model()(torch.ones(1, 3, dtype=torch.long).to_sparse()), ValueError,
         "dense tensor", "sparse"),
    Case("tokens-3d", lambda c: c.model()(torch.ones(1, 2, 3, dtype=torch.long)), ValueError, "(1, 2, 3)"),
    Case("tokens-empty", lambda c: c.model()(torch.ones(1, 0, dtype=torch.long)), ValueError, "empty input", "(1, 0)"),
    Case("tokens-list", lambda c: c.model()([[1, 2]]), ValueError, "got list"),
    Case("token-id-vocab", lambda c: c.model()(torch.tensor([[1, 256]])), ValueError, "token id 256", "[0, 256)"),
    Case("token-id-negative", lambda c: c.model()(torch.tensor([[-7, 1]])), ValueError, "token id -7"),
    Case("tokens-too-long", lambda c: c.model()(torch.ones(1, 129, dtype=torch.long)), ValueError,
         "sequence end 129", "max_seq_len=128"),
    # --- setup_cache and memory
    # 2 (k, v) * 10**6 rows * 128 positions * 2 kv heads * 16 head_dim * 4 bytes * 4 runs = 131,072,000,000 bytes
    Case("cache-too-big", lambda c: c.model().setup_cache(10**6, 128), InsufficientMemoryError,
         "setup_cache(max_batch_size=1000000", "131,072,000,000 bytes", "available",
         skip=_memory_at_least(131_072_000_000)),
    Case("cache-dtype-int", lambda c: c.model().setup_cache(1, 8, dtype=torch.int8), ValueError, "torch.int8"),
    Case("cache-bsz-bool", lambda c: c.model().setup_cache(True, 8), ValueError, "max_batch_size", "got True"),
    Case("cache-elements-overflow", lambda c: Llama(TINY, device="meta").setup_cache(10**30, 128), ValueError,
         "setup_cache(1000000000000000000000000000000, 128)", "2**63"),
    # 70B: 68,976,648,192 weights * 4 bytes + RoPE table 4096 * 64 * 8 = 275,908,689,920 bytes
    Case("70b-fp32-on-cpu", lambda c: Llama(LlamaConfig.from_preset("llama-2-70b"), device="cpu"),
         InsufficientMemoryError, "275,908,689,920 bytes", "68,976,648,192 weights", "available",
         skip=_memory_at_least(275_908_689_920)),
    # --- devices
    Case("model-cuda", lambda c: Llama(TINY, device="cuda"), DeviceUnavailableError, "'cuda'", "CUDA is not available",
         skip=_no_cuda),
    Case("model-cuda-index", lambda c: Llama(TINY, device="cuda:7"), DeviceUnavailableError, "cuda:7",
         skip=lambda: "8+ GPUs here" if HAS_CUDA and torch.cuda.device_count() > 7 else None),
    Case("model-device-garbage", lambda c: Llama(TINY, device="nope"), ValueError, "device='nope'"),
    Case("model-device-bool", lambda c: Llama(TINY, device=True), ValueError, "device=True"),
    Case("model-to-cuda", lambda c: c.model().to("cuda"), DeviceUnavailableError, "CUDA is not available", skip=_no_cuda),
    Case("model-dot-cuda", lambda c: c.model().cuda(), DeviceUnavailableError, "CUDA is not available", skip=_no_cuda),
    Case("model-attn-kernel", lambda c: Llama(TINY, attn_kernel="flash"), ValueError, "'flash'"),
    Case("load-cuda", lambda c: load_pretrained(c.ckpts["hf-single"], device="cuda"), DeviceUnavailableError,
         "CUDA is not available", skip=_no_cuda),
    Case("from-pretrained-cuda", lambda c: llama_ref.load(c.ckpts["hf-single"], device="cuda:0"),
         DeviceUnavailableError, "cuda:0", skip=_no_cuda),
    # --- schedules (all refused from their bounds, before any list is built)
    Case("schedule-huge-range", lambda c: Llama(TINY, schedule="0-99999999999"), ValueError,
         "layer index 99999999999 out of range", "4 layers"),
    Case("schedule-huge-repeat", lambda c: Llama(TINY, schedule="0x100000000"), ValueError,
         "more than 10,000 layer runs", "'0x100000000'"),
    Case("schedule-huge-range-no-model", lambda c: parse_schedule("0-99999999999"), ValueError,
         "more than 10,000 layer runs", "100,000,000,000"),
    Case("schedule-many-digits", lambda c: parse_schedule("1" * 5000), ValueError, "is too large"),
    Case("schedule-huge-sequence", lambda c: resolve_schedule(range(10**12), 4), ValueError,
         "range(0, 1000000000000)", "more than 10,000"),
    Case("schedule-endless-iterator", lambda c: resolve_schedule(itertools.repeat(0), 4), ValueError,
         "more than 10,000"),
    Case("schedule-huge-int", lambda c: resolve_schedule([0, 10**30], 4), ValueError,
         "layer index 1000000000000000000000000000000 out of range"),
    Case("schedule-negative-int", lambda c: resolve_schedule([2, -3], 4), ValueError, "layer index -3 out of range"),
    Case("schedule-huge-string", lambda c: resolve_schedule("0-3," * 5_000_000 + "0", 4), ValueError,
         "more than 10,000 layer runs"),
    Case("model-billion-layers", lambda c: Llama(TINY.replace(n_layers=10**9), device="meta"), ValueError,
         "1,000,000,000 layers", "more than 10,000"),
    # --- generate
    Case("generate-meta", lambda c: generate(Llama(TINY, device="meta"), [[1, 2]], 2), ValueError, "meta device"),
    Case("generate-temperature-inf", lambda c: generate(c.model(), [[1]], 2, temperature=math.inf), ValueError,
         "temperature", "got inf"),
    Case("generate-top-p-nan", lambda c: generate(c.model(), [[1]], 2, temperature=1.0, top_p=math.nan), ValueError,
         "top_p", "got nan"),
    Case("generate-huge-max-new-tokens", lambda c: generate(c.model(), [[1]], 10**12), ValueError,
         "max_new_tokens (1000000000000)", "max_seq_len=128"),
    Case("generate-max-new-tokens-float", lambda c: generate(c.model(), [[1]], 2.0), ValueError,
         "max_new_tokens", "got 2.0"),
    Case("generate-eos-negative", lambda c: generate(c.model(), [[1]], 2, eos_id=-1), ValueError, "eos_id -1"),
    Case("generate-eos-vocab", lambda c: generate(c.model(), [[1]], 2, eos_id=256), ValueError, "eos_id 256"),
    Case("generate-text-prompt", lambda c: generate(c.model(), "hello", 2), ValueError, "'hello'", "tokenize"),
    Case("generate-text-prompts", lambda c: generate(c.model(), ["hello", "world"], 2), ValueError, "'hello'"),
    Case("generate-float-tensor-prompt", lambda c: generate(c.model(), [torch.tensor([1.0, 2.0])], 2), ValueError,
         "1-D integer tensor", "torch.float32"),
    Case("generate-bool-prompt-tensor", lambda c: generate(c.model(), torch.ones(1, 2, dtype=torch.bool), 2),
         ValueError, "torch.bool"),
    Case("generate-meta-prompt-tensor", lambda c: generate(c.model(), torch.ones(1, 2, dtype=torch.long, device="meta"), 2),
         ValueError, "meta device"),
    Case("generate-huge-prompt-tensor", lambda c: generate(c.model(), torch.zeros(1, 10**7, dtype=torch.long), 1),
         ValueError, "prompt 0 is longer than the model's max_seq_len=128"),
    Case("generate-endless-prompt", lambda c: generate(c.model(), [itertools.repeat(1)], 1), ValueError,
         "prompt 0 is longer"),
    Case("generate-token-out-of-vocab", lambda c: generate(c.model(), [[1], [2, 999]], 2), ValueError,
         "token id 999", "prompt 1"),
    Case("generate-generator-type", lambda c: generate(c.model(), [[1]], 2, temperature=1.0, generator=7), ValueError,
         "generator", "int"),
    Case("generate-not-a-model", lambda c: generate(torch.nn.Linear(2, 2), [[1]], 2), ValueError, "Linear"),
    # 2 * 4 rows * 128 positions * 2 kv heads * 16 * 4 bytes * 4 runs = 524,288 bytes > 100,000 available
    Case("generate-batch-too-big", _generate_low_memory, InsufficientMemoryError,
         "setup_cache(max_batch_size=4, max_seq_len=128)", "524,288 bytes", "100,000 bytes"),
    Case("generate-nan-weights", _generate_with_nan_weights, NonFiniteError, "non-finite logits", "step 0",
         "batch row(s) 0"),
    Case("generate-inf-logit-sampling", _generate_with_inf_output_row, NonFiniteError, "non-finite logits",
         "batch row(s) 0, 1"),
    Case("sample-top-p-nan-probs", lambda c: sample_top_p(torch.tensor([[0.5, math.nan]]), 0.9), NonFiniteError,
         "NaN"),
    Case("sample-top-p-bad-p", lambda c: sample_top_p(torch.tensor([[0.5, 0.5]]), 1.5), ValueError, "got 1.5"),
    Case("check-finite", _check_finite_nan_model, NonFiniteError, "layers.1.feed_forward.w2.weight", "1 NaN"),
    # --- loader arguments
    Case("load-path-none", lambda c: load_pretrained(None), ValueError, "NoneType"),
    Case("load-path-nul", lambda c: load_pretrained("ab\0c"), ValueError, "NUL byte"),
    Case("load-check-finite-str", lambda c: load_pretrained(c.ckpts["hf-single"], check_finite="yes"), ValueError,
         "check_finite", "'yes'"),
    Case("load-requires-grad-int", lambda c: load_pretrained(c.ckpts["hf-single"], requires_grad=1), ValueError,
         "requires_grad", "got 1"),
    # tiny: 217,664 weights * 4 bytes = 870,656, + a RoPE table of 4096 positions (Meta's params.json has no
    # max_seq_len) * 8 complex pairs * 8 bytes = 262,144: 1,132,800 bytes
    Case("load-low-memory", _low_memory_load, InsufficientMemoryError, "1,132,800 bytes", "100,000 bytes",
         "meta-1-shard"),
    Case("load-config-billion-layers", _config_claims_a_billion_layers, CheckpointError, "1,000,000,000 layers",
         "config.json", "4 layer(s)"),
    # --- non-finite weights in checkpoints
    Case("ckpt-nan-hf", _hf_nan, NonFiniteWeightError, "'model.layers.1.mlp.down_proj.weight'", "model.safetensors",
         "1 NaN", "check_finite=False"),
    Case("ckpt-inf-hf-shard", _hf_shard_inf, NonFiniteWeightError, "'lm_head.weight'",
         "model-00003-of-00003.safetensors", "1 inf"),
    Case("ckpt-nan-meta-shard", _meta_shard_nan, NonFiniteWeightError, "'layers.2.attention.wo.weight'",
         "consolidated.01.pth"),
    Case("ckpt-overflow-fp16", _overflow_fp16, NonFiniteWeightError, "'model.norm.weight'", "overflows torch.float16"),
    # --- shard discovery: deterministic, never a guess
    Case("meta-duplicate-shard", _meta_duplicate_shard_index, CheckpointError, "consolidated.0.pth",
         "consolidated.00.pth", "both model-parallel shard 0"),
    Case("meta-odd-shard-name", _meta_odd_shard_name, CheckpointError, "consolidated.1.pth", "consolidated.01.pth"),
    Case("meta-huge-shard-number", _meta_huge_shard_number, FileNotFoundError, "consolidated.02.pth is missing",
         "consolidated.99999999999.pth"),
    Case("hf-single-and-index", _hf_single_and_index, CheckpointError, "model.safetensors",
         "model.safetensors.index.json", "ambiguous"),
    Case("hf-single-and-stray-shard", _hf_single_and_stray_shard, CheckpointError, "model-00001-of-00002.safetensors",
         "ambiguous"),
    Case("hf-index-mixes-shard-sets", _hf_index_mixes_sets, CheckpointError, "model-00002-of-00002.safetensors",
         "model-00001-of-00003.safetensors", "different sets"),
    Case("hf-index-misses-shard-on-disk", _hf_index_misses_a_shard_on_disk, CheckpointError,
         "model-00003-of-00003.safetensors", "does not list it"),
    Case("hf-shard-number-out-of-range", _hf_shard_number_out_of_range, CheckpointError,
         "model-00004-of-00003.safetensors", "outside 1..3"),
    Case("hf-index-duplicate-key", _hf_index_duplicate_key, CheckpointError, "model.safetensors.index.json",
         "'lm_head.weight' more than once"),
    Case("safetensors-duplicate-tensor", _safetensors_duplicate_header_key, CheckpointError, "model.safetensors",
         "'model.norm.weight' is described twice"),
    # --- odd file kinds and unreadable files
    Case("dir-as-weights", lambda c: _replace_with_dir(c, "hf-single", "model.safetensors"), CheckpointError,
         "model.safetensors is a directory"),
    Case("dir-as-index", lambda c: _replace_with_dir(c, "hf-3-shards", "model.safetensors.index.json"), CheckpointError,
         "model.safetensors.index.json is a directory"),
    Case("dir-as-config", lambda c: _replace_with_dir(c, "hf-single", "config.json"), CheckpointError,
         "config.json is a directory"),
    Case("dir-as-listed-shard", lambda c: _replace_with_dir(c, "hf-3-shards", "model-00002-of-00003.safetensors"),
         CheckpointError, "model-00002-of-00003.safetensors is a directory"),
    Case("dir-as-meta-shard", lambda c: _replace_with_dir(c, "meta-2-shards", "consolidated.01.pth"), CheckpointError,
         "consolidated.01.pth is a directory"),
    Case("fifo-as-weights", lambda c: _replace_with_fifo(c, "hf-single", "model.safetensors"), CheckpointError,
         "model.safetensors is a FIFO"),
    Case("fifo-as-index", lambda c: _replace_with_fifo(c, "hf-3-shards", "model.safetensors.index.json"),
         CheckpointError, "model.safetensors.index.json is a FIFO"),
    Case("fifo-as-listed-shard", lambda c: _replace_with_fifo(c, "hf-3-shards", "model-00001-of-00003.safetensors"),
         CheckpointError, "model-00001-of-00003.safetensors is a FIFO"),
    Case("fifo-as-config", lambda c: _replace_with_fifo(c, "hf-bin", "config.json"), CheckpointError,
         "config.json is a FIFO"),
    Case("fifo-as-params", lambda c: _replace_with_fifo(c, "meta-1-shard", "params.json"), CheckpointError,
         "params.json is a FIFO"),
    Case("fifo-as-meta-shard", lambda c: _replace_with_fifo(c, "meta-1-shard", "consolidated.00.pth"), CheckpointError,
         "consolidated.00.pth is a FIFO"),
    Case("broken-symlink-weights", lambda c: _replace_with_broken_symlink(c, "hf-single", "model.safetensors"),
         FileNotFoundError, "model.safetensors is a broken symbolic link", "gone"),
    Case("broken-symlink-shard", lambda c: _replace_with_broken_symlink(c, "hf-3-shards", "model-00003-of-00003.safetensors"),
         FileNotFoundError, "model-00003-of-00003.safetensors", "broken symbolic link"),
    Case("broken-symlink-bin-shard", lambda c: _replace_with_broken_symlink(c, "hf-bin", "pytorch_model-00001-of-00002.bin"),
         FileNotFoundError, "pytorch_model-00001-of-00002.bin", "broken symbolic link"),
    Case("binary-index", lambda c: _write_bytes(c, "hf-3-shards", "model.safetensors.index.json", b"\x89PNG\r\n\x1a\n\xff\xfe"),
         CheckpointError, "model.safetensors.index.json is not UTF-8"),
    Case("index-not-json", lambda c: _write_bytes(c, "hf-3-shards", "model.safetensors.index.json", b"weight_map = {}"),
         CheckpointError, "model.safetensors.index.json is not valid JSON"),
    Case("index-too-large", _huge_index, CheckpointError, "model.safetensors.index.json", "too large"),
    Case("binary-config", lambda c: _write_bytes(c, "hf-single", "config.json", b"\xff\xfe\x00{"), ValueError,
         "config.json: not UTF-8"),
    Case("binary-params", lambda c: _write_bytes(c, "meta-1-shard", "params.json", b"\x80\x81"), ValueError,
         "params.json: not UTF-8"),
    Case("denied-weights", lambda c: _deny(c, "hf-single", "model.safetensors"), PermissionError,
         "model.safetensors", "permission denied"),
    Case("denied-shard", lambda c: _deny(c, "hf-3-shards", "model-00002-of-00003.safetensors"), PermissionError,
         "model-00002-of-00003.safetensors", "permission denied"),
    Case("denied-index", lambda c: _deny(c, "hf-3-shards", "model.safetensors.index.json"), PermissionError,
         "model.safetensors.index.json", "permission denied"),
    Case("denied-config", lambda c: _deny(c, "hf-single", "config.json"), PermissionError, "config.json",
         "permission denied"),
    Case("denied-bin", lambda c: _deny(c, "hf-bin", "pytorch_model-00002-of-00002.bin"), PermissionError,
         "pytorch_model-00002-of-00002.bin", "permission denied"),
    Case("denied-meta-shard", lambda c: _deny(c, "meta-2-shards", "consolidated.00.pth"), PermissionError,
         "consolidated.00.pth", "permission denied"),
    Case("denied-listing", _deny_listing, PermissionError, "cannot list checkpoint directory", "hf-single"),
]


# ---------------------------------------------------------------------------- runner
@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bad-input-ckpts")
    out = {}
    for name, (fmt, shards) in CKPT_LAYOUTS.items():
        synth().write_checkpoint("tiny", root / name, fmt, shards=shards, dtype=torch.float32, seed=0)
        out[name] = root / name
    return out


def _deadline(seconds: int):
    return deadline(seconds)


def test_case_ids_are_unique():
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids)), sorted(i for i in ids if ids.count(i) > 1)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, ckpts, tmp_path, monkeypatch):
    reason = case.skip() if case.skip else None
    if reason:
        pytest.skip(reason)
    ctx = Ctx(tmp_path, monkeypatch, ckpts)
    with _deadline(30):
        with pytest.raises(case.exc) as info:
            case.call(ctx)
    message = str(info.value)
    for fragment in case.match:
        assert fragment in message, f"{fragment!r} not in the message: {message}"


# ---------------------------------------------------------------- a training step's memory
def test_training_memory_adds_gradients_and_kept_activations():
    from llama_ref import LlamaConfig
    from llama_ref.memory_algebra import MemoryRequest, memory

    cfg = LlamaConfig.from_preset("tiny")
    fwd = memory(MemoryRequest(cfg, batch=4, seqlen=32, kv_cache=False))
    step = memory(MemoryRequest(cfg, batch=4, seqlen=32, train=True, optimizer="none"))
    assert step.gradients == 217_664 * 4  # fp32 gradients, one per parameter
    assert step.weights == fwd.weights and step.kv_cache == 0
    # Kept per layer run (math kernel, fp32): per token 6*dim + 4*q_dim + 4*hidden + 2 + n_heads*S elements
    # = 384 + 256 + 704 + 2 + 4*32 = 1,474, x 4*32 tokens x 4 bytes = 754,688 bytes
    assert [layer.saved_activation_bytes for layer in step.layers] == [754_688] * 4
    assert step.peak > fwd.peak
    # Checkpointing keeps each layer run's input instead (4*32*64*4 = 32,768 bytes; the first also the mask 32*32*4)
    recompute = memory(MemoryRequest(cfg, batch=4, seqlen=32, train=True, optimizer="none", recompute=True))
    assert [layer.saved_activation_bytes for layer in recompute.layers] == [32_768 + 4_096] + [32_768] * 3
    # The sdpa kernel keeps no score matrix: per token its n_heads*S = 128 probabilities become n_heads = 4
    # logsumexp values: (1,474 - 128 + 4) x 128 tokens x 4 bytes = 691,200 bytes
    sdpa = memory(MemoryRequest(cfg, batch=4, seqlen=32, train=True, optimizer="none", attn_kernel="sdpa"))
    assert [layer.saved_activation_bytes for layer in sdpa.layers] == [691_200] * 4
    assert "gradients" in step.describe() and "gradients" not in fwd.describe()


def test_count_train_chooses_meta_when_the_step_does_not_fit(capsys, monkeypatch):
    import json

    import counters.commands.models as models
    import llama_ref.memory as llama_memory
    from counters.cli import main

    for module in (models, llama_memory):
        monkeypatch.setattr(module, "available_memory_bytes", lambda device: 3_000_000)
    assert main(["count", "tiny", "--batch", "8", "--tokens", "64", "--train", "--counters", "analytic,hooks",
                 "--format", "json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["device"] == "meta" and doc["agree"]
