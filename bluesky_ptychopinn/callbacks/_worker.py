"""One raw run in, one derived run out: the reconstruction logic shared by both isolation modes.

:class:`RunWorker` pairs frames with positions, feeds the
:class:`~bluesky_ptychopinn.recon.StreamingReconstructor` and composes the derived run
(event-model composers). It neither owns a thread nor a queue: the thread driver
(:mod:`._live`) and the reconstruction process (:mod:`._process`) call :meth:`RunWorker.handle`
for each raw document and :meth:`RunWorker.idle` when documents stop coming.
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
from event_model import compose_run

from ..errors import InvalidInputError
from ..physics import crop_frames, object_pixel_size_m, stage_to_pixels
from ..recon import PIEOptions, RefinedSnapshot, RefinerThread, StreamingRefiner
from ..recon._crop_choice import CropChooser
from ..recon._residual import place_on_canvas
from ..recon._streaming import Snapshot, StreamingReconstructor
from ._frames import FramePairer
from ._run_probe import resolve_run_probe

__all__ = ["RECONSTRUCTION_PLAN_NAME", "RunState", "RunWorker", "WorkerSettings",
           "derived_start_metadata", "offer"]

logger = logging.getLogger(__name__)

RECONSTRUCTION_PLAN_NAME = "ptychopinn_reconstruction"
_EVENT_DOCS = ("event", "event_page")


@dataclass
class RunState:
    """What the callback knows about one raw run (read by plans for feedback).

    Attributes
    ----------
    raw_uid, derived_uid : str
        The raw run and its derived (reconstruction) run.
    frames_done, frames_skipped, frames_rejected : int
        Frames reconstructed, dropped for back-pressure, rejected (NaN/inf or empty).
    failed : str or None
        Why the reconstruction failed (the derived run then stops with ``"fail"``).
    finished : threading.Event
        Set once the derived run's stop document has been emitted.
    snapshot : Snapshot or None
        The latest stitched object.
    refined : RefinedSnapshot or None
        The latest refined (rPIE) object and probe, when refinement runs.
    best : str
        ``"network"`` or ``"refined"``: the estimate with the lower Fourier-magnitude residual
        against the measured frames (what a viewer should show now).
    pixel_size_m, canvas_origin_px, stats
        Geometry of the snapshot canvas and throughput figures.
    """

    raw_uid: str
    derived_uid: str | None = None
    frames_done: int = 0
    frames_skipped: int = 0
    frames_rejected: int = 0
    failed: str | None = None
    finished: threading.Event = field(default_factory=threading.Event)
    snapshot: Snapshot | None = None
    refined: RefinedSnapshot | None = None
    best: str = "network"
    pixel_size_m: float = 0.0
    canvas_origin_px: tuple[float, float] = (0.0, 0.0)
    stats: dict = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)


#: RunState fields a reconstruction process mirrors to the RunEngine's process.
MIRRORED_FIELDS = ("derived_uid", "frames_done", "frames_rejected", "failed", "pixel_size_m",
                   "canvas_origin_px", "stats", "best")

#: Refinement engines of :class:`LiveReconstruction` (``refine=``); ``None`` turns it off.
REFINE_ENGINES = ("rpie", "epie")


@dataclass(frozen=True)
class WorkerSettings:
    """The knobs of :class:`LiveReconstruction` a worker needs (picklable)."""

    batch_size: int = 64
    snapshot_every: int = 128
    device: str | None = None
    canvas_margin_px: int = 8
    flush_after_s: float = 0.2
    publish_interval_s: float = 0.5
    refine: str | None = "rpie"
    refine_budget_s: float = 5.0
    refine_epochs: float | None = None
    refine_tol: float | None = 1e-3
    refine_duty: float = 0.5
    refine_batch_size: int = 16
    crop: int | str = "auto"


def derived_start_metadata(start: dict, md: dict, model_info: dict) -> dict:
    """Start-document metadata of the derived run of raw run ``start`` (CONVENTIONS.md)."""
    metadata = {
        "plan_name": RECONSTRUCTION_PLAN_NAME,
        "original_run_uid": start["uid"],
        "model": model_info,
        "ptycho": md,
        "scan_id": start.get("scan_id"),
        "sample": start.get("sample"),
    }
    return {k: v for k, v in metadata.items() if v is not None}


class RunWorker:
    """One raw run: documents -> pairing -> reconstruction -> derived-run documents.

    Parameters
    ----------
    model : torch.nn.Module
        The network.
    model_info : dict
        The derived start document's ``model`` entry.
    settings : WorkerSettings
        Batch size, snapshot cadence, device, canvas margin.
    start : dict
        The raw run's start document.
    md : dict
        Its ``ptycho`` metadata (with any overrides applied).
    state : RunState
        Updated as frames are reconstructed.
    emit : callable
        ``emit(name, doc)`` receives the derived run's documents.
    """

    def __init__(self, model: torch.nn.Module, model_info: dict, settings: WorkerSettings,
                 start: dict, md: dict, state: RunState, emit: Callable[[str, dict], None]):
        self.model, self.model_info, self.settings = model, model_info, settings
        self.start_doc, self.md, self.state, self.emit = start, md, state, emit
        keys = md["positioner_keys"]
        self.pairer = FramePairer(md["detector_key"], keys["y"], keys["x"])
        self.recon: StreamingReconstructor | None = None
        self.bundle = None
        self.snapshot_bundle = self.metrics_bundle = None
        self.since_snapshot = 0  # frames since the last *emitted* snapshot
        self.last_snapshot_at = -math.inf  # monotonic time of the last emitted snapshot
        self.metric_rows: list[tuple[float, dict]] = []
        self.last_metrics_at = -math.inf
        self.exit_status = "success"
        self.reason = ""
        self.started_at = time.time()
        self.canvas_shape = (0, 0)
        self.refiner: RefinerThread | None = None
        self.refined_bundle = None
        self.last_refined_at = -math.inf
        self.published_refined: RefinedSnapshot | None = None
        self.probe, self.probe_info = None, None
        self.refine_after_stop_s = 0.0
        self.crop_chooser = CropChooser()

    # -- entry points ------------------------------------------------------------------------
    def handle(self, name: str, doc: dict) -> bool:
        """Process one raw document; never raises. True once the run is finished (stop)."""
        if name == "stop":
            try:
                self._drain(final=True)
            except Exception as exc:
                self._fail(f"{type(exc).__name__} while finishing: {exc}")
            try:
                self._finish_refinement()
            except Exception as exc:
                self._fail(f"{type(exc).__name__} while finishing the refinement: {exc}")
            try:
                self._close_derived_run(doc)
            except Exception:
                logger.exception("run %s: could not close the derived run", self.state.raw_uid)
            self.pairer.close()
            return True
        try:
            self._handle(name, doc)
        except Exception as exc:
            self._fail(f"{type(exc).__name__} while handling {name}: {exc}")
        return False

    def idle(self) -> None:
        """No document for a while (a pause, a feedback decision): reconstruct what is
        pending now instead of waiting for a full batch, and publish a snapshot."""
        try:
            self._drain(final=False, force=True)
            if self.recon is not None and self.recon.pending:
                self.recon.flush()
                self.since_snapshot = max(self.since_snapshot, 1)
            self._snapshot()
            self._publish_refined()
            self._publish_metrics()
        except Exception as exc:
            self._fail(f"{type(exc).__name__} while flushing: {exc}")

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
        if name in ("event", "event_page", "stream_datum", "datum", "datum_page"):
            self._drain(final=False)

    # -- reconstruction ----------------------------------------------------------------------
    def _geometry(self) -> tuple[float, int]:
        md = self.md
        n_model = self.model.config.frame_size
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
        side = np.ceil(np.abs(extent) + n + 2 * self.settings.canvas_margin_px).astype(int)
        origin = centre_px - side / 2
        self.state.pixel_size_m = dx
        self.state.canvas_origin_px = (float(origin[0]), float(origin[1]))
        self.canvas_shape = (int(side[0]), int(side[1]))
        if self.settings.refine and self.probe_info is not None:
            self._start_refiner(origin)
        return StreamingReconstructor(
            self.model, object_shape=self.canvas_shape, origin_px=tuple(origin),
            batch_size=self.settings.batch_size, device=self.settings.device,
            crop=self.settings.crop,
        )

    def _start_refiner(self, origin: np.ndarray) -> None:
        """The refinement tier: rPIE on the same canvas, in its own thread (never in the way
        of the network preview: it only takes frames and hands back snapshots)."""
        settings = self.settings
        options = PIEOptions(engine=settings.refine, batch_size=settings.refine_batch_size,
                             device=settings.device, progress=False, seed=0)
        refiner = StreamingRefiner(self.probe, object_shape=self.canvas_shape,
                                   origin_px=tuple(origin), options=options,
                                   frame_size=self.model.config.frame_size,
                                   wait_for_seed_frames=128)
        self.refiner = RefinerThread(refiner, snapshot_interval_s=settings.publish_interval_s,
                                     duty=settings.refine_duty,
                                     name=f"ptychopinn-refine-{self.state.raw_uid[:8]}")
        self.refiner.start()

    def _drain(self, final: bool, force: bool = False) -> None:
        if self.state.failed:
            return
        while True:
            frames, positions_m, seqs = self.pairer.pop_ready()
            if not seqs:
                break
            if len(seqs) < self.settings.batch_size and not (final or force):
                # put them back until a full batch has gathered (latency vs throughput)
                self.pairer.put_back(frames, positions_m, seqs)
                break
            self._reconstruct(frames, positions_m)
        if final:
            if self.recon is not None:
                self.recon.flush()
            self._snapshot(force=True)
            self._publish_metrics(force=True)

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
            if self.refiner is not None:
                if self.refiner.refiner.start is None and self.recon.n_frames:
                    # Until the refiner has chosen its start, every new network image is a
                    # candidate (the regular snapshots come only every snapshot_every frames).
                    snap = self.recon.snapshot()
                    self.refiner.offer_seed(snap.object, snap.weight, snap.origin_px)
                self.refiner.add(frames[good].astype(np.float32), positions_px[good])
            if len(self.recon.crop_candidates) > 1:
                self.crop_chooser.observe(frames[good], positions_px[good])
            with self.state.lock:
                self.state.frames_done += int(good.sum())
            self._emit_metrics(int(good.sum()), latency)
            self.since_snapshot += int(good.sum())
            if self.since_snapshot >= self.settings.snapshot_every:
                self._snapshot()
            # During a scan without pauses idle() never runs: the refined image must reach
            # the run state (and the derived run) from here too.
            self._publish_refined()

    # -- derived run documents ---------------------------------------------------------------
    def _open_derived_run(self, start: dict) -> None:
        metadata = derived_start_metadata(start, self.md, self.model_info)
        metadata["engines"] = ["network"]
        if self.settings.refine:
            dx, n = self._geometry()
            self.probe, self.probe_info = resolve_run_probe(
                self.md, self.model_info, n, dx, float(self.md["energy_ev"]))
            metadata["engines"].append(self.settings.refine)
            metadata["refinement"] = {
                "engine": self.settings.refine, "probe": self.probe_info,
                "budget_after_stop_s": self.settings.refine_budget_s,
                "duty": self.settings.refine_duty, "batch_size": self.settings.refine_batch_size,
                "start": "chosen per run by the Fourier-magnitude residual "
                         "(flat, network, network_highpass)",
            }
        self.bundle = compose_run(metadata=metadata)
        self.state.derived_uid = self.bundle.start_doc["uid"]
        self.emit("start", self.bundle.start_doc)

    def _image_keys(self, shape) -> dict:
        keys = {}
        for key, units in (("object_amplitude", ""), ("object_phase", "rad"),
                           ("uncertainty", ""), ("weight", "")):
            keys[key] = {"source": "ptychopinn", "dtype": "array", "shape": list(shape),
                         "dtype_numpy": np.dtype(np.float32).str, "units": units,
                         "dims": ["object_y", "object_x"]}
        keys["frames"] = {"source": "ptychopinn", "dtype": "integer", "shape": [],
                          "dtype_numpy": np.dtype(np.int64).str}
        keys["crop"] = {"source": "ptychopinn", "dtype": "integer", "shape": [],
                        "dtype_numpy": np.dtype(np.int64).str, "units": "px"}
        return keys

    def _snapshot(self, force: bool = False) -> None:
        """Hand the stitched object to the RunState (feedback reads it) and, at most once per
        ``publish_interval_s`` unless forced, emit it as a ``snapshots`` event.

        The interval bounds what the derived run's consumers must absorb (a TiledWriter
        spends a few hundred ms on an event of four images): without it a fast scan makes
        them fall further and further behind, and the latest image on screen gets older.
        """
        if self.recon is None or (self.since_snapshot == 0 and not force):
            return
        snap = self.state.snapshot
        if force or snap is None or snap.n_frames != self.recon.n_frames:
            self._choose_crop(force)
            snap = self.recon.snapshot()
            with self.state.lock:
                self.state.snapshot = snap
                self.state.stats = snap.stats
            if self.refiner is not None:
                self.refiner.offer_seed(snap.object, snap.weight, snap.origin_px)
        now = time.monotonic()
        if not force and now - self.last_snapshot_at < self.settings.publish_interval_s:
            return
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
            "crop": int(snap.stats.get("crop", self.recon.crop)),
        }
        if self.snapshot_bundle is None:
            self.snapshot_bundle = self.bundle.compose_descriptor(
                name="snapshots", data_keys=self._image_keys((h, w)))
            self.emit("descriptor", self.snapshot_bundle.descriptor_doc)
        event = self.snapshot_bundle.compose_event(
            data=data, timestamps=dict.fromkeys(data, time.time()))
        self.emit("event", event)
        self.last_snapshot_at = now
        self.since_snapshot = 0

    def _choose_crop(self, force: bool) -> None:
        """``crop="auto"``: the stitching crop the scan itself prefers (recon/_crop_choice.py):
        agreement with the refined image once there is one, else the Fourier residual with the
        run's probe; at most every few seconds, and at the end."""
        reference = probe = None
        latest = self.refiner.latest if self.refiner is not None else None
        if latest is not None and latest.epochs >= 1:
            reference = (latest.object, latest.origin_px)
        elif self.probe is not None:
            probe = self.probe
        self.crop_chooser.maybe_choose(self.recon, probe, reference, force=force)

    # -- the refinement tier ------------------------------------------------------------------
    def _refined_keys(self, shape, probe_shape) -> dict:
        def array(dims, shp, units=""):
            return {"source": "ptychopinn-refine", "dtype": "array", "shape": list(shp),
                    "dtype_numpy": np.dtype(np.float32).str, "units": units, "dims": dims}

        def number(kind=np.float64):
            return {"source": "ptychopinn-refine", "dtype": "number", "shape": [],
                    "dtype_numpy": np.dtype(kind).str}

        keys = {
            "object_amplitude": array(["object_y", "object_x"], shape),
            "object_phase": array(["object_y", "object_x"], shape, "rad"),
            "probe_amplitude": array(["probe_mode", "probe_y", "probe_x"], probe_shape),
            "probe_phase": array(["probe_mode", "probe_y", "probe_x"], probe_shape, "rad"),
        }
        for key in ("error", "residual", "network_residual", "epochs", "refine_seconds",
                    "seconds_since_last_frame", "photon_scale"):
            keys[key] = number()
        keys["frames"] = number(np.int64)
        keys["refined_is_best"] = number(np.int64)
        return keys

    def _refined_event_data(self, snap: RefinedSnapshot) -> dict:
        h, w = self.canvas_shape
        # On the network stream's canvas, so both streams can be compared pixel for pixel.
        obj = place_on_canvas(snap.object, snap.origin_px, (h, w), self.state.canvas_origin_px)
        return {
            "object_amplitude": np.abs(obj).astype(np.float32),
            "object_phase": np.angle(obj).astype(np.float32),
            "probe_amplitude": np.abs(snap.probe).astype(np.float32),
            "probe_phase": np.angle(snap.probe).astype(np.float32),
            "error": float(snap.error),
            "residual": float(snap.residual),
            "network_residual": float(snap.network_residual),
            "epochs": float(snap.epochs),
            "refine_seconds": float(snap.busy_s),
            "seconds_since_last_frame": float(time.monotonic() - self.refiner.last_frame_at),
            "photon_scale": float(snap.photon_scale),
            "frames": int(snap.n_frames),
            "refined_is_best": int(snap.best == "refined"),
        }

    def _emit_refined(self, name: str, snap: RefinedSnapshot) -> None:
        data = self._refined_event_data(snap)
        bundle = self.refined_bundle if name == "refined" else None
        if bundle is None:
            keys = self._refined_keys(self.canvas_shape, snap.probe.shape)
            bundle = self.bundle.compose_descriptor(name=name, data_keys=keys)
            self.emit("descriptor", bundle.descriptor_doc)
            if name == "refined":
                self.refined_bundle = bundle
        self.emit("event", bundle.compose_event(
            data=data, timestamps=dict.fromkeys(data, time.time())))

    def _publish_refined(self, force: bool = False) -> None:
        """The refiner's latest snapshot as a ``refined`` event, at most once per
        ``publish_interval_s`` unless forced; the run state says which estimate is better."""
        if self.refiner is None:
            return
        snap = self.refiner.latest
        if snap is None or snap is self.published_refined:
            return
        with self.state.lock:
            self.state.refined = snap
            self.state.best = snap.best
        now = time.monotonic()
        if not force and now - self.last_refined_at < self.settings.publish_interval_s:
            return
        self._emit_refined("refined", snap)
        self.published_refined = snap
        self.last_refined_at = now

    def _finish_refinement(self) -> None:
        """After the last frame: refine until the stop rule (epochs, time budget or
        convergence), publishing as it goes; then the ``final`` stream."""
        if self.refiner is None:
            return
        t0 = time.monotonic()
        settings = self.settings
        self.refiner.finish(max_epochs=settings.refine_epochs, time_s=settings.refine_budget_s,
                            tol=settings.refine_tol)
        deadline = t0 + settings.refine_budget_s + 30.0  # a stuck refiner must not hold the run
        while not self.refiner.done.wait(settings.publish_interval_s):
            self._publish_refined()
            if time.monotonic() > deadline:
                self.refiner.cancel()
                break
        self.refine_after_stop_s = time.monotonic() - t0
        if self.refiner.failed:
            raise RuntimeError(f"refinement: {self.refiner.failed}")
        final = self.refiner.final or self.refiner.latest
        if final is None:
            return  # too few frames to refine: said so in the summary
        self._publish_refined(force=True)
        self._emit_refined("final", final)

    def _refinement_summary(self) -> dict:
        if self.refiner is None:
            return {"ran": False, "probe": self.probe_info} if self.probe_info else {"ran": False}
        snap = self.refiner.final or self.refiner.latest
        refiner = self.refiner.refiner
        summary = {
            "ran": snap is not None, "engine": self.settings.refine, "probe": self.probe_info,
            "frames": refiner.n_frames, "frames_not_refined": refiner.frames_dropped,
            "seconds_after_stop": self.refine_after_stop_s, "failed": self.refiner.failed,
        }
        if snap is not None:
            summary.update(epochs=snap.epochs, error=snap.error, residual=snap.residual,
                           network_residual=snap.network_residual, best=snap.best,
                           start=snap.start, start_residuals=snap.start_residuals,
                           refine_seconds=snap.busy_s)
        return {k: (v if not (isinstance(v, float) and not math.isfinite(v)) else None)
                for k, v in summary.items()}

    def _emit_metrics(self, n: int, latency: float) -> None:
        """One row per reconstructed batch; rows go out as event pages (see _publish_metrics)."""
        stats = self.recon.stats()
        data = {
            "frames_done": self.state.frames_done,
            "frames_skipped": self.state.frames_skipped,
            "frames_rejected": self.state.frames_rejected,
            "batch_frames": n,
            "batch_latency_s": latency,
            "frames_per_s": stats["frames_per_s"],
        }
        self.metric_rows.append((time.time(), {k: float(v) for k, v in data.items()}))
        self._publish_metrics()

    def _publish_metrics(self, force: bool = False) -> None:
        """Emit the pending per-batch rows as one ``metrics`` event page, at most once per
        ``publish_interval_s`` unless forced: one write per interval for a consumer such as
        TiledWriter instead of one per batch."""
        if not self.metric_rows:
            return
        now = time.monotonic()
        if not force and now - self.last_metrics_at < self.settings.publish_interval_s:
            return
        rows, self.metric_rows = self.metric_rows, []
        if self.metrics_bundle is None:
            keys = {k: {"source": "ptychopinn", "dtype": "number", "shape": [],
                        "dtype_numpy": np.dtype(np.float64).str} for k in rows[0][1]}
            self.metrics_bundle = self.bundle.compose_descriptor(name="metrics", data_keys=keys)
            self.emit("descriptor", self.metrics_bundle.descriptor_doc)
        times = [t for t, _ in rows]
        data = {k: [row[k] for _, row in rows] for k in rows[0][1]}
        self.emit("event_page", self.metrics_bundle.compose_event_page(
            data=data, timestamps={k: times for k in data}, time=times))
        self.last_metrics_at = now

    def summary(self) -> dict:
        """Counters for the derived stop document's ``ptychopinn`` entry."""
        summary = {
            "frames_done": self.state.frames_done,
            "frames_skipped": self.state.frames_skipped,
            "frames_rejected": self.state.frames_rejected,
            "frames_unpaired": self.pairer.unpaired,
            "frames_repeated": self.pairer.repeated,
            "seconds": time.time() - self.started_at,
        }
        if self.recon is not None:
            summary.update({k: v for k, v in self.recon.stats().items()
                            if isinstance(v, (int, float)) and math.isfinite(v)})
        summary["refinement"] = self._refinement_summary()
        if self.recon is not None:
            summary["stitching"] = {"crop": self.recon.crop,
                                    "candidates": list(self.recon.crop_candidates),
                                    "scores": {str(k): v for k, v in
                                               self.recon.crop_scores.items()
                                               if math.isfinite(v)}}
        return summary

    def _close_derived_run(self, raw_stop: dict) -> None:
        if self.bundle is None:
            return  # the derived run never opened (its start failed); nothing to close
        unpaired = self.pairer.unpaired
        if unpaired:
            logger.warning("run %s: %d frame(s) without a position or image at stop",
                           self.state.raw_uid, unpaired)
        raw_status = raw_stop.get("exit_status", "success")
        status = self.exit_status if self.exit_status == "fail" else raw_status
        reason = self.reason or (raw_stop.get("reason", "") if raw_status != "success" else "")
        stop = self.bundle.compose_stop(exit_status=status, reason=reason)
        stop["ptychopinn"] = self.summary()  # extra keys are allowed in stop documents
        self.emit("stop", stop)


def offer(put: Callable, put_nowait: Callable, item, name: str, doc: dict, state: RunState,
          backpressure: str) -> None:
    """Hand ``item`` to a worker's queue from the RunEngine thread, per the back-pressure policy.

    Non-event documents, and everything under ``"block"``, go through ``put`` (which may wait).
    Under ``"skip"`` an event document that finds the queue full is dropped for
    reconstruction only and its rows are counted in ``state.frames_skipped``.
    """
    if backpressure == "block" or name not in _EVENT_DOCS:
        put(item)
        return
    try:
        put_nowait(item)
    except queue.Full:
        with state.lock:
            state.frames_skipped += 1 if name == "event" else len(doc["seq_num"])
