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
    the group centroid, the whole group shifted by under a pixel so that its first member sits
    on whole canvas pixels), averaged with :func:`merge_window` weights, then cut out again.
    Patches cut from one object at positions a whole number of pixels apart come back
    unchanged; other members are interpolated (bilinearly) once in and once out.

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
    dtype = patches.real.dtype
    base = torch.stack(
        [torch.arange(b, device=patches.device, dtype=dtype) * side + side // 2,
         torch.full((b,), side // 2, device=patches.device, dtype=dtype)], dim=1,
    )
    # Shift each group by a constant under a pixel so that its first member's patch starts on a
    # whole canvas pixel (base is whole, so the fraction is that of the offset alone, computed
    # on small numbers). Relative offsets are kept, and members a whole number of pixels from
    # the first one (every whole-pixel raster) are scattered and cut out again without
    # interpolation: the merge of consistent patches is then the identity. Centring the
    # centroid instead puts them at its fraction (.5 for an odd step), where the bilinear
    # scatter and re-extraction blur them.
    offsets = offsets.to(dtype)
    first = offsets[:, :1, :] - n / 2
    offsets = offsets - (first - torch.floor(first))
    positions = (base[:, None, :] + offsets).reshape(b * c, 2)
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

    Masked pixels (``mask`` False) never enter the loss, whatever they hold: they are replaced
    by 0 before any arithmetic (a product with the mask would turn a masked NaN into a NaN loss,
    and a NaN gradient), and they count as 0 in the mean count, whose divisor is the number of
    pixels, masked or not, so the scale is that of data whose masked pixels were zeroed.
    """
    rate = predicted.clamp_min(1e-8)
    if mask is not None:
        valid = mask.bool()
        zero = torch.zeros((), dtype=counts.dtype, device=counts.device)
        counts = torch.where(valid, counts, zero)
        # The rate too: a masked rate's gradient must be 0, not 0 * NaN.
        rate = torch.where(valid, rate, torch.ones((), dtype=rate.dtype, device=rate.device))
    saturated = counts - torch.xlogy(counts, counts)
    nll = rate - counts * torch.log(rate) - saturated
    if mask is not None:
        nll = torch.where(valid, nll, torch.zeros((), dtype=nll.dtype, device=nll.device))
        denominator = valid.sum() * (nll.numel() / valid.numel())
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
