"""Faults of the distributed layer, each against real servers: a real nats-server (restarted,
replaced by an empty one, with a password), librdkafka's mock Kafka cluster, a real Tiled
server and a real live reconstruction. Where a test only concerns how a worker handles the
bus, its reconstruction (``run_once``) and its Tiled client are stand-ins, so that the bus is
the only thing that varies."""

from __future__ import annotations

import asyncio
import logging
import re
import threading
import time
import uuid

import numpy as np
import pytest
from bluesky import RunEngine
from test_distributed import (
    _assert_one_whole_derived_run,
    bus,  # noqa: F401 - the module's nats-server fixture
)

from bluesky_ptychopinn.devices import sim_beamline
from bluesky_ptychopinn.distributed import (
    BusUnavailableError,
    DocumentPublisher,
    NatsServer,
    PathMap,
    RunWorker,
    Worker,
    WorkerOptions,
    free_port,
    parse_path_map,
    runs_stream,
    runs_subject,
)
from bluesky_ptychopinn.distributed._codec import decode, encode
from bluesky_ptychopinn.distributed._streams import ensure_streams, ensure_workers_consumer
from bluesky_ptychopinn.distributed._subjects import WORKERS_DURABLE, docs_stream, docs_subject
from bluesky_ptychopinn.plans import ptycho_scan

pytestmark = pytest.mark.usefixtures("one_torch_thread")

logging.getLogger("nats").setLevel(logging.CRITICAL)  # nats-py's own reconnect noise


# -- stand-ins for what does not vary in the bus tests ---------------------------------------
class FakeTiled:
    """A Tiled client whose ``refresh`` fails while ``down`` is set."""

    def __init__(self) -> None:
        self.down = threading.Event()

    def refresh(self) -> None:
        if self.down.is_set():
            raise ConnectionError("Tiled is down")


class FakeLive:
    runs: dict = {}

    def close(self, timeout: float = 0) -> None:
        pass


def nats_worker(url: str, beamline: str, name: str, *, ack_wait_s: float = 1.0,
                duration_s: float = 0.0, result: bool = True, log: list | None = None,
                on_run=None, max_attempts: int | None = None) -> Worker:
    """A NATS worker whose reconstruction is a pause of ``duration_s``; ``log`` gets
    ``(name, raw uid, how)`` for every run it takes; ``on_run`` is awaited inside the run.
    A run it is asked to close (given up) is closed whatever ``result`` is."""
    worker = Worker(WorkerOptions(bus=url, tiled="http://unused", beamline=beamline,
                                  ack_wait_s=ack_wait_s, report_every_s=1000, name=name,
                                  retry_delay_s=0.1, max_attempts=max_attempts))
    worker.client, worker.live = FakeTiled(), FakeLive()

    async def run_once(raw_uid: str, next_doc, how: str = "") -> bool:
        if log is not None:
            log.append((name, raw_uid, how))
        if on_run is not None:
            await on_run()
        await asyncio.sleep(duration_s)
        if result or how.startswith("to close it"):
            worker.progress.runs_done += 1
            return True
        return False

    worker.run_once = run_once
    return worker


async def _js(url: str):
    import nats

    nc = await nats.connect(url)
    return nc, nc.jetstream()


async def announce(url: str, beamline: str, uid: str, payload: bytes | None = None) -> None:
    nc, js = await _js(url)
    await ensure_streams(js, beamline)
    await js.publish(runs_subject(beamline), payload or encode("run", {"uid": uid}),
                     headers={"Nats-Msg-Id": f"run:{uid}"})
    await nc.close()


async def make_consumer(url: str, beamline: str, ack_wait_s: float) -> None:
    """The shared consumer, as a first worker with ``ack_wait_s`` would have made it."""
    nc, js = await _js(url)
    await ensure_streams(js, beamline)
    await ensure_workers_consumer(js, beamline, ack_wait_s=ack_wait_s)
    await nc.close()


