"""A hand-made Hugging Face hub cache, exactly as huggingface_hub leaves it (for offline tests)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def git_blob_sha1(data: bytes) -> str:
    """The id git (and the Hub's ETag for a non-LFS file) gives a blob."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def cache_file(cache: Path, repo_id: str, commit: str, filename: str, data: bytes, *,
               refs: tuple[str, ...] = ()) -> Path:
    """Put one file in the standard hub cache layout, exactly as hf_hub_download leaves it::

        models--org--name/blobs/<git sha1 of the content>
        models--org--name/snapshots/<commit>/<filename> -> ../../blobs/<sha1>   (relative symlink)
        models--org--name/refs/<ref>                     the commit, no newline
    """
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    blob = repo / "blobs" / git_blob_sha1(data)
    blob.parent.mkdir(parents=True, exist_ok=True)
    blob.write_bytes(data)
    pointer = repo / "snapshots" / commit / filename
    pointer.parent.mkdir(parents=True, exist_ok=True)
    pointer.symlink_to(os.path.relpath(blob, pointer.parent))
    for ref in refs:
        ref_file = repo / "refs" / ref
        ref_file.parent.mkdir(parents=True, exist_ok=True)
        ref_file.write_text(commit)
    return pointer
