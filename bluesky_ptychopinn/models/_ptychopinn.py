"""The PtychoPINN network: diffraction amplitudes in, object patches (amplitude, phase) out.

One readable file, torchvision style: small building blocks, then the model, then a builder.
The architecture follows the PtychoPINN-torch reference: a shared convolutional encoder, two
decoders (amplitude, phase), and an output head whose main path predicts the central N/2 x N/2
of each patch while a thin full-size path fills the border.
"""

from __future__ import annotations

import math

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from torch import nn
from torch.nn import functional as F

from ..errors import InvalidInputError

__all__ = ["PtychoPINNConfig", "PtychoPINN", "ptychopinn", "input_scale"]


class PtychoPINNConfig(BaseModel):
    """Architecture of a :class:`PtychoPINN` network (stored next to the weights as JSON).

    Attributes
    ----------
    frame_size : int
        N, the side of a diffraction frame and of the predicted patch (64 or 128).
    channels : int
        C, frames per group: 1 (no overlap constraint) or 4 (2 x 2 neighbour groups).
    base_width : int
        Channels of the first encoder block (64 in the paper); the widths double per block.
    depth : int
        Encoder blocks (each halves the spatial size); 3 for N = 64, 4 for N = 128 keeps an
        8 x 8 bottleneck. At most log2(N): the bottleneck must keep at least one pixel.
    attention : bool
        CBAM attention after each encoder block.
    border_fraction : float
        Width of the full-size border path relative to the last decoder width (1/8 in the paper).
    amplitude_activation : {"silu", "sigmoid", "softplus"}
        Final amplitude non-linearity.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    frame_size: int = Field(64, ge=16)
    channels: int = Field(1)
    base_width: int = Field(16, ge=2)
    depth: int = Field(3, ge=1, le=5)
    attention: bool = False
    border_fraction: float = Field(0.125, gt=0, le=1)
    amplitude_activation: str = "sigmoid"

    @field_validator("frame_size")
    @classmethod
    def _frame_size(cls, value: int) -> int:
        if value & (value - 1):
            raise ValueError(f"frame_size must be a power of two, got {value}")
        return value

    @field_validator("channels")
    @classmethod
    def _channels(cls, value: int) -> int:
        if value not in (1, 4):
            raise ValueError(f"channels must be 1 or 4, got {value}")
        return value

    @field_validator("amplitude_activation")
    @classmethod
    def _activation(cls, value: str) -> str:
        if value not in ("silu", "sigmoid", "softplus"):
            raise ValueError(f"amplitude_activation must be silu, sigmoid or softplus, not {value}")
        return value

    @model_validator(mode="after")
    def _depth_fits(self) -> PtychoPINNConfig:
        # Each encoder block max-pools by 2: after depth blocks the bottleneck is
        # frame_size / 2**depth pixels, and a 0-pixel one fails only at the first forward
        # ("Output size is too small"). 2**depth == frame_size (a 1-pixel bottleneck) builds
        # and runs, with or without attention (tests/test_review_leftovers.py tries every pair).
        if self.frame_size < 2**self.depth:
            raise ValueError(
                f"depth {self.depth} needs frame_size >= {2**self.depth} (2**depth: each "
                f"encoder block halves the frame), got frame_size {self.frame_size}")
        return self


def input_scale(counts: torch.Tensor) -> torch.Tensor:
    """The per-experiment input scale s = sqrt(N^2 / mean_i sum(counts_i)).

    Multiplying sqrt(counts) by s gives amplitudes whose mean square is 1 per pixel, whatever
    the photon count: the network sees the same numbers at 1e4 or 1e7 photons per frame.
    """
    n_pixels = counts.shape[-1] * counts.shape[-2]
    mean_total = counts.reshape(-1, n_pixels).sum(dim=1).mean().clamp_min(1e-12)
    return torch.sqrt(n_pixels / mean_total)


class ChannelAttention(nn.Module):
    """CBAM channel attention: a shared MLP over average- and max-pooled features."""

    def __init__(self, channels: int, reduction: int = 8) -> None:
        super().__init__()
        hidden = max(channels // reduction, 1)
        self.mlp = nn.Sequential(
            nn.Linear(channels, hidden), nn.ReLU(), nn.Linear(hidden, channels)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        avg = self.mlp(x.mean(dim=(-2, -1)))
        mx = self.mlp(x.amax(dim=(-2, -1)))
        return x * torch.sigmoid(avg + mx)[..., None, None]


class SpatialAttention(nn.Module):
    """CBAM spatial attention: a 7x7 conv over channel-mean and channel-max maps."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 1, 7, padding=3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = torch.cat([x.mean(dim=1, keepdim=True), x.amax(dim=1, keepdim=True)], dim=1)
        return x * torch.sigmoid(self.conv(pooled))


