"""Property-based fuzz of the ``llama-ref`` command: whatever the arguments and files, every run ends
with a documented exit status, never a traceback, and a refusal is one line.

Argument lists are generated from the real parsers (``cli.build_parser()``): every subcommand, every
option by its own spellings, with values drawn per option from hostile pools (negatives, zero, huge
and 5000-digit ints, floats, empty strings, unicode, paths to odd files: folders, FIFOs, binary and
truncated JSON, device files, broken links). A second property mutates ``config.json`` and
``params.json`` (wrong types, NaN/Infinity, missing keys, huge sizes, conflicting RoPE settings,
corrupt bytes) and runs every command on the result.

The property: the exit status is 0 or 2 (1 and 3 would mean counters that disagree or uncounted work
on our own model, and 4 a bug: all are failures here), no "Traceback" on stderr, and status 2 is
exactly one line on stderr starting with ``llama-ref``. A run of ``count --format json`` that succeeds
prints a report whose counters agree.

Cheap and deterministic, for CI: derandomized (no example database), a fixed number of examples per
property (280 in all), in-process runs (``cli.main``), tiny models or the meta device, two counters by
default (``analytic,hooks``; the fuzz may pick others), the available memory simulated (2 GiB, so a
machine with more RAM never builds anything large), the CPU's peaks not measured (a fixed stand-in),
the Hub offline, and a 60 s alarm per run so that a hang fails instead of stalling. Values that are
valid but only slow (10,000 layer runs, 10,000 timing repeats) are left out of the pools on purpose.
"""

from __future__ import annotations

import io
import itertools
import json
import math
import os
import shutil
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from counters import cli
from counters.commands import models
from counters.studies import factory, roofline_command
from counters.studies.hardware import Hardware
from llama_ref import PRESETS
from llama_ref import memory as llama_memory
from llama_ref.hf import hf_config_dict

from _ckpt_helpers import synth
from test_bad_inputs_cli import deadline

pytestmark = pytest.mark.usefixtures("single_thread")

SIMULATED_MEMORY = 2 * 2**30
HUB_MODELS = ("org/name", "meta-llama/Llama-2-7b-hf", "a/b/c")
FAKE_CPU = Hardware(name="cpu", peak_flops=1e11, mem_bw=1e10, dtype="fp32", source="fuzz stand-in", measured=True)
TINY_HF = hf_config_dict(PRESETS["tiny"])
TINY_META = {"dim": 64, "n_layers": 4, "n_heads": 4, "n_kv_heads": 2, "vocab_size": 256, "multiple_of": 16,
             "norm_eps": 1e-5, "rope_theta": 10000.0}


# LLAMA_REF_FUZZ_SCALE=K: K times the examples, drawn at random (a longer hunt by hand; CI runs the fixed set).
_SCALE = int(os.environ.get("LLAMA_REF_FUZZ_SCALE", "0") or 0)


def _settings(n: int):
    return settings(max_examples=n * max(_SCALE, 1), derandomize=not _SCALE, database=None, deadline=None,
                    print_blob=True, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                                            HealthCheck.data_too_large])


