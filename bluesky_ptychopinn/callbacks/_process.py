"""``isolation="process"``: the live reconstruction in a child process.

RunEngine process                                   reconstruction process
-----------------                                   ----------------------
``LiveReconstruction.__call__`` (RunRouter)  --->   one :class:`~._worker.RunWorker` per run:
  puts ``(raw uid, name, doc)`` on a queue          pairing, HDF5 reads, network, composers
receiver thread  <--- pipe ---                      derived documents, state changes, log records
  emits derived documents to the subscribers,
  mirrors :class:`RunState`, fails open runs if the child dies

The child is started from a fork server that has imported torch once (about 1.5 s for the
first child of a session, tens of milliseconds after that); ``spawn`` where there is no fork
server. Nothing here raises into the RunEngine: a dead child costs the derived runs it held
(closed with ``"fail"`` by the parent) and the next run starts a new child.
"""

from __future__ import annotations

import logging
import logging.handlers
import multiprocessing as mp
import os
import queue
import sys
import threading
import time
from dataclasses import dataclass, field

from event_model import compose_run, compose_stop

from ..errors import PtychoError
from ._worker import (
    MIRRORED_FIELDS,
    RunState,
    RunWorker,
    WorkerSettings,
    derived_start_metadata,
    offer,
)

__all__ = ["ProcessBackend"]

logger = logging.getLogger(__name__)


def _context():
    if "forkserver" in mp.get_all_start_methods():
        ctx = mp.get_context("forkserver")
        # The fork server imports this module (torch, h5py, event-model) once; every child
        # forked from it starts warm. Ignored if the fork server is already running.
        ctx.set_forkserver_preload([__name__])
        return ctx
    return mp.get_context("spawn")


@dataclass
class _Child:
    """One incarnation of the reconstruction process, as the parent sees it."""

    process: mp.process.BaseProcess
    inbox: object  # multiprocessing Queue: parent -> child
    conn: object  # read end of a Pipe: child -> parent
    dead: bool = False
    closing: bool = False
    fatal: str | None = None
    reason: str = ""
    thread: threading.Thread | None = None
    ready: threading.Event = field(default_factory=threading.Event)

    def put(self, item) -> bool:
        """Blocking put that gives up when the child is gone (never hangs the RunEngine)."""
        while not self.dead:
            try:
                self.inbox.put(item, timeout=0.5)
                return True
            except queue.Full:
                if not self.process.is_alive():
                    return False
        return False


@dataclass
class _OpenRun:
    """Parent-side bookkeeping of one run, enough to close its derived run if the child dies."""

    state: RunState
    start: dict
    md: dict
    child: _Child
    derived_start: dict | None = None
    streams: dict = field(default_factory=dict)  # descriptor uid -> stream name
    counters: dict = field(default_factory=dict)  # stream name -> events + 1
    stopped: bool = False
    closed: bool = False


