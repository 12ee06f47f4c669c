"""Background refinement: a :class:`~bluesky_ptychopinn.recon.StreamingRefiner` in its own
thread, on a duty cycle while frames arrive and to a stop rule after the last one."""

from __future__ import annotations

import logging
import math
import os
import threading
import time

from ..errors import InvalidInputError
from ._refiner import RefinedSnapshot, StreamingRefiner

__all__ = ["RefinerThread"]

logger = logging.getLogger(__name__)


class RefinerThread(threading.Thread):
    """Run a :class:`StreamingRefiner` in the background; keep its latest snapshot.

    While frames arrive it refines in slices of ``slice_s`` and rests ``(1 - duty) / duty``
    times as long after each (so the network and the RunEngine keep their share of the cores);
    after :meth:`finish` it refines at full duty until the stop rule holds.

    Parameters
    ----------
    refiner : StreamingRefiner
        What to run.
    snapshot_interval_s : float
        How often :attr:`latest` is refreshed during the scan (the first refined image is
        published at once, then at intervals doubling from 0.05 s up to this).
    slice_s : float
        Refinement per slice, seconds.
    duty : float
        Fraction of wall time spent refining during the scan, (0, 1].
    nice : int
        Niceness added to this thread alone (Linux schedules threads separately), so that
        when cores are short the RunEngine and the network preview run first and the
        refinement takes what is left; 0 to leave it.
    """

    def __init__(self, refiner: StreamingRefiner, *, snapshot_interval_s: float = 0.5,
                 slice_s: float = 0.05, duty: float = 0.5, nice: int = 10,
                 name: str = "ptychopinn-refiner"):
        super().__init__(name=name, daemon=True)
        if not 0 < duty <= 1:
            raise InvalidInputError(f"duty: expected a fraction in (0, 1], got {duty!r}")
        self.refiner = refiner
        self.nice = int(nice)
        self.snapshot_interval_s, self.slice_s, self.duty = snapshot_interval_s, slice_s, duty
        self.latest: RefinedSnapshot | None = None
        self.last_frame_at = time.monotonic()
        self.failed: str | None = None
        self.final: RefinedSnapshot | None = None
        self._wake = threading.Event()
        self._finish: dict | None = None
        self._cancel = threading.Event()
        self.done = threading.Event()
        self.residual_frames = 128
        self.publish_s = 0.0  # cost of the last publish (residuals included)
        self._scored_seed, self._scored_at, self._network_residual = None, -math.inf, math.nan
        self._published_epochs = -1.0
        self._publishes = 0
        self.first_interval_s = 0.05

    def add(self, frames, positions_px) -> None:
        """Hand new frames over (any thread; returns at once)."""
        self.refiner.add(frames, positions_px)
        self.last_frame_at = time.monotonic()
        self._wake.set()

    def offer_seed(self, obj, weight, origin_px) -> None:
        self.refiner.offer_seed(obj, weight, origin_px)

    def finish(self, *, max_epochs: float | None = None, time_s: float | None = 5.0,
               tol: float | None = 1e-3) -> None:
        """No more frames: refine until a rule holds, then set :attr:`final` and :attr:`done`."""
        self.refiner.wait_for_seed_frames = 0  # no more frames: stop waiting for a network image
        self._finish = {"max_epochs": max_epochs, "time_s": time_s, "tol": tol}
        self._wake.set()

    def cancel(self) -> None:
        """Stop at the end of the slice (or, after :meth:`finish`, the piece) under way;
        :attr:`final` is then the state at that point and :attr:`done` is set."""
        self._cancel.set()
        self._wake.set()

    def _publish(self) -> None:
        """Refresh :attr:`latest`: the snapshot and both residuals on the same frames.

        The network's residual is recomputed only for a new network image or every
        ``2 * snapshot_interval_s`` (its object does not change between offers; the probe
        drifts slowly), which halves the cost of a publish.
        """
        t0 = time.perf_counter()
        refiner = self.refiner
        if refiner.start is None:
            return  # nothing refined yet: an untouched start is no refined image
        snap = refiner.snapshot()
        if snap.n_frames:
            snap.residual = refiner.own_residual(max_frames=self.residual_frames)
            seed = refiner.seed
            if seed is not None:
                stale = (seed is not self._scored_seed or time.monotonic() - self._scored_at
                         > 2 * self.snapshot_interval_s)
                if stale:
                    self._network_residual = refiner.residual_of(
                        seed[0], seed[2], max_frames=self.residual_frames)
                    self._scored_seed, self._scored_at = seed, time.monotonic()
                snap.network_residual = self._network_residual
        self.latest = snap
        self._publishes += 1
        self._published_epochs = refiner.epochs
        self.publish_s = time.perf_counter() - t0

    def _interval(self) -> float:
        """Seconds between publishes: the first refined image at once, then intervals that
        double up to ``snapshot_interval_s`` (the early images improve fastest)."""
        if self.latest is None:
            return 0.0
        # (the exponent capped: 2.0 ** 1024 raises OverflowError, i.e. after ~8 min)
        return min(self.snapshot_interval_s,
                   self.first_interval_s * 2.0 ** min(self._publishes, 60))

    def _lower_priority(self) -> None:
        if not self.nice or not hasattr(os, "setpriority"):
            return
        try:  # PRIO_PROCESS with a thread id: this thread only (Linux)
            tid = threading.get_native_id()
            os.setpriority(os.PRIO_PROCESS, tid, os.getpriority(os.PRIO_PROCESS, tid) + self.nice)
        except OSError as exc:
            logger.debug("refiner priority unchanged: %s", exc)

    def run(self) -> None:
        self._lower_priority()
        refiner = self.refiner
        last_snapshot = time.monotonic()
        try:
            while not self._cancel.is_set() and self._finish is None:
                if not refiner.ready:
                    self._wake.wait(0.2)
                    self._wake.clear()
                    continue
                t0 = time.perf_counter()
                refiner.step(self.slice_s)
                if time.monotonic() - last_snapshot >= self._interval():
                    self._publish()
                    last_snapshot = time.monotonic()
                rest = (time.perf_counter() - t0) * (1 - self.duty) / self.duty
                if rest > 0:
                    self._cancel.wait(rest)
            if self._finish is not None and not self._cancel.is_set():
                self._refine_to_rule(**self._finish)
            if self.latest is None or self.refiner.epochs != self._published_epochs:
                self._publish()
            self.final = self.latest
        except Exception as exc:  # recorded; the owner fails only the refined part
            logger.exception("refinement failed")
            self.failed = f"{type(exc).__name__}: {exc}"
        finally:
            self.done.set()

    def _refine_to_rule(self, max_epochs: float | None, time_s: float | None,
                        tol: float | None) -> None:
        """After the scan: full duty until the epochs, time or convergence rule holds,
        refreshing :attr:`latest` every ``snapshot_interval_s``."""
        refiner = self.refiner
        t0, epochs0, passes0 = time.perf_counter(), refiner.epochs, refiner.passes
        while not self._cancel.is_set() and refiner.ready:
            piece = self.snapshot_interval_s
            if time_s is not None:
                # The publish after this piece counts against the budget too.
                piece = min(piece, time_s - (time.perf_counter() - t0) - self.publish_s)
                if piece <= 0.01:
                    break
            left = None if max_epochs is None else max_epochs - (refiner.epochs - epochs0)
            if left is not None and left <= 1e-9:
                break
            refiner.run(time_s=piece, max_epochs=left, slice_s=min(0.1, piece))
            self._publish()
            if max_epochs is not None and refiner.epochs - epochs0 >= max_epochs:
                break
            history = refiner.error_history
            if (tol is not None and refiner.passes - passes0 >= 2 and len(history) >= 2
                    and history[-2] - history[-1] < tol * history[-2]):
                break
