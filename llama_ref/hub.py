"""Hugging Face hub ids ("org/name"): fetch a model's ``config.json`` (and weights only when asked).

Everything goes through ``huggingface_hub`` and its standard cache, so a file fetched here is the
file ``transformers`` would use, and ``huggingface_hub``'s own rules apply: the token comes from the
``token`` argument, else ``HF_TOKEN``, else the token file written by ``hf auth login``; files land in
the hub cache (``models--org--name/{blobs,refs,snapshots}``).

Three things are done here rather than left to ``huggingface_hub``, each for a reason:

* ``HF_HUB_OFFLINE``, ``HF_HUB_CACHE`` / ``HF_HOME``, ``HF_ENDPOINT`` and ``HF_HUB_ETAG_TIMEOUT`` are
  read when a function is called. ``huggingface_hub`` reads them once, at import, so a variable set
  later (a test, a notebook, a CLI wrapper) would otherwise be ignored.
* Before downloading, one metadata request (HEAD, no retries, ``timeout`` seconds) checks that the
  Hub answers. ``hf_hub_download`` alone, when the network is down and the file is not cached,
  retries 5 times with backoff (1+2+4+8+8 s) and prints a warning per try: 23 s measured on a machine
  without internet. The probe turns that into one line within the timeout.
* Every failure becomes one line naming the repo and revision, as a :class:`HubError`
  (a ``ValueError``; the "not found" kinds are also ``FileNotFoundError``).

As with ``hf_hub_download``, a Hub that cannot be reached or refuses access (gated, private, 5xx) is
not fatal when the file is already cached: the cached copy is used and a warning is logged. A missing
revision or a repo without ``config.json`` is always an error.
"""

from __future__ import annotations

import fnmatch
import logging
import math
import os
import re
import sys
from typing import Optional, Sequence, Union

logger = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
DEFAULT_REVISION = "main"
DEFAULT_ENDPOINT = "https://huggingface.co"
# huggingface_hub's own default for a metadata request (its DEFAULT_ETAG_TIMEOUT). There is no retry,
# so this bounds the wait: at most about one timeout per connection phase, not 5 retries plus backoff.
DEFAULT_TIMEOUT_S = 10.0
# What the loaders read from an HF checkpoint (llama_ref/loading/detect.py). The ``.bin`` copies that
# many repos carry next to the safetensors would double the download, so they come only when asked.
SAFETENSORS_PATTERNS = ("config.json", "model.safetensors", "model-*-of-*.safetensors", "model.safetensors.index.json")
BIN_PATTERNS = ("pytorch_model.bin", "pytorch_model-*-of-*.bin", "pytorch_model.bin.index.json")

# One part of a repo id, as huggingface_hub.utils.validate_repo_id accepts it: 1-96 of [A-Za-z0-9_.-],
# starting and ending with [A-Za-z0-9_]; "--" and ".." are rejected separately.
_PART = r"\w(?:[\w.-]{0,94}\w)?"
_HUB_ID = re.compile(rf"{_PART}/{_PART}", re.ASCII)
_COMMIT_HASH = re.compile(r"[0-9a-f]{40}")
_TRUE = {"1", "ON", "YES", "TRUE"}  # huggingface_hub's ENV_VARS_TRUE_VALUES


class HubError(ValueError):
    """Fetching from the Hugging Face Hub failed. The message is one line naming repo and revision."""

    def __init__(self, message: str, *, repo_id: str, revision: str):
        super().__init__(message)
        self.repo_id = repo_id
        self.revision = revision


class HubAccessError(HubError):
    """The repo is gated or private, or access to it is disabled: a token with access is needed."""


class HubNotFoundError(HubError, FileNotFoundError):
    """The repo, the revision or the file does not exist (or, for a repo, is private and no token has access)."""


class HubNotCachedError(HubError, FileNotFoundError):
    """The Hub cannot be used (``HF_HUB_OFFLINE`` is set, or it is unreachable) and the file is not cached."""


