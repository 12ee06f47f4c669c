"""The watcher's outbox is bounded (review of ``catalog/_watch.py``): a consumer slower than
the run (a figure redrawn, a PNG written, a terminal) is shown the latest state, not a backlog
that grows with the run; ``start``, ``descriptor`` and ``stop`` documents are never dropped.

A real Tiled server over HTTP with websocket streaming (the module's ``tiled`` fixture) and a
derived run written by a real ``TiledWriter``.
"""

from __future__ import annotations

import queue
import threading
import time

import numpy as np
import pytest
from bluesky_tiled_plugins import TiledWriter
from event_model import compose_run

from bluesky_ptychopinn.catalog import watch_derived_runs
from bluesky_ptychopinn.catalog._watch import DerivedRunWatcher, _Outbox

# tiled 0.2.20's own websocket client, under websockets 17
pytestmark = pytest.mark.filterwarnings("ignore:connect\\(\\) must be used:DeprecationWarning")


def _derived_run(client, n: int, shape=(16, 12)) -> tuple[str, list[np.ndarray]]:
    """A derived run of ``n`` snapshots, each written to Tiled at once (``batch_size=1``)."""
    bundle = compose_run(metadata={"plan_name": "ptychopinn_reconstruction",
                                   "original_run_uid": "not-stored", "model": {"name": "m"}})
    writer = TiledWriter(client, batch_size=1)
    writer("start", bundle.start_doc)
    keys = {k: {"source": "t", "dtype": "array", "shape": list(shape), "dtype_numpy": "<f4"}
            for k in ("object_phase", "uncertainty")}
    stream = bundle.compose_descriptor(name="snapshots", data_keys=keys)
    writer("descriptor", stream.descriptor_doc)
    rng = np.random.default_rng(1)
    phases = [rng.standard_normal(shape).astype(np.float32) for _ in range(n)]
    for phase in phases:
        writer("event", stream.compose_event(
            data={"object_phase": phase, "uncertainty": np.abs(phase)},
            timestamps={"object_phase": 0.0, "uncertainty": 0.0}))
    writer("stop", bundle.compose_stop())
    return bundle.start_doc["uid"], phases


def test_a_consumer_that_does_not_keep_up_is_shown_the_latest_not_a_backlog(tiled):
    """Nobody takes the documents while a run of 15 snapshots streams in: what waits is the
    run's start, its descriptor, one event per key (the latest) and the stop, not 30 events."""
    watcher = DerivedRunWatcher(tiled.client(), mode="websocket", include_running=False).start()
    try:
        uid, phases = _derived_run(tiled.client(), n=15)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:  # the writer's stop closes the run's nodes
            run = watcher._runs.get(uid)
            if run is not None and run.closed_at is not None and not run.open_nodes:
                break
            time.sleep(0.05)
        waiting = watcher._out.qsize()
        seen = watcher.get(timeout=1.0)
    finally:
        watcher.close()
    names = [n for n, _ in seen]
    assert names[:2] == ["start", "descriptor"] and names[-1] == "stop", names
    events = [d for n, d in seen if n == "event"]
    assert waiting <= 4 and len(events) <= 2, names  # one per key
    last = {k: v for d in events for k, v in d["data"].items()}
    np.testing.assert_array_equal(last["object_phase"], phases[-1])
    np.testing.assert_array_equal(last["uncertainty"], np.abs(phases[-1]))
    assert watcher._out.coalesced >= 1  # (rows streamed together are one event already)


def test_a_slow_consumer_still_gets_the_last_state_and_the_stop(tiled):
    """``watch_derived_runs`` with a consumer that takes 50 ms a document and a bound of 3:
    the run ends on screen as it ends in Tiled, stop included."""
    seen = []

    def slow(name, doc):
        time.sleep(0.05)
        seen.append((name, doc))

    ready, box = threading.Event(), {}
    thread = threading.Thread(target=lambda: box.update(result=watch_derived_runs(
        tiled.client(), slow, once=True, timeout=30, mode="websocket", ready=ready,
        include_running=False, max_pending=3)), daemon=True)
    thread.start()
    assert ready.wait(30)
    uid, phases = _derived_run(tiled.client(), n=12)
    thread.join(timeout=40)
    assert box["result"].finished == [uid]
    names = [n for n, _ in seen]
    assert names[0] == "start" and "descriptor" in names and names[-1] == "stop"
    assert seen[-1][1]["exit_status"] == "success"
    last = {k: v for n, d in seen if n == "event" for k, v in d["data"].items()}
    np.testing.assert_array_equal(last["object_phase"], phases[-1])


def test_past_the_bound_the_oldest_progress_goes_and_the_run_documents_stay():
    """More distinct progress documents than the bound: the oldest events and scan paths are
    dropped, in order; start, descriptor and stop are kept whatever the bound."""
    box = _Outbox(max_pending=4)
    box.put(("start", {"uid": "r"}))
    box.put(("descriptor", {"uid": "d", "run_start": "r"}))
    for k in range(6):  # six different keys: nothing to coalesce
        box.put(("event", {"descriptor": "d", "seq_num": k, "data": {f"k{k}": k}}))
    box.put(("scan_path", {"run_start": "r", "positions_px": np.zeros((1, 2))}))
    box.put(("scan_path", {"run_start": "r", "positions_px": np.ones((2, 2))}))  # coalesced
    box.put(("stop", {"run_start": "r"}))
    out = []
    while box.qsize():
        out.append(box.get_nowait())
    assert [n for n, _ in out] == ["start", "descriptor", "scan_path", "stop"]
    assert out[2][1]["positions_px"].shape == (2, 2)  # the newer path, in the older's place
    assert box.dropped == 6 and box.coalesced == 1
    with pytest.raises(queue.Empty):  # as the queue.Queue it replaced
        box.get(timeout=0.01)
