"""The embedded server's websocket streaming cache, bounded in bytes.

Tiled's in-process ``memory`` streaming datastore (tiled 0.2.20,
``tiled.server.streaming.TTLCacheDatastore``) keeps every update it streams (new children,
array writes and patches, table appends: the request body itself, as ``payload``) in one
``cachetools.TTLCache`` of ``maxsize`` *entries* (default 1000, shared by all nodes) for
``data_ttl`` seconds (3600). Its only bounds are a count and a time. A derived run of 500
frames leaves 59 entries and 5-9 MiB (mostly the bodies of ``PUT /array/full``, the image
streams' arrays), so the cache grew by that much a run until its 1000th entry (after ~17
runs, 100-150 MiB for the soak's canvas) and would then stay there; with larger canvases
(``max_canvas_px`` = 8192: one float32 image is 256 MiB) 1000 entries can hold tens of GiB.
The growth of the RunEngine's process with the embedded server (docs/performance.md "Long
sessions") was this cache filling up: tracemalloc between runs 4 and 16 of 500 frames, +88 MiB
in 144 such bodies, +3.8 MiB in the cache's other entries, nothing else above 0.02 MiB.

:class:`ByteBoundedMemoryDatastore` is the same datastore (registered with tiled's
``register_datastore`` under :data:`DATASTORE`) whose data entries are weighed in bytes: the
least recently used (written or read) entries leave when the total would pass ``max_bytes``,
entries also expire after ``data_ttl``, and an entry larger than the whole budget is not kept
(it is still announced; a subscriber then skips it, as it skips an expired one). What the
cache is for: a subscriber reads each update from it right after the update's announcement,
and one that subscribes late (``bluesky-ptychopinn watch`` joining a run) replays what the
cache still holds of the node; the watcher reads over HTTP what is no longer there.
"""

from __future__ import annotations

import logging
from typing import Any

import cachetools
from tiled.server.streaming import TTLCacheDatastore, register_datastore

__all__ = ["DATASTORE", "ByteBoundedMemoryDatastore", "cache_config"]

logger = logging.getLogger(__name__)

#: The name the datastore is registered under (``cache_config["datastore"]``).
DATASTORE = "ptychopinn-bounded-memory"

#: Bytes counted per entry on top of its payload and metadata: the entry's dict, its key,
#: the cache's links (so that many small entries, e.g. end-of-stream notices, count too).
ENTRY_OVERHEAD_BYTES = 512


def _entry_bytes(mapping: dict) -> int:
    return (ENTRY_OVERHEAD_BYTES + len(mapping.get("payload") or b"")
            + len(mapping.get("metadata") or b""))


class _ByteBudget(cachetools.TTLCache):
    """A TTL + LRU cache of at most ``maxsize`` bytes that drops an entry larger than that
    instead of raising (``cachetools`` raises ``ValueError``, which would fail the writer's
    request)."""

    def __init__(self, maxsize: int, ttl: float) -> None:
        super().__init__(maxsize=maxsize, ttl=ttl, getsizeof=_entry_bytes)
        self.too_large = 0

    def __setitem__(self, key, value) -> None:
        if self.getsizeof(value) > self.maxsize:
            self.pop(key, None)
            self.too_large += 1
            logger.debug("streaming cache: %s (%d bytes) exceeds the budget of %d bytes: "
                         "not kept", key, self.getsizeof(value), self.maxsize)
            return
        super().__setitem__(key, value)


@register_datastore(DATASTORE)
class ByteBoundedMemoryDatastore(TTLCacheDatastore):
    """Tiled's in-process streaming datastore with its data entries bounded in bytes.

    Settings (the ``cache_config`` dict): those of ``TTLCacheDatastore`` (``data_ttl``,
    ``seq_ttl``, ``maxsize`` for the per-node sequence counters) and ``max_bytes``, the
    budget of the data entries.
    """

    def __init__(self, settings: dict[str, Any]) -> None:
        super().__init__(settings)
        self.max_bytes = int(settings["max_bytes"])
        # Replaces the parent's count-bounded data cache (same role, same TTL).
        self._data_cache = _ByteBudget(self.max_bytes, settings.get("data_ttl", 3600))

    @property
    def nbytes(self) -> int:
        """Bytes the data entries take now (as weighed: payload + metadata + overhead)."""
        self._data_cache.expire()
        return int(self._data_cache.currsize)

    @property
    def entries(self) -> int:
        """Data entries held now."""
        self._data_cache.expire()
        return len(self._data_cache)

    @property
    def too_large(self) -> int:
        """Entries not kept because each alone exceeded the budget."""
        return self._data_cache.too_large


def cache_config(max_mib: float) -> dict[str, Any]:
    """The catalog's ``cache_config`` for :class:`ByteBoundedMemoryDatastore`.

    Tiled's own settings (``StreamingCacheConfig``: ``data_ttl`` 3600 s, ``seq_ttl``) with
    the datastore and its byte budget. ``uri`` is left unset: tiled's catalog maps a
    ``memory`` URI to its own datastore, overriding ``datastore``.
    """
    from tiled.config import StreamingCacheConfig

    if not max_mib > 0:
        raise ValueError(f"streaming cache budget must be > 0 MiB, not {max_mib}")
    config = StreamingCacheConfig(uri="memory").model_dump()
    config.update(uri=None, datastore=DATASTORE, max_bytes=int(max_mib * 2**20))
    return config
