"""One stitching canvas: weighted scatter-add of predicted patches under one window."""

from __future__ import annotations

import numpy as np
import torch

from ..physics import scatter_patches

__all__ = ["StitchCanvas", "growth_pads"]


def growth_pads(local: np.ndarray, shape: tuple[int, int], frame_size: int
                ) -> tuple[np.ndarray, np.ndarray] | None:
    """Pixels to add before and after each axis so that every patch at canvas positions
    ``local`` (n, 2) fits a canvas of ``shape``; None when it already fits.

    A side that must grow grows by a frame more than needed, so a scan drifting outwards
    does not reallocate every batch.
    """
    half = frame_size / 2
    lo = np.floor(local.min(axis=0) - half - 1)
    hi = np.ceil(local.max(axis=0) + half + 2)
    pad_lo = np.maximum(-lo, 0).astype(int)
    pad_hi = np.maximum(hi - np.asarray(shape), 0).astype(int)
    if not (pad_lo.any() or pad_hi.any()):
        return None
    return (np.where(pad_lo > 0, pad_lo + frame_size, 0),
            np.where(pad_hi > 0, pad_hi + frame_size, 0))


class StitchCanvas:
    """Running sums of ``w p``, ``w`` and ``w |p|^2`` on an object grid.

    The stitched object is ``sum w p / sum w`` and the overlap variance
    ``sum w |p|^2 / sum w - |object|^2`` (where the predictions disagree).

    Parameters
    ----------
    shape : (int, int)
        Canvas size.
    window : torch.Tensor
        (N, N) stitching weights of one patch (see
        :func:`~bluesky_ptychopinn.recon.stitch_window`).
    """

    def __init__(self, shape: tuple[int, int], window: torch.Tensor) -> None:
        self.window = window
        device = window.device
        self.num = torch.zeros(shape, dtype=torch.complex64, device=device)
        self.den = torch.zeros(shape, dtype=torch.float32, device=device)
        self.sq = torch.zeros(shape, dtype=torch.float32, device=device)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.den.shape)

    def pad(self, pads: tuple[int, int, int, int]) -> None:
        """Grow by ``(left, right, top, bottom)`` pixels of zeros."""
        self.num = torch.nn.functional.pad(self.num, pads)
        self.den = torch.nn.functional.pad(self.den, pads)
        self.sq = torch.nn.functional.pad(self.sq, pads)

    def deposit(self, patches: torch.Tensor, where: torch.Tensor) -> None:
        """Add complex (K, N, N) ``patches`` centred at canvas positions (K, 2)."""
        w = self.window
        n = w.shape[-1]
        scatter_patches(patches * w, where, self.shape, out=self.num)
        scatter_patches(w.expand(patches.shape[0], n, n).contiguous(), where, self.shape,
                        out=self.den)
        scatter_patches((patches.abs() ** 2) * w, where, self.shape, out=self.sq)

    def read(self, any_frames: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(object, weight, variance); zero where (almost) nothing was deposited."""
        den = self.den
        covered = den > 1e-3 * float(den.max()) if any_frames else den > 0
        safe = den.clamp_min(1e-12)
        obj = torch.where(covered, self.num / safe, torch.zeros_like(self.num))
        mean_sq = torch.where(covered, self.sq / safe, torch.zeros_like(self.sq))
        variance = (mean_sq - obj.abs() ** 2).clamp_min(0)
        return obj, den, variance
