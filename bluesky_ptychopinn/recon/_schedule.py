"""When to shrink the PIE update step: once the data stop telling the engine anything new.

Batched rPIE is a stochastic method: every batch pulls the object towards its own frames, noise
included. While the fit error still falls, that pull is signal; once a pass lowers the error by
less than ``settle`` (0.3 %), what is left is mostly each batch's noise, and at full step the
object keeps wandering around the solution. On low-dose data that shows as an image that gets
*worse* the longer the refinement runs (measured on simulated scans at 1e4 and 1e6 photons per
frame: the FRC-AUC peaked after a few passes and then fell by 0.02 - 0.06). From then on the
step decays as ``1 / (1 + k / half_passes)`` over the ``k`` passes since, the classic
Robbins-Monro rate, so the iterates average the batches' noise out instead of following it.

The data decide when: well-exposed scans, or a probe still being learnt, keep their error
falling and their full step (a blind scan at 1e5 photons settled only after 15 passes, a noisy
one at 1e4 photons with background after 4). Anything that brings new information back resets
the step: the error of a pass rising by more than ``rise`` (new frames, a restart from another
estimate) or the frame count growing by ``regrow`` since the error settled. Frames never fitted
yet always get the full step (the refiner's first visit of each new frame).

While the probe is refined, one flat pass is no evidence of noise: a blind run often stalls for
a few passes while the probe finds the beam and then falls again (measured: a blind rPIE with
an off-centre beam stalled at passes 4-5 and fell by 5 - 40 % a pass from pass 9 on; with the
step shrunk from pass 4 its phase FRC-AUC ended at 0.60, not 0.92). Then the error must stay
flat for ``patience`` passes in a row (5) before the step shrinks.
"""

from __future__ import annotations

import math

from ._options import PIEOptions

__all__ = ["StepSchedule"]


class StepSchedule:
    """Relaxation factor of the PIE updates, driven by the per-pass fit error.

    Parameters
    ----------
    settle : float
        A pass whose error falls by less than this fraction of its value counts as settled.
    half_passes : float
        Passes after settling at which the step is halved (then a third after twice as many).
    rise : float
        A pass error this fraction above the previous one resets the step to 1.
    regrow : float
        Frame count growth (fraction) since settling that resets the step to 1.
    patience : int
        Flat passes in a row needed to settle.
    enabled : bool
        False keeps the step at 1 (plain rPIE / ePIE).

    Examples
    --------
    >>> schedule = StepSchedule()
    >>> for error in (1.0, 0.5, 0.45, 0.449, 0.449, 0.449):
    ...     schedule.end_pass(error, n_frames=500)
    >>> schedule.settled_at, schedule.step  # settled at pass 4, two passes ago
    (4, 0.5)
    >>> schedule.end_pass(0.6, n_frames=800)  # new frames: their information is new
    >>> schedule.step
    1.0
    """

    def __init__(self, *, settle: float = 0.003, half_passes: float = 2.0, rise: float = 0.05,
                 regrow: float = 0.1, patience: int = 1, enabled: bool = True) -> None:
        self.settle, self.half_passes = float(settle), float(half_passes)
        self.rise, self.regrow, self.enabled = float(rise), float(regrow), bool(enabled)
        self.patience = int(patience)
        self.passes = 0
        self._flat = 0  # flat passes in a row
        self.settled_at: int | None = None  # pass count when the error settled
        self._frames_at_settle = 0
        self._last: float | None = None

    @classmethod
    def for_options(cls, options: PIEOptions) -> StepSchedule:
        """The schedule an engine with ``options`` uses: off without ``anneal``; settling
        after one flat pass with a known probe, after five in a row while it is refined."""
        return cls(enabled=options.anneal, patience=5 if options.probe_update else 1)

    @property
    def step(self) -> float:
        """The factor on the next updates, in (0, 1]."""
        if not self.enabled or self.settled_at is None:
            return 1.0
        return 1.0 / (1.0 + (self.passes - self.settled_at) / self.half_passes)

    def end_pass(self, error: float, n_frames: int) -> None:
        """Record a completed pass's error over ``n_frames`` frames."""
        self.passes += 1
        last, self._last = self._last, error
        if last is None or not (math.isfinite(error) and math.isfinite(last)) or last <= 0:
            return
        grew = n_frames > self._frames_at_settle * (1 + self.regrow)
        if error > last * (1 + self.rise) or (self.settled_at is not None and grew):
            self.reset()
        elif self.settled_at is None:
            self._flat = self._flat + 1 if (last - error) < self.settle * error else 0
            if self._flat >= self.patience:
                self.settled_at, self._frames_at_settle = self.passes, n_frames

    def reset(self) -> None:
        """Back to the full step (new information: many new frames, a rising error)."""
        self.settled_at, self._frames_at_settle, self._flat = None, 0, 0

    def restart(self) -> None:
        """Back to the full step for a new estimate: its first pass is not compared with the
        error of the one it replaced."""
        self.reset()
        self._last = None
