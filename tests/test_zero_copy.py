"""Loading from private memory maps: weights stored in the target dtype are views of the file (zero copy),
everything else is one copy; in-place ops never write the file; pages read are dropped from RSS and read
back intact; shared storages are never handed out twice."""

from __future__ import annotations

import hashlib
import mmap
import sys
from pathlib import Path

import pytest
import torch

from llama_ref.loading import load_pretrained
from llama_ref.loading.pages import file_mappings, release_address_range, release_mmap_range
from llama_ref.loading.readers import OpenFiles, load_torch_file

from _ckpt_helpers import copy_ckpt, edit_torch_file, logits, reference_model, synth, tiny_config, tokens

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/self/maps and MADV_DONTNEED")


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("zc")
    out = {}
    for name, fmt, shards in (("hf", "hf", 1), ("hf-bin", "hf-bin", 1), ("meta-1", "meta", 1),
                              ("meta-2", "meta", 2)):
        synth().write_checkpoint("tiny", root / name, fmt, shards=shards, dtype=torch.float32, seed=0)
        out[name] = root / name
    return out


def _weight_files(d: Path) -> list[Path]:
    return sorted(p for p in d.iterdir() if p.suffix in (".safetensors", ".bin", ".pth"))


def _mapped_from(t: torch.Tensor, files: list[Path]) -> bool:
    """Whether ``t``'s bytes lie in a private mapping of one of ``files``."""
    lo = t.data_ptr()
    hi = lo + t.numel() * t.element_size()
    return any(a <= lo and hi <= b for f in files for a, b in file_mappings(str(f)))


def _digest(d: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.iterdir())}


# ---------------------------------------------------------------------------- which weights are mapped
@linux_only
@pytest.mark.parametrize("layout", ["hf", "hf-bin", "meta-1"])
def test_weights_in_the_stored_dtype_are_views_of_the_file(ckpts, layout):
    model = load_pretrained(ckpts[layout])
    files = _weight_files(ckpts[layout])
    for name, p in model.named_parameters():
        qk = name.endswith(("attention.wq.weight", "attention.wk.weight"))
        # HF stores q/k rows permuted for rotate-half RoPE: those are the one copy the HF layout needs.
        want = not (qk and layout.startswith("hf"))
        assert _mapped_from(p, files) == want, name


@linux_only
def test_split_meta_tensors_are_one_concatenated_copy(ckpts):
    model = load_pretrained(ckpts["meta-2"])
    files = _weight_files(ckpts["meta-2"])
    for name, p in model.named_parameters():
        replicated = name.endswith("norm.weight")  # the same in every shard: the first shard's copy is used
        assert _mapped_from(p, files) == replicated, name


@linux_only
def test_another_dtype_is_one_converting_copy(ckpts):
    ref = reference_model(tiny_config())
    model = load_pretrained(ckpts["hf"], dtype=torch.bfloat16)
    files = _weight_files(ckpts["hf"])
    for name, p in model.named_parameters():
        assert p.dtype == torch.bfloat16 and not _mapped_from(p, files), name
        assert torch.equal(p, ref.get_parameter(name).to(torch.bfloat16)), name


def test_meta_device_target_maps_nothing(ckpts):
    model = load_pretrained(ckpts["hf"], device="meta")
    assert all(p.is_meta for p in model.parameters())


# ---------------------------------------------------------------------------- the file is never written
@pytest.mark.parametrize("layout", ["hf", "hf-bin", "meta-1"])
def test_in_place_ops_on_weights_never_write_the_file(ckpts, tmp_path, layout):
    d = copy_ckpt(ckpts[layout], tmp_path / "ck")
    before = _digest(d)
    model = load_pretrained(d)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(-3.0).add_(1.0)
    assert _digest(d) == before
    del model
    toks = tokens(tiny_config())
    assert torch.equal(logits(load_pretrained(d), toks), logits(reference_model(tiny_config()), toks))


def test_weights_outlive_the_loader_and_its_maps(ckpts):
    # The maps are closed by no one: each weight keeps its own alive (closing one under a view would crash).
    toks = tokens(tiny_config())
    want = logits(reference_model(tiny_config()), toks)
    model = load_pretrained(ckpts["meta-1"])
    import gc

    gc.collect()
    assert torch.equal(logits(model, toks), want)


def test_tensors_sharing_storage_in_a_bin_are_not_aliased(ckpts, tmp_path):
    # torch.save stores a tied embedding/head once; with an untied config each weight must be its own.
    d = copy_ckpt(ckpts["hf-bin"], tmp_path / "ck")
    edit_torch_file(d / "pytorch_model.bin", lambda s: s.update({"lm_head.weight": s["model.embed_tokens.weight"]}))
    model = load_pretrained(d)
    assert torch.equal(model.output.weight, model.tok_embeddings.weight)
    with torch.no_grad():
        model.output.weight.zero_()
    assert model.tok_embeddings.weight.abs().sum() > 0


def test_private_mapping_even_when_torch_default_is_shared(ckpts, tmp_path):
    d = copy_ckpt(ckpts["meta-1"], tmp_path / "ck")
    before = _digest(d)
    torch.serialization.set_default_mmap_options(mmap.MAP_SHARED)
    try:
        model = load_pretrained(d)
        with torch.no_grad():
            model.layers[0].attention.wo.weight.fill_(7.0)
    finally:
        torch.serialization.set_default_mmap_options(mmap.MAP_PRIVATE)
    assert _digest(d) == before