# ---------------------------------------------------------------------------------------------- ids
def is_hub_id(spec: object) -> bool:
    """True if ``spec`` reads as a Hub model id ``"org/name"`` and is not an existing local path.

    Only the two-part form counts: a bare ``"name"`` would collide with preset names and relative
    paths, and every Llama repo lives under an org or user anyway. A name ending in ``.json`` is taken
    for a mistyped path to a config file, not a repo.
    """
    if not isinstance(spec, str) or not _HUB_ID.fullmatch(spec):
        return False
    if "--" in spec or ".." in spec or spec.endswith(".git") or spec.lower().endswith(".json"):
        return False
    return not os.path.exists(spec)


def _check_repo_id(repo_id: object) -> str:
    if not isinstance(repo_id, str) or not _HUB_ID.fullmatch(repo_id) or "--" in repo_id or ".." in repo_id\
            or repo_id.endswith(".git"):
        raise ValueError(f"{repo_id!r} is not a Hugging Face repo id: expected 'org/name' (letters, digits, "
                         "'-', '_', '.'; no '--' or '..'; at most 96 characters each)")
    return repo_id


def _check_revision(revision: object) -> str:
    if revision is None:
        return DEFAULT_REVISION
    if not isinstance(revision, str) or not revision or revision != revision.strip()\
            or any(c.isspace() or c == "\\" for c in revision) or ".." in revision or revision.startswith("/"):
        # The revision becomes a path under refs/ in the cache: no way out of it.
        raise ValueError(f"revision {revision!r} is not a branch, tag or commit hash")
    return revision


# ---------------------------------------------------------------------------------------- settings
def _env_true(name: str) -> bool:
    return (os.environ.get(name) or "").upper() in _TRUE


def hub_offline() -> bool:
    """``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) as set now, or as ``huggingface_hub`` saw it at import."""
    if _env_true("HF_HUB_OFFLINE") or _env_true("TRANSFORMERS_OFFLINE"):
        return True
    constants = sys.modules.get("huggingface_hub.constants")
    return bool(constants is not None and constants.HF_HUB_OFFLINE)


def hub_cache_dir(cache_dir: Union[str, os.PathLike, None] = None) -> str:
    """The hub cache: ``cache_dir`` if given, else huggingface_hub's order of variables, read now.

    ``HF_HUB_CACHE``, then ``HUGGINGFACE_HUB_CACHE``, then ``$HF_HOME/hub``, then
    ``$XDG_CACHE_HOME/huggingface/hub``, then ``~/.cache/huggingface/hub``.
    """
    if cache_dir is not None:
        return os.path.abspath(os.path.expanduser(os.fspath(cache_dir)))
    env = os.environ
    path = env.get("HF_HUB_CACHE") or env.get("HUGGINGFACE_HUB_CACHE")
    if not path:
        xdg_cache = env.get("XDG_CACHE_HOME") or os.path.join("~", ".cache")
        home = env.get("HF_HOME") or os.path.join(xdg_cache, "huggingface")
        path = os.path.join(home, "hub")
    return os.path.abspath(os.path.expanduser(os.path.expandvars(path)))


