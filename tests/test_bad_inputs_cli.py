"""Battery: every bad input to the ``llama-ref`` command gets exit status 2 and one line naming it.

One table, ``CASES``. Each case is an argument list (built by a function of a :class:`Ctx` when it
needs files), the exit status it must end with, and the substrings stderr must contain: the
offending value, option or file (``@PATH@`` stands for the file or folder the case made, see
``Ctx.path``). Every case also asserts the contract of ``counters.cli``: no traceback, nothing on
stdout, and for status 2 exactly one line on stderr. Every run is in-process (``cli.main``) under a
30 s alarm, so a hang (a FIFO opened for reading, a schedule expanded to 10**11 entries) fails the
test instead of stalling the suite.

``quick=True`` cases are refused *before any work*: the model is never resolved, nothing is
counted, analysed, measured or plotted (those functions are replaced by tripwires), and the run
takes well under a second (checked).

The machine's memory is never relied on for a refusal to happen: cases that need little memory
simulate it (``Ctx.low_memory``); the few that use the real amount skip on a machine that has it.
The Hub is never contacted (offline, with an empty cache).

To add a case: append ``CliCase("id", argv, status, "fragment", ...)``.
"""

from __future__ import annotations

import builtins
import itertools
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Union

import pytest
import torch

from counters import cli
from counters.commands import models
from counters.commands import count as count_command
from counters.commands import memory as memory_command
from counters.commands import common as common_command
from counters.commands import params as params_command
from counters.commands import schedules as schedules_command
from counters.studies import factory
from counters.studies import roofline_command
from counters.studies.hardware import available_cpus
from llama_ref import PRESETS
from llama_ref import memory as llama_memory
from llama_ref import guards
from llama_ref.config_files import MAX_JSON_BYTES
from llama_ref.hf import hf_config_dict

from _ckpt_helpers import copy_ckpt, edit_json, edit_safetensors, synth
from _deadline import deadline as _deadline

pytestmark = pytest.mark.usefixtures("single_thread")

TINY = PRESETS["tiny"]  # dim 64, 4 layers, 4 heads / 2 kv heads (head_dim 16), vocab 256, hidden 176, max_seq_len 128
TINY_HF = hf_config_dict(TINY)
TINY_META = {"dim": 64, "n_layers": 4, "n_heads": 4, "n_kv_heads": 2, "vocab_size": 256, "multiple_of": 16,
             "norm_eps": 1e-5, "rope_theta": 10000.0}
HAS_CUDA = torch.cuda.is_available()
PATH = "@PATH@"
Argv = Union[list, Callable[["Ctx"], list]]


@dataclass(frozen=True)
class CliCase:
    id: str
    argv: Argv
    status: int
    match: tuple[str, ...]
    quick: bool = False
    skip: Optional[Callable[[], Optional[str]]] = None

    def __init__(self, id: str, argv: Argv, status: int, *match: str, quick: bool = False, skip=None) -> None:
        object.__setattr__(self, "id", id)
        object.__setattr__(self, "argv", argv)
        object.__setattr__(self, "status", status)
        object.__setattr__(self, "match", match)
        object.__setattr__(self, "quick", quick)
        object.__setattr__(self, "skip", skip)


@dataclass
class Ctx:
    tmp: Path
    monkeypatch: pytest.MonkeyPatch
    ckpts: dict[str, Path]
    path: str = ""  # the file or folder the case made last: "@PATH@" in fragments
    _n: itertools.count = field(default_factory=itertools.count)

    def _new(self, name: str) -> Path:
        d = self.tmp / f"{next(self._n)}"
        d.mkdir()
        p = d / name
        self.path = str(p)
        return p

    def hf_dir(self, changes: Optional[dict] = None, drop: tuple = (), raw: Optional[bytes] = None) -> str:
        """A directory holding a config.json: tiny's, with ``changes``/``drop``, or ``raw`` bytes. ``@PATH@``
        is the config.json."""
        p = self._new("model") / "config.json"
        p.parent.mkdir()
        if raw is None:
            cfg = {k: v for k, v in TINY_HF.items() if k not in drop}
            cfg.update(changes or {})
            raw = json.dumps(cfg).encode()  # NaN/Infinity literals for float('nan')/inf, as Python's json writes
        p.write_bytes(raw)
        self.path = str(p)
        return str(p.parent)

    def meta_params(self, changes: Optional[dict] = None, drop: tuple = ()) -> str:
        p = self._new("params.json")
        p.write_text(json.dumps({**{k: v for k, v in TINY_META.items() if k not in drop}, **(changes or {})}))
        return str(p)

    def file(self, name: str, data: Union[bytes, str, dict, list, int]) -> str:
        p = self._new(name)
        if isinstance(data, str):
            data = data.encode()
        elif not isinstance(data, bytes):
            data = json.dumps(data).encode()
        p.write_bytes(data)
        return str(p)

    def folder(self, name: str) -> str:
        p = self._new(name)
        p.mkdir()
        return str(p)

    def fifo(self, name: str) -> str:
        p = self._new(name)
        os.mkfifo(p)
        return str(p)

    def sparse(self, name: str, size: int) -> str:
        p = self._new(name)
        with open(p, "wb") as f:
            f.truncate(size)  # no disk used
        return str(p)

    def ckpt(self, layout: str) -> Path:
        """A private copy of a tiny fp32 checkpoint, free to break. ``@PATH@`` is the directory."""
        d = copy_ckpt(self.ckpts[layout], self.tmp / f"{layout}-{next(self._n)}")
        self.path = str(d)
        return d

    def deny(self, path: str) -> str:
        """Reading ``path`` raises PermissionError (as root, chmod 000 would not stop a read)."""
        target = os.path.realpath(path)
        real_open = builtins.open

        def guarded_open(file, *args, **kwargs):
            if isinstance(file, (str, os.PathLike)) and os.path.realpath(file) == target:
                raise PermissionError(13, "Permission denied", os.fspath(file))
            return real_open(file, *args, **kwargs)

        self.monkeypatch.setattr(builtins, "open", guarded_open)
        return path

    def unwritable(self, directory: str) -> str:
        """Creating a file in ``directory`` fails as on a read-only mount (root ignores permission bits)."""
        target = os.path.realpath(directory)
        real = common_command.tempfile.TemporaryFile

        def temporary_file(*args, dir=None, **kwargs):
            if dir is not None and os.path.realpath(dir) == target:
                raise OSError(30, "Read-only file system")
            return real(*args, dir=dir, **kwargs)

        self.monkeypatch.setattr(common_command.tempfile, "TemporaryFile", temporary_file)
        return directory

    def low_memory(self, n_bytes: int) -> None:
        """Every memory check of the commands and the model sees ``n_bytes`` available."""
        for module in (models, factory, llama_memory):
            self.monkeypatch.setattr(module, "available_memory_bytes", lambda device: n_bytes)


def _memory_at_least(n: int) -> Callable[[], Optional[str]]:
    def check():
        avail = llama_memory.available_memory_bytes("cpu")
        return f"this machine has {avail} bytes available, enough for the case" if avail is None or avail >= n else None
    return check


def _no_cuda() -> Optional[str]:
    return "CUDA is available here" if HAS_CUDA else None


def _have(path: str) -> Callable[[], Optional[str]]:
    return lambda: None if os.path.exists(path) else f"{path} does not exist here"


def _count(*args: str) -> list:
    return ["count", *args]


def _roofline(*args: str) -> Callable[[Ctx], list]:
    """roofline with a fresh output folder and no plots (the cases are about refusals)."""
    return lambda c: ["roofline", *args, "--no-plot", "--out", str(c.tmp / "roofline-out")]


def _timings(data, *args: str) -> Callable[[Ctx], list]:
    def argv(c: Ctx) -> list:
        path = c.file("timings.json", data)
        return ["roofline", "tiny", "--tokens", "8", "--timings", path, "--no-plot", "--out", str(c.tmp / "o"), *args]
    return argv


def _config_as(c: Ctx, kind: str) -> str:
    """A model folder whose config.json is a folder or a broken symbolic link; ``@PATH@`` is the config.json."""
    folder = Path(c.folder("model"))
    config = folder / "config.json"
    if kind == "folder":
        config.mkdir()
    else:
        config.symlink_to(c.tmp / "gone")
    c.path = str(config)
    return str(folder)


def _nan_in_safetensors(c: Ctx) -> list:
    d = c.ckpt("hf-single")

    def mutate(t):
        t["model.norm.weight"] = t["model.norm.weight"].clone()
        t["model.norm.weight"][3] = float("nan")
    edit_safetensors(d / "model.safetensors", mutate)
    return _count(str(d), "--tokens", "4", "--counters", "analytic,hooks")


