"""Position correction: where each frame's probe really was, from the frame's own update.

Encoder readings are off by tenths of a pixel to pixels (stage jitter, drift, backlash), and a
frame placed in the wrong spot pulls the object towards a blurred, doubled copy of itself. The
PIE update already holds what is needed to see the error: the exit-wave correction ``dpsi_j``
of frame ``j`` is what the modulus constraint wants changed. A small shift ``s`` of the probe
centre changes the exit wave by ``P (grad O . s)`` to first order, so the shift that explains
the correction best is the 2 x 2 least-squares solution

    [sum |P gy|^2,          Re sum conj(P gy) P gx] [s_y]   [Re sum conj(P gy) dpsi]
    [Re sum conj(P gx) P gy, sum |P gx|^2         ] [s_x] = [Re sum conj(P gx) dpsi]

(sums over probe modes and pixels; ``g`` the object patch's gradient), the gradient step of
the fit error with respect to the position, scaled by its own curvature (as in the
least-squares engines of Odstrcil et al. 2018, here in closed form per frame). The refiner
moves each position by a damped, clipped ``s`` and removes the mean move of the batch, since
a common shift of all positions is a shift of the object, which the data cannot see.
"""

from __future__ import annotations

import torch

__all__ = ["PositionCorrector", "position_shifts"]

_MAX_MOVE_PX = 0.5  # most a position moves in one update (a wrong estimate stays small)

# Tikhonov weight relative to the mean curvature: a frame on a featureless patch (no
# gradient, no information about its position) gets a shift of ~0, not noise / 0.
_REGULARISATION = 0.05


def position_shifts(patches: torch.Tensor, probe: torch.Tensor, delta: torch.Tensor
                    ) -> torch.Tensor:
    """Least-squares probe-centre shifts (y, x) in pixels that explain each exit-wave update.

    Parameters
    ----------
    patches : torch.Tensor
        (B, N, N) complex object patches the exit waves were formed from.
    probe : torch.Tensor
        (M, N, N) complex probe modes (any scale: the solution does not depend on it).
    delta : torch.Tensor
        (B, M, N, N) exit-wave corrections (constrained minus modelled exit waves).

    Returns
    -------
    torch.Tensor
        (B, 2) float32 shifts to add to the positions.

    Examples
    --------
    A patch of a smooth object whose "measured" exit wave is the object moved by 0.3 px in y:

    >>> import torch
    >>> y, x = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    >>> def obj(dy):
    ...     return torch.exp(1j * torch.sin((y + dy) / 3) * torch.cos(x / 4))[None]
    >>> probe = torch.exp(-((y - 16) ** 2 + (x - 16) ** 2) / 60).to(torch.complex64)[None]
    >>> delta = (probe * (obj(0.3) - obj(0.0)))[:, None]
    >>> [round(float(v), 2) for v in position_shifts(obj(0.0), probe, delta)[0]]
    [0.3, 0.0]
    """
    gy, gx = torch.gradient(patches, dim=(-2, -1))
    qy = probe.unsqueeze(0) * gy.unsqueeze(1)  # (B, M, N, N)
    qx = probe.unsqueeze(0) * gx.unsqueeze(1)
    dims = (1, 2, 3)
    a_yy = (qy.real.square() + qy.imag.square()).sum(dim=dims)
    a_xx = (qx.real.square() + qx.imag.square()).sum(dim=dims)
    a_xy = (qy.conj() * qx).real.sum(dim=dims)
    b_y = (qy.conj() * delta).real.sum(dim=dims)
    b_x = (qx.conj() * delta).real.sum(dim=dims)
    # The floor keeps a batch of featureless patches (a canvas of ones, nothing fitted yet)
    # at a zero shift instead of 0 / 0.
    ridge = (_REGULARISATION * (a_yy + a_xx).mean() / 2).clamp_min(torch.finfo(a_yy.dtype).tiny)
    a_yy, a_xx = a_yy + ridge, a_xx + ridge
    det = a_yy * a_xx - a_xy.square()
    s_y = (a_xx * b_y - a_xy * b_x) / det
    s_x = (a_yy * b_x - a_xy * b_y) / det
    shifts = torch.stack([s_y, s_x], dim=1).to(torch.float32)
    return torch.nan_to_num(shifts, nan=0.0, posinf=0.0, neginf=0.0)


def _inside(positions: torch.Tensor, canvas_shape: tuple[int, int], size: int) -> torch.Tensor:
    """``positions`` clamped so that every ``size`` patch stays on the canvas."""
    half = size / 2
    high = torch.tensor(canvas_shape, dtype=positions.dtype, device=positions.device) - half
    return torch.minimum(torch.maximum(positions, torch.full_like(positions, half)), high)


class PositionCorrector:
    """Applies shift estimates to an engine's positions and keeps the total move per frame.

    Parameters
    ----------
    gain : float
        Fraction of each estimate applied (the estimate is a full Gauss-Newton step, noisy at
        low dose); each move is also clipped to 0.5 px.
    frame_size : int
        N: patches must stay on the canvas.
    """

    def __init__(self, gain: float, frame_size: int,
                 device: torch.device | str = "cpu") -> None:
        self.gain, self.frame_size = float(gain), int(frame_size)
        #: (n, 2) total move (y, x) of each frame's probe centre, object pixels, mean removed;
        #: on the engine's device, so that a GPU is not synchronised per batch.
        self.moves = torch.zeros((0, 2), dtype=torch.float64, device=device)

    def grow(self, n_frames: int) -> None:
        """Make room for frames up to ``n_frames`` (new ones not moved yet)."""
        if n_frames > len(self.moves):
            extra = self.moves.new_zeros((n_frames - len(self.moves), 2))
            self.moves = torch.cat([self.moves, extra])

    def apply(self, positions: torch.Tensor, index: torch.Tensor, shifts: torch.Tensor,
              canvas_shape: tuple[int, int], relax: float = 1.0) -> None:
        """Move ``positions[index]`` (in place) by their damped, clipped ``shifts``; ``relax``
        is the engine's step factor (:class:`~._schedule.StepSchedule`): once the error has
        settled, the positions settle too instead of following each pass's noise."""
        move = (self.gain * relax * shifts).clamp(-_MAX_MOVE_PX, _MAX_MOVE_PX)
        old = positions[index]
        new = _inside(old + move.to(old.dtype), canvas_shape, self.frame_size)
        positions[index] = new
        index = index.to(self.moves.device)
        self.moves[index] += (new - old).to(self.moves)

    def centre(self, positions: torch.Tensor, canvas_shape: tuple[int, int]) -> torch.Tensor:
        """``positions`` less the mean move: a common shift is a shift of the object, which the
        frames cannot see, and letting it accumulate would move the image."""
        n = len(positions)
        if not n:
            return positions
        mean = self.moves[:n].mean(dim=0)
        if float(mean.abs().max()) <= 1e-6:  # one host sync a pass
            return positions
        moved = _inside(positions - mean.to(positions), canvas_shape, self.frame_size)
        # What the clamp at the canvas edge let through, so moves stay the positions' record.
        self.moves[:n] += (moved - positions).to(self.moves)
        return moved

    def rms(self, n_frames: int) -> float:
        """Root-mean-square total move of the first ``n_frames`` frames, pixels."""
        moves = self.moves[:n_frames]
        return float(moves.square().sum(dim=1).mean().sqrt()) if len(moves) else 0.0
