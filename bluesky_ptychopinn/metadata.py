"""The ``ptycho`` dictionary of a raw scan's start document, parsed and validated in one place.

Plans and simulated beamlines write it with :meth:`PtychoMetadata.to_document`; the live
callback reads it with :meth:`PtychoMetadata.from_start`, once, at the start document, so that
a scan with a missing or malformed field fails its derived run at once with a message naming
the field (not later, as a ``KeyError`` deep in the reconstruction). See docs/conventions.md.

Examples
--------
>>> from bluesky_ptychopinn.metadata import PtychoMetadata
>>> md = PtychoMetadata(detector_key="det_image", positioner_keys={"y": "sy", "x": "sx"},
...                     energy_ev=8800, detector_distance_m=2.0, detector_pixel_size_m=75e-6,
...                     position_units="um")
>>> md.position_scale_m
1e-06
>>> PtychoMetadata.from_start({"uid": "u", "ptycho": md.to_document()}) == md
True
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, PositiveInt, ValidationError

from .errors import InvalidInputError

__all__ = ["InvalidMetadataError", "PositionerKeys", "PtychoMetadata", "POSITION_UNITS"]

#: Metres per unit of each accepted ``position_units``.
POSITION_UNITS = {"m": 1.0, "mm": 1e-3, "um": 1e-6, "nm": 1e-9}


class InvalidMetadataError(InvalidInputError):
    """The start document's ``ptycho`` dictionary is missing a field or has a wrong one."""


class PositionerKeys(BaseModel):
    """Event data keys of the stage readings (docs/conventions.md: y first, then x; other axes a
    beamline records are kept but not used)."""

    model_config = ConfigDict(extra="allow")

    y: str = Field(min_length=1)
    x: str = Field(min_length=1)


class PtychoMetadata(BaseModel):
    """What a ptychography scan tells its reconstruction.

    Attributes
    ----------
    detector_key : str
        Event data key of the diffraction image.
    positioner_keys : PositionerKeys
        Event data keys of the stage readings.
    energy_ev, detector_distance_m, detector_pixel_size_m : float
        The geometry (eV, metres).
    position_units : {"m", "mm", "um", "nm"}
        Units of the stage readings in the events; converted to metres at the boundary.
    position_sign : {1, -1}
        Sign between stage motion and the probe's motion over the sample.
    dc_position : {"center", "corner"}
        Where the zero frequency sits in the frames.
    frame_size : int, optional
        Detector frame size in pixels (default: the model's).
    probe : dict or str, optional
        The probe reference (probe-library name, probe model name, file, inline array).
    scan : dict
        The scan description (pattern, step, extent, centre, points).

    Unknown keys are kept (a beamline may add its own) and written back unchanged.
    """

    model_config = ConfigDict(extra="allow")

    detector_key: str = Field(min_length=1)
    positioner_keys: PositionerKeys
    # Finite as well as positive: an infinite energy or distance passed PositiveFloat and
    # failed only later, in the geometry, not at the start document.
    energy_ev: float = Field(gt=0, allow_inf_nan=False)
    detector_distance_m: float = Field(gt=0, allow_inf_nan=False)
    detector_pixel_size_m: float = Field(gt=0, allow_inf_nan=False)
    position_units: Literal["m", "mm", "um", "nm"] = "m"
    position_sign: Literal[1, -1] = 1
    dc_position: Literal["center", "corner"] = "center"
    frame_size: PositiveInt | None = None
    probe: dict | str | None = None
    scan: dict = Field(default_factory=dict)

    @property
    def position_scale_m(self) -> float:
        """Metres per unit of the stage readings."""
        return POSITION_UNITS[self.position_units]

    def to_document(self) -> dict:
        """The plain dictionary for a start document (``None`` fields left out)."""
        return self.model_dump(exclude_none=True)

    @classmethod
    def parse(cls, value) -> PtychoMetadata:
        """Validate a ``ptycho`` dictionary; :class:`InvalidMetadataError` names each bad
        field and says what was expected."""
        if isinstance(value, cls):
            return value
        if not isinstance(value, dict):
            raise InvalidMetadataError(
                f"ptycho: expected a dictionary of scan metadata, got {type(value).__name__} "
                f"{value!r:.60}")
        try:
            return cls.model_validate(value)
        except ValidationError as exc:
            problems = []
            for error in exc.errors():
                field = ".".join(str(p) for p in error["loc"])
                problems.append(f"ptycho.{field}: {error['msg']}")
            raise InvalidMetadataError("; ".join(problems)) from None

    @classmethod
    def from_start(cls, start: dict, *, detector_key: str | None = None,
                   positioner_keys: dict | None = None) -> PtychoMetadata | None:
        """The metadata of a raw run, or ``None`` for a run that is not a ptychography scan
        (no ``ptycho`` entry and no overrides).

        Parameters
        ----------
        start : dict
            The start document.
        detector_key, positioner_keys : optional
            Overrides (``LiveReconstruction(image_key=..., positioner_keys=...)``), applied
            only to runs that carry ``ptycho`` metadata: an override alone does not make every
            run of a session a ptychography scan.

        Raises
        ------
        InvalidMetadataError
            The run declares ``ptycho`` metadata but a field is missing or wrong.
        """
        if "ptycho" not in start:
            return None
        raw = start["ptycho"]
        if isinstance(raw, dict):
            raw = dict(raw)
            if detector_key:
                raw["detector_key"] = detector_key
            if positioner_keys:
                raw["positioner_keys"] = positioner_keys
        return cls.parse(raw)
