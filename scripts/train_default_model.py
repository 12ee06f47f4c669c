"""Train the default model shipped in bluesky_ptychopinn/data/models/default.

    .venv/bin/python scripts/train_default_model.py [--epochs 16] [--out DIR]

Probe-centric, unsupervised: four diverse synthetic probes (defocused zone plate with central
stop, pinhole, KB mirrors with astigmatism and coma, a 3-mode mixed state) x the four synthetic
object classes, simulated in memory; C = 4 quadrant groups; Poisson loss through each sample's
own probe. Then it evaluates on held-out experiments (a natural-image-like object class none of
the training sets used) and writes the model card.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from bluesky_ptychopinn.models import save_model
from bluesky_ptychopinn.physics import ExperimentGeometry, make_probe
from bluesky_ptychopinn.training._recipe import (
    DEFAULT_CLASSES,
    ProbeCentricRecipe,
    train_probe_centric,
)

PROBES = ("zone_plate", "pinhole", "kb", "mixed")
CLASSES = DEFAULT_CLASSES


def main() -> None:
    defaults = ProbeCentricRecipe()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=defaults.epochs)
    parser.add_argument("--finetune-epochs", type=int, default=defaults.finetune_epochs)
    parser.add_argument("--objects-per-class", type=int, default=defaults.objects_per_class)
    parser.add_argument("--base-width", type=int, default=defaults.base_width)
    parser.add_argument("--channels", type=int, default=defaults.channels)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--contrast", type=float, nargs=2, default=defaults.contrast,
                        metavar=("LO", "HI"),
                        help="contrast augmentation range (phase span pi*U(LO, HI)); "
                        "'1 1' = the paper's full-contrast objects")
    parser.add_argument(
        "--out", type=Path,
        default=Path(__file__).resolve().parent.parent / "bluesky_ptychopinn/data/models/default",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    geometry = ExperimentGeometry()
    n, dx = geometry.frame_size, geometry.object_pixel_size_m
    probes = {name: make_probe(name, n, dx, geometry.energy_ev) for name in PROBES}
    # The same function as `bluesky-ptychopinn train` (its defaults are these).
    recipe = ProbeCentricRecipe(
        object_classes=CLASSES, objects_per_class=args.objects_per_class,
        contrast=tuple(args.contrast), channels=args.channels, base_width=args.base_width,
        epochs=args.epochs, finetune_epochs=args.finetune_epochs, seed=args.seed)
    start = time.perf_counter()
    result, provenance = train_probe_centric(probes, recipe, geometry=geometry)
    seconds = time.perf_counter() - start
    provenance["command"] = "scripts/train_default_model.py " + " ".join(
        f"--{k.replace('_', '-')} " + (" ".join(map(str, v)) if isinstance(v, (list, tuple))
                                       else str(v))
        for k, v in vars(args).items() if k != "out")
    provenance["training"].update(device="cpu", threads=args.threads)
    provenance["expected_input"] = ("photon counts (n, 64, 64), DC at (32, 32), any photon "
                                    "level (input scaled per experiment)")
    save_model(result.model, args.out, provenance=provenance)
    print(json.dumps({"out": str(args.out), "seconds": seconds,
                      "final": result.history[-1]}, indent=2, default=float))
    np.random.seed(args.seed)  # noqa: NPY002


if __name__ == "__main__":
    main()
