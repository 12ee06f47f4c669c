"""CXI (cxidb 1.6 / NeXus NXcxi_ptycho) reading and writing: SI units, energy in joules on disk.

Layout (what we write, and what we read):

- ``/cxi_version`` = 160.
- ``/entry_1/instrument_1/detector_1/data`` (n, N, N) intensities, one chunk per frame, gzip;
  attribute ``dc_position`` ("center" or "corner"); ``distance``, ``x_pixel_size``,
  ``y_pixel_size`` (m); ``mask`` uint32 bit field (bit 0x1 = invalid pixel; ours: True = valid).
- ``/entry_1/data_1/data``: soft link to the detector data (read when it is the only copy).
- On reading, a length's ``units`` attribute (m, mm, um, nm) is honoured; without one it is
  metres, and distances and pixel sizes outside plausible ranges are refused.
- ``/entry_1/instrument_1/source_1/energy``: photon energy in **joules** (1 eV = 1.602176634e-19 J).
- ``/entry_1/sample_1/geometry_1/translation`` (n, 3) x, y, z in metres ((3, n) accepted on
  reading, as PyNX writes it). Our convention: translation (x, y) is the sample-stage position,
  which is the probe centre on the object (sign +1), y along object rows. Metres become object
  pixels through :func:`~bluesky_ptychopinn.io.positions_m_to_px`; we store the origin we used
  as the attributes ``object_origin_yx_m`` and ``position_sign`` so a round trip is exact.
- ``/entry_1/image_1/data`` probe (1, M, N, N), axes ``coherent:incoherent:y:x``, with
  ``x_pixel_size``/``y_pixel_size`` = object pixel size (the older
  ``/entry_1/instrument_1/source_1/illumination`` is read too).
- ``/entry_1/image_2/data`` object (1, H, W), axes ``layer:y:x``, with pixel sizes.
- ``/entry_1/process_1/{program, version, date, command}`` provenance; the dataset metadata as
  JSON in the ``/entry_1`` attribute ``bluesky_ptychopinn_metadata``.
"""

from __future__ import annotations

import sys
from datetime import datetime, timezone
from pathlib import Path

import h5py
import numpy as np

from .. import __version__
from ..errors import FileFormatError, InvalidInputError
from ..geometry import (
    DEFAULT_MARGIN_PX,
    EV_TO_J,
    object_pixel_size_m,
    positions_m_to_px,
    positions_px_to_m,
)
from ._checks import (
    COMPLEX,
    POSITIONS_FROM_M,
    REAL,
    has,
    merge_metadata,
    metadata_from_json,
    metadata_to_json,
    nonempty,
    open_hdf5,
    optional,
    replacing,
    require,
    scalar,
    text,
)
from ._dataset import PtychoDataset

__all__ = ["read_cxi", "write_cxi", "read_cxi_probe"]

FORMAT = "cxi"
DETECTOR = "/entry_1/instrument_1/detector_1"
DATA = f"{DETECTOR}/data"
DISTANCE = f"{DETECTOR}/distance"
X_PIXEL = f"{DETECTOR}/x_pixel_size"
Y_PIXEL = f"{DETECTOR}/y_pixel_size"
MASK = f"{DETECTOR}/mask"
ENERGY = "/entry_1/instrument_1/source_1/energy"
TRANSLATION = "/entry_1/sample_1/geometry_1/translation"
PROBE = "/entry_1/image_1/data"
PROBE_LEGACY = "/entry_1/instrument_1/source_1/illumination"
OBJECT = "/entry_1/image_2/data"
PROCESS = "/entry_1/process_1"
METADATA_ATTR = "bluesky_ptychopinn_metadata"
ORIGIN_ATTR = "object_origin_yx_m"
SIGN_ATTR = "position_sign"
#: CXI mask bit of an invalid pixel.
MASK_INVALID = 0x1
#: Bits of the CXI pixel-mask convention (cxidb; condor's PixelMask) that make a pixel unusable:
#: invalid 0x1, saturated 0x2, hot 0x4, dead 0x8, shadowed (beamstop) 0x10, to be ignored 0x40,
#: bad 0x80, missing 0x200. The others (in peak mask, out of resolution, noisy, corrected...)
#: describe a pixel that still measured something.
MASK_UNUSABLE = 0x1 | 0x2 | 0x4 | 0x8 | 0x10 | 0x40 | 0x80 | 0x200
DATA_LINK = "/entry_1/data_1/data"
#: Metres per unit of a length's ``units`` attribute (absent: metres, the CXI unit).
_LENGTH_UNITS = {"m": 1.0, "meter": 1.0, "metre": 1.0, "meters": 1.0, "metres": 1.0,
                 "mm": 1e-3, "um": 1e-6, "µm": 1e-6, "μm": 1e-6, "micron": 1e-6,
                 "microns": 1e-6, "nm": 1e-9}
