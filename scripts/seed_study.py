"""Where should rPIE start? Flat object vs the network's stitched object, and why.

    .venv/bin/python scripts/seed_study.py [--threads 2] [--out docs/refinement.md]

On held-out scans (known probe), rPIE is run for 1 and 4 epochs from: a flat object; the
network's stitched object (amplitude normalised to a median of 1); its phase only; its phase
with the low spatial frequencies removed (what the refiner's ``network_highpass`` candidate
does); and its low frequencies only. The network's FRC against the truth is split into
frequency bands to show where its errors are. Scores: phase FRC-AUC (0-0.5 Nyquist) against
the truth, registered. Writes a Markdown table.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
from scipy.ndimage import gaussian_filter

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bluesky_ptychopinn import physics  # noqa: E402
from bluesky_ptychopinn.metrics import compare_objects, covered_box  # noqa: E402
from bluesky_ptychopinn.models import ModelRegistry  # noqa: E402
from bluesky_ptychopinn.recon import (  # noqa: E402
    PIEOptions,
    StreamingReconstructor,
    StreamingRefiner,
    pie_reconstruct,
)
from bluesky_ptychopinn.synthetic import make_object  # noqa: E402

CASES = (("cells", "kb"), ("test_chip", "pinhole"), ("siemens_star", "airy"))
N = 64
DX, ENERGY = 44e-9, 8_800.0


def _scan(sample: str, probe_name: str, seed: int):
    obj = make_object(sample, (256, 256), seed=seed)
    probe = physics.make_probe(probe_name, N, DX, ENERGY)
    pos = physics.scan_pattern("fermat", (150.0, 150.0), step=5.5) + 128
    counts = physics.simulate_diffraction(obj, probe, pos, photons=1e6, seed=seed).counts
    return obj, probe, pos, np.asarray(counts, dtype=np.float32)


def _band_frc(recon: np.ndarray, truth: np.ndarray, box) -> dict:
    scores = compare_objects(recon[box], truth[box], taper_px=8)
    curve = scores["frc_phase"]
    bands = {"0-0.1": (0, 0.1), "0.1-0.25": (0.1, 0.25), "0.25-0.5": (0.25, 0.5)}
    return {name: float(np.mean(curve.frc[(curve.freq >= lo) & (curve.freq < hi)]))
            for name, (lo, hi) in bands.items()}


def _seeds(net: np.ndarray, weight: np.ndarray) -> dict[str, np.ndarray | None]:
    covered = weight > 0.1 * weight.max()
    level = float(np.median(np.abs(net[covered])))
    normalised = np.where(covered, net / level, 1.0)
    phase = np.where(covered, np.angle(normalised), 0.0)
    sigma = N / 4
    norm = np.maximum(gaussian_filter(covered.astype(float), sigma), 1e-6)
    low = gaussian_filter(phase, sigma) / norm
    return {
        "flat": None,
        "network": normalised.astype(np.complex64),
        "network, phase only": np.exp(1j * phase).astype(np.complex64),
        "network, high-pass phase": np.where(covered, np.exp(1j * (phase - low)), 1.0)
        .astype(np.complex64),
        "network, low-pass phase only": np.where(covered, np.exp(1j * low), 1.0)
        .astype(np.complex64),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "refinement.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, _ = ModelRegistry().load("default")
    rows, band_rows, auto_rows = [], [], []
    for k, (sample, probe_name) in enumerate(CASES):
        obj, probe, pos, counts = _scan(sample, probe_name, seed=k)
        recon = StreamingReconstructor(model, object_shape=obj.shape)
        recon.add(counts, pos)
        snap = recon.finish()
        box = covered_box(snap.weight)

        def score(image, box=box, obj=obj):
            return compare_objects(image[box], obj[box], taper_px=8)["frc_auc_0.5_phase"]

        truth_bands = _band_frc(snap.object, obj, box)
        band_rows.append((sample, probe_name, len(pos), score(snap.object), truth_bands))
        for name, seed in _seeds(snap.object, snap.weight).items():
            result = []
            for epochs in (1, 4):
                t0 = time.perf_counter()
                out = pie_reconstruct(counts, pos, probe, object_guess=seed,
                                      object_shape=None if seed is not None else obj.shape,
                                      options=PIEOptions(n_epochs=epochs, probe_update=False,
                                                         progress=False, seed=0))
                result.append((score(out.object), time.perf_counter() - t0))
            rows.append((sample, probe_name, name, *result))
            print(sample, name, result, flush=True)
        refiner = StreamingRefiner(probe, object_shape=obj.shape,
                                   options=PIEOptions(probe_update=False, progress=False))
        refiner.offer_seed(snap.object, snap.weight, snap.origin_px)
        refiner.add(counts, pos)
        final = refiner.run(max_epochs=4)
        auto_rows.append((sample, probe_name, final.start, final.start_residuals,
                          score(final.object)))
    lines = [
        "# Where the refinement starts", "",
        "Generated by `.venv/bin/python scripts/seed_study.py` on "
        f"{platform.processor() or platform.machine()}, {args.threads} torch threads, "
        f"{time.strftime('%Y-%m-%d')}. Held-out samples and probes, 256 x 256 px objects, Fermat "
        "scans (step 5.5 px), 1e6 photons per frame, known probe, rPIE batch 16. Phase FRC-AUC "
        "(0-0.5 Nyquist) against the truth (registered), inside the scanned box.", "",
        "## The network's errors are at low spatial frequencies", "",
        "Mean phase FRC of the default network's stitched object against the truth, per band "
        "(fraction of Nyquist):", "",
        "| sample | probe | frames | network FRC-AUC | FRC 0-0.1 | FRC 0.1-0.25 | FRC 0.25-0.5 |",
        "|---|---|---|---|---|---|---|",
    ]
    for sample, probe_name, n, auc, bands in band_rows:
        lines.append(f"| {sample} | {probe_name} | {n} | {auc:.3f} | {bands['0-0.1']:.3f} | "
                     f"{bands['0.1-0.25']:.3f} | {bands['0.25-0.5']:.3f} |")
    lines += [
        "", "## rPIE from each start", "",
        "| sample | probe | start | 1 epoch | 4 epochs |", "|---|---|---|---|---|",
    ]
    for sample, probe_name, name, one, four in rows:
        lines.append(f"| {sample} | {probe_name} | {name} | {one[0]:.3f} ({one[1]:.2f} s) | "
                     f"{four[0]:.3f} ({four[1]:.2f} s) |")
    lines += [
        "", "## What the refiner chooses (`start=\"auto\"`, 4 epochs after the trial)", "",
        "Each candidate gets one object-only trial pass; the lowest Fourier-magnitude residual "
        "(no truth used) is continued.", "",
        "| sample | probe | chosen | residuals after the trial | FRC-AUC |",
        "|---|---|---|---|---|",
    ]
    for sample, probe_name, chosen, residuals, auc in auto_rows:
        text = ", ".join(f"{k} {v:.2e}" for k, v in residuals.items())
        lines.append(f"| {sample} | {probe_name} | {chosen} | {text} | {auc:.3f} |")
    lines += [
        "", "## Reading the tables", "",
        "The network's stitched phase agrees with the truth best in the middle band and worst at "
        "the lowest frequencies (offsets between regions, slow ramps: the network sees one "
        "64-px group at a time and nothing ties distant groups together) and at the highest "
        "(it smooths). rPIE corrects an error of spatial period L only through chains of "
        "overlapping positions across L, so low-frequency errors in a seed decay slowly, and "
        "the seed that looks better can be the worse start: the network's full object, and its "
        "phase alone, trail the flat start after 1 and 4 epochs, and its low frequencies alone "
        "are the worst start. Its phase with the low frequencies removed keeps the mid-band "
        "detail and is the best start where the network's detail is right, and no better than "
        "flat where it is not. Which case a run is cannot be known without the truth, so the "
        "refiner gives each candidate one trial pass and keeps the lowest Fourier-magnitude "
        "residual: the last table shows how that choice compares with the best row of the "
        "table above for each sample.",
    ]
    args.out.write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
