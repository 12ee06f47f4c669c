"""Synthetic objects: the paper's four random object classes, test samples and spectra.

Every generator is ``f(shape, *, seed=..., **params) -> complex64 (H, W)`` transmission object,
deterministic for a given seed. Object classes (paper Fig. 4): :func:`dead_leaves` (DL),
:func:`blurred_white_noise` (BWN), :func:`simplex_noise` (SN) and :func:`procedural` (PR); any
picture becomes an object with :func:`from_image`; :func:`make_object` dispatches by name.
Built-in samples for the simulated beamline: :func:`siemens_star`, :func:`test_chip`,
:func:`cells` and :func:`quadrant_features`. :func:`radial_power_spectrum` and
:func:`spectral_slope` measure how the classes differ.
"""

from ._builder import build_dataset, simulate_experiment
from ._dead_leaves import DEAD_LEAF_SHAPES, dead_leaves
from ._from_image import from_image, load_image
from ._noise import blurred_white_noise, fractal_noise, simplex_noise
from ._objects import OBJECT_ALIASES, OBJECT_CLASSES, SAMPLES, make_object, object_names
from ._procedural import PROCEDURAL_LAYERS, procedural, procedural_base_map
from ._samples import QUADRANTS, cells, quadrant_features, siemens_star, test_chip
from ._spectrum import radial_power_spectrum, spectral_slope

__all__ = [
    "DEAD_LEAF_SHAPES",
    "OBJECT_ALIASES",
    "OBJECT_CLASSES",
    "PROCEDURAL_LAYERS",
    "QUADRANTS",
    "SAMPLES",
    "blurred_white_noise",
    "build_dataset",
    "cells",
    "dead_leaves",
    "fractal_noise",
    "from_image",
    "load_image",
    "make_object",
    "object_names",
    "procedural",
    "procedural_base_map",
    "quadrant_features",
    "radial_power_spectrum",
    "siemens_star",
    "simulate_experiment",
    "simplex_noise",
    "spectral_slope",
    "test_chip",
]
