"""Steering that pays? Dose-to-quality of ``ptycho_scan_with_feedback`` against rasters.

    .venv/bin/python bench/steering.py [--samples islands,particles,star_chip]
                                       [--budgets 0.15,0.25,0.5,0.75] [--quick]
                                       [--no-report | --report-only]

For each sample with localised structure (a few features on an empty background, built here
with numpy and mounted on the simulated beamline as an array), with a real RunEngine and
``LiveReconstruction`` (thread isolation, 1 torch thread, the default rPIE refinement tier):

1. the reference: a raster at the fine step over the whole region (``N_raster`` frames);
2. ``ptycho_scan_with_feedback`` (strategy ``feature``) with budgets of 15, 25, 50 and 75 %
   of ``N_raster`` (and, at 50 %, the feature strategy as it was before, for comparison);
3. the control with the same frame budgets: a raster over the whole region with a coarser
   step (``fine / sqrt(fraction)``), i.e. what the frames buy without steering.

Quality is the phase FRC-AUC (0 to 0.5 Nyquist, ``metrics.compare_objects``, registered)
inside the regions of interest only: ROI = where the truth has structure (``|O - 1| > 0.02``,
dilated by 3 px), one box per connected feature (padded by 6 px), averaged over the boxes.
The image scored is the best estimate at the end of the run (``RunState.best``: the refined
object when its Fourier residual is lower, as a viewer shows it), read from the documents the
callback emits; its quality vs frames during the run comes from the emitted ``refined`` and
``snapshots`` events. Results: ``bench/results/steering.json``, ``docs/figures/steering.png``
and the steering section of ``docs/performance.md``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from core import machine  # noqa: E402

from bluesky_ptychopinn.synthetic import cells, procedural_base_map, siemens_star, test_chip  # noqa: E402,E501

MARKER = "<!-- steering-bench -->"
RESULTS = ROOT / "bench" / "results" / "steering.json"
FIGURE = ROOT / "docs" / "figures" / "steering.png"
SHAPE = (256, 256)
AMP_LO, PHASE_LO = 0.8, -0.5  # full material (empty = amplitude 1, phase 0), as the samples
ROI_THRESHOLD = 0.02


# -- samples --------------------------------------------------------------------------------
def _material(obj: np.ndarray) -> np.ndarray:
    """Projected material t of a built-in sample (amplitude = 1 - 0.2 t)."""
    return np.clip((1.0 - np.abs(obj)) / (1.0 - AMP_LO), 0.0, 1.0)


def _disc(size: int, radius: float, soft: float = 2.0) -> np.ndarray:
    r = np.hypot(*np.meshgrid(np.arange(size) - (size - 1) / 2, np.arange(size) - (size - 1) / 2,
                              indexing="ij"))
    return np.clip((radius - r) / soft + 0.5, 0.0, 1.0)


def _paste(t: np.ndarray, patch: np.ndarray, centre: tuple[int, int]) -> None:
    h, w = patch.shape
    y0, x0 = centre[0] - h // 2, centre[1] - w // 2
    region = t[y0:y0 + h, x0:x0 + w]
    np.maximum(region, patch, out=region)


def make_sample(name: str) -> np.ndarray:
    """A 256 x 256 complex object: a few isolated features on an exactly flat background."""
    t = np.zeros(SHAPE)
    if name == "islands":  # three discs of procedural texture
        for k, (centre, radius) in enumerate((((78, 84), 19), ((150, 178), 17),
                                              ((182, 88), 15))):
            size = 2 * radius + 6
            texture = procedural_base_map((size, size), seed=10 + k)
            _paste(t, 0.3 + 0.7 * texture * _disc(size, radius), centre)
            t[t == 0.3] = 0  # the texture's floor outside the disc stays empty
        t *= t > 0.3
        t = ndimage.gaussian_filter(t, 0.7)
    elif name == "particles":  # six cells, 8 to 18 px in radius
        centres = ((72, 74), (74, 160), (122, 120), (176, 70), (186, 160), (140, 196))
        for k, centre in enumerate(centres):
            m = _material(cells(200, n=1, seed=20 + k))
            rows, cols = ndimage.find_objects((m > 0.01).astype(int))[0]
            _paste(t, m[rows, cols], centre)
    elif name == "star_chip":  # a small Siemens star and a patch of chip
        _paste(t, _material(siemens_star(52, n_spokes=16, radius=0.48)), (82, 170))
        chip = _material(test_chip(128, seed=3))[66:122, 66:122]  # wires + grating block
        _paste(t, chip * _disc(56, 27, soft=3.0), (168, 86))
    else:
        raise ValueError(f"unknown sample {name!r}")
    t = np.clip(t, 0.0, 1.0)
    amp = 1.0 - (1.0 - AMP_LO) * t
    phase = PHASE_LO * t
    return (amp * np.exp(1j * phase)).astype(np.complex64)


def roi_boxes(truth: np.ndarray, pad: int = 6) -> tuple[np.ndarray, list[tuple[slice, slice]]]:
    """ROI mask (where the truth differs from the empty background) and one box per feature."""
    mask = ndimage.binary_dilation(np.abs(truth - 1.0) > ROI_THRESHOLD, iterations=3)
    labels, _ = ndimage.label(mask)
    boxes = []
    for rows, cols in ndimage.find_objects(labels):
        boxes.append((slice(max(rows.start - pad, 0), min(rows.stop + pad, truth.shape[0])),
                      slice(max(cols.start - pad, 0), min(cols.stop + pad, truth.shape[1]))))
    return mask, boxes


class LegacyFeatureRecommender:
    """The feature strategy as it was before this benchmark (git 4ea5645), for comparison:
    gradient magnitude of the network's stitched object, coverage relative to its maximum
    weight, fine-grid candidates greedily by score."""

    name = "feature (before)"

    def __init__(self, live, region_center_m, region_extent_m, fine_step_m) -> None:
        self.live, self.center, self.extent, self.fine = (live, region_center_m,
                                                          region_extent_m, fine_step_m)

    def suggest(self, view, n, visited_m):
        from bluesky_ptychopinn.plans import ReconstructionView, structure_map
        from bluesky_ptychopinn.plans._recommenders import _candidates, _greedy_pick, _sample

        snap = self.live.latest().snapshot  # the network's image, as the plan passed then
        net = ReconstructionView(snap.object, snap.weight, snap.uncertainty, snap.origin_px,
                                 view.pixel_size_m)
        score_map = structure_map(net)
        candidates = _candidates(self.center, self.extent, self.fine)
        scores = _sample(score_map, net, candidates)
        picked = _greedy_pick(candidates, scores, n, visited_m, 0.9 * self.fine)
        return picked, {"score_max": float(scores.max(initial=0))}


# -- one scan -------------------------------------------------------------------------------
class Collector:
    """Keeps the images of a derived run's ``snapshots``, ``refined`` and ``final`` events."""

    def __init__(self) -> None:
        self.streams: dict[str, str] = {}
        self.events: dict[str, list[dict]] = {"snapshots": [], "refined": [], "final": []}
        self.refinement: dict = {}

    def __call__(self, name: str, doc: dict) -> None:
        if name == "stop":
            self.refinement = doc.get("ptychopinn", {}).get("refinement", {})
        elif name == "descriptor":
            self.streams[doc["uid"]] = doc.get("name", "")
        elif name == "event":
            stream = self.streams.get(doc["descriptor"])
            if stream in self.events:
                d = doc["data"]
                self.events[stream].append({
                    "object": (d["object_amplitude"] * np.exp(1j * d["object_phase"]))
                    .astype(np.complex64),
                    "frames": int(d["frames"]), "time": float(doc["time"]),
                    "refined_is_best": bool(d.get("refined_is_best", 0)),
                    "weight": d.get("weight"),
                })


