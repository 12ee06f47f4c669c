"""PSNR, SSIM, NRMSE, and the one-call comparison of a reconstruction with a reference."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from ..errors import InvalidInputError
from ._frc import HALF_BIT, frc, frc_auc, frc_resolution, frc_threshold
from ._preprocess import (
    align_global_phase,
    apply_shift,
    crop_edges,
    register_shift,
    remove_phase_plane,
    tukey_taper,
)

__all__ = ["psnr", "ssim", "nrmse", "compare_objects"]


def psnr(image: np.ndarray, reference: np.ndarray, data_range: float | None = None) -> float:
    """Peak signal-to-noise ratio in dB."""
    image, reference = np.asarray(image, float), np.asarray(reference, float)
    if image.shape != reference.shape:
        raise InvalidInputError(f"shapes differ: {image.shape} vs {reference.shape}")
    data_range = float(np.ptp(reference)) if data_range is None else float(data_range)
    mse = float(np.mean((image - reference) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(data_range**2 / mse)


def ssim(image: np.ndarray, reference: np.ndarray, data_range: float | None = None,
         sigma: float = 1.5) -> float:
    """Structural similarity (Wang et al. 2004) with a Gaussian window."""
    x, y = np.asarray(image, float), np.asarray(reference, float)
    if x.shape != y.shape:
        raise InvalidInputError(f"shapes differ: {x.shape} vs {y.shape}")
    data_range = float(np.ptp(y)) if data_range is None else float(data_range)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    blur = lambda a: ndimage.gaussian_filter(a, sigma, truncate=3.5)  # noqa: E731
    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx**2, blur(y * y) - my**2, blur(x * y) - mx * my
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    return float(s.mean())


def nrmse(recon: np.ndarray, truth: np.ndarray, mask: np.ndarray | None = None) -> float:
    """||c recon - truth|| / ||truth|| with the complex scale c that minimises it (global phase
    and amplitude scale removed), over ``mask`` if given."""
    recon, truth = np.asarray(recon), np.asarray(truth)
    if recon.shape != truth.shape:
        raise InvalidInputError(f"shapes differ: {recon.shape} vs {truth.shape}")
    if mask is not None:
        recon, truth = recon[mask], truth[mask]
    c = np.vdot(recon, truth) / max(np.vdot(recon, recon).real, 1e-30)
    return float(np.linalg.norm(c * recon - truth) / max(np.linalg.norm(truth), 1e-30))


def compare_objects(
    recon: np.ndarray,
    truth: np.ndarray,
    *,
    crop: int = 0,
    taper_px: int = 20,
    register: bool = False,
    remove_plane: bool = True,
    snr: float = 0.1,
) -> dict:
    """Compare a complex reconstruction with a reference, the paper's way.

    Global phase offset and (by default) a weighted phase plane are removed, optionally a
    sub-pixel shift is registered, edges are cropped and a Tukey taper applied; then FRC of
    amplitude and phase, FRC-AUC up to 0.5 and 1.0 of Nyquist, resolution at the SNRt
    threshold, PSNR and SSIM of amplitude and phase, and NRMSE.

    Returns
    -------
    dict
        Keys ``frc_auc_0.5_phase``, ``frc_auc_1.0_phase``, ``frc_auc_0.5_amplitude``,
        ``frc_auc_1.0_amplitude``, ``resolution_phase``, ``psnr_phase``, ``ssim_phase``,
        ``psnr_amplitude``, ``ssim_amplitude``, ``nrmse``, ``shift``, the FRC results
        ``frc_phase`` / ``frc_amplitude`` and the aligned arrays ``recon`` / ``truth``.
    """
    recon, truth = np.asarray(recon, np.complex128), np.asarray(truth, np.complex128)
    if recon.shape != truth.shape or recon.ndim != 2:
        raise InvalidInputError(f"expected two 2-D arrays of one shape, got {recon.shape} and "
                                f"{truth.shape}")
    if not (np.isfinite(recon).all() and np.isfinite(truth).all()):
        raise InvalidInputError("recon/truth contain NaN or inf")
    shift = (0.0, 0.0)
    if register:
        shift = register_shift(np.abs(truth), np.abs(recon))
        recon = apply_shift(recon, shift)
    recon, truth = crop_edges(recon, crop), crop_edges(truth, crop)
    recon = align_global_phase(recon, truth)
    if remove_plane:
        recon = remove_phase_plane(recon, truth)
    window = tukey_taper(recon.shape, taper_px)
    amp_r, amp_t = np.abs(recon), np.abs(truth)
    ph_r, ph_t = np.angle(recon), np.angle(truth)
    # Taper around the mean so the window does not add a strong low-frequency structure.
    taper = lambda a: (a - a.mean()) * window  # noqa: E731
    frc_amp = frc(taper(amp_r), taper(amp_t))
    frc_ph = frc(taper(ph_r), taper(ph_t))
    return {
        "frc_auc_0.5_phase": frc_auc(frc_ph, 0.5),
        "frc_auc_1.0_phase": frc_auc(frc_ph, 1.0),
        "frc_auc_0.5_amplitude": frc_auc(frc_amp, 0.5),
        "frc_auc_1.0_amplitude": frc_auc(frc_amp, 1.0),
        "resolution_phase": frc_resolution(frc_ph, snr),
        "resolution_phase_half_bit": frc_resolution(frc_ph, HALF_BIT),
        "psnr_phase": psnr(ph_r, ph_t),
        "ssim_phase": ssim(ph_r, ph_t),
        "psnr_amplitude": psnr(amp_r, amp_t),
        "ssim_amplitude": ssim(amp_r, amp_t),
        "nrmse": nrmse(recon, truth),
        "shift": shift,
        "frc_phase": frc_ph,
        "frc_amplitude": frc_amp,
        "threshold": frc_threshold(frc_ph, snr),
        "recon": recon,
        "truth": truth,
    }
