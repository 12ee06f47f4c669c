"""One call that compares a complex reconstruction with a reference object."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ..errors import InvalidInputError
from ._frc import HALF_BIT, FRCResult, frc, frc_auc, frc_auc_key, frc_resolution, frc_threshold
from ._image import nrmse, psnr, ssim
from ._preprocess import (
    align_global_phase,
    apply_shift,
    crop_edges,
    register_shift,
    tukey_taper,
)
from ._preprocess import remove_phase_plane as _remove_phase_plane
from ._validate import as_pair

__all__ = ["compare_objects"]

AUC_CUTOFFS = (0.5, 1.0)


def compare_objects(
    recon: np.ndarray,
    truth: np.ndarray,
    *,
    crop: int = 0,
    taper_px: float = 20,
    register: bool = True,
    remove_phase_plane: bool = True,
    snr: float = 0.1,
) -> dict[str, Any]:
    """Compare a complex reconstruction with a reference object, the PtychoPINN paper's way.

    Steps: global phase offset removed; weighted phase plane removed (default); a sub-pixel
    shift of ``recon`` relative to ``truth`` registered on the complex fields (to 1/100 pixel)
    and undone by moving ``truth`` (default, see ``register``); ``crop`` pixels cut from each
    edge, raised to cover the rows and columns the shift wrapped around the edges (up to a
    quarter of the image) so that no wrapped pixel is scored; global phase and plane fitted
    again on what is left; then, on amplitude and phase separately, FRC of the mean-subtracted
    images times a ``taper_px`` Tukey window, FRC-AUC up to 0.5 and 1.0 of Nyquist, resolution
    at the SNRt and 1/2-bit thresholds (first sustained crossing, see :func:`frc_resolution`),
    and PSNR / SSIM of the untapered images.
    The paper's setting is ``taper_px=20``, no registration, edges cropped by 10-40 px.

    Registration is on by default because ptychography fixes the object only up to a
    translation when the probe is refined (and a reconstruction written on a grid offset by
    whole pixels is a different convention, not a worse image): unregistered, a perfect
    reconstruction of a broadband test object shifted by 2.4 px scores a phase FRC-AUC(0.5) of
    0.2 instead of 1.0 (``tests/test_metrics.py``). Pass ``register=False`` to
    score the placement too, e.g. a network stitched at known positions into the truth's
    frame, where any offset is an error of the method.

    Parameters
    ----------
    recon, truth : numpy.ndarray
        2-D objects of one shape, complex (real is taken as complex with zero phase).
    crop : int
        Pixels cut from each edge before the metrics.
    taper_px : float
        Width of the Tukey taper's cosine edge in pixels (0: no taper).
    register : bool
        Find and undo a sub-pixel shift of ``recon`` relative to ``truth`` (default). The
        ``truth`` is moved (Fourier shift by ``-shift``), never the reconstruction being
        scored. The result's ``registered`` and ``shift`` (also in ``settings``) say whether
        and by how much; ``settings["crop_applied"]`` is the edge crop actually used.
    remove_phase_plane : bool
        Remove a weighted least-squares phase plane relative to ``truth`` (the ambiguity of
        blind ptychography); the global phase offset is always removed.
    snr : float
        SNRt of the threshold curve for ``resolution_*`` and ``threshold`` (paper: 0.1).

    Returns
    -------
    dict
        Scores (float): ``frc_auc_0.5_phase``, ``frc_auc_1.0_phase``, ``frc_auc_0.5_amplitude``,
        ``frc_auc_1.0_amplitude``, ``resolution_phase``, ``resolution_amplitude`` (fraction of
        Nyquist, SNRt ``snr``), ``resolution_phase_half_bit``, ``psnr_phase``, ``ssim_phase``,
        ``psnr_amplitude``, ``ssim_amplitude`` and ``nrmse`` (complex, see :func:`nrmse`).
        A part (amplitude or phase) that is constant in ``truth`` has NaN scores: they are
        undefined. Also ``registered`` (bool, ``register``), ``shift`` (dy, dx, pixels: the
        shift that would bring ``recon`` onto ``truth``, applied as ``-shift`` to ``truth``;
        (0, 0) unregistered), the curves
        ``frc_phase`` / ``frc_amplitude`` (:class:`FRCResult`), ``threshold`` and
        ``threshold_half_bit`` (per ring of the phase curve), the aligned, cropped arrays
        ``recon`` / ``truth`` (``truth`` moved when registered) and ``settings`` (the
        arguments, plus ``registered``, ``shift`` and ``crop_applied``).

    Notes
    -----
    Both objects are turned by one global phase so that the truth's mean phase is 0 before
    phases are taken: the scores do not depend on the truth's (arbitrary) absolute phase.
    The FRC normalises each ring by its own power, so it measures correlation, not contrast:
    a blurred copy of the truth scores near 1 in every ring. Read it with ``psnr_*`` /
    ``ssim_*`` / ``nrmse``, which do see an over-smoothed image.

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> truth = (1 + 0.2 * rng.random((64, 64))) * np.exp(1j * rng.uniform(-1, 1, (64, 64)))
    >>> yy, xx = np.mgrid[:64, :64]
    >>> scores = compare_objects(truth * np.exp(1j * (0.3 + 0.05 * xx)), truth, taper_px=8)
    >>> round(scores["frc_auc_0.5_phase"], 3), round(scores["frc_auc_1.0_amplitude"], 3)
    (1.0, 1.0)
    """
    recon, truth = as_pair(recon, truth, ("recon", "truth"))
    # Which parts the truth holds at all, decided once on the truth as given: registration
    # (a sub-pixel shift) and cropping would put rounding ripple into a constant part.
    defined = _defined_parts(truth)
    recon, truth = recon.astype(np.complex128), truth.astype(np.complex128)
    shift = (0.0, 0.0)
    crop_applied = crop
    if register:
        # Coarse alignment first: a relative phase ramp would blur the correlation peak.
        rough = _align(recon, truth, remove_phase_plane)
        # Bounded search: a real misregistration is a few pixels (a probe re-centred by a
        # fraction of its size); zero borders of a stitched reconstruction otherwise produce
        # spurious peaks tens of pixels away (seen: 69 px on a 192-px canvas).
        # Unreconstructed (zero) pixels are set to the mean so that their edge is no feature to
        # align.
        empty = np.abs(rough) == 0
        if empty.any() and not empty.all():
            rough = np.where(empty, rough[~empty].mean(), rough)
        shift = register_shift(truth, rough,
                               max_shift=max(2.0, min(recon.shape) / 16))
        # The truth moves, by -shift, not the recon: the scored image is never interpolated.
        # An unreconstructed pixel (amplitude 0) has phase 0 as given, but after a Fourier
        # shift carries rounding noise of random phase; on a stitched network reconstruction
        # with 3 % such pixels that alone took the phase FRC-AUC from 0.43 to 0.35.
        truth = apply_shift(truth, (-shift[0], -shift[1]))
        # apply_shift is periodic: the rows and columns it moved across an edge (10 % or more
        # of a pixel) hold the opposite edge's content, unrelated to the recon there.
        # Capped at a quarter of the image: a larger "shift" is the registration of an image
        # unrelated to the truth, whose scores mean nothing either way; keep something to score.
        wrapped = math.ceil(max(abs(shift[0]), abs(shift[1])) - 0.1)
        crop_applied = max(crop, min(wrapped, min(recon.shape) // 4))
    recon, truth = crop_edges(recon, crop_applied), crop_edges(truth, crop_applied)
    recon = _align(recon, truth, remove_phase_plane)
    # The absolute phase is arbitrary: turn both so that the truth's mean phase is 0, away
    # from the +-pi cut of np.angle (a truth around pi would get 2 pi jumps, shared by the
    # recon, which the FRC rewards as sharp edges and PSNR/SSIM punish).
    turn = _phasor(np.sum(truth * np.abs(truth)))
    recon, truth = recon * turn, truth * turn
    window = tukey_taper(recon.shape, taper_px)
    scores: dict[str, Any] = {}
    curves: dict[str, FRCResult] = {}
    parts = {"amplitude": (np.abs(recon), np.abs(truth)),
             "phase": (np.angle(recon), np.angle(truth))}
    for part, (r, t) in parts.items():
        # Taper around the mean so the window adds no strong low-frequency structure.
        curves[part] = frc((r - r.mean()) * window, (t - t.mean()) * window)
        scores.update(_part_scores(part, r, t, curves[part], snr, defined[part]))
    scores["resolution_phase_half_bit"] = _if_defined(
        defined["phase"], lambda: frc_resolution(curves["phase"], HALF_BIT))
    scores["nrmse"] = nrmse(recon, truth)
    scores.update(
        registered=bool(register),
        shift=shift,
        frc_phase=curves["phase"],
        frc_amplitude=curves["amplitude"],
        threshold=frc_threshold(curves["phase"], snr),
        threshold_half_bit=frc_threshold(curves["phase"], HALF_BIT),
        recon=recon,
        truth=truth,
        settings={"crop": crop, "taper_px": taper_px, "register": register,
                  "remove_phase_plane": remove_phase_plane, "snr": snr,
                  "registered": bool(register), "shift": shift, "crop_applied": crop_applied},
    )
    return scores


def _align(recon: np.ndarray, truth: np.ndarray, plane: bool) -> np.ndarray:
    recon = align_global_phase(recon, truth)
    return _remove_phase_plane(recon, truth) if plane else recon


def _phasor(value: complex) -> complex:
    """exp(-1j * angle(value)), or 1 for 0."""
    return np.conj(value) / abs(value) if abs(value) > 0 else 1.0


def _defined_parts(truth: np.ndarray) -> dict[str, bool]:
    """Whether the truth's amplitude and phase vary beyond rounding of its own dtype.

    A complex64 pure-phase object has |truth| = 1 +- 1e-7: no amplitude contrast, whose
    scores would be noise. The tolerance is a thousand rounding steps of the input's precision.
    """
    truth = np.asarray(truth)
    eps = np.finfo(truth.dtype).eps if truth.dtype.kind in "fc" else np.finfo(float).eps
    amplitude = np.abs(truth)
    scale = max(float(amplitude.max()), 1e-300)
    phase = np.angle(truth * _phasor(np.sum(truth * amplitude)))
    lit = amplitude > 1e3 * eps * scale  # the phase of a zero pixel is no content
    return {"amplitude": bool(np.ptp(amplitude) > 1e3 * eps * scale),
            "phase": bool(lit.any() and np.ptp(phase[lit]) > 1e3 * eps * np.pi)}


def _if_defined(defined: bool, score) -> float:
    """``score()``, or NaN where the truth part is constant (FRC, PSNR, SSIM undefined)."""
    return float(score()) if defined else float("nan")


def _part_scores(part: str, recon: np.ndarray, truth: np.ndarray, curve: FRCResult,
                 snr: float, defined: bool) -> dict[str, float]:
    scores = {frc_auc_key(c, part): _if_defined(defined, lambda c=c: frc_auc(curve, c))
              for c in AUC_CUTOFFS}
    scores[f"resolution_{part}"] = _if_defined(defined, lambda: frc_resolution(curve, snr))
    scores[f"psnr_{part}"] = _if_defined(defined, lambda: psnr(recon, truth))
    try:
        scores[f"ssim_{part}"] = _if_defined(defined, lambda: ssim(recon, truth))
    except InvalidInputError:  # image smaller than the SSIM window
        scores[f"ssim_{part}"] = float("nan")
    return scores
