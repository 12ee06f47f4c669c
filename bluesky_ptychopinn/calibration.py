"""Probe calibration: reconstruct a calibration scan blind and keep its probe.

The probe-centric workflow measures a beamline's probe once and trains on it. This module turns
one calibration scan (a file, or a raw run in Tiled) into a probe-library entry:

1. :func:`scan_from_file` / :func:`scan_from_run` read the frames, the positions in object
   pixels, the geometry and a probe guess (the file's probe, the run's ``ptycho.probe``
   reference, or, when there is none, the field whose far field is the mean measured amplitude);
2. :func:`calibrate_probe` runs blind rPIE (probe refined, re-centred every epoch), or pty-chi's
   LSQML when the ``ptychi`` package is installed;
3. :func:`save_calibration` writes the probe to a :class:`~bluesky_ptychopinn.io.ProbeLibrary`
   with its provenance (raw run uid or the file's sha256, engine, epochs, final Fourier error,
   date, energy, pixel size) and :func:`calibration_figure` draws the probe modes, the object and
   the error curve.

``bluesky-ptychopinn calibrate RUN_UID|FILE`` is these four calls (docs/calibration.md).

Examples
--------
A scan of 277 frames at 70 % linear overlap (tests/test_calibrate.py; about 7 s on one CPU
core):

>>> from bluesky_ptychopinn.calibration import calibrate_probe, probe_correlation
>>> from bluesky_ptychopinn.io import read_dataset
>>> ds = read_dataset("star_scan.cxi")  # doctest: +SKIP
>>> result = calibrate_probe(ds.diffraction, ds.positions_px, epochs=100)  # doctest: +SKIP
>>> result.settings["linear_overlap"] >= 0.7, result.final_error < 1e-3  # doctest: +SKIP
(True, True)

Blind ptychography needs overlap: below about 70 % it can settle on a wrong probe with a low
error, and :func:`calibrate_probe` warns.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import math
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from .errors import FileFormatError, InvalidInputError, OutputExistsError

__all__ = [
    "CALIBRATION_ENGINES",
    "CalibrationResult",
    "CalibrationScan",
    "calibrate_probe",
    "calibration_figure",
    "calibration_provenance",
    "check_outputs",
    "file_sha256",
    "probe_correlation",
    "ptychi_available",
    "save_calibration",
    "scan_from_file",
    "scan_from_run",
]

logger = logging.getLogger(__name__)

#: Engines of :func:`calibrate_probe`: rPIE (built in) and pty-chi's LSQML (needs ``ptychi``).
CALIBRATION_ENGINES = ("rpie", "lsqml")
#: Object pixels left free around the scan so that re-centring the probe has room.
_MARGIN_PX = 4


@dataclass
class CalibrationScan:
    """A calibration scan in the project's conventions, with where it came from.

    Attributes
    ----------
    frames : numpy.ndarray
        (n, N, N) photon counts, DC at (N//2, N//2).
    positions_px : numpy.ndarray
        (n, 2) float64 probe centres (y, x) in object pixels.
    pixel_size_m : float or None
        Object pixel size (needed to store the probe in the library).
    energy_ev : float or None
        Photon energy.
    mask : numpy.ndarray or None
        (N, N) bool valid pixels.
    probe_guess : numpy.ndarray or None
        (M, N, N) starting probe the scan itself offers (the file's probe, the run's reference);
        None: estimated from the frames.
    probe_guess_source : str
        The guess, in words.
    source : dict
        Provenance of the data: ``data_from`` ("file" or "run") and ``file`` + ``file_sha256``, or
        ``raw_run_uid`` (+ ``tiled_uri``).
    """

    frames: np.ndarray
    positions_px: np.ndarray
    pixel_size_m: float | None = None
    energy_ev: float | None = None
    mask: np.ndarray | None = None
    probe_guess: np.ndarray | None = None
    probe_guess_source: str = "estimated from the mean diffraction pattern"
    source: dict = field(default_factory=dict)

    @property
    def frame_size(self) -> int:
        """Frame side N."""
        return int(self.frames.shape[-1])


@dataclass
class CalibrationResult:
    """What :func:`calibrate_probe` returns.

    Attributes
    ----------
    probe : numpy.ndarray
        complex64 (M, N, N) refined probe, sum |P|^2 = 1, centred on (N//2, N//2).
    object : numpy.ndarray
        complex64 (H, W) object reconstructed with it (canvas pixel (0, 0) is object pixel
        ``object_origin_px``).
    object_origin_px : (float, float)
        Object-pixel coordinate (y, x) of canvas pixel (0, 0).
    positions_px : numpy.ndarray
        (n, 2) probe centres that go with ``probe``, in the input's frame.
    probe_guess : numpy.ndarray
        complex64 (M, N, N) starting probe, unit norm.
    probe_guess_source : str
        Where the guess came from.
    error_history : list of float
        Per epoch, the normalised Fourier (amplitude) error
        ``sum (sqrt(I_model) - sqrt(I_meas))^2 / sum I_meas`` on valid pixels.
    engine : str
        ``"rpie"`` or ``"lsqml"``.
    epochs : int
        Epochs run.
    photon_scale : float
        Photons per frame of the unit-norm probe.
    seconds : float
        Wall-clock time of the reconstruction.
    device : str
        Where it ran.
    settings : dict
        Engine settings (batch size, alphas, modes, seed).
    """

    probe: np.ndarray
    object: np.ndarray
    object_origin_px: tuple[float, float]
    positions_px: np.ndarray
    probe_guess: np.ndarray
    probe_guess_source: str
    error_history: list[float]
    engine: str
    epochs: int
    photon_scale: float
    seconds: float
    device: str
    settings: dict = field(default_factory=dict)

    @property
    def final_error(self) -> float:
        """The last epoch's normalised Fourier error (NaN when the engine reports none)."""
        return float(self.error_history[-1]) if self.error_history else math.nan


# -- comparing probes -----------------------------------------------------------------------------
def probe_correlation(probe: Any, reference: Any, *, upsample: int = 20) -> float:
    """Normalised correlation |<reference, probe>| / (|reference| |probe|) of the dominant mode,
    after removing a sub-pixel shift and the global phase (what blind ptychography cannot fix).

    Parameters
    ----------
    probe, reference : array_like
        (N, N) or (M, N, N) probes; the first mode of each is compared.
    upsample : int
        The shift is found to 1/``upsample`` pixel (on the amplitudes).

    Returns
    -------
    float
        1 for the same probe up to shift and phase; 0 for orthogonal fields.

    Examples
    --------
    >>> import numpy as np
    >>> from bluesky_ptychopinn.physics import make_probe
    >>> p = make_probe("kb", 64, 30e-9, 9_000)
    >>> round(probe_correlation(np.roll(p, 3, axis=-1) * 1j, p), 4)
    1.0
    """
    from .metrics import apply_shift, register_shift

    a = np.asarray(reference)
    b = np.asarray(probe)
    a = (a[0] if a.ndim == 3 else a).astype(np.complex128)
    b = (b[0] if b.ndim == 3 else b).astype(np.complex128)
    if a.shape != b.shape or a.ndim != 2:
        raise InvalidInputError(f"probe_correlation: expected probes of one (N, N) shape, got "
                                f"{np.shape(probe)} and {np.shape(reference)}")
    shift = register_shift(np.abs(a), np.abs(b), upsample=upsample)
    b = apply_shift(b, shift)
    norm = np.linalg.norm(a) * np.linalg.norm(b)
    return float(abs(np.vdot(a, b)) / norm) if norm > 0 else 0.0


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    """sha256 (hex) of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


# -- reading a calibration scan ------------------------------------------------------------------
def _cxi_frame_size(path: Path) -> int | None:
    """N of a CXI file's frames, or None when it has none (read_cxi then names the field)."""
    import h5py

    from .io._cxi import DATA

    try:
        with h5py.File(path, "r") as f:
            data = f.get(DATA)
            if isinstance(data, h5py.Dataset) and data.ndim == 3:
                return int(data.shape[-1])
    except OSError:
        return None
    return None


def scan_from_file(path: str | Path) -> CalibrationScan:
    """A calibration scan from a CXI or NPZ file (any layout :func:`io.read_dataset` reads).

    A file without a probe (raw beamline data) is accepted: the guess is then estimated from
    the frames. A probe the file holds is used as the starting guess unless the file says it
    was itself estimated from the mean pattern (``bluesky-ptychopinn import`` without
    ``--probe``).

    Parameters
    ----------
    path : str or pathlib.Path
        The file.

    Returns
    -------
    CalibrationScan

    Raises
    ------
    FileFormatError
        Missing file, no frames, no positions, or another bad field (the message names it).
    """
    import h5py

    from .io import read_dataset

    path = Path(path)
    if path.is_dir():
        raise FileFormatError(path, "", "a directory, not a CXI or NPZ file")
    if not path.is_file():
        raise FileFormatError(path, "", "no such file")
    options: dict = {}
    if h5py.is_hdf5(path):
        size = _cxi_frame_size(path)
        if size is not None:  # raw data without a probe: a placeholder, dropped below
            options["probe"] = np.ones((1, size, size), np.complex64)
    ds = read_dataset(path, **options)
    conversions = " ".join(ds.metadata.get("conversions", []))
    guess, guess_source = ds.probe, f"the probe in {path.name}"
    if "probe supplied by the caller" in conversions:
        guess, guess_source = None, "estimated from the mean diffraction pattern (no probe in "\
            "the file)"
    elif "estimated from the mean pattern" in conversions:
        guess, guess_source = None, "estimated from the mean diffraction pattern"
    return CalibrationScan(
        frames=ds.diffraction, positions_px=ds.positions_px, pixel_size_m=ds.object_pixel_size_m,
        energy_ev=ds.energy_ev, mask=ds.mask, probe_guess=guess, probe_guess_source=guess_source,
        source={"data_from": "file", "file": str(path.resolve()), "file_sha256": file_sha256(path)},
    )


def _read_column(stream, key: str, what: str, uid: str) -> np.ndarray:
    try:
        return np.asarray(stream[key].read())
    except KeyError:
        keys = ", ".join(sorted(stream)) if hasattr(stream, "__iter__") else "?"
        raise InvalidInputError(f"run {uid}: no {what} {key!r} in its primary stream (it has: "
                                f"{keys}); check the start document's ptycho metadata") from None


def scan_from_run(client: Any, uid: str, *, library: Any = None) -> CalibrationScan:
    """A calibration scan from a raw run in Tiled (frames served by Tiled, also those the
    detector wrote to external HDF5 files).

    Parameters
    ----------
    client : tiled.client container
        The catalog holding the raw run.
    uid : str
        Raw run uid (or a unique prefix Tiled resolves).
    library : ProbeLibrary, optional
        Where a ``ptycho.probe`` reference by name is looked up (default library otherwise).

    Returns
    -------
    CalibrationScan
        Positions converted from the stage readings (``position_units``, ``position_sign``) to
        object pixels; frames with DC at the centre; the run's referenced probe as the guess when
        it resolves at the run's sampling, else None (estimated from the frames).

    Raises
    ------
    InvalidInputError
        Unknown uid, a derived run, a run without ``ptycho`` metadata, frames or positions.
    """
    from .callbacks._run_probe import resolve_run_probe
    from .geometry import object_pixel_size_m, positions_m_to_px
    from .metadata import PtychoMetadata

    where = str(getattr(client, "uri", "the catalog"))
    where = where.split("/metadata")[0] if "/api/v1/metadata" in where else where
    try:
        run = client[uid]
    except KeyError:
        raise InvalidInputError(f"run {uid!r} not found in {where}") from None
    start = dict(getattr(run, "start", None) or run.metadata.get("start") or {})
    if "original_run_uid" in start:
        raise InvalidInputError(f"run {uid} is a derived run (of {start['original_run_uid']}); "
                                "calibrate from its raw run")
    md = PtychoMetadata.from_start(start)
    if md is None:
        raise InvalidInputError(f"run {uid}: not a ptychography scan (its start document has "
                                "no 'ptycho' metadata)")
    try:
        stream = run["primary"]
    except KeyError:
        raise InvalidInputError(f"run {uid}: no primary stream (no frames were recorded)") \
            from None
    frames = _read_column(stream, md.detector_key, "detector image", uid)
    y = _read_column(stream, md.positioner_keys.y, "y positioner", uid)
    x = _read_column(stream, md.positioner_keys.x, "x positioner", uid)
    if frames.ndim == 4:  # several exposures per point: photon counts add up
        frames = frames.sum(axis=1)
    if frames.ndim != 3 or frames.shape[0] == 0 or frames.shape[1] != frames.shape[2]:
        raise InvalidInputError(f"run {uid}: expected (n, N, N) frames under "
                                f"{md.detector_key!r}, got shape {frames.shape}")
    n = min(len(frames), len(y), len(x))
    if n == 0:
        raise InvalidInputError(f"run {uid}: no positions under {md.positioner_keys.y!r} / "
                                f"{md.positioner_keys.x!r}")
    frames = frames[:n].astype(np.float32)
    yx_m = np.stack([y[:n], x[:n]], axis=1).astype(np.float64) * md.position_scale_m
    finite = np.isfinite(yx_m).all(axis=1)
    if not finite.any():
        raise InvalidInputError(f"run {uid}: no finite positions")
    frames, yx_m = frames[finite], yx_m[finite]
    if md.dc_position == "corner":
        frames = np.fft.fftshift(frames, axes=(-2, -1))
    size = frames.shape[-1]
    valid = np.isfinite(frames).all(axis=0) & (np.nan_to_num(frames, nan=0.0) >= 0).all(axis=0)
    mask = None if valid.all() else valid
    frames = np.where(valid, np.nan_to_num(frames, nan=0.0), 0.0).astype(np.float32)
    dx = object_pixel_size_m(md.energy_ev, md.detector_distance_m, md.detector_pixel_size_m,
                             size)
    positions = positions_m_to_px(yx_m, dx, None, md.position_sign, frame_size=size,
                                  margin_px=_MARGIN_PX)
    guess, info = resolve_run_probe(md.to_document(), {}, size, dx, md.energy_ev, library)
    raw_uid = start.get("uid", uid)
    return CalibrationScan(
        frames=frames, positions_px=positions, pixel_size_m=dx, energy_ev=md.energy_ev,
        mask=mask, probe_guess=guess, probe_guess_source=info["source"],
        source={"data_from": "run", "raw_run_uid": raw_uid, "tiled_uri": str(where),
                "probe_reference": info.get("reference")},
    )


# -- the reconstruction ---------------------------------------------------------------------------
def _initial_probe(frames: np.ndarray, probe_guess: Any, n_modes: int) -> np.ndarray:
    from .physics import mixed_state_probe
    from .recon import probe_from_frames

    if probe_guess is None:
        guess = probe_from_frames(frames)
    else:
        guess = np.asarray(probe_guess, dtype=np.complex64)
        guess = guess[None] if guess.ndim == 2 else guess
        if guess.ndim != 3 or guess.shape[-2:] != frames.shape[-2:]:
            raise InvalidInputError(f"probe guess: expected (M, {frames.shape[-1]}, "
                                    f"{frames.shape[-1]}) like the frames, got {guess.shape}")
    if n_modes > guess.shape[0]:
        guess = mixed_state_probe(guess[0], n_modes, decay=0.3)
    elif n_modes < guess.shape[0]:
        guess = guess[:n_modes]
    power = float(np.sum(np.abs(guess.astype(np.complex128)) ** 2))
    if not power > 0:
        raise InvalidInputError("probe guess: all zero")
    return (guess / np.sqrt(power)).astype(np.complex64)


def _valid_frames(frames: np.ndarray, mask: Any) -> np.ndarray:
    """The frames with masked pixels set to 0, once valid pixels are known to hold finite,
    non-negative counts (the refiner's own check: masked pixels may hold detector flags, NaN
    or 2**32 - 1, and must neither block the default probe guess nor enter it).

    Raises
    ------
    InvalidInputError
        A mask of the wrong shape or without valid pixels, non-finite or negative values on
        valid pixels, or no photons at all.
    """
    from .recon._pie import _check_frames

    return _check_frames(frames, mask)[0].numpy()


def _working_frame(positions: np.ndarray, size: int) -> tuple[np.ndarray, tuple[int, int]]:
    """(offset, object shape): positions + offset leave ``_MARGIN_PX`` free on every side.

    Raises
    ------
    InvalidInputError
        The canvas would exceed :data:`~bluesky_ptychopinn.recon._pie.MAX_CANVAS_FRAME_AREAS`
        times the frames' total area (positions in the wrong units).
    """
    from .recon._pie import check_canvas_size

    low = positions.min(axis=0)
    offset = np.floor(size / 2 + _MARGIN_PX - low)
    high = positions.max(axis=0) + offset
    shape = tuple(int(math.ceil(h + size / 2 + _MARGIN_PX)) for h in high)
    span = positions.max(axis=0) - low
    check_canvas_size((shape[0], shape[1]), len(positions), size, (span[0], span[1]))
    return offset, (shape[0], shape[1])


#: Positions closer than this (object pixels) are one setpoint visited again (a repeated
#: pass, two exposures stored as two events, encoder read-back jitter): they add no overlap.
_SAME_SETPOINT_PX = 0.5


def _nearest_other_setpoint(positions: np.ndarray) -> np.ndarray:
    """Per position, the distance to the nearest position of *another* setpoint (more than
    ``_SAME_SETPOINT_PX`` away); ``inf`` when there is none."""
    from scipy.spatial import cKDTree

    tree = cKDTree(positions)
    n = len(positions)
    k = min(n, 8)
    while True:
        distances, _ = tree.query(positions, k=k)
        distances = np.where(distances > _SAME_SETPOINT_PX, distances, np.inf)
        nearest = distances.min(axis=1)
        # Done when every position found another setpoint, or all n were looked at (a
        # position visited more than k - 1 times needs a deeper query).
        if k == n or np.isfinite(nearest).all():
            return nearest
        k = min(n, 4 * k)


def _overlap(positions: np.ndarray, guess: np.ndarray) -> dict:
    """Median step to the nearest other setpoint, the guess's 90 %-power diameter and
    1 - step/diameter. Repeated positions are one setpoint: a twin at distance 0 would read
    as a step of 0 and an overlap of 100 %, however sparse the scan."""
    from .physics import probe_diameter_px

    diameter = float(probe_diameter_px(guess))
    nearest = (_nearest_other_setpoint(np.asarray(positions, np.float64))
               if len(positions) >= 2 else np.full(1, np.inf))
    nearest = nearest[np.isfinite(nearest)]
    # a single setpoint (however many frames) has no neighbour: no overlap at all
    step = float(np.median(nearest)) if nearest.size else math.inf
    overlap = 1 - step / diameter if diameter > 0 and math.isfinite(step) else 0.0
    return {"median_step_px": round(step, 3), "probe_diameter_px": round(diameter, 3),
            "linear_overlap": round(overlap, 3)}


def ptychi_available() -> bool:
    """True when pty-chi (the ``ptychi`` package) can be imported."""
    return importlib.util.find_spec("ptychi") is not None


def calibrate_probe(
    frames: Any,
    positions_px: Any,
    *,
    probe_guess: Any = None,
    probe_guess_source: str | None = None,
    mask: Any = None,
    engine: str = "rpie",
    epochs: int = 100,
    n_modes: int = 1,
    batch_size: int = 8,
    seed: int | None = 0,
    device: str | None = None,
    progress: bool = False,
) -> CalibrationResult:
    """Reconstruct a calibration scan blind and return its refined probe.

    Parameters
    ----------
    frames : array_like
        (n, N, N) photon counts, DC at (N//2, N//2).
    positions_px : array_like
        (n, 2) probe centres (y, x) in object pixels.
    probe_guess : array_like, optional
        (N, N) or (M, N, N) starting probe; default the field whose far field is the mean
        measured amplitude (:func:`~bluesky_ptychopinn.recon.probe_from_frames`), which has the
        beam's size and spectrum and a flat phase.
    probe_guess_source : str, optional
        The guess in words, for the provenance.
    mask : array_like of bool, optional
        (N, N) valid pixels.
    engine : {"rpie", "lsqml"}
        rPIE (built in), or pty-chi's LSQML (only when ``ptychi`` is installed).
    epochs : int
        Passes over all positions. rPIE refines the probe once per batch, so a blind start
        needs more epochs than a known-probe reconstruction: 100 at ``batch_size=8`` recovers
        a 64-px probe to a correlation above 0.999 on ~300 frames (tests/test_calibrate.py).
    n_modes : int
        Incoherent probe modes to reconstruct (extra modes start as low-order variations of
        the first, holding 30 % of the power each step down).
    batch_size : int
        Positions per update.
    seed : int, optional
        Order of positions per epoch.
    device : str, optional
        ``"cpu"``, ``"cuda"``...; default CUDA when available.
    progress : bool
        Show a progress bar.

    Returns
    -------
    CalibrationResult

    Raises
    ------
    InvalidInputError
        Bad shapes or values (non-finite counts on valid pixels; masked pixels may hold
        anything), positions whose span needs an object canvas of more than 16 times the
        frames' area (positions not in object pixels), an unknown engine, or ``"lsqml"``
        without ``ptychi``.
    """
    if engine not in CALIBRATION_ENGINES:
        raise InvalidInputError(f"engine: expected one of {CALIBRATION_ENGINES}, got "
                                f"{engine!r}")
    if not (isinstance(epochs, (int, np.integer)) and epochs >= 1):
        raise InvalidInputError(f"epochs: expected an integer >= 1, got {epochs!r}")
    if not (isinstance(n_modes, (int, np.integer)) and 1 <= n_modes <= 16):
        raise InvalidInputError(f"modes: expected an integer in [1, 16], got {n_modes!r}")
    frames = np.asarray(frames)
    positions = np.asarray(positions_px, dtype=np.float64)
    if frames.ndim != 3 or frames.shape[0] == 0 or frames.shape[1] != frames.shape[2]:
        raise InvalidInputError(f"frames: expected (n, N, N) photon counts with n >= 1, got "
                                f"shape {frames.shape}")
    if positions.ndim != 2 or positions.shape != (len(frames), 2):
        raise InvalidInputError(f"positions: expected ({len(frames)}, 2) probe centres (y, x), "
                                f"got shape {positions.shape}")
    if not np.isfinite(positions).all():
        raise InvalidInputError("positions: non-finite values")
    if engine == "lsqml" and not ptychi_available():
        raise InvalidInputError("engine lsqml needs pty-chi (the ptychi package), which is not "
                                "installed: pip install ptychi, or use --engine rpie")
    size = frames.shape[-1]
    frames = _valid_frames(frames, mask)
    offset, shape = _working_frame(positions, size)  # before any work: refuse a wrong-unit scan
    guess = _initial_probe(frames, probe_guess, int(n_modes))
    source = probe_guess_source or ("estimated from the mean diffraction pattern"
                                    if probe_guess is None else "given")
    work = positions + offset
    start = time.perf_counter()
    if engine == "rpie":
        from .recon import PIEOptions, pie_reconstruct

        options = PIEOptions(engine="rpie", n_epochs=int(epochs), batch_size=int(batch_size),
                             probe_update=True, recenter_probe=True, seed=seed, device=device,
                             progress=progress)
        res = pie_reconstruct(frames, work, guess, object_shape=shape, mask=mask,
                              options=options)
        probe, obj, history = res.probe, res.object, list(res.error_history)
        final_positions, scale, where = res.positions - offset, res.photon_scale, res.device
        settings = {"batch_size": int(batch_size), "alpha_object": res.options.alpha_object,
                    "alpha_probe": res.options.alpha_probe, "recenter_probe": True,
                    "seed": seed, "modes": int(n_modes)}
    else:
        probe, obj, history, scale, where = _lsqml(frames, work, guess, shape, mask,
                                                   int(epochs), int(batch_size), device)
        final_positions = positions.copy()
        settings = {"batch_size": int(batch_size), "modes": int(n_modes), "ptychi": True}
    seconds = time.perf_counter() - start
    # The overlap of the beam found (the guess from the mean pattern is a focused spot, far
    # smaller than a defocused beam): below ~70 % blind ptychography often settles on a wrong
    # probe with a low error (measured in tests/test_calibrate.py's scans: 63 % fails).
    settings.update(_overlap(positions, probe))
    if settings["linear_overlap"] < 0.7:
        logger.warning("calibration scan: median step %.1f px for a %.1f px beam, a linear "
                       "overlap of %.0f %%; blind reconstruction needs about 70 %% or more: the "
                       "probe may be wrong (scan with a smaller step)",
                       settings["median_step_px"], settings["probe_diameter_px"],
                       100 * settings["linear_overlap"])
    return CalibrationResult(
        probe=np.ascontiguousarray(probe, dtype=np.complex64), object=obj.astype(np.complex64),
        object_origin_px=(-float(offset[0]), -float(offset[1])), positions_px=final_positions,
        probe_guess=guess, probe_guess_source=source, error_history=history, engine=engine,
        epochs=int(epochs), photon_scale=float(scale), seconds=seconds, device=str(where),
        settings=settings,
    )


def _lsqml(frames, positions, guess, shape, mask, epochs, batch_size, device):  # pragma: no cover
    """pty-chi LSQML, blind (probe optimised), set up as bench/_ptychi_runner.py does (its
    conventions were measured there against this project's). Only reached when ``ptychi``
    imports; not part of the test run (the package is optional)."""
    import ptychi.api as api
    from ptychi.api.task import PtychographyTask

    frames = np.asarray(frames, dtype=np.float32)
    options = api.LSQMLOptions()
    options.data_options.fft_shift = True  # our frames have DC at the centre
    options.data_options.free_space_propagation_distance_m = float("inf")
    if mask is not None and hasattr(options.data_options, "valid_pixel_mask"):
        options.data_options.valid_pixel_mask = np.asarray(mask, dtype=bool)
    options.object_options.pixel_size_m = 1.0
    options.object_options.optimizable = True
    options.object_options.determine_position_origin_coords_by = (
        api.ObjectPosOriginCoordsMethods.SPECIFIED
    )
    options.object_options.position_origin_coords = np.zeros(2)
    options.probe_options.optimizable = True
    options.probe_position_options.optimizable = False
    options.reconstructor_options.num_epochs = epochs
    options.reconstructor_options.batch_size = batch_size
    options.reconstructor_options.default_device = (
        api.Devices.CPU if str(device or "cpu").startswith("cpu") else api.Devices.GPU)
    options.reconstructor_options.random_seed = 0
    # pty-chi: unnormalised FFT (probe scaled to the photon count); its patch is centred at
    # (N - 1) / 2, ours at N / 2 (half a pixel).
    n = frames.shape[-1]
    photons = float(frames.reshape(len(frames), -1).sum(1).mean())
    pos = np.asarray(positions, dtype=np.float64) - 0.5
    task = PtychographyTask(
        options, diffraction_data=frames,
        object_data=np.ones((1, *shape), dtype=np.complex64),
        probe_data=(guess * np.sqrt(photons / n**2))[None].astype(np.complex64),
        probe_position_y_px=pos[:, 0], probe_position_x_px=pos[:, 1],
    )
    task.run()
    probe = np.asarray(task.get_data_to_cpu("probe", as_numpy=True))[0]
    obj = np.asarray(task.get_data_to_cpu("object", as_numpy=True))[0]
    history: list[float] = []
    tracker = getattr(task.reconstructor, "loss_tracker", None)
    table = getattr(tracker, "table", None)
    if table is not None and "loss" in getattr(table, "columns", ()):
        history = [float(v) for v in table["loss"]]
    power = float(np.sum(np.abs(probe) ** 2))
    where = "cpu" if str(device or "cpu").startswith("cpu") else str(device)
    # back to photons per frame (the unnormalised FFT carries a factor N^2)
    return (probe / np.sqrt(power)).astype(np.complex64), obj, history, power * n**2, where


# -- writing it ------------------------------------------------------------------------------------
def calibration_provenance(result: CalibrationResult, scan: CalibrationScan) -> dict:
    """The JSON record stored with the probe (``provenance`` in ``<name>.json``)."""
    from . import __version__

    history = result.error_history
    if len(history) > 200:  # keep the record small: every k-th epoch and the last
        step = math.ceil(len(history) / 200)
        history = history[::step] + ([history[-1]] if (len(history) - 1) % step else [])
    return {
        "kind": "calibration",
        **scan.source,
        "engine": result.engine,
        "epochs": result.epochs,
        "final_fourier_error": result.final_error,
        "fourier_error_history": [float(v) for v in history],
        "probe_guess": result.probe_guess_source,
        "modes": int(result.probe.shape[0]),
        "frames": int(len(scan.frames)),
        "frame_size": scan.frame_size,
        "photons_per_frame": result.photon_scale,
        "energy_ev": scan.energy_ev,
        "pixel_size_m": scan.pixel_size_m,
        "settings": result.settings,
        "device": result.device,
        "seconds": round(result.seconds, 3),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "package_version": __version__,
    }


def check_outputs(library: Any, name: str, png: str | Path | None, overwrite: bool) -> None:
    """Refuse, before any work, to replace an existing probe or figure without ``overwrite``."""
    library._paths(name)  # a bad name fails now, not after the reconstruction
    if overwrite:
        return
    if name in library or (library.root / f"{name}.npz").exists():
        raise OutputExistsError(f"probe {name!r} already exists in {library.root}; choose "
                                "another --name or pass --overwrite to replace it")
    if png is not None and Path(png).exists():
        raise OutputExistsError(f"{png} exists; choose another --png or pass --overwrite")


def save_calibration(
    result: CalibrationResult,
    scan: CalibrationScan,
    name: str,
    *,
    library: Any = None,
    instrument: str = "",
    overwrite: bool = False,
    png: str | Path | None = None,
) -> dict:
    """Store the refined probe in the probe library with its provenance (and draw it).

    Parameters
    ----------
    result : CalibrationResult
        From :func:`calibrate_probe`.
    scan : CalibrationScan
        The scan it came from (its ``source``, energy and pixel size go in the record).
    name : str
        Library name.
    library : ProbeLibrary, optional
        Default :class:`~bluesky_ptychopinn.io.ProbeLibrary` at its default root.
    instrument : str
        Instrument / beamline.
    overwrite : bool
        Replace an existing probe (and PNG) of that name.
    png : path, optional
        Also write :func:`calibration_figure` there.

    Returns
    -------
    dict
        The library metadata written (``provenance`` inside).

    Raises
    ------
    OutputExistsError
        The name (or the PNG) exists and ``overwrite`` is False.
    InvalidInputError
        The scan's pixel size is unknown.
    """
    from .io import ProbeLibrary

    library = library if library is not None else ProbeLibrary()
    check_outputs(library, name, png, overwrite)
    if scan.pixel_size_m is None:
        raise InvalidInputError("the object pixel size is unknown (the file has no detector "
                                "geometry); pass --pixel-m")
    provenance = calibration_provenance(result, scan)
    where = (f"run {scan.source['raw_run_uid']}" if scan.source.get("data_from") == "run"
             else scan.source.get("file", "array"))
    if png is not None:
        Path(png).parent.mkdir(parents=True, exist_ok=True)
        calibration_figure(result, png, title=name)
        provenance["figure"] = str(Path(png).resolve())
    return library.add(name, result.probe, instrument=instrument, energy_ev=scan.energy_ev,
                       pixel_size_m=scan.pixel_size_m, overwrite=True,
                       source=f"calibration ({result.engine}, {result.epochs} epochs) of "
                       f"{where}", provenance=provenance)


def calibration_figure(result: CalibrationResult, path: str | Path, *,
                       title: str = "calibration") -> Path:
    """One PNG: amplitude and phase of each probe mode, the object, and the error per epoch.

    Parameters
    ----------
    result : CalibrationResult
        What to draw.
    path : path
        PNG to write.
    title : str
        Figure title (the probe's name).

    Returns
    -------
    pathlib.Path
        ``path``.
    """
    from .figures import _pyplot, _show

    plt = _pyplot()
    probe = result.probe
    modes = probe.shape[0]
    power = (np.abs(probe) ** 2).sum(axis=(-2, -1))
    power = power / power.sum()
    columns = max(modes, 3)
    fig = plt.figure(figsize=(3.0 * columns, 8.4))
    grid = fig.add_gridspec(3, columns)
    for m in range(modes):
        _show(fig.add_subplot(grid[0, m]), np.abs(probe[m]),
              f"mode {m} |P| ({power[m]:.0%})", "magma")
        _show(fig.add_subplot(grid[1, m]), np.angle(probe[m]), f"mode {m} phase (rad)",
              "cividis")
    obj = result.object
    _show(fig.add_subplot(grid[2, 0]), np.abs(obj), "object |O|")
    _show(fig.add_subplot(grid[2, 1]), np.angle(obj), "object phase (rad)")
    ax = fig.add_subplot(grid[2, 2:] if columns > 3 else grid[2, 2])
    if result.error_history:
        ax.semilogy(np.arange(1, len(result.error_history) + 1), result.error_history)
    ax.set_xlabel("epoch")
    ax.set_ylabel("Fourier error")
    ax.set_title(f"final {result.final_error:.3g}", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    fig.suptitle(f"{title}: {result.engine}, {result.epochs} epochs, {result.seconds:.1f} s "
                 f"({result.probe_guess_source})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)
