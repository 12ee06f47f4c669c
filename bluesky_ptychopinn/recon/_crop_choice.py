"""Choosing the stitching crop from the scan itself.

A fixed crop chosen on simulated samples was wrong on real data. The data can decide instead:
stitch every candidate crop at once (``StreamingReconstructor(crop="auto")``) and keep

- once the refinement tier has an image: the crop whose stitched object agrees best with it
  (phase FRC-AUC between the two, registered; rPIE's image is the better estimate as soon as
  it exists, and measured on held-out scans this picks the best fixed crop: docs/stitching.md);
- before that: the crop whose stitched object best explains the measured frames (lowest
  Fourier-magnitude residual, :func:`~bluesky_ptychopinn.recon.amplitude_residual`) on a
  fixed-size random sample of the frames, so the check costs the same late in a long scan.
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch

from ._residual import amplitude_residual, place_on_canvas
from ._streaming import Snapshot, StreamingReconstructor

__all__ = ["CropChooser"]


class CropChooser:
    """Keep a reservoir of frames and choose a reconstructor's crop by their residual.

    Parameters
    ----------
    sample_size : int
        Frames kept (uniform reservoir sample over the scan so far).
    every_s : float
        Least time between two choices by :meth:`maybe_choose` (unless forced).
    seed : int
        Seed of the reservoir sampling.

    Examples
    --------
    >>> chooser = CropChooser(sample_size=64)                # doctest: +SKIP
    >>> chooser.observe(frames, positions_px)                          # doctest: +SKIP
    >>> recon.add(frames, positions_px)                                # doctest: +SKIP
    >>> chooser.choose(recon, probe)                                   # doctest: +SKIP
    {16: 0.0031, 20: 0.0027, 24: 0.0025, 32: 0.0026, 40: 0.0030}
    """

    def __init__(self, sample_size: int = 128, every_s: float = 2.0, seed: int = 0) -> None:
        self.sample_size, self.every_s = int(sample_size), float(every_s)
        self._rng = np.random.default_rng(seed)
        self._amplitudes: list[np.ndarray] = []
        self._positions: list[np.ndarray] = []
        self.seen = 0
        self.last_choice_at = -math.inf

    def observe(self, counts: np.ndarray, positions_px: np.ndarray) -> None:
        """Offer frames (n, N, N) counts at probe centres (n, 2) object pixels."""
        counts = np.asarray(counts, dtype=np.float32)
        positions_px = np.asarray(positions_px, dtype=np.float64).reshape(-1, 2)
        for frame, pos in zip(counts, positions_px, strict=True):
            self.seen += 1
            if len(self._amplitudes) < self.sample_size:
                self._amplitudes.append(np.sqrt(frame))
                self._positions.append(pos)
                continue
            slot = int(self._rng.integers(self.seen))  # reservoir sampling: uniform over all
            if slot < self.sample_size:
                self._amplitudes[slot], self._positions[slot] = np.sqrt(frame), pos

    def _usable(self, recon: StreamingReconstructor, probe) -> np.ndarray:
        """Reservoir frames whose illuminated area (the brightest pixels holding 95 % of the
        probe's power) lies where every candidate crop has stitched something: a narrow crop
        covers less around the scan's edge, and frames there would otherwise count against it
        for pixels it never claimed."""
        power = (np.abs(np.asarray(probe)) ** 2).reshape(-1, *np.shape(probe)[-2:]).sum(axis=0)
        ranked = np.sort(power.ravel())[::-1]
        cutoff = ranked[np.searchsorted(np.cumsum(ranked), 0.95 * ranked.sum())]
        support = power >= cutoff  # the brightest pixels holding 95 % of the beam
        size = support.shape[-1]
        covered = None
        for crop in recon.crop_candidates:
            weight = recon.snapshot(crop).weight
            here = weight > 1e-3 * float(weight.max())
            covered = here if covered is None else covered & here
        origin = np.asarray(recon.origin)
        keep = np.zeros(len(self._positions), dtype=bool)
        for k, pos in enumerate(self._positions):
            y0, x0 = (np.round(pos - origin - size / 2)).astype(int)
            y1, x1 = y0 + size, x0 + size
            if y0 >= 0 and x0 >= 0 and y1 <= covered.shape[0] and x1 <= covered.shape[1]:
                keep[k] = bool(covered[y0:y1, x0:x1][support].all())
        return keep

    def choose(self, recon: StreamingReconstructor, probe=None,
               reference: tuple[np.ndarray, tuple[float, float]] | None = None
               ) -> dict[int, float]:
        """Set ``recon``'s crop to the best candidate; returns each candidate's score (lower is
        better; {} when nothing could be scored).

        With ``reference`` (a better estimate of the object and its canvas origin, e.g. the
        refined image), the score is minus the phase FRC-AUC of the candidate against it;
        otherwise the residual on the reservoir frames that every candidate covers, which
        needs ``probe``.
        """
        self.last_choice_at = time.monotonic()
        if not recon.n_frames:
            return {}
        if reference is not None:
            return recon.choose_crop(self._agreement(recon, *reference))
        if probe is None or not self._amplitudes:
            return {}
        keep = self._usable(recon, probe)
        if not keep.any():
            return {}
        amplitudes = torch.from_numpy(np.stack(self._amplitudes)[keep])
        positions = np.asarray(self._positions)[keep]

        def score(snap: Snapshot) -> float:
            local = torch.as_tensor(positions - np.asarray(snap.origin_px), dtype=torch.float32)
            return amplitude_residual(snap.object, probe, amplitudes, local)

        return recon.choose_crop(score)

    @staticmethod
    def _agreement(recon: StreamingReconstructor, reference: np.ndarray,
                   reference_origin: tuple[float, float]):
        from ..metrics import compare_objects, covered_box

        weight = recon.snapshot(max(recon.crop_candidates)).weight
        placed = place_on_canvas(reference, reference_origin, weight.shape, tuple(recon.origin))
        box = covered_box(weight)

        def score(snap: Snapshot) -> float:
            if min(snap.object[box].shape) < 16:
                return math.nan
            scores = compare_objects(snap.object[box], placed[box], taper_px=8)
            return -float(scores["frc_auc_0.5_phase"])

        return score

    def maybe_choose(self, recon: StreamingReconstructor, probe=None, reference=None,
                     force: bool = False) -> dict[int, float]:
        """:meth:`choose`, at most once per ``every_s`` unless forced; {} when skipped."""
        if len(recon.crop_candidates) < 2 or (probe is None and reference is None):
            return {}
        if not force and time.monotonic() - self.last_choice_at < self.every_s:
            return {}
        return self.choose(recon, probe, reference)
