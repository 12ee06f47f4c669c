"""The same publisher and worker over Kafka (``--bus kafka://BROKER[,BROKER...]``), with
``confluent-kafka`` (librdkafka): the NSLS-II standard bus.

Names (:func:`kafka_topic`, :func:`kafka_group`): one topic per beamline,
``<beamline>.ptychopinn.documents``, every document of every run as this package's JSON
(:mod:`._codec`); the message key is the run uid, so a run stays in one partition, in order.
Not the NSLS-II ``<beamline>.bluesky.runengine.documents`` topics: those carry bluesky-kafka's
msgpack messages, which other consumers read, and this codec is another one. The workers of a
beamline form one consumer group, ``<beamline>.ptychopinn-workers``: Kafka splits the
topic's partitions between them, and each worker reconstructs the runs that start in its
partitions, one at a time, from their start documents.

Offsets: a worker commits a partition's offset only once every run that starts before it is
finished (its derived run's stop document written to Tiled): the offset committed is the
lowest one still needed by any run not finished. A worker that dies (SIGKILL, lost host)
stops heart-beating; after the session timeout (``ack_wait_s``) the group gives its
partitions to another worker, which reads them from the committed offset, so the unfinished
run again from its start document. The derived uid is deterministic and
:class:`~._guard.DerivedRunGuard` replaces the partial derived run, so Tiled never holds two.

Attempts: before it reconstructs a run, a worker commits the run's start offset with the
attempt's number in the commit's metadata (``{"run": uid, "offset": n, "attempts": k}``). The
count is on the brokers, not in a worker's memory, so it survives the worker: a run that
kills every worker that takes it (out of memory, a crash in a library) is given up after
``max_attempts`` like a run that fails with an error, its derived run closed ``"fail"``.

Beamline side (:class:`KafkaPublisher`, made by ``publish_documents(RE, "kafka://...")``): an
idempotent producer (a retried produce is stored once, in order); librdkafka's own bounded
queue is the local buffer: the RunEngine never waits, documents queue while the brokers are
away (no expiry), and a document that does not fit is dropped and counted.

Tested against librdkafka's mock cluster (docs/deployment.md says what that does and does not
show); Apache Kafka itself is not run here.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import threading
import time
from dataclasses import dataclass, field

from ._codec import decode, encode
from ._errors import BusUnavailableError
from ._publisher import PublisherHandle, PublisherStats, _RunSubjects
from ._subjects import beamline_token
from ._worker import CLOSE_TRIES, RunLost, RunWorker, WorkerOptions

__all__ = ["KafkaPublisher", "KafkaWorker", "ensure_topic", "kafka_config", "kafka_group",
           "kafka_topic", "parse_kafka_url", "probe_kafka"]

logger = logging.getLogger(__name__)

#: Partitions of a beamline's topic when a worker or publisher creates it: how many workers
#: can share the beamline's runs (a facility creates its topics itself, with its own number).
DEFAULT_PARTITIONS = 8

#: Attempts at a run, by any worker, before it is given up (its derived run ends ``"fail"``,
#: it is committed past): a run that always fails, or kills every worker that takes it, must
#: not block the runs after it in its partition. ``--max-attempts`` overrides it.
MAX_ATTEMPTS = 5

#: Reads of a run's committed attempts before a worker falls back on its own count: a broker
#: that times out once must not make a run that kills its workers look fresh.
COMMITTED_TRIES = 3


def _require():
    try:
        import confluent_kafka
        import confluent_kafka.admin  # noqa: F401 - a submodule, not imported by the package
    except ImportError as exc:
        raise BusUnavailableError("the Kafka bus needs confluent-kafka: pip install "
                                  "'bluesky-ptychopinn[kafka]'") from exc
    return confluent_kafka


def parse_kafka_url(bus: str) -> str:
    """``kafka://h1:9092,h2:9092`` (or ``kafka://h1:9092,kafka://h2:9092``) -> librdkafka's
    ``bootstrap.servers`` ``h1:9092,h2:9092``."""
    brokers = []
    for part in bus.split(","):
        part = part.strip()
        scheme, sep, rest = part.partition("://")
        if sep and scheme.lower() != "kafka":
            raise ValueError(f"bus URL: kafka://BROKER[,BROKER...] expected, got {bus!r}")
        host = (rest if sep else part).strip("/")
        if host:
            brokers.append(host if ":" in host else f"{host}:9092")
    if not brokers:
        raise ValueError(f"bus URL: kafka://BROKER[,BROKER...] expected, got {bus!r}")
    return ",".join(brokers)


def kafka_topic(beamline: str) -> str:
    """Every document of a beamline's runs: ``<beamline>.ptychopinn.documents``."""
    return f"{beamline_token(beamline)}.ptychopinn.documents"


