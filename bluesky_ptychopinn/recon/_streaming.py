"""The streaming reconstructor: the one engine every frame goes through.

frames + positions -> network (diffraction only) -> patches -> weighted stitching on a canvas
-> snapshots (object, weight, uncertainty). The live callback, the file CLI, replays and remote
workers are thin adapters around :class:`StreamingReconstructor`.
"""

from __future__ import annotations

import collections
import math
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field

import numpy as np
import torch

from ..errors import InvalidInputError
from ._canvas import StitchCanvas, growth_pads
from ._neighbours import FrameStore, QuadrantIndex

__all__ = ["Snapshot", "StreamingReconstructor", "stitch_window"]


def stitch_window(size: int, crop: int, device=None) -> torch.Tensor:
    """Stitching weights: bilinear (tent) taper inside the central ``crop`` x ``crop`` square.

    Only the centre of a predicted patch is trusted (the paper keeps the central N/2); a tent
    instead of a box avoids seams where neighbouring crops meet.
    """
    if not 1 <= crop <= size:
        raise InvalidInputError(f"crop: expected 1..{size}, got {crop}")
    c = torch.arange(size, device=device, dtype=torch.float32) - (size - 1) / 2
    half = crop / 2
    tent = (1 - c.abs() / (half + 0.5)).clamp_min(0)
    return torch.outer(tent, tent)


