"""Reading tensor *descriptions* (name, shape, dtype) from checkpoint files without loading their
data, and handing out one tensor at a time from memory-mapped files.

Two file kinds: safetensors (HF) and PyTorch zip archives (HF ``pytorch_model*.bin``, Meta
``consolidated.NN.pth``). Both are memory-mapped, privately (copy-on-write), and tensors are handed
out as views of the mapped bytes: nothing is copied unless the loader needs another dtype or layout.
See :class:`OpenFiles` for what that asks of the files.
"""

from __future__ import annotations

import json
import logging
import math
import mmap
import pickle
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

import torch

from ..dtypes import SAFETENSORS_CODES, WEIGHT_DTYPES
from .errors import CheckpointError, fmt_shape
from .files import DuplicateKeyError, check_file, no_duplicate_keys, open_binary
from .pages import file_mappings, release_address_range, release_mmap_range

logger = logging.getLogger(__name__)

# Floating dtypes a Llama weight may be stored in (llama_ref.dtypes). Integer or packed/quantised codes
# are refused: they would need dequantisation this reference implementation does not do.
SAFETENSORS_DTYPES = SAFETENSORS_CODES
_MAX_HEADER = 100 * 1024 * 1024  # the safetensors library's own limit
_ZIP_MAGIC = b"PK\x03\x04"


@dataclass(frozen=True)
class StoredTensor:
    """One tensor as stored in one file."""

    file: str
    key: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    offset: int = 0  # byte offset in the file's data section (safetensors) or position (torch files)

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


# ---------------------------------------------------------------------------- safetensors
def read_safetensors_header(path: str) -> dict[str, StoredTensor]:
    """Parse and check a safetensors header: every tensor's dtype, shape and byte range.

    Done by hand (8-byte little-endian length + JSON) rather than via ``safe_open`` so a bad file
    gets a message naming the tensor at fault, and so truncation is caught before any data is read.
    """
    size = check_file(path, "safetensors file")
    with open_binary(path, "safetensors file") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise CheckpointError(f"{path}: only {size} bytes, too short for a safetensors file (truncated?)")
        header_len = int.from_bytes(prefix, "little")
        if header_len > _MAX_HEADER or 8 + header_len > size:
            raise CheckpointError(
                f"{path}: corrupt safetensors header: it claims {header_len} header bytes in a {size}-byte file "
                "(truncated or not a safetensors file)"
            )
        raw = f.read(header_len)
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=no_duplicate_keys)
    except DuplicateKeyError as e:
        raise CheckpointError(f"{path}: corrupt safetensors header: tensor {e.args[0]!r} is described twice") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: corrupt safetensors header: not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header: expected a JSON object")
    tensors = {}
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        tensors[key] = _header_entry(path, key, entry)
    _check_coverage(path, tensors, size - 8 - header_len)
    return tensors


def _header_entry(path: str, key: str, entry: Any) -> StoredTensor:
    if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= entry.keys():
        raise CheckpointError(f"{path}: corrupt safetensors header entry for tensor {key!r}: {entry!r}")
    code, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if code not in SAFETENSORS_DTYPES:
        raise CheckpointError(
            f"{path}: tensor {key!r} has dtype {code!r}, not a supported weight dtype "
            f"({', '.join(SAFETENSORS_DTYPES)})"
        )
    if not isinstance(shape, list) or not all(isinstance(s, int) and s >= 0 for s in shape):
        raise CheckpointError(f"{path}: tensor {key!r} has a corrupt shape {shape!r}")
    if (not isinstance(offsets, list) or len(offsets) != 2 or not all(isinstance(o, int) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1]):
        raise CheckpointError(f"{path}: tensor {key!r} has corrupt data_offsets {offsets!r}")
    stored = StoredTensor(path, key, tuple(shape), SAFETENSORS_DTYPES[code], offsets[0])
    if offsets[1] - offsets[0] != stored.nbytes:
        raise CheckpointError(
            f"{path}: tensor {key!r} ({code} {fmt_shape(shape)}) needs {stored.nbytes} bytes but its "
            f"data_offsets span {offsets[1] - offsets[0]}"
        )
    return stored


