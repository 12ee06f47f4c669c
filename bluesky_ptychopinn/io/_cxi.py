"""CXI (cxidb 1.6 / NXcxi_ptycho) reading and writing, SI units, energy in joules on disk.

Our translation convention: ``/entry_1/sample_1/geometry_1/translation`` holds (x, y, z) in
metres of the probe centre on the sample; object pixel = translation / pixel size + origin,
with the origin stored as the attribute ``origin_px`` when we wrote the file, else chosen so
that the lowest position sits N/2 + 1 pixels inside the object.
"""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

import h5py
import numpy as np

from ..errors import FileFormatError
from ..physics import object_pixel_size_m, pixels_to_stage, stage_to_pixels
from ._checks import require
from ._dataset import PtychoDataset

__all__ = ["read_cxi", "write_cxi", "EV_TO_J"]

EV_TO_J = 1.602176634e-19
DET = "/entry_1/instrument_1/detector_1"


def _open(path: Path) -> h5py.File:
    try:
        return h5py.File(path, "r")
    except OSError as exc:
        raise FileFormatError(path, "", f"not a readable HDF5/CXI file ({exc})") from exc


def read_cxi(path: str | Path, *, dc_position: str = "auto") -> PtychoDataset:
    """Read a CXI file.

    Parameters
    ----------
    dc_position : {"auto", "center", "corner"}
        Where the frames' zero frequency is. ``"auto"`` reads the ``dc_position`` attribute of
        the data (written by us), else assumes the centre. Corner frames are fftshifted and
        the conversion recorded in ``metadata["conversions"]``.
    """
    path = Path(path)
    with _open(path) as f:
        conversions = []
        frames = require(f, f"{DET}/data", path, ndim=3, kind="uif")
        if dc_position == "auto":
            attr = f[f"{DET}/data"].attrs.get("dc_position", "center")
            dc_position = attr.decode() if isinstance(attr, bytes) else str(attr)
        if dc_position == "corner":
            frames = np.fft.fftshift(frames, axes=(-2, -1))
            conversions.append("frames had DC at the corner: fftshifted to the centre")
        elif dc_position != "center":
            raise FileFormatError(path, f"{DET}/data", f"dc_position {dc_position!r} unknown")
        distance = float(require(f, f"{DET}/distance", path))
        px = float(require(f, f"{DET}/x_pixel_size", path))
        energy_j = float(require(f, "/entry_1/instrument_1/source_1/energy", path))
        energy_ev = energy_j / EV_TO_J
        conversions.append("energy converted from joules to eV")
        translation = require(f, "/entry_1/sample_1/geometry_1/translation", path, ndim=2,
                              kind="f")
        if translation.shape[1] != 3 and translation.shape[0] == 3:
            translation = translation.T  # PyNX writes (3, n)
            conversions.append("translation was (3, n): transposed")
        if translation.shape[1] != 3:
            raise FileFormatError(path, "/entry_1/sample_1/geometry_1/translation",
                                  f"expected (n, 3) or (3, n), got {translation.shape}")
        if len(translation) != len(frames):
            raise FileFormatError(path, "/entry_1/sample_1/geometry_1/translation",
                                  f"{len(translation)} positions for {len(frames)} frames "
                                  "(inconsistent lengths)")
        n = frames.shape[-1]
        dx = object_pixel_size_m(energy_ev, distance, px, n)
        yx_m = translation[:, [1, 0]]
        origin = f["/entry_1/sample_1/geometry_1/translation"].attrs.get("origin_px")
        if origin is None:
            origin = n / 2 + 1 - stage_to_pixels(yx_m, dx).min(axis=0)
            conversions.append(f"positions shifted so the lowest is {n / 2 + 1} px inside")
        positions = stage_to_pixels(yx_m, dx, origin_px=tuple(np.asarray(origin, float)))
        mask = None
        if f"{DET}/mask" in f:
            bits = np.asarray(f[f"{DET}/mask"][()])
            mask = (bits & 0x1) == 0
        probe = None
        for key in ("/entry_1/image_1/data", "/entry_1/instrument_1/source_1/illumination"):
            if key in f:
                probe = np.asarray(f[key][()])
                break
        if probe is None:
            raise FileFormatError(path, "/entry_1/image_1/data", "missing probe (also looked "
                                  "for /entry_1/instrument_1/source_1/illumination)")
        while probe.ndim > 3:
            probe = probe[0]
        obj = None
        if "/entry_1/image_2/data" in f:
            obj = np.asarray(f["/entry_1/image_2/data"][()])
            obj = obj[0] if obj.ndim == 3 else obj
        ds = PtychoDataset(
            diffraction=frames, positions_px=positions, probe=probe.astype(np.complex64),
            energy_ev=energy_ev, detector_distance_m=distance, detector_pixel_size_m=px,
            mask=mask, object=None if obj is None else obj.astype(np.complex64),
            metadata={"source": str(path), "format": "cxi", "conversions": conversions},
        )
    return ds.validate(path)


def write_cxi(ds: PtychoDataset, path: str | Path, *, program: str = "bluesky-ptychopinn"
              ) -> Path:
    """Write ``ds`` as CXI (frames chunked one per frame, gzip; energy in joules)."""
    ds.validate(path)
    ds.require_geometry()
    path = Path(path)
    n = ds.frame_size
    dx = ds.object_pixel_size_m
    origin = np.zeros(2)
    yx_m = pixels_to_stage(ds.positions_px, dx, origin_px=tuple(origin))
    with h5py.File(path, "w") as f:
        f["cxi_version"] = 160
        det = f.create_group(DET)
        data = det.create_dataset("data", data=np.asarray(ds.diffraction), chunks=(1, n, n),
                                  compression="gzip")
        data.attrs["dc_position"] = "center"
        det["distance"] = ds.detector_distance_m
        det["x_pixel_size"] = ds.detector_pixel_size_m
        det["y_pixel_size"] = ds.detector_pixel_size_m
        if ds.mask is not None:
            det["mask"] = np.where(np.asarray(ds.mask, bool), 0, 1).astype(np.uint32)
        f["/entry_1/instrument_1/source_1/energy"] = ds.energy_ev * EV_TO_J
        f["/entry_1/data_1/data"] = h5py.SoftLink(f"{DET}/data")
        translation = np.stack([yx_m[:, 1], yx_m[:, 0], np.zeros(len(yx_m))], axis=1)
        tr = f.create_dataset("/entry_1/sample_1/geometry_1/translation", data=translation)
        tr.attrs["origin_px"] = origin
        tr.attrs["units"] = "m"
        det["translation"] = h5py.SoftLink("/entry_1/sample_1/geometry_1/translation")
        probe = f.create_dataset("/entry_1/image_1/data", data=ds.probe[None])
        probe.attrs["axes"] = "coherent:incoherent:y:x"
        f["/entry_1/image_1/data_space"] = "real"
        if ds.object is not None:
            obj = f.create_dataset("/entry_1/image_2/data", data=np.asarray(ds.object)[None])
            obj.attrs["axes"] = "layer:y:x"
            f["/entry_1/image_2/x_pixel_size"] = dx
            f["/entry_1/image_2/y_pixel_size"] = dx
        proc = f.create_group("/entry_1/process_1")
        proc["program"] = program
        from .. import __version__

        proc["version"] = __version__
        proc["date"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        proc["command"] = "write_cxi"
    return path
