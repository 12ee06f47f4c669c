"""Tiled outages (issue 11): SpooledWriter keeps the scan going and delivers every document once.

A real Tiled server in a child process is killed (SIGKILL) and started again on the same port
and data directory while a real RunEngine scans the simulated beamline; raw and derived runs
are then compared with the documents emitted.
"""

from __future__ import annotations

import threading
import time

import httpx
import numpy as np
import pytest
import tiled.client.utils as tiled_utils
from _tiled_process import module_server
from bluesky import RunEngine
from bluesky_tiled_plugins import TiledWriter
from event_model import unpack_event_page
from typer.testing import CliRunner

from bluesky_ptychopinn.callbacks import LiveReconstruction
from bluesky_ptychopinn.catalog import SpooledWriter, spool_status
from bluesky_ptychopinn.catalog._journal import JournalWriter, encode_document, read_journal
from bluesky_ptychopinn.cli import app
from bluesky_ptychopinn.devices import sim_beamline
from bluesky_ptychopinn.plans import ptycho_scan

#: Journal whatever the disk's free space (a CI machine's disk may be nearly full); the guard
#: itself is tested on its own below.
ANY_DISK = {"min_free_bytes": 0}


server = module_server("outage")


@pytest.fixture
def fail_fast(monkeypatch):
    # The Tiled client retries a dead server for 45 s per request; 2 s makes a 5 s outage
    # fail the writer's calls, so that the delete-and-replay path is what is tested.
    monkeypatch.setattr(tiled_utils, "TILED_RETRY_TIMEOUT", 2.0)


def _collector():
    docs: list[tuple[str, dict]] = []
    return docs, lambda name, doc: docs.append((name, doc))


def _scan(bl, RE, n_side=8):
    dx = bl.pixel_size_m
    return RE(ptycho_scan(bl.detector, bl.stage, geometry=bl.ptycho_metadata(),
                          pattern="raster", extent_m=(5 * dx * (n_side - 1),) * 2,
                          step_m=5 * dx))


def _events_by_stream(docs):
    streams = {d["uid"]: d["name"] for n, d in docs if n == "descriptor"}
    out: dict[str, list[dict]] = {}
    for name, doc in docs:
        if name == "event":
            out.setdefault(streams[doc["descriptor"]], []).append(doc)
        elif name == "event_page":  # the derived run's metrics
            out.setdefault(streams[doc["descriptor"]], []).extend(unpack_event_page(doc))
    return out


def _assert_in_tiled_exactly(client, docs):
    """The run in Tiled holds every event once, with the emitted arrays and scalars."""
    start = next(d for n, d in docs if n == "start")
    stop = next(d for n, d in docs if n == "stop")
    run = client[start["uid"]]
    assert run.metadata["stop"]["uid"] == stop["uid"]
    for stream, events in _events_by_stream(docs).items():
        base = run[stream].base
        seq = np.asarray(base["internal"].read(["seq_num"])["seq_num"])
        assert sorted(seq.tolist()) == [e["seq_num"] for e in events]  # none lost, none twice
        order = np.argsort(seq)
        for key, value in events[0]["data"].items():
            if isinstance(value, np.ndarray) and value.ndim >= 1 and key in base:
                stored = base[key].read()
                assert stored.shape[0] == len(events), key
                np.testing.assert_array_equal(stored, np.stack([e["data"][key] for e in events]))
        scalars = [k for k, v in events[0]["data"].items() if np.isscalar(v)]
        if scalars:
            table = base["internal"].read(scalars)
            for key in scalars:
                np.testing.assert_array_equal(np.asarray(table[key])[order],
                                              [e["data"][key] for e in events])


