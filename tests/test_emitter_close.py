"""``DocumentEmitter.close`` with a timeout (review of ``callbacks/_emitter.py``): it never
waits past its timeout, says whether everything was delivered, and a document emitted after it
(a run's stop, as ``LiveReconstruction.close`` emits for runs it gives up) never overtakes the
documents still queued, nor reaches a subscriber while the delivery thread is still calling it.

Real event-model documents of a run; the subscribers are plain callables that record what
they were given, from which thread, and whether another call was in progress.
"""

from __future__ import annotations

import threading
import time

from event_model import compose_run

from bluesky_ptychopinn.callbacks._emitter import DocumentEmitter


class Recorder:
    """A subscriber taking ``delay`` s a document (or waiting on ``gate`` when given)."""

    def __init__(self, delay: float = 0.0, gate: threading.Event | None = None) -> None:
        self.delay, self.gate = delay, gate
        self.docs: list[tuple[str, dict]] = []
        self.overlapped = False
        self._busy = 0
        self._lock = threading.Lock()

    def __call__(self, name: str, doc: dict) -> None:
        with self._lock:
            self._busy += 1
            self.overlapped |= self._busy > 1
        try:
            if self.gate is not None:
                self.gate.wait(10)
            time.sleep(self.delay)
            self.docs.append((name, doc))
        finally:
            with self._lock:
                self._busy -= 1


def _run(n: int):
    bundle = compose_run()
    desc = bundle.compose_descriptor(
        name="snapshots", data_keys={"x": {"source": "t", "dtype": "number", "shape": []}})
    events = [desc.compose_event(data={"x": float(k)}, timestamps={"x": 0.0}, seq_num=k)
              for k in range(1, n + 1)]
    return ([("start", bundle.start_doc), ("descriptor", desc.descriptor_doc),
             *[("event", e) for e in events]], ("stop", bundle.compose_stop()))


def test_a_close_that_times_out_returns_in_time_and_the_stop_comes_last():
    sub = Recorder(delay=0.02)
    emitter = DocumentEmitter([sub])
    docs, stop = _run(30)  # ~0.6 s of delivery
    for name, doc in docs:
        emitter.emit(name, doc)
    t0 = time.monotonic()
    assert emitter.close(timeout=0.1) is False  # not everything delivered yet: said so
    assert time.monotonic() - t0 < 0.5
    emitter.emit(*stop)  # a run given up after the close, as LiveReconstruction does
    done = threading.Event()
    emitter.then(done.set)
    assert done.wait(10)
    assert [n for n, _ in sub.docs] == [n for n, _ in docs] + ["stop"]  # in order
    assert [d["seq_num"] for n, d in sub.docs if n == "event"] == list(range(1, 31))
    assert not sub.overlapped  # one caller at a time
    assert emitter.close(timeout=5) is True  # the thread ended once the backlog was done


def test_a_close_in_time_delivers_everything_before_returning_and_later_documents_at_once():
    sub = Recorder(delay=0.002)
    emitter = DocumentEmitter([sub])
    docs, stop = _run(10)
    for name, doc in docs:
        emitter.emit(name, doc)
    assert emitter.close(timeout=10) is True
    assert len(sub.docs) == len(docs)  # all of them before close returned
    emitter.emit(*stop)  # after the thread ended: delivered in the caller's thread, at once
    assert sub.docs[-1][0] == "stop"
    ran = []
    emitter.then(lambda: ran.append(len(sub.docs)))
    assert ran == [len(docs) + 1]


def test_a_stuck_subscriber_does_not_hold_close_past_its_timeout():
    gate = threading.Event()
    sub = Recorder(gate=gate)
    emitter = DocumentEmitter([sub])
    docs, stop = _run(3)
    for name, doc in docs:
        emitter.emit(name, doc)
    t0 = time.monotonic()
    assert emitter.close(timeout=0.2) is False
    assert time.monotonic() - t0 < 1.0
    emitter.emit(*stop)
    assert sub.docs == []  # still stuck on the first: nothing delivered out of order
    gate.set()  # the subscriber comes back
    assert emitter.close(timeout=10) is True
    assert [n for n, _ in sub.docs] == [n for n, _ in docs] + ["stop"]
    assert not sub.overlapped
