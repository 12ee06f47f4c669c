"""The Kafka transport end to end: a real Tiled server, a real RunEngine publishing with
``publish_documents(RE, "kafka://...")`` and ``bluesky-ptychopinn worker --bus kafka://...``
subprocesses in one consumer group.

The broker is librdkafka's mock cluster (``test.mock.num.brokers``), shipped inside the
confluent-kafka wheel and used by librdkafka's own test suite: it serves the Kafka protocol
over TCP on 127.0.0.1 from a separate process (topics with 4 partitions, consumer groups with
session timeouts and cooperative rebalances, committed offsets, idempotent produce). It is not
Apache Kafka: what this shows and what it does not is in docs/deployment.md. (nafka, the
pure-Python test broker, cannot serve these tests: it has one partition per topic, never
evicts a dead group member, has no idempotent producer, and needs Python >= 3.13.)
"""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

pytest.importorskip("confluent_kafka", reason="the Kafka transport needs confluent-kafka "
                    "(pip install 'bluesky-ptychopinn[kafka]')")

from bluesky import RunEngine  # noqa: E402
from test_distributed import (  # noqa: E402
    ACK_WAIT_S,
    WorkerProcess,
    _assert_one_whole_derived_run,
    _derived,
    _engine,
    _scan,
    _scan_killing_the_taker,
    _wait_finished,
)
from typer.testing import CliRunner  # noqa: E402

from bluesky_ptychopinn.cli import app  # noqa: E402
from bluesky_ptychopinn.devices import sim_beamline  # noqa: E402
from bluesky_ptychopinn.distributed import free_port, kafka_topic, publish_documents  # noqa: E402
from bluesky_ptychopinn.distributed._codec import decode  # noqa: E402
from bluesky_ptychopinn.distributed._kafka import parse_kafka_url  # noqa: E402
from bluesky_ptychopinn.distributed._server import die_with_parent  # noqa: E402

BEAMLINE = "ktst"

# The mock cluster lives as long as the Producer that made it; topics named on the command line
# are created (4 partitions) by asking for their metadata, as an operator would create them.
_MOCK = """
import sys
from confluent_kafka import Producer
p = Producer({"test.mock.num.brokers": 1, "log_level": 3})
for topic in sys.argv[1:]:
    p.list_topics(topic, timeout=10)
md = p.list_topics(timeout=10)
print(",".join(f"{b.host}:{b.port}" for b in md.brokers.values()), flush=True)
sys.stdin.read()
"""


class MockKafka:
    """librdkafka's mock cluster in a child process; ``url`` is ``kafka://HOST:PORT``."""

    def __init__(self, *topics: str) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", _MOCK, *topics],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, text=True,
                                     preexec_fn=die_with_parent)
        line = self.proc.stdout.readline().strip()
        if not line:
            raise RuntimeError(f"the mock Kafka cluster did not start ({self.proc.poll()})")
        self.bootstrap = line
        self.url = f"kafka://{line}"

    def stop(self) -> None:
        self.proc.stdin.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class Forwarder:
    """A TCP port that forwards to ``target`` once :meth:`start` is called (before: nothing
    listens there, as when the brokers are down)."""

    def __init__(self, port: int, target: str) -> None:
        self.port = port
        host, _, tport = target.partition(":")
        self.target = (host, int(tport))
        self._server: socket.socket | None = None

    def start(self) -> None:
        self._server = socket.create_server(("127.0.0.1", self.port))
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def stop(self) -> None:
        if self._server is not None:
            self._server.close()


@pytest.fixture(scope="module")
def kafka():
    cluster = MockKafka(kafka_topic(BEAMLINE))
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def pool(tmp_path_factory, kafka, tiled):
    """Two workers in the beamline's consumer group, started together."""
    logs = tmp_path_factory.mktemp("kworkers")
    workers = [WorkerProcess(logs / f"w{k}.log", kafka.url, tiled, BEAMLINE) for k in range(2)]
    try:
        for w in workers:
            w.wait_for("ready on", timeout=120)
        # Both hold partitions: the second one's join has been rebalanced.
        for w in workers:
            w.wait_for(r"assigned partitions \[\d", timeout=60)
        yield workers
    finally:
        for w in workers:
            w.stop()


