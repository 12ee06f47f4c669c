"""Faults of the spool itself (review of ``catalog/_spool.py``): journals left by a crash, a
redelivered start, a RunEngine rewind, a journal that cannot be written or read back, and
documents that belong to no open run or that the writer refuses.

Every test runs real RunEngine documents through ``SpooledWriter`` (or ``flush_spool``) into a
real Tiled server over HTTP on 127.0.0.1 (one child process for the module), then reads the run
back from Tiled.
"""

from __future__ import annotations

import copy
import resource
import signal
import time

import bluesky.plan_stubs as bps
import bluesky.plans as bp
import pytest
from _tiled_process import module_server
from bluesky import RunEngine
from bluesky.utils import RunEngineInterrupted
from bluesky_tiled_plugins import TiledWriter
from ophyd.sim import det

from bluesky_ptychopinn.catalog import SpooledWriter, flush_spool
from bluesky_ptychopinn.catalog._journal import JournalWriter, encode_document, read_headers

#: Journal whatever the disk's free space (a CI machine's disk may be nearly full).
ANY_DISK = {"min_free_bytes": 0}


server = module_server("spool-faults")


@pytest.fixture(scope="module")
def client(server):
    return server.client()


def _run_docs(plan) -> list[tuple[str, dict]]:
    """The documents a real RunEngine emits for ``plan``."""
    docs: list[tuple[str, dict]] = []
    RE = RunEngine()
    RE.subscribe(lambda name, doc: docs.append((name, doc)))
    RE(plan)
    return docs


def _count(n: int = 6) -> list[tuple[str, dict]]:
    return _run_docs(bp.count([det], num=n))


def _uid(docs) -> str:
    return next(d for n, d in docs if n == "start")["uid"]


def _seq(client, uid: str, stream: str = "primary") -> list[int] | None:
    """The seq_nums of a stream in Tiled, sorted (None: no table)."""
    try:
        table = client[uid][stream].base["internal"].read(["seq_num"])
    except KeyError:
        return None
    return sorted(int(s) for s in table["seq_num"].tolist())


def _stop(client, uid: str) -> dict | None:
    return client[uid].metadata.get("stop") if uid in client else None


