"""Options and result of the iterative PIE engines (pty-chi style dataclasses)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..errors import InvalidInputError

__all__ = ["MOMENTUM_MODES", "PIEOptions", "PIEResult", "PIE_ENGINES"]

#: Engines understood by :func:`~bluesky_ptychopinn.recon.pie_reconstruct`.
PIE_ENGINES = ("epie", "rpie")

#: ``PIEOptions.momentum``.
MOMENTUM_MODES = ("auto", "on", "off")

# Step sizes used when an alpha is left as None: ePIE's classic unit steps; rPIE's alpha is the
# regularisation weight of its denominator (Maiden et al. 2017 recommend 0.05 - 0.25).
_DEFAULT_ALPHA = {"epie": (1.0, 1.0), "rpie": (0.1, 0.5)}


@dataclass
class PIEOptions:
    """Settings of an ePIE / rPIE reconstruction.

    Attributes
    ----------
    engine : {"epie", "rpie"}
        ePIE (Maiden & Rodenburg 2009): update ``alpha conj(P) dpsi / max|P|^2``.
        rPIE (Maiden, Johnson & Li 2017): update
        ``conj(P) dpsi / ((1 - alpha)|P|^2 + alpha max|P|^2)``.
    n_epochs : int
        Passes over all positions.
    batch_size : int
        Positions updated together. 1 is the classic sequential algorithm; larger batches
        vectorise (faster, on a GPU much faster) and share the step between overlapping
        positions of a batch (their |P|^2 are summed on the object grid before dividing).
        The probe receives one (batch-averaged) update per batch, so a blind reconstruction
        needs about ``batch_size`` times more epochs to refine the probe than a known-probe one:
        use 4 - 8 when the probe is poorly known.
    alpha_object, alpha_probe : float, optional
        ePIE: step sizes in (0, 2) (default 1). rPIE: the alpha of the denominator in (0, 1]
        (defaults 0.1 for the object, 0.5 for the probe); the rPIE step itself is 1. With
        ``batch_size=1`` a probe alpha of 0.1 lets simultaneous object and probe steps overshoot
        (the pair oscillates and its scale drifts); 0.5 keeps every batch size stable.
    probe_update : bool
        Refine the probe (unknown probe) or keep it fixed (known probe).
    probe_update_start_epoch : int
        First epoch (0-based) in which the probe is refined; a few object-only epochs first
        stabilise blind reconstructions.
    recenter_probe : bool
        While the probe is refined, roll it by whole pixels after each epoch so that its
        centre of mass stays on pixel (N//2, N//2), and move the positions the opposite way
        (:func:`~bluesky_ptychopinn.recon.recentre_probe`): every exit wave, hence the data
        fit, is unchanged, and the object stays in the frame of the input positions and probe
        guess (a guess off by s from the real beam gives an object off by s: blind
        ptychography cannot tell; ``PIEResult.positions`` then differ from the input by s).
        Without it the probe, and the object with it, can drift. The roll is clipped so that
        every patch stays inside the object; the default (tight) object shape leaves 1-2 px,
        so give ``object_shape`` a few pixels of margin when the probe may be off-centre.
    anneal : bool
        Shrink the update step once the fit error has settled (a pass lowers it by less than
        0.3 %): ``1 / (1 + k / 2)`` over the ``k`` passes since, back to 1 when new frames or a
        new start bring new information (:class:`~bluesky_ptychopinn.recon.StepSchedule`).
        Without it, batched rPIE keeps fitting each batch's noise and on low-dose data the
        image gets worse the longer it runs. While the probe is refined the error must stay
        flat for 5 passes in a row (a blind run often stalls while the probe finds the beam,
        then falls again). False: the classic constant step.
    momentum : {"auto", "on", "off"}
        mPIE's momentum (Maiden, Johnson & Li 2017), once per pass: the change of the object
        (and of the refined probe) over the last pass joins a velocity kept from pass to pass
        by ``momentum_friction``, and ``momentum_gain`` times that velocity is added
        (:class:`~bluesky_ptychopinn.recon.PassMomentum`). ``"auto"`` (default): only while the
        probe is being learnt: from a pass that changes its intensity by more than 10 % (as a
        probe started from a disc does) to one that changes it by less than 5 % or the error
        settling. Measured on five held-out blind scans (docs/momentum.md): where it engaged for
        long, 95 % of plain rPIE's best in 17 instead of 29 and 15 instead of 25 passes, ending
        -0.008 and +0.026 against plain rPIE; on a 1e3-photon scan where neither gets anywhere
        (best 0.09) it ended at 0.001 instead of 0.061; on two it hardly engaged (no change). A
        known probe never engages it. ``"on"``: every pass (hurts a known, refined probe);
        ``"off"``: plain rPIE.
    momentum_friction, momentum_gain : float
        Velocity kept per pass, in [0, 1), and the fraction of it applied, in (0, 1].
    position_correction : bool
        Refine each frame's probe centre (encoder errors, jitter) from its own exit-wave
        update (:func:`~bluesky_ptychopinn.recon.position_shifts`): the engine moves each
        position by ``position_gain`` times its least-squares shift, at most 0.5 px
        an update, from pass ``position_correction_start_epoch`` on, and removes the mean move
        (a common shift is invisible to the data). About a third more time per pass. Off by
        default; on for scans whose positions are known to be off by tenths of a pixel or more.
    position_correction_start_epoch : int
        First pass (0-based) with position correction: the object must exist first.
    position_gain : float
        Fraction in (0, 1] of each shift estimate applied.
    photons_per_frame : float, optional
        Incident photons per frame when known (ion chamber, simulation): the probe guess is
        scaled to it. By default the scale is estimated from the data, assuming the initial
        object, so the reconstructed object carries the scale ambiguity of ptychography.
    seed : int, optional
        Seed of the random order of positions in each epoch (None: non-deterministic).
    device : str or torch.device, optional
        Where to compute. Default: CUDA when available, else CPU.
    progress : bool
        Show a progress bar (epoch and error).
    """

    engine: str = "rpie"
    n_epochs: int = 100
    batch_size: int = 16
    alpha_object: float | None = None
    alpha_probe: float | None = None
    probe_update: bool = True
    probe_update_start_epoch: int = 0
    recenter_probe: bool = True
    anneal: bool = True
    momentum: str = "auto"
    momentum_friction: float = 0.7
    momentum_gain: float = 0.5
    position_correction: bool = False
    position_correction_start_epoch: int = 2
    position_gain: float = 0.5
    photons_per_frame: float | None = None
    seed: int | None = 0
    device: str | None = None
    progress: bool = True

    def resolved_alphas(self) -> tuple[float, float]:
        """(alpha_object, alpha_probe) with the engine's defaults filled in."""
        defaults = _DEFAULT_ALPHA[self.engine]
        obj = defaults[0] if self.alpha_object is None else float(self.alpha_object)
        probe = defaults[1] if self.alpha_probe is None else float(self.alpha_probe)
        return obj, probe

    def validate(self) -> None:
        """Raise :class:`InvalidInputError` naming the first setting out of range."""
        if self.engine not in PIE_ENGINES:
            raise InvalidInputError(f"engine: expected one of {PIE_ENGINES}, got {self.engine!r}")
        for name in ("n_epochs", "batch_size"):
            value = getattr(self, name)
            if not (isinstance(value, (int, np.integer)) and value >= 1):
                raise InvalidInputError(f"{name}: expected an integer >= 1, got {value!r}")
        start = self.probe_update_start_epoch
        if not (isinstance(start, (int, np.integer)) and start >= 0):
            raise InvalidInputError(
                f"probe_update_start_epoch: expected an integer >= 0, got {start!r}"
            )
        epie = self.engine == "epie"
        bounds = "(0, 2)" if epie else "(0, 1]"
        names = ("alpha_object", "alpha_probe")
        for name, value in zip(names, self.resolved_alphas(), strict=True):
            inside = 0 < value < 2 if epie else 0 < value <= 1
            if not (math.isfinite(value) and inside):
                raise InvalidInputError(
                    f"{name}: expected a value in {bounds} for {self.engine}, got {value!r}"
                )
        if self.momentum not in MOMENTUM_MODES:
            raise InvalidInputError(
                f"momentum: expected one of {MOMENTUM_MODES}, got {self.momentum!r}")
        if not (0 <= self.momentum_friction < 1 and 0 < self.momentum_gain <= 1):
            raise InvalidInputError(
                "momentum_friction in [0, 1) and momentum_gain in (0, 1]: got "
                f"{self.momentum_friction!r} and {self.momentum_gain!r}")
        if not (0 < self.position_gain <= 1):
            raise InvalidInputError(
                f"position_gain: expected a value in (0, 1], got {self.position_gain!r}")
        start = self.position_correction_start_epoch
        if not (isinstance(start, (int, np.integer)) and start >= 0):
            raise InvalidInputError(
                f"position_correction_start_epoch: expected an integer >= 0, got {start!r}")
        photons = self.photons_per_frame
        if photons is not None and not (math.isfinite(photons) and photons > 0):
            raise InvalidInputError(f"photons_per_frame: expected > 0, got {photons!r}")


@dataclass
class PIEResult:
    """Outcome of :func:`~bluesky_ptychopinn.recon.pie_reconstruct`.

    Attributes
    ----------
    object : numpy.ndarray
        complex64 (H, W) reconstructed transmission function.
    probe : numpy.ndarray
        complex64 (M, N, N) probe modes, unit norm (sum |P|^2 = 1).
    photon_scale : float
        Incident photons per frame: the model intensity is ``photon_scale`` times the far field
        of the unit-norm probe times the object (CONVENTIONS: a scalar kept beside the probe).
    error_history : list of float
        Per epoch, the normalised amplitude error over valid pixels,
        ``sum (sqrt(I_model) - sqrt(I_meas))^2 / sum I_meas``, of the estimates each batch saw.
    timings : dict
        ``setup_s``, ``iterate_s``, ``per_epoch_s`` (mean) and ``total_s`` wall-clock seconds.
    options : PIEOptions
        The settings used (alphas resolved).
    device : str
        Where it ran.
    positions : numpy.ndarray
        float64 (n, 2) final probe centres (y, x) in object pixels, the convention of the input
        positions: the input minus the whole pixels the probe was rolled by when re-centred
        (``options.recenter_probe``), plus the moves of ``options.position_correction``, so
        ``probe`` at ``positions`` reproduces the data; equal to the input otherwise. None only
        for a result built by hand.
    """

    object: np.ndarray
    probe: np.ndarray
    photon_scale: float
    error_history: list[float]
    timings: dict[str, float]
    options: PIEOptions
    device: str = "cpu"
    positions: np.ndarray | None = None