async def queue_state(url: str, beamline: str) -> tuple[int, int]:
    """(announcements not delivered yet, delivered but not acknowledged)."""
    nc, js = await _js(url)
    info = await js.consumer_info(runs_stream(beamline), WORKERS_DURABLE)
    await nc.close()
    return info.num_pending, info.num_ack_pending


async def until(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"not within {timeout} s: {what}"
        await asyncio.sleep(0.02)


async def finish(*tasks: asyncio.Task, workers=(), timeout: float = 10.0) -> list:
    for w in workers:
        w._stop.set()
    return await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), timeout)


def test_a_run_that_fails_on_its_last_delivery_is_closed_fail_and_deleted(bus):  # noqa: F811
    """Before: terminated on its last delivery, with no advisory and so nobody to close a
    derived run its last failed Tiled write had left without a stop document."""
    beamline = "lastfail"

    async def scenario() -> list:
        log: list = []
        worker = nats_worker(bus.url, beamline, "w", result=False, log=log, max_attempts=2)
        await announce(bus.url, beamline, "F")
        nc, js = await _js(bus.url)
        await js.publish(docs_subject(beamline, "F", "start"),
                         encode("start", {"uid": "F", "time": 0.0}))
        await nc.close()
        task = asyncio.ensure_future(worker.serve())
        await until(lambda: any(how.startswith("to close it") for *_, how in log), 30,
                    "the run closed")
        await finish(task, workers=[worker])
        assert await queue_state(bus.url, beamline) == (0, 0)
        nc, js = await _js(bus.url)
        left = (await js.stream_info(runs_stream(beamline))).state.messages
        await nc.close()
        assert left == 0  # deleted (closed), not only terminated
        return log

    log = asyncio.run(scenario())
    assert [how for *_, how in log][:2] == ["delivery 1", "delivery 2"]
    assert re.search(r"given up after 2 deliveries: it failed on each", log[2][2]), log


# -- #1: the bus away at the end of a run, or when its documents are to be read --------------
def test_a_bus_restart_at_the_ack_does_not_end_the_worker(tmp_path):
    server = NatsServer(tmp_path / "nats", port=free_port()).start()
    restarted = threading.Event()

    async def restart_later() -> None:
        await asyncio.sleep(2.0)  # longer than one acknowledgement's timeout
        # From this thread: a server dies with the thread that started it (die_with_parent).
        server.start()
        restarted.set()

    async def bus_goes_away() -> None:
        server.stop()
        asyncio.ensure_future(restart_later())

    async def main() -> None:
        await announce(server.url, "ack", "run-1")
        log: list = []
        worker = nats_worker(server.url, "ack", "w", log=log, on_run=bus_goes_away)
        assert await asyncio.wait_for(worker.serve(max_runs=1), 30) == 1
        assert restarted.is_set() and log == [("w", "run-1", "delivery 1")]
        assert await queue_state(server.url, "ack") == (0, 0)  # acknowledged after all

    try:
        asyncio.run(main())
    finally:
        server.stop()


def test_a_run_whose_documents_cannot_be_read_is_put_back_not_fatal(bus):  # noqa: F811
    async def main() -> None:
        await make_consumer(bus.url, "gone", ack_wait_s=1.0)
        log: list = []
        worker = nats_worker(bus.url, "gone", "w", log=log)
        task = asyncio.ensure_future(worker.serve(max_runs=1))
        nc, js = await _js(bus.url)
        deadline = time.monotonic() + 10
        while not (await js.consumer_info(runs_stream("gone"), WORKERS_DURABLE)).num_waiting:
            assert time.monotonic() < deadline, "the worker does not fetch"
            await asyncio.sleep(0.02)
        # The documents' stream is gone (as with the bus's store) when the run comes.
        await js.delete_stream(docs_stream("gone"))
        await js.publish(runs_subject("gone"), encode("run", {"uid": "run-1"}))
        await nc.close()
        assert await asyncio.wait_for(task, 20) == 1
        # Delivery 1 could not subscribe to the run's documents: put back, the streams made
        # again, delivery 2 reconstructed.
        assert log == [("w", "run-1", "delivery 2")]
        assert await queue_state(bus.url, "gone") == (0, 0)

    asyncio.run(main())