def _shape_mismatch(c: Ctx) -> list:
    d = c.ckpt("hf-single")
    edit_json(d / "config.json", lambda cfg: cfg.update(intermediate_size=192))
    return _count(str(d), "--tokens", "4")


def _missing_shard(c: Ctx) -> list:
    d = c.ckpt("hf-3-shards")
    (d / "model-00002-of-00003.safetensors").unlink()
    return _count(str(d), "--tokens", "4")


def _truncated_safetensors(c: Ctx) -> list:
    d = c.ckpt("hf-single")
    p = d / "model.safetensors"
    p.write_bytes(p.read_bytes()[:1000])
    return ["params", str(d)]


def _garbage_pth(c: Ctx) -> list:
    d = c.ckpt("meta-1-shard")
    (d / "consolidated.00.pth").write_bytes(b"PK\x03\x04 not a zip archive")
    return ["schedules", str(d)]


def _low_memory_count(c: Ctx) -> list:
    c.low_memory(10_000_000)
    return _count("tiny", "--device", "cpu", "--batch", "64", "--tokens", "128")


def _low_memory_train(c: Ctx) -> list:
    # tiny fits a forward of batch 8 x 64 in 3 MB but not a training step's gradients and kept activations
    c.low_memory(3_000_000)
    return _count("tiny", "--device", "cpu", "--batch", "8", "--tokens", "64", "--train")


def _memory(*args: str) -> list:
    return ["memory", *args]


def _low_memory_memory(c: Ctx) -> list:
    c.low_memory(3_000_000)
    return _memory("tiny", "--device", "cpu", "--batch", "8", "--tokens", "64", "--train")


def _tied_tp(c: Ctx) -> list:
    return _memory(c.hf_dir({"tie_word_embeddings": True}), "--tp", "2", "--tokens", "4")


def _low_memory_measure(c: Ctx) -> list:
    c.low_memory(10_000_000)
    return ["roofline", "tiny", "--hardware", "cpu", "--measure", "--tokens", "128", "--batch", "64", "--no-plot",
            "--out", str(c.tmp / "o")]


