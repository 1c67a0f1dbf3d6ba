"""sha256 of result files, and JSON descriptions that carry the hash of their own content.

A folder of results (a run folder, a saved sweep) lists every file with its sha256 in a JSON
description; the description holds, under `content_sha256`, the hash of its own canonical form
(sorted keys, no whitespace, that field left out). A careless edit of any file, a hand-changed
number in the description included, or a truncated copy then fails on reading, and the reader
can name the file instead of computing with it.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

SEAL = "content_sha256"


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def bytes_sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def content_sha256(document: dict[str, Any]) -> str:
    """The hash of `document` without its seal, stable under a JSON write and read."""
    body = {key: value for key, value in document.items() if key != SEAL}
    return bytes_sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode())


def sealed(document: dict[str, Any]) -> dict[str, Any]:
    """`document` with its seal: the hash of the rest of its content."""
    return {**{key: value for key, value in document.items() if key != SEAL}, SEAL: content_sha256(document)}


def seal_holds(document: Any) -> bool:
    """Whether a JSON document read back still has the content its seal was computed from."""
    return isinstance(document, dict) and document.get(SEAL) == content_sha256(document)


__all__ = ["SEAL", "bytes_sha256", "content_sha256", "file_sha256", "seal_holds", "sealed"]