class ConvBlock(nn.Sequential):
    """Two 3x3 convolutions with ReLU."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(
            nn.Conv2d(in_channels, out_channels, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_channels, out_channels, 3, padding=1),
            nn.ReLU(inplace=True),
        )


class EncoderBlock(nn.Module):
    """ConvBlock, optional CBAM attention, 2x max-pool."""

    def __init__(self, in_channels: int, out_channels: int, attention: bool) -> None:
        super().__init__()
        self.conv = ConvBlock(in_channels, out_channels)
        self.attention = (
            nn.Sequential(ChannelAttention(out_channels), SpatialAttention())
            if attention
            else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.max_pool2d(self.attention(self.conv(x)), 2)


class Decoder(nn.Module):
    """Upsampling decoder with a central N/2 path and a thin full-size border path."""

    def __init__(self, widths: list[int], out_channels: int, frame_size: int, border: float):
        super().__init__()
        # widths: bottleneck first, e.g. [64, 32, 16]; the central path upsamples len-1 times.
        self.blocks = nn.ModuleList(
            ConvBlock(w_in, w_out) for w_in, w_out in zip(widths[:-1], widths[1:], strict=True)
        )
        last = widths[-1]
        self.central_head = nn.Conv2d(last, out_channels, 3, padding=1)
        border_width = max(int(round(last * border)), 2)
        self.border = nn.Sequential(
            nn.Conv2d(last, border_width, 3, padding=1),
            nn.ReLU(inplace=True),
        )
        self.border_head = nn.Conv2d(border_width, out_channels, 3, padding=1)
        self.frame_size = frame_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = F.interpolate(block(x), scale_factor=2, mode="nearest")
        n = self.frame_size
        central = self.central_head(x)  # (B, C, N/2, N/2)
        pad = (n - central.shape[-1]) // 2
        central = F.pad(central, (pad, pad, pad, pad))
        border = F.interpolate(self.border(x), size=(n, n), mode="nearest")
        return central + self.border_head(border)


class PtychoPINN(nn.Module):
    """Diffraction (B, C, N, N) photon counts -> complex object patches (B, C, N, N).

    Inference needs only the diffraction (and the experiment's input scale); no probe and no
    positions. The physics layer used for training lives in :mod:`.physics_decoder`.

    Parameters
    ----------
    config : PtychoPINNConfig
        The architecture.
    """

    def __init__(self, config: PtychoPINNConfig) -> None:
        super().__init__()
        self.config = config
        c = config.channels
        widths = [config.base_width * 2**k for k in range(config.depth)]
        blocks = []
        in_ch = c
        for w in widths:
            blocks.append(EncoderBlock(in_ch, w, config.attention))
            in_ch = w
        self.encoder = nn.Sequential(*blocks)
        # Decoders climb back to N/2: depth - 1 upsamplings, widths in reverse.
        dec_widths = widths[::-1]
        self.amplitude = Decoder(dec_widths, c, config.frame_size, config.border_fraction)
        self.phase = Decoder(dec_widths, c, config.frame_size, config.border_fraction)

    def amplitude_activation(self, x: torch.Tensor) -> torch.Tensor:
        name = self.config.amplitude_activation
        if name == "sigmoid":
            return torch.sigmoid(x) * 1.5  # transmission in (0, 1.5)
        if name == "softplus":
            return F.softplus(x)
        return F.silu(x)

    def forward(
        self, counts: torch.Tensor, scale: torch.Tensor | float, *, return_parts: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Predict complex patches.

        Parameters
        ----------
        counts : torch.Tensor
            (B, C, N, N) photon counts, DC at the centre.
        scale : torch.Tensor or float
            Input scale of the experiment, see :func:`input_scale` (a scalar or (B,)).

        return_parts : bool
            Return ``(amplitude, phase)`` instead of the complex patches (what training uses;
            going through ``forward`` keeps DistributedDataParallel's gradient hooks).

        Returns
        -------
        torch.Tensor
            (B, C, N, N) complex64 patches amplitude * exp(i phase).

        Raises
        ------
        InvalidInputError
            ``counts`` is not (B, C, N, N) with the configured C and N.
        """
        amplitude, phase = self.forward_parts(counts, scale)
        if return_parts:
            return amplitude, phase
        return torch.polar(amplitude.float(), phase.float())

    def forward_parts(self, counts: torch.Tensor, scale) -> tuple[torch.Tensor, torch.Tensor]:
        """Amplitude and phase (radians) of the predicted patches, each (B, C, N, N).

        Raises
        ------
        InvalidInputError
            ``counts`` is not (B, C, N, N) with the configured C and N.
        """
        c, n = self.config.channels, self.config.frame_size
        # No weight's shape depends on N, so frames of another size would run and silently
        # come back as (B, C, N, N) patches of the configured N (the decoder pads or crops).
        if counts.ndim != 4 or tuple(counts.shape[-3:]) != (c, n, n):
            raise InvalidInputError(
                f"counts: expected (B, {c}, {n}, {n}) photon counts for this model "
                f"(channels={c}, frame_size={n}), got {tuple(counts.shape)}")
        scale = torch.as_tensor(scale, dtype=counts.dtype, device=counts.device)
        if scale.ndim == 1:
            scale = scale.view(-1, 1, 1, 1)
        x = torch.sqrt(counts.clamp_min(0)) * scale
        features = self.encoder(x)
        amplitude = self.amplitude_activation(self.amplitude(features))
        phase = math.pi * torch.tanh(self.phase(features))
        return amplitude, phase


def ptychopinn(**kwargs) -> PtychoPINN:
    """Build a :class:`PtychoPINN` (keyword arguments as in :class:`PtychoPINNConfig`).

    Examples
    --------
    >>> import torch
    >>> model = ptychopinn(frame_size=64, channels=4, base_width=8)
    >>> model(torch.rand(2, 4, 64, 64) * 100, 1.0).shape
    torch.Size([2, 4, 64, 64])
    """
    return PtychoPINN(PtychoPINNConfig(**kwargs))
