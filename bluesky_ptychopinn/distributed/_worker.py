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
from ._frames import PathMap, TiledFrames, parse_path_map
from ._guard import DerivedRunGuard
from ._server import probe_bus
from ._streams import ensure_streams, ensure_workers_consumer
from ._subjects import docs_stream, run_filter

__all__ = ["RunLost", "RunWorker", "WorkerOptions", "Worker", "make_worker", "run_worker"]

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
            refine="rpie" if o.refine else None, refine_budget_s=o.refine_budget_s,
            refine_positions=o.refine_positions,
            # Files are read only inside the data roots: the local side of every path map.
            data_roots=[local for _, local in self.path_map])
        # Small write batches: a viewer of the derived run sees snapshots as they come.
        self.guard = DerivedRunGuard(self.client, TiledWriter(self.client, batch_size=1))
        self.live.subscribe(self.guard)

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

    async def _wait_for_tiled(self) -> None:
        """Before taking a run: Tiled must answer (retry with backoff while it does not)."""
        delay = 0.5
        while True:
            try:
                await asyncio.to_thread(self.client.refresh)
                return
            except Exception as exc:
                logger.warning("%s: Tiled at %s does not answer (%s); retrying in %.1f s",
                               self.options.name, self.options.tiled, exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 30.0)

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
                    self._feed(await asyncio.to_thread(adapter.pump, True))
                if time.monotonic() - last > o.run_idle_timeout_s:
                    logger.warning("run %s: no document for %.0f s; closing it", raw_uid,
                                   o.run_idle_timeout_s)
                    self._feed(await asyncio.to_thread(adapter.finish))
                    self._feed([("stop", _abandoned_stop(
                        raw_uid, "fail",
                        f"no document on the bus for {o.run_idle_timeout_s:.0f} s"))])
                    break
                continue
            last = time.monotonic()
            name, doc = item
            self.progress.last_doc_time = doc.get("time")
            if name == "stop":
                self._feed(await asyncio.to_thread(adapter.finish))
                self._feed(adapter(name, doc))
                break
            self._feed(adapter(name, doc))
            if adapter.pending():
                self._feed(await asyncio.to_thread(adapter.pump))
            if derived is None and name == "start":
                if raw_uid not in live.runs:  # no ptycho metadata: nothing to reconstruct
                    logger.info("run %s is not a ptychography run; skipped", raw_uid)
                    return None, None
                state = live.latest(raw_uid)
                derived = guard.outcomes.get(state.derived_uid) if state else None
                if derived is not None and derived.status == "kept":
                    # Finished before (its ack or commit was lost): nothing to redo.
                    self._feed([("stop", _abandoned_stop(raw_uid, "success",
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

    def close_run_now(self, raw_uid: str, reason: str) -> None:
        """Close a run the live callback still has open, so that its next delivery (maybe to
        this worker) starts from a clean state; its derived run ends ``"fail"`` (unless the
        guard abandoned it) and is replaced when the run is redone. Blocks until the stop
        document is through the guard."""
        state = self.live.latest(raw_uid)
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
        for name, doc in docs:
            self.live(name, doc)
            if name in ("event", "event_page"):
                self.progress.window_frames += 1

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
            state = self.live.latest(p.current) if p.current else None
            logger.info("%s: %s, %.1f events/s, document lag %.1f s, %s %s waiting, "
                        "%d runs done", o.name,
                        f"run {p.current[:8]} at {state.frames_done} frames" if state
                        else "idle", rate, lag, n_waiting if n_waiting >= 0 else "?",
                        self.waiting_unit, p.runs_done)

    #: What :meth:`_report`'s ``waiting`` counts.
    waiting_unit = "runs"


class Worker(RunWorker):
    """Serves one beamline's NATS JetStream run work queue (see the module docstring).

    Examples
    --------
    >>> worker = Worker(WorkerOptions(bus="nats://127.0.0.1:4222",
    ...                               tiled="http://127.0.0.1:8000/api/v1"))  # doctest: +SKIP
    >>> asyncio.run(worker.serve())                                          # doctest: +SKIP
    """

    def probe_bus(self) -> None:
        probe_bus(self.options.bus.split(",")[0], timeout=3.0)

    async def _connect_bus(self):
        import nats

        async def on_error(exc):
            logger.debug("bus: %s", exc)

        async def on_disconnect():
            if self._stop.is_set():
                return
            logger.warning("%s: lost the bus at %s; reconnecting", self.options.name,
                           self.options.bus)

        async def on_reconnect():
            logger.info("%s: bus reconnected", self.options.name)

        return await nats.connect(self.options.bus.split(","), max_reconnect_attempts=-1,
                                  reconnect_time_wait=0.5, error_cb=on_error,
                                  disconnected_cb=on_disconnect, reconnected_cb=on_reconnect,
                                  **self.options.connect_options)

    async def serve(self, max_runs: int | None = None) -> int:
        if self.client is None:
            self.check_services()
        if self.live is None:
            self._build_live()
        nc = await self._connect_bus()
        js = nc.jetstream()
        o = self.options
        await ensure_streams(js, o.beamline)
        sub = await ensure_workers_consumer(js, o.beamline, ack_wait_s=o.ack_wait_s)
        self._ready_line()

        async def waiting() -> int:
            return (await sub.consumer_info()).num_pending

        reporter = asyncio.ensure_future(self._report(waiting))
        backoff = 0.5
        try:
            while not self._stop.is_set():
                if max_runs is not None and self.progress.runs_done >= max_runs:
                    break
                try:
                    msgs = await sub.fetch(1, timeout=1.0)
                except asyncio.TimeoutError:
                    continue
                except Exception as exc:  # disconnected: nats-py reconnects, we wait for it
                    logger.warning("%s: cannot fetch from the bus (%s); retrying in %.1f s",
                                   o.name, exc, backoff)
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, 10.0)
                    continue
                backoff = 0.5
                for msg in msgs:
                    await self._wait_for_tiled()
                    await self._take(js, msg)
        finally:
            reporter.cancel()
            with contextlib.suppress(Exception):
                await nc.close()
        return self.progress.runs_done

    async def _heartbeat(self, msg) -> None:
        interval = max(0.2, self.options.ack_wait_s / 3)
        while True:
            await asyncio.sleep(interval)
            try:
                await msg.in_progress()
            except Exception as exc:  # bus away: the ack deadline may pass; then it is redone
                logger.debug("in-progress heartbeat failed: %s", exc)

    async def _take(self, js, msg) -> None:
        from nats.js.api import DeliverPolicy

        _, announcement = decode(msg.data)
        raw_uid = announcement["uid"]
        delivery = msg.metadata.num_delivered
        o = self.options
        sub = await js.subscribe(run_filter(o.beamline, raw_uid), stream=docs_stream(o.beamline),
                                 ordered_consumer=True, deliver_policy=DeliverPolicy.ALL)

        async def next_doc(timeout: float):
            try:
                return decode((await sub.next_msg(timeout=timeout)).data)
            except asyncio.TimeoutError:
                return None

        heartbeat = asyncio.ensure_future(self._heartbeat(msg))
        try:
            done = await self.run_once(raw_uid, next_doc, f"delivery {delivery}")
        finally:
            heartbeat.cancel()
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        if done:
            await msg.ack_sync()
        else:
            # Back to the queue, after a pause: another worker (or this one) redoes it whole.
            with contextlib.suppress(Exception):
                await msg.nak(delay=min(5.0 * delivery, 60.0))


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
