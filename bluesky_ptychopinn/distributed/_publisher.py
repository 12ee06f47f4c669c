"""Beamline side: every document of the RunEngine to JetStream, never blocking the RunEngine.

The RunEngine's callback only encodes the document and appends it to a bounded local buffer.
A background thread with its own asyncio loop connects (and reconnects) to the bus and
publishes the buffer in order, one acknowledged publish at a time: a later document is never
stored before an earlier one, so a worker can rebuild a run by reading its subject from the
first message. Each message carries a ``Nats-Msg-Id`` made of the run uid and the document's
position in the run; a publish retried after a lost acknowledgement is stored once.

A bus that comes back without the streams (a new server, an emptied store) gets them again:
after a reconnect, and whenever a publish finds no stream. Publishes that keep failing, and
connection errors (a wrong password first of all), are logged at WARNING or ERROR.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
import uuid
from dataclasses import dataclass

from ._codec import encode
from ._errors import BusErrorLog
from ._streams import ensure_streams
from ._subjects import docs_stream, docs_subject, runs_stream, runs_subject

__all__ = ["DocumentPublisher", "PublisherHandle", "PublisherStats", "publish_documents"]

logger = logging.getLogger(__name__)

#: A publish failing for this long (seconds) is reported at WARNING, then again as often.
FAILING_REPORT_S = 10.0


@dataclass
class PublisherStats:
    """Counters of a :class:`DocumentPublisher` (a snapshot).

    Attributes
    ----------
    published : int
        Documents stored in JetStream (acknowledged by the server).
    buffered : int
        Documents waiting in the local buffer.
    dropped : int
        Documents dropped because the buffer was full (the bus was away too long).
    duplicates : int
        Publishes the server recognised as already stored (retries).
    connected : bool
        Whether the publisher holds a connection to the bus now.
    reconnects : int
        Connections made after the first.
    """

    published: int = 0
    buffered: int = 0
    dropped: int = 0
    duplicates: int = 0
    connected: bool = False
    reconnects: int = 0


@dataclass
class _Message:
    subject: str
    payload: bytes
    msg_id: str
    stream: str


class _RunSubjects:
    """Which run a document belongs to (descriptors, resources point to their run's start)."""

    def __init__(self) -> None:
        self.owner: dict[str, str] = {}  # descriptor / resource uid -> run uid
        self.count: dict[str, int] = {}  # run uid -> documents so far
        self.current: str | None = None

    def run_of(self, name: str, doc: dict) -> str | None:
        if name == "start":
            self.current = doc["uid"]
            return doc["uid"]
        if name in ("stop", "descriptor", "resource", "stream_resource"):
            run = doc.get("run_start") or self.current
            if name != "stop" and run is not None:
                self.owner[doc["uid"]] = run
            return run
        if name in ("event", "event_page", "stream_datum"):
            return self.owner.get(doc.get("descriptor"), self.current)
        if name in ("datum", "datum_page"):
            return self.owner.get(doc.get("resource"), self.current)
        return self.current

    def next_index(self, run: str) -> int:
        n = self.count.get(run, 0)
        self.count[run] = n + 1
        return n

    def forget(self, run: str) -> None:
        self.count.pop(run, None)
        for key in [k for k, v in self.owner.items() if v == run]:
            del self.owner[key]
        if self.current == run:
            self.current = None


class PublisherHandle:
    """What every publisher :func:`publish_documents` returns does: a ``(name, doc)``
    callback that counts what it cannot send, ``stats``, ``flush`` and ``close``. A transport
    implements ``_take(name, doc)``, ``_count_dropped()``, ``stats``, ``flush`` and
    ``_shutdown()``."""

    bus: str
    unsubscribe = None  # set by publish_documents

    def __call__(self, name: str, doc: dict) -> None:
        try:
            self._take(name, doc)
        except Exception:
            # A document that cannot be encoded is lost to the bus, not to the scan:
            # counted here, logged (or raised with BLUESKY_DEBUG_CALLBACKS=1) by
            # make_callback_safe, which publish_documents wraps around this callback.
            self._count_dropped()
            raise

    def close(self, timeout: float = 10.0) -> PublisherStats:
        """Stop taking documents, publish what is buffered for up to ``timeout`` seconds,
        disconnect. Returns the final :attr:`stats` (``buffered`` > 0: lost at close)."""
        if self.unsubscribe is not None:
            self.unsubscribe()
            self.unsubscribe = None
        self.flush(timeout)
        self._shutdown()
        stats = self.stats
        if stats.buffered:
            logger.warning("bus publisher closed with %d documents not published",
                           stats.buffered)
        return stats

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class DocumentPublisher(PublisherHandle):
    """A Bluesky callback that sends every document to a NATS JetStream bus.

    Usually made by :func:`publish_documents`. Call it with ``(name, doc)``; it returns at
    once. The background thread starts at construction.

    Parameters
    ----------
    bus : str
        ``nats://HOST:PORT`` (several servers: comma-separated).
    beamline : str
        Names the streams and subjects (:mod:`._subjects`).
    max_buffer : int
        Documents kept locally while the bus is slow or away; beyond it new documents are
        dropped and counted (``stats.dropped``), the RunEngine never waits.
    publish_timeout_s : float
        Wait for one acknowledgement before the publish is retried (same message id).
    connect_options : dict, optional
        More ``nats.connect`` keywords: ``user_credentials``, ``tls`` (an
        ``ssl.SSLContext``), ``user``/``password``, ``token`` (docs/deployment.md).
    """

    def __init__(self, bus: str, *, beamline: str, max_buffer: int = 100_000,
                 publish_timeout_s: float = 2.0, connect_options: dict | None = None) -> None:
        if max_buffer < 1:
            raise ValueError(f"max_buffer: >= 1 expected, got {max_buffer!r}")
        self.bus = bus
        self.beamline = beamline
        self.max_buffer = int(max_buffer)
        self.publish_timeout_s = float(publish_timeout_s)
        self.connect_options = dict(connect_options or {})
        self._runs = _RunSubjects()
        self._buffer: collections.deque[_Message] = collections.deque()
        self._cond = threading.Condition()
        self._stats = PublisherStats()
        self._closing = False
        self._wake: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._streams_ready = False  # the background thread's: made (again) when False
        self._thread = threading.Thread(target=self._thread_main, name="bus-publisher",
                                        daemon=True)
        self._thread.start()

    # -- the RunEngine side ----------------------------------------------------------------
    def _count_dropped(self) -> None:
        with self._cond:
            self._stats.dropped += 1

    def _take(self, name: str, doc: dict) -> None:
        run = self._runs.run_of(name, doc)
        if run is None:  # a document outside any run (none in practice): still published
            run, index = "norun", uuid.uuid4().hex
        else:
            index = self._runs.next_index(run)
        messages = [_Message(docs_subject(self.beamline, run, name), encode(name, doc),
                             f"{run}:{index}", docs_stream(self.beamline))]
        if name == "start":
            # After the start document (same buffer, in order): a worker that takes the
            # announcement always finds the run's first document.
            announcement = encode("run", {"uid": run, "beamline": self.beamline,
                                          "time": doc.get("time", time.time())})
            messages.append(_Message(runs_subject(self.beamline), announcement, f"run:{run}",
                                     runs_stream(self.beamline)))
        elif name == "stop":
            self._runs.forget(run)
        with self._cond:
            for message in messages:
                if len(self._buffer) >= self.max_buffer:
                    self._stats.dropped += 1
                    if self._stats.dropped == 1 or self._stats.dropped % 1000 == 0:
                        logger.warning("bus %s unreachable and buffer full: %d documents "
                                       "dropped so far", self.bus, self._stats.dropped)
                    continue
                self._buffer.append(message)
        loop, wake = self._loop, self._wake
        if loop is not None and wake is not None and not wake.is_set():
            loop.call_soon_threadsafe(wake.set)

    # -- state -----------------------------------------------------------------------------
    @property
    def stats(self) -> PublisherStats:
        """A snapshot of the counters (:class:`PublisherStats`)."""
        with self._cond:
            return PublisherStats(**{**self._stats.__dict__, "buffered": len(self._buffer)})

    def flush(self, timeout: float = 30.0) -> bool:
        """Wait until the buffer is empty (everything acknowledged); False on timeout."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._buffer:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(min(left, 0.1))
        return True

    def _shutdown(self) -> None:
        self._closing = True
        loop, wake = self._loop, self._wake
        if loop is not None and wake is not None:
            loop.call_soon_threadsafe(wake.set)
        self._thread.join(timeout=5)

    # -- the background thread ---------------------------------------------------------------
    def _thread_main(self) -> None:
        loop = asyncio.new_event_loop()
        try:
            loop.run_until_complete(self._main(loop))
        finally:
            loop.close()

    async def _connect(self):
        import nats

        async def disconnected():
            with self._cond:
                self._stats.connected = False
            if self._closing:
                return
            logger.warning("bus %s: disconnected; buffering documents", self.bus)

        async def reconnected():
            with self._cond:
                self._stats.connected = True
                self._stats.reconnects += 1
            self._streams_ready = False  # maybe another server, or an emptied store
            logger.info("bus %s: reconnected", self.bus)

        # Unlimited reconnects: nats-py also keeps retrying the first connect, so a bus that
        # is down when the profile loads is picked up when it comes.
        return await nats.connect(
            self.bus.split(","), max_reconnect_attempts=-1, reconnect_time_wait=0.5,
            # nats-py reports every failed reconnect: each distinct cause once, visibly.
            connect_timeout=2, error_cb=BusErrorLog(logger, f"bus {self.bus}").handle,
            disconnected_cb=disconnected,
            reconnected_cb=reconnected, **self.connect_options)

    async def _main(self, loop: asyncio.AbstractEventLoop) -> None:
        self._wake = asyncio.Event()
        self._loop = loop
        connect = asyncio.ensure_future(self._connect())
        while not connect.done():
            await asyncio.wait([connect], timeout=0.2)
            if self._closing:
                connect.cancel()
                return
        nc = connect.result()
        with self._cond:
            self._stats.connected = True
        js = nc.jetstream(timeout=self.publish_timeout_s)
        failing_since: float | None = None
        reported = 0.0
        try:
            while True:
                with self._cond:
                    message = self._buffer[0] if self._buffer else None
                if message is None:
                    if self._closing:
                        return
                    self._wake.clear()
                    with self._cond:
                        empty = not self._buffer
                    if empty:
                        await self._wake.wait()
                    continue
                try:
                    if not self._streams_ready:
                        await ensure_streams(js, self.beamline)
                        self._streams_ready = True
                    ack = await js.publish(message.subject, message.payload,
                                           stream=message.stream,
                                           headers={"Nats-Msg-Id": message.msg_id})
                except Exception as exc:  # timeout, disconnected, no responders: retry
                    if self._closing:
                        return
                    if _no_stream(exc):
                        self._streams_ready = False  # the bus lost them: make them again
                    now = time.monotonic()
                    failing_since = failing_since if failing_since is not None else now
                    if now - failing_since >= FAILING_REPORT_S and now - reported >= \
                            FAILING_REPORT_S:
                        reported = now
                        logger.warning("bus %s: publishing has failed for %.0f s (%s: %s); "
                                       "%d documents buffered", self.bus, now - failing_since,
                                       type(exc).__name__, exc, len(self._buffer))
                    else:
                        logger.debug("publish of %s failed (%s); retrying", message.msg_id,
                                     exc)
                    await asyncio.sleep(0.2)
                    continue
                if failing_since is not None and reported:
                    logger.info("bus %s: publishing again", self.bus)
                failing_since, reported = None, 0.0
                with self._cond:
                    self._buffer.popleft()
                    self._stats.published += 1
                    self._stats.duplicates += bool(ack.duplicate)
                    self._cond.notify_all()
        finally:
            await nc.close()


def _no_stream(exc: BaseException) -> bool:
    """Whether a publish failed because no stream takes its subject (not a timeout)."""
    from nats.errors import NoRespondersError
    from nats.js.errors import NoStreamResponseError, NotFoundError, ServiceUnavailableError

    return isinstance(exc, (NoStreamResponseError, NotFoundError, NoRespondersError,
                            ServiceUnavailableError))


def publish_documents(RE, bus: str = "nats://127.0.0.1:4222", *, beamline: str = "local",
                      max_buffer: int = 100_000, **kwargs):
    """Send every document of ``RE`` to the bus; for a beamline's IPython profile.

    Parameters
    ----------
    RE : bluesky.RunEngine
    bus : str
        ``nats://HOST:PORT`` of the facility's NATS (JetStream) cluster, or of
        ``bluesky-ptychopinn bus serve`` (the default transport); or ``kafka://BROKER[,...]``
        of a Kafka cluster (the ``kafka`` extra; :mod:`._kafka`).
    beamline : str
        Stream and subject names (``BLUESKY_<BEAMLINE>``, ``events.<beamline>.<run>.<doc>``),
        or the Kafka topic (``<beamline>.ptychopinn.documents``).
    max_buffer : int
        Documents buffered locally while the bus is away (then dropped and counted).
    **kwargs
        :class:`DocumentPublisher` options (``publish_timeout_s``, ``connect_options``), or
        :class:`~._kafka.KafkaPublisher` options (``partitions``, ``config``).

    Returns
    -------
    DocumentPublisher or KafkaPublisher
        The handle: ``stats`` (published, buffered, dropped), ``flush()``, ``close()``.

    Examples
    --------
    >>> handle = publish_documents(RE, "nats://bus.example:4222", beamline="hxn")  # doctest: +SKIP
    >>> RE(ptycho_scan(...))                                                     # doctest: +SKIP
    >>> handle.stats                                                             # doctest: +SKIP
    PublisherStats(published=2051, buffered=0, dropped=0, ...)
    """
    from bluesky.callbacks.core import make_callback_safe

    if bus.split("://", 1)[0].lower() == "kafka":
        from ._kafka import KafkaPublisher

        publisher = KafkaPublisher(bus, beamline=beamline, max_buffer=max_buffer, **kwargs)
    else:
        publisher = DocumentPublisher(bus, beamline=beamline, max_buffer=max_buffer, **kwargs)
    token = RE.subscribe(make_callback_safe(publisher, logger=logger))
    publisher.unsubscribe = lambda: RE.unsubscribe(token)
    return publisher
