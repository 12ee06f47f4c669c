"""Tiled: the embedded server, writing runs with TiledWriter, and replay of archived runs."""

from ._server import EmbeddedTiled, TiledUnavailableError, default_data_dir, load_api_key

__all__ = ["EmbeddedTiled", "TiledUnavailableError", "default_data_dir", "load_api_key"]
