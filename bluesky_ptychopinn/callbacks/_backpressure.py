"""How the RunEngine's thread hands one run's documents to the reconstruction: the
back-pressure policy of :class:`~bluesky_ptychopinn.callbacks.LiveReconstruction`.

Under ``"block"`` every document waits for room in the queue. Under ``"skip"`` the RunEngine
never waits for the reconstruction of a frame: an event, or the Datum / StreamDatum that
references a frame in a file, is dropped (for the reconstruction only) when the queue is full.
A frame is counted once, in ``RunState.frames_skipped``, when its event is dropped; an event
whose Datum or StreamDatum was dropped is dropped with it (its frame could never be read), so
nothing is counted twice nor left waiting for a reference that will not come. The documents a
run cannot do without (start, descriptors, resources, stop) always wait.
"""

from __future__ import annotations

import queue
from collections.abc import Callable
from dataclasses import dataclass, field

from event_model import unpack_datum_page, unpack_event_page

from ._derived import RunState

__all__ = ["RunFeed"]

_EVENT_DOCS = ("event", "event_page")
_FRAME_REFERENCES = ("datum", "datum_page", "stream_datum")


@dataclass
class RunFeed:
    """One run's documents into the transport, per ``backpressure`` ("block" or "skip").

    Parameters
    ----------
    put, put_nowait : callable
        The transport's waiting and non-waiting enqueue (``put_nowait`` raises
        :class:`queue.Full`).
    state : RunState
        The run's state; ``frames_skipped`` counts the frames dropped here.
    backpressure : str
        ``"block"`` or ``"skip"``.
    image_key : str, optional
        The detector's data key: only a dropped event of a stream that carries it is a
        skipped frame (a baseline or monitor reading is not).
    """

    put: Callable
    put_nowait: Callable
    state: RunState
    backpressure: str
    image_key: str | None = None
    #: descriptors whose events carry no frame (baseline, monitors)
    other_descriptors: set[str] = field(default_factory=set)
    #: legacy datum ids dropped under "skip": their events are dropped too
    dropped_datums: set[str] = field(default_factory=set)
    #: StreamDatum (start, stop) sequence ranges dropped under "skip"
    dropped_ranges: list[tuple[int, int]] = field(default_factory=list)

    def __call__(self, item, name: str, doc: dict) -> None:
        if name == "descriptor" and self.image_key is not None and (
                self.image_key not in (doc.get("data_keys") or {})):
            self.other_descriptors.add(doc.get("uid"))
        if self.backpressure == "block" or name not in (*_EVENT_DOCS, *_FRAME_REFERENCES):
            self.put(item)
            return
        if name in _FRAME_REFERENCES:
            self._offer_reference(item, name, doc)
            return
        if self.dropped_datums or self.dropped_ranges:
            events = [doc] if name == "event" else list(unpack_event_page(doc))
            if any(self._dropped(e) for e in events):
                self._offer_events(item[1], events)
                return
        try:
            self.put_nowait(item)
        except queue.Full:
            if doc.get("descriptor") not in self.other_descriptors:
                self._count(1 if name == "event" else len(doc["seq_num"]))

    def _offer_reference(self, item, name: str, doc: dict) -> None:
        try:
            self.put_nowait(item)
        except queue.Full:
            if name == "stream_datum":
                seq = doc.get("seq_nums") or {}
                self.dropped_ranges.append((int(seq.get("start", 0)), int(seq.get("stop", 0))))
            else:
                datums = [doc] if name == "datum" else list(unpack_datum_page(doc))
                self.dropped_datums.update(d["datum_id"] for d in datums)

    def _dropped(self, event: dict) -> bool:
        """Does this event's frame come through a reference dropped here?"""
        if self.dropped_datums and any(
                isinstance(v, str) and v in self.dropped_datums
                for v in (event.get("data") or {}).values()):
            return True
        seq = event.get("seq_num")
        return isinstance(seq, int) and any(lo <= seq < hi for lo, hi in self.dropped_ranges)

    def _offer_events(self, raw_uid: str, events: list[dict]) -> None:
        """Drop (and count) the events whose reference was dropped; offer the others."""
        for event in events:
            if self._dropped(event):
                self._count(1)
                continue
            try:
                self.put_nowait(("doc", raw_uid, "event", event))
            except queue.Full:
                self._count(1)

    def _count(self, frames: int) -> None:
        with self.state.lock:
            self.state.frames_skipped += frames
