"""The tracked tree stays clean: no large binaries and no paths of the machine it was written on."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MAX_BYTES = 2 ** 20  # 1 MiB: source, docs and test data are far below; a wheel or a checkpoint is not

# Absolute home or work directories (work, home, root, macOS's Users, Windows' drive:Users), built from
# parts so that this file, which is tracked too, does not name them itself.
_SEP = "/"
ABSOLUTE = re.compile("|".join([re.escape(_SEP + d + _SEP) for d in ("work", "home", "root", "Users")]
                               + [r"\b[A-Za-z]:\\" + "Users" + r"\\"]))


def _tracked() -> list[Path]:
    try:
        out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as e:  # e.g. an sdist without .git: nothing to check
        pytest.skip(f"not a git checkout: {e}")
    # a file deleted in the work tree but still in the index is not there to read
    return [ROOT / p for p in out.decode().split("\0") if p and (ROOT / p).is_file()]


def test_tracked_files_are_listed():
    names = {p.relative_to(ROOT).as_posix() for p in _tracked()}
    assert {"README.md", "pyproject.toml", "tests/conftest.py"} <= names


def test_no_tracked_file_is_over_1_mib():
    big = {p.relative_to(ROOT).as_posix(): p.stat().st_size for p in _tracked() if p.stat().st_size > MAX_BYTES}
    assert not big, f"tracked files over {MAX_BYTES} bytes: {big}"


def test_wheels_are_ignored():
    # *.whl in .gitignore: a downloaded wheel at the root is not picked up by `git add .`
    _tracked()  # skips outside a git checkout
    out = subprocess.run(["git", "check-ignore", "-q", "ruff-0.0.0-py3-none-any.whl"], cwd=ROOT)
    assert out.returncode == 0


@pytest.mark.parametrize("text, hit", [
    ("see " + _SEP + "work" + _SEP + "ckpt", True), ("cd " + _SEP + "home" + _SEP + "me", True),
    (_SEP + "root" + _SEP + ".cache", True), (_SEP + "Users" + _SEP + "me", True), ("C:\\" + "Users\\me", True),
    ("checkpoints/llama-2-7b-hf", False), ("~/.cache/huggingface", False), ("network/worker/", False),
])
def test_the_pattern_itself(text, hit):
    assert bool(ABSOLUTE.search(text)) is hit


def test_no_tracked_file_names_an_absolute_home_or_work_path():
    found = []
    for path in _tracked():
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:  # a binary file: checked byte-wise, nothing is skipped
            text = path.read_bytes().decode("latin-1")
        for lineno, line in enumerate(text.splitlines(), 1):
            if ABSOLUTE.search(line):
                found.append(f"{path.relative_to(ROOT).as_posix()}:{lineno}: {line.strip()[:120]}")
    assert not found, "absolute paths of a machine:\n" + "\n".join(found)
