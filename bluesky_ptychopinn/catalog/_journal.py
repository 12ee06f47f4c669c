"""An append-only file of Bluesky documents, one per run, that round-trips numpy arrays exactly.

A record is ``MAGIC | payload length (u64) | crc32 (u32) | payload``; the payload is a JSON
header ``[name, doc]`` in which every numpy array (and numpy scalar) is replaced by a reference,
followed by the arrays in ``.npy`` format (``allow_pickle=False``: dtype, shape and bytes are
kept, and reading a journal never runs code; ``np.float64`` scalars, a subclass of ``float``,
are written by JSON as the same double and come back as ``float``). A record cut short by a
crash, or damaged, ends the journal there: everything before it is read back, nothing after.

Only numpy and the standard library are used (the project depends on nothing like msgpack).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["JournalWriter", "decode_document", "encode_document", "read_headers", "read_journal",
           "read_record_at"]

MAGIC = b"BPJ1"
_FRAME = struct.Struct("<4sQI")  # magic, payload length, crc32 of the payload
_HEADER_LEN = struct.Struct("<I")
_ARRAY = "__bpj_ndarray__"
_SCALAR = "__bpj_npscalar__"


def encode_document(name: str, doc: dict) -> bytes:
    """One journal record (framing included) for the document ``(name, doc)``.

    Parameters
    ----------
    name : str
        Document type (``"start"``, ``"event"``, ...).
    doc : dict
        The document; numpy arrays and scalars anywhere inside it are stored exactly.

    Returns
    -------
    bytes
        The framed record.
    """
    arrays: list[np.ndarray] = []

    def default(obj: Any) -> Any:
        if isinstance(obj, np.ndarray):
            if obj.dtype.hasobject:  # .npy would need pickle: store the values as JSON
                return obj.tolist()
            arrays.append(obj)
            return {_ARRAY: len(arrays) - 1}
        if isinstance(obj, np.generic):
            arrays.append(np.asarray(obj))
            return {_SCALAR: len(arrays) - 1}
        raise TypeError(f"cannot journal a {type(obj).__name__} in a {name!r} document")

    header = json.dumps([name, doc], default=default, separators=(",", ":")).encode()
    buf = io.BytesIO()
    buf.write(_HEADER_LEN.pack(len(header)))
    buf.write(header)
    for array in arrays:
        np.lib.format.write_array(buf, array, allow_pickle=False)
    payload = buf.getvalue()
    return _FRAME.pack(MAGIC, len(payload), zlib.crc32(payload)) + payload


def decode_document(payload: bytes) -> tuple[str, dict]:
    """The ``(name, doc)`` of a record's payload (the bytes after its frame header)."""
    (header_len,) = _HEADER_LEN.unpack_from(payload)
    start = _HEADER_LEN.size
    header = payload[start:start + header_len]
    buf = io.BytesIO(payload)
    buf.seek(start + header_len)
    arrays: list[np.ndarray] = []
    # The arrays follow in the order json.dumps met them: read them all first.
    while buf.tell() < len(payload):
        arrays.append(np.lib.format.read_array(buf, allow_pickle=False))

    def hook(obj: dict) -> Any:
        if len(obj) == 1:
            if _ARRAY in obj:
                return arrays[obj[_ARRAY]]
            if _SCALAR in obj:
                return arrays[obj[_SCALAR]][()]
        return obj

    name, doc = json.loads(header, object_hook=hook)
    return name, doc


def read_journal(path: str | Path, start: int = 0) -> Iterator[tuple[int, str, dict]]:
    """Documents of a journal from byte offset ``start``, as ``(offset, name, doc)``.

    Stops quietly at the end of the file or at a truncated or damaged record (what a crash
    during an append leaves behind).
    """
    with open(path, "rb") as fh:
        fh.seek(start)
        while True:
            offset = fh.tell()
            payload = _read_record(fh)
            if payload is None:
                return
            name, doc = decode_document(payload)
            yield offset, name, doc


def read_headers(path: str | Path) -> Iterator[tuple[int, str, dict]]:
    """Like :func:`read_journal` without reading the arrays: each array in ``doc`` is left as
    its reference. Enough to count and route documents of a large journal quickly."""
    with open(path, "rb") as fh:
        while True:
            offset = fh.tell()
            payload = _read_record(fh)
            if payload is None:
                return
            (header_len,) = _HEADER_LEN.unpack_from(payload)
            name, doc = json.loads(payload[_HEADER_LEN.size:_HEADER_LEN.size + header_len])
            yield offset, name, doc


def read_record_at(fh, offset: int) -> tuple[str, dict]:
    """The document of the record at ``offset`` of the open binary file ``fh``."""
    fh.seek(offset)
    payload = _read_record(fh)
    if payload is None:
        raise OSError(f"journal {getattr(fh, 'name', '?')}: no complete record at {offset}")
    return decode_document(payload)


def _read_record(fh) -> bytes | None:
    frame = fh.read(_FRAME.size)
    if len(frame) < _FRAME.size:
        return None
    magic, length, crc = _FRAME.unpack(frame)
    if magic != MAGIC:
        return None
    payload = fh.read(length)
    if len(payload) < length or zlib.crc32(payload) != crc:
        return None
    return payload


class JournalWriter:
    """Appends records to one journal file (created 0600; an existing one is appended to).

    Parameters
    ----------
    path : path
        The journal file.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self.size = os.fstat(self._fd).st_size
        self._torn = False  # bytes of a failed append may be past ``size``

    def fileno(self) -> int:
        return self._fd

    def append(self, record: bytes) -> int:
        """Write ``record`` (from :func:`encode_document`); returns its offset.

        Unbuffered: once this returns the record is in the operating system's hands, where
        another process (``spool flush``) and a later start of this one can read it.

        A write that fails part-way (``ENOSPC``, ``EFBIG``) leaves no partial record behind:
        the file is cut back to its last whole record before the error is raised, so the
        offsets of later records stay right and a reader after a restart does not stop at the
        torn one (losing every record after it, the stop document included).

        Raises
        ------
        OSError
            The record could not be written; the journal is as it was before the call.
        """
        if self._torn:  # an earlier failed append could not cut its bytes off: try again
            self._truncate()
        offset = self.size
        view = memoryview(record)
        try:
            while view:  # os.write may write less than asked (a signal, a full pipe)
                view = view[os.write(self._fd, view):]
        except BaseException:
            if len(view) != len(record):  # part of it is in the file (O_APPEND: at the end)
                self._torn = True
                with contextlib.suppress(OSError):
                    self._truncate()
            raise
        self.size += len(record)
        return offset

    def _truncate(self) -> None:
        """Cut the file back to ``self.size`` (the end of its last whole record)."""
        os.ftruncate(self._fd, self.size)
        self._torn = False

    def sync(self) -> None:
        """Make the journal durable (fsync), e.g. once a run's stop document is in."""
        os.fsync(self._fd)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)  # drops any flock held on it
            self._fd = -1
