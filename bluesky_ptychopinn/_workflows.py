"""File workflows behind the CLI: reconstruct a dataset (iterative or network) and score it."""

from __future__ import annotations

import json
import math
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np

from .errors import InvalidInputError, OutputExistsError

__all__ = ["run_reconstruction", "reconstruct_with_model", "refine_after_model",
           "score_against", "check_device", "prepare_output", "json_safe"]

#: Engines the refinement after a network (``--model --refine``) can run.
_ENGINE_NAMES = {"rpie": "rPIE", "epie": "ePIE"}


def check_device(device: str | None, flag: str = "--device") -> None:
    """Refuse a device torch cannot use on this machine, before any work.

    Without this, ``cuda`` on a machine without CUDA fails deep inside the first tensor move
    (torch's ``AssertionError: Torch not compiled with CUDA enabled``), after the data is read.
    ``None`` and ``"auto"`` always pass (they pick CUDA only when there is one).
    """
    if device is None or device == "auto":
        return
    import torch

    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError):
        parsed = None
    if parsed is None or parsed.type not in ("cpu", "cuda"):
        raise InvalidInputError(f"{flag} {device}: expected cpu, cuda, cuda:N or auto")
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise InvalidInputError(f"{flag} {device}: no CUDA device here; use {flag} cpu "
                                    "or auto")
        count = torch.cuda.device_count()
        if parsed.index is not None and parsed.index >= count:
            raise InvalidInputError(f"{flag} {device}: this machine has {count} CUDA "
                                    f"device(s), cuda:0 to cuda:{count - 1}")


def prepare_output(output: Path, flag: str = "--output",
                   sidecars: tuple[str, ...] = ()) -> None:
    """Make sure ``output`` can be written, before the work whose result it holds.

    Refused with an :class:`InvalidInputError` naming ``flag``: ``output`` (or a sidecar,
    ``output`` with one of the ``sidecars`` suffixes) is a directory, a component of its
    directory is a file, or the directory cannot be created or written. The directory is
    created. Checked by creating and removing a file there, as the writer will: permission
    bits alone miss read-only mounts and ACLs, and root ignores them.
    """
    for path in (output, *(output.with_suffix(suffix) for suffix in sidecars)):
        if path.is_dir():
            example = path / f"result{output.suffix or '.npz'}"
            raise InvalidInputError(f"{flag} {path}: is a directory; give a file name, e.g. "
                                    f"{flag} {example}")
    parent = output.parent
    blocking = next((p for p in (parent, *parent.parents) if p.exists() and not p.is_dir()),
                    None)
    if blocking is not None:
        raise InvalidInputError(f"{flag} {output}: {blocking} is a file, not a directory; "
                                f"choose another {flag}")
    try:
        parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=parent, prefix=f".{output.name}.",
                                         suffix=".check"):
            pass
    except OSError as exc:
        raise InvalidInputError(f"{flag} {output}: cannot write in {parent} "
                                f"({exc.strerror or exc}); choose another {flag}") from None


def json_safe(value):
    """``value`` (dicts, lists, numbers, strings) with every non-finite float as ``None``.

    JSON has no NaN or Infinity: Python's ``json`` writes bare ``NaN``, which strict readers
    (jq, JavaScript) reject. A score is NaN legitimately (a part constant in the reference),
    so it is written as ``null``.
    """
    if isinstance(value, dict):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(item) for item in value]
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    return value


class ModelInputs(NamedTuple):
    """A dataset as a model of frame size N sees it."""

    frames: np.ndarray  # (n, N, N) float32 counts, centre-cropped when larger
    positions: np.ndarray  # (n, 2) at the model's (coarser) object pixel
    probe: np.ndarray  # the dataset's probe at that sampling


def model_inputs(ds, n: int) -> ModelInputs:
    """The dataset's frames, positions and probe at a model's frame size ``n``.

    Frames larger than ``n`` are centre-cropped, positions re-expressed at the coarser object
    pixel and the probe Fourier-resampled (the same boundary code as training); smaller frames
    are refused.
    """
    from .physics import crop_frames, resample_probe, rescale_positions

    frames = np.asarray(ds.diffraction, dtype=np.float32)
    positions = np.asarray(ds.positions_px, dtype=np.float64)
    if frames.shape[-1] < n:
        raise InvalidInputError(f"frames are {frames.shape[-1]} px; the model needs {n}")
    probe = ds.probe
    if frames.shape[-1] > n:
        positions = rescale_positions(positions, 1.0, frames.shape[-1] / n)
        frames = crop_frames(frames, n)
        probe = resample_probe(ds.probe, n)
    return ModelInputs(frames, positions, probe)