# ---------------------------------------------------------------------------- the table
CASES: list[CliCase] = [
    # --- the command line itself
    CliCase("no-command", [], 2, "the following arguments are required: COMMAND", quick=True),
    CliCase("unknown-command", ["bogus"], 2, "invalid choice: 'bogus'", quick=True),
    CliCase("missing-model", ["count"], 2, "llama-ref count: error", "MODEL", quick=True),
    CliCase("unknown-option", _count("tiny", "--layers", "1"), 2, "unrecognized arguments: --layers 1", quick=True),
    CliCase("tokens-not-int", _count("tiny", "--tokens", "abc"), 2, "--tokens: invalid int value: 'abc'", quick=True),
    CliCase("tokens-float", _count("tiny", "--tokens", "1.5"), 2, "invalid int value: '1.5'", quick=True),
    CliCase("tokens-5000-digits", _count("tiny", "--tokens", "9" * 5000), 2, "--tokens: invalid int value", quick=True),
    CliCase("format-choice", _count("tiny", "--format", "xml"), 2, "--format: invalid choice: 'xml'", quick=True),
    CliCase("dtype-choice", _count("tiny", "--dtype", "int8"), 2, "--dtype: invalid choice: 'int8'", quick=True),
    CliCase("kernel-choice", _count("tiny", "--kernel", "flash"), 2, "--kernel: invalid choice: 'flash'", quick=True),
    # argparse 3.11 turns "--opt=--" into an unchecked [] (past choices and type): a TypeError deep inside before
    CliCase("option-equals-dashdash", _roofline("tiny", "--hardware=--"), 2, "--hardware: invalid choice: '--'",
            quick=True),
    CliCase("int-option-equals-dashdash", _count("tiny", "--tokens=--"), 2, "--tokens: invalid int value: '--'",
            quick=True),
    # --- count: sizes, checked before anything is resolved or built
    CliCase("count-tokens-zero", _count("tiny", "--tokens", "0"), 2, "--tokens must be >= 1, got 0", quick=True),
    CliCase("count-tokens-negative", _count("tiny", "--tokens", "-5"), 2, "--tokens must be >= 1, got -5", quick=True),
    CliCase("count-cached-negative", _count("tiny", "--cached", "-1"), 2, "--cached must be >= 0, got -1", quick=True),
    CliCase("count-batch-zero", _count("tiny", "--batch", "0"), 2, "--batch must be >= 1, got 0", quick=True),
    # MAX_COUNT_ARG = 2**40 = 1,099,511,627,776
    CliCase("count-batch-over-cap", _count("tiny", "--batch", str(2**40 + 1)), 2,
            "--batch must be <= 1,099,511,627,776, got 1099511627777", quick=True),
    CliCase("count-tokens-10e30", _count("tiny", "--tokens", str(10**30)), 2, "--tokens must be <= 1,099,511,627,776",
            quick=True),
    CliCase("count-seed-negative", _count("tiny", "--seed", "-1"), 2, "--seed must be >= 0, got -1", quick=True),
    CliCase("count-counters-empty", _count("tiny", "--counters", ""), 2, "bad --counters ''", quick=True),
    CliCase("count-counters-bogus", _count("tiny", "--counters", "analytic,bogus"), 2, "bad --counters 'analytic,bogus'",
            quick=True),
    CliCase("count-counters-twice", _count("tiny", "--counters", "hooks,hooks"), 2, "a counter is listed twice", quick=True),
    CliCase("count-end-past-max-seq-len", _count("tiny", "--tokens", "100", "--cached", "29"), 2,
            "--cached 29 + --tokens 100 = 129 exceeds the model's max_seq_len 128"),
    # --- count: outputs, validated before any work
    CliCase("count-out-missing-folder", lambda c: _count("tiny", "--out", str(c.tmp / "no" / "such" / "x.json")), 2,
            "the folder", "no/such does not exist", quick=True),
    CliCase("count-out-under-a-file", lambda c: _count("tiny", "--out", c.file("a-file", "x") + "/x.json"), 2,
            f"{PATH} is a file, not a directory", quick=True),
    CliCase("count-out-is-a-folder", lambda c: _count("tiny", "--out", c.folder("d")), 2,
            f"--out {PATH} is a directory; give a file name", quick=True),
    CliCase("count-out-empty", _count("tiny", "--out", ""), 2, "--out is empty", quick=True),
    CliCase("count-out-unwritable", lambda c: _count("tiny", "--out", c.unwritable(c.folder("ro")) + "/x.json"), 2,
            f"the folder {PATH} is not writable (Read-only file system)", quick=True),
    CliCase("count-out-fifo-no-reader", lambda c: _count("tiny", "--tokens", "2", "--counters", "analytic", "--out",
                                                     c.fifo("out.json")), 2,
            f"--out {PATH} is a FIFO (named pipe) that nothing reads"),
    CliCase("count-out-disk-full", _count("tiny", "--tokens", "2", "--counters", "analytic", "--out", "/dev/full"), 2,
            "--out /dev/full: cannot write (No space left on device)", skip=_have("/dev/full")),
    # --- count: schedules, refused from their bounds
    CliCase("schedule-huge-range", _count("tiny", "--schedule", "0-99999999999"), 2,
            "layer index 99999999999 out of range for a model with 4 layers"),
    CliCase("schedule-huge-repeat", _count("tiny", "--schedule", "0x100000000"), 2,
            "'0x100000000' asks for more than 10,000 layer runs"),
    CliCase("schedule-many-digits", _count("tiny", "--schedule", "1" * 5000), 2, "is too large"),
    CliCase("schedule-empty", _count("tiny", "--schedule", ""), 2, "empty layer schedule ''"),
    CliCase("schedule-reversed", _count("tiny", "--schedule", "3-0"), 2, "bad layer range '3-0'"),
    CliCase("schedule-zero-repeats", _count("tiny", "--schedule", "0-3x0"), 2, "bad repeat count in '0-3x0'"),
    CliCase("schedule-unicode-digit", _count("tiny", "--schedule", "0,1,\u0663"), 2, "bad layer schedule item '\u0663'"),
    CliCase("schedule-preset-wrong-depth", _count("tiny", "--schedule", "skip-15"), 2, "'skip-15' is defined for 32-layer"),
    CliCase("schedule-unknown-name", _count("tiny", "--schedule", "baseline "), 2, "unknown layer schedule 'baseline '"),
    # --- count: devices
    CliCase("device-cuda", _count("tiny", "--device", "cuda"), 2, "--device cuda: no CUDA device available", skip=_no_cuda),
    CliCase("device-cuda-7", _count("tiny", "--device", "cuda:7"), 2, "--device cuda:7",
            skip=lambda: "8+ GPUs here" if HAS_CUDA and torch.cuda.device_count() > 7 else None),
    CliCase("device-garbage", _count("tiny", "--device", "tpu"), 2, "bad --device 'tpu'"),
    CliCase("device-bad-index", _count("tiny", "--device", "cuda:x"), 2, "bad --device 'cuda:x'"),
    CliCase("device-meta-index", _count("tiny", "--device", "meta:1"), 2, "bad --device 'meta:1'"),
    CliCase("device-empty", _count("tiny", "--device", ""), 2, "--device is empty"),
    # --- count: memory, computed exactly (the memory algebra) before anything is built
    # tiny, batch B=100000 x S=128 tokens, fp32, math kernel, no cache: the peak is layer 0's scores / sqrt(d).
    # Alive then: U = B*S*64*4 = 3,276,800,000 bytes each for h, the norm output, xq and the keys and values
    # repeated over the query heads (5U); xk and xv U/2 each; the scores and their quotient B*4*S*S*4 =
    # 26,214,400,000 each; the mask S*S*4 = 65,536: 72,089,665,536 bytes; plus what was there before: weights
    # 217,664*4 = 870,656, the RoPE table 128*8*8 = 8,192 and the tokens B*S*8 = 102,400,000: 72,192,944,384.
    CliCase("cpu-batch-100000", _count("tiny", "--device", "cpu", "--batch", "100000", "--tokens", "128"), 2,
            "--device cpu: counting this forward needs about 67.23 GiB (72,192,944,384 bytes)",
            "activations and temporaries 67.14 GiB (72,089,665,536 bytes) at the peak (forward, layers.0, div.Tensor)",
            "of RAM is available", "use --device meta", skip=_memory_at_least(73_000_000_000)),
    CliCase("cpu-low-memory", _low_memory_count, 2, "--device cpu: counting this forward needs about",
            "but only 9.54 MiB (10,000,000 bytes) of RAM is available"),
    CliCase("cpu-low-memory-train", _low_memory_train, 2, "--device cpu: counting this training step needs about",
            "gradients 850.25 KiB (870,656 bytes)", "but only 2.86 MiB (3,000,000 bytes) of RAM is available"),
    # 70B fp32 random weights: 68,976,648,192 x 4 = 275,906,592,768 bytes (the RoPE table is not a weight)
    CliCase("cpu-70b", _count("llama-2-70b", "--device", "cpu"), 2, "weights 256.96 GiB (275,906,592,768 bytes)",
            "use --device meta", skip=_memory_at_least(276_000_000_000)),
    # --- count on meta: torch's limit of 2**63 - 1 bytes per tensor
    # logits: 2**40 x 4096 x 32000 = 144,115,188,075,855,872,000 elements
    CliCase("meta-logits-beyond-torch", _count("llama-2-7b", "--batch", str(2**40), "--tokens", "4096",
                                               "--counters", "analytic,hooks"), 2,
            "the logits would hold 144,115,188,075,855,872,000 elements of 4 bytes", "2**63 - 1 bytes"),
    # a 2**31 - 1 position model: a prefill of 2,147,483,640 tokens has a (2147483640 x 2147483640) x 4 heads score tensor
    CliCase("meta-prefill-beyond-torch",
            lambda c: _count(c.hf_dir({"max_position_embeddings": 2**31 - 1}), "--tokens", "4", "--cached",
                             "2147483640", "--device", "meta", "--counters", "analytic,hooks"), 2,
            "a forward of 1 sequence(s) x 2,147,483,640 tokens", "the attention scores would hold"),
    # hidden_size 2**40: wq is 2**40 x 2**40 = 2**80 = 1,208,925,819,614,629,174,706,176 elements
    CliCase("meta-weights-beyond-torch",
            lambda c: _count(c.hf_dir({"hidden_size": 2**40, "intermediate_size": 2**40, "head_dim": None}),
                             "--tokens", "4"), 2,
            "attention.wq.weight would hold 1,208,925,819,614,629,174,706,176 elements"),
    # --- memory: sizes, training options, the search, checked before any work
    CliCase("memory-tokens-zero", _memory("tiny", "--tokens", "0"), 2, "--tokens must be >= 1, got 0", quick=True),
    CliCase("memory-batch-zero", _memory("tiny", "--batch", "0"), 2, "--batch must be >= 1, got 0", quick=True),
    CliCase("memory-cached-negative", _memory("tiny", "--cached", "-2"), 2, "--cached must be >= 0, got -2", quick=True),
    CliCase("memory-tp-zero", _memory("tiny", "--tp", "0"), 2, "--tp must be >= 1, got 0", quick=True),
    CliCase("memory-optimizer-without-train", _memory("tiny", "--optimizer", "sgd"), 2,
            "--optimizer describe a training step: add --train", quick=True),
    CliCase("memory-recompute-without-train", _memory("tiny", "--recompute"), 2,
            "--recompute describe a training step: add --train", quick=True),
    CliCase("memory-optimizer-choice", _memory("tiny", "--train", "--optimizer", "adam"), 2,
            "--optimizer: invalid choice: 'adam'", quick=True),
    CliCase("memory-train-cached", _memory("tiny", "--train", "--cached", "4"), 2,
            "--cached must be 0, got 4", quick=True),
    CliCase("memory-train-last-logits", _memory("tiny", "--train", "--logits", "last"), 2,
            "--logits last is what generation computes", quick=True),
    CliCase("memory-max-both", _memory("tiny", "--max-batch", "--max-tokens", "--device-memory", "100"), 2,
            "--max-batch and --max-tokens: choose one", quick=True),
    CliCase("memory-hardware-and-bytes", _memory("tiny", "--max-batch", "--hardware", "h100-sxm", "--device-memory",
                                                 "100"), 2, "--hardware and --device-memory", quick=True),
    CliCase("memory-device-memory-units", _memory("tiny", "--max-batch", "--device-memory", "80GB"), 2,
            "bad --device-memory '80GB': give a whole number of bytes", quick=True),
    CliCase("memory-device-memory-zero", _memory("tiny", "--max-batch", "--device-memory", "0"), 2,
            "--device-memory must be at least 1 byte, got '0'", quick=True),
    CliCase("memory-hardware-without-search", _memory("tiny", "--hardware", "h100-sxm"), 2,
            "add --max-batch or --max-tokens", quick=True),
    CliCase("memory-hardware-choice", _memory("tiny", "--max-batch", "--hardware", "tpu-v5"), 2,
            "--hardware: invalid choice: 'tpu-v5'", quick=True),
    CliCase("memory-out-is-a-folder", lambda c: _memory("tiny", "--out", c.folder("d")), 2,
            f"--out {PATH} is a directory; give a file name", quick=True),
    CliCase("memory-search-on-meta", _memory("tiny", "--max-batch", "--device", "meta"), 2,
            "--max-batch/--max-tokens need the memory to fill"),
    CliCase("memory-end-past-max-seq-len", _memory("tiny", "--tokens", "100", "--cached", "29"), 2,
            "--cached 29 + --tokens 100 = 129 exceeds the model's max_seq_len 128"),
    CliCase("memory-tp-indivisible", _memory("tiny", "--tp", "3"), 2,
            "cannot split tiny across 3 tensor-parallel ranks"),
    CliCase("memory-tp-tied", _tied_tp, 2, "tied embeddings (tie_word_embeddings=True) cannot be tensor-parallel"),
    CliCase("memory-tp-on-cpu", _memory("tiny", "--tp", "2", "--device", "cpu"), 2,
            "--tp 2 measures each rank on meta"),
    CliCase("memory-device-garbage", _memory("tiny", "--device", "tpu"), 2, "bad --device 'tpu'"),
    CliCase("memory-unknown-model", _memory("no-such-model"), 2, "unknown model 'no-such-model'"),
    # tiny, batch 8 x 64, a training step on the CPU: the weights and gradients alone are 2 x 870,656 bytes
    CliCase("memory-low-memory-train", _low_memory_memory, 2, "--device cpu: counting this training step needs about",
            "but only 2.86 MiB (3,000,000 bytes) of RAM is available"),
    # --- config.json: wrong types, values, JSON, file kinds; every message names the file and the field
    CliCase("cfg-string-int", lambda c: _count(c.hf_dir({"hidden_size": "64"})), 2, PATH,
            "hidden_size must be an int, got '64'"),
    CliCase("cfg-bool-int", lambda c: _count(c.hf_dir({"num_hidden_layers": True})), 2, PATH,
            "num_hidden_layers must be an int, got True"),
    CliCase("cfg-null-int", lambda c: _count(c.hf_dir({"vocab_size": None})), 2, PATH, "vocab_size must be an int, got None"),
    CliCase("cfg-float-int", lambda c: _count(c.hf_dir({"intermediate_size": 176.0})), 2, PATH,
            "intermediate_size must be an int, got 176.0"),
    CliCase("cfg-nan", lambda c: _count(c.hf_dir({"rms_norm_eps": float("nan")})), 2, PATH,
            "rms_norm_eps must be a positive finite number, got nan"),
    CliCase("cfg-infinity", lambda c: _count(c.hf_dir({"rope_theta": float("inf")})), 2, PATH,
            "rope_theta must be a positive finite number, got inf"),
    CliCase("cfg-negative", lambda c: _count(c.hf_dir({"rope_theta": -1.0})), 2, PATH,
            "rope_theta must be a positive finite number, got -1.0"),
    CliCase("cfg-zero-kv-heads", lambda c: _count(c.hf_dir({"num_key_value_heads": 0})), 2, PATH,
            "num_key_value_heads must be positive, got 0"),
    CliCase("cfg-kv-heads-not-divisor", lambda c: _count(c.hf_dir({"num_key_value_heads": 3})), 2, PATH,
            "n_heads=4 is not divisible by n_kv_heads=3"),
    CliCase("cfg-odd-head-dim", lambda c: _count(c.hf_dir({"head_dim": 7})), 2, PATH, "head_dim=7 must be even"),
    CliCase("cfg-missing-field", lambda c: _count(c.hf_dir(drop=("vocab_size",))), 2, PATH,
            "missing required field(s) vocab_size"),
    CliCase("cfg-model-type", lambda c: _count(c.hf_dir({"model_type": "mistral"})), 2, PATH,
            "model_type is 'mistral', only 'llama' is supported"),
    CliCase("cfg-400-digit-int", lambda c: _count(c.hf_dir(raw=json.dumps(TINY_HF).replace(
        '"vocab_size": 256', '"vocab_size": ' + "7" * 400).encode())), 2, PATH,
            "vocab_size must be at most 2**63 - 1", "an int of 400 digits"),
    CliCase("cfg-5000-digit-int", lambda c: _count(c.hf_dir(raw=json.dumps(TINY_HF).replace(
        '"vocab_size": 256', '"vocab_size": ' + "7" * 5000).encode())), 2, PATH, "not usable JSON", "4300 digits"),
    CliCase("cfg-max-position-2-63", lambda c: _count(c.hf_dir({"max_position_embeddings": 2**63})), 2, PATH,
            "max_seq_len must be at most 2**63 - 1", "9223372036854775808"),
    CliCase("cfg-rope-scaling-vs-parameters", lambda c: _count(c.hf_dir({
        "rope_scaling": {"rope_type": "linear", "factor": 2.0},
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}})), 2, PATH,
            "rope_scaling {'rope_type': 'linear', 'factor': 2.0} and rope_parameters", "disagree"),
    CliCase("cfg-rope-type-vs-type", lambda c: _count(c.hf_dir({
        "rope_scaling": {"rope_type": "linear", "type": "llama3", "factor": 2.0}})), 2, PATH,
            "rope_type='linear' and type='llama3'"),
    CliCase("cfg-rope-theta-twice", lambda c: _count(c.hf_dir({
        "rope_scaling": None, "rope_parameters": {"rope_type": "default", "rope_theta": 500000.0}})), 2, PATH,
            "rope_theta=10000.0 disagrees with rope_parameters.rope_theta=500000.0"),
    CliCase("cfg-rope-yarn", lambda c: _count(c.hf_dir({"rope_scaling": {"rope_type": "yarn", "factor": 2.0}})), 2,
            PATH, "rope_type 'yarn' is not supported"),
    CliCase("cfg-rope-not-object", lambda c: _count(c.hf_dir({"rope_scaling": "linear"})), 2, PATH,
            "rope_scaling must be an object or null, got 'linear'"),
    CliCase("cfg-rope-factor-nan", lambda c: _count(c.hf_dir({"rope_scaling": {"rope_type": "linear",
                                                                              "factor": float("nan")}})), 2,
            PATH, "rope_scaling.factor must be a positive finite number, got nan"),
    CliCase("cfg-truncated", lambda c: _count(c.hf_dir(raw=json.dumps(TINY_HF).encode()[:40])), 2, PATH,
            "not valid JSON"),
    CliCase("cfg-empty", lambda c: _count(c.hf_dir(raw=b"")), 2, PATH, "not valid JSON"),
    CliCase("cfg-binary", lambda c: _count(c.hf_dir(raw=b"\x89PNG\r\n\x1a\n\xff\xfe\x00")), 2, PATH, "not UTF-8 text"),
    CliCase("cfg-utf16", lambda c: _count(c.hf_dir(raw=json.dumps(TINY_HF).encode("utf-16"))), 2, PATH,
            "not UTF-8 text"),
    CliCase("cfg-list", lambda c: _count(c.hf_dir(raw=b"[1, 2]")), 2, PATH, "expected a JSON object, got list"),
    CliCase("cfg-deep-nesting", lambda c: _count(c.hf_dir(raw=b"[" * 100_000 + b"]" * 100_000)), 2, PATH,
            "nested too deeply"),
    CliCase("cfg-duplicate-key", lambda c: _count(c.hf_dir(raw=json.dumps(TINY_HF)[:-1].encode()
                                                           + b', "hidden_size": 32}')), 2, PATH,
            "the key 'hidden_size' appears more than once"),
    CliCase("cfg-too-large", lambda c: _count(c.sparse("config.json", MAX_JSON_BYTES + 1)), 2, PATH,
            "too large to be config.json"),
    CliCase("cfg-is-a-folder", lambda c: _count(_config_as(c, "folder")), 2,
            f"{PATH} is a directory, expected the config.json file"),
    CliCase("cfg-fifo", lambda c: _count(str(Path(c.fifo("config.json")).parent)), 2, PATH, "a FIFO (named pipe)"),
    CliCase("cfg-fifo-given", lambda c: _count(c.fifo("config.json")), 2, PATH, "not a regular file but a FIFO"),
    CliCase("cfg-device-file", _count("/dev/null"), 2, "/dev/null is not a regular file", skip=_have("/dev/null")),
    CliCase("cfg-denied", lambda c: _count(c.deny(str(Path(c.hf_dir()) / "config.json"))), 2, PATH,
            "permission denied"),
    CliCase("cfg-broken-symlink", lambda c: _count(_config_as(c, "broken-link")), 2, PATH, "broken symbolic link"),
    CliCase("folder-without-config", lambda c: _count(c.folder("empty")), 2, PATH,
            "directory has neither config.json (Hugging Face) nor params.json (Meta)"),
    # --- Meta params.json
    CliCase("params-string-int", lambda c: _count(c.meta_params({"dim": "64"})), 2, PATH, "dim must be an int, got '64'"),
    CliCase("params-vocab-unknown", lambda c: _count(c.meta_params({"vocab_size": -1})), 2, PATH,
            "leaves vocab_size to the tokenizer", "pass --vocab-size"),
    CliCase("params-vocab-contradiction", lambda c: _count(c.meta_params(), "--vocab-size", "100"), 2, PATH,
            "vocab_size 256 does not match the given vocab_size=100"),
    CliCase("params-nan", lambda c: _count(c.meta_params({"norm_eps": float("nan")})), 2, PATH,
            "norm_eps must be a positive finite number, got nan"),
    CliCase("params-ffn-multiplier-overflow", lambda c: _count(c.meta_params({"ffn_dim_multiplier": 1e308})), 2, PATH,
            "ffn_dim_multiplier=1e+308 makes the FFN width inf"),
    CliCase("params-unknown-key", lambda c: _count(c.meta_params({"rope_scaling": 8.0})), 2, PATH,
            "unknown key 'rope_scaling'"),
    CliCase("params-scaling-without-flag", lambda c: _count(c.meta_params({"rope_scaling_factor": 8.0})), 2, PATH,
            "rope_scaling_factor given without use_scaled_rope=true"),
    # --- checkpoints through the commands
    CliCase("ckpt-nan-weight", _nan_in_safetensors, 2, "'model.norm.weight'", "model.safetensors", "1 NaN"),
    CliCase("ckpt-shape-mismatch", _shape_mismatch, 2, f"checkpoint {PATH} does not match config.json",
            "model.layers.0.mlp.gate_proj.weight"),
    CliCase("ckpt-missing-shard", _missing_shard, 2, "model-00002-of-00003.safetensors", "is missing"),
    CliCase("ckpt-truncated-safetensors", _truncated_safetensors, 2, f"{PATH}/model.safetensors",
            "corrupt safetensors header"),
    CliCase("ckpt-garbage-pth", _garbage_pth, 2, f"{PATH}/consolidated.00.pth", "cannot read PyTorch checkpoint"),
    CliCase("ckpt-vocab-contradiction", lambda c: _count(str(c.ckpt("meta-1-shard")), "--vocab-size", "100"), 2,
            f"--vocab-size 100 contradicts the checkpoint in {PATH} (vocab_size 256)"),
    CliCase("ckpt-weights-given-as-model", lambda c: _count(str(c.ckpt("hf-single") / "model.safetensors")), 2,
            f"{PATH}/model.safetensors: not UTF-8 text"),
    # --- models by name
    CliCase("unknown-model", _count("no-such-model"), 2, "unknown model 'no-such-model'"),
    CliCase("empty-model", _count(""), 2, "unknown model ''"),
    CliCase("revision-on-a-preset", _count("tiny", "--revision", "main"), 2,
            "--revision applies to a Hub model id (org/name), not to 'tiny'"),
    CliCase("vocab-contradicts-preset", _count("tiny", "--vocab-size", "0"), 2, "--vocab-size 0 contradicts preset tiny"),
    CliCase("hub-not-cached-offline", ["params", "org/name"], 2, "hub model 'org/name'", "not in the local cache"),
    CliCase("hub-empty-revision", ["params", "org/name", "--revision", ""], 2, "revision '' is not"),
    # --- params and schedules
    CliCase("params-weights-beyond-torch", lambda c: ["params", c.hf_dir({"hidden_size": 2**40, "head_dim": None})], 2,
            "beyond torch's limit of 2**63 - 1 bytes"),
    CliCase("schedules-measure-tokens-alone", ["schedules", "tiny", "--measure-tokens", "1,2"], 2,
            "--measure-tokens applies to --measure only"),
    CliCase("schedules-measure-tokens-three", ["schedules", "tiny", "--measure", "--measure-tokens", "1,2,3"], 2,
            "--measure-tokens needs two integers N1,N2, got '1,2,3'"),
    CliCase("schedules-measure-tokens-empty", ["schedules", "tiny", "--measure", "--measure-tokens", ""], 2,
            "--measure-tokens needs two integers N1,N2, got ''"),
    CliCase("schedules-measure-tokens-order", ["schedules", "tiny", "--measure", "--measure-tokens", "5,3"], 2,
            "0 < N1 < N2 <= max_seq_len (128), got '5,3'"),
    CliCase("schedules-measure-tokens-past-max", ["schedules", "tiny", "--measure", "--measure-tokens", "16,129"], 2,
            "0 < N1 < N2 <= max_seq_len (128), got '16,129'"),
    CliCase("schedules-measure-tokens-digits", ["schedules", "tiny", "--measure", "--measure-tokens", "1," + "9" * 5000],
            2, "--measure-tokens needs two integers N1,N2"),
    CliCase("schedules-measure-beyond-torch",
            lambda c: ["schedules", c.hf_dir({"intermediate_size": 2**60}), "--measure"], 2,
            "feed_forward.w1.weight would hold", "beyond torch's limit"),
    # --- roofline: sizes and options, refused before any work
    CliCase("roofline-tokens-zero", _roofline("tiny", "--tokens", "0"), 2, "--tokens must be >= 1, got 0", quick=True),
    CliCase("roofline-tp-without-link", _roofline("tiny", "--tp", "2", "--tokens", "8"), 2,
            "--tp 2: give the link the ranks communicate over", quick=True),
    CliCase("roofline-link-without-tp", _roofline("tiny", "--link-bandwidth", "5", "--tokens", "8"), 2,
            "describe tensor-parallel ranks: add --tp N", quick=True),
    CliCase("roofline-link-bandwidth-nan", _roofline("tiny", "--tp", "2", "--link-bandwidth", "nan", "--tokens", "8"),
            2, "link bandwidth must be a positive number of GB/s, got 'nan'", quick=True),
    CliCase("roofline-link-latency-negative", _roofline("tiny", "--tp", "2", "--link-bandwidth", "5", "--tokens", "8",
                                                        "--link-latency-us", "-1"), 2,
            "--link-latency-us must be a finite number of microseconds >= 0", quick=True),
    CliCase("roofline-tp-not-dividing", _roofline("tiny", "--tp", "3", "--link-bandwidth", "5", "--tokens", "8"), 2,
            "cannot split tiny across 3 tensor-parallel ranks"),
    CliCase("count-tp-not-dividing", _count("tiny", "--tp", "3"), 2, "cannot split tiny across 3 tensor-parallel ranks",
            quick=True),
    CliCase("count-tp-with-train", _count("tiny", "--tp", "2", "--train"), 2, "--train with --tp", quick=True),
    CliCase("roofline-cached-negative", _roofline("tiny", "--cached", "-3"), 2, "--cached must be >= 0, got -3",
            quick=True),
    CliCase("roofline-batch-over-cap", _roofline("tiny", "--batch", str(2**40 + 1)), 2,
            "--batch must be <= 1,099,511,627,776", quick=True),
    CliCase("roofline-warmup-negative", _roofline("tiny", "--warmup", "-1"), 2, "--warmup must be >= 0, got -1",
            quick=True),
    CliCase("roofline-repeats-zero", _roofline("tiny", "--repeats", "0"), 2, "--repeats must be >= 1, got 0", quick=True),
    CliCase("roofline-repeats-huge", _roofline("tiny", "--repeats", str(10**9)), 2, "--repeats must be <= 10,000",
            quick=True),
    CliCase("roofline-threads-zero", _roofline("tiny", "--threads", "0"), 2, "--threads must be >= 1, got 0", quick=True),
    CliCase("roofline-threads-beyond-cpus", _roofline("tiny", "--threads", str(available_cpus() + 1)), 2,
            f"--threads must be <= {available_cpus():,}", quick=True),
    CliCase("roofline-measure-and-timings", lambda c: ["roofline", "tiny", "--measure", "--timings", "t.json",
                                                       "--out", str(c.tmp / "o")], 2,
            "--measure and --timings both give measured times: choose one", quick=True),
    CliCase("roofline-end-past-max-seq-len", _roofline("tiny", "--tokens", "128", "--cached", "1"), 2,
            "--cached 1 + --tokens 128 = 129 exceeds the model's max_seq_len 128"),
    CliCase("roofline-layers-zero", _roofline("tiny", "--layers", "0"), 2, "--layers must be >= 1, got 0"),
    CliCase("roofline-layers-beyond-model", _roofline("tiny", "--layers", "5"), 2, "--layers must be <= 4, got 5"),
    CliCase("roofline-schedule-huge", _roofline("tiny", "--tokens", "4", "--schedule", "0-99999999999"), 2,
            "layer index 99999999999 out of range"),
    CliCase("roofline-hardware-choice", _roofline("tiny", "--hardware", "tpu-v9"), 2, "--hardware: invalid choice",
            quick=True),
    CliCase("roofline-measure-no-cuda", _roofline("tiny", "--hardware", "h100-sxm", "--measure", "--tokens", "4"), 2,
            "--measure with --hardware h100-sxm needs a CUDA device", skip=_no_cuda),
    # tiny, batch 100000 x 128 tokens in fp32: ~166 GiB (weights, KV cache, prefill-free activations)
    CliCase("roofline-measure-too-big", _roofline("tiny", "--hardware", "cpu", "--measure", "--batch", "100000",
                                                  "--tokens", "128"), 2,
            "measuring tiny (4 layers) in torch.float32 on cpu with batch 100000", "GiB are available", "--layers K",
            skip=_memory_at_least(180_000_000_000)),
    CliCase("roofline-measure-low-memory", _low_memory_measure, 2, "needs about", "0.0 GiB are available"),
    # --- roofline: the output folder, validated before any work
    CliCase("roofline-out-is-a-file", lambda c: ["roofline", "tiny", "--out", c.file("f", "x")], 2,
            f"--out {PATH} is a file, not a directory", quick=True),
    CliCase("roofline-out-under-a-file", lambda c: ["roofline", "tiny", "--out", c.file("f", "x") + "/sub"], 2,
            f"{PATH} is a file, not a directory", quick=True),
    CliCase("roofline-out-empty", ["roofline", "tiny", "--out", ""], 2, "--out is empty", quick=True),
    CliCase("roofline-out-unwritable", lambda c: ["roofline", "tiny", "--out", c.unwritable(c.folder("ro"))], 2,
            f"--out {PATH}: the folder {PATH} is not writable", quick=True),
    # --- roofline --timings: the file, refused before any work, and its contents
    CliCase("timings-missing", lambda c: ["roofline", "tiny", "--timings", str(c.tmp / "nope.json"),
                                          "--out", str(c.tmp / "o")], 2, "nope.json: no such file", quick=True),
    CliCase("timings-folder", lambda c: ["roofline", "tiny", "--timings", c.folder("t"), "--out", str(c.tmp / "o")], 2,
            f"--timings {PATH} is a directory, not a file", quick=True),
    CliCase("timings-fifo", lambda c: ["roofline", "tiny", "--timings", c.fifo("t.json"), "--out", str(c.tmp / "o")], 2,
            f"--timings {PATH} is a FIFO (named pipe), not a regular file", quick=True),
    CliCase("timings-device", lambda c: ["roofline", "tiny", "--timings", "/dev/null", "--out", str(c.tmp / "o")], 2,
            "--timings /dev/null is a device or socket", quick=True, skip=_have("/dev/null")),
    CliCase("timings-binary", _timings(b"\xff\xfe\x00\x01"), 2, PATH, "not UTF-8 text"),
    CliCase("timings-truncated", _timings('{"layers": [{"module": "block"'), 2, PATH, "not valid JSON"),
    CliCase("timings-deep", _timings("[" * 100_000 + "]" * 100_000), 2, PATH, "nested too deeply"),
    CliCase("timings-5000-digits", _timings('{"layers": [{"module": "block", "position": ' + "1" * 5000 + "}]}"), 2,
            PATH, "not usable JSON"),
    CliCase("timings-too-large", lambda c: ["roofline", "tiny", "--tokens", "8", "--timings",
                                            c.sparse("t.json", MAX_JSON_BYTES + 1), "--no-plot", "--out",
                                            str(c.tmp / "o")], 2, PATH, "too large"),
    CliCase("timings-denied", lambda c: ["roofline", "tiny", "--tokens", "8", "--timings",
                                         c.deny(c.file("t.json", {"layers": []})), "--no-plot", "--out",
                                         str(c.tmp / "o")], 2, PATH, "permission denied"),
    CliCase("timings-a-number", _timings(42), 2, PATH, "expected a 'layers' list of {position, module, measured_s}"),
    CliCase("timings-layers-an-object", _timings({"layers": {"module": "block"}}), 2, PATH, "expected a 'layers' list"),
    CliCase("timings-entry-not-object", _timings({"layers": [1]}), 2, f"{PATH}: layers[0] is 1, expected an object"),
    CliCase("timings-unknown-module", _timings({"layers": [{"module": "attention.bogus", "measured_s": 1.0}]}), 2,
            f"{PATH}: layers[0].module is 'attention.bogus', not a row name"),
    CliCase("timings-negative-position", _timings({"layers": [{"module": "block", "position": -1, "measured_s": 1.0}]}),
            2, f"{PATH}: layers[0].position is -1"),
    CliCase("timings-bool-position", _timings({"layers": [{"module": "block", "position": True, "measured_s": 1.0}]}),
            2, "layers[0].position is True"),
    CliCase("timings-string-seconds", _timings({"layers": [{"module": "block", "position": 0, "measured_s": "1 ms"}]}),
            2, f"{PATH}: layers[0].measured_s is '1 ms'"),
    CliCase("timings-nan-seconds", _timings('{"layers": [{"module": "block", "position": 0, "measured_s": NaN}]}'), 2,
            "layers[0].measured_s is nan"),
    CliCase("timings-1e400-seconds", _timings('{"layers": [{"module": "block", "position": 0, "measured_s": 1e400}]}'),
            2, "layers[0].measured_s is inf"),
    CliCase("timings-huge-int-seconds", _timings('{"layers": [{"module": "block", "position": 0, "measured_s": 1'
                                                 + "0" * 400 + "}]}"), 2, "layers[0].measured_s is 1000"),
    CliCase("timings-negative-seconds", _timings({"layers": [{"module": "block", "position": 0, "measured_s": -0.5}]}),
            2, "layers[0].measured_s is -0.5"),
    CliCase("timings-phases-not-list", _timings({"phases": {"prefill": {}}}), 2, PATH,
            "'phases' must be a list of objects"),
    CliCase("timings-no-matching-phase", _timings({"phases": [{"n_tokens": 8, "n_cached": 0, "attn_kernel": "sdpa",
                                                               "layers": []}]}), 2,
            f"{PATH}: no timings for N=8 C=0 kernel math (file has: N=8 C=0 sdpa)"),
    CliCase("timings-position-beyond-schedule", _timings({"layers": [{"module": "block", "position": 40,
                                                                      "measured_s": 1.0}]}), 2,
            f"{PATH}: 1 timed row(s) match no row of this roofline (4 layer runs, --level layer): (position 40, block)"),
    CliCase("timings-other-level", _timings({"layers": [{"module": "block", "position": 0, "measured_s": 1.0}]},
                                            "--level", "module"), 2, "--level module): (position 0, block)"),
]


