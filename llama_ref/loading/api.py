"""``load_pretrained``: detect the layout, check every tensor against the config, then materialise."""

from __future__ import annotations

import logging
import os
import re
import time
from contextlib import contextmanager
from typing import Iterator, Optional, Union

import torch

from ..compute_dtype import parse_compute_dtype
from ..devices import resolve_device
from ..dtypes import parse_dtype
from ..memory import check_memory
from ..model import Llama
from ..schedule import ScheduleSpec
from ..shapes import param_count, weight_bytes
from .detect import META, CheckpointFiles, find_checkpoint_files
from .errors import CheckpointError
from .hf_files import hf_name_map, plan_hf, read_hf_config
from .materialize import materialize
from .meta_files import missing_shard_hint, plan_meta, read_meta_config
from .plan import check_plan, stored_dtype
from .readers import OpenFiles

logger = logging.getLogger(__name__)

def load_pretrained(path: Union[str, os.PathLike], *, device: Union[str, torch.device] = "cpu",
                    dtype: Union[None, str, torch.dtype] = None, attn_kernel: str = "math",
                    schedule: ScheduleSpec = None, progress: Optional[bool] = None,
                    compute_dtype: Union[str, torch.dtype] = "auto", max_seq_len: Optional[int] = None,
                    requires_grad: bool = False, check_finite: bool = True) -> Llama:
    """Load a Llama checkpoint directory in any supported layout (see :func:`detect_format`).

    Args:
        device: where the weights go; ``"meta"`` checks the files and returns a shape-only model.
        dtype: storage dtype of the weights. ``None``: the checkpoint's own (HF ``config.json``
            ``torch_dtype``/``dtype``, else the dtype most bytes are stored in).
        compute_dtype: dtype of the activations; ``"auto"`` (default): the weight dtype where the device
            multiplies it natively (CUDA, CPUs with AMX/AVX512-BF16 for bf16), else fp32, the weights then
            upcast one matmul at a time (:mod:`llama_ref.compute_dtype`). An explicit dtype wins.
        progress: tqdm bar over bytes; ``None`` shows it only when stderr is a terminal.
        max_seq_len: RoPE table length; Meta's ``params.json`` does not store one (4096 is used).
        requires_grad: loaded weights are frozen by default. A forward outside ``torch.no_grad()``
            would otherwise keep every upcast fp32 weight alive for backward (~27 GB for 7B in bf16).
        check_finite: refuse a tensor holding NaN or inf, or overflowing ``dtype``
            (``NonFiniteWeightError``, naming the tensor and file). One ``aminmax`` pass over the
            stored bytes, the one read a load needs (about 1 s for 7B in bf16 here); ``False`` skips it.

    Weights stored in ``dtype`` are used straight from a private, copy-on-write memory map of the file
    (on CPU; zero copy: loading takes the time of the check, and their memory is the page cache's,
    shared, not this process's). The others (another dtype or device, HF's permuted q/k, Meta tensors
    split over shards) are copied once into fresh storage. An in-place op on a weight never writes the
    file, but **the file must stay as it is while the model lives**: truncating or rewriting it in place
    (``torch.save`` to the same path, ``truncate``) changes or crashes (SIGBUS) the weights that are
    mapped. Replacing it with a new file (write elsewhere, then rename) is safe.

    Every file header is read and every tensor name and shape checked against the config before
    any weight data is read; on any problem a ``CheckpointError`` (a ``ValueError``) or
    ``FileNotFoundError``/``PermissionError`` names the file and tensor, and no model is returned.
    Before any weight is allocated on a real device, the bytes needed are checked against the memory
    available there (``InsufficientMemoryError``). Nothing is written.
    """
    device = resolve_device(device, "device")
    dtype = parse_dtype(dtype, "dtype")
    compute_dtype = parse_compute_dtype(compute_dtype)
    for name, flag in (("requires_grad", requires_grad), ("check_finite", check_finite)):
        if not isinstance(flag, bool):
            raise ValueError(f"{name} must be True or False, got {flag!r}")
    if progress is not None and not isinstance(progress, bool):
        raise ValueError(f"progress must be True, False or None, got {progress!r}")
    files = find_checkpoint_files(path)
    t0 = time.perf_counter()
    with OpenFiles() as opener:
        config, config_dtype, plan, problems, source = _read_plan(files, opener)
        if max_seq_len is not None:
            config = config.replace(max_seq_len=max_seq_len)
        _check_layer_count(config, plan, files, source)
        target = dtype or config_dtype or stored_dtype(plan)
        # On the meta device: no storage is allocated until each tensor is materialised below.
        model = Llama(config, device="meta", dtype=target, attn_kernel=attn_kernel, schedule=schedule,
                      compute_dtype=compute_dtype)
        expected = {n: tuple(p.shape) for n, p in model.named_parameters()}
        if files.format == META:
            hint = missing_shard_hint(plan, expected, len(files.shards))
            if hint:
                problems = [hint, *problems]
        check_plan(plan, expected, source=source, config_file=files.config, extra_problems=problems,
                   hf_names=None if files.format == META else hf_name_map(expected))
        if device.type != "meta":
            check_memory(weight_bytes(config, target), device,
                         f"loading {files.root} ({param_count(config):,} weights in {target} and a RoPE table "
                         f"for max_seq_len={config.max_seq_len:,})")
            state = materialize(plan, opener, config, device=device, dtype=target, progress=progress,
                                desc=f"loading {os.path.basename(os.path.normpath(files.root))}",
                                check_finite=check_finite)
            model.load_state_dict(state, strict=True, assign=True)
            del state
    model.requires_grad_(requires_grad)
    model.init_buffers()  # RoPE table on the weights' device (it was built on "meta")
    logger.info("loaded %s checkpoint %s (%d tensors, %s) in %.1f s", files.format, files.root, len(plan),
                target, time.perf_counter() - t0)
    return model.eval()


