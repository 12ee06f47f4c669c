"""Training progress: a live bar per batch in a terminal, plain lines in batch-job logs, and an
ETA from the recent batch rate.

The ETA is the remaining batch count times the *median* duration of the last ``window``
batches: a first epoch slowed by warm-up or by another job on the machine (seen on 2 shared
cores) does not set the estimate for the whole run, and one stalled batch does not either.
"""

from __future__ import annotations

import statistics
import time
from collections import deque

__all__ = ["TrainingProgress"]


class TrainingProgress:
    """Report training progress batch by batch.

    Parameters
    ----------
    enabled : bool
        Show anything at all (False on ranks other than 0 and with ``progress=False``).
    total_batches : int
        Batches of the whole run (epochs x batches per epoch).
    completed : int
        Batches already done (a resumed run).
    log_every_s : float
        Least time between two plain lines when the output is not a terminal.
    window : int
        Recent batches the ETA's median rate is taken over.

    Examples
    --------
    >>> progress = TrainingProgress(False, total_batches=100, completed=0)
    >>> for seconds in [5.0] * 10 + [1.0] * 40:   # a contended start, then the real rate
    ...     progress.batch(1, 1, 50, loss=0.1, seconds=seconds, patterns=16)
    >>> round(progress.eta_s())                   # 50 batches left at the recent 1 s each
    50
    """

    def __init__(self, enabled: bool, total_batches: int, completed: int = 0, *,
                 log_every_s: float = 10.0, window: int = 50) -> None:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
        )

        self.total, self.done = int(total_batches), int(completed)
        self.log_every_s = float(log_every_s)
        self._recent: deque[float] = deque(maxlen=int(window))
        self._last_line = -float("inf")
        self._patterns, self._busy = 0, 0.0
        self.bar = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TimeElapsedColumn(), TextColumn("ETA {task.fields[eta]}"),
            TextColumn("{task.fields[status]}"), disable=not enabled,
        )
        self._task = self.bar.add_task("training", total=self.total, completed=self.done,
                                       status="", eta="-")

    def __enter__(self) -> TrainingProgress:
        self.bar.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.bar.__exit__(*exc)

    @property
    def _plain(self) -> bool:
        """Plain lines instead of a live bar: enabled, but not drawing to a terminal."""
        return not self.bar.disable and not self.bar.console.is_terminal

    def eta_s(self) -> float:
        """Seconds left: remaining batches x the median of the recent batch durations."""
        if not self._recent:
            return float("nan")
        return (self.total - self.done) * statistics.median(self._recent)

    def _eta_text(self) -> str:
        eta = self.eta_s()
        return "-" if eta != eta else time.strftime("%H:%M:%S", time.gmtime(eta))

    def batch(self, epoch: int, index: int, per_epoch: int, *, loss: float, seconds: float,
              patterns: int) -> None:
        """One batch done: ``index`` (1-based) of ``per_epoch`` in ``epoch`` (1-based)."""
        self.done += 1
        self._recent.append(float(seconds))
        self._patterns += int(patterns)
        self._busy += float(seconds)
        rate = self._patterns / self._busy if self._busy else 0.0
        status = f"epoch {epoch} batch {index}/{per_epoch} loss {loss:.4f} {rate:.0f} patt/s"
        self.bar.update(self._task, completed=self.done, status=status, eta=self._eta_text())
        now = time.monotonic()
        if self._plain and now - self._last_line >= self.log_every_s:
            self._last_line = now
            self.bar.console.print(f"{status}, ETA {self._eta_text()}", highlight=False,
                                   soft_wrap=True)

    def epoch(self, epoch: int, total: int, status: str) -> None:
        """An epoch done (with its validation): always one line in a log."""
        self.bar.update(self._task, status=f"epoch {epoch}/{total}: {status}",
                        eta=self._eta_text())
        if self._plain:
            self.bar.console.print(f"epoch {epoch}/{total}: {status}, ETA {self._eta_text()}",
                                   highlight=False, soft_wrap=True)
