"""``bluesky-ptychopinn watch``: each live reconstruction, shown as Tiled receives it.

Registered on the ``bluesky-ptychopinn`` app by :mod:`bluesky_ptychopinn.cli`; the logic is
:func:`bluesky_ptychopinn.catalog.watch_derived_runs` and the drawing
:class:`~bluesky_ptychopinn.callbacks.LiveReconstructionPlot`.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import typer

__all__ = ["PngFrames", "RunViewer", "watch"]

logger = logging.getLogger(__name__)


class PngFrames:
    """Headless output: ``DIR/<derived uid>/latest.png`` (replaced at each update) and
    ``frame-0001.png`` ... up to ``max_frames`` numbered frames per run.

    Parameters
    ----------
    directory : path
        Created if missing.
    max_frames : int
        Numbered frames kept per run (0: only ``latest.png``).
    min_interval_s : float
        At most one PNG per run per interval (a run's last state is always written).
    """

    def __init__(self, directory: str | Path, max_frames: int = 200,
                 min_interval_s: float = 0.5) -> None:
        self.directory = Path(directory)
        self.max_frames = int(max_frames)
        self.min_interval_s = float(min_interval_s)
        self.counts: dict[str, int] = {}
        self.saved_at: dict[str, float] = {}

    def due(self, run_uid: str) -> bool:
        """Whether ``min_interval_s`` has passed since the run's last PNG."""
        return time.monotonic() - self.saved_at.get(run_uid, -1e9) >= self.min_interval_s

    def save(self, fig, run_uid: str) -> Path:
        """Write the figure of run ``run_uid``; returns the path of ``latest.png``."""
        folder = self.directory / run_uid
        folder.mkdir(parents=True, exist_ok=True)
        latest = folder / "latest.png"
        partial = folder / ".latest.png.partial"
        self.saved_at[run_uid] = time.monotonic()
        fig.savefig(partial, format="png", dpi=80)
        os.replace(partial, latest)  # a viewer never reads half a file
        n = self.counts.get(run_uid, 0)
        if n < self.max_frames:
            n += 1
            fig.savefig(folder / f"frame-{n:04d}.png", format="png", dpi=80)
            self.counts[run_uid] = n
        return latest


class RunViewer:
    """One :class:`~bluesky_ptychopinn.callbacks.LiveReconstructionPlot` per derived run,
    fed the watcher's documents; after each batch, redraws (window) or writes PNGs.

    Parameters
    ----------
    png : PngFrames, optional
        Headless output; ``None``: matplotlib windows.
    """

    def __init__(self, png: PngFrames | None = None) -> None:
        self.png = png
        self.plots: dict = {}  # derived uid -> LiveReconstructionPlot
        self._run_of: dict[str, str] = {}  # descriptor uid -> derived uid
        self._dirty: set[str] = set()
        self._finished: set[str] = set()

    def __call__(self, name: str, doc: dict) -> None:
        import matplotlib.pyplot as plt

        from .callbacks import LiveReconstructionPlot

        if name == "start":
            for uid in list(self._finished):  # one figure per run under way, and the last
                if self.png is not None and uid in self._dirty:
                    self.png.save(self.plots[uid]._fig, uid)
                self._dirty.discard(uid)
                plt.close(self.plots.pop(uid)._fig)
                self._finished.discard(uid)
            plot = LiveReconstructionPlot(plt.figure(figsize=(12, 4)), use_teleporter=False)
            self.plots[doc["uid"]] = plot
            uid = doc["uid"]
        elif name == "descriptor":
            uid = self._run_of[doc["uid"]] = doc["run_start"]
        elif name == "event":
            uid = self._run_of.get(doc["descriptor"], "")
        else:  # scan_path, stop
            uid = doc.get("run_start", "")
        plot = self.plots.get(uid)
        if plot is None:
            return
        plot(name, doc)
        self._dirty.add(uid)
        if name == "stop":
            self._finished.add(uid)
            logger.info("derived run %s: %s", uid, doc.get("exit_status"))

    def idle(self, changed: bool) -> None:
        """Write the PNGs of the runs that changed, or let the GUI draw."""
        import matplotlib.pyplot as plt

        if self.png is not None:
            for uid in sorted(self._dirty):
                if uid not in self.plots:
                    self._dirty.discard(uid)
                elif uid in self._finished or self.png.due(uid):  # else: at the next idle
                    self.png.save(self.plots[uid]._fig, uid)
                    self._dirty.discard(uid)
            return
        if self.plots:
            plt.pause(0.05)
        self._dirty.clear()


def _embedded_key(data_dir: Path | None) -> str | None:
    from .catalog import default_data_dir, load_api_key

    folder = Path(data_dir) if data_dir is not None else default_data_dir()
    return load_api_key(folder) if (folder / "api_key").is_file() else None


def _check_reachable(uri: str, timeout: float = 5.0) -> None:
    """Fail at once, in one line, when nothing answers at ``uri`` (tiled's client would
    retry for up to a minute, printing "Retrying..." on the way)."""
    import httpx

    try:
        httpx.get(uri, timeout=timeout)  # any answer (even 401) means someone is there
    except httpx.HTTPError as exc:
        from .catalog import TiledUnavailableError

        raise TiledUnavailableError(f"cannot reach Tiled at {uri}: {exc}") from None


def _error(message: str, code: int = 2) -> None:
    typer.echo(f"error: {' '.join(str(message).split())}", err=True)  # one line
    raise typer.Exit(code=code)


def watch(
    tiled: str = typer.Option(None, "--tiled", envvar="TILED_URI",
                              help="Tiled URI (default: $TILED_URI, else the embedded server "
                              "`bluesky-ptychopinn serve` runs on 127.0.0.1:--port)."),
    api_key: str = typer.Option(None, "--api-key", envvar="TILED_API_KEY",
                                help="API key (default: $TILED_API_KEY, else the embedded "
                                "server's key file in --data-dir)."),
    data_dir: Path = typer.Option(None, help="Embedded catalog directory, for its API key "
                                  "(default $PTYCHOPINN_DATA or "
                                  "~/.local/share/bluesky-ptychopinn/tiled)."),
    port: int = typer.Option(8000, help="Port of the embedded server (without --tiled)."),
    png: Path = typer.Option(None, "--png", help="Headless: write DIR/<derived uid>/latest.png "
                             "and numbered frame-NNNN.png instead of opening a window."),
    max_frames: int = typer.Option(200, help="Numbered PNGs per run (latest.png always)."),
    once: bool = typer.Option(False, "--once", help="Exit when the first derived run ends."),
    timeout: float = typer.Option(None, "--timeout", help="Exit after S seconds (exit code 1 "
                                  "with --once when no run ended by then)."),
    poll: bool = typer.Option(False, "--poll", help="Poll over HTTP instead of the websocket "
                              "(the default falls back to it when the server cannot stream)."),
    running: bool = typer.Option(True, "--running/--new-only",
                                 help="Also show derived runs already under way."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Debug log."),
) -> None:
    """Show each live reconstruction as it arrives in Tiled (websocket streaming): network
    phase, refined phase, uncertainty, scan path, frames/s."""
    import matplotlib

    logging.basicConfig(level=logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("bluesky_ptychopinn").setLevel(logging.DEBUG if verbose else logging.INFO)
    if png is not None:
        matplotlib.use("Agg")
    elif matplotlib.get_backend().lower() == "agg":
        _error("no display for a window (matplotlib backend Agg): pass --png DIR")

    from .catalog import TiledUnavailableError, connect, watch_derived_runs
    from .errors import PtychoError

    uri = tiled or f"http://127.0.0.1:{port}/api/v1"
    try:
        key = api_key or (None if tiled else _embedded_key(data_dir))
        _check_reachable(uri)
        client = connect(uri, api_key=key)
    except TiledUnavailableError as exc:
        hint = "" if tiled else " (start it with `bluesky-ptychopinn serve`, or pass --tiled)"
        _error(f"{exc}{hint}")
    except PtychoError as exc:
        _error(str(exc))
    viewer = RunViewer(PngFrames(png, max_frames) if png is not None else None)
    try:
        result = watch_derived_runs(client, viewer, once=once, timeout=timeout,
                                    on_idle=viewer.idle, include_running=running,
                                    mode="polling" if poll else "auto")
    except KeyboardInterrupt:
        return
    except PtychoError as exc:
        _error(str(exc))
    if png is None and once and result.finished:
        import matplotlib.pyplot as plt

        plt.show()  # keep the finished run on screen until its window is closed
    if once and not result.finished:
        _error(f"no derived run ended within {timeout} s", code=1)