def _read_plan(files: CheckpointFiles, opener: OpenFiles):
    """(config, dtype the config states or None, plan, problems so far, name of the tensor list)."""
    if files.format == META:
        with _config_file_errors(files.config):
            config = read_meta_config(files, opener)
        config_dtype = None
        plan, problems = plan_meta(files, opener)
        source = ", ".join(os.path.basename(s) for s in files.shards)
    else:
        with _config_file_errors(files.config):
            config, config_dtype = read_hf_config(files)
        plan, problems = plan_hf(files, opener, config)
        source = os.path.basename(files.index or files.weights)
    if not plan:
        raise CheckpointError(f"{files.root}: {source} hold(s) no Llama weight tensors"
                              + (f" ({problems[0]})" if problems else ""))
    return config, config_dtype, plan, problems, source


_LAYER_NAME = re.compile(r"^layers\.([0-9]+)\.")


def _check_layer_count(config, plan, files: CheckpointFiles, source: str) -> None:
    """A config claiming far more layers than the checkpoint holds is refused before the (meta) model
    is built: building it costs ~1.5 ms per layer, so ``n_layers=10**9`` would hang for weeks.
    Smaller mismatches go on to ``check_plan``, which lists every missing tensor by name."""
    stored = {int(m.group(1)) for p in plan if (m := _LAYER_NAME.match(p.name))}
    if config.n_layers > max(2 * len(stored), len(stored) + 64):
        raise CheckpointError(
            f"{files.config} says the model has {config.n_layers:,} layers but {source} hold(s) weights of "
            f"{len(stored)} layer(s); the config does not belong to these weights. Nothing was loaded."
        )


@contextmanager
def _config_file_errors(path: str) -> Iterator[None]:
    """One-line errors naming the config file for what its JSON reader does not catch (binary data,
    bad UTF-8, unreadable file). Messages of its own (missing fields, bad values) pass through."""
    try:
        yield
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{path} is not UTF-8 text (byte {e.start}); a binary or corrupt file?") from None
    except OSError as e:
        if e.filename is None:  # already one of our messages (it names its file)
            raise
        if isinstance(e, FileNotFoundError):
            raise FileNotFoundError(f"{e.filename} does not exist") from None
        if isinstance(e, PermissionError):
            raise PermissionError(f"cannot read {e.filename}: permission denied") from None
        raise CheckpointError(f"cannot read {e.filename}: {e.strerror or e}") from None


__all__ = ["CheckpointError", "load_pretrained", "parse_dtype"]