# ---------------------------------------------------------------------------- pages dropped from RSS
def _resident_kib(ranges) -> int:
    """Resident KiB of this process's mappings starting at the given addresses (/proc/self/smaps)."""
    starts = {lo for lo, _ in ranges}
    total, current = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            first = line.split(maxsplit=1)[0]
            if "-" in first and not first.endswith(":"):
                current = int(first.split("-")[0], 16) in starts
            elif current and first == "Rss:":
                total += int(line.split()[1])
    return total


@linux_only
def test_released_safetensors_pages_leave_rss_and_read_back_intact(tmp_path):
    from safetensors.torch import save_file

    want = torch.randn(1024, 1024)  # 4 MiB
    save_file({"w": want}, tmp_path / "m.safetensors")
    path = str(tmp_path / "m.safetensors")
    opener = OpenFiles()
    stored = opener.describe(path)["w"]
    with opener.tensor(stored) as t:
        assert torch.equal(t, want)  # every page read: resident
        ranges = file_mappings(path)
        assert _resident_kib(ranges) >= 4096
    assert _resident_kib(ranges) <= 8  # at most the two pages the tensor shares with the header / end
    assert torch.equal(t, want)  # read back from the page cache


@linux_only
def test_released_torch_pages_leave_rss_and_read_back_intact(tmp_path):
    want = torch.randn(1024, 1024)
    torch.save({"w": want}, tmp_path / "m.pth")
    path = str(tmp_path / "m.pth")
    opener = OpenFiles()
    stored = opener.describe(path)["w"]
    with opener.tensor(stored) as t:
        assert torch.equal(t, want)
        ranges = file_mappings(path)
        assert _resident_kib(ranges) >= 4096
    assert _resident_kib(ranges) <= 64  # the zip's own records and the pickle may stay
    assert torch.equal(t, want)


def test_release_ignores_memory_outside_the_file_mappings(tmp_path):
    # Anonymous memory would be zeroed by MADV_DONTNEED: it must never be passed through.
    torch.save({"w": torch.ones(8)}, tmp_path / "m.pth")
    state = load_torch_file(str(tmp_path / "m.pth"))
    anon = torch.full((1 << 20,), 5.0)
    release_address_range(anon.data_ptr(), anon.numel() * 4, file_mappings(str(tmp_path / "m.pth")))
    assert bool((anon == 5.0).all())
    assert torch.equal(state["w"], torch.ones(8))


def test_release_of_a_range_smaller_than_a_page_is_a_no_op(tmp_path):
    (tmp_path / "f").write_bytes(bytes(range(256)) * 64)
    with open(tmp_path / "f", "rb") as f:
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    release_mmap_range(mm, 10, 100)
    release_mmap_range(mm, 0, len(mm))
    assert mm[:256] == bytes(range(256))


# ---------------------------------------------------------------------------- odd files
def _raw_safetensors(path: Path, tensors: dict, header_pad: int) -> None:
    """A safetensors file written by hand, with ``header_pad`` spaces after the JSON (any length is legal)."""
    import json

    header, offset, blobs = {}, 0, []
    for key, t in tensors.items():
        raw = t.contiguous().view(torch.uint8).numpy().tobytes()
        header[key] = {"dtype": {torch.float32: "F32", torch.bfloat16: "BF16"}[t.dtype], "shape": list(t.shape),
                       "data_offsets": [offset, offset + len(raw)]}
        offset += len(raw)
        blobs.append(raw)
    text = json.dumps(header).encode() + b" " * header_pad
    path.write_bytes(len(text).to_bytes(8, "little") + text + b"".join(blobs))


def test_misaligned_safetensors_data_is_copied_into_aligned_storage(tmp_path):
    want = torch.randn(64, 33)
    path = tmp_path / "m.safetensors"
    for pad in range(4):  # one of these leaves the data section at an odd address
        _raw_safetensors(path, {"w": want}, pad)
        opener = OpenFiles()
        stored = opener.describe(str(path))["w"]
        with opener.tensor(stored) as t:
            assert t.data_ptr() % 4 == 0 and torch.equal(t, want), pad


def test_a_file_shortened_after_its_header_was_read_is_refused(tmp_path):
    from llama_ref.loading import CheckpointError

    path = tmp_path / "m.safetensors"
    _raw_safetensors(path, {"a": torch.ones(100), "b": torch.ones(100)}, 0)
    opener = OpenFiles()
    stored = opener.describe(str(path))["b"]
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size - 8)
    with pytest.raises(CheckpointError, match="shorter than its header says"), opener.tensor(stored):
        pass


def test_legacy_pickle_files_load_exactly(ckpts, tmp_path, caplog):
    # Pre-1.6 torch.save format: read into memory (not mappable); its tensors are used as read.
    d = copy_ckpt(ckpts["hf-bin"], tmp_path / "ck")
    state = torch.load(d / "pytorch_model.bin", weights_only=True)
    torch.save(state, d / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    with caplog.at_level("WARNING"):
        model = load_pretrained(d)
    assert "legacy (non-zip)" in caplog.text
    toks = tokens(tiny_config())
    assert torch.equal(logits(model, toks), logits(reference_model(tiny_config()), toks))
