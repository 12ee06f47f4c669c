"""Far-field (Fraunhofer) propagation with the project's FFT convention.

psi = fftshift(fft2(P * O, norm="ortho")): the zero frequency lands on pixel (N//2, N//2) and the
orthonormal transform makes the photon count of a frame equal sum |P O|^2 (Parseval).
"""

from __future__ import annotations

import torch

from ._tensors import as_probe_modes

__all__ = ["far_field", "back_propagate", "diffraction_intensity", "exit_waves"]


def far_field(exit_wave: torch.Tensor, *, centred: bool = True) -> torch.Tensor:
    """Propagate exit waves to the detector (DC-centred, orthonormal FFT over the last two axes).

    Parameters
    ----------
    exit_wave : torch.Tensor
        Complex array (..., N, N).
    centred : bool
        False leaves the zero frequency at pixel (0, 0), the FFT's own order: for engines that
        hold their data in that order and so skip the shift pair of every batch.

    Returns
    -------
    torch.Tensor
        The far-field wave, same shape, zero frequency at (N//2, N//2) (or (0, 0)).
    """
    wave = torch.fft.fft2(exit_wave, norm="ortho")
    return torch.fft.fftshift(wave, dim=(-2, -1)) if centred else wave


def back_propagate(wave: torch.Tensor, *, centred: bool = True) -> torch.Tensor:
    """Exact inverse of :func:`far_field` (with the same ``centred``)."""
    if centred:
        wave = torch.fft.ifftshift(wave, dim=(-2, -1))
    return torch.fft.ifft2(wave, norm="ortho")


def exit_waves(probe: torch.Tensor, patches: torch.Tensor) -> torch.Tensor:
    """Multiply object patches by every probe mode.

    Parameters
    ----------
    probe : torch.Tensor
        (N, N), (M, N, N) shared by all patches, or (B, M, N, N) one probe per patch.
    patches : torch.Tensor
        (B, N, N) complex object patches.

    Returns
    -------
    torch.Tensor
        (B, M, N, N) exit waves.
    """
    probe = as_probe_modes(probe)
    if probe.ndim == 3:
        probe = probe.unsqueeze(0)
    return probe * patches.unsqueeze(-3)


def diffraction_intensity(probe: torch.Tensor, patches: torch.Tensor) -> torch.Tensor:
    """Expected far-field intensity of each patch: the sum over probe modes of |far field|^2.

    Parameters
    ----------
    probe : torch.Tensor
        (N, N), (M, N, N) or (B, M, N, N) complex probe (incoherent modes).
    patches : torch.Tensor
        (B, N, N) complex object patches.

    Returns
    -------
    torch.Tensor
        (B, N, N) real intensities with DC at (N//2, N//2); ``intensity.sum((-2, -1))`` equals
        ``sum |P O|^2`` over modes and pixels.

    Examples
    --------
    >>> import torch
    >>> probe = torch.ones(1, 8, 8, dtype=torch.complex64) / 8
    >>> patches = torch.ones(2, 8, 8, dtype=torch.complex64)
    >>> I = diffraction_intensity(probe, patches)
    >>> float(I[0, 4, 4]), float(I[0].sum())
    (1.0, 1.0)
    """
    psi = far_field(exit_waves(probe, patches))
    return (psi.real.square() + psi.imag.square()).sum(dim=-3)
