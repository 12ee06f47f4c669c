"""A remote reconstruction worker: whole runs from the bus, derived runs to Tiled.

One worker reconstructs one run at a time (one worker per GPU). :class:`RunWorker` is the
transport-neutral part: it feeds a run's documents, from its first one, to a
:class:`~bluesky_ptychopinn.callbacks.LiveReconstruction` (thread isolation, deterministic
derived uid) whose derived run goes through :class:`~._guard.DerivedRunGuard` to Tiled, and
says whether the run is done (its derived run's stop document written) or must be redone.
Transports only decide which run to take and when it counts as done:

- :class:`Worker`, NATS JetStream: takes run announcements from the shared durable consumer,
  reads the run's documents from the first one (an ordered consumer on
  ``events.<beamline>.<run>.>``) and acknowledges the announcement only once the derived run's
  stop document is written. While it works it sends in-progress heartbeats, so the ack deadline
  only has to cover a dead worker's silence, not a long scan: a killed worker's run goes to
  another worker when the deadline passes, and is reconstructed again from its first document.
  A run whose every delivery ended that way (it kills its workers, say by memory) is not
  delivered again after ``max_deliver``; a worker that hears the bus's advisory closes its
  derived run as ``"fail"``, saying so, instead of leaving it open for ever.
- :class:`~._kafka.KafkaWorker`, Kafka: a consumer group member that takes the runs of the
  partitions it is assigned and commits offsets at the runs' ends (``--bus kafka://...``).

:func:`run_worker` chooses by the bus URL's scheme.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from ..catalog import TiledUnavailableError, connect
from ._codec import decode
from ._errors import BusErrorLog, BusUnavailableError
from ._frames import PathMap, TiledFrames, parse_path_map
from ._guard import DerivedRunGuard
from ._server import probe_bus
from ._streams import ensure_streams, ensure_workers_consumer
from ._subjects import (
    WORKERS_DURABLE,
    docs_stream,
    max_deliveries_subject,
    run_filter,
    runs_stream,
)

__all__ = ["RunLost", "RunWorker", "WorkerOptions", "Worker", "make_worker", "run_worker"]

#: Tries at closing a given-up run (its start and a ``"fail"`` stop written to Tiled) before
#: it is left as it is: a Tiled that refuses even that must not hold up the runs after it.
CLOSE_TRIES = 3

#: ``await next_doc(timeout)``: a run's next ``(name, doc)``, or ``None`` after ``timeout`` s.
NextDoc = Callable[[float], Awaitable["tuple[str, dict] | None"]]

logger = logging.getLogger(__name__)


@dataclass
class WorkerOptions:
    """Settings of one worker (the ``bluesky-ptychopinn worker`` options).

    Parameters
    ----------
    bus : str
        ``nats://HOST:PORT[,...]`` (NATS JetStream) or ``kafka://BROKER[,BROKER...]``
        (Kafka consumer group; needs the ``kafka`` extra).
    tiled : str
        Tiled URI of the catalog raw runs are in and derived runs go to.
    api_key : str, optional
        Tiled API key (else ``$TILED_API_KEY``).
    beamline : str
        Whose work queue to serve.
    model : str
        Model name or directory.
    device : str, optional
        ``"cuda"``, ``"cuda:1"``, ``"cpu"``; default: CUDA when available.
    refine : bool
        Run the rPIE refinement tier beside the network.
    refine_budget_s : float
        Refinement after the last frame.
    refine_positions : bool
        Let the refiner correct each frame's position (``LiveReconstruction``'s option).
    path_map : list of str
        ``ACQ_PREFIX=LOCAL_PREFIX``: read detector files from a shared filesystem; empty: read
        frames through Tiled.
    ack_wait_s : float
        NATS: ack deadline of the work queue (set by the first worker that creates the
        consumer). Kafka: the consumer's session timeout (how long a silent worker keeps its
        partitions before the group gives them to another one).
    report_every_s : float
        Health line interval.
    batch_size : int
        Frames per network call.
    torch_threads : int, optional
        CPU threads of the reconstruction.
    run_idle_timeout_s : float
        A run whose next document does not come for this long (its RunEngine died) is closed
        with ``"fail"`` and acknowledged.
    frames_timeout_s : float
        Through Tiled: how long after the stop document to wait for frames to be registered.
    name : str
        In log lines; default ``host:pid``.
    retry_delay_s : float
        A run that failed here is offered again after this many seconds times its attempts
        so far (at most 60 s).
    max_attempts : int, optional
        Attempts at one run, by any worker, before it is given up: its derived run ends
        ``"fail"`` with the reason, and the runs after it go on. Counted on the bus, so a run
        that kills every worker that takes it is bounded too. Default: NATS 10 (the work
        queue's ``max_deliver``, set by the first worker of a beamline), Kafka
        :data:`~._kafka.MAX_ATTEMPTS`.
    max_queue : int, optional
        Documents (frames inline) queued for the reconstruction; when full, reading the bus
        waits (a backlog stays on the bus, not in memory). Default: 4 batches, at least 64.
    connect_options : dict
        NATS: more ``nats.connect`` keywords (``user_credentials``, ``tls``, ``token`` ...).
        Kafka: more librdkafka properties (``security.protocol``, ``sasl.mechanism`` ...;
        also read from the file ``$PTYCHOPINN_KAFKA_CONFIG``).
    """

    bus: str
    tiled: str
    api_key: str | None = None
    beamline: str = "local"
    model: str = "default"
    device: str | None = None
    refine: bool = True
    refine_budget_s: float = 5.0
    refine_positions: bool = False
    path_map: list[str] = field(default_factory=list)
    ack_wait_s: float = 30.0
    report_every_s: float = 5.0
    batch_size: int = 64
    torch_threads: int | None = None
    run_idle_timeout_s: float = 3600.0
    frames_timeout_s: float = 120.0
    name: str = field(default_factory=lambda: f"{socket.gethostname()}:{os.getpid()}")
    retry_delay_s: float = 5.0
    max_attempts: int | None = None
    max_queue: int | None = None
    connect_options: dict = field(default_factory=dict)


class RunLost(Exception):
    """The bus took the run away from this worker mid-run (another worker redoes it)."""


@dataclass
class _Progress:
    """What the health line reports."""

    runs_done: int = 0
    frames_total: int = 0
    current: str | None = None
    last_doc_time: float | None = None
    window_start: float = field(default_factory=time.monotonic)
    window_frames: int = 0


class RunWorker:
    """The transport-neutral part of a worker (see the module docstring).

    A transport subclass implements :meth:`probe_bus` and :meth:`serve`; for each run it
    takes it calls :meth:`run_once` with a ``next_doc`` coroutine that returns the run's next
    ``(name, doc)`` (the first call: its start document), or ``None`` when none came within
    the timeout.
    """

    def __init__(self, options: WorkerOptions) -> None:
        self.options = options
        self.path_map = parse_path_map(options.path_map)
        self.progress = _Progress()
        self._stop = asyncio.Event()
        self.client = None
        self.live = None
        self.guard: DerivedRunGuard | None = None
        self._tiled_ok_at = -1e9  # monotonic time Tiled last answered

    # -- start-up: fail fast and clearly ------------------------------------------------------
    def probe_bus(self) -> None:
        """Raise :class:`BusUnavailableError` unless the bus answers now."""
        raise NotImplementedError

    def check_services(self) -> None:
        """Both services must answer at start.

        Raises
        ------
        BusUnavailableError, TiledUnavailableError
        """
        self.probe_bus()
        _probe_tiled(self.options.tiled)
        self.client = connect(self.options.tiled, api_key=self.options.api_key)

    def _build_live(self) -> None:
        from bluesky_tiled_plugins import TiledWriter

        from ..callbacks import LiveReconstruction

        o = self.options
        self.live = LiveReconstruction(
            o.model, isolation="thread", derived_uid="deterministic", device=o.device,
            torch_threads=o.torch_threads, batch_size=o.batch_size,
            # A few batches in memory, then the feed waits (in a thread, see _afeed): a
            # backlog is read from the bus as fast as it is reconstructed, never skipped.
            backpressure="block", max_queue=self.max_queue,
            refine="rpie" if o.refine else None, refine_budget_s=o.refine_budget_s,
            refine_positions=o.refine_positions,
            # Files are read only inside the data roots: the local side of every path map.
            data_roots=[local for _, local in self.path_map])
        # Small write batches: a viewer of the derived run sees snapshots as they come.
        self.guard = DerivedRunGuard(self.client, TiledWriter(self.client, batch_size=1))
        self.live.subscribe(self.guard)

    @property
    def max_queue(self) -> int:
        """Documents queued for the reconstruction at most (``WorkerOptions.max_queue``)."""
        o = self.options
        return int(o.max_queue) if o.max_queue else max(64, 4 * int(o.batch_size))

    @property
    def _block(self) -> int:
        """Frames read from Tiled per step: half the queue, so reading overlaps the work."""
        return max(1, self.max_queue // 2)

    def _ready_line(self) -> None:
        o = self.options
        logger.info("%s: ready on %s (beamline %s, frames %s), Tiled %s", o.name, o.bus,
                    o.beamline, "from " + ", ".join(o.path_map) if o.path_map else
                    "through Tiled", o.tiled)

    # -- the loop ------------------------------------------------------------------------------
    def stop(self) -> None:
        """Finish the current run, then return from :meth:`serve`; a second call (a second
        Ctrl-C) leaves at once: the run goes to another worker once the bus notices (the ack
        deadline, the session timeout)."""
        if self._stop.is_set():
            logger.warning("%s: stopping now, run %s left unfinished", self.options.name,
                           self.progress.current)
            os._exit(1)
        self._stop.set()
        if self.progress.current:
            logger.info("%s: stopping after run %s", self.options.name, self.progress.current)

    async def serve(self, max_runs: int | None = None) -> int:
        """Take runs until :meth:`stop` (or ``max_runs``); returns the number of runs done."""
        raise NotImplementedError

    async def _wait_for_tiled(self, max_age_s: float = 0.0) -> bool:
        """Before taking a run: Tiled must answer (retry with backoff while it does not).

        An answer less than ``max_age_s`` old will do. Returns False if :meth:`stop` was
        called meanwhile."""
        if time.monotonic() - self._tiled_ok_at < max_age_s:
            return True
        delay = 0.5
        while not self._stop.is_set():
            try:
                await asyncio.to_thread(self.client.refresh)
                self._tiled_ok_at = time.monotonic()
                return True
            except Exception as exc:
                logger.warning("%s: Tiled at %s does not answer (%s); retrying in %.1f s",
                               self.options.name, self.options.tiled, exc, delay)
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), delay)
                delay = min(delay * 2, 30.0)
        return False

    def _retry_delay(self, attempts: int) -> float:
        return min(self.options.retry_delay_s * max(1, attempts), 60.0)

    async def run_once(self, raw_uid: str, next_doc: NextDoc, how: str = "") -> bool:
        """Reconstruct one run whole; True: done (its derived run is complete in Tiled, or was
        already), False: to be redone (this worker failed it, or Tiled refused the write)."""
        o = self.options
        logger.info("%s: took run %s%s", o.name, raw_uid, f" ({how})" if how else "")
        t0 = time.monotonic()
        try:
            outcome, state = await self._reconstruct(raw_uid, next_doc)
        except RunLost as exc:
            logger.warning("%s: run %s left unfinished: %s", o.name, raw_uid, exc)
            await self._close_open_run(raw_uid, str(exc))
            return False
        except Exception as exc:
            logger.exception("%s: run %s failed on this worker: %s", o.name, raw_uid, exc)
            await self._close_open_run(raw_uid)
            return False
        finally:
            self.progress.current = None
            self._forget(raw_uid)
        if outcome is not None and outcome.status == "error":
            logger.warning("%s: run %s: Tiled write failed (%s); to be redone", o.name,
                           raw_uid, outcome.error)
            return False
        self.progress.runs_done += 1
        logger.info("%s: finished run %s -> derived %s (%s%s): %d frames in %.1f s", o.name,
                    raw_uid, outcome.uid if outcome else None,
                    outcome.status if outcome else "none",
                    ", replaced a partial one" if outcome and outcome.replaced else "",
                    state.frames_done if state else 0, time.monotonic() - t0)
        return True

    def _forget(self, raw_uid: str) -> None:
        """Drop what the live callback and the guard keep of a finished (or failed) run: a
        worker lives for weeks, and each run's state holds its last snapshots."""
        state = self.live.runs.pop(raw_uid, None) if self.live is not None else None
        if state is not None and state.derived_uid and self.guard is not None:
            self.guard.outcomes.pop(state.derived_uid, None)

    async def _reconstruct(self, raw_uid: str, next_doc: NextDoc):
        o = self.options
        adapter = (PathMap(self.path_map) if self.path_map else
                   TiledFrames(self.client, timeout_s=o.frames_timeout_s))
        self.progress.current = raw_uid
        live, guard = self.live, self.guard
        derived = None
        last = time.monotonic()
        while True:
            item = await next_doc(0.2)
            if item is None:
                if adapter.pending():  # a pause in the documents: read what is there
                    await asyncio.to_thread(self._pump_into_live, adapter, True)
                if time.monotonic() - last > o.run_idle_timeout_s:
                    logger.warning("run %s: no document for %.0f s; closing it", raw_uid,
                                   o.run_idle_timeout_s)
                    await asyncio.to_thread(self._finish_into_live, adapter)
                    await self._afeed([("stop", _abandoned_stop(
                        raw_uid, "fail",
                        f"no document on the bus for {o.run_idle_timeout_s:.0f} s"))])
                    break
                continue
            last = time.monotonic()
            name, doc = item
            self.progress.last_doc_time = doc.get("time")
            if name == "stop":
                await asyncio.to_thread(self._finish_into_live, adapter)
                await self._afeed(adapter(name, doc))
                break
            await self._afeed(adapter(name, doc))
            if adapter.pending():
                await asyncio.to_thread(self._pump_into_live, adapter, False)
            if derived is None and name == "start":
                if raw_uid not in live.runs:  # no ptycho metadata: nothing to reconstruct
                    logger.info("run %s is not a ptychography run; skipped", raw_uid)
                    return None, None
                state = live.latest(raw_uid)
                derived = guard.outcomes.get(state.derived_uid) if state else None
                if derived is not None and derived.status == "kept":
                    # Finished before (its ack or commit was lost): nothing to redo.
                    await self._afeed([("stop", _abandoned_stop(raw_uid, "success",
                                                                "already reconstructed"))])
                    break
        t_stop = time.monotonic()
        state = await asyncio.to_thread(live.wait, raw_uid, 600.0 + o.refine_budget_s)
        t_done = time.monotonic()
        outcome = guard.outcomes.get(state.derived_uid)
        if outcome is not None:
            # The live callback's stop reached the guard; the guard's write of it finished.
            await asyncio.to_thread(outcome.done.wait, 60.0)
        logger.debug("run %s: reconstruction done %.2f s after the stop document, derived run "
                     "written %.2f s later", raw_uid, t_done - t_stop, time.monotonic() - t_done)
        self.progress.frames_total += state.frames_done
        return outcome, state

    async def _close_open_run(self, raw_uid: str, reason: str = "worker error") -> None:
        await asyncio.to_thread(self.close_run_now, raw_uid, reason)

    async def close_given_up(self, raw_uid: str, start: dict, reason: str) -> bool:
        """Close a run the bus gave up on, without reconstructing it: its ``start`` document
        and a ``"fail"`` stop with ``reason`` go through the live callback and the guard,
        which replaces the partial derived run the last attempt left. Logs the error with
        the ``replay`` hint; False when Tiled refused the write."""
        logger.error("%s: run %s %s; its derived run ends 'fail'. Redo it with `bluesky-"
                     "ptychopinn replay %s` once the cause is fixed", self.options.name,
                     raw_uid, reason, raw_uid)
        docs = iter([("start", start), ("stop", _abandoned_stop(raw_uid, "fail", reason))])

        async def next_doc(timeout: float):
            return next(docs, None)

        return await self.run_once(raw_uid, next_doc, f"to close it: {reason}")

    def close_run_now(self, raw_uid: str, reason: str) -> None:
        """Close a run the live callback still has open, so that its next delivery (maybe to
        this worker) starts from a clean state; its derived run ends ``"fail"`` (unless the
        guard abandoned it) and is replaced when the run is redone. Blocks until the stop
        document is through the guard."""
        state = self.live.runs.get(raw_uid)
        if state is None or state.finished.is_set():
            return
        try:
            self._feed([("stop", _abandoned_stop(raw_uid, "fail", reason))])
            state = self.live.wait(raw_uid, 60.0)
            outcome = self.guard.outcomes.get(state.derived_uid)
            if outcome is not None:
                outcome.done.wait(30.0)
        except Exception as exc:
            logger.warning("run %s: could not close it on this worker: %s", raw_uid, exc)

    def _feed(self, docs) -> None:
        """To the live callback; may wait while its queue is full (call it in a thread)."""
        for name, doc in docs:
            self.live(name, doc)
            if name in ("event", "event_page"):
                self.progress.window_frames += 1

    async def _afeed(self, docs) -> None:
        """:meth:`_feed` in a thread: a full queue must not stall the event loop (bus
        heartbeats, the health line)."""
        if docs:
            await asyncio.to_thread(self._feed, docs)

    def _pump_into_live(self, adapter, force: bool) -> None:
        """Frames that are there, in blocks, each fed before the next is read (in a thread)."""
        while True:
            docs = adapter.pump(force, limit=self._block)
            if not docs:
                return
            self._feed(docs)

    def _finish_into_live(self, adapter) -> None:
        """At the stop document: the last frames, in blocks (in a thread)."""
        for docs in adapter.finish_blocks(limit=self._block):
            self._feed(docs)

    async def _report(self, waiting: Callable[[], Awaitable[int]]) -> None:
        """Health: throughput and lag every ``report_every_s`` seconds; ``waiting`` says how
        many runs (or documents) wait on the bus, -1 when it cannot tell now."""
        o = self.options
        while True:
            await asyncio.sleep(o.report_every_s)
            p = self.progress
            now = time.monotonic()
            rate = p.window_frames / max(now - p.window_start, 1e-9)
            p.window_start, p.window_frames = now, 0
            lag = (time.time() - p.last_doc_time) if p.current and p.last_doc_time else 0.0
            try:
                n_waiting = await waiting()
            except Exception:
                n_waiting = -1  # bus away; the reconnect is logged separately
            state = self.live.runs.get(p.current) if p.current else None
            logger.info("%s: %s, %.1f events/s, document lag %.1f s, %s %s waiting, "
                        "%d runs done", o.name,
                        f"run {p.current[:8]} at {state.frames_done} frames" if state
                        else "idle", rate, lag, n_waiting if n_waiting >= 0 else "?",
                        self.waiting_unit, p.runs_done)

    #: What :meth:`_report`'s ``waiting`` counts.
    waiting_unit = "runs"


class Worker(RunWorker):
    """Serves one beamline's NATS JetStream run work queue (see the module docstring).

    A bus that goes away (restarts, blips, comes back without its streams) never ends
    :meth:`serve`: fetches, subscriptions and acknowledgements are retried, and the streams
    and the consumer are made again when the bus lost them. A message on the work queue that
    is not a run announcement is logged and terminated (never redelivered). A run the bus gave
    up redelivering (its ``max_deliver`` workers all stopped before finishing it) gets a
    derived run that ends ``"fail"`` with the reason (:meth:`_give_up`).

    Examples
    --------
    >>> worker = Worker(WorkerOptions(bus="nats://127.0.0.1:4222",
    ...                               tiled="http://127.0.0.1:8000/api/v1"))  # doctest: +SKIP
    >>> asyncio.run(worker.serve())                                          # doctest: +SKIP
    """

    #: Fetch errors in a row after which the streams and the consumer are made again (the
    #: bus may have come back with an empty store).
    REBIND_AFTER = 3
    #: How long a finished run's acknowledgement is retried while the bus is away; past it the
    #: run may be delivered again, and its complete derived run is then kept.
    ACK_RETRY_S = 120.0

    def __init__(self, options: WorkerOptions) -> None:
        super().__init__(options)
        self._sub = None
        self._rebind = False
        #: The shared consumer's ack deadline (it is the first worker's, not this one's).
        self.ack_wait_s = float(options.ack_wait_s)
        self._max_deliver: int | None = None
        #: (stream sequence, deliveries) of announcements the bus gave up redelivering.
        self._given_up: asyncio.Queue[tuple[int, int]] | None = None

    def probe_bus(self) -> None:
        """Raise :class:`BusUnavailableError` unless one of the bus's servers answers now."""
        errors = []
        for url in (u.strip() for u in self.options.bus.split(",")):
            if not url:
                continue
            try:
                probe_bus(url, timeout=3.0)
                return
            except BusUnavailableError as exc:  # nats.connect would try the next one too
                errors.append(str(exc))
        raise BusUnavailableError("; ".join(errors) or f"no server in --bus {self.options.bus!r}")

    async def _connect_bus(self):
        import nats

        async def on_disconnect():
            if self._stop.is_set():
                return
            logger.warning("%s: lost the bus at %s; reconnecting", self.options.name,
                           self.options.bus)

        async def on_reconnect():
            logger.info("%s: bus reconnected", self.options.name)
            self._rebind = True  # a new server may lack the streams; cheap to check

        return await nats.connect(self.options.bus.split(","), max_reconnect_attempts=-1,
                                  reconnect_time_wait=0.5,
                                  error_cb=BusErrorLog(logger, self.options.name).handle,
                                  disconnected_cb=on_disconnect, reconnected_cb=on_reconnect,
                                  **self.options.connect_options)

    async def _bind(self, js):
        """The streams and the shared consumer (made if missing); reads the consumer's
        ack deadline, on which the heartbeats are paced."""
        o = self.options
        await ensure_streams(js, o.beamline)
        sub = await ensure_workers_consumer(
            js, o.beamline, ack_wait_s=o.ack_wait_s,
            **({"max_deliver": o.max_attempts} if o.max_attempts else {}))
        old, self._sub = self._sub, sub
        if old is not None:
            with contextlib.suppress(Exception):
                await old.unsubscribe()
        try:
            config = (await sub.consumer_info()).config
        except Exception as exc:  # bus away right now: keep what is known
            logger.debug("consumer info: %s", exc)
            return sub
        actual = config.ack_wait
        if actual and abs(actual - o.ack_wait_s) > 1e-3:
            logger.warning("%s: the work queue's consumer has an ack deadline of %.1f s (made "
                           "by the first worker), not this worker's %.1f s; heartbeats are "
                           "paced on %.1f s", o.name, actual, o.ack_wait_s,
                           min(actual, o.ack_wait_s))
        self.ack_wait_s = min(actual, o.ack_wait_s) if actual else o.ack_wait_s
        self._max_deliver = config.max_deliver if (config.max_deliver or 0) > 0 else None
        if o.max_attempts and self._max_deliver != o.max_attempts:
            logger.warning("%s: the work queue's consumer gives a run up after %s deliveries "
                           "(made by the first worker), not this worker's --max-attempts %d",
                           o.name, self._max_deliver or "unlimited", o.max_attempts)
        return sub

    async def serve(self, max_runs: int | None = None) -> int:
        if self.client is None:
            self.check_services()
        if self.live is None:
            self._build_live()
        nc = await self._connect_bus()
        js = nc.jetstream()
        o = self.options
        await self._bind(js)
        self._rebind = False
        await self._listen_for_given_up(nc)
        self._ready_line()

        async def waiting() -> int:
            return (await self._sub.consumer_info()).num_pending

        reporter = asyncio.ensure_future(self._report(waiting))
        backoff, errors = 0.5, 0
        try:
            while not self._stop.is_set():
                if max_runs is not None and self.progress.runs_done >= max_runs:
                    break
                # Tiled first: a fetched announcement is held without heartbeats until
                # _take, and must not wait there (it would go to another worker meanwhile).
                if not await self._wait_for_tiled(max_age_s=5.0):
                    break
                if self._rebind or errors >= self.REBIND_AFTER:
                    try:
                        await self._bind(js)
                        self._rebind, errors = False, 0
                    except Exception as exc:
                        logger.debug("streams and consumer not made yet: %s", exc)
                for _ in range(self._given_up.qsize()):  # between runs: one at a time
                    seq, deliveries, tries = self._given_up.get_nowait()
                    closed = await self._give_up(js, seq, deliveries)
                    if not closed and tries + 1 < CLOSE_TRIES:
                        self._given_up.put_nowait((seq, deliveries, tries + 1))  # next round
                try:
                    msgs = await self._sub.fetch(1, timeout=1.0)
                except asyncio.TimeoutError:
                    continue
                except Exception as exc:  # disconnected: nats-py reconnects, we wait for it
                    errors += 1
                    logger.warning("%s: cannot fetch from the bus (%s); retrying in %.1f s",
                                   o.name, exc, backoff)
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, 10.0)
                    continue
                backoff, errors = 0.5, 0
                for msg in msgs:
                    try:
                        await self._take(js, msg)
                    except Exception:  # one run's trouble never ends the worker
                        logger.exception("%s: unexpected error while serving a run", o.name)
        finally:
            reporter.cancel()
            with contextlib.suppress(Exception):
                await nc.close()
        return self.progress.runs_done

    async def _heartbeat(self, msg) -> None:
        # Paced on the shared consumer's deadline (read in _bind), not only on this worker's.
        interval = max(0.2, self.ack_wait_s / 3)
        while True:
            await asyncio.sleep(interval)
            try:
                await msg.in_progress()
            except Exception as exc:  # bus away: the ack deadline may pass; then it is redone
                logger.debug("in-progress heartbeat failed: %s", exc)

    async def _run_documents(self, js, raw_uid: str):
        """An ordered subscription to one run's documents on the bus, from its first one."""
        from nats.js.api import DeliverPolicy

        o = self.options
        return await js.subscribe(run_filter(o.beamline, raw_uid), stream=docs_stream(o.beamline),
                                  ordered_consumer=True, deliver_policy=DeliverPolicy.ALL)

    async def _take(self, js, msg) -> None:
        o = self.options
        try:
            _, announcement = decode(msg.data)
            raw_uid = announcement["uid"]
            if not isinstance(raw_uid, str) or not raw_uid:
                raise ValueError(f"uid {raw_uid!r}")
        except Exception as exc:
            # Redelivered, it would fail every worker in turn: terminate it.
            logger.error("%s: a message on the work queue is not a run announcement (%s: %s); "
                         "dropped: %r", o.name, type(exc).__name__, exc, msg.data[:200])
            with contextlib.suppress(Exception):
                await msg.term()
            return
        delivery = msg.metadata.num_delivered
        heartbeat = asyncio.ensure_future(self._heartbeat(msg))
        try:
            try:
                sub = await self._run_documents(js, raw_uid)
            except Exception as exc:
                logger.warning("%s: cannot read run %s's documents from the bus (%s); put "
                               "back", o.name, raw_uid, exc)
                self._rebind = True  # the documents' stream may be gone with the bus store
                await self._give_back(js, msg, raw_uid, delivery)
                return

            async def next_doc(timeout: float):
                deadline = time.monotonic() + timeout
                while True:
                    try:
                        m = await sub.next_msg(timeout=max(deadline - time.monotonic(), 0.01))
                    except asyncio.TimeoutError:
                        return None
                    try:
                        return decode(m.data)
                    except Exception as exc:  # stored for good: a retry would fail again
                        logger.warning("%s: run %s: a document on the bus cannot be read "
                                       "(%s); skipped", o.name, raw_uid, exc)

            try:
                done = await self.run_once(raw_uid, next_doc, f"delivery {delivery}")
            finally:
                with contextlib.suppress(Exception):
                    await sub.unsubscribe()
            if done:
                await self._ack(msg, raw_uid)
            else:
                await self._give_back(js, msg, raw_uid, delivery)
        finally:
            heartbeat.cancel()

    async def _listen_for_given_up(self, nc) -> None:
        """Hear the bus give up on an announcement (core NATS: only while subscribed). One
        worker of the queue group gets each advisory; it acts between two runs."""
        import json

        # (announcement sequence, deliveries, failed tries at closing it)
        self._given_up = asyncio.Queue()

        async def on_advisory(msg) -> None:
            try:
                advisory = json.loads(msg.data)
                item = (int(advisory["stream_seq"]), int(advisory.get("deliveries", 0)), 0)
            except (ValueError, KeyError, TypeError) as exc:
                logger.warning("%s: unreadable max-deliveries advisory (%s): %r",
                               self.options.name, exc, msg.data[:200])
                return
            self._given_up.put_nowait(item)

        await nc.subscribe(max_deliveries_subject(self.options.beamline),
                           queue=f"{WORKERS_DURABLE}-given-up", cb=on_advisory)

    async def _give_up(self, js, seq: int, deliveries: int, reason: str | None = None
                       ) -> bool:
        """Close the derived run of the announcement at ``seq``, given up after ``deliveries``:
        its start document and a ``"fail"`` stop with the reason go through the live callback
        and the guard, which replaces the partial run the last worker left. The announcement
        is then deleted from the work queue (it would never be delivered again). True once
        both are done; False (logged) when the run could not be closed."""
        o = self.options
        try:
            stored = await js.get_msg(runs_stream(o.beamline), seq)
            raw_uid = decode(stored.data)[1]["uid"]
        except Exception as exc:
            logger.warning("%s: the bus gave up on announcement %d after %d deliveries, but "
                           "it cannot be read (%s)", o.name, seq, deliveries, exc)
            return False
        reason = reason or (f"given up after {deliveries} deliveries: every worker that took "
                            "this run stopped before finishing it (killed, out of memory?)")
        try:
            sub = await self._run_documents(js, raw_uid)
            try:
                name, start = decode((await sub.next_msg(timeout=10.0)).data)
            finally:
                with contextlib.suppress(Exception):
                    await sub.unsubscribe()
        except Exception as exc:
            logger.error("%s: run %s %s, and its start document cannot be read from the bus "
                         "(%s): its derived run is left as the last worker left it", o.name,
                         raw_uid, reason, exc)
            return False
        if name != "start":
            logger.error("%s: run %s %s, and the bus's first document of it is a %r, not its "
                         "start: its derived run is left as it is", o.name, raw_uid, reason,
                         name)
            return False
        if not await self.close_given_up(raw_uid, start, reason):
            return False
        with contextlib.suppress(Exception):
            await js.delete_msg(runs_stream(o.beamline), seq)
        return True

    async def _ack(self, msg, raw_uid: str) -> None:
        """Acknowledge a finished run, retrying while the bus is away (heartbeats go on)."""
        delay, deadline = 0.2, time.monotonic() + self.ACK_RETRY_S
        while True:
            try:
                await msg.ack_sync(timeout=2.0)
                return
            except Exception as exc:
                if self._stop.is_set() or time.monotonic() > deadline:
                    logger.warning("%s: run %s is done but could not be acknowledged (%s); "
                                   "if it is delivered again its derived run is kept",
                                   self.options.name, raw_uid, exc)
                    return
                logger.info("%s: acknowledging run %s failed (%s); retrying in %.1f s",
                            self.options.name, raw_uid, exc, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)

    async def _give_back(self, js, msg, raw_uid: str, delivery: int) -> None:
        """Back to the queue, after a pause: another worker (or this one) redoes it whole.
        On its last delivery the run is given up, loudly: its derived run is closed
        ``"fail"`` (a Tiled write that failed may have left it without a stop) and the
        announcement deleted, or, if that fails too, terminated."""
        if self._max_deliver is not None and delivery >= self._max_deliver:
            logger.error("%s: run %s failed on its last delivery (%d of %d); given up",
                         self.options.name, raw_uid, delivery, self._max_deliver)
            reason = (f"given up after {delivery} deliveries: it failed on each (the "
                      "workers' logs say why)")
            if not await self._give_up(js, msg.metadata.sequence.stream, delivery, reason):
                with contextlib.suppress(Exception):
                    await msg.term()
            return
        with contextlib.suppress(Exception):
            await msg.nak(delay=self._retry_delay(delivery))


