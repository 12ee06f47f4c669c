"""The embedded Tiled server: SQLite catalog + zarr + DuckDB under one data directory, served
over HTTP on 127.0.0.1, with the Bluesky json-seq exporter registered and the root container
marked as a ``CatalogOfBlueskyRuns`` (so ``client[-1]`` and partial uids work)."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import secrets
import socket
import stat
import threading
import time
from pathlib import Path
from urllib.parse import quote_plus

import httpx
import uvicorn

from ..errors import PtychoError

__all__ = ["EmbeddedTiled", "load_api_key", "default_data_dir", "private_data_dir",
           "TiledUnavailableError"]

logger = logging.getLogger(__name__)

#: Default budget of the streaming cache's data entries, MiB (``EmbeddedTiled``).
DEFAULT_STREAM_CACHE_MIB = 64.0


class TiledUnavailableError(PtychoError, ConnectionError):
    """The Tiled server cannot be started or reached."""


def default_data_dir() -> Path:
    """``$PTYCHOPINN_DATA`` or ``~/.local/share/bluesky-ptychopinn/tiled``."""
    env = os.environ.get("PTYCHOPINN_DATA")
    return Path(env) if env else Path.home() / ".local" / "share" / "bluesky-ptychopinn" / "tiled"


#: Permission bits of group and others: none may be set on the data directory or the key.
_GROUP_OTHER = stat.S_IRWXG | stat.S_IRWXO


def private_data_dir(data_dir: str | Path) -> Path:
    """Create ``data_dir`` with mode 0700, or tighten an existing one of ours to 0700.

    The catalog, the zarr arrays and the DuckDB tables are plain files: on a shared machine a
    directory others can read would hand them the data the API key protects.

    Parameters
    ----------
    data_dir : path
        The server's data directory (parents are created with the default mode).

    Returns
    -------
    pathlib.Path
        ``data_dir``.

    Raises
    ------
    TiledUnavailableError
        The directory belongs to another user (its mode cannot be made private by us).
    """
    path = Path(data_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileExistsError):
        path.mkdir(mode=0o700)  # the umask can only remove bits: 0700 or stricter
    if os.name != "posix":  # no POSIX modes to set (Windows: the profile directory's ACL)
        return path
    info = path.stat()
    if info.st_uid != os.getuid():
        raise TiledUnavailableError(f"data directory {path} belongs to uid {info.st_uid}, not "
                                    "to you: use a directory of your own (--data-dir)")
    if info.st_mode & _GROUP_OTHER:
        # An older version created it 0755: fix it rather than refuse (the files inside are
        # only readable through it), and say so.
        os.chmod(path, 0o700)
        logger.warning("data directory %s was accessible to others (mode %o): now 0700",
                       path, stat.S_IMODE(info.st_mode))
    return path


def _check_key_file(path: Path, fd: int) -> None:
    """Refuse a key file that others could have read: its key may already be known."""
    if os.name != "posix":
        return
    info = os.fstat(fd)
    if info.st_uid != os.getuid():
        raise TiledUnavailableError(f"API key file {path} belongs to uid {info.st_uid}, not to "
                                    "you: remove it (a new key is generated on start)")
    if info.st_mode & _GROUP_OTHER:
        raise TiledUnavailableError(
            f"API key file {path} is readable by others (mode "
            f"{stat.S_IMODE(info.st_mode):04o}), so the key may be known to them: remove it "
            "to have a new key generated on start (clients then need the new key), or "
            f"`chmod 600 {path}` if nobody else can have read it")


def load_api_key(data_dir: Path) -> str:
    """The server's API key, generated on first use and stored readable by the user only.

    Parameters
    ----------
    data_dir : path
        Directory of the ``api_key`` file (created 0700 if missing).

    Returns
    -------
    str
        The key.

    Raises
    ------
    TiledUnavailableError
        An existing key file is readable by group or others, belongs to another user, is not
        a regular file (a symbolic link is not followed) or is empty.
    """
    path = private_data_dir(data_dir) / "api_key"
    nofollow = getattr(os, "O_NOFOLLOW", 0)
    try:
        # O_EXCL: never write a key through a link or over a file someone else just created
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | nofollow, 0o600)
    except FileExistsError:
        return _read_key_file(path, nofollow)
    key = secrets.token_hex(16)
    with os.fdopen(fd, "w") as fh:
        fh.write(key + "\n")
    return key


def _read_key_file(path: Path, nofollow: int) -> str:
    try:
        fd = os.open(path, os.O_RDONLY | nofollow)
    except OSError as exc:  # ELOOP: a symbolic link
        raise TiledUnavailableError(f"API key file {path} cannot be opened ({exc.strerror}); "
                                    "it must be a regular file of yours") from exc
    with os.fdopen(fd) as fh:
        if not stat.S_ISREG(os.fstat(fh.fileno()).st_mode):
            raise TiledUnavailableError(f"API key file {path} is not a regular file")
        _check_key_file(path, fh.fileno())
        key = fh.read().strip()
    if not key:
        raise TiledUnavailableError(f"API key file {path} is empty: remove it to have a new key "
                                    "generated")
    return key


def _listening_socket(port: int) -> socket.socket:
    """A socket bound to 127.0.0.1:``port`` (0: any free port), or a one-line error.

    Binding here rather than inside uvicorn's thread turns "port in use" into an exception
    the caller can report (uvicorn logs it and calls ``sys.exit`` in its thread).
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    # As uvicorn does: a port in TIME_WAIT after a restart is free; one with a listener is not.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(("127.0.0.1", port))
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise TiledUnavailableError(
                f"port {port} on 127.0.0.1 is already in use (another server?): choose another "
                "with --port, or 0 for any free port") from None
        raise TiledUnavailableError(f"cannot listen on 127.0.0.1:{port}: {exc.strerror}"
                                    ) from None
    return sock


