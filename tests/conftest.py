from __future__ import annotations

import os
import tempfile

import pytest

import rkort

RKNN = "RKNNExecutionProvider"

# Nothing a test does lands in the user's own cache: tests that need a cache of their own say so
# (the cache_dir fixture), the rest share one private to this test run.
os.environ["RKORT_CACHE_DIR"] = tempfile.mkdtemp(prefix="rkort-test-cache-")
# Strict: a bug inside rkort's NPU path raises here instead of being answered by onnxruntime, as
# it would be for a user (tests of that answer unset it).
os.environ.setdefault("RKORT_STRICT", "1")

needs_rknn = pytest.mark.skipif(
    RKNN not in rkort.get_available_providers(),
    reason="no RKNN backend (toolkit or board runtime) here",
)


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):  # type: ignore[no-untyped-def]
    """A private, empty cache for one test (never the user's)."""
    d = tmp_path / "cache"
    monkeypatch.setenv("RKORT_CACHE_DIR", str(d))
    return d
