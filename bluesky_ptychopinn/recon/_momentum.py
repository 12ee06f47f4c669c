"""Momentum across passes (mPIE), for while the probe is still being learnt.

mPIE (Maiden, Johnson & Li, Optica 4, 736, 2017) adds a heavy-ball step to rPIE: every so
many updates, the change since the last momentum step joins a velocity that decays by a
friction factor, and the estimate moves on along it. Here that happens once per pass:

    v <- friction * v + (x - x_last)
    x <- x + gain * v
    x_last <- x

for the object and, while it is refined, the photon-scaled probe.

When it pays was measured, not assumed (docs/momentum.md, ``scripts/momentum_study.py``): a
probe learnt from a rough start (a disc for a 3-mode zone plate) converges in fewer passes,
while a probe already known, or one not refined, gains nothing and a noisy scan ends a little
worse (momentum also carries each pass's noise on). So ``PIEOptions.momentum="auto"``
applies it only while the data say the probe is being learnt: it engages when a pass changes
the probe's intensity by more than :data:`PROBE_LEARNING`, and disengages when a pass changes
it by less than :data:`PROBE_LEARNT` or the fit error settles (:class:`~._schedule.StepSchedule`).
"""

from __future__ import annotations

import torch

__all__ = ["PROBE_LEARNING", "PROBE_LEARNT", "PassAcceleration", "PassMomentum", "probe_change"]

#: Relative change of the probe's intensity in one pass above which the probe counts as still
#: being learnt. Measured per pass (docs/momentum.md): a known probe refined on its own scan
#: moves by 0.3 - 1 %, on a noisy scan with background by up to 8 %; a disc becoming a 3-mode
#: zone plate by 20 - 30 % in its first passes.
PROBE_LEARNING = 0.1

#: Change per pass below which a probe that was being learnt counts as learnt: momentum
#: disengages, and plain rPIE with its settled step finishes (momentum would carry each
#: pass's noise on).
PROBE_LEARNT = 0.05


def probe_change(before: torch.Tensor, after: torch.Tensor) -> float:
    """Change of the mode-summed probe intensity, each normalised,
    ``| I_after / |I_after| - I_before / |I_before| |`` (blind to the photon scale, to the
    modes' phases and to their mixing, none of which is the probe's shape)."""
    a = (before.real.square() + before.imag.square()).sum(dim=0)
    b = (after.real.square() + after.imag.square()).sum(dim=0)
    norm_a, norm_b = float(a.norm()), float(b.norm())
    if not (norm_a > 0 and norm_b > 0):
        return float("inf")
    return float((b / norm_b - a / norm_a).norm())  # scale-free: photons are not the shape


class PassMomentum:
    """The heavy-ball step of one estimate (object or probe), once per pass.

    Parameters
    ----------
    friction : float
        Fraction of the velocity kept from one pass to the next, in [0, 1).
    gain : float
        Fraction of the velocity added to the estimate, in (0, 1].

    Examples
    --------
    >>> import torch
    >>> momentum = PassMomentum(friction=0.7, gain=0.5)
    >>> x = momentum.step(torch.tensor([0.0]))  # the first pass only marks
    >>> momentum.step(torch.tensor([1.0]))  # moved 1 this pass: 1 + 0.5 * 1
    tensor([1.5000])
    """

    def __init__(self, friction: float, gain: float) -> None:
        self.friction, self.gain = float(friction), float(gain)
        self._last: torch.Tensor | None = None
        self._velocity: torch.Tensor | None = None

    def reset(self) -> None:
        """Forget the history (a new estimate, a grown canvas, a rolled probe)."""
        self._last = self._velocity = None

    def roll(self, shift: tuple[int, int]) -> None:
        """The estimate was rolled by ``shift`` pixels (probe re-centring): so is its history."""
        if self._last is not None and shift != (0, 0):
            self._last = torch.roll(self._last, shift, dims=(-2, -1))
            self._velocity = torch.roll(self._velocity, shift, dims=(-2, -1))

    def mark(self, estimate: torch.Tensor) -> None:
        """Remember ``estimate`` as the point the next pass's change is measured from."""
        self._last = estimate.detach().clone()
        if self._velocity is None or self._velocity.shape != estimate.shape:
            self._velocity = torch.zeros_like(self._last)

    def step(self, estimate: torch.Tensor) -> torch.Tensor:
        """The estimate moved on along its velocity (a new tensor), remembered for the next
        pass; the first call (or one after :meth:`reset`, or with a new shape) only marks."""
        if self._last is None or self._last.shape != estimate.shape:
            self.mark(estimate)
            return estimate
        self._velocity = self.friction * self._velocity + (estimate - self._last)
        moved = estimate + self.gain * self._velocity
        self._last = moved.detach().clone()
        return moved


class PassAcceleration:
    """When and where momentum applies at the end of a pass (``PIEOptions.momentum``), for
    both engines' loops (:func:`~._pie.pie_reconstruct`, :class:`~._refiner.StreamingRefiner`).

    Parameters
    ----------
    mode : {"auto", "on", "off"}
        ``"auto"``: engaged when a pass changes the refined probe by more than
        :data:`PROBE_LEARNING` (:func:`probe_change`), disengaged when one changes it by less
        than :data:`PROBE_LEARNT` or once the fit error settles. ``"on"``: every pass.
    friction, gain : float
        Of both :class:`PassMomentum`.
    """

    def __init__(self, mode: str, friction: float, gain: float) -> None:
        self.mode = mode
        self.object = PassMomentum(friction, gain)
        self.probe = PassMomentum(friction, gain)
        self.engaged = mode == "on"
        self.passes_engaged = 0  # passes that ended with a momentum step (reported)
        self._probe_before: torch.Tensor | None = None

    def begin(self, probe: torch.Tensor) -> None:
        """The probe the first pass starts from, so that the first pass's change counts too."""
        self._probe_before = probe.detach().clone()

    def end_pass(self, obj: torch.Tensor, probe: torch.Tensor, *, probe_updating: bool,
                 settled: bool) -> torch.Tensor:
        """Apply the pass's momentum: ``obj`` in place, the probe returned (the same tensor
        when it does not move)."""
        if self.mode == "off":
            return probe
        if self.mode == "auto":
            change = (probe_change(self._probe_before, probe)
                      if probe_updating and self._probe_before is not None
                      and self._probe_before.shape == probe.shape else 0.0)
            if settled or not probe_updating or (self.engaged and change < PROBE_LEARNT):
                if self.engaged:
                    self.reset()
                self.engaged = False
            elif change > PROBE_LEARNING:
                self.engaged = True
        if self.engaged:
            self.passes_engaged += 1
            moved = self.object.step(obj)
            if moved is not obj:
                obj.copy_(moved)
            if probe_updating:
                probe = self.probe.step(probe)
            else:
                self.probe.reset()
        # The next pass's change is rPIE's own: measured from the probe as this step left it.
        self._probe_before = probe.detach().clone() if probe_updating else None
        return probe

    def rolled(self, shift: tuple[int, int]) -> None:
        """The probe was rolled by ``shift`` (re-centring)."""
        self.probe.roll(shift)
        if self._probe_before is not None and shift != (0, 0):
            self._probe_before = torch.roll(self._probe_before, shift, dims=(-2, -1))

    def reset(self) -> None:
        """A new estimate (a restart from another start): no history carries over."""
        self.object.reset()
        self.probe.reset()
