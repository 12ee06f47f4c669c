"""Shared fixtures. Keep tests single-threaded-friendly: the CI machine has 2 cores."""

from __future__ import annotations

import os

import pytest
import torch

# Two cores on CI: avoid oversubscription between torch and BLAS.
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(params=["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
def device(request) -> str:
    """Every physics test runs on the CPU, and on CUDA too when a GPU is present."""
    return request.param