def _partitions(worker: WorkerProcess) -> set[int]:
    """The partitions a worker holds now, from its assigned / revoked log lines."""
    held: set[int] = set()
    for line in worker.text().splitlines():
        m = re.search(r"assigned partitions \[([\d, ]*)\]", line)
        if m:
            held |= {int(p) for p in m.group(1).split(",") if p.strip()}
        m = re.search(r"partitions \[([\d, ]*)\] (revoked|lost)", line)
        if m:
            held -= {int(p) for p in m.group(1).split(",") if p.strip()}
    return held


def test_two_workers_share_the_runs_each_reconstructed_once_whole(pool, kafka, tiled):
    held = [_partitions(w) for w in pool]
    assert all(held) and not held[0] & held[1], held
    RE, handle = _engine(tiled, kafka.url, BEAMLINE)
    bl = sim_beamline("cells", write_path=tiled.detector_dir, seed=21)
    uids: list[str] = []
    # A run's partition follows from its (random) uid: scan until both workers had one
    # (with a 3:1 split of the 4 partitions, 8 scans all miss one worker 13 % of the time;
    # 24 scans 0.1 %, and only as many as needed run).
    while len(uids) < 2 or (len(uids) < 24 and not all(
            set(w.runs("took")) & set(uids) for w in pool)):
        uids.append(_scan(RE, bl, n_side=4))
        deadline = time.monotonic() + 30
        while uids[-1] not in {u for w in pool for u in w.runs("took")}:
            assert time.monotonic() < deadline, f"nobody took run {uids[-1]}"
            time.sleep(0.05)
    _wait_finished(pool, uids)
    assert handle.flush(30) and handle.stats.dropped == 0, handle.stats
    handle.close()
    took = [u for w in pool for u in w.runs("took")]
    assert sorted(took) == sorted(uids)  # each run taken once: no rebalance, no redo
    assert all(set(w.runs("finished")) & set(uids) for w in pool), (held, took)
    for w in pool:  # each worker took only runs of its own partitions
        for p in re.findall(r"took run \S+ \(partition (\d+)", w.text()):
            assert int(p) in _partitions(w)
    for uid in uids:
        _assert_one_whole_derived_run(tiled.client(), uid, 16)


def _sigkill(worker: WorkerProcess) -> None:
    worker.proc.send_signal(signal.SIGKILL)
    worker.proc.wait()


def _when_mid_run(pool, client, act):
    """A started thread that waits for a worker of ``pool`` to take a new run whose partial
    derived run is in Tiled, then calls ``act(worker)``. Returns the thread, a dict it fills
    (``index``, ``uid``, ``t``: which worker, which run, when) and the runs each worker had
    taken before."""
    before = [set(w.runs("took")) for w in pool]
    hit: dict = {}

    def watch():
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            for k, w in enumerate(pool):
                new = set(w.runs("took")) - before[k]
                if new and _derived(client, uid := new.pop()):
                    act(w)
                    hit.update(index=k, uid=uid, t=time.monotonic())
                    return
            time.sleep(0.05)

    thread = threading.Thread(target=watch)
    thread.start()
    return thread, hit, before


def test_a_stalled_worker_finds_itself_out_and_writes_nothing_more(pool, kafka, tiled):
    RE, handle = _engine(tiled, kafka.url, BEAMLINE)
    bl = sim_beamline("test_chip", write_path=tiled.detector_dir, seed=25, exposure_s=0.15)
    # SIGSTOP: alive, but silent past its session timeout.
    stopper, stopped, _ = _when_mid_run(pool, tiled.client(),
                                        lambda w: w.proc.send_signal(signal.SIGSTOP))
    uid = _scan(RE, bl)
    stopper.join()
    assert stopped.get("uid") == uid, "the worker was not stopped during the scan"
    stalled, other = pool[stopped["index"]], pool[1 - stopped["index"]]
    _wait_finished([other], [uid], timeout=60 + ACK_WAIT_S)
    stalled.proc.send_signal(signal.SIGCONT)
    # It learns it is out of the group, writes nothing more of the run (not even a "fail"
    # stop over the other worker's complete one), and joins again.
    stalled.wait_for(r"partitions \[[\d, ]+\] lost(.|\n)*assigned partitions \[\d", timeout=60)
    assert handle.flush(30)
    handle.close()
    assert re.search(rf"run {uid} left unfinished", stalled.text())
    assert uid not in stalled.runs("finished")
    _assert_one_whole_derived_run(tiled.client(), uid, 36)
    run = tiled.client()[_derived(tiled.client(), uid)[0]]
    assert list(run["snapshots"]["frames"].read()).count(36) == 1  # nothing appended after


