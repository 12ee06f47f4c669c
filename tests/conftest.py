"""Shared fixtures. Keep tests single-threaded-friendly: the CI machine has 2 cores."""

from __future__ import annotations

import os

import pytest
import torch

# Two cores on CI: avoid oversubscription between torch and BLAS.
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture()
def one_torch_thread():
    """One torch thread for the test: 64-px FFTs gain nothing from a second one, and OpenMP
    spin-waits make a shared 2-core machine up to 100x slower when another process holds a
    core (``pytestmark = pytest.mark.usefixtures("one_torch_thread")``)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(params=["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
def device(request) -> str:
    """Every physics test runs on the CPU, and on CUDA too when a GPU is present."""
    return request.param


@pytest.fixture(scope="module")
def tiled(tmp_path_factory):
    """A real Tiled server over HTTP on 127.0.0.1 (one per test module), allowed to read the
    HDF5 files a simulated detector writes under ``server.detector_dir``."""
    from bluesky_ptychopinn.catalog import EmbeddedTiled

    root = tmp_path_factory.mktemp("tiled")
    with EmbeddedTiled(root / "catalog", readable=[root / "detector"]) as server:
        server.detector_dir = root / "detector"
        yield server
