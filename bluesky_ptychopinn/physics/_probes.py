"""Probe (illumination) models, each sampled at a requested object pixel size.

Every model returns a complex64 array (M, N, N) of M incoherent modes normalised so that
sum |P|^2 = 1 over modes and pixels (the photon scale is kept separately, see
:func:`~bluesky_ptychopinn.physics.simulate_diffraction`).

Focusing optics are built in their pupil (far-field) plane and brought to the sample by an inverse
FFT, so the probe's far field is exactly the pupil: an annulus for a zone plate with a central
stop, a disc for an Airy spot, a Gaussian for KB mirrors.
"""

from __future__ import annotations

import math

import numpy as np

from ..errors import InvalidInputError
from ._geometry import wavelength_m
from ._tensors import check_size

__all__ = [
    "zone_plate_probe",
    "airy_probe",
    "pinhole_probe",
    "kb_probe",
    "make_probe",
    "mixed_state_probe",
    "PROBE_MODELS",
    "normalize_probe",
    "probe_diameter_px",
]


def _check(n: int, pixel_size_m: float, energy_ev: float) -> None:
    if not (isinstance(n, (int, np.integer)) and n >= 4):
        raise InvalidInputError(f"n: expected an integer >= 4, got {n!r}")
    if not pixel_size_m > 0:
        raise InvalidInputError(f"pixel_size_m: expected > 0, got {pixel_size_m!r}")
    if not energy_ev > 0:
        raise InvalidInputError(f"energy_ev: expected > 0, got {energy_ev!r}")