# ---------------------------------------------------------------------------- runner
@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bad-cli-ckpts")
    out = {}
    for name, fmt, shards in (("hf-single", "hf", 1), ("hf-3-shards", "hf", 3), ("meta-1-shard", "meta", 1)):
        synth().write_checkpoint("tiny", root / name, fmt, shards=shards, dtype=torch.float32, seed=0)
        out[name] = root / name
    return out


class Hang(BaseException):
    """A run took longer than its deadline. A BaseException, so that the CLI's own error handling cannot
    turn it into an exit status (a TimeoutError is an OSError: it would pass for bad input)."""


def deadline(seconds: int):
    return _deadline(seconds, Hang, "the command")


class WorkStarted(BaseException):
    """Raised by a tripwire: work began before the input was refused. A BaseException, so that the CLI's
    exception handling cannot turn it into an exit status."""


def forbid_work(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every step that does work (resolving or building the model, counting, analysing, measuring,
    plotting) raises :class:`WorkStarted`."""
    def tripwire(name):
        def trip(*args, **kwargs):
            raise WorkStarted(name)
        return trip

    for module, names in ((count_command, ("resolve_model", "build_model", "crosscheck", "choose_device")),
                          (memory_command, ("resolve_model", "build_model", "check", "measure_for", "choose_device",
                                            "largest_fitting")),
                          (params_command, ("resolve_model",)), (schedules_command, ("resolve_model",)),
                          (roofline_command, ("resolve_model", "analyze", "get_hardware", "measure",
                                              "plot_roofline", "plot_macs_vs_context", "load_timings"))):
        for name in names:
            monkeypatch.setattr(module, name, tripwire(f"{module.__name__}.{name}"))


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """No case may reach the network: the Hub is offline and its cache empty."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub-cache"))


