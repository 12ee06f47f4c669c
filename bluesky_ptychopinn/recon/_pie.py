"""ePIE and rPIE: the iterative baselines, batched, in torch, on CPU or CUDA.

Each batch of positions goes through the same four steps:

1. exit waves ``P_m O_j`` and their far fields ``psi_jm`` (physics package);
2. modulus constraint on valid pixels: every mode is scaled by ``sqrt(I_meas) / sqrt(I_model)``
   (masked pixels keep the modelled amplitude);
3. object update: ``sum_m conj(P_m) dpsi_jm`` deposited with :func:`scatter_patches` (the exact
   adjoint of patch extraction), divided by the engine's denominator built from the batch's
   summed illumination ``sum_j |P|^2`` on the object grid;
4. probe update: ``sum_j conj(O_j) dpsi_jm`` over the batch, divided likewise by
   ``sum_j |O_j|^2`` (a weighted average of the per-position updates).

With ``batch_size=1`` these are the classic sequential formulas (Maiden & Rodenburg 2009; Maiden,
Johnson & Li 2017).

While the probe is refined it is re-centred after each epoch by whole pixels and the positions
move the opposite way (:func:`recentre_probe`); the object is never shifted, so it stays in the
frame of the input positions.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time

import numpy as np
import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from ..errors import InvalidInputError
from ..physics import (
    back_propagate,
    exit_waves,
    extract_patches,
    far_field,
    patch_geometry,
    required_object_shape,
    scatter_patches,
)
from ._momentum import PassAcceleration
from ._options import PIEOptions, PIEResult
from ._positions import PositionCorrector, position_shifts
from ._schedule import StepSchedule

__all__ = ["pie_reconstruct", "recentre_probe"]

logger = logging.getLogger(__name__)

# Below this modelled amplitude (sqrt photons) the modulus ratio is capped: the corrected wave
# stays bounded by sqrt(I_meas) while avoiding a division by zero.
_AMPLITUDE_FLOOR = 1e-6


def _as_tensor(value, name: str, dtype: torch.dtype) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        tensor = value.detach()
    else:
        try:
            tensor = torch.as_tensor(np.asarray(value))
        except (TypeError, ValueError) as exc:
            raise InvalidInputError(
                f"{name}: cannot convert {type(value).__name__} to an array"
            ) from exc
    if tensor.is_complex() and not dtype.is_complex:
        raise InvalidInputError(f"{name}: expected real values, got {tensor.dtype}")
    # C order whatever the input's: every result of an elementwise op inherits its inputs'
    # layout, so one transposed input (a probe stored (N, N, M) and transposed, as MATLAB and
    # many HDF5 files have it) made each batch's FFTs copy and its products stride (rPIE ~25 %
    # slower on a 3-mode probe; tests/test_pie.py).
    return tensor.to(dtype).contiguous()


def _check_finite(tensor: torch.Tensor, name: str) -> None:
    bad = ~torch.isfinite(tensor)
    if bool(bad.any()):
        raise InvalidInputError(f"{name}: {int(bad.sum())} non-finite value(s) (NaN or inf)")


def _check_frames(frames, mask) -> tuple[torch.Tensor, torch.Tensor]:
    """Frames (n, N, N) of non-negative counts on valid pixels, and the (N, N) bool mask."""
    frames_t = _as_tensor(frames, "frames", torch.float32)
    if frames_t.ndim != 3 or frames_t.shape[-1] != frames_t.shape[-2] or frames_t.shape[0] == 0:
        raise InvalidInputError(
            f"frames: expected (n, N, N) photon counts with n >= 1, got {tuple(frames_t.shape)}"
        )
    size = frames_t.shape[-1]
    if mask is None:
        mask_t = torch.ones(size, size, dtype=torch.bool)
    else:
        mask_t = _as_tensor(mask, "mask", torch.bool).to(frames_t.device)
        if tuple(mask_t.shape) != (size, size):
            raise InvalidInputError(
                f"mask: expected shape {(size, size)} like the frames, got {tuple(mask_t.shape)}"
            )
        if not bool(mask_t.any()):
            raise InvalidInputError("mask: no valid pixel (True = valid)")
    mask_t = mask_t.to(frames_t.device)
    # Masked pixels may hold detector flags (negative, NaN): they never enter the update.
    broken = ~torch.isfinite(frames_t) & mask_t
    if bool(broken.any()):
        first = torch.nonzero(broken)[0].tolist()
        raise InvalidInputError(
            f"frames: {int(broken.sum())} non-finite value(s) (NaN or inf) on valid pixels "
            f"(first: frame {first[0]}, pixel ({first[1]}, {first[2]})); mask those pixels "
            "(mask=, False = invalid) or fix the data")
    valid = frames_t[:, mask_t]
    if bool((valid < 0).any()):
        raise InvalidInputError(
            f"frames: expected photon counts >= 0 on valid pixels, got {int((valid < 0).sum())} "
            f"negative value(s) (minimum {float(valid.min()):g}); subtract the dark without "
            "clipping below zero, or mask those pixels"
        )
    frames_t = torch.where(mask_t, frames_t, torch.zeros((), dtype=frames_t.dtype))
    if not float(frames_t.sum()) > 0:
        raise InvalidInputError("frames: no photons on valid pixels")
    return frames_t, mask_t


def _check_probe(probe_guess, size: int) -> torch.Tensor:
    """Probe as complex64 (M, N, N), unit norm."""
    probe = _as_tensor(probe_guess, "probe_guess", torch.complex64)
    if probe.ndim == 2:
        probe = probe.unsqueeze(0)
    if probe.ndim != 3 or probe.shape[-1] != probe.shape[-2]:
        raise InvalidInputError(
            f"probe_guess: expected (N, N) or (M, N, N) with square modes, got "
            f"{tuple(probe.shape)}"
        )
    if probe.shape[-1] != size:
        raise InvalidInputError(
            f"probe_guess: modes of {probe.shape[-1]} x {probe.shape[-1]} pixels do not match the "
            f"frames' {size} x {size}; resample the probe (physics.resample_probe) or crop frames"
        )
    _check_finite(probe, "probe_guess")
    power = float(probe.abs().square().sum())
    if not power > 0:
        raise InvalidInputError("probe_guess: all zero")
    return probe / math.sqrt(power)


def _check_positions(positions, n_frames: int) -> torch.Tensor:
    pos = _as_tensor(positions, "positions", torch.float64)
    if pos.ndim != 2 or pos.shape[1] != 2:
        raise InvalidInputError(
            f"positions: expected (n, 2) probe centres (y, x), got {tuple(pos.shape)}"
        )
    if pos.shape[0] != n_frames:
        raise InvalidInputError(
            f"positions: {pos.shape[0]} positions for {n_frames} frames; expected one per frame"
        )
    _check_finite(pos, "positions")
    return pos.to(torch.float32)


#: Largest object canvas made from the positions alone, in units of the frames' own area
#: (frames x N^2). A scan whose frames overlap, or even just touch (a step of N), needs a
#: canvas of a few times that at most (one frame: (N + 2 margins)^2 = 1.6 N^2 at N = 32); one
#: this much larger has positions in the wrong units (micrometres or nanometres read as
#: pixels), and would allocate gigabytes and run rPIE on an empty canvas for minutes.
MAX_CANVAS_FRAME_AREAS = 16


def check_canvas_size(shape: tuple[int, int], n_frames: int, size: int,
                      span: tuple[float, float]) -> None:
    """Refuse an object canvas of ``shape`` for ``n_frames`` frames of ``size`` px whose
    positions span ``span`` px when it exceeds :data:`MAX_CANVAS_FRAME_AREAS` times the
    frames' total area (positions in the wrong units), before anything is allocated.

    Raises
    ------
    InvalidInputError
        Naming the span, the canvas and the likely cause.
    """
    if shape[0] * shape[1] > MAX_CANVAS_FRAME_AREAS * n_frames * size**2:
        raise InvalidInputError(
            f"positions span {span[0]:.0f} x {span[1]:.0f} px (a {shape[0]} x {shape[1]} px "
            f"object canvas) for {n_frames} frames of {size} px: are they object pixels? "
            "(positions in nm, um or m must be converted to object pixels first)")


def _initial_object(
    object_guess, object_shape, positions: torch.Tensor, size: int
) -> torch.Tensor:
    """Object guess as complex64 (H, W), or ones of ``object_shape`` (default: just big enough)."""
    if object_guess is not None:
        obj = _as_tensor(object_guess, "object_guess", torch.complex64)
        if obj.ndim != 2:
            raise InvalidInputError(f"object_guess: expected (H, W), got {tuple(obj.shape)}")
        if object_shape is not None and tuple(object_shape) != tuple(obj.shape):
            raise InvalidInputError(
                f"object_shape {tuple(object_shape)} disagrees with object_guess "
                f"{tuple(obj.shape)}; give one of them"
            )
        _check_finite(obj, "object_guess")
        return obj.clone()
    if object_shape is None:
        object_shape = required_object_shape(positions, size)
        span = (positions.max(dim=0).values - positions.min(dim=0).values).tolist()
        check_canvas_size(object_shape, positions.shape[0], size, (span[0], span[1]))
    shape = tuple(int(v) for v in object_shape)
    if len(shape) != 2 or min(shape) < size:
        raise InvalidInputError(
            f"object_shape: expected (H, W) with H, W >= N = {size}, got {object_shape!r}"
        )
    return torch.ones(shape, dtype=torch.complex64)


def _resolve_device(device) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise InvalidInputError(f"device: cannot use {device!r}: {exc}") from exc


def _model_amplitude(psi: torch.Tensor) -> torch.Tensor:
    """sqrt of the mode-summed intensity: (B, M, N, N) -> (B, N, N)."""
    if psi.shape[1] == 1:  # one mode: no sum over a mode axis of length 1 (a full copy)
        psi = psi[:, 0]
        return (psi.real.square() + psi.imag.square()).sqrt()
    return (psi.real.square() + psi.imag.square()).sum(dim=1).sqrt()


def _photon_scale(
    obj: torch.Tensor,
    probe: torch.Tensor,
    frames: torch.Tensor,
    positions: torch.Tensor,
    mask: torch.Tensor,
    chunk: int = 256,
) -> float:
    """Factor on sum |P|^2 that makes the modelled photons on valid pixels match the data."""
    size = probe.shape[-1]
    modelled = 0.0
    for start in range(0, positions.shape[0], chunk):
        patches = extract_patches(obj, positions[start : start + chunk], size)
        psi = far_field(exit_waves(probe, patches))
        modelled += float((psi.real.square() + psi.imag.square()).sum(dim=1)[:, mask].sum())
    if not modelled > 0:
        raise InvalidInputError("object_guess: zero transmission under every probe position")
    return float(frames[:, mask].sum()) / modelled


def _denominator(power: torch.Tensor, engine: str, alpha: float) -> torch.Tensor:
    """ePIE: max|P|^2; rPIE: (1 - alpha)|P|^2 + alpha max|P|^2 (|P|^2 summed over the batch)."""
    peak = power.max()
    if engine == "epie":
        return peak.expand_as(power)
    return (1 - alpha) * power + alpha * peak


def _pie_batch(
    obj: torch.Tensor,
    probe: torch.Tensor,
    amplitude: torch.Tensor,
    positions: torch.Tensor,
    mask: torch.Tensor,
    *,
    engine: str,
    alphas: tuple[float, float],
    update_probe: bool,
    relax: float = 1.0,
    shifts: torch.Tensor | None = None,
    fft_order: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One batched ePIE/rPIE step: updates ``obj`` in place, returns (new probe, batch error).

    ``relax`` in (0, 1] scales both updates (:class:`~._schedule.StepSchedule`). With
    ``shifts`` (a (B, 2) tensor), each position's least-squares shift estimate is written
    into it (:func:`~._positions.position_shifts`), from the same exit-wave update. With
    ``fft_order``, ``amplitude`` and ``mask`` are given with the zero frequency at pixel
    (0, 0) (:func:`to_fft_order`) and the far field is taken without its two shifts (the
    modulus constraint is pixel by pixel, so the result is the same, ~10 % sooner). The error
    stays a device tensor so that a GPU is synchronised once per epoch, not per batch.
    """
    size = probe.shape[-1]
    shape = (obj.shape[0], obj.shape[1])
    # Indices and weights once for the extraction and both depositions (and one bounds check).
    geometry = patch_geometry(positions, size, shape)
    patches = extract_patches(obj, positions, size, geometry=geometry)
    waves = exit_waves(probe, patches)
    psi = far_field(waves, centred=not fft_order)
    model = _model_amplitude(psi)
    error = ((model - amplitude).square() * mask).sum()
    ratio = torch.where(mask, amplitude / model.clamp_min(_AMPLITUDE_FLOOR), 1.0)
    # (the ratio made complex once, on B N^2 values, rather than inside the M B N^2 product)
    delta = back_propagate(psi * ratio.unsqueeze(1).to(psi.dtype), centred=not fft_order)
    delta -= waves
    if shifts is not None:
        shifts.copy_(position_shifts(patches, probe, delta))

    # ePIE scales its step by alpha; rPIE's step is 1, alpha living in the denominator.
    alpha_o, alpha_p = alphas
    step_o, step_p = (alpha_o, alpha_p) if engine == "epie" else (1.0, 1.0)
    step_o, step_p = step_o * relax, step_p * relax
    if probe.shape[0] == 1:
        deposit = probe[0].conj() * delta[:, 0]
    else:
        deposit = (probe.conj().unsqueeze(0) * delta).sum(dim=1)
    numerator = scatter_patches(deposit, positions, shape, geometry=geometry)
    power = probe.real.square() + probe.imag.square()
    power = power.sum(dim=0).expand(positions.shape[0], size, size)
    illumination = scatter_patches(power, positions, shape, geometry=geometry)
    if update_probe:
        probe_numerator = (patches.conj().unsqueeze(1) * delta).sum(dim=0)
        weight = (patches.real.square() + patches.imag.square()).sum(dim=0)
        probe = probe + step_p * probe_numerator / _denominator(weight, engine, alpha_p)
    obj += step_o * numerator / _denominator(illumination, engine, alpha_o)
    return probe, error