def refine_after_model(ds, snap, n: int, *, epochs: int = 20, seconds: float | None = None,
                       device: str | None = None, seed: int = 0, probe_update: bool = True,
                       batch_size: int | None = None, alpha_object: float | None = None,
                       position_correction: bool = False, inputs: ModelInputs | None = None,
                       engine: str = "rpie"):
    """The hybrid on a file: ``engine`` (rPIE by default, or ePIE) from the start the data
    prefers (flat, the network's object or its high-pass), on the network's canvas, with the
    dataset's probe at the model's sampling. Returns the final
    :class:`~bluesky_ptychopinn.recon.RefinedSnapshot` (with the residuals of both estimates).
    ``inputs``: :func:`model_inputs` when already made."""
    from .recon import PIEOptions, RefinerThread, StreamingRefiner

    frames, positions, probe = inputs or model_inputs(ds, n)
    tuning = {"batch_size": batch_size, "alpha_object": alpha_object,
              "position_correction": position_correction or None}
    tuning = {key: value for key, value in tuning.items() if value is not None}
    refiner = StreamingRefiner(probe, object_shape=snap.object.shape, origin_px=snap.origin_px,
                               options=PIEOptions(engine=engine, device=device, seed=seed,
                                                  progress=False, probe_update=probe_update,
                                                  **tuning))
    refiner.offer_seed(snap.object, snap.weight, snap.origin_px)
    refiner.add(frames, positions)
    thread = RefinerThread(refiner, duty=1.0)
    thread.start()
    thread.finish(max_epochs=epochs, time_s=seconds, tol=None)
    thread.join()
    if thread.failed:
        raise RuntimeError(f"refinement failed: {thread.failed}")
    return thread.final


def reconstruct_with_model(ds, model, *, batch_size: int = 256, device: str | None = None,
                           crop: int | None = None, inputs: ModelInputs | None = None):
    """Reconstruct a dataset with a trained network through the streaming engine.

    Frames larger than the model's N are centre-cropped and positions re-expressed at the
    model's coarser pixel (the same boundary code as training). Returns the final
    :class:`~bluesky_ptychopinn.recon.Snapshot` on the dataset's object grid when the sizes
    agree; with cropped frames, on the same field of view at the model's coarser pixel
    (:func:`reference_on_grid` samples the reference there). ``crop``: the stitched central
    square of each predicted patch (default: the
    :class:`~bluesky_ptychopinn.recon.StreamingReconstructor` default); ``"auto"``: the
    candidate whose stitched object best explains a sample of the frames (Fourier-magnitude
    residual with the dataset's probe), as the live engine chooses before it has a refined
    image. The crop used is in the snapshot's ``stats["crop"]``. ``inputs``:
    :func:`model_inputs` when already made.
    """
    from .recon import StreamingReconstructor
    from .recon._crop_choice import CropChooser

    n = model.config.frame_size
    frames, positions, probe = inputs or model_inputs(ds, n)
    shape, origin = _model_canvas(ds, positions, n)
    recon = StreamingReconstructor(model, object_shape=shape, origin_px=origin,
                                   batch_size=batch_size, device=device, crop=crop)
    recon.add(frames, positions)
    if crop == "auto":
        # As live: the crop whose stitched object best explains a sample of the frames.
        chooser = CropChooser()
        chooser.observe(frames, positions)
        chooser.choose(recon, probe)
    snap = recon.finish()
    snap.stats["crop"] = int(recon.crop)
    return snap


def _model_canvas(ds, positions: np.ndarray, n: int
                  ) -> tuple[tuple[int, int] | None, tuple[float, float]]:
    """(shape, origin) of a network's canvas for ``ds`` at positions on the model's grid.

    Uncropped frames: the dataset's object grid. Cropped frames (``ds.frame_size`` > ``n``):
    the test is on the dataset's own frame size, as the frames are cropped by now. The pixel is
    frame_size / n times larger, so the canvas is the dataset's field of view at that pixel,
    widened to every patch (n/2 around its position, plus the canvas's 1-2 px margin of
    :func:`~bluesky_ptychopinn.recon._canvas.growth_pads`): fitted up front, it never grows
    by a whole frame per side as a stream does. No reference object: the canvas grows as the
    stream does.
    """
    if ds.object is None:
        return None, (0.0, 0.0)
    if ds.frame_size == n:
        return tuple(ds.object.shape), (0.0, 0.0)
    field = np.ceil(np.asarray(ds.object.shape) * n / ds.frame_size)
    low = np.minimum(np.floor(positions.min(axis=0) - n / 2 - 1), 0)
    high = np.maximum(np.ceil(positions.max(axis=0) + n / 2 + 2), field)
    shape = high - low
    return (int(shape[0]), int(shape[1])), (float(low[0]), float(low[1]))