def _endpoint() -> str:
    return (os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


def _timeout(timeout: Optional[float]) -> float:
    """Seconds to wait for the Hub: ``timeout``, else ``HF_HUB_ETAG_TIMEOUT`` (read now), else 10."""
    source, value = "timeout", timeout
    if timeout is None:
        source, value = "HF_HUB_ETAG_TIMEOUT", os.environ.get("HF_HUB_ETAG_TIMEOUT")
        if not value:
            return DEFAULT_TIMEOUT_S
    try:
        seconds = float(value) if not isinstance(value, bool) else math.nan
    except (TypeError, ValueError):
        seconds = math.nan
    if not 0 < seconds < math.inf:
        raise ValueError(f"{source}={value!r} is not a positive number of seconds")
    return seconds


def _hf():
    try:
        import huggingface_hub
    except ImportError as e:  # a dependency of transformers, so normally present
        raise ImportError(f"reading a Hugging Face hub id needs huggingface_hub ({e}): "
                          "pip install huggingface_hub") from None
    return huggingface_hub


# ----------------------------------------------------------------------------------- config.json
def hub_config_path(repo_id: str, *, revision: Optional[str] = None, token: Union[str, bool, None] = None,
                    cache_dir: Union[str, os.PathLike, None] = None, timeout: Optional[float] = None) -> str:
    """Local path of ``config.json`` of Hub model ``repo_id`` at ``revision``, fetched into the cache if needed.

    Downloads that one file and nothing else. ``revision`` is a branch, tag or commit hash (default
    ``"main"``); a commit hash already in the cache is returned without any network request.
    ``token``: ``None`` uses huggingface_hub's default (``HF_TOKEN``, then the token file), ``False``
    sends none, a string is the token. ``cache_dir`` overrides the hub cache (see :func:`hub_cache_dir`).
    ``timeout`` (seconds, default ``HF_HUB_ETAG_TIMEOUT`` or 10) bounds the wait for the Hub.

    Raises :class:`HubNotCachedError` (offline or unreachable, not cached), :class:`HubAccessError`
    (gated/private), :class:`HubNotFoundError` (repo, revision or ``config.json`` missing),
    :class:`HubError` (any other Hub failure), ``ValueError`` for a malformed id or revision.
    """
    repo_id, revision = _check_repo_id(repo_id), _check_revision(revision)
    cache, hf, seconds = hub_cache_dir(cache_dir), _hf(), _timeout(timeout)
    cached, known_missing = _cached_path(hf, repo_id, revision, cache)
    is_commit = bool(_COMMIT_HASH.fullmatch(revision))
    if hub_offline() or (is_commit and (cached is not None or known_missing)):
        # Offline, or a commit (immutable) that the cache already answers for: no network.
        if known_missing:
            raise HubNotFoundError(_no_config_message(repo_id, revision), repo_id=repo_id, revision=revision)
        if cached is None:
            raise _offline_error(repo_id, revision, cache, CONFIG_NAME)
        return cached
    endpoint = _endpoint()
    problem = _probe(hf, repo_id, revision, token, seconds, endpoint, cache)
    if problem is not None:
        error, cache_may_help = problem
        if cache_may_help and cached is not None:
            logger.warning("%s; using the cached %s (%s)", error, CONFIG_NAME, cached)
            return cached
        if isinstance(error, HubNotFoundError) and not cache_may_help:
            # A definite 404 for the revision or file: let hf_hub_download see it too, so the cache records
            # it as it would for transformers (refs/<branch> and .no_exist/<commit>/config.json).
            try:
                hf.hf_hub_download(repo_id, CONFIG_NAME, revision=revision, token=token, cache_dir=cache,
                                   etag_timeout=seconds, endpoint=endpoint)
            except Exception:  # noqa: BLE001 - the error to report is the one already in hand
                pass
        raise error
    try:
        return hf.hf_hub_download(repo_id, CONFIG_NAME, revision=revision, token=token, cache_dir=cache,
                                  etag_timeout=seconds, endpoint=endpoint)
    except Exception as err:  # noqa: BLE001 - _translate re-raises what is not a Hub or network failure
        raise _translate(err, repo_id, revision, token, cache, endpoint)[0] from None


def _probe(hf, repo_id: str, revision: str, token, seconds: float, endpoint: str, cache: str,
           wanted: str = CONFIG_NAME) -> Optional[tuple[HubError, bool]]:
    """One HEAD request for config.json, no retries: None if the Hub serves it, else what _translate says."""
    try:
        url = hf.hf_hub_url(repo_id, CONFIG_NAME, revision=revision, endpoint=endpoint)
        hf.get_hf_file_metadata(url, token=token, timeout=seconds, endpoint=endpoint)
    except Exception as err:  # noqa: BLE001 - _translate re-raises what is not a Hub or network failure
        return _translate(err, repo_id, revision, token, cache, endpoint, wanted=wanted)
    return None


def _cached_path(hf, repo_id: str, revision: str, cache: str) -> tuple[Optional[str], bool]:
    """(cached config.json or None, whether the cache records that the file does not exist there).

    The same refs/ and snapshots/ lookup that hf_hub_download does offline; the second flag is the
    ``.no_exist/<commit>/config.json`` marker hf_hub_download leaves after a 404.
    """
    found = hf.try_to_load_from_cache(repo_id, CONFIG_NAME, cache_dir=cache, revision=revision)
    if isinstance(found, str):
        return found, False
    return None, found is not None  # not None and not a str: huggingface_hub's _CACHED_NO_EXIST


def _offline_error(repo_id: str, revision: str, cache: str, wanted: str) -> "HubNotCachedError":
    return HubNotCachedError(f"{_what(repo_id, revision)}: {wanted} is not in the local cache ({cache}) and "
                             "HF_HUB_OFFLINE is set: unset it to download, or pass a local checkpoint directory",
                             repo_id=repo_id, revision=revision)


# ------------------------------------------------------------------------------------ checkpoints
def hub_checkpoint_dir(repo_id: str, *, revision: Optional[str] = None, token: Union[str, bool, None] = None,
                       cache_dir: Union[str, os.PathLike, None] = None, include_bin: bool = False,
                       allow_patterns: Optional[Sequence[str]] = None, timeout: Optional[float] = None) -> str:
    """Download a whole HF checkpoint (config, safetensors, index) into the hub cache; return its directory.

    Weights can be many GB: only call this when the user asked for weights. ``pytorch_model*.bin``
    files are fetched only with ``include_bin=True`` (for repos without safetensors);
    ``allow_patterns`` replaces the file patterns altogether. The directory returned is the snapshot
    folder, ready for ``llama_ref.load``. Raises as :func:`hub_config_path`, and
    :class:`HubNotFoundError` when no weights came down (for instance a repo with only ``.bin`` files,
    or an offline cache holding only the config).
    """
    repo_id, revision = _check_repo_id(repo_id), _check_revision(revision)
    if allow_patterns is None:
        patterns = list(SAFETENSORS_PATTERNS) + (list(BIN_PATTERNS) if include_bin else [])
    elif isinstance(allow_patterns, str) or not all(isinstance(p, str) and p for p in allow_patterns)\
            or not allow_patterns:
        raise ValueError(f"allow_patterns must be a non-empty list of glob strings, got {allow_patterns!r}")
    else:
        patterns = list(allow_patterns)
    cache, hf, seconds = hub_cache_dir(cache_dir), _hf(), _timeout(timeout)
    offline, endpoint, problem = hub_offline(), _endpoint(), None
    if not offline:
        # The fast check of the Hub that config.json gets, so a dead network fails within the timeout
        # instead of in snapshot_download's first request.
        problem = _probe(hf, repo_id, revision, token, seconds, endpoint, cache, "the checkpoint")
        if problem is not None and not problem[1]:
            raise problem[0]
    try:
        folder = hf.snapshot_download(repo_id, revision=revision, token=token, cache_dir=cache,
                                      allow_patterns=patterns, local_files_only=offline or problem is not None,
                                      etag_timeout=seconds, endpoint=endpoint)
    except Exception as err:  # noqa: BLE001 - _translate re-raises what is not a Hub or network failure
        if problem is not None:  # the Hub's refusal says more than "not in the cache"
            raise problem[0] from None
        from huggingface_hub import errors

        if offline and isinstance(err, errors.LocalEntryNotFoundError) and\
                not isinstance(err, getattr(errors, "IncompleteSnapshotError", ())):
            raise _offline_error(repo_id, revision, cache, "the checkpoint") from None
        raise _translate(err, repo_id, revision, token, cache, endpoint, wanted="the checkpoint")[0] from None
    if problem is not None:
        logger.warning("%s; using the cached checkpoint (%s)", problem[0], folder)
    # Only the weight files the patterns asked for came down, or none (the loader checks their layout).
    weights = [name for name in os.listdir(folder) if not name.endswith(".json")
               and any(fnmatch.fnmatch(name, p) for p in patterns)]
    if not weights:
        hint = "" if include_bin or allow_patterns is not None else\
            " (if the repo has only pytorch_model*.bin weights, pass include_bin=True)"
        raise HubNotFoundError(f"{_what(repo_id, revision)}: no weights matching {', '.join(patterns)} in {folder}"
                               f"{hint}", repo_id=repo_id, revision=revision) from None
    return folder


# --------------------------------------------------------------------------------------- errors
def _what(repo_id: str, revision: str) -> str:
    return f"hub model '{repo_id}' (revision '{revision}')"


def _no_config_message(repo_id: str, revision: str) -> str:
    return (f"{_what(repo_id, revision)} has no {CONFIG_NAME}: not a transformers model repo "
            "(a GGUF, Meta-format or adapter-only repo?)")


def _one_line(err: BaseException) -> str:
    """``Type: first line of the message`` (huggingface_hub's messages run over several lines)."""
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    return f"{type(err).__name__}: {lines[0]}" if lines else type(err).__name__


def _token_hint(token: Union[str, bool, None], hf) -> str:
    if token is False:
        return "no token was sent (token=False)"
    if isinstance(token, str):
        return "the token given has no access to it"
    try:
        found = hf.get_token()
    except Exception:  # noqa: BLE001 - only for the wording of a message
        found = None
    if found:
        return "the token in use (HF_TOKEN or the `hf auth login` token file) has no access to it"
    return "no token was found: set HF_TOKEN or run `hf auth login`"


def _is_network_error(err: BaseException) -> bool:
    """A failure to reach the Hub: socket/TLS errors, timeouts, and the HTTP client's transport errors."""
    if isinstance(err, OSError):  # ConnectionError, TimeoutError, ssl.SSLError, FileMetadataError
        return True
    for module, name in (("httpx2", "RequestError"), ("httpx", "RequestError"), ("requests", "RequestException")):
        base = getattr(sys.modules.get(module), name, None)  # imported already if it raised this
        if isinstance(base, type) and isinstance(err, base):
            return True
    return False


def _translate(err: Exception, repo_id: str, revision: str, token, cache: str, endpoint: str, *,
               wanted: str = CONFIG_NAME) -> tuple[HubError, bool]:
    """(one-line HubError, whether a cached copy may stand in), mirroring hf_hub_download's fallbacks.

    Re-raises ``err`` itself when it is neither a Hub answer nor a network failure (a bug, not input).
    """
    hf = _hf()
    from huggingface_hub import errors
    what, kw = _what(repo_id, revision), dict(repo_id=repo_id, revision=revision)
    if isinstance(err, HubError):
        return err, False
    if isinstance(err, errors.OfflineModeIsEnabled):
        return _offline_error(repo_id, revision, cache, wanted), True
    incomplete = getattr(errors, "IncompleteSnapshotError", None)
    if incomplete is not None and isinstance(err, incomplete):
        return HubNotCachedError(f"{what}: the cached copy of {wanted} is incomplete and the Hub cannot be used to "
                                 f"complete it ({_one_line(err.__cause__ or err)})", **kw), False
    if isinstance(err, errors.GatedRepoError):
        return HubAccessError(f"{what} is gated: a Hugging Face token with access is needed and "
                              f"{_token_hint(token, hf)}; request access at {endpoint}/{repo_id}", **kw), True
    if isinstance(err, errors.RevisionNotFoundError):
        return HubNotFoundError(f"hub model '{repo_id}' has no revision '{revision}' (expected a branch, tag or "
                                "commit hash of the repo)", **kw), False
    if isinstance(err, errors.EntryNotFoundError) and not isinstance(err, errors.LocalEntryNotFoundError):
        return HubNotFoundError(_no_config_message(repo_id, revision), **kw), False
    if isinstance(err, errors.RepositoryNotFoundError):
        return HubNotFoundError(f"hub model '{repo_id}' was not found: check the name; if the repo is private or "
                                f"gated, a token with access is needed and {_token_hint(token, hf)}", **kw), True
    if isinstance(err, errors.DisabledRepoError):
        return HubAccessError(f"{what}: access to this repo is disabled on the Hub", **kw), True
    if isinstance(err, errors.HfHubHTTPError):
        status = getattr(getattr(err, "response", None), "status_code", None)
        if status in (401, 403):
            return HubAccessError(f"{what}: the Hub refused access (HTTP {status}) and {_token_hint(token, hf)}",
                                  **kw), True
        return HubError(f"{what}: the Hub at {endpoint} failed (HTTP {status}: {_one_line(err)})", **kw), True
    if isinstance(err, errors.LocalEntryNotFoundError):
        # hf_hub_download's own "cannot reach the Hub and not cached", after our probe had got through.
        cause = err.__cause__ or err.__context__
        why = _one_line(cause) if cause is not None else _one_line(err)
        return HubNotCachedError(f"{what}: the Hub at {endpoint} is unreachable ({why}) and {wanted} is not in the "
                                 f"local cache ({cache})", **kw), True
    if _is_network_error(err):
        return HubNotCachedError(f"{what}: the Hub at {endpoint} is unreachable ({_one_line(err)}) and {wanted} is "
                                 f"not in the local cache ({cache})", **kw), True
    raise err
