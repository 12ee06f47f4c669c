"""Tiled: the embedded server, writing runs with TiledWriter (spooled through outages), replay
of archived runs, and watching derived runs live (websocket streaming)."""

from ._replay import connect, replay_run
from ._server import EmbeddedTiled, TiledUnavailableError, default_data_dir, load_api_key
from ._spool import SpooledWriter, SpoolStats, default_spool_dir, flush_spool, spool_status
from ._watch import DerivedRunWatcher, WatchResult, watch_derived_runs

__all__ = [
    "DerivedRunWatcher",
    "EmbeddedTiled",
    "SpoolStats",
    "SpooledWriter",
    "TiledUnavailableError",
    "WatchResult",
    "connect",
    "default_data_dir",
    "default_spool_dir",
    "flush_spool",
    "load_api_key",
    "replay_run",
    "spool_status",
    "watch_derived_runs",
]
