"""Reconstruction engines.

Iterative baselines (ePIE, rPIE) that the neural-network reconstruction is measured against:

>>> from bluesky_ptychopinn.recon import PIEOptions, pie_reconstruct  # doctest: +SKIP
"""

from __future__ import annotations

from ._momentum import PassAcceleration, PassMomentum, probe_change
from ._options import MOMENTUM_MODES, PIE_ENGINES, PIEOptions, PIEResult
from ._pie import pie_reconstruct, recentre_probe
from ._positions import position_shifts
from ._refiner import RefinedSnapshot, StreamingRefiner, probe_from_frames
from ._refiner_thread import RefinerThread
from ._residual import amplitude_residual
from ._schedule import StepSchedule
from ._streaming import Snapshot, StreamingReconstructor, stitch_window

__all__ = [
    "MOMENTUM_MODES",
    "PIE_ENGINES",
    "PassAcceleration",
    "PassMomentum",
    "probe_change",
    "PIEOptions",
    "PIEResult",
    "pie_reconstruct",
    "amplitude_residual",
    "probe_from_frames",
    "position_shifts",
    "RefinedSnapshot",
    "RefinerThread",
    "StepSchedule",
    "StreamingRefiner",
    "recentre_probe",
    "Snapshot",
    "StreamingReconstructor",
    "stitch_window",
]
