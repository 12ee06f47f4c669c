"""``ptycho_scan_with_feedback``: acquisition steered by the live reconstruction."""

from __future__ import annotations

import logging
import time

import numpy as np
from bluesky import plan_stubs as bps
from bluesky import preprocessors as bpp
from bluesky.utils import RunEngineControlException
from ophyd import Component as Cpt
from ophyd import Device, Signal

from ..errors import InvalidInputError
from ..recon._residual import place_on_canvas
from ._metadata import ptycho_metadata
from ._ptycho_scan import _check_limits, scan_points, to_stage_units
from ._recommenders import ReconstructionView, make_recommender

__all__ = ["ptycho_scan_with_feedback", "FeedbackState"]

logger = logging.getLogger(__name__)


class FeedbackState(Device):
    """Soft signals that make a feedback scan explain itself.

    Read with every frame (``iteration``: 0 = overview, k = decision k) and, once per decision,
    into the ``feedback`` stream (``n_points``, ``score``, ``change``, ``frames_reconstructed``,
    ``refined``: 1 when the decision was made from the refined image, 0 from the network's).
    """

    iteration = Cpt(Signal, value=0, kind="hinted")
    n_points = Cpt(Signal, value=0)
    score = Cpt(Signal, value=0.0)
    change = Cpt(Signal, value=float("nan"))
    frames_reconstructed = Cpt(Signal, value=0)
    refined = Cpt(Signal, value=0)
    strategy = Cpt(Signal, value="", kind="config")


def _acquire(detector, stage, feedback, points):
    """Measure at ``points`` (stage units)."""
    for y, x in points:
        yield from bps.mv(stage.y, float(y), stage.x, float(x))
        yield from bps.trigger_and_read([detector, stage, feedback])


