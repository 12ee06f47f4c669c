"""A live matplotlib view of a reconstruction, for the IPython session.

:class:`LiveReconstructionPlot` consumes the *derived* run's documents (subscribe it to a
:class:`~bluesky_ptychopinn.callbacks.LiveReconstruction`) and shows, as they arrive, the
network's phase, the refined phase (when the refinement runs) on the same colour range, the
network's uncertainty, and frames per second, with a scale bar in micrometres (and the scan
path, when ``bluesky-ptychopinn watch`` feeds it from Tiled). Like bluesky's ``LiveImage`` it
is a :class:`~bluesky.callbacks.mpl_plotting.QtAwareCallback`: with a Qt backend the drawing
happens on the GUI thread, so it never blocks the RunEngine or the reconstruction; with Agg
(headless) it draws in the caller's thread.

Examples
--------
>>> live = LiveReconstruction()                                   # doctest: +SKIP
>>> live.subscribe(LiveReconstructionPlot())                      # doctest: +SKIP
>>> RE(ptycho_scan(...))                                          # doctest: +SKIP
"""

from __future__ import annotations

import math

import numpy as np
from bluesky.callbacks.mpl_plotting import QtAwareCallback

from ..figures import draw_scale_bar, scale_bar_length_um
from ._settings import RECONSTRUCTION_PLAN_NAME

__all__ = ["LiveReconstructionPlot", "scale_bar_length_um"]


def _phase_range(*images: np.ndarray) -> tuple[float, float]:
    """One colour range for every phase image shown (robust: 1st-99th percentile)."""
    values = np.concatenate([im[np.isfinite(im)].ravel() for im in images if im is not None])
    if not values.size:
        return -math.pi, math.pi
    low, high = np.percentile(values, [1, 99])
    return float(low), float(max(high, low + 1e-6))


