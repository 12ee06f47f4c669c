"""The live reconstruction callback: raw ptychography runs in, derived reconstruction runs out.

Subscribe it to a RunEngine (``RE.subscribe(live)``) and subscribe consumers of the derived run
to it (``live.subscribe(TiledWriter(client))``). On the RunEngine thread it only queues
documents; a worker thread per run pairs frames with positions, reads HDF5 frames while the
detector writes them, feeds the :class:`~bluesky_ptychopinn.recon.StreamingReconstructor`, and
emits the derived run (event-model composers). Nothing it does can abort the scan: every error
is logged and recorded in the derived run, whose stop document then says ``"fail"``.
"""

from __future__ import annotations

import logging
import math
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from event_model import RunRouter, compose_run

from ..errors import InvalidInputError
from ..physics import crop_frames, object_pixel_size_m, stage_to_pixels
from ..recon._streaming import Snapshot, StreamingReconstructor
from ._frames import FramePairer

__all__ = ["LiveReconstruction", "RECONSTRUCTION_PLAN_NAME"]

logger = logging.getLogger(__name__)

RECONSTRUCTION_PLAN_NAME = "ptychopinn_reconstruction"
_STOP = object()


@dataclass
class RunState:
    """What the callback knows about one raw run (read by plans for feedback)."""

    raw_uid: str
    derived_uid: str | None = None
    frames_done: int = 0
    frames_skipped: int = 0
    frames_rejected: int = 0
    failed: str | None = None
    finished: threading.Event = field(default_factory=threading.Event)
    snapshot: Snapshot | None = None
    pixel_size_m: float = 0.0
    canvas_origin_px: tuple[float, float] = (0.0, 0.0)
    stats: dict = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)


class LiveReconstruction:
    """Bluesky callback that reconstructs ptychography scans live and emits derived runs.

    Parameters
    ----------
    model : str, path or torch.nn.Module
        A registry name (default ``"default"``), a model directory, or a loaded network.
    batch_size : int
        Frames per network call (smaller = lower latency, larger = higher throughput).
    snapshot_every : int
        Emit a snapshot of the stitched object every this many frames (and at the end).
    device : str, optional
        ``"cuda"`` when available, else CPU.
    image_key, positioner_keys : optional
        Override the start document's ``ptycho`` metadata (for scans that lack it).
    max_queue : int
        Raw documents buffered for the worker. When it is full, ``backpressure`` decides:
        ``"skip"`` drops event documents for reconstruction (counted in ``frames_skipped``;
        the raw run is untouched), ``"block"`` makes the RunEngine wait.
    canvas_margin_px : int
        Extra object pixels around the scanned region.
    torch_threads : int, optional
        Set torch's (process-wide) intra-op threads. On a small machine shared with the
        RunEngine and a Tiled server, 1 thread avoids OpenMP oversubscription, which otherwise
        slows inference by an order of magnitude.
    flush_after_s : float
        When no document arrives for this long (a pause, a feedback decision), the pending
        partial batch is reconstructed and a snapshot published.

    Examples
    --------
    >>> live = LiveReconstruction("default")                     # doctest: +SKIP
    >>> live.subscribe(TiledWriter(client))                      # doctest: +SKIP
    >>> RE.subscribe(live)                                       # doctest: +SKIP
    """

    def __init__(
        self,
        model="default",
        *,
        batch_size: int = 64,
        snapshot_every: int = 128,
        device: str | None = None,
        image_key: str | None = None,
        positioner_keys: dict | None = None,
        max_queue: int = 100_000,
        backpressure: str = "skip",
        canvas_margin_px: int = 8,
        torch_threads: int | None = None,
        flush_after_s: float = 0.2,
    ) -> None:
        from ..models import ModelRegistry, file_sha256
        from ..models._checkpoint import WEIGHTS_NAME

        if backpressure not in ("skip", "block"):
            raise InvalidInputError(f"backpressure: 'skip' or 'block', got {backpressure!r}")
        if isinstance(model, torch.nn.Module):
            self.model, self.model_info = model, {"name": "in-memory", "sha256": None}
        else:
            registry = ModelRegistry()
            path = registry.path(model)
            self.model, card = registry.load(path, device="cpu")
            self.model_info = {
                "name": str(model), "path": str(path), "sha256": card["sha256"],
                "weights_sha256_verified": file_sha256(path / WEIGHTS_NAME) == card["sha256"],
                "architecture": card["architecture"],
                "training_probes": card.get("provenance", {}).get("training_data", {})
                .get("probes", []),
                "package_version": card.get("package_version"),
            }
        self.batch_size = int(batch_size)
        self.snapshot_every = int(snapshot_every)
        self.device = device
        self.image_key = image_key
        self.positioner_keys = positioner_keys
        self.max_queue = int(max_queue)
        self.backpressure = backpressure
        self.canvas_margin_px = int(canvas_margin_px)
        self.flush_after_s = float(flush_after_s)
        if torch_threads:
            torch.set_num_threads(int(torch_threads))
        self._subscribers: list[Callable] = []
        self._emit_lock = threading.Lock()
        self.runs: dict[str, RunState] = {}
        self._router = RunRouter([self._factory])

    # -- subscribers of the derived runs ------------------------------------------------------
    def subscribe(self, callback: Callable) -> Callable:
        """Send the derived runs' documents to ``callback(name, doc)`` (e.g. a TiledWriter)."""
        self._subscribers.append(callback)
        return callback

    def _emit(self, name: str, doc: dict) -> None:
        with self._emit_lock:
            for callback in list(self._subscribers):
                try:
                    callback(name, doc)
                except Exception:  # a broken consumer must not stop the others
                    logger.exception("derived-run subscriber %r failed on %s", callback, name)

    # -- the RunEngine side -----------------------------------------------------------------
    def __call__(self, name: str, doc: dict) -> None:
        try:
            self._router(name, doc)
        except Exception:  # never raise into the RunEngine
            logger.exception("live reconstruction: error handling %s document", name)

    def _factory(self, name: str, start: dict):
        if "original_run_uid" in start:
            return [], []  # a derived run (perhaps ours): never re-process analysis output
        md = dict(start.get("ptycho") or {})
        if self.image_key:
            md["detector_key"] = self.image_key
        if self.positioner_keys:
            md["positioner_keys"] = self.positioner_keys
        if "detector_key" not in md or "positioner_keys" not in md:
            logger.info("run %s has no ptycho metadata; not reconstructing", start["uid"])
            return [], []
        state = RunState(raw_uid=start["uid"])
        self.runs[start["uid"]] = state
        worker = _RunWorker(self, start, md, state)
        worker.start()
        return [worker.enqueue], []

    # -- feedback ------------------------------------------------------------------------------
    def latest(self, raw_uid: str | None = None) -> RunState | None:
        """State of a run (default: the most recent) including its latest snapshot."""
        if not self.runs:
            return None
        return self.runs[raw_uid] if raw_uid else list(self.runs.values())[-1]

    def wait(self, raw_uid: str | None = None, timeout: float = 60.0) -> RunState:
        """Block until a run's derived run is complete (for scripts and tests, not plans)."""
        state = self.latest(raw_uid)
        if state is None:
            raise InvalidInputError("no run has been seen yet")
        if not state.finished.wait(timeout):
            raise TimeoutError(f"reconstruction of {state.raw_uid} not finished in {timeout} s")
        return state