def truth_on_canvas(truth: np.ndarray, shape, canvas_origin_px, sample_origin_px) -> np.ndarray:
    """The hidden object on the callback's canvas (as ``bluesky_ptychopinn.demo`` does)."""
    rows = np.round(np.arange(shape[0]) + canvas_origin_px[0] + sample_origin_px[0]).astype(int)
    cols = np.round(np.arange(shape[1]) + canvas_origin_px[1] + sample_origin_px[1]).astype(int)
    out = np.ones(shape, np.complex64)
    ri, ci = (rows >= 0) & (rows < truth.shape[0]), (cols >= 0) & (cols < truth.shape[1])
    out[np.ix_(ri, ci)] = truth[np.ix_(rows[ri], cols[ci])]
    return out


def run_scan(truth: np.ndarray, kind: str, *, region_m, fine_step_m, coarse_step_m=None,
             budget=None, step_m=None, strategy="feature", points_per_decision=48,
             seed=0, refine_budget_s=5.0) -> dict:
    """One scan of ``truth`` (``kind`` = "raster" or "feedback"); the images it produced."""
    from bluesky import RunEngine

    from bluesky_ptychopinn.callbacks import LiveReconstruction
    from bluesky_ptychopinn.devices import sim_beamline
    from bluesky_ptychopinn.plans import ptycho_scan, ptycho_scan_with_feedback

    torch.manual_seed(seed)
    bl = sim_beamline(truth, write_path=None, seed=seed, photon_flux=2e8, exposure_s=0.005)
    live = LiveReconstruction("default", batch_size=64, snapshot_every=64, torch_threads=1,
                              isolation="thread", refine_budget_s=refine_budget_s)
    collector = live.subscribe(Collector())
    RE = RunEngine(call_returns_result=True)
    RE.subscribe(live)
    visited: list[tuple[float, float, int]] = []
    keys = (bl.stage.y.name, bl.stage.x.name)

    def record(name, doc):
        if name == "event" and keys[0] in doc["data"]:
            d = doc["data"]
            visited.append((d[keys[0]], d[keys[1]], int(d.get("feedback_iteration", 0))))

    RE.subscribe(record)
    t0 = time.perf_counter()
    if kind == "raster":
        result = RE(ptycho_scan(bl.detector, bl.stage, geometry=bl.ptycho_metadata(),
                                pattern="raster", extent_m=region_m, step_m=step_m))
        plan = {}
    else:
        if strategy == "legacy":
            strategy = LegacyFeatureRecommender(live, (0.0, 0.0), region_m, fine_step_m)
        result = RE(ptycho_scan_with_feedback(
            bl.detector, bl.stage, live, geometry=bl.ptycho_metadata(), region_extent_m=region_m,
            coarse_step_m=coarse_step_m, fine_step_m=fine_step_m, strategy=strategy,
            budget=budget, points_per_decision=points_per_decision,
            max_decisions=10_000))
        plan = {k: v for k, v in result.plan_result.items() if k != "uid"}
    scan_s = time.perf_counter() - t0
    state = live.wait(timeout=300)
    live.close()
    seconds = time.perf_counter() - t0
    final_net = collector.events["snapshots"][-1]
    final_ref = collector.events["final"][-1] if collector.events["final"] else None
    best = state.best if final_ref is not None else "network"
    return {
        "kind": kind, "frames": int(state.frames_done), "scan_s": scan_s, "seconds": seconds,
        "plan": plan, "best": best, "network": final_net["object"],
        "refined": final_ref["object"] if final_ref is not None else None,
        "weight": final_net["weight"], "events": collector.events,
        "canvas_origin_px": state.canvas_origin_px,
        "sample_origin_px": bl.detector.sample_origin_px,
        "points_px": (np.asarray(visited).reshape(-1, 3)
                      / np.array([bl.pixel_size_m, bl.pixel_size_m, 1.0])).round(2).tolist(),
        "refinement": {k: collector.refinement.get(k) for k in
                       ("epochs", "seconds_after_stop", "refine_seconds", "start", "best",
                        "residual", "network_residual")},
    }


