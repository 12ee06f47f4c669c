"""Bad input never ends in a silent "success", an unbounded allocation or a stuck run.

Each case feeds real event-model documents (composed with event-model's composers, frames
inline or in real HDF5 files) to a real ``LiveReconstruction`` and checks how the derived run
ends: its exit status, its reason and the stop document's counts by cause.
"""

from __future__ import annotations

import os
import resource
import threading
import time

import h5py
import numpy as np
import pytest
from event_model import compose_run

from bluesky_ptychopinn import physics
from bluesky_ptychopinn.callbacks import LiveReconstruction
from bluesky_ptychopinn.devices import sim_beamline

N_SIDE = 6  # 36 points


@pytest.fixture(scope="module")
def beamline():
    return sim_beamline("cells", seed=3)


@pytest.fixture(scope="module")
def live():
    live = LiveReconstruction("default", isolation="thread", refine=None, batch_size=16,
                              torch_threads=1, flush_after_s=60)
    yield live
    live.close()


def _points(bl, n_side: int = N_SIDE):
    dx = bl.pixel_size_m
    grid = np.stack(np.meshgrid(np.arange(n_side), np.arange(n_side), indexing="ij"), -1)
    pos_m = (grid.reshape(-1, 2) - (n_side - 1) / 2) * 5 * dx
    pos_px = physics.stage_to_pixels(pos_m, dx, origin_px=bl.detector.sample_origin_px)
    counts = physics.simulate_diffraction(bl.sample, bl.probe, pos_px, photons=1e6,
                                          seed=0).counts.numpy()
    return counts.astype(np.float32), pos_m


def _md(bl, n_side: int = N_SIDE, **changes) -> dict:
    md = {**bl.ptycho_metadata(), "detector_key": "det_image",
          "positioner_keys": {"y": "sy", "x": "sx"},
          "scan": {"extent_m": [5 * bl.pixel_size_m * (n_side - 1)] * 2,
                   "center_m": [0.0, 0.0]}}
    md.update(changes)
    return md


def _descriptor(bundle, frame_shape, image_key="det_image", external=False):
    image = {"source": "sim", "dtype": "array", "shape": list(frame_shape)}
    if external:
        image["external"] = "STREAM:"
    keys = {image_key: image, "sy": {"source": "sim", "dtype": "number", "shape": []},
            "sx": {"source": "sim", "dtype": "number", "shape": []}}
    return bundle.compose_descriptor(name="primary", data_keys=keys)


def _run(live, docs):
    """Feed ``docs`` and return the derived run's documents and state."""
    out = []
    token = live.subscribe(lambda name, doc: out.append((name, doc)))
    try:
        for name, doc in docs:
            live(name, doc)
        state = live.wait(docs[0][1]["uid"], timeout=120)
    finally:
        live._subscribers.remove(token)
    (stop,) = [doc for name, doc in out if name == "stop"
               and doc["run_start"] == state.derived_uid]
    return state, stop


def _inline_run(bl, frames, pos_m, md=None, image_key="det_image"):
    bundle = compose_run(metadata={"ptycho": md or _md(bl)})
    desc = _descriptor(bundle, frames[0].shape if len(frames) else (64, 64), image_key)
    docs = [("start", bundle.start_doc), ("descriptor", desc.descriptor_doc)]
    for k, (frame, p) in enumerate(zip(frames, pos_m, strict=True)):
        data = {image_key: frame, "sy": p[0], "sx": p[1]}
        docs.append(("event", desc.compose_event(data=data, timestamps=dict.fromkeys(data, 0.0),
                                                 seq_num=k + 1)))
    docs.append(("stop", bundle.compose_stop()))
    return docs


def _summary(stop):
    return stop["ptychopinn"]


