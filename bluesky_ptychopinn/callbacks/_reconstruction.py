"""One raw run in, plain messages out: the reconstruction side of the live callback.

:class:`RunReconstruction` is an :class:`event_model.DocumentRouter`: one method per raw
document (the router unpacks ``event_page`` and ``datum_page``). It pairs frames with positions,
feeds the network (:class:`~bluesky_ptychopinn.recon.StreamingReconstructor`) and the refiner
(:class:`~bluesky_ptychopinn.recon.RefinerThread`) and reports through ``send(kind, raw_uid,
payload)``. It never composes a document: the RunEngine side's
:class:`~._derived.DerivedRun` turns the messages into the derived run, whatever carried them
(a queue, a pipe, a message bus). The messages (:data:`MESSAGE_KINDS`):

``opened``     ``{"metadata": dict}``: derived start-document metadata found here (engines, the
               refinement's probe), before any frame.
``canvas``     ``{"shape", "origin_px", "pixel_size_m"}``: the snapshot canvas, at the first frame.
``metrics``    ``{"row": dict, "frames_done", "frames_rejected"}``: one per reconstructed batch.
``snapshot``   ``{"snapshot": Snapshot, "force": bool}``: the stitched network object.
``refined``    ``{"snapshot": RefinedSnapshot, "seconds_since_last_frame", "force": bool}``.
``final``      ``{"snapshot": RefinedSnapshot, "seconds_since_last_frame"}``: after the stop.
``failed``     ``{"reason": str}``: the derived run will stop with ``"fail"``.
``finished``   ``{"exit_status", "reason", "summary"}``: the raw stop document was handled.
"""

from __future__ import annotations

import collections
import logging
import math
import time
from collections.abc import Callable

import numpy as np
import torch
from event_model import DocumentRouter

from ..errors import InvalidInputError
from ..metadata import PtychoMetadata
from ..physics import crop_frames, object_pixel_size_m, stage_to_pixels
from ..recon import PIEOptions, RefinedSnapshot, RefinerThread, StreamingRefiner
from ..recon._crop_choice import CropChooser
from ..recon._streaming import Snapshot, StreamingReconstructor
from ._frames import FramePairer, event_seq_num
from ._paths import DataRoots
from ._run_probe import resolve_run_probe
from ._sanitize import FrameSanitizer
from ._settings import WorkerSettings

__all__ = ["MESSAGE_KINDS", "RunReconstruction"]

logger = logging.getLogger(__name__)

MESSAGE_KINDS = ("opened", "canvas", "metrics", "snapshot", "refined", "final", "failed",
                 "finished")

Send = Callable[[str, str, dict], None]