# -- scoring --------------------------------------------------------------------------------
def roi_score(image: np.ndarray, truth_c: np.ndarray, boxes) -> dict:
    """Phase and amplitude FRC-AUC(0-0.5) in each ROI box, and their means."""
    from bluesky_ptychopinn.metrics import compare_objects

    phase, amp = [], []
    for box in boxes:
        s = compare_objects(image[box], truth_c[box], taper_px=6)
        phase.append(float(s["frc_auc_0.5_phase"]))
        amp.append(float(s["frc_auc_0.5_amplitude"]))
    return {"phase": float(np.mean(phase)), "amplitude": float(np.mean(amp)),
            "phase_per_roi": phase}


def curve(run: dict, truth_c, boxes, max_points: int = 30) -> dict:
    """ROI phase FRC-AUC vs frames during the run, from the events the callback emitted.

    ``shown``: after each event, the image a viewer shows (the latest refined image when it
    explained the frames better, else the latest network snapshot) against the frames
    reconstructed so far; ``network``: the network snapshots alone; ``final``: the scores of
    the last refined snapshots at the final frame count (how much one run's score moves while
    the refinement goes on after the stop).
    """
    network, refined = run["events"]["snapshots"], run["events"]["refined"]
    merged = sorted([(e["time"], 0, e) for e in network] + [(e["time"], 1, e) for e in refined],
                    key=lambda t: (t[0], t[1]))
    shown, latest_net, latest_ref = [], None, None
    for _, is_refined, ev in merged:
        if is_refined:
            latest_ref = ev
        else:
            latest_net = ev
        image = (latest_ref if latest_ref is not None and latest_ref["refined_is_best"]
                 else latest_net)
        if image is None:
            continue
        frames = max(e["frames"] for e in (latest_net, latest_ref) if e is not None)
        shown.append((frames, image))
    cache: dict[int, float] = {}

    def score(ev) -> float:
        if id(ev) not in cache:
            cache[id(ev)] = roi_score(ev["object"], truth_c, boxes)["phase"]
        return cache[id(ev)]

    def thin(items):
        if len(items) > max_points:
            keep = np.unique(np.linspace(0, len(items) - 1, max_points).round().astype(int))
            items = [items[k] for k in keep]
        return items

    final = [e for e in refined if e["frames"] == run["frames"]][-5:]
    return {"shown": [(int(f), score(ev)) for f, ev in thin(shown)],
            "network": [(int(ev["frames"]), score(ev)) for ev in thin(network)],
            "final": [score(ev) for ev in final]}