# -- silent "success" ----------------------------------------------------------------------
def test_an_unknown_detector_key_fails_and_names_the_keys(beamline, live):
    frames, pos = _points(beamline)
    docs = _inline_run(beamline, frames, pos, image_key="other_image")
    state, stop = _run(live, docs)
    assert stop["exit_status"] == "fail" and "'det_image'" in stop["reason"]
    assert "other_image" in stop["reason"] and state.frames_done == 0


def test_a_run_without_frames_is_not_a_success(beamline, live):
    state, stop = _run(live, _inline_run(beamline, [], []))
    assert stop["exit_status"] == "fail" and "no frames" in stop["reason"]


def test_mostly_rejected_frames_fail_with_counts_by_cause(beamline, live):
    frames, pos = _points(beamline)
    frames[:30] = 0.0  # empty: a detector that stopped counting
    state, stop = _run(live, _inline_run(beamline, frames, pos))
    assert stop["exit_status"] == "fail" and "only 6 of 36" in stop["reason"]
    assert _summary(stop)["frames_rejected_by_cause"] == {"empty": 30}


def test_complex_frames_are_refused(beamline, live):
    frames, pos = _points(beamline)
    state, stop = _run(live, _inline_run(beamline, frames.astype(np.complex64), pos))
    assert stop["exit_status"] == "fail"
    assert _summary(stop)["frames_rejected_by_cause"] == {"complex": 36}


def test_a_run_that_is_not_ptychography_gets_no_derived_run(beamline):
    live = LiveReconstruction("default", isolation="thread", refine=None, torch_threads=1,
                              image_key="det_image", positioner_keys={"y": "sy", "x": "sx"})
    out = []
    live.subscribe(lambda name, doc: out.append(name))
    try:
        bundle = compose_run(metadata={"plan_name": "count"})
        live("start", bundle.start_doc)
        live("stop", bundle.compose_stop())
    finally:
        live.close()
    assert out == [] and live.runs == {}


# -- too strict ------------------------------------------------------------------------------
def test_one_nan_position_and_one_wrong_size_frame_are_skipped_not_fatal(beamline, live):
    frames, pos = _points(beamline)
    pos[5] = np.nan
    frames = list(frames)
    frames[9] = np.ones((32, 32), np.float32)
    state, stop = _run(live, _inline_run(beamline, frames, pos))
    assert stop["exit_status"] == "success" and state.frames_done == 34
    assert _summary(stop)["frames_rejected_by_cause"] == {"nonfinite_position": 1,
                                                          "wrong_shape": 1}


@pytest.mark.parametrize("dtype", [np.float16, np.float64, np.uint16, np.int32, np.bool_])
def test_other_dtypes_are_converted_explicitly(beamline, live, dtype):
    frames, pos = _points(beamline)
    state, stop = _run(live, _inline_run(beamline, np.minimum(frames, 6e4).astype(dtype), pos))
    assert stop["exit_status"] == "success" and state.frames_done == 36


def test_saturated_pixels_are_masked_and_negative_pixels_clipped(beamline, live):
    frames, pos = _points(beamline)
    raw = frames.astype(np.uint32)
    raw[:, 10, 10] = np.iinfo(np.uint32).max  # a dead pixel reading 2**32 - 1
    state, stop = _run(live, _inline_run(beamline, raw, pos))
    assert stop["exit_status"] == "success" and state.frames_done == 36
    assert _summary(stop)["masked_detector_pixels"] == 1
    assert state.snapshot.amplitude.max() < 100  # the 4e9 counts never reached the network
    negative = frames.copy()
    negative[:, 0, :5] = -3.0  # background-subtracted data
    state, stop = _run(live, _inline_run(beamline, negative, pos))
    assert stop["exit_status"] == "success" and _summary(stop)["negative_pixels_clipped"] == 180