def run_cli(argv: list, capsys) -> tuple[int, str, str, float]:
    """``cli.main(argv)`` in-process: (status, stdout, stderr, seconds). Torch's thread count is restored
    (``roofline --threads`` sets it process-wide)."""
    threads = torch.get_num_threads()
    t0 = time.perf_counter()
    try:
        with deadline(30):
            status = cli.main(argv)
    finally:
        torch.set_num_threads(threads)
    seconds = time.perf_counter() - t0
    out, err = capsys.readouterr()
    return status, out, err, seconds


def assert_contract(status: int, out: str, err: str) -> None:
    """What every run of the CLI must do, whatever the input."""
    assert status in cli.EXIT_STATUSES and status != cli.EXIT_INTERNAL, f"status {status}: {err}"
    assert "Traceback" not in err, err
    if status == cli.EXIT_BAD_INPUT:
        lines = err.strip().splitlines()
        assert len(lines) == 1, f"status 2 needs exactly one line on stderr, got {len(lines)}:\n{err}"
        assert lines[0].startswith("llama-ref"), lines[0]


def test_case_ids_are_unique():
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids)), sorted(i for i in ids if ids.count(i) > 1)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: CliCase, ckpts, tmp_path, monkeypatch, capsys, offline_hub):
    reason = case.skip() if case.skip else None
    if reason:
        pytest.skip(reason)
    ctx = Ctx(tmp_path, monkeypatch, ckpts)
    argv = case.argv(ctx) if callable(case.argv) else list(case.argv)
    if case.quick:
        forbid_work(monkeypatch)
    capsys.readouterr()
    status, out, err, seconds = run_cli(argv, capsys)
    assert status == case.status, f"exit status {status}, expected {case.status}; stderr: {err}"
    assert_contract(status, out, err)
    assert out == "", f"a refused run printed to stdout: {out[:500]}"
    for fragment in case.match:
        fragment = fragment.replace(PATH, ctx.path)
        assert fragment in err, f"{fragment!r} not in stderr: {err}"
    if case.quick:
        assert seconds < 1.0, f"refused after {seconds:.2f} s; input checks must come before any work"


