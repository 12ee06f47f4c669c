"""File workflows behind the CLI: reconstruct a dataset (iterative or network) and score it."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np

from .errors import InvalidInputError, OutputExistsError

__all__ = ["run_reconstruction", "reconstruct_with_model", "refine_after_model",
           "score_against"]


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
                       position_correction: bool = False, inputs: ModelInputs | None = None):
    """The hybrid on a file: rPIE from the start the data prefers (flat, the network's object
    or its high-pass), on the network's canvas, with the dataset's probe at the model's
    sampling. Returns the final :class:`~bluesky_ptychopinn.recon.RefinedSnapshot` (with the
    residuals of both estimates). ``inputs``: :func:`model_inputs` when already made."""
    from .recon import PIEOptions, RefinerThread, StreamingRefiner

    frames, positions, probe = inputs or model_inputs(ds, n)
    tuning = {"batch_size": batch_size, "alpha_object": alpha_object,
              "position_correction": position_correction or None}
    tuning = {key: value for key, value in tuning.items() if value is not None}
    refiner = StreamingRefiner(probe, object_shape=snap.object.shape, origin_px=snap.origin_px,
                               options=PIEOptions(device=device, seed=seed, progress=False,
                                                  probe_update=probe_update, **tuning))
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
    agree. ``crop``: the stitched central square of each predicted patch (default: the
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
    shape = ds.object.shape if ds.object is not None and frames.shape[-1] == n else None
    recon = StreamingReconstructor(model, object_shape=shape, batch_size=batch_size,
                                   device=device, crop=crop)
    recon.add(frames, positions)
    if crop == "auto":
        # As live: the crop whose stitched object best explains a sample of the frames.
        chooser = CropChooser()
        chooser.observe(frames, positions)
        chooser.choose(recon, probe)
    snap = recon.finish()
    snap.stats["crop"] = int(recon.crop)
    return snap


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
    """
    from .physics import object_pixel_size_m

    conversions = ds.metadata.setdefault("conversions", [])
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
    return ds


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
    engine: str = "rpie",
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
    """Reconstruct ``file`` and write ``<stem>_recon.{cxi,npz}`` + a PNG; returns a summary.

    An existing output is never replaced unless ``overwrite`` (checked before any work, so a
    long reconstruction is not lost at the end); the output's directory is created.

    With ``model`` and ``refine``, the network's image is refined by ``engine`` for ``epochs``
    passes (or ``refine_seconds``) from the start the data prefers, and the estimate with the
    lower Fourier-magnitude residual is written; the summary scores both.

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
    if correct_positions:  # checked before any work
        if model and not refine:
            raise InvalidInputError("--correct-positions corrects positions in the iterative "
                                    "engine: add --refine to --model, or leave --model out")
        from .recon import PIEOptions

        start_epoch = PIEOptions().position_correction_start_epoch
        if epochs <= start_epoch and not (model and refine_seconds):
            raise InvalidInputError(f"--correct-positions starts after {start_epoch} passes: "
                                    f"give --epochs > {start_epoch}")
    existing = [p for p in (output, output.with_suffix(".png")) if p.exists()]
    if existing and not overwrite:
        raise OutputExistsError(f"{existing[0]} exists; choose another output with --output "
                                "or replace it with --overwrite")
    if output.suffix.lower() not in (".npz", ".cxi", ".h5", ".hdf5", ".nxs"):
        raise InvalidInputError(f"--output {output}: expected a .cxi, .h5 or .npz file")
    output.parent.mkdir(parents=True, exist_ok=True)
    ds = apply_geometry(read_dataset(file), energy_ev=energy_ev, pixel_m=pixel_m)
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
                                 refine_seconds=refine_seconds, pie=pie)
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
    _write_result(ds, result, output, summary, include_frames=include_frames)
    png = output.with_suffix(".png")
    title = f"{file.name}: {result.label}" + (
        f", FRC-AUC(0-0.5) phase {summary['frc_auc_0.5_phase']:.3f}"
        if "frc_auc_0.5_phase" in summary else "")
    from .figures import reconstruction_figure

    reconstruction_figure(png, result.object, probe=result.probe, truth=result.truth,
                          frc=frc_curves, threshold=threshold, title=title, extra=result.extra,
                          weight=result.weight, pixel_size_m=result.pixel_m)
    summary["figure"] = str(png)
    output.with_suffix(".json").write_text(json.dumps(summary, indent=2))
    return summary


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
                    refine_seconds: float | None, pie: dict) -> _Result:
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
                                     probe_update=pie["probe_update"], inputs=inputs, **options)
        result.summary["refinement"] = {
            "engine": "rpie", "epochs": round(refined.epochs, 2), "start": refined.start,
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
                result.probe_source = f"refined by rPIE from {file_probe}"
                # The refined probe was kept centred by whole-pixel rolls; its positions
                # moved the other way (the object did not).
                positions -= np.asarray(refined.probe_roll_px)
            result.positions_px = positions
        result.label = (f"model {model} + rpie ({refined.epochs:.0f} epochs, shown: "
                        f"{refined.best})")
    return result


def _iterative_result(ds, *, engine: str, epochs: int, pie: dict) -> _Result:
    import torch

    from .physics import scatter_patches
    from .recon import PIEOptions, pie_reconstruct

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
