"""Pixel-wise quality measures: PSNR, SSIM and NRMSE."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from ..errors import InvalidInputError
from ._validate import as_pair

__all__ = ["psnr", "ssim", "nrmse"]

_SSIM_TRUNCATE = 3.5  # with sigma 1.5: an 11 x 11 window, as in Wang et al. (2004)


def _data_range(reference: np.ndarray, data_range: float | None) -> float:
    value = float(np.ptp(reference)) if data_range is None else float(data_range)
    if not np.isfinite(value) or value <= 0:
        given = "the reference is constant" if data_range is None else f"got {data_range}"
        raise InvalidInputError(f"data_range: expected a positive range of values; {given} "
                                "(pass data_range explicitly)")
    return value


def psnr(image: np.ndarray, reference: np.ndarray, data_range: float | None = None) -> float:
    """Peak signal-to-noise ratio, 10 log10(data_range^2 / MSE), in dB.

    Parameters
    ----------
    image, reference : numpy.ndarray
        Real 2-D images of one shape (take amplitude or phase of complex objects first).
    data_range : float, optional
        The span of possible values. Default: max - min of ``reference``.

    Returns
    -------
    float
        PSNR in dB (inf for identical images).

    Examples
    --------
    >>> import numpy as np
    >>> ref = np.linspace(0, 1, 100).reshape(10, 10)
    >>> round(psnr(ref + 0.1, ref), 3)
    20.0
    """
    x, y = as_pair(image, reference, ("image", "reference"), allow_complex=False)
    x, y = x.astype(float), y.astype(float)
    data_range = _data_range(y, data_range)
    mse = float(np.mean((x - y) ** 2))
    return float("inf") if mse == 0 else float(10 * np.log10(data_range**2 / mse))


def ssim(image: np.ndarray, reference: np.ndarray, data_range: float | None = None,
         sigma: float = 1.5) -> float:
    """Mean structural similarity with a Gaussian window (Wang et al. 2004).

    Local means, variances and covariance are Gaussian-weighted (``sigma`` 1.5, window
    truncated at 3.5 sigma: 11 x 11 pixels), with C1 = (0.01 L)^2 and C2 = (0.03 L)^2 for
    L = ``data_range``. The mean is taken over pixels whose window lies inside the image, as
    scikit-image does; variances are not sample-corrected, as in the paper.

    Parameters
    ----------
    image, reference : numpy.ndarray
        Real 2-D images of one shape, larger than the window.
    data_range : float, optional
        The span of possible values. Default: max - min of ``reference``.
    sigma : float
        Standard deviation of the Gaussian window in pixels.

    Returns
    -------
    float
        Mean SSIM, 1.0 for identical images.

    References
    ----------
    .. [1] Z. Wang, A. C. Bovik, H. R. Sheikh and E. P. Simoncelli, "Image quality assessment:
           from error visibility to structural similarity", IEEE Trans. Image Process. 13,
           600-612 (2004).

    Examples
    --------
    >>> import numpy as np
    >>> img = np.random.default_rng(0).random((32, 32))
    >>> ssim(img, img)
    1.0
    """
    x, y = as_pair(image, reference, ("image", "reference"), allow_complex=False)
    x, y = x.astype(float), y.astype(float)
    if not np.isfinite(sigma) or sigma <= 0:
        raise InvalidInputError(f"sigma: expected a positive window width, got {sigma}")
    data_range = _data_range(y, data_range)
    pad = int(_SSIM_TRUNCATE * sigma + 0.5)  # radius of scipy's Gaussian kernel
    if min(x.shape) <= 2 * pad:
        raise InvalidInputError(f"image: expected both sides > {2 * pad} pixels for an SSIM "
                                f"window of sigma {sigma}, got shape {x.shape}")
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2

    def blur(a: np.ndarray) -> np.ndarray:
        return ndimage.gaussian_filter(a, sigma, truncate=_SSIM_TRUNCATE)

    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx**2, blur(y * y) - my**2, blur(x * y) - mx * my
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    # Border windows reach into reflected pixels; leave them out.
    return float(s[pad:-pad, pad:-pad].mean())


def nrmse(recon: np.ndarray, truth: np.ndarray, mask: np.ndarray | None = None, *,
          fit_scale: bool = True) -> float:
    """Normalised RMS error ||c recon - truth|| / ||truth|| after global alignment.

    Ptychography leaves the object's global phase (and, with a free probe, its amplitude
    scale) undetermined, so c is the complex factor that minimises the error
    (c = <recon, truth> / ||recon||^2), or its unit-modulus part alone with
    ``fit_scale=False``.

    Parameters
    ----------
    recon, truth : numpy.ndarray
        Arrays of one shape, real or complex.
    mask : numpy.ndarray of bool, optional
        Pixels to compare (e.g. the illuminated area); default all.
    fit_scale : bool
        Fit the amplitude scale as well as the global phase.

    Returns
    -------
    float
        The error relative to the norm of ``truth`` (0 for a perfect match).

    Examples
    --------
    >>> import numpy as np
    >>> truth = np.exp(1j * np.linspace(0, 3, 64)).reshape(8, 8)
    >>> nrmse(2 * truth * np.exp(1j), truth) < 1e-12
    True
    >>> round(nrmse(2 * truth, truth, fit_scale=False), 3)
    1.0
    """
    recon, truth = np.asarray(recon), np.asarray(truth)
    if recon.shape != truth.shape:
        raise InvalidInputError(f"recon and truth must have one shape, got {recon.shape} and "
                                f"{truth.shape}")
    if mask is not None:
        mask = np.asarray(mask)
        if mask.shape != truth.shape or mask.dtype != bool:
            raise InvalidInputError(f"mask: expected a bool array of shape {truth.shape}, got "
                                    f"{mask.dtype} {mask.shape}")
        recon, truth = recon[mask], truth[mask]
    if not (np.isfinite(recon).all() and np.isfinite(truth).all()):
        raise InvalidInputError("recon/truth: contain NaN or inf")
    truth_norm = float(np.linalg.norm(truth))
    if truth_norm == 0:
        raise InvalidInputError("truth: expected a non-zero array (inside the mask), got zeros")
    c = np.vdot(recon, truth)
    if fit_scale:
        c = c / max(float(np.vdot(recon, recon).real), 1e-300)
    elif abs(c) > 0:
        c = c / abs(c)
    else:
        c = 1.0
    return float(np.linalg.norm(c * recon - truth) / truth_norm)
