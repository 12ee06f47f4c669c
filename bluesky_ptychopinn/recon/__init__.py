"""Reconstruction engines.

Iterative baselines (ePIE, rPIE) that the neural-network reconstruction is measured against:

>>> from bluesky_ptychopinn.recon import PIEOptions, pie_reconstruct  # doctest: +SKIP
"""

from __future__ import annotations

from ._options import PIE_ENGINES, PIEOptions, PIEResult
from ._pie import pie_reconstruct
from ._streaming import Snapshot, StreamingReconstructor, stitch_window

__all__ = [
    "PIE_ENGINES",
    "PIEOptions",
    "PIEResult",
    "pie_reconstruct",
    "Snapshot",
    "StreamingReconstructor",
    "stitch_window",
]
