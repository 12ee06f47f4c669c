"""``LiveReconstruction(isolation="process")``: the reconstruction in a child process gives the
same derived run as the thread, mirrors its state to the RunEngine's process, and a child that
dies never touches the scan. Real RunEngine, real ophyd devices, real documents."""

from __future__ import annotations

import os
import signal
import threading
import time

import numpy as np
import pytest
from _faults import FailingModel
from bluesky import RunEngine

from bluesky_ptychopinn.callbacks import LiveReconstruction
from bluesky_ptychopinn.devices import sim_beamline
from bluesky_ptychopinn.models import ModelRegistry
from bluesky_ptychopinn.plans import ptycho_scan


@pytest.fixture(scope="module")
def model():
    net, _ = ModelRegistry().load("default")
    return net


def _scan(RE, seed: int, n_side: int = 6, write_path=None):
    bl = sim_beamline("cells", write_path=write_path, seed=seed)
    dx = bl.pixel_size_m
    return RE(ptycho_scan(bl.detector, bl.stage, geometry=bl.ptycho_metadata(),
                          pattern="raster", extent_m=(5 * dx * (n_side - 1),) * 2,
                          step_m=5 * dx))


def _collect(live):
    docs: list[tuple[str, dict]] = []
    live.subscribe(lambda name, doc: docs.append((name, doc)))
    return docs


def test_process_and_thread_give_the_same_derived_run(tmp_path):
    results = {}
    for isolation in ("thread", "process"):
        # one batch at the stop document: identical input, identical order. Refinement off:
        # how many 'refined' snapshots a run publishes depends on wall time (test_refine.py
        # covers it in both modes).
        live = LiveReconstruction("default", batch_size=1000, snapshot_every=1000,
                                  flush_after_s=60, torch_threads=1, isolation=isolation,
                                  refine=None)
        docs = _collect(live)
        RE = RunEngine(call_returns_result=True)
        RE.subscribe(live)
        try:
            result = _scan(RE, seed=21, write_path=tmp_path / isolation)
            state = live.wait(timeout=120)
            pid = live.pid
        finally:
            live.close()
        assert result.exit_status == "success"
        results[isolation] = (state, docs, pid)
    thread, process = results["thread"], results["process"]
    assert thread[2] is None and process[2] not in (None, os.getpid())
    for state, docs, _ in (thread, process):
        assert state.failed is None and state.frames_done == 36
        assert state.snapshot is not None and state.snapshot.n_frames == 36
        assert state.pixel_size_m > 0 and state.stats["frames"] == 36
        assert docs[0][0] == "start" and docs[0][1]["uid"] == state.derived_uid
        assert docs[-1][0] == "stop" and docs[-1][1]["exit_status"] == "success"
        assert docs[-1][1]["ptychopinn"]["frames_done"] == 36
    assert [n for n, _ in thread[1]] == [n for n, _ in process[1]]
    assert process[1][0][1]["original_run_uid"] == process[0].raw_uid
    np.testing.assert_allclose(process[0].snapshot.object, thread[0].snapshot.object,
                               rtol=0, atol=1e-6)
    phase = [[d["data"]["object_phase"] for n, d in docs if n == "event"
              and "object_phase" in d["data"]] for _, docs, _ in (thread, process)]
    assert len(phase[0]) == len(phase[1]) == 1
    np.testing.assert_allclose(phase[1][0], phase[0][0], rtol=0, atol=1e-6)


def test_a_killed_reconstruction_process_never_touches_the_scan(model):
    live = LiveReconstruction(model, batch_size=4, snapshot_every=8, torch_threads=1)
    derived = _collect(live)
    raw_events = []
    first_pid = live.pid

    def kill_at_tenth_event(name, doc):
        if name == "event":
            raw_events.append(doc)
            if len(raw_events) == 10:
                os.kill(first_pid, signal.SIGKILL)

    RE = RunEngine(call_returns_result=True)
    RE.subscribe(kill_at_tenth_event)
    RE.subscribe(live)
    try:
        result = _scan(RE, seed=22)
        state = live.wait(timeout=60)
        assert result.exit_status == "success" and len(raw_events) == 36  # nothing lost
        assert state.failed and "killed by signal 9" in state.failed
        stops = [d for n, d in derived if n == "stop"]
        assert len(stops) == 1 and stops[0]["run_start"] == state.derived_uid
        assert stops[0]["exit_status"] == "fail" and "signal 9" in stops[0]["reason"]
        # the parent's stop counts exactly the derived events the child got out before dying
        metrics = {d["uid"] for n, d in derived if n == "descriptor" and d["name"] == "metrics"}
        sent = sum(1 if n == "event" else len(d["seq_num"]) for n, d in derived
                   if n in ("event", "event_page") and d["descriptor"] in metrics)
        assert stops[0]["num_events"].get("metrics", 0) == sent

        # the next run gets a new process and is reconstructed normally
        result = _scan(RE, seed=23)
        again = live.wait(result.run_start_uids[0], timeout=60)
    finally:
        live.close()
    assert live.pid != first_pid
    assert again.failed is None and again.frames_done == 36
    assert [d for n, d in derived if n == "stop"][-1]["exit_status"] == "success"


