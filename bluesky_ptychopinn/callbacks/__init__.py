"""Bluesky callbacks: live reconstruction of ptychography runs into derived runs."""

from ._frames import FramePairer
from ._live import RECONSTRUCTION_PLAN_NAME, LiveReconstruction, RunState
from ._plot import LiveReconstructionPlot

__all__ = ["RECONSTRUCTION_PLAN_NAME", "FramePairer", "LiveReconstruction",
           "LiveReconstructionPlot", "RunState"]