# -- #2: Tiled away: the worker must not hold an announcement while it waits ------------------
def test_a_worker_waits_for_tiled_before_it_takes_a_run(bus):  # noqa: F811
    async def main() -> None:
        await make_consumer(bus.url, "tw", ack_wait_s=1.0)
        log: list = []
        a = nats_worker(bus.url, "tw", "A", log=log)
        a.client.down.set()  # A's Tiled is away
        b = nats_worker(bus.url, "tw", "B", log=log, duration_s=0.3)
        ta = asyncio.ensure_future(a.serve())
        await asyncio.sleep(0.3)  # A is serving; B is not started yet
        await announce(bus.url, "tw", "run-1")
        await asyncio.sleep(0.3)
        tb = asyncio.ensure_future(b.serve(max_runs=1))
        await until(lambda: log, 10, "B takes the run")
        await asyncio.wait_for(tb, 10)
        a.client.down.clear()
        await asyncio.sleep(0.5)  # A, with Tiled back, finds nothing to do
        await finish(ta, workers=[a])
        # B had it first hand: A had not fetched it, so there was no redelivery.
        assert log == [("B", "run-1", "delivery 1")]

    asyncio.run(main())


# -- #3: heartbeats on the shared consumer's ack deadline ------------------------------------
def test_heartbeats_follow_the_shared_consumers_ack_wait(bus, caplog):  # noqa: F811
    caplog.set_level(logging.WARNING, logger="bluesky_ptychopinn.distributed")

    async def main() -> None:
        await make_consumer(bus.url, "hb", ack_wait_s=1.0)  # made by a first worker
        log: list = []
        slow = nats_worker(bus.url, "hb", "slow", ack_wait_s=6.0, duration_s=2.5, log=log)
        other = nats_worker(bus.url, "hb", "other", log=log)
        ts = asyncio.ensure_future(slow.serve(max_runs=1))
        await asyncio.sleep(0.3)
        await announce(bus.url, "hb", "run-1")
        await until(lambda: log, 10, "the run is taken")
        to = asyncio.ensure_future(other.serve())
        await asyncio.wait_for(ts, 10)
        await finish(to, workers=[other])
        assert log == [("slow", "run-1", "delivery 1")]  # never taken from it mid-run
        assert slow.ack_wait_s == pytest.approx(1.0)

    asyncio.run(main())
    assert any("ack deadline of 1.0 s" in r.getMessage() for r in caplog.records)


# -- #8 (NATS): a message that is not an announcement ----------------------------------------
def test_a_bad_announcement_is_terminated_and_the_worker_goes_on(bus):  # noqa: F811
    async def main() -> None:
        await announce(bus.url, "bad", "x", payload=b'{"name": "run", "doc": {"run": 1}}')
        await announce(bus.url, "bad", "y", payload=b"\x82\xa4not json")
        await announce(bus.url, "bad", "run-1")
        log: list = []
        worker = nats_worker(bus.url, "bad", "w", log=log)
        assert await asyncio.wait_for(worker.serve(max_runs=1), 20) == 1
        assert log == [("w", "run-1", "delivery 1")]
        assert await queue_state(bus.url, "bad") == (0, 0)  # the bad ones: terminated

    asyncio.run(main())


# -- #9: the codec refuses what it could not give back ----------------------------------------
def test_the_codec_refuses_arrays_it_cannot_decode_and_the_publisher_counts_them(bus):  # noqa: F811
    for value in (np.array(["a", None], dtype=object),
                  np.zeros(2, dtype=[("x", "f4"), ("y", "i4")])):
        with pytest.raises(TypeError, match="cannot encode"):
            encode("event", {"data": {"v": value}})
    ok = np.arange(6, dtype=">u2").reshape(2, 3)
    back = decode(encode("event", {"data": {"v": ok}}))[1]["data"]["v"]
    assert back.dtype == ok.dtype and np.array_equal(back, ok)
    publisher = DocumentPublisher(bus.url, beamline="codec")
    try:
        deadline = time.monotonic() + 10
        while not publisher.stats.connected:
            assert time.monotonic() < deadline, "the publisher does not connect"
            time.sleep(0.02)
        with pytest.raises(TypeError):
            publisher("start", {"uid": "r", "time": 0.0, "x": np.array([None], dtype=object)})
        assert publisher.stats.dropped == 1 and publisher.stats.buffered == 0
    finally:
        publisher.close(timeout=2)