class ProcessBackend:
    """Runs :class:`~._worker.RunWorker` in a child process for a :class:`LiveReconstruction`.

    Parameters
    ----------
    owner : LiveReconstruction
        Supplies the model, settings, back-pressure policy, ``_emit`` and ``runs``.
    torch_threads : int
        Intra-op threads in the child.
    nice : int
        Niceness added to the child.
    start_timeout_s : float
        How long to wait for the first child to load the model.

    Raises
    ------
    PtychoError
        The child could not start (e.g. an in-memory model it cannot unpickle).
    """

    def __init__(self, owner, *, torch_threads: int, nice: int,
                 start_timeout_s: float = 120.0) -> None:
        self.owner = owner
        self.torch_threads, self.nice = torch_threads, nice
        self.model_spec = owner.model_path if owner.model_path is not None else owner.model
        self._lock = threading.Lock()
        self._open: dict[str, _OpenRun] = {}
        self._child: _Child | None = None
        self.closed = False
        self._start_child()
        # Wait for the model to be loaded, so that the first scan does not share the CPU with
        # the child's start (torch import) and a child that cannot start is an error here.
        child = self._child
        if not child.ready.wait(start_timeout_s):
            logger.warning("reconstruction process not ready after %.0f s", start_timeout_s)
        elif child.dead:
            raise PtychoError(child.reason)

    @property
    def pid(self) -> int | None:
        return self._child.process.pid if self._child is not None else None

    def _start_child(self) -> None:
        ctx = _context()
        inbox = ctx.Queue(maxsize=self.owner.max_queue)
        inbox.cancel_join_thread()  # never hang interpreter exit on a dead child's pipe
        reader, writer = ctx.Pipe(duplex=False)
        level = logging.getLogger("bluesky_ptychopinn").getEffectiveLevel()
        process = ctx.Process(
            target=_child_main, name="ptychopinn-reconstruction", daemon=True,
            args=(self.model_spec, self.owner.model_info, self.owner.settings,
                  self.torch_threads, self.nice, level, os.getpid(), inbox, writer))
        process.start()
        writer.close()  # the child holds the only write end: its death is EOF here
        child = _Child(process, inbox, reader)
        child.thread = threading.Thread(target=self._receive, args=(child,), daemon=True,
                                        name=f"ptychopinn-receiver-{process.pid}")
        child.thread.start()
        self._child = child

    # -- RunEngine thread ----------------------------------------------------------------------
    def open_run(self, start: dict, md: dict, state: RunState):
        """Register a raw run with the child; returns the run's ``(name, doc)`` callback."""
        if self.closed:
            logger.warning("live reconstruction is closed: run %s not reconstructed",
                           state.raw_uid)
            state.failed = "the live reconstruction was closed"
            state.finished.set()
            return lambda name, doc: None
        with self._lock:
            if self._child is None or self._child.dead:
                logger.warning("starting a new reconstruction process")
                self._start_child()
            child = self._child
        run = _OpenRun(state, start, md, child)
        self._open[state.raw_uid] = run
        child.put(("open", state.raw_uid, start, md))

        def enqueue(name: str, doc: dict) -> None:
            self._enqueue(run, name, doc)

        return enqueue

    def _enqueue(self, run: _OpenRun, name: str, doc: dict) -> None:
        if run.closed or run.child.dead:
            return  # its derived run is already closed: nothing more to do for it
        state = run.state
        item = ("doc", state.raw_uid, name, doc, state.frames_skipped)
        offer(run.child.put, run.child.inbox.put_nowait, item, name, doc, state,
              self.owner.backpressure)

    # -- receiver thread -----------------------------------------------------------------------
    def _receive(self, child: _Child) -> None:
        while True:
            try:
                if not child.conn.poll(1.0):
                    if child.process.is_alive():
                        continue
                    if not child.conn.poll(0):
                        break
                msg = child.conn.recv()
            except (EOFError, OSError):
                break
            try:
                self._dispatch(child, msg)
            except Exception:
                logger.exception("live reconstruction: error handling %r from the child", msg[0])
        child.dead = True
        child.process.join(5)
        code = child.process.exitcode
        if child.closing:
            reason = "the reconstruction process was closed before the run finished"
        elif child.fatal:
            reason = child.fatal
        elif code is not None and code < 0:
            reason = f"the reconstruction process {child.process.pid} was killed by signal {-code}"
        else:
            reason = f"the reconstruction process {child.process.pid} exited (code {code})"
            if not child.ready.is_set():
                reason += _bootstrap_hint()
        child.reason = reason
        child.ready.set()
        self._fail_open_runs(child, reason)
        child.conn.close()
        child.inbox.close()

    def _dispatch(self, child: _Child, msg: tuple) -> None:
        kind = msg[0]
        if kind == "log":
            record = msg[1]
            target = logging.getLogger(record.name)
            if target.isEnabledFor(record.levelno):
                target.handle(record)
            return
        if kind == "fatal":
            child.fatal = msg[1]
            return
        if kind == "ready":
            child.ready.set()
            return
        run = self._open.get(msg[1])
        if run is None:
            return
        if kind == "doc":
            _, _, name, doc = msg
            self._track(run, name, doc)
            self.owner._emit(name, doc)
        elif kind == "state":
            with run.state.lock:
                for key, value in msg[2].items():
                    setattr(run.state, key, value)
        elif kind == "finished":
            run.closed = True
            self._open.pop(run.state.raw_uid, None)
            self.owner._after_emitted(run.state.finished.set)

    @staticmethod
    def _track(run: _OpenRun, name: str, doc: dict) -> None:
        if name == "start":
            run.derived_start = doc
        elif name == "descriptor":
            run.streams[doc["uid"]] = doc["name"]
            run.counters[doc["name"]] = 1
        elif name == "event" and doc["descriptor"] in run.streams:
            run.counters[run.streams[doc["descriptor"]]] += 1
        elif name == "event_page" and doc["descriptor"] in run.streams:
            run.counters[run.streams[doc["descriptor"]]] += len(doc["seq_num"])
        elif name == "stop":
            run.stopped = True

    def _fail_open_runs(self, child: _Child, reason: str) -> None:
        for run in [r for r in list(self._open.values()) if r.child is child and not r.closed]:
            state = run.state
            logger.error("live reconstruction of run %s failed: %s", state.raw_uid, reason)
            try:
                with state.lock:
                    state.failed = state.failed or reason
                if run.derived_start is None:
                    bundle = compose_run(metadata=derived_start_metadata(
                        run.start, run.md, self.owner.model_info))
                    run.derived_start = bundle.start_doc
                    state.derived_uid = bundle.start_doc["uid"]
                    self.owner._emit("start", bundle.start_doc)
                if not run.stopped:
                    stop = compose_stop(start=run.derived_start, event_counters=run.counters,
                                        poison_pill=[], exit_status="fail", reason=reason)
                    stop["ptychopinn"] = {"frames_done": state.frames_done,
                                          "frames_skipped": state.frames_skipped,
                                          "frames_rejected": state.frames_rejected}
                    self.owner._emit("stop", stop)
            except Exception:
                logger.exception("run %s: could not close the derived run", state.raw_uid)
            finally:
                run.closed = True
                self._open.pop(state.raw_uid, None)
                self.owner._after_emitted(state.finished.set)

    # -- lifetime ------------------------------------------------------------------------------
    def close(self, timeout: float = 10.0) -> None:
        """Ask the child to exit after the documents already queued; wait, then terminate."""
        self.closed = True
        child = self._child
        if child is None or child.dead:
            return
        child.closing = True
        child.put(("shutdown",))
        child.process.join(timeout)
        if child.process.is_alive():
            child.process.terminate()
            child.process.join(5)
        if child.thread is not None:
            child.thread.join(timeout)