def _orphan(directory, docs) -> None:
    """A journal as an ended writer process leaves it under ``directory``."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    journal = JournalWriter(directory / f"{_uid(docs)}.journal")
    for name, doc in docs:
        journal.append(encode_document(name, doc))
    journal.close()


def _writer(client, tmp_path, label: str = "raw", **kwargs) -> SpooledWriter:
    kwargs = {"probe_interval_s": 0.2, **ANY_DISK, **kwargs}
    return SpooledWriter(TiledWriter(client, batch_size=kwargs.pop("batch_size", 10)),
                         spool_dir=tmp_path, label=label, **kwargs)


# -- 1: journals left by a crash --------------------------------------------------------
@pytest.mark.parametrize("by", ["writer", "flush"])
def test_a_crashed_runs_journal_without_stop_is_delivered_with_a_synthesized_stop(
        client, tmp_path, by):
    """A process that ends mid-scan leaves a journal with no stop document: its last rows
    were still in the TiledWriter's batch. The next writer of the label (or ``spool flush``)
    finishes the run with an "abort" stop, so every journaled event reaches Tiled."""
    docs = _count(6)
    uid = _uid(docs)
    crashed = _writer(client, tmp_path)
    for name, doc in docs[:-1]:  # the process ends before the stop document
        crashed(name, doc)
    assert crashed.flush(30)  # all handed to its writer: rows buffered (batch_size=10)
    crashed.close(timeout=0)  # the process ends: its journal stays
    assert len(list(tmp_path.glob("raw/*.journal"))) == 1
    assert _seq(client, uid) is None and _stop(client, uid) is None

    if by == "writer":
        later = _writer(client, tmp_path)
        assert later.flush(30), later.status()
        assert later.stats.runs_done == 1
        later.close()
    else:
        result = flush_spool(TiledWriter(client, batch_size=10), tmp_path, label="raw")
        assert result["failed"] == {} and result["runs_done"] == 1, result
    assert _seq(client, uid) == [1, 2, 3, 4, 5, 6]
    stop = _stop(client, uid)
    assert stop["exit_status"] == "abort" and "spool" in stop["reason"]
    assert not list(tmp_path.glob("*/*.journal"))


@pytest.mark.parametrize("by", ["writer", "flush"])
def test_a_complete_run_in_tiled_outlives_a_journal_that_lost_its_tail(client, tmp_path, by):
    """A machine crash cuts the journal's unsynced tail (stop included) while Tiled, on
    another host, already has the whole run: only the journal goes, Tiled is left alone."""
    docs = _count(6)
    uid = _uid(docs)
    plain = TiledWriter(client, batch_size=10)
    for name, doc in docs:
        plain(name, doc)
    _orphan(tmp_path / "raw", docs[:-3])  # lost events 5 and 6 and the stop
    if by == "writer":
        later = _writer(client, tmp_path)
        assert later.flush(30), later.status()
        assert later.stats.replays == 0 and later.stats.runs_done == 1
        later.close()
    else:
        result = flush_spool(TiledWriter(client, batch_size=10), tmp_path)
        assert result["failed"] == {} and result["replays"] == 0, result
    assert _seq(client, uid) == [1, 2, 3, 4, 5, 6]
    assert _stop(client, uid)["uid"] == docs[-1][1]["uid"]  # the real stop, not a new one
    assert not list(tmp_path.glob("*/*.journal"))


# -- 2: a redelivered start -------------------------------------------------------------
def test_a_redelivered_start_keeps_the_events_before_it(client, tmp_path):
    """An at-least-once transport sends the start, the descriptor and an event again: the
    duplicates are dropped (counted), the run is delivered whole, also after delivery."""
    docs = _count(5)
    uid = _uid(docs)
    start, descriptor, events, stop = docs[0], docs[1], docs[2:-1], docs[-1]
    writer = _writer(client, tmp_path, batch_size=1)
    for name, doc in [start, descriptor, *events[:3]]:
        writer(name, doc)
    assert writer.flush(30)  # delivered meanwhile
    again = [copy.deepcopy(d) for d in (start, descriptor, events[2])]  # as decoded anew
    for name, doc in [*again, *events[3:], stop]:
        writer(name, doc)
    assert writer.flush(30), writer.status()
    assert _seq(client, uid) == [1, 2, 3, 4, 5]
    assert writer.stats.duplicates == 3 and writer.stats.runs_done == 1
    writer(*start)  # once more, the run delivered and its journal gone: Tiled keeps it
    assert writer.flush(30)
    assert writer.stats.duplicates == 4 and writer.stats.replays == 0
    assert _seq(client, uid) == [1, 2, 3, 4, 5] and _stop(client, uid)["uid"] == stop[1]["uid"]
    writer.close()


# -- 5: a RunEngine rewind ----------------------------------------------------------------
def test_a_rewind_that_repeats_seq_nums_verifies(client, tmp_path):
    """A pause and resume rewinds to the last checkpoint and takes events again with the same
    seq_nums: the run is complete as it is, not replayed."""
    RE = RunEngine()
    writer = _writer(client, tmp_path)
    docs: list[tuple[str, dict]] = []
    RE.subscribe(writer)
    RE.subscribe(lambda name, doc: docs.append((name, doc)))

    def plan():
        yield from bps.open_run()
        yield from bps.checkpoint()
        yield from bps.trigger_and_read([det])
        yield from bps.trigger_and_read([det])
        yield from bps.pause()
        yield from bps.trigger_and_read([det])
        yield from bps.close_run()

    with pytest.raises(RunEngineInterrupted):
        RE(plan())
    RE.resume()
    assert [d["seq_num"] for n, d in docs if n == "event"] == [1, 2, 1, 2, 3]  # rewound
    assert writer.flush(30), writer.status()
    assert writer.stats.replays == 0 and writer.stats.runs_done == 1
    assert _seq(client, _uid(docs)) == [1, 1, 2, 2, 3]
    writer.close()


# -- 6: the journal itself ----------------------------------------------------------------
def test_a_torn_journal_append_is_cut_off_and_the_run_delivered(client, tmp_path):
    """A write that fails part-way (here EFBIG from RLIMIT_FSIZE) loses that one document,
    not the offsets of every later one nor, after a restart, the rest of the run."""
    docs = _count(5)
    uid = _uid(docs)
    writer = _writer(client, tmp_path, memory_docs=0)  # read everything back from the journal
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of a signal
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    with writer._cond:  # the delivery thread waits: the journal is read back afterwards
        for name, doc in docs[:3]:
            writer(name, doc)
        path = writer.directory / f"{uid}.journal"
        resource.setrlimit(resource.RLIMIT_FSIZE, (path.stat().st_size + 40, hard))
        try:
            writer(*docs[3])  # the second event: 40 bytes of it fit
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
            signal.signal(signal.SIGXFSZ, handler)
        assert writer.stats.dropped == 1
        for name, doc in docs[4:]:
            writer(name, doc)
        # what a restart reads: every record but the torn one, stop included
        assert [n for _, n, _ in read_headers(path)] == \
            ["start", "descriptor", "event", "event", "event", "event", "stop"]
    assert writer.flush(20), writer.status()
    assert writer.stats.outages == 0
    assert _seq(client, uid) == [1, 3, 4, 5]
    writer.close()


def test_a_journal_that_cannot_be_read_fails_its_run_and_is_no_outage(client, tmp_path):
    """A missing journal is a local fault: the run fails after its tries (status says so),
    Tiled is not taken for unreachable, and nothing is deleted and replayed forever."""
    docs = _count(3)
    writer = _writer(client, tmp_path, memory_docs=0)
    with writer._cond:  # journaled, then removed before the delivery thread reads it
        for name, doc in docs:
            writer(name, doc)
        (writer.directory / f"{_uid(docs)}.journal").unlink()
    t0 = time.monotonic()
    assert not writer.flush(10)
    status = writer.status()
    assert time.monotonic() - t0 < 8, status  # failed, not waited out
    assert status["outages"] == 0 and status["tiled_reachable"], status
    assert [r["failed"] for r in status["runs"]] == [True]
    writer.close(timeout=0)


# -- 7: documents of no open run, and documents the writer refuses ------------------------
def test_documents_of_no_open_run_are_dropped_not_put_into_another_run(client, tmp_path):
    """A late event of a stopped run, and an event whose descriptor never came, arrive while
    another run is open: both are dropped and counted; both runs reach Tiled whole."""
    a, b, c = _count(4), _count(3), _count(3)
    late, unknown = a[-2], c[3]  # A's last event; an event of a run never sent here
    writer = _writer(client, tmp_path, batch_size=1)
    for name, doc in [*a[:-2], a[-1], *b[:3], late, unknown, *b[3:]]:
        writer(name, doc)
    assert writer.flush(30), writer.status()
    assert _seq(client, _uid(a)) == [1, 2, 3] and _stop(client, _uid(a)) is not None
    assert _seq(client, _uid(b)) == [1, 2, 3] and _stop(client, _uid(b)) is not None
    assert writer.stats.dropped == 2 and writer.stats.runs_done == 2
    writer.close()


def test_a_journaled_document_the_writer_refuses_costs_only_that_document(client, tmp_path):
    """A journal that holds an event its writer refuses (an event of another run, as an
    earlier version of the spool journaled them): that event is left out and counted, the
    rest of the run is delivered and verified, as a plain TiledWriter would do."""
    b, other = _count(4), _count(2)
    journal = [*b[:4], other[2], *b[4:]]  # start, descriptor, 2 events, foreign, 2, stop
    _orphan(tmp_path / "raw", journal)
    writer = _writer(client, tmp_path)
    assert writer.flush(30), writer.status()
    assert _seq(client, _uid(b)) == [1, 2, 3, 4]
    assert _stop(client, _uid(b))["uid"] == b[-1][1]["uid"]
    assert writer.stats.rejected == 1 and writer.stats.runs_done == 1
    writer.close()


# -- 8: a server error that is no outage --------------------------------------------------
class _ServerRefuses(TiledWriter):
    """A TiledWriter whose server answers ``status`` to the 5th event of a run, every time: what a
    document Tiled cannot store looks like from the client (the rest goes to the real server)."""

    status = 500

    def __call__(self, name, doc):
        if name == "event" and doc["seq_num"] == 5:  # only the 5-event run has one
            import httpx

            request = httpx.Request("PUT", str(self.client.context.api_uri))
            response = httpx.Response(self.status, request=request)
            raise httpx.HTTPStatusError(f"{self.status} from the server", request=request,
                                        response=response)
        return super().__call__(name, doc)


def test_a_server_error_from_a_healthy_server_fails_the_run_instead_of_looping(
        client, tmp_path):
    """A 500 while ``/healthz`` answers is this run's fault, not an outage: the run fails
    after its tries (journal kept), ``flush`` returns instead of waiting for ever, and the
    next run is delivered. Before, it was retried as an outage with no end."""
    writer = SpooledWriter(_ServerRefuses(client, batch_size=1), spool_dir=tmp_path,
                           label="raw", probe_interval_s=0.2, **ANY_DISK)
    bad, good = _count(5), _count(3)
    for name, doc in bad:
        writer(name, doc)
    assert writer.flush(60) is False  # done trying, and says it failed
    runs = {r["uid"]: r for r in writer.status()["runs"]}
    assert runs[_uid(bad)]["failed"] and writer.stats.outages == 0
    assert list((tmp_path / "raw").glob(f"{_uid(bad)}*"))  # its journal stays
    for name, doc in good:
        writer(name, doc)
    deadline = time.monotonic() + 30
    while _stop(client, _uid(good)) is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _seq(client, _uid(good)) == [1, 2, 3]
    writer.close()


def test_a_503_is_still_an_outage(client, tmp_path):
    """An overloaded or restarting server (503) is waited out, not counted against the run."""
    class _Busy(_ServerRefuses):
        status = 503

    writer = SpooledWriter(_Busy(client, batch_size=1), spool_dir=tmp_path, label="raw",
                           probe_interval_s=0.2, **ANY_DISK)
    bad = _count(5)
    for name, doc in bad:
        writer(name, doc)
    assert writer.flush(2) is False  # still waiting, not failed
    assert writer.stats.outages >= 1
    assert not any(r["failed"] for r in writer.status()["runs"])
    assert writer.close(timeout=0) is False  # its journal stays for a later flush
