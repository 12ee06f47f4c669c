"""Frames that never reach the reconstruction (review of ``distributed/_frames.py`` and the
derived run's stop): a derived run never says "success" for work it did not do.

Two ways a frame goes missing on a worker: its event never arrives (the raw run's stop counts
more events than the worker was given: a bus that lost or expired messages), or its event
arrives and Tiled never serves its frame (``TiledFrames`` gives up after ``frames_timeout_s``).
Either way the derived run's stop says how many (``ptychopinn.frames_missing``) and, below
the 50% rule of the reconstruction (most frames reconstructed), is not a success.

A real worker (``RunWorker``: its live reconstruction and derived-run guard) writing to a real
Tiled server over HTTP, fed the documents of a real RunEngine scan of the simulated beamline.
"""

from __future__ import annotations

import asyncio

import pytest
from bluesky import RunEngine
from bluesky_tiled_plugins import TiledWriter
from tiled.queries import Key

from bluesky_ptychopinn.devices import sim_beamline
from bluesky_ptychopinn.distributed import RunWorker, WorkerOptions
from bluesky_ptychopinn.plans import ptycho_scan

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def worker(tiled):
    worker = RunWorker(WorkerOptions(bus="nats://unused", tiled=tiled.uri,
                                     api_key=tiled.api_key, device="cpu", refine=False,
                                     batch_size=4, torch_threads=1, max_queue=8,
                                     report_every_s=1000, name="missing",
                                     frames_timeout_s=1.0))
    worker.client = tiled.client()
    worker._build_live()
    try:
        yield worker
    finally:
        worker.live.close()


def _scan_docs(n_side: int, seed: int, write_path=None) -> tuple[str, list]:
    docs: list[tuple[str, dict]] = []
    RE = RunEngine(call_returns_result=True)
    RE.subscribe(lambda name, doc: docs.append((name, doc)))
    bl = sim_beamline("cells", seed=seed, write_path=write_path)
    dx = bl.pixel_size_m
    result = RE(ptycho_scan(bl.detector, bl.stage, geometry=bl.ptycho_metadata(),
                            pattern="raster", extent_m=(5 * dx * (n_side - 1),) * 2,
                            step_m=5 * dx))
    return result.run_start_uids[0], docs


def _replay(docs):
    it = iter(docs)

    async def next_doc(timeout: float):
        return next(it, None)

    return next_doc


def _without_events(docs, keep) -> list:
    """The documents with only the events whose seq_num ``keep`` accepts (the others never
    arrive), the stop document as the RunEngine wrote it (all events counted)."""
    return [(n, d) for n, d in docs if n != "event" or keep(d["seq_num"])]


def _derived_stop(client, uid: str) -> dict:
    """The stop document of raw run ``uid``'s one derived run, as Tiled holds it."""
    (derived,) = client.search(Key("start.original_run_uid") == uid)
    return client[derived].metadata["stop"]


@pytest.mark.parametrize(("n_side", "lost", "status"), [(3, 6, "fail"), (4, 2, "success")])
def test_events_that_never_arrive_are_reported_and_count_against_success(worker, tiled,
                                                                         n_side, lost, status):
    uid, docs = _scan_docs(n_side, seed=n_side)
    total = n_side * n_side
    stop = next(d for n, d in docs if n == "stop")
    assert sum(stop["num_events"].values()) == total
    # the last `lost` events never reach the worker
    assert asyncio.run(worker.run_once(uid, _replay(
        _without_events(docs, lambda seq: seq <= total - lost))))
    derived = _derived_stop(tiled.client(), uid)
    summary = derived["ptychopinn"]
    assert summary["frames_done"] == total - lost
    assert derived["exit_status"] == status, derived
    assert summary["frames_missing"] == lost, summary
    assert summary["frames_missing_by_cause"] == {"not_received": lost}
    if status == "fail":
        assert f"{lost} never received" in derived["reason"], derived["reason"]


def test_frames_tiled_never_serves_are_reported_as_missing(worker, tiled):
    """The worker reads external frames through Tiled; the beamline's writer never
    registered the last two, so ``TiledFrames`` gives up on them after its timeout."""
    client = tiled.client()
    uid, docs = _scan_docs(3, seed=7, write_path=tiled.detector_dir)
    datums = [k for k, (n, _) in enumerate(docs) if n == "stream_datum"]
    assert len(datums) == 9  # one per point
    writer = TiledWriter(client, batch_size=1)
    for k, (name, doc) in enumerate(docs):
        if k not in datums[-2:]:  # Tiled never hears of the last two frames
            writer(name, doc)
    assert client[uid]["primary"][docs[0][1]["ptycho"]["detector_key"]].shape[0] == 7
    assert asyncio.run(worker.run_once(uid, _replay(docs)))
    derived = _derived_stop(client, uid)
    summary = derived["ptychopinn"]
    assert summary["frames_done"] == 7 and derived["exit_status"] == "success"
    assert summary["frames_missing"] == 2, derived
    assert summary["frames_missing_by_cause"] == {"no_frame": 2}
    assert summary["frames_unpaired"] == 0  # (counted once: as missing, not also unpaired)
