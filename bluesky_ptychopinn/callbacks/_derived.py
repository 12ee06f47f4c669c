"""The derived (reconstruction) run of one raw run, composed on the RunEngine side.

:class:`DerivedRun` is the only code that writes derived documents, whatever carried the
reconstruction's messages to it (a queue, a pipe, a message bus): it owns the event-model
compose bundle, the run state that feedback plans read, the publish throttles, the stop
summary and :meth:`DerivedRun.fail`. The messages are those of
:mod:`._reconstruction` (``opened``, ``canvas``, ``metrics``, ``snapshot``, ``refined``,
``final``, ``failed``, ``finished``).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from event_model import compose_run

from ..metadata import PtychoMetadata
from ..recon import RefinedSnapshot
from ..recon._residual import place_on_canvas
from ..recon._streaming import Snapshot
from ._settings import RECONSTRUCTION_PLAN_NAME, WorkerSettings, derived_run_uid

__all__ = ["DerivedRun", "RunState", "derived_start_metadata"]

logger = logging.getLogger(__name__)


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
        Set once the derived run's stop document has been delivered to the subscribers.
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


def _account_missing(summary: dict) -> None:
    """Net the reconstruction's ``frames_missing`` of the frames this side skipped.

    The reconstruction counts as ``not_received`` every event the raw stop counts and it never
    got; those this side dropped for back-pressure are among them, and are reported as
    ``frames_skipped``: the rest never came at all (a bus that lost them).
    """
    causes = dict(summary.get("frames_missing_by_cause") or {})
    if not causes:
        return
    skipped = int(summary.get("frames_skipped") or 0)
    if causes.get("not_received"):
        causes["not_received"] = max(0, int(causes["not_received"]) - skipped)
    causes = {k: int(v) for k, v in causes.items() if v}
    summary["frames_missing_by_cause"] = causes
    summary["frames_missing"] = sum(causes.values())


def _not_done_here(summary: dict) -> str:
    """Why a run the reconstruction called a success is not one, or "".

    The reconstruction's own rule (most frames reconstructed) cannot see the frames that never
    reached it: those this side dropped for back-pressure (``backpressure="skip"``) and those
    that never arrived (``frames_missing_by_cause["not_received"]``, after
    :func:`_account_missing`). Counted with them, a run of which most frames were not
    reconstructed is no success.
    """
    skipped = int(summary.get("frames_skipped") or 0)
    lost = int((summary.get("frames_missing_by_cause") or {}).get("not_received") or 0)
    if not skipped and not lost:
        return ""
    done = int(summary.get("frames_done") or 0)
    total = done + skipped + lost + int(summary.get("frames_rejected") or 0) + int(
        summary.get("frames_unpaired") or 0) + int(
        (summary.get("frames_missing_by_cause") or {}).get("no_frame") or 0)
    if done >= 0.5 * total:
        return ""
    causes = []
    if skipped:
        causes.append(f"{skipped} skipped for back-pressure: the reconstruction could not keep "
                      "up; use backpressure='block', a larger max_queue or a GPU")
    if lost:
        causes.append(f"{lost} never received: the raw run's stop counts them, they never "
                      "reached the reconstruction")
    return f"only {done} of {total} frames reconstructed ({'; '.join(causes)})"


def derived_start_metadata(start: dict, md: PtychoMetadata | dict | None,
                           model_info: dict) -> dict:
    """Start-document metadata of the derived run of raw run ``start`` (docs/conventions.md)."""
    ptycho = md.to_document() if isinstance(md, PtychoMetadata) else md
    metadata = {
        "plan_name": RECONSTRUCTION_PLAN_NAME,
        "original_run_uid": start["uid"],
        "model": model_info,
        "ptycho": ptycho,
        "scan_id": start.get("scan_id"),
        "sample": start.get("sample"),
    }
    return {k: v for k, v in metadata.items() if v is not None}


def _number(kind=np.float64, source: str = "ptychopinn", **extra) -> dict:
    return {"source": source, "dtype": "number", "shape": [], "dtype_numpy": np.dtype(kind).str,
            **extra}


def _array(dims: list[str], shape, units: str = "", source: str = "ptychopinn") -> dict:
    return {"source": source, "dtype": "array", "shape": list(shape),
            "dtype_numpy": np.dtype(np.float32).str, "units": units, "dims": dims}


class _Throttle:
    """At most one publication per ``interval_s``, and none while the previous one is still
    on its way to the subscribers; what arrives in between waits (only the latest) and goes
    out at the next :meth:`due` or forced publication.

    The second rule is back-pressure: a consumer slower than the interval (a TiledWriter on
    a busy server spends up to a second on an event of four images) gets fewer, newer
    snapshots instead of a queue of ever older ones. Measured through the bus with frames read
    through Tiled (bench/bus.py): without it the snapshots queued and reached Tiled 4.8 s
    after their frames (p50).
    """

    def __init__(self, interval_s: float) -> None:
        self.interval_s = interval_s
        self.last = -math.inf
        self.pending = None
        self.in_flight = False

    def due(self, now: float) -> bool:
        return (self.pending is not None and not self.in_flight
                and now - self.last >= self.interval_s)

    def sent(self, after_emitted: Callable[[Callable[[], None]], None]) -> None:
        """An event of this throttle was emitted: hold the next until it is delivered."""
        self.in_flight = True
        after_emitted(self._delivered)

    def _delivered(self) -> None:
        self.in_flight = False


class DerivedRun:
    """Compose the derived run of one raw run from the reconstruction's messages.

    Parameters
    ----------
    start : dict
        The raw run's start document.
    md : PtychoMetadata or None
        Its validated ``ptycho`` metadata (``None`` when it did not validate: the run is
        failed at once).
    model_info : dict
        The derived start document's ``model`` entry.
    settings : WorkerSettings
        Publish interval and the derived-uid rule.
    state : RunState
        Updated from the messages.
    emit : callable
        ``emit(name, doc)``: where the derived documents go (the subscribers' thread).
    after_emitted : callable
        ``after_emitted(action)``: run ``action`` once everything emitted has been delivered.
    """

    def __init__(self, start: dict, md: PtychoMetadata | None, model_info: dict,
                 settings: WorkerSettings, state: RunState, emit: Callable[[str, dict], None],
                 after_emitted: Callable[[Callable[[], None]], None]) -> None:
        self.start_doc, self.md, self.model_info, self.settings = start, md, model_info, settings
        self.state, self.emit, self.after_emitted = state, emit, after_emitted
        self.bundle = None
        self.canvas_shape: tuple[int, int] = (0, 0)
        self._streams: dict[str, object] = {}  # stream name -> descriptor bundle
        interval = settings.publish_interval_s
        self._snapshots, self._refined, self._metrics = (_Throttle(interval), _Throttle(interval),
                                                         _Throttle(interval))
        self._metric_rows: list[tuple[float, dict]] = []
        self._emitted_refined: tuple | None = None
        self.closed = False
        self._lock = threading.RLock()

    # -- messages ----------------------------------------------------------------------------
    def handle(self, kind: str, payload: dict) -> None:
        """Apply one message from the reconstruction (any transport's delivery thread)."""
        with self._lock:
            if self.closed:
                return
            getattr(self, f"_on_{kind}")(payload)

    def _on_opened(self, payload: dict) -> None:
        self._open(payload.get("metadata") or {})

    def _on_canvas(self, payload: dict) -> None:
        self.canvas_shape = tuple(int(s) for s in payload["shape"])
        with self.state.lock:
            self.state.pixel_size_m = float(payload["pixel_size_m"])
            self.state.canvas_origin_px = tuple(float(v) for v in payload["origin_px"])

    def _on_metrics(self, payload: dict) -> None:
        with self.state.lock:
            self.state.frames_done = int(payload["frames_done"])
            self.state.frames_rejected = int(payload["frames_rejected"])
            skipped = self.state.frames_skipped
        row = {"frames_done": payload["frames_done"], "frames_skipped": skipped,
               "frames_rejected": payload["frames_rejected"], **payload["row"]}
        self._metric_rows.append((time.time(), {k: float(v) for k, v in row.items()}))
        self._metrics.pending = True
        self._publish_metrics(force=False)

    def _on_snapshot(self, payload: dict) -> None:
        snap = payload["snapshot"]
        with self.state.lock:
            self.state.snapshot = snap
            self.state.stats = snap.stats
        self._snapshots.pending = snap
        self._publish_snapshot(force=payload.get("force", False))

    def _on_refined(self, payload: dict) -> None:
        snap = payload["snapshot"]
        with self.state.lock:
            self.state.refined = snap
            self.state.best = snap.best
        self._refined.pending = payload
        self._publish_refined(force=payload.get("force", False))

    def _on_final(self, payload: dict) -> None:
        self._emit_refined("final", payload)

    def _on_failed(self, payload: dict) -> None:
        with self.state.lock:
            self.state.failed = self.state.failed or payload["reason"]

    def _on_finished(self, payload: dict) -> None:
        self._flush()
        summary = {"frames_skipped": self.state.frames_skipped, **payload.get("summary", {})}
        _account_missing(summary)
        with self.state.lock:
            self.state.frames_done = int(summary.get("frames_done", self.state.frames_done))
            self.state.frames_rejected = int(summary.get("frames_rejected",
                                                         self.state.frames_rejected))
        exit_status, reason = payload["exit_status"], payload.get("reason", "")
        if exit_status == "success":
            reason = _not_done_here(summary)
            exit_status = "fail" if reason else exit_status
        self._close(exit_status, reason, summary)

    # -- the RunEngine side's own events ------------------------------------------------------
    def fail(self, reason: str) -> None:
        """Close the derived run with ``"fail"`` now (the reconstruction died or never
        started); whatever was published stays, and the stop says why."""
        with self._lock:
            if self.closed:
                return
            logger.error("live reconstruction of run %s failed: %s", self.state.raw_uid, reason)
            with self.state.lock:
                self.state.failed = self.state.failed or reason
            self._flush()
            self._close("fail", reason, {"frames_done": self.state.frames_done,
                                         "frames_skipped": self.state.frames_skipped,
                                         "frames_rejected": self.state.frames_rejected})

    def tick(self) -> None:
        """Publish what waited for its throttle (call every fraction of the interval)."""
        with self._lock:
            if self.closed or self.bundle is None:
                return
            now = time.monotonic()
            if self._snapshots.due(now):
                self._publish_snapshot(force=False)
            if self._refined.due(now):
                self._publish_refined(force=False)
            if self._metrics.due(now):
                self._publish_metrics(force=False)

    # -- composition ---------------------------------------------------------------------------
    def _open(self, extra: dict) -> None:
        if self.bundle is not None:
            return
        metadata = derived_start_metadata(self.start_doc, self.md, self.model_info)
        metadata.update(extra)
        uid = derived_run_uid(self.start_doc["uid"], self.model_info, self.settings)
        self.bundle = compose_run(metadata=metadata, uid=uid)
        with self.state.lock:
            self.state.derived_uid = self.bundle.start_doc["uid"]
        self.emit("start", self.bundle.start_doc)

    def _stream(self, name: str, data_keys: dict):
        if name not in self._streams:
            # The image streams say how their pixels map to the sample (scale bars, overlays).
            configuration = {}
            if name != "metrics":
                now = time.time()
                geometry = {"pixel_size_m": float(self.state.pixel_size_m),
                            "canvas_origin_px": list(self.state.canvas_origin_px)}
                configuration = {"canvas": {
                    "data": geometry, "timestamps": dict.fromkeys(geometry, now),
                    "data_keys": {
                        "pixel_size_m": _number(units="m"),
                        "canvas_origin_px": {"source": "ptychopinn", "dtype": "array",
                                             "shape": [2], "units": "px"}}}}
            bundle = self.bundle.compose_descriptor(name=name, data_keys=data_keys,
                                                    configuration=configuration)
            self.emit("descriptor", bundle.descriptor_doc)
            self._streams[name] = bundle
        return self._streams[name]

    def _flush(self) -> None:
        """Everything still waiting for a throttle goes out now (the run is ending)."""
        if self.bundle is None:
            return
        self._publish_snapshot(force=True)
        self._publish_refined(force=True)
        self._publish_metrics(force=True)

    def _close(self, exit_status: str, reason: str, summary: dict) -> None:
        self._open({"engines": []} if self.bundle is None else {})
        stop = self.bundle.compose_stop(exit_status=exit_status, reason=reason)
        stop["ptychopinn"] = summary  # extra keys are allowed in stop documents
        self.emit("stop", stop)
        self.closed = True
        self.after_emitted(self.state.finished.set)

    def _publish_snapshot(self, force: bool) -> None:
        """The latest stitched object as a ``snapshots`` event, at most once per
        ``publish_interval_s`` unless forced.

        The interval bounds what the derived run's consumers must absorb (a TiledWriter
        spends a few hundred ms on an event of four images): without it a fast scan makes
        them fall further and further behind, and the latest image on screen gets older.
        """
        throttle, now = self._snapshots, time.monotonic()
        snap = throttle.pending
        if snap is None or self.bundle is None or not (force or throttle.due(now)):
            return
        # The canvas can grow (a scan beyond its declared region); the stream keeps its shape.
        origin = self.state.canvas_origin_px
        oy = int(round(origin[0] - snap.origin_px[0]))
        ox = int(round(origin[1] - snap.origin_px[1]))
        h, w = self.canvas_shape
        window = (slice(oy, oy + h), slice(ox, ox + w))
        data = {
            "object_amplitude": snap.amplitude[window],
            "object_phase": snap.phase[window],
            "uncertainty": snap.uncertainty[window].astype(np.float32),
            "weight": snap.weight[window].astype(np.float32),
            "frames": snap.n_frames,
            "crop": int(snap.stats.get("crop", 0)),
        }
        keys = {name: _array(["object_y", "object_x"], (h, w), units) for name, units in
                (("object_amplitude", ""), ("object_phase", "rad"), ("uncertainty", ""),
                 ("weight", ""))}
        keys["frames"] = _number(np.int64, dtype="integer")
        keys["crop"] = _number(np.int64, dtype="integer", units="px")
        stream = self._stream("snapshots", keys)
        self.emit("event", stream.compose_event(data=data,
                                                timestamps=dict.fromkeys(data, time.time())))
        throttle.last, throttle.pending = now, None
        throttle.sent(self.after_emitted)

    def _refined_event(self, payload: dict) -> dict:
        snap: RefinedSnapshot = payload["snapshot"]
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
            "seconds_since_last_frame": float(payload["seconds_since_last_frame"]),
            "photon_scale": float(snap.photon_scale),
            "frames": int(snap.n_frames),
            "refined_is_best": int(snap.best == "refined"),
            "position_correction_rms_px": float(snap.position_correction_rms_px),
        }

    def _emit_refined(self, name: str, payload: dict) -> None:
        if self.bundle is None:
            return
        data = self._refined_event(payload)
        source = "ptychopinn-refine"
        probe_shape = payload["snapshot"].probe.shape
        probe_dims = ["probe_mode", "probe_y", "probe_x"]
        keys = {
            "object_amplitude": _array(["object_y", "object_x"], self.canvas_shape, "", source),
            "object_phase": _array(["object_y", "object_x"], self.canvas_shape, "rad", source),
            "probe_amplitude": _array(probe_dims, probe_shape, "", source),
            "probe_phase": _array(probe_dims, probe_shape, "rad", source),
        }
        for key in ("error", "residual", "network_residual", "epochs", "refine_seconds",
                    "seconds_since_last_frame", "photon_scale", "position_correction_rms_px"):
            keys[key] = _number(source=source)
        keys["frames"] = _number(np.int64, source)
        keys["refined_is_best"] = _number(np.int64, source)
        stream = self._stream(name, keys)
        self.emit("event", stream.compose_event(data=data,
                                                timestamps=dict.fromkeys(data, time.time())))

    def _publish_refined(self, force: bool) -> None:
        """The refiner's latest snapshot as a ``refined`` event, at most once per
        ``publish_interval_s`` unless forced, never the same one twice."""
        throttle, now = self._refined, time.monotonic()
        payload = throttle.pending
        if payload is None or self.bundle is None or not (force or throttle.due(now)):
            return
        snap = payload["snapshot"]
        key = (snap.n_frames, snap.epochs, snap.busy_s)  # identity does not survive a pipe
        if key != self._emitted_refined:
            self._emit_refined("refined", payload)
            self._emitted_refined = key
            throttle.last = now
            throttle.sent(self.after_emitted)
        throttle.pending = None

    def _publish_metrics(self, force: bool) -> None:
        """The pending per-batch rows as one ``metrics`` event page, at most once per
        ``publish_interval_s`` unless forced: one write per interval for a consumer such as
        TiledWriter instead of one per batch."""
        throttle, now = self._metrics, time.monotonic()
        if not self._metric_rows or self.bundle is None or not (force or throttle.due(now)):
            return
        rows, self._metric_rows = self._metric_rows, []
        stream = self._stream("metrics", {k: _number() for k in rows[0][1]})
        times = [t for t, _ in rows]
        data = {k: [row[k] for _, row in rows] for k in rows[0][1]}
        self.emit("event_page", stream.compose_event_page(
            data=data, timestamps={k: times for k in data}, time=times))
        throttle.last, throttle.pending = now, None
        throttle.sent(self.after_emitted)