@pytest.mark.parametrize("isolation", ["thread", "process"])
def test_an_exception_in_the_reconstruction_fails_only_the_derived_run(model, isolation):
    faulty = FailingModel(model, fail_on_call=2, message="injected fault")
    live = LiveReconstruction(faulty, batch_size=8, torch_threads=1, isolation=isolation)
    derived = _collect(live)
    raw = []
    RE = RunEngine(call_returns_result=True)
    RE.subscribe(lambda name, doc: raw.append(name))
    RE.subscribe(live)
    try:
        result = _scan(RE, seed=24)
        state = live.wait(timeout=60)
    finally:
        live.close()
    assert result.exit_status == "success" and raw.count("event") == 36
    assert "injected fault" in state.failed
    stop = derived[-1][1]
    assert derived[-1][0] == "stop" and stop["exit_status"] == "fail"
    assert "injected fault" in stop["reason"]


def test_skipped_frames_are_counted_in_the_parent_and_reach_the_derived_stop(model):
    # a 2-document queue and one network call plus a snapshot per frame: the scan outruns it
    live = LiveReconstruction(model, batch_size=1, snapshot_every=1, max_queue=2,
                              torch_threads=1)
    derived = _collect(live)
    RE = RunEngine(call_returns_result=True)
    RE.subscribe(live)
    try:
        result = _scan(RE, seed=25, n_side=8)
        state = live.wait(timeout=60)
    finally:
        live.close()
    assert result.exit_status == "success" and state.failed is None
    assert state.frames_skipped > 0
    assert state.frames_done + state.frames_skipped == 64
    summary = derived[-1][1]["ptychopinn"]
    assert summary["frames_skipped"] == state.frames_skipped
    assert summary["frames_done"] == state.frames_done


def test_an_unguarded_script_gets_an_error_that_says_how_to_fix_it(tmp_path):
    # The reconstruction process re-imports the main script; at module level the callback
    # would start a process from inside that bootstrap. The user must hear why, and the fix.
    import subprocess
    import sys

    script = tmp_path / "beamline_script.py"
    script.write_text("from bluesky_ptychopinn.callbacks import LiveReconstruction\n"
                      "LiveReconstruction('default', torch_threads=1)\n")
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          timeout=120, cwd=tmp_path)
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("bluesky_ptychopinn.errors.PtychoError")
    assert "beamline_script.py" in last and 'if __name__ == "__main__":' in last
    assert 'isolation="thread"' in last


@pytest.mark.parametrize("isolation", ["thread", "process"])
def test_snapshots_and_metrics_are_published_at_most_once_per_interval(model, isolation):
    # A consumer such as TiledWriter needs ~0.25 s per snapshot event: the derived run must
    # not outpace it, yet lose no batch's metrics and keep the feedback snapshot fresh.
    interval = 0.3
    live = LiveReconstruction(model, batch_size=4, snapshot_every=4, torch_threads=1,
                              publish_interval_s=interval, isolation=isolation)
    docs = _collect(live)
    RE = RunEngine()
    RE.subscribe(live)
    try:
        _scan(RE, seed=5, n_side=10)
        state = live.wait(timeout=120)
    finally:
        live.close()
    assert state.failed is None and state.frames_done == 100
    streams = {d["uid"]: d["name"] for n, d in docs if n == "descriptor"}
    snaps = [d for n, d in docs if n == "event" and streams[d["descriptor"]] == "snapshots"]
    pages = [d for n, d in docs if n == "event_page" and streams[d["descriptor"]] == "metrics"]
    times = np.array([d["time"] for d in snaps])
    assert len(snaps) >= 2 and snaps[-1]["data"]["frames"] == 100
    # every periodic snapshot at least one interval after the previous; the final is forced
    assert (np.diff(times[:-1]) >= interval * 0.95).all(), np.diff(times)
    assert len(snaps) < 100 // 4  # fewer than one per snapshot_every frames
    rows = np.concatenate([p["data"]["batch_frames"] for p in pages])
    assert rows.sum() == 100 and len(rows) == 25  # every batch's row, in fewer writes
    assert len(pages) < len(rows)
    assert np.concatenate([p["data"]["frames_done"] for p in pages])[-1] == 100
    seqs = np.concatenate([p["seq_num"] for p in pages])
    np.testing.assert_array_equal(seqs, np.arange(1, 26))
    refined = [d for n, d in docs if n == "event" and streams[d["descriptor"]] == "refined"]
    refined_times = np.array([d["time"] for d in refined])
    assert len(refined) >= 1 and refined[-1]["data"]["frames"] == 100
    assert (np.diff(refined_times[:-1]) >= interval * 0.95).all(), np.diff(refined_times)
    stop = [d for n, d in docs if n == "stop"][0]
    assert stop["num_events"] == {"snapshots": len(snaps), "metrics": 25,
                                  "refined": len(refined), "final": 1}