def default_crop(frame_size: int) -> int:
    """The stitched central square of an N-pixel patch: 3N/8 (24 of 64).

    The paper stitches the central N/2. Measured on held-out simulated experiments
    (``scripts/model_card.py``, docs/models.md), a narrower centre scores higher: the
    network's predictions degrade towards the patch border, where fewer of the group's
    overlapping neighbours constrain them.
    """
    return max(1, (3 * frame_size) // 8)


class ObjectParts:
    """``amplitude`` and ``phase`` (float32) of a snapshot's complex ``object``."""

    object: np.ndarray

    @property
    def amplitude(self) -> np.ndarray:
        return np.abs(self.object).astype(np.float32)

    @property
    def phase(self) -> np.ndarray:
        return np.angle(self.object).astype(np.float32)


@dataclass
class Snapshot(ObjectParts):
    """The stitched state at one moment.

    Attributes
    ----------
    object : numpy.ndarray
        complex64 (H, W) stitched object (zero where nothing was measured).
    weight : numpy.ndarray
        float32 (H, W) accumulated stitching weight (coverage).
    uncertainty : numpy.ndarray
        float32 (H, W) weighted variance of the overlapping patch predictions
        (E|p|^2 - |E p|^2): where the network disagrees with itself.
    n_frames : int
        Frames stitched so far.
    origin_px : tuple of float
        Object-pixel coordinate of canvas pixel (0, 0): canvas = positions - origin.
    stats : dict
        Throughput and latency figures.
    """

    object: np.ndarray
    weight: np.ndarray
    uncertainty: np.ndarray
    n_frames: int
    origin_px: tuple[float, float]
    stats: dict = field(default_factory=dict)


class StreamingReconstructor:
    """Reconstruct a scan batch by batch with a trained network.

    Parameters
    ----------
    model : torch.nn.Module
        A :class:`~bluesky_ptychopinn.models.PtychoPINN` (``config.channels`` 1 or 4).
    object_shape : (int, int), optional
        Canvas size; grown automatically when a position falls outside.
    origin_px : (float, float)
        Object-pixel coordinate of canvas pixel (0, 0).
    crop : int or "auto", optional
        Side of the trusted central region of each patch (default 3N/8, i.e. 24 of 64: on
        held-out simulated experiments it beat the paper's N/2 for every model measured; the
        table is in docs/models.md). ``"auto"``: stitch every size in ``crop_candidates`` at
        once (one canvas each; the network runs once) and let :meth:`choose_crop` pick the one
        the data prefers; until then 3N/8 is shown.
    crop_candidates : sequence of int, optional
        The sizes ``"auto"`` chooses among (default N/4, 5N/16, 3N/8, N/2, 5N/8).
    input_scale : float, optional
        The experiment's input scale. When omitted it is estimated from the first
        ``scale_frames`` frames, which are held back until they have all arrived (or
        :meth:`flush` is called), so the result does not depend on how frames were batched.
    scale_frames : int
        Frames used to estimate the input scale.
    batch_size : int
        Frames per network call.
    device : str or torch.device, optional
        ``"cuda"`` when available, else CPU.
    max_canvas_px : int
        Largest canvas side (pixels) positions may grow the canvas to (default 8192: each
        crop candidate's canvas is then ~1 GiB); frames beyond are refused.
    frame_memory_bytes : int
        C = 4 models keep the frames later groups may draw on; beyond this many bytes of them
        (default 1 GiB: 131,072 frames of 64 x 64 in 16 bits) the oldest are dropped and no
        later group uses them (:mod:`._neighbours`). Results are exact below it and, beyond
        it, wherever the scan does not come back to a spot after that many frames.

    Examples
    --------
    >>> import torch
    >>> from bluesky_ptychopinn.models import ptychopinn
    >>> recon = StreamingReconstructor(ptychopinn(base_width=4), object_shape=(96, 96))
    >>> recon.add(torch.rand(20, 64, 64) * 100, torch.full((20, 2), 48.0))
    20
    >>> recon.snapshot().object.shape
    (96, 96)
    """

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        object_shape: tuple[int, int] | None = None,
        origin_px: tuple[float, float] = (0.0, 0.0),
        crop: int | str | None = None,
        crop_candidates: tuple[int, ...] | None = None,
        input_scale: float | None = None,
        batch_size: int = 256,
        device: str | torch.device | None = None,
        scale_frames: int = 16,
        frame_memory_bytes: int = 1 << 30,
        max_canvas_px: int = 8192,
    ) -> None:
        if input_scale is not None and not (math.isfinite(input_scale) and input_scale > 0):
            raise InvalidInputError(f"input_scale: a positive number (or None to estimate it "
                                    f"from the first frames), got {input_scale!r}")
        if not (isinstance(scale_frames, (int, np.integer)) and scale_frames >= 1):
            raise InvalidInputError(f"scale_frames: at least 1, got {scale_frames!r}")
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        # channels_last on every device: on CPU (oneDNN) it doubles the network's throughput
        # (bench/inference.py), on GPUs it is what the tensor cores want.
        self.model = model.to(self.device).eval().to(memory_format=torch.channels_last)
        config = model.config
        self.frame_size: int = config.frame_size
        self.channels: int = config.channels
        n = self.frame_size
        if crop == "auto":
            candidates = crop_candidates or tuple(sorted({max(1, (k * n) // 16)
                                                           for k in (4, 5, 6, 8, 10)}))
            self.crop = default_crop(n) if default_crop(n) in candidates else candidates[0]
        elif crop is None or (isinstance(crop, (int, np.integer)) and not isinstance(crop, bool)
                              and 1 <= crop <= n):
            self.crop = int(default_crop(n) if crop is None else crop)
            candidates = (self.crop,)
        else:
            raise InvalidInputError(f"crop: an integer 1..{n} or 'auto', got {crop!r}")
        self.crop_candidates = tuple(int(c) for c in candidates)
        self.crop_scores: dict[int, float] = {}
        self.batch_size = int(batch_size)
        self.input_scale = input_scale
        self.origin = np.asarray(origin_px, dtype=np.float64)
        shape = object_shape or (self.frame_size * 2, self.frame_size * 2)
        # One far position (an encoder glitch, positions in the wrong unit) would grow every
        # candidate's canvas to the span of the scan: beyond this side, frames are refused.
        self.max_canvas_px = max(int(max_canvas_px), *(int(v) for v in shape))
        self._allocate(shape)
        self.n_frames = 0
        self._busy_s = 0.0
        # the last batches' latencies (their percentiles in stats()), not one float per batch
        # of an endless scan
        self._latencies: collections.deque[float] = collections.deque(maxlen=4096)
        # C = 4 groups: the frames they may still draw on, and a grid hash of positions, so a
        # batch costs the same whether it is the scan's first or its millionth (_neighbours).
        self._store = FrameStore((self.frame_size, self.frame_size))
        self._index = QuadrantIndex(radius=float(self.frame_size))
        # At least one network call's worth of 16-bit frames: below that every batch would
        # drop the frames its neighbours need (the default is ~500 batches).
        floor = self.batch_size * self.frame_size**2 * 2
        if not frame_memory_bytes >= floor:
            raise InvalidInputError(f"frame_memory_bytes: at least {floor} (one batch of "
                                    f"frames), got {frame_memory_bytes!r}")
        self.frame_memory_bytes = int(frame_memory_bytes)
        self.scale_frames = int(scale_frames)
        self._held: list[tuple[torch.Tensor, np.ndarray]] = []

    # -- canvas ---------------------------------------------------------------------------
    def _allocate(self, shape: tuple[int, int]) -> None:
        self._canvases = {c: StitchCanvas(shape, stitch_window(self.frame_size, c, self.device))
                          for c in self.crop_candidates}

    @property
    def window(self) -> torch.Tensor:
        """Stitching weights of the crop in use."""
        return self._canvases[self.crop].window

    def _check_extent(self, positions: np.ndarray) -> None:
        """Refuse positions that would grow the canvas past ``max_canvas_px`` on a side."""
        shape = self._canvases[self.crop].shape
        pads = growth_pads(positions - self.origin, shape, self.frame_size)
        if pads is None:
            return
        grown = np.asarray(shape) + pads[0] + pads[1]
        if (grown > self.max_canvas_px).any():
            centre = self.origin + np.asarray(shape) / 2
            far = int(np.argmax(np.abs(positions - centre).max(axis=1)))
            raise InvalidInputError(
                f"positions: frame {far} at {np.round(positions[far], 1).tolist()} px would "
                f"grow the canvas to {grown.astype(int).tolist()} px, beyond max_canvas_px="
                f"{self.max_canvas_px} (a far encoder reading, or positions in another unit?)")

    def _ensure_fits(self, positions: np.ndarray) -> np.ndarray:
        """Canvas coordinates of ``positions``, growing the canvas (by padding) if needed."""
        local = positions - self.origin
        pads = growth_pads(local, self._canvases[self.crop].shape, self.frame_size)
        if pads is not None:
            pad_lo, pad_hi = pads
            pads = (int(pad_lo[1]), int(pad_hi[1]), int(pad_lo[0]), int(pad_hi[0]))
            for canvas in self._canvases.values():
                canvas.pad(pads)
            self.origin = self.origin - pad_lo
            local = positions - self.origin
        return local

    # -- input ----------------------------------------------------------------------------
    def _check(self, frames, positions) -> tuple[torch.Tensor, np.ndarray]:
        frames_t = torch.as_tensor(np.asarray(frames) if not torch.is_tensor(frames) else frames)
        if frames_t.is_complex():
            raise InvalidInputError("frames: expected real photon counts, got complex values")
        n = self.frame_size
        if frames_t.ndim == 2:
            frames_t = frames_t[None]
        if frames_t.ndim != 3 or tuple(frames_t.shape[-2:]) != (n, n):
            raise InvalidInputError(
                f"frames: expected (n, {n}, {n}) for this model (frame_size={n}), "
                f"got {tuple(frames_t.shape)}; crop or bin frames to the model size first"
            )
        pos = np.asarray(positions, dtype=np.float64).reshape(-1, 2)
        if len(pos) != len(frames_t):
            raise InvalidInputError(f"positions: {len(pos)} positions for {len(frames_t)} frames")
        if not np.isfinite(pos).all():
            raise InvalidInputError("positions: contain NaN or inf")
        frames_t = frames_t.to(torch.float32)
        finite = torch.isfinite(frames_t).flatten(1).all(dim=1)
        if not bool(finite.all()):
            bad = torch.nonzero(~finite).flatten().tolist()
            raise InvalidInputError(f"frames: non-finite values (NaN/inf) in frame(s) {bad[:10]}")
        if bool((frames_t < 0).any()):
            raise InvalidInputError("frames: negative photon counts")
        totals = frames_t.flatten(1).sum(dim=1)
        if bool((totals <= 0).any()):
            bad = torch.nonzero(totals <= 0).flatten().tolist()
            raise InvalidInputError(f"frames: all-zero frame(s) {bad[:10]} carry no information")
        return frames_t, pos

    # -- the one path ---------------------------------------------------------------------
    def add(self, frames, positions) -> int:
        """Reconstruct a batch of frames and stitch them onto the canvas.

        Parameters
        ----------
        frames : array_like
            (n, N, N) photon counts (DC at the centre), N = the model's frame size.
        positions : array_like
            (n, 2) probe centres (y, x) in object pixels.

        Returns
        -------
        int
            Frames stitched so far.

        Raises
        ------
        InvalidInputError
            Wrong frame size, NaN/inf, negative or all-zero frames, mismatched positions, or
            positions that would grow the canvas beyond ``max_canvas_px``. Nothing is stitched
            from a rejected batch.
        """
        start = time.perf_counter()
        frames_t, pos = self._check(frames, positions)
        if not len(pos):  # nothing to do (and no mean of zero frames for the input scale)
            return self.n_frames
        self._check_extent(pos)
        if self.input_scale is None:
            self._held.append((frames_t, pos))
            if sum(len(p) for _, p in self._held) < self.scale_frames:
                return self.n_frames
            self._release_held()
            self._busy_s += time.perf_counter() - start
            return self.n_frames
        self._process(frames_t, pos, start)
        return self.n_frames

    def flush(self) -> int:
        """Reconstruct frames held back for the input-scale estimate, however few."""
        if self._held:
            start = time.perf_counter()
            self._release_held()
            self._busy_s += time.perf_counter() - start
        return self.n_frames

    @property
    def pending(self) -> int:
        """Frames received but not yet stitched."""
        return sum(len(p) for _, p in self._held)

    def _release_held(self) -> None:
        frames_t = torch.cat([f for f, _ in self._held])
        pos = np.concatenate([p for _, p in self._held])
        self._held = []
        n_pixels = self.frame_size**2
        first = frames_t[: self.scale_frames]
        self.input_scale = math.sqrt(n_pixels / float(first.flatten(1).sum(1).mean()))
        self._process(frames_t, pos, time.perf_counter(), timed=False)

    def _process(self, frames_t: torch.Tensor, pos: np.ndarray, start: float,
                 timed: bool = True) -> None:
        self._ensure_fits(pos)
        if self.channels == 1:
            for lo in range(0, len(pos), self.batch_size):
                hi = min(lo + self.batch_size, len(pos))
                self._infer_and_stitch(frames_t[lo:hi, None], pos[lo:hi, None])
        else:
            self._add_grouped(frames_t, pos)
        self.n_frames += len(pos)
        elapsed = time.perf_counter() - start
        if timed:
            self._busy_s += elapsed
        self._latencies.append(elapsed)

    def _add_grouped(self, frames: torch.Tensor, pos: np.ndarray) -> None:
        """C = 4 models: every new frame anchors a 4-quadrant group of its nearest earlier
        neighbours (:mod:`._neighbours` has the rule); all four predicted patches are stitched.

        Work and memory per batch depend on the scan density around the batch only: groups
        come from a grid hash, frames from a chunked store that drops frames no later group
        can use.
        """
        n = self.frame_size
        step = max(self.batch_size // 4, 1)  # groups per network call, as before
        for lo in range(0, len(pos), step):
            hi = min(lo + step, len(pos))
            self._store.append(frames[lo:hi])
            groups = self._index.add(pos[lo:hi])
            batch = self._store.gather(groups.members).reshape(-1, 4, n, n)
            self._store.discard(groups.retired)
            over = len(self._store) - self.frame_memory_bytes // self._store.frame_nbytes
            if over > 0:
                self._store.discard(self._index.evict_oldest(over))
            self._infer_and_stitch(batch, groups.positions)

    def _autocast(self):
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return nullcontext()

    @torch.inference_mode()
    def _infer_and_stitch(self, batch: torch.Tensor, positions: np.ndarray) -> None:
        """Network on (B, C, N, N) counts, then stitch the B * C patches at (B, C, 2)."""
        n = self.frame_size
        batch = batch.to(self.device, non_blocking=True)
        batch = batch.contiguous(memory_format=torch.channels_last)
        with self._autocast():
            amplitude, phase = self.model.forward_parts(batch, self.input_scale)
        patches = torch.polar(amplitude.float(), phase.float()).reshape(-1, n, n)
        local = positions.reshape(-1, 2) - self.origin
        where = torch.as_tensor(local, dtype=torch.float32, device=self.device)
        for canvas in self._canvases.values():  # one network pass, every candidate crop
            canvas.deposit(patches, where)

    # -- output ---------------------------------------------------------------------------
    def snapshot(self, crop: int | None = None) -> Snapshot:
        """The stitched object, coverage and uncertainty so far (copies, on the CPU), with the
        crop in use or, given ``crop``, with that one of :attr:`crop_candidates`."""
        crop = self.crop if crop is None else int(crop)
        if crop not in self._canvases:
            raise InvalidInputError(f"crop {crop}: not stitched; have {self.crop_candidates}")
        obj, den, variance = self._canvases[crop].read(bool(self.n_frames))
        return Snapshot(
            object=obj.cpu().numpy(),
            weight=den.cpu().numpy(),
            uncertainty=variance.cpu().numpy(),
            n_frames=self.n_frames,
            origin_px=(float(self.origin[0]), float(self.origin[1])),
            stats={**self.stats(), "crop": crop},
        )

    def choose_crop(self, score: Callable[[Snapshot], float]) -> dict[int, float]:
        """Use the candidate crop whose snapshot has the lowest ``score``.

        ``score`` needs no ground truth: e.g. the Fourier-magnitude residual of the stitched
        object against measured frames
        (:func:`~bluesky_ptychopinn.recon.amplitude_residual`), which is how the live engine
        chooses. Returns every candidate's score (also in :attr:`crop_scores`); non-finite
        scores never win, and with none finite the crop stays.
        """
        if len(self.crop_candidates) < 2 or not self.n_frames:
            return {}
        scores = {c: float(score(self.snapshot(c))) for c in self.crop_candidates}
        finite = {c: v for c, v in scores.items() if math.isfinite(v)}
        if finite:
            self.crop = min(finite, key=finite.get)
        self.crop_scores = scores
        return scores

    def stats(self) -> dict:
        """Frames, busy time, throughput (frames/s of reconstruction time) and latencies."""
        lat = np.asarray(self._latencies) if self._latencies else np.zeros(1)
        return {
            "frames": self.n_frames,
            "busy_s": self._busy_s,
            "frames_per_s": self.n_frames / self._busy_s if self._busy_s > 0 else 0.0,
            "batch_latency_p50_s": float(np.percentile(lat, 50)),  # of the last 4096 batches
            "batch_latency_p99_s": float(np.percentile(lat, 99)),
            "device": str(self.device),
        }

    def finish(self) -> Snapshot:
        """Flush, then the final snapshot; the reconstructor takes no more frames."""
        self.flush()
        snap = self.snapshot()
        self.add = self._closed  # type: ignore[method-assign]
        return snap

    def _closed(self, *args, **kwargs):
        raise InvalidInputError("this StreamingReconstructor is finished; create a new one")


class _FullHistoryReconstructor(StreamingReconstructor):
    """The C = 4 path as it was before the grid hash: every batch re-concatenates all frames
    seen so far and groups against all positions with
    :func:`~bluesky_ptychopinn.training.quadrant_groups_for_inference`. Kept only as the
    reference that tests/test_streaming.py and ``bench/inference.py --scaling`` compare with."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._positions: list[np.ndarray] = []
        self._frames: list[torch.Tensor] = []

    def _add_grouped(self, frames: torch.Tensor, pos: np.ndarray) -> None:
        from ..training import quadrant_groups_for_inference

        first = sum(len(p) for p in self._positions)
        self._frames.append(frames)
        self._positions.append(pos)
        all_frames = torch.cat(self._frames)
        all_pos = np.concatenate(self._positions)
        self._frames, self._positions = [all_frames], [all_pos]
        own = np.arange(first, first + len(pos))
        groups = quadrant_groups_for_inference(pos, all_pos, anchor_index=own)
        step = max(self.batch_size // 4, 1)
        for lo in range(0, len(groups), step):
            members = groups[lo : lo + step]
            self._infer_and_stitch(all_frames[torch.from_numpy(members)], all_pos[members])
