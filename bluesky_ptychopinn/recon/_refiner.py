"""The streaming iterative refiner: rPIE over the frames received so far, beside the network.

The network gives an image from the first frames at a constant cost per frame; iterative
ptychography gives a better one once frames overlap. :class:`StreamingRefiner` keeps every
frame's amplitude and runs batched rPIE (or ePIE) passes over them while more arrive, refining
object and probe; :class:`~bluesky_ptychopinn.recon.RefinerThread` runs it on a time budget in
the background and keeps the latest :class:`RefinedSnapshot` for whoever publishes it.

Where to start is decided per run from the data: the flat object, the network's stitched
object, or the network's object with its low spatial frequencies removed. Each candidate gets
one trial pass over the frames so far and the one with the lowest Fourier-magnitude residual
(:func:`~bluesky_ptychopinn.recon.amplitude_residual`, no ground truth needed) is continued.
Why not always the network: its stitched object carries low-frequency errors (a phase offset
between regions, a slow amplitude ramp) that rPIE's local updates remove only slowly, so a seed
that looks better can converge to a worse image (docs/refinement.md, ``scripts/seed_study.py``).

With ``start="auto"`` the refiner never waits for the network: it starts flat as soon as it
has ``min_frames`` frames (unless a network image is already there, which then takes part in
the trial). A network image offered later is *reconsidered* once the refiner has made a full
pass: if its residual is lower than the refined state's, the refined state and the network
candidates get one trial pass each over the same sample, and the refiner restarts from a
network candidate only if it beats continuing. The first network image is weighed then, later
ones at most ``reconsider`` times in all and each only after the frame count has doubled, so
the cost stays bounded (and is two residual evaluations where the refined state is better).
"""

from __future__ import annotations

import collections
import logging
import math
import threading
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from scipy.ndimage import gaussian_filter

from ..errors import InvalidInputError
from ._canvas import growth_pads
from ._momentum import PassAcceleration
from ._options import PIEOptions
from ._pie import _check_probe, _pie_batch, _resolve_device, recentre_probe, to_fft_order
from ._positions import PositionCorrector
from ._residual import amplitude_residual, place_on_canvas
from ._schedule import StepSchedule
from ._streaming import ObjectParts

__all__ = ["RefinedSnapshot", "StreamingRefiner", "START_CHOICES", "probe_from_frames"]

logger = logging.getLogger(__name__)

#: Accepted values of ``start``: ``"auto"`` lets the residual choose among the others.
START_CHOICES = ("auto", "flat", "network", "network_highpass")

_CHUNK = 1024  # frames per block of the amplitude store


@dataclass
class RefinedSnapshot(ObjectParts):
    """The refined state at one moment.

    Attributes
    ----------
    object : numpy.ndarray
        complex64 (H, W) refined object on the refiner's canvas (ones where nothing was seen).
    probe : numpy.ndarray
        complex64 (M, N, N) refined probe, unit norm.
    photon_scale : float
        Photons per frame carried by the probe (intensity = scale * |F(P O)|^2).
    error : float
        Normalised Fourier-magnitude residual of the last full pass (see
        :attr:`StreamingRefiner.error`).
    epochs : float
        Passes over the frames so far (fractional while a pass is under way).
    n_frames : int
        Frames the refiner holds.
    origin_px : tuple of float
        Object-pixel coordinate of canvas pixel (0, 0).
    start : str
        How the object was started (``flat``, ``network`` or ``network_highpass``).
    start_residuals : dict
        Residual of each candidate start after its trial pass.
    reconsiderations : list of dict
        Each later network image weighed against the refined state: frames, epochs, the
        residuals after the trial pass and which was continued.
    busy_s : float
        Seconds spent refining so far.
    residual, network_residual : float
        Fourier-magnitude residual of the refined object and of the latest network object
        offered (:meth:`StreamingRefiner.offer_seed`) on the same frames, probe and fitted scale
        (``nan`` when not evaluated): the lower one is the better estimate of this run.
    position_correction_rms_px : float
        Root-mean-square move of the probe centres by position correction so far, object
        pixels (0 without ``PIEOptions.position_correction``).
    position_moves : numpy.ndarray or None
        With position correction: (n, 2) move (y, x) of each frame's probe centre, object
        pixels, mean removed, for the first ``n_frames`` frames.
    probe_roll_px : tuple of float
        Whole pixels (dy, dx) the refined probe was rolled by to keep it centred: ``probe`` goes
        with the positions ``given - probe_roll_px + position_moves``.
    """

    object: np.ndarray
    probe: np.ndarray
    photon_scale: float
    error: float
    epochs: float
    n_frames: int
    origin_px: tuple[float, float]
    start: str = "flat"
    start_residuals: dict = field(default_factory=dict)
    reconsiderations: list = field(default_factory=list)
    busy_s: float = 0.0
    residual: float = math.nan
    network_residual: float = math.nan
    position_correction_rms_px: float = 0.0
    position_moves: np.ndarray | None = None
    probe_roll_px: tuple[float, float] = (0.0, 0.0)

    @property
    def best(self) -> str:
        """``"refined"`` or ``"network"``: the estimate that explains the frames better."""
        if math.isfinite(self.network_residual) and not self.network_residual > self.residual:
            return "network"
        return "refined"


