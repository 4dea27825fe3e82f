"""Reading tensor *descriptions* (name, shape, dtype) from checkpoint files without loading their
data, and handing out one tensor at a time from memory-mapped files.

Two file kinds: safetensors (HF) and PyTorch zip archives (HF ``pytorch_model*.bin``, Meta
``consolidated.NN.pth``). Both are read through memory maps, so nothing is copied until a tensor
is materialised.
"""

from __future__ import annotations

import json
import logging
import math
import pickle
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

import torch

from ..dtypes import SAFETENSORS_CODES, WEIGHT_DTYPES
from .errors import CheckpointError, fmt_shape
from .files import DuplicateKeyError, check_file, no_duplicate_keys, open_binary

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
    mmap = magic == _ZIP_MAGIC
    if not mmap and not magic.startswith(b"\x80"):
        raise CheckpointError(f"{path}: not a PyTorch checkpoint (neither a zip archive nor a legacy pickle): "
                              "corrupt or not a weight file")
    if not mmap:
        # Pre-1.6 format: cannot be memory-mapped, so this file is read whole into memory.
        logger.warning("%s: legacy (non-zip) PyTorch format, loading it without mmap (uses more memory)", path)
    try:
        state = torch.load(path, map_location="cpu", mmap=mmap, weights_only=True)
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


# ---------------------------------------------------------------------------- open handles
class OpenFiles:
    """Checkpoint files opened on demand, each closed again after ``budget`` bytes were read from it.

    Pages of a memory map that have been read stay resident, and count in the process's RSS, until
    the map is closed. Holding a 10 GB shard open for the whole load would therefore add the whole
    shard to peak memory on top of the materialised copy; re-opening every ``budget`` bytes caps
    that at about ``budget``. (Re-opening is cheap: a header parse and an ``mmap`` call.)
    """

    def __init__(self, budget: int = 512 * 1024 * 1024) -> None:
        self.budget = budget
        self._handles: dict[str, Any] = {}
        self._read: dict[str, int] = {}

    def __enter__(self) -> "OpenFiles":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        for path in list(self._handles):
            self._close(path)

    def describe(self, path: str) -> dict[str, StoredTensor]:
        """Every tensor of ``path``, from its header (safetensors) or its memory-mapped pickle (torch)."""
        if path.endswith(".safetensors"):
            return read_safetensors_header(path)
        return describe_torch_state(path, self._open(path))

    @contextmanager
    def tensor(self, stored: StoredTensor) -> Iterator[torch.Tensor]:
        """The stored tensor as a view of the file; valid only inside the ``with`` block."""
        handle = self._open(stored.file)
        try:
            if stored.file.endswith(".safetensors"):
                t = handle.get_tensor(stored.key)
            else:
                t = handle[stored.key]
        except Exception as e:  # safetensors raises its own SafetensorError type
            raise CheckpointError(f"{stored.file}: cannot read tensor {stored.key!r}: {e}") from None
        try:
            yield t
        finally:
            del t
            self._read[stored.file] = self._read.get(stored.file, 0) + stored.nbytes
            if self._read[stored.file] >= self.budget:
                self._close(stored.file)

    def _open(self, path: str) -> Any:
        if path not in self._handles:
            if path.endswith(".safetensors"):
                from safetensors import safe_open

                check_file(path, "safetensors file")  # never hand a FIFO or directory to safe_open
                try:
                    handle = safe_open(path, framework="pt", device="cpu")
                    handle.__enter__()
                except Exception as e:
                    raise CheckpointError(f"{path}: cannot open safetensors file: {e}") from None
            else:
                handle = load_torch_file(path)
            self._handles[path] = handle
            self._read[path] = 0
        return self._handles[path]

    def _close(self, path: str) -> None:
        handle = self._handles.pop(path, None)
        self._read.pop(path, None)
        if handle is not None and hasattr(handle, "__exit__"):
            handle.__exit__(None, None, None)