# -- unbounded memory ------------------------------------------------------------------------
def test_micrometre_positions_are_converted_at_the_boundary(beamline, live):
    frames, pos = _points(beamline)
    metres, _ = _run(live, _inline_run(beamline, frames, pos))
    md = _md(beamline, position_units="um")
    micro, stop = _run(live, _inline_run(beamline, frames, pos * 1e6, md=md))
    assert stop["exit_status"] == "success"
    np.testing.assert_allclose(micro.snapshot.object, metres.snapshot.object, atol=1e-5)


def test_a_glitched_position_is_an_outlier_not_a_huge_canvas(beamline, live):
    frames, pos = _points(beamline)
    pos[7] = (5e-4, 0.0)  # 0.5 mm off: a 6 GB canvas before
    pos[8] = (1.0, 1.0)  # 1 m
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    state, stop = _run(live, _inline_run(beamline, frames, pos))
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert stop["exit_status"] == "success" and state.frames_done == 34
    assert _summary(stop)["frames_rejected_by_cause"] == {"position_outlier": 2}
    assert state.snapshot.object.size < 512 * 512 and grown_mib < 500


def test_without_a_declared_extent_the_canvas_limit_holds(beamline):
    frames, pos = _points(beamline)
    pos[3] = (1.0, 0.0)
    live = LiveReconstruction("default", isolation="thread", refine=None, torch_threads=1,
                              max_canvas_px=2048)
    try:
        state, stop = _run(live, _inline_run(beamline, frames, pos,
                                             md=_md(beamline, scan={})))
    finally:
        live.close()
    assert stop["exit_status"] == "success"
    assert _summary(stop)["frames_rejected_by_cause"] == {"position_outlier": 1}


# -- files and paths -------------------------------------------------------------------------
def _file_run(bl, path_uri: str, frames, pos, written: int | None = None, spec=None):
    bundle = compose_run(metadata={"ptycho": _md(bl)})
    desc = _descriptor(bundle, frames[0].shape, external=True)
    docs = [("start", bundle.start_doc), ("descriptor", desc.descriptor_doc)]
    if spec is not None:  # a legacy Resource
        res = bundle.compose_resource(spec=spec, root="/", resource_path=path_uri,
                                      resource_kwargs={})
        docs.append(("resource", res.resource_doc))
        for k, p in enumerate(pos):
            datum = res.compose_datum(datum_kwargs={"index": k})
            docs.append(("datum", datum))
            data = {"det_image": datum["datum_id"], "sy": p[0], "sx": p[1]}
            docs.append(("event", desc.compose_event(
                data=data, timestamps=dict.fromkeys(data, 0.0), seq_num=k + 1,
                filled={"det_image": False})))
    else:
        res = bundle.compose_stream_resource(mimetype="application/x-hdf5", uri=path_uri,
                                             data_key="det_image",
                                             parameters={"dataset": "/entry/data"})
        docs.append(("stream_resource", res.stream_resource_doc))
        docs.append(("stream_datum", res.compose_stream_datum(
            indices={"start": 0, "stop": len(pos)}, seq_nums={"start": 1,
                                                              "stop": len(pos) + 1},
            descriptor=desc.descriptor_doc)))
        for k, p in enumerate(pos):
            data = {"sy": p[0], "sx": p[1]}
            docs.append(("event", desc.compose_event(
                data=data, timestamps=dict.fromkeys(data, 0.0), seq_num=k + 1)))
    docs.append(("stop", bundle.compose_stop()))
    return docs


def _write(path, frames, written=None):
    with h5py.File(path, "w") as f:
        f["/entry/data"] = frames[:written] if written is not None else frames
    return path


def test_an_hdf5_file_shorter_than_its_stream_datums_fails(beamline, live, tmp_path):
    frames, pos = _points(beamline)
    path = _write(tmp_path / "short.h5", frames, written=10)
    state, stop = _run(live, _file_run(beamline, f"file://localhost{path}", frames, pos))
    assert stop["exit_status"] == "fail" and "only 10 of 36" in stop["reason"]
    assert _summary(stop)["frames_rejected_by_cause"] == {"missing_in_file": 26}