class _RunWorker(threading.Thread):
    """One raw run: queue of documents -> pairing -> reconstruction -> derived documents."""

    def __init__(self, owner: LiveReconstruction, start: dict, md: dict, state: RunState):
        super().__init__(name=f"ptychopinn-{start['uid'][:8]}", daemon=True)
        self.owner, self.start_doc, self.md, self.state = owner, start, md, state
        self.queue: queue.Queue = queue.Queue(maxsize=owner.max_queue)
        keys = md["positioner_keys"]
        self.pairer = FramePairer(md["detector_key"], keys["y"], keys["x"])
        self.recon: StreamingReconstructor | None = None
        self.bundle = None
        self.snapshot_bundle = self.metrics_bundle = None
        self.since_snapshot = 0
        self.exit_status = "success"
        self.reason = ""
        self.started_at = time.time()
        # RunRouter hands the start document to the callback right after the factory returns.

    # RunEngine thread ---------------------------------------------------------------------
    def enqueue(self, item, doc=None) -> None:
        if doc is not None:
            item = (item, doc)
        name = item[0]
        if self.owner.backpressure == "block" or name not in ("event", "event_page"):
            self.queue.put(item)
            return
        try:
            self.queue.put_nowait(item)
        except queue.Full:
            rows = 1 if name == "event" else len(item[1]["seq_num"])
            with self.state.lock:
                self.state.frames_skipped += rows

    # worker thread ---------------------------------------------------------------------------
    def run(self) -> None:
        while True:
            try:
                name, doc = self.queue.get(timeout=self.owner.flush_after_s)
            except queue.Empty:
                # The scan paused or is waiting for feedback: reconstruct what is pending now
                # instead of waiting for a full batch, and publish a snapshot.
                try:
                    self._drain(final=False, force=True)
                    if self.recon is not None and self.recon.pending:
                        self.recon.flush()
                        self.since_snapshot = max(self.since_snapshot, 1)
                    self._snapshot()
                except Exception as exc:
                    self._fail(f"{type(exc).__name__} while flushing: {exc}")
                continue
            try:
                self._handle(name, doc)
            except Exception as exc:
                self._fail(f"{type(exc).__name__} while handling {name}: {exc}")
            if name == "stop":
                break
        self.pairer.close()
        self.state.finished.set()

    def _fail(self, reason: str) -> None:
        logger.exception("live reconstruction of run %s failed: %s", self.state.raw_uid, reason)
        if self.state.failed is None:
            self.state.failed = reason
            self.exit_status, self.reason = "fail", reason

    def _handle(self, name: str, doc: dict) -> None:
        if name == "start":
            self._open_derived_run(doc)
        elif name == "descriptor":
            self.pairer.descriptor(doc)
        elif name == "stream_resource":
            self.pairer.stream_resource(doc)
        elif name == "stream_datum":
            self.pairer.stream_datum(doc)
        elif name == "resource":
            self.pairer.resource(doc)
        elif name == "datum":
            self.pairer.datum(doc)
        elif name == "datum_page":
            for i in range(len(doc["datum_id"])):
                self.pairer.datum({"resource": doc["resource"], "datum_id": doc["datum_id"][i],
                                   "datum_kwargs": {k: v[i] for k, v in
                                                    doc["datum_kwargs"].items()}})
        elif name == "event":
            self.pairer.event(doc)
        elif name == "event_page":
            for i in range(len(doc["seq_num"])):
                self.pairer.event({"descriptor": doc["descriptor"], "seq_num": doc["seq_num"][i],
                                   "data": {k: v[i] for k, v in doc["data"].items()}})
        elif name == "stop":
            self._drain(final=True)
            self._close_derived_run(doc)
            return
        if name in ("event", "event_page", "stream_datum", "datum", "datum_page"):
            self._drain(final=False)

    # reconstruction ------------------------------------------------------------------------
    def _geometry(self) -> tuple[float, int]:
        md = self.md
        n_model = self.owner.model.config.frame_size
        n_det = int(md.get("frame_size", n_model))
        dx_det = object_pixel_size_m(md["energy_ev"], md["detector_distance_m"],
                                     md["detector_pixel_size_m"], n_det)
        return dx_det * n_det / n_model, n_model

    def _make_reconstructor(self) -> StreamingReconstructor:
        dx, n = self._geometry()
        scan = self.md.get("scan") or {}
        extent = np.asarray(scan.get("extent_m", (0.0, 0.0)), dtype=float) / dx
        centre = np.asarray(scan.get("center_m", (0.0, 0.0)), dtype=float)
        centre_px = stage_to_pixels(centre[None], dx, sign=int(self.md.get("position_sign", 1)))[0]
        side = np.ceil(np.abs(extent) + n + 2 * self.owner.canvas_margin_px).astype(int)
        origin = centre_px - side / 2
        self.state.pixel_size_m = dx
        self.state.canvas_origin_px = (float(origin[0]), float(origin[1]))
        self.canvas_shape = (int(side[0]), int(side[1]))
        return StreamingReconstructor(
            self.owner.model, object_shape=self.canvas_shape, origin_px=tuple(origin),
            batch_size=self.owner.batch_size, device=self.owner.device,
        )

    def _drain(self, final: bool, force: bool = False) -> None:
        if self.state.failed:
            return
        while True:
            frames, positions_m, seqs = self.pairer.pop_ready()
            if not seqs:
                break
            if len(seqs) < self.owner.batch_size and not (final or force):
                # put them back until a full batch has gathered (latency vs throughput)
                for k, s in enumerate(seqs):
                    self.pairer.frames[s] = frames[k]
                    self.pairer.positions[s] = tuple(positions_m[k])
                break
            self._reconstruct(frames, positions_m)
        if final:
            if self.recon is not None:
                self.recon.flush()
            self._snapshot(force=True)

    def _reconstruct(self, frames: np.ndarray, positions_m: np.ndarray) -> None:
        if self.recon is None:
            self.recon = self._make_reconstructor()
        dx, n = self._geometry()
        if frames.shape[-1] != n:
            if frames.shape[-1] < n:
                raise InvalidInputError(
                    f"detector frames are {frames.shape[-1]} px, the model needs {n}"
                )
            frames = crop_frames(frames.astype(np.float32), n)
        positions_px = stage_to_pixels(positions_m, dx, sign=int(self.md.get("position_sign", 1)))
        finite = np.isfinite(frames.reshape(len(frames), -1)).all(axis=1)
        nonzero = frames.reshape(len(frames), -1).sum(axis=1) > 0
        good = finite & nonzero
        if not good.all():
            bad = int((~good).sum())
            logger.warning("run %s: %d frame(s) NaN/inf or empty: not reconstructed",
                           self.state.raw_uid, bad)
            self.state.frames_rejected += bad
        if good.any():
            t0 = time.perf_counter()
            self.recon.add(frames[good].astype(np.float32), positions_px[good])
            latency = time.perf_counter() - t0
            with self.state.lock:
                self.state.frames_done += int(good.sum())
            self._emit_metrics(int(good.sum()), latency)
            self.since_snapshot += int(good.sum())
            if self.since_snapshot >= self.owner.snapshot_every:
                self._snapshot()

    # derived run documents ---------------------------------------------------------------
    def _open_derived_run(self, start: dict) -> None:
        metadata = {
            "plan_name": RECONSTRUCTION_PLAN_NAME,
            "original_run_uid": start["uid"],
            "model": self.owner.model_info,
            "ptycho": self.md,
            "scan_id": start.get("scan_id"),
            "sample": start.get("sample"),
        }
        self.bundle = compose_run(metadata={k: v for k, v in metadata.items() if v is not None})
        self.state.derived_uid = self.bundle.start_doc["uid"]
        self.owner._emit("start", self.bundle.start_doc)

    def _image_keys(self, shape) -> dict:
        keys = {}
        for key, units in (("object_amplitude", ""), ("object_phase", "rad"),
                           ("uncertainty", ""), ("weight", "")):
            keys[key] = {"source": "ptychopinn", "dtype": "array", "shape": list(shape),
                         "dtype_numpy": np.dtype(np.float32).str, "units": units,
                         "dims": ["object_y", "object_x"]}
        keys["frames"] = {"source": "ptychopinn", "dtype": "integer", "shape": [],
                          "dtype_numpy": np.dtype(np.int64).str}
        return keys

    def _snapshot(self, force: bool = False) -> None:
        if self.recon is None or (self.since_snapshot == 0 and not force):
            return
        snap = self.recon.snapshot()
        # The canvas can grow (a scan beyond its declared region); the stream keeps its shape.
        oy = int(round(self.state.canvas_origin_px[0] - snap.origin_px[0]))
        ox = int(round(self.state.canvas_origin_px[1] - snap.origin_px[1]))
        h, w = self.canvas_shape
        window = (slice(oy, oy + h), slice(ox, ox + w))
        data = {
            "object_amplitude": snap.amplitude[window],
            "object_phase": snap.phase[window],
            "uncertainty": snap.uncertainty[window].astype(np.float32),
            "weight": snap.weight[window].astype(np.float32),
            "frames": snap.n_frames,
        }
        if self.snapshot_bundle is None:
            self.snapshot_bundle = self.bundle.compose_descriptor(
                name="snapshots", data_keys=self._image_keys((h, w)))
            self.owner._emit("descriptor", self.snapshot_bundle.descriptor_doc)
        now = time.time()
        event = self.snapshot_bundle.compose_event(
            data=data, timestamps=dict.fromkeys(data, now))
        self.owner._emit("event", event)
        with self.state.lock:
            self.state.snapshot = snap
            self.state.stats = snap.stats
        self.since_snapshot = 0

    def _emit_metrics(self, n: int, latency: float) -> None:
        stats = self.recon.stats()
        data = {
            "frames_done": self.state.frames_done,
            "frames_skipped": self.state.frames_skipped,
            "frames_rejected": self.state.frames_rejected,
            "batch_frames": n,
            "batch_latency_s": latency,
            "frames_per_s": stats["frames_per_s"],
        }
        if self.metrics_bundle is None:
            keys = {k: {"source": "ptychopinn", "dtype": "number", "shape": [],
                        "dtype_numpy": np.dtype(np.float64).str} for k in data}
            self.metrics_bundle = self.bundle.compose_descriptor(name="metrics", data_keys=keys)
            self.owner._emit("descriptor", self.metrics_bundle.descriptor_doc)
        now = time.time()
        self.owner._emit("event", self.metrics_bundle.compose_event(
            data={k: float(v) for k, v in data.items()}, timestamps=dict.fromkeys(data, now)))

    def _close_derived_run(self, raw_stop: dict) -> None:
        unpaired = self.pairer.unpaired
        if unpaired:
            logger.warning("run %s: %d frame(s) without a position or image at stop",
                           self.state.raw_uid, unpaired)
        raw_status = raw_stop.get("exit_status", "success")
        status = self.exit_status if self.exit_status == "fail" else raw_status
        reason = self.reason or (raw_stop.get("reason", "") if raw_status != "success" else "")
        stop = self.bundle.compose_stop(exit_status=status, reason=reason)
        summary = {
            "frames_done": self.state.frames_done,
            "frames_skipped": self.state.frames_skipped,
            "frames_rejected": self.state.frames_rejected,
            "frames_unpaired": unpaired,
            "seconds": time.time() - self.started_at,
        }
        if self.recon is not None:
            summary.update({k: v for k, v in self.recon.stats().items()
                            if isinstance(v, (int, float)) and math.isfinite(v)})
        stop["ptychopinn"] = summary  # extra keys are allowed in stop documents
        self.owner._emit("stop", stop)
