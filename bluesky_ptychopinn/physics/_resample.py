"""Changing the model size N: crop or bin diffraction frames, resample the probe to match.

Cropping frames N -> n keeps the detector pixel but narrows the angular range, so the object
pixel size grows by N / n; the probe is Fourier-cropped (its far field cut to the same n x n
window) and positions scale by n / N. Binning by b keeps the angular range, so the object pixel
size stays and the field of view shrinks: the probe is cropped in real space.

Fourier cropping with orthonormal FFTs conserves sum |P|^2 whenever the probe's far field fits in
the kept window, so photon counts are unchanged (tested: simulating at 128 and cropping equals
simulating at 64 with the resampled probe).

Binning by an even factor b and a plain real-space crop of the probe are *not* an exact pair.
The DC pixel N//2 is the first pixel of its bin, not its centre, so binned pixel j holds the
frequencies around (j - n//2) + (b - 1) / (2 b) binned pixels: a quarter pixel off for b = 2
(the binned pattern's centre of mass sits at 31.62, not 32, for n = 64). The forward model at
the binned size puts DC at the centre of pixel n//2, so the matching probe is the crop times
the ramp exp(-2 pi i (b - 1) / (2 b) (x + y) / n). Measured on 20 noiseless 128-px frames (a
14-px Airy probe, a simplex object) binned by 2 against the 64-px model: relative L1 error 0.066
with :func:`crop_probe_real_space` alone, 0.044 with the ramp; the rest is the pixel integration
of binning. Odd factors have DC at the centre of its bin and no offset; cropping frames has none.
"""

from __future__ import annotations

import numpy as np
import torch

from ..errors import InvalidInputError
from ._propagation import back_propagate, far_field
from ._tensors import check_size

__all__ = ["crop_frames", "bin_frames", "resample_probe", "crop_probe_real_space",
           "resample_object", "probe_at_sampling"]


def _center_crop_or_pad(array: torch.Tensor, size: int) -> torch.Tensor:
    """Centre crop (or zero-pad) the last two axes to ``size``, keeping pixel (N//2, N//2) at
    (size//2, size//2)."""
    n = array.shape[-1]
    if size <= n:
        start = n // 2 - size // 2
        return array[..., start : start + size, start : start + size]
    out = array.new_zeros((*array.shape[:-2], size, size))
    start = size // 2 - n // 2
    out[..., start : start + n, start : start + n] = array
    return out


def crop_frames(frames, size: int):
    """Centre-crop (…, N, N) diffraction frames to (…, size, size) around the DC pixel.

    Works on numpy arrays and tensors alike and returns the same kind.
    """
    size = check_size(size, "size")
    is_numpy = isinstance(frames, np.ndarray)
    tensor = torch.from_numpy(frames) if is_numpy else frames
    if tensor.shape[-1] != tensor.shape[-2] or size > tensor.shape[-1]:
        raise InvalidInputError(
            f"frames: cannot crop frames of shape {tuple(tensor.shape)} to {size} x {size}"
        )
    out = _center_crop_or_pad(tensor, size)
    return out.numpy().copy() if is_numpy else out


def bin_frames(frames, factor: int):
    """Sum ``factor`` x ``factor`` detector pixels (photon counts add).

    The DC pixel (N//2) lands on N//(2 factor) when N is a multiple of 2 * factor.

    Notes
    -----
    For an even ``factor`` b the DC pixel is the *first* pixel of its bin, so the binned frames'
    zero frequency lies (b - 1) / (2 b) binned pixels before the centre of pixel n//2 in each
    axis: a quarter pixel for b = 2 (the centre of mass of a binned 128 -> 64 pattern is at
    31.62, not 32). The project's forward model puts DC at the centre of pixel n//2, so
    :func:`crop_probe_real_space` alone is not the exact probe for binned frames: multiply it by
    exp(-2 pi i (b - 1) / (2 b) (x + y) / n), x and y the pixel index minus n//2. Measured on a
    128-px simulation binned by 2 against the 64-px model: relative L1 error 0.066 without the
    ramp, 0.044 with it (the remainder is pixel integration). Odd factors centre their bins on
    DC and have no offset. Binning itself is left as it is: the counts are what the binned
    detector would have recorded.
    """
    factor = check_size(factor, "factor")
    is_numpy = isinstance(frames, np.ndarray)
    tensor = torch.from_numpy(frames) if is_numpy else frames
    n = tensor.shape[-1]
    if n % factor or tensor.shape[-2] != n:
        raise InvalidInputError(f"frames: cannot bin shape {tuple(tensor.shape)} by {factor}")
    m = n // factor
    out = tensor.reshape(*tensor.shape[:-2], m, factor, m, factor).sum(dim=(-3, -1))
    return out.numpy().copy() if is_numpy else out


