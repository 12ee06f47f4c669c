"""Documents as NATS message payloads: JSON, with numpy arrays (inline detector images) carried
as raw bytes in base64 so that they come back with their dtype and shape, bit for bit.

What would not come back is refused at encode time (``TypeError``), so that a publisher counts
the document as dropped rather than storing one that no worker can read: object arrays (their
bytes are pointers) and structured arrays (their fields would be lost). As in any JSON, dict
keys come back as strings."""

from __future__ import annotations

import base64
import json

import numpy as np

__all__ = ["encode", "decode"]

_ARRAY = "__ndarray__"


def _default(obj):
    if isinstance(obj, np.ndarray):
        if obj.dtype.hasobject or obj.dtype.names is not None:
            raise TypeError(f"cannot encode a numpy array of dtype {obj.dtype} in a document "
                            "(object or structured arrays do not survive as bytes)")
        arr = np.ascontiguousarray(obj)
        return {_ARRAY: [arr.dtype.str, list(arr.shape),
                         base64.b64encode(arr.tobytes()).decode("ascii")]}
    if isinstance(obj, np.generic):
        return obj.item()
    raise TypeError(f"cannot encode {type(obj).__name__} in a document")


def _hook(obj: dict):
    if _ARRAY in obj and len(obj) == 1:
        dtype, shape, data = obj[_ARRAY]
        return np.frombuffer(base64.b64decode(data), dtype=np.dtype(dtype)).reshape(shape)
    return obj


def encode(name: str, doc: dict) -> bytes:
    """``(name, doc)`` -> bytes.

    Raises
    ------
    TypeError
        ``doc`` holds something :func:`decode` could not give back (module docstring).
    """
    return json.dumps({"name": name, "doc": doc}, default=_default,
                      separators=(",", ":")).encode()


def decode(payload: bytes) -> tuple[str, dict]:
    """bytes -> ``(name, doc)``."""
    msg = json.loads(payload, object_hook=_hook)
    return msg["name"], msg["doc"]
