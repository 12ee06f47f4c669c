"""Figures people look at instead of reading numbers (matplotlib, Agg backend, PNG files)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

__all__ = ["reconstruction_figure", "probe_figure"]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _robust_limits(image: np.ndarray, mask: np.ndarray,
                   percent: float = 1.0) -> tuple[float | None, float | None]:
    """Colour limits from the 1st-99th percentiles inside ``mask``, so that a few edge pixels
    of a stitched object do not wash out its interior; ``(None, None)`` (autoscale) when the
    mask holds too little."""
    values = image[mask]
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
) -> Path:
    """One PNG: object amplitude and phase, the probe, optional truth, extra maps and FRC curves.

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
        More maps (e.g. an uncertainty map).
    """
    plt = _pyplot()
    panels: list[tuple[np.ndarray, str, str]] = [
        (np.abs(obj), "object amplitude", "gray"),
        (np.angle(obj), "object phase (rad)", "cividis"),
    ]
    if truth is not None:
        panels += [
            (np.abs(truth), "true amplitude", "gray"),
            (np.angle(truth), "true phase", "cividis"),
        ]
    if probe is not None:
        p = np.asarray(probe)
        p = p[0] if p.ndim == 3 else p
        panels.append((np.abs(p), "probe |P| (mode 0)", "magma"))
    for name, image in (extra or {}).items():
        panels.append((np.asarray(image), name, "viridis"))
    n_axes = len(panels) + (1 if frc else 0)
    cols = min(n_axes, 4)
    rows = int(np.ceil(n_axes / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3.4 * cols, 3.1 * rows), squeeze=False)
    flat = axes.ravel()
    for ax, (image, name, cmap) in zip(flat, panels, strict=False):
        _show(ax, image, name, cmap)
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