def resample_probe(probe, size: int):
    """Fourier-resample a probe for frames cropped (or padded) to ``size`` x ``size``.

    Parameters
    ----------
    probe : array_like
        (…, N, N) complex probe sampled at the old object pixel size.
    size : int
        New frame size n. The new object pixel size is old * N / n.

    Returns
    -------
    Same type as ``probe``
        (…, n, n) complex probe; sum |P|^2 is conserved when the probe's far field fits inside
        the central n x n window (the part outside is what the cropped detector cannot see).

    Examples
    --------
    >>> import numpy as np
    >>> from bluesky_ptychopinn.physics import zone_plate_probe
    >>> p = zone_plate_probe(128, 20e-9, 10_000, outer_zone_width_m=100e-9)
    >>> q = resample_probe(p, 64)
    >>> q.shape, round(float((abs(q) ** 2).sum()), 4)
    ((1, 64, 64), 1.0)
    """
    size = check_size(size, "size", 2)
    is_numpy = isinstance(probe, np.ndarray)
    tensor = torch.from_numpy(np.asarray(probe, dtype=np.complex64)) if is_numpy else probe
    if tensor.shape[-1] != tensor.shape[-2]:
        raise InvalidInputError(f"probe: cannot resample shape {tuple(tensor.shape)} to {size}")
    # far_field assumes the array origin at index 0; the probe is centred at N//2, so shift it
    # there first to keep the spectrum free of a linear phase, then shift back. ifftshift moves
    # index N//2 to 0 for odd N as well as even (it is the inverse of the final fftshift, which
    # puts index 0 at size//2), so it is applied for both parities.
    centred = torch.fft.ifftshift(tensor, dim=(-2, -1))
    spectrum = far_field(centred)
    spectrum = _center_crop_or_pad(spectrum, size)
    out = back_propagate(spectrum)
    out = torch.fft.fftshift(out, dim=(-2, -1)).to(tensor.dtype)
    return out.numpy().copy() if is_numpy else out


def crop_probe_real_space(probe, size: int):
    """Centre-crop a probe in real space: the probe for frames binned to ``size`` pixels."""
    is_numpy = isinstance(probe, np.ndarray)
    tensor = torch.from_numpy(np.asarray(probe)) if is_numpy else probe
    out = _center_crop_or_pad(tensor, size)
    return out.numpy().copy() if is_numpy else out


def resample_object(obj: np.ndarray, factor: float, shape: tuple[int, int],
                    origin_px: tuple[float, float] = (0.0, 0.0)) -> np.ndarray:
    """An object on a grid whose pixel is ``factor`` times larger: what a reconstruction from
    frames cropped N -> N / ``factor`` can see, on that reconstruction's canvas.

    The object is band-limited to the cropped detector's square window (spatial frequencies
    below 1 / (2 ``factor``) cycles per old pixel in each axis, as the cropped frames are), then
    sampled where the coarse canvas's pixels lie: pixel (i, j) of the result is the old object's
    coordinate ((i + origin_y) ``factor``, (j + origin_x) ``factor``), both grids having their
    origin at the centre of pixel (0, 0) (docs/conventions.md). Outside the old object the
    result is 0.

    Parameters
    ----------
    obj : numpy.ndarray
        (H, W) complex object at the old (fine) pixel.
    factor : float
        New pixel / old pixel (N / n for frames cropped from N to n), >= 1.
    shape : (int, int)
        Shape of the coarse canvas.
    origin_px : (float, float)
        Coarse-pixel coordinate of canvas pixel (0, 0), e.g. a
        :class:`~bluesky_ptychopinn.recon.Snapshot`'s ``origin_px``.

    Returns
    -------
    numpy.ndarray
        complex64 ``shape`` array.

    Examples
    --------
    >>> import numpy as np
    >>> y, x = np.mgrid[:64, :64]
    >>> fine = np.exp(1j * np.sin(2 * np.pi * x / 32))
    >>> coarse = resample_object(fine, 2, (32, 32))
    >>> bool(np.allclose(coarse[8:24, 8:24], fine[16:48:2, 16:48:2], atol=0.05))
    True
    """
    from scipy import ndimage

    obj = np.asarray(obj)
    if obj.ndim != 2 or not (np.isfinite(factor) and factor >= 1):
        raise InvalidInputError(
            f"object: cannot resample shape {obj.shape} by a pixel factor {factor!r} (>= 1)")
    if len(shape) != 2 or not all(isinstance(v, (int, np.integer)) and v >= 0 for v in shape):
        raise InvalidInputError(f"shape: expected two integers >= 0 (the coarse canvas), got "
                                f"{tuple(shape)!r}")
    obj = obj.astype(np.complex128)
    if factor > 1:
        # The square window of a cropped detector, applied as an ideal low-pass.
        spectrum = np.fft.fft2(obj)
        fy = np.abs(np.fft.fftfreq(obj.shape[0]))[:, None]
        fx = np.abs(np.fft.fftfreq(obj.shape[1]))[None, :]
        spectrum *= (fy < 0.5 / factor) & (fx < 0.5 / factor)
        obj = np.fft.ifft2(spectrum)
    rows = (np.arange(shape[0]) + origin_px[0]) * factor
    cols = (np.arange(shape[1]) + origin_px[1]) * factor
    grid = np.meshgrid(rows, cols, indexing="ij")
    out = np.empty(shape, np.complex64)
    out.real = ndimage.map_coordinates(obj.real, grid, order=3, mode="constant", cval=0.0)
    out.imag = ndimage.map_coordinates(obj.imag, grid, order=3, mode="constant", cval=0.0)
    return out