def score_against(recon: np.ndarray, truth: np.ndarray, weight: np.ndarray | None = None,
                  *, taper_px: int = 8, register: bool = True) -> dict:
    """FRC-AUC etc. of ``recon`` against ``truth`` inside the well-covered bounding box.

    ``register`` (default True) undoes a sub-pixel shift first, see
    :func:`~bluesky_ptychopinn.metrics.compare_objects`.
    """
    from .metrics import compare_objects, covered_box

    box = covered_box(weight) if weight is not None else (slice(None), slice(None))
    return compare_objects(recon[box], truth[box], taper_px=taper_px, register=register)


def reference_on_grid(truth: np.ndarray, frame_size: int, snap, n: int) -> np.ndarray:
    """The reference object on a network result's canvas.

    A model of size ``n`` on frames of ``frame_size`` > ``n`` reconstructs on a grid whose pixel
    is ``frame_size / n`` times larger (the frames are centre-cropped); its canvas may also have
    grown past the reference's. The reference is band-limited and sampled where the canvas's
    pixels lie (:func:`~bluesky_ptychopinn.physics.resample_object`), so that a score compares
    like with like instead of two different grids.
    """
    from .physics import resample_object

    factor = frame_size / n
    if factor == 1 and truth.shape == snap.object.shape and not any(snap.origin_px):
        return truth
    return resample_object(truth, factor, snap.object.shape, snap.origin_px)


def apply_geometry(ds, *, energy_ev: float | None = None, pixel_m: float | None = None):
    """Fill or correct a dataset's geometry from the command line, recording what changed.

    ``energy_ev`` replaces the file's energy (the object pixel follows when the file gives
    distance and detector pixel). ``pixel_m`` (the object pixel) is for files without a full
    geometry; one that contradicts a full geometry is refused rather than silently winning.
    Positions the reader converted from metres (CXI) follow a changed object pixel, so that
    they keep their place in metres; positions stored in pixels (NPZ) are kept as they are.
    """
    from .physics import object_pixel_size_m

    conversions = ds.metadata.setdefault("conversions", [])
    pixel_before = ds.object_pixel_size_m
    if energy_ev is not None:
        if not energy_ev > 0:
            raise InvalidInputError(f"--energy-ev must be positive, got {energy_ev:g}")
        conversions.append(f"energy {ds.energy_ev} eV -> {energy_ev:g} eV (--energy-ev)")
        ds.energy_ev = float(energy_ev)
        if ds.has_geometry:
            ds.object_pixel_size_m = object_pixel_size_m(
                ds.energy_ev, ds.detector_distance_m, ds.detector_pixel_size_m, ds.frame_size)
    if pixel_m is not None:
        if not pixel_m > 0:
            raise InvalidInputError(f"--pixel-m must be positive, got {pixel_m:g}")
        if ds.has_geometry and abs(pixel_m - ds.object_pixel_size_m) > 1e-3 * pixel_m:
            raise InvalidInputError(
                f"--pixel-m {pixel_m:.4g} contradicts the file's geometry (energy, distance and "
                f"detector pixel give {ds.object_pixel_size_m:.4g} m); leave --pixel-m out, or "
                "correct the file with `bluesky-ptychopinn import`")
        conversions.append(f"object pixel {ds.object_pixel_size_m} m -> {pixel_m:g} m "
                           "(--pixel-m)")
        ds.object_pixel_size_m = float(pixel_m)
    if ds.object_pixel_size_m != pixel_before:
        _positions_follow_pixel(ds, conversions)
    return ds


