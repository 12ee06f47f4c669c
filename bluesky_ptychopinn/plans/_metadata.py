"""The ``ptycho`` start-document dictionary every plan writes (docs/conventions.md)."""

from __future__ import annotations

from ..errors import InvalidInputError
from ..metadata import PtychoMetadata

REQUIRED = ("energy_ev", "detector_distance_m", "detector_pixel_size_m")


def image_key(detector) -> str:
    """The detector's image field (``image_key`` attribute, else ``<name>_image``)."""
    return getattr(detector, "image_key", f"{detector.name}_image")


def ptycho_metadata(detector, stage, geometry: dict, scan: dict) -> dict:
    """Merge beamline geometry, device field names and the scan description.

    ``geometry`` must hold energy_ev, detector_distance_m and detector_pixel_size_m (SI, eV);
    anything else in it (probe reference, dc_position, frame_size ...) is kept. The result is
    validated by :class:`~bluesky_ptychopinn.metadata.PtychoMetadata`, the same type the live
    callback reads it with, so a plan cannot write what the reconstruction would refuse.
    """
    missing = [k for k in REQUIRED if k not in geometry]
    if missing:
        raise InvalidInputError(f"geometry: missing {missing}; a ptycho scan needs {REQUIRED}")
    md = {
        "detector_key": image_key(detector),
        "positioner_keys": {"y": stage.y.name, "x": stage.x.name},
        "position_units": "m",
        "position_sign": 1,
        "dc_position": "center",
        **geometry,
        "scan": scan,
    }
    return PtychoMetadata.parse(md).to_document()
