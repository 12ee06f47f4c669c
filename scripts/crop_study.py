"""Adaptive stitching crop vs every fixed crop, on scans the default model never saw.

    .venv/bin/python scripts/crop_study.py [--threads 2] [--out docs/stitching.md]

Each held-out experiment has a probe outside the default model's training set and one or more
imperfections (position jitter, a 3-mode probe, 128-px frames cropped to 64, background
counts). The default model stitches every candidate crop in one pass
(``StreamingReconstructor(crop="auto")``); the adaptive choice is the crop whose stitched object
has the lowest Fourier-magnitude residual on a 128-frame sample (``CropChooser``,
with the probe the reconstruction would use; no ground truth). Scores: phase FRC-AUC
(0-0.5 Nyquist) against the truth, registered, inside the well-covered box.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bluesky_ptychopinn import physics  # noqa: E402
from bluesky_ptychopinn.metrics import compare_objects, covered_box  # noqa: E402
from bluesky_ptychopinn.models import ModelRegistry  # noqa: E402
from bluesky_ptychopinn.recon import (  # noqa: E402
    PIEOptions,
    StreamingReconstructor,
    StreamingRefiner,
)
from bluesky_ptychopinn.recon._crop_choice import CropChooser  # noqa: E402
from bluesky_ptychopinn.synthetic import make_object  # noqa: E402

DX, ENERGY = 44e-9, 8_800.0


@dataclass
class Case:
    name: str
    sample: str
    probe: str
    modes: int = 1
    footprint_px: float | None = None
    jitter_px: float = 0.0
    frame_size: int = 64  # simulated detector frames; cropped to the model's 64
    background: float = 0.0  # mean background photons per pixel
    photons: float = 1e6


CASES = (
    Case("airy probe, 0.7 px jitter", "cells", "airy", jitter_px=0.7),
    Case("3-mode airy probe, 1e5 photons", "test_chip", "airy", modes=3, photons=1e5),
    Case("wide KB probe, 128-px frames cropped to 64", "siemens_star", "kb",
         footprint_px=28, frame_size=128),
    Case("wide pinhole, background 0.5 ph/px, 0.5 px jitter", "cells", "pinhole",
         footprint_px=30, background=0.5, jitter_px=0.5),
)


def simulate(case: Case, seed: int):
    """(truth at the model's pixel, frames at 64 px, nominal positions at the model's pixel,
    the probe at the model's sampling)."""
    scale = case.frame_size // 64
    dx = DX / scale  # a larger detector frame samples the object finer
    shape = (256 * scale, 256 * scale)
    obj = make_object(case.sample, shape, seed=seed)
    footprint = None if case.footprint_px is None else case.footprint_px * scale
    probe = physics.make_probe(case.probe, case.frame_size, dx, ENERGY, footprint_px=footprint)
    if case.modes > 1:
        probe = physics.mixed_state_probe(probe, case.modes)
    rng = np.random.default_rng(seed)
    nominal = (physics.scan_pattern("fermat", (150.0, 150.0), step=5.0) + 128) * scale
    actual = nominal + rng.normal(0, case.jitter_px * scale, nominal.shape)
    counts = physics.simulate_diffraction(obj, probe, actual, photons=case.photons,
                                          seed=seed).counts
    counts = np.asarray(counts, dtype=np.float32)
    if case.background:
        counts = counts + rng.poisson(case.background, counts.shape).astype(np.float32)
    if scale > 1:
        counts = physics.crop_frames(counts, 64)
        probe = physics.resample_probe(probe, 64)
        obj = obj[::scale, ::scale]  # the truth at the coarser pixel the model sees
        nominal = physics.rescale_positions(nominal, 1.0, scale)
    return obj, counts, nominal, probe


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "stitching.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, _ = ModelRegistry().load("default")
    rows = []
    for k, case in enumerate(CASES):
        obj, counts, pos, probe = simulate(case, seed=10 + k)
        recon = StreamingReconstructor(model, object_shape=obj.shape, crop="auto")
        chooser = CropChooser(sample_size=128)
        chooser.observe(counts, pos)
        recon.add(counts, pos)
        recon.flush()
        residuals = chooser.choose(recon, probe)
        weight = recon.snapshot(max(recon.crop_candidates)).weight
        box = covered_box(weight)
        aucs = {c: compare_objects(recon.snapshot(c).object[box], obj[box], taper_px=8)
                ["frc_auc_0.5_phase"] for c in recon.crop_candidates}
        best = max(aucs, key=aucs.get)
        by_residual = recon.crop
        # The other data-driven reference: agreement with the refined image after 2 rPIE
        # epochs (the refinement tier's estimate, no truth).
        refiner = StreamingRefiner(probe, object_shape=obj.shape, start="flat",
                                   options=PIEOptions(progress=False, probe_update=False))
        refiner.add(counts, pos)
        refined = refiner.run(max_epochs=2).object
        agreement = {c: -v for c, v in chooser.choose(recon, reference=(refined, (0.0, 0.0)))
                     .items()}
        by_agreement = recon.crop
        rows.append((case, len(pos), aucs, residuals, by_residual, by_agreement, best))
        print(case.name, {c: round(v, 3) for c, v in aucs.items()}, "residual", by_residual,
              "agreement", by_agreement, {c: round(v, 3) for c, v in agreement.items()},
              "best", best, flush=True)
    crops = rows[0][2].keys()
    lines = [
        "# Stitching that adapts to the data", "",
        f"Generated by `.venv/bin/python scripts/crop_study.py` on "
        f"{platform.processor() or platform.machine()}, {args.threads} torch threads, "
        f"{time.strftime('%Y-%m-%d')}. The default model; every probe below is outside its "
        "training set (zone plate, pinhole, KB and 3-mode zone plate at a footprint of N/3). "
        "Phase FRC-AUC (0-0.5 Nyquist) against the truth, registered, per fixed crop, and the "
        "crop the residual chose (lowest Fourier-magnitude residual on 128 frames, with the "
        "probe; no truth).", "",
        "| experiment | frames | " + " | ".join(f"crop {c}" for c in crops)
        + " | by residual (- best) | by agreement with refined (- best) |",
        "|---|---|" + "---|" * len(crops) + "---|---|",
    ]
    for case, n, aucs, _, chosen, agreed, best in rows:
        cells = " | ".join((f"**{v:.3f}**" if c == best else f"{v:.3f}") for c, v in aucs.items())
        lines.append(f"| {case.sample}, {case.name} | {n} | {cells} | {chosen} "
                     f"({aucs[chosen] - aucs[best]:+.3f}) | {agreed} "
                     f"({aucs[agreed] - aucs[best]:+.3f}) |")
    lines += ["", "Residuals (the choice's evidence):", "",
              "| experiment | " + " | ".join(f"crop {c}" for c in crops) + " |",
              "|---|" + "---|" * len(crops)]
    for case, _, _, residuals, _, _, _ in rows:
        lines.append(f"| {case.name} | "
                     + " | ".join(f"{residuals.get(c, float('nan')):.3e}" for c in crops) + " |")
    n = len(rows)
    close_res = sum(aucs[r] >= aucs[b] - 0.01 for _, _, aucs, _, r, _, b in rows)
    close_agr = sum(aucs[a] >= aucs[b] - 0.01 for _, _, aucs, _, _, a, b in rows)
    default = 3 * 64 // 8
    gain = [aucs[a] - aucs[default] for _, _, aucs, _, _, a, _ in rows]
    lines += [
        "", "## Reading the table", "",
        f"The best fixed crop differs between experiments, and the default {default} px (chosen "
        "on simulated samples with the training probes) is not it on these. Agreement with the "
        f"refined image picks a crop within 0.01 FRC-AUC of the best fixed one in {close_agr} of "
        f"{n} experiments (gain over the default {default} px: "
        + ", ".join(f"{g:+.3f}" for g in gain) + "); the residual alone in "
        f"{close_res} of {n}: the network's errors are mostly at low spatial frequencies, which "
        "the residual weighs differently from the FRC. So the live engine "
        "(`LiveReconstruction(crop=\"auto\")`, the default) chooses by agreement as soon as the "
        "refinement tier has an image, and by the residual (with the run's probe) before that.",
    ]
    args.out.write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
