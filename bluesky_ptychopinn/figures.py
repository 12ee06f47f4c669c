"""Figures people look at instead of reading numbers (matplotlib, Agg backend, PNG files)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

__all__ = ["reconstruction_figure", "probe_figure", "scale_bar_length_um", "draw_scale_bar"]


def scale_bar_length_um(width_px: int, pixel_size_m: float) -> float:
    """A round length (1, 2 or 5 x 10^k um) near a fifth of the image width.

    Examples
    --------
    >>> scale_bar_length_um(200, 50e-9)   # a 10 um wide image
    2.0
    """
    target = width_px * pixel_size_m * 1e6 / 5
    if not target > 0:
        return 0.0
    power = 10 ** math.floor(math.log10(target))
    best = max((m * power for m in (1, 2, 5, 10) if m * power <= target * (1 + 1e-9)),
               default=power)
    return float(f"{best:.12g}")


def draw_scale_bar(ax, shape: tuple[int, int], pixel_size_m: float,
                   color: str = "white") -> float:
    """Draw a micrometre scale bar in the lower left of an image of ``shape``; returns its
    length in um (0 and nothing drawn without a pixel size)."""
    if not pixel_size_m or not pixel_size_m > 0:
        return 0.0
    length_um = scale_bar_length_um(shape[1], pixel_size_m)
    length_px = length_um * 1e-6 / pixel_size_m
    y, x = shape[0] * 0.92, shape[1] * 0.05
    ax.plot([x, x + length_px], [y, y], color=color, linewidth=3, scalex=False, scaley=False)
    ax.text(x, y - shape[0] * 0.03, f"{length_um:g} µm", color=color, fontsize=8)
    return length_um


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _robust_limits(image: np.ndarray, mask: np.ndarray | None = None,
                   percent: float = 1.0) -> tuple[float | None, float | None]:
    """Colour limits from the 1st-99th percentiles inside ``mask`` (default: everywhere), so
    that a few edge pixels of a stitched object do not wash out its interior; ``(None, None)``
    (autoscale) when the mask holds too little."""
    values = image[mask] if mask is not None else np.ravel(image)
    values = values[np.isfinite(values)]
    if values.size < 16:
        return None, None
    lo, hi = np.percentile(values, [percent, 100 - percent])
    return (float(lo), float(hi)) if hi > lo else (None, None)


def _show(ax, image, title, cmap="gray", limits=(None, None)):
    im = ax.imshow(image, cmap=cmap, interpolation="nearest", vmin=limits[0], vmax=limits[1])
    ax.set_title(title, fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.figure.colorbar(im, ax=ax, fraction=0.046, pad=0.02)


def probe_figure(probe: np.ndarray, path: str | Path, *, title: str = "probe") -> Path:
    """Amplitude and phase of each probe mode (and its share of the power)."""
    plt = _pyplot()
    probe = np.asarray(probe)
    probe = probe[None] if probe.ndim == 2 else probe
    power = (np.abs(probe) ** 2).sum(axis=(-2, -1))
    power = power / power.sum()
    fig, axes = plt.subplots(2, len(probe), figsize=(2.6 * len(probe) + 0.6, 5.2), squeeze=False)
    for m, mode in enumerate(probe):
        _show(axes[0, m], np.abs(mode), f"{title} mode {m} |P| ({power[m]:.0%})", "magma")
        _show(axes[1, m], np.angle(mode), f"mode {m} phase (rad)", "cividis")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def reconstruction_figure(
    path: str | Path,
    obj: np.ndarray,
    *,
    probe: np.ndarray | None = None,
    truth: np.ndarray | None = None,
    frc: Mapping[str, tuple[Sequence[float], Sequence[float]]] | None = None,
    threshold: tuple[Sequence[float], Sequence[float]] | None = None,
    title: str = "",
    extra: Mapping[str, np.ndarray] | None = None,
    weight: np.ndarray | None = None,
    pixel_size_m: float | None = None,
) -> Path:
    """One PNG: object amplitude and phase, the probe, optional truth, extra maps and FRC curves.

    Reconstruction and truth are shown on the same colour range (the reconstruction's phase
    on the truth's constant offset, which ptychography cannot fix), cropped to what was
    measured when ``weight`` is given, with a micrometre scale bar when ``pixel_size_m`` is.

    Parameters
    ----------
    path : path
        PNG to write.
    obj : numpy.ndarray
        Reconstructed complex object.
    probe : numpy.ndarray, optional
        (M, N, N) or (N, N) probe; the first mode is shown.
    truth : numpy.ndarray, optional
        Ground-truth object, shown beside the reconstruction.
    frc : mapping of label to (freq, curve), optional
        FRC curves to plot (frequency normalised to Nyquist).
    threshold : (freq, curve), optional
        The threshold curve drawn with the FRC.
    extra : mapping of title to 2-D array, optional
        More maps on the object's grid (e.g. an uncertainty map).
    weight : numpy.ndarray, optional
        Coverage on the object's grid: the maps are cropped to the measured region.
    pixel_size_m : float, optional
        Object pixel size, for the scale bar.
    """
    plt = _pyplot()
    obj = np.asarray(obj)
    if truth is not None and np.shape(truth) != obj.shape:
        truth = None  # on another grid: a side-by-side view would mislead
    box = (slice(None), slice(None))
    if weight is not None and np.any(weight > 0):
        from .metrics import covered_box

        box = covered_box(weight)
    full_shape = obj.shape
    obj = obj[box]
    covered = np.abs(obj) > 0
    if truth is not None:
        truth = np.asarray(truth)[box]
        phase, _ = _phase_on_truth(obj, truth)
        amp_limits = _robust_limits(np.concatenate([np.abs(obj)[covered],
                                                    np.abs(truth)[covered]]))
        phase_limits = _robust_limits(np.concatenate([phase[covered],
                                                      np.angle(truth)[covered]]))
    else:
        phase = np.angle(obj)
        amp_limits = _robust_limits(np.abs(obj), covered)
        phase_limits = _robust_limits(phase, covered)
    panels: list[tuple[np.ndarray, str, str, tuple, bool]] = [
        (np.abs(obj), "object amplitude", "gray", amp_limits, True),
        (phase, "object phase (rad)", "cividis", phase_limits, True),
    ]
    if truth is not None:
        panels += [
            (np.abs(truth), "true amplitude (same range)", "gray", amp_limits, True),
            (np.angle(truth), "true phase (same range)", "cividis", phase_limits, True),
        ]
    if probe is not None:
        p = np.asarray(probe)
        p = p[0] if p.ndim == 3 else p
        panels.append((np.abs(p), "probe |P| (mode 0)", "magma", (None, None), True))
    for name, image in (extra or {}).items():
        image = np.asarray(image)
        if image.shape == full_shape:  # on the object's grid: the same crop and scale bar
            image = image[box]
            panels.append((image, name, "viridis", _robust_limits(image, covered), True))
        else:
            panels.append((image, name, "viridis", (None, None), False))
    n_axes = len(panels) + (1 if frc else 0)
    cols = min(n_axes, 4)
    rows = int(np.ceil(n_axes / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3.4 * cols, 3.1 * rows), squeeze=False)
    flat = axes.ravel()
    for ax, (image, name, cmap, limits, bar) in zip(flat, panels, strict=False):
        _show(ax, image, name, cmap, limits)
        if bar and pixel_size_m:
            draw_scale_bar(ax, image.shape, pixel_size_m)
    if frc:
        ax = flat[len(panels)]
        for label, (freq, curve) in frc.items():
            ax.plot(freq, curve, label=label)
        if threshold is not None:
            ax.plot(threshold[0], threshold[1], "k--", lw=0.8, label="threshold")
        ax.set_xlabel("spatial frequency / Nyquist")
        ax.set_ylabel("FRC")
        ax.set_ylim(-0.1, 1.05)
        ax.legend(fontsize=7)
        ax.set_title("Fourier ring correlation", fontsize=9)
    for ax in flat[n_axes:]:
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def _phase_on_truth(recon: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Phase of ``recon`` on the truth's constant offset (ptychography fixes the phase only up
    to a constant), zero where nothing was reconstructed; and that coverage mask."""
    covered = np.abs(recon) > 0
    phase = np.angle(recon)
    if covered.any() and truth.shape == recon.shape:
        offset = np.angle(np.sum(truth[covered] * np.conj(recon[covered])))
        phase = np.where(covered, np.angle(recon * np.exp(1j * offset)), 0.0)
    return phase, covered


def demo_figure(
    path: str | Path,
    *,
    recon: np.ndarray,
    truth: np.ndarray,
    uncertainty: np.ndarray,
    scan_px: np.ndarray,
    iterations: np.ndarray,
    refined: np.ndarray | None = None,
    probe: np.ndarray | None = None,
    quality: Mapping[str, tuple[Sequence[float], Sequence[float]]] | None = None,
    last_frame_s: float | None = None,
    title: str = "",
) -> Path:
    """Live-reconstruction summary.

    Top row: the network's live phase, the refined (rPIE) phase, the hidden truth, the
    network's uncertainty. Bottom row: the scan path coloured by feedback iteration
    (0 = coarse overview), FRC-AUC against the truth versus time for each engine
    (``quality``: label -> (seconds, FRC-AUC)), the refined probe, the refined amplitude.
    """
    plt = _pyplot()
    fig, axes = plt.subplots(2, 4, figsize=(17, 8.2))
    phase, covered = _phase_on_truth(recon, truth)
    phase_limits = _robust_limits(phase, covered)
    _show(axes[0, 0], phase, "network (live preview): phase (rad)", "cividis", phase_limits)
    if refined is not None:
        refined_phase, _ = _phase_on_truth(np.where(covered, refined, 0), truth)
        _show(axes[0, 1], refined_phase, "refined (rPIE): phase (rad)", "cividis", phase_limits)
        _show(axes[1, 3], np.abs(refined), "refined: amplitude", "gray",
              _robust_limits(np.abs(refined), covered))
    else:
        _show(axes[0, 1], np.abs(recon), "network: amplitude", "gray",
              _robust_limits(np.abs(recon), covered))
        axes[1, 3].axis("off")
    _show(axes[0, 2], np.angle(truth), "hidden truth: phase", "cividis", phase_limits)
    _show(axes[0, 3], uncertainty, "network uncertainty (overlap variance)", "viridis",
          _robust_limits(uncertainty, covered))
    ax = axes[1, 0]
    ax.imshow(phase, cmap="gray", interpolation="nearest", vmin=phase_limits[0],
              vmax=phase_limits[1])
    sc = ax.scatter(scan_px[:, 1], scan_px[:, 0], c=iterations, s=6, cmap="plasma")
    ax.set_title("scan path (colour = feedback iteration)", fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])
    fig.colorbar(sc, ax=ax, fraction=0.046, pad=0.02)
    ax = axes[1, 1]
    for label, (seconds, auc) in (quality or {}).items():
        ax.plot(seconds, auc, marker="o", ms=3, label=label)
    if last_frame_s is not None:
        ax.axvline(last_frame_s, color="k", lw=0.8, ls=":", label="last frame")
    ax.set_xlabel("seconds since the scan started")
    ax.set_ylabel("phase FRC-AUC (0-0.5) vs truth")
    ax.set_ylim(0, 1)
    ax.set_title("image quality while scanning", fontsize=9)
    if quality:
        ax.legend(fontsize=7, loc="lower right")
    if probe is not None:
        modes = np.atleast_3d(probe) if probe.ndim == 3 else probe[None]
        _show(axes[1, 2], np.sqrt((np.abs(modes) ** 2).sum(axis=0)),
              f"refined probe: amplitude ({modes.shape[0]} mode(s))", "magma")
    else:
        axes[1, 2].axis("off")
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return Path(path)


def frc_figure(path: str | Path, curves: Mapping[str, tuple[Sequence[float], Sequence[float]]],
               *, title: str = "phase FRC") -> Path:
    """FRC curves of several methods on one axis."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, (freq, curve) in curves.items():
        ax.plot(freq, curve, label=label)
    ax.axvline(0.5, color="k", lw=0.5, ls=":")
    ax.set_xlabel("spatial frequency / Nyquist")
    ax.set_ylabel("FRC")
    ax.set_ylim(-0.1, 1.05)
    ax.set_title(title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