# ---------------------------------------------------------------------------- what the refusals protect
def test_count_chooses_meta_for_a_forward_too_large_for_ram(capsys, offline_hub, monkeypatch):
    """Without --device, a forward whose activations do not fit is counted on meta (same counts), not refused."""
    for module in (models, llama_memory):
        monkeypatch.setattr(module, "available_memory_bytes", lambda device: 10_000_000)
    status, out, err, _ = run_cli(["count", "tiny", "--batch", "64", "--tokens", "128", "--counters", "analytic,hooks",
                                   "--format", "json"], capsys)
    assert status == cli.EXIT_OK, err
    doc = json.loads(out)
    assert doc["device"] == "meta" and doc["agree"]
    assert "forward" in doc["device_reason"]
    # the same count on the CPU, where it fits: identical totals
    monkeypatch.undo()
    status, out, err, _ = run_cli(["count", "tiny", "--batch", "64", "--tokens", "128", "--counters", "analytic,hooks",
                                   "--format", "json", "--device", "cpu"], capsys)
    assert status == cli.EXIT_OK, err
    assert json.loads(out)["totals"] == doc["totals"]


def test_a_2_31_position_model_counts_and_plots(tmp_path, capsys, offline_hub):
    """max_position_embeddings 2**31 - 1 is a size, not an allocation: the model is built (its RoPE table
    covers 4096 positions, growing on demand), counted on the CPU and on meta, and its roofline plotted."""
    cfg = tmp_path / "long"
    cfg.mkdir()
    (cfg / "config.json").write_text(json.dumps({**TINY_HF, "max_position_embeddings": 2**31 - 1}))
    for device in ("cpu", "meta"):
        status, out, err, _ = run_cli(["count", str(cfg), "--tokens", "5", "--cached", "3", "--device", device,
                                       "--counters", "analytic,hooks", "--format", "json"], capsys)
        assert status == cli.EXIT_OK, err
        doc = json.loads(out)
        assert doc["agree"] and doc["config"]["max_seq_len"] == 2**31 - 1
    # a decode step after a million positions, on meta: the cache and the positions are shapes only.
    # (At C = 2**31 - 2 the uncounted prefill of C tokens would need a (C x C) score tensor per head, beyond
    # torch's 2**63 - 1 bytes even on meta: refused, see meta-prefill-beyond-torch; the roofline below is
    # analytic and has no prefill.)
    status, out, err, _ = run_cli(["count", str(cfg), "--tokens", "1", "--cached", "1000000", "--device", "meta",
                                   "--counters", "analytic,hooks", "--format", "json"], capsys)
    assert status == cli.EXIT_OK, err
    # MACs of one token attending to 1,000,001 positions: the linear part of tiny per token
    # + 2 x 4 heads x 16 x 1,000,001 x 4 layers for QK^T and attention x V
    doc = json.loads(out)
    linear = sum(r["macs"]["analytic"] for r in doc["layers"] if r["module"] != "attention.core")
    assert doc["totals"]["hooks"]["macs"] == linear + 2 * 4 * 16 * 1_000_001 * 4
    status, out, err, _ = run_cli(["roofline", str(cfg), "--tokens", "1", "--cached", str(2**31 - 2),
                                   "--out", str(tmp_path / "plots")], capsys)
    assert status == cli.EXIT_OK, err
    assert (tmp_path / "plots" / "macs_vs_context.png").stat().st_size > 0


