"""Hub ids: llama_ref.hub against a hand-made hub cache and a loopback stand-in for the Hub.

No test reaches the real Hub or the real ~/.cache: every test runs with HF_HUB_CACHE / HF_HOME in
tmp_path, the token file redirected, no HF_TOKEN, and HF_ENDPOINT on a closed loopback port unless a
test points it at :class:`FakeHub`. FakeHub answers the few endpoints huggingface_hub uses
(``HEAD/GET /{repo}/resolve/{rev}/{file}``, ``/api/models/{repo}/revision/{rev}``,
``/api/models/{repo}/tree/{rev}``) with the Hub's status codes and ``X-Error-Code`` headers, so the
errors are huggingface_hub's own (GatedRepoError, RevisionNotFoundError, ...), not mocks.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Optional
from urllib.parse import unquote, urlsplit

import pytest
import torch

huggingface_hub = pytest.importorskip("huggingface_hub")
import huggingface_hub.constants  # noqa: E402  (a lazy submodule: import it so monkeypatch can reach it)

import llama_ref
from llama_ref import LlamaConfig  # noqa: E402
from llama_ref.hub import (  # noqa: E402
    HubAccessError, HubError, HubNotCachedError, HubNotFoundError, hub_cache_dir, hub_checkpoint_dir,
    hub_config_path, hub_offline, is_hub_id,
)

from _ckpt_helpers import logits, reference_model, synth, tokens  # noqa: E402
from _hub_cache import cache_file, git_blob_sha1  # noqa: E402

REPO_ID = "org/tiny-llama"
COMMIT_A = "a" * 40
COMMIT_B = "b" * 40
COMMIT_C = "c" * 40
TINY_HF = {  # the "tiny" preset as an HF config.json
    "model_type": "llama", "hidden_size": 64, "num_hidden_layers": 4, "num_attention_heads": 4,
    "num_key_value_heads": 2, "intermediate_size": 176, "vocab_size": 256, "max_position_embeddings": 128,
}


def config_bytes(**changes) -> bytes:
    return json.dumps({**TINY_HF, **changes}, indent=2).encode()


def one_line(err: BaseException) -> str:
    text = str(err)
    assert text and "\n" not in text, f"not one line: {text!r}"
    return text


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ============================================================================ the hand-made cache
# ============================================================================ the fake Hub
class FakeHub:
    """A loopback HTTP server with the Hub's URL layout and error headers. ``requests`` logs every
    (method, path, authorization header) so tests can check what was (not) fetched."""

    def __init__(self) -> None:
        self.repos: dict[str, dict] = {}
        self.requests: list[tuple[str, str, Optional[str]]] = []
        self.fail_status: Optional[int] = None
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep pytest output clean
                pass

            def do_HEAD(self):
                hub.handle(self, body=False)

            def do_GET(self):
                hub.handle(self, body=True)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def add_repo(self, repo_id: str, commits: dict[str, dict[str, bytes]], refs: dict[str, str], *,
                 gated: bool = False, private: bool = False, tokens_with_access: tuple[str, ...] = ()) -> None:
        self.repos[repo_id] = dict(commits=commits, refs=refs, gated=gated, private=private,
                                   tokens=set(tokens_with_access))

    def paths(self) -> list[str]:
        return [path for _, path, _ in self.requests]

    # ------------------------------------------------------------------ request handling
    def handle(self, h: BaseHTTPRequestHandler, body: bool) -> None:
        auth = h.headers.get("Authorization")
        self.requests.append((h.command, h.path, auth))
        if self.fail_status is not None:
            return self.reply(h, self.fail_status, b"", {}, body)
        # Split before unquoting: hf_hub_url quotes a revision's "/" as %2F.
        parts = urlsplit(h.path).path.split("/")[1:]
        api = parts[:2] == ["api", "models"]
        if api:
            parts = parts[2:]
        if len(parts) < 4:
            return self.reply(h, 404, b"", {}, body)
        repo_id, kind, rev = f"{parts[0]}/{parts[1]}", parts[2], unquote(parts[3])
        repo = self.repos.get(repo_id)
        token = auth.split(" ", 1)[1] if auth and auth.startswith("Bearer ") else None
        has_access = repo is not None and (not (repo["gated"] or repo["private"]) or token in repo["tokens"])
        if repo is None or (repo["private"] and not has_access):
            # The Hub hides private repos: 401 without a token, 404 with one.
            return self.error(h, 401 if token is None else 404, "RepoNotFound", body)
        if not has_access:
            return self.error(h, 401 if token is None else 403, "GatedRepo", body)
        commit = repo["refs"].get(rev, rev if rev in repo["commits"] else None)
        if commit is None:
            return self.error(h, 404, "RevisionNotFound", body)
        files = repo["commits"][commit]
        if api and kind == "revision":
            return self.reply(h, 200, json.dumps({"id": repo_id, "sha": commit}).encode(),
                              {"Content-Type": "application/json"}, body)
        if api and kind == "tree":
            listing = [{"type": "file", "path": p, "size": len(d), "oid": git_blob_sha1(d)} for p, d in files.items()]
            return self.reply(h, 200, json.dumps(listing).encode(), {"Content-Type": "application/json"}, body)
        filename = unquote("/".join(parts[4:]))
        if kind != "resolve" or filename not in files:
            return self.error(h, 404, "EntryNotFound", body, {"X-Repo-Commit": commit})
        data = files[filename]
        return self.reply(h, 200, data, {"X-Repo-Commit": commit, "ETag": f'"{git_blob_sha1(data)}"'}, body)

    def error(self, h, status: int, code: str, body: bool, headers: Optional[dict] = None) -> None:
        message = f"{code} (fake hub)".encode()
        self.reply(h, status, message, {"X-Error-Code": code, "X-Error-Message": code, **(headers or {})}, body)

    @staticmethod
    def reply(h, status: int, data: bytes, headers: dict, body: bool) -> None:
        h.send_response(status)
        for key, value in headers.items():
            h.send_header(key, value)
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        if body:
            h.wfile.write(data)


# ============================================================================ fixtures
@pytest.fixture(autouse=True)
def hub_env(tmp_path, monkeypatch) -> Path:
    """A private hub cache and home, no token, online, and an endpoint where nothing listens."""
    cache = tmp_path / "hub-cache"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    for name in ("HUGGINGFACE_HUB_CACHE", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE",
                 "TRANSFORMERS_OFFLINE", "HF_HUB_ETAG_TIMEOUT", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{closed_port()}")
    # huggingface_hub read these at import: the token file and the offline flag of this process.
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "hf-home" / "token"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    return cache


@pytest.fixture
def fake_hub(monkeypatch):
    hub = FakeHub()
    monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
    yield hub
    hub.close()


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def tiny_repo(hub: FakeHub, **kwargs) -> None:
    """REPO_ID with main -> COMMIT_A, dev -> COMMIT_B, tag v1.0 -> COMMIT_A."""
    hub.add_repo(REPO_ID, {COMMIT_A: {"config.json": config_bytes()},
                           COMMIT_B: {"config.json": config_bytes(num_hidden_layers=2)}},
                 {"main": COMMIT_A, "dev": COMMIT_B, "v1.0": COMMIT_A}, **kwargs)


# ============================================================================ is_hub_id
@pytest.mark.parametrize("spec", ["meta-llama/Llama-3.1-8B", "meta-llama/Llama-2-7b-hf", "TinyLlama/TinyLlama-1.1B",
                                  "user_1/model.v2", "a/b", "x" * 96 + "/" + "y" * 96])
def test_is_hub_id_accepts_org_name(spec):
    assert is_hub_id(spec)


@pytest.mark.parametrize("spec", [
    "llama-2-7b",              # bare name: a preset or a local path, never a hub id
    "org/name/extra", "/abs/path", "./org/name", "../org/name", "~/org/name", "org/", "/name", "org//name",
    "org--x/name", "org/na..me", "org/name.git", "-org/name", "org/name-", ".org/name",
    "org/config.json",         # a mistyped path to a config file
    "org/name@main", "org/na me", "C:/models/x", "", "x" * 97 + "/y", "org/caf\u00e9",
    None, 42, Path("org/name"),
])
def test_is_hub_id_rejects_other_strings(spec):
    assert not is_hub_id(spec)


def test_is_hub_id_is_false_for_an_existing_local_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert is_hub_id("org/name")
    (tmp_path / "org" / "name").mkdir(parents=True)
    assert not is_hub_id("org/name")  # a directory that exists is a checkpoint path, not a repo


@pytest.mark.parametrize("spec", ["a/b", "user_1/model.v2", "org--x/name", "org/na..me", "org/name.git", "-org/name",
                                  "org/name-", "_org/name_", "org/name@main", "x" * 96 + "/y", "x" * 97 + "/y",
                                  "org/caf\u00e9", "org/x.y-z_w"])
def test_is_hub_id_agrees_with_huggingface_hub_validation(spec):
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(spec)
        valid = True
    except HFValidationError:
        valid = False
    assert is_hub_id(spec) == valid


# ============================================================================ settings read at call time
def test_hub_cache_dir_order(tmp_path, monkeypatch):
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME", "XDG_CACHE_HOME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert hub_cache_dir() == str(tmp_path / "home" / ".cache" / "huggingface" / "hub")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert hub_cache_dir() == str(tmp_path / "xdg" / "huggingface" / "hub")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hfhome"))
    assert hub_cache_dir() == str(tmp_path / "hfhome" / "hub")
    monkeypatch.setenv("HUGGINGFACE_HUB_CACHE", str(tmp_path / "legacy"))
    assert hub_cache_dir() == str(tmp_path / "legacy")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    assert hub_cache_dir() == str(tmp_path / "cache")
    assert hub_cache_dir(tmp_path / "explicit") == str(tmp_path / "explicit")  # the argument wins


@pytest.mark.parametrize("env", [
    {"HF_HOME": "{t}/hfhome"},
    {"XDG_CACHE_HOME": "{t}/xdg"},
    {"HF_HOME": "{t}/hfhome", "HUGGINGFACE_HUB_CACHE": "{t}/legacy"},
    {"HF_HOME": "{t}/hfhome", "HUGGINGFACE_HUB_CACHE": "{t}/legacy", "HF_HUB_CACHE": "{t}/new"},
])
def test_hub_cache_dir_matches_huggingface_hub_at_import(tmp_path, monkeypatch, env):
    """The same directory huggingface_hub.constants computes when the variables are set before import."""
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME", "XDG_CACHE_HOME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    for name, value in env.items():
        monkeypatch.setenv(name, value.format(t=tmp_path))
    code = "from huggingface_hub import constants; print(constants.HF_HUB_CACHE)"
    theirs = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                            timeout=60).stdout.strip()
    assert hub_cache_dir() == os.path.abspath(theirs)


def test_hub_offline_reads_the_environment_now(monkeypatch):
    assert not hub_offline()
    for value in ("1", "true", "ON", "yes"):
        monkeypatch.setenv("HF_HUB_OFFLINE", value)
        assert hub_offline()
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    assert not hub_offline()
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")  # huggingface_hub honours both
    assert hub_offline()
    monkeypatch.delenv("TRANSFORMERS_OFFLINE")
    monkeypatch.delenv("HF_HUB_OFFLINE")
    # Set before huggingface_hub was imported: its constant stays on, and so do we.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    assert hub_offline()


# ============================================================================ offline, hand-made cache
def test_offline_resolves_org_name_from_refs_main(hub_env, offline, fake_hub):
    expected = cache_file(hub_env, REPO_ID, COMMIT_A, "config.json", config_bytes(), refs=("main",))
    path = hub_config_path(REPO_ID)
    assert path == str(expected)
    assert json.loads(Path(path).read_text())["num_hidden_layers"] == 4
    assert fake_hub.requests == []  # offline means no request at all
    config = LlamaConfig.from_hf(path)  # what the caller does with it
    assert (config.dim, config.n_layers, config.n_heads, config.n_kv_heads) == (64, 4, 4, 2)


def test_offline_revision_as_commit_hash_needs_no_ref(hub_env, offline):
    cache_file(hub_env, REPO_ID, COMMIT_A, "config.json", config_bytes(), refs=("main",))
    expected = cache_file(hub_env, REPO_ID, COMMIT_B, "config.json", config_bytes(num_hidden_layers=2))
    assert hub_config_path(REPO_ID, revision=COMMIT_B) == str(expected)
    assert LlamaConfig.from_hf(hub_config_path(REPO_ID, revision=COMMIT_B)).n_layers == 2


def test_offline_revision_as_branch_and_tag_follow_refs(hub_env, offline):
    cache_file(hub_env, REPO_ID, COMMIT_A, "config.json", config_bytes(), refs=("main", "v1.0"))
    dev = cache_file(hub_env, REPO_ID, COMMIT_B, "config.json", config_bytes(num_hidden_layers=2), refs=("dev",))
    assert hub_config_path(REPO_ID, revision="dev") == str(dev)
    assert LlamaConfig.from_hf(hub_config_path(REPO_ID, revision="v1.0")).n_layers == 4


def test_offline_explicit_cache_dir_wins_over_env(tmp_path, offline):
    other = tmp_path / "elsewhere"
    expected = cache_file(other, REPO_ID, COMMIT_A, "config.json", config_bytes(), refs=("main",))
    assert hub_config_path(REPO_ID, cache_dir=other) == str(expected)
    with pytest.raises(HubNotCachedError):
        hub_config_path(REPO_ID)  # without the argument: HF_HUB_CACHE, which holds nothing


def test_offline_honours_hf_home(tmp_path, monkeypatch, offline):
    monkeypatch.delenv("HF_HUB_CACHE")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home2"))
    expected = cache_file(tmp_path / "home2" / "hub", REPO_ID, COMMIT_A, "config.json", config_bytes(), refs=("main",))
    assert hub_config_path(REPO_ID) == str(expected)


def test_offline_not_cached_is_one_clear_line(hub_env, offline, fake_hub):
    t0 = time.perf_counter()
    with pytest.raises(HubNotCachedError) as info:
        hub_config_path("meta-llama/Llama-3.1-8B")
    assert time.perf_counter() - t0 < 1.0
    msg = one_line(info.value)
    assert "meta-llama/Llama-3.1-8B" in msg and "not in the local cache" in msg and "HF_HUB_OFFLINE" in msg
    assert str(hub_env) in msg
    assert isinstance(info.value, FileNotFoundError) and isinstance(info.value, ValueError)
    assert (info.value.repo_id, info.value.revision) == ("meta-llama/Llama-3.1-8B", "main")
    assert fake_hub.requests == []


def test_offline_revision_not_cached(hub_env, offline):
    cache_file(hub_env, REPO_ID, COMMIT_A, "config.json", config_bytes(), refs=("main",))
    for revision in ("dev", COMMIT_C):  # a branch without refs/dev, a commit without a snapshot
        with pytest.raises(HubNotCachedError) as info:
            hub_config_path(REPO_ID, revision=revision)
        assert f"revision '{revision}'" in one_line(info.value)


def test_offline_cached_absence_of_config_json(hub_env, offline):
    # hf_hub_download leaves .no_exist/<commit>/config.json after the Hub said 404 for it.
    marker = hub_env / "models--org--tiny-llama" / ".no_exist" / COMMIT_A / "config.json"
    marker.parent.mkdir(parents=True)
    marker.touch()
    (hub_env / "models--org--tiny-llama" / "refs").mkdir()
    (hub_env / "models--org--tiny-llama" / "refs" / "main").write_text(COMMIT_A)
    with pytest.raises(HubNotFoundError) as info:
        hub_config_path(REPO_ID)
    assert "has no config.json" in one_line(info.value)


def test_offline_set_at_import_is_honoured(hub_env, monkeypatch, fake_hub):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(HubNotCachedError, match="HF_HUB_OFFLINE"):
        hub_config_path(REPO_ID)
    assert fake_hub.requests == []


def test_cached_commit_is_served_without_network(hub_env, fake_hub):
    expected = cache_file(hub_env, REPO_ID, COMMIT_B, "config.json", config_bytes(num_hidden_layers=2))
    assert hub_config_path(REPO_ID, revision=COMMIT_B) == str(expected)  # online, but a commit never changes
    assert fake_hub.requests == []


# ============================================================================ bad input: no network at all
@pytest.mark.parametrize("repo_id", ["llama-2-7b", "org/name/x", "", "org/na me", "../x/y", None, 7])
def test_malformed_repo_id_is_refused_before_any_request(fake_hub, repo_id):
    with pytest.raises(ValueError, match="not a Hugging Face repo id"):
        hub_config_path(repo_id)
    assert fake_hub.requests == []


@pytest.mark.parametrize("revision", ["", " main", "main ", "../../etc", "/abs", "a\\b", "two words", 5])
def test_malformed_revision_is_refused(fake_hub, revision):
    with pytest.raises(ValueError, match="not a branch, tag or commit hash"):
        hub_config_path(REPO_ID, revision=revision)
    assert fake_hub.requests == []


@pytest.mark.parametrize("timeout", [0, -1, float("nan"), float("inf"), "x", True])
def test_bad_timeout_is_refused(fake_hub, timeout):
    with pytest.raises(ValueError, match="not a positive number of seconds"):
        hub_config_path(REPO_ID, timeout=timeout)
    assert fake_hub.requests == []


def test_bad_timeout_variable_is_refused(fake_hub, monkeypatch):
    monkeypatch.setenv("HF_HUB_ETAG_TIMEOUT", "soon")
    with pytest.raises(ValueError, match="HF_HUB_ETAG_TIMEOUT='soon'"):
        hub_config_path(REPO_ID)


# ============================================================================ online (the fake Hub)
def test_download_fetches_only_config_json_into_the_standard_cache(hub_env, fake_hub):
    tiny_repo(fake_hub)
    fake_hub.repos[REPO_ID]["commits"][COMMIT_A]["model.safetensors"] = b"x" * 1000
    path = hub_config_path(REPO_ID)
    repo_dir = hub_env / "models--org--tiny-llama"
    assert path == str(repo_dir / "snapshots" / COMMIT_A / "config.json")
    assert Path(path).is_symlink() and Path(path).read_bytes() == config_bytes()
    assert (repo_dir / "refs" / "main").read_text() == COMMIT_A
    assert (repo_dir / "blobs" / git_blob_sha1(config_bytes())).is_file()
    assert {p for p in fake_hub.paths()} == {f"/{REPO_ID}/resolve/main/config.json"}
    assert [m for m, _, _ in fake_hub.requests].count("GET") == 1  # one download; HEADs only otherwise
    assert LlamaConfig.from_hf(path).n_kv_heads == 2


def test_downloaded_cache_then_works_offline(hub_env, fake_hub, monkeypatch):
    tiny_repo(fake_hub)
    online = hub_config_path(REPO_ID, revision="dev")
    seen = len(fake_hub.requests)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert hub_config_path(REPO_ID, revision="dev") == online
    assert hub_config_path(REPO_ID, revision=COMMIT_B) == online
    assert len(fake_hub.requests) == seen


def test_online_revision_branch_tag_and_commit(hub_env, fake_hub):
    tiny_repo(fake_hub)
    assert LlamaConfig.from_hf(hub_config_path(REPO_ID, revision="dev")).n_layers == 2
    assert LlamaConfig.from_hf(hub_config_path(REPO_ID, revision="v1.0")).n_layers == 4
    assert LlamaConfig.from_hf(hub_config_path(REPO_ID, revision=COMMIT_B)).n_layers == 2
    assert (hub_env / "models--org--tiny-llama" / "refs" / "v1.0").read_text() == COMMIT_A


def test_a_moved_branch_is_followed(hub_env, fake_hub):
    tiny_repo(fake_hub)
    first = hub_config_path(REPO_ID)
    fake_hub.repos[REPO_ID]["commits"][COMMIT_C] = {"config.json": config_bytes(num_hidden_layers=3)}
    fake_hub.repos[REPO_ID]["refs"]["main"] = COMMIT_C
    second = hub_config_path(REPO_ID)
    assert first != second and LlamaConfig.from_hf(second).n_layers == 3
    assert (hub_env / "models--org--tiny-llama" / "refs" / "main").read_text() == COMMIT_C


def test_token_comes_from_hf_token_or_the_argument(fake_hub, monkeypatch):
    tiny_repo(fake_hub, private=True, tokens_with_access=("hf_env", "hf_arg"))
    monkeypatch.setenv("HF_TOKEN", "hf_env")
    hub_config_path(REPO_ID)
    assert {auth for _, _, auth in fake_hub.requests} == {"Bearer hf_env"}
    fake_hub.requests.clear()
    hub_config_path(REPO_ID, revision="dev", token="hf_arg")
    assert {auth for _, _, auth in fake_hub.requests} == {"Bearer hf_arg"}


def test_token_comes_from_the_token_file(fake_hub, tmp_path):
    tiny_repo(fake_hub, gated=True, tokens_with_access=("hf_file",))
    token_file = Path(huggingface_hub.constants.HF_TOKEN_PATH)  # in tmp_path (see hub_env)
    assert str(token_file).startswith(str(tmp_path))
    token_file.parent.mkdir(parents=True, exist_ok=True)
    token_file.write_text("hf_file")
    hub_config_path(REPO_ID)
    assert {auth for _, _, auth in fake_hub.requests} == {"Bearer hf_file"}


def test_token_false_sends_none(fake_hub, monkeypatch):
    tiny_repo(fake_hub)
    monkeypatch.setenv("HF_TOKEN", "hf_env")
    hub_config_path(REPO_ID, token=False)
    assert {auth for _, _, auth in fake_hub.requests} == {None}


# ============================================================================ failures, online
def test_gated_without_token_is_one_clear_line(fake_hub):
    tiny_repo(fake_hub, gated=True, tokens_with_access=("hf_ok",))
    with pytest.raises(HubAccessError) as info:
        hub_config_path(REPO_ID)
    msg = one_line(info.value)
    assert "gated" in msg and "token with access" in msg and "HF_TOKEN" in msg and "hf auth login" in msg
    assert f"{fake_hub.endpoint}/{REPO_ID}" in msg  # where to request access
    assert isinstance(info.value, ValueError)


def test_gated_with_a_token_without_access(fake_hub, monkeypatch):
    tiny_repo(fake_hub, gated=True, tokens_with_access=("hf_ok",))
    monkeypatch.setenv("HF_TOKEN", "hf_other")
    with pytest.raises(HubAccessError, match="gated.*the token in use .* has no access"):
        hub_config_path(REPO_ID)
    with pytest.raises(HubAccessError, match="the token given has no access"):
        hub_config_path(REPO_ID, token="hf_other2")
    assert hub_config_path(REPO_ID, token="hf_ok").endswith("config.json")


def test_gated_error_raised_by_huggingface_hub_is_translated(monkeypatch):
    """The same one line when huggingface_hub itself raises GatedRepoError (here from a stub)."""
    from huggingface_hub.errors import GatedRepoError

    # huggingface_hub's HTTP client: httpx2 (2.x), httpx (1.x); whichever it imported.
    http = sys.modules.get("httpx2") or pytest.importorskip("httpx")

    def refuse(url, **kwargs):
        response = http.Response(403, request=http.Request("HEAD", url))
        raise GatedRepoError("403 Client Error.\n\nCannot access gated repo", response=response)

    monkeypatch.setattr(huggingface_hub, "get_hf_file_metadata", refuse)
    with pytest.raises(HubAccessError, match="is gated"):
        hub_config_path("meta-llama/Llama-3.1-8B")


def test_gated_but_cached_uses_the_cache_with_a_warning(hub_env, fake_hub, caplog):
    tiny_repo(fake_hub, gated=True)
    expected = cache_file(hub_env, REPO_ID, COMMIT_A, "config.json", config_bytes(), refs=("main",))
    with caplog.at_level(logging.WARNING, logger="llama_ref.hub"):
        assert hub_config_path(REPO_ID) == str(expected)
    assert "gated" in caplog.text and "using the cached config.json" in caplog.text


def test_missing_or_private_repo(fake_hub, monkeypatch):
    tiny_repo(fake_hub, private=True)
    for repo_id in ("org/does-not-exist", REPO_ID):
        with pytest.raises(HubNotFoundError) as info:
            hub_config_path(repo_id)
        msg = one_line(info.value)
        assert f"'{repo_id}' was not found" in msg and "private" in msg and "HF_TOKEN" in msg
    monkeypatch.setenv("HF_TOKEN", "hf_nope")
    with pytest.raises(HubNotFoundError, match="the token in use .* has no access"):
        hub_config_path(REPO_ID)


def test_missing_revision(fake_hub):
    tiny_repo(fake_hub)
    with pytest.raises(HubNotFoundError) as info:
        hub_config_path(REPO_ID, revision="v9")
    assert "has no revision 'v9'" in one_line(info.value)


def test_repo_without_config_json(hub_env, fake_hub, monkeypatch):
    fake_hub.add_repo("org/gguf-only", {COMMIT_A: {"model.gguf": b"GGUF"}}, {"main": COMMIT_A})
    with pytest.raises(HubNotFoundError) as info:
        hub_config_path("org/gguf-only")
    assert "has no config.json" in one_line(info.value)
    # huggingface_hub recorded the absence, so offline says the same instead of "not cached".
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(HubNotFoundError, match="has no config.json"):
        hub_config_path("org/gguf-only")


def test_hub_server_error(hub_env, fake_hub, caplog):
    tiny_repo(fake_hub)
    fake_hub.fail_status = 500
    t0 = time.perf_counter()
    with pytest.raises(HubError) as info:
        hub_config_path(REPO_ID)
    assert time.perf_counter() - t0 < 5.0  # no backoff retries
    assert "HTTP 500" in one_line(info.value)
    assert not isinstance(info.value, (HubAccessError, HubNotFoundError))
    expected = cache_file(hub_env, REPO_ID, COMMIT_A, "config.json", config_bytes(), refs=("main",))
    with caplog.at_level(logging.WARNING, logger="llama_ref.hub"):
        assert hub_config_path(REPO_ID) == str(expected)
    assert "HTTP 500" in caplog.text


# ============================================================================ network failures
def test_unreachable_hub_is_one_line_quickly(hub_env):
    # HF_ENDPOINT is a closed loopback port (hub_env): connection refused at once. huggingface_hub
    # alone would retry 5 times with backoff (about 23 s) before giving up.
    t0 = time.perf_counter()
    with pytest.raises(HubNotCachedError) as info:
        hub_config_path("meta-llama/Llama-3.1-8B")
    assert time.perf_counter() - t0 < 5.0
    msg = one_line(info.value)
    assert "unreachable" in msg and "ConnectError" in msg and "not in the local cache" in msg
    assert os.environ["HF_ENDPOINT"] in msg


def test_unreachable_hub_falls_back_to_the_cache(hub_env, caplog):
    expected = cache_file(hub_env, REPO_ID, COMMIT_A, "config.json", config_bytes(), refs=("main",))
    with caplog.at_level(logging.WARNING, logger="llama_ref.hub"):
        assert hub_config_path(REPO_ID) == str(expected)
    assert "unreachable" in caplog.text


@pytest.fixture
def silent_endpoint(monkeypatch):
    """A loopback port that accepts connections (the kernel's backlog) and never answers."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{sock.getsockname()[1]}")
    yield
    sock.close()


def test_a_hub_that_never_answers_times_out(silent_endpoint):
    t0 = time.perf_counter()
    with pytest.raises(HubNotCachedError) as info:
        hub_config_path(REPO_ID, timeout=0.5)
    elapsed = time.perf_counter() - t0
    assert 0.4 < elapsed < 4.0
    assert "unreachable" in one_line(info.value) and "Timeout" in str(info.value)


def test_the_timeout_variable_is_read_at_call_time(silent_endpoint, monkeypatch):
    monkeypatch.setenv("HF_HUB_ETAG_TIMEOUT", "0.6")
    t0 = time.perf_counter()
    with pytest.raises(HubNotCachedError, match="Timeout"):
        hub_config_path(REPO_ID)
    assert 0.5 < time.perf_counter() - t0 < 4.0


# ============================================================================ whole checkpoints (only when asked)
@pytest.fixture(scope="module")
def tiny_checkpoint_files(tmp_path_factory) -> dict[str, bytes]:
    """The tiny preset as an HF repo with 2 safetensors shards + index, and .bin duplicates beside them."""
    root = tmp_path_factory.mktemp("tiny-repo")
    synth().write_checkpoint("tiny", root / "st", format="hf", shards=2, dtype=torch.float32)
    synth().write_checkpoint("tiny", root / "bin", format="hf-bin", shards=1, dtype=torch.float32)
    files = {p.name: p.read_bytes() for p in (root / "st").iterdir()}
    files.update({p.name: p.read_bytes() for p in (root / "bin").iterdir() if p.name != "config.json"})
    assert {"config.json", "model.safetensors.index.json", "pytorch_model.bin"} <= set(files)
    return files


def test_checkpoint_downloads_safetensors_not_bin_and_loads(hub_env, fake_hub, tiny_checkpoint_files, monkeypatch):
    files = {**tiny_checkpoint_files, "README.md": b"# tiny"}
    fake_hub.add_repo(REPO_ID, {COMMIT_A: files}, {"main": COMMIT_A})
    folder = hub_checkpoint_dir(REPO_ID)
    assert folder == str(hub_env / "models--org--tiny-llama" / "snapshots" / COMMIT_A)
    names = sorted(os.listdir(folder))
    assert names == sorted(n for n in files if n == "config.json" or n.startswith("model"))
    assert not any("pytorch_model" in p or "README" in p for p in fake_hub.paths())
    model = llama_ref.load(folder)
    ref = reference_model(model.config)
    assert torch.equal(logits(model, tokens(model.config)), logits(ref, tokens(model.config)))
    # The same directory offline, with no request.
    seen = len(fake_hub.requests)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert hub_checkpoint_dir(REPO_ID) == folder
    assert len(fake_hub.requests) == seen


def test_checkpoint_with_only_bin_weights_needs_include_bin(hub_env, fake_hub, tiny_checkpoint_files):
    files = {n: d for n, d in tiny_checkpoint_files.items() if n == "config.json" or n.startswith("pytorch_model")}
    fake_hub.add_repo(REPO_ID, {COMMIT_A: files}, {"main": COMMIT_A})
    with pytest.raises(HubNotFoundError) as info:
        hub_checkpoint_dir(REPO_ID)
    assert "include_bin=True" in one_line(info.value)
    folder = hub_checkpoint_dir(REPO_ID, include_bin=True)
    assert "pytorch_model.bin" in os.listdir(folder)
    model = llama_ref.load(folder)
    assert torch.equal(logits(model, tokens(model.config)), logits(reference_model(model.config), tokens(model.config)))


def test_checkpoint_offline_with_only_the_config_cached(hub_env, offline):
    cache_file(hub_env, REPO_ID, COMMIT_A, "config.json", config_bytes(), refs=("main",))
    with pytest.raises(HubNotFoundError, match="no weights"):
        hub_checkpoint_dir(REPO_ID)


def test_checkpoint_offline_not_cached(offline):
    with pytest.raises(HubNotCachedError) as info:
        hub_checkpoint_dir(REPO_ID)
    assert "the checkpoint is not in the local cache" in one_line(info.value)


def test_checkpoint_unreachable_hub_is_one_line_quickly():
    t0 = time.perf_counter()
    with pytest.raises(HubNotCachedError) as info:
        hub_checkpoint_dir(REPO_ID)
    assert time.perf_counter() - t0 < 5.0
    assert "unreachable" in one_line(info.value)


def test_checkpoint_gated(fake_hub, tiny_checkpoint_files):
    fake_hub.add_repo(REPO_ID, {COMMIT_A: dict(tiny_checkpoint_files)}, {"main": COMMIT_A}, gated=True)
    with pytest.raises(HubAccessError, match="is gated"):
        hub_checkpoint_dir(REPO_ID)
    assert fake_hub.paths() == [f"/{REPO_ID}/resolve/main/config.json"]  # refused at the first request


def test_checkpoint_bad_patterns(fake_hub):
    for patterns in ("*.safetensors", [], [""], [3]):
        with pytest.raises(ValueError, match="allow_patterns"):
            hub_checkpoint_dir(REPO_ID, allow_patterns=patterns)
    assert fake_hub.requests == []
