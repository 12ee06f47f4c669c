"""Delivery of derived-run documents to the subscribers, on a thread of its own.

A subscriber such as ``TiledWriter`` spends a few hundred milliseconds on a snapshot event.
Called from the reconstruction (its thread, or the thread that receives from its process), it
would stall the reconstruction for that long: frames pile up and every later snapshot is older.
Here the reconstruction only enqueues; one thread delivers, in order, to every subscriber.

Order holds across :meth:`DocumentEmitter.close` too: a document emitted after a close whose
timeout ran out (a slow subscriber still works through the backlog) queues behind that backlog
instead of being delivered at once in the caller's thread, where a run's stop document would
reach a subscriber before the run's last events, and while the thread is still calling it.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable

__all__ = ["DocumentEmitter"]

logger = logging.getLogger(__name__)

_STOP = object()


class DocumentEmitter:
    """FIFO of ``(name, doc)`` delivered to subscribers by one daemon thread.

    Parameters
    ----------
    subscribers : list of callable
        ``callback(name, doc)``; read at delivery time, so later subscriptions count.
    """

    def __init__(self, subscribers: list[Callable]) -> None:
        self.subscribers = subscribers
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._closed = False
        self._done = False  # the thread has delivered everything and ended
        self._thread = threading.Thread(target=self._run, name="ptychopinn-emitter",
                                        daemon=True)
        self._thread.start()

    def emit(self, name: str, doc: dict) -> None:
        """Queue a document for every subscriber (never blocks; once :meth:`close` has
        delivered everything, deliver it at once in the caller's thread: nothing is dropped,
        nothing overtakes a document emitted before it)."""
        self._put((name, doc))

    def then(self, action: Callable[[], None]) -> None:
        """Run ``action`` once every document queued so far has been delivered (e.g. to mark a
        run finished only when its stop document has reached the subscribers)."""
        self._put(action)

    def _put(self, item) -> None:
        with self._lock:
            if not self._done:  # the thread still delivers (also after a timed-out close)
                self._queue.put(item)
                return
        self._handle(item)

    def close(self, timeout: float | None = 30.0) -> bool:
        """Deliver what is queued (waiting up to ``timeout`` s), then stop the thread.

        Returns
        -------
        bool
            True when everything queued has been delivered. False when ``timeout`` ran out
            first (a subscriber is slow or stuck): the thread goes on delivering the rest, in
            order, and what is emitted meanwhile is delivered after it; said in the log.
        """
        with self._lock:
            if not self._closed:
                self._closed = True
                self._queue.put(_STOP)
        self._thread.join(timeout)
        if self._thread.is_alive():
            logger.warning("derived-run emitter: not all documents delivered within %s s (a "
                           "subscriber is slow or stuck); the rest are still being delivered, "
                           "in order", timeout)
            return False
        return True

    def _run(self) -> None:
        closing = False
        while True:
            if closing:  # what was emitted after a close that timed out follows the backlog
                with self._lock:
                    if self._queue.empty():
                        self._done = True  # later documents: delivered by their caller
                        return
            item = self._queue.get()
            if item is _STOP:
                closing = True
                continue
            self._handle(item)

    def _handle(self, item) -> None:
        if callable(item):
            try:
                item()
            except Exception:
                logger.exception("derived-run emitter: %r failed", item)
        else:
            name, doc = item
            for callback in list(self.subscribers):
                try:
                    callback(name, doc)
                except Exception:  # a broken consumer must not stop the others
                    logger.exception("derived-run subscriber %r failed on %s", callback,
                                     name)
