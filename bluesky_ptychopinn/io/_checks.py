"""Reading fields with errors that name the file, the field and what was expected."""

from __future__ import annotations

import numpy as np

from ..errors import FileFormatError


def require(container, key: str, path, *, ndim: int | None = None, kind: str | None = None):
    """``container[key]`` as an array, checked for presence, rank and dtype kind."""
    if key not in container:
        raise FileFormatError(path, key, "missing (required)")
    value = np.asarray(container[key][()] if hasattr(container[key], "shape") and
                       not isinstance(container[key], np.ndarray) else container[key])
    if ndim is not None and value.ndim != ndim:
        raise FileFormatError(path, key, f"expected {ndim} dimensions, got shape {value.shape}")
    if kind is not None and value.dtype.kind not in kind:
        raise FileFormatError(path, key, f"expected dtype kind {kind!r}, got {value.dtype}")
    return value


def optional(container, key: str):
    if key not in container:
        return None
    item = container[key]
    return np.asarray(item[()] if hasattr(item, "shape") and not isinstance(item, np.ndarray)
                      else item)
