"""Training: neighbour grouping, grouped multi-experiment data, the training loop (DDP-ready)."""

from ._data import GROUPINGS, GroupedSamples, TrainingExperiment, photon_scale
from ._grouping import (
    default_max_distance,
    group_offsets,
    group_quadrants,
    group_random,
    quadrant_groups_for_inference,
)
from ._synthetic_source import probe_sha256, synthetic_experiments
from ._trainer import TrainConfig, TrainResult, seed_everything, train

__all__ = [
    "GROUPINGS",
    "GroupedSamples",
    "TrainConfig",
    "TrainResult",
    "TrainingExperiment",
    "default_max_distance",
    "group_offsets",
    "group_quadrants",
    "group_random",
    "photon_scale",
    "probe_sha256",
    "quadrant_groups_for_inference",
    "seed_everything",
    "synthetic_experiments",
    "train",
]
