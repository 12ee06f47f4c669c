"""The embedded Tiled server: SQLite catalog + zarr + DuckDB under one data directory, served
over HTTP on 127.0.0.1, with the Bluesky json-seq exporter registered and the root container
marked as a ``CatalogOfBlueskyRuns`` (so ``client[-1]`` and partial uids work)."""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import stat
import threading
import time
from pathlib import Path
from urllib.parse import quote_plus

import httpx
import uvicorn

from ..errors import PtychoError

__all__ = ["EmbeddedTiled", "load_api_key", "default_data_dir", "TiledUnavailableError"]

logger = logging.getLogger(__name__)


class TiledUnavailableError(PtychoError, ConnectionError):
    """The Tiled server cannot be started or reached."""


def default_data_dir() -> Path:
    """``$PTYCHOPINN_DATA`` or ``~/.local/share/bluesky-ptychopinn/tiled``."""
    env = os.environ.get("PTYCHOPINN_DATA")
    return Path(env) if env else Path.home() / ".local" / "share" / "bluesky-ptychopinn" / "tiled"


def load_api_key(data_dir: Path) -> str:
    """The server's API key, generated on first use and stored readable by the user only."""
    path = Path(data_dir) / "api_key"
    if path.is_file():
        return path.read_text().strip()
    path.parent.mkdir(parents=True, exist_ok=True)
    key = secrets.token_hex(16)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, stat.S_IRUSR | stat.S_IWUSR)
    with os.fdopen(fd, "w") as fh:
        fh.write(key + "\n")
    return key


def _serialization_registry():
    from bluesky_tiled_plugins.exporters import json_seq_exporter
    from tiled.media_type_registration import default_serialization_registry

    registry = default_serialization_registry
    # run.documents() needs this exporter; SimpleTiledServer does not register it.
    registry.register("BlueskyRun", "application/json-seq", json_seq_exporter)
    return registry


class _ThreadedServer(uvicorn.Server):
    def install_signal_handlers(self) -> None:  # the host process keeps its own handlers
        pass


class EmbeddedTiled:
    """A persistent local Tiled server for raw and derived runs.

    Parameters
    ----------
    data_dir : path, optional
        Holds ``catalog.db`` (SQLite), ``data/`` (zarr), ``storage.duckdb`` (tables) and the
        ``api_key`` file. Default :func:`default_data_dir`.
    readable : list of path, optional
        Directories of external files (detector HDF5) the server may read.
    port : int
        TCP port on 127.0.0.1 (0 = any free port).
    api_key : str, optional
        Default: read from / generated into ``data_dir/api_key``.

    Examples
    --------
    >>> with EmbeddedTiled(tmp_dir) as tiled:           # doctest: +SKIP
    ...     client = tiled.client()
    """

    def __init__(self, data_dir: str | Path | None = None, *, readable=(), port: int = 0,
                 api_key: str | None = None) -> None:
        self.data_dir = Path(data_dir or default_data_dir()).resolve()
        self.readable = [Path(p).resolve() for p in readable]
        self.port = port
        self.api_key = api_key or load_api_key(self.data_dir)
        self._server: _ThreadedServer | None = None
        self._thread: threading.Thread | None = None
        self.base_url: str | None = None

    # -- building -------------------------------------------------------------------------
    def build_app(self):
        """The ASGI app (usable with any ASGI server)."""
        from tiled.catalog import from_uri
        from tiled.config import Authentication, StreamingCacheConfig
        from tiled.server.app import build_app

        (self.data_dir / "data").mkdir(parents=True, exist_ok=True)
        for path in self.readable:
            path.mkdir(parents=True, exist_ok=True)
        catalog = from_uri(
            f"sqlite:///{self.data_dir / 'catalog.db'}",
            writable_storage=[self.data_dir / "data",
                              f"duckdb:///{self.data_dir / 'storage.duckdb'}"],
            readable_storage=self.readable or None,
            init_if_not_exists=True,
            specs=[{"name": "CatalogOfBlueskyRuns", "version": "3.0"}],
            cache_config=StreamingCacheConfig(uri="memory").model_dump(),
        )
        return build_app(
            catalog,
            authentication=Authentication(single_user_api_key=self.api_key),
            serialization_registry=_serialization_registry(),
        )

    # -- running --------------------------------------------------------------------------
    def start(self, timeout: float = 30.0) -> EmbeddedTiled:
        """Start serving on 127.0.0.1 in a background thread; returns when it answers."""
        try:
            app = self.build_app()
        except Exception as exc:
            raise TiledUnavailableError(f"cannot build the Tiled catalog in {self.data_dir}: "
                                        f"{exc}") from exc
        log_file = self.data_dir / "server.log"
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, loop="asyncio",
                                log_level="warning", access_log=False, log_config=None)
        self._server = _ThreadedServer(config)
        self._thread = threading.Thread(target=self._server.run, name="tiled-server", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise TiledUnavailableError(f"Tiled server did not start; see {log_file}")
            time.sleep(0.05)
        host, port = self._server.servers[0].sockets[0].getsockname()[:2]
        self.port = port
        self.base_url = f"http://{host}:{port}"
        with httpx.Client(trust_env=False) as client:
            while True:
                with contextlib.suppress(httpx.HTTPError):
                    if client.get(f"{self.base_url}/healthz", timeout=1.0).status_code == 200:
                        break
                if time.monotonic() > deadline:
                    raise TiledUnavailableError("Tiled server is not answering /healthz")
                time.sleep(0.05)
        logger.info("Tiled serving %s at %s", self.data_dir, self.base_url)
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
            if self._thread is not None:
                self._thread.join(timeout=10)
            self._server = None

    def __enter__(self) -> EmbeddedTiled:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- clients --------------------------------------------------------------------------
    @property
    def uri(self) -> str:
        """API URI (without the key)."""
        if self.base_url is None:
            raise TiledUnavailableError("server not started")
        return f"{self.base_url}/api/v1"

    @property
    def uri_with_key(self) -> str:
        return f"{self.uri}?api_key={quote_plus(self.api_key)}"

    def client(self):
        """A Tiled client of the root catalog."""
        from tiled.client import from_uri

        return from_uri(self.uri, api_key=self.api_key)
