"""Turn a generator of schema rows into a cached Arrow dataset with its metadata attached.

``Dataset.from_generator`` writes rows to an Arrow cache and memory-maps it, so datasets larger
than RAM work; we pass it our own fingerprint (source parameters, input file stats and a hash of
this package's code) so a second identical load is a cache hit and any change to inputs or code
is a miss, never a stale hit.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Callable, Iterable

from datasets import Dataset, Features
from datasets.exceptions import DatasetGenerationError

from ..errors import InputError
from .schema import SegmentationInfo, attach_info

_PACKAGE_DIR = Path(__file__).resolve().parent


def code_digest() -> str:
    """Hash of every module in this package: editing a loader invalidates its caches."""
    digest = hashlib.sha256()
    for path in sorted(_PACKAGE_DIR.glob("*.py")):
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def file_stats(paths: Iterable[str | Path]) -> list[tuple[str, int, int]]:
    """(path, size, mtime) per file, the part of a fingerprint that tracks edited inputs."""
    stats = []
    for path in paths:
        stat = Path(path).stat()
        stats.append((str(path), stat.st_size, stat.st_mtime_ns))
    return stats


def check_count(n: Any) -> None:
    """`n` (images to keep) is None (all) or a positive int: a dataset of no images fails later,
    inside `datasets`, with nothing that names the cause."""
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise InputError(f"n must be a positive number of images (or None for all of them), got {n!r}")


def fingerprint(*parts: Any) -> str:
    payload = json.dumps([code_digest(), *parts], sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:32]


def build_dataset(
    generator: Callable[..., Iterable[dict]],
    *,
    gen_kwargs: dict,
    features: Features,
    info: SegmentationInfo,
    fingerprint: str,
    split: str,
    cache_dir: str | None = None,
    num_proc: int | None = None,
) -> Dataset:
    """Run ``generator(**gen_kwargs)`` through the Arrow cache and attach ``info``."""
    try:
        dataset = Dataset.from_generator(
            generator,
            features=features,
            gen_kwargs=gen_kwargs,
            cache_dir=cache_dir,
            num_proc=num_proc,
            fingerprint=fingerprint,
            split=split,
        )
    except DatasetGenerationError as error:
        # datasets wraps whatever the generator raised; our loaders raise precise
        # FileNotFoundError/ValueError messages that the caller should see unwrapped, and a
        # streamed hub source raises connection errors that its loader turns into advice.
        cause = error.__cause__
        while isinstance(cause, DatasetGenerationError) and cause.__cause__ is not None:
            cause = cause.__cause__
        if isinstance(cause, (FileNotFoundError, ValueError, ConnectionError, TimeoutError)):
            raise cause from None
        raise
    return attach_info(dataset, info)