def _wait_for_reconstruction(recon, uid: str, acquired: int, timeout: float):
    """Poll (never block the RunEngine) until the live callback has handled every frame."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = recon.latest(uid)
        if state is not None:
            handled = state.frames_done + state.frames_rejected + state.frames_skipped
            if state.failed or (handled >= acquired and state.snapshot is not None
                                and state.snapshot.n_frames >= state.frames_done):
                return state
        yield from bps.sleep(0.05)
    logger.warning("feedback: reconstruction did not catch up within %.1f s", timeout)
    return recon.latest(uid)


def _wait_for_refinement(recon, uid: str, timeout: float):
    """When the callback refines: poll until the refined estimate holds every frame the
    network reconstructed and has made a further pass over them (or ``timeout``), so that a
    decision made from it sees the whole scan. Returns at once when the callback does not
    refine."""
    if not getattr(getattr(recon, "settings", None), "refine", None):
        return recon.latest(uid)
    deadline = time.monotonic() + timeout
    caught_up_at = None  # epochs when the refined estimate first held every frame
    while time.monotonic() < deadline:
        state = recon.latest(uid)
        if state is None or state.failed:
            return state
        refined = state.refined
        if refined is not None and refined.n_frames >= state.frames_done:
            if caught_up_at is None:
                caught_up_at = refined.epochs
            elif refined.epochs >= caught_up_at + 1:
                return state
        yield from bps.sleep(0.05)
    return recon.latest(uid)


def ptycho_scan_with_feedback(
    detector,
    stage,
    recon,
    *,
    geometry: dict,
    region_center_m=(0.0, 0.0),
    region_extent_m=(4e-6, 4e-6),
    coarse_step_m: float = 0.8e-6,
    fine_step_m: float = 0.3e-6,
    strategy="feature",
    budget: int = 400,
    points_per_decision: int = 48,
    max_decisions: int = 20,
    tolerance: float | None = None,
    wait_timeout_s: float = 30.0,
    refine_wait_s: float = 10.0,
    md: dict | None = None,
):
    """Ptychography scan that decides where to measure from the live reconstruction.

    A coarse raster overview of the region comes first; then, repeatedly, the plan waits (by
    polling between ``bps.sleep`` steps, so pause/resume/abort keep working) until the live
    callback has reconstructed every frame, asks the recommender for the next points, records
    the decision, and measures them. It stops when the point budget is spent, the recommender
    has nothing left, ``max_decisions`` is reached, or the reconstruction changes by less than
    ``tolerance`` (relative) between decisions.

    Parameters
    ----------
    detector, stage : ophyd devices
        As for :func:`ptycho_scan`.
    recon : LiveReconstruction
        The live callback subscribed to the same RunEngine.
    geometry : dict
        Beamline geometry (energy, distance, detector pixel size...).
    region_center_m, region_extent_m : (float, float)
        The region of interest (y, x) in metres.
    coarse_step_m, fine_step_m : float
        Overview and fine-scan steps.
    strategy : {"feature", "uncertainty"} or Recommender
        Feature-driven (fine points where the best current estimate, the refined image when
        it explains the frames better, has structure not yet finely sampled; none over empty
        background: :class:`FeatureRecommender`) or uncertainty-driven (add points where the
        network's overlapping predictions disagree), or any object with the Recommender API
        (e.g. :class:`OptimizerRecommender` wrapping a bluesky-adaptive optimizer).
    budget : int
        Maximum number of frames in the whole scan.
    points_per_decision : int
        Points measured after each decision.
    tolerance : float, optional
        Convergence stop rule on the relative change of the stitched object.
    wait_timeout_s : float
        Longest wait for the reconstruction to catch up before deciding anyway.
    refine_wait_s : float
        When the callback refines: longest further wait for the refined estimate to hold
        every frame and make one more pass over them (decisions use the better of the two
        estimates, ``RunState.best``).
    md : dict, optional
        Extra start-document metadata.

    Returns
    -------
    dict
        Summary: frames, decisions, stop reason (also in the ``feedback`` stream).
    """
    recommender = make_recommender(strategy, region_center_m=region_center_m,
                                   region_extent_m=region_extent_m, fine_step_m=fine_step_m)
    overview = scan_points("raster", region_extent_m, center_m=region_center_m,
                           step_m=coarse_step_m)
    if len(overview) > budget:
        raise InvalidInputError(f"budget {budget} is smaller than the {len(overview)}-point "
                                "overview; raise the budget or the coarse step")
    if "ptycho" in (md or {}):
        raise InvalidInputError("md: 'ptycho' is written by the plan from geometry; pass "
                                "those fields in geometry instead")
    feedback = FeedbackState(name="feedback")
    feedback.strategy.put(getattr(recommender, "name", type(recommender).__name__))
    scan = {"pattern": "feedback", "extent_m": list(map(float, region_extent_m)),
            "center_m": list(map(float, region_center_m)), "coarse_step_m": coarse_step_m,
            "fine_step_m": fine_step_m, "budget": budget, "strategy": feedback.strategy.get(),
            "points_per_decision": points_per_decision, "tolerance": tolerance}
    _md = {
        "plan_name": "ptycho_scan_with_feedback",
        "detectors": [detector.name],
        "motors": [stage.y.name, stage.x.name],
        "ptycho": ptycho_metadata(detector, stage, geometry, scan),
        **(md or {}),
    }
    ptycho = _md["ptycho"]
    units, sign = ptycho["position_units"], int(ptycho["position_sign"])
    # Everything here is in stage metres (the recommenders' unit); the stage gets its own.
    _check_limits(stage, to_stage_units(overview, ptycho), units)
    summary = {"frames": 0, "decisions": 0, "stop_reason": ""}

    @bpp.stage_decorator([detector, stage])
    def run():
        # bpp.run_wrapper, keeping the uid open_run returns: the plan steers from the state of
        # its own run only, never from whatever run the callback saw last.
        uid = yield from bps.open_run(md=_md)

        def except_plan(exc):
            if isinstance(exc, RunEngineControlException):
                yield from bps.close_run(exit_status=exc.exit_status)
            else:
                yield from bps.close_run(exit_status="fail", reason=str(exc))

        yield from bpp.contingency_wrapper(inner(uid), except_plan=except_plan,
                                           else_plan=bps.close_run)
        return uid

    def inner(uid: str):
        visited = [p for p in overview]
        yield from _acquire(detector, stage, feedback, to_stage_units(overview, ptycho))
        summary["frames"] = len(overview)
        previous = None
        for decision in range(1, max_decisions + 1):
            if recon.latest(uid) is None:
                summary["stop_reason"] = ("reconstruction unavailable: the live callback has "
                                          "not seen this run (is it subscribed to this "
                                          "RunEngine?)")
                break
            state = yield from _wait_for_reconstruction(recon, uid, summary["frames"],
                                                        wait_timeout_s)
            if state is not None and not state.failed and state.snapshot is not None:
                state = yield from _wait_for_refinement(recon, uid, refine_wait_s)
            if state is None or state.failed or state.snapshot is None:
                summary["stop_reason"] = "reconstruction unavailable" + (
                    f": {state.failed}" if state is not None and state.failed else "")
                break
            snap = state.snapshot
            view = _best_view(state, sign)
            change = _relative_change(previous, snap)
            previous = snap
            remaining = budget - summary["frames"]
            n = min(points_per_decision, remaining)
            points, info = recommender.suggest(view, n, np.asarray(visited)) if n > 0 else (
                np.zeros((0, 2)), {})
            points = _checked_suggestion(points, n, recommender)
            if len(points):
                _check_limits(stage, to_stage_units(points, ptycho), units)
            yield from bps.mv(feedback.iteration, decision, feedback.n_points, len(points),
                              feedback.score, float(info.get("score_max", 0.0)),
                              feedback.change, float(change),
                              feedback.frames_reconstructed, int(state.frames_done),
                              feedback.refined, int(view.estimate == "refined"))
            yield from bps.trigger_and_read([feedback], name="feedback")
            summary["decisions"] = decision
            if remaining <= 0:
                summary["stop_reason"] = "budget"
                break
            if tolerance is not None and change < tolerance:
                summary["stop_reason"] = f"converged (change {change:.3g} < {tolerance})"
                break
            if not len(points):
                summary["stop_reason"] = "nothing left to measure"
                break
            yield from _acquire(detector, stage, feedback, to_stage_units(points, ptycho))
            visited.extend(points)
            summary["frames"] += len(points)
        else:
            summary["stop_reason"] = "max_decisions"

    summary["uid"] = yield from run()
    return summary


def _checked_suggestion(points, n: int, recommender) -> np.ndarray:
    """A recommender's points as (k, 2) metres, at most ``n`` of them (the Recommender
    contract says "up to n"; a wrapped optimizer may return more, which would overrun the
    budget), all finite."""
    name = getattr(recommender, "name", type(recommender).__name__)
    try:
        points = np.asarray(points, dtype=float).reshape(-1, 2)
    except (TypeError, ValueError) as exc:
        raise InvalidInputError(f"recommender {name!r}: expected (k, 2) positions in metres, "
                                f"got {np.shape(points)}") from exc
    if not np.isfinite(points).all():
        raise InvalidInputError(f"recommender {name!r}: suggested non-finite positions")
    if len(points) > n:
        logger.warning("feedback: recommender %r suggested %d points for %d; measuring the "
                       "first %d", name, len(points), n, n)
        points = points[:n]
    return points


def _best_view(state, sign: int = 1) -> ReconstructionView:
    """The recommenders' view of the run: the best current estimate (the refined object,
    placed on the network's canvas, when ``state.best == "refined"``; else the network's),
    with the network's coverage and uncertainty. ``sign``: the run's ``position_sign``, with
    which the callback placed the frames (canvas pixels go back to stage metres with it)."""
    snap = state.snapshot
    obj, estimate, frames = snap.object, "network", snap.n_frames
    refined = getattr(state, "refined", None)
    if refined is not None and getattr(state, "best", "network") == "refined":
        obj = place_on_canvas(refined.object, refined.origin_px, snap.object.shape,
                              snap.origin_px)
        estimate, frames = "refined", refined.n_frames
    return ReconstructionView(obj, snap.weight, snap.uncertainty, snap.origin_px,
                              state.pixel_size_m, sign=sign, estimate=estimate, frames=frames)


def _relative_change(previous, snap) -> float:
    if previous is None or previous.object.shape != snap.object.shape:
        return float("inf")
    both = (previous.weight > 0) & (snap.weight > 0)
    if not both.any():
        return float("inf")
    a, b = previous.object[both], snap.object[both]
    # compare after removing a global phase (the network's phase reference may drift)
    c = np.vdot(a, b)
    b = b * np.exp(-1j * np.angle(c)) if abs(c) > 0 else b
    return float(np.linalg.norm(b - a) / max(np.linalg.norm(b), 1e-12))
