"""Where a remote worker finds the detector frames that a raw run references.

The bus carries documents, not frames: an HDF5-writing detector's events point into files
(StreamResource/StreamDatum, or legacy Resource/Datum). A worker on another host reads them

- through Tiled (:class:`TiledFrames`, the default): the beamline's TiledWriter registered the
  files with the Tiled server, which serves the frames over HTTP; the worker turns each event
  into one with the frame inline, so the live callback needs no file access at all;
- or from a shared filesystem mounted under another prefix (:class:`PathMap`, ``--path-map
  ACQ_PREFIX=LOCAL_PREFIX``): the file references are rewritten and the live callback reads the
  files itself, as it does on the acquisition host.
"""

from __future__ import annotations

import logging
import posixpath
import time
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from urllib.parse import quote, unquote, urlparse

import numpy as np
from event_model import unpack_event_page

__all__ = ["PathMap", "TiledFrames", "parse_path_map"]

logger = logging.getLogger(__name__)

Doc = tuple[str, dict]


def parse_path_map(items: Iterable[str]) -> list[tuple[str, str]]:
    """``["ACQ=LOCAL", ...]`` -> ``[(ACQ, LOCAL), ...]``, longest prefix first."""
    pairs = []
    for item in items:
        acq, sep, local = item.partition("=")
        if not sep or not acq or not local:
            raise ValueError(f"--path-map: ACQ_PREFIX=LOCAL_PREFIX expected, got {item!r}")
        pairs.append((acq.rstrip("/") or "/", local.rstrip("/") or "/"))
    return sorted(pairs, key=lambda p: -len(p[0]))


@dataclass
class PathMap:
    """Rewrites file references from the acquisition host's paths to this host's.

    Parameters
    ----------
    pairs : list of (str, str)
        ``(ACQ_PREFIX, LOCAL_PREFIX)``; the longest matching prefix wins. A path under no
        prefix is left alone. A legacy Resource is mapped on its whole path (``root`` joined
        with ``resource_path``: ophyd writes ``root="/"`` and the absolute path in
        ``resource_path``); a StreamResource's ``file:`` URI on its decoded path.
    """

    pairs: list[tuple[str, str]]

    def _match(self, path: str) -> tuple[str, str] | None:
        """``(local prefix, the rest of path)`` for the longest ACQ prefix of ``path``."""
        for acq, local in self.pairs:
            if acq == "/" and path.startswith("/"):
                return local, path[1:]
            if path == acq or path.startswith(acq + "/"):
                return local, path[len(acq):].lstrip("/")
        return None

    def path(self, path: str) -> str:
        """``path`` on this host (unchanged when under no ACQ prefix)."""
        hit = self._match(path)
        if hit is None:
            return path
        local, rest = hit
        return posixpath.join(local, rest) if rest else local

    def __call__(self, name: str, doc: dict) -> list[Doc]:
        if name == "stream_resource" and "uri" in doc:
            parsed = urlparse(doc["uri"])
            if parsed.scheme == "file":
                # The reader unquotes the URI's path: match (and rebuild) it decoded.
                old = unquote(parsed.path)
                new = self.path(old)
                if new != old:
                    doc = {**doc, "uri": f"file://localhost{quote(new)}"}
            elif not parsed.scheme:
                doc = {**doc, "uri": self.path(doc["uri"])}
        elif name == "resource":
            root = doc.get("root") or ""
            whole = posixpath.join(root, doc.get("resource_path", "")) if root else \
                doc.get("resource_path", "")
            hit = self._match(whole)
            if hit is not None:
                # Split at the mapped prefix: handlers join root and resource_path again.
                local, rest = hit
                doc = {**doc, "root": local, "resource_path": rest}
        return [(name, doc)]

    def pending(self) -> bool:
        return False

    def pump(self, force: bool = False, limit: int | None = None) -> list[Doc]:
        return []

    def finish(self) -> list[Doc]:
        return []

    def finish_blocks(self, limit: int | None = None) -> Iterator[list[Doc]]:
        return iter(())