# -- #5: a bus that comes back without its streams -------------------------------------------
def test_publisher_and_worker_make_the_streams_again_on_an_empty_bus(tmp_path):
    port = free_port()
    first = NatsServer(tmp_path / "one", port=port).start()
    publisher = DocumentPublisher(first.url, beamline="fresh")
    servers = [first]

    def scan() -> str:
        uid = str(uuid.uuid4())
        publisher("start", {"uid": uid, "time": time.time()})
        publisher("stop", {"uid": str(uuid.uuid4()), "run_start": uid, "time": time.time(),
                           "exit_status": "success"})
        return uid

    async def main() -> None:
        log: list = []
        worker = nats_worker(first.url, "fresh", "w", log=log)
        task = asyncio.ensure_future(worker.serve())
        one = scan()
        assert await asyncio.to_thread(publisher.flush, 10)
        await until(lambda: len(log) == 1, 10, "the first run is taken")
        first.stop()
        # Another server on the same address, with an empty store (started from this
        # thread: a server dies with the thread that started it).
        servers.append(NatsServer(tmp_path / "two", port=port).start())
        two = scan()
        assert await asyncio.to_thread(publisher.flush, 10), publisher.stats
        await until(lambda: len(log) == 2, 15, "the second run is taken")
        await finish(task, workers=[worker])
        assert [uid for _, uid, _ in log] == [one, two]

    try:
        asyncio.run(main())
    finally:
        publisher.close(timeout=2)
        for server in servers:
            server.stop()


# -- #11: every server of a cluster list is probed --------------------------------------------
def test_probe_bus_tries_every_server_of_the_list(bus):  # noqa: F811
    dead = f"nats://127.0.0.1:{free_port()}"
    Worker(WorkerOptions(bus=f"{dead},{bus.url}", tiled="http://unused")).probe_bus()
    other = f"nats://127.0.0.1:{free_port()}"
    with pytest.raises(BusUnavailableError, match="cannot reach the bus") as info:
        Worker(WorkerOptions(bus=f"{dead},{other}", tiled="http://unused")).probe_bus()
    assert dead in str(info.value) and other in str(info.value)


# -- #12: wrong credentials are an error, not an outage ---------------------------------------
def test_a_wrong_password_is_logged_as_an_error(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="bluesky_ptychopinn.distributed")
    with NatsServer(tmp_path / "nats", extra_args=["--user", "u", "--pass", "p"]) as server:
        publisher = DocumentPublisher(server.url, beamline="auth")
        try:
            deadline = time.monotonic() + 10
            while not any(r.levelno >= logging.ERROR for r in caplog.records):
                assert time.monotonic() < deadline, caplog.text
                time.sleep(0.05)
        finally:
            publisher.close(timeout=0.5)
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert any("Authorization Violation" in m for m in errors), errors
    # Once, not at every reconnect attempt.
    assert sum("Authorization Violation" in m for m in errors) == 1