@pytest.mark.parametrize("uri", ["file://otherhost/{tmp}/ok.h5",
                                 "file://localhost/etc/{name}",
                                 "file://localhost{tmp}/../../../../../../etc/{name}",
                                 "relative/ok.h5"])
def test_files_outside_the_data_roots_are_refused_and_recorded(beamline, live, tmp_path,
                                                               uri):
    frames, pos = _points(beamline)
    _write(tmp_path / "ok.h5", frames)
    uri = uri.format(tmp=tmp_path, name="passwd")
    state, stop = _run(live, _file_run(beamline, uri, frames, pos))
    assert stop["exit_status"] == "fail" and "not read" in stop["reason"]
    assert _summary(stop)["frames_rejected_by_cause"] == {"file_refused": 36}


def test_an_added_data_root_is_read(beamline, tmp_path_factory):
    frames, pos = _points(beamline)
    root = tmp_path_factory.mktemp("detector")
    path = _write(root / "ok.h5", frames)
    live = LiveReconstruction("default", isolation="thread", refine=None, torch_threads=1,
                              data_roots=[root])
    try:
        state, stop = _run(live, _file_run(beamline, f"file://localhost{path}", frames, pos))
    finally:
        live.close()
    assert stop["exit_status"] == "success" and state.frames_done == 36


def test_a_fifo_never_wedges_the_reconstruction(beamline, live, tmp_path):
    frames, pos = _points(beamline)
    fifo = tmp_path / "stuck.h5"
    os.mkfifo(fifo)
    state, stop = _run(live, _file_run(beamline, f"file://localhost{fifo}", frames, pos))
    assert stop["exit_status"] == "fail" and "not a regular file" in stop["reason"]
    # ... and the next run is reconstructed as usual
    state, stop = _run(live, _inline_run(beamline, frames, pos))
    assert stop["exit_status"] == "success"


def test_a_hung_mount_holds_neither_the_loop_nor_the_other_runs(beamline, tmp_path,
                                                                 monkeypatch):
    """A detector file on a dead network mount: its reads never return. The run that needs
    it fails once its reads time out; a run that comes after it is reconstructed meanwhile."""
    frames, pos = _points(beamline)
    hung = _write(tmp_path / "hung.h5", frames)
    release, real_file = threading.Event(), h5py.File

    def file_on_a_dead_mount(path, *args, **kwargs):
        if str(path) == str(hung):
            release.wait(120)  # as an open() on a dead NFS server: stuck in the kernel
        return real_file(path, *args, **kwargs)

    monkeypatch.setattr(h5py, "File", file_on_a_dead_mount)
    live = LiveReconstruction("default", isolation="thread", refine=None, batch_size=16,
                              torch_threads=1, read_timeout_s=4)
    out = []
    live.subscribe(lambda name, doc: out.append((name, doc)))
    try:
        docs_hung = _file_run(beamline, f"file://localhost{hung}", frames, pos)
        docs_next = _inline_run(beamline, frames, pos)
        for name, doc in docs_hung + docs_next:
            live(name, doc)
        state_next = live.wait(docs_next[0][1]["uid"], timeout=60)
        # the next run was done while the first still waited for its file
        assert not live.latest(docs_hung[0][1]["uid"]).finished.is_set()
        state_hung = live.wait(docs_hung[0][1]["uid"], timeout=60)
    finally:
        release.set()
        live.close()
    stops = {doc["run_start"]: doc for name, doc in out if name == "stop"}
    assert stops[state_next.derived_uid]["exit_status"] == "success"
    assert state_next.frames_done == 36
    stop = stops[state_hung.derived_uid]
    assert stop["exit_status"] == "fail" and "no answer in 4 s" in stop["reason"]
    assert _summary(stop)["frames_rejected_by_cause"] == {"file_unreadable": 36}