def _check_coverage(path: str, tensors: dict[str, StoredTensor], data_size: int) -> None:
    """Byte ranges must tile the data section exactly: a short file is a truncated download."""
    end = 0
    for t in sorted(tensors.values(), key=lambda t: t.offset):
        if t.offset != end:
            raise CheckpointError(f"{path}: corrupt safetensors header: tensor {t.key!r} starts at byte {t.offset}, "
                                  f"expected {end} (overlapping or gapped data)")
        end = t.offset + t.nbytes
        if end > data_size:
            raise CheckpointError(
                f"{path}: file is truncated: tensor {t.key!r} needs data up to byte {end} but the file holds "
                f"{data_size} data bytes; re-download or re-write it"
            )
    if end != data_size:
        raise CheckpointError(f"{path}: {data_size - end} unexpected trailing bytes after the last tensor (corrupt file)")


# ---------------------------------------------------------------------------- torch zip archives
def load_torch_file(path: str) -> dict[str, torch.Tensor]:
    """``torch.load`` a state dict memory-mapped and with ``weights_only`` (no code execution)."""
    with open_binary(path, "PyTorch checkpoint") as f:
        magic = f.read(4)
    zipped = magic == _ZIP_MAGIC
    if not zipped and not magic.startswith(b"\x80"):
        raise CheckpointError(f"{path}: not a PyTorch checkpoint (neither a zip archive nor a legacy pickle): "
                              "corrupt or not a weight file")
    if not zipped:
        # Pre-1.6 format: cannot be memory-mapped, so this file is read whole into memory.
        logger.warning("%s: legacy (non-zip) PyTorch format, loading it without mmap (uses more memory)", path)
    try:
        with _private_mmap():
            state = torch.load(path, map_location="cpu", mmap=zipped, weights_only=True)
    except PermissionError:
        raise PermissionError(f"cannot read PyTorch checkpoint {path}: permission denied") from None
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"{path}: refused to unpickle (it holds objects other than tensors): "
                              f"{str(e).splitlines()[0]}") from None
    except (RuntimeError, EOFError, ValueError, OSError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"{path}: cannot read PyTorch checkpoint, truncated or corrupt ({first})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: expected a dict of tensors, got {type(state).__name__}")
    return state


def describe_torch_state(path: str, state: dict) -> dict[str, StoredTensor]:
    tensors = {}
    for i, (key, value) in enumerate(state.items()):
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{path}: entry {key!r} is a {type(value).__name__}, expected a tensor "
                                  "(a state dict of weights)")
        if value.dtype not in WEIGHT_DTYPES:
            raise CheckpointError(f"{path}: tensor {key!r} has dtype {value.dtype}, not a supported weight dtype "
                                  "(float32, float16, bfloat16, float64)")
        tensors[key] = StoredTensor(path, key, tuple(value.shape), value.dtype, i)
    return tensors


@contextmanager
def _private_mmap() -> Iterator[None]:
    """``torch.load(mmap=True)`` maps with the process-wide default flags, which a user may have set to
    ``MAP_SHARED``: an in-place op on a weight would then write the checkpoint file. Force
    ``MAP_PRIVATE`` (copy-on-write) for this load. (Windows has neither flag; its maps are private.)"""
    flag = getattr(mmap, "MAP_PRIVATE", None)
    if flag is None:
        yield
        return
    with torch.serialization.set_default_mmap_options(flag):
        yield


