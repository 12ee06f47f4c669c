"""Image-quality metrics for ptychographic reconstructions.

FRC with ring binning, 1/2-bit and SNRt threshold curves, resolution and FRC-AUC (always
labelled with its cutoff); preprocessing of complex objects (global phase, weighted phase
plane, sub-pixel registration, Tukey taper, edge crop); PSNR, SSIM and NRMSE; and
:func:`compare_objects`, which runs the paper's comparison in one call.

Examples
--------
>>> import numpy as np
>>> from bluesky_ptychopinn.metrics import compare_objects
>>> rng = np.random.default_rng(0)
>>> truth = np.exp(1j * rng.uniform(-1, 1, (64, 64)))
>>> round(compare_objects(truth * np.exp(0.3j), truth, taper_px=8)["frc_auc_0.5_phase"], 3)
1.0
"""

from ._compare import compare_objects
from ._frc import (
    HALF_BIT,
    SUSTAINED_RINGS,
    FRCResult,
    frc,
    frc_auc,
    frc_auc_key,
    frc_resolution,
    frc_threshold,
)
from ._image import nrmse, psnr, ssim
from ._preprocess import (
    align_global_phase,
    apply_shift,
    covered_box,
    crop_edges,
    fit_phase_plane,
    register_shift,
    remove_phase_plane,
    tukey_taper,
)

__all__ = [
    "HALF_BIT",
    "SUSTAINED_RINGS",
    "FRCResult",
    "align_global_phase",
    "apply_shift",
    "compare_objects",
    "covered_box",
    "crop_edges",
    "fit_phase_plane",
    "frc",
    "frc_auc",
    "frc_auc_key",
    "frc_resolution",
    "frc_threshold",
    "nrmse",
    "psnr",
    "register_shift",
    "remove_phase_plane",
    "ssim",
    "tukey_taper",
]
