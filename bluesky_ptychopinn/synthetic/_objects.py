"""Object registry: every object class and built-in sample by name, with short aliases."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence

import numpy as np

from ..errors import InvalidInputError
from ._common import SeedLike
from ._dead_leaves import dead_leaves
from ._noise import blurred_white_noise, simplex_noise
from ._procedural import procedural
from ._samples import cells, quadrant_features, siemens_star, test_chip

__all__ = ["OBJECT_CLASSES", "SAMPLES", "OBJECT_ALIASES", "make_object", "object_names"]

#: The paper's four random object classes (canonical names), used to build training data.
OBJECT_CLASSES = ("dead_leaves", "blurred_white_noise", "procedural", "simplex")
#: Built-in deterministic test samples for the simulated beamline.
SAMPLES = ("siemens_star", "test_chip", "cells", "quadrant_features")
#: Short names of the paper (DL, BWN, PR, SN) and other accepted spellings.
OBJECT_ALIASES = {
    "dl": "dead_leaves",
    "bwn": "blurred_white_noise",
    "pr": "procedural",
    "sn": "simplex",
    "simplex_noise": "simplex",
}

# name -> (generator, whether it takes a seed); the Siemens star has no randomness at all.
_REGISTRY: dict[str, tuple[Callable[..., np.ndarray], bool]] = {
    "dead_leaves": (dead_leaves, True),
    "blurred_white_noise": (blurred_white_noise, True),
    "procedural": (procedural, True),
    "simplex": (simplex_noise, True),
    "siemens_star": (siemens_star, False),
    "test_chip": (test_chip, True),
    "cells": (cells, True),
    "quadrant_features": (quadrant_features, True),
}


def object_names() -> tuple[str, ...]:
    """Every name :func:`make_object` accepts: classes, samples, then aliases."""
    return OBJECT_CLASSES + SAMPLES + tuple(OBJECT_ALIASES)


def _canonical(kind: str) -> str:
    if not isinstance(kind, str):
        raise InvalidInputError(f"kind: expected an object name (str), got {kind!r}")
    key = kind.strip().lower().replace("-", "_").replace(" ", "_")
    key = OBJECT_ALIASES.get(key, key)
    if key not in _REGISTRY:
        raise InvalidInputError(
            f"kind: unknown object {kind!r}; expected one of the classes {OBJECT_CLASSES}, "
            f"the samples {SAMPLES} or the aliases {tuple(OBJECT_ALIASES)}"
        )
    return key


def make_object(
    kind: str, shape: int | Sequence[int], seed: SeedLike = None, **params
) -> np.ndarray:
    """Make an object by name: one of :data:`OBJECT_CLASSES`, :data:`SAMPLES` or an alias.

    Parameters
    ----------
    kind : str
        ``"dead_leaves"`` (``"dl"``), ``"blurred_white_noise"`` (``"bwn"``), ``"procedural"``
        (``"pr"``), ``"simplex"`` (``"sn"``) or a sample name; case and ``-``/``_`` are ignored.
    shape : int or (int, int)
        Canvas (H, W).
    seed : int, numpy.random.Generator or None
        Random seed; None keeps the generator's default (fresh entropy for the object classes,
        the fixed layout of a sample). The Siemens star has no randomness and ignores it.
    **params
        Keyword arguments of the generator (e.g. ``sigma`` for blurred white noise).

    Returns
    -------
    numpy.ndarray
        complex64 (H, W) object.

    Examples
    --------
    >>> make_object("bwn", (64, 64), seed=0).shape
    (64, 64)
    >>> make_object("DL", 64, seed=0).dtype
    dtype('complex64')
    """
    name = _canonical(kind)
    generator, takes_seed = _REGISTRY[name]
    accepted = [p for p in inspect.signature(generator).parameters if p not in ("shape", "seed")]
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        raise InvalidInputError(
            f"make_object({kind!r}): unknown parameters {unknown}; {name} accepts {accepted}"
        )
    if takes_seed and seed is not None:  # samples keep their own default layout (seed 0)
        params["seed"] = seed
    return generator(shape, **params)
