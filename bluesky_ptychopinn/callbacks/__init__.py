"""Bluesky callbacks: live reconstruction of ptychography runs into derived runs."""

from ._frames import FramePairer
from ._live import RECONSTRUCTION_PLAN_NAME, LiveReconstruction, RunState

__all__ = ["RECONSTRUCTION_PLAN_NAME", "FramePairer", "LiveReconstruction", "RunState"]