# -- the benchmark --------------------------------------------------------------------------
def frames_to_match(target: float, points: list[tuple[int, float]]) -> float | None:
    """Frames at which the (frames, score) points first reach ``target`` (linear between)."""
    points = sorted(points)
    for (f0, s0), (f1, s1) in zip(points, points[1:], strict=False):
        if s0 >= target:
            return float(f0)
        if s1 >= target:
            return float(f0 + (target - s0) / (s1 - s0) * (f1 - f0))
    if points and points[-1][1] >= target:
        return float(points[-1][0])
    return None


def bench_sample(name: str, budgets, args) -> dict:
    truth = make_sample(name)
    from bluesky_ptychopinn.physics import ExperimentGeometry

    dx = ExperimentGeometry().object_pixel_size_m
    fov = (SHAPE[0] - 64 - 4) * dx
    region = (args.region_fraction * fov,) * 2
    fine, coarse = args.fine_px * dx, args.coarse_px * dx
    print(f"[{name}] raster at {args.fine_px} px", flush=True)
    raster = run_scan(truth, "raster", region_m=region, fine_step_m=fine, step_m=fine)
    n_raster = raster["frames"]
    shape = raster["network"].shape
    truth_c = truth_on_canvas(truth, shape, raster["canvas_origin_px"],
                              raster["sample_origin_px"])
    mask, boxes = roi_boxes(truth_c)
    covered = raster["weight"] > 0.3 * raster["weight"].max()

    def summarise(run: dict, label: str, budget=None) -> dict:
        best = run["refined"] if run["best"] == "refined" else run["network"]
        entry = {
            "label": label, "kind": run["kind"], "budget": budget, "frames": run["frames"],
            "best": run["best"], "roi": roi_score(best, truth_c, boxes),
            "roi_network": roi_score(run["network"], truth_c, boxes),
            "roi_refined": (roi_score(run["refined"], truth_c, boxes)
                            if run["refined"] is not None else None),
            "curve": curve(run, truth_c, boxes), "scan_s": round(run["scan_s"], 2),
            "seconds": round(run["seconds"], 2), "plan": run["plan"],
            "refinement": run["refinement"],
        }
        print(f"  {label:>24}: {entry['frames']:5d} frames, ROI phase FRC-AUC "
              f"{entry['roi']['phase']:.3f} ({run['best']}), {run['seconds']:.0f} s, "
              f"refined {run['refinement'].get('epochs') or 0:.0f} epochs, "
              f"{run['refinement'].get('seconds_after_stop') or 0:.1f} s after stop",
              flush=True)
        return entry

    out = {"sample": name, "region_px": round(region[0] / dx, 1), "fine_px": args.fine_px,
           "coarse_px": args.coarse_px, "n_rois": len(boxes),
           "roi_fraction_of_covered": float(mask[covered].mean()),
           "raster": summarise(raster, "raster (fine)")}
    out["feedback"], out["coarse_raster"] = [], []
    for fraction in budgets:
        budget = int(round(fraction * n_raster))
        run = run_scan(truth, "feedback", region_m=region, fine_step_m=fine,
                       coarse_step_m=coarse, budget=budget, strategy=args.strategy,
                       points_per_decision=args.points_per_decision)
        out["feedback"].append(summarise(run, f"feedback {fraction:.0%}", budget))
        out["feedback"][-1]["points_px"] = run["points_px"]
        if not args.no_control:
            step = args.fine_px / math.sqrt(fraction) * dx
            run = run_scan(truth, "raster", region_m=region, fine_step_m=fine, step_m=step)
            out["coarse_raster"].append(summarise(run, f"raster {fraction:.0%} frames",
                                                  budget))
        if not args.no_control:
            out["coarse_raster"][-1]["step_px"] = round(step / dx, 2)
    if args.legacy_budget:
        budget = int(round(args.legacy_budget * n_raster))
        run = run_scan(truth, "feedback", region_m=region, fine_step_m=fine,
                       coarse_step_m=coarse, budget=budget, strategy="legacy",
                       points_per_decision=args.points_per_decision)
        out["legacy"] = summarise(run, f"before {args.legacy_budget:.0%}", budget)
        out["legacy"]["points_px"] = run["points_px"]
    target = out["raster"]["roi"]["phase"]
    # how much the score of one image moves while the refinement goes on after the last
    # frame: the raster's refined snapshots at its final frame count
    last = out["raster"]["curve"]["final"]
    scatter = float(np.std(last)) if len(last) >= 2 else 0.0
    out["raster_final_range"] = [float(min(last)), float(max(last))] if last else None
    tolerance = max(0.01, 2 * scatter)
    fb = [(e["frames"], e["roi"]["phase"]) for e in out["feedback"]]
    out.update({
        "n_raster": n_raster, "target_phase": target, "raster_final_scatter": scatter,
        "tolerance": tolerance,
        "feedback_frames_to_match": frames_to_match(target, fb),
        "feedback_frames_to_match_within_tolerance": frames_to_match(target - tolerance, fb),
        "coarse_raster_frames_to_match": frames_to_match(
            target, [(e["frames"], e["roi"]["phase"]) for e in out["coarse_raster"]]),
    })
    strict = out["feedback_frames_to_match"]
    loose = out["feedback_frames_to_match_within_tolerance"]
    out["target_met"] = strict is not None and strict <= 0.5 * n_raster
    out["target_met_within_tolerance"] = loose is not None and loose <= 0.5 * n_raster
    return out


