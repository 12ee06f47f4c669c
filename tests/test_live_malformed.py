"""Malformed documents reach the live callback (review of 2026-12-03): each is refused and
counted where it is, never allocated from blindly, and one bad row never costs the run the
good frames after it."""

from __future__ import annotations

import copy

from test_live_faults import MD, _live, _run


def _feed(live, docs, uid, timeout: float = 60):
    for doc in docs:
        live(*doc)
    return live.wait(uid, timeout=timeout)


def test_a_scan_extent_beyond_the_canvas_limit_fails_the_run_before_allocating_it():
    # Before: the canvas was sized from extent_m alone, and the reconstructors raised their
    # own limit to that size (5 mm at 59 nm per pixel: 85,000 px a side, 58 GB a canvas).
    # Here: 2,000 px against a limit of 1,024, which used to be allocated and "succeed".
    md = copy.deepcopy(MD)
    md["scan"]["extent_m"] = [1.2e-4, 1.2e-4]
    live, stops = _live(max_queue=50, backpressure="block", max_canvas_px=1024)
    try:
        uid, docs = _run(12, md)
        state = _feed(live, docs, uid)
    finally:
        live.close()
    assert stops[-1]["exit_status"] == "fail", stops[-1]
    assert "extent_m" in stops[-1]["reason"] and "max_canvas_px=1024" in stops[-1]["reason"]
    assert state.frames_done == 0


def test_a_scan_extent_that_is_not_two_numbers_is_a_clear_error():
    md = copy.deepcopy(MD)
    md["scan"]["extent_m"] = [1e-7, "wide"]
    live, stops = _live(max_queue=50, backpressure="block")
    try:
        uid, docs = _run(12, md)
        _feed(live, docs, uid)
    finally:
        live.close()
    assert stops[-1]["exit_status"] == "fail"
    assert "ptycho.scan.extent_m: two finite numbers" in stops[-1]["reason"], stops[-1]


def _stream_docs(uid: str, seq_nums: dict, indices: dict) -> list:
    """A StreamResource whose file is refused (outside the data roots) and one StreamDatum."""
    resource = {"uid": f"{uid}-sr", "run_start": uid, "data_key": "img",
                "mimetype": "application/x-hdf5", "uri": "file://localhost/elsewhere/d.h5",
                "parameters": {"dataset": "/entry/data/data"}}
    datum = {"uid": f"{uid}-sr/0", "stream_resource": resource["uid"], "descriptor": "d",
             "seq_nums": seq_nums, "indices": indices}
    return [("stream_resource", resource), ("stream_datum", datum)]


def test_a_stream_datum_declaring_an_absurd_range_is_refused_not_expanded():
    # Before: a declared range of 20 million frames became 20 million set entries (1.5 GB,
    # seconds of the RunEngine's thread); 2**31 would have exhausted memory.
    live, stops = _live(max_queue=50, backpressure="block")
    try:
        uid, docs = _run(12)
        docs[2:2] = _stream_docs(uid, {"start": 100, "stop": 100 + 20_000_000},
                                 {"start": 0, "stop": 20_000_000})
        state = _feed(live, docs, uid)
    finally:
        live.close()
    summary = stops[-1]["ptychopinn"]
    assert summary["frames_rejected_by_cause"].get("malformed_stream_datum") == 1, summary
    assert state.frames_done == 12  # the run's inline frames are reconstructed


def test_a_stream_datum_whose_indices_do_not_match_its_frames_is_refused():
    live, stops = _live(max_queue=50, backpressure="block")
    try:
        uid, docs = _run(12)
        docs[2:2] = _stream_docs(uid, {"start": 100, "stop": 110}, {"start": 0, "stop": 3})
        _feed(live, docs, uid)
    finally:
        live.close()
    summary = stops[-1]["ptychopinn"]
    assert summary["frames_rejected_by_cause"].get("malformed_stream_datum") == 1, summary


def test_one_event_without_its_position_costs_one_frame_not_the_run():
    # Before: the KeyError failed the run; the 38 good frames after it were thrown away.
    live, stops = _live(max_queue=50, backpressure="block")
    try:
        uid, docs = _run(40)
        bad = [doc for name, doc in docs if name == "event"][1]
        del bad["data"]["sx"]
        state = _feed(live, docs, uid)
    finally:
        live.close()
    summary = stops[-1]["ptychopinn"]
    assert state.failed is None or not state.failed, state.failed
    assert state.frames_done == 39
    assert summary["frames_rejected_by_cause"] == {"malformed_event": 1}, summary