def _positions_follow_pixel(ds, conversions: list[str]) -> None:
    """Re-express positions converted from metres at the dataset's new object pixel.

    A CXI reader divided the file's translations (metres) by the object pixel of the file's
    geometry; with a corrected pixel the same pixels would be other metres, so the scan would
    shrink or grow by the ratio. The reader's record says which pixel it used and which point
    stays put (:data:`~bluesky_ptychopinn.io._checks.POSITIONS_FROM_M`); without one the
    positions were given in pixels and stay.
    """
    from .io._checks import POSITIONS_FROM_M

    record = ds.metadata.get(POSITIONS_FROM_M)
    if not isinstance(record, dict) or record.get("pixel_size_m") is None:
        return
    ratio = float(record["pixel_size_m"]) / ds.object_pixel_size_m
    anchor = np.asarray(record["anchor_px"], dtype=np.float64)
    ds.positions_px = anchor + (np.asarray(ds.positions_px, dtype=np.float64) - anchor) * ratio
    record["pixel_size_m"] = ds.object_pixel_size_m
    conversions.append(f"positions converted from metres: rescaled by {ratio:.6g} to the new "
                       f"object pixel {ds.object_pixel_size_m:.6e} m (the same metres)")


def check_is_a_scan(positions_px: np.ndarray) -> None:
    """Refuse to reconstruct frames whose positions all lie within 1 px of each other: that is
    no scan, but positions in metres (or another unit) read as object pixels, and every frame
    would be stitched onto one spot without a word."""
    positions = np.asarray(positions_px, dtype=np.float64)
    span = np.ptp(positions, axis=0) if len(positions) > 1 else None
    if span is not None and (span < 1.0).all():
        raise InvalidInputError(
            f"positions: all {len(positions)} lie within {float(span.max()):.3g} px of each "
            "other; object pixels expected (positions in metres? divide them by the object "
            "pixel size)")


def use_probe(ds, reference: str) -> None:
    """Replace ``ds.probe`` by a library probe (by name) or a probe file, at the dataset's
    sampling; the change is recorded in ``ds.metadata["conversions"]``."""
    from .io import load_probe_reference
    from .physics import probe_at_sampling

    array, pixel, source = load_probe_reference(reference, flag="--probe")
    n = np.shape(array)[-1]
    try:
        ds.probe = probe_at_sampling(array, pixel, ds.frame_size, ds.object_pixel_size_m)
    except InvalidInputError as exc:
        raise InvalidInputError(f"--probe {reference}: {exc}") from None
    ds.metadata.setdefault("conversions", []).append(
        f"probe from {source} ({n} px of {pixel} m) at {ds.frame_size} px of "
        f"{ds.object_pixel_size_m} m (--probe)")