# -- #10: path maps ---------------------------------------------------------------------------
def test_path_map_maps_legacy_resources_and_encoded_uris():
    pm = PathMap(parse_path_map(["/nsls2/data=/mnt/bl"]))
    # ophyd's default: root "/", the absolute path in resource_path.
    [(_, res)] = pm("resource", {"root": "/", "resource_path": "nsls2/data/hxn/s.h5"})
    assert (res["root"], res["resource_path"]) == ("/mnt/bl", "hxn/s.h5")
    deeper = PathMap(parse_path_map(["/nsls2/data/hxn=/mnt/hxn"]))
    [(_, res)] = deeper("resource", {"root": "/nsls2/data", "resource_path": "hxn/s.h5"})
    assert (res["root"], res["resource_path"]) == ("/mnt/hxn", "s.h5")
    [(_, res)] = pm("resource", {"root": "/other", "resource_path": "nsls2/data/s.h5"})
    assert (res["root"], res["resource_path"]) == ("/other", "nsls2/data/s.h5")
    assert PathMap(parse_path_map(["/=/mnt/acq"])).path("/data/scan.h5") == "/mnt/acq/data/scan.h5"
    assert pm.path("/nsls2/data") == "/mnt/bl"
    spaced = PathMap(parse_path_map(["/nsls2/data/x y=/mnt/z"]))
    [(_, sr)] = spaced("stream_resource", {"uri": "file://localhost/nsls2/data/x%20y/f.h5"})
    assert sr["uri"] == "file://localhost/mnt/z/f.h5"
    [(_, sr)] = pm("stream_resource", {"uri": "file://localhost/elsewhere/f.h5"})
    assert sr["uri"] == "file://localhost/elsewhere/f.h5"


# -- Kafka: #8 (an unreadable start document) and #4 (a run that always fails) ----------------
@pytest.fixture(scope="module")
def kafka():
    pytest.importorskip("confluent_kafka", reason="the Kafka transport needs confluent-kafka")
    from test_kafka import MockKafka

    from bluesky_ptychopinn.distributed import kafka_topic

    cluster = MockKafka(*(kafka_topic(b) for b in ("kbad", "kfail", "kstop", "krevoke")))
    try:
        yield cluster
    finally:
        cluster.stop()


def _produce(kafka, beamline: str, messages: list[tuple[str, str, bytes]]) -> None:
    """``(run uid, document name, value)`` into partition 0 of the beamline's topic, in order."""
    from confluent_kafka import Producer

    from bluesky_ptychopinn.distributed import kafka_topic

    producer = Producer({"bootstrap.servers": kafka.bootstrap})
    for uid, name, value in messages:
        producer.produce(kafka_topic(beamline), value, key=uid.encode(), partition=0,
                         headers=[("name", name.encode())])
    producer.flush(10)


def _run(uid: str) -> list[tuple[str, str, bytes]]:
    return [(uid, "start", encode("start", {"uid": uid, "time": 0.0})),
            (uid, "stop", encode("stop", {"uid": uid + "-stop", "run_start": uid,
                                          "time": 0.0}))]


def _kafka_worker(kafka, beamline: str, failing: set[str], taken: list[str], **options):
    from bluesky_ptychopinn.distributed import KafkaWorker

    worker = KafkaWorker(WorkerOptions(bus=kafka.url, tiled="http://unused", beamline=beamline,
                                       ack_wait_s=3.0, report_every_s=1000, name="w",
                                       retry_delay_s=0.05, **options))
    worker.client, worker.live = FakeTiled(), FakeLive()

    async def run_once(raw_uid: str, next_doc, how: str = "") -> bool:
        taken.append(raw_uid if not how.startswith("to close it") else f"close {raw_uid}")
        while (item := await next_doc(0.2)) is not None and item[0] != "stop":
            pass
        if raw_uid in failing and not how.startswith("to close it"):
            return False
        worker.progress.runs_done += 1
        return True

    worker.run_once = run_once
    return worker


def test_kafka_skips_a_start_document_it_cannot_read(kafka):
    # Before: the start this codec cannot read killed every worker, the offset never moved.
    _produce(kafka, "kbad", [("R", "start", b"\x82\xa4name\xa5start"), *_run("G")])
    taken: list[str] = []
    worker = _kafka_worker(kafka, "kbad", set(), taken)
    assert asyncio.run(asyncio.wait_for(worker.serve(max_runs=1), 45)) == 1
    assert taken == ["G"] and "R" in worker._done


