"""Which rPIE batch size gives the best image in a given time on a CPU? Equal wall time.

    .venv/bin/python scripts/batch_study.py [--sizes 8,16,32] [--times 0.25,0.5,1,2,4]
                                            [--out docs/batch-size.md]

Batched rPIE updates the object once per batch with the summed corrections of its frames: a
small batch is closer to the sequential algorithm (more, smaller steps per pass, faster
convergence per pass), a large one does more frames per second. Which wins at equal *time*
depends on the hardware, so it is measured: each case of ``scripts/step_study.py`` (none of
them a quality-bench scan) is refined by :class:`~bluesky_ptychopinn.recon.StreamingRefiner`
with each batch size, flat start, single-threaded torch, and the complex FRC-AUC (0-0.5
Nyquist, registered, against the truth) is read off at the same wall times (the latest image
at or before each time). Only refinement is timed, not the scoring.

The three scans of ``bench/quality.py`` are measured too, below the held-out table, for
reference: scan B starts its 3-mode probe from a flat disc, which no held-out case does.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from datetime import date
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from step_study import CASES, Case, _scan, complex_auc  # noqa: E402

from bluesky_ptychopinn.recon import PIEOptions, StreamingRefiner  # noqa: E402
from bluesky_ptychopinn.recon._residual import place_on_canvas  # noqa: E402


def _timed(refiner: StreamingRefiner, score, horizon_s: float) -> list[tuple[float, float]]:
    """(seconds refining, ``score(snapshot)``) after each slice, up to ``horizon_s``."""
    points, busy, piece = [], 0.0, 0.05
    while busy < horizon_s:
        t0 = time.perf_counter()
        refiner.step(piece)
        busy += time.perf_counter() - t0
        points.append((busy, score(refiner.snapshot())))
        piece = min(0.25, piece * 1.5)
    return points


def _curve(case: Case, batch: int, horizon_s: float, seed: int = 0) -> list[tuple[float, float]]:
    """A held-out case refined with ``batch`` frames per update, scored as step_study does."""
    probe, truth, positions, counts, box = _scan(case, seed)
    options = PIEOptions(device="cpu", probe_update=case.refine_probe, progress=False,
                         batch_size=batch)
    refiner = StreamingRefiner(probe, object_shape=truth.shape, options=options, start="flat")
    refiner.add(counts, positions)

    def score(snap) -> float:
        obj = place_on_canvas(snap.object, snap.origin_px, truth.shape, (0.0, 0.0))
        return complex_auc(obj[box], truth[box])

    return _timed(refiner, score, horizon_s)


def _bench_curve(scan, batch: int, horizon_s: float) -> list[tuple[float, float]]:
    """A ``bench/quality.py`` scan refined with ``batch``, scored as that bench scores."""
    from quality import on_truth_grid, score

    options = PIEOptions(device="cpu", probe_update=not scan.probe_known, progress=False,
                         batch_size=batch)
    refiner = StreamingRefiner(scan.probe_start, object_shape=scan.truth.shape,
                               options=options, start="flat")
    refiner.add(scan.frames, scan.positions)
    return _timed(refiner, lambda snap: score(on_truth_grid(snap.object, snap.origin_px,
                                                            scan.truth.shape), scan)
                  ["frc_auc_0.5_complex"], horizon_s)


def _at(points: list[tuple[float, float]], t: float) -> float:
    """Score of the latest image at or before ``t`` (0 before the first)."""
    value = 0.0
    for when, score in points:
        if when > t:
            break
        value = score
    return value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="8,16,32")
    parser.add_argument("--times", default="0.25,0.5,1,2,4")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "batch-size.md")
    parser.add_argument("--no-bench-scans", dest="bench_scans", action="store_false",
                        help="skip the three bench/quality.py scans")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    times = [float(t) for t in args.times.split(",")]
    torch.set_num_threads(1)
    _curve(CASES[0], sizes[0], 0.3)  # warm-up: first-call costs are no batch size's
    rows: list[tuple[str, dict]] = []
    for case in CASES:
        scores = {}
        for batch in sizes:
            curve = _curve(case, batch, max(times))
            scores[batch] = [_at(curve, t) for t in times]
        label = (f"{case.sample}, {case.probe} {case.frame} px, {case.photons:.0e} ph, "
                 f"jitter {case.jitter_px}{', probe refined' if case.refine_probe else ''}")
        rows.append((label, scores))
        print(label, {b: [round(v, 3) for v in s] for b, s in scores.items()}, flush=True)
    wins = {b: 0 for b in sizes}
    lines = [
        "# rPIE batch size at equal wall time (CPU)",
        "",
        f"Generated by `.venv/bin/python scripts/batch_study.py --sizes {args.sizes} "
        f"--times {args.times}` on {platform.machine()} ({platform.processor() or 'cpu'}), "
        f"1 torch thread, {date.today().isoformat()}. The cases of `scripts/step_study.py` "
        "(held out: none is a quality-bench scan); flat start, settled step; complex "
        "FRC-AUC (0-0.5 Nyquist, registered) against the truth of the latest image at each "
        "wall time. Best per time in bold.",
        "",
        "| case | batch | " + " | ".join(f"{t:g} s" for t in times) + " |",
        "|---|---|" + "---|" * len(times),
    ]
    for label, scores in rows:
        best = [max(scores[b][i] for b in sizes) for i in range(len(times))]
        for b in sizes:
            cells = [f"**{v:.3f}**" if v == best[i] else f"{v:.3f}"
                     for i, v in enumerate(scores[b])]
            lines.append(f"| {label} | {b} | " + " | ".join(cells) + " |")
            label = ""
        for i in range(len(times)):
            for b in sizes:
                if scores[b][i] == best[i]:
                    wins[b] += 1
                    break
    mean = {b: float(np.mean([s[b] for _, s in rows], axis=0).mean()) for b in sizes}
    summary = ("Best at a time point (cases x times): "
               + ", ".join(f"batch {b}: {wins[b]}" for b in sizes)
               + "; mean score over all cases and times: "
               + ", ".join(f"batch {b}: {mean[b]:.3f}" for b in sizes) + ".")
    lines += ["", summary]
    if args.bench_scans:
        sys.path.insert(0, str(ROOT / "bench"))
        from quality import build_scans

        lines += ["", "Quality-bench scans (`bench/quality.py`, not used above), same measure:", "",
                  "| scan | batch | " + " | ".join(f"{t:g} s" for t in times) + " |",
                  "|---|---|" + "---|" * len(times)]
        for scan in build_scans(False):
            label = scan.label
            for batch in sizes:
                curve = _bench_curve(scan, batch, max(times))
                cells = [f"{_at(curve, t):.3f}" for t in times]
                lines.append(f"| {label} | {batch} | " + " | ".join(cells) + " |")
                print(scan.name, batch, cells, flush=True)
                label = ""
    args.out.write_text("\n".join(lines) + "\n")
    print(summary)


if __name__ == "__main__":
    main()