def run_reconstruction(
    file: Path,
    *,
    engine: str | None = None,
    epochs: int = 50,
    probe_update: bool = True,
    output: Path | None = None,
    device: str = "auto",
    seed: int = 0,
    model: str | None = None,
    refine: bool = False,
    refine_seconds: float | None = None,
    overwrite: bool = False,
    crop: int | str | None = None,
    batch_size: int | None = None,
    alpha: float | None = None,
    energy_ev: float | None = None,
    pixel_m: float | None = None,
    include_frames: bool = False,
    probe: str | None = None,
    correct_positions: bool = False,
) -> dict:
    """Reconstruct ``file`` and write ``<stem>_recon.{cxi,npz}`` + a PNG and a JSON summary;
    returns the summary (non-finite scores as ``None``: JSON has no NaN).

    An existing output (or its PNG or JSON) is never replaced unless ``overwrite``; the
    output's directory is created and must be writable. Both are checked before any work, so
    a long reconstruction is not lost at the end.

    ``engine`` (``"rpie"`` when None, or ``"epie"``): the iterative engine. With ``model`` and
    ``refine``, the network's image is refined by ``engine`` for ``epochs`` passes (or
    ``refine_seconds``) from the start the data prefers, and the estimate with the lower
    Fourier-magnitude residual is written; the summary scores both. Options that would be
    ignored are refused: ``refine``, ``refine_seconds`` or ``crop`` without ``model``;
    ``engine`` or ``refine_seconds`` with ``model`` but without ``refine``.

    The written file is self-consistent: the object, the positions *on the object's grid*
    (``canvas = positions - origin``), the object pixel size, the probe at that sampling (the
    one the engine used or refined) and, in CXI files or with ``include_frames``, the frames
    actually reconstructed (centre-cropped when a model of a smaller N ran). NPZ results leave
    the frames out by default. ``crop``: the network's stitching crop (pixels or "auto");
    ``batch_size`` / ``alpha``: rPIE's batch and object alpha (the refinement's too).
    ``probe``: a probe library name or a probe file to use instead of the file's probe,
    resampled to the frames' size and object pixel
    (:func:`~bluesky_ptychopinn.physics.probe_at_sampling`). ``correct_positions``: the
    iterative engine (or the refinement) also corrects each frame's position
    (``PIEOptions.position_correction``); the written positions are the corrected ones.
    """
    from .io import read_dataset

    output = Path(output) if output else file.with_name(f"{file.stem}_recon.cxi")
    _check_options(model=model, refine=refine, refine_seconds=refine_seconds, crop=crop,
                   engine=engine)
    engine = engine or "rpie"
    check_device(device)
    if correct_positions:  # checked before any work
        if model and not refine:
            raise InvalidInputError("--correct-positions corrects positions in the iterative "
                                    "engine: add --refine to --model, or leave --model out")
        from .recon import PIEOptions

        start_epoch = PIEOptions().position_correction_start_epoch
        if epochs <= start_epoch and not (model and refine_seconds):
            raise InvalidInputError(f"--correct-positions starts after {start_epoch} passes: "
                                    f"give --epochs > {start_epoch}")
    if output.suffix.lower() not in (".npz", ".cxi", ".h5", ".hdf5", ".nxs"):
        raise InvalidInputError(f"--output {output}: expected a .cxi, .h5 or .npz file")
    sidecars = (".png", ".json")  # all three are written: all three are guarded
    written = (output, *(output.with_suffix(x) for x in sidecars))
    if any(p.resolve() == Path(file).resolve() for p in written):
        # --overwrite is for earlier results, never for the measurement itself
        raise InvalidInputError(f"--output {output} would replace the input {file}; choose "
                                "another output")
    # A directory in the way is refused first: --overwrite would not help there.
    prepare_output(output, sidecars=sidecars)
    existing = [p for p in written if p.exists()]
    if existing and not overwrite:
        raise OutputExistsError(f"{existing[0]} exists; choose another output with --output "
                                "or replace it with --overwrite")
    ds = apply_geometry(read_dataset(file), energy_ev=energy_ev, pixel_m=pixel_m)
    check_is_a_scan(ds.positions_px)
    if probe is not None:
        use_probe(ds, probe)
    if output.suffix.lower() != ".npz" and not ds.has_geometry:
        raise InvalidInputError(
            f"--output {output}: a CXI file needs the detector distance and pixel size, which "
            f"{file} lacks; write an NPZ result (-o {output.with_suffix('.npz')}) or give the "
            "geometry with `bluesky-ptychopinn import --distance-m --detector-pixel-m`")
    pie = {"seed": seed, "probe_update": probe_update, "device": None if device == "auto"
           else device}
    if batch_size is not None:
        pie["batch_size"] = batch_size
    if alpha is not None:
        pie["alpha_object"] = alpha
    if correct_positions:
        pie["position_correction"] = True
    start = time.perf_counter()
    if model:
        result = _network_result(ds, model, crop=crop, refine=refine, epochs=epochs,
                                 refine_seconds=refine_seconds, pie=pie, engine=engine)
    else:
        result = _iterative_result(ds, engine=engine, epochs=epochs, pie=pie)
    summary = {"input": str(file), "method": result.label,
               "seconds": round(time.perf_counter() - start, 2),
               "frames": int(len(ds.positions_px)), "output": str(output),
               "object_pixel_m": result.pixel_m, "canvas_origin_px": list(result.origin_px),
               "probe": result.probe_source, **result.summary}
    frc_curves = threshold = None
    if result.truth is not None:
        if result.network_object is not None:
            network_scores = score_against(result.network_object, result.truth, result.weight)
            summary["network_frc_auc_0.5_phase"] = round(
                float(network_scores["frc_auc_0.5_phase"]), 4)
        scores = score_against(result.object, result.truth, result.weight)
        for key in ("frc_auc_0.5_phase", "frc_auc_1.0_phase", "frc_auc_0.5_amplitude",
                    "nrmse", "resolution_phase"):
            summary[key] = round(float(scores[key]), 4)
        frc_curves = {"phase": (scores["frc_phase"].freq, scores["frc_phase"].frc),
                      "amplitude": (scores["frc_amplitude"].freq, scores["frc_amplitude"].frc)}
        threshold = (scores["frc_phase"].freq, scores["threshold"])
    summary = json_safe(summary)  # a NaN score (constant reference part) is written as null
    _write_result(ds, result, output, summary, include_frames=include_frames)
    png = output.with_suffix(".png")
    title = f"{file.name}: {result.label}" + (
        f", FRC-AUC(0-0.5) phase {summary['frc_auc_0.5_phase']:.3f}"
        if summary.get("frc_auc_0.5_phase") is not None else "")
    from .figures import reconstruction_figure

    reconstruction_figure(png, result.object, probe=result.probe, truth=result.truth,
                          frc=frc_curves, threshold=threshold, title=title, extra=result.extra,
                          weight=result.weight, pixel_size_m=result.pixel_m)
    summary["figure"] = str(png)
    output.with_suffix(".json").write_text(json.dumps(summary, indent=2, allow_nan=False))
    return summary


