"""``isolation="process"``: :func:`~._serve.serve` in a child process.

RunEngine process                                   reconstruction process
-----------------                                   ----------------------
``LiveReconstruction.__call__`` (RunRouter)  --->   :func:`~._serve.serve`: one
  puts ``("doc", raw uid, name, doc)`` on a queue   :class:`~._reconstruction.RunReconstruction`
receiver thread (:func:`~._transports.pump`)        per run: pairing, HDF5 reads, network, refiner
  <--- pipe ---  messages and log records
  :class:`~._derived.DerivedRun` composes the derived documents; a dead child -> ``fail``

The child is started from a fork server that has imported torch once (about 1.5 s for the
first child of a session, tens of milliseconds after that); ``spawn`` where there is no fork
server. Nothing here raises into the RunEngine: a dead child costs the derived runs it held
(failed on this side) and the next run starts a new child.
"""

from __future__ import annotations

import logging
import logging.handlers
import multiprocessing as mp
import os
import queue
import sys
import threading
from dataclasses import dataclass, field

from ..errors import PtychoError
from ..metadata import PtychoMetadata
from ._metered_queue import MeteredQueue
from ._serve import serve
from ._settings import WorkerSettings
from ._transports import _ENDED, Deliver, Lost, pump

__all__ = ["ProcessTransport"]

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
    inbox: MeteredQueue  # over a multiprocessing Queue: parent -> child
    conn: object  # read end of a Pipe: child -> parent
    runs: set = field(default_factory=set)  # raw uids it holds
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

    def put_nowait(self, item) -> None:
        if not self.dead:
            self.inbox.put_nowait(item)