def _probe_tiled(uri: str, timeout: float = 3.0) -> None:
    """Any HTTP answer will do; the Tiled client itself retries a dead server for ~20 s."""
    import httpx

    try:
        httpx.get(uri, timeout=timeout, trust_env=False)
    except httpx.HTTPError as exc:
        raise TiledUnavailableError(f"cannot reach Tiled at {uri}: {exc}") from exc


def _abandoned_stop(raw_uid: str, exit_status: str, reason: str) -> dict:
    """A stop document for the live callback only (the raw run on the bus has none)."""
    return {"uid": str(uuid.uuid4()), "time": time.time(), "run_start": raw_uid,
            "exit_status": exit_status, "reason": reason, "num_events": {}}


def make_worker(options: WorkerOptions) -> RunWorker:
    """The worker for ``options.bus``'s scheme: ``nats://`` (default) or ``kafka://``."""
    scheme = options.bus.split("://", 1)[0].lower() if "://" in options.bus else "nats"
    if scheme == "kafka":
        from ._kafka import KafkaWorker

        return KafkaWorker(options)
    if scheme in ("nats", "tls"):
        return Worker(options)
    raise ValueError(f"--bus: nats://HOST:PORT or kafka://BROKERS expected, got {options.bus!r}")


def run_worker(options: WorkerOptions, max_runs: int | None = None) -> int:
    """Check the services, then serve until SIGINT/SIGTERM (or ``max_runs``).

    The bus URL's scheme chooses the transport: ``nats://`` (:class:`Worker`) or ``kafka://``
    (:class:`~._kafka.KafkaWorker`). Returns the number of runs reconstructed.

    Raises
    ------
    BusUnavailableError, TiledUnavailableError
        At start, when either does not answer (the CLI turns them into exit code 2).
    """
    worker = make_worker(options)
    worker.check_services()
    worker._build_live()

    async def main() -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError):
                loop.add_signal_handler(sig, worker.stop)
        return await worker.serve(max_runs=max_runs)

    try:
        return asyncio.run(main())
    finally:
        worker.live.close()
