"""Simulated beamline devices (ophyd v1): a sample stage and a ptychography detector that writes
HDF5 frames with StreamResource/StreamDatum documents like a real area detector."""

from ._beamline import BUILTIN_SAMPLES, SampleStage, SimBeamline, sim_beamline
from ._detector import HDF5_DATASET, PtychoDetector

__all__ = [
    "BUILTIN_SAMPLES",
    "HDF5_DATASET",
    "PtychoDetector",
    "SampleStage",
    "SimBeamline",
    "sim_beamline",
]