def _slow_reads(monkeypatch, seconds: float, first: float | None = None) -> None:
    """Every detector-file read takes ``seconds`` (a loaded network file system), the first
    one ``first`` (a hiccup)."""
    from bluesky_ptychopinn.callbacks import _frames

    real_read = _frames._HDF5Source._read
    calls = []

    def slow_read(self, start, stop):
        time.sleep(first if first is not None and not calls else seconds)
        calls.append(start)
        return real_read(self, start, stop)

    monkeypatch.setattr(_frames._HDF5Source, "_read", slow_read)


def test_a_slow_file_is_read_whole_and_close_waits_for_it(beamline, tmp_path, monkeypatch):
    """A first read of 1.5 s (a hiccup: the file is then only polled), so the next 35 reads,
    0.1 s each, queue up behind it for 3.5 s, longer than the 2-s read timeout: only a read
    in progress times out, so every frame is read; and close() right after the stop finishes
    the run instead of failing it."""
    frames, pos = _points(beamline)
    path = _write(tmp_path / "slow.h5", frames)
    _slow_reads(monkeypatch, 0.1, first=1.5)
    live = LiveReconstruction("default", isolation="thread", refine=None, batch_size=16,
                              torch_threads=1, read_timeout_s=2)
    out = []
    live.subscribe(lambda name, doc: out.append((name, doc)))
    docs = _file_run(beamline, f"file://localhost{path}", frames, pos)
    for name, doc in docs:
        live(name, doc)
    live.close(timeout=60)
    (stop,) = [doc for name, doc in out if name == "stop"]
    assert stop["exit_status"] == "success", stop["reason"]
    assert live.latest(docs[0][1]["uid"]).frames_done == 36


def test_a_slow_file_missing_frames_ends_once_the_run_is_over(beamline, tmp_path,
                                                            monkeypatch):
    """Frames never written to a slow file are given up at the stop, not asked for again and
    again: the run ends, in bounded time, with the counts by cause."""
    frames, pos = _points(beamline)
    path = _write(tmp_path / "short.h5", frames, written=30)
    _slow_reads(monkeypatch, 0.2)
    live = LiveReconstruction("default", isolation="thread", refine=None, batch_size=16,
                              torch_threads=1, read_timeout_s=2)
    try:
        state, stop = _run(live, _file_run(beamline, f"file://localhost{path}", frames, pos))
    finally:
        live.close()
    assert stop["exit_status"] == "success" and state.frames_done == 30
    assert _summary(stop)["frames_rejected_by_cause"] == {"missing_in_file": 6}


def test_an_unsupported_legacy_resource_is_refused_not_ignored(beamline, live, tmp_path):
    frames, pos = _points(beamline)
    state, stop = _run(live, _file_run(beamline, str(tmp_path / "seq"), frames, pos,
                                       spec="NPY_SEQ"))
    assert stop["exit_status"] == "fail" and "NPY_SEQ" in stop["reason"]
    assert _summary(stop)["frames_rejected_by_cause"] == {"file_refused": 36}


# -- lifecycle -------------------------------------------------------------------------------
def test_a_run_without_a_stop_document_is_closed_by_close(beamline):
    """Thread mode once left such a run open forever, even after close()."""
    frames, pos = _points(beamline)
    docs = _inline_run(beamline, frames, pos)[:-1]
    live = LiveReconstruction("default", isolation="thread", refine=None, torch_threads=1)
    out = []
    live.subscribe(lambda name, doc: out.append((name, doc)))
    for name, doc in docs:
        live(name, doc)
    closer = threading.Thread(target=live.close, kwargs={"timeout": 30})
    closer.start()
    closer.join(60)
    assert not closer.is_alive()
    state = live.wait(timeout=5)
    assert out[-1][0] == "stop" and out[-1][1]["exit_status"] == "fail"
    assert "closed" in out[-1][1]["reason"] and state.failed