def _frequencies(n: int, pixel_size_m: float) -> tuple[np.ndarray, np.ndarray]:
    """Spatial frequencies (cycles/m) of an n x n grid, DC at (n//2, n//2)."""
    f = (np.arange(n) - n // 2) / (n * pixel_size_m)
    return np.meshgrid(f, f, indexing="ij")


def normalize_probe(probe: np.ndarray) -> np.ndarray:
    """Return the probe as complex64 (M, N, N) scaled so that sum |P|^2 = 1."""
    probe = np.asarray(probe)
    if probe.ndim == 2:
        probe = probe[None]
    if probe.ndim != 3 or probe.shape[-1] != probe.shape[-2]:
        raise InvalidInputError(f"probe: expected (N, N) or (M, N, N), got {probe.shape}")
    power = float(np.sum(np.abs(probe) ** 2))
    if not (np.isfinite(power) and power > 0):
        raise InvalidInputError("probe: all zero or non-finite; cannot normalise")
    return (probe / math.sqrt(power)).astype(np.complex64)


def _from_pupil(pupil: np.ndarray) -> np.ndarray:
    """Sample-plane probe, centred on pixel (N//2, N//2), whose far-field intensity is
    |pupil|^2 (the phase ramp from centring the probe does not change the intensity)."""
    probe = np.fft.fftshift(np.fft.ifft2(np.fft.ifftshift(pupil), norm="ortho"))
    return normalize_probe(probe)


def _fresnel_phase(fy, fx, wavelength: float, defocus_m: float) -> np.ndarray:
    """Angular-spectrum (paraxial) propagation by ``defocus_m`` as a pupil phase."""
    return np.exp(-1j * math.pi * wavelength * defocus_m * (fy**2 + fx**2))


def zone_plate_probe(
    n: int,
    pixel_size_m: float,
    energy_ev: float,
    *,
    outer_zone_width_m: float = 60e-9,
    central_stop: float = 0.4,
    defocus_m: float = 0.0,
) -> np.ndarray:
    """Fresnel zone plate probe with a central stop (annular far field).

    Parameters
    ----------
    n : int
        Probe side N in pixels.
    pixel_size_m : float
        Object pixel size the probe is sampled at.
    energy_ev : float
        Photon energy.
    outer_zone_width_m : float
        Outermost zone width dr; the numerical aperture is lambda / (2 dr), the focal spot
        about 1.22 dr.
    central_stop : float
        Central-stop diameter as a fraction of the zone-plate diameter (0 = none).
    defocus_m : float
        Distance of the sample from the focus (positive downstream). A defocused probe is a
        ring-shaped illumination, as at APS Velociprobe.

    Returns
    -------
    numpy.ndarray
        complex64 (1, N, N), sum |P|^2 = 1.

    Examples
    --------
    >>> p = zone_plate_probe(64, 20e-9, 10_000, defocus_m=20e-6)
    >>> p.shape, p.dtype, round(float((abs(p) ** 2).sum()), 5)
    ((1, 64, 64), dtype('complex64'), 1.0)
    """
    _check(n, pixel_size_m, energy_ev)
    if not 0 <= central_stop < 1:
        raise InvalidInputError(f"central_stop: expected a fraction in [0, 1), got {central_stop}")
    wavelength = wavelength_m(energy_ev)
    fy, fx = _frequencies(n, pixel_size_m)
    fr = np.hypot(fy, fx)
    f_max = 1.0 / (2.0 * outer_zone_width_m)
    if f_max > 1.0 / (2.0 * pixel_size_m):
        raise InvalidInputError(
            f"outer_zone_width_m={outer_zone_width_m:g} is finer than the pixel size "
            f"{pixel_size_m:g}: the pupil does not fit on the detector"
        )
    pupil = ((fr <= f_max) & (fr >= central_stop * f_max)).astype(np.complex128)
    pupil *= _fresnel_phase(fy, fx, wavelength, defocus_m)
    return _from_pupil(pupil)


def airy_probe(
    n: int, pixel_size_m: float, energy_ev: float, *, outer_zone_width_m: float = 60e-9,
    defocus_m: float = 0.0,
) -> np.ndarray:
    """Airy spot: a circular lens pupil without central stop (see :func:`zone_plate_probe`)."""
    return zone_plate_probe(
        n, pixel_size_m, energy_ev, outer_zone_width_m=outer_zone_width_m, central_stop=0.0,
        defocus_m=defocus_m,
    )


def pinhole_probe(
    n: int,
    pixel_size_m: float,
    energy_ev: float,
    *,
    diameter_m: float | None = None,
    propagation_m: float = 0.0,
) -> np.ndarray:
    """Plane wave through a circular pinhole, propagated ``propagation_m`` downstream.

    The default diameter is a third of the field of view. Propagation uses the angular spectrum,
    so Fresnel fringes appear at the edge of the disc.
    """
    _check(n, pixel_size_m, energy_ev)
    diameter_m = n * pixel_size_m / 3 if diameter_m is None else diameter_m
    if not 0 < diameter_m < n * pixel_size_m:
        raise InvalidInputError(
            f"diameter_m: expected in (0, field of view {n * pixel_size_m:g}), got {diameter_m}"
        )
    c = (np.arange(n) - n // 2) * pixel_size_m
    yy, xx = np.meshgrid(c, c, indexing="ij")
    aperture = (np.hypot(yy, xx) <= diameter_m / 2).astype(np.complex128)
    spectrum = np.fft.fftshift(np.fft.fft2(np.fft.ifftshift(aperture), norm="ortho"))
    fy, fx = _frequencies(n, pixel_size_m)
    spectrum *= _fresnel_phase(fy, fx, wavelength_m(energy_ev), propagation_m)
    return _from_pupil(spectrum)


def kb_probe(
    n: int,
    pixel_size_m: float,
    energy_ev: float,
    *,
    numerical_aperture: tuple[float, float] = (1.0e-3, 0.8e-3),
    defocus_m: float = 0.0,
    astigmatism_waves: float = 0.5,
    coma_waves: float = 0.3,
) -> np.ndarray:
    """Kirkpatrick-Baez mirror pair: Gaussian-apodised rectangular pupil with aberrations.

    Parameters
    ----------
    numerical_aperture : (float, float)
        Half-angles (y, x) in radians of the vertical and horizontal mirrors (their focal spots
        differ, as for real KB pairs).
    astigmatism_waves, coma_waves : float
        Zernike coefficients (in waves, over the pupil) of 0-degree astigmatism
        rho^2 cos(2 theta) and x-coma (3 rho^3 - 2 rho) cos(theta).
    """
    _check(n, pixel_size_m, energy_ev)
    wavelength = wavelength_m(energy_ev)
    fy, fx = _frequencies(n, pixel_size_m)
    f_cut = np.asarray(numerical_aperture, dtype=float) / wavelength
    if (f_cut <= 0).any() or (f_cut > 1.0 / (2.0 * pixel_size_m)).any():
        raise InvalidInputError(
            f"numerical_aperture={numerical_aperture}: the pupil must fit inside the detector "
            f"(NA < lambda / (2 dx) = {wavelength / (2 * pixel_size_m):.3g})"
        )
    u, v = fy / f_cut[0], fx / f_cut[1]
    inside = (np.abs(u) <= 1) & (np.abs(v) <= 1)
    rho = np.hypot(u, v) / math.sqrt(2)
    theta = np.arctan2(u, v)
    aberration = astigmatism_waves * rho**2 * np.cos(2 * theta) + coma_waves * (
        3 * rho**3 - 2 * rho
    ) * np.cos(theta)
    pupil = inside * np.exp(-(u**2 + v**2) / 0.8) * np.exp(2j * math.pi * aberration)
    pupil = pupil * _fresnel_phase(fy, fx, wavelength, defocus_m)
    return _from_pupil(pupil)


def mixed_state_probe(
    probe: np.ndarray, n_modes: int = 3, *, decay: float = 0.5, seed: int = 0
) -> np.ndarray:
    """Partially coherent probe: ``n_modes`` mutually orthogonal modes built from ``probe``.

    Mode k is the first mode multiplied by a low-order polynomial across the beam (what a
    partially coherent source adds), orthogonalised by QR; powers fall geometrically by
    ``decay`` and add up to 1.

    Returns
    -------
    numpy.ndarray
        complex64 (n_modes, N, N); modes are orthogonal: sum(P_i conj(P_j)) = 0 for i != j.
    """
    base = normalize_probe(probe)[0].astype(np.complex128)
    n_modes = check_size(n_modes, "n_modes")
    if not 0 < decay <= 1:
        raise InvalidInputError(f"decay: expected in (0, 1], got {decay}")
    n = base.shape[-1]
    rng = np.random.default_rng(seed)
    weight = np.abs(base) ** 2
    c = np.arange(n) - n // 2
    yy, xx = np.meshgrid(c, c, indexing="ij")
    cy, cx = (weight * yy).sum() / weight.sum(), (weight * xx).sum() / weight.sum()
    width = math.sqrt(((weight * ((yy - cy) ** 2 + (xx - cx) ** 2)).sum() / weight.sum()) / 2)
    y, x = (yy - cy) / max(width, 1.0), (xx - cx) / max(width, 1.0)
    polynomials = [np.ones_like(y), y, x, x * y, y**2 - 1, x**2 - 1, y * x**2, x * y**2]
    # The Gaussian envelope keeps the higher modes on the beam instead of amplifying its tails.
    envelope = np.exp(-(x**2 + y**2) / 4)
    candidates = [base] + [base * poly * envelope for poly in polynomials[1:n_modes]]
    while len(candidates) < n_modes:
        candidates.append(base * (rng.standard_normal((n, n)) + 1j * rng.standard_normal((n, n))))
    q, _ = np.linalg.qr(np.stack([m.ravel() for m in candidates], axis=1))
    powers = decay ** np.arange(n_modes)
    powers /= powers.sum()
    modes = q.T.reshape(n_modes, n, n) * np.sqrt(powers)[:, None, None]
    return np.ascontiguousarray(modes, dtype=np.complex64)  # q.T is a transposed view


def probe_diameter_px(probe: np.ndarray, fraction: float = 0.9) -> float:
    """Diameter (pixels) of the disc around the probe's centre of mass holding ``fraction`` of
    its intensity: the natural length to set scan steps from overlap ratios.

    Raises
    ------
    InvalidInputError
        ``fraction`` outside (0, 1], or a probe that is not (N, N) / (M, N, N) with power.
    """
    if not 0 < fraction <= 1:  # also refuses NaN
        raise InvalidInputError(f"fraction: expected a fraction of the intensity in (0, 1], "
                                f"got {fraction!r}")
    intensity = (np.abs(normalize_probe(probe)) ** 2).sum(axis=0).astype(np.float64)
    n = intensity.shape[-1]
    c = np.arange(n)
    yy, xx = np.meshgrid(c, c, indexing="ij")
    cy, cx = (intensity * yy).sum(), (intensity * xx).sum()
    r = np.hypot(yy - cy, xx - cx).ravel()
    order = np.argsort(r)
    cumulative = np.cumsum(intensity.ravel()[order])
    # The sum of a unit-norm probe's intensity rounds to just below 1 as often as above it, so
    # fraction = 1 could search past the end: the last pixel holds the rest of the beam.
    index = min(int(np.searchsorted(cumulative, fraction)), len(cumulative) - 1)
    return float(2 * r[order][index])


#: Names understood by :func:`make_probe`.
PROBE_MODELS = ("zone_plate", "airy", "pinhole", "kb", "mixed")


def make_probe(
    name: str,
    n: int,
    pixel_size_m: float,
    energy_ev: float,
    *,
    footprint_px: float | None = None,
    n_modes: int = 3,
) -> np.ndarray:
    """A probe model by name, with optics chosen so its footprint is about ``footprint_px``.

    The library of diverse synthetic probes used for training and the simulated beamline:

    ``zone_plate``
        Defocused Fresnel zone plate with a 40 % central stop: ring-shaped illumination, annular
        far field (APS Velociprobe-like).
    ``airy``
        Focused circular lens without stop, slightly defocused.
    ``pinhole``
        Pinhole illumination with Fresnel fringes (Fresnel number 10).
    ``kb``
        Kirkpatrick-Baez pair with different vertical/horizontal apertures, astigmatism and coma.
    ``mixed``
        The zone-plate probe as ``n_modes`` partially coherent modes.

    Parameters
    ----------
    name : str
        One of :data:`PROBE_MODELS`.
    n : int
        Probe side N.
    pixel_size_m, energy_ev : float
        Object pixel size and photon energy.
    footprint_px : float, optional
        Target beam diameter in pixels (default N / 3).
    n_modes : int
        Modes of the ``mixed`` probe.

    Returns
    -------
    numpy.ndarray
        complex64 (M, N, N), sum |P|^2 = 1.

    Examples
    --------
    >>> make_probe("kb", 64, 30e-9, 9_000).shape
    (1, 64, 64)
    """
    footprint = n / 3 if footprint_px is None else float(footprint_px)
    # A footprint of 0 (or below) gives no defocus: a focused spot, not the beam asked for.
    if not (math.isfinite(footprint) and footprint > 0):
        raise InvalidInputError(f"footprint_px: expected a finite beam diameter > 0 pixels, "
                                f"got {footprint_px!r}")
    wavelength = wavelength_m(energy_ev)
    # Pupils fill half the detector radius, so the far field leaves room for object scattering.
    dr = 2 * pixel_size_m
    na = wavelength / (2 * dr)
    defocus = footprint * pixel_size_m / (2 * na)
    if name == "zone_plate":
        return zone_plate_probe(
            n, pixel_size_m, energy_ev, outer_zone_width_m=dr, central_stop=0.4, defocus_m=defocus
        )
    if name == "airy":
        return airy_probe(
            n, pixel_size_m, energy_ev, outer_zone_width_m=dr, defocus_m=0.5 * defocus
        )
    if name == "pinhole":
        diameter = footprint * pixel_size_m
        return pinhole_probe(
            n, pixel_size_m, energy_ev, diameter_m=diameter,
            propagation_m=diameter**2 / (wavelength * 10),
        )
    if name == "kb":
        nas = (0.5 * wavelength / (2 * pixel_size_m), 0.35 * wavelength / (2 * pixel_size_m))
        return kb_probe(
            n, pixel_size_m, energy_ev, numerical_aperture=nas,
            defocus_m=footprint * pixel_size_m / (2 * max(nas)),
        )
    if name == "mixed":
        base = make_probe("zone_plate", n, pixel_size_m, energy_ev, footprint_px=footprint)
        return mixed_state_probe(base, n_modes)
    raise InvalidInputError(f"probe model: unknown {name!r}; expected one of {PROBE_MODELS}")