def test_the_forward_memory_is_one_function():
    """count, the roofline's --measure and the studies take the memory of a forward from the memory algebra."""
    from llama_ref.memory_algebra import MemoryRequest, memory

    config = PRESETS["llama-2-7b"]
    # 7B fp32 weights: 6,738,415,616 x 4 = 26,953,662,464 bytes; RoPE table 4096 x 64 x 8 = 2,097,152 bytes
    need = models.forward_need(config, "cpu", 4, batch=1, seqlen=4)
    assert need.weights == 26_953_662_464 and need.rope_table == 2_097_152 and need.kv_cache == 0
    # roofline --measure sets up a cache of N positions for the timed forward
    assert factory.estimate_forward_memory(config, batch=1, seqlen=4, start_pos=0, n_runs=32, dtype_bytes=4) ==\
        memory(MemoryRequest(config, batch=1, seqlen=4, weight_dtype=torch.float32)).peak
    # a KV cache for C + N positions: 2 x 1 x 2048 positions x 4096 x 4 bytes x 32 runs = 2,147,483,648 bytes; the
    # prefill of C tokens comes first, and its peak is the larger
    step = models.forward_need(config, "cpu", 4, batch=1, seqlen=1, start_pos=2047)
    assert step.kv_cache == 2_147_483_648
    prefill = memory(MemoryRequest(config, seqlen=2047, cache_positions=2048, weight_dtype=torch.float32))
    assert step.peak == prefill.peak > memory(MemoryRequest(config, seqlen=1, start_pos=2047,
                                                            weight_dtype=torch.float32)).peak


# ---------------------------------------------------------------------------- the study scripts' commands
# scripts/validate_gpu.py and scripts/bench.py (counters.studies.validate.main, counters.studies.bench.main):
# exit 2 and one line naming the argument, before any model is built or anything measured (which takes minutes).
_V = ["--model", "tiny", "--device", "cpu", "--dtype", "fp32", "--no-hf", "--no-measure-peaks"]
_B = ["--quick", "--no-meta", "--no-counting", "--device", "cpu"]
SCRIPT_CASES = [
    ("validate-prefill-negative", "validate", [*_V, "--prefill-tokens", "-1"], "--prefill-tokens must be >= 1, got -1"),
    ("validate-cached-negative", "validate", [*_V, "--decode-cached", "-1"], "--decode-cached must be >= 0, got -1"),
    ("validate-batch-zero", "validate", [*_V, "--batch", "0"], "--batch must be >= 1, got 0"),
    ("validate-warmup-negative", "validate", [*_V, "--warmup", "-1"], "--warmup must be >= 0, got -1"),
    ("validate-repeats-zero", "validate", [*_V, "--repeats", "0"], "--repeats must be >= 1, got 0"),
    ("validate-seed-negative", "validate", [*_V, "--seed", "-1"], "--seed must be >= 0, got -1"),
    # no counter or kernel at all would check nothing and still print PASSED
    ("validate-no-counters", "validate", [*_V, "--counters", ""], "bad --counters ''"),
    ("validate-no-kernels", "validate", [*_V, "--kernels", " , "], "bad --kernels ' , '"),
    ("validate-counter-twice", "validate", [*_V, "--counters", "hooks,hooks"], "bad --counters 'hooks,hooks'"),
    ("validate-hardware", "validate", [*_V, "--hardware", "cpu"], "bad --hardware 'cpu'"),
    ("validate-device-empty", "validate", [*_V, "--device", ""], "--device is empty"),
    ("validate-device-meta", "validate", [*_V, "--device", "meta"], "bad --device 'meta'"),
    ("validate-out-under-a-file", "validate", lambda c: [*_V, "--out", c.file("f", "x") + "/o"],
     f"{PATH} is a file, not a directory"),
    ("bench-threads-zero", "bench", [*_B, "--threads", "0"], "--threads must be >= 1, got 0"),
    ("bench-threads-negative", "bench", [*_B, "--threads", "-3"], "--threads must be >= 1, got -3"),
    ("bench-repeats-zero", "bench", [*_B, "--repeats", "0"], "--repeats must be >= 1, got 0"),
    ("bench-repeats-negative", "bench", [*_B, "--repeats", "-1"], "--repeats must be >= 1, got -1"),
    ("bench-meta-tokens", "bench", [*_B, "--meta-tokens", "5000"], "--meta-tokens must be <= 4,096, got 5000"),
    ("bench-meta-counters-empty", "bench", [*_B, "--meta-counters", ""], "bad --meta-counters ''"),
    ("bench-out-under-a-file", "bench", lambda c: [*_B, "--out", c.file("f", "x") + "/o"],
     f"{PATH} is a file, not a directory"),
]


@pytest.mark.parametrize("case", SCRIPT_CASES, ids=[c[0] for c in SCRIPT_CASES])
def test_bad_script_input(case, tmp_path, monkeypatch, capsys):
    from counters.studies import bench, validate

    _id, script, argv, fragment = case
    ctx = Ctx(tmp_path, monkeypatch, {})
    argv = argv(ctx) if callable(argv) else list(argv)
    module = {"validate": validate, "bench": bench}[script]
    work = {"validate": ("resolve_model", "run_validation", "build_model"),
            "bench": ("run_device", "bench_meta", "measure_device")}[script]
    for name in work:
        monkeypatch.setattr(module, name, lambda *a, _n=name, **k: (_ for _ in ()).throw(WorkStarted(_n)))
    if "--out" not in argv:
        argv += ["--out", str(tmp_path / "out")]
    capsys.readouterr()
    t0 = time.perf_counter()
    with deadline(30):
        status = module.main(argv)
    seconds = time.perf_counter() - t0
    out, err = capsys.readouterr()
    assert status == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and fragment.replace(PATH, ctx.path) in lines[0], err
    assert out == "" and seconds < 1.0