#: Plausible detector distances and pixel sizes (m): outside, the units are almost surely off.
_DISTANCE_RANGE_M = (1e-4, 1e3)
_PIXEL_RANGE_M = (1e-8, 1e-2)
#: Plausible photon energies in joules (0.6 eV .. 6 MeV): outside, the unit is wrong.
_ENERGY_RANGE_J = (1e-19, 1e-12)
_DC_POSITIONS = ("center", "corner")


def _resolves(f: h5py.File, key: str) -> bool:
    """``key`` names a dataset that can be opened (a soft link whose target was deleted
    is listed but does not resolve)."""
    try:
        return isinstance(f[key], h5py.Dataset)
    except (KeyError, ValueError):
        return False


def _require_cxi(f: h5py.File, path: Path) -> None:
    if "entry_1" in f:
        return
    hint = " (this looks like a ptychodus product: use read_product)" \
        if "probe" in f and "object" in f else ""
    raise FileFormatError(path, "/entry_1", f"missing: not a CXI file{hint}")


def _energy_ev(f: h5py.File, path: Path) -> float:
    joules = scalar(f, ENERGY, path)
    low, high = _ENERGY_RANGE_J
    if not low <= joules <= high:
        hint = " (looks like eV or keV: CXI stores joules)" if joules > high else ""
        raise FileFormatError(path, ENERGY, f"expected a photon energy in joules between {low:g} "
                              f"and {high:g} (8 keV = {8e3 * EV_TO_J:.3e} J), got {joules:g}{hint}")
    return joules / EV_TO_J


def _length_factor(f: h5py.File, key: str, path: Path, conversions: list[str] | None) -> float:
    """Metres per stored unit of the length at ``key`` (its ``units`` attribute)."""
    if not has(f, key) or "units" not in f[key].attrs:
        return 1.0
    unit = text(f[key].attrs["units"]).strip()
    if unit not in _LENGTH_UNITS:
        raise FileFormatError(path, f"{key}@units", f"unknown length unit {unit!r}; expected "
                              f"one of {sorted(set(_LENGTH_UNITS))}")
    factor = _LENGTH_UNITS[unit]
    if factor != 1.0 and conversions is not None:
        conversions.append(f"{key}: {unit} -> m")
    return factor


def _length(f: h5py.File, key: str, path: Path, conversions: list[str] | None,
            plausible: tuple[float, float], *, required: bool = True) -> float | None:
    """A positive length in metres (units attribute honoured), within ``plausible``."""
    value = scalar(f, key, path, required=required)
    if value is None:
        return None
    metres = value * _length_factor(f, key, path, conversions)
    low, high = plausible
    if not low <= metres <= high:
        raise FileFormatError(path, key, f"{metres:g} m is not a plausible value (expected "
                              f"{low:g} to {high:g} m); is its units attribute missing or wrong?")
    return metres


def _detector_pixel(f: h5py.File, path: Path, conversions: list[str] | None = None) -> float:
    px = _length(f, X_PIXEL, path, conversions, _PIXEL_RANGE_M)
    py = _length(f, Y_PIXEL, path, None, _PIXEL_RANGE_M, required=False)
    if py is not None and abs(py - px) > 1e-9 * px:
        raise FileFormatError(path, Y_PIXEL, f"expected square pixels (= x_pixel_size {px:g} m), "
                              f"got {py:g} m")
    return px


