"""What a detector really sends, made into counts the reconstruction can use.

Masked pixels arrive as NaN, dead or saturated pixels at the dtype's maximum, background-
subtracted frames with negative values, and the dtype is whatever the detector chose.
:class:`FrameSanitizer` keeps what can be used and says why it dropped the rest:

- complex frames are refused (a detector measures intensities; complex data is a wiring error);
- bool, float16 and integer frames are converted to float32 explicitly (logged once);
- NaN/inf pixels and pixels at an integer dtype's maximum are *masked*, not the whole frame:
  they join a detector mask kept for the run (a bad pixel stays bad) and are filled, for the
  network, with the mean of their valid neighbours; the refiner ignores them (its mask);
- negative pixels are clipped to 0 and counted;
- a frame of another size than the run's first one, a frame with no valid pixel left or no
  counts at all is rejected, by cause.
"""

from __future__ import annotations

import collections
import logging

import numpy as np
from scipy.ndimage import uniform_filter

__all__ = ["FrameSanitizer"]

logger = logging.getLogger(__name__)

#: Above this fraction of masked pixels a frame is rejected rather than filled in.
MAX_MASKED_FRACTION = 0.5


class FrameSanitizer:
    """Clean one run's frames batch by batch (see the module docstring).

    Attributes
    ----------
    shape : tuple of int or None
        The frame shape of the run (its first frames').
    bad_pixels : numpy.ndarray or None
        Detector pixels masked so far (True = bad), union over the frames seen; replaced by a
        new array whenever it grows, never changed in place.
    rejected : collections.Counter
        Frames rejected, by cause.
    clipped_pixels : int
        Negative pixels clipped to 0.
    """

    def __init__(self, run: str = "") -> None:
        self.run = run
        self.shape: tuple[int, int] | None = None
        self.bad_pixels: np.ndarray | None = None
        self.rejected: collections.Counter = collections.Counter()
        self.clipped_pixels = 0
        self._converted_from: str | None = None

    def clean(self, frames: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(frames, good)``: float32 counts of the usable frames, and which of the input
        frames they are (bool per frame).

        Parameters
        ----------
        frames : numpy.ndarray
            (n, H, W) raw frames of any dtype, or an object array of frames of mixed shapes.
        """
        frames, good = self._same_shape(frames)
        n = len(good)
        if not good.any():
            return np.zeros((0, *(self.shape or (0, 0))), np.float32), good
        batch = frames[good] if frames.dtype != object else np.stack(list(frames[good]))
        if np.iscomplexobj(batch):
            self.rejected["complex"] += int(good.sum())
            logger.error("run %s: complex frames refused (a detector measures intensities)",
                         self.run)
            return np.zeros((0, *self.shape), np.float32), np.zeros(n, bool)
        bad = self._invalid_pixels(batch)
        counts = self._as_float32(batch)
        counts[bad] = 0.0
        negative = counts < 0
        if negative.any():
            self.clipped_pixels += int(negative.sum())
            counts[negative] = 0.0
        masked_fraction = bad.reshape(len(bad), -1).mean(axis=1)
        too_masked = masked_fraction > MAX_MASKED_FRACTION
        empty = counts.reshape(len(counts), -1).sum(axis=1) <= 0
        keep = ~(too_masked | empty)
        self.rejected["mostly_masked"] += int(too_masked.sum())
        self.rejected["empty"] += int((empty & ~too_masked).sum())
        # A pixel bad in a kept frame is a detector pixel to mask from now on.
        if keep.any() and bad[keep].any():
            seen = bad[keep].any(axis=0)
            new = seen if self.bad_pixels is None else (seen & ~self.bad_pixels)
            if new.any():  # a new array only when the mask changes (callers compare identity)
                logger.warning("run %s: %d detector pixel(s) NaN/inf or saturated: masked",
                               self.run, int(new.sum()))
                self.bad_pixels = seen if self.bad_pixels is None else (self.bad_pixels | seen)
        counts = counts[keep]
        if self.bad_pixels is not None and len(counts):
            counts = self._fill(counts, self.bad_pixels)
        index = np.flatnonzero(good)
        good = np.zeros(n, bool)
        good[index[keep]] = True
        return counts, good

    # -- steps ---------------------------------------------------------------------------------
    def _same_shape(self, frames) -> tuple[np.ndarray, np.ndarray]:
        """Frames of the run's shape; the others rejected as ``wrong_shape``."""
        frames = np.asarray(frames) if not isinstance(frames, np.ndarray) else frames
        if frames.dtype == object:
            shapes = [np.shape(f) for f in frames]
        else:
            shapes = [frames.shape[1:]] * len(frames)
        if self.shape is None:
            first = next((s for s in shapes if len(s) == 2 and min(s) > 0), None)
            self.shape = tuple(first) if first is not None else None
        good = np.array([tuple(s) == self.shape for s in shapes], dtype=bool)
        if (~good).any():
            self.rejected["wrong_shape"] += int((~good).sum())
            logger.warning("run %s: %d frame(s) not of the run's shape %s: not reconstructed",
                           self.run, int((~good).sum()), self.shape)
        return frames, good

    @staticmethod
    def _invalid_pixels(batch: np.ndarray) -> np.ndarray:
        if np.issubdtype(batch.dtype, np.integer):
            # Saturated or dead pixels read as the dtype's maximum (e.g. 2**32 - 1).
            return batch == np.iinfo(batch.dtype).max
        if np.issubdtype(batch.dtype, np.floating):
            return ~np.isfinite(batch)
        return np.zeros(batch.shape, bool)

    def _as_float32(self, batch: np.ndarray) -> np.ndarray:
        if batch.dtype != np.float32 and self._converted_from is None:
            self._converted_from = str(batch.dtype)
            logger.info("run %s: %s frames converted to float32 counts", self.run, batch.dtype)
        with np.errstate(invalid="ignore", over="ignore"):
            return batch.astype(np.float32, copy=True)

    @staticmethod
    def _fill(counts: np.ndarray, bad: np.ndarray) -> np.ndarray:
        """Masked pixels get the mean of their valid 3x3 neighbours (0 where none is valid):
        the network sees a plausible pattern instead of a hole."""
        valid = (~bad).astype(np.float32)
        weight = uniform_filter(valid, size=3, mode="constant")
        for frame in counts:
            local = uniform_filter(frame * valid, size=3, mode="constant")
            frame[bad] = np.where(weight[bad] > 0, local[bad] / np.maximum(weight[bad], 1e-12),
                                  0.0)
        return counts

    def summary(self) -> dict:
        return {"frames_rejected_by_cause": dict(self.rejected),
                "masked_detector_pixels": int(self.bad_pixels.sum())
                if self.bad_pixels is not None else 0,
                "negative_pixels_clipped": self.clipped_pixels}