class _AmplitudeStore:
    """Frame amplitudes in fixed-size blocks: appending never copies what is stored."""

    def __init__(self, size: int, device: torch.device) -> None:
        self.size, self.device = size, device
        self.blocks: list[torch.Tensor] = []
        self.n = 0

    def append(self, amplitudes: torch.Tensor) -> None:
        done = 0
        while done < len(amplitudes):
            if self.n == len(self.blocks) * _CHUNK:
                self.blocks.append(torch.empty((_CHUNK, self.size, self.size),
                                               dtype=torch.float32, device=self.device))
            block, offset = divmod(self.n, _CHUNK)
            take = min(_CHUNK - offset, len(amplitudes) - done)
            self.blocks[block][offset : offset + take] = amplitudes[done : done + take]
            self.n += take
            done += take

    def gather(self, index: torch.Tensor) -> torch.Tensor:
        if len(self.blocks) == 1:
            return self.blocks[0][index]
        block, offset = index // _CHUNK, index % _CHUNK
        out = torch.empty((len(index), self.size, self.size), dtype=torch.float32,
                          device=self.device)
        for b in torch.unique(block).tolist():
            sel = block == b
            out[sel] = self.blocks[b][offset[sel]]
        return out

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.blocks)


def probe_from_frames(counts: np.ndarray) -> np.ndarray:
    """A probe guess from the data alone: the field whose far field is the mean measured
    amplitude, with a flat phase (a focused beam of the right size and spectrum).

    For a weakly scattering sample the mean diffraction pattern is the probe's own far field,
    so this recovers the probe's extent and power; its phase is refined by rPIE.
    """
    mean = np.sqrt(np.asarray(counts, dtype=np.float64).mean(axis=0))
    field = np.fft.fftshift(np.fft.ifft2(np.fft.ifftshift(mean), norm="ortho"))
    return field.astype(np.complex64)[None]


