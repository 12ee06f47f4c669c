"""Which probe a run's refinement starts from: what the run references, else the data's guess."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from ..errors import InvalidInputError
from ..io import ProbeLibrary, read_probe
from ..io._probe_library import probe_array_sha256
from ..physics import PROBE_MODELS, make_probe, probe_at_sampling
from ._paths import DataRoots, PathRefused

__all__ = ["resolve_run_probe"]

logger = logging.getLogger(__name__)

def _inline(reference: dict) -> np.ndarray | None:
    """An inline small probe: ``{"amplitude": [[...]], "phase": [[...]]}`` ((N, N) or (M, N, N))."""
    if "amplitude" not in reference:
        return None
    amplitude = np.asarray(reference["amplitude"], dtype=np.float64)
    phase = np.asarray(reference.get("phase", np.zeros_like(amplitude)), dtype=np.float64)
    return (amplitude * np.exp(1j * phase)).astype(np.complex64)


def _sampled(probe: np.ndarray, pixel_m: float | None, size: int,
             dx: float) -> tuple[np.ndarray | None, str]:
    """``probe`` at ``size`` px of ``dx``, or None and why when its sampling cannot be matched
    exactly (:func:`~bluesky_ptychopinn.physics.probe_at_sampling`: a real-space crop/pad, a
    Fourier crop, or both; other samplings would need interpolation of a complex field, which
    we do not guess at)."""
    try:
        return probe_at_sampling(probe, pixel_m, size, dx), ""
    except InvalidInputError as exc:
        return None, str(exc)


def resolve_run_probe(md: dict, model_info: dict, size: int, pixel_size_m: float,
                      energy_ev: float, library: ProbeLibrary | None = None,
                      data_roots: DataRoots | None = None) -> tuple[np.ndarray | None, dict]:
    """The probe the run's ``ptycho.probe`` refers to, at the reconstruction's sampling.

    Looked up in this order (with no reference, the training probe of a single-probe model):
    an inline array; a name in the probe library; a probe model name
    (:data:`~bluesky_ptychopinn.physics.PROBE_MODELS`, built for the run's geometry, as the
    training probes of the shipped models are); a probe file (path or ``file://`` URI). When
    none applies, ``None``: the refiner then estimates the probe from the frames and refines
    it (blind). With ``data_roots`` (the live callback's, whose start documents may come from
    a bus), a probe file is read only inside them, as detector files are.

    Returns
    -------
    probe : numpy.ndarray or None
        complex64 (M, size, size).
    info : dict
        ``source`` (what was used, in words), ``reference``, ``sha256`` and ``known`` (bool),
        for the derived run's start document.
    """
    reference = md.get("probe") or {}
    if isinstance(reference, str):
        reference = {"reference": reference}
    name = reference.get("reference") if isinstance(reference, dict) else None
    training = [p.get("name") for p in model_info.get("training_probes") or []]
    if not name and len(training) == 1:
        name = training[0]  # a single-probe model was trained for exactly this beamline's probe
    info: dict = {"reference": name if isinstance(name, str) else None}
    candidates = []
    if isinstance(reference, dict) and (inline := _inline(reference)) is not None:
        candidates.append(("inline array in the start document", inline, None))
    if isinstance(name, str) and name:
        library = library or ProbeLibrary()
        if name in library:
            probe, meta = library.get(name)
            candidates.append((f"probe library: {name}", probe, meta.get("pixel_size_m")))
        elif name in PROBE_MODELS:
            candidates.append((f"probe model: {name}",
                               make_probe(name, size, pixel_size_m, energy_ev), pixel_size_m))
        else:
            path = Path(name.removeprefix("file://"))
            if path.suffix and path.is_file() and data_roots is not None:
                try:  # (a relative name is taken in the working directory, a default root)
                    path = data_roots.resolve(str(path.resolve()))
                except PathRefused as exc:
                    logger.warning("probe file not read (%s); estimating the probe", exc)
                    path = Path()
            if path.suffix and path.is_file():
                try:
                    probe, file_info = read_probe(path)
                    candidates.append((f"file: {path}", probe, file_info.get("pixel_size_m")))
                except Exception as exc:  # a bad file falls back to the data's own guess
                    logger.warning("probe file %s unusable (%s); estimating the probe", path, exc)
    for source, probe, pixel in candidates:
        sampled, why = _sampled(np.asarray(probe, dtype=np.complex64), pixel, size,
                                pixel_size_m)
        if sampled is not None:
            sampled = np.ascontiguousarray(sampled, dtype=np.complex64)
            info.update(source=source, sha256=probe_array_sha256(sampled), known=True)
            return sampled, info
        logger.warning("probe from %s is sampled differently from this run's %.3g m pixels; "
                       "not used (%s)", source, pixel_size_m, why)
    info.update(source="estimated from the mean diffraction pattern (blind refinement)",
                sha256=None, known=False)
    return None, info
