"""The live reconstruction callback: raw ptychography runs in, derived reconstruction runs out.

Subscribe it to a RunEngine (``RE.subscribe(live)``) and subscribe consumers of the derived run
to it (``live.subscribe(TiledWriter(client))``). On the RunEngine thread it only validates the
start document's ``ptycho`` metadata and queues documents. The reconstruction
(:func:`~._serve.serve`: pairing frames with positions, reading HDF5 frames while the detector
writes them, the network and the refiner) runs in a separate process
(``isolation="process"``, the default: the RunEngine keeps its interpreter and its core to
itself) or in a thread of the RunEngine's process (``isolation="thread"``); its messages come
back to a :class:`~._derived.DerivedRun` per run, the only writer of derived documents.
Nothing it does can abort the scan: every error is logged and recorded in the derived run,
whose stop document then says ``"fail"``. The frame path is drawn in docs/architecture.md.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from bluesky.callbacks.core import make_callback_safe
from event_model import DocumentRouter, RunRouter

from ..errors import InvalidInputError
from ..metadata import InvalidMetadataError, PtychoMetadata
from ..models import DEFAULT_MODEL, ModelRegistry, load_verified_model, verify_model
from ..models._checkpoint import read_model_card
from ._backpressure import RunFeed
from ._derived import DerivedRun, RunState
from ._emitter import DocumentEmitter
from ._metered_queue import DEFAULT_MAX_QUEUE_BYTES
from ._model_choice import AUTO, card_stamp, choose_model
from ._settings import (
    DERIVED_UID_MODES,
    RECONSTRUCTION_PLAN_NAME,
    REFINE_ENGINES,
    WorkerSettings,
)
from ._transports import ThreadTransport

__all__ = ["LiveReconstruction", "RECONSTRUCTION_PLAN_NAME", "RunState"]

logger = logging.getLogger(__name__)

ISOLATION_MODES = ("process", "thread")


class LiveReconstruction:
    """Bluesky callback that reconstructs ptychography scans live and emits derived runs.

    Parameters
    ----------
    model : str, path or torch.nn.Module
        ``"auto"`` (default): per run, the registered model trained on the probe the run
        references (``ptycho.probe``), else the ``"default"`` model; the derived run's start
        document says which and why (``model.chosen``). Or a registry name, a model
        directory, or a loaded network (which must be picklable for ``isolation="process"``).
    batch_size : int
        Frames per network call (smaller = lower latency, larger = higher throughput).
    snapshot_every : int
        Emit a snapshot of the stitched object every this many frames (and at the end).
    device : str, optional
        ``"cuda"`` when available, else CPU.
    image_key, positioner_keys : optional
        Override the start document's ``ptycho`` metadata (for scans that lack it).
    max_queue, max_queue_bytes : int
        Raw documents, and bytes of them (inline frames; default 1 GiB), buffered for the
        reconstruction. When either limit is reached, ``backpressure``
        decides: ``"skip"`` drops event documents, and the Datum / StreamDatum documents of
        frames in files, for reconstruction (each frame counted once in ``frames_skipped``;
        the raw run is untouched), so the RunEngine never waits for a frame; ``"block"``
        makes the RunEngine wait.
    canvas_margin_px : int
        Extra object pixels around the scanned region.
    torch_threads : int, optional
        Intra-op threads of the reconstruction. With ``isolation="process"`` they are set in
        the reconstruction process only (default: all cores but one); with ``"thread"`` they
        are torch's process-wide setting, changed only when given. On a small machine shared
        with the RunEngine and a Tiled server, 1 thread avoids OpenMP oversubscription.
    publish_interval_s : float
        The derived run carries at most one snapshot event and one page of per-batch metrics
        per this many seconds (plus the final ones): a Tiled writer spends a few hundred ms on
        a snapshot of four images, and a fast scan must not leave it ever further behind.
        The in-memory snapshot that feedback plans read (:meth:`latest`) is refreshed every
        ``snapshot_every`` frames regardless.
    flush_after_s : float
        When no document arrives for this long (a pause, a feedback decision), the pending
        partial batch is reconstructed and a snapshot published.
    isolation : {"process", "thread"}
        Where the reconstruction runs. ``"process"``: a child process (started at once, in the
        background; about 1.5 s for the first one, which imports torch, then tens of ms)
        receives the documents through a queue; derived-run documents and the run state come
        back and are emitted from a thread of this process. The RunEngine does not share its
        interpreter lock with the reconstruction (on a small machine they still share the
        cores: docs/performance.md). If the process dies, open derived runs are closed with
        ``"fail"`` and the next run starts a new process. ``"thread"``: no process start, but
        the reconstruction competes with the RunEngine for the GIL.
    nice : int
        ``"process"`` only: niceness added to the reconstruction process, so that the
        RunEngine's process is scheduled first when both want a core (0 to leave it).
    reserve_cores : int
        ``"process"`` only: cores the reconstruction process stays off (it is pinned to the
        others when the machine has more), so that the RunEngine always finds a core free:
        on 2 cores the network and the refinement share one, and the scan runs as if nothing
        else were computing (docs/performance.md). 0: the reconstruction may use every core.
        Linux only (elsewhere the process is not pinned).
    refine : {"rpie", "epie"} or None
        The refinement tier (default ``"rpie"``): iterative ptychography over the frames
        received so far, in its own thread beside the network, with the probe the run
        references (``ptycho.probe``: a probe-library name, a probe model name, a file or an
        inline array; else estimated from the frames and refined). The derived run then also
        carries a ``refined`` stream (object, probe, residuals, epochs) and a ``final`` stream;
        :meth:`latest` says which estimate explains the frames better (``best``). ``None``:
        network only.
    refine_budget_s : float
        Seconds the refinement may go on after the stop document (it stops earlier when a
        pass improves the error by less than ``refine_tol`` or after ``refine_epochs``).
    refine_epochs : float, optional
        Passes over all frames after the stop document, at most.
    refine_tol : float, optional
        Convergence: relative error improvement per pass below which refinement stops.
    refine_duty : float
        Fraction of wall time the refiner computes while the scan runs (it rests in between,
        so the network and the RunEngine keep their share of the cores); 1 after the stop.
    refine_batch_size : int
        Positions per rPIE update.
    refine_positions : bool
        Let the refiner correct each frame's position too (encoder errors, stage jitter of
        tenths of a pixel or more; ``PIEOptions.position_correction``). About a third more
        time per pass; the refined stream reports the RMS move.
    crop : int or "auto"
        Stitching crop of the network's patches (pixels). ``"auto"`` (default): every
        candidate is stitched and the scan itself chooses: agreement with the refined image
        once there is one, else the Fourier residual with the run's probe (docs/stitching.md).
    derived_uid : {"random", "deterministic"}
        The derived run's uid: a fresh one (default), or one computed from the raw run's uid,
        the model's sha256 and these settings, so that reconstructing a run again (a remote
        worker that took over a run) cannot leave two derived runs in a catalog.
    data_roots : list of path-like
        Directories detector files may be read from, besides the defaults (the current
        directory, the system's temporary directory and ``$BLUESKY_PTYCHOPINN_DATA_ROOTS``).
        A StreamResource/Resource outside them, on another host or not a regular file is not
        read; its frames are counted as ``file_refused`` in the derived run's stop document.
    max_canvas_px : int
        Largest side, in object pixels, the reconstruction canvas may grow to; positions
        beyond it (or far outside the scan the start document declares) are rejected as
        outliers, so that one glitched encoder reading cannot allocate without bound.
    read_timeout_s : float
        Seconds a detector file may leave a read unanswered (a hung network mount) before its
        frames are given up as ``file_unreadable``. Reads never hold the reconstruction's
        loop: other runs go on meanwhile, and a run stopped while its file is slow finishes
        when the file answers or this time is up.

    Examples
    --------
    >>> live = LiveReconstruction("default")                     # doctest: +SKIP
    >>> live.subscribe(TiledWriter(client))                      # doctest: +SKIP
    >>> RE.subscribe(live)                                       # doctest: +SKIP
    >>> live.close()         # stops the reconstruction process  # doctest: +SKIP
    """

    def __init__(
        self,
        model="auto",
        *,
        batch_size: int = 64,
        snapshot_every: int = 128,
        device: str | None = None,
        image_key: str | None = None,
        positioner_keys: dict | None = None,
        max_queue: int = 100_000,
        max_queue_bytes: int = DEFAULT_MAX_QUEUE_BYTES,
        backpressure: str = "skip",
        canvas_margin_px: int = 8,
        torch_threads: int | None = None,
        flush_after_s: float = 0.2,
        publish_interval_s: float = 0.5,
        isolation: str = "process",
        nice: int = 5,
        reserve_cores: int = 1,
        refine: str | None = "rpie",
        refine_budget_s: float = 5.0,
        refine_epochs: float | None = None,
        refine_tol: float | None = 1e-3,
        refine_duty: float = 0.5,
        refine_batch_size: int = 16,
        refine_positions: bool = False,
        crop: int | str = "auto",
        derived_uid: str = "random",
        data_roots: tuple | list = (),
        max_canvas_px: int = 8192,
        read_timeout_s: float = 30.0,
    ) -> None:

        if backpressure not in ("skip", "block"):
            raise InvalidInputError(f"backpressure: 'skip' or 'block', got {backpressure!r}")
        if isolation not in ISOLATION_MODES:
            raise InvalidInputError(f"isolation: one of {ISOLATION_MODES}, got {isolation!r}")
        if refine is not None and refine not in REFINE_ENGINES:
            raise InvalidInputError(f"refine: one of {REFINE_ENGINES} or None, got {refine!r}")
        if not 0 < refine_duty <= 1:
            raise InvalidInputError(f"refine_duty: a fraction in (0, 1], got {refine_duty!r}")
        if derived_uid not in DERIVED_UID_MODES:
            raise InvalidInputError(
                f"derived_uid: one of {DERIVED_UID_MODES}, got {derived_uid!r}")
        if not (int(max_queue) >= 1 and int(max_queue_bytes) >= 1):
            raise InvalidInputError(f"max_queue and max_queue_bytes: >= 1, got {max_queue!r} "
                                    f"and {max_queue_bytes!r}")
        if not refine_budget_s >= 0:
            raise InvalidInputError(f"refine_budget_s: >= 0 seconds, got {refine_budget_s!r}")
        self.model_path = None
        self.auto = isinstance(model, str) and model == AUTO
        self._model_infos: dict[tuple, dict] = {}  # (directory, card_stamp) -> description
        if isinstance(model, torch.nn.Module):
            self.model, self.model_info = model, {"name": "in-memory", "sha256": None}
        else:
            name = DEFAULT_MODEL if self.auto else model
            path = ModelRegistry().path(name)
            stamp = card_stamp(path)  # before the load: a later save is seen as a change
            # Refuses weights or a card that differ from their recorded hashes; the identity
            # holds the hashes of the very bytes loaded (sha256: card + weights), so the run
            # reports what was verified, not what the card claims.
            self.model, card, identity = load_verified_model(path, device="cpu")
            self.model_path = str(path)
            self.model_info = _model_info(str(name), path, card, identity)
            self._model_infos[(str(path), stamp)] = self.model_info
        self.settings = WorkerSettings(
            batch_size=int(batch_size), snapshot_every=int(snapshot_every), device=device,
            canvas_margin_px=int(canvas_margin_px), flush_after_s=float(flush_after_s),
            publish_interval_s=float(publish_interval_s), refine=refine,
            refine_budget_s=float(refine_budget_s), refine_epochs=refine_epochs,
            refine_tol=refine_tol, refine_duty=float(refine_duty),
            refine_batch_size=int(refine_batch_size), refine_positions=bool(refine_positions),
            crop=crop, derived_uid=derived_uid,
            data_roots=tuple(str(r) for r in data_roots), max_canvas_px=int(max_canvas_px),
            read_timeout_s=float(read_timeout_s))
        self.image_key = image_key
        self.positioner_keys = positioner_keys
        self.max_queue, self.max_queue_bytes = int(max_queue), int(max_queue_bytes)
        self.backpressure = backpressure
        self.isolation = isolation
        self._subscribers: list[Callable] = []
        self._emitter = DocumentEmitter(self._subscribers)
        self.runs: dict[str, RunState] = {}
        # No filler: the frames are read by this package's own pairing (FramePairer), which
        # takes an event before its Datum; event-model's Filler would raise on such an event
        # in the RunEngine's thread and it would never reach the reconstruction.
        self._router = RunRouter([self._factory], filler_class=_NoFiller)
        self._derived: dict[str, DerivedRun] = {}
        callbacks = {"deliver": self._deliver, "tick": self._tick, "lost": self._lost}
        if isolation == "process":
            from ._process import ProcessTransport

            cpus = _reconstruction_cpus(int(reserve_cores))
            if cpus:  # pinned: every core it has
                threads = torch_threads or len(cpus)
            else:  # unpinned: all cores but one, for the RunEngine
                cores = (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                         else os.cpu_count() or 1)
                threads = torch_threads or max(1, cores - 1)
            self._transport = ProcessTransport(
                self.model_path if self.model_path is not None else self.model,
                self.model_info, self.settings, max_queue=self.max_queue,
                max_queue_bytes=self.max_queue_bytes, torch_threads=int(threads),
                nice=int(nice), cpus=cpus, **callbacks)
        else:
            if torch_threads:
                torch.set_num_threads(int(torch_threads))
            self._transport = ThreadTransport(self.model, self.model_info, self.settings,
                                              max_queue=self.max_queue,
                                              max_queue_bytes=self.max_queue_bytes, **callbacks)

    # convenience views of the settings (read by benchmarks and tests)
    @property
    def batch_size(self) -> int:
        return self.settings.batch_size

    @property
    def snapshot_every(self) -> int:
        return self.settings.snapshot_every

    # -- subscribers of the derived runs ------------------------------------------------------
    def subscribe(self, callback: Callable) -> Callable:
        """Send the derived runs' documents to ``callback(name, doc)`` (e.g. a TiledWriter)."""
        self._subscribers.append(callback)
        return callback

    # -- the RunEngine side -----------------------------------------------------------------
    @make_callback_safe(logger=logger)
    def __call__(self, name: str, doc: dict) -> None:
        self._router(name, doc)

    def _factory(self, name: str, start: dict):
        if "original_run_uid" in start:
            return [], []  # a derived run (perhaps ours): never re-process analysis output
        try:
            md = PtychoMetadata.from_start(start, detector_key=self.image_key,
                                           positioner_keys=self.positioner_keys)
        except InvalidMetadataError as exc:
            state = self._track(RunState(raw_uid=start["uid"]))
            self._new_derived_run(start, None, state).fail(f"invalid start document: {exc}")
            return [], []
        if md is None:
            logger.info("run %s has no ptycho metadata; not reconstructing", start["uid"])
            return [], []
        uid = start["uid"]
        state = self._track(RunState(raw_uid=uid))
        try:
            model_path, model_info = self._choose_model(md)
        except Exception as exc:  # e.g. model="auto" and the chosen weights are unreadable
            logger.exception("run %s: no model for its reconstruction", uid)
            self._new_derived_run(start, md, state).fail(
                f"no model for this run: {type(exc).__name__}: {exc}")
            return [], []
        self._derived[uid] = self._new_derived_run(start, md, state, model_info)
        self._transport.open(uid, md, model_path, model_info)
        feed = RunFeed(self._transport.put, self._transport.put_nowait, state,
                       self.backpressure, image_key=md.detector_key)

        def enqueue(name: str, doc: dict) -> None:
            feed(("doc", uid, name, doc), name, doc)

        return [enqueue], []

    #: Finished runs whose :class:`RunState` (with its latest images) stays in :attr:`runs`;
    #: older finished ones are forgotten, so a session of many scans does not grow for ever.
    keep_finished_runs = 16

    def _track(self, state: RunState) -> RunState:
        """Add a run to :attr:`runs`, forgetting the oldest finished ones beyond
        :attr:`keep_finished_runs` (open runs are always kept)."""
        self.runs[state.raw_uid] = state
        finished = [uid for uid, s in self.runs.items() if s.finished.is_set()]
        for uid in finished[: max(0, len(finished) - self.keep_finished_runs)]:
            del self.runs[uid]
        return state

    def _new_derived_run(self, start: dict, md: PtychoMetadata | None, state: RunState,
                         model_info: dict | None = None) -> DerivedRun:
        return DerivedRun(start, md, model_info or self.model_info, self.settings, state,
                          self._emitter.emit, self._emitter.then)

    def _choose_model(self, md: PtychoMetadata) -> tuple[str | None, dict]:
        """``model="auto"``: the model for this run (its directory, ``None`` for the one the
        reconstruction already holds) and its description with the reason."""
        if not self.auto:
            return None, self.model_info
        choice = choose_model(md)
        if not choice.matched:
            logger.warning("run: %s", choice.reason)
        path = str(Path(choice.path))
        # Verified once per model and version of its card: a model saved again in the same
        # directory during the session is verified (and described) again.
        key = (path, card_stamp(path))
        if key not in self._model_infos:
            identity = verify_model(path)
            if not (identity.weights_sha256_verified and identity.card_sha256_verified):
                # An edited or unsigned model never reconstructs a run silently.
                logger.error("model %s does not match its recorded hashes (run "
                             "`bluesky-ptychopinn models verify`); using %r", path,
                             DEFAULT_MODEL)
                info = {**self.model_info, "trained_on_run_probe": False,
                        "chosen": f"{choice.name!r} failed verification; {DEFAULT_MODEL!r} used"}
                return None, info
            card = read_model_card(Path(path))
            self._model_infos[key] = _model_info(choice.name, Path(path), card, identity)
        info = {**self._model_infos[key], "chosen": choice.reason,
                "trained_on_run_probe": choice.matched}
        # The network the reconstruction holds serves the run only if it is this very model
        # (same hashes), not merely one loaded from the same directory earlier.
        held = path == self.model_path and info["sha256"] == self.model_info["sha256"]
        return (None if held else path), info

    # -- messages from the reconstruction (a transport's delivery thread) --------------------
    def _deliver(self, kind: str, raw_uid: str, payload: dict) -> None:
        derived = self._derived.get(raw_uid)
        if derived is None:
            return
        derived.handle(kind, payload)
        if derived.closed:
            self._derived.pop(raw_uid, None)

    def _tick(self) -> None:
        for derived in list(self._derived.values()):
            derived.tick()

    def _lost(self, raw_uids: Iterable[str], reason: str) -> None:
        for uid in raw_uids:
            derived = self._derived.pop(uid, None)
            if derived is not None:
                derived.fail(reason)

    # -- feedback ------------------------------------------------------------------------------
    def latest(self, raw_uid: str | None = None) -> RunState | None:
        """State of a run (default: the most recent) including its latest snapshot."""
        if not self.runs:
            return None
        return self.runs.get(raw_uid) if raw_uid else list(self.runs.values())[-1]

    def wait(self, raw_uid: str | None = None, timeout: float = 60.0) -> RunState:
        """Block until a run's derived run is complete (for scripts and tests, not plans)."""
        state = self.latest(raw_uid)
        if state is None:
            raise InvalidInputError(
                f"run {raw_uid} was not reconstructed here (no ptycho metadata in its start "
                f"document, or forgotten after {self.keep_finished_runs} later runs)"
                if raw_uid else "no run has been seen yet")
        if not state.finished.wait(timeout):
            raise TimeoutError(f"reconstruction of {state.raw_uid} not finished in {timeout} s")
        return state

    # -- lifetime ------------------------------------------------------------------------------
    @property
    def pid(self) -> int | None:
        """Process id of the reconstruction process (``None`` with ``isolation="thread"``)."""
        return self._transport.pid

    def close(self, timeout: float = 10.0) -> bool:
        """Stop the reconstruction after it has finished the runs whose stop document it
        holds; runs still open then (no stop document yet, or not finished in time) are
        closed with ``"fail"``.

        Parameters
        ----------
        timeout : float
            Seconds for all of it: finishing the runs, then delivering the derived documents
            to the subscribers (which get at least 0.5 s of it).

        Returns
        -------
        bool
            True when every derived document was delivered before this returned; False when
            a slow or stuck subscriber made the time run out: the rest are still delivered, in
            order, by the emitter's thread (and said in the log).
        """
        deadline = time.monotonic() + timeout
        self._transport.close(timeout)
        self._lost(list(self._derived), "the live reconstruction was closed before the run "
                                        "finished")
        return self._emitter.close(max(0.5, deadline - time.monotonic()))

    def __enter__(self) -> LiveReconstruction:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _NoFiller(DocumentRouter):
    """The RunRouter's filler, doing nothing: every document passes as it came (the router
    hands each callback what the filler's method returns)."""

    def __init__(self, handler_registry=None, *, root_map=None, inplace=False) -> None:
        super().__init__()

    def _same(self, doc: dict) -> dict:
        return doc

    descriptor = event = event_page = datum = datum_page = _same
    resource = stream_resource = stream_datum = _same


def _model_info(name: str, path: Path, card: dict, identity) -> dict:
    """The derived start document's ``model`` entry: what was verified, not what was claimed."""
    return {
        "name": name, "path": str(path), **identity.as_dict(),
        "architecture": card["architecture"],
        "training_probes": card.get("provenance", {}).get("training_data", {})
        .get("probes", []),
        "package_version": card.get("package_version"),
    }


def _reconstruction_cpus(reserve: int) -> tuple[int, ...] | None:
    """The cores the reconstruction process may use when ``reserve`` are kept for the
    RunEngine's process, or ``None`` (all of them: no pinning, or too few cores to keep any)."""
    if reserve < 0:
        raise InvalidInputError(f"reserve_cores: >= 0, got {reserve!r}")
    if reserve == 0 or not hasattr(os, "sched_setaffinity"):
        return None
    allowed = sorted(os.sched_getaffinity(0))
    if len(allowed) <= reserve:
        return None
    return tuple(allowed[reserve:])
