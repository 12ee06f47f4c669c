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
    """One incarnation of the reconstruction thread: its own inbox and way back, and the runs
    it holds. ``ended`` is set, under the transport's lock, before its last message."""

    inbox: MeteredQueue
    outbox: queue.Queue
    thread: threading.Thread | None = None
    pump: threading.Thread | None = None
    runs: set[str] = field(default_factory=set)
    ended: bool = False
    reason: str = "the live reconstruction was closed before the run finished"


class ThreadTransport:
    """``isolation="thread"``: :func:`~._serve.serve` in a thread of the RunEngine's process,
    documents in through one queue, messages out through another.

    With ``BLUESKY_DEBUG_CALLBACKS=1`` an error in a run is raised and ends the thread, as
    bluesky's own callbacks do; its runs are failed and the next run starts a new thread (with
    a new inbox: nothing of the failed runs reaches it), as the process transport starts a new
    child.

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
        self._limits = (int(max_queue), int(max_queue_bytes))
        self._serve_args = (model, model_info, settings)
        self._deliver, self._tick, self._lost = deliver, tick, lost
        self._warned_dead = False
        self._closed = False
        self._lock = threading.Lock()
        self._current = self._start()

    @property
    def _inbox(self) -> MeteredQueue:
        """The current thread's inbox (read by tests and benchmarks)."""
        return self._current.inbox

    def _start(self) -> _ServingThread:
        max_queue, max_bytes = self._limits
        serving = _ServingThread(MeteredQueue(queue.Queue(maxsize=max_queue), max_bytes),
                                 queue.Queue())
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
            serve(serving.inbox,
                  lambda kind, uid, payload: serving.outbox.put((kind, uid, payload)),
                  *self._serve_args)
        except BaseException as exc:  # BLUESKY_DEBUG_CALLBACKS: the error ends the loop
            serving.reason = f"the reconstruction thread ended: {type(exc).__name__}: {exc}"
            raise
        finally:
            # Ended before the message that fails its runs, under the lock open() adds a run
            # under: a run is either added before (and failed with the others) or goes to a
            # new thread. (is_alive() stays True while the exception is still being printed.)
            with self._lock:
                serving.ended = True
            serving.outbox.put((_ENDED, serving.reason))

    def _accepts(self, serving: _ServingThread, item) -> bool:
        """Documents of a run only reach the thread that holds it: a run failed with an ended
        thread sends nothing on (its derived run is closed)."""
        return item[0] != "doc" or item[1] in serving.runs

    def put(self, item) -> None:
        """Queue ``item``, waiting while the queue is full, but not for a reconstruction
        thread that has ended (its runs were given up as lost when it did): the RunEngine
        must never wait for ever on a queue nobody reads."""
        serving = self._current
        if not self._accepts(serving, item):
            return
        while not serving.ended:
            try:
                serving.inbox.put(item, timeout=0.5)
                return
            except queue.Full:
                continue
        if not self._warned_dead:
            self._warned_dead = True
            logger.warning("live reconstruction: the reconstruction thread has ended (%s); "
                           "this run's documents are not reconstructed", serving.reason)

    def put_nowait(self, item) -> None:
        """Queue ``item`` now or raise :class:`queue.Full`; dropped for a run that is not the
        current thread's (it was failed with an ended one)."""
        serving = self._current
        if serving.ended or not self._accepts(serving, item):
            return
        serving.inbox.put_nowait(item)

    def _receive(self, serving: _ServingThread, timeout: float) -> tuple | None:
        try:
            msg = serving.outbox.get(timeout=timeout)
        except queue.Empty:
            return None
        if msg[0] == _ENDED:
            with self._lock:  # runs added after this are the next thread's (see _serve)
                runs = list(serving.runs)
                serving.runs.clear()
            self._lost(runs, msg[1])
        return msg

    def open(self, raw_uid: str, md: PtychoMetadata, model_path: str | None = None,
             model_info: dict | None = None) -> None:
        if self._current.ended and not self._closed:
            # The last thread ended on an error: its pump fails its runs (let it finish, so
            # that only one pump delivers at a time), and a new thread serves from this run on.
            self._current.pump.join(5.0)
        with self._lock:
            if self._current.ended and not self._closed:
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
            with self._lock:
                runs = list(serving.runs)
                serving.runs.clear()
            self._lost(runs, f"the reconstruction did not finish within {timeout} s of "
                             "close()")
            return
        serving.pump.join(timeout)