class _DataDirLock:
    """An exclusive lock on a data directory, held while a server uses it.

    Two servers on one directory would fight over DuckDB's lock on ``storage.duckdb`` at the
    first table written (a traceback deep in a request); the lock file says so at start.
    """

    def __init__(self, data_dir: Path) -> None:
        self.path = data_dir / "server.lock"
        self._fd: int | None = None

    def acquire(self) -> None:
        if os.name != "posix":  # no flock; DuckDB's own lock still refuses a second writer
            return
        import fcntl

        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise TiledUnavailableError(
                f"data directory {self.path.parent} is in use by another Tiled server (pid "
                f"{holder}): connect to that one (--tiled URI) or use another --data-dir"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None


def _serialization_registry():
    from bluesky_tiled_plugins.exporters import json_seq_exporter
    from tiled.media_type_registration import default_serialization_registry

    registry = default_serialization_registry
    # run.documents() needs this exporter; SimpleTiledServer does not register it.
    registry.register("BlueskyRun", "application/json-seq", json_seq_exporter)
    return registry


def _own_settings(app) -> None:
    """Give ``app`` its own copy of Tiled's settings (the API key among them).

    Tiled's ``build_app`` writes the key into one process-wide ``Settings`` object
    (``get_settings`` is cached): a second server in the same process would replace the
    first one's key, which then accepts the second key and refuses its own.
    """
    from tiled.server.settings import get_settings

    shared = app.dependency_overrides[get_settings]
    own = shared().model_copy()  # the call applies this app's authentication, then we copy
    app.dependency_overrides[get_settings] = lambda: own


class _ThreadedServer(uvicorn.Server):
    def install_signal_handlers(self) -> None:  # the host process keeps its own handlers
        pass

    async def startup(self, sockets=None) -> None:
        # Tiled runs its blocking storage calls in anyio's worker threads, and two writers
        # appending table partitions at once (two TiledWriters, e.g. raw and derived runs or
        # two remote workers) then reach the one DuckDB connection from two threads: DuckDB
        # aborts the whole process (seen in tests/test_distributed.py). One worker thread
        # serialises them; the event loop still serves requests concurrently.
        import anyio.to_thread

        anyio.to_thread.current_default_thread_limiter().total_tokens = 1
        await super().startup(sockets=sockets)


class EmbeddedTiled:
    """A persistent local Tiled server for raw and derived runs.

    Parameters
    ----------
    data_dir : path, optional
        Holds ``catalog.db`` (SQLite), ``data/`` (zarr), ``storage.duckdb`` (tables) and the
        ``api_key`` file. Default :func:`default_data_dir`. Created (or tightened to) mode
        0700; one server at a time uses it (``server.lock``).
    readable : list of path, optional
        Directories of external files (detector HDF5) the server may read.
    port : int
        TCP port on 127.0.0.1 (0 = any free port).
    api_key : str, optional
        Default: read from / generated into ``data_dir/api_key``.
    streaming : bool
        Serve Tiled's websocket streaming (``/api/v1/stream/single/...``, what
        ``bluesky-ptychopinn watch`` subscribes to) from an in-process ``memory`` streaming
        cache: no Redis, since one process serves. ``False``: a server without it (as an
        external one may be).
    stream_cache_mib : float
        Budget of that cache's data entries (the streamed updates themselves, canvas images
        mostly), MiB: the least recently used leave when it is full, and all after tiled's
        ``data_ttl`` (an hour). Tiled's own ``memory`` datastore bounds them only by count
        (1000 entries, whatever their size); see
        :class:`~bluesky_ptychopinn.catalog._stream_cache.ByteBoundedMemoryDatastore`.

    Examples
    --------
    >>> with EmbeddedTiled(tmp_dir) as tiled:           # doctest: +SKIP
    ...     client = tiled.client()
    """

    def __init__(self, data_dir: str | Path | None = None, *, readable=(), port: int = 0,
                 api_key: str | None = None, streaming: bool = True,
                 stream_cache_mib: float = DEFAULT_STREAM_CACHE_MIB) -> None:
        self.streaming = streaming
        self.stream_cache_mib = float(stream_cache_mib)
        if not self.stream_cache_mib > 0:
            raise ValueError(f"stream_cache_mib must be > 0, not {stream_cache_mib}")
        self._catalog = None
        self.data_dir = Path(data_dir or default_data_dir()).resolve()
        self.readable = [Path(p).resolve() for p in readable]
        self.port = port
        private_data_dir(self.data_dir)
        self.api_key = api_key or load_api_key(self.data_dir)
        self._server: _ThreadedServer | None = None
        self._thread: threading.Thread | None = None
        self._lock = _DataDirLock(self.data_dir)
        # The server thread's state against stop(): a thread that outlives stop()'s wait
        # still has DuckDB open, so it, not stop(), releases the data directory when it ends.
        self._exit_guard = threading.Lock()
        self._serving = False
        self._release_on_exit = False
        self._failure: BaseException | None = None
        self.base_url: str | None = None

    # -- building -------------------------------------------------------------------------
    def build_app(self):
        """The ASGI app (usable with any ASGI server)."""
        from tiled.catalog import from_uri
        from tiled.config import Authentication
        from tiled.server.app import build_app

        from ._stream_cache import cache_config

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
            # The websocket streams' cache: updates of each node (new children, array
            # patches, table appends) kept an hour at most, within stream_cache_mib.
            cache_config=cache_config(self.stream_cache_mib) if self.streaming else None,
        )
        self._catalog = catalog
        app = build_app(
            catalog,
            authentication=Authentication(single_user_api_key=self.api_key),
            serialization_registry=_serialization_registry(),
        )
        _own_settings(app)
        return app

    # -- running --------------------------------------------------------------------------
    def start(self, timeout: float = 30.0) -> EmbeddedTiled:
        """Start serving on 127.0.0.1 in a background thread; returns when it answers.

        Raises
        ------
        TiledUnavailableError
            The port is in use, another server uses the data directory, the catalog cannot be
            built, or the server does not answer within ``timeout`` seconds.
        """
        self._lock.acquire()
        try:
            self._start(timeout)
        except BaseException:
            self.stop()
            raise
        logger.info("Tiled serving %s at %s", self.data_dir, self.base_url)
        return self

    def _start(self, timeout: float) -> None:
        sock = _listening_socket(self.port)
        try:
            app = self.build_app()
        except Exception as exc:
            sock.close()
            raise TiledUnavailableError(f"cannot build the Tiled catalog in {self.data_dir}: "
                                        f"{exc}") from exc
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, loop="asyncio",
                                log_level="warning", access_log=False, log_config=None)
        self._server = _ThreadedServer(config)
        self._failure = None
        self._thread = threading.Thread(target=self._serve, args=(self._server, sock),
                                        name="tiled-server", daemon=True)
        with self._exit_guard:
            self._serving = True
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                why = (f": {self._failure!r}" if self._failure is not None else
                       "" if self._thread.is_alive() else " (its thread ended)")
                raise TiledUnavailableError(f"Tiled server did not start{why}")
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

    def _serve(self, server: _ThreadedServer, sock: socket.socket) -> None:
        # Keep the reason: a failure in this thread would otherwise only be a traceback on
        # stderr, and start() would say "did not start" without it.
        try:
            server.run(sockets=[sock])
        except BaseException as exc:  # SystemExit from uvicorn's startup included
            self._failure = exc
        finally:
            sock.close()
            with self._exit_guard:
                self._serving = False
                if self._release_on_exit:  # stop() gave up waiting: the directory is free now
                    self._release_on_exit = False
                    self._lock.release()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop serving and release the data directory.

        Parameters
        ----------
        timeout : float
            How long to wait for the server thread to end. A thread still running then (a
            request that does not finish) keeps the data directory locked until it ends:
            a second server must not open the DuckDB file it still writes to.
        """
        if self._server is not None:
            self._server.should_exit = True
            if self._thread is not None:
                self._thread.join(timeout=timeout)
            self._server = None
        with self._exit_guard:
            if self._serving:
                if not self._release_on_exit:
                    logger.error("Tiled server thread still running %.0f s after stop(); "
                                 "%s stays locked until it ends", timeout, self.data_dir)
                self._release_on_exit = True
            elif not self._release_on_exit:
                self._lock.release()

    def __enter__(self) -> EmbeddedTiled:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def stream_cache(self):
        """The server's streaming datastore (``nbytes``, ``entries``, ``max_bytes``,
        ``too_large``), or ``None`` (not started yet, or ``streaming=False``)."""
        context = getattr(self._catalog, "context", None)
        cache = getattr(context, "streaming_cache", None)
        return None if cache is None else cache._datastore

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
