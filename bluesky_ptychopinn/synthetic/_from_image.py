"""Objects from images: any picture (array, .npy or image file) as a transmission function."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..errors import FileFormatError, InvalidInputError
from ._common import check_range, check_shape, normalise01, to_complex

__all__ = ["from_image", "load_image"]

IMAGE_MODES = ("both", "phase", "amplitude")
_LUMA = np.array([0.2126, 0.7152, 0.0722])  # Rec. 709 luminance weights of R, G, B


def load_image(image: np.ndarray | str | Path) -> np.ndarray:
    """A 2-D float64 image from an array, a .npy file or an image file matplotlib can read.

    RGB(A) images become their Rec. 709 luminance (alpha is dropped).

    Parameters
    ----------
    image : numpy.ndarray, str or pathlib.Path
        (H, W), (H, W, 3) or (H, W, 4) real array, or the path of such an array (.npy) or of an
        image file (.png and the formats of :func:`matplotlib.image.imread`).

    Returns
    -------
    numpy.ndarray
        float64 (H, W).

    Examples
    --------
    >>> load_image(np.ones((4, 5, 3))).shape
    (4, 5)
    """
    source = image
    if isinstance(image, (str, Path)):
        path = Path(image)
        if not path.is_file():
            raise InvalidInputError(f"image: expected an existing file, got {str(path)!r}")
        if path.suffix.lower() == ".npy":
            try:
                image = np.load(path, allow_pickle=False)
            except ValueError as exc:
                raise FileFormatError(path, "", f"not a plain .npy array ({exc})") from None
        else:
            import matplotlib.image  # only needed for image files

            try:
                image = matplotlib.image.imread(path)
            except Exception as exc:  # PIL raises many types for unreadable files
                raise FileFormatError(path, "", f"not a readable image ({exc})") from None
    arr = np.asarray(image)
    if np.iscomplexobj(arr) or not np.issubdtype(arr.dtype, np.number):
        raise InvalidInputError(f"image: expected a real numeric array, got dtype {arr.dtype}")
    if arr.ndim == 3 and arr.shape[-1] in (3, 4):
        arr = arr[..., :3].astype(np.float64) @ _LUMA
    if arr.ndim != 2:
        raise InvalidInputError(
            f"image: expected (H, W), (H, W, 3) or (H, W, 4), got shape {arr.shape}"
            + (f" from {str(source)!r}" if isinstance(source, (str, Path)) else "")
        )
    arr = arr.astype(np.float64)
    if not np.isfinite(arr).all():
        raise InvalidInputError("image: contains NaN or infinite values")
    return arr


def _resize(arr: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Bilinear resampling to ``shape`` (pixel centres mapped edge to edge)."""
    from scipy.ndimage import map_coordinates

    ys = np.linspace(0, arr.shape[0] - 1, shape[0])
    xs = np.linspace(0, arr.shape[1] - 1, shape[1])
    yy, xx = np.meshgrid(ys, xs, indexing="ij")
    return map_coordinates(arr, [yy, xx], order=1, mode="nearest")


def from_image(
    image: np.ndarray | str | Path,
    *,
    shape: int | Sequence[int] | None = None,
    amp_range: tuple[float, float] = (0.6, 1.0),
    phase_range: tuple[float, float] = (-math.pi / 2, math.pi / 2),
    mode: str = "both",
) -> np.ndarray:
    """A complex transmission object from a picture.

    The image (see :func:`load_image`) is min-max normalised to b in [0, 1] and mapped so that
    bright regions are bright in the object: amplitude = amp_lo + (amp_hi - amp_lo) b and phase =
    phase_lo + (phase_hi - phase_lo) b. ``mode="phase"`` makes a pure phase object (amplitude =
    amp_hi, ``amp_range`` otherwise unused), ``mode="amplitude"`` a pure amplitude object
    (phase = 0, ``phase_range`` unused). A constant image gives b = 0.

    Parameters
    ----------
    image : numpy.ndarray, str or pathlib.Path
        2-D image, RGB(A) image (luminance is used) or the path of a .npy or image file.
    shape : int or (int, int), optional
        Resample (bilinearly) to this (H, W); default keeps the image's shape.
    amp_range, phase_range : (float, float)
        Amplitude and phase (radians) ranges.
    mode : {"both", "phase", "amplitude"}
        Which of amplitude and phase carry the image.

    Returns
    -------
    numpy.ndarray
        complex64 (H, W) object.

    Examples
    --------
    >>> img = np.linspace(0, 1, 12).reshape(3, 4)
    >>> obj = from_image(img, mode="phase")
    >>> round(float(np.angle(obj).min()), 4), round(float(abs(obj).max()), 4)
    (-1.5708, 1.0)
    """
    if mode not in IMAGE_MODES:
        raise InvalidInputError(f"mode: expected one of {IMAGE_MODES}, got {mode!r}")
    amp_lo, amp_hi = check_range("amp_range", amp_range, minimum=0.0)
    phase_lo, phase_hi = check_range("phase_range", phase_range)
    arr = load_image(image)
    if shape is not None:
        arr = _resize(arr, check_shape(shape))
    b = normalise01(arr)
    amp = amp_lo + (amp_hi - amp_lo) * b if mode != "phase" else np.full_like(b, amp_hi)
    phase = phase_lo + (phase_hi - phase_lo) * b if mode != "amplitude" else np.zeros_like(b)
    return to_complex(amp, phase)
