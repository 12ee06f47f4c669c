"""Training data: experiments (frames + positions + probe) -> grouped samples for the network."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from ..errors import InvalidInputError
from ..physics import (
    crop_frames,
    diffraction_intensity,
    normalize_probe,
    resample_probe,
    rescale_positions,
)
from ._grouping import group_offsets, group_quadrants, group_random

__all__ = ["TrainingExperiment", "GroupedSamples", "photon_scale", "GROUPINGS"]

GROUPINGS = ("quadrant", "random", "single")


def photon_scale(counts: torch.Tensor, probe: torch.Tensor, mask: torch.Tensor | None) -> float:
    """Incident photons per frame estimated from the data and the unit-norm probe.

    Counts on valid pixels divided by the probe's own far-field power on those pixels (exact for
    a non-absorbing object; with a beamstop it avoids counting the blocked direct beam as lost).
    """
    n = probe.shape[-1]
    far = diffraction_intensity(probe, torch.ones(1, n, n, dtype=probe.dtype))[0]
    valid = torch.ones(n, n, dtype=torch.bool) if mask is None else mask.bool()
    fraction = float(far[valid].sum())
    if fraction <= 1e-6:
        raise InvalidInputError("mask: the mask hides the whole probe far field")
    return float(counts[:, valid].sum(dim=1).mean()) / fraction


@dataclass
class TrainingExperiment:
    """One experiment ready for training, in the model's frame size.

    Attributes
    ----------
    counts : torch.Tensor
        (n, N, N) float32 photon counts.
    positions : numpy.ndarray
        (n, 2) probe centres in object pixels.
    probe : torch.Tensor
        (M, N, N) complex64, sum |P|^2 = 1.
    mask : torch.Tensor or None
        (N, N) bool valid pixels.
    name, probe_name : str
        Labels (the probe name routes samples of several experiments to the right probe).
    truth : numpy.ndarray or None
        True object (for supervised training and evaluation).
    """

    counts: torch.Tensor
    positions: np.ndarray
    probe: torch.Tensor
    mask: torch.Tensor | None = None
    name: str = "experiment"
    probe_name: str = "probe"
    truth: np.ndarray | None = None
    photons: float = field(init=False)
    input_scale: float = field(init=False)

    def __post_init__(self) -> None:
        if self.counts.ndim != 3 or self.counts.shape[-1] != self.counts.shape[-2]:
            raise InvalidInputError(f"counts: expected (n, N, N), got {tuple(self.counts.shape)}")
        if self.probe.shape[-1] != self.counts.shape[-1]:
            raise InvalidInputError(
                f"probe: {tuple(self.probe.shape)} does not match frames "
                f"{tuple(self.counts.shape[-2:])}; resample it (physics.resample_probe)"
            )
        if len(self.positions) != len(self.counts):
            raise InvalidInputError(
                f"positions: {len(self.positions)} for {len(self.counts)} frames"
            )
        self.photons = photon_scale(self.counts, self.probe, self.mask)
        n_pixels = self.counts.shape[-1] ** 2
        self.input_scale = math.sqrt(n_pixels / float(self.counts.flatten(1).sum(1).mean()))

    @classmethod
    def from_dataset(cls, ds, frame_size: int | None = None, *, name: str | None = None,
                     probe_name: str | None = None) -> TrainingExperiment:
        """From a :class:`~bluesky_ptychopinn.io.PtychoDataset`, cropping frames to
        ``frame_size`` with a consistently resampled probe and re-expressed positions."""
        frames = np.asarray(ds.diffraction, dtype=np.float32)
        probe = normalize_probe(ds.probe)
        positions = np.asarray(ds.positions_px, dtype=np.float64)
        mask = None if ds.mask is None else np.asarray(ds.mask, dtype=bool)
        truth = ds.object
        n = frames.shape[-1]
        if frame_size is not None and frame_size != n:
            if frame_size > n:
                raise InvalidInputError(f"frame_size {frame_size} is larger than the frames ({n})")
            frames = crop_frames(frames, frame_size)
            probe = normalize_probe(resample_probe(probe, frame_size))
            positions = rescale_positions(positions, 1.0, n / frame_size)
            mask = None if mask is None else crop_frames(mask[None], frame_size)[0]
            truth = None  # the truth lives on the old pixel grid
        meta = getattr(ds, "metadata", {}) or {}
        return cls(
            counts=torch.from_numpy(np.ascontiguousarray(frames)),
            positions=positions,
            probe=torch.from_numpy(probe),
            mask=None if mask is None else torch.from_numpy(mask),
            name=name or str(meta.get("name", meta.get("object_class", "experiment"))),
            probe_name=probe_name or str(meta.get("probe_model", "probe")),
            truth=truth,
        )


class GroupedSamples(torch.utils.data.Dataset):
    """Groups of C neighbouring frames from several experiments, with per-sample probe routing.

    Each item is ``(counts (C, N, N), offsets (C, 2), experiment index, group index)``; the
    trainer looks up the probe, mask, photon and input scales of the experiment.

    Parameters
    ----------
    experiments : sequence of TrainingExperiment
        All share the frame size N.
    channels : int
        C = 1 or 4.
    grouping : {"quadrant", "random", "single"}
        The paper's fixed-order 4-quadrant grouping, random-order nearest neighbours, or single
        frames (C = 1).
    groups_per_point : int
        Groups drawn per anchor point.
    seed : int
        Grouping draws.
    """

    def __init__(
        self,
        experiments: Sequence[TrainingExperiment],
        *,
        channels: int = 4,
        grouping: str = "quadrant",
        groups_per_point: int = 1,
        seed: int = 0,
        max_distance_factor: float = 2.5,
    ) -> None:
        if not experiments:
            raise InvalidInputError("experiments: need at least one")
        if grouping not in GROUPINGS:
            raise InvalidInputError(f"grouping: expected one of {GROUPINGS}, got {grouping!r}")
        if grouping == "single" and channels != 1 or grouping != "single" and channels == 1:
            raise InvalidInputError(
                f"grouping {grouping!r} does not fit channels={channels} "
                "(use 'single' with C = 1, 'quadrant' or 'random' with C = 4)"
            )
        sizes = {e.counts.shape[-1] for e in experiments}
        if len(sizes) != 1:
            raise InvalidInputError(f"experiments have different frame sizes {sorted(sizes)}")
        self.experiments = list(experiments)
        self.channels = channels
        self.frame_size = sizes.pop()
        rng = np.random.default_rng(seed)
        index, groups, offsets = [], [], []
        from ._grouping import default_max_distance

        for e, exp in enumerate(self.experiments):
            if grouping == "single":
                g = np.arange(len(exp.positions))[:, None]
            else:
                max_d = default_max_distance(exp.positions, max_distance_factor)
                if grouping == "quadrant":
                    g = group_quadrants(exp.positions, max_distance=max_d,
                                        groups_per_point=groups_per_point, seed=rng)
                else:
                    g = group_random(exp.positions, channels, max_distance=max_d,
                                     groups_per_point=groups_per_point, seed=rng)
            groups.append(torch.from_numpy(g))
            offsets.append(torch.from_numpy(group_offsets(exp.positions, g)).float())
            index.append(torch.full((len(g),), e, dtype=torch.long))
        self.groups = groups
        self.offsets = offsets
        self.sample_experiment = torch.cat(index)
        self.sample_group = torch.cat([torch.arange(len(g)) for g in groups])
        max_modes = max(exp.probe.shape[0] for exp in self.experiments)
        n = self.frame_size
        # Probes padded with zero modes to a common M: a zero mode adds no intensity.
        self.probes = torch.zeros(len(self.experiments), max_modes, n, n, dtype=torch.complex64)
        for e, exp in enumerate(self.experiments):
            self.probes[e, : exp.probe.shape[0]] = exp.probe.to(torch.complex64)
        self.masks = torch.stack([
            exp.mask.bool() if exp.mask is not None else torch.ones(n, n, dtype=torch.bool)
            for exp in self.experiments
        ])
        self.photons = torch.tensor([exp.photons for exp in self.experiments])
        self.input_scales = torch.tensor([exp.input_scale for exp in self.experiments])

    def __len__(self) -> int:
        return int(self.sample_experiment.numel())

    def __getitem__(self, item: int):
        e = int(self.sample_experiment[item])
        g = int(self.sample_group[item])
        members = self.groups[e][g]
        return self.experiments[e].counts[members], self.offsets[e][g], e, members

    def truth_patches(self, experiment: int, members: torch.Tensor) -> torch.Tensor:
        """True object patches of a group (supervised baseline)."""
        from ..physics import extract_patches

        exp = self.experiments[experiment]
        if exp.truth is None:
            raise InvalidInputError(f"experiment {exp.name!r} has no ground truth for supervision")
        pos = torch.as_tensor(exp.positions[members.numpy()], dtype=torch.float32)
        return extract_patches(torch.as_tensor(exp.truth), pos, self.frame_size)
