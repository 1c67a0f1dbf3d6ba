"""The allocator setting behind cheap caching is applied on Linux and can be turned off."""

from __future__ import annotations

import sys

import pytest

from mmlens.model.runtime import allocator


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_trim_threshold_applied_once_and_opt_out(monkeypatch):
    monkeypatch.setattr(allocator, "_tuned", False)
    monkeypatch.setenv("MMLENS_MALLOC_TRIM_THRESHOLD", "0")
    assert allocator.tune_allocator() is False
    monkeypatch.delenv("MMLENS_MALLOC_TRIM_THRESHOLD")
    assert allocator.tune_allocator() is True
    assert allocator._tuned