@pytest.mark.parametrize("isolation", ["thread", "process"])
def test_a_blocked_subscriber_never_stalls_the_reconstruction(model, isolation):
    # A TiledWriter spends ~0.3 s on a snapshot; the reconstruction must not wait for it.
    # Here the subscriber blocks outright until released: every frame must still be done.
    release = threading.Event()
    delivered: list[str] = []

    def blocked(name, doc):
        release.wait(60)
        delivered.append(name)

    live = LiveReconstruction(model, batch_size=4, snapshot_every=4, torch_threads=1,
                              publish_interval_s=0.0, isolation=isolation)
    live.subscribe(blocked)
    RE = RunEngine()
    RE.subscribe(live)
    try:
        _scan(RE, seed=6, n_side=6)
        state = live.latest()
        deadline = time.monotonic() + 60
        while state.frames_done < 36 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert state.frames_done == 36 and delivered == []
        with pytest.raises(TimeoutError):  # finished means delivered: not yet
            live.wait(timeout=0.5)
        release.set()
        live.wait(timeout=60)
        # everything was delivered, in order, before wait() returned
        assert delivered[0] == "start" and delivered[-1] == "stop"
        assert delivered.count("stop") == 1 and len(delivered) > 10
    finally:
        release.set()
        live.close()


def test_a_deterministic_derived_uid_depends_on_the_run_the_model_and_the_settings(tmp_path):
    """A run reconstructed twice (a remote worker redelivered it) gets the same derived uid,
    so a catalog can never hold two derived runs of it; other settings give another uid."""
    raw: list[tuple[str, dict]] = []
    RE = RunEngine()
    RE.subscribe(lambda name, doc: raw.append((name, doc)))
    _scan(RE, seed=5, n_side=4, write_path=tmp_path)
    uids = []
    for derived_uid, batch in (("deterministic", 16), ("deterministic", 16),
                               ("deterministic", 32), ("random", 16)):
        live = LiveReconstruction("default", isolation="thread", refine=None, batch_size=batch,
                                  torch_threads=1, derived_uid=derived_uid)
        docs = _collect(live)
        try:
            for name, doc in raw:
                live(name, doc)
            state = live.wait(timeout=120)
        finally:
            live.close()
        assert state.failed is None and docs[-1][1]["exit_status"] == "success"
        uids.append(docs[0][1]["uid"])
    assert uids[0] == uids[1]
    assert len({uids[0], uids[2], uids[3]}) == 3


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity") or len(os.sched_getaffinity(0)) < 2,
                    reason="needs at least 2 cores the process may use")
def test_the_reconstruction_process_leaves_a_core_to_the_runengine():
    """``reserve_cores=1`` (default) pins the child off one core, still reconstructing;
    ``reserve_cores=0`` lets it use all the cores this process may use."""
    mine = os.sched_getaffinity(0)
    live = LiveReconstruction("default", refine=None, batch_size=16)
    try:
        child = os.sched_getaffinity(live.pid)
        assert child < mine and len(child) == len(mine) - 1
        docs = _collect(live)
        RE = RunEngine()
        RE.subscribe(live)
        _scan(RE, seed=4)
        state = live.wait(timeout=120)
        assert state.frames_done == 36 and docs[-1][1]["exit_status"] == "success"
    finally:
        live.close()
    live = LiveReconstruction("default", refine=None, reserve_cores=0)
    try:
        assert os.sched_getaffinity(live.pid) == mine
    finally:
        live.close()


