"""The compiled-blob cache (see :mod:`rkort.cache.store`): entries, keys and memoized hashes.

``entry`` says what an entry is and when it can be trusted, ``hashes`` memoizes model content
hashes, ``store`` is the :class:`Cache` itself.
"""

from __future__ import annotations

from ..files import BlobNotWritten
from .entry import FORMAT_VERSION, IDENTITY_FIELDS, CacheError, Entry, default_cache_dir, make_key
from .store import Cache

__all__ = [
    "FORMAT_VERSION",
    "IDENTITY_FIELDS",
    "BlobNotWritten",
    "Cache",
    "CacheError",
    "Entry",
    "default_cache_dir",
    "make_key",
]