def _check_options(*, model: str | None, refine: bool, refine_seconds: float | None, crop,
                   engine: str | None) -> None:
    """Refuse options the chosen path would silently ignore (before any work)."""
    if not model:
        given = [flag for flag, value in (("--refine", refine or None),
                                          ("--refine-seconds", refine_seconds),
                                          ("--crop", crop)) if value is not None]
        if given:
            raise InvalidInputError(f"{given[0]} applies to a network: add --model NAME, or "
                                    f"leave {given[0]} out")
        return
    if not refine:
        given = [flag for flag, value in (("--engine", engine),
                                          ("--refine-seconds", refine_seconds))
                 if value is not None]
        if given:
            raise InvalidInputError(f"{given[0]} applies to the refinement after --model: add "
                                    f"--refine, or leave {given[0]} out")
    elif engine is not None and engine not in _ENGINE_NAMES:
        raise InvalidInputError(f"--engine {engine}: expected one of "
                                f"{', '.join(_ENGINE_NAMES)}")


@dataclass
class _Result:
    """What one reconstruction produced, all on one grid (the object's)."""

    object: np.ndarray
    probe: np.ndarray
    positions_px: np.ndarray  # on the object's grid: canvas = positions - origin
    weight: np.ndarray
    frames: np.ndarray  # the frames reconstructed (cropped to the model's N)
    mask: np.ndarray | None
    pixel_m: float | None
    origin_px: tuple[float, float]
    label: str
    probe_source: str
    truth: np.ndarray | None = None  # the reference on the same grid
    network_object: np.ndarray | None = None
    extra: dict = field(default_factory=dict)
    summary: dict = field(default_factory=dict)


def _network_result(ds, model: str, *, crop, refine: bool, epochs: int,
                    refine_seconds: float | None, pie: dict, engine: str = "rpie") -> _Result:
    from .models import ModelRegistry
    from .physics import crop_frames

    net, _card = ModelRegistry().load(model, device=pie["device"] or "cpu")
    n = net.config.frame_size
    factor = ds.frame_size / n
    inputs = model_inputs(ds, n)
    snap = reconstruct_with_model(ds, net, device=pie["device"], crop=crop, inputs=inputs)
    file_probe = ("the file's probe" if factor == 1 else
                  f"the file's probe Fourier-resampled {ds.frame_size} -> {n} px")
    result = _Result(
        object=snap.object, probe=inputs.probe,
        positions_px=inputs.positions - np.asarray(snap.origin_px),
        weight=snap.weight, frames=inputs.frames,
        mask=None if ds.mask is None else crop_frames(ds.mask[None], n)[0],
        pixel_m=None if ds.object_pixel_size_m is None else ds.object_pixel_size_m * factor,
        origin_px=snap.origin_px, label=f"model {model}",
        probe_source=f"{file_probe} (the network itself uses no probe)",
        truth=None if ds.object is None else reference_on_grid(ds.object, ds.frame_size, snap, n),
        extra={"uncertainty": snap.uncertainty},
    )
    result.summary["crop_px"] = snap.stats["crop"]
    if factor != 1:
        result.summary["frames_cropped"] = f"{ds.frame_size} -> {n} px (the model's N)"
    if refine:
        options = {k: v for k, v in pie.items() if k != "probe_update"}
        refined = refine_after_model(ds, snap, n, epochs=epochs, seconds=refine_seconds,
                                     probe_update=pie["probe_update"], inputs=inputs,
                                     engine=engine, **options)
        result.summary["refinement"] = {
            "engine": engine, "epochs": round(refined.epochs, 2), "start": refined.start,
            "residual": refined.residual, "network_residual": refined.network_residual,
            "best": refined.best, "seconds": round(refined.busy_s, 2)}
        result.network_object = snap.object
        result.extra["network phase"] = np.angle(snap.object)
        if refined.best == "refined":
            result.object = refined.object
            positions = np.array(result.positions_px, dtype=np.float64)
            if refined.position_moves is not None:
                # The refiner holds at most max_frames frames: later ones were not moved.
                positions[: len(refined.position_moves)] += refined.position_moves
                result.summary["position_correction_rms_px"] = round(
                    refined.position_correction_rms_px, 4)
            if pie["probe_update"]:
                result.probe = refined.probe
                result.probe_source = f"refined by {_ENGINE_NAMES[engine]} from {file_probe}"
                # The refined probe was kept centred by whole-pixel rolls; its positions
                # moved the other way (the object did not).
                positions -= np.asarray(refined.probe_roll_px)
            result.positions_px = positions
        result.label = (f"model {model} + {engine} ({refined.epochs:.0f} epochs, shown: "
                        f"{refined.best})")
    return result


