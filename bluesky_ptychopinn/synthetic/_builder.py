"""Simulated experiments: probe library x object classes x scans -> datasets on disk.

This is the paper's probe-centric data recipe: an (ideally measured) probe, procedurally
generated objects, a jittered scan and Poisson noise at a chosen photon count.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import InvalidInputError
from ..io import PtychoDataset, write_dataset
from ..physics import (
    ExperimentGeometry,
    beamstop_mask,
    make_probe,
    normalize_probe,
    probe_diameter_px,
    scan_pattern,
    simulate_diffraction,
)

__all__ = ["ExperimentGeometry", "simulate_experiment", "build_dataset"]


def _scan_positions(
    object_shape: tuple[int, int],
    frame_size: int,
    *,
    pattern: str,
    step_px: float,
    seed: int,
) -> np.ndarray:
    """Scan filling the object with a buffer of N/2 + 1 px at the edges (as in the paper)."""
    height, width = object_shape
    margin = frame_size / 2 + 2
    extent = (height - 2 * margin, width - 2 * margin)
    if min(extent) <= 0:
        raise InvalidInputError(
            f"object_shape {object_shape} is too small for {frame_size}-px frames"
        )
    pos = scan_pattern(pattern, extent, step=step_px, seed=seed)
    pos = pos + np.array([(height - 1) / 2, (width - 1) / 2])
    lo, hi = frame_size / 2, np.array([height, width]) - frame_size / 2 - 1
    return np.clip(pos, lo, hi)


def simulate_experiment(
    obj: str | np.ndarray = "dead_leaves",
    probe: str | np.ndarray = "zone_plate",
    *,
    geometry: ExperimentGeometry | None = None,
    object_shape: tuple[int, int] = (256, 256),
    pattern: str = "fermat",
    overlap: float = 0.75,
    step_px: float | None = None,
    photons: float | tuple[float, float] = 1e6,
    beamstop_px: float = 0.0,
    poisson: bool = True,
    seed: int = 0,
    object_params: Mapping | None = None,
) -> PtychoDataset:
    """Simulate one ptychography experiment with known truth.

    Parameters
    ----------
    obj : str or numpy.ndarray
        An object class name (see :data:`OBJECT_CLASSES`, or a built-in sample such as
        ``"siemens_star"``) or a complex (H, W) object.
    probe : str or numpy.ndarray
        A probe model name (see :data:`~bluesky_ptychopinn.physics.PROBE_MODELS`) or an
        (M, N, N) probe sampled at the geometry's object pixel size.
    geometry : ExperimentGeometry, optional
        Energy, distance, detector pixel and frame size.
    object_shape : (int, int)
        Object canvas when ``obj`` is a name.
    pattern : str
        Scan pattern (``"fermat"``, ``"raster"``, ``"jittered_raster"``, ``"concentric"``).
    overlap : float
        Linear overlap ratio used to set the step from the probe's 90 %-power diameter.
    step_px : float, optional
        Explicit step in object pixels (overrides ``overlap``).
    photons : float or (float, float)
        Incident photons per frame, or a uniform range.
    beamstop_px : float
        Radius of a beamstop over the DC pixel (0 = none).
    poisson : bool
        Add Poisson noise.
    seed : int
        Seeds the object, the scan jitter and the noise.
    object_params : mapping, optional
        Extra keyword arguments of the object generator.

    Returns
    -------
    PtychoDataset
        Frames, positions (object pixels), probe, geometry, mask and the true object.

    Examples
    --------
    >>> ds = simulate_experiment("blurred_white_noise", "pinhole", object_shape=(128, 128))
    >>> ds.diffraction.shape[1:], ds.object.shape
    ((64, 64), (128, 128))
    """
    from . import make_object  # the registry lives in this package's __init__

    geometry = geometry or ExperimentGeometry()
    n = geometry.frame_size
    dx = geometry.object_pixel_size_m
    if isinstance(probe, str):
        probe_name = probe
        probe_arr = make_probe(probe, n, dx, geometry.energy_ev)
    else:
        probe_name = "custom"
        probe_arr = normalize_probe(probe)
        if probe_arr.shape[-1] != n:
            raise InvalidInputError(
                f"probe: expected {n} x {n} (the geometry's frame size), got {probe_arr.shape}"
            )
    if isinstance(obj, str):
        object_name = obj
        object_arr = make_object(obj, object_shape, seed=seed, **dict(object_params or {}))
    else:
        object_name = "custom"
        object_arr = np.asarray(obj, dtype=np.complex64)
        if object_arr.ndim != 2:
            raise InvalidInputError(f"obj: expected a 2-D complex object, got {object_arr.shape}")
    if step_px is None:
        step_px = probe_diameter_px(probe_arr) * (1 - overlap)
    positions = _scan_positions(object_arr.shape, n, pattern=pattern, step_px=step_px, seed=seed)
    mask = beamstop_mask(n, beamstop_px) if beamstop_px > 0 else None
    sim = simulate_diffraction(
        object_arr, probe_arr, positions, photons=photons, poisson=poisson, mask=mask, seed=seed
    )
    return PtychoDataset(
        diffraction=sim.counts.numpy(),
        positions_px=positions,
        probe=probe_arr,
        energy_ev=geometry.energy_ev,
        detector_distance_m=geometry.detector_distance_m,
        detector_pixel_size_m=geometry.detector_pixel_size_m,
        object_pixel_size_m=dx,
        mask=sim.mask.numpy() if mask is not None else None,
        object=object_arr,
        metadata={
            "source": "bluesky_ptychopinn.synthetic.simulate_experiment",
            "object_class": object_name,
            "probe_model": probe_name,
            "pattern": pattern,
            "step_px": float(step_px),
            "photons": photons if np.ndim(photons) == 0 else list(photons),
            "seed": seed,
        },
    )


@dataclass
class _Manifest:
    root: Path
    entries: list = field(default_factory=list)

    def write(self) -> Path:
        path = self.root / "manifest.json"
        path.write_text(json.dumps({"experiments": self.entries}, indent=2))
        return path


def build_dataset(
    out_dir: str | Path,
    probes: Mapping[str, np.ndarray] | Sequence[str],
    object_classes: Sequence[str] = ("dead_leaves", "blurred_white_noise", "procedural", "simplex"),
    *,
    objects_per_class: int = 1,
    patterns_per_object: int = 7_000,
    geometry: ExperimentGeometry | None = None,
    object_shape: tuple[int, int] = (250, 250),
    photons: tuple[float, float] = (5e5, 1e6),
    beamstop_px: float = 4.0,
    file_format: str = "npz",
    seed: int = 0,
    progress: bool = True,
) -> list[Path]:
    """Write simulated experiments for every probe x object class x object to ``out_dir``.

    The defaults reproduce the paper's per-probe recipe: 4 object classes x ~7,000 patterns
    (about 28k patterns of 64 x 64 per probe), photons uniform in [5e5, 1e6] (one level per
    experiment, so the per-experiment input scaling stays exact), a 4-px beamstop,
    a 250 x 250 canvas and a jittered raster (jitter 0.3 step) with an N/2 buffer at the edges.

    Parameters
    ----------
    out_dir : path
        Output directory (created). A ``manifest.json`` lists every file.
    probes : mapping of name to array, or sequence of probe-model names
        The probe library.
    object_classes : sequence of str
        Object generator names.
    objects_per_class : int
        Distinct objects (seeds) per class and probe.
    patterns_per_object : int
        Target number of diffraction patterns per object; sets the scan step.
    file_format : {"npz", "cxi"}
        Output format.
    progress : bool
        Show a progress bar.

    Returns
    -------
    list of pathlib.Path
        The files written.
    """
    from rich.progress import Progress

    if file_format not in ("npz", "cxi"):
        raise InvalidInputError(f"file_format: expected 'npz' or 'cxi', got {file_format!r}")
    geometry = geometry or ExperimentGeometry()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if not isinstance(probes, Mapping):
        probes = {
            name: make_probe(name, geometry.frame_size, geometry.object_pixel_size_m,
                             geometry.energy_ev)
            for name in probes
        }
    margin = geometry.frame_size + 4
    area = max(object_shape[0] - margin, 1) * max(object_shape[1] - margin, 1)
    step_px = math.sqrt(area / patterns_per_object)
    manifest = _Manifest(out)
    rng = np.random.default_rng(seed)
    jobs = [
        (probe_name, kind, k)
        for probe_name in probes
        for kind in object_classes
        for k in range(objects_per_class)
    ]
    paths: list[Path] = []
    with Progress(disable=not progress, transient=False) as bar:
        task = bar.add_task("simulating experiments", total=len(jobs))
        for index, (probe_name, kind, k) in enumerate(jobs):
            level = float(rng.uniform(photons[0], photons[1]))
            ds = simulate_experiment(
                kind, probes[probe_name], geometry=geometry, object_shape=object_shape,
                pattern="jittered_raster", step_px=step_px, photons=level,
                beamstop_px=beamstop_px, seed=seed + index,
            )
            ds.metadata.update(probe_model=probe_name, object_index=k)
            path = out / f"{probe_name}__{kind}__{k:03d}.{file_format}"
            write_dataset(ds, path)
            paths.append(path)
            manifest.entries.append(
                {"file": path.name, "probe": probe_name, "object_class": kind, "object_index": k,
                 "n_patterns": int(ds.diffraction.shape[0]), "seed": seed + index}
            )
            bar.advance(task)
    manifest.write()
    return paths
