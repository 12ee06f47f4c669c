"""Alignment before comparing a reconstruction with a reference: global phase, phase plane,
sub-pixel shift, taper and crop."""

from __future__ import annotations

import numpy as np
from scipy.signal.windows import tukey

from ..errors import InvalidInputError

__all__ = [
    "align_global_phase",
    "remove_phase_plane",
    "register_shift",
    "apply_shift",
    "tukey_taper",
    "crop_edges",
]


def align_global_phase(recon: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Multiply ``recon`` by the unit phasor c minimising |reference - c recon|."""
    c = np.vdot(recon, reference)
    return recon * (c / abs(c)) if abs(c) > 0 else recon


def remove_phase_plane(recon: np.ndarray, reference: np.ndarray,
                       weights: np.ndarray | None = None) -> np.ndarray:
    """Remove a weighted least-squares phase plane a0 + ay y + ax x from ``recon``'s phase
    relative to ``reference``.

    A steep ramp wraps many times, so the slope is first located as the peak of the Fourier
    transform of reference * conj(recon) (refined by an upsampled DFT), removed, and the
    remaining small plane is fitted by weighted least squares on the wrapped phase
    difference (weights default to the product of amplitudes).
    """
    h, w = recon.shape
    yy, xx = np.meshgrid(np.arange(h) - h / 2, np.arange(w) - w / 2, indexing="ij")
    weights = np.abs(recon) * np.abs(reference) if weights is None else np.asarray(weights)
    product = reference * np.conj(recon) * weights / max(float(weights.max()), 1e-30)
    ky, kx = _ramp_frequency(product)
    out = recon * np.exp(2j * np.pi * (ky * yy + kx * xx))
    design = np.stack([np.ones(h * w), yy.ravel(), xx.ravel()], axis=1)
    sw = np.sqrt(weights.ravel())
    for _ in range(2):
        diff = np.angle(reference * np.conj(out))
        coef, *_ = np.linalg.lstsq(design * sw[:, None], diff.ravel() * sw, rcond=None)
        out = out * np.exp(1j * (coef[0] + coef[1] * yy + coef[2] * xx))
    return out


def _ramp_frequency(field: np.ndarray, upsample: int = 50) -> tuple[float, float]:
    """Dominant spatial frequency (cycles/pixel) of a complex field, to 1/upsample of a bin:
    the FFT peak, refined with a matrix DFT on a fine frequency grid around it."""
    h, w = field.shape
    spectrum = np.fft.fft2(field)
    peak = np.array(np.unravel_index(np.argmax(np.abs(spectrum)), spectrum.shape), dtype=float)
    shape = np.array(field.shape)
    peak[peak > shape // 2] -= shape[peak > shape // 2]
    steps = (np.arange(2 * upsample + 1) - upsample) / upsample  # +-1 bin
    ky, kx = peak[0] + steps, peak[1] + steps
    ey = np.exp(-2j * np.pi * np.outer(ky, np.arange(h)) / h)
    ex = np.exp(-2j * np.pi * np.outer(np.arange(w), kx) / w)
    local = np.abs(ey @ field @ ex)
    iy, ix = np.unravel_index(np.argmax(local), local.shape)
    return float(ky[iy] / h), float(kx[ix] / w)


def register_shift(reference: np.ndarray, moving: np.ndarray, upsample: int = 20
                   ) -> tuple[float, float]:
    """Sub-pixel shift (dy, dx) such that ``apply_shift(moving, shift)`` matches ``reference``.

    Cross-correlation peak, refined by a locally upsampled DFT around it (Guizar-Sicairos,
    Thurman & Fienup 2008), to 1/``upsample`` pixel.
    """
    if reference.shape != moving.shape:
        raise InvalidInputError(f"shapes differ: {reference.shape} vs {moving.shape}")
    fa, fb = np.fft.fft2(reference), np.fft.fft2(moving)
    product = fa * np.conj(fb)
    corr = np.fft.ifft2(product)
    peak = np.array(np.unravel_index(np.argmax(np.abs(corr)), corr.shape), dtype=float)
    shape = np.array(corr.shape)
    peak[peak > shape // 2] -= shape[peak > shape // 2]
    if upsample <= 1:
        return float(peak[0]), float(peak[1])
    region = int(np.ceil(1.5 * upsample))
    offset = region // 2 - peak * upsample
    up = _upsampled_dft(np.conj(product), region, upsample, offset).conj()
    local = np.array(np.unravel_index(np.argmax(np.abs(up)), up.shape), dtype=float)
    refined = peak + (local - region // 2) / upsample
    return float(refined[0]), float(refined[1])


def _upsampled_dft(data: np.ndarray, region: int, upsample: int, offset: np.ndarray):
    h, w = data.shape
    ky = np.fft.ifftshift(np.arange(h)) - h // 2
    kx = np.fft.ifftshift(np.arange(w)) - w // 2
    ry = np.arange(region) - offset[0]
    rx = np.arange(region) - offset[1]
    ey = np.exp(-2j * np.pi / (h * upsample) * np.outer(ry, ky))
    ex = np.exp(-2j * np.pi / (w * upsample) * np.outer(kx, rx))
    return ey @ data @ ex


def apply_shift(image: np.ndarray, shift: tuple[float, float]) -> np.ndarray:
    """Shift an image by (dy, dx) pixels with a Fourier phase ramp (periodic boundaries)."""
    h, w = image.shape
    fy = np.fft.fftfreq(h)[:, None]
    fx = np.fft.fftfreq(w)[None, :]
    ramp = np.exp(-2j * np.pi * (fy * shift[0] + fx * shift[1]))
    out = np.fft.ifft2(np.fft.fft2(image) * ramp)
    return out if np.iscomplexobj(image) else out.real


def tukey_taper(shape: tuple[int, int], width_px: int) -> np.ndarray:
    """2-D Tukey window falling to 0 over ``width_px`` at each edge."""
    h, w = shape
    if width_px <= 0:
        return np.ones(shape)
    ay = min(1.0, 2 * width_px / h)
    ax = min(1.0, 2 * width_px / w)
    return np.outer(tukey(h, ay), tukey(w, ax))


def crop_edges(image: np.ndarray, crop_px: int) -> np.ndarray:
    """Remove ``crop_px`` pixels from every edge."""
    if crop_px <= 0:
        return image
    if 2 * crop_px >= min(image.shape):
        raise InvalidInputError(f"crop {crop_px} px leaves nothing of an image {image.shape}")
    return image[crop_px:-crop_px, crop_px:-crop_px]