@dataclass
class TiledFrames:
    """Fills a raw run's external detector frames into its events, reading them through Tiled.

    Feed it the run's documents in order (``__call__``); forward what it returns to the live
    callback. Events whose frame Tiled does not serve yet are held back (in order) and released
    by :meth:`pump` once the beamline's TiledWriter has registered them; :meth:`finish` (at
    the stop document) waits up to ``timeout_s`` for the last ones.

    Parameters
    ----------
    client : tiled.client container
        The catalog the beamline writes raw runs to.
    timeout_s : float
        After the stop document, how long to wait for frames to appear in Tiled; events still
        without a frame then go on without one (their points are not reconstructed; logged,
        counted in :attr:`frames_missing`, and the reconstruction reports them in the derived
        run's stop as ``frames_missing``, cause ``no_frame``).
    poll_s : float
        Tiled is asked how many frames it serves at most this often (a look costs one HTTP
        request; the beamline's writer adds frames in batches).
    max_read : int
        Frames per HTTP read, at most.
    """

    client: object
    timeout_s: float = 120.0
    poll_s: float = 0.25
    max_read: int = 64
    image_key: str | None = None
    raw_uid: str | None = None
    #: descriptor uid -> stream name, for descriptors whose image is external
    streams: dict[str, str] = field(default_factory=dict)
    held_resources: set[str] = field(default_factory=set)
    #: descriptor uid -> frames referenced so far (the index of the next one in Tiled's array)
    counts: dict[str, int] = field(default_factory=dict)
    #: (descriptor uid, seq_num) -> index in Tiled's array of that stream's image
    index: dict[tuple[str, int], int] = field(default_factory=dict)
    # a deque: events leave from the front, one by one (a list's pop(0) made a backlog of n
    # events cost O(n^2))
    waiting: deque[dict] = field(default_factory=deque)
    frames_missing: int = 0
    _nodes: dict = field(default_factory=dict)  # stream -> Tiled array client of the image
    _shape: dict = field(default_factory=dict)  # stream -> frames it served at the last look
    _asked: dict = field(default_factory=dict)  # stream -> monotonic time of the last look
    _pumped: float = -1e9  # monotonic time of the last read attempt

    # -- documents in ------------------------------------------------------------------------
    def __call__(self, name: str, doc: dict) -> list[Doc]:
        if name == "start":
            self.raw_uid = doc["uid"]
            self.image_key = (doc.get("ptycho") or {}).get("detector_key")
            return [(name, doc)]
        if self.image_key is None:
            return [(name, doc)]
        if name == "descriptor":
            key = doc["data_keys"].get(self.image_key)
            if key is not None and key.get("external"):
                self.streams[doc["uid"]] = doc.get("name", "primary")
                self.counts[doc["uid"]] = 0
            return [(name, doc)]
        if name == "stream_resource":
            if doc.get("data_key") == self.image_key:
                self.held_resources.add(doc["uid"])
                return []
            return [(name, doc)]
        if name == "stream_datum":
            if doc["stream_resource"] not in self.held_resources:
                return [(name, doc)]
            seq, desc = doc["seq_nums"], doc["descriptor"]
            n = seq["stop"] - seq["start"]
            base = self.counts.get(desc, 0)
            for k in range(n):
                self.index[(desc, seq["start"] + k)] = base + k
            self.counts[desc] = base + n
            return []
        if name in ("resource", "datum", "datum_page"):
            # Legacy references: Tiled (TiledWriter's normaliser) serves these frames too, in
            # the order of the events that point to them.
            return []
        if name == "event_page":
            out: list[Doc] = []
            for event in unpack_event_page(doc):
                out.extend(self("event", event))
            return out
        if name == "event":
            desc = doc["descriptor"]
            if desc not in self.streams:
                return [(name, doc)]
            if isinstance(doc["data"].get(self.image_key), str):  # a legacy datum id
                self.index[(desc, int(doc["seq_num"]))] = self.counts[desc]
                self.counts[desc] += 1
            self.waiting.append(doc)
            return []
        return [(name, doc)]

    # -- frames from Tiled -------------------------------------------------------------------
    def pending(self) -> bool:
        return bool(self.waiting)

    def _available(self, stream: str, needed: int) -> int:
        """Frames Tiled serves for ``stream`` (asks again at most every ``poll_s``)."""
        node = self._nodes.get(stream)
        known = self._shape.get(stream, 0)
        if known >= needed:
            return known
        now = time.monotonic()
        if now - self._asked.get(stream, -1e9) < self.poll_s:
            return known
        self._asked[stream] = now
        try:
            if node is None:  # three requests the first time, one (refresh) afterwards
                node = self._nodes[stream] = self.client[self.raw_uid][stream][self.image_key]
            else:
                node.refresh()
        except KeyError:  # the beamline's TiledWriter has not registered it yet
            return 0
        self._shape[stream] = int(node.shape[0])
        return self._shape[stream]

    def pump(self, force: bool = False, limit: int | None = None) -> list[Doc]:
        """Release the held events (in order) whose frames Tiled serves now.

        Reads go in blocks: unless ``force``, nothing is read while fewer than ``max_read``
        events wait and the last read is less than ``poll_s`` old (one HTTP request per
        frame would make a backlog crawl). At most ``limit`` events are released per call
        (about ``limit`` frames in memory; call again for the rest).
        """
        now = time.monotonic()
        if not force and len(self.waiting) < self.max_read and now - self._pumped < self.poll_s:
            return []
        self._pumped = now
        out: list[Doc] = []
        while self.waiting and (limit is None or len(out) < limit):
            first = self.waiting[0]
            desc = first["descriptor"]
            start = self.index.get((desc, int(first["seq_num"])))
            if start is None:  # its StreamDatum has not come yet
                break
            # The run of consecutive waiting events of this stream with consecutive indices.
            cap = self.max_read if limit is None else max(1, min(self.max_read,
                                                                 limit - len(out)))
            run = 1
            while (run < len(self.waiting) and run < cap
                   and self.waiting[run]["descriptor"] == desc
                   and self.index.get((desc, int(self.waiting[run]["seq_num"]))) == start + run):
                run += 1
            stream = self.streams[desc]
            stop = min(start + run, self._available(stream, start + run))
            if stop <= start:
                break
            block = np.asarray(self._nodes[stream][start:stop])
            if block.ndim == 4:  # several exposures per point: photon counts add up
                block = block.sum(axis=1)
            for k in range(stop - start):
                event = self.waiting.popleft()
                out.append(("event", {
                    **event, "data": {**event["data"], self.image_key: block[k]},
                    "filled": {**event.get("filled", {}), self.image_key: True}}))
        return out

    def finish(self) -> list[Doc]:
        """At the stop document: wait (up to ``timeout_s``) for the frames still missing."""
        return [doc for block in self.finish_blocks() for doc in block]

    def finish_blocks(self, limit: int | None = None) -> Iterator[list[Doc]]:
        """:meth:`finish` in blocks of at most ``limit`` events: a consumer that takes each
        block before the next is read holds one block of frames, not the whole backlog."""
        deadline = time.monotonic() + self.timeout_s
        while self.waiting:
            block = self.pump(force=True, limit=limit)
            if block:
                yield block
                continue
            if time.monotonic() >= deadline:
                break
            time.sleep(self.poll_s)
        if self.waiting:
            self.frames_missing = len(self.waiting)
            logger.warning("run %s: %d frames never appeared in Tiled within %.0f s; their "
                           "points are not reconstructed", self.raw_uid, self.frames_missing,
                           self.timeout_s)
            waiting, self.waiting = self.waiting, deque()
            yield [("event", event) for event in waiting]