class ProcessTransport:
    """Runs :func:`~._serve.serve` in a child process (see the module docstring).

    Parameters
    ----------
    model_spec : str or torch.nn.Module
        A model path the child loads, or a picklable network.
    model_info, settings
        What :func:`~._serve.serve` needs.
    deliver, tick, lost
        The RunEngine side's callbacks (:mod:`._transports`).
    max_queue : int
        Raw documents buffered for the child.
    max_queue_bytes : int
        Bytes of them (inline frames) buffered at most, counted until the child takes them.
    torch_threads : int
        Intra-op threads in the child.
    nice : int
        Niceness added to the child.
    cpus : tuple of int, optional
        Cores the child may run on (``None``: all the parent may use).
    start_timeout_s : float
        How long to wait for the first child to load the model.

    Raises
    ------
    PtychoError
        The child could not start (e.g. an in-memory model it cannot unpickle).
    """

    def __init__(self, model_spec, model_info: dict, settings: WorkerSettings, *,
                 deliver: Deliver, tick, lost: Lost, max_queue: int, max_queue_bytes: int,
                 torch_threads: int, nice: int, cpus: tuple[int, ...] | None = None,
                 start_timeout_s: float = 120.0) -> None:
        self.model_spec, self.model_info, self.settings = model_spec, model_info, settings
        self._deliver, self._tick, self._lost = deliver, tick, lost
        self.max_queue, self.max_queue_bytes = max_queue, max_queue_bytes
        self.torch_threads, self.nice = torch_threads, nice
        self.cpus = cpus
        self._lock = threading.Lock()
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
        inner = ctx.Queue(maxsize=self.max_queue)
        inner.cancel_join_thread()  # never hang interpreter exit on a dead child's pipe
        # The bytes queued are counted in shared memory, without a shared lock: the total put
        # written here, the total taken by the child.
        inbox = MeteredQueue(inner, self.max_queue_bytes,
                             (ctx.RawValue("q", 0), ctx.RawValue("q", 0)))
        reader, writer = ctx.Pipe(duplex=False)
        level = logging.getLogger("bluesky_ptychopinn").getEffectiveLevel()
        process = ctx.Process(
            target=_child_main, name="ptychopinn-reconstruction", daemon=True,
            args=(self.model_spec, self.model_info, self.settings, self.torch_threads,
                  self.nice, level, os.getpid(), inbox, writer, self.cpus))
        process.start()
        writer.close()  # the child holds the only write end: its death is EOF here
        child = _Child(process, inbox, reader)
        child.thread = threading.Thread(
            target=pump, daemon=True, name=f"ptychopinn-receiver-{process.pid}",
            args=(lambda timeout: self._receive(child, timeout), self._deliver, self._tick,
                  child.runs))
        child.thread.start()
        self._child = child

    # -- RunEngine thread ----------------------------------------------------------------------
    def _current(self) -> _Child | None:
        """The live child (a new one if the last has died); ``None`` once closed. The caller
        holds ``self._lock``."""
        if self.closed:
            return None
        if self._child is None or self._child.dead:
            logger.warning("starting a new reconstruction process")
            self._start_child()
        return self._child

    def open(self, raw_uid: str, md: PtychoMetadata, model_path: str | None = None,
             model_info: dict | None = None) -> None:
        # The run joins the child's runs under the lock that _ended takes to mark the child
        # dead and take its runs: either the child is still alive here and _ended will fail
        # this run, or it is already dead and a new child is started. Without it, a child that
        # died between the check and the add kept the uid, never failed, and its derived run
        # was never stopped.
        with self._lock:
            child = self._current()
            if child is not None:
                child.runs.add(raw_uid)
        if child is None:
            self._lost([raw_uid], "the live reconstruction was closed")
            return
        # False means the child is gone; the uid is in the runs that _ended fails (it has run,
        # or runs when the receiver sees the end of the pipe), so there is nothing to do here.
        child.put(("open", raw_uid, md, model_path, model_info))

    def put(self, item) -> None:
        child = self._child
        if child is not None and item[1] in child.runs:
            child.put(item)

    def put_nowait(self, item) -> None:
        child = self._child
        if child is not None and item[1] in child.runs:
            child.put_nowait(item)

    # -- receiver thread -----------------------------------------------------------------------
    def _receive(self, child: _Child, timeout: float) -> tuple | None:
        """One message for :func:`~._transports.pump`; the log records, readiness and fatal
        errors of the child are handled here."""
        try:
            if not child.conn.poll(timeout):
                if child.process.is_alive() or child.conn.poll(0):
                    return None
                return self._ended(child)
            msg = child.conn.recv()
        except (EOFError, OSError):
            return self._ended(child)
        kind = msg[0]
        if kind == "log":
            record = msg[1]
            target = logging.getLogger(record.name)
            if target.isEnabledFor(record.levelno):
                target.handle(record)
            return None
        if kind == "fatal":
            child.fatal = msg[1]
            return None
        if kind == "ready":
            child.ready.set()
            return None
        return msg

    def _ended(self, child: _Child) -> tuple:
        with self._lock:  # against open() adding a run to a child that is dying (see there)
            child.dead = True
            runs = list(child.runs)
            child.runs.clear()
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
        self._lost(runs, reason)
        child.conn.close()
        child.inbox.inner.close()
        return (_ENDED, reason)

    # -- lifetime ------------------------------------------------------------------------------
    def close(self, timeout: float = 10.0) -> None:
        """Ask the child to exit after the documents already queued; wait, then terminate."""
        with self._lock:
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


def _child_main(model_spec, model_info: dict, settings: WorkerSettings, torch_threads: int,
                nice: int, log_level: int, parent_pid: int, inbox, conn,
                cpus: tuple[int, ...] | None = None) -> None:
    """Entry point of the reconstruction process."""
    if cpus:  # first, so that every thread started below (torch's pools) inherits it
        try:  # (the cores this process may use can have changed since the parent looked)
            os.sched_setaffinity(0, (set(cpus) & os.sched_getaffinity(0))
                                 or os.sched_getaffinity(0))
        except OSError:  # a container that forbids it: run unpinned
            pass
    send_lock = threading.Lock()

    def send(msg) -> None:
        with send_lock:  # log records come from the refiner's thread too
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
    serve(inbox, lambda kind, uid, payload: send((kind, uid, payload)), model, model_info,
          settings, alive=lambda: _parent_alive(parent_pid))
