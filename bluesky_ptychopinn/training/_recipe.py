"""The probe-centric recipe: synthetic objects x the beamline's probes -> a trained model.

One function, :func:`train_probe_centric`, used by ``bluesky-ptychopinn train`` and by
``scripts/train_default_model.py`` (which trains the shipped default model with these
defaults), so that the command line reproduces the shipped model and the model card records
everything the recipe used.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

from ..physics import ExperimentGeometry
from ._data import GroupedSamples
from ._synthetic_source import probe_sha256, synthetic_experiments
from ._trainer import TrainConfig, TrainResult, train

__all__ = ["DEFAULT_CLASSES", "ProbeCentricRecipe", "train_probe_centric"]

DEFAULT_CLASSES = ("dead_leaves", "blurred_white_noise", "procedural", "simplex")


@dataclass
class ProbeCentricRecipe:
    """Every knob of the recipe (defaults: the shipped default model's)."""

    object_classes: Sequence[str] = DEFAULT_CLASSES
    objects_per_class: int = 4
    object_size: int = 160
    step_px: float = 4.0
    photons: tuple[float, float] = (1e5, 1e6)
    contrast: tuple[float, float] = (0.1, 1.0)
    channels: int = 4
    base_width: int = 8
    epochs: int = 16
    finetune_epochs: int = 2
    batch_size: int = 16
    lr: float = 1e-3
    grad_clip: float = 5.0
    val_fraction: float = 0.05
    loss: str = "poisson"
    seed: int = 0
    device: str | None = None
    extra: dict = field(default_factory=dict)  # e.g. checkpoint_dir, log_csv, max batches

    def config(self) -> TrainConfig:
        return TrainConfig(epochs=self.epochs, finetune_epochs=self.finetune_epochs,
                           batch_size=self.batch_size, lr=self.lr, grad_clip=self.grad_clip,
                           val_fraction=self.val_fraction, loss=self.loss, seed=self.seed,
                           device=self.device, **self.extra)


def train_probe_centric(probes: Mapping[str, np.ndarray], recipe: ProbeCentricRecipe,
                        *, geometry: ExperimentGeometry | None = None, progress: bool = True,
                        resumed: bool = False) -> tuple[TrainResult, dict]:
    """Simulate synthetic experiments with each probe and train a model on them.

    Parameters
    ----------
    probes : mapping of str to numpy.ndarray
        Name -> (M, N, N) probe at the model's frame size (the names go into the card:
        ``LiveReconstruction(model="auto")`` matches runs by them).
    recipe : ProbeCentricRecipe
        Object classes, counts, scan, dose, contrast, network and training settings.
    geometry : ExperimentGeometry, optional
        Recorded in the card (default: the project's default geometry at the probes' N).
    progress : bool
        Progress bars.
    resumed : bool
        Recorded in the card (training continued from a checkpoint).

    Returns
    -------
    result : TrainResult
    provenance : dict
        The card's ``provenance`` entry: training data and the full recipe.
    """
    from ..models import ptychopinn

    n = int(next(iter(probes.values())).shape[-1])
    geometry = geometry or ExperimentGeometry(frame_size=n)
    experiments = synthetic_experiments(
        probes, tuple(recipe.object_classes), objects_per_class=recipe.objects_per_class,
        object_shape=(recipe.object_size, recipe.object_size), step_px=recipe.step_px,
        photons=tuple(recipe.photons), seed=recipe.seed, progress=progress,
        contrast_range=tuple(recipe.contrast))
    grouping = "quadrant" if recipe.channels == 4 else "single"
    data = GroupedSamples(experiments, channels=recipe.channels, grouping=grouping,
                          seed=recipe.seed)
    model = ptychopinn(frame_size=n, channels=recipe.channels, base_width=recipe.base_width)
    config = recipe.config()
    start = time.perf_counter()
    result = train(model, data, config)
    provenance = {
        "recipe": {k: (list(v) if isinstance(v, tuple) else v)
                   for k, v in asdict(recipe).items() if k != "extra"},
        "training_data": {
            "kind": "probe-centric synthetic (simulated in memory)",
            "geometry": {"energy_ev": geometry.energy_ev,
                         "detector_distance_m": geometry.detector_distance_m,
                         "detector_pixel_size_m": geometry.detector_pixel_size_m,
                         "frame_size": n, "object_pixel_size_m": geometry.object_pixel_size_m},
            "probes": [{"name": k, "modes": int(np.shape(v)[0]) if np.ndim(v) == 3 else 1,
                        "sha256": probe_sha256(v)} for k, v in probes.items()],
            "object_classes": list(recipe.object_classes),
            "objects_per_class": recipe.objects_per_class,
            "experiments": len(experiments),
            "patterns": int(sum(len(e.counts) for e in experiments)),
            "photons_per_frame": list(recipe.photons),
            "scan": f"jittered raster, step {recipe.step_px:g} px",
            "grouping": grouping,
            "contrast_augmentation": list(recipe.contrast),
        },
        "training": {"config": config.model_dump(), "history": result.history,
                     "best_val_loss": result.best_val, "resumed": resumed,
                     "seconds": round(time.perf_counter() - start, 1)},
    }
    return result, provenance