def kafka_group(beamline: str) -> str:
    """The consumer group of a beamline's reconstruction workers."""
    return f"{beamline_token(beamline)}.ptychopinn-workers"


def _read_properties(path: str) -> dict:
    """``key=value`` lines (a Java/librdkafka client properties file); ``#`` comments."""
    config = {}
    with open(path) as fh:
        for line in fh:
            line = line.strip()
            if not line or line.startswith(("#", "!")):
                continue
            key, sep, value = line.partition("=")
            if not sep:
                raise ValueError(f"{path}: key=value expected, got {line!r}")
            config[key.strip()] = value.strip()
    return config


class _LibrdkafkaLog:
    """librdkafka's log lines to this module's logger at DEBUG: a broker that is away is
    reported once by :meth:`_BusState.error` rather than at every reconnect attempt."""

    def log(self, level, fmt, *args):
        logger.debug(fmt, *args)


def kafka_config(bus: str, extra: dict | None = None) -> dict:
    """librdkafka properties: the brokers of ``bus``, then ``$PTYCHOPINN_KAFKA_CONFIG`` (a
    properties file: ``security.protocol``, ``sasl.*``, ``ssl.*`` ...), then ``extra``."""
    config = {"bootstrap.servers": parse_kafka_url(bus), "logger": _LibrdkafkaLog(),
              "client.id": "bluesky-ptychopinn"}
    path = os.environ.get("PTYCHOPINN_KAFKA_CONFIG")
    if path:
        config.update(_read_properties(path))
    for key, value in (extra or {}).items():
        if key in ("user_credentials", "tls", "token", "user", "password"):
            raise ValueError(f"{key!r} is a NATS option; for Kafka give librdkafka properties "
                             "(security.protocol, ssl.ca.location, sasl.*) in "
                             "$PTYCHOPINN_KAFKA_CONFIG")
        config[key] = value
    return config


def probe_kafka(bus: str, timeout: float = 3.0, config: dict | None = None) -> dict:
    """The cluster's metadata (``{"brokers": n, "topics": [...]}``) if a broker answers.

    Raises
    ------
    BusUnavailableError
        confluent-kafka is missing, or no broker answers within ``timeout`` seconds.
    """
    ck = _require()
    conf = kafka_config(bus, config)
    # A refused connection fails at once; librdkafka would retry it for all of ``timeout``.
    errors = []
    for broker in conf["bootstrap.servers"].split(","):
        host, _, port = broker.rpartition(":")
        try:
            socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
            break
        except OSError as exc:
            errors.append(f"{broker}: {exc}")
    else:
        raise BusUnavailableError(f"cannot reach the bus at {bus}: {'; '.join(errors)}")
    admin = ck.admin.AdminClient(conf)
    try:
        md = admin.list_topics(timeout=timeout)
    except ck.KafkaException as exc:
        raise BusUnavailableError(f"cannot reach the bus at {bus}: {exc.args[0]}") from exc
    return {"brokers": len(md.brokers), "topics": sorted(md.topics)}


def ensure_topic(bus: str, topic: str, partitions: int = DEFAULT_PARTITIONS, *,
                 config: dict | None = None, timeout: float = 5.0) -> int | None:
    """Create ``topic`` with ``partitions`` partitions unless it exists; returns its number of
    partitions, ``None`` when it could not be made (then the brokers' auto-creation, if on,
    makes it with their default number at the first produce).

    An existing topic is left as it is (more partitions are an operator's decision: they move
    keys to other partitions).
    """
    ck = _require()
    admin = ck.admin.AdminClient(kafka_config(bus, config))
    try:
        md = admin.list_topics(timeout=timeout)
        if topic in md.topics and md.topics[topic].error is None:
            return len(md.topics[topic].partitions)
        if md.controller_id not in md.brokers:
            logger.warning("topic %s: the cluster names no controller; not created here",
                           topic)
            return None
        future = admin.create_topics([ck.admin.NewTopic(topic, num_partitions=partitions)],
                                     request_timeout=timeout)[topic]
        future.result(timeout)
    except ck.KafkaException as exc:
        err = exc.args[0]
        if getattr(err, "code", lambda: None)() == ck.KafkaError.TOPIC_ALREADY_EXISTS:
            return None
        logger.warning("topic %s: not created (%s)", topic, err)
        return None
    logger.info("created topic %s with %d partitions", topic, partitions)
    return partitions