class RunReconstruction(DocumentRouter):
    """Reconstruct one raw run from its documents; report by messages.

    Parameters
    ----------
    model : torch.nn.Module
        The network.
    model_info : dict
        The derived start document's ``model`` entry (for the probe a model was trained on).
    settings : WorkerSettings
        Batch size, snapshot cadence, device, refinement.
    md : PtychoMetadata
        The raw run's validated ``ptycho`` metadata.
    raw_uid : str
        The raw run's uid (every message carries it).
    send : callable
        ``send(kind, raw_uid, payload)``.
    """

    def __init__(self, model: torch.nn.Module, model_info: dict, settings: WorkerSettings,
                 md: PtychoMetadata, raw_uid: str, send: Send) -> None:
        super().__init__()
        self.model, self.model_info, self.settings = model, model_info, settings
        self.md, self.raw_uid, self._send = md, raw_uid, send
        keys = md.positioner_keys
        self.pairer = FramePairer(md.detector_key, keys.y, keys.x,
                                  data_roots=DataRoots(extra=settings.data_roots),
                                  read_timeout_s=settings.read_timeout_s)
        self.sanitizer = FrameSanitizer(raw_uid)
        self._masked: np.ndarray | None = None  # the detector mask the refiner has
        self.outliers = 0  # positions far outside the declared scan or the canvas limit
        self.canvas_centre_px = np.zeros(2)
        self.recon: StreamingReconstructor | None = None
        self.refiner: RefinerThread | None = None
        self.probe, self.probe_info = None, None
        self.crop_chooser = CropChooser()
        self.failed: str | None = None
        self.finished = False
        self.frames_done = self.frames_rejected = 0
        # Frames that never reached this side, for the stop (see missing_by_cause): the
        # image streams' seq_nums seen, against the raw stop's num_events.
        self._image_streams: dict[str, str] = {}  # descriptor uid -> stream name
        self._seen: dict[str, set[int]] = {}  # stream name -> seq_nums of its events here
        self.missing_by_cause: dict[str, int] = {}
        self.since_snapshot = 0  # frames since the last snapshot message
        self.snapshot: Snapshot | None = None
        self.sent_refined: RefinedSnapshot | None = None
        self.refine_after_stop_s = 0.0
        self.refine_cut_off = False  # the stop rule never held: cancelled past the budget
        self.started_at = time.time()
        self.stop_doc: dict | None = None  # the stop, while frames are still being read
        self.stop_deadline = math.inf  # when a deferred stop finishes whatever is pending

    def send(self, kind: str, payload: dict) -> None:
        self._send(kind, self.raw_uid, payload)

    def fail(self, reason: str) -> None:
        """Record the first failure and tell the RunEngine side; later work is skipped."""
        if self.failed is None:
            logger.error("live reconstruction of run %s failed: %s", self.raw_uid, reason)
            self.failed = reason
            self.send("failed", {"reason": reason})
            if self.refiner is not None:  # its image would belong to a failed run
                self.refiner.cancel()

    # -- documents ---------------------------------------------------------------------------
    def start(self, doc: dict) -> None:
        metadata = {"engines": ["network"]}
        if self.settings.refine:
            dx, n = self._geometry()
            self.probe, self.probe_info = resolve_run_probe(
                self.md.to_document(), self.model_info, n, dx, self.md.energy_ev,
                data_roots=self.pairer.data_roots)
            metadata["engines"].append(self.settings.refine)
            metadata["refinement"] = {
                "engine": self.settings.refine, "probe": self.probe_info,
                "budget_after_stop_s": self.settings.refine_budget_s,
                "duty": self.settings.refine_duty, "batch_size": self.settings.refine_batch_size,
                "position_correction": self.settings.refine_positions,
                "start": "flat from the first frames; later network images weighed against "
                         "the refined state by the Fourier-magnitude residual",
            }
        self.send("opened", {"metadata": metadata})

    def descriptor(self, doc: dict) -> None:
        if self.pairer.descriptor(doc):
            self._image_streams[doc["uid"]] = doc.get("name", "primary")

    def resource(self, doc: dict) -> None:
        self.pairer.resource(doc)

    def datum(self, doc: dict) -> None:
        self.pairer.datum(doc)
        self._drain(final=False)

    def stream_resource(self, doc: dict) -> None:
        self.pairer.stream_resource(doc)

    def stream_datum(self, doc: dict) -> None:
        self.pairer.stream_datum(doc)
        self._drain(final=False)

    def event(self, doc: dict) -> None:
        stream = self._image_streams.get(doc["descriptor"])
        seq = event_seq_num(doc)
        if stream is not None and seq is not None:
            self._seen.setdefault(stream, set()).add(seq)
        self.pairer.event(doc)
        self._drain(final=False)

    def stop(self, doc: dict) -> None:
        """Reconstruct what is left, refine to the stop rule, report ``finished``.

        While a detector file is slow to answer (a hung mount), the run finishes later, from
        :meth:`idle`, once the file has answered or its reads have timed out: the loop goes
        on serving the other runs meanwhile."""
        self.stop_doc = doc
        self.pairer.stopping = True
        # (the reads in progress time out by read_timeout_s; this bounds the queue behind
        # them too, so a deferred stop always ends)
        self.stop_deadline = time.monotonic() + 2 * self.settings.read_timeout_s
        self._finish_when_read()

    def _finish_when_read(self) -> None:
        """Finish the stopped run once no read is pending (or it failed, or the deadline)."""
        if not self.failed and time.monotonic() < self.stop_deadline:
            try:
                self.pairer.collect_reads()
            except Exception as exc:
                logger.exception("run %s: error reading its last frames", self.raw_uid)
                self.fail(f"{type(exc).__name__} while reading the last frames: {exc}")
            if self.pairer.reading and not self.failed:
                return
        self._finish(self.stop_doc)

    def force_finish(self) -> None:
        """End the run now as ``"fail"`` (its stop could not be completed) and free what it
        holds; the serve loop's last resort, so that every run sends ``finished`` once."""
        if not self.finished:
            self.send("finished", {"exit_status": "fail",
                                   "reason": self.failed or "stop failed",
                                   "summary": {"frames_done": self.frames_done,
                                               "frames_rejected": self.frames_rejected}})
            self.finished = True
        self.close()

    def _finish(self, doc: dict) -> None:
        steps = (("finishing", lambda: self._drain(final=True)),
                 ("finishing the refinement", self._finish_refinement))
        for what, step in steps:
            try:
                step()
            except Exception as exc:
                logger.exception("run %s: error while %s", self.raw_uid, what)
                self.fail(f"{type(exc).__name__} while {what}: {exc}")
        missing = self.pairer.abandon()
        if missing:
            logger.warning("run %s: %d frame(s) referenced but never in their file",
                           self.raw_uid, missing)
        self.pairer.close()
        self.missing_by_cause = self._missing(doc)
        if self.missing_by_cause:
            logger.warning("run %s: frames that never came: %s", self.raw_uid,
                           self.missing_by_cause)
        unpaired = self.pairer.unpaired
        if unpaired:
            logger.warning("run %s: %d frame(s) without a position or image at stop",
                           self.raw_uid, unpaired)
        raw_status = doc.get("exit_status", "success")
        status = "fail" if self.failed else raw_status
        reason = self.failed or (doc.get("reason", "") if raw_status != "success" else "")
        if status == "success":
            not_done = self._not_done()  # a derived run never says "success" for work not done
            if not_done:
                logger.error("run %s: %s", self.raw_uid, not_done)
                status, reason = "fail", not_done
        self.send("finished", {"exit_status": status, "reason": reason,
                               "summary": self.summary()})
        self.finished = True

    def _missing(self, stop: dict) -> dict[str, int]:
        """Frames of the raw run that never came here, by cause.

        ``not_received``: events the raw stop's ``num_events`` counts in the image streams
        that never arrived (a bus that lost or expired them; on the RunEngine side, those
        dropped for back-pressure, which :class:`~._derived.DerivedRun` reports as skipped
        instead). ``no_frame``: events that came without their frame, which never followed
        (a worker's Tiled never served it, a legacy Datum never came). Unknown (not counted)
        where the stop has no ``num_events`` for a stream.
        """
        counts = stop.get("num_events") or {}
        not_received = 0
        for stream in set(self._image_streams.values()):
            expected = counts.get(stream)
            if isinstance(expected, (int, float)):
                not_received += max(0, int(expected) - len(self._seen.get(stream, ())))
        pairer = self.pairer
        no_frame = len(set(pairer.positions) - set(pairer.frames) - set(pairer.pending_refs))
        causes = {"not_received": not_received, "no_frame": no_frame}
        return {k: v for k, v in causes.items() if v}

    @property
    def rejected(self) -> dict[str, int]:
        """Frames not reconstructed, by cause (pairing, frame content, positions)."""
        causes = collections.Counter(self.pairer.problems) + self.sanitizer.rejected
        if self.outliers:
            causes["position_outlier"] += self.outliers
        return {k: v for k, v in causes.items() if v}

    def _not_done(self) -> str:
        """Why the run must not be called a success, or "" (most frames reconstructed).

        Events that never came (``missing_by_cause["not_received"]``) are not counted here:
        only the RunEngine side can tell them from those it skipped for back-pressure."""
        rejected = self.rejected
        total = self.frames_done + sum(rejected.values()) + self.pairer.unpaired
        no_frame = self.missing_by_cause.get("no_frame", 0)
        causes = ", ".join([f"{v} {k}" for k, v in sorted(rejected.items())]
                           + ([f"{no_frame} whose frame never came"] if no_frame else []))
        if self.frames_done == 0:
            pairer = self.pairer
            if not pairer.descriptors and pairer.other_rows:
                return (f"no frame reconstructed: no stream of the run has the image "
                        f"{pairer.image_key!r} with positions {pairer.y_key!r}, "
                        f"{pairer.x_key!r} (its data keys: {sorted(pairer.other_keys)[:12]})")
            if pairer.refused:
                return ("no frame reconstructed: detector file(s) not read: "
                        + next(iter(pairer.refused.values())))
            if total == 0:
                return "no frame reconstructed: the run has no frames"
            return f"no frame reconstructed of {total} ({causes or 'unpaired'})"
        if self.frames_done < 0.5 * total:
            return (f"only {self.frames_done} of {total} frames reconstructed "
                    f"({causes or f'{self.pairer.unpaired} unpaired'})")
        return ""

    def idle(self) -> None:
        """No document for a while (a pause, a feedback decision): reconstruct what is
        pending now instead of waiting for a full batch, and report the latest images; after
        the stop, finish once the last frames are read."""
        if self.finished:
            return
        if self.stop_doc is not None:
            self._finish_when_read()
            return
        if self.failed:
            return
        self._drain(final=False, force=True)
        if self.recon is not None and self.recon.pending:
            self.recon.flush()
            self.since_snapshot = max(self.since_snapshot, 1)
        self._snapshot()
        self._send_refined()

    # -- reconstruction ----------------------------------------------------------------------
    def _geometry(self) -> tuple[float, int]:
        """Object pixel (m) at the model's frame size, and that size."""
        md = self.md
        n_model = self.model.config.frame_size
        n_det = int(md.frame_size or n_model)
        dx_det = object_pixel_size_m(md.energy_ev, md.detector_distance_m,
                                     md.detector_pixel_size_m, n_det)
        return dx_det * n_det / n_model, n_model

    def _make_reconstructor(self) -> StreamingReconstructor:
        dx, n = self._geometry()
        scan = self.md.scan or {}
        extent = _scan_pair(scan, "extent_m") / dx
        centre = _scan_pair(scan, "center_m")
        centre_px = stage_to_pixels(centre[None], dx, sign=self.md.position_sign)[0]
        side = np.ceil(np.abs(extent) + n + 2 * self.settings.canvas_margin_px).astype(int)
        limit = self.settings.max_canvas_px
        if (side > limit).any():
            # Checked before anything is allocated: the canvas the start document asks for
            # would be held by every crop candidate and the refiner.
            raise InvalidInputError(
                f"ptycho.scan.extent_m {scan.get('extent_m')} is {side.tolist()} px of "
                f"{dx:.3g} m, beyond max_canvas_px={limit} (an extent in other units?)")
        origin = centre_px - side / 2
        self.canvas_centre_px = centre_px
        shape = (int(side[0]), int(side[1]))
        self.send("canvas", {"shape": shape, "origin_px": (float(origin[0]), float(origin[1])),
                             "pixel_size_m": dx})
        if self.settings.refine and self.probe_info is not None:
            self._start_refiner(origin, shape)
        return StreamingReconstructor(
            self.model, object_shape=shape, origin_px=tuple(origin),
            batch_size=self.settings.batch_size, device=self.settings.device,
            crop=self.settings.crop, max_canvas_px=self.settings.max_canvas_px,
        )

    def _start_refiner(self, origin: np.ndarray, shape: tuple[int, int]) -> None:
        """The refinement tier: rPIE on the same canvas, in its own thread (never in the way
        of the network preview: it only takes frames and hands back snapshots)."""
        settings = self.settings
        options = PIEOptions(engine=settings.refine, batch_size=settings.refine_batch_size,
                             device=settings.device, progress=False, seed=0,
                             position_correction=settings.refine_positions)
        refiner = StreamingRefiner(self.probe, object_shape=shape, origin_px=tuple(origin),
                                   options=options, frame_size=self.model.config.frame_size,
                                   max_canvas_px=settings.max_canvas_px)
        self.refiner = RefinerThread(refiner, snapshot_interval_s=settings.publish_interval_s,
                                     duty=settings.refine_duty,
                                     name=f"ptychopinn-refine-{self.raw_uid[:8]}")
        self.refiner.start()

    def _drain(self, final: bool, force: bool = False) -> None:
        if self.failed:
            return
        while True:
            frames, positions, seqs = self.pairer.pop_ready()
            if not seqs:
                break
            if len(seqs) < self.settings.batch_size and not (final or force):
                # put them back until a full batch has gathered (latency vs throughput)
                self.pairer.put_back(frames, positions, seqs)
                break
            self._reconstruct(frames, positions)
        if final:
            if self.recon is not None:
                self.recon.flush()
            self._snapshot(force=True)

    def _reconstruct(self, frames: np.ndarray, positions: np.ndarray) -> None:
        if self.recon is None:
            self.recon = self._make_reconstructor()
        dx, n = self._geometry()
        rejected_before = sum(self.rejected.values())
        counts, good = self.sanitizer.clean(frames)
        positions = positions[good]
        if len(counts) and counts.shape[-1] != n:
            counts = crop_frames(counts, n)
            # A frame whose few counts all lie outside the crop (a stray count on a dark
            # frame) carries nothing the model sees; the engines refuse all-zero frames.
            lit = counts.reshape(len(counts), -1).sum(axis=1) > 0
            if not lit.all():
                self.sanitizer.rejected["empty_after_crop"] += int((~lit).sum())
                counts, positions = counts[lit], positions[lit]
        positions_m = positions * self.md.position_scale_m  # units converted at the boundary
        positions_px = stage_to_pixels(positions_m, dx, sign=self.md.position_sign)
        inside = self._inside(positions_m, positions_px, dx, n)
        counts, positions_px = counts[inside], positions_px[inside]
        self.frames_rejected = sum(self.rejected.values())
        if self.frames_rejected > rejected_before:
            logger.warning("run %s: %d frame(s) not reconstructed (so far: %s)", self.raw_uid,
                           self.frames_rejected - rejected_before, self.rejected)
        if not len(counts):
            self._send_metrics(0, 0.0)
            return
        t0 = time.perf_counter()
        self.recon.add(counts, positions_px)
        latency = time.perf_counter() - t0
        if self.refiner is not None and not self.refiner.failed:
            # (a refiner that failed consumes nothing: frames would only pile up in it)
            if self.refiner.refiner.start is None and self.recon.n_frames:
                # Until the refiner has started, every network image is a candidate start.
                snap = self.recon.snapshot()
                self.refiner.offer_seed(snap.object, snap.weight, snap.origin_px)
            bad = self.sanitizer.bad_pixels
            if bad is not None and bad is not self._masked:  # only when the mask grew
                self.refiner.refiner.mask_pixels(_centre_crop(bad, n))
                self._masked = bad
            self.refiner.add(counts, positions_px)
        if len(self.recon.crop_candidates) > 1:
            self.crop_chooser.observe(counts, positions_px)
        done = len(counts)
        self.frames_done += done
        self._send_metrics(done, latency)
        self.since_snapshot += done
        if self.since_snapshot >= self.settings.snapshot_every:
            self._snapshot()
        # During a scan without pauses idle() never runs: refined images go out from here too.
        self._send_refined()

    def _inside(self, positions_m: np.ndarray, positions_px: np.ndarray, dx: float,
                n: int) -> np.ndarray:
        """Positions to use: within the declared scan (with a margin: jitter, a scan a
        little larger than declared) and within the canvas limit. One glitched encoder
        reading far away would otherwise grow the canvas, and memory, without bound."""
        keep = np.ones(len(positions_m), bool)
        scan = self.md.scan or {}
        extent = np.abs(np.asarray(scan.get("extent_m", (0.0, 0.0)), dtype=float))
        if extent.shape == (2,) and (extent > 0).all():
            centre = np.asarray(scan.get("center_m", (0.0, 0.0)), dtype=float)
            margin = np.maximum(0.25 * extent, 2 * n * dx)
            keep &= (np.abs(positions_m - centre) <= extent / 2 + margin).all(axis=1)
        limit = self.settings.max_canvas_px / 2 - n
        keep &= (np.abs(positions_px - self.canvas_centre_px) <= limit).all(axis=1)
        self.outliers += int((~keep).sum())
        return keep

    def _send_metrics(self, done: int, latency: float) -> None:
        self.send("metrics", {"row": {"batch_frames": done, "batch_latency_s": latency,
                                      "frames_per_s": self.recon.stats()["frames_per_s"]},
                              "frames_done": self.frames_done,
                              "frames_rejected": self.frames_rejected})

    def _snapshot(self, force: bool = False) -> None:
        """A new stitched image every ``snapshot_every`` frames (and when forced): to the
        RunEngine side, and to the refiner as a candidate start."""
        if self.recon is None or (self.since_snapshot == 0 and not force):
            return
        if force or self.snapshot is None or self.snapshot.n_frames != self.recon.n_frames:
            self._choose_crop(force)
            self.snapshot = self.recon.snapshot()
            if self.refiner is not None:
                self.refiner.offer_seed(self.snapshot.object, self.snapshot.weight,
                                        self.snapshot.origin_px)
        self.send("snapshot", {"snapshot": self.snapshot, "force": force})
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
    def _send_refined(self, force: bool = False) -> None:
        if self.refiner is None:
            return
        snap = self.refiner.latest
        if snap is None or (snap is self.sent_refined and not force):
            return
        self.send("refined", {"snapshot": snap, "force": force,
                              "seconds_since_last_frame": self._since_last_frame()})
        self.sent_refined = snap

    def _since_last_frame(self) -> float:
        return float(time.monotonic() - self.refiner.last_frame_at)

    def _finish_refinement(self) -> None:
        """After the last frame: refine until the stop rule (epochs, time budget or
        convergence), reporting as it goes; then the final refined image."""
        if self.refiner is None or self.failed:
            return  # (a failed run's refiner was cancelled: no refined or final image)
        t0 = time.monotonic()
        settings = self.settings
        self.refiner.finish(max_epochs=settings.refine_epochs, time_s=settings.refine_budget_s,
                            tol=settings.refine_tol)
        deadline = t0 + settings.refine_budget_s + 30.0  # a stuck refiner must not hold the run
        while not self.refiner.done.wait(settings.publish_interval_s):
            self._send_refined()
            if time.monotonic() > deadline:
                logger.error("run %s: refinement still running %.0f s after its budget: "
                             "cut off", self.raw_uid, time.monotonic() - t0)
                self.refiner.cancel()
                self.refine_cut_off = True
                break
        self.refine_after_stop_s = time.monotonic() - t0
        if self.refiner.failed:
            raise RuntimeError(f"refinement: {self.refiner.failed}")
        final = self.refiner.final or self.refiner.latest
        if final is None:
            return  # too few frames to refine: said so in the summary
        self._send_refined(force=True)
        self.send("final", {"snapshot": final,
                            "seconds_since_last_frame": self._since_last_frame()})

    # -- the stop summary ---------------------------------------------------------------------
    def _refinement_summary(self) -> dict:
        if self.refiner is None:
            return {"ran": False, "probe": self.probe_info} if self.probe_info else {"ran": False}
        snap = self.refiner.final or self.refiner.latest
        refiner = self.refiner.refiner
        summary = {
            "ran": snap is not None, "engine": self.settings.refine, "probe": self.probe_info,
            "frames": refiner.n_frames, "frames_not_refined": refiner.frames_dropped,
            "seconds_after_stop": self.refine_after_stop_s, "failed": self.refiner.failed,
            "cut_off": self.refine_cut_off,
        }
        if snap is not None:
            summary.update(epochs=snap.epochs, error=snap.error, residual=snap.residual,
                           network_residual=snap.network_residual, best=snap.best,
                           start=snap.start, start_residuals=snap.start_residuals,
                           reconsiderations=snap.reconsiderations, refine_seconds=snap.busy_s,
                           position_correction_rms_px=snap.position_correction_rms_px)
        return {k: (v if not (isinstance(v, float) and not math.isfinite(v)) else None)
                for k, v in summary.items()}

    def summary(self) -> dict:
        """What this side knows for the derived stop document's ``ptychopinn`` entry."""
        summary = {
            "frames_done": self.frames_done,
            "frames_rejected": self.frames_rejected,
            "frames_rejected_by_cause": self.rejected,
            "masked_detector_pixels": self.sanitizer.summary()["masked_detector_pixels"],
            "negative_pixels_clipped": self.sanitizer.clipped_pixels,
            # events whose frame never came are frames_missing, not unpaired
            "frames_unpaired": self.pairer.unpaired - self.missing_by_cause.get("no_frame", 0),
            "frames_missing": sum(self.missing_by_cause.values()),
            "frames_missing_by_cause": dict(self.missing_by_cause),
            "frames_repeated": self.pairer.repeated,
            "seconds": time.time() - self.started_at,
        }
        if self.recon is not None:
            summary.update({k: v for k, v in self.recon.stats().items()
                            if isinstance(v, (int, float)) and math.isfinite(v)})
            summary["stitching"] = {"crop": self.recon.crop,
                                    "candidates": list(self.recon.crop_candidates),
                                    "scores": {str(k): v for k, v in
                                               self.recon.crop_scores.items()
                                               if math.isfinite(v)}}
        summary["refinement"] = self._refinement_summary()
        return summary

    def close(self) -> None:
        """Stop the refiner and close files (a run abandoned without its stop document)."""
        if self.refiner is not None:
            self.refiner.cancel()
        self.pairer.close()


def _scan_pair(scan: dict, key: str) -> np.ndarray:
    """``scan[key]`` (default (0, 0)) as two finite floats, or a clear error naming it."""
    value = scan.get(key, (0.0, 0.0))
    try:
        pair = np.asarray(value, dtype=float)
    except (TypeError, ValueError):
        pair = np.empty(0)
    if pair.shape != (2,) or not np.isfinite(pair).all():
        raise InvalidInputError(f"ptycho.scan.{key}: two finite numbers (y, x) in metres "
                                f"expected, got {value!r}")
    return pair


def _centre_crop(mask: np.ndarray, n: int) -> np.ndarray:
    """The centre n x n of a detector mask (frames are centre-cropped the same way)."""
    h, w = mask.shape
    top, left = (h - n) // 2, (w - n) // 2
    return mask[top : top + n, left : left + n]
