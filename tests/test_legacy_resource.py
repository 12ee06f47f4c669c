"""Frames referenced by legacy Resource/Datum documents (the areaDetector ``AD_HDF5`` style that
older ophyd detectors still emit) reach the reconstruction exactly as inline frames do.

Real RunEngine, a real ophyd device writing a real HDF5 file, real event-model documents.
"""

from __future__ import annotations

import threading
import time
import uuid
from pathlib import Path

import h5py
import numpy as np
import pytest
from bluesky import RunEngine
from event_model import compose_resource, compose_run
from ophyd.status import DeviceStatus

from bluesky_ptychopinn.callbacks import FramePairer, LiveReconstruction
from bluesky_ptychopinn.devices import HDF5_DATASET, PtychoDetector, sim_beamline
from bluesky_ptychopinn.models import ModelRegistry
from bluesky_ptychopinn.plans import ptycho_scan


class LegacyHDF5Detector(PtychoDetector):
    """The simulated detector, but with Resource/Datum bookkeeping of the pre-StreamResource era.

    ``stage()`` opens an HDF5 file (SWMR) and caches a Resource (spec ``AD_HDF5``, path relative
    to ``root``, ``frame_per_point`` 1); each exposure appends a frame, caches a Datum with
    ``point_number`` and makes ``read()`` return the datum id in place of the image, as
    ophyd's ``FileStoreHDF5`` plugin mixins do.
    """

    def __init__(self, *, legacy_dir: Path, **kwargs) -> None:
        super().__init__(write_path=None, **kwargs)  # the base class writes nothing itself
        self.legacy_dir = Path(legacy_dir)
        self.file_path: Path | None = None
        self._resource_uid: str | None = None
        self._datum_id: str | None = None

    def stage(self):
        self.legacy_dir.mkdir(parents=True, exist_ok=True)
        n = self.frame_size
        self._resource_uid = str(uuid.uuid4())
        relative = f"{self._resource_uid}.h5"  # relative to root, as AD writes it
        bundle = compose_resource(
            spec="AD_HDF5", root=str(self.legacy_dir), resource_path=relative,
            resource_kwargs={"frame_per_point": 1}, path_semantics="posix",
            uid=self._resource_uid)
        self.file_path = self.legacy_dir / relative
        self._file = h5py.File(self.file_path, "w", libver="latest")
        self._dataset = self._file.create_dataset(
            HDF5_DATASET, shape=(0, n, n), maxshape=(None, n, n), dtype=self.dtype,
            chunks=(1, n, n))
        self._file.swmr_mode = True
        self._asset_docs.append(("resource", bundle.resource_doc))  # RE adds run_start
        self._compose_datum = bundle.compose_datum
        return super().stage()

    def trigger(self) -> DeviceStatus:
        status = DeviceStatus(self)

        def expose():
            try:
                frame = self._compute_frame()
                with self._lock:
                    index = self._dataset.shape[0]
                    self._dataset.resize(index + 1, axis=0)
                    self._dataset[index] = frame
                    self._dataset.flush()
                    datum = self._compose_datum(datum_kwargs={"point_number": index})
                    self._datum_id = datum["datum_id"]
                    self._asset_docs.append(("datum", datum))
                status.set_finished()
            except Exception as exc:
                status.set_exception(exc)

        threading.Thread(target=expose, daemon=True).start()
        return status

    def describe(self):
        desc = super().describe()
        desc[self.image_key].update(source=f"HDF5:{self.name}", external="FILESTORE:")
        return desc

    def read(self):
        reading = super().read()
        reading[self.image_key] = {"value": self._datum_id, "timestamp": time.time()}
        return reading


@pytest.fixture(scope="module")
def model():
    net, _ = ModelRegistry().load("default")
    return net


def _scan(RE, bl, detector, n_side: int = 6):
    dx = bl.pixel_size_m
    return RE(ptycho_scan(detector, bl.stage, geometry=bl.ptycho_metadata(), pattern="raster",
                          extent_m=(5 * dx * (n_side - 1),) * 2, step_m=5 * dx))


def _events(raw: list, run_uid: str) -> list[dict]:
    primary = {d["uid"] for n, d in raw if n == "descriptor" and d["run_start"] == run_uid}
    return [d for n, d in raw if n == "event" and d["descriptor"] in primary]


