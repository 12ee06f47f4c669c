"""Tiled: the embedded server, writing runs with TiledWriter (spooled through outages), and
replay of archived runs."""

from ._replay import connect, replay_run
from ._server import EmbeddedTiled, TiledUnavailableError, default_data_dir, load_api_key
from ._spool import SpooledWriter, SpoolStats, default_spool_dir, flush_spool, spool_status

__all__ = [
    "EmbeddedTiled",
    "SpoolStats",
    "SpooledWriter",
    "TiledUnavailableError",
    "connect",
    "default_data_dir",
    "default_spool_dir",
    "flush_spool",
    "load_api_key",
    "replay_run",
    "spool_status",
]