# ---------------------------------------------------------------------------- open handles
class OpenFiles:
    """Checkpoint files, each memory-mapped once, handing out tensors that are views of the mapped bytes.

    Maps are private and copy-on-write (``mmap.ACCESS_COPY``; ``MAP_PRIVATE`` for ``torch.load``): an
    in-place op on a weight that is such a view copies the touched page into this process and never
    writes the file. A view keeps its map alive after :meth:`close` (the map goes when its last view
    does), so the loader can use a view as the weight itself (zero copy). The file must then stay as
    it is while the weights live: rewriting it in place changes the weights' pages not yet copied, and
    truncating it makes reading them crash the process (SIGBUS). Writers that write a new file and
    rename it over the old one (``huggingface_hub``, ``llama_ref.loading.synthetic``) are safe.

    Leaving a :meth:`tensor` block drops the pages read inside it from this process's resident set
    (:mod:`.pages`): they stay in the shared page cache, so a later read costs a minor fault, and the
    peak RSS of a load is what it allocates, not the size of the files it read.
    """

    def __init__(self) -> None:
        self._handles: dict[str, Any] = {}

    def __enter__(self) -> "OpenFiles":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Forget the handles. Never unmaps: views handed out keep their map (closing a map under a
        live view would make reading it crash)."""
        self._handles.clear()

    def describe(self, path: str) -> dict[str, StoredTensor]:
        """Every tensor of ``path``, from its header (safetensors) or its memory-mapped pickle (torch)."""
        if path.endswith(".safetensors"):
            return read_safetensors_header(path)
        return describe_torch_state(path, self._open(path).state)

    @contextmanager
    def tensor(self, stored: StoredTensor) -> Iterator[torch.Tensor]:
        """The stored tensor as a view of the mapped file (a copy only for a misaligned safetensors entry).
        The view stays valid after the block; leaving it drops the pages read from this process's RSS."""
        handle = self._open(stored.file)
        t = handle.get(stored)
        try:
            yield t
        finally:
            handle.release(stored, t)
            del t

    def _open(self, path: str) -> Any:
        if path not in self._handles:
            self._handles[path] = _SafetensorsMap(path) if path.endswith(".safetensors") else _TorchFile(path)
        return self._handles[path]


class _SafetensorsMap:
    """One safetensors file mapped whole; tensors are ``torch.frombuffer`` views (which hold the map)."""

    def __init__(self, path: str) -> None:
        if sys.byteorder != "little":
            raise CheckpointError(f"{path}: safetensors data are little-endian and are used as they are mapped; "
                                  "this loader needs a little-endian machine")
        self.path = path
        with open_binary(path, "safetensors file") as f:
            self.data_start = 8 + int.from_bytes(f.read(8), "little")
            try:
                self.mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
            except (OSError, ValueError) as e:
                raise CheckpointError(f"{path}: cannot memory-map the file: {e}") from None

    def _range(self, stored: StoredTensor) -> tuple[int, int]:
        start = self.data_start + stored.offset
        if start + stored.nbytes > len(self.mm):
            raise CheckpointError(f"{self.path}: cannot read tensor {stored.key!r}: the file is shorter than its "
                                  "header says (it changed while being loaded?)")
        return start, stored.nbytes

    def get(self, stored: StoredTensor) -> torch.Tensor:
        start, nbytes = self._range(stored)
        if nbytes == 0:
            return torch.empty(stored.shape, dtype=stored.dtype)
        if start % stored.dtype.itemsize:
            # The format does not promise aligned data; a misaligned view would be slow or unusable on
            # some CPUs, so this one tensor is copied (bytes into fresh, aligned storage).
            raw = torch.frombuffer(self.mm, dtype=torch.uint8, count=nbytes, offset=start)
            return raw.clone().view(stored.dtype).view(stored.shape)
        return torch.frombuffer(self.mm, dtype=stored.dtype, count=math.prod(stored.shape),
                                offset=start).view(stored.shape)

    def release(self, stored: StoredTensor, t: torch.Tensor) -> None:
        release_mmap_range(self.mm, *self._range(stored))


class _TorchFile:
    """One PyTorch archive, ``torch.load``-ed memory-mapped (private); tensors are views of that map."""

    def __init__(self, path: str) -> None:
        self.state = load_torch_file(path)
        # A legacy file is read, not mapped: its tensors lie in no mapping of the file and are never released.
        self.mappings = file_mappings(path)

    def get(self, stored: StoredTensor) -> torch.Tensor:
        try:
            return self.state[stored.key]
        except KeyError:
            raise CheckpointError(f"{stored.file}: cannot read tensor {stored.key!r}: not in the file") from None

    def release(self, stored: StoredTensor, t: torch.Tensor) -> None:
        if t.is_contiguous():
            release_address_range(t.data_ptr(), t.numel() * t.element_size(), self.mappings)
