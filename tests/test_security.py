"""Security and robustness of the file readers and of the embedded Tiled server (issue 11).

Everything here is real: files on disk, a real Tiled server over HTTP, the real CLI in a
subprocess.
"""

from __future__ import annotations

import os
import socket
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bluesky_ptychopinn.errors import FileFormatError
from bluesky_ptychopinn.io import PtychoDataset, read_dataset, read_probe, write_cxi

CLI = str(Path(sys.executable).with_name("bluesky-ptychopinn"))
N = 16


def _run_cli(*args: str, timeout: float = 120, env: dict | None = None
             ) -> subprocess.CompletedProcess:
    return subprocess.run([CLI, *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "COLUMNS": "80", **(env or {})})


def _assert_one_line_error(result: subprocess.CompletedProcess, *words: str) -> None:
    """A failed command: non-zero exit, one line on stderr naming the problem, no traceback."""
    assert result.returncode != 0, result
    lines = result.stderr.strip().splitlines()
    assert "Traceback" not in result.stderr, result.stderr
    assert len(lines) == 1, result.stderr
    for word in words:
        assert word in lines[0], lines[0]


# --- truncated CXI -------------------------------------------------------------------------


@pytest.fixture()
def truncated_cxi(tmp_path) -> Path:
    """A CXI file cut at half its length (an interrupted copy)."""
    rng = np.random.default_rng(0)
    probe = np.exp(-((np.mgrid[:N, :N] - N // 2) ** 2).sum(0) / 20.0)[None].astype(np.complex64)
    ds = PtychoDataset(rng.poisson(20, (6, N, N)).astype(np.float32),
                       rng.uniform(10, 20, (6, 2)), probe, energy_ev=8_000.0,
                       detector_distance_m=1.0, detector_pixel_size_m=75e-6)
    full = write_cxi(ds, tmp_path / "full.cxi")
    cut = tmp_path / "cut.cxi"
    data = full.read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    return cut


def test_truncated_cxi_is_a_file_format_error(truncated_cxi):
    with pytest.raises(FileFormatError, match="truncated") as error:
        read_dataset(truncated_cxi)
    assert error.value.path == str(truncated_cxi)
    with pytest.raises(FileFormatError, match="truncated"):
        read_probe(truncated_cxi)


def test_truncated_cxi_is_one_line_through_the_cli(truncated_cxi):
    result = _run_cli("reconstruct", str(truncated_cxi), "--epochs", "1")
    _assert_one_line_error(result, "cut.cxi", "truncated")


# --- the embedded Tiled server ---------------------------------------------------------------


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_data_directory_is_created_private(tiled):
    """catalog.db, storage.duckdb and the zarr arrays sit in a 0700 directory."""
    client = tiled.client()
    client.write_array(np.arange(10.0), key="x")  # something in data/ and catalog.db
    assert (tiled.data_dir / "catalog.db").is_file()
    assert _mode(tiled.data_dir) == 0o700
    assert _mode(tiled.data_dir / "api_key") == 0o600


def test_existing_open_data_directory_is_made_private(tmp_path):
    from bluesky_ptychopinn.catalog import EmbeddedTiled

    data_dir = tmp_path / "old"
    data_dir.mkdir(mode=0o755)
    os.chmod(data_dir, 0o755)  # what an older version left behind
    EmbeddedTiled(data_dir)
    assert _mode(data_dir) == 0o700


@pytest.fixture()
def open_key_dir(tmp_path) -> Path:
    """A data directory whose api_key others can read (mode 0644)."""
    data_dir = tmp_path / "catalog"
    data_dir.mkdir(mode=0o700)
    key = data_dir / "api_key"
    key.write_text("0123456789abcdef\n")
    os.chmod(key, 0o644)
    return data_dir


def test_readable_key_file_is_refused(open_key_dir):
    from bluesky_ptychopinn.catalog import EmbeddedTiled, TiledUnavailableError

    with pytest.raises(TiledUnavailableError, match="readable by others"):
        EmbeddedTiled(open_key_dir)
    assert _mode(open_key_dir / "api_key") == 0o644  # refused, not silently changed
    (open_key_dir / "api_key").unlink()
    os.symlink(open_key_dir.parent / "elsewhere", open_key_dir / "api_key")
    with pytest.raises(TiledUnavailableError, match="regular file"):
        EmbeddedTiled(open_key_dir)


def test_serve_refuses_a_readable_key_file(open_key_dir):
    result = _run_cli("serve", "--data-dir", str(open_key_dir), "--port", "0", timeout=60)
    _assert_one_line_error(result, "readable by others", "api_key")
    assert "readable by you only" not in result.stdout + result.stderr


@pytest.fixture()
def busy_port():
    """A port on 127.0.0.1 with a listener on it."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


def test_port_in_use_is_a_clear_error(tmp_path, busy_port):
    from bluesky_ptychopinn.catalog import EmbeddedTiled, TiledUnavailableError

    server = EmbeddedTiled(tmp_path / "catalog", port=busy_port)
    with pytest.raises(TiledUnavailableError, match="already in use"):
        server.start()
    # the failed start released the directory: the same server starts on a free port
    server.port = 0
    with server:
        assert server.client() is not None


def test_serve_on_a_port_in_use_is_one_line(tmp_path, busy_port):
    result = _run_cli("serve", "--data-dir", str(tmp_path / "catalog"), "--port",
                      str(busy_port), timeout=60)
    _assert_one_line_error(result, f"port {busy_port}", "already in use")


def test_second_server_on_a_data_directory_in_use(tiled):
    from bluesky_ptychopinn.catalog import EmbeddedTiled, TiledUnavailableError

    with pytest.raises(TiledUnavailableError, match="in use by another Tiled server"):
        EmbeddedTiled(tiled.data_dir).start()
    result = _run_cli("serve", "--data-dir", str(tiled.data_dir), "--port", "0", timeout=60)
    _assert_one_line_error(result, "in use by another Tiled server", f"pid {os.getpid()}")
    assert tiled.client() is not None  # the first server is unharmed


def test_two_servers_in_one_process_keep_their_own_keys(tiled, tmp_path):
    """Tiled keeps one process-wide settings object: a second server used to replace the first
    one's API key (the first then refused its own key and accepted the second's)."""
    from tiled.client import from_uri
    from tiled.client.utils import ClientError

    from bluesky_ptychopinn.catalog import EmbeddedTiled

    with EmbeddedTiled(tmp_path / "other") as other:
        assert other.api_key != tiled.api_key
        assert tiled.client() is not None and other.client() is not None
        for server, key in ((tiled, other.api_key), (other, tiled.api_key)):
            with pytest.raises(ClientError, match="401"):
                from_uri(server.uri, api_key=key)