class StreamingRefiner:
    """Batched rPIE over a growing set of frames, one time slice at a time.

    Parameters
    ----------
    probe : array_like or None
        (N, N) or (M, N, N) probe at the object pixel size, any norm: the run's known probe, or
        a guess (then keep ``options.probe_update``). ``None``: estimated from the first frames
        (:func:`probe_from_frames`) and refined; ``frame_size`` must then be given.
    object_shape : (int, int)
        Initial canvas; grown (with ones) when a position falls outside.
    origin_px : (float, float)
        Object-pixel coordinate of canvas pixel (0, 0), as in
        :class:`~bluesky_ptychopinn.recon.StreamingReconstructor`.
    options : PIEOptions, optional
        Engine, batch size, alphas, probe refinement, seed, device (``n_epochs`` is the default
        epoch limit of :meth:`run`).
    start : {"auto", "flat", "network", "network_highpass"}
        Starting object. ``"auto"``: trial each candidate (the network ones only if
        :meth:`offer_seed` was called) and continue with the lowest residual.
    min_frames : int
        Frames needed before the first update (fewer do not overlap enough to refine).
    trial_frames : int
        Frames each candidate start is tried on (a fixed random sample: the trial costs the
        same at any scan length).
    wait_for_seed_frames : int
        Wait for :meth:`offer_seed` (the network's first image) until this many frames have
        arrived before starting (default 0: start as soon as ``min_frames`` frames are in; a
        later network image is reconsidered instead, see ``reconsider``).
    reconsider : int
        With ``start="auto"``: how many later network images may be weighed against the
        refined state (one trial pass each over ``trial_frames`` frames; the first whenever it
        comes, later ones at most once per doubling of the frame count); 0 never.
    max_frames : int
        Frames held at most (4 bytes per detector pixel each: 16 KB at 64 px). Later frames are
        counted in :attr:`frames_dropped` and not refined, so no scan can exhaust memory.
    max_canvas_px : int
        Largest canvas side the positions may make the object grow to (8 bytes per pixel:
        0.5 GB at 8192); :meth:`add` refuses frames beyond it (one glitched encoder reading
        far away would otherwise allocate without bound).

    Examples
    --------
    >>> import numpy as np
    >>> from bluesky_ptychopinn.physics import make_probe, simulate_diffraction
    >>> from bluesky_ptychopinn.recon import PIEOptions, StreamingRefiner
    >>> probe = make_probe("zone_plate", 32, 40e-9, 8_800)
    >>> yy, xx = np.mgrid[:96, :96]
    >>> truth = np.exp(0.5j * np.sin(yy / 6) * np.cos(xx / 5)).astype(np.complex64)
    >>> pos = np.stack(np.meshgrid(np.arange(24, 73, 4.0), np.arange(24, 73, 4.0)), -1)
    >>> pos = pos.reshape(-1, 2)
    >>> counts = simulate_diffraction(truth, probe, pos, photons=1e6, poisson=False).counts
    >>> refiner = StreamingRefiner(probe, object_shape=(96, 96),
    ...                            options=PIEOptions(device="cpu", probe_update=False))
    >>> refiner.add(counts, pos)
    169
    >>> final = refiner.run(max_epochs=10)
    >>> final.error < 0.05
    True
    """

    def __init__(
        self,
        probe,
        *,
        object_shape: tuple[int, int],
        origin_px: tuple[float, float] = (0.0, 0.0),
        options: PIEOptions | None = None,
        start: str = "auto",
        min_frames: int = 16,
        max_frames: int = 65_536,
        max_canvas_px: int = 8192,
        frame_size: int | None = None,
        trial_frames: int = 256,
        wait_for_seed_frames: int = 0,
        reconsider: int = 3,
    ) -> None:
        self.options = PIEOptions(progress=False) if options is None else options
        self.options.validate()
        if start not in START_CHOICES:
            raise InvalidInputError(f"start: one of {START_CHOICES}, got {start!r}")
        self.device = _resolve_device(self.options.device)
        if probe is None:
            if frame_size is None:
                raise InvalidInputError("frame_size: needed when the probe is to be estimated")
            self.frame_size = int(frame_size)
            self.probe: torch.Tensor | None = None  # estimated at the first frames
        else:
            probe_t = torch.as_tensor(np.asarray(probe) if not torch.is_tensor(probe) else probe)
            self.frame_size = int(probe_t.shape[-1])
            self.probe = _check_probe(probe_t, self.frame_size).to(self.device)  # unit norm
        self.photon_scale: float | None = self.options.photons_per_frame
        self.alphas = self.options.resolved_alphas()
        self.start_choice = start
        self.start: str | None = None
        self.start_residuals: dict[str, float] = {}
        self.min_frames, self.max_frames = int(min_frames), int(max_frames)
        self.max_canvas_px = max(int(max_canvas_px), *(int(v) for v in object_shape))
        # Extent (object pixels) the canvas must cover: its start, then every accepted frame.
        self._extent = (np.asarray(origin_px, dtype=np.float64),
                        np.asarray(origin_px, dtype=np.float64)
                        + np.asarray(object_shape, dtype=np.float64))
        self.trial_frames, self.wait_for_seed_frames = int(trial_frames), int(wait_for_seed_frames)
        self.reconsider = int(reconsider)
        #: One entry per weighing of a network image against the refined state.
        self.reconsiderations: list[dict] = []
        self._weighed_seed: tuple | None = None  # the seed the start or the last weighing saw
        self._reconsider_at = 0  # frames needed before the next weighing
        self.origin = np.asarray(origin_px, dtype=np.float64)
        self.obj = torch.ones(tuple(int(s) for s in object_shape), dtype=torch.complex64,
                              device=self.device)
        self._store = _AmplitudeStore(self.frame_size, self.device)
        self._positions = np.zeros((0, 2), dtype=np.float64)  # object pixels (not canvas)
        self._pos_t = torch.zeros((0, 2), dtype=torch.float32, device=self.device)
        self._measured = torch.zeros(0, dtype=torch.float64)  # sum |a|^2 per frame
        self._pending: list[tuple[np.ndarray, np.ndarray]] = []
        # Frames accepted by add(), held, queued or being ingested: the bound is checked on
        # this, under the lock, so an add() during an ingest cannot see too few.
        self._accepted = 0
        self._lock = threading.Lock()
        self._unseen: collections.deque[int] = collections.deque()
        self._order = torch.zeros(0, dtype=torch.int64)
        self._cursor = 0
        self._generator = torch.Generator().manual_seed(int(self.options.seed or 0))
        self._seed: tuple[np.ndarray, np.ndarray, tuple[float, float]] | None = None
        self.passes = 0  # completed passes over all frames held at their start
        self._visited = 0  # frames updated in the current pass
        self._pass_error = self._pass_measured = 0.0
        self.error = math.nan
        self.error_history: list[float] = []
        #: Shrinks the update step once the error has settled (noise, not signal, is left).
        self.schedule = StepSchedule.for_options(self.options)
        #: Momentum across passes while the probe is being learnt (``options.momentum``).
        self.acceleration = PassAcceleration(self.options.momentum,
                                             self.options.momentum_friction,
                                             self.options.momentum_gain)
        self._corrector = PositionCorrector(self.options.position_gain, self.frame_size,
                                            self.device)
        self._roll = np.zeros(2)  # whole pixels the probe was rolled by (re-centring), summed
        self.frames_dropped = 0
        self.busy_s = 0.0
        self._mask_t = torch.ones((self.frame_size, self.frame_size), dtype=torch.bool,
                                  device=self.device)

    # -- input (any thread) ------------------------------------------------------------------
    def add(self, frames, positions_px) -> int:
        """Queue frames (n, N, N) counts at probe centres (n, 2) object pixels; thread-safe.

        Returns the number of frames held or queued. Frames beyond ``max_frames`` are dropped
        and counted in :attr:`frames_dropped`.
        """
        counts = np.asarray(frames, dtype=np.float32)
        if counts.ndim == 2:
            counts = counts[None]
        pos = np.asarray(positions_px, dtype=np.float64).reshape(-1, 2)
        n = self.frame_size
        if counts.ndim != 3 or counts.shape[1:] != (n, n) or len(pos) != len(counts):
            raise InvalidInputError(
                f"frames: expected (n, {n}, {n}) with n positions, got {counts.shape} and "
                f"{len(pos)} positions"
            )
        if not (np.isfinite(counts).all() and np.isfinite(pos).all()) or (counts < 0).any():
            raise InvalidInputError("frames and positions must be finite, counts >= 0")
        empty = np.flatnonzero(counts.reshape(len(counts), -1).sum(axis=1) <= 0)
        if len(empty):
            raise InvalidInputError(f"all-zero frame(s) {empty[:8].tolist()} carry no "
                                    "information: drop them before adding")
        with self._lock:
            if len(pos):
                half = n / 2 + 1  # the patch around each centre, and a pixel of rounding
                lo = np.minimum(self._extent[0], pos.min(axis=0) - half)
                hi = np.maximum(self._extent[1], pos.max(axis=0) + half)
                if ((hi - lo) > self.max_canvas_px).any():
                    far = np.abs(pos - (self._extent[0] + self._extent[1]) / 2).max(axis=1)
                    raise InvalidInputError(
                        f"positions: the frames would grow the canvas to "
                        f"{int(np.ceil((hi - lo).max()))} px, more than max_canvas_px="
                        f"{self.max_canvas_px} (farthest position {pos[int(far.argmax())]} "
                        "object pixels); a glitched reading? nothing of this batch was added")
            room = max(self.max_frames - self._accepted, 0)
            if room < len(pos):
                self.frames_dropped += len(pos) - room
                counts, pos = counts[:room], pos[:room]
            if len(pos):
                self._pending.append((counts, pos))
                self._accepted += len(pos)
                # (the frames dropped for room widen it too: harmless, they were in bounds)
                self._extent = (lo, hi)
            return self._accepted

    def offer_seed(self, obj: np.ndarray, weight: np.ndarray,
                   origin_px: tuple[float, float]) -> None:
        """The network's stitched object (and its coverage) as a candidate start; thread-safe.

        The latest offer before the start takes part in the start trial; with
        ``start="auto"`` a later one is reconsidered (see ``reconsider``).
        """
        with self._lock:
            self._seed = (np.asarray(obj), np.asarray(weight), tuple(origin_px))

    @property
    def seed(self) -> tuple[np.ndarray, np.ndarray, tuple[float, float]] | None:
        """The latest :meth:`offer_seed` (object, weight, origin), or None; thread-safe."""
        with self._lock:
            return self._seed

    @property
    def n_frames(self) -> int:
        return self._store.n

    @property
    def epochs(self) -> float:
        """Completed passes plus the fraction of the current one."""
        return self.passes + (self._visited / self._store.n if self._store.n else 0.0)

    def _waits_for_seed(self, frames: int) -> bool:
        if self.start is not None or self.start_choice not in ("auto", "network",
                                                                "network_highpass"):
            return False
        seeded = self.seed is not None
        return not seeded and frames < self.wait_for_seed_frames

    @property
    def _waiting_for_seed(self) -> bool:
        return self._waits_for_seed(self._store.n)

    @property
    def ready(self) -> bool:
        """Enough frames (held or queued) for an update, and not waiting for the network's
        image (``wait_for_seed_frames``)."""
        with self._lock:
            frames = self._accepted
        return frames >= self.min_frames and not self._waits_for_seed(frames)

    # -- canvas ------------------------------------------------------------------------------
    def _canvas(self, positions: np.ndarray) -> np.ndarray:
        """Canvas coordinates of ``positions``, growing the canvas (with ones) if needed."""
        local = positions - self.origin
        shape = np.array(self.obj.shape)
        pads = growth_pads(local, tuple(shape), self.frame_size)
        if pads is not None:
            pad_lo, pad_hi = pads
            new = torch.ones(tuple(shape + pad_lo + pad_hi), dtype=self.obj.dtype,
                             device=self.device)
            new[pad_lo[0] : pad_lo[0] + shape[0], pad_lo[1] : pad_lo[1] + shape[1]] = self.obj
            self.obj = new
            self.origin = self.origin - pad_lo
            self._pos_t = self._pos_t + torch.as_tensor(pad_lo, dtype=torch.float32,
                                                        device=self.device)
            local = positions - self.origin
        return local

    def _ingest(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, []
        if not pending:
            return
        counts = np.concatenate([c for c, _ in pending])
        # Re-centring rolled the probe and moved the held frames by the roll: new frames go
        # with the same rolled probe, so they move by it too.
        pos = np.concatenate([p for _, p in pending]) - self._roll
        local = self._canvas(pos)
        # Never in place: the caller's array may be the one queued. Held in the FFT's pixel
        # order (zero frequency at (0, 0)), as is the mask, so no batch pays for fftshifts.
        amplitudes = to_fft_order(torch.from_numpy(counts).to(self.device).sqrt())
        first = self._store.n
        self._store.append(amplitudes)
        self._positions = np.concatenate([self._positions, pos])
        self._pos_t = torch.cat([self._pos_t, torch.as_tensor(local, dtype=torch.float32,
                                                               device=self.device)])
        self._measured = torch.cat([self._measured,
                                    amplitudes.double().square().sum(dim=(1, 2)).cpu()])
        self._corrector.grow(self._store.n)
        self._unseen.extend(range(first, self._store.n))
        if self.probe is None:
            self.probe = _check_probe(probe_from_frames(counts), self.frame_size).to(self.device)
        if self.photon_scale is None:
            # A flat start (ones) under a unit-norm probe models sum |P|^2 photons per frame
            # (Parseval), so the data's mean count is the scale.
            self.photon_scale = float(counts.sum(axis=(1, 2)).mean())

    # -- the start ---------------------------------------------------------------------------
    def _candidates(self, seed) -> dict[str, torch.Tensor]:
        """The candidate starts from ``seed`` (the network's image as offered, or None)."""
        shape = tuple(self.obj.shape)
        candidates = {"flat": torch.ones(shape, dtype=torch.complex64, device=self.device)}
        if seed is None or self.start_choice == "flat":
            return candidates
        obj, weight, origin = seed
        covered = weight > 0.1 * float(weight.max()) if weight.size and weight.max() > 0 \
            else np.zeros(obj.shape, dtype=bool)
        if covered.sum() < self.frame_size:
            return candidates
        # The network's amplitude scale is arbitrary: bring its median on the covered area to 1
        # (the flat start's), so the photon scale estimated for a flat start stays right.
        amp = np.abs(obj)
        level = float(np.median(amp[covered])) or 1.0
        net = np.where(covered, obj / level, 1.0).astype(np.complex64)
        phase = np.where(covered, np.angle(net), 0.0)
        # Low frequencies at the probe's scale and above are what the network gets wrong and
        # rPIE corrects slowly; keep only the detail above them.
        sigma = self.frame_size / 4
        weights = gaussian_filter(covered.astype(np.float64), sigma)
        low = gaussian_filter(phase, sigma) / np.maximum(weights, 1e-6)
        highpass = np.where(covered, np.exp(1j * (phase - low)), 1.0).astype(np.complex64)
        for name, image in (("network", net), ("network_highpass", highpass)):
            if self.start_choice in ("auto", name):
                placed = place_on_canvas(image, origin, shape, tuple(self.origin))
                candidates[name] = torch.from_numpy(placed).to(self.device)
        if self.start_choice != "auto":
            candidates.pop("flat")
        return candidates

    def _trial(self, candidates: dict[str, torch.Tensor]) -> dict[str, float]:
        """One pass of the run's updates (probe included) on copies of each candidate over a
        fixed random sample of frames; the residual each is left with. Copies, because a trial
        with a wrong probe leaves an object that has absorbed the probe's error (a blind run
        then never recovers)."""
        probe = self.probe * math.sqrt(self.photon_scale)
        count = min(self._store.n, self.trial_frames)
        index = torch.randperm(self._store.n, generator=self._generator)[:count].to(self.device)
        amplitudes, positions = self._store.gather(index), self._pos_t[index]
        residuals = {}
        for name, obj in candidates.items():
            trial_obj, trial_probe = obj.clone(), probe.clone()
            for batch in torch.split(torch.arange(count, device=self.device),
                                     self.options.batch_size):
                trial_probe, _ = _pie_batch(
                    trial_obj, trial_probe, amplitudes[batch], positions[batch], self._mask,
                    engine=self.options.engine, alphas=self.alphas,
                    update_probe=self._probe_updating, fft_order=True)
            residuals[name] = amplitude_residual(trial_obj, trial_probe, amplitudes, positions,
                                                 fft_order=True)
        return residuals

    def _choose_start(self) -> None:
        """Trial each candidate start and continue from the untouched candidate with the
        lowest residual."""
        # One read: a network image offered meanwhile is a later one, reconsidered then.
        seed = self._weighed_seed = self.seed
        candidates = self._candidates(seed)
        # The first network image is weighed whenever it comes (it may come after all the
        # frames, as for a file); later ones once the frames have doubled since the start.
        self._reconsider_at = 0 if self._weighed_seed is None else 2 * self._store.n
        if len(candidates) == 1:
            self.start, self.obj = next(iter(candidates.items()))
            return
        self.start_residuals = self._trial(candidates)
        best = min(self.start_residuals, key=self.start_residuals.get)
        self.start, self.obj = best, candidates[best]
        logger.info("refinement starts from %s (residuals after one trial pass over %d frames: "
                    "%s)", best, min(self._store.n, self.trial_frames),
                    {k: round(v, 5) for k, v in self.start_residuals.items()})

    def _should_reconsider(self) -> bool:
        if (self.start_choice != "auto" or len(self.reconsiderations) >= self.reconsider
                or self._store.n < self._reconsider_at or self.passes < 1):
            return False
        seed = self.seed
        return seed is not None and seed is not self._weighed_seed

    def _reconsider(self) -> None:
        """Weigh the latest network image against the refined state as it stands.

        Only after a full pass (a younger refined state always looks worse than the network's
        image, and replacing it then throws away a start that converges better). First the
        residuals both already have (no updates): if the refined state explains the frames
        better, it continues at that cost. Otherwise one trial pass each of continuing and of
        the network candidates decides, and the refiner restarts from a network candidate only
        if it beats continuing.
        """
        seed = self._weighed_seed = self.seed
        self._reconsider_at = 2 * self._store.n
        own = self.own_residual(max_frames=128)
        network = self.residual_of(seed[0], seed[2], max_frames=128)
        entry = {"frames": self._store.n, "epochs": self.epochs, "trial": False,
                 "residuals": {"refined": own, "network": network}, "chosen": "refined"}
        if not own > network:
            self.reconsiderations.append(entry)
            return
        candidates = self._candidates(seed)
        candidates.pop("flat", None)
        if not candidates:
            self.reconsiderations.append(entry)
            return
        candidates = {"refined": self.obj, **candidates}
        residuals = self._trial(candidates)
        best = min(residuals, key=residuals.get)
        entry.update(trial=True, residuals=residuals, chosen=best)
        self.reconsiderations.append(entry)
        if best != "refined":
            self.start, self.obj = best, candidates[best]
            self.start_residuals = residuals
            self.schedule.restart()  # a new estimate: its errors are not noise yet
            self.acceleration.reset()
            # The pass under way measured the discarded estimate: start a new one, so that
            # the error and its history describe only the estimate continued.
            self._visited, self._pass_error, self._pass_measured = 0, 0.0, 0.0
            self._order, self._cursor = self._order[:0], 0
            self.error = math.nan  # until the new estimate's first batch
        logger.info("network image weighed at %d frames: %s (residuals %s)", self._store.n,
                    "restarting from " + best if best != "refined" else "refinement continues",
                    {k: round(v, 5) for k, v in residuals.items()})

    @property
    def _mask(self) -> torch.Tensor:
        """Valid detector pixels, in the FFT's pixel order like the stored amplitudes."""
        return self._mask_t

    def mask_pixels(self, bad) -> None:
        """Detector pixels not to fit from now on (``bad``: (N, N) bool, True = bad; e.g.
        NaN or saturated pixels): their modelled amplitude is kept (rPIE's mask)."""
        bad_t = torch.as_tensor(np.asarray(bad, dtype=bool), device=self.device)
        if tuple(bad_t.shape) != (self.frame_size, self.frame_size):
            raise InvalidInputError(f"mask: expected ({self.frame_size}, {self.frame_size}), "
                                    f"got {tuple(bad_t.shape)}")
        mask = self._mask & ~to_fft_order(bad_t)
        if bool(mask.any()):
            self._mask_t = mask

    # -- iterate -----------------------------------------------------------------------------
    def _next_batch(self, limit: int | None = None) -> torch.Tensor:
        """New frames first (they have never been used), then a random order over all frames.

        A pass ends after as many frame updates as there are frames, whichever order they came
        in, so :attr:`epochs` only grows while the frame count stays.
        """
        size = self.options.batch_size if limit is None else min(limit, self.options.batch_size)
        size = min(size, max(self._store.n - self._visited, 1))
        if self._unseen:
            take = [self._unseen.popleft() for _ in range(min(size, len(self._unseen)))]
            return torch.as_tensor(take, dtype=torch.int64)
        if self._cursor >= len(self._order):
            self._order = torch.randperm(self._store.n, generator=self._generator)
            self._cursor = 0
        batch = self._order[self._cursor : self._cursor + size]
        self._cursor += len(batch)
        return batch

    def _finish_pass(self) -> None:
        self.passes += 1
        self._visited = 0
        self._order, self._cursor = self._order[:0], 0  # the next pass draws a new order
        if self._pass_measured > 0:
            self.error = self._pass_error / self._pass_measured
            self.error_history.append(self.error)
            self.schedule.end_pass(self.error, self._store.n)
        self._pass_error = self._pass_measured = 0.0
        if self.probe is not None and self.photon_scale:
            # On the photon-scaled probe, the quantity the updates move.
            scaled = self.probe * math.sqrt(self.photon_scale)
            moved = self.acceleration.end_pass(self.obj, scaled,
                                               probe_updating=self._probe_updating,
                                               settled=self.schedule.settled_at is not None)
            if moved is not scaled:
                self._keep_probe(moved)
        if self._correcting_positions:
            self._pos_t = self._corrector.centre(self._pos_t, tuple(self.obj.shape))
        if self._probe_updating and self.options.recenter_probe:
            self._recentre()

    @property
    def _correcting_positions(self) -> bool:
        return (self.options.position_correction
                and self.passes >= self.options.position_correction_start_epoch)

    @property
    def _probe_updating(self) -> bool:
        return self.options.probe_update and self.passes >= self.options.probe_update_start_epoch

    def _recentre(self) -> None:
        """Keep the probe centred; the positions move instead of the object
        (:func:`~bluesky_ptychopinn.recon.recentre_probe`), so the object is never left shifted
        against the scan's coordinates."""
        self.probe, shift = recentre_probe(self.probe, positions=self._pos_t,
                                           object_shape=tuple(self.obj.shape))
        if shift != (0, 0):
            self.acceleration.rolled(shift)
            self._pos_t = self._pos_t - torch.tensor(shift, dtype=torch.float32,
                                                     device=self.device)
            self._positions = self._positions - np.asarray(shift, dtype=np.float64)
            self._roll = self._roll + np.asarray(shift, dtype=np.float64)

    def step(self, budget_s: float = 0.1, max_updates: int | None = None) -> float:
        """Refine for about ``budget_s`` seconds (at least one batch) or until ``max_updates``
        frame updates; returns :attr:`error`. Does nothing before ``min_frames`` frames.
        """
        t0 = time.perf_counter()
        self._ingest()
        if self._store.n < self.min_frames or self._waiting_for_seed:
            return self.error
        if self.start is None:
            self._choose_start()
            self.acceleration.begin(self.probe)
        elif self._should_reconsider():
            self._reconsider()
        probe = self.probe * math.sqrt(self.photon_scale)
        updates = 0
        while max_updates is None or updates < max_updates:
            if self._visited >= self._store.n:
                # A pass is complete: hand the probe back before re-centring moves it.
                self._keep_probe(probe)
                self._finish_pass()
                probe = self.probe * math.sqrt(self.photon_scale)
            # Frames never fitted get the full step whatever the schedule says, and no position
            # move (their first patch is mostly canvas nothing has been fitted to yet).
            fresh = bool(self._unseen)
            relax = 1.0 if fresh else self.schedule.step
            batch = self._next_batch(None if max_updates is None else max_updates - updates)
            if not len(batch):
                break
            index = batch.to(self.device)
            shifts = (torch.empty((len(batch), 2), device=self.device)
                      if self._correcting_positions and not fresh else None)
            probe, err = _pie_batch(
                self.obj, probe, self._store.gather(index), self._pos_t[index], self._mask,
                engine=self.options.engine, alphas=self.alphas,
                update_probe=self._probe_updating, relax=relax, shifts=shifts,
                fft_order=True)
            if shifts is not None:
                self._corrector.apply(self._pos_t, index, shifts, tuple(self.obj.shape),
                                     relax)
            self._pass_error += float(err)
            self._pass_measured += float(self._measured[batch].sum())
            self._visited += len(batch)
            updates += len(batch)
            if not math.isfinite(self._pass_error):
                raise FloatingPointError(
                    f"{self.options.engine} diverged after {self.epochs:.2f} epochs; "
                    "lower alpha_object / alpha_probe")
            if time.perf_counter() - t0 >= budget_s:
                break
        self._keep_probe(probe)
        if self._visited >= self._store.n:
            self._finish_pass()  # now, so that error and error_history are never a pass late
        if math.isnan(self.error) and self._pass_measured > 0:
            self.error = self._pass_error / self._pass_measured  # before the first full pass
        self.busy_s += time.perf_counter() - t0
        return self.error

    def _keep_probe(self, probe: torch.Tensor) -> None:
        """Store a photon-scaled probe as unit norm + scale (docs/conventions.md)."""
        power = float(probe.abs().square().sum())
        self.photon_scale = power
        self.probe = probe / math.sqrt(power)

    def run(self, *, max_epochs: float | None = None, time_s: float | None = None,
            tol: float | None = None, slice_s: float = 0.25) -> RefinedSnapshot:
        """Refine until a stop rule holds, then return the snapshot.

        Parameters
        ----------
        max_epochs : float, optional
            More passes over the frames (default ``options.n_epochs`` when no rule is given).
        time_s : float, optional
            Wall-clock limit in seconds.
        tol : float, optional
            Converged when a full pass lowers the error by less than this fraction.
        slice_s : float
            Granularity of the checks.

        A refiner waiting for the network's image (``wait_for_seed_frames``) stops waiting and
        starts from what it has.
        """
        if max_epochs is None and time_s is None and tol is None:
            max_epochs = self.options.n_epochs
        # run() means refine now: no more waiting for a network image that may never come
        # (step() would return at once, and this loop would never end).
        self.wait_for_seed_frames = 0
        t0, start_epochs, start_passes = time.perf_counter(), self.epochs, self.passes
        while True:
            todo = None
            if max_epochs is not None:
                self._ingest()
                todo = max(1, math.ceil((start_epochs + max_epochs - self.epochs)
                                        * max(self._store.n, 1) - 1e-6))
            self.step(slice_s, max_updates=todo)
            if self._store.n < self.min_frames:
                break
            if max_epochs is not None and self.epochs - start_epochs >= max_epochs:
                break
            if time_s is not None and time.perf_counter() - t0 >= time_s:
                break
            history = self.error_history
            if (tol is not None and self.passes - start_passes >= 2 and len(history) >= 2
                    and history[-2] - history[-1] < tol * history[-2]):
                break
        return self.snapshot()

    def snapshot(self) -> RefinedSnapshot:
        """The refined object and probe now (copies, on the CPU)."""
        return RefinedSnapshot(
            object=self.obj.cpu().numpy().astype(np.complex64),
            probe=(self.probe.cpu().numpy().astype(np.complex64) if self.probe is not None
                   else np.zeros((1, self.frame_size, self.frame_size), np.complex64)),
            photon_scale=float(self.photon_scale or 0.0),
            error=float(self.error),
            epochs=float(self.epochs),
            n_frames=self._store.n,
            origin_px=(float(self.origin[0]), float(self.origin[1])),
            start=self.start or "flat",
            start_residuals=dict(self.start_residuals),
            reconsiderations=[dict(r) for r in self.reconsiderations],
            busy_s=self.busy_s,
            position_correction_rms_px=self._corrector.rms(self._store.n),
            position_moves=(self.position_corrections if self.options.position_correction
                            else None),
            probe_roll_px=(float(self._roll[0]), float(self._roll[1])),
        )

    @property
    def position_corrections(self) -> np.ndarray:
        """(n, 2) moves (y, x) of each frame's probe centre by position correction, object
        pixels, mean removed: the corrected positions are the given ones plus these."""
        return self._corrector.moves[: self._store.n].cpu().numpy().copy()

    def residual_of(self, obj: np.ndarray, origin_px: tuple[float, float],
                    max_frames: int = 128, first: int | None = None) -> float:
        """Residual of another estimate (e.g. the network's stitched object) against the frames
        held, with this refiner's current probe and a fitted scale; ``nan`` before any frame.

        Uses at most ``max_frames`` evenly spaced frames, so it costs the same late in a scan.
        ``first``: only among the first ``first`` frames held (e.g. those a network image was
        made from, to compare two estimates where both have data).
        """
        held = self._store.n if first is None else min(int(first), self._store.n)
        if held <= 0:
            return math.nan
        index = torch.linspace(0, held - 1, min(max_frames, held)).long()
        index = index.to(self.device)
        placed = place_on_canvas(obj, origin_px, tuple(self.obj.shape), tuple(self.origin))
        return amplitude_residual(placed, self.probe, self._store.gather(index),
                                  self._pos_t[index], fft_order=True)

    def own_residual(self, max_frames: int = 128, first: int | None = None) -> float:
        """:meth:`residual_of` the refined object itself, on the same frames (comparable)."""
        snap_obj = self.obj.cpu().numpy()
        return self.residual_of(snap_obj, tuple(self.origin), max_frames, first)

    @property
    def nbytes(self) -> int:
        """Bytes held for frames (the part that grows with the scan, up to ``max_frames``)."""
        return self._store.nbytes
