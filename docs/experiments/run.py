"""The paper's findings in miniature, on simulated data with known truth -> docs/experiments.md.

    .venv/bin/python docs/experiments/run.py                  # scale "cpu": about an hour, 2 cores
    .venv/bin/python docs/experiments/run.py --scale smoke    # seconds: checks the script runs
    .venv/bin/python docs/experiments/run.py --scale paper    # paper-size networks (a GPU job)

1. PS (probe-centric synthetic, unsupervised) vs PE (trained on one experiment's own data) vs
   SS (supervised on the synthetic data), tested on other experiments with the same probe whose
   objects belong to classes none of them saw.
2. Probe-excluded single vs dual (probe included) vs unified (4 probes), tested per probe.
3. Object-class effect: one model per synthetic class, with the classes' spectral slopes.
4. Ablation: C = 1 vs C = 4 random order vs C = 4 fixed quadrant order.

Extra sections, each a separate run (``--section budget|crop|data|long``) whose table lands in
docs/experiments/<section>.md and is included in experiments.md: 5. PS with 3x the steps,
6. stitching crops, 7. 4x the synthetic objects, 8. longer training (``--long 4x5,8x4``: objects
factor x steps factor per model; about 85 min on 2 cores).

Every model of one experiment gets the same number of optimiser steps (the same compute), so a
model trained on more data sees each pattern fewer times. Models train in parallel worker
processes (one torch thread each). Every number in docs/experiments.md comes from this script.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from multiprocessing import get_context
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

CLASSES = ("dead_leaves", "blurred_white_noise", "procedural", "simplex")
PROBES = ("zone_plate", "pinhole", "kb", "mixed")
# Test samples: built-in samples of classes that no training set contains.
TESTS = (("test_chip", 12), ("cells", 13))
#: Stitched centre of each 64-px patch: the paper's N/2 (the product default is 3N/8).
STITCH_CROP = 32

SCALES = {
    # steps: optimiser steps per model for experiments 1 & 4, 2, 3 (batch 16).
    "smoke": {"width": 4, "objects": 1, "shape": (120, 120), "step_px": 6.0,
              "test_shape": (128, 128), "steps": (6, 4, 3), "device": "cpu"},
    "cpu": {"width": 16, "objects": 4, "shape": (160, 160), "step_px": 4.0,
            "test_shape": (192, 192), "steps": (8000, 2500, 2000), "device": "cpu"},
    "paper": {"width": 64, "objects": 8, "shape": (250, 250), "step_px": 3.0,
              "test_shape": (256, 256), "steps": (60000, 30000, 20000), "device": "cuda"},
}


@dataclass
class Job:
    """One model to train and score (runs in a worker process)."""

    key: str
    probes: tuple[str, ...]
    classes: tuple[str, ...] = CLASSES
    loss: str = "poisson"
    channels: int = 4
    grouping: str = "quadrant"
    own_experiment: tuple[str, int] | None = None  # PE: train on one simulated experiment
    steps: int = 1000
    test_probes: tuple[str, ...] = ("zone_plate",)
    scale: dict = field(default_factory=dict)
    seed: int = 0
    other_crops: tuple[int, ...] = ()  # also score with these stitching crops (section crop)


def _probes() -> dict:
    from bluesky_ptychopinn.physics import ExperimentGeometry, make_probe

    g = ExperimentGeometry()
    return {p: make_probe(p, g.frame_size, g.object_pixel_size_m, g.energy_ev) for p in PROBES}


def _test_experiment(sample: str, probe: np.ndarray, seed: int, scale: dict):
    from bluesky_ptychopinn.synthetic import simulate_experiment

    return simulate_experiment(sample, probe, object_shape=scale["test_shape"], overlap=0.75,
                               photons=1e6, seed=seed)


def run_job(job: Job) -> dict:
    """Simulate the job's training data, train, and score on the test experiments."""
    import torch

    from bluesky_ptychopinn._workflows import reconstruct_with_model, score_against
    from bluesky_ptychopinn.models import ptychopinn
    from bluesky_ptychopinn.training import (
        GroupedSamples,
        TrainConfig,
        TrainingExperiment,
        synthetic_experiments,
        train,
    )

    torch.set_num_threads(1)
    torch.manual_seed(job.seed)
    scale = job.scale
    probes = _probes()
    if job.own_experiment is not None:
        sample, seed = job.own_experiment
        ds = _test_experiment(sample, probes[job.probes[0]], seed, scale)
        experiments = [TrainingExperiment.from_dataset(ds, name=sample,
                                                       probe_name=job.probes[0])]
        groups_per_point = 8  # one small experiment: draw several groups per scan point
    else:
        experiments = synthetic_experiments(
            {p: probes[p] for p in job.probes}, job.classes,
            objects_per_class=scale["objects"], object_shape=scale["shape"],
            step_px=scale["step_px"], photons=(1e5, 1e6), seed=job.seed,
            contrast_range=(0.1, 1.0),
        )
        groups_per_point = 1
    data = GroupedSamples(experiments, channels=job.channels, grouping=job.grouping,
                          groups_per_point=groups_per_point, seed=job.seed)
    batch = 16
    per_epoch = max(int(len(data) * 0.95) // batch, 1)
    epochs = max(math.ceil(job.steps / per_epoch), 1)
    config = TrainConfig(epochs=epochs, batch_size=batch, loss=job.loss, seed=job.seed,
                         progress=False, device=scale["device"],
                         max_batches_per_epoch=math.ceil(job.steps / epochs))
    model = ptychopinn(frame_size=64, channels=job.channels, base_width=scale["width"])
    start = time.perf_counter()
    result = train(model, data, config)
    seconds = time.perf_counter() - start
    if os.environ.get("EXPERIMENTS_SAVE_DIR"):  # keep the trained networks for a closer look
        from bluesky_ptychopinn.models import save_model

        target = Path(os.environ["EXPERIMENTS_SAVE_DIR"]) / job.key.replace(" ", "_")
        save_model(result.model, target, provenance={"experiment_job": job.key, "steps": job.steps})
    scores, crop_scores = {}, {}
    for probe in job.test_probes:
        for sample, seed in TESTS:
            ds = _test_experiment(sample, probes[probe], seed, scale)
            # the paper's central N/2 crop: the crop these tables were measured with
            snap = reconstruct_with_model(ds, result.model, device=scale["device"],
                                          crop=STITCH_CROP)
            # Unregistered on purpose: the network stitches at the known positions, into the
            # truth's frame, so an offset is the method's error, and docs/experiments.md was
            # measured this way (compare_objects registers by default).
            s = score_against(snap.object, ds.object, snap.weight, register=False)
            scores[(probe, sample)] = {
                "phase": float(s["frc_auc_0.5_phase"]),
                "amplitude": float(s["frc_auc_0.5_amplitude"]),
                "phase_1.0": float(s["frc_auc_1.0_phase"]),
                "curve": (np.asarray(s["frc_phase"].freq), np.asarray(s["frc_phase"].frc)),
            }
            for crop in job.other_crops:
                snap = reconstruct_with_model(ds, result.model, device=scale["device"],
                                              crop=crop)
                s = score_against(snap.object, ds.object, snap.weight, register=False)
                crop_scores[(crop, probe, sample)] = float(s["frc_auc_0.5_phase"])
    return {"key": job.key, "scores": scores, "crop_scores": crop_scores, "seconds": seconds,
            "objects_per_class": job.scale["objects"],
            "patterns": int(sum(len(e.counts) for e in experiments)), "groups": len(data),
            "epochs": epochs, "steps": config.max_batches_per_epoch * epochs,
            "final_loss": result.history[-1]["loss"] if result.history else math.nan}


def jobs_for(scale: dict) -> list[Job]:
    s1, s2, s3 = scale["steps"]
    every = ("zone_plate", "kb")
    jobs = [
        # 1. PS / PE / SS, zone-plate probe.  PS doubles as the C = 4 quadrant ablation (4).
        Job("PS", ("zone_plate",), steps=s1),
        Job("SS", ("zone_plate",), loss="supervised", steps=s1),
        Job("PE", ("zone_plate",), own_experiment=("siemens_star", 11), steps=s1 // 2),
        # 4. ablation
        Job("C1", ("zone_plate",), channels=1, grouping="single", steps=s1),
        Job("C4 random", ("zone_plate",), grouping="random", steps=s1),
        # 2. probe-excluded single / dual / unified
        Job("single", ("pinhole",), steps=s2, test_probes=every),
        Job("dual zone_plate", ("pinhole", "zone_plate"), steps=s2),
        Job("dual kb", ("pinhole", "kb"), steps=s2, test_probes=("kb",)),
        Job("unified", PROBES, steps=s2, test_probes=every),
    ]
    # 3. object classes
    jobs += [Job(f"class {c}", ("zone_plate",), classes=(c,), steps=s3) for c in CLASSES]
    for job in jobs:
        job.scale = scale
    return jobs


BUDGET_FACTOR = 3


def budget_jobs(scale: dict) -> list[Job]:
    """5. Training budget: the PS model of experiment 1 with three times the steps."""
    job = Job(f"PS x{BUDGET_FACTOR}", ("zone_plate",), steps=BUDGET_FACTOR * scale["steps"][0])
    job.scale = scale
    return [job]


def budget_report(results: list[dict], scale: dict) -> str:
    (result,) = results
    samples = [s for s, _ in TESTS]
    return "\n".join([
        "## 5. Training budget", "",
        f"The PS model of experiment 1, trained for {BUDGET_FACTOR} times as many steps "
        "(same data, same seed; `run.py --section budget`). Compare with the PS row above.", "",
        table(["model", *[f"{s} phase" for s in samples], "mean phase", "mean amplitude",
               "steps", "train time"],
              [[result["key"], *_cells(result, "zone_plate"),
                f"{_mean(result, 'zone_plate', 'amplitude'):.3f}", result["steps"],
                f"{result['seconds'] / 60:.1f} min"]]), ""])


CROPS = (16, 24, 32, 40)


def crop_jobs(scale: dict) -> list[Job]:
    """6. Stitching crop: the PS model of experiment 1 (same seed, so the same network),
    scored with several stitching crops."""
    job = Job("PS", ("zone_plate",), steps=scale["steps"][0],
              other_crops=tuple(c for c in CROPS if c != STITCH_CROP))
    job.scale = scale
    return [job]


def crop_report(results: list[dict], scale: dict) -> str:
    (result,) = results
    samples = [s for s, _ in TESTS]
    rows = []
    for crop in CROPS:
        if crop == STITCH_CROP:
            values = [result["scores"][("zone_plate", s)]["phase"] for s in samples]
        else:
            values = [result["crop_scores"][(crop, "zone_plate", s)] for s in samples]
        label = f"{crop}" + (" (N/2, the paper's; the tables above)" if crop == STITCH_CROP
                             else " (3N/8, the product default)" if crop == 24 else "")
        rows.append([label, *[f"{v:.3f}" for v in values], f"**{np.mean(values):.3f}**"])
    return "\n".join([
        "## 6. Stitching crop", "",
        "The PS model of experiment 1 (same data and seed: the same network), its predicted "
        "patches stitched with different central crops (tent taper; `run.py --section crop`). "
        "The same comparison for the shipped default model over 12 held-out experiments is in "
        "docs/models.md.", "",
        table(["crop (px of 64)", *[f"{s} phase" for s in samples], "mean phase"], rows), ""])


#: (objects factor, steps factor) of section 7's models: 4x objects, same and 3x steps
DATA_RUNS = ((4, 1), (4, BUDGET_FACTOR))
#: section 8's models; `--long 4x5,8x4` on the command line
LONG_RUNS = ((4, 5), (8, 4))


def _scaled_ps_jobs(scale: dict, runs: tuple[tuple[int, int], ...]) -> list[Job]:
    """The PS model of experiment 1 with ``objects`` times the synthetic objects per class and
    ``steps`` times the steps, for each (objects, steps) pair, scored with N/2 and 3N/8."""
    jobs = []
    for objects, steps in runs:
        key = f"PS {objects}x objects" + (f", x{steps} steps" if steps != 1 else "")
        job = Job(key, ("zone_plate",), steps=steps * scale["steps"][0], other_crops=(24,))
        job.scale = {**scale, "objects": objects * scale["objects"]}
        jobs.append(job)
    return jobs


def _scaled_ps_table(results: list[dict]) -> str:
    samples = [s for s, _ in TESTS]
    rows = []
    for r in results:
        n32 = [r["scores"][("zone_plate", s)]["phase"] for s in samples]
        n24 = [r["crop_scores"][(24, "zone_plate", s)] for s in samples]
        rows.append([r["key"], r["objects_per_class"], r["patterns"], r["steps"],
                     *[f"{v:.3f}" for v in n32], f"**{np.mean(n32):.3f}**",
                     *[f"{v:.3f}" for v in n24], f"**{np.mean(n24):.3f}**",
                     f"{r['seconds'] / 60:.1f} min"])
    return table(["model", "objects per class", "training patterns", "steps",
                  *[f"{s} phase (N/2)" for s in samples], "mean (N/2)",
                  *[f"{s} phase (3N/8)" for s in samples], "mean (3N/8)", "train time"], rows)


def data_jobs(scale: dict) -> list[Job]:
    """7. Training data: PS with 4 times as many synthetic objects per class, for the same
    number of steps and for 3 times as many."""
    return _scaled_ps_jobs(scale, DATA_RUNS)


def data_report(results: list[dict], scale: dict) -> str:
    factor = DATA_RUNS[0][0]
    return "\n".join([
        "## 7. Training data", "",
        f"The PS model of experiment 1 trained on {factor} times as many synthetic objects "
        f"per class ({factor * scale['objects']} instead of {scale['objects']}), for the "
        f"same number of steps and for {BUDGET_FACTOR} times as many (`run.py --section data`),"
        " scored with the paper's N/2 crop and with the product default 3N/8. Compare with PS "
        "(sections 1, 5 and 6).", "",
        _scaled_ps_table(results), ""])


def long_jobs(scale: dict, runs: tuple[tuple[int, int], ...] = LONG_RUNS) -> list[Job]:
    """8. Longer training: PS with more objects and more steps than section 7."""
    return _scaled_ps_jobs(scale, runs)


def long_report(results: list[dict], scale: dict) -> str:
    return "\n".join([
        "## 8. Longer training", "",
        "The PS model of experiment 1 with more synthetic objects per class and more steps "
        "than section 7 (`run.py --section long`; one model per worker, one torch thread "
        "each), scored with the paper's N/2 crop and with the product default 3N/8.", "",
        _scaled_ps_table(results), ""])


#: --section name -> (jobs, report); each writes experiments/<name>.md
EXTRA_SECTIONS = {"budget": (budget_jobs, budget_report), "crop": (crop_jobs, crop_report),
                  "data": (data_jobs, data_report), "long": (long_jobs, long_report)}


def table(header, rows) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(out)


def _mean(result: dict, probe: str, what: str = "phase") -> float:
    return float(np.mean([v[what] for (p, _), v in result["scores"].items() if p == probe]))


def _cells(result: dict, probe: str, what: str = "phase") -> list[str]:
    values = [result["scores"][(probe, sample)][what] for sample, _ in TESTS]
    return [f"{v:.3f}" for v in values] + [f"**{np.mean(values):.3f}**"]


def report(results: dict, scale_name: str, scale: dict, seconds: float, figures: Path,
           machine: str) -> str:
    from bluesky_ptychopinn.figures import frc_figure
    from bluesky_ptychopinn.synthetic import make_object, spectral_slope

    samples = [s for s, _ in TESTS]
    head = ["model", *[f"{s} phase" for s in samples], "mean phase", "mean amplitude",
            "steps", "training patterns", "train time"]

    def row(label: str, key: str, probe: str = "zone_plate") -> list:
        r = results[key]
        return [label, *_cells(r, probe), f"{_mean(r, probe, 'amplitude'):.3f}", r["steps"],
                r["patterns"], f"{r['seconds'] / 60:.1f} min"]

    s1, s2, s3 = scale["steps"]
    md = [
        "# Experiments: the paper's findings in miniature", "",
        f"Regenerate: `.venv/bin/python docs/experiments/run.py --scale {scale_name}` "
        f"({seconds / 60:.0f} min on {machine}). Scale `{scale_name}`: PtychoPINN with base "
        f"width {scale['width']}, C = 4 unless stated, batch 16, Adam 1e-3 with a cosine "
        f"schedule; synthetic training objects {scale['shape'][0]} x {scale['shape'][1]} px, "
        f"{scale['objects']} per class and probe, jittered raster with "
        f"{scale['step_px']:g}-px steps, 1e5-1e6 photons per frame, contrast augmentation. "
        "Every model of an experiment gets the same number of optimiser steps. Test scans: "
        f"{scale['test_shape'][0]} x {scale['test_shape'][1]} px objects of the built-in "
        "`test_chip` and `cells` samples (classes no training set contains), Fermat spiral with "
        "75 % overlap, 1e6 photons, Poisson noise. Score: FRC-AUC = mean phase FRC up to 0.5 of "
        "Nyquist against the truth, after global-phase and phase-plane removal, no shift "
        "registration (the network stitches at the known positions), 8-px taper, "
        f"stitching the central {STITCH_CROP} px of each 64-px patch (the paper's N/2), "
        "inside the well-covered region (`bluesky_ptychopinn.metrics.compare_objects`). "
        "One seed: differences below about 0.03 are within run-to-run noise.", "",
        "## 1. PS vs PE vs SS", "",
        "Zone-plate probe. PS: probe-centric synthetic data (four object classes), "
        "unsupervised Poisson loss through the probe. PE: the same network trained "
        "unsupervised on one simulated experiment's own data (a Siemens star scan). "
        "SS: the PS data, supervised (L1 on the true amplitude and phase patches, as in "
        "PtychoNN).", "",
        table(head, [row("PS (synthetic, unsupervised)", "PS"),
                     row("PE (one experiment's own data)", "PE"),
                     row("SS (synthetic, supervised)", "SS")]), "",
        "![FRC of PS, PE, SS](../figures/experiments_1_frc.png)", "",
    ]
    frc_figure(figures / "experiments_1_frc.png",
               {k: results[k]["scores"][("zone_plate", "test_chip")]["curve"]
                for k in ("PS", "PE", "SS")},
               title="1. test chip, zone-plate probe (phase FRC)")

    rows = []
    for probe in ("zone_plate", "kb"):
        dual = results[f"dual {probe}"]
        rows.append([probe, f"{_mean(results['single'], probe):.3f}",
                     f"{_mean(dual, probe):.3f}", f"{_mean(results['unified'], probe):.3f}"])
    md += ["## 2. Probe-excluded single vs dual vs unified", "",
           "Single: trained on the pinhole probe only (the test probe excluded). Dual: pinhole "
           "+ the test probe. Unified: all four probes (zone plate, pinhole, KB, 3-mode mixed "
           f"state). {s2} steps each. Mean phase FRC-AUC over the two test samples, scanned "
           "with each test probe.", "",
           table(["test probe", "single (pinhole, excluded)", "dual (pinhole + test probe)",
                  "unified (4 probes)"], rows), ""]

    rows, curves = [], {}
    for kind in CLASSES:
        r = results[f"class {kind}"]
        slope = np.mean([spectral_slope(np.abs(make_object(kind, (256, 256), seed=k)))
                         for k in range(3)])
        rows.append([kind, f"{slope:.2f}", *_cells(r, "zone_plate"),
                     f"{np.mean([v['phase_1.0'] for v in r['scores'].values()]):.3f}"])
        curves[kind] = r["scores"][("zone_plate", "test_chip")]["curve"]
    frc_figure(figures / "experiments_3_frc.png", curves,
               title="3. one object class per model, test chip (phase FRC)")
    md += ["## 3. Object-class effect", "",
           f"One model per synthetic class (zone-plate probe, {s3} steps each). Spectral slope "
           "of the class's amplitude power spectrum (log-log fit, 0.02-0.25 cycles/px, 3 "
           "seeds): the steeper, the less high-frequency content.", "",
           table(["class", "spectral slope", *[f"{s} phase" for s in samples], "mean phase",
                  "mean FRC-AUC(0-1.0)"], rows), "",
           "![FRC per class](../figures/experiments_3_frc.png)", ""]

    md += ["## 4. Ablation: overlap constraint and group order", "",
           table(head, [row("C = 1 (no overlap constraint)", "C1"),
                        row("C = 4, random order", "C4 random"),
                        row("C = 4, fixed quadrant order (= PS)", "PS")]), ""]
    md += ["## Training log", "",
           table(["model", "patterns", "groups", "epochs", "steps", "final loss", "time"],
                 [[k, r["patterns"], r["groups"], r["epochs"], r["steps"],
                   f"{r['final_loss']:.4f}", f"{r['seconds']:.0f} s"]
                  for k, r in results.items()]), ""]
    return "\n".join(md)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", choices=sorted(SCALES), default="cpu")
    parser.add_argument("--workers", type=int, default=2,
                        help="models trained at once (one torch thread each)")
    parser.add_argument("--section", choices=("main", *EXTRA_SECTIONS), default="main",
                        help="main: experiments 1-4 -> experiments.md; budget: experiment 5 -> "
                        "experiments/budget.md; crop: experiment 6 -> experiments/crop.md; "
                        "data: experiment 7 -> experiments/data.md; long: experiment 8 -> "
                        "experiments/long.md (each included in experiments.md when present)")
    parser.add_argument("--long", default=None, metavar="OxS,...",
                        help="section long's models as objects-factor x steps-factor pairs "
                        "(default: " + ",".join(f"{o}x{s}" for o, s in LONG_RUNS) + ")")
    parser.add_argument("--out", type=Path, default=ROOT / "docs",
                        help="where experiments.md and figures/ go")
    parser.add_argument("--discussion", type=Path,
                        default=Path(__file__).with_name("discussion.md"),
                        help="hand-written interpretation appended to the report")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT / "bench"))
    from core import machine

    scale = SCALES[args.scale]
    figures = args.out / "figures"
    figures.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    results = {}
    if args.section != "main":
        jobs, write = EXTRA_SECTIONS[args.section]
        if args.section == "long" and args.long:
            runs = tuple(tuple(int(v) for v in pair.split("x")) for pair in args.long.split(","))
            jobs = partial(long_jobs, runs=runs)
        with ProcessPoolExecutor(args.workers, mp_context=get_context("spawn")) as pool:
            results = list(pool.map(run_job, jobs(scale)))
        md = write(results, scale)
        target = args.out / "experiments" / f"{args.section}.md"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(md)
        print(md)
        return
    jobs = jobs_for(scale)
    workers = 1 if scale["device"] == "cuda" else args.workers
    with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
        for result in pool.map(run_job, jobs):
            results[result["key"]] = result
            print(f"[{(time.perf_counter() - start) / 60:5.1f} min] {result['key']}: "
                  + ", ".join(f"{p}/{s} {v['phase']:.3f}"
                              for (p, s), v in result["scores"].items()), flush=True)
    seconds = time.perf_counter() - start
    md = report(results, args.scale, scale, seconds, figures, machine())
    for section in EXTRA_SECTIONS:
        extra = args.out / "experiments" / f"{section}.md"
        if extra.is_file() and args.scale != "smoke":
            md += "\n" + extra.read_text()
    if args.discussion.is_file() and args.scale != "smoke":
        md += "\n" + args.discussion.read_text()
    (args.out / "experiments.md").write_text(md)
    print(md)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
