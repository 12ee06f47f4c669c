"""File workflows behind the CLI: reconstruct a dataset (iterative or network) and score it."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from .errors import InvalidInputError, OutputExistsError

__all__ = ["run_reconstruction", "reconstruct_with_model", "refine_after_model",
           "score_against"]


def frames_for_model(ds, n: int) -> tuple[np.ndarray, np.ndarray]:
    """The dataset's frames and positions at a model's frame size ``n``.

    Frames larger than ``n`` are centre-cropped and positions re-expressed at the coarser
    object pixel (the same boundary code as training); smaller frames are refused.
    """
    from .physics import crop_frames, rescale_positions

    frames = np.asarray(ds.diffraction, dtype=np.float32)
    positions = np.asarray(ds.positions_px, dtype=np.float64)
    if frames.shape[-1] < n:
        raise InvalidInputError(f"frames are {frames.shape[-1]} px; the model needs {n}")
    if frames.shape[-1] > n:
        positions = rescale_positions(positions, 1.0, frames.shape[-1] / n)
        frames = crop_frames(frames, n)
    return frames, positions


def refine_after_model(ds, snap, n: int, *, epochs: int = 20, seconds: float | None = None,
                       device: str | None = None, seed: int = 0, probe_update: bool = True):
    """The hybrid on a file: rPIE from the start the data prefers (flat, the network's object
    or its high-pass), on the network's canvas, with the dataset's probe at the model's
    sampling. Returns the final :class:`~bluesky_ptychopinn.recon.RefinedSnapshot` (with the
    residuals of both estimates)."""
    from .physics import resample_probe
    from .recon import PIEOptions, RefinerThread, StreamingRefiner

    frames, positions = frames_for_model(ds, n)
    probe = ds.probe if ds.probe.shape[-1] == n else resample_probe(ds.probe, n)
    refiner = StreamingRefiner(probe, object_shape=snap.object.shape, origin_px=snap.origin_px,
                               options=PIEOptions(device=device, seed=seed, progress=False,
                                                  probe_update=probe_update))
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
                           crop: int | None = None):
    """Reconstruct a dataset with a trained network through the streaming engine.

    Frames larger than the model's N are centre-cropped and positions re-expressed at the
    model's coarser pixel (the same boundary code as training). Returns the final
    :class:`~bluesky_ptychopinn.recon.Snapshot` on the dataset's object grid when the sizes
    agree. ``crop``: the stitched central square of each predicted patch (default: the
    :class:`~bluesky_ptychopinn.recon.StreamingReconstructor` default).
    """
    from .recon import StreamingReconstructor

    n = model.config.frame_size
    frames, positions = frames_for_model(ds, n)
    shape = ds.object.shape if ds.object is not None and frames.shape[-1] == n else None
    recon = StreamingReconstructor(model, object_shape=shape, batch_size=batch_size,
                                   device=device, crop=crop)
    recon.add(frames, positions)
    return recon.finish()


def score_against(recon: np.ndarray, truth: np.ndarray, weight: np.ndarray | None = None,
                  *, taper_px: int = 8, register: bool = True) -> dict:
    """FRC-AUC etc. of ``recon`` against ``truth`` inside the well-covered bounding box.

    ``register`` (default True) undoes a sub-pixel shift first, see
    :func:`~bluesky_ptychopinn.metrics.compare_objects`.
    """
    from .metrics import compare_objects, covered_box

    box = covered_box(weight) if weight is not None else (slice(None), slice(None))
    return compare_objects(recon[box], truth[box], taper_px=taper_px, register=register)


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
) -> dict:
    """Reconstruct ``file`` and write ``<stem>_recon.{cxi,npz}`` + a PNG; returns a summary.

    An existing output is never replaced unless ``overwrite`` (checked before any work, so a
    long reconstruction is not lost at the end); the output's directory is created.

    With ``model`` and ``refine``, the network's image is refined by ``engine`` for ``epochs``
    passes (or ``refine_seconds``) from the start the data prefers, and the estimate with the
    lower Fourier-magnitude residual is written; the summary scores both.
    """
    from .figures import reconstruction_figure
    from .io import PtychoDataset, read_dataset, write_dataset
    from .recon import PIEOptions, pie_reconstruct

    output = Path(output) if output else file.with_name(f"{file.stem}_recon.cxi")
    existing = [p for p in (output, output.with_suffix(".png")) if p.exists()]
    if existing and not overwrite:
        raise OutputExistsError(f"{existing[0]} exists; choose another output with --output "
                                "or replace it with --overwrite")
    output.parent.mkdir(parents=True, exist_ok=True)
    ds = read_dataset(file)
    device = None if device == "auto" else device
    start = time.perf_counter()
    refinement = network_obj = None
    if model:
        from .models import ModelRegistry

        net, card = ModelRegistry().load(model, device=device or "cpu")
        snap = reconstruct_with_model(ds, net, device=device)
        obj, probe, weight = snap.object, ds.probe, snap.weight
        positions = ds.positions_px
        extra = {"uncertainty": snap.uncertainty}
        label = f"model {model}"
        if refine:
            n = net.config.frame_size
            network_obj = obj
            refined = refine_after_model(ds, snap, n, epochs=epochs, seconds=refine_seconds,
                                         device=device, seed=seed, probe_update=probe_update)
            refinement = {"engine": "rpie", "epochs": round(refined.epochs, 2),
                          "start": refined.start, "residual": refined.residual,
                          "network_residual": refined.network_residual, "best": refined.best,
                          "seconds": round(refined.busy_s, 2)}
            if refined.best == "refined":
                obj = refined.object
                if n == ds.frame_size:
                    probe = refined.probe
            extra["network phase"] = np.angle(network_obj)
            label = f"model {model} + rpie ({refined.epochs:.0f} epochs, shown: {refined.best})"
    else:
        result = pie_reconstruct(
            ds.diffraction, ds.positions_px, ds.probe,
            object_shape=ds.object.shape if ds.object is not None else None, mask=ds.mask,
            options=PIEOptions(engine=engine, n_epochs=epochs, probe_update=probe_update,
                               seed=seed, device=device),
        )
        # A re-centred probe goes with moved positions (the object stays in the input frame).
        obj, probe, positions = result.object, result.probe, result.positions
        import torch

        from .physics import scatter_patches

        n = ds.frame_size
        weight = scatter_patches(torch.ones(len(positions), n, n),
                                 torch.as_tensor(positions, dtype=torch.float32),
                                 obj.shape).numpy()
        extra = {}
        label = f"{engine}, {epochs} epochs"
    seconds = time.perf_counter() - start
    summary = {"input": str(file), "method": label, "seconds": round(seconds, 2),
               "frames": int(len(ds.positions_px)), "output": str(output)}
    moved = np.asarray(ds.positions_px, dtype=np.float64) - np.asarray(positions, np.float64)
    if np.any(moved):
        # The probe was re-centred by this roll (dy, dx); the written positions, which go with
        # the written probe, are the scan's minus it.
        summary["probe_recentred_px"] = [float(v) for v in moved[0]]
    if refinement is not None:
        summary["refinement"] = refinement
        if ds.object is not None and ds.object.shape == obj.shape:
            network_scores = score_against(network_obj, ds.object, weight)
            summary["network_frc_auc_0.5_phase"] = round(
                float(network_scores["frc_auc_0.5_phase"]), 4)
    frc_curves, threshold = None, None
    if ds.object is not None and ds.object.shape == obj.shape:
        scores = score_against(obj, ds.object, weight)
        for key in ("frc_auc_0.5_phase", "frc_auc_1.0_phase", "frc_auc_0.5_amplitude",
                    "nrmse", "resolution_phase"):
            summary[key] = round(float(scores[key]), 4)
        frc_curves = {"phase": (scores["frc_phase"].freq, scores["frc_phase"].frc),
                      "amplitude": (scores["frc_amplitude"].freq, scores["frc_amplitude"].frc)}
        threshold = (scores["frc_phase"].freq, scores["threshold"])
    out_ds = PtychoDataset(ds.diffraction, positions, probe, energy_ev=ds.energy_ev,
                           detector_distance_m=ds.detector_distance_m,
                           detector_pixel_size_m=ds.detector_pixel_size_m, mask=ds.mask,
                           object=obj.astype(np.complex64),
                           metadata={"reconstruction": summary})
    write_dataset(out_ds, output)
    png = output.with_suffix(".png")
    title = f"{file.name}: {label}" + (
        f", FRC-AUC(0-0.5) phase {summary['frc_auc_0.5_phase']:.3f}"
        if "frc_auc_0.5_phase" in summary else "")
    reconstruction_figure(png, obj, probe=probe, truth=ds.object, frc=frc_curves,
                          threshold=threshold, title=title, extra=extra)
    summary["figure"] = str(png)
    output.with_suffix(".json").write_text(json.dumps(summary, indent=2))
    return summary