class LiveReconstructionPlot(QtAwareCallback):
    """Show a derived reconstruction run as it arrives (see the module docstring).

    Parameters
    ----------
    fig : matplotlib.figure.Figure, optional
        Where to draw (default: a new figure, 12 x 4 inches).
    cmap : str
        Colour map of the phase images.

    Attributes
    ----------
    images : dict
        ``"network"``, ``"refined"``, ``"uncertainty"``: the matplotlib ``AxesImage`` objects.
    frames_per_s : float
        The latest throughput reported by the derived run's metrics.
    scan_path_px : numpy.ndarray
        (n, 2) scan positions drawn over the network image (see :meth:`scan_path`), and
        ``path_line`` the matplotlib line showing them (``None`` until then).
    """

    def __init__(self, fig=None, *, cmap: str = "twilight_shifted", **kwargs) -> None:
        super().__init__(**kwargs)
        self._fig, self.cmap = fig, cmap
        self.images: dict = {}
        self._streams: dict[str, str] = {}
        self._pixel_size_m = 0.0
        self._phases: dict[str, np.ndarray] = {}
        self.frames_per_s = math.nan
        self._active = False
        self._scale = None
        self._title = ""
        self.path_line = None
        self.scan_path_px = np.zeros((0, 2))
        self._final_shown = False

    # -- documents ------------------------------------------------------------------------
    def start(self, doc: dict) -> None:
        self._active = doc.get("plan_name") == RECONSTRUCTION_PLAN_NAME
        if not self._active:
            return
        import matplotlib.pyplot as plt

        if self._fig is None:
            self._fig = plt.figure(figsize=(12, 4))
        self._fig.clf()
        axes = self._fig.subplots(1, 3)
        titles = ("network phase (rad)", "refined phase (rad)", "network uncertainty")
        for ax, title in zip(axes, titles, strict=True):
            ax.set_title(title)
            ax.set_xticks([])
            ax.set_yticks([])
        self._axes = dict(zip(("network", "refined", "uncertainty"), axes, strict=True))
        self.images, self._phases, self._streams, self._scale = {}, {}, {}, None
        self.path_line, self.scan_path_px = None, np.zeros((0, 2))
        self._final_shown = False
        self.frames_per_s = math.nan
        raw = doc.get("original_run_uid", "")[:8]
        self._title = f"reconstruction of run {raw} (model {doc['model'].get('name')})"
        self._fig.suptitle(self._title)

    def descriptor(self, doc: dict) -> None:
        if not self._active:
            return
        self._streams[doc["uid"]] = doc["name"]
        canvas = (doc.get("configuration") or {}).get("canvas", {}).get("data", {})
        self._pixel_size_m = float(canvas.get("pixel_size_m", self._pixel_size_m) or 0.0)

    def event(self, doc: dict) -> None:
        if not self._active:
            return
        # An event may carry only some of its stream's keys (a Tiled watcher receives each
        # array on its own): draw what is there.
        stream, data = self._streams.get(doc["descriptor"]), doc["data"]
        if stream == "snapshots":
            if "object_phase" in data:
                self._show("network", np.asarray(data["object_phase"]))
            if "uncertainty" in data:
                self._show("uncertainty", np.asarray(data["uncertainty"]), phase=False)
        elif stream in ("refined", "final") and "object_phase" in data:
            # Streams watched through Tiled arrive on separate sockets: a late "refined" row
            # never replaces the final image.
            if stream == "final" or not self._final_shown:
                self._show("refined", np.asarray(data["object_phase"]))
            self._final_shown |= stream == "final"
        elif stream == "metrics" and "frames_per_s" in data:
            self.frames_per_s = float(data["frames_per_s"])
        self._redraw()

    def event_page(self, doc: dict) -> None:
        if not self._active:
            return
        if self._streams.get(doc["descriptor"]) == "metrics":
            self.frames_per_s = float(doc["data"]["frames_per_s"][-1])
            self._redraw()
            return
        for k in range(len(doc["seq_num"])):
            self.event({"descriptor": doc["descriptor"],
                        "data": {key: v[k] for key, v in doc["data"].items()}})

    def scan_path(self, doc: dict) -> None:
        """Overlay the scan path on the network image (not an event-model document).

        ``doc["positions_px"]``: (n, 2) probe centres (y, x) in pixels of the image streams'
        canvas, in acquisition order (the raw run's positions, converted by
        :mod:`bluesky_ptychopinn.catalog` ``watch``).
        """
        if not self._active:
            return
        path = np.asarray(doc["positions_px"], dtype=float).reshape(-1, 2)
        self.scan_path_px = path
        ax = self._axes["network"]
        if self.path_line is None:
            (self.path_line,) = ax.plot(path[:, 1], path[:, 0], color="white", linewidth=0.6,
                                        marker=".", markersize=2, alpha=0.6,
                                        scalex=False, scaley=False)
        else:
            self.path_line.set_data(path[:, 1], path[:, 0])
        self._redraw()

    def stop(self, doc: dict) -> None:
        if not self._active:
            return
        self._fig.suptitle(f"{self._title}: {doc['exit_status']}")
        self._redraw()

    # -- drawing ---------------------------------------------------------------------------
    def _show(self, which: str, image: np.ndarray, phase: bool = True) -> None:
        if which in self.images:
            self.images[which].set_data(image)
        else:
            self.images[which] = self._axes[which].imshow(
                image, cmap=self.cmap if phase else "magma", interpolation="nearest")
            if self._scale is None and self._pixel_size_m > 0:
                self._draw_scale_bar(self._axes[which], image.shape)
        if phase:
            self._phases[which] = image
            low, high = _phase_range(*self._phases.values())  # network and refined alike
            for name in self._phases:
                self.images[name].set_clim(low, high)
        else:
            finite = image[np.isfinite(image)]
            if finite.size:
                self.images[which].set_clim(float(finite.min()),
                                            float(max(finite.max(), finite.min() + 1e-9)))

    def _draw_scale_bar(self, ax, shape) -> None:
        self._scale = draw_scale_bar(ax, shape, self._pixel_size_m)

    def _redraw(self) -> None:
        if math.isfinite(self.frames_per_s):
            self._axes["network"].set_xlabel(f"{self.frames_per_s:.0f} frames/s")
        self._fig.canvas.draw_idle()
