"""A Tiled server in a child process (``bluesky-ptychopinn serve``) that can be killed with
SIGKILL and started again on the same port and data directory: a real outage."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class TiledProcess:
    """``serve --data-dir root/catalog`` on a fixed port; ``root/detector`` is readable."""

    def __init__(self, root: Path, port: int | None = None) -> None:
        self.data_dir = Path(root) / "catalog"
        self.detector_dir = Path(root) / "detector"
        self.detector_dir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.uri = f"{self.base_url}/api/v1"
        self.proc: subprocess.Popen | None = None

    @property
    def api_key(self) -> str:
        return (self.data_dir / "api_key").read_text().strip()

    def start(self, timeout: float = 60.0) -> TiledProcess:
        code = "from bluesky_ptychopinn.cli import app; app()"
        log = open(self.data_dir.parent / "server.log", "ab")  # noqa: SIM115 (the child's)
        self.proc = subprocess.Popen(
            [sys.executable, "-c", code, "serve", "--port", str(self.port),
             "--data-dir", str(self.data_dir)],
            # the server's own log, kept next to the data directory for a post-mortem
            stdout=log, stderr=log,
            env={**os.environ, "OMP_NUM_THREADS": "1"})
        log.close()  # the child has its own copy
        deadline = time.monotonic() + timeout
        with httpx.Client(trust_env=False) as http:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"tiled server exited with {self.proc.returncode}")
                try:
                    if http.get(f"{self.base_url}/healthz", timeout=1.0).status_code == 200:
                        return self
                except httpx.HTTPError:
                    pass
                time.sleep(0.1)
        raise RuntimeError("tiled server did not answer")

    def kill(self) -> None:
        """SIGKILL: no graceful shutdown, requests in flight are cut."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=30)
        self.proc = None

    def client(self):
        from tiled.client import from_uri

        return from_uri(self.uri, api_key=self.api_key)


def module_server(label: str):
    """A module-scoped fixture: one killable :class:`TiledProcess` for the tests of a module
    (``server = module_server("outage")`` at module level)."""
    import pytest

    @pytest.fixture(scope="module")
    def server(tmp_path_factory):
        proc = TiledProcess(tmp_path_factory.mktemp(label)).start()
        yield proc
        proc.kill()

    return server