# ---------------------------------------------------------------------------- the files to point at
class Zoo:
    """Odd and ordinary files, made once per module under one folder."""

    def __init__(self, root: Path):
        self.root = root
        self._n = itertools.count()
        z = root / "zoo"
        z.mkdir()
        self.tiny_hf = self._config_dir(z / "tiny-hf", "config.json", TINY_HF)
        self.tiny_meta = self._config_dir(z / "tiny-meta", "params.json", TINY_META)
        self.meta_no_vocab = self._config_dir(z / "meta-no-vocab", "params.json", {**TINY_META, "vocab_size": -1})
        self.long_hf = self._config_dir(z / "long-hf", "config.json", {**TINY_HF, "max_position_embeddings": 2**31 - 1})
        self.checkpoint = z / "ckpt"
        synth().write_checkpoint("tiny", self.checkpoint, "hf", shards=1, dtype=torch.float32, seed=0)
        (z / "empty-dir").mkdir()
        (z / "binary").write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe\x00\x01")
        (z / "truncated.json").write_text(json.dumps(TINY_HF)[:50])
        (z / "list.json").write_text("[1, 2, 3]")
        (z / "deep.json").write_text("[" * 50_000 + "]" * 50_000)
        (z / "empty.json").write_bytes(b"")
        os.mkfifo(z / "fifo")
        (z / "fifo-dir").mkdir()
        os.mkfifo(z / "fifo-dir" / "config.json")
        (z / "dir-config").mkdir()
        (z / "dir-config" / "config.json").mkdir()
        (z / "broken-link").symlink_to(z / "gone")
        (z / "a-file").write_text("x")
        timings = {"layers": [{"position": 0, "module": "block", "measured_s": 0.5},
                              {"position": None, "module": "output", "measured_s": 0.1}]}
        (z / "timings.json").write_text(json.dumps(timings))
        (z / "timings-phases.json").write_text(json.dumps({"phases": [
            {"n_tokens": 4, "n_cached": 0, "attn_kernel": "math", "layers": timings["layers"]},
            {"n_tokens": 1, "n_cached": 4, "attn_kernel": "sdpa", "layers": timings["layers"]}]}))
        (z / "timings-bad.json").write_text('{"layers": [{"position": 0, "module": "block", "measured_s": NaN}]}')
        (z / "timings-far.json").write_text(json.dumps({"layers": [{"position": 99, "module": "block",
                                                                    "measured_s": 1.0}]}))
        self.z = z

    @staticmethod
    def _config_dir(d: Path, name: str, data: dict) -> str:
        d.mkdir()
        (d / name).write_text(json.dumps(data))
        return str(d)

    def fresh(self) -> Path:
        """A new empty folder for one run's outputs."""
        d = self.root / "runs" / str(next(self._n))
        d.mkdir(parents=True)
        return d

    def models(self) -> tuple[list[str], list[str]]:
        z = self.z
        plausible = ["tiny"] * 6 + ["llama-2-7b", "llama-3.2-1b", "code-llama-7b", "tinyllama-1.1b", "llama-2-70b",
                                    self.tiny_hf, self.tiny_hf + "/config.json", self.tiny_meta,
                                    self.tiny_meta + "/params.json", self.long_hf, str(self.checkpoint)]
        hostile = [self.meta_no_vocab, "", " ", "no-such-model", "TINY", "tiny ", *HUB_MODELS, "../..", "/",
                   "\u00e9\u00e8/\u00fc", "\U0001f999", "a" * 5000, "/dev/null", str(z / "empty-dir"), str(z / "binary"),
                   str(z / "truncated.json"), str(z / "list.json"), str(z / "deep.json"), str(z / "empty.json"),
                   str(z / "fifo"), str(z / "fifo-dir"), str(z / "dir-config"), str(z / "broken-link"),
                   str(z / "a-file") + "/x", str(self.checkpoint / "model.safetensors")]
        return plausible, hostile

    def out_files(self, run: Path) -> tuple[list[str], list[str]]:
        z = self.z
        return ([str(run / "out.txt"), str(run / "\u00e9.json"), "/dev/null"],
                [str(run / "no" / "such" / "out.txt"), str(z / "a-file") + "/out.txt", str(z / "empty-dir"), "", " ",
                 "/dev/full", str(z / "fifo")])

    def out_dirs(self, run: Path) -> tuple[list[str], list[str]]:
        z = self.z
        return ([str(run / "plots"), str(run / "deep" / "er"), str(run)],
                [str(z / "a-file"), str(z / "a-file") + "/sub", "", "/dev/null", str(z / "fifo")])

    def timings(self) -> tuple[list[str], list[str]]:
        z = self.z
        return ([str(z / "timings.json"), str(z / "timings-phases.json")],
                [str(z / n) for n in ("timings-bad.json", "timings-far.json", "binary", "truncated.json", "list.json",
                                      "deep.json", "empty.json", "fifo", "empty-dir", "broken-link", "no-such.json")]
                + ["/dev/null", ""])


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    return Zoo(tmp_path_factory.mktemp("cli-fuzz"))


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory):
    """For the whole module: the Hub offline with an empty cache, the working directory a scratch folder
    (default outputs land there), 2 GiB of memory as far as every check can tell, and the CPU's peaks a
    fixed stand-in instead of seconds of measurement."""
    real_get_hardware = roofline_command.get_hardware

    def get_hardware(name, dtype=None, **kwargs):
        return FAKE_CPU if name == "cpu" else real_get_hardware(name, dtype, **kwargs)

    root = tmp_path_factory.mktemp("cli-fuzz-sandbox")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("HF_HUB_CACHE", str(root / "hub-cache"))
        mp.chdir(root)
        for module in (models, factory, llama_memory):
            mp.setattr(module, "available_memory_bytes", lambda device: SIMULATED_MEMORY)
        mp.setattr(roofline_command, "get_hardware", get_hardware)
        yield root
    shutil.rmtree(root, ignore_errors=True)