def test_kafka_gives_up_a_run_that_always_fails_and_goes_on(kafka):
    from bluesky_ptychopinn.distributed._kafka import MAX_ATTEMPTS

    # Before: X was redone forever and Y, after it in its partition, never taken.
    _produce(kafka, "kfail", [*_run("X"), *_run("Y")])
    taken: list[str] = []
    worker = _kafka_worker(kafka, "kfail", {"X"}, taken)
    # (closing X counts as a run done: its derived run is written, "fail")
    assert asyncio.run(asyncio.wait_for(worker.serve(max_runs=2), 45)) == 2
    # Its last failure is closed through the give-up (its derived run ends "fail").
    assert taken == ["X"] * MAX_ATTEMPTS + ["close X", "Y"]
    assert {"X", "Y"} <= set(worker._done)  # X committed past: not redone after a restart


def test_kafka_a_worker_stopped_while_tiled_is_away_leaves_the_run_to_the_next(kafka):
    # Before: the start it had read while waiting for Tiled was committed past at the stop;
    # no worker ever took the run.
    _produce(kafka, "kstop", _run("S"))
    first = _kafka_worker(kafka, "kstop", set(), taken := [])
    first.client.down.set()

    async def stop_once_read() -> None:
        task = asyncio.ensure_future(first.serve())
        await until(lambda: first._next.get(0) == 1, 30, "the start read")
        await asyncio.sleep(0.5)  # waiting for Tiled
        first.stop()
        await asyncio.wait_for(task, 30)

    asyncio.run(stop_once_read())
    assert taken == []
    second = _kafka_worker(kafka, "kstop", set(), taken)
    assert asyncio.run(asyncio.wait_for(second.serve(max_runs=1), 45)) == 1
    assert taken == ["S"]


async def _first_start(worker, key: bytes):
    """A fresh consumer for ``worker`` and the first message it polls: the run ``key``'s start."""
    worker._consumer = worker._make_consumer()
    msg = None
    deadline = time.monotonic() + 30
    while msg is None and time.monotonic() < deadline:
        msg = await worker._poll(0.5)
    assert msg is not None and msg.key() == key
    return msg


def test_kafka_a_run_handed_over_mid_run_keeps_its_attempts(kafka):
    """A partition revoked mid-run (a worker joins or leaves the group) is no failed attempt:
    the next owner must not count it, or with ``max_attempts`` 1 give the run up unfailed."""
    from confluent_kafka import TopicPartition

    from bluesky_ptychopinn.distributed import kafka_topic

    _produce(kafka, "krevoke", _run("H")[:1])  # its start; the scan goes on
    worker = _kafka_worker(kafka, "krevoke", set(), [], max_attempts=1)

    async def revoke_mid_run() -> tuple[int, int]:
        msg = await _first_start(worker, b"H")
        await worker._record_attempt(msg, "H", 1)
        during = await worker._attempts_before(msg, "H")
        worker._current = ("H", msg.partition())
        worker._on_revoke(worker._consumer, [TopicPartition(kafka_topic("krevoke"),
                                                            msg.partition())])
        after = await worker._attempts_before(msg, "H")
        await asyncio.to_thread(worker._consumer.close)
        return during, after

    during, after = asyncio.run(revoke_mid_run())
    assert (during, after) == (1, 0)


class _CommittedTimesOut:
    """The worker's real consumer, whose first ``failures`` ``committed()`` reads time out as a
    slow broker's do (the consumer type itself cannot be patched)."""

    def __init__(self, consumer, failures: int) -> None:
        self._consumer, self.failures = consumer, failures

    def committed(self, partitions, timeout=None):
        from confluent_kafka import KafkaError, KafkaException

        if self.failures > 0:
            self.failures -= 1
            raise KafkaException(KafkaError(KafkaError._TIMED_OUT))
        return self._consumer.committed(partitions, timeout)

    def __getattr__(self, name):
        return getattr(self._consumer, name)