def _iterative_result(ds, *, engine: str, epochs: int, pie: dict) -> _Result:
    import torch

    from .physics import scatter_patches
    from .recon import PIEOptions, pie_reconstruct

    # The progress bar is drawn on stdout: only for a terminal, so that piped stdout is the
    # summary's JSON alone.
    pie = {"progress": sys.stdout.isatty(), **pie}
    res = pie_reconstruct(
        ds.diffraction, ds.positions_px, ds.probe,
        object_shape=ds.object.shape if ds.object is not None else None, mask=ds.mask,
        options=PIEOptions(engine=engine, n_epochs=epochs, **pie))
    n = ds.frame_size
    positions = np.asarray(res.positions, np.float64)
    weight = scatter_patches(torch.ones(len(positions), n, n),
                             torch.as_tensor(positions, dtype=torch.float32),
                             res.object.shape).numpy()
    result = _Result(
        object=res.object, probe=res.probe, positions_px=positions, weight=weight,
        frames=ds.diffraction, mask=ds.mask, pixel_m=ds.object_pixel_size_m, origin_px=(0.0, 0.0),
        label=f"{engine}, {epochs} epochs",
        probe_source=f"refined by {engine}" if pie["probe_update"] else "the file's (fixed)",
        truth=ds.object)
    result.summary["options"] = {"batch_size": res.options.batch_size,
                                 "alpha_object": res.options.resolved_alphas()[0],
                                 "alpha_probe": res.options.resolved_alphas()[1]}
    moved = np.asarray(ds.positions_px, dtype=np.float64) - positions
    # Position correction moves each frame with a zero mean; the re-centring roll moves all
    # by whole pixels, so the mean move, rounded, is the roll.
    roll = np.round(moved.mean(axis=0))
    if np.any(roll):
        # The probe was re-centred by this roll (dy, dx); the written positions, which go with
        # the written probe, are the scan's minus it (the object stays in the input's frame).
        result.summary["probe_recentred_px"] = [float(v) for v in roll]
    if res.options.position_correction:
        corrections = moved - roll
        result.summary["position_correction_rms_px"] = round(
            float(np.sqrt((corrections**2).sum(axis=1).mean())), 4)
    return result


def _write_result(ds, result: _Result, output: Path, summary: dict, *,
                  include_frames: bool) -> None:
    """One self-consistent file: object, probe and positions on one grid, its pixel size."""
    from .io import PtychoDataset, write_dataset

    frame_size = result.frames.shape[-1]
    pixel = result.pixel_m
    geometry = {"energy_ev": ds.energy_ev, "detector_distance_m": ds.detector_distance_m,
                "detector_pixel_size_m": ds.detector_pixel_size_m}
    if ds.has_geometry and frame_size != ds.frame_size:
        pixel = None  # recomputed from the geometry at the cropped N: the same value
    out = PtychoDataset(
        result.frames, result.positions_px, result.probe.astype(np.complex64), **geometry,
        object_pixel_size_m=pixel, mask=result.mask, object=result.object.astype(np.complex64),
        metadata={"reconstruction": summary, "source": str(summary["input"]),
                  "conversions": list(ds.metadata.get("conversions", []))})
    options = {"frames": include_frames} if output.suffix.lower() == ".npz" else {}
    write_dataset(out, output, **options)