def test_the_process_queue_is_bounded_in_bytes(model):
    # The bytes are counted in shared memory: reserved in this process, released by the child.
    live = LiveReconstruction(model, batch_size=1, snapshot_every=1, max_queue_bytes=4 * 32768,
                              torch_threads=1, refine=None)
    derived = _collect(live)
    try:
        from test_live_faults import _large_frame_run

        uid, docs = _large_frame_run(200)
        for doc in docs:
            live(*doc)
        state = live.wait(uid, timeout=60)
        # the child released, in the shared totals, every byte this process reserved
        inbox = live._transport._child.inbox
        held = inbox.nbytes
        # and no lock is shared with the child: one killed while holding it would leave the
        # RunEngine waiting on every later document (review of 2026-12-03)
        assert not any(hasattr(total, "get_lock") for total in (inbox._put, inbox._taken))
    finally:
        live.close()
    assert held == 0
    assert state.frames_skipped > 100
    assert state.frames_done + state.frames_skipped == 200
    assert derived[-1][1]["ptychopinn"]["frames_skipped"] == state.frames_skipped


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_debugging_callbacks_a_failed_thread_is_replaced_for_the_next_run(model, monkeypatch):
    # BLUESKY_DEBUG_CALLBACKS raises a run's error, which ends the reconstruction thread.
    # Before: every later run of the session was silently never reconstructed.
    monkeypatch.setenv("BLUESKY_DEBUG_CALLBACKS", "1")
    faulty = FailingModel(model, fail_on_call=2, message="injected fault")
    live = LiveReconstruction(faulty, batch_size=8, torch_threads=1, isolation="thread",
                              refine=None)
    derived = _collect(live)
    RE = RunEngine(call_returns_result=True)
    RE.subscribe(live)
    try:
        first = _scan(RE, seed=26)
        failed = live.wait(first.run_start_uids[0], timeout=60)
        second = _scan(RE, seed=27)
        again = live.wait(second.run_start_uids[0], timeout=60)
    finally:
        live.close()
    assert first.exit_status == second.exit_status == "success"
    assert "injected fault" in failed.failed
    assert again.failed is None and again.frames_done == 36
    stops = [d for n, d in derived if n == "stop"]
    assert [s["exit_status"] for s in stops] == ["fail", "success"]


def _debug_live(model, **kw):
    faulty = FailingModel(model, fail_on_call=2, message="injected fault")
    live = LiveReconstruction(faulty, batch_size=4, torch_threads=1, isolation="thread",
                              flush_after_s=0.05, **kw)
    return live, _collect(live)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_run_opened_while_the_dead_thread_prints_its_error_goes_to_a_new_one(model,
                                                                               monkeypatch):
    # Before: the thread looked alive while its traceback was still being written (a slow
    # stderr), so the next run joined the dead thread's runs and was never reconstructed.
    from test_live_faults import _run

    monkeypatch.setenv("BLUESKY_DEBUG_CALLBACKS", "1")
    printing = threading.Event()
    original = threading.excepthook

    def slow_hook(args):
        printing.set()
        time.sleep(1.0)
        original(args)

    monkeypatch.setattr(threading, "excepthook", slow_hook)
    live, derived = _debug_live(model, refine=None)
    try:
        first, docs = _run(40)
        for doc in docs:
            live(*doc)
        assert "injected fault" in live.wait(first, timeout=30).failed
        assert printing.wait(5)
        second, docs = _run(12)
        for doc in docs:
            live(*doc)
        again = live.wait(second, timeout=20)
    finally:
        live.close()
    assert again.failed is None and again.frames_done == 12
    assert [d["exit_status"] for n, d in derived if n == "stop"] == ["fail", "success"]


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_run_failed_with_an_ended_thread_never_reaches_the_next_one(model, monkeypatch):
    # Before: all threads shared one inbox, so a run queued behind the document that ended
    # the thread was failed, then opened and reconstructed by the next thread for ever.
    from test_live_faults import _run

    import bluesky_ptychopinn.callbacks._serve as serve_module

    monkeypatch.setenv("BLUESKY_DEBUG_CALLBACKS", "1")
    opened: list[str] = []

    class Recording(serve_module.RunReconstruction):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            opened.append(self.raw_uid)

    monkeypatch.setattr(serve_module, "RunReconstruction", Recording)
    live, derived = _debug_live(model)
    try:
        first, first_docs = _run(60)
        queued, queued_docs = _run(40)
        for doc in first_docs:
            live(*doc)
        for doc in queued_docs[:6]:  # its start, descriptor and 4 events, behind the first run
            live(*doc)
        ended = live._transport._current.thread
        assert "injected fault" in live.wait(first, timeout=60).failed
        ended.join(10)
        # Its failure comes through the delivery thread, after the first run's: poll for it.
        deadline = time.monotonic() + 30
        while live.runs[queued].failed is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert live.runs[queued].failed  # failed with the thread that held it
        for doc in queued_docs[6:]:
            live(*doc)
        third, docs = _run(12)
        for doc in docs:
            live(*doc)
        state = live.wait(third, timeout=120)
    finally:
        live.close()
    assert state.failed is None and state.frames_done == 12
    assert queued not in opened
    assert not [t.name for t in threading.enumerate() if queued[:8] in t.name]