@dataclass
class _BusState:
    """Connected / lost, from librdkafka's error callback and from traffic (both threads)."""

    what: str
    connected: bool = False
    reconnects: int = 0
    ever: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)

    def error(self, err) -> None:
        ck = _require()
        if err.code() in (ck.KafkaError._ALL_BROKERS_DOWN, ck.KafkaError._TRANSPORT,
                          ck.KafkaError._RESOLVE):
            with self.lock:
                was, self.connected = self.connected, False
            if was:
                logger.warning("%s: lost the bus (%s); reconnecting", self.what, err.str())
        elif err.fatal():
            logger.error("%s: fatal bus error: %s", self.what, err.str())
        else:
            logger.debug("%s: %s", self.what, err.str())

    def alive(self) -> None:
        with self.lock:
            if self.connected:
                return
            self.connected = True
            again, self.ever = self.ever, True
            self.reconnects += again
        if again:
            logger.info("%s: bus reconnected", self.what)


class KafkaPublisher(PublisherHandle):
    """A Bluesky callback that sends every document to a beamline's Kafka topic.

    Usually made by :func:`~._publisher.publish_documents` with a ``kafka://`` URL. Call it
    with ``(name, doc)``; it returns at once: the document is encoded and handed to the
    producer's queue; a background thread serves the delivery reports.

    Parameters
    ----------
    bus : str
        ``kafka://BROKER[,BROKER...]``.
    beamline : str
        Names the topic (:func:`kafka_topic`).
    max_buffer : int
        Documents queued locally while the brokers are slow or away; beyond it new
        documents are dropped and counted (``stats.dropped``), the RunEngine never waits.
    partitions : int, optional
        Create the topic with this many partitions if it does not exist (at construction,
        for at most ``timeout_s``); ``None``: leave that to the workers or the operators.
    config : dict, optional
        More librdkafka producer properties (security, ``linger.ms`` ...).
    """

    def __init__(self, bus: str, *, beamline: str, max_buffer: int = 100_000,
                 partitions: int | None = None, config: dict | None = None,
                 timeout_s: float = 5.0) -> None:
        if max_buffer < 1:
            raise ValueError(f"max_buffer: >= 1 expected, got {max_buffer!r}")
        ck = _require()
        self.bus = bus
        self.beamline = beamline
        self.topic = kafka_topic(beamline)
        self.max_buffer = int(max_buffer)
        if partitions is not None:
            ensure_topic(bus, self.topic, partitions, config=config, timeout=timeout_s)
        self._state = _BusState(f"bus {bus}")
        conf = {
            # Stored once and in order per partition, however often librdkafka retries.
            "enable.idempotence": True, "acks": "all",
            # Never expire a queued document: the brokers may be away for a long time.
            "message.timeout.ms": 0,
            "queue.buffering.max.messages": self.max_buffer,
            "linger.ms": 5, "reconnect.backoff.max.ms": 2000,
            # Java clients' partitioner: the same run lands in the same partition whichever
            # client produced it.
            "partitioner": "murmur2_random",
            **kafka_config(bus, config),
            "error_cb": self._state.error,
        }
        self._producer = ck.Producer(conf)
        self._runs = _RunSubjects()
        self._lock = threading.Lock()
        self._stats = PublisherStats()
        # Documents librdkafka took and has not yet reported on. Counted here because
        # ``len(producer)`` also counts protocol requests (the idempotent producer's
        # InitProducerId while no broker answers), which are not documents.
        self._unreported = 0
        self._closing = threading.Event()
        self._thread = threading.Thread(target=self._serve_reports, name="kafka-publisher",
                                        daemon=True)
        self._thread.start()

    # -- the RunEngine side ----------------------------------------------------------------
    def _count_dropped(self) -> None:
        with self._lock:
            self._stats.dropped += 1

    def _take(self, name: str, doc: dict) -> None:
        run = self._runs.run_of(name, doc) or "norun"
        payload = encode(name, doc)
        if name == "stop":
            self._runs.forget(run)
        with self._lock:  # before produce: the report may come first, from the poll thread
            self._unreported += 1
        try:
            self._producer.produce(self.topic, value=payload, key=run.encode(),
                                   headers=[("name", name.encode())],
                                   on_delivery=self._delivered)
        except BufferError:
            with self._lock:
                self._unreported -= 1
            self._count_dropped()
            dropped = self._stats.dropped
            if dropped == 1 or dropped % 1000 == 0:
                logger.warning("bus %s unreachable and buffer full: %d documents dropped so "
                               "far", self.bus, dropped)

    def _delivered(self, err, msg) -> None:
        with self._lock:
            self._unreported -= 1
            if err is None:
                self._stats.published += 1
            else:  # a permanent error (too large, not authorised): lost to the bus
                self._stats.dropped += 1
        if err is None:
            self._state.alive()
        else:
            logger.warning("bus %s: a %s document was not stored: %s", self.bus,
                           dict(msg.headers() or []).get("name", b"?").decode(), err.str())

    def _serve_reports(self) -> None:
        while not self._closing.is_set():
            self._producer.poll(0.1)

    # -- state -----------------------------------------------------------------------------
    @property
    def stats(self) -> PublisherStats:
        """A snapshot of the counters (``duplicates`` stays 0: the idempotent producer's
        retries are recognised by the brokers without telling)."""
        with self._lock:
            stats = PublisherStats(**self._stats.__dict__)
            stats.buffered = self._unreported
        stats.connected, stats.reconnects = self._state.connected, self._state.reconnects
        return stats

    def flush(self, timeout: float = 30.0) -> bool:
        """Wait until every queued document is stored (acknowledged); False on timeout."""
        return self._producer.flush(timeout) == 0

    def _shutdown(self) -> None:
        self._closing.set()
        self._thread.join(timeout=5)