def _dc_from_frames(data: h5py.Dataset, max_frames: int = 64) -> str:
    """Where the zero frequency is, from the data: a far-field pattern is brightest around
    it, so the mean of some frames is compared at the centre and at the four corners."""
    sample = np.asarray(data[: min(len(data), max_frames)], dtype=np.float64)
    mean = np.where(np.isfinite(sample), sample, 0).clip(min=0).mean(axis=0)
    n = mean.shape[-1]
    q = max(1, n // 8)
    centre = mean[n // 2 - q: n // 2 + q, n // 2 - q: n // 2 + q].sum()
    corners = (mean[:q, :q].sum() + mean[:q, -q:].sum() + mean[-q:, :q].sum()
               + mean[-q:, -q:].sum())
    return "corner" if corners > 4 * centre else "center"


def _dc_mode(f: h5py.File, path: Path, dc_position: str, conversions: list[str],
             data: str = DATA) -> str:
    if dc_position not in ("auto", *_DC_POSITIONS):
        raise InvalidInputError(f"dc_position: expected 'auto', 'center' or 'corner', got "
                                f"{dc_position!r}")
    if dc_position != "auto":
        return dc_position
    if "dc_position" not in f[data].attrs:
        mode = _dc_from_frames(f[data])
        conversions.append(f"no dc_position attribute: DC found at the {mode} of the mean "
                           "frame")
        return mode
    mode = text(f[data].attrs["dc_position"])
    if mode not in _DC_POSITIONS:
        raise FileFormatError(path, f"{DATA}@dc_position", f"expected 'center' or 'corner', "
                              f"got {mode!r}")
    return mode


def _mask(f: h5py.File, path: Path, mask_bits: int, conversions: list[str],
          frame_shape: tuple[int, int]) -> np.ndarray | None:
    bits = optional(f, MASK, path, ndim=2, kinds="iu")
    if bits is None:
        return None
    if bits.shape != tuple(frame_shape):  # checked here: the mask indexes the frames next
        raise FileFormatError(path, MASK, f"expected shape {tuple(frame_shape)} like a frame, "
                              f"got {bits.shape}")
    valid = (bits.astype(np.int64) & int(mask_bits)) == 0
    if not valid.all():
        conversions.append(f"mask: {int((~valid).sum())} pixel(s) flagged with bits "
                           f"{int(mask_bits):#x} are invalid")
    return valid


def _saturation_marks(frames: np.ndarray, conversions: list[str]) -> np.ndarray | None:
    """Pixels holding an integer type's maximum in some frame (detectors mark gaps, dead and
    overflowing pixels so, e.g. 2^32 - 1), as the live path masks them; None if there are
    none or the frames are floats."""
    if frames.dtype.kind not in "iu":
        return None
    top = np.iinfo(frames.dtype).max
    marked = np.zeros(frames.shape[-2:], dtype=bool)
    for lo in range(0, len(frames), 256):  # a bool per pixel per chunk, not per frame
        marked |= (frames[lo: lo + 256] == top).any(axis=0)
    if not marked.any():
        return None
    conversions.append(f"{int(marked.sum())} pixel(s) holding {top} (the {frames.dtype} "
                       "maximum: a detector marker) masked")
    return marked


def _clear_masked(frames: np.ndarray, mask: np.ndarray | None,
                  conversions: list[str]) -> np.ndarray:
    """Flags at masked pixels (negative or non-finite values, which detectors store there
    and which mean nothing) set to 0; masked pixels never enter a loss (docs/conventions.md),
    so a flag there must not make the file unreadable. Other masked values are kept."""
    if mask is None or mask.all() or frames.dtype.kind == "u":
        return frames
    flagged = frames[:, ~mask]
    odd = flagged < 0
    if flagged.dtype.kind == "f":
        odd |= ~np.isfinite(flagged)
    if not odd.any():
        return frames
    frames[:, ~mask] = np.where(odd, 0, flagged)
    conversions.append(f"{int(odd.sum())} flag value(s) at masked pixels (negative or "
                       "non-finite) set to 0")
    return frames


def _probe(f: h5py.File, path: Path, conversions: list[str]) -> tuple[np.ndarray | None, str]:
    for key in (PROBE, PROBE_LEGACY):
        probe = optional(f, key, path, ndim=(2, 3, 4), kinds=COMPLEX + REAL)
        if probe is None:
            continue
        nonempty(probe, key, path, "probe modes")
        if probe.ndim == 4:  # coherent:incoherent:y:x
            if probe.shape[0] > 1:
                conversions.append(f"probe: kept coherent mode 0 of {probe.shape[0]}")
            probe = probe[0]
        return probe, key
    return None, PROBE


def _object(f: h5py.File, path: Path, conversions: list[str]) -> np.ndarray | None:
    obj = optional(f, OBJECT, path, ndim=(2, 3), kinds=COMPLEX + REAL)
    if obj is not None:
        nonempty(obj, OBJECT, path, "object layer")
    if obj is not None and obj.ndim == 3:  # layer:y:x
        if obj.shape[0] > 1:
            conversions.append(f"object: kept layer 0 of {obj.shape[0]}")
        obj = obj[0]
    return obj


def _object_pixel(f: h5py.File, path: Path,
                  conversions: list[str] | None = None) -> tuple[float | None, str]:
    """The object pixel size stored beside the probe or object image, if any."""
    for group in ("/entry_1/image_1", "/entry_1/image_2"):
        value = _length(f, f"{group}/x_pixel_size", path, conversions, (1e-12, 1e-3),
                        required=False)
        if value is not None:
            return value, f"{group}/x_pixel_size"
    return None, "object_pixel_size_m"


def _translation_yx_m(f: h5py.File, path: Path, n: int, conversions: list[str]) -> np.ndarray:
    translation = require(f, TRANSLATION, path, ndim=2, kinds=REAL,
                          what="(n, 3) x, y, z in metres").astype(np.float64)
    translation *= _length_factor(f, TRANSLATION, path, conversions)
    if translation.shape == (3, 3):
        # Three frames: (n, 3) and PyNX's (3, n) look alike. A scan keeps the sample in one
        # plane, so z is the component that does not change from frame to frame: the last
        # column in the CXI layout (n, 3), the last row in (3, n). The data decides when
        # exactly one of them is constant; otherwise the CXI layout.
        column_z = np.ptp(translation[:, 2]) == 0
        row_z = np.ptp(translation[2, :]) == 0
        if row_z and not column_z:
            translation = translation.T
            conversions.append("translation (3, 3): its last row is constant (z), its last "
                               "column is not: read as (3, n) and transposed")
        else:
            conversions.append("translation (3, 3): read as (n, 3) x, y, z per the CXI layout"
                               + ("" if column_z else " (neither layout has a constant z)"))
    elif translation.shape[1] != 3 and translation.shape[0] == 3:
        translation = translation.T
        conversions.append("translation stored (3, n): transposed to (n, 3)")
    if translation.shape[1] != 3:
        raise FileFormatError(path, TRANSLATION, f"expected (n, 3) or (3, n) x, y, z, got shape "
                              f"{translation.shape}")
    if len(translation) != n:
        raise FileFormatError(path, TRANSLATION, f"inconsistent lengths: {len(translation)} "
                              f"positions for {n} frames")
    if not np.isfinite(translation).all():
        rows = np.flatnonzero(~np.isfinite(translation).all(axis=1))
        raise FileFormatError(path, TRANSLATION, f"non-finite positions at index "
                              f"{rows[:10].tolist()}")
    return translation[:, [1, 0]]


def _stored_origin(f: h5py.File) -> tuple[np.ndarray | None, int | None]:
    attrs = f[TRANSLATION].attrs
    origin = np.asarray(attrs[ORIGIN_ATTR], dtype=np.float64) if ORIGIN_ATTR in attrs else None
    sign = int(attrs[SIGN_ATTR]) if SIGN_ATTR in attrs else None
    return origin, sign


def _provenance(f: h5py.File) -> dict:
    if PROCESS not in f:
        return {}
    group = f[PROCESS]
    return {key: text(group[key][()]) for key in ("program", "version", "date", "command")
            if key in group and isinstance(group[key], h5py.Dataset)}


def read_cxi(
    path: str | Path,
    *,
    dc_position: str = "auto",
    origin_m: tuple[float, float] | None = None,
    sign: int | None = None,
    margin_px: float = DEFAULT_MARGIN_PX,
    mask_bits: int = MASK_UNUSABLE,
    probe: np.ndarray | None = None,
) -> PtychoDataset:
    """Read a CXI file into a validated :class:`PtychoDataset`.

    Parameters
    ----------
    path : str or pathlib.Path
        The CXI (HDF5) file.
    dc_position : {"auto", "center", "corner"}
        Where the frames' zero frequency is. ``"auto"`` reads the data's ``dc_position``
        attribute (we write it), else finds it in the mean of the first frames (brightest at
        the centre or at the corners). Corner frames (and the
        mask) are fftshifted to the centre and the conversion is recorded.
    origin_m : (float, float), optional
        Stage position (y, x) in metres of object pixel (0, 0). Default: the origin stored by
        :func:`write_cxi`, else the lowest position is put ``N/2 + margin_px`` pixels inside
        (see :func:`~bluesky_ptychopinn.io.positions_m_to_px`).
    sign : {+1, -1}, optional
        Stage-to-sample sign; default the stored one, else +1 (translation = probe position).
    margin_px : float
        Margin of the default origin.
    mask_bits : int
        Mask bits that mark a pixel invalid (default :data:`MASK_UNUSABLE`: the CXI bits of
        invalid, saturated, hot, dead, shadowed, ignored, bad and missing pixels). Pixels
        holding an integer type's maximum are masked too, and masked pixels are set to 0.
    probe : numpy.ndarray, optional
        A probe to use when the file holds none (raw beamline data).

    Returns
    -------
    PtychoDataset
        Frames with DC at the centre, positions in object pixels, probe, geometry (energy in
        eV), mask, object; ``metadata["conversions"]`` lists every conversion applied and
        ``metadata["positions_from_m"]`` the object pixel size the translations were
        converted with (a later pixel size correction rescales the positions from it).

    Raises
    ------
    FileFormatError
        Not HDF5, not CXI, or a field missing / of the wrong shape, dtype, units or values; the
        message names the file and the field.

    Examples
    --------
    >>> ds = read_cxi("scan_042.cxi")  # doctest: +SKIP
    >>> ds.energy_ev, ds.diffraction.shape  # doctest: +SKIP
    (8800.0, (1000, 128, 128))
    """
    path = Path(path)
    conversions: list[str] = []
    with open_hdf5(path) as f:
        _require_cxi(f, path)
        data = DATA if _resolves(f, DATA) or not _resolves(f, DATA_LINK) else DATA_LINK
        if data != DATA:
            conversions.append(f"frames read from {DATA_LINK} (no {DATA})")
        frames = require(f, data, path, ndim=3, kinds=REAL, what="(n, N, N) intensities")
        mask = _mask(f, path, mask_bits, conversions, frames.shape[-2:])
        marks = _saturation_marks(frames, conversions)
        if marks is not None:
            mask = ~marks if mask is None else mask & ~marks
        frames = _clear_masked(frames, mask, conversions)
        if _dc_mode(f, path, dc_position, conversions, data) == "corner":
            frames = np.fft.fftshift(frames, axes=(-2, -1))
            mask = None if mask is None else np.fft.fftshift(mask)
            conversions.append("frames had DC at the corner -> fftshifted to (N//2, N//2)"
                               + (" (mask too)" if mask is not None else ""))
        distance = _length(f, DISTANCE, path, conversions, _DISTANCE_RANGE_M)
        pixel = _detector_pixel(f, path, conversions)
        energy_ev = _energy_ev(f, path)
        conversions.append("energy converted from joules to eV")
        file_probe, probe_key = _probe(f, path, conversions)
        if file_probe is None and probe is None:
            raise FileFormatError(path, PROBE, f"missing (also looked for {PROBE_LEGACY}); pass "
                                  "probe= to supply one")
        if file_probe is None:
            conversions.append("probe supplied by the caller (none in the file)")
        obj = _object(f, path, conversions)
        n = frames.shape[-1]
        dx, dx_key = _object_pixel(f, path, conversions)
        if dx is None:
            dx = object_pixel_size_m(energy_ev, distance, pixel, n)
        yx_m = _translation_yx_m(f, path, len(frames), conversions)
        stored_origin, stored_sign = _stored_origin(f)
        origin = origin_m if origin_m is not None else stored_origin
        sign = sign if sign is not None else (stored_sign or 1)
        positions = positions_m_to_px(yx_m, dx, origin, sign, frame_size=n, margin_px=margin_px)
        where = ("origin from the file" if origin_m is None and stored_origin is not None else
                 "origin given" if origin_m is not None else
                 f"origin chosen: lowest position {n / 2 + margin_px:g} px inside")
        conversions.append(f"translation (x, y) m -> positions_px (y, x) with dx = {dx:.6e} m, "
                           f"sign {sign:+d}, {where}")
        # What stays put if dx is corrected later: pixel (0, 0) sits at a fixed stage position,
        # a chosen origin keeps the lowest position N/2 + margin inside.
        anchor = [0.0, 0.0] if origin is not None else [n / 2 + margin_px] * 2
        stored = {}
        if METADATA_ATTR in f["entry_1"].attrs:
            stored = metadata_from_json(f["entry_1"].attrs[METADATA_ATTR], path,
                                        f"/entry_1@{METADATA_ATTR}")
        provenance = _provenance(f)
        if provenance:
            stored["provenance"] = provenance
    ds = PtychoDataset(
        diffraction=frames, positions_px=positions,
        probe=file_probe if file_probe is not None else probe,
        energy_ev=energy_ev, detector_distance_m=distance, detector_pixel_size_m=pixel,
        object_pixel_size_m=dx, mask=mask, object=obj,
        metadata={**merge_metadata(stored, path, FORMAT, conversions),
                  POSITIONS_FROM_M: {"pixel_size_m": dx, "anchor_px": anchor}},
    )
    fields = {"diffraction": DATA, "positions_px": TRANSLATION, "probe": probe_key,
              "mask": MASK, "object": OBJECT, "energy_ev": ENERGY, "detector_distance_m": DISTANCE,
              "detector_pixel_size_m": X_PIXEL, "object_pixel_size_m": dx_key}
    return ds.validate(path, fields)


def read_cxi_probe(path: Path) -> tuple[np.ndarray, dict]:
    """The probe of a CXI file with its pixel size and energy, without reading the frames."""
    conversions: list[str] = []
    with open_hdf5(path) as f:
        _require_cxi(f, path)
        probe, key = _probe(f, path, conversions)
        if probe is None:
            raise FileFormatError(path, PROBE, f"missing (also looked for {PROBE_LEGACY})")
        energy_ev = _energy_ev(f, path) if has(f, ENERGY) else None
        dx, _ = _object_pixel(f, path)
        if dx is None and energy_ev is not None and has(f, DISTANCE) and has(f, X_PIXEL):
            dx = object_pixel_size_m(energy_ev,
                                     _length(f, DISTANCE, path, None, _DISTANCE_RANGE_M),
                                     _detector_pixel(f, path), probe.shape[-1])
    return probe, {"source": str(path), "field": key, "energy_ev": energy_ev, "pixel_size_m": dx}


def _nx_class(group: h5py.Group, name: str) -> h5py.Group:
    group.attrs["NX_class"] = name
    return group


def write_cxi(
    dataset: PtychoDataset,
    path: str | Path,
    *,
    dc_position: str = "center",
    compression: str | None = "gzip",
    program: str = "bluesky-ptychopinn",
    command: str | None = None,
) -> Path:
    """Write ``dataset`` as CXI (layout in the module docstring).

    Parameters
    ----------
    dataset : PtychoDataset
        Validated before writing; needs energy, distance and detector pixel size.
    path : str or pathlib.Path
        Output file; written to a temporary name first, so a failure leaves no half file.
    dc_position : {"center", "corner"}
        Layout of the frames on disk (``"corner"`` ifftshifts frames and mask; the attribute
        tells :func:`read_cxi`).
    compression : {"gzip", "lzf", None}
        HDF5 filter of the frames (one chunk per frame).
    program : str
        ``/entry_1/process_1/program``.
    command : str, optional
        ``/entry_1/process_1/command``; default the running command line.

    Returns
    -------
    pathlib.Path
        ``path``.

    Examples
    --------
    >>> write_cxi(ds, "scan_042.cxi")  # doctest: +SKIP
    PosixPath('scan_042.cxi')
    """
    if dc_position not in _DC_POSITIONS:
        raise InvalidInputError(f"dc_position: expected 'center' or 'corner', got {dc_position!r}")
    path = Path(path)
    dataset.validate()
    dataset.require_geometry("writing CXI")
    with replacing(path) as partial, h5py.File(partial, "w") as f:
        _write_layout(f, dataset, dc_position, compression)
        _write_process(f, program, command)
    return path


def _write_layout(f: h5py.File, ds: PtychoDataset, dc_position: str,
                  compression: str | None) -> None:
    n = ds.frame_size
    dx = ds.object_pixel_size_m
    f["cxi_version"] = 160
    entry = _nx_class(f.create_group("entry_1"), "NXentry")
    entry.attrs[METADATA_ATTR] = metadata_to_json(ds.metadata)
    instrument = _nx_class(entry.create_group("instrument_1"), "NXinstrument")
    det = _nx_class(instrument.create_group("detector_1"), "NXdetector")
    frames, mask = ds.diffraction, ds.mask
    if dc_position == "corner":
        frames = np.fft.ifftshift(frames, axes=(-2, -1))
        mask = None if mask is None else np.fft.ifftshift(mask)
    data = det.create_dataset("data", data=frames, chunks=(1, n, n), compression=compression)
    data.attrs["dc_position"] = dc_position
    data.attrs["axes"] = "translation:y:x"
    det["distance"] = ds.detector_distance_m
    det["x_pixel_size"] = ds.detector_pixel_size_m
    det["y_pixel_size"] = ds.detector_pixel_size_m
    if mask is not None:
        det["mask"] = np.where(mask, 0, MASK_INVALID).astype(np.uint32)
    source = _nx_class(instrument.create_group("source_1"), "NXsource")
    source["energy"] = ds.energy_ev * EV_TO_J
    source["energy"].attrs["units"] = "J"
    _nx_class(entry.create_group("data_1"), "NXdata")["data"] = h5py.SoftLink(DATA)
    yx_m = positions_px_to_m(ds.positions_px, dx, (0.0, 0.0), 1)
    translation = np.column_stack([yx_m[:, 1], yx_m[:, 0], np.zeros(ds.n_frames)])
    sample = _nx_class(entry.create_group("sample_1"), "NXsample")
    tr = sample.create_dataset("geometry_1/translation", data=translation)
    tr.attrs.update({"units": "m", ORIGIN_ATTR: np.zeros(2), SIGN_ATTR: 1})
    det["translation"] = h5py.SoftLink(TRANSLATION)
    image = entry.create_group("image_1")
    probe = image.create_dataset("data", data=ds.probe[None])
    probe.attrs["axes"] = "coherent:incoherent:y:x"
    image["data_space"] = "real"
    image["x_pixel_size"] = dx
    image["y_pixel_size"] = dx
    if ds.object is not None:
        image = entry.create_group("image_2")
        obj = image.create_dataset("data", data=ds.object[None])
        obj.attrs["axes"] = "layer:y:x"
        image["data_space"] = "real"
        image["x_pixel_size"] = dx
        image["y_pixel_size"] = dx


def _write_process(f: h5py.File, program: str, command: str | None) -> None:
    process = _nx_class(f.create_group(PROCESS), "NXprocess")
    process["program"] = program
    process["version"] = __version__
    process["date"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    process["command"] = command if command is not None else " ".join(sys.argv) or "python"
