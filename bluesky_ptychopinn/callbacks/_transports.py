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
from dataclasses import dataclass, field

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


@dataclass
class _ServingThread:
    """One incarnation of the reconstruction thread, with its way back and the runs it holds."""

    thread: threading.Thread
    pump: threading.Thread
    outbox: queue.Queue
    runs: set[str] = field(default_factory=set)
    reason: str = "the live reconstruction was closed before the run finished"


class ThreadTransport:
    """``isolation="thread"``: :func:`~._serve.serve` in a thread of the RunEngine's process,
    documents in through one queue, messages out through another.

    With ``BLUESKY_DEBUG_CALLBACKS=1`` an error in a run is raised and ends the thread, as
    bluesky's own callbacks do; its runs are failed and the next run starts a new thread, as
    the process transport starts a new child.

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
        self._serve_args = (model, model_info, settings)
        self._deliver, self._tick, self._lost = deliver, tick, lost
        self._warned_dead = False
        self._closed = False
        self._lock = threading.Lock()
        self.put_nowait = self._inbox.put_nowait
        self._current = self._start()

    def _start(self) -> _ServingThread:
        outbox: queue.Queue = queue.Queue()
        serving = _ServingThread(threading.Thread(), threading.Thread(), outbox)
        serving.thread = threading.Thread(target=self._serve, args=(serving,), daemon=True,
                                          name="ptychopinn-reconstruction")
        serving.pump = threading.Thread(
            target=pump, daemon=True, name="ptychopinn-derived-runs",
            args=(lambda timeout: self._receive(serving, timeout), self._deliver, self._tick,
                  serving.runs))
        serving.thread.start()
        serving.pump.start()
        return serving

    def _serve(self, serving: _ServingThread) -> None:
        try:
            serve(self._inbox, lambda kind, uid, payload: serving.outbox.put((kind, uid, payload)),
                  *self._serve_args)
        except BaseException as exc:  # BLUESKY_DEBUG_CALLBACKS: the error ends the loop
            serving.reason = f"the reconstruction thread ended: {type(exc).__name__}: {exc}"
            raise
        finally:
            serving.outbox.put((_ENDED, serving.reason))

    def put(self, item) -> None:
        """Queue ``item``, waiting while the queue is full, but not for a reconstruction
        thread that has ended (its runs were given up as lost when it did): the RunEngine
        must never wait for ever on a queue nobody reads."""
        serving = self._current
        while serving.thread.is_alive():
            try:
                self._inbox.put(item, timeout=0.5)
                return
            except queue.Full:
                continue
        if not self._warned_dead:
            self._warned_dead = True
            logger.warning("live reconstruction: the reconstruction thread has ended (%s); "
                           "this run's documents are not reconstructed", serving.reason)

    def _receive(self, serving: _ServingThread, timeout: float) -> tuple | None:
        try:
            msg = serving.outbox.get(timeout=timeout)
        except queue.Empty:
            return None
        if msg[0] == _ENDED:
            with self._lock:  # against open() adding a run to a thread that has ended
                runs = list(serving.runs)
                serving.runs.clear()
            self._lost(runs, msg[1])
        return msg

    def open(self, raw_uid: str, md: PtychoMetadata, model_path: str | None = None,
             model_info: dict | None = None) -> None:
        if not self._current.thread.is_alive() and not self._closed:
            # The last thread ended on an error: its pump fails its runs (let it finish, so
            # that only one pump delivers at a time), and a new thread serves from this run
            # on. The dead runs' documents still queued are ignored by the new thread.
            self._current.pump.join(5.0)
        with self._lock:
            # Under the lock that the pump takes to fail an ended thread's runs: either the
            # thread is alive here and this run is failed with the others if it ends, or a
            # new thread takes it.
            if not self._current.thread.is_alive() and not self._closed:
                logger.warning("live reconstruction: starting a new reconstruction thread "
                               "(the last one ended: %s)", self._current.reason)
                self._warned_dead = False
                self._current = self._start()
            self._current.runs.add(raw_uid)
        self.put(("open", raw_uid, md, model_path, model_info))

    def close(self, timeout: float = 10.0) -> None:
        """Finish what is queued, then stop; runs still open after ``timeout`` are lost."""
        self._closed = True
        serving = self._current
        self.put(("shutdown",))
        serving.thread.join(timeout)
        if serving.thread.is_alive():  # a thread cannot be killed: give its runs up
            self._lost(list(serving.runs), f"the reconstruction did not finish within "
                                           f"{timeout} s of close()")
            serving.runs.clear()
            return
        serving.pump.join(timeout)
