"""Probe-centric synthetic training data, simulated in memory (the paper's workflow).

probes x object classes x objects -> jittered-raster scans -> Poisson diffraction, each sample
tagged with its experiment (and so its probe).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence

import numpy as np
import torch

from ..errors import InvalidInputError
from ..physics import normalize_probe, scan_pattern, simulate_diffraction
from ._data import TrainingExperiment

__all__ = ["synthetic_experiments", "probe_sha256"]


def probe_sha256(probe: np.ndarray) -> str:
    """sha256 of a probe's complex64 bytes (provenance of training data)."""
    return hashlib.sha256(np.ascontiguousarray(probe, dtype=np.complex64).tobytes()).hexdigest()


def synthetic_experiments(
    probes: Mapping[str, np.ndarray],
    object_classes: Sequence[str] = ("dead_leaves", "blurred_white_noise", "procedural", "simplex"),
    *,
    objects_per_class: int = 1,
    object_shape: tuple[int, int] = (160, 160),
    step_px: float = 4.0,
    photons: tuple[float, float] = (1e5, 1e6),
    seed: int = 0,
    progress: bool = False,
    contrast_range: tuple[float, float] | None = None,
) -> list[TrainingExperiment]:
    """Simulate one experiment per probe x class x object.

    Parameters
    ----------
    probes : mapping of name to (M, N, N) array
        The probe library (all with the same N, sampled at the object pixel size).
    object_classes : sequence of str
        Object generators (see :func:`bluesky_ptychopinn.synthetic.make_object`).
    objects_per_class : int
        Objects per class and probe.
    object_shape : (int, int)
        Object canvas.
    step_px : float
        Mean scan step (jittered raster, jitter 0.3 step, N/2 buffer at the edges).
    photons : (float, float)
        Photons per frame, drawn log-uniformly per experiment.
    seed : int
        Everything random derives from it.
    contrast_range : (float, float), optional
        Contrast augmentation: each object's phase span is pi * U(lo, hi) (instead of the
        paper's full [-pi, pi]) and its amplitude span shrinks by the same factor, so the
        network also sees the weak-contrast objects real samples often are.

    Returns
    -------
    list of TrainingExperiment
        With ``truth`` set (for evaluation and the supervised baseline).
    """
    from rich.progress import track

    from ..synthetic import make_object

    if not probes:
        raise InvalidInputError("probes: need at least one probe")
    sizes = {np.asarray(p).shape[-1] for p in probes.values()}
    if len(sizes) != 1:
        raise InvalidInputError(f"probes: all must share one frame size, got {sorted(sizes)}")
    n = sizes.pop()
    height, width = object_shape
    margin = n / 2 + 2
    extent = (height - 2 * margin, width - 2 * margin)
    if min(extent) <= step_px:
        raise InvalidInputError(f"object_shape {object_shape} too small for {n}-px frames")
    rng = np.random.default_rng(seed)
    jobs = [(p, c, k) for p in probes for c in object_classes for k in range(objects_per_class)]
    experiments = []
    for probe_name, kind, k in track(jobs, description="simulating", disable=not progress):
        job_seed = int(rng.integers(2**31))
        params = {}
        if contrast_range is not None:
            c = float(rng.uniform(*contrast_range))
            params = {"phase_range": (-np.pi * c, np.pi * c),
                      "amp_range": (1.0 - 0.4 * c, 1.0 + 0.1 * c)}
        obj = make_object(kind, object_shape, seed=job_seed, **params)
        probe = normalize_probe(probes[probe_name])
        pos = scan_pattern("jittered_raster", extent, step=step_px, seed=job_seed)
        pos = pos + np.array([(height - 1) / 2, (width - 1) / 2])
        level = float(np.exp(rng.uniform(np.log(photons[0]), np.log(photons[1]))))
        sim = simulate_diffraction(obj, probe, pos, photons=level, seed=job_seed)
        experiments.append(TrainingExperiment(
            counts=sim.counts, positions=pos, probe=torch.from_numpy(probe), truth=obj,
            name=f"{probe_name}/{kind}/{k}", probe_name=probe_name,
        ))
    return experiments
