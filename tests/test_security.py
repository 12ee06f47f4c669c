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

from bluesky_ptychopinn.errors import FileFormatError, PtychoError
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