# ---------------------------------------------------------------------------- running and the property
def run(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    threads = torch.get_num_threads()
    try:
        with deadline(60), redirect_stdout(out), redirect_stderr(err):
            status = cli.main(argv)
    finally:
        torch.set_num_threads(threads)  # roofline --threads sets it process-wide
    return status, out.getvalue(), err.getvalue()


def check(argv: list[str], status: int, out: str, err: str, *, verbose: bool = False) -> None:
    shown = f"argv {argv!r}\nstatus {status}\nstderr: {err[-2000:]}"
    assert status in (cli.EXIT_OK, cli.EXIT_BAD_INPUT), shown
    if verbose:  # -v / --debug print the traceback of an error on purpose
        return
    assert "Traceback" not in err, shown
    if status == cli.EXIT_BAD_INPUT:
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("llama-ref"), shown
    elif argv[0] == "count" and "json" in argv and "--out" not in argv and out.lstrip().startswith("{"):
        assert json.loads(out)["agree"] is True, shown


# ---------------------------------------------------------------------------- values, per option
# Every pool is (plausible values, hostile values); a draw takes either side with equal odds, so most runs
# get far enough for their one hostile value to matter.
INTS = (["1", "2", "3", "4", "7", "64", "127", "128"],
        ["-1", "0", "129", "4096", str(2**31 - 1), str(2**40), str(2**40 + 1), str(10**30), "-99999999999", "9" * 5000,
         "1.5", "1e3", "0x10", "", " ", "x", "\u0661\u0662", "+4", "4 "])
JUNK = ["", " ", "x", "\U0001f999", "-1", "NaN", "--", "a" * 300]
VALUES = {
    # Valid but slow values are left out: --warmup/--repeats up to 10,000 (timed forwards), schedules with
    # thousands of layer runs.
    "warmup": (["0", "1", "2"], ["-1", "10001", "x", ""]),
    "repeats": (["1", "2"], ["-1", "0", "10001", str(10**30), "x"]),
    "threads": (["1", "2"], ["-1", "0", "3", "4096", "x"]),
    "layers": (["1", "2", "4"], ["-1", "0", "5", "33", "81", str(2**63), "x"]),
    "schedule": (["0", "0-3", "0,1x2,3", "3,2,1,0", "0x100", "0-3x2,1-2x3", "baseline", "two-thirds", "0-31"],
                 ["0-99999999999", "0x100000000", "", " ", "3-0", "0-3x0", "-1", ",", "0,,1", "1" * 30, "1" * 5000,
                  "\u0663", "skip-15", "baseline ", "0-79", "0-3," * 3000 + "0"]),
    "device": (["cpu", "meta"], ["cuda", "cuda:0", "cuda:7", "cuda:-1", "cuda:x", "", " ", "tpu", "cpu:0", "meta:1",
                                 "mps", "\U0001f999"]),
    "counters": (["analytic", "hooks", "analytic,hooks", "hooks,analytic", "analytic,torch", "torch", "fvcore",
                  " analytic , hooks "], ["", ",", "bogus", "analytic,bogus", "hooks,hooks", "ANALYTIC"]),
    "measure_tokens": (["16,48", "1,2", "1,128", " 1 , 2 "],
                       ["", "1,2,3", "5,3", "16,129", "x,y", "-1,4", "0,4", "1," + "9" * 5000]),
    "vocab_size": (["256"], ["100", "32000", "0", "-1", "-5", str(2**63), "x"]),
}
HUB_REVISIONS = ["main", "", "v1.0", "0" * 40, "../../etc", "a b", "\U0001f999"]


def _draw(data, pool, label: str, hostile: bool = False) -> str:
    """A value of ``pool``: a (plausible, hostile) pair or one list of values."""
    if isinstance(pool, tuple):
        pool = pool[1] if hostile else pool[0]
    return data.draw(st.sampled_from(pool), label=label)


def _option_strategies(zoo: Zoo, run_dir: Path) -> dict:
    return {"out_file": zoo.out_files(run_dir), "out_dir": zoo.out_dirs(run_dir), "timings": zoo.timings()}


def _subparsers() -> dict:
    parser = cli.build_parser()
    action = next(a for a in parser._actions if a.dest == "command")
    return action.choices


SUBPARSERS = _subparsers()
# Cheap settings first; the fuzzed options come after them, and argparse keeps the last of a repeated option.
CHEAP = {"count": ["--counters", "analytic,hooks", "--tokens", "4"], "roofline": ["--tokens", "4"],
         "schedules": [], "params": []}


def draw_argv(data, zoo: Zoo, command: str, run_dir: Path) -> tuple[list[str], list[str]]:
    """(global flags, the arguments of ``command``), built from its parser's own actions: a MODEL and up to six
    options, of which usually one (sometimes none, sometimes two) takes a hostile value and the rest
    plausible ones, so that most runs get far enough for the hostile one to matter."""
    parser = SUBPARSERS[command]
    files = _option_strategies(zoo, run_dir)
    actions = [a for a in parser._actions if a.option_strings and a.dest != "help"]
    positionals = [a for a in parser._actions if not a.option_strings]
    with_model = not (positionals[0].nargs == "?" and data.draw(st.integers(0, 4), label="omit MODEL") == 0)
    if data.draw(st.integers(0, 9), label="--revision possible") > 0:
        # --revision fits Hub ids only (a hostile MODEL): with any other model it is refused at once
        actions = [a for a in actions if a.dest != "revision"]
    chosen = data.draw(st.lists(st.sampled_from(actions), max_size=6, unique_by=lambda a: a.dest), label="options")
    n_hostile = data.draw(st.sampled_from([0, 1, 1, 1, 2]), label="hostile values")
    slots = len(chosen) + 1  # slot 0 is MODEL
    hostile = data.draw(st.sets(st.integers(0, slots - 1), min_size=min(n_hostile, slots), max_size=n_hostile),
                        label="hostile slots")
    argv = [command]
    model = _draw(data, zoo.models(), "MODEL", hostile=0 in hostile) if with_model else None
    if model is not None:
        argv.append(model)
    tail: list[str] = []
    for slot, a in enumerate(chosen, start=1):
        opt = data.draw(st.sampled_from(a.option_strings), label="spelling")
        if a.nargs == 0:  # store_true / count
            tail.append(opt)
            continue
        if a.dest == "out":
            pool = files["out_dir"] if command == "roofline" else files["out_file"]
        elif a.dest == "timings":
            pool = files["timings"]
        elif a.dest == "revision":  # fits Hub ids only: elsewhere it is itself the hostile value
            pool = HUB_REVISIONS
        elif a.choices:
            pool = (list(a.choices), JUNK)
        elif a.dest in VALUES:
            pool = VALUES[a.dest]
        elif a.type is int:
            pool = INTS
        else:
            pool = JUNK
        value = _draw(data, pool, a.dest, hostile=slot in hostile)
        # "--opt=value" keeps a value that starts with "-" a value; "--opt value" lets argparse decide.
        if value.startswith("-") and data.draw(st.booleans(), label="attached"):
            tail.append(f"{opt}={value}")
        else:
            tail += [opt, value]
    head = list(CHEAP[command])
    if command == "roofline":
        head += ["--out", str(run_dir / "roofline")]
        if data.draw(st.integers(0, 9), label="plots") > 0:
            head.append("--no-plot")  # matplotlib costs about a second a figure: one run in ten plots
    extra = data.draw(st.sampled_from([[]] * 30 + [["--bogus"], ["extra"], ["--tokens"], ["-N"], ["--", "x"]]),
                      label="junk")
    argv = argv + head + tail + extra
    prefix = data.draw(st.sampled_from([[]] * 27 + [["-v"], ["--debug"], ["-vv"]]), label="global flags")
    return prefix, argv


def _property(data, zoo: Zoo, command: str) -> None:
    prefix, argv = draw_argv(data, zoo, command, zoo.fresh())
    status, out, err = run(prefix + argv)
    check(argv, status, out, err, verbose=bool(prefix))


@_settings(90)
@given(data=st.data())
def test_fuzz_count(data, zoo, sandbox):
    _property(data, zoo, "count")


@_settings(30)
@given(data=st.data())
def test_fuzz_roofline(data, zoo, sandbox):
    _property(data, zoo, "roofline")


@_settings(25)
@given(data=st.data())
def test_fuzz_schedules(data, zoo, sandbox):
    _property(data, zoo, "schedules")


@_settings(25)
@given(data=st.data())
def test_fuzz_params(data, zoo, sandbox):
    _property(data, zoo, "params")


# ---------------------------------------------------------------------------- config file mutations
CONFIG_VALUES = ["64", None, True, False, 0, -1, 1, 2, 3, 7, 16, 1.5, math.nan, math.inf, -math.inf, 2**31 - 1,
                 2**63 - 1, 2**63, 10**30, 10**400, [], {}, "x", "llama", 1e-300, 1e308]
HF_KEYS = list(TINY_HF) + ["rope_type", "original_max_position_embeddings", "dtype", "torch_dtype",
                           "partial_rotary_factor", "_name_or_path", "unknown_key"]
META_KEYS = list(TINY_META) + ["ffn_dim_multiplier", "use_scaled_rope", "rope_scaling_factor",
                               "rope_high_freq_factor", "head_dim", "max_seq_len", "use_qk_norm", "moe_args",
                               "unknown_key"]
ROPE_DICT = st.dictionaries(
    st.sampled_from(["rope_type", "type", "factor", "low_freq_factor", "high_freq_factor",
                     "original_max_position_embeddings", "rope_theta", "partial_rotary_factor", "extra"]),
    st.one_of(st.sampled_from(["default", "linear", "llama3", "yarn", "dynamic", "longrope", ""]),
              st.sampled_from(CONFIG_VALUES)),
    max_size=5)
RAW_DAMAGE = ["none"] * 16 + ["truncate", "bom", "garbage", "utf16", "duplicate-key"]


def _mutated_config(data, meta: bool) -> bytes:
    cfg = dict(TINY_META if meta else TINY_HF)
    keys = META_KEYS if meta else HF_KEYS
    for _ in range(data.draw(st.integers(0, 3), label="n mutations")):
        kind = data.draw(st.sampled_from(["set", "set", "drop", "rope"]), label="mutation")
        if kind == "set":
            cfg[data.draw(st.sampled_from(keys), label="key")] = data.draw(st.sampled_from(CONFIG_VALUES), label="value")
        elif kind == "drop" and cfg:
            cfg.pop(data.draw(st.sampled_from(sorted(cfg)), label="dropped"))
        elif not meta:
            where = data.draw(st.sampled_from(["rope_scaling", "rope_parameters"]), label="rope key")
            cfg[where] = data.draw(ROPE_DICT, label="rope dict")
    try:
        raw = json.dumps(cfg).encode()  # NaN / Infinity literals, as Python writes them
    except ValueError:  # an int beyond str()'s digit limit
        raw = b"{}"
    damage = data.draw(st.sampled_from(RAW_DAMAGE), label="damage")
    if damage == "truncate":
        raw = raw[: data.draw(st.integers(0, max(len(raw) - 1, 0)), label="cut")]
    elif damage == "bom":
        raw = b"\xef\xbb\xbf" + raw
    elif damage == "garbage":
        raw = raw + b"\x00\xff garbage"
    elif damage == "utf16":
        raw = raw.decode().encode("utf-16")
    elif damage == "duplicate-key" and raw.endswith(b"}") and len(raw) > 2:
        raw = raw[:-1] + b', "dim": 32, "hidden_size": 32}'
    return raw


@_settings(80)
@given(data=st.data())
def test_fuzz_config_files(data, zoo, sandbox):
    meta = data.draw(st.booleans(), label="meta params.json")
    run_dir = zoo.fresh()
    model_dir = run_dir / "model"
    model_dir.mkdir()
    name = "params.json" if meta else "config.json"
    (model_dir / name).write_bytes(_mutated_config(data, meta))
    target = str(model_dir / name) if data.draw(st.booleans(), label="file, not folder") else str(model_dir)
    command = data.draw(st.sampled_from(["count", "count", "params", "schedules", "roofline"]), label="command")
    argv = [command, target]
    if command == "count":
        argv += ["--tokens", "4", "--counters", "analytic,hooks", "--format", "json"]
        argv += data.draw(st.sampled_from([[], [], ["--device", "meta"], ["--device", "cpu"], ["--cached", "3"]]),
                          label="count options")
    elif command == "roofline":
        argv += ["--tokens", "4", "--no-plot", "--out", str(run_dir / "roofline")]
    elif command == "schedules":
        argv += data.draw(st.sampled_from([[], ["--measure", "--measure-tokens", "1,4"]]), label="measure")
    if meta:
        argv += data.draw(st.sampled_from([[], ["--vocab-size", "256"]]), label="vocab")
    status, out, err = run(argv)
    check(argv, status, out, err)
