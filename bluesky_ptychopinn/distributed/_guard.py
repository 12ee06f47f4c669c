"""One derived run per raw run in Tiled, however often the raw run is reconstructed.

A worker's derived run has a deterministic uid (raw uid + model sha256 + settings), so a run
redone after a worker died gets the uid of the partial one that worker left. Before writing a
derived run, :class:`DerivedRunGuard` looks it up in Tiled:

- absent: written as usual;
- present and complete (a stop document with ``exit_status == "success"``; its announcement was
  redelivered although it had been finished, e.g. the acknowledgement was lost): left as it
  is, the new documents of that run are dropped;
- present and partial or failed (its worker died or lost Tiled): deleted, then written anew.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

__all__ = ["DerivedRunGuard", "DerivedOutcome"]

logger = logging.getLogger(__name__)


@dataclass
class DerivedOutcome:
    """What became of one derived run: ``"written"``, ``"kept"`` (a complete one was there),
    ``"error"`` (Tiled failed; ``error`` says how) or ``"abandoned"`` (the run went to another
    worker: nothing more is written). ``replaced``: a partial one was deleted first."""

    uid: str
    status: str = "open"
    replaced: bool = False
    error: str | None = None
    done: threading.Event = field(default_factory=threading.Event)


class DerivedRunGuard:
    """A derived-run subscriber in front of a Tiled writer (see the module docstring).

    Parameters
    ----------
    client : tiled.client container
        Where derived runs are written.
    writer : callable
        ``(name, doc)`` writer, usually ``TiledWriter(client)``.
    """

    def __init__(self, client, writer: Callable[[str, dict], None]) -> None:
        self.client = client
        self.writer = writer
        self.outcomes: dict[str, DerivedOutcome] = {}
        self._run_of: dict[str, str] = {}  # descriptor uid -> derived run uid

    def _existing(self, uid: str):
        try:
            return self.client[uid]
        except KeyError:
            return None

    def _start(self, doc: dict) -> DerivedOutcome:
        outcome = DerivedOutcome(doc["uid"])
        existing = self._existing(doc["uid"])
        if existing is not None:
            stop = existing.metadata.get("stop") or {}
            if stop.get("exit_status") == "success":
                outcome.status = "kept"
                logger.info("derived run %s is already complete in Tiled; kept",
                            doc["uid"])
            else:
                # A dead worker's partial run: its snapshots stop somewhere mid-scan. Replace
                # it whole rather than append to it (the event counters would collide).
                existing.delete(recursive=True, external_only=False)
                outcome.replaced = True
                logger.info("derived run %s: replaced a partial run a previous worker left",
                            doc["uid"])
        return outcome

    def abandon(self, uid: str) -> None:
        """Write nothing more of derived run ``uid`` (another worker has its raw run now and
        may be writing the same uid); its documents still pass through, unwritten."""
        outcome = self.outcomes.get(uid)
        if outcome is not None and outcome.status in ("open", "written"):
            outcome.status = "abandoned"
            logger.info("derived run %s: abandoned on this worker; nothing more written", uid)

    def __call__(self, name: str, doc: dict) -> None:
        if name == "start":
            try:
                outcome = self._start(doc)
            except Exception as exc:
                outcome = DerivedOutcome(doc["uid"], status="error", error=repr(exc))
            self.outcomes[doc["uid"]] = outcome
            uid = doc["uid"]
        elif name == "descriptor":
            uid = doc["run_start"]
            self._run_of[doc["uid"]] = uid
        elif name in ("event", "event_page"):
            uid = self._run_of.get(doc["descriptor"], "")
        else:
            uid = doc.get("run_start", "")
        outcome = self.outcomes.get(uid)
        if outcome is None:
            return
        if outcome.status in ("open",) or (outcome.status == "written"):
            try:
                self.writer(name, doc)
                outcome.status = "written"
            except Exception as exc:
                # TiledWriter cannot continue a run after a failed write: the worker retries
                # the whole run later, and this guard then replaces what was written.
                outcome.status, outcome.error = "error", repr(exc)
                logger.warning("derived run %s: writing to Tiled failed: %s", uid, exc)
        if name == "stop":
            outcome.done.set()
            for key in [k for k, v in self._run_of.items() if v == uid]:
                del self._run_of[key]
