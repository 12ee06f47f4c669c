"""Alignment before comparing a reconstruction with a reference: global phase, phase plane,
sub-pixel shift, taper and crop."""

from __future__ import annotations

import numpy as np
from scipy.signal.windows import tukey

from ..errors import InvalidInputError
from ._validate import as_image, as_pair

__all__ = [
    "align_global_phase",
    "fit_phase_plane",
    "remove_phase_plane",
    "register_shift",
    "apply_shift",
    "tukey_taper",
    "crop_edges",
]


def align_global_phase(recon: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Multiply ``recon`` by the unit phasor c that minimises ||reference - c recon||.

    c = <recon, reference> / |<recon, reference>|; arrays of any shape are accepted (masked
    pixel sets too).

    Parameters
    ----------
    recon, reference : numpy.ndarray
        Complex arrays of one shape.

    Returns
    -------
    numpy.ndarray
        ``recon`` times c (unchanged if the two are orthogonal).

    Examples
    --------
    >>> import numpy as np
    >>> truth = np.exp(1j * np.linspace(0, 1, 16)).reshape(4, 4)
    >>> bool(np.allclose(align_global_phase(truth * np.exp(2j), truth), truth))
    True
    """
    recon, reference = np.asarray(recon), np.asarray(reference)
    if recon.shape != reference.shape:
        raise InvalidInputError(f"recon and reference must have one shape, got {recon.shape} "
                                f"and {reference.shape}")
    c = np.vdot(recon, reference)
    # (``+ 0``: an exact zero times a phasor is a signed zero, whose np.angle is pi)
    return recon * (c / abs(c)) + 0 if abs(c) > 0 else recon


def _weights(recon: np.ndarray, reference: np.ndarray, weights: np.ndarray | None) -> np.ndarray:
    if weights is None:
        return np.abs(recon) * np.abs(reference)
    weights = as_image(weights, "weights", allow_complex=False).astype(float)
    if weights.shape != recon.shape:
        raise InvalidInputError(f"weights: expected shape {recon.shape}, got {weights.shape}")
    if (weights < 0).any() or not (weights > 0).any():
        raise InvalidInputError("weights: expected non-negative values, not all zero")
    return weights


def _centred_grid(shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    # Centred coordinates keep the least-squares system well conditioned.
    h, w = shape
    return np.meshgrid(np.arange(h) - (h - 1) / 2, np.arange(w) - (w - 1) / 2, indexing="ij")


def fit_phase_plane(recon: np.ndarray, reference: np.ndarray,
                    weights: np.ndarray | None = None) -> tuple[float, float, float]:
    """Weighted least-squares phase plane between ``reference`` and ``recon``.

    Finds a0, ay, ax with angle(reference) - angle(recon) = a0 + ay y + ax x (mod 2 pi), y and x
    the row and column index. The fit works on angle(reference * conj(recon)), so 2 pi wraps of
    either phase do not matter; a steep ramp that wraps the difference itself many times is
    first located as the peak of the Fourier transform of that product (refined on a 1/50-bin
    grid), then the remaining plane is fitted by weighted least squares, twice.

    Parameters
    ----------
    recon, reference : numpy.ndarray
        2-D complex images of one shape.
    weights : numpy.ndarray, optional
        Non-negative weight per pixel (e.g. the illuminated area). Default: the product of the
        two amplitudes, so pixels without signal do not pull the fit.

    Returns
    -------
    a0, ay, ax : float
        Offset (rad, at pixel (0, 0), wrapped to (-pi, pi]) and slopes (rad/pixel).

    Examples
    --------
    >>> import numpy as np
    >>> yy, xx = np.mgrid[:32, :32]
    >>> truth = np.exp(1j * np.sin(xx / 3.0))
    >>> a0, ay, ax = fit_phase_plane(truth * np.exp(-1j * (0.5 + 0.2 * yy - 0.1 * xx)), truth)
    >>> [round(v, 6) for v in (a0, ay, ax)]
    [0.5, 0.2, -0.1]
    """
    recon, reference = as_pair(recon, reference, ("recon", "reference"))
    weights = _weights(recon, reference, weights)
    if not weights.max() > 0:  # nothing in common (e.g. an all-zero recon): no plane to fit
        return 0.0, 0.0, 0.0
    yy, xx = _centred_grid(recon.shape)
    product = reference * np.conj(recon) * (weights / weights.max())
    ky, kx = _ramp_frequency(product)
    coef = np.array([0.0, 2 * np.pi * ky, 2 * np.pi * kx])
    design = np.stack([np.ones(yy.size), yy.ravel(), xx.ravel()], axis=1)
    root_w = np.sqrt(weights.ravel())
    for _ in range(2):  # the second pass removes what wrapping near +-pi biased in the first
        residual = np.angle(product * np.exp(-1j * (coef[0] + coef[1] * yy + coef[2] * xx)))
        step, *_ = np.linalg.lstsq(design * root_w[:, None], residual.ravel() * root_w,
                                   rcond=None)
        coef += step
    h, w = recon.shape
    a0 = coef[0] - coef[1] * (h - 1) / 2 - coef[2] * (w - 1) / 2
    return float(np.angle(np.exp(1j * a0))), float(coef[1]), float(coef[2])


def remove_phase_plane(recon: np.ndarray, reference: np.ndarray,
                       weights: np.ndarray | None = None) -> np.ndarray:
    """``recon`` with the phase plane (offset and ramp) relative to ``reference`` removed.

    Parameters
    ----------
    recon, reference : numpy.ndarray
        2-D complex images of one shape.
    weights : numpy.ndarray, optional
        Per-pixel weights of the fit, see :func:`fit_phase_plane`.

    Returns
    -------
    numpy.ndarray
        ``recon * exp(1j * (a0 + ay y + ax x))`` (complex128).

    Examples
    --------
    >>> import numpy as np
    >>> yy, xx = np.mgrid[:32, :32]
    >>> truth = np.exp(1j * np.cos(yy / 4.0))
    >>> flat = remove_phase_plane(truth * np.exp(1j * (3 + 0.9 * xx)), truth)
    >>> bool(np.abs(np.angle(flat * np.conj(truth))).max() < 1e-6)
    True
    """
    a0, ay, ax = fit_phase_plane(recon, reference, weights)
    yy, xx = np.indices(np.shape(recon))
    # ``+ 0`` clears signed zeros: an unreconstructed pixel must keep phase 0, not pi.
    return np.asarray(recon, np.complex128) * np.exp(1j * (a0 + ay * yy + ax * xx)) + 0


def _ramp_frequency(field: np.ndarray, upsample: int = 50) -> tuple[float, float]:
    """Dominant spatial frequency (cycles/pixel) of a complex field to 1/upsample of a bin:
    the FFT peak, refined with a matrix DFT on a fine grid of +-1 bin around it."""
    h, w = field.shape
    spectrum = np.fft.fft2(field)
    peak = _signed_peak(np.abs(spectrum))
    steps = (np.arange(2 * upsample + 1) - upsample) / upsample
    ky, kx = peak[0] + steps, peak[1] + steps
    ey = np.exp(-2j * np.pi * np.outer(ky, np.arange(h)) / h)
    ex = np.exp(-2j * np.pi * np.outer(np.arange(w), kx) / w)
    local = np.abs(ey @ field @ ex)
    iy, ix = np.unravel_index(np.argmax(local), local.shape)
    return float(ky[iy] / h), float(kx[ix] / w)


def _signed_lags(n: int) -> np.ndarray:
    lags = np.arange(n)
    return np.where(lags > n // 2, lags - n, lags)


def _signed_peak(values: np.ndarray, max_shift: float | None = None) -> np.ndarray:
    """Index of the maximum of an unshifted FFT-ordered array, as signed frequencies/lags,
    among lags of at most ``max_shift`` pixels per axis (all lags when None)."""
    if max_shift is not None:
        ly, lx = _signed_lags(values.shape[0]), _signed_lags(values.shape[1])
        allowed = (np.abs(ly)[:, None] <= max_shift) & (np.abs(lx)[None, :] <= max_shift)
        values = np.where(allowed, values, -np.inf)
    peak = np.array(np.unravel_index(np.argmax(values), values.shape), dtype=float)
    shape = np.array(values.shape)
    wrap = peak > shape // 2
    peak[wrap] -= shape[wrap]
    return peak


def register_shift(reference: np.ndarray, moving: np.ndarray, upsample: int = 100,
                   max_shift: float | None = None) -> tuple[float, float]:
    """Sub-pixel shift (dy, dx) such that ``apply_shift(moving, (dy, dx))`` matches ``reference``.

    Peak of the cross-correlation (means removed, periodic boundaries), refined by a locally
    upsampled DFT over +-0.75 pixel around it [1]_. Works on real or complex images; for
    complex objects remove a strong relative phase ramp first (it blurs the peak).

    Parameters
    ----------
    reference, moving : numpy.ndarray
        2-D images of one shape, real or complex.
    upsample : int
        Precision is 1/``upsample`` pixel; 1 gives whole pixels.
    max_shift : float, optional
        Largest shift (pixels, per axis) considered. A reconstruction with unreconstructed
        (zero) borders correlates with the truth at large spurious lags; bounding the search
        keeps such a peak from being taken for a shift.

    Returns
    -------
    dy, dx : float
        The shift in pixels (rows, columns).

    References
    ----------
    .. [1] M. Guizar-Sicairos, S. T. Thurman and J. R. Fienup, "Efficient subpixel image
           registration algorithms", Opt. Lett. 33, 156-158 (2008).

    Examples
    --------
    >>> import numpy as np
    >>> from scipy import ndimage
    >>> img = ndimage.gaussian_filter(np.random.default_rng(0).standard_normal((64, 64)), 2)
    >>> dy, dx = register_shift(apply_shift(img, (2.25, -0.5)), img)
    >>> round(dy, 2), round(dx, 2)
    (2.25, -0.5)
    """
    reference, moving = as_pair(reference, moving, ("reference", "moving"))
    if int(upsample) != upsample or upsample < 1:
        raise InvalidInputError(f"upsample: expected a positive integer, got {upsample}")
    upsample = int(upsample)
    fa = np.fft.fft2(reference - reference.mean())
    fb = np.fft.fft2(moving - moving.mean())
    product = fa * np.conj(fb)
    peak = _signed_peak(np.abs(np.fft.ifft2(product)), max_shift)
    if upsample == 1:
        return float(peak[0]), float(peak[1])
    region = int(np.ceil(1.5 * upsample))
    offset = region // 2 - peak * upsample
    local = np.abs(_upsampled_dft(np.conj(product), region, upsample, offset))
    fine = np.array(np.unravel_index(np.argmax(local), local.shape), dtype=float)
    refined = peak + (fine - region // 2) / upsample
    return float(refined[0]), float(refined[1])


def _upsampled_dft(data: np.ndarray, region: int, upsample: int, offset: np.ndarray
                   ) -> np.ndarray:
    """Inverse-sign DFT of ``data`` on a ``region`` x ``region`` grid of 1/upsample pixel
    starting at -offset (in upsampled pixels): a zoomed cross-correlation without zero padding."""
    h, w = data.shape
    ky = np.fft.ifftshift(np.arange(h)) - h // 2
    kx = np.fft.ifftshift(np.arange(w)) - w // 2
    ry = np.arange(region) - offset[0]
    rx = np.arange(region) - offset[1]
    ey = np.exp(-2j * np.pi / (h * upsample) * np.outer(ry, ky))
    ex = np.exp(-2j * np.pi / (w * upsample) * np.outer(kx, rx))
    return ey @ data @ ex


def apply_shift(image: np.ndarray, shift: tuple[float, float]) -> np.ndarray:
    """Shift an image by (dy, dx) pixels with a Fourier phase ramp (periodic boundaries).

    Parameters
    ----------
    image : numpy.ndarray
        2-D image, real or complex.
    shift : tuple of float
        (dy, dx): content moves to larger row / column indices for positive values.

    Returns
    -------
    numpy.ndarray
        The shifted image (real input gives a real output). Content wraps around the edges:
        crop at least ``ceil(abs(shift))`` pixels before comparing.

    Examples
    --------
    >>> import numpy as np
    >>> img = np.zeros((8, 8)); img[2, 3] = 1
    >>> [int(v) for v in np.unravel_index(np.argmax(apply_shift(img, (1, -2))), (8, 8))]
    [3, 1]
    """
    image = as_image(image, "image")
    dy, dx = _as_shift(shift)
    h, w = image.shape
    fy = np.fft.fftfreq(h)[:, None]
    fx = np.fft.fftfreq(w)[None, :]
    ramp = np.exp(-2j * np.pi * (fy * dy + fx * dx))
    out = np.fft.ifft2(np.fft.fft2(image) * ramp)
    return out if np.iscomplexobj(image) else out.real


def _as_shift(shift: object) -> tuple[float, float]:
    values = np.asarray(shift, dtype=float) if np.ndim(shift) == 1 else np.array([np.nan])
    if values.shape != (2,) or not np.isfinite(values).all():
        raise InvalidInputError(f"shift: expected two finite numbers (dy, dx), got {shift!r}")
    return float(values[0]), float(values[1])


def tukey_taper(shape: tuple[int, int], width_px: float) -> np.ndarray:
    """2-D Tukey window: 1 inside, a cosine fall to 0 over ``width_px`` at each edge.

    The outer product of two :func:`scipy.signal.windows.tukey` windows; a width of half the
    image or more gives a Hann window, 0 gives ones.

    Parameters
    ----------
    shape : tuple of int
        (rows, columns).
    width_px : float
        Width of the cosine edge in pixels (the PtychoPINN paper uses 20).

    Returns
    -------
    numpy.ndarray
        float64 window of ``shape``.

    Examples
    --------
    >>> window = tukey_taper((64, 64), 8)
    >>> float(window[0, 32]), float(window[32, 32])
    (0.0, 1.0)
    """
    if len(shape) != 2 or any(int(n) != n or n < 1 for n in shape):
        raise InvalidInputError(f"shape: expected two positive integers, got {shape!r}")
    if not np.isfinite(width_px) or width_px < 0:
        raise InvalidInputError(f"width_px: expected a width >= 0 pixels, got {width_px}")
    h, w = int(shape[0]), int(shape[1])
    if width_px == 0:
        return np.ones((h, w))
    # Tukey's alpha is the tapered fraction of the whole window, both edges together.
    alpha_y = min(1.0, 2 * width_px / h)
    alpha_x = min(1.0, 2 * width_px / w)
    return np.outer(tukey(h, alpha_y), tukey(w, alpha_x))


def crop_edges(image: np.ndarray, crop_px: int) -> np.ndarray:
    """Remove ``crop_px`` pixels from every edge.

    Parameters
    ----------
    image : numpy.ndarray
        2-D image.
    crop_px : int
        Pixels removed at each of the four edges (0 keeps the image).

    Returns
    -------
    numpy.ndarray
        A view of the inner part, shape (H - 2 crop_px, W - 2 crop_px).

    Examples
    --------
    >>> import numpy as np
    >>> crop_edges(np.zeros((10, 12)), 2).shape
    (6, 8)
    """
    image = np.asarray(image)
    if image.ndim != 2:
        raise InvalidInputError(f"image: expected a 2-D image, got shape {image.shape}")
    if int(crop_px) != crop_px or crop_px < 0:
        raise InvalidInputError(f"crop_px: expected an integer >= 0, got {crop_px!r}")
    crop_px = int(crop_px)
    if crop_px == 0:
        return image
    if 2 * crop_px >= min(image.shape):
        raise InvalidInputError(f"crop_px: cropping {crop_px} px from each edge leaves nothing "
                                f"of an image of shape {image.shape}")
    return image[crop_px:-crop_px, crop_px:-crop_px]


def covered_box(weight: np.ndarray, fraction: float = 0.3) -> tuple[slice, slice]:
    """Bounding box of the pixels whose coverage ``weight`` exceeds ``fraction`` of its
    maximum: where a stitched reconstruction is worth scoring. The whole image when nothing
    is covered."""
    rows, cols = np.nonzero(weight > fraction * float(np.max(weight)))
    if not len(rows):
        return slice(None), slice(None)
    return slice(rows.min(), rows.max() + 1), slice(cols.min(), cols.max() + 1)
