"""Does momentum across passes (PIEOptions.momentum) pay, and where? rPIE against the truth.

    .venv/bin/python scripts/momentum_study.py [--passes 30] [--out docs/momentum.md]

For each sample, probe, probe start and dose (none of them a scan of the quality bench, on
which momentum was first tried), the same frames are refined by
:class:`~bluesky_ptychopinn.recon.StreamingRefiner` three times: ``momentum="off"`` (plain
rPIE with the settled step), ``"auto"`` (the default: only while the probe is being learnt)
and ``"on"`` (every pass). The FRC-AUC (0-0.5
Nyquist) of the complex object against the truth (registered, global phase removed, as
bench/quality.py scores) is taken after every pass. Reported: passes to reach 95 % of the best
score plain rPIE reaches, the best score, the score at the end, and the passes momentum was
engaged. Single-threaded torch, rPIE batch 16 (the live engine's refiner).

Probe starts: "disc" is a flat disc of the beam's diameter (as many modes as the beam), the
blind start of bench/quality.py's scan B; "known, refined" is the true probe, refined, as the
live engine does with the run's probe; "known" is the true probe, fixed.
"""

from __future__ import annotations

import argparse
import platform
import sys
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from step_study import complex_auc, raster_scan  # noqa: E402

from bluesky_ptychopinn import physics  # noqa: E402
from bluesky_ptychopinn.recon import PIEOptions, StreamingRefiner  # noqa: E402
from bluesky_ptychopinn.recon._residual import place_on_canvas  # noqa: E402

MODES = ("off", "auto", "on")
LEVEL = 0.95  # of the best score plain rPIE reaches


@dataclass
class Case:
    sample: str
    probe: str
    photons: float
    frame: int
    jitter_px: float
    start: str  # "disc", "known, refined" or "known"
    modes: int = 1


CASES = [
    Case("cells", "kb", 1e5, 64, 0.0, "disc"),
    Case("test_chip", "zone_plate", 1e4, 32, 0.3, "disc"),
    Case("siemens_star", "airy", 1e6, 64, 0.5, "disc"),
    Case("test_chip", "mixed", 1e4, 64, 0.0, "disc", modes=3),
    Case("cells", "zone_plate", 1e3, 64, 0.0, "disc"),
    Case("cells", "kb", 1e4, 64, 0.0, "known, refined"),
    Case("test_chip", "zone_plate", 1e3, 32, 0.3, "known, refined"),
    Case("siemens_star", "airy", 1e5, 64, 0.5, "known"),
]


def _disc(diameter: float, n: int, modes: int) -> np.ndarray:
    c = np.arange(n) - n // 2
    yy, xx = np.meshgrid(c, c, indexing="ij")
    disc = (np.hypot(yy, xx) <= diameter / 2).astype(np.complex64)
    if modes == 1:
        return physics.normalize_probe(disc)
    return physics.mixed_state_probe(disc, modes, decay=0.5)


def _scan(case: Case, seed: int):
    probe = physics.make_probe(case.probe, case.frame, 20e-9, 8_800, n_modes=case.modes)
    if case.modes > 1 and probe.shape[0] == 1:
        probe = physics.mixed_state_probe(probe, case.modes, decay=0.5)
    truth, given, counts, box = raster_scan(case, probe, seed)
    start = (_disc(physics.probe_diameter_px(probe), case.frame, case.modes)
             if case.start == "disc" else probe)
    return start, truth, given, counts, box


def _run(case: Case, momentum: str, passes: int, seed: int = 0) -> dict:
    start, truth, positions, counts, box = _scan(case, seed)
    options = PIEOptions(device="cpu", probe_update=case.start != "known", progress=False,
                         momentum=momentum)
    refiner = StreamingRefiner(start, object_shape=truth.shape, options=options, start="flat")
    refiner.add(counts, positions)
    scores = []
    for _ in range(passes):
        refiner.run(max_epochs=1)
        snap = refiner.snapshot()  # the canvas grows where jittered positions leave it
        obj = place_on_canvas(snap.object, snap.origin_px, truth.shape, (0.0, 0.0))
        scores.append(complex_auc(obj[box], truth[box]))
    return {"scores": scores, "frames": len(positions),
            "engaged": refiner.acceleration.passes_engaged}


def _passes_to(scores: list[float], level: float) -> int | None:
    return next((k + 1 for k, s in enumerate(scores) if s >= level), None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--passes", type=int, default=30)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "momentum.md")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = []
    for case in CASES:
        runs = {mode: _run(case, mode, args.passes) for mode in MODES}
        level = LEVEL * max(runs["off"]["scores"])
        rows.append((case, runs, level))
        print(case, {m: (_passes_to(r["scores"], level), round(max(r["scores"]), 3),
                         round(r["scores"][-1], 3), r["engaged"]) for m, r in runs.items()},
              flush=True)
    lines = [
        "# Momentum across passes (`PIEOptions.momentum`)",
        "",
        f"Generated by `.venv/bin/python scripts/momentum_study.py --passes {args.passes}` on "
        f"{platform.machine()} ({platform.processor() or 'CPU'}), 1 torch thread, "
        f"{date.today().isoformat()}. rPIE batch 16 with the settled step, flat object start, "
        "raster scans at 30 % of the probe diameter, position jitter left uncorrected; "
        "FRC-AUC (0-0.5 Nyquist) of the complex object, registered, against the truth inside "
        "the scanned box, after every pass. None of these samples, probes or doses is a scan "
        "of the quality bench, where momentum was first tried (scan B, a 3-mode probe learnt "
        "from a disc).",
        "",
        "What it is: mPIE's heavy-ball step (Maiden, Johnson & Li, Optica 4, 736, 2017), once "
        "per pass: the change of the object (and of the refined probe) over the pass joins a "
        "velocity that keeps 0.7 of itself from pass to pass, and half of that velocity is "
        "added (`bluesky_ptychopinn/recon/_momentum.py`). `\"auto\"` (the default) engages it "
        "only while the probe is being learnt: refined, and its normalised intensity changed "
        "by more than 10 % in the last pass; it disengages after a pass that changes it by less "
        "than 5 %, or once the fit error settles.",
        "",
        f"Columns: passes to reach {LEVEL:.0%} of the best score plain rPIE (`off`) reaches "
        "(\"-\": not within the run), the best score, the score at the end, and for `auto` "
        "the passes momentum was engaged.",
        "",
        "| sample | probe (start) | photons/frame | frames | passes to level: off / auto / on "
        "| best: off / auto / on | end: off / auto / on | auto engaged (passes) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for case, runs, level in rows:
        passes = " / ".join(str(_passes_to(runs[m]["scores"], level) or "-") for m in MODES)
        best = " / ".join(f"{max(runs[m]['scores']):.3f}" for m in MODES)
        end = " / ".join(f"{runs[m]['scores'][-1]:.3f}" for m in MODES)
        lines.append(
            f"| {case.sample} | {case.probe}{f' ({case.modes} modes)' if case.modes > 1 else ''}"
            f" ({case.frame} px, jitter {case.jitter_px} px; {case.start}) | "
            f"{case.photons:.0e} | {runs['off']['frames']} | {passes} | {best} | {end} | "
            f"{runs['auto']['engaged']} |")
    args.out.write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