def test_a_killed_workers_run_is_redone_by_the_other_one_derived_run(pool, kafka, tiled):
    RE, handle = _engine(tiled, kafka.url, BEAMLINE)
    # 0.15 s exposures: the scan lasts ~6 s, the worker that takes it is killed mid-run.
    bl = sim_beamline("test_chip", write_path=tiled.detector_dir, seed=22, exposure_s=0.15)
    killer, killed, before = _when_mid_run(pool, tiled.client(), _sigkill)
    uid = _scan(RE, bl)
    t_stop = time.monotonic()
    killer.join()
    assert killed.get("uid") == uid, "the worker was not killed during the scan"
    assert killed["t"] < t_stop  # mid-run: before the raw run's stop document
    other = pool[1 - killed["index"]]
    # After the session timeout the group gives the dead worker's partitions to the other
    # one, which reads the run again from its start document (the committed offset).
    _wait_finished([other], [uid], timeout=60 + ACK_WAIT_S)
    assert handle.flush(30)
    handle.close()
    assert uid not in pool[killed["index"]].runs("finished")
    assert re.search(rf"finished run {uid} .*replaced a partial one", other.text())
    _assert_one_whole_derived_run(tiled.client(), uid, 36)
    # The dead worker's finished runs were committed: the other one did not redo them.
    assert set(other.runs("took")) - before[1 - killed["index"]] == {uid}


def test_a_run_that_kills_its_workers_is_given_up_after_max_attempts(tiled, tmp_path):
    """The attempts at a run are counted on the brokers (the metadata of the committed
    offset), not in a worker's memory: a run whose every taker dies used to be redone for
    ever, each new owner of its partition starting from attempt 1. With ``--max-attempts 1``
    the worker that inherits the killed worker's partitions closes the run ``fail``."""
    beamline = "kgiveup"
    cluster = MockKafka(kafka_topic(beamline))
    workers = [WorkerProcess(tmp_path / f"w{k}.log", cluster.url, tiled, beamline,
                             "--max-attempts", "1") for k in range(2)]
    try:
        for w in workers:
            w.wait_for("ready on", timeout=120)
        for w in workers:
            w.wait_for(r"assigned partitions \[\d", timeout=60)
        uid, killed, other = _scan_killing_the_taker(tiled, cluster, beamline, workers,
                                                     seed=26)
        log = other.text()
        assert re.search(rf"run {uid} given up after 1 attempts.*replay {uid}", log), log
        assert re.search(rf"took run {uid} \(to close it", log)  # closed, not redone
        assert not re.search(rf"took run {uid} \(partition", log)
        derived = _derived(tiled.client(), uid)
        assert len(derived) == 1, derived
        stop = tiled.client()[derived[0]].stop
        assert stop["exit_status"] == "fail" and "given up after 1 attempts" in stop["reason"]
    finally:
        for w in workers:
            w.stop()
        cluster.stop()


def test_a_late_worker_takes_the_backlog_of_all_partitions_once(pool, kafka, tiled, tmp_path):
    for w in pool:  # nobody in the group while these runs are taken
        w.proc.send_signal(signal.SIGTERM)
    for w in pool:
        w.stop()
    done_before = {u for w in pool for u in w.runs("finished")}
    RE, handle = _engine(tiled, kafka.url, BEAMLINE)
    bl = sim_beamline("cells", write_path=tiled.detector_dir, seed=24)
    uids = [_scan(RE, bl, n_side=4) for _ in range(3)]
    assert handle.flush(30)
    handle.close()
    late = WorkerProcess(tmp_path / "late.log", kafka.url, tiled, BEAMLINE, "-v")
    try:
        _wait_finished([late], uids)
    finally:
        late.stop()
    # Runs of several partitions read in whatever order the fetches bring them: one at a
    # time, the others' starts put back and read again; nothing finished before redone.
    assert sorted(late.runs("took")) == sorted(uids), late.text()[-3000:]
    assert not set(late.runs("took")) & done_before
    for uid in uids:
        _assert_one_whole_derived_run(tiled.client(), uid, 16)