def test_a_forward_too_large_for_memory_is_refused_before_it_runs(monkeypatch):
    """The entry points (check_inputs, generate; the commands estimate before building): activations estimated
    beyond the memory available are refused before the first op, with the estimate and the memory named,
    instead of an allocator error or the OOM killer. Simulated: 10,000,000 bytes available."""
    from llama_ref import InsufficientMemoryError, Llama, check_inputs, generate

    monkeypatch.setattr(llama_memory, "available_memory_bytes", lambda device: 10_000_000)
    model = Llama(TINY).eval()
    tokens = torch.zeros(1024, 128, dtype=torch.long)
    # B=1024 x S=128, fp32, no cache: the peak is layer 0's scores / sqrt(d); it allocates beyond the weights,
    # buffers and tokens: U = B*S*64*4 = 33,554,432 for h, the norm output, xq and the repeated keys and values
    # (5U), U/2 for xk and xv, the scores and their quotient B*4*S*S*4 = 268,435,456 each, the mask S*S*4 = 65,536:
    # 738,263,040 bytes
    need = 738_263_040
    b = guards.forward_bytes(model, 1024, 128)
    assert b.peak - b.start == need
    with pytest.raises(InsufficientMemoryError) as info:
        check_inputs(model, tokens)
    message = str(info.value)
    assert "a forward of 1,024 sequence(s) x 128 tokens after 0 cached" in message
    assert llama_memory.format_bytes(need) in message and "10,000,000 bytes" in message
    assert "forward, layers.0, div.Tensor" in message
    # generate's prefill (S=100) runs with its KV cache: xk and xv stay bound while the cache is written, the keys
    # and values are repeated from the cache: U = 1024*100*64*4 = 26,214,400; 6U + 2 x 1024*4*100*100*4 + the mask
    # 100*100*4 = 157,286,400 + 327,680,000 + 40,000 = 485,006,400 bytes
    prefill = 485_006_400
    assert guards.forward_bytes(model, 1024, 100, kv_cache=True).peak -\
        guards.forward_bytes(model, 1024, 100, kv_cache=True).start == prefill
    with pytest.raises(InsufficientMemoryError, match="1,024 sequence\\(s\\) x 100 tokens") as info:
        generate(model, [[1] * 100] * 1024, 4)
    assert llama_memory.format_bytes(prefill) in str(info.value) and model.caches is None
    # a forward below the threshold is not even looked at: it runs
    check_inputs(model, torch.zeros(2, 8, dtype=torch.long))
    with torch.no_grad():
        assert model(torch.zeros(2, 8, dtype=torch.long)).shape == (2, 8, 256)


def test_setup_cache_counts_bytes_against_torch_limit():
    """torch's limit is on bytes: 2**50 rows x 128 positions x 2 kv heads x 16 = 2**62 elements is fewer than
    2**63, but 2**64 bytes in fp32 (a RuntimeError from deep inside torch before, even on meta)."""
    from llama_ref import Llama

    model = Llama(TINY, device="meta")
    with pytest.raises(ValueError, match=r"4,611,686,018,427,387,904 elements of 4 bytes exceeds torch's limit"):
        model.setup_cache(2**50, 128)
    # half the rows in fp16: 2**61 elements x 2 bytes = 2**62 bytes, within the limit (meta stores nothing)
    model.setup_cache(2**49, 128, dtype=torch.float16)
    assert model.caches[0].cache_k.shape == (2**49, 128, 2, 16)


# ---------------------------------------------------------------------------- the other scripts' mains
# scripts/compare_hf.py, tp_check.py, load_7b_check.py, make_synthetic_checkpoint.py (llama_ref.checks.*,
# llama_ref.loading.synthetic) and bench.py / validate_gpu.py's argument parsing: bad input is exit 2 and one
# line, like the CLI; an argument error too (no usage block), and a config the reader refuses (no traceback).
_CONFLICTING_ROPE = {"rope_scaling": {"rope_type": "linear", "factor": 2.0},
                     "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}}
MAIN_CASES = [
    ("compare-hf-gelu", "compare_hf", lambda c: [c.hf_dir({"hidden_act": "gelu"})], "hidden_act='gelu'", PATH),
    ("compare-hf-conflicting-rope", "compare_hf", lambda c: [c.hf_dir(_CONFLICTING_ROPE)], "disagree", PATH),
    ("compare-hf-atol-inf", "compare_hf", ["tiny", "--atol", "inf"], "--atol", "positive finite", "'inf'"),
    ("compare-hf-atol-nan", "compare_hf", ["tiny", "--atol", "nan"], "--atol", "'nan'"),
    ("compare-hf-init-std-negative", "compare_hf", ["tiny", "--init-std", "-1"], "--init-std", "'-1'"),
    ("compare-hf-bogus-option", "compare_hf", ["tiny", "--bogus"], "unrecognized arguments: --bogus"),
    ("tp-check-tol-negative", "tp_check", ["ckpt", "--tol", "-1"], "--tol", "non-negative finite", "'-1'"),
    ("tp-check-tol-nan", "tp_check", ["ckpt", "--tol", "nan"], "--tol", "'nan'"),
    ("tp-check-tol-inf", "tp_check", ["ckpt", "--tol", "inf"], "--tol", "'inf'"),
    ("tp-check-batch-zero", "tp_check", ["ckpt", "--batch", "0"], "--batch", "got 0"),
    ("tp-check-dtype", "tp_check", ["ckpt", "--dtype", "fp7"], "--dtype='fp7'"),
    ("tp-check-compute-dtype", "tp_check", ["ckpt", "--compute-dtype", "int8"], "--compute-dtype='int8'"),
    ("tp-check-device", "tp_check", ["ckpt", "--device", "tpu"], "--device", "'tpu'"),
    ("load-check-missing", "load_check", lambda c: [str(c.tmp / "nothing-here")], "nothing-here",
     "no such directory"),
    ("load-check-tokens-zero", "load_check", lambda c: [str(c.tmp), "--tokens", "0"], "--tokens", "got 0"),
    ("load-check-dtype", "load_check", lambda c: [str(c.tmp), "--dtype", "fp7"], "--dtype='fp7'"),
    ("synthetic-out-under-a-file", "synthetic", lambda c: ["tiny", c.file("f", "x") + "/o", "--no-progress"], PATH),
    ("synthetic-bad-preset", "synthetic", lambda c: ["llama-9b", str(c.tmp / "o")], "invalid choice: 'llama-9b'"),
    ("bench-bogus-option", "bench", ["--bogus"], "unrecognized arguments: --bogus"),
    ("validate-bad-dtype", "validate", ["--dtype", "fp7"], "invalid choice: 'fp7'"),
]


@pytest.mark.parametrize("case", MAIN_CASES, ids=[c[0] for c in MAIN_CASES])
def test_bad_input_to_a_script_main(case, tmp_path, monkeypatch, capsys):
    from counters.studies import bench, validate
    from llama_ref.checks import compare_hf, load_check, tp_check
    from llama_ref.loading import synthetic

    _id, name, argv, *fragments = case
    ctx = Ctx(tmp_path, monkeypatch, {})
    argv = argv(ctx) if callable(argv) else list(argv)
    module = {"compare_hf": compare_hf, "tp_check": tp_check, "load_check": load_check, "synthetic": synthetic,
              "bench": bench, "validate": validate}[name]
    # tripwires: nothing is built, loaded or joined before the input is refused (tp_check: no rank joins)
    work = {"compare_hf": ("random_hf_model",), "tp_check": ("init_torchrun",), "load_check": ("drop_page_cache",),
            "synthetic": (), "bench": ("run_device",), "validate": ("run_validation",)}[name]
    for attr in work:
        monkeypatch.setattr(module, attr, lambda *a, _n=attr, **k: (_ for _ in ()).throw(WorkStarted(_n)))
    capsys.readouterr()
    with deadline(30):
        try:
            status = module.main(argv)
        except SystemExit as e:  # argparse's own exit, after its one line
            status = e.code
    out, err = capsys.readouterr()
    assert status == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment.replace(PATH, ctx.path) in lines[0], (fragment, err)
    assert out == ""