def test_journal_round_trips_arrays_exactly_and_stops_at_a_torn_record(tmp_path):
    doc = {"uid": "e1", "data": {"f32": np.arange(12, dtype=np.float32).reshape(3, 4) / 7,
                                 "u32": np.array([[2**32 - 1, 0]], dtype=np.uint32),
                                 "c64": np.array([1 + 2j], dtype=np.complex64),
                                 "flag": np.bool_(True), "zero_d": np.array(3.5),
                                 "f_order": np.asfortranarray(np.eye(3, dtype=np.int16)),
                                 "i64": np.int64(-3), "text": "a", "nested": [[1, 2.5]],
                                 "f64": np.float64(np.nan)}}
    journal = JournalWriter(tmp_path / "run.journal")
    journal.append(encode_document("event", doc))
    record = encode_document("stop", {"uid": "s"})
    journal.append(record[: len(record) // 2])  # a crash in the middle of an append
    journal.close()
    [(_, name, back)] = list(read_journal(tmp_path / "run.journal"))
    assert name == "event"
    for key, value in doc["data"].items():
        if isinstance(value, (np.ndarray, np.generic)) and key != "f64":
            assert type(back["data"][key]) is type(value), key
            assert back["data"][key].dtype == value.dtype
            np.testing.assert_array_equal(back["data"][key], value)
    assert back["data"]["nested"] == [[1, 2.5]] and back["data"]["text"] == "a"
    assert np.isnan(back["data"]["f64"])  # np.float64 is a float: JSON keeps the same double


def test_an_outage_during_a_scan_costs_the_scan_nothing_and_loses_nothing(server, tmp_path,
                                                                          fail_fast):
    client = server.client()
    live = LiveReconstruction("default", isolation="thread", refine=None, torch_threads=1,
                              batch_size=16, snapshot_every=16, publish_interval_s=0.0)
    raw = SpooledWriter(TiledWriter(client, batch_size=10), spool_dir=tmp_path, label="raw",
                        probe_interval_s=0.2, **ANY_DISK)
    derived = SpooledWriter(TiledWriter(client, batch_size=1), spool_dir=tmp_path,
                            label="derived", probe_interval_s=0.2, **ANY_DISK)
    assert (tmp_path.stat().st_mode & 0o777) == 0o700
    RE = RunEngine(call_returns_result=True)
    raw_docs, keep_raw = _collector()
    derived_docs, keep_derived = _collector()
    RE.subscribe(raw)
    RE.subscribe(keep_raw)
    live.subscribe(derived)
    live.subscribe(keep_derived)
    RE.subscribe(live)
    bl = sim_beamline("cells", write_path=None, seed=11)  # frames inline: arrays via the spool
    bl.detector.dead_time = 0.15  # ~10 s scans: the server goes and comes back within one

    t0 = time.monotonic()
    assert _scan(bl, RE).exit_status == "success"
    baseline = time.monotonic() - t0
    live.wait(timeout=60)
    assert raw.flush(60) and derived.flush(60)
    before = len(raw_docs)
    raw_docs.clear()
    derived_docs.clear()

    events = {"n": 0}
    restarted = threading.Event()

    def outage(name, doc):
        if name == "event":
            events["n"] += 1
            if events["n"] == 8:
                def kill_and_restart():
                    server.kill()
                    time.sleep(1.0)
                    server.start()  # ~7 s on 2 cores: Tiled is away for ~8 s
                    restarted.set()
                threading.Thread(target=kill_and_restart, daemon=True).start()

    RE.subscribe(outage)
    t0 = time.monotonic()
    result = _scan(bl, RE)
    duration = time.monotonic() - t0
    assert result.exit_status == "success"
    assert restarted.wait(60)
    assert duration < 1.3 * baseline + 2.0, (duration, baseline)  # the RunEngine never waited
    live.wait(timeout=60)
    assert raw.flush(90) and derived.flush(90), (raw.status(), derived.status())
    raw_status, derived_status = raw.status(), derived.status()
    assert raw_status["outages"] >= 1 and raw_status["replays"] >= 1, raw_status
    assert raw_status["spooled"] > 0 and raw_status["dropped"] == 0
    assert raw_status["received"] == before + len(raw_docs)
    assert derived_status["dropped"] == 0
    _assert_in_tiled_exactly(client, raw_docs)
    assert next(d for n, d in derived_docs if n == "stop")["exit_status"] == "success"
    _assert_in_tiled_exactly(client, derived_docs)
    assert not list(tmp_path.glob("*/*.journal"))  # delivered and verified: journals gone
    raw.close()
    derived.close()
    live.close()


def test_a_request_applied_by_tiled_whose_reply_was_lost_is_not_duplicated(server, tmp_path):
    client = server.client()
    raw = SpooledWriter(TiledWriter(client, batch_size=5), spool_dir=tmp_path, label="raw",
                         **ANY_DISK)
    make = raw._delivery.new_writer
    calls = {"n": 0}

    def writer_losing_one_reply():
        inner = make()

        def write(name, doc):
            inner(name, doc)  # reaches Tiled ...
            calls["n"] += 1
            if calls["n"] == 20:  # ... but the caller sees the connection drop
                raise httpx.ReadError("connection reset after the request was sent")
        return write

    raw._delivery.new_writer = writer_losing_one_reply
    RE = RunEngine(call_returns_result=True)
    docs, keep = _collector()
    RE.subscribe(raw)
    RE.subscribe(keep)
    assert _scan(sim_beamline("cells", write_path=None, seed=12), RE, n_side=6).exit_status \
        == "success"
    assert raw.flush(60), raw.status()
    assert raw.status()["replays"] == 1 and raw.status()["redelivered"] >= 19
    _assert_in_tiled_exactly(client, docs)
    raw.close()


def test_spool_status_and_flush_deliver_what_an_ended_process_left(server, tmp_path,
                                                                   fail_fast, monkeypatch):
    writer = TiledWriter(server.client(), batch_size=10)  # built while Tiled is up, as usual
    server.kill()
    scans = {}
    for seed, label in [(13, "raw"), (14, "other")]:
        spooled = SpooledWriter(writer, spool_dir=tmp_path, label=label, **ANY_DISK)
        RE = RunEngine(call_returns_result=True)
        docs, keep = _collector()
        RE.subscribe(spooled)
        RE.subscribe(keep)
        t0 = time.monotonic()
        assert _scan(sim_beamline("cells", write_path=None, seed=seed), RE, n_side=5) \
            .exit_status == "success"
        assert time.monotonic() - t0 < 15  # with no Tiled at all
        assert not spooled.close(timeout=0)  # the process "ends": its journal stays
        scans[label] = docs
    runner = CliRunner()
    status = runner.invoke(app, ["spool", "status", "--spool-dir", str(tmp_path)])
    assert status.exit_code == 0 and "2 run(s) spooled" in status.output, status.output
    entries = {e["label"]: e for e in spool_status(tmp_path)}
    assert entries["raw"]["documents"] == len(scans["raw"]) and entries["raw"]["stopped"]
    assert not entries["raw"]["in_use"]

    server.start()
    monkeypatch.setenv("TILED_API_KEY", server.api_key)
    flushed = runner.invoke(app, ["spool", "flush", "--spool-dir", str(tmp_path),
                                  "--tiled", server.uri, "--label", "raw"])
    assert flushed.exit_code == 0, flushed.output
    assert '"runs_done": 1' in flushed.output
    client = server.client()
    _assert_in_tiled_exactly(client, scans["raw"])
    # The next writer of a label delivers what an earlier process left under it.
    later = SpooledWriter(TiledWriter(client, batch_size=10), spool_dir=tmp_path, label="other",
                          **ANY_DISK)
    assert later.flush(60), later.status()
    _assert_in_tiled_exactly(client, scans["other"])
    later.close()
    assert spool_status(tmp_path) == []


def test_a_nearly_full_disk_is_never_filled_by_the_spool(server, tmp_path, caplog):
    """Below ``min_free_bytes`` free, documents are dropped and counted, not journaled (the
    detector's frames need that disk more): only the run's start and stop, so the run stays
    a unit; the scan goes on and the loss is said."""
    raw = SpooledWriter(TiledWriter(server.client(), batch_size=10), spool_dir=tmp_path,
                        label="raw", min_free_bytes=1 << 62)  # more than any disk has free
    RE = RunEngine(call_returns_result=True)
    docs, keep = _collector()
    RE.subscribe(raw)
    RE.subscribe(keep)
    with caplog.at_level("ERROR", logger="bluesky_ptychopinn.catalog"):
        assert _scan(sim_beamline("cells", write_path=None, seed=12), RE,
                     n_side=3).exit_status == "success"
        assert raw.close(timeout=30)
    assert raw.stats.received == len(docs)
    assert raw.stats.dropped == raw.stats.disk_low == len(docs) - 2  # all but start and stop
    assert not list((tmp_path / "raw").glob("*.journal"))  # delivered, then removed
    messages = [r.message for r in caplog.records]
    assert sum("documents are dropped" in m for m in messages) == 1
    assert any(f"is incomplete: {len(docs) - 2} of its documents" in m for m in messages)


def test_journals_are_made_durable_while_a_run_is_open(server, tmp_path, monkeypatch):
    """fsync runs in the delivery thread about every ``sync_interval_s``, not only at the
    stop document: a power cut during an outage loses at most the last interval."""
    synced = []
    real_sync = JournalWriter.sync
    monkeypatch.setattr(JournalWriter, "sync",
                        lambda self: (synced.append(self.size), real_sync(self))[1])
    raw = SpooledWriter(TiledWriter(server.client(), batch_size=10), spool_dir=tmp_path,
                        label="raw", sync_interval_s=0.2, **ANY_DISK)
    RE = RunEngine(call_returns_result=True)
    bl = sim_beamline("cells", write_path=None, seed=13)
    bl.detector.dead_time = 0.05  # a scan of ~2 s: several sync intervals
    RE.subscribe(raw)
    _scan(bl, RE, n_side=6)
    raw.close(timeout=30)
    assert len(synced) >= 3  # during the run, then the stop's own


def test_a_low_disk_episode_between_two_runs_keeps_them_apart(server, tmp_path, monkeypatch,
                                                              caplog):
    """Starts and stops are journaled even on a nearly full disk, so the next run's documents
    never land in the run before it; what was not journaled is counted and said."""
    import shutil
    from collections import namedtuple

    from event_model import compose_run

    usage, real_usage = namedtuple("usage", "total used free"), shutil.disk_usage
    low = threading.Event()
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(1, 1, 0) if low.is_set()
                        else real_usage(path))
    client = server.client()
    raw = SpooledWriter(TiledWriter(client, batch_size=1), spool_dir=tmp_path, label="raw",
                        min_free_bytes=1)
    keys = {"x": {"source": "sim", "dtype": "number", "shape": []}}

    def run_docs():
        bundle = compose_run()
        desc = bundle.compose_descriptor(name="primary", data_keys=keys)
        events = [desc.compose_event(data={"x": float(k)}, timestamps={"x": 0.0}, seq_num=k)
                  for k in range(1, 7)]
        return bundle, desc, events

    a, a_desc, a_events = run_docs()
    b, b_desc, b_events = run_docs()
    with caplog.at_level("ERROR", logger="bluesky_ptychopinn.catalog"):
        for name, doc in [("start", a.start_doc), ("descriptor", a_desc.descriptor_doc),
                          *[("event", e) for e in a_events[:3]]]:
            raw(name, doc)
        low.set()
        time.sleep(1.1)  # past the writer's once-a-second look at the disk
        for name, doc in [*[("event", e) for e in a_events[3:]], ("stop", a.compose_stop()),
                          ("start", b.start_doc)]:
            raw(name, doc)
        low.clear()
        time.sleep(1.1)
        for name, doc in [("descriptor", b_desc.descriptor_doc),
                          *[("event", e) for e in b_events], ("stop", b.compose_stop())]:
            raw(name, doc)
        assert raw.close(timeout=60)
    assert raw.stats.disk_low == 3 and raw.stats.dropped == 3
    seq_a = client[a.start_doc["uid"]]["primary"].base["internal"].read(["seq_num"])["seq_num"]
    seq_b = client[b.start_doc["uid"]]["primary"].base["internal"].read(["seq_num"])["seq_num"]
    assert sorted(seq_a.tolist()) == [1, 2, 3] and sorted(seq_b.tolist()) == list(range(1, 7))
    assert "stop" in client[a.start_doc["uid"]].metadata
    assert any("is incomplete: 3 of its documents" in r.message for r in caplog.records)