def test_legacy_resource_datum_frames_reconstruct_like_inline_frames(tmp_path, model):
    # One batch at the stop document (batch_size > frames, no idle flush), so both runs are
    # reconstructed from identical input in an identical order and must agree to rounding.
    # crop pinned: with crop="auto" the choice follows the refined image, whose progress
    # depends on wall time; this test is about reading frames, not stitching.
    live = LiveReconstruction(model, batch_size=1000, snapshot_every=1000, flush_after_s=60,
                              crop=24,
                              torch_threads=1)
    derived: list[tuple[str, dict]] = []
    live.subscribe(lambda name, doc: derived.append((name, doc)))
    raw: list[tuple[str, dict]] = []
    RE = RunEngine(call_returns_result=True)
    RE.subscribe(lambda name, doc: raw.append((name, doc)))
    RE.subscribe(live)
    try:
        inline_bl = sim_beamline("cells", write_path=None, seed=11)
        inline_uid = _scan(RE, inline_bl, inline_bl.detector).run_start_uids[0]
        inline = live.wait(inline_uid, timeout=120)

        legacy_bl = sim_beamline("cells", write_path=None, seed=11)
        old = legacy_bl.detector
        detector = LegacyHDF5Detector(
            legacy_dir=tmp_path / "ad", name=old.name, stage=legacy_bl.stage,
            sample=legacy_bl.sample, probe=legacy_bl.probe, pixel_size_m=old.pixel_size_m,
            photon_flux=old.photon_flux.get(), seed=11)
        detector.exposure_time.put(old.exposure_time.get())
        result = _scan(RE, legacy_bl, detector)
        legacy = live.wait(result.run_start_uids[0], timeout=120)
    finally:
        live.close()

    # the raw run really is a legacy one: a Resource, one Datum per frame, datum ids in events
    resources = [d for n, d in raw if n == "resource"]
    assert len(resources) == 1 and resources[0]["spec"] == "AD_HDF5"
    assert resources[0]["run_start"] == result.run_start_uids[0]
    datum_ids = [d["datum_id"] for n, d in raw if n == "datum"]
    assert len(datum_ids) == 36
    legacy_events = _events(raw, result.run_start_uids[0])
    assert [e["data"][old.image_key] for e in legacy_events] == datum_ids

    # the HDF5 file holds exactly the frames the inline run carried in its events
    inline_frames = np.stack([e["data"][old.image_key] for e in _events(raw, inline_uid)])
    assert inline_frames.shape == (36, 64, 64)
    with h5py.File(detector.file_path, "r") as f:
        np.testing.assert_array_equal(f[HDF5_DATASET][()], inline_frames)

    assert result.exit_status == "success"
    for state in (inline, legacy):
        assert state.failed is None and state.frames_done == 36
    stops = {d["run_start"]: d for n, d in derived if n == "stop"}
    legacy_stop = stops[legacy.derived_uid]
    assert legacy_stop["exit_status"] == "success"
    assert legacy_stop["ptychopinn"]["frames_unpaired"] == 0
    assert inline.snapshot.n_frames == legacy.snapshot.n_frames == 36
    assert np.abs(legacy.snapshot.object).max() > 0
    np.testing.assert_allclose(legacy.snapshot.object, inline.snapshot.object, rtol=0,
                               atol=1e-6)
    np.testing.assert_allclose(legacy.snapshot.weight, inline.snapshot.weight, rtol=0,
                               atol=1e-6)


def test_frame_per_point_sums_the_exposures_of_a_point_and_late_datums_resolve(tmp_path):
    """``frame_per_point`` > 1 (several exposures per scan point, AD_HDF5 semantics) and a
    Datum that arrives after the event referring to it."""
    rng = np.random.default_rng(0)
    frames = rng.poisson(5.0, size=(6, 8, 8)).astype(np.uint32)  # 3 points x 2 exposures
    path = tmp_path / "ad.h5"
    with h5py.File(path, "w", libver="latest") as f:
        f.create_dataset(HDF5_DATASET, data=frames, maxshape=(None, 8, 8), chunks=(1, 8, 8))
    run = compose_run()
    resource = run.compose_resource(spec="AD_HDF5", root=str(tmp_path), resource_path="ad.h5",
                                    resource_kwargs={"frame_per_point": 2})
    descriptor = run.compose_descriptor(name="primary", data_keys={
        "det_image": {"source": "HDF5", "dtype": "array", "shape": [8, 8],
                      "external": "FILESTORE:"},
        "y": {"source": "sim", "dtype": "number", "shape": []},
        "x": {"source": "sim", "dtype": "number", "shape": []}})
    datums = [resource.compose_datum(datum_kwargs={"point_number": p}) for p in range(3)]
    pairer = FramePairer("det_image", "y", "x")
    pairer.resource(resource.resource_doc)
    assert pairer.descriptor(descriptor.descriptor_doc)
    pairer.datum(datums[0])
    pairer.datum(datums[1])
    for p in range(3):
        pairer.event(descriptor.compose_event(
            data={"det_image": datums[p]["datum_id"], "y": float(p), "x": -float(p)},
            timestamps={"det_image": 0.0, "y": 0.0, "x": 0.0}))
    pairer.datum(datums[2])  # after its event
    got, positions, seqs = pairer.pop_ready()
    pairer.close()
    assert seqs == [1, 2, 3] and pairer.unpaired == 0
    np.testing.assert_array_equal(got, frames.reshape(3, 2, 8, 8).sum(axis=1))
    np.testing.assert_array_equal(positions, [[0, 0], [1, -1], [2, -2]])


