"""The simulated beamline: a sample stage, a ptychography detector and the hidden truth."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from ophyd import Component as Cpt
from ophyd import Device
from ophyd.sim import SynAxis

from ..errors import InvalidInputError
from ..physics import ExperimentGeometry, make_probe
from ._detector import PtychoDetector

__all__ = ["SampleStage", "SimBeamline", "sim_beamline", "BUILTIN_SAMPLES"]

#: Samples the simulated beamline can mount (see :mod:`bluesky_ptychopinn.synthetic`).
BUILTIN_SAMPLES = ("siemens_star", "test_chip", "cells", "quadrant_features")


class LimitedAxis(SynAxis):
    """A simulated motor in metres that refuses moves outside its limits, like a real one."""

    def __init__(self, *, limits: tuple[float, float] = (-1e-3, 1e-3), **kwargs) -> None:
        super().__init__(egu="m", precision=9, **kwargs)
        self._limits = tuple(float(v) for v in limits)

    @property
    def limits(self) -> tuple[float, float]:
        return self._limits

    def set(self, value, **kwargs):
        lo, hi = self._limits
        if not lo <= float(value) <= hi:
            raise ValueError(f"{self.name}: {value!r} m is outside the limits [{lo}, {hi}] m")
        return super().set(value, **kwargs)


class SampleStage(Device):
    """Two-axis sample stage (y = rows, x = columns), positions in metres."""

    y = Cpt(LimitedAxis, name="y", kind="hinted")
    x = Cpt(LimitedAxis, name="x", kind="hinted")

    def set_limits(self, limits_m: tuple[float, float]) -> None:
        self.y._limits = self.x._limits = tuple(float(v) for v in limits_m)


@dataclass
class SimBeamline:
    """What :func:`sim_beamline` returns: devices plus the hidden truth (for scoring)."""

    stage: SampleStage
    detector: PtychoDetector
    sample: np.ndarray
    probe: np.ndarray
    geometry: ExperimentGeometry
    sample_name: str
    probe_name: str | None = None

    @property
    def pixel_size_m(self) -> float:
        return self.geometry.object_pixel_size_m

    @property
    def field_of_view_m(self) -> tuple[float, float]:
        """Stage range (y, x) that keeps the whole probe on the sample."""
        h, w = self.sample.shape
        n = self.geometry.frame_size
        return ((h - n - 4) * self.pixel_size_m, (w - n - 4) * self.pixel_size_m)

    def ptycho_metadata(self, probe_reference: str | None = None) -> dict:
        """The ``ptycho`` start-document dictionary for scans on this beamline.

        ``probe_reference`` defaults to the probe model's name (how a beamline refers to its
        calibrated probe), or ``"unknown"`` for a probe given as an array.
        """
        if probe_reference is None:
            probe_reference = self.probe_name or "unknown"
        return {
            "energy_ev": self.geometry.energy_ev,
            "detector_distance_m": self.geometry.detector_distance_m,
            "detector_pixel_size_m": self.geometry.detector_pixel_size_m,
            "detector_key": self.detector.image_key,
            "positioner_keys": {"y": self.stage.y.name, "x": self.stage.x.name},
            "position_units": "m",
            "position_sign": 1,
            "dc_position": "center",
            "frame_size": self.geometry.frame_size,
            "probe": {"reference": probe_reference, "modes": int(self.probe.shape[0])},
        }


def sim_beamline(
    sample: str | np.ndarray = "siemens_star",
    *,
    probe: str | np.ndarray = "zone_plate",
    sample_shape: tuple[int, int] = (256, 256),
    geometry: ExperimentGeometry | None = None,
    photon_flux: float = 1e8,
    exposure_s: float = 0.005,
    write_path: str | Path | None = None,
    seed: int = 0,
    name_prefix: str = "",
) -> SimBeamline:
    """Build a simulated ptychography beamline.

    Parameters
    ----------
    sample : str or numpy.ndarray
        A built-in sample name (:data:`BUILTIN_SAMPLES`, or any object class) or a complex array.
    probe : str or numpy.ndarray
        A probe model name or an (M, N, N) probe at the geometry's object pixel size.
    sample_shape : (int, int)
        Object canvas for named samples.
    geometry : ExperimentGeometry, optional
        Energy, distance, detector pixel and frame size (default: 8.8 keV, 1.5 m, 75 um, 64 px).
    photon_flux : float
        Photons per second on the sample; frames hold ``photon_flux * exposure`` photons.
    exposure_s : float
        Default exposure time.
    write_path : path, optional
        Directory for the detector's HDF5 files; ``None`` = inline images.
    seed : int
        Sample and noise seed.

    Returns
    -------
    SimBeamline
        ``stage`` and ``detector`` (real ophyd devices) and the hidden ``sample`` and ``probe``.

    Examples
    --------
    >>> bl = sim_beamline("cells")
    >>> bl.detector.image_key, bl.sample.shape
    ('det_image', (256, 256))
    """
    from ..synthetic import make_object

    geometry = geometry or ExperimentGeometry()
    dx = geometry.object_pixel_size_m
    if isinstance(sample, str):
        name = sample
        obj = make_object(sample, sample_shape, seed=seed)
    else:
        name = "custom"
        obj = np.asarray(sample, dtype=np.complex64)
        if obj.ndim != 2:
            raise InvalidInputError(f"sample: expected a complex (H, W) array, got {obj.shape}")
    if isinstance(probe, str):
        probe_arr = make_probe(probe, geometry.frame_size, dx, geometry.energy_ev)
    else:
        probe_arr = np.asarray(probe, dtype=np.complex64)
        probe_arr = probe_arr[None] if probe_arr.ndim == 2 else probe_arr
        if probe_arr.shape[-1] != geometry.frame_size:
            raise InvalidInputError(
                f"probe: expected {geometry.frame_size} x {geometry.frame_size}, "
                f"got {probe_arr.shape}"
            )
    stage = SampleStage(name=f"{name_prefix}stage")
    half = [(s - geometry.frame_size - 4) / 2 * dx for s in obj.shape]
    stage.set_limits((-min(half), min(half)))
    detector = PtychoDetector(
        name=f"{name_prefix}det", stage=stage, sample=obj, probe=probe_arr, pixel_size_m=dx,
        photon_flux=photon_flux, write_path=write_path, seed=seed,
    )
    detector.exposure_time.put(exposure_s)
    return SimBeamline(stage=stage, detector=detector, sample=obj, probe=probe_arr,
                       geometry=geometry, sample_name=name,
                       probe_name=probe if isinstance(probe, str) else None)
