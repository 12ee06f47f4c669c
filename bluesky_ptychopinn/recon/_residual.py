"""How well an estimate explains the measured frames: the Fourier-magnitude residual.

It needs no ground truth, so the live engine uses it to decide, per run, which estimate to show
(the network's stitched object or the refined one) and where to start the refinement.
"""

from __future__ import annotations

import numpy as np
import torch

from ..physics import exit_waves, extract_patches, far_field

__all__ = ["amplitude_residual", "place_on_canvas"]


@torch.no_grad()
def amplitude_residual(
    obj: torch.Tensor | np.ndarray,
    probe: torch.Tensor | np.ndarray,
    amplitudes: torch.Tensor,
    positions: torch.Tensor,
    *,
    fit_scale: bool = True,
    chunk: int = 256,
    fft_order: bool = False,
) -> float:
    """Normalised Fourier-magnitude residual ``sum (s |F(P O_j)| - sqrt(I_j))^2 / sum I_j``.

    Parameters
    ----------
    obj : tensor or array
        complex (H, W) object on the canvas that ``positions`` refer to.
    probe : tensor or array
        complex (M, N, N) probe (any norm).
    amplitudes : torch.Tensor
        (n, N, N) measured amplitudes ``sqrt(counts)``.
    positions : torch.Tensor
        (n, 2) probe centres on the canvas (pixels).
    fit_scale : bool
        Fit the one scalar ``s`` (photon scale) that minimises the residual, so that estimates
        with different, arbitrary amplitude scales (a network's output, a refined object) are
        compared on what they can be blamed for: the shape of the modelled diffraction.
    chunk : int
        Frames per forward-model call.
    fft_order : bool
        ``amplitudes`` have the zero frequency at pixel (0, 0) (as the refiner holds them)
        rather than at (N//2, N//2); the model is then compared unshifted (the residual is a
        sum over pixels, so only the two orders must agree).

    Returns
    -------
    float
        0 for a perfect explanation; 1 for a model that predicts no photons.
    """
    device = amplitudes.device
    obj_t = torch.as_tensor(obj).to(device=device, dtype=torch.complex64)
    probe_t = torch.as_tensor(probe).to(device=device, dtype=torch.complex64)
    if probe_t.ndim == 2:
        probe_t = probe_t[None]
    size = probe_t.shape[-1]
    cross = model_sq = measured_sq = 0.0
    for lo in range(0, len(positions), chunk):
        patches = extract_patches(obj_t, positions[lo : lo + chunk].to(device), size)
        psi = far_field(exit_waves(probe_t, patches), centred=not fft_order)
        # Sums in float64: the residual below is a difference of sums ~1e4 times larger than
        # itself when the estimate is good, which float32 sums would leave at ~1e-3 relative.
        model = (psi.real.square() + psi.imag.square()).sum(dim=1).sqrt().double()
        meas = amplitudes[lo : lo + chunk].double()
        cross += float((model * meas).sum())
        model_sq += float(model.square().sum())
        measured_sq += float(meas.square().sum())
    if measured_sq <= 0:
        return float("nan")
    scale = cross / model_sq if (fit_scale and model_sq > 0) else 1.0
    # sum (s m - a)^2 = s^2 sum m^2 - 2 s sum m a + sum a^2, no second pass over the frames.
    error = scale * scale * model_sq - 2 * scale * cross + measured_sq
    return max(error, 0.0) / measured_sq


def place_on_canvas(
    image: np.ndarray,
    image_origin_px: tuple[float, float],
    shape: tuple[int, int],
    origin_px: tuple[float, float],
    fill: complex = 1.0,
) -> np.ndarray:
    """Copy ``image`` (canvas pixel (0, 0) at object pixel ``image_origin_px``) onto a canvas of
    ``shape`` whose pixel (0, 0) is object pixel ``origin_px``; the rest is ``fill``.

    Canvases in this package only ever grow by whole pixels from a common origin, so the offset
    is rounded to whole pixels.
    """
    out = np.full(shape, fill, dtype=np.complex64)
    oy = int(round(image_origin_px[0] - origin_px[0]))
    ox = int(round(image_origin_px[1] - origin_px[1]))
    h, w = image.shape
    y0, x0 = max(oy, 0), max(ox, 0)
    y1, x1 = min(oy + h, shape[0]), min(ox + w, shape[1])
    if y1 > y0 and x1 > x0:
        out[y0:y1, x0:x1] = image[y0 - oy : y1 - oy, x0 - ox : x1 - ox]
    return out
