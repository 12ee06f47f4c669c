"""Transports move messages, nothing else: raw documents to :func:`~._serve.serve`, its
messages back to the RunEngine side (:class:`~._derived.DerivedRun`).

Every transport has the same face to
:class:`~bluesky_ptychopinn.callbacks.LiveReconstruction`: ``open(raw_uid, md, model_path,
model_info)``, ``put(item)`` (may wait, gives up if the far side is gone), ``put_nowait(item)``
(raises :class:`queue.Full`), ``close(timeout)`` and ``pid``; and it calls back
``deliver(kind, raw_uid, payload)`` for each message, ``tick()`` when the throttles may have
something to publish, and ``lost(raw_uids, reason)`` when runs it held can no longer finish.
This module has the thread transport; :mod:`._process` the process one.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterable

from ..metadata import PtychoMetadata
from ._metered_queue import MeteredQueue
from ._serve import serve
from ._settings import WorkerSettings

__all__ = ["Deliver", "Lost", "ThreadTransport", "TICK_S", "pump"]

logger = logging.getLogger(__name__)

Deliver = Callable[[str, str, dict], None]
Lost = Callable[[Iterable[str], str], None]

#: How often the RunEngine side looks for throttled images to publish.
TICK_S = 0.1

_ENDED = "_ended"  # the transport's own last message: the serving side is gone


def pump(receive: Callable[[float], tuple | None], deliver: Deliver, tick: Callable[[], None],
         open_runs: set[str]) -> None:
    """The RunEngine side's delivery loop, shared by the transports.

    ``receive(timeout)`` returns a message ``(kind, raw_uid, payload)``, ``None`` when nothing
    came, or ``(_ENDED, reason)`` when the serving side is gone; runs are removed from
    ``open_runs`` as they finish.
    """
    last_tick = time.monotonic()
    while True:
        msg = receive(TICK_S)
        if msg is not None and msg[0] == _ENDED:
            return
        if msg is not None:
            kind, uid, payload = msg
            try:
                deliver(kind, uid, payload)
            except Exception:
                logger.exception("live reconstruction: error applying %r of run %s", kind, uid)
            if kind == "finished":
                open_runs.discard(uid)
        if time.monotonic() - last_tick >= TICK_S:
            tick()
            last_tick = time.monotonic()


class ThreadTransport:
    """``isolation="thread"``: :func:`~._serve.serve` in a thread of the RunEngine's process,
    documents in through one queue, messages out through another.

    Parameters
    ----------
    model, model_info, settings
        What :func:`~._serve.serve` needs.
    deliver, tick, lost
        The RunEngine side's callbacks (module docstring).
    max_queue : int
        Raw documents buffered for the reconstruction.
    max_queue_bytes : int
        Bytes of them (inline frames) buffered at most.
    """

    pid = None

    def __init__(self, model, model_info: dict, settings: WorkerSettings, *, deliver: Deliver,
                 tick: Callable[[], None], lost: Lost, max_queue: int,
                 max_queue_bytes: int) -> None:
        self._inbox = MeteredQueue(queue.Queue(maxsize=max_queue), max_queue_bytes)
        self._outbox: queue.Queue = queue.Queue()
        self._lost, self._open = lost, set()
        self._warned_dead = False
        self._reason = "the live reconstruction was closed before the run finished"
        self._serving = threading.Thread(
            target=self._serve, args=(model, model_info, settings), daemon=True,
            name="ptychopinn-reconstruction")
        self._pump = threading.Thread(target=pump, daemon=True, name="ptychopinn-derived-runs",
                                      args=(self._receive, deliver, tick, self._open))
        self.put_nowait = self._inbox.put_nowait
        self._serving.start()
        self._pump.start()

    def _serve(self, model, model_info: dict, settings: WorkerSettings) -> None:
        try:
            serve(self._inbox, lambda kind, uid, payload: self._outbox.put((kind, uid, payload)),
                  model, model_info, settings)
        except BaseException as exc:  # BLUESKY_DEBUG_CALLBACKS: the error ends the loop
            self._reason = f"the reconstruction thread ended: {type(exc).__name__}: {exc}"
            raise
        finally:
            self._outbox.put((_ENDED, self._reason))

    def put(self, item) -> None:
        """Queue ``item``, waiting while the queue is full, but not for a reconstruction
        thread that has ended (its runs were given up as lost when it did): the RunEngine
        must never wait for ever on a queue nobody reads."""
        while self._serving.is_alive():
            try:
                self._inbox.put(item, timeout=0.5)
                return
            except queue.Full:
                continue
        if not self._warned_dead:
            self._warned_dead = True
            logger.warning("live reconstruction: the reconstruction thread has ended (%s); "
                           "documents from now on are not reconstructed", self._reason)

    def _receive(self, timeout: float) -> tuple | None:
        try:
            msg = self._outbox.get(timeout=timeout)
        except queue.Empty:
            return None
        if msg[0] == _ENDED:
            self._lost(list(self._open), msg[1])
            self._open.clear()
        return msg

    def open(self, raw_uid: str, md: PtychoMetadata, model_path: str | None = None,
             model_info: dict | None = None) -> None:
        self._open.add(raw_uid)
        self.put(("open", raw_uid, md, model_path, model_info))

    def close(self, timeout: float = 10.0) -> None:
        """Finish what is queued, then stop; runs still open after ``timeout`` are lost."""
        self.put(("shutdown",))
        self._serving.join(timeout)
        if self._serving.is_alive():  # a thread cannot be killed: give its runs up
            self._lost(list(self._open), f"the reconstruction did not finish within {timeout} s "
                                         "of close()")
            self._open.clear()
            return
        self._pump.join(timeout)
