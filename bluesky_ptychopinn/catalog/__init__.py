"""Tiled: the embedded server, writing runs with TiledWriter, and replay of archived runs."""

from ._replay import connect, replay_run
from ._server import EmbeddedTiled, TiledUnavailableError, default_data_dir, load_api_key

__all__ = [
    "EmbeddedTiled",
    "TiledUnavailableError",
    "connect",
    "default_data_dir",
    "load_api_key",
    "replay_run",
]
