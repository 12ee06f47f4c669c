"""Simulated diffraction: object + probe + positions -> photon counts with Poisson noise."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..errors import InvalidInputError
from ._patches import extract_patches
from ._propagation import diffraction_intensity
from ._tensors import as_probe_modes, as_tensor, check_finite, check_positions, check_size

__all__ = ["SimulatedFrames", "simulate_diffraction", "beamstop_mask"]


@dataclass
class SimulatedFrames:
    """Result of :func:`simulate_diffraction`.

    Attributes
    ----------
    counts : torch.Tensor
        (n, N, N) float32 photon counts (Poisson draws, or the expectation if noise is off);
        masked pixels are zero.
    expected : torch.Tensor
        (n, N, N) float32 noiseless intensity before masking.
    mask : torch.Tensor
        (N, N) bool, True = valid pixel.
    photons_per_frame : torch.Tensor
        (n,) incident photons of each frame (the scale applied to the unit-norm probe). This is
        the photon count of a frame through a pure phase object only at a whole-pixel
        position; see ``photons`` in :func:`simulate_diffraction`.
    """

    counts: torch.Tensor
    expected: torch.Tensor
    mask: torch.Tensor
    photons_per_frame: torch.Tensor


def beamstop_mask(
    size: int, radius_px: float = 0.0, *, bad_pixels: np.ndarray | None = None
) -> torch.Tensor:
    """Valid-pixel mask (True = valid) with a round beamstop of ``radius_px`` over the DC pixel
    and optional extra bad pixels (an (k, 2) array of row, column indices).

    Raises
    ------
    InvalidInputError
        ``size`` not an integer >= 1, or a bad pixel outside [0, size) (a negative index would
        silently mask a pixel counted from the far edge).
    """
    size = check_size(size, "size")
    c = torch.arange(size, dtype=torch.float64) - size // 2
    yy, xx = torch.meshgrid(c, c, indexing="ij")
    mask = torch.hypot(yy, xx) >= radius_px if radius_px > 0 else torch.ones(size, size).bool()
    if bad_pixels is not None:
        bad = np.asarray(bad_pixels, dtype=np.int64).reshape(-1, 2)
        outside = ((bad < 0) | (bad >= size)).any(axis=1)
        if outside.any():
            raise InvalidInputError(
                f"bad_pixels: {int(outside.sum())} (row, column) index pair(s) outside [0, {size})"
                f" (first: {tuple(int(v) for v in bad[outside][0])})")
        mask[bad[:, 0], bad[:, 1]] = False
    return mask


def simulate_diffraction(
    obj,
    probe,
    positions,
    *,
    photons: float | tuple[float, float] = 1e6,
    poisson: bool = True,
    mask=None,
    seed: int | None = None,
    device: str | torch.device | None = None,
    batch_size: int = 512,
) -> SimulatedFrames:
    """Simulate far-field diffraction patterns of a ptychographic scan.

    Parameters
    ----------
    obj : array_like
        (H, W) complex transmission function.
    probe : array_like
        (N, N) or (M, N, N) complex probe (incoherent modes); it is normalised to
        sum |P|^2 = 1 internally, so only its shape matters for the photon scale.
    positions : array_like
        (n, 2) probe centres (y, x) in object pixels.
    photons : float or (float, float)
        Incident photons per frame, or a (low, high) range drawn uniformly per frame (the
        paper's training data use (5e5, 1e6)). A frame through a pure phase object at a
        whole-pixel position holds exactly this many photons before noise; absorption removes
        some. At a fractional position the object is interpolated bilinearly, which averages
        neighbouring phasors: a low-pass that depends on the fractional part, so such a frame
        holds fewer photons and less high-q signal (at half a pixel in y and x, about 14 %
        fewer photons and 43 % less signal near the detector edge for a dead-leaves object,
        under 1 % fewer for a smooth simplex one). Jittered scans carry this frame-to-frame
        damping.
    poisson : bool
        Draw Poisson counts (True) or return the expectation.
    mask : array_like of bool, optional
        (N, N) valid-pixel mask; masked pixels are zeroed in ``counts``.
    seed : int, optional
        Seed of the noise and of the photon draws. None: the seed is drawn from torch's global
        generator, which is advanced but not re-seeded, so a ``torch.manual_seed`` set before
        makes the call reproducible.
    device : str or torch.device, optional
        Where to compute (default: the probe's device, else CPU).
    batch_size : int
        Frames propagated at once (bounds memory).

    Returns
    -------
    SimulatedFrames

    Examples
    --------
    >>> import numpy as np
    >>> from bluesky_ptychopinn.physics import pinhole_probe
    >>> probe = pinhole_probe(32, 10e-9, 8_000)
    >>> obj = np.exp(1j * np.random.default_rng(0).uniform(0, 1, (80, 80))).astype(np.complex64)
    >>> sim = simulate_diffraction(obj, probe, [[40.0, 40.0]], photons=1e5, poisson=False)
    >>> round(float(sim.expected.sum()))
    100000
    """
    obj_t = as_tensor(obj, name="obj", device=device)
    if not obj_t.is_complex():
        obj_t = obj_t.to(torch.complex64)
    probe_t = as_probe_modes(as_tensor(probe, name="probe", device=obj_t.device))
    if probe_t.ndim != 3:
        raise InvalidInputError(f"probe: expected (N, N) or (M, N, N), got {tuple(probe_t.shape)}")
    probe_t = probe_t.to(obj_t.dtype)
    check_finite(obj_t, "obj")
    check_finite(probe_t, "probe")
    power = probe_t.abs().square().sum()
    if float(power) <= 0:
        raise InvalidInputError("probe: all zero")
    probe_t = probe_t / power.sqrt()
    pos = as_tensor(positions, name="positions", dtype=torch.float64, device=obj_t.device)
    check_positions(pos)
    n_frames, size = pos.shape[0], probe_t.shape[-1]
    batch_size = check_size(batch_size, "batch_size")

    generator = torch.Generator(device="cpu")
    # seed=None draws from the global generator (torch.seed() would re-seed it with fresh
    # entropy and so throw away a caller's torch.manual_seed).
    generator.manual_seed(int(seed) if seed is not None
                          else int(torch.randint(2**62, (1,), dtype=torch.int64)))
    if np.ndim(photons) == 0:
        # inf would reach torch.poisson as an "invalid Poisson rate"
        if not (np.isfinite(photons) and photons > 0):
            raise InvalidInputError(f"photons: expected a finite number > 0, got {photons!r}")
        scale = torch.full((n_frames,), float(photons), dtype=torch.float64)
    else:
        if np.shape(photons) != (2,):
            raise InvalidInputError(f"photons: expected a number or a (low, high) range, got "
                                    f"{photons!r}")
        low, high = (float(v) for v in photons)
        if not (0 < low <= high and np.isfinite(high)):
            raise InvalidInputError(f"photons: expected a finite range 0 < low <= high, got "
                                    f"{photons!r}")
        scale = low + (high - low) * torch.rand(n_frames, generator=generator, dtype=torch.float64)

    if mask is None:
        mask_t = torch.ones(size, size, dtype=torch.bool)
    else:
        mask_t = as_tensor(mask, name="mask").to(torch.bool)
        if tuple(mask_t.shape) != (size, size):
            raise InvalidInputError(
                f"mask: expected shape {(size, size)}, got {tuple(mask_t.shape)}"
            )

    expected = torch.empty(n_frames, size, size, dtype=torch.float32)
    for start in range(0, n_frames, batch_size):
        stop = min(start + batch_size, n_frames)
        patches = extract_patches(obj_t, pos[start:stop].to(torch.float32), size)
        intensity = diffraction_intensity(probe_t, patches).double()
        frame_scale = scale[start:stop, None, None].to(intensity.device)
        expected[start:stop] = (intensity * frame_scale).cpu()
    counts = torch.poisson(expected, generator=generator) if poisson else expected.clone()
    counts = counts * mask_t
    return SimulatedFrames(counts=counts, expected=expected, mask=mask_t, photons_per_frame=scale)