#: Relative pixel-size mismatch accepted as "the same sampling" (a 1 % magnification error).
PIXEL_TOLERANCE = 0.01


def probe_at_sampling(probe, pixel_m: float | None, size: int,
                      target_pixel_m: float | None) -> np.ndarray:
    """A probe of any size and pixel, at ``size`` x ``size`` pixels of ``target_pixel_m``.

    Three exact cases, tried in order (a pixel within 1 % counts as the same):

    - the same pixel: the field of view is cropped or zero-padded in real space (refused when
      the crop would cut off more than 1 % of the probe's power);
    - the same field of view (``N pixel = size target``, e.g. frames cropped from N to size):
      Fourier resampling, :func:`resample_probe`;
    - otherwise Fourier resampling to the target pixel (when ``N pixel / target`` is within
      1 % of a whole number of pixels) followed by the real-space crop or pad.

    Parameters
    ----------
    probe : array_like
        (N, N) or (M, N, N) complex probe.
    pixel_m : float or None
        Its object pixel size; None (unknown) is accepted only when N == ``size``.
    size : int
        Pixels needed (the frame size).
    target_pixel_m : float or None
        Object pixel size needed; None: the probe's own.

    Returns
    -------
    numpy.ndarray
        complex64 (M, size, size).

    Raises
    ------
    InvalidInputError
        When no exact resampling exists, saying why.

    Examples
    --------
    >>> from bluesky_ptychopinn.physics import make_probe
    >>> p = make_probe("zone_plate", 128, 22e-9, 8_800)
    >>> probe_at_sampling(p, 22e-9, 64, 44e-9).shape        # frames cropped 128 -> 64
    (1, 64, 64)
    >>> probe_at_sampling(p, 22e-9, 160, 22e-9).shape       # a larger field of view
    (1, 160, 160)
    """
    size = check_size(size, "size", 2)
    for name, value in (("pixel_m", pixel_m), ("target_pixel_m", target_pixel_m)):
        if value is not None and not (np.isfinite(value) and value > 0):
            raise InvalidInputError(f"{name}: expected a finite pixel size > 0 metres (or None: "
                                    f"unknown), got {value!r}")
    array = np.asarray(probe, dtype=np.complex64)
    array = array[None] if array.ndim == 2 else array
    n = array.shape[-1]
    if array.ndim != 3 or array.shape[-2] != n:
        raise InvalidInputError(f"probe: cannot resample shape {array.shape} to {size} px")
    if pixel_m is None or target_pixel_m is None:
        if n == size:
            return array
        if pixel_m is None:
            raise InvalidInputError(
                f"probe: {n} px of unknown pixel size cannot be matched to {size} px frames; "
                "give the probe's pixel size")
        target_pixel_m = pixel_m

    def same(a: float, b: float) -> bool:
        return abs(a - b) <= PIXEL_TOLERANCE * b

    if same(pixel_m, target_pixel_m):
        return _real_space_fit(array, size) if n != size else array
    if same(pixel_m * n, target_pixel_m * size):
        return resample_probe(array, size)
    m = pixel_m * n / target_pixel_m
    if abs(m - round(m)) <= PIXEL_TOLERANCE * m and round(m) >= 2:
        return _real_space_fit(resample_probe(array, int(round(m))), size)
    raise InvalidInputError(
        f"probe: {n} px of {pixel_m:.4g} m cannot be resampled exactly to {size} px of "
        f"{target_pixel_m:.4g} m ({m:.2f} px of field of view is not a whole number); "
        "measure or calibrate the probe at this geometry")


def _real_space_fit(probe: np.ndarray, size: int) -> np.ndarray:
    """Crop or zero-pad in real space, refusing to cut off a visible part of the beam."""
    out = crop_probe_real_space(probe, size)
    kept = float(np.sum(np.abs(out) ** 2)) / max(float(np.sum(np.abs(probe) ** 2)), 1e-30)
    if kept < 0.99:
        raise InvalidInputError(
            f"probe: cropping {probe.shape[-1]} -> {size} px would cut off {100 * (1 - kept):.1f}"
            " % of the beam's power; use larger frames or a smaller probe")
    return np.ascontiguousarray(out, dtype=np.complex64)