# -- figure and report ----------------------------------------------------------------------
def figure(results: dict, path: Path) -> Path:
    """ROI FRC-AUC vs frames (one panel per sample) over where each plan measured."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    samples = results["samples"]
    rows = 3 if any("legacy" in s for s in samples) else 2
    fig, axes = plt.subplots(rows, len(samples), figsize=(5.2 * len(samples), 4.6 * rows),
                             squeeze=False)
    for k, s in enumerate(samples):
        ax = axes[0, k]
        n = s["n_raster"]
        f, v = zip(*s["raster"]["curve"]["shown"], strict=True)
        ax.plot(f, v, color="0.4", lw=1.2, label="fine raster, image shown during the scan")
        f, v = zip(*s["raster"]["curve"]["network"], strict=True)
        ax.plot(f, v, color="0.6", lw=1, ls=":", label="fine raster, network snapshots")
        ax.plot([n], [s["target_phase"]], "k*", ms=12, label=f"fine raster: {n} frames")
        if s.get("raster_final_range"):
            lo, hi = s["raster_final_range"]
            ax.plot([n, n], [lo, hi], "k-", lw=1)
        if s["coarse_raster"]:
            ax.plot([e["frames"] for e in s["coarse_raster"]],
                    [e["roi"]["phase"] for e in s["coarse_raster"]], "s-", color="tab:blue",
                    label="coarser raster, same budget")
        for e in s["feedback"]:
            cf, cv = zip(*e["curve"]["shown"], strict=True)
            ax.plot(cf, cv, color="tab:red", lw=0.6, alpha=0.5)
        ax.plot([e["frames"] for e in s["feedback"]], [e["roi"]["phase"] for e in s["feedback"]],
                "o-", color="tab:red", label="feedback (feature), final")
        if "legacy" in s:
            ax.plot([s["legacy"]["frames"]], [s["legacy"]["roi"]["phase"]], "v",
                    color="tab:orange", ms=9, label="feedback, strategy before")
        ax.axhline(s["target_phase"], color="k", ls="--", lw=0.8)
        ax.axvline(0.5 * n, color="k", ls=":", lw=0.8)
        ax.set_xlim(0, 1.05 * n)
        ax.set_ylim(max(0.0, min(ax.get_ylim()[0], s["target_phase"] - 0.15)), 1.0)
        ax.set_xlabel("frames acquired")
        ax.set_ylabel("ROI phase FRC-AUC (0-0.5 Nyquist)")
        ax.set_title(f"{s['sample']}: {s['n_rois']} features")
        if k == 0:
            ax.legend(fontsize=7, loc="lower right")
        truth = make_sample(s["sample"])
        panels = [("feedback", next((e for e in s["feedback"] if e["budget"] is not None
                                     and abs(e["budget"] - 0.5 * n) <= 1), s["feedback"][-1]))]
        if "legacy" in s:
            panels.append(("before", s["legacy"]))
        for row, (label, entry) in enumerate(panels, start=1):
            ax = axes[row, k]
            ax.imshow(np.angle(truth), cmap="gray")
            pts = np.asarray(entry["points_px"]).reshape(-1, 3)
            centre = (np.array(truth.shape) - 1) / 2
            over = pts[:, 2] == 0
            ax.scatter(pts[over, 1] + centre[1], pts[over, 0] + centre[0], s=4, c="tab:cyan")
            ax.scatter(pts[~over, 1] + centre[1], pts[~over, 0] + centre[0], s=4, c="tab:red")
            ax.set_title(f"{label}, budget {entry['budget']}: {entry['frames']} frames, "
                         f"ROI {entry['roi']['phase']:.3f}", fontsize=9)
            ax.set_axis_off()
    fig.suptitle("Dose to quality: fine raster vs ptycho_scan_with_feedback "
                 "(cyan: coarse overview, red: fine points)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _frames(value) -> str:
    return "not reached" if value is None else f"{value:.0f}"


def section(results: dict) -> str:
    budgets = results["budgets"]
    lines = [
        MARKER, "## Steering (`bench/steering.py`)", "",
        f"Machine: {results['machine']}; 1 torch thread, `LiveReconstruction(isolation="
        f"\"thread\")` with the default rPIE refinement tier; measured {results['date']} "
        f"(`.venv/bin/python {results['command']}`, {results['seconds'] / 60:.0f} min).", "",
        "Does `ptycho_scan_with_feedback` (strategy `feature`) buy the quality of a fine raster "
        "with fewer frames? Samples: a few features on an exactly empty background (256 x 256 "
        "px, 64-px frames, 1e6 photons per frame, zone-plate probe ~25 px across), region "
        f"{results['samples'][0]['region_px']:.0f} px square; reference raster at the fine step "
        f"({results['samples'][0]['fine_px']:g} px); feedback: coarse overview at "
        f"{results['samples'][0]['coarse_px']:g} px, then fine points. Score: phase FRC-AUC "
        "(0-0.5 Nyquist, registered) of the image a user sees at the end (the better of "
        "network and refined by Fourier residual; refined in every run here) inside the "
        "regions of interest (truth differs from the background, one box per feature), mean "
        "over the features. The control is a raster over the whole region with a coarser step "
        "and about the same number of frames. Frames to match: where the feedback runs "
        "reach the fine raster's score (linear between runs); the tolerance is "
        "max(0.01, 2 x the spread of the raster's own last refined snapshots).", "",
        "| sample | fine raster: frames, ROI | "
        + " | ".join(f"feedback {b:.0%}: frames, ROI" for b in budgets)
        + " | coarser raster at 50 %: frames, ROI | strategy before, 50 %: frames, ROI "
        "| frames to match (strict / within tol.) | target met (<= 50 %) |",
        "|---" * (len(budgets) + 6) + "|",
    ]
    for s in results["samples"]:
        n = s["n_raster"]
        rng = s.get("raster_final_range")
        cells = [s["sample"], f"{n}, **{s['target_phase']:.3f}**"
                 + (f" ({rng[0]:.3f}-{rng[1]:.3f})" if rng else "")]
        for e in s["feedback"]:
            stop = e["plan"].get("stop_reason", "")
            mark = "" if stop == "budget" else " (done)"
            cells.append(f"{e['frames']}{mark}, {e['roi']['phase']:.3f}")
        half = [e for e in s["coarse_raster"] if abs(e["budget"] - 0.5 * n) <= 1]
        cells.append(f"{half[0]['frames']}, {half[0]['roi']['phase']:.3f}" if half else "-")
        cells.append(f"{s['legacy']['frames']}, {s['legacy']['roi']['phase']:.3f}"
                     if "legacy" in s else "-")
        strict = s["feedback_frames_to_match"]
        loose = s["feedback_frames_to_match_within_tolerance"]
        cells.append(f"{_frames(strict)}"
                     + (f" ({strict / n:.0%})" if strict is not None else "")
                     + f" / {_frames(loose)}"
                     + (f" ({loose / n:.0%})" if loose is not None else "")
                     + f" (tol. {s['tolerance']:.3f})")
        cells.append("**yes**" if s["target_met"] else
                     ("within tolerance" if s["target_met_within_tolerance"] else "**no**"))
        lines.append("| " + " | ".join(cells) + " |")
    met = sum(s["target_met"] for s in results["samples"])
    loose = sum(s["target_met_within_tolerance"] for s in results["samples"])
    easy = [s for s in results["samples"] if s["coarse_raster"] and min(
        e["roi"]["phase"] for e in s["coarse_raster"]) >= s["target_phase"] - s["tolerance"]]
    notes = [
        "", "In brackets after the fine raster's score: the range of its last refined snapshots "
        "after the stop (the score of one run moves that much while the refinement goes on).",
    ]
    for s in easy:
        smallest = min(s["coarse_raster"], key=lambda e: e["frames"])
        notes.append(
            f"On `{s['sample']}` even the coarsest raster ({smallest['frames']} frames, step "
            f"{smallest['step_px']:g} px: ROI {smallest['roi']['phase']:.3f}) reaches the fine "
            "raster's score: there the fine raster is no demanding reference, and meeting the "
            "target says nothing about steering.")
    lines += notes
    lines += [
        "", f"Target (the fine raster's ROI quality with <= 50 % of its frames): met strictly "
        f"on {met} of {len(results['samples'])} samples, within the tolerance on {loose}"
        + (f"; of these, {', '.join(s['sample'] for s in easy)} trivially (above)"
           if easy else "") + ". \"(done)\": the strategy found no structure left to sample "
        "and the plan stopped before the budget (\"nothing left to measure\"). "
        + _repeat_note(results)
        + " Amplitude FRC-AUC, per-feature scores, the network-only scores, refinement epochs "
        "and every scan point are in `bench/results/steering.json`.", "",
        "![steering](figures/steering.png)", "",
        "Top: ROI FRC-AUC vs frames. Grey: the image shown during the fine raster (the better "
        "of the latest network and refined snapshots in the run state), scored at each "
        "snapshot (refined snapshots reach the run state while the scan runs, pauses or "
        "not); the star is the final image, its bar the range of the last refined "
        "snapshots. Red: the feedback runs' final images, thin red lines the image shown "
        "during each run. Blue: coarser rasters "
        "over the whole region. Below: where the feedback scan at the 50 % budget measured, "
        "and where the strategy before measured with the same budget.", "",
        "The strategy (`plans.FeatureRecommender`): structure = RMS deviation of the best "
        "current estimate (the refined image when `RunState.best == \"refined\"`) from its "
        "background at half the fine step, where that estimate has frames, above a noise floor; "
        "fine-grid candidates are chosen one at a time where a probe footprint gathers the most "
        "structure that is not yet sampled at the fine density (the overview counts), with "
        "the fine step as minimum spacing; it asks for nothing once the structure is covered. "
        "Before, it scored the network image's gradient magnitude, whose stitching artefacts "
        "over empty background scored like structure, and took coverage relative to the "
        "maximum weight, so areas sampled only by the overview dropped out as fine points "
        "accumulated: it filled contiguous bands next to the points it had already measured.",
        MARKER,
    ]
    return "\n".join(lines)


def _repeat_note(results: dict) -> str:
    """Feedback runs of one sample that stopped by themselves at (nearly) the same frame count
    are repeats of one scan: how far apart their scores are is the run-to-run noise."""
    spread = []
    for s in results["samples"]:
        done = [e for e in s["feedback"] if e["plan"].get("stop_reason") != "budget"]
        for i, a in enumerate(done):
            for b in done[i + 1:]:
                if abs(a["frames"] - b["frames"]) <= 0.02 * a["frames"]:
                    spread.append(abs(a["roi"]["phase"] - b["roi"]["phase"]))
    if not spread:
        return ""
    return (f"Runs that stopped by themselves at the same frame count are repeats of one scan: "
            f"their scores differ by up to {max(spread):.3f}, the run-to-run noise of this "
            "measurement (the live refinement's timing differs between runs); a strict match "
            "by less than that is a tie, not a win.")


def report(results: dict) -> None:
    """Write (or replace) the steering section of docs/performance.md."""
    path = ROOT / "docs" / "performance.md"
    text = path.read_text()
    if MARKER in text:
        head, _, rest = text.partition(MARKER)
        _, _, tail = rest.partition(MARKER)
        text = head + section(results) + tail
    else:
        text = text.rstrip() + "\n\n" + section(results) + "\n"
    path.write_text(text)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", default="islands,particles,star_chip")
    parser.add_argument("--budgets", default="0.15,0.25,0.5,0.75")
    parser.add_argument("--legacy-budget", type=float, default=0.5,
                        help="also run the strategy as it was before, at this budget (0: no)")
    parser.add_argument("--fine-px", type=float, default=5.0)
    parser.add_argument("--coarse-px", type=float, default=16.0)
    parser.add_argument("--region-fraction", type=float, default=0.9)
    parser.add_argument("--points-per-decision", type=int, default=48)
    parser.add_argument("--strategy", default="feature")
    parser.add_argument("--no-control", action="store_true",
                        help="skip the coarser rasters with the same frame budgets")
    parser.add_argument("--quick", action="store_true", help="one sample, budget 50 %%")
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("--figure", default=str(FIGURE))
    parser.add_argument("--no-report", action="store_true",
                        help="no figure, no docs/performance.md section")
    parser.add_argument("--report-only", action="store_true",
                        help="figure and docs section again from --out")
    args = parser.parse_args(argv)
    if args.report_only:
        results = json.loads(Path(args.out).read_text())
        figure(results, Path(args.figure))
        report(results)
        return results
    torch.set_num_threads(1)
    samples = args.samples.split(",")
    budgets = [float(b) for b in args.budgets.split(",")]
    if args.quick:
        samples, budgets = samples[:1], [0.5]
    t0 = time.perf_counter()
    results = {"machine": machine(), "threads": 1, "date": time.strftime("%Y-%m-%d"),
               "command": " ".join(["bench/steering.py", *(argv or sys.argv[1:])]),
               "strategy": args.strategy, "budgets": budgets, "samples": []}
    for name in samples:
        results["samples"].append(bench_sample(name, budgets, args))
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=1))
    results["seconds"] = round(time.perf_counter() - t0, 1)
    Path(args.out).write_text(json.dumps(results, indent=1))
    if not args.no_report:
        figure(results, Path(args.figure))
        report(results)
    return results


if __name__ == "__main__":
    main()