def _bootstrap_hint() -> str:
    """Why a child that dies before loading the model most often does, when run from a file.

    The fork server and ``spawn`` start the child by re-importing the main script (as
    ``__mp_main__``); unguarded top-level code that makes a ``LiveReconstruction`` then tries
    to start a process from inside that bootstrap, which multiprocessing refuses.
    """
    main = sys.modules.get("__main__")
    if getattr(main, "__file__", None) is None:  # IPython, python -c, notebooks: not this
        return ""
    return (f" before loading the model. If {os.path.basename(main.__file__)} makes the "
            "LiveReconstruction at module level, move that code under "
            "`if __name__ == \"__main__\":` (the reconstruction process re-imports the main "
            "script), or pass isolation=\"thread\"")


# -- the child process ---------------------------------------------------------------------------
class _LogForwarder(logging.handlers.QueueHandler):
    """Log records of the child go to the parent's loggers (formatted, picklable)."""

    def __init__(self, send) -> None:
        super().__init__(None)
        self.send = send

    def enqueue(self, record: logging.LogRecord) -> None:
        self.send(("log", record))


def _parent_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass
class _ChildRun:
    worker: RunWorker
    next_idle: float = 0.0
    mirrored: dict = field(default_factory=dict)
    snapshot: object = None
    refined: object = None


def _mirror(send, uid: str, run: _ChildRun) -> None:
    """Send the state fields that changed since last time (the snapshot when it is new)."""
    state = run.worker.state
    changed = {}
    for key in MIRRORED_FIELDS:
        value = getattr(state, key)
        if key not in run.mirrored or run.mirrored[key] != value:
            changed[key] = run.mirrored[key] = value
    if state.snapshot is not run.snapshot:
        changed["snapshot"] = run.snapshot = state.snapshot
    if state.refined is not run.refined:
        changed["refined"] = run.refined = state.refined
    if changed:
        send(("state", uid, changed))


def _child_main(model_spec, model_info: dict, settings: WorkerSettings, torch_threads: int,
                nice: int, log_level: int, parent_pid: int, inbox, conn) -> None:
    """Entry point of the reconstruction process."""
    send_lock = threading.Lock()

    def send(msg) -> None:
        with send_lock:
            conn.send(msg)

    package_logger = logging.getLogger("bluesky_ptychopinn")
    package_logger.addHandler(_LogForwarder(send))
    package_logger.setLevel(log_level)
    package_logger.propagate = False
    try:
        import torch

        if nice:
            os.nice(nice)
        torch.set_num_threads(torch_threads)
        if isinstance(model_spec, str):
            from ..models import ModelRegistry

            model, _ = ModelRegistry().load(model_spec, device="cpu")
        else:
            model = model_spec
    except Exception as exc:  # tell the parent why, then die: it fails the open runs
        send(("fatal", f"reconstruction process could not start: {type(exc).__name__}: {exc}"))
        return
    send(("ready", os.getpid()))
    runs: dict[str, _ChildRun] = {}
    flush = settings.flush_after_s
    while True:
        try:
            item = inbox.get(timeout=flush if runs else 2.0)
        except queue.Empty:
            item = None
        if item is None:
            if not _parent_alive(parent_pid):
                return
        elif item[0] == "shutdown":
            return
        else:
            try:
                _child_handle(item, runs, model, model_info, settings, send)
            except Exception:
                logger.exception("reconstruction process: error handling %r", item[:3])
        now = time.monotonic()
        for uid, run in runs.items():
            if now >= run.next_idle:
                run.worker.idle()
                run.next_idle = now + flush
                _mirror(send, uid, run)


def _child_handle(item: tuple, runs: dict, model, model_info: dict, settings: WorkerSettings,
                  send) -> None:
    if item[0] == "open":
        _, uid, start, md = item

        def emit(name: str, doc: dict, uid: str = uid) -> None:
            send(("doc", uid, name, doc))

        runs[uid] = _ChildRun(RunWorker(model, model_info, settings, start, md,
                                        RunState(raw_uid=uid), emit))
        return
    _, uid, name, doc, skipped = item
    run = runs.get(uid)
    if run is None:
        return
    run.worker.state.frames_skipped = skipped
    run.next_idle = time.monotonic() + settings.flush_after_s
    finished = run.worker.handle(name, doc)
    _mirror(send, uid, run)
    if finished:
        send(("finished", uid))
        del runs[uid]