class KafkaWorker(RunWorker):
    """A member of the beamline's consumer group (see the module docstring).

    One run at a time: while it reconstructs a run, the start documents of other runs that
    arrive (from its other partitions, or interleaved in the same one) are put back: the
    partition is rewound to the earliest of them once the run is finished, and its offset is
    committed no further than that.

    A run that fails is redone from its start, after a pause, up to ``max_attempts`` times
    (:data:`MAX_ATTEMPTS` by default) by whichever worker holds its partition; then it is
    given up (an error is logged, its derived run ends ``"fail"``) and committed past, like a
    start document this codec cannot read, so that the runs after it in its partition go on.
    """

    waiting_unit = "documents"

    def __init__(self, options: WorkerOptions) -> None:
        super().__init__(options)
        self.topic = kafka_topic(options.beamline)
        self.group = kafka_group(options.beamline)
        self._state = _BusState(options.name)
        self._consumer = None
        self._done: dict[str, None] = {}  # finished raw uids, oldest first (bounded)
        self._next: dict[int, int] = {}  # partition -> offset after the last one consumed
        self._committed: dict[int, int] = {}
        self._current: tuple[str, int] | None = None  # (raw uid, partition)
        self._lost_current: str | None = None
        self._ever_assigned = False
        self.max_attempts = int(options.max_attempts or MAX_ATTEMPTS)
        # (raw uid, partition, start offset, attempt) recorded on the bus for the current run
        self._attempt: tuple[str, int, int, int] | None = None
        # Failed attempts, and failed closes of given-up runs, as this worker counts them
        # (the bus's count is the one that matters; these cover a commit that failed).
        self._failures: dict[str, int] = {}
        self._close_failures: dict[str, int] = {}

    def probe_bus(self) -> None:
        probe_kafka(self.options.bus, timeout=3.0, config=self.options.connect_options)

    # -- the consumer and its rebalances (called inside poll, in the polling thread) -------
    def _make_consumer(self):
        ck = _require()
        o = self.options
        session_ms = max(1000, int(o.ack_wait_s * 1000))
        conf = {
            "group.id": self.group,
            "enable.auto.commit": False, "enable.auto.offset.store": False,
            "auto.offset.reset": "earliest",
            "session.timeout.ms": session_ms,
            "heartbeat.interval.ms": max(100, session_ms // 3),
            # poll() is not called while a finished run's last snapshot and refinement are
            # written; the session (background heartbeats) is what detects a dead worker.
            "max.poll.interval.ms": max(session_ms, int(
                (900 + o.refine_budget_s + o.frames_timeout_s) * 1000)),
            # Only the partitions that move are revoked: a worker joining or leaving does not
            # interrupt the runs the others are reconstructing.
            "partition.assignment.strategy": "cooperative-sticky",
            "reconnect.backoff.max.ms": 2000,
            **kafka_config(o.bus, o.connect_options),
            "error_cb": self._state.error,
        }
        consumer = ck.Consumer(conf)
        consumer.subscribe([self.topic], on_assign=self._on_assign,
                           on_revoke=self._on_revoke, on_lost=self._on_lost)
        return consumer

    def _on_assign(self, consumer, partitions) -> None:
        self._ever_assigned = True
        logger.info("%s: assigned partitions %s of %s", self.options.name,
                    sorted(p.partition for p in partitions), self.topic)

    def _on_revoke(self, consumer, partitions, lost: bool = False) -> None:
        gone = sorted(p.partition for p in partitions)
        if gone:
            logger.info("%s: partitions %s %s", self.options.name, gone,
                        "lost" if lost else "revoked")
        for p in gone:
            self._next.pop(p, None)
            self._committed.pop(p, None)
        if self._current is not None and self._current[1] in gone:
            raw_uid = self._current[0]
            self._lost_current = raw_uid
            if lost:
                # Out of the group (session timed out): another worker may be writing this
                # run's derived run already. Write nothing more of it, not even a stop.
                state = self.live.runs.get(raw_uid)
                if state is not None and state.derived_uid:
                    self.guard.abandon(state.derived_uid)
            else:
                self._hand_back_attempt(consumer)
            # Revoked: closed here, before the partition goes to another worker (which waits
            # for this callback), so nothing of the partial derived run comes after it.
            self.close_run_now(raw_uid, "its partition went to another worker")

    def _on_lost(self, consumer, partitions) -> None:
        self._on_revoke(consumer, partitions, lost=True)

    # -- polling ---------------------------------------------------------------------------
    async def _poll(self, timeout: float):
        """The next message (or None); errors are logged, the bus state kept."""
        msg = await asyncio.to_thread(self._consumer.poll, timeout)
        if msg is None:
            return None
        if msg.error():
            ck = _require()
            if msg.error().code() == ck.KafkaError.UNKNOWN_TOPIC_OR_PART:
                logger.debug("%s: topic %s not there yet", self.options.name, self.topic)
            else:
                logger.warning("%s: %s", self.options.name, msg.error().str())
            return None
        self._state.alive()
        self._next[msg.partition()] = msg.offset() + 1
        return msg

    def _name(self, msg) -> str | None:
        """The document name of a message; None (logged) for one this codec cannot read."""
        for key, value in msg.headers() or []:
            if key == "name":
                return value.decode(errors="replace")
        try:
            return decode(msg.value())[0]
        except Exception as exc:
            logger.warning("%s: partition %d offset %d is not a document this worker can read "
                           "(%s); skipped", self.options.name, msg.partition(), msg.offset(),
                           exc)
            return None

    def _defer(self, msg, rewind: dict[int, int], partition: int) -> None:
        """Another run's start while this one is reconstructed: come back to it later."""
        p = msg.partition()
        if p not in rewind:
            logger.debug("%s: run %s (partition %d, offset %d) put back until run %s is "
                         "finished", self.options.name, (msg.key() or b"").decode(), p,
                         msg.offset(), self._current[0] if self._current else None)
            rewind[p] = msg.offset()
            if p != partition:
                ck = _require()
                with contextlib.suppress(ck.KafkaException):
                    self._consumer.pause([ck.TopicPartition(self.topic, p)])

    def _finished(self, raw_uid: str) -> None:
        self._done[raw_uid] = None
        while len(self._done) > 10_000:
            del self._done[next(iter(self._done))]

    async def _commit(self, rewind: dict[int, int]) -> None:
        """Commit, per partition, the lowest offset some unfinished run still needs."""
        ck = _require()
        try:
            # Only partitions this worker holds: the group's coordinator would also take an
            # offset for one another member has now, over that member's.
            held = {tp.partition for tp in await asyncio.to_thread(self._consumer.assignment)}
            offsets = {p: rewind.get(p, nxt) for p, nxt in self._next.items() if p in held}
            todo = [ck.TopicPartition(self.topic, p, off) for p, off in sorted(offsets.items())
                    if self._committed.get(p) != off]
            if not todo:
                return
            await asyncio.to_thread(self._consumer.commit, offsets=todo, asynchronous=False)
        except ck.KafkaException as exc:
            # A rebalance in progress, the bus away: the next owner of the partition may
            # redo a finished run, whose complete derived run is then kept.
            logger.warning("%s: offset commit failed (%s)", self.options.name, exc.args[0])
            return
        self._committed.update({tp.partition: tp.offset for tp in todo})
        logger.debug("%s: committed %s", self.options.name,
                     {tp.partition: tp.offset for tp in todo})

    def _rewind(self, rewind: dict[int, int]) -> None:
        ck = _require()
        for p, offset in rewind.items():
            tp = ck.TopicPartition(self.topic, p, offset)
            try:
                self._consumer.seek(tp)
                self._consumer.resume([ck.TopicPartition(self.topic, p)])
            except ck.KafkaException as exc:  # no longer ours: its next owner reads it
                logger.debug("partition %d: not rewound (%s)", p, exc.args[0])
                continue
            self._next[p] = offset

    # -- the loop --------------------------------------------------------------------------
    async def serve(self, max_runs: int | None = None) -> int:
        if self.client is None:
            self.check_services()
        if self.live is None:
            self._build_live()
        o = self.options
        await asyncio.to_thread(ensure_topic, o.bus, self.topic, DEFAULT_PARTITIONS,
                                config=o.connect_options)
        self._consumer = self._make_consumer()
        # Ready once the group has given this worker its partitions (maybe none).
        msg = None
        deadline = time.monotonic() + max(30.0, 3 * o.ack_wait_s)
        while not self._ever_assigned and time.monotonic() < deadline:
            msg = await self._poll(0.2)
            if msg is not None:  # assigned and a first message: handled below
                break
        self._ready_line()
        reporter = asyncio.ensure_future(self._report(self._lag))
        last_commit = time.monotonic()
        try:
            while not self._stop.is_set():
                if max_runs is not None and self.progress.runs_done >= max_runs:
                    break
                if msg is None:
                    msg = await self._poll(1.0)
                    if msg is None:
                        continue
                raw_uid = (msg.key() or b"").decode(errors="replace")
                if self._name(msg) == "start" and raw_uid not in self._done:
                    try:
                        first = decode(msg.value())
                    except Exception as exc:
                        # Stored for good: every worker would fail on it. Skip it (committed).
                        logger.error("%s: run %s: its start document (partition %d, offset "
                                     "%d) cannot be read (%s: %s); skipped", o.name, raw_uid,
                                     msg.partition(), msg.offset(), type(exc).__name__, exc)
                        self._finished(raw_uid)
                        msg = None
                        continue
                    if not await self._wait_for_tiled():
                        break  # (stopped: ``msg`` is left unhandled, see below)
                    await self._handle_start(msg, raw_uid, first)
                elif time.monotonic() - last_commit > 5.0:
                    # Documents of finished (or earlier) runs: skipped, and so committed.
                    await self._commit({})
                    last_commit = time.monotonic()
                msg = None
        finally:
            reporter.cancel()
            if msg is not None:
                # Read but not handled (stopped while Tiled was away, or just after the
                # poll): not committed past, whoever holds the partition next reads it.
                p = msg.partition()
                self._next[p] = min(self._next.get(p, msg.offset()), msg.offset())
            with contextlib.suppress(Exception):
                if self._current is None:
                    await self._commit({})  # what was skipped since the last commit
                await asyncio.to_thread(self._consumer.close)
        return self.progress.runs_done

    async def _handle_start(self, first, raw_uid: str, start: tuple[str, dict]) -> None:
        """The run that starts at ``first``: reconstructed; or, failed here, read again after
        a pause; or, after ``max_attempts`` attempts by any worker, given up."""
        known = await self._attempts_before(first, raw_uid)
        before = max(known or 0, self._failures.get(raw_uid, 0))
        if before >= self.max_attempts:
            if await self._give_up(raw_uid, start, before):
                self._forget_failures(raw_uid)
                return
            tries = self._close_failures.get(raw_uid, 0) + 1
            if tries >= CLOSE_TRIES:
                logger.error("%s: run %s: its 'fail' stop could not be written either (%d "
                             "tries); skipped, its derived run left as the last attempt left "
                             "it", self.options.name, raw_uid, tries)
                self._forget_failures(raw_uid)
                self._finished(raw_uid)
                await self._commit({})
                return
            self._close_failures[raw_uid] = tries
            self._rewind({first.partition(): first.offset()})
            await self._pause(tries)
            return
        attempt = before + 1
        if known is not None:
            await self._record_attempt(first, raw_uid, attempt)
        # (unknown: the count on the brokers is left as it is, never overwritten with this
        # worker's lower one; this attempt is then counted by this worker only)
        try:
            done = await self._take(first, raw_uid, start)
        finally:
            self._attempt = None
        if done:
            self._failures.pop(raw_uid, None)
            return
        # Read again from its start after the pause; after the last attempt that read gives
        # it up (_give_up), which closes its derived run whatever this attempt left of it.
        self._failures[raw_uid] = attempt
        await self._pause(attempt)

    def _forget_failures(self, raw_uid: str) -> None:
        self._failures.pop(raw_uid, None)
        self._close_failures.pop(raw_uid, None)

    async def _pause(self, attempts: int) -> None:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._stop.wait(), self._retry_delay(attempts))

    async def _take(self, first, raw_uid: str, start: tuple[str, dict]) -> bool:
        """Reconstruct the run that starts at ``first`` (decoded: ``start``); False: it
        failed here and is to be redone (its partition is rewound to its start)."""
        partition, start_offset = first.partition(), first.offset()
        rewind: dict[int, int] = {}
        self._current, self._lost_current = (raw_uid, partition), None
        pending = [start]

        async def next_doc(timeout: float):
            if pending:
                return pending.pop()
            deadline = time.monotonic() + timeout
            while True:
                if self._lost_current == raw_uid:
                    raise RunLost("its partition went to another worker")
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                msg = await self._poll(min(left, 0.2))
                if msg is None:
                    continue
                key = (msg.key() or b"").decode(errors="replace")
                if key == raw_uid and msg.partition() == partition:
                    if self._name(msg) is None:
                        continue
                    try:
                        return decode(msg.value())
                    except Exception as exc:  # stored for good: a retry would fail again
                        logger.warning("%s: run %s: partition %d offset %d cannot be read "
                                       "(%s); skipped", self.options.name, raw_uid,
                                       msg.partition(), msg.offset(), exc)
                        continue
                if key not in self._done and key != raw_uid and self._name(msg) == "start":
                    self._defer(msg, rewind, partition)
                # Else: a document of a finished run, or of one whose start this worker put
                # back (it is read again from there).

        try:
            done = await self.run_once(raw_uid, next_doc,
                                       f"partition {partition}, offset {start_offset}")
        finally:
            self._current = None
        lost = self._lost_current == raw_uid
        if done:
            self._finished(raw_uid)
        elif not lost:
            rewind[partition] = start_offset  # redo it whole, after a pause
        if not lost:
            if done:
                await self._commit(rewind)
            self._rewind(rewind)
        else:
            self._rewind({p: off for p, off in rewind.items() if p != partition})
        return done or lost  # a lost run is not this worker's to retry

    # -- attempts, counted on the brokers -------------------------------------------------
    async def _attempts_before(self, first, raw_uid: str) -> int | None:
        """Attempts at the run that starts at ``first`` so far, by any worker: the metadata
        of its partition's committed offset, when that offset is this start (0 otherwise);
        ``None`` when the brokers did not answer (:data:`COMMITTED_TRIES` reads) or the
        worker is stopping."""
        ck = _require()
        tp = ck.TopicPartition(self.topic, first.partition())
        for attempt in range(1, COMMITTED_TRIES + 1):
            try:
                [committed] = await asyncio.to_thread(self._consumer.committed, [tp], 5.0)
                if committed.error is not None:  # a per-partition error, not raised
                    raise ck.KafkaException(committed.error)
                break
            except ck.KafkaException as exc:  # brokers slow or away: not "no attempts"
                if attempt == COMMITTED_TRIES or self._stop.is_set():
                    logger.warning("%s: run %s: attempts so far not read from the brokers "
                                   "(%d tries: %s); the count there is left as it is and "
                                   "this attempt counted by this worker only",
                                   self.options.name, raw_uid, attempt, exc.args[0])
                    return None
                with contextlib.suppress(asyncio.TimeoutError):  # a stop ends the wait
                    await asyncio.wait_for(self._stop.wait(), 0.5 * attempt)
        try:
            record = json.loads(committed.metadata or "{}")
            if (committed.offset == first.offset() and record.get("run") == raw_uid
                    and record.get("offset") == first.offset()):
                return max(0, int(record.get("attempts", 0)))
        except (ValueError, TypeError, AttributeError) as exc:  # not our metadata
            logger.debug("%s: run %s: attempts so far not read (%s)", self.options.name,
                         raw_uid, exc)
        return 0

    async def _record_attempt(self, first, raw_uid: str, attempt: int) -> None:
        """Commit the run's start offset with ``attempt`` in the metadata before the run is
        reconstructed: a worker that takes it after this one (which may die in it) reads
        it there. Everything before the start is finished, so committing it loses
        nothing."""
        ck = _require()
        p, offset = first.partition(), first.offset()
        try:
            await asyncio.to_thread(self._consumer.commit, asynchronous=False,
                                    offsets=[self._attempt_offset(raw_uid, p, offset, attempt)])
        except ck.KafkaException as exc:
            logger.warning("%s: run %s: attempt %d not recorded on the bus (%s); only this "
                           "worker counts it", self.options.name, raw_uid, attempt,
                           exc.args[0])
            return
        self._committed[p] = offset
        self._attempt = (raw_uid, p, offset, attempt)

    def _attempt_offset(self, raw_uid: str, partition: int, offset: int, attempts: int):
        """The run's start offset with the attempts so far in its commit metadata (what
        :meth:`_attempts_before` reads)."""
        record = json.dumps({"run": raw_uid, "offset": offset, "attempts": attempts})
        return _require().TopicPartition(self.topic, partition, offset, metadata=record)

    def _hand_back_attempt(self, consumer) -> None:
        """The current run's partition is revoked (a worker joins or leaves the group): the
        attempt this worker recorded is no failure. Commit the run's start again with the
        count before it, in the revoke callback, before the partition changes hands."""
        if self._attempt is None:
            return
        raw_uid, p, offset, attempt = self._attempt
        self._attempt = None
        ck = _require()
        try:
            consumer.commit(offsets=[self._attempt_offset(raw_uid, p, offset, attempt - 1)],
                            asynchronous=False)
        except ck.KafkaException as exc:
            logger.warning("%s: run %s: its partition was handed over, but the attempt could "
                           "not be taken back (%s); it counts as one", self.options.name,
                           raw_uid, exc.args[0])

    async def _give_up(self, raw_uid: str, start: tuple[str, dict], attempts: int) -> bool:
        """Close the run whose start document is ``start`` without reconstructing it
        (:meth:`close_given_up`), then commit past it. False: Tiled refused the write."""
        reason = (f"given up after {attempts} attempts: each worker that took this run "
                  "failed or stopped before finishing it (killed, out of memory?)")
        if not await self.close_given_up(raw_uid, start[1], reason):
            return False
        self._finished(raw_uid)
        await self._commit({})
        return True

    async def _lag(self) -> int:
        """Documents in this worker's partitions not read yet (-1: unknown now)."""
        ck = _require()
        total = 0
        for p, nxt in list(self._next.items()):
            tp = ck.TopicPartition(self.topic, p)
            _, high = await asyncio.to_thread(self._consumer.get_watermark_offsets, tp, 1.0,
                                              True)
            if high < 0:
                return -1
            total += max(0, high - nxt)
        return total
