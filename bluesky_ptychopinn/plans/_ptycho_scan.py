"""``ptycho_scan``: one raw run over a scan pattern, with complete ``ptycho`` metadata."""

from __future__ import annotations

import numpy as np
from bluesky import plan_stubs as bps
from bluesky import preprocessors as bpp

from ..errors import InvalidInputError
from ..metadata import PtychoMetadata
from ..physics import scan_pattern
from ._metadata import ptycho_metadata

__all__ = ["ptycho_scan", "scan_points"]


def scan_points(
    pattern: str,
    extent_m,
    *,
    center_m=(0.0, 0.0),
    step_m: float | None = None,
    overlap: float | None = None,
    probe_diameter_m: float | None = None,
    seed: int = 0,
) -> np.ndarray:
    """(n, 2) stage positions (y, x) in metres for a named pattern around ``center_m``."""
    pos = scan_pattern(pattern, extent_m, step=step_m, overlap=overlap,
                       probe_diameter=probe_diameter_m, seed=seed)
    return pos + np.asarray(center_m, dtype=float)


def to_stage_units(points_m: np.ndarray, ptycho: dict) -> np.ndarray:
    """Scan points (metres, as every plan argument is) in the stage's own ``position_units``.

    The callback multiplies the readings by ``position_scale_m`` on the way back in, so a
    stage in micrometres must be sent micrometres: sending metres would scan a region 10^6
    times too small.
    """
    return np.asarray(points_m, dtype=float) / PtychoMetadata.parse(ptycho).position_scale_m


def _check_limits(stage, points: np.ndarray, units: str = "m") -> None:
    """Refuse points (in the stage's ``units``) outside a positioner's soft limits."""
    for axis, column in ((stage.y, 0), (stage.x, 1)):
        limits = getattr(axis, "limits", None)
        if limits and limits[0] < limits[1]:
            lo, hi = limits
            bad = (points[:, column] < lo) | (points[:, column] > hi)
            if bad.any():
                raise InvalidInputError(
                    f"{int(bad.sum())} scan point(s) outside {axis.name} limits [{lo}, {hi}] "
                    f"{units} (e.g. {points[bad][0].tolist()} {units}); reduce extent_m or "
                    "move center_m"
                )


def ptycho_scan(
    detector,
    stage,
    *,
    geometry: dict,
    pattern: str = "fermat",
    extent_m=(2e-6, 2e-6),
    center_m=(0.0, 0.0),
    step_m: float | None = None,
    overlap: float | None = None,
    probe_diameter_m: float | None = None,
    exposure_s: float | None = None,
    md: dict | None = None,
):
    """Ptychography scan: move the sample stage through a pattern, one frame per point.

    Parameters
    ----------
    detector : ophyd device
        Area detector (its image field is ``detector.image_key`` or ``<name>_image``).
    stage : ophyd device
        With ``y`` and ``x`` positioners, in metres or in ``geometry["position_units"]``
        (the points, given in metres here, are converted).
    geometry : dict
        ``energy_ev``, ``detector_distance_m``, ``detector_pixel_size_m`` (+ optional probe
        reference, ``frame_size``...); e.g. ``SimBeamline.ptycho_metadata()``.
    pattern : str
        ``"fermat"``, ``"raster"``, ``"jittered_raster"`` or ``"concentric"``.
    extent_m, center_m : (float, float)
        Scanned region (y, x) in metres.
    step_m, overlap, probe_diameter_m : float
        The step, or an overlap ratio with the probe diameter.
    exposure_s : float, optional
        Sets ``detector.exposure_time`` first (if the detector has one).
    md : dict, optional
        Extra start-document metadata.

    Yields
    ------
    Msg
        Bluesky messages; returns the run uid.

    Examples
    --------
    >>> RE(ptycho_scan(det, stage, geometry=bl.ptycho_metadata(), extent_m=(2e-6, 2e-6),
    ...                step_m=0.2e-6))                       # doctest: +SKIP
    """
    points_m = scan_points(pattern, extent_m, center_m=center_m, step_m=step_m,
                           overlap=overlap, probe_diameter_m=probe_diameter_m)
    if "ptycho" in (md or {}):
        raise InvalidInputError("md: 'ptycho' is written by the plan from geometry; pass "
                                "those fields in geometry instead")
    scan = {"pattern": pattern, "extent_m": list(np.broadcast_to(extent_m, (2,)).astype(float)),
            "center_m": list(map(float, center_m)), "step_m": step_m, "overlap": overlap,
            "num_points": len(points_m)}
    ptycho = ptycho_metadata(detector, stage, geometry, scan)
    points = to_stage_units(points_m, ptycho)
    _check_limits(stage, points, ptycho["position_units"])
    _md = {
        "plan_name": "ptycho_scan",
        "detectors": [detector.name],
        "motors": [stage.y.name, stage.x.name],
        "num_points": len(points),
        "ptycho": ptycho,
        **(md or {}),
    }

    @bpp.stage_decorator([detector, stage])
    @bpp.run_decorator(md=_md)
    def inner():
        if exposure_s is not None and hasattr(detector, "exposure_time"):
            yield from bps.mv(detector.exposure_time, exposure_s)
        for y, x in points:
            yield from bps.mv(stage.y, float(y), stage.x, float(x))
            yield from bps.trigger_and_read([detector, stage])

    return (yield from inner())
