"""Input checks shared by the metrics: 2-D, finite, numeric, matching shapes."""

from __future__ import annotations

import numpy as np

from ..errors import InvalidInputError

__all__ = ["as_image", "as_pair"]


def as_image(image: object, name: str, *, allow_complex: bool = True) -> np.ndarray:
    """``image`` as a 2-D finite numeric array, or an :class:`InvalidInputError` naming it."""
    array = np.asarray(image)
    if array.ndim != 2:
        raise InvalidInputError(f"{name}: expected a 2-D image, got an array of shape "
                                f"{array.shape} ({array.ndim}-D)")
    kinds = "biufc" if allow_complex else "biuf"
    if array.dtype.kind not in kinds:
        what = "a real or complex" if allow_complex else "a real"
        hint = "" if allow_complex or array.dtype.kind != "c" else (
            "; take np.abs or np.angle of a complex object first")
        raise InvalidInputError(f"{name}: expected {what} numeric image, got dtype "
                                f"{array.dtype}{hint}")
    if array.size == 0:
        raise InvalidInputError(f"{name}: expected a non-empty image, got shape {array.shape}")
    if not np.isfinite(array).all():
        bad = int(np.count_nonzero(~np.isfinite(array)))
        raise InvalidInputError(f"{name}: contains NaN or inf ({bad} of {array.size} pixels)")
    return array


def as_pair(a: object, b: object, names: tuple[str, str], *, allow_complex: bool = True
            ) -> tuple[np.ndarray, np.ndarray]:
    """Two images checked by :func:`as_image` that must have one shape."""
    a = as_image(a, names[0], allow_complex=allow_complex)
    b = as_image(b, names[1], allow_complex=allow_complex)
    if a.shape != b.shape:
        raise InvalidInputError(f"{names[0]} and {names[1]} must have one shape, got "
                                f"{a.shape} and {b.shape}")
    return a, b
