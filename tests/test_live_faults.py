"""The live callback under faults on the RunEngine side (review of 2026-12-02): a derived run
never says "success" for frames it dropped, a run that cannot open fails alone without
taking later runs (or the RunEngine) with it, and a long session does not keep every run."""

from __future__ import annotations

import json
import shutil
import threading
import time

import numpy as np
import pytest
from event_model import compose_run

from bluesky_ptychopinn.callbacks import LiveReconstruction
from bluesky_ptychopinn.errors import InvalidInputError
from bluesky_ptychopinn.models._registry import packaged_models_dir

MD = {"detector_key": "img", "positioner_keys": {"y": "sy", "x": "sx"}, "energy_ev": 8800.0,
      "detector_distance_m": 2.0, "detector_pixel_size_m": 75e-6,
      "scan": {"extent_m": [1e-7, 1e-7], "center_m": [0.0, 0.0]}}


def _run(n: int = 12, md: dict = MD, dtype=np.float32, seed: int = 0):
    """A raw run's documents (event-model composers): n 64 x 64 frames of Poisson counts,
    inline, as ``dtype`` (float64: 32 KB a frame)."""
    bundle = compose_run(metadata={"ptycho": md})
    keys = {"img": {"source": "sim", "dtype": "array", "shape": [64, 64]},
            "sy": {"source": "sim", "dtype": "number", "shape": []},
            "sx": {"source": "sim", "dtype": "number", "shape": []}}
    desc = bundle.compose_descriptor(name="primary", data_keys=keys)
    docs = [("start", bundle.start_doc), ("descriptor", desc.descriptor_doc)]
    rng = np.random.default_rng(seed)
    for k in range(n):
        data = {"img": rng.poisson(5.0, (64, 64)).astype(dtype),
                "sy": 1e-9 * (k % 10), "sx": 1e-9 * (k // 10)}
        docs.append(("event", desc.compose_event(data=data, seq_num=k + 1,
                                                 timestamps=dict.fromkeys(data, 0.0))))
    docs.append(("stop", bundle.compose_stop()))
    return bundle.start_doc["uid"], docs


def _live(**kw) -> tuple[LiveReconstruction, list]:
    live = LiveReconstruction("default", isolation="thread", refine=None, batch_size=4,
                              torch_threads=1, flush_after_s=0.05, **kw)
    stops: list = []
    live.subscribe(lambda name, doc: stops.append(doc) if name == "stop" else None)
    return live, stops


def test_a_run_whose_frames_were_mostly_skipped_is_no_success():
    live, stops = _live(max_queue=4)  # back-pressure "skip": most of 200 frames are dropped
    try:
        uid, docs = _run(200)
        for doc in docs:
            live(*doc)
        state = live.wait(uid, timeout=60)
    finally:
        live.close()
    summary = stops[-1]["ptychopinn"]
    assert summary["frames_skipped"] > 100, summary
    assert stops[-1]["exit_status"] == "fail", stops[-1]
    assert "skipped for back-pressure" in stops[-1]["reason"]
    assert state.frames_done + summary["frames_skipped"] <= 200


def test_a_run_that_cannot_open_fails_alone_and_the_next_one_is_reconstructed(tmp_path,
                                                                              monkeypatch):
    live, stops = _live(max_queue=20, backpressure="block")
    try:
        gone = tmp_path / "session"
        gone.mkdir()
        monkeypatch.chdir(gone)
        gone.rmdir()  # the session's working directory was removed: opening a run fails
        first, docs = _run()
        for doc in docs:
            live(*doc)
        assert "could not start" in live.wait(first, timeout=30).failed
        monkeypatch.chdir(tmp_path)
        second, docs = _run(30)
        feeding = threading.Thread(target=lambda: [live(*doc) for doc in docs], daemon=True)
        feeding.start()
        feeding.join(30)
        assert not feeding.is_alive()  # the RunEngine side never blocked
        state = live.wait(second, timeout=60)
    finally:
        live.close()
    assert state.failed is None and state.frames_done == 30
    assert [s["exit_status"] for s in stops] == ["fail", "success"]


def test_a_model_that_cannot_be_loaded_fails_the_derived_run(tmp_path, monkeypatch):
    monkeypatch.setenv("PTYCHOPINN_MODELS", str(tmp_path))
    model = tmp_path / "beamline-probe-model"
    shutil.copytree(packaged_models_dir() / "default", model)
    card = json.loads((model / "model.json").read_text())
    card.setdefault("provenance", {}).setdefault("training_data", {})["probes"] = [
        {"name": "myprobe"}]
    (model / "model.json").write_text(json.dumps(card))
    (model / "model.safetensors").unlink()  # half deleted
    live = LiveReconstruction("auto", isolation="thread", refine=None, batch_size=4,
                              torch_threads=1, flush_after_s=0.05)
    names: list = []
    live.subscribe(lambda name, doc: names.append((name, doc)))
    try:
        uid, docs = _run(8, md={**MD, "probe": "myprobe"})
        for doc in docs:
            live(*doc)
        state = live.wait(uid, timeout=30)
    finally:
        live.close()
    assert [n for n, _ in names] == ["start", "stop"]
    assert names[-1][1]["exit_status"] == "fail" and "no model" in names[-1][1]["reason"]
    assert state.failed and "no model" in state.failed


def test_a_long_session_keeps_only_the_latest_finished_runs():
    live, stops = _live()
    live.keep_finished_runs = 2
    try:
        uids = []
        for _ in range(4):
            uid, docs = _run(4)
            for doc in docs:
                live(*doc)
            live.wait(uid, timeout=30)
            uids.append(uid)
        last, docs = _run(4)
        for doc in docs:
            live(*doc)
        live.wait(last, timeout=30)
    finally:
        live.close()
    assert len(stops) == 5 and all(s["exit_status"] == "success" for s in stops)
    # The new run's entry pushed out the oldest finished ones, never an open run.
    assert set(live.runs) == {uids[-2], uids[-1], last} or set(live.runs) == {uids[-1], last}
    assert live.latest(uids[0]) is None and live.latest(last) is not None


def test_waiting_for_a_run_without_ptycho_metadata_says_why():
    live, stops = _live()
    try:
        bundle = compose_run(metadata={"plan_name": "count"})
        live("start", bundle.start_doc)
        live("stop", bundle.compose_stop())
        with pytest.raises(InvalidInputError, match="no ptycho metadata"):
            live.wait(bundle.start_doc["uid"], timeout=5)
    finally:
        live.close()
    assert not stops  # no derived run for a run that is not a ptycho scan


def test_close_says_whether_the_derived_documents_were_delivered():
    """close() within its one timeout, and True only when the subscribers have everything."""
    live, stops = _live()
    uid, docs = _run(8)
    for doc in docs:
        live(*doc)
    live.wait(uid, timeout=60)
    assert live.close(timeout=30) is True
    assert stops[-1]["exit_status"] == "success", stops[-1]

    stuck, release = _live()[0], threading.Event()
    stuck.subscribe(lambda name, doc: release.wait(20) if name == "stop" else None)
    uid, docs = _run(8)
    for doc in docs:
        stuck(*doc)
    t0 = time.monotonic()
    assert stuck.close(timeout=2) is False  # the stop is stuck with a subscriber: said so
    assert time.monotonic() - t0 < 6  # one timeout for all of it, not one per stage
    release.set()


def test_a_dropped_baseline_reading_is_no_skipped_frame():
    # Before: under "skip" every dropped event counted as a skipped frame, a baseline or
    # monitor reading too, and the stop's not-received accounting subtracted them.
    from event_model import compose_run

    live, stops = _live(max_queue=2)
    bundle = compose_run(metadata={"ptycho": MD})
    keys = {"img": {"source": "sim", "dtype": "array", "shape": [64, 64]},
            "sy": {"source": "sim", "dtype": "number", "shape": []},
            "sx": {"source": "sim", "dtype": "number", "shape": []}}
    primary = bundle.compose_descriptor(name="primary", data_keys=keys)
    monitor = bundle.compose_descriptor(
        name="ring_current", data_keys={"I": {"source": "sim", "dtype": "number", "shape": []}})
    try:
        live("start", bundle.start_doc)
        live("descriptor", primary.descriptor_doc)
        live("descriptor", monitor.descriptor_doc)
        for k in range(400):  # far more than the queue holds: most are dropped
            live("event", monitor.compose_event(data={"I": 400.0}, seq_num=k + 1,
                                                timestamps={"I": 0.0}))
        live("stop", bundle.compose_stop())
        state = live.wait(bundle.start_doc["uid"], timeout=60)
    finally:
        live.close()
    assert state.frames_skipped == 0, stops[-1]


def _large_frame_run(n: int):
    """A raw run of n float64 frames inline (32 KB each)."""
    return _run(n, dtype=np.float64, seed=1)


def test_the_queue_is_bounded_in_bytes_under_skip():
    # Before: only documents were counted (100,000 by default), so a fast scan of large
    # inline frames queued without bound in bytes. 8 frames' worth of bytes now fill it.
    live, stops = _live(max_queue_bytes=8 * 32 * 1024)
    try:
        uid, docs = _large_frame_run(300)
        for doc in docs:
            live(*doc)
        state = live.wait(uid, timeout=60)
        held = live._transport._inbox.nbytes  # every byte taken was released
    finally:
        live.close()
    assert held == 0
    assert state.frames_skipped > 150, stops[-1]
    assert state.frames_done + state.frames_skipped == 300
    assert stops[-1]["ptychopinn"]["frames_skipped"] == state.frames_skipped


def test_under_block_the_bytes_queued_never_exceed_the_budget():
    budget = 8 * 32 * 1024
    live, stops = _live(max_queue_bytes=budget, backpressure="block")
    inbox = live._transport._inbox
    peak, done = [0], threading.Event()

    def watch() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], inbox.nbytes)
            time.sleep(0.0005)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        uid, docs = _large_frame_run(120)
        for doc in docs:
            live(*doc)
        state = live.wait(uid, timeout=60)
    finally:
        done.set()
        live.close()
    assert state.failed is None and state.frames_done == 120, stops[-1]
    assert state.frames_skipped == 0
    assert budget // 2 < peak[0] <= budget  # it filled, and no further
    assert inbox.nbytes == 0  # every byte reserved was released when taken


@pytest.mark.parametrize("value", [0, -5])
def test_a_queue_without_room_is_refused(value):
    with pytest.raises(InvalidInputError, match="max_queue_bytes"):
        LiveReconstruction("default", isolation="thread", max_queue_bytes=value)


def test_a_document_is_sized_by_its_arrays_without_copying_them():
    from bluesky_ptychopinn.callbacks._metered_queue import document_nbytes

    frame = np.zeros((64, 64))
    event = {"data": {"img": frame, "sx": 1.0}, "seq_num": 1, "uid": "u" * 36}
    assert 32768 <= document_nbytes(("doc", "uid", "event", event)) < 32768 + 1024
    # a frame decoded from JSON as nested lists: at least its numbers' worth of bytes
    assert document_nbytes({"data": {"img": frame.tolist()}}) >= 64 * 64 * 8