def to_fft_order(frames: torch.Tensor) -> torch.Tensor:
    """Detector frames (..., N, N) with the zero frequency moved from (N//2, N//2) to (0, 0),
    the order :func:`torch.fft.fft2` produces (``ifftshift``; the inverse is ``fftshift``)."""
    return torch.fft.ifftshift(frames, dim=(-2, -1))


def _centre_shift(probe: torch.Tensor) -> tuple[int, int]:
    """Whole pixels that move the mode-summed probe power's centre of mass onto (N//2, N//2)."""
    size = probe.shape[-1]
    power = (probe.real.square() + probe.imag.square()).reshape(-1, size, size).sum(dim=0)
    power = power.double()
    grid = torch.arange(size, device=probe.device, dtype=torch.float64)
    total = power.sum()
    if not float(total) > 0:
        return 0, 0
    centre_y = float((power.sum(dim=1) * grid).sum() / total)
    centre_x = float((power.sum(dim=0) * grid).sum() / total)
    return round(size // 2 - centre_y), round(size // 2 - centre_x)


def _allowed_shift(
    shift: tuple[int, int], positions: torch.Tensor, size: int, object_shape: tuple[int, int]
) -> tuple[int, int]:
    """``shift`` clipped, axis by axis, so that every patch at ``positions - shift`` stays inside.

    Patches need centres in [N/2, H - N/2] (see ``physics.extract_patches``); the current
    positions satisfy that, so 0 is always allowed.
    """
    low = positions.min(dim=0).values.double().cpu()
    high = positions.max(dim=0).values.double().cpu()
    clipped = []
    for axis, d in enumerate(shift):
        # p - d >= N/2 for the smallest p, p - d <= H - N/2 for the largest.
        most = math.floor(float(low[axis]) - size / 2 + 1e-9)
        least = math.ceil(float(high[axis]) - (object_shape[axis] - size / 2) - 1e-9)
        clipped.append(int(min(max(d, min(least, 0)), max(most, 0))))
    return clipped[0], clipped[1]


def recentre_probe(
    probe: torch.Tensor,
    *,
    positions: torch.Tensor | None = None,
    object_shape: tuple[int, int] | None = None,
) -> tuple[torch.Tensor, tuple[int, int]]:
    """Roll the probe by whole pixels so that its centre of mass sits on pixel (N//2, N//2).

    The object is left where it is; the caller moves the positions instead. With
    ``P'(r) = P(r - d)`` (the probe rolled by ``d``) and positions ``p' = p - d``, every exit
    wave ``P'(r) O(r + p' - N/2)`` is the old one moved by ``d`` in its own window, so the
    diffracted intensities are unchanged while the object keeps the frame of the input
    positions (rolling the object instead would shift it by whole pixels against them).

    Parameters
    ----------
    probe : torch.Tensor
        (N, N) or (M, N, N) probe; the modes' summed power sets the centre and all modes move.
    positions, object_shape : optional
        (n, 2) probe centres (y, x) and the object's (H, W). When given, ``d`` is clipped per
        axis so that every patch at ``positions - d`` stays inside the object (the probe then
        stays partly off-centre; a debug message says so). Give both or neither.

    Returns
    -------
    probe : torch.Tensor
        The rolled probe (the input itself when ``d == (0, 0)``).
    shift : (int, int)
        ``d`` (dy, dx) in pixels, (0, 0) when already centred: subtract it from the positions.

    Examples
    --------
    >>> import torch
    >>> probe = torch.zeros(8, 8, dtype=torch.complex64)
    >>> probe[2, 5] = 1
    >>> rolled, d = recentre_probe(probe)
    >>> d, tuple(int(v) for v in torch.nonzero(rolled.abs())[0])
    ((2, -1), (4, 4))
    """
    if (positions is None) != (object_shape is None):
        raise InvalidInputError("recentre_probe: give positions and object_shape together")
    shift = _centre_shift(probe)
    if positions is not None and object_shape is not None and shift != (0, 0):
        wanted = shift
        shift = _allowed_shift(shift, positions, probe.shape[-1], tuple(object_shape))
        if shift != wanted:
            logger.debug(
                "probe re-centring clipped from %s to %s pixels: the positions would leave the "
                "object; give a larger object_shape for room", wanted, shift,
            )
    if shift == (0, 0):
        return probe, (0, 0)
    logger.debug("recentring probe by %s pixels (positions move by the opposite)", shift)
    return torch.roll(probe, shift, dims=(-2, -1)), shift


def _progress_bar(enabled: bool) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("error {task.fields[error]}"),
        TimeElapsedColumn(),
        disable=not enabled,
    )