def _legacy_run(tmp_path: Path, *, seed: int, n_side: int) -> tuple[str, list]:
    """A raster scan by the legacy detector through a real RunEngine: its uid and every
    document it emitted, in order."""
    raw: list[tuple[str, dict]] = []
    RE = RunEngine(call_returns_result=True)
    RE.subscribe(lambda name, doc: raw.append((name, doc)))
    bl = sim_beamline("cells", write_path=None, seed=seed)
    old = bl.detector
    detector = LegacyHDF5Detector(
        legacy_dir=tmp_path / "ad", name=old.name, stage=bl.stage, sample=bl.sample,
        probe=bl.probe, pixel_size_m=old.pixel_size_m, photon_flux=old.photon_flux.get(),
        seed=seed)
    return _scan(RE, bl, detector, n_side=n_side).run_start_uids[0], raw


def _replay(live: LiveReconstruction, docs: list, uid: str) -> tuple:
    """``docs`` through ``live``: the run's state and the derived stop documents."""
    stops: list = []
    live.subscribe(lambda name, doc: stops.append(doc) if name == "stop" else None)
    try:
        for name, doc in docs:
            live(name, doc)
        return live.wait(uid, timeout=120), stops
    finally:
        live.close()


def test_events_that_arrive_before_their_datum_are_reconstructed(tmp_path, model):
    """A transport that reorders (a replay, a bus merging two topics) can deliver an event
    before the Datum it references. The pairing waits for the Datum; event-model's default
    filler used to raise on such an event in the RunEngine's thread, and the derived run said
    "the run has no frames"."""
    uid, raw = _legacy_run(tmp_path, seed=12, n_side=4)
    reordered: list[tuple[str, dict]] = []
    held: list[tuple[str, dict]] = []
    for name, doc in raw:  # each Datum after the event that references it
        if name == "datum":
            held.append((name, doc))
            continue
        reordered.append((name, doc))
        if name == "event":
            reordered.extend(held)
            held.clear()
    assert any(n == "event" for n, _ in reordered[:reordered.index(
        next(item for item in reordered if item[0] == "datum"))])
    live = LiveReconstruction(model, batch_size=8, torch_threads=1, refine=None)
    state, stops = _replay(live, reordered, uid)
    assert state.failed is None and state.frames_done == 16, (state.failed, stops[-1])
    assert stops[-1]["exit_status"] == "success"


def test_under_skip_the_runengine_never_waits_on_a_frames_datum(tmp_path, model):
    """Back-pressure "skip" promises the RunEngine never waits for the reconstruction. It used
    to wait on every Datum (one per frame here) once the queue was full; now a Datum that finds
    it full is dropped with its event, and the frame counted once as skipped."""
    uid, raw = _legacy_run(tmp_path, seed=13, n_side=10)
    live = LiveReconstruction(model, batch_size=8, torch_threads=1, refine=None, max_queue=4,
                              backpressure="skip")
    waited: list[str] = []  # documents handed over with the waiting put
    put = live._transport.put
    live._transport.put = lambda item: (waited.append(item[2]), put(item))[1]
    state, stops = _replay(live, raw, uid)
    summary = stops[-1]["ptychopinn"]
    assert not {"datum", "datum_page", "event", "event_page"} & set(waited), sorted(set(waited))
    assert state.frames_skipped > 0  # the queue was full: the check above meant something
    assert state.frames_done + state.frames_skipped == 100, (state.frames_done, summary)
    assert summary["frames_unpaired"] == 0, summary  # no event left waiting for its Datum
