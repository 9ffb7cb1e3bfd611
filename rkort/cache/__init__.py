"""The compiled-blob cache (see :mod:`rkort.cache.store`): entries, keys and memoized hashes.

``entry`` says what an entry is and when it can be trusted, ``hashes`` memoizes model content
hashes, ``store`` is the :class:`Cache` itself, ``remote`` the shared remote cache it reads on a
miss and publishes to, ``bundle`` the tar files that carry entries from a build host to boards.
"""

from __future__ import annotations

from ..files import BlobNotWritten
from ..options import RKNNOptions
from . import store
from .bundle import BundleError, export_bundle, import_bundle
from .entry import FORMAT_VERSION, IDENTITY_FIELDS, CacheError, Entry, default_cache_dir, make_key
from .remote import open_remote
from .store import Cache

# The store sits below the remote in the layering; it is told here how to open one.
store.open_remote = open_remote


def session_cache(options: RKNNOptions) -> Cache:
    """The cache a session's engines share: the options' directory and remote."""
    return Cache(options.cache_dir, remote=options.remote_cache, remote_write=options.remote_write)


__all__ = [
    "FORMAT_VERSION",
    "IDENTITY_FIELDS",
    "BlobNotWritten",
    "BundleError",
    "Cache",
    "CacheError",
    "Entry",
    "default_cache_dir",
    "export_bundle",
    "import_bundle",
    "make_key",
    "session_cache",
]