def test_kafka_a_slow_broker_does_not_make_a_run_look_fresh(kafka):
    # Before: one committed() timeout read as "0 attempts so far", so a run that kills every
    # worker taking it could start again at attempt 1 on each new owner.
    _produce(kafka, "kslow", _run("K")[:1])
    worker = _kafka_worker(kafka, "kslow", set(), [])

    async def read_through_timeouts() -> tuple[int, int | None, int]:
        msg = await _first_start(worker, b"K")
        await worker._record_attempt(msg, "K", 3)
        real = worker._consumer
        worker._consumer = _CommittedTimesOut(real, failures=2)
        after_two = await worker._attempts_before(msg, "K")
        worker._consumer = _CommittedTimesOut(real, failures=5)
        after_all = await worker._attempts_before(msg, "K")  # unknown, and said so
        worker._consumer = real
        still = await worker._attempts_before(msg, "K")
        await asyncio.to_thread(real.close)
        return after_two, after_all, still

    # Unknown is not 0: the caller then leaves the count on the brokers as it is.
    assert asyncio.run(read_through_timeouts()) == (3, None, 3)


# -- #6 and #7: a real worker reconstructing real runs, derived runs to a real Tiled ---------
@pytest.fixture(scope="module")
def recon_worker(tiled):
    """A transport-neutral worker with a small queue (8 documents), its live reconstruction
    writing derived runs to the module's Tiled server."""
    worker = RunWorker(WorkerOptions(bus="nats://unused", tiled=tiled.uri,
                                     api_key=tiled.api_key, device="cpu", refine=False,
                                     batch_size=4, torch_threads=1, max_queue=8,
                                     report_every_s=1000, name="recon"))
    worker.client = tiled.client()
    worker._build_live()
    try:
        yield worker
    finally:
        worker.live.close()


def _scan_docs(n_side: int, seed: int) -> tuple[str, list[tuple[str, dict]]]:
    """The documents of a simulated scan, frames inline (a backlog as a worker reads it)."""
    docs: list[tuple[str, dict]] = []
    RE = RunEngine(call_returns_result=True)
    RE.subscribe(lambda name, doc: docs.append((name, doc)))
    bl = sim_beamline("cells", seed=seed)
    dx = bl.pixel_size_m
    result = RE(ptycho_scan(bl.detector, bl.stage, geometry=bl.ptycho_metadata(),
                            pattern="raster", extent_m=(5 * dx * (n_side - 1),) * 2,
                            step_m=5 * dx))
    return result.run_start_uids[0], docs


def _replay(docs: list[tuple[str, dict]]):
    it = iter(docs)

    async def next_doc(timeout: float):
        return next(it, None)

    return next_doc


def test_a_worker_forgets_each_run_once_it_is_done(recon_worker, tiled):
    worker = recon_worker
    for seed in (1, 2):
        uid, docs = _scan_docs(3, seed)
        assert asyncio.run(worker.run_once(uid, _replay(docs)))
        # Nothing of the run stays in the worker (its snapshots least of all) ...
        assert worker.live.runs == {} and worker.guard.outcomes == {}
        # ... and its derived run is in Tiled, complete.
        _assert_one_whole_derived_run(tiled.client(), uid, 9)


def test_a_backlog_waits_for_the_reconstruction_without_stalling_the_loop(recon_worker,
                                                                          tiled):
    worker = recon_worker
    uid, docs = _scan_docs(7, 3)  # 49 frames, queue of 8
    inbox = worker.live._transport._inbox

    async def main() -> tuple[int, float]:
        peak, gap, last = 0, 0.0, time.monotonic()
        run = asyncio.ensure_future(worker.run_once(uid, _replay(docs)))
        while not run.done():  # the event loop (heartbeats) keeps its pace meanwhile
            await asyncio.sleep(0.005)
            now = time.monotonic()
            gap, last = max(gap, now - last), now
            peak = max(peak, inbox.qsize())
        assert await run
        return peak, gap

    peak, gap = asyncio.run(main())
    assert peak <= 8  # WorkerOptions.max_queue: the backlog stays on the bus
    assert gap < 1.0, gap
    # Every frame reconstructed: none skipped for a full queue.
    _assert_one_whole_derived_run(tiled.client(), uid, 49)
