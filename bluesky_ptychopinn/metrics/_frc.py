"""Fourier ring correlation, threshold curves, resolution and FRC-AUC."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import InvalidInputError
from ._validate import as_pair

__all__ = [
    "HALF_BIT",
    "SUSTAINED_RINGS",
    "FRCResult",
    "frc",
    "frc_threshold",
    "frc_resolution",
    "frc_auc",
    "frc_auc_key",
]

#: SNRt of the 1/2-bit criterion (van Heel & Schatz 2005). The PtychoPINN paper uses SNRt = 0.1.
HALF_BIT = 0.2071

#: Consecutive rings below the threshold that make a crossing in :func:`frc_resolution`.
#: Why 3: ring k holds about 2 pi k Fourier pixels, half of them independent for a real image,
#: so the first rings scatter by about 1/sqrt(pi k) (0.3-0.6 for k = 1-3) and one of them can
#: dip below a threshold near 0.2-0.5 by chance, or because mean removal and the taper leave it
#: little power; a taper also correlates neighbouring rings, so a dip can span two. Three rings
#: in a row is a real fall-off, yet still only 0.09 of Nyquist on a 64-px image (33 rings). The
#: price: an FRC that hovers at the threshold, dipping for one or two rings at a time, is
#: reported where it finally stays below.
SUSTAINED_RINGS = 3


@dataclass(frozen=True)
class FRCResult:
    """An FRC curve, one value per ring.

    Attributes
    ----------
    freq : numpy.ndarray
        Ring centres as a fraction of Nyquist (1.0 = 0.5 cycles/pixel); ring 0 is DC.
    frc : numpy.ndarray
        Correlation per ring: real part of the cross-spectrum over the geometric mean of the
        two power spectra (0 where a ring holds no power).
    n_pixels : numpy.ndarray
        Fourier pixels per ring (the threshold curves depend on it).
    """

    freq: np.ndarray
    frc: np.ndarray
    n_pixels: np.ndarray


def _ring_index(shape: tuple[int, int]) -> tuple[np.ndarray, int]:
    """Ring number of every (fftshifted) Fourier pixel and the number of rings up to Nyquist.

    Rings are one Fourier pixel of the shorter axis wide; for a non-square image the frequency
    of each axis is scaled to cycles/pixel first, so rings stay circles in physical frequency.
    """
    h, w = shape
    short = min(h, w)
    fy = (np.arange(h) - h // 2) / h
    fx = (np.arange(w) - w // 2) / w
    radius = np.hypot(fy[:, None], fx[None, :]) * short  # in rings
    return np.round(radius).astype(np.int64), short // 2 + 1


def frc(image1: np.ndarray, image2: np.ndarray) -> FRCResult:
    """Fourier ring correlation of two images (real or complex) with one-pixel rings.

    Parameters
    ----------
    image1, image2 : numpy.ndarray
        2-D images of one shape, real or complex, finite. Apply any taper before calling.

    Returns
    -------
    FRCResult
        Ring centres (fraction of Nyquist), FRC per ring and Fourier pixels per ring. Corners
        beyond Nyquist are left out.

    Raises
    ------
    InvalidInputError
        If the images are not 2-D, differ in shape, or contain NaN/inf.

    References
    ----------
    .. [1] M. van Heel and M. Schatz, "Fourier shell correlation threshold criteria",
           J. Struct. Biol. 151, 250-262 (2005).

    Examples
    --------
    >>> import numpy as np
    >>> img = np.random.default_rng(0).standard_normal((64, 64))
    >>> result = frc(img, img)
    >>> float(result.freq[-1]), bool(np.allclose(result.frc, 1.0))
    (1.0, True)
    """
    a, b = as_pair(image1, image2, ("image1", "image2"))
    fa = np.fft.fftshift(np.fft.fft2(a))
    fb = np.fft.fftshift(np.fft.fft2(b))
    rings, n_rings = _ring_index(a.shape)
    inside = rings < n_rings
    idx = rings[inside]
    cross = np.bincount(idx, (fa * np.conj(fb)).real[inside], minlength=n_rings)
    power_a = np.bincount(idx, (np.abs(fa) ** 2)[inside], minlength=n_rings)
    power_b = np.bincount(idx, (np.abs(fb) ** 2)[inside], minlength=n_rings)
    counts = np.bincount(idx, minlength=n_rings)
    denominator = np.sqrt(power_a * power_b)
    # A ring without power (e.g. DC after mean removal) carries no correlation: report 0.
    curve = np.divide(cross, denominator, out=np.zeros(n_rings), where=denominator > 0)
    freq = np.arange(n_rings) / (min(a.shape) / 2)
    return FRCResult(freq=freq, frc=curve, n_pixels=counts)


def frc_threshold(result: FRCResult, snr: float = HALF_BIT) -> np.ndarray:
    """Threshold curve of an SNR criterion (van Heel & Schatz 2005).

    T(n) = (SNRt + (2 sqrt(SNRt) + 1) / sqrt(n)) / (SNRt + 1 + 2 sqrt(SNRt) / sqrt(n)),
    with n the Fourier pixels of the ring.

    Parameters
    ----------
    result : FRCResult
        The curve whose rings set n.
    snr : float
        SNRt: 0.2071 (:data:`HALF_BIT`, the 1/2-bit criterion) or 0.1 (the PtychoPINN paper).

    Returns
    -------
    numpy.ndarray
        Threshold per ring; tends to SNRt / (SNRt + 1) for large rings.

    Examples
    --------
    >>> import numpy as np
    >>> result = frc(np.eye(64), np.eye(64))
    >>> t = frc_threshold(result, 0.1)
    >>> bool(t[1] > t[-1] > 0.1 / 1.1)
    True
    """
    if not np.isfinite(snr) or snr <= 0:
        raise InvalidInputError(f"snr: expected a positive SNRt (e.g. 0.2071 or 0.1), got {snr}")
    n = np.maximum(np.asarray(result.n_pixels), 1).astype(float)
    s = float(snr)
    return (s + (2 * np.sqrt(s) + 1) / np.sqrt(n)) / (s + 1 + 2 * np.sqrt(s) / np.sqrt(n))


def frc_resolution(
    result: FRCResult, snr: float = HALF_BIT, *, sustain: int | None = None
) -> float:
    """First frequency (fraction of Nyquist) where the FRC falls, and stays, below a threshold.

    The crossing is the first *sustained* one: the first ring below the threshold from which
    the FRC stays below for ``sustain`` consecutive rings (or up to Nyquist, whichever comes
    first). A shorter dip is skipped, so that one noisy ring near zero frequency, where a ring
    holds a handful of Fourier pixels, cannot set the resolution. The crossing is interpolated
    linearly between the last ring above and the first ring below; DC is never a crossing.

    Parameters
    ----------
    result : FRCResult
        The FRC curve.
    snr : float
        SNRt of the threshold, see :func:`frc_threshold`.
    sustain : int, optional
        Consecutive rings that must lie below the threshold; default
        :data:`SUSTAINED_RINGS` (3). 1 takes the first crossing of any kind.

    Returns
    -------
    float
        Crossing frequency as a fraction of Nyquist; 1.0 when the FRC stays above the
        threshold up to Nyquist (or only dips for fewer than ``sustain`` rings). The resolved
        half-period is ``1 / resolution`` pixels.

    Examples
    --------
    >>> import numpy as np
    >>> img = np.random.default_rng(0).standard_normal((64, 64))
    >>> frc_resolution(frc(img, img))
    1.0
    """
    sustain = SUSTAINED_RINGS if sustain is None else sustain
    if int(sustain) != sustain or sustain < 1:
        raise InvalidInputError(f"sustain: expected an integer >= 1 (rings), got {sustain!r}")
    margin = result.frc - frc_threshold(result, snr)
    below = margin < 0
    below[0] = False  # DC carries no resolution
    for k in np.flatnonzero(below):
        # Near Nyquist fewer than ``sustain`` rings remain: all of them must be below.
        if below[k : k + int(sustain)].all():
            above = max(float(margin[k - 1]), 0.0)
            fraction = above / (above - float(margin[k]))
            return float(result.freq[k - 1] + fraction * (result.freq[k] - result.freq[k - 1]))
    return 1.0


def frc_auc(result: FRCResult, cutoff: float) -> float:
    """Mean FRC over the rings from the first above DC up to ``cutoff``.

    The cutoff has no default on purpose: both 0.5 (the paper) and 1.0 of Nyquist circulate
    under the name FRC-AUC. Label results with :func:`frc_auc_key`.

    Parameters
    ----------
    result : FRCResult
        The FRC curve.
    cutoff : float
        Highest ring frequency included, as a fraction of Nyquist, in (0, 1].

    Returns
    -------
    float
        The mean FRC (1.0 for identical images).

    Examples
    --------
    >>> import numpy as np
    >>> img = np.random.default_rng(0).standard_normal((64, 64))
    >>> {frc_auc_key(0.5): round(frc_auc(frc(img, img), cutoff=0.5), 3)}
    {'frc_auc_0.5': 1.0}
    """
    if not np.isfinite(cutoff) or not 0 < cutoff <= 1:
        raise InvalidInputError(f"cutoff: expected a fraction of Nyquist in (0, 1], got {cutoff}")
    keep = (result.freq > 0) & (result.freq <= cutoff + 1e-12)
    if not keep.any():
        raise InvalidInputError(f"cutoff {cutoff} of Nyquist keeps no ring above DC of a curve "
                                f"with {len(result.freq)} rings")
    return float(result.frc[keep].mean())


def frc_auc_key(cutoff: float, part: str = "") -> str:
    """The label of an FRC-AUC value, stating its cutoff: ``frc_auc_0.5`` or ``frc_auc_1.0_phase``.

    Examples
    --------
    >>> frc_auc_key(0.5, "phase")
    'frc_auc_0.5_phase'
    """
    return f"frc_auc_{float(cutoff)!r}" + (f"_{part}" if part else "")
