"""The physics decoder used in training: overlap constraint, per-sample probe, far field, loss.

It reuses :mod:`bluesky_ptychopinn.physics` (patch extraction/scatter and the far-field
intensity); nothing here is a second forward model.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..physics import diffraction_intensity, extract_patches, scatter_patches

__all__ = ["merge_overlapping_patches", "PhysicsDecoder", "poisson_nll", "merge_window"]


def merge_window(size: int, floor: float = 0.05, device=None) -> torch.Tensor:
    """Weights for averaging overlapping patches: a Hann window lifted by ``floor``.

    The centre of a predicted patch is the most reliable part (the border path is thin), so it
    counts most; the floor keeps every pixel of every patch defined.
    """
    hann = torch.sin(math.pi * (torch.arange(size, device=device) + 0.5) / size) ** 2
    return floor + (1 - floor) * torch.outer(hann, hann)


def merge_overlapping_patches(patches: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Make the C patches of each group agree where their illuminations overlap.

    Each group's patches are placed on a shared canvas at their sub-pixel offsets (relative to
    the group centroid), averaged with :func:`merge_window` weights, then cut out again.

    Parameters
    ----------
    patches : torch.Tensor
        (B, C, N, N) complex patches.
    offsets : torch.Tensor
        (B, C, 2) (y, x) positions of each member relative to its group centroid, in pixels.

    Returns
    -------
    torch.Tensor
        (B, C, N, N) merged patches (differentiable).
    """
    b, c, n, _ = patches.shape
    if c == 1:
        return patches
    reach = int(math.ceil(float(offsets.abs().max()))) if offsets.numel() else 0
    side = n + 2 * reach + 4
    # All groups share one tall canvas, group k occupying rows [k * side, (k + 1) * side): one
    # scatter and one gather for the whole batch.
    base = torch.stack(
        [torch.arange(b, device=patches.device) * side + side / 2,
         torch.full((b,), side / 2, device=patches.device)], dim=1,
    )
    positions = (base[:, None, :] + offsets.to(base.dtype)).reshape(b * c, 2)
    window = merge_window(n, device=patches.device).to(patches.real.dtype)
    flat = patches.reshape(b * c, n, n)
    numerator = scatter_patches(flat * window, positions, (b * side, side))
    denominator = scatter_patches(window.expand(b * c, n, n), positions, (b * side, side))
    merged = numerator / denominator.clamp_min(1e-6)
    return extract_patches(merged, positions, n).reshape(b, c, n, n)


def poisson_nll(
    predicted: torch.Tensor, counts: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Poisson negative log-likelihood on valid pixels, as a deviance (0 for a perfect model).

    ``mean(lambda - k log lambda - (k - k log k))`` over valid pixels, divided by the batch's mean
    count so the loss is comparable across photon levels. The subtracted term depends on the
    data only, so the gradient is the Poisson NLL's.
    """
    rate = predicted.clamp_min(1e-8)
    saturated = counts - torch.xlogy(counts, counts)
    nll = rate - counts * torch.log(rate) - saturated
    if mask is not None:
        valid = mask.to(nll.dtype)
        nll = nll * valid
        denominator = valid.sum() * (nll.numel() / mask.numel())
    else:
        denominator = torch.tensor(float(nll.numel()), device=nll.device)
    mean_count = counts.mean().clamp_min(1e-8)
    return nll.sum() / denominator / mean_count


class PhysicsDecoder(nn.Module):
    """Predicted patches -> expected photon counts, through the experiment's own probe.

    Parameters
    ----------
    overlap : bool
        Apply the overlap constraint (needs C > 1).
    """

    def __init__(self, overlap: bool = True) -> None:
        super().__init__()
        self.overlap = overlap

    def forward(
        self,
        patches: torch.Tensor,
        offsets: torch.Tensor,
        probes: torch.Tensor,
        photons: torch.Tensor,
    ) -> torch.Tensor:
        """Expected counts (B, C, N, N).

        Parameters
        ----------
        patches : torch.Tensor
            (B, C, N, N) complex predicted object patches.
        offsets : torch.Tensor
            (B, C, 2) member offsets from the group centroid (pixels).
        probes : torch.Tensor
            (B, M, N, N) unit-norm probe of each sample's experiment (modes summed
            incoherently).
        photons : torch.Tensor
            (B,) photon scale of each sample's experiment (mean counts per frame).
        """
        if self.overlap:
            patches = merge_overlapping_patches(patches, offsets)
        b, c, n, _ = patches.shape
        probe_per_patch = probes.repeat_interleave(c, dim=0)  # (B*C, M, N, N)
        intensity = diffraction_intensity(probe_per_patch, patches.reshape(b * c, n, n))
        return intensity.reshape(b, c, n, n) * photons.view(-1, 1, 1, 1)
