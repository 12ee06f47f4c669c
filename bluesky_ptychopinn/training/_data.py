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
from ..physics._tensors import as_probe_modes
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
        (n, N, N) float32 photon counts, n >= 1 (a numpy array is converted). Masked pixels
        are set to 0 here, so whatever they held (NaN, a detector flag value) never reaches the
        network input, the input scale or a loss; valid pixels must be finite and >= 0.
    positions : numpy.ndarray
        (n, 2) finite probe centres in object pixels.
    probe : torch.Tensor
        (M, N, N) complex64, sum |P|^2 = 1. A bare (N, N) probe is one mode and is stored as
        (1, N, N).
    mask : torch.Tensor or None
        (N, N) bool valid pixels.
    name, probe_name : str
        Labels (the probe name routes samples of several experiments to the right probe).
    truth : numpy.ndarray or None
        True object (for supervised training and evaluation).

    Raises
    ------
    InvalidInputError
        On construction, for wrongly shaped inputs, no frames, a mask without valid pixels,
        negative or non-finite counts on valid pixels, non-finite positions, or frames that
        are all zero on the valid pixels.
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
        # Readers return numpy arrays; the rest of training works on tensors.
        counts = torch.as_tensor(self.counts)
        if counts.ndim != 3 or counts.shape[-1] != counts.shape[-2]:
            raise InvalidInputError(f"counts: expected (n, N, N), got {tuple(counts.shape)}")
        if counts.shape[0] == 0:
            raise InvalidInputError("counts: the experiment has no frames (n = 0)")
        if counts.is_complex() or counts.dtype == torch.bool:
            raise InvalidInputError(f"counts: expected real photon counts, got {counts.dtype}")
        counts = counts.to(torch.float32)
        n_frames, n = counts.shape[0], counts.shape[-1]
        self.probe = self._checked_probe(self.probe, n)
        self.positions = self._checked_positions(self.positions, n_frames)
        if self.mask is None:
            valid = torch.ones(n, n, dtype=torch.bool)
        else:
            self.mask = torch.as_tensor(self.mask).bool()
            if tuple(self.mask.shape) != (n, n):
                raise InvalidInputError(
                    f"mask: expected ({n}, {n}) like the frames, got {tuple(self.mask.shape)}")
            valid = self.mask
        if not bool(valid.any()):
            raise InvalidInputError("mask: no valid pixel (True = valid)")
        on_valid = counts.flatten(1) if self.mask is None else counts[:, valid]
        bad = ~torch.isfinite(on_valid) | (on_valid < 0)
        if bool(bad.any()):
            frames = torch.nonzero(bad.any(dim=1)).flatten()
            raise InvalidInputError(
                f"counts: {int(bad.sum())} valid pixels in {len(frames)} frames (first: frame "
                f"{int(frames[0])}) are negative or not finite; mask them (mask False) or "
                "repair the frames")
        # Masked pixels hold anything (NaN, a detector's 2**32 - 1 flag): zero them once here so
        # they never reach the network input, the input scale or a loss. torch.where, not a
        # product, because NaN * 0 is NaN.
        if not bool(valid.all()):
            counts = torch.where(valid, counts, torch.zeros((), dtype=counts.dtype))
        self.counts = counts
        mean_total = float(self.counts.flatten(1).sum(1).mean())
        if not mean_total > 0:
            raise InvalidInputError(
                "counts: every frame is zero on the valid pixels (a closed shutter or a dark "
                "run?); nothing to train on")
        self.photons = photon_scale(self.counts, self.probe, self.mask)
        self.input_scale = math.sqrt(n * n / mean_total)

    @staticmethod
    def _checked_probe(probe, n: int) -> torch.Tensor:
        """The probe as complex (M, N, N): a bare (N, N) is one mode (CONVENTIONS.md)."""
        probe = torch.as_tensor(probe)
        if not (probe.is_complex() or probe.is_floating_point()):
            raise InvalidInputError(f"probe: expected a complex array, got {probe.dtype}")
        # C order: a transposed probe would make every physics-layer product stride.
        probe = as_probe_modes(probe.to(torch.complex64)).contiguous()
        if probe.ndim != 3:
            raise InvalidInputError(
                f"probe: expected (N, N) or (M, N, N), got {tuple(probe.shape)}")
        if probe.shape[-1] != n:
            raise InvalidInputError(
                f"probe: {tuple(probe.shape)} does not match frames ({n}, {n}); resample it "
                "(physics.resample_probe)"
            )
        return probe

    @staticmethod
    def _checked_positions(positions, n_frames: int) -> np.ndarray:
        """Finite (n, 2) float64 probe centres, one per frame."""
        try:
            array = np.asarray(positions, dtype=np.float64)
        except (TypeError, ValueError) as exc:
            raise InvalidInputError(f"positions: not an (n, 2) array of numbers ({exc})") from None
        if array.ndim != 2 or array.shape[1] != 2:
            raise InvalidInputError(f"positions: expected (n, 2) (y, x), got {array.shape}")
        if len(array) != n_frames:
            raise InvalidInputError(f"positions: {len(array)} for {n_frames} frames")
        finite = np.isfinite(array).all(axis=1)
        if not finite.all():
            raise InvalidInputError(
                f"positions: {int((~finite).sum())} not finite (first: frame "
                f"{int(np.flatnonzero(~finite)[0])})")
        return array

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
            modes = exp.probe.reshape(-1, n, n)  # (M, N, N) since TrainingExperiment's check
            self.probes[e, : modes.shape[0]] = modes.to(torch.complex64)
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
