"""Small helpers that turn user input into tensors with checked shapes."""

from __future__ import annotations

import numpy as np
import torch

from ..errors import InvalidInputError

ArrayLike = "np.ndarray | torch.Tensor"


def as_tensor(
    value: np.ndarray | torch.Tensor,
    *,
    name: str,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Return ``value`` as a tensor (no copy when it already is one of the right kind)."""
    if isinstance(value, torch.Tensor):
        tensor = value
    else:
        try:
            tensor = torch.as_tensor(np.asarray(value))
        except (TypeError, ValueError) as exc:
            raise InvalidInputError(
                f"{name}: cannot convert {type(value).__name__} to an array"
            ) from exc
    if dtype is not None and tensor.dtype != dtype:
        if tensor.is_complex() and not dtype.is_complex:
            raise InvalidInputError(f"{name}: expected a real array, got {tensor.dtype}")
        tensor = tensor.to(dtype)
    if device is not None:
        tensor = tensor.to(device)
    return tensor


def complex_dtype_for(tensor: torch.Tensor) -> torch.dtype:
    """The complex dtype matching a real or complex tensor's precision."""
    if tensor.dtype in (torch.float64, torch.complex128):
        return torch.complex128
    return torch.complex64


def check_finite(tensor: torch.Tensor, name: str) -> None:
    """Raise :class:`InvalidInputError` if ``tensor`` holds NaN or infinity."""
    if not bool(torch.isfinite(tensor).all()):
        bad = int((~torch.isfinite(tensor)).sum())
        raise InvalidInputError(f"{name}: {bad} non-finite value(s) (NaN or inf)")


def check_positions(positions: torch.Tensor, name: str = "positions") -> None:
    """Positions must be a finite (n, 2) array of (y, x)."""
    if positions.ndim != 2 or positions.shape[-1] != 2:
        raise InvalidInputError(
            f"{name}: expected shape (n, 2) of (y, x) probe centres, got {tuple(positions.shape)}"
        )
    check_finite(positions, name)


def as_probe_modes(probe: torch.Tensor, name: str = "probe") -> torch.Tensor:
    """Give a probe an explicit mode axis: (N, N) -> (1, N, N); (M, N, N) kept."""
    if probe.ndim == 2:
        return probe.unsqueeze(0)
    if probe.ndim in (3, 4) and probe.shape[-1] == probe.shape[-2]:
        return probe
    raise InvalidInputError(
        f"{name}: expected (N, N), (M, N, N) or (B, M, N, N) with square frames, "
        f"got {tuple(probe.shape)}"
    )


def check_size(value: object, name: str, minimum: int = 1) -> int:
    """An integer size (a patch or frame side, a count) of at least ``minimum``, as an int.

    Floats are refused even when whole (32.0): a size computed by division has gone through
    float arithmetic somewhere it should not, and slicing with it fails deep inside anyway.
    """
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise InvalidInputError(f"{name}: expected an integer >= {minimum}, got {value!r}")
    return int(value)