def pie_reconstruct(
    frames,
    positions,
    probe_guess,
    *,
    object_guess=None,
    object_shape: tuple[int, int] | None = None,
    mask=None,
    options: PIEOptions | None = None,
) -> PIEResult:
    """Reconstruct object (and probe) from diffraction frames with ePIE or rPIE.

    Parameters
    ----------
    frames : array_like
        (n, N, N) photon counts, DC at (N//2, N//2), non-negative on valid pixels.
    positions : array_like
        (n, 2) probe centres (y, x) in object pixels (origin at the centre of pixel (0, 0));
        every patch must lie inside the object.
    probe_guess : array_like
        (N, N) or (M, N, N) complex probe (M incoherent modes), any norm: it is normalised and
        scaled to the photon count of the data (or to ``options.photons_per_frame``).
    object_guess : array_like, optional
        (H, W) complex starting object; default ones.
    object_shape : (int, int), optional
        Shape of the default object; default just large enough for every position.
    mask : array_like of bool, optional
        (N, N) valid pixels (True = valid). Masked pixels keep the modelled amplitude.
    options : PIEOptions, optional
        Engine, epochs, batch size, step sizes, probe refinement, seed, device, progress bar.

    Returns
    -------
    PIEResult
        Object, unit-norm probe, final positions, photon scale, per-epoch error history and
        timings. With ``options.recenter_probe`` the probe is rolled by whole pixels to keep
        it centred and the positions move the opposite way (:func:`recentre_probe`): the
        object stays in the frame of the input positions, and ``result.positions`` are the
        probe centres that go with ``result.probe``.

    Raises
    ------
    InvalidInputError
        If shapes disagree, values are non-finite or negative counts appear on valid pixels,
        a patch falls outside the object, or an option is out of range.

    Examples
    --------
    >>> import numpy as np
    >>> from bluesky_ptychopinn.physics import pinhole_probe, simulate_diffraction
    >>> from bluesky_ptychopinn.recon import PIEOptions, pie_reconstruct
    >>> probe = pinhole_probe(32, 10e-9, 8_000)
    >>> yy, xx = np.mgrid[:80, :80]
    >>> truth = np.exp(0.5j * np.sin(yy / 6) * np.cos(xx / 5)).astype(np.complex64)
    >>> pos = np.stack(np.meshgrid(np.arange(20, 61, 4.0), np.arange(20, 61, 4.0)), -1)
    >>> pos = pos.reshape(-1, 2)
    >>> sim = simulate_diffraction(truth, probe, pos, photons=1e6, poisson=False)
    >>> opts = PIEOptions(n_epochs=20, probe_update=False, device="cpu", progress=False)
    >>> result = pie_reconstruct(sim.counts, pos, probe, object_shape=(80, 80), options=opts)
    >>> result.object.shape, result.error_history[-1] < result.error_history[0] / 10
    ((80, 80), True)
    """
    options = PIEOptions() if options is None else options
    options.validate()
    start_time = time.perf_counter()
    device = _resolve_device(options.device)

    frames_t, mask_t = _check_frames(frames, mask)
    n_frames, size = frames_t.shape[0], frames_t.shape[-1]
    pos = _check_positions(positions, n_frames)
    # float64 copy for the returned positions: the engine works on float32 ones.
    input_positions = _as_tensor(positions, "positions", torch.float64).cpu().numpy()
    probe = _check_probe(probe_guess, size).to(device)
    obj = _initial_object(object_guess, object_shape, pos, size).to(device)
    pos, mask_t = pos.to(device), mask_t.to(device)
    frames_t = frames_t.to(device)
    # Fails early, with the position named, if a patch leaves the object.
    extract_patches(obj.real, pos, size)

    if options.photons_per_frame is not None:
        scale = float(options.photons_per_frame)
    else:
        scale = _photon_scale(obj, probe, frames_t, pos, mask_t)
    probe = probe * math.sqrt(scale)
    measured = float(frames_t[:, mask_t].sum())
    # The data once in the FFT's pixel order: no fftshift per batch (_pie_batch's fft_order).
    amplitude = to_fft_order(frames_t.sqrt())
    del frames_t
    mask_fft = to_fft_order(mask_t)

    alphas = options.resolved_alphas()
    generator = torch.Generator(device="cpu")
    if options.seed is None:
        generator.seed()
    else:
        generator.manual_seed(int(options.seed))
    history: list[float] = []
    shape = (obj.shape[0], obj.shape[1])
    total_shift = (0, 0)  # whole pixels the probe was rolled by, summed over epochs
    schedule = StepSchedule.for_options(options)
    acceleration = PassAcceleration(options.momentum, options.momentum_friction,
                                    options.momentum_gain)
    acceleration.begin(probe)
    corrector = PositionCorrector(options.position_gain, size)
    corrector.grow(n_frames)
    setup_s = time.perf_counter() - start_time

    with _progress_bar(options.progress) as bar:
        task = bar.add_task(options.engine, total=options.n_epochs, error="-")
        for epoch in range(options.n_epochs):
            update_probe = options.probe_update and epoch >= options.probe_update_start_epoch
            correct = (options.position_correction
                       and epoch >= options.position_correction_start_epoch)
            order = torch.randperm(n_frames, generator=generator).to(device)
            error = torch.zeros((), dtype=torch.float64, device=device)
            for batch in torch.split(order, options.batch_size):
                shifts = torch.empty((len(batch), 2), device=device) if correct else None
                probe, batch_error = _pie_batch(
                    obj, probe, amplitude[batch], pos[batch], mask_fft,
                    engine=options.engine, alphas=alphas, update_probe=update_probe,
                    relax=schedule.step, shifts=shifts, fft_order=True,
                )
                if shifts is not None:
                    corrector.apply(pos, batch, shifts, shape, schedule.step)
                error += batch_error
            history.append(float(error) / measured)
            schedule.end_pass(history[-1], n_frames)
            probe = acceleration.end_pass(obj, probe, probe_updating=update_probe,
                                          settled=schedule.settled_at is not None)
            if correct:
                pos = corrector.centre(pos, shape)
            if update_probe and options.recenter_probe:
                probe, shift = recentre_probe(probe, positions=pos, object_shape=shape)
                if shift != (0, 0):
                    acceleration.rolled(shift)
                    # The object stays put: the probe centres move against the probe's roll.
                    pos = pos - torch.tensor(shift, dtype=pos.dtype, device=pos.device)
                    total_shift = (total_shift[0] + shift[0], total_shift[1] + shift[1])
            if not math.isfinite(history[-1]):
                raise FloatingPointError(
                    f"{options.engine} diverged in epoch {epoch}: error {history[-1]}; "
                    "lower alpha_object / alpha_probe"
                )
            bar.update(task, advance=1, error=f"{history[-1]:.3e}")

    total_s = time.perf_counter() - start_time
    iterate_s = total_s - setup_s
    power = float(probe.abs().square().sum())
    resolved = dataclasses.replace(options, alpha_object=alphas[0], alpha_probe=alphas[1])
    return PIEResult(
        object=obj.cpu().numpy().astype(np.complex64),
        probe=(probe / math.sqrt(power)).cpu().numpy().astype(np.complex64),
        photon_scale=power,
        error_history=history,
        timings={
            "setup_s": setup_s,
            "iterate_s": iterate_s,
            "per_epoch_s": iterate_s / options.n_epochs,
            "total_s": total_s,
        },
        options=resolved,
        device=str(device),
        # Integer shifts, so the input's sub-pixel values are kept exactly (plus the position
        # correction's moves, zero without it).
        positions=(input_positions - np.asarray(total_shift, dtype=np.float64)
                   + corrector.moves.numpy()),
    )