def test_the_bus_down_at_publish_time_loses_and_duplicates_nothing(kafka, tiled):
    forwarder = Forwarder(free_port(), kafka.bootstrap)
    url = f"kafka://127.0.0.1:{forwarder.port}"
    RE = RunEngine(call_returns_result=True)
    sent: list[tuple[str, dict]] = []
    RE.subscribe(lambda name, doc: sent.append((name, doc)))
    handle = publish_documents(RE, url, beamline="kdown")
    bl = sim_beamline("cells", write_path=tiled.detector_dir, seed=23)
    t0 = time.monotonic()
    uid = _scan(RE, bl, n_side=4)
    scan_s = time.monotonic() - t0
    stats = handle.stats
    assert stats.published == 0 and stats.dropped == 0 and not stats.connected, stats
    assert stats.buffered == len(sent)
    assert scan_s < 30
    forwarder.start()  # the brokers come (the bootstrap address answers)
    try:
        assert handle.flush(60), handle.stats
        stats = handle.close()
        assert stats.published == len(sent) and stats.dropped == 0, stats
        received = _read_topic(kafka.bootstrap, kafka_topic("kdown"), len(sent))
    finally:
        forwarder.stop()
    assert [n for n, _ in received] == [n for n, _ in sent]
    key = {"datum": "datum_id"}
    assert ([d.get(key.get(n, "uid")) for n, d in received]
            == [d.get(key.get(n, "uid")) for n, d in sent])
    assert received[0][1]["uid"] == uid


def _read_topic(bootstrap: str, topic: str, expected: int) -> list[tuple[str, dict]]:
    """Every document of ``topic`` (one run: one partition, in order), and nothing more."""
    from confluent_kafka import Consumer

    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "reader",
                         "auto.offset.reset": "earliest", "enable.auto.commit": False})
    consumer.subscribe([topic])
    out = []
    deadline = time.monotonic() + 30
    quiet_until = None
    try:
        while time.monotonic() < deadline:
            msg = consumer.poll(0.5)
            if msg is None or msg.error():
                if len(out) >= expected:  # then 2 s more: nothing stored twice
                    quiet_until = quiet_until or time.monotonic() + 2
                    if time.monotonic() > quiet_until:
                        break
                continue
            out.append(decode(msg.value()))
    finally:
        consumer.close()
    return out


def test_a_full_buffer_drops_and_counts_and_never_blocks():
    from bluesky_ptychopinn.distributed import KafkaPublisher

    publisher = KafkaPublisher(f"kafka://127.0.0.1:{free_port()}", beamline="full",
                               max_buffer=3)
    t0 = time.monotonic()
    start = {"uid": "r1", "time": time.time()}
    for k in range(5):
        publisher("start" if k == 0 else "event", start if k == 0 else {"descriptor": "d"})
    assert time.monotonic() - t0 < 1.0
    stats = publisher.close(timeout=0.5)
    assert (stats.buffered, stats.dropped, stats.published) == (3, 2, 0), stats


def test_kafka_urls():
    assert parse_kafka_url("kafka://a:9092,b:9093") == "a:9092,b:9093"
    assert parse_kafka_url("kafka://a,kafka://b:1") == "a:9092,b:1"
    with pytest.raises(ValueError, match="kafka://"):
        parse_kafka_url("nats://a:4222")


def test_the_worker_exits_with_a_clear_message_when_kafka_is_unreachable(tiled, tmp_path):
    dead = ["worker", "--bus", f"kafka://127.0.0.1:{free_port()}", "--tiled", tiled.uri,
            "--api-key", tiled.api_key]
    result = CliRunner().invoke(app, dead)
    assert result.exit_code == 2 and "cannot reach the bus" in result.output, result.output
    creds = tmp_path / "hxn.creds"
    creds.write_text("not for Kafka")
    result = CliRunner().invoke(app, [*dead, "--bus-creds", str(creds)])
    assert result.exit_code == 2 and "is a NATS option" in result.output, result.output
