"""The reconstruction's inbox, bounded in bytes as well as in documents.

A count of documents alone does not bound memory: 100,000 queued events of 1 MB inline frames
hold 100 GB. :class:`MeteredQueue` wraps the transport's queue (a :class:`queue.Queue` or a
:class:`multiprocessing.Queue`) and counts the bytes put and not yet taken: the producer
reserves an item's bytes before it is queued and the consumer (in another thread or process)
releases them when it takes the item. A full byte budget is a full queue:
``put_nowait`` raises :class:`queue.Full` (``backpressure="skip"`` drops the frame) and ``put``
waits (``"block"``).
"""

from __future__ import annotations

import queue
import threading
import time
from numbers import Number

import numpy as np

__all__ = ["DEFAULT_MAX_QUEUE_BYTES", "LocalCounter", "MeteredQueue", "document_nbytes"]

#: Default byte budget of the documents queued for the reconstruction (1 GiB): about 16,000
#: inline 128 x 128 float32 frames, 4,000 of 256 x 256.
DEFAULT_MAX_QUEUE_BYTES = 1 << 30

#: How often a waiting ``put`` looks again for room in the byte budget.
_POLL_S = 0.005

_SCALAR_BYTES = 32  # a boxed Python number or a short string, with its pointer


def document_nbytes(obj) -> int:
    """Bytes an item holds, estimated without copying it.

    Arrays count their buffers exactly; a list counts its first element times its length (a
    frame sent as nested lists is regular), so nested data costs one walk down its first
    branch, not one per element.
    """
    if isinstance(obj, np.ndarray):
        return int(obj.nbytes)
    if isinstance(obj, (bytes, bytearray, memoryview, str)):
        return len(obj)
    if isinstance(obj, dict):
        return sum(document_nbytes(v) for v in obj.values()) + _SCALAR_BYTES * len(obj)
    if isinstance(obj, (list, tuple)):
        if not obj:
            return _SCALAR_BYTES
        if isinstance(obj, tuple) and len(obj) <= 8:  # a message ("doc", uid, name, doc)
            return sum(document_nbytes(v) for v in obj)
        return len(obj) * (document_nbytes(obj[0]) + 8)
    if obj is None or isinstance(obj, Number):
        return _SCALAR_BYTES
    nbytes = getattr(obj, "nbytes", None)  # torch tensors, array-likes
    return int(nbytes) if isinstance(nbytes, int) else _SCALAR_BYTES


class LocalCounter:
    """A number in this process, with the face of :func:`multiprocessing.RawValue`."""

    def __init__(self) -> None:
        self.value = 0


class MeteredQueue:
    """A queue of at most ``max_bytes`` of items (and ``inner``'s own count).

    The bytes queued are the difference of two totals, each written by one side only: the
    bytes ever put (by the producer, under a lock of its own process) and the bytes ever taken
    (by the one consumer). No lock is shared between the processes, so a consumer killed at
    any moment can never leave the producer (the RunEngine) waiting on one.

    Parameters
    ----------
    inner
        The queue that carries the items: ``put(item, timeout=)``, ``put_nowait(item)`` and
        ``get(timeout=)``; it is passed ``(nbytes, item)``.
    max_bytes : int
        Bytes reserved at most. One item larger than the whole budget is still let in when
        nothing else is queued (it could never be otherwise).
    totals : (put, taken), optional
        The two shared totals: :class:`LocalCounter` pairs (the default) when the consumer is
        a thread, ``multiprocessing.RawValue("q")`` pairs when it is another process (this
        object is then pickled into it). Aligned 64-bit integers, read and written whole.
    """

    def __init__(self, inner, max_bytes: int, totals=None) -> None:
        self.inner = inner
        self.max_bytes = int(max_bytes)
        self._put, self._taken = totals if totals is not None else (LocalCounter(),
                                                                    LocalCounter())
        self._producer_lock = threading.Lock()  # this process's producers (RunEngine, close)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        del state["_producer_lock"]  # the consumer's copy produces nothing
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._producer_lock = threading.Lock()

    # -- producer ------------------------------------------------------------------------------
    def _reserve(self, nbytes: int) -> bool:
        with self._producer_lock:
            held = self._put.value - self._taken.value
            if held > 0 and held + nbytes > self.max_bytes:
                return False
            self._put.value += nbytes
            return True

    def _unreserve(self, nbytes: int) -> None:
        with self._producer_lock:
            self._put.value -= nbytes

    def put_nowait(self, item) -> None:
        """Queue ``item`` now, or raise :class:`queue.Full` (no room in bytes or count)."""
        nbytes = document_nbytes(item)
        if not self._reserve(nbytes):
            raise queue.Full
        try:
            self.inner.put_nowait((nbytes, item))
        except BaseException:
            self._unreserve(nbytes)
            raise

    def put(self, item, timeout: float | None = None) -> None:
        """Queue ``item``, waiting up to ``timeout`` seconds for room (then
        :class:`queue.Full`; ``None``: for ever)."""
        nbytes = document_nbytes(item)
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._reserve(nbytes):
            if deadline is not None and time.monotonic() >= deadline:
                raise queue.Full
            time.sleep(_POLL_S)
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        try:
            self.inner.put((nbytes, item), timeout=left)
        except BaseException:
            self._unreserve(nbytes)
            raise

    # -- consumer ------------------------------------------------------------------------------
    def get(self, timeout: float | None = None):
        """The next item (raises :class:`queue.Empty` after ``timeout``); its bytes are free
        again from now on. One consumer only (the total taken has one writer)."""
        nbytes, item = self.inner.get(timeout=timeout)
        self._taken.value += nbytes
        return item

    def qsize(self) -> int:
        """Items queued now (approximate across processes, as the queue's own)."""
        return self.inner.qsize()

    @property
    def nbytes(self) -> int:
        """Bytes queued now."""
        return int(self._put.value - self._taken.value)
