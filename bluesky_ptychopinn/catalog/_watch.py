"""Watch a Tiled server for derived (reconstruction) runs and deliver them as they arrive.

:func:`watch_derived_runs` subscribes through Tiled's websocket streaming (``subscribe`` of the
tiled 0.2 client: ``/api/v1/stream/single/...``) to the root container; each new run whose
start document says ``plan_name == "ptychopinn_reconstruction"`` is followed down to the arrays
and tables a ``TiledWriter`` appends to, and re-delivered as event-model style documents
``(name, doc)`` to one callable, in one thread (the caller's), in arrival order:

``start``
    The derived run's start document (from the run node's metadata).
``descriptor``
    One per stream (``snapshots``, ``refined``, ``final``, ``metrics``), from the stream
    node's metadata: ``uid``, ``name``, ``data_keys``, ``configuration`` (the image streams'
    ``configuration.canvas``: ``pixel_size_m``, ``canvas_origin_px``).
``event``
    The latest row of one array (``object_phase``, ``uncertainty``) or of the selected table
    columns (``frames_per_s``): an event whose ``data`` has only those keys. Rows that arrive
    together (a writer with ``batch_size > 1``) are shown as their last one.
``scan_path``
    Not an event-model document: ``{"run_start": uid, "positions_px": (n, 2)}``, the raw
    run's stage positions so far (``original_run_uid``, its ``primary`` stream) as probe
    centres (y, x) in pixels of the image streams' canvas (docs/conventions.md).
``stop``
    The stop document, once the writer has closed the run's nodes (or a few seconds after).

:class:`~bluesky_ptychopinn.callbacks.LiveReconstructionPlot` consumes exactly these, so
``watch_derived_runs(client, LiveReconstructionPlot())`` shows each reconstruction live.

The documents wait for the consumer in a bounded outbox: an event waiting to be delivered is
replaced by a newer one of the same stream and keys (and a scan path by the run's newer one),
so a slow consumer (a figure redrawn, a PNG written) is shown the latest state, not a backlog,
and the watcher's memory does not grow with the length of a run. Past :data:`MAX_PENDING`
documents the oldest waiting events and scan paths go (counted, logged once); ``start``,
``descriptor`` and ``stop`` documents are never dropped.

The server needs a streaming cache (tiled's ``streaming_cache`` setting: an in-process
``memory`` datastore, or Redis for several server processes). The embedded server
(:class:`EmbeddedTiled`) has the in-process one. When a server has none, the websocket is
refused: the watcher then says so in one log line and polls over HTTP instead (``mode``).
"""

from __future__ import annotations

import functools
import logging
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import PtychoError
from ._server import TiledUnavailableError

__all__ = ["DEFAULT_KEYS", "DerivedRunWatcher", "WatchResult", "streaming_unavailable_reason",
           "watch_derived_runs"]

logger = logging.getLogger(__name__)

#: The plan name of derived runs (as in :mod:`bluesky_ptychopinn.callbacks._settings`; not
#: imported from there so that watching does not load torch).
RECONSTRUCTION_PLAN_NAME = "ptychopinn_reconstruction"
#: How many of the newest *derived* runs a watch that begins looks through for ones under way
#: (one paged listing of a search on the plan name, so raw runs, however many a busy beamline
#: adds between a derived run's start and stop, never push one out of it)
RUNNING_LOOKBACK = 200

#: Streams of a derived run and the keys (arrays or table columns) the watcher delivers.
DEFAULT_KEYS: dict[str, tuple[str, ...]] = {
    "snapshots": ("object_phase", "uncertainty"),
    "refined": ("object_phase",),
    "final": ("object_phase",),
    "metrics": ("frames_per_s", "frames_done"),
}

#: The raw run's stream whose positioner readings make the scan path.
RAW_STREAM = "primary"

#: Seconds a run may wait, after its run node closed, for its data nodes' last updates.
STOP_GRACE_S = 5.0

#: Documents that may wait for the consumer; beyond, the oldest events and scan paths go.
MAX_PENDING = 256

Document = tuple[str, dict]


class _Outbox:
    """The documents waiting for the consumer, in order, bounded (see the module docstring).

    ``queue.Queue``-like (``put``, ``get``, ``get_nowait``; ``queue.Empty`` when empty) for
    any number of producing threads and one consumer.

    Parameters
    ----------
    max_pending : int
        Most documents waiting; past it the oldest event or scan path is dropped.
    """

    def __init__(self, max_pending: int = MAX_PENDING) -> None:
        if max_pending < 1:
            raise PtychoError(f"max_pending: expected >= 1, got {max_pending!r}")
        self.max_pending = int(max_pending)
        self.coalesced = 0  # documents replaced by a newer one of the same key
        self.dropped = 0  # progress documents dropped past max_pending
        self._items: OrderedDict[Any, Document] = OrderedDict()
        self._progress: OrderedDict[Any, None] = OrderedDict()  # keys of events, scan paths
        self._count = 0  # unique keys of the documents that are never replaced
        self._cond = threading.Condition()

    @staticmethod
    def _progress_key(name: str, doc: dict) -> tuple | None:
        """What a newer document replaces an older one by (None: never replaced)."""
        if name == "event":
            return name, doc.get("descriptor"), tuple(sorted(doc.get("data") or ()))
        if name == "scan_path":
            return name, doc.get("run_start")
        return None

    def put(self, item: Document) -> None:
        name, doc = item
        key = self._progress_key(name, doc)
        with self._cond:
            if key is not None and key in self._items:
                self._items[key] = item  # in its place: still after its descriptor
                self.coalesced += 1
                return
            if key is None:
                self._count += 1
                key = ("document", self._count)
            else:
                self._progress[key] = None
            self._items[key] = item
            while len(self._items) > self.max_pending and self._progress:
                oldest, _ = self._progress.popitem(last=False)
                del self._items[oldest]
                self.dropped += 1
                if self.dropped == 1:
                    logger.warning("watch: the consumer is behind; more than %d documents "
                                   "wait: the oldest events are dropped (start, descriptor "
                                   "and stop documents never)", self.max_pending)
            self._cond.notify()

    def get(self, timeout: float | None = None) -> Document:
        with self._cond:
            if not self._cond.wait_for(lambda: self._items, timeout):
                raise queue.Empty
            key, item = self._items.popitem(last=False)
            self._progress.pop(key, None)
            return item

    def get_nowait(self) -> Document:
        return self.get(timeout=0)

    def qsize(self) -> int:
        with self._cond:
            return len(self._items)


@dataclass
class WatchResult:
    """What :func:`watch_derived_runs` saw.

    Attributes
    ----------
    mode : str
        ``"websocket"`` (Tiled streaming) or ``"polling"`` (the server has no streaming).
    runs : list of str
        Uids of the derived runs delivered (their start documents), in order.
    finished : list of str
        Those whose stop document was delivered.
    timed_out : bool
        The ``timeout`` ended the watch.
    """

    mode: str
    runs: list[str] = field(default_factory=list)
    finished: list[str] = field(default_factory=list)
    timed_out: bool = False


@dataclass
class _Run:
    """The watcher's state of one derived run (guarded by the watcher's lock)."""

    uid: str
    start: dict
    descriptors: dict[str, str] = field(default_factory=dict)  # stream -> descriptor uid
    last_row: dict[tuple[str, str], int] = field(default_factory=dict)  # (stream, key) -> row
    last_seq: dict[str, int] = field(default_factory=dict)  # stream -> table seq_num shown
    positions: dict[int, tuple[float, float]] = field(default_factory=dict)  # raw seq_num
    canvas: tuple[float, np.ndarray] | None = None  # pixel size (m), canvas origin (px)
    geometry: tuple[str, str, float, int] | None = None  # y key, x key, m per unit, sign
    open_nodes: set[str] = field(default_factory=set)  # subscribed node uris not yet closed
    closed_at: float | None = None  # run node closed (monotonic)
    reread: set[tuple[str, str]] = field(default_factory=set)  # polling: rows to read again
    done: bool = False


def _family(value) -> str:
    return str(getattr(value, "value", value))


def _websocket_uri(client) -> str:
    api = client.context.api_uri
    scheme = "wss" if api.scheme == "https" else "ws"
    path = api.path.rstrip("/") + "/stream/single/"
    return str(api.copy_with(scheme=scheme, path=path).copy_merge_params(
        {"envelope_format": "msgpack"}))


def streaming_unavailable_reason(client, timeout: float = 5.0) -> str | None:
    """Why the server of ``client`` cannot stream over a websocket, or ``None`` if it can.

    Opens the root node's stream (``/stream/single/``) as Tiled's ``subscribe`` does and
    waits for its first message (the container schema).

    Parameters
    ----------
    client : tiled.client.container.Container
        A client of the server's root (or any container).
    timeout : float
        Seconds for the connection and the first message.

    Returns
    -------
    str or None
        A one-line reason (the server refused the websocket, typically because it has no
        streaming cache; or it did not answer), or ``None``.
    """
    import msgpack
    import websockets.exceptions
    from websockets.sync.client import connect

    context = client.context
    headers = {}
    revoke = None
    try:
        if context.server_info.authentication.providers:  # as tiled: a short-lived key
            info = context.create_api_key(expires_in=60, note="ptychopinn watch probe")
            headers["Authorization"] = f"Apikey {info['secret']}"
            revoke = info["first_eight"]
        elif context.api_key:
            headers["Authorization"] = f"Apikey {context.api_key}"
        uri = _websocket_uri(client)
        with connect(uri, additional_headers=headers, open_timeout=timeout) as ws:
            message = msgpack.unpackb(ws.recv(timeout=timeout))
        if not isinstance(message, dict) or "type" not in message:
            return f"unexpected first message on {uri}"
        return None
    except websockets.exceptions.InvalidStatus as exc:
        code = exc.response.status_code
        return (f"the server refused the websocket (HTTP {code}): it has no streaming cache "
                "(tiled's streaming_cache setting)" if code >= 500 else
                f"the server refused the websocket (HTTP {code})")
    except (OSError, TimeoutError, websockets.exceptions.WebSocketException) as exc:
        return f"no websocket stream ({type(exc).__name__}: {exc})"
    finally:
        if revoke is not None:
            try:
                context.revoke_api_key(revoke)
            except Exception:  # the key expires within a minute anyway
                logger.debug("could not revoke the probe's API key", exc_info=True)


class DerivedRunWatcher:
    """Follow the derived runs of a Tiled server; see the module docstring.

    Parameters
    ----------
    client : tiled.client.container.Container
        Client of the container the runs are written to (a ``TiledWriter``'s client).
    keys : mapping, optional
        Stream name -> keys delivered (default :data:`DEFAULT_KEYS`).
    include_running : bool
        Also follow derived runs that began before the watch and have not stopped (from
        their current state; earlier rows are shown as their latest).
    mode : {"auto", "websocket", "polling"}
        ``"auto"``: the websocket when the server streams, else polling with a warning.
    poll_interval_s : float
        Period of the polling mode.
    max_size : int
        Largest websocket message accepted, bytes (a batch of snapshot rows is one message).
    max_pending : int
        Documents that may wait for a slow consumer (:data:`MAX_PENDING`); waiting events
        are replaced by newer ones of the same stream and keys whatever this is.

    Examples
    --------
    >>> watcher = DerivedRunWatcher(client).start()       # doctest: +SKIP
    >>> name, doc = watcher.get(timeout=10.0)[0]           # doctest: +SKIP
    >>> watcher.close()                                    # doctest: +SKIP
    """

    def __init__(self, client, *, keys: Mapping[str, Iterable[str]] | None = None,
                 include_running: bool = True, mode: str = "auto",
                 poll_interval_s: float = 1.0, max_size: int = 256 * 2**20,
                 max_pending: int = MAX_PENDING) -> None:
        if mode not in ("auto", "websocket", "polling"):
            raise PtychoError(f"mode: expected 'auto', 'websocket' or 'polling', got {mode!r}")
        self.client = client
        self.keys = {k: tuple(v) for k, v in (keys or DEFAULT_KEYS).items()}
        self.include_running = include_running
        self.requested_mode, self.mode = mode, mode
        self.poll_interval_s = float(poll_interval_s)
        self.max_size = int(max_size)
        self._out = _Outbox(max_pending)  # bounded: a slow consumer sees the latest
        self._lock = threading.RLock()
        self._runs: dict[str, _Run] = {}
        self._subscriptions: dict[str, Any] = {}
        self._keep: dict[str, tuple] = {}  # tiled holds callbacks weakly: the strong refs
        self._closed = threading.Event()
        self._poller: threading.Thread | None = None
        self._known_at_start: set[str] = set()

    @property
    def _where(self) -> str:
        return str(self.client.context.api_uri)

    # -- lifecycle ----------------------------------------------------------------------------
    def start(self) -> DerivedRunWatcher:
        """Connect (websocket, or polling when the server cannot stream) and begin."""
        if self.requested_mode in ("auto", "websocket"):
            reason = streaming_unavailable_reason(self.client)
            if reason is None:
                self.mode = "websocket"
            elif self.requested_mode == "websocket":
                raise TiledUnavailableError(f"Tiled at {self._where}: {reason}")
            else:
                logger.warning("Tiled at %s cannot stream (%s): polling every %.1f s instead",
                               self._where, reason, self.poll_interval_s)
                self.mode = "polling"
        if self.mode == "websocket":
            self._subscribe(self.client, None, on_child=self._on_root_child, start=None)
            if self.client.uri not in self._subscriptions:  # the probe passed, this did not
                if self.requested_mode == "websocket":
                    raise TiledUnavailableError(f"Tiled at {self._where}: no websocket stream")
                logger.warning("Tiled at %s: no websocket stream: polling every %.1f s "
                               "instead", self._where, self.poll_interval_s)
                self.mode = "polling"
        if self.mode == "websocket":
            if self.include_running:
                self._attach_running()
        else:
            self._known_at_start = set(self._recent_keys())
            if self.include_running:
                self._attach_running()
            self._poller = threading.Thread(target=self._poll_loop, name="ptychopinn-watch-poll",
                                            daemon=True)
            self._poller.start()
        logger.info("watching %s for derived runs (%s)", self._where, self.mode)
        return self

    def close(self) -> None:
        """Disconnect every subscription (idempotent)."""
        self._closed.set()
        with self._lock:
            subscriptions = list(self._subscriptions.values())[::-1]  # leaves first
            self._subscriptions.clear()
        for sub in subscriptions:
            _discard_updates(sub)
            try:
                sub.disconnect()
            except Exception:
                logger.debug("disconnecting %s failed", sub, exc_info=True)
        if self._poller is not None:
            self._poller.join(timeout=2 * self.poll_interval_s + 5)

    def __enter__(self) -> DerivedRunWatcher:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    def get(self, timeout: float = 0.1) -> list[Document]:
        """The documents that arrived: waits up to ``timeout`` s for the first, then takes
        whatever else is queued (and the stop documents that became due)."""
        out: list[Document] = []
        try:
            out.append(self._out.get(timeout=timeout))
            while True:
                out.append(self._out.get_nowait())
        except queue.Empty:
            pass
        self._due_stops()
        try:
            while True:
                out.append(self._out.get_nowait())
        except queue.Empty:
            pass
        return out

    # -- what both modes deliver (any thread; under the lock) -------------------------------
    def _put(self, name: str, doc: dict) -> None:
        self._out.put((name, doc))

    def _run_started(self, uid: str, start: dict) -> _Run | None:
        with self._lock:
            if uid in self._runs or self._closed.is_set():
                return None
            run = self._runs[uid] = _Run(uid, dict(start))
            try:
                from ..metadata import PtychoMetadata

                md = PtychoMetadata.parse(start.get("ptycho"))
                keys = md.positioner_keys
                run.geometry = (keys.y, keys.x, md.position_scale_m, md.position_sign)
            except Exception as exc:  # no scan path, the images still show
                logger.info("derived run %s: no scan path (%s)", uid, exc)
            self._put("start", run.start)
            return run

    def _stream_found(self, run: _Run, name: str, metadata: dict) -> None:
        with self._lock:
            if name in run.descriptors or run.done:
                return
            doc = {**metadata, "name": name, "run_start": run.uid}
            doc.setdefault("uid", f"{run.uid}-{name}")
            doc.setdefault("data_keys", {})
            run.descriptors[name] = doc["uid"]
            self._put("descriptor", doc)
            canvas = (doc.get("configuration") or {}).get("canvas", {}).get("data", {})
            if run.canvas is None and canvas.get("pixel_size_m"):
                run.canvas = (float(canvas["pixel_size_m"]),
                              np.asarray(canvas.get("canvas_origin_px", (0.0, 0.0)), float))
                self._scan_path(run)

    def _event(self, run: _Run, stream: str, seq_num: int, data: dict) -> None:
        now = time.time()
        self._put("event", {"descriptor": run.descriptors[stream], "seq_num": seq_num,
                            "uid": f"{run.descriptors[stream]}-{seq_num}-{next(iter(data))}",
                            "time": now, "data": data, "timestamps": dict.fromkeys(data, now)})

    def _array_rows(self, run: _Run, stream: str, key: str, first: int, rows,
                    streamed: bool = True) -> None:
        """Rows ``first ..`` of array ``stream/key`` arrived: show the last, once.

        A row read over HTTP (``streamed=False``) may be a node's fill value (created, not
        yet written): the streamed row of the same index replaces it."""
        rows = np.asarray(rows)
        if rows.ndim < 1 or not len(rows):
            return
        last = int(first) + len(rows) - 1
        with self._lock:
            if run.done or stream not in run.descriptors:
                return
            shown = run.last_row.get((stream, key), -1)
            if last < shown or (last == shown and not streamed):
                return  # replayed, or read over HTTP already
            run.last_row[(stream, key)] = last
            self._event(run, stream, last + 1, {key: rows[-1]})

    def _table_rows(self, run: _Run, stream: str, table) -> None:
        """Rows of ``stream``'s internal table arrived: its selected columns' last row."""
        columns = [c for c in self.keys.get(stream, ()) if c in table.columns]
        if not columns or not len(table):
            return
        seq = int(table["seq_num"].iloc[-1]) if "seq_num" in table.columns else 0
        with self._lock:
            if run.done or stream not in run.descriptors:
                return
            if seq and seq <= run.last_seq.get(stream, 0):
                return
            run.last_seq[stream] = seq
            self._event(run, stream, seq,
                        {c: float(table[c].iloc[-1]) for c in columns})

    def _raw_rows(self, run: _Run, table) -> None:
        """Positioner readings of the raw run arrived."""
        if run.geometry is None:
            return
        ykey, xkey = run.geometry[:2]
        if ykey not in table.columns or xkey not in table.columns:
            return
        seqs = (table["seq_num"] if "seq_num" in table.columns else range(len(table)))
        with self._lock:
            if run.done:
                return
            for seq, y, x in zip(seqs, table[ykey], table[xkey], strict=True):
                run.positions[int(seq)] = (float(y), float(x))
            self._scan_path(run)

    def _scan_path(self, run: _Run) -> None:
        if run.canvas is None or run.geometry is None or not run.positions or run.done:
            return
        from ..geometry import positions_m_to_px

        dx, origin_px = run.canvas
        scale, sign = run.geometry[2:]
        stage = np.array([run.positions[k] for k in sorted(run.positions)]) * scale
        # As the reconstruction places frames: object pixels of the stage origin, then the
        # canvas's own origin.
        px = positions_m_to_px(stage, dx, origin_m=(0.0, 0.0), sign=sign) - origin_px
        self._put("scan_path", {"run_start": run.uid, "positions_px": px})

    def _finish(self, run: _Run) -> None:
        with self._lock:
            if run.done:
                return
            run.done = True
            # A watcher follows runs for days: a finished run keeps only its uid (to be known
            # as seen), not its scan path (one reading per frame) and row bookkeeping.
            run.positions.clear()
            run.last_row.clear()
            run.reread.clear()
        stop = None
        try:
            stop = dict(self.client[run.uid].metadata.get("stop") or {})
        except Exception:
            logger.debug("stop of %s not readable", run.uid, exc_info=True)
        if not stop:
            stop = {"run_start": run.uid, "exit_status": "unknown", "reason": "no stop document",
                    "time": time.time(), "uid": f"{run.uid}-stop"}
        self._put("stop", stop)

    def _due_stops(self) -> None:
        """Runs whose run node closed: stop once their data nodes closed too (their last
        rows delivered), or after :data:`STOP_GRACE_S`."""
        now = time.monotonic()
        with self._lock:
            due = [run for run in self._runs.values() if not run.done and
                   run.closed_at is not None and
                   (not run.open_nodes or now - run.closed_at > STOP_GRACE_S)]
        for run in due:
            self._finish(run)

    def _recent_keys(self, n: int = 10) -> list[str]:
        try:
            return list(self.client.keys().tail(n))
        except Exception as exc:
            logger.debug("listing runs failed: %s", exc)
            return []

    def _new_keys(self) -> list[str]:
        """The keys added since the newest key already looked at, oldest first.

        Looks at the newest keys in windows that grow (10, 40, 160, ...) until one holds a
        key already known: keys come in the order they were added, so all the new ones are
        after it, however many came since the last poll.
        """
        n = 10
        while True:
            keys = self._recent_keys(n)
            known = [i for i, key in enumerate(keys)
                     if key in self._known_at_start or key in self._runs]
            if known:
                return keys[known[-1] + 1:]
            if len(keys) < n:  # the whole catalog, none known (or the listing failed: [])
                return keys
            n *= 4

    def _attach_running(self) -> None:
        """Derived runs already under way when the watch began (among the newest
        ``RUNNING_LOOKBACK`` derived runs, listed with their metadata in one paged request)."""
        from tiled.queries import Key

        try:
            derived = self.client.search(Key("start.plan_name") == RECONSTRUCTION_PLAN_NAME)
            items = list(derived.items().tail(RUNNING_LOOKBACK))
        except Exception as exc:
            logger.debug("listing runs failed: %s", exc)
            return
        for key, node in items:
            try:
                metadata = node.metadata
            except Exception:
                continue
            start = metadata.get("start") or {}
            if start.get("plan_name") == RECONSTRUCTION_PLAN_NAME and "stop" not in metadata:
                self._attach(key, start, node)

    def _attach(self, uid: str, start: dict, node) -> None:
        run = self._run_started(uid, start)
        if run is None:
            return
        if self.mode == "websocket":
            self._follow_children(_plain(node), run, functools.partial(self._on_stream, run),
                                  run_node=True)
            self._follow_raw(run)
        # polling: the poll loop reads the run

    # -- websocket mode --------------------------------------------------------------------------
    def _subscribe(self, node, run: _Run | None, *, on_child=None, on_data=None,
                   run_node: bool = False, start: int | None = 1) -> None:
        uri = node.uri
        with self._lock:
            if uri in self._subscriptions or self._closed.is_set():
                return
            sub = node.subscribe()
            self._subscriptions[uri] = sub
            if run is not None and not run_node:
                run.open_nodes.add(uri)

        def closed(_sub) -> None:  # the producer closed the node (TiledWriter's stop)
            with self._lock:
                self._subscriptions.pop(uri, None)
                self._keep.pop(uri, None)
                if run is not None:
                    run.open_nodes.discard(uri)
                    if run_node:
                        run.closed_at = time.monotonic()

        self._keep[uri] = (on_child, on_data, closed)
        if on_child is not None:
            def child(update) -> None:
                on_child(update.key, update.child(), update.metadata or {}, True)
            self._keep[uri] += (child,)
            sub.child_created.add_callback(child)
        if on_data is not None:
            sub.new_data.add_callback(on_data)
        sub.stream_closed.add_callback(closed)
        # start=1: replay what the cache holds of this node since its creation (a node is
        # created, then written at once: its first rows precede our subscription). The root:
        # only what is new (runs under way are listed by _attach_running).
        if not self._start_subscription(sub, start):
            with self._lock:  # not followed (a data node: the run's stop does not wait for it)
                self._subscriptions.pop(uri, None)
                self._keep.pop(uri, None)
                if run is not None:
                    run.open_nodes.discard(uri)

    def _start_subscription(self, sub, start: int | None, timeout: float = 30.0) -> bool:
        """``sub.start_in_thread(start)``, without its unbounded wait for the connection
        (tiled 0.2.20 waits forever when the handshake fails, or when the watcher closed
        the subscription meanwhile)."""
        run_ = getattr(sub, "_run", None)
        connected = getattr(sub, "_connected_event", None)
        if run_ is None or connected is None:  # another tiled: its own method
            sub.start_in_thread(start, max_size=self.max_size)
            return True
        thread = threading.Thread(target=run_, args=(start, self.max_size), daemon=True,
                                  name=f"tiled-subscription-{sub}")
        sub._thread = thread  # joined by sub.disconnect()
        thread.start()
        deadline = time.monotonic() + timeout
        while not connected.wait(0.1):
            if not thread.is_alive() or self._closed.is_set() or time.monotonic() > deadline:
                if not self._closed.is_set():
                    logger.warning("watch: no stream from %s (not followed)", sub)
                return False
        return True

    def _on_root_child(self, key: str, node, metadata: dict, fresh: bool) -> None:
        start = metadata.get("start") or {}
        if start.get("plan_name") != RECONSTRUCTION_PLAN_NAME:
            return
        self._safely(self._attach, key, start, node)

    def _follow_children(self, node, run: _Run, on_child, run_node: bool = False) -> None:
        """Subscribe to ``node``'s new children, and take those it has already (replays may
        have left the cache; a run watched after it began)."""
        self._subscribe(node, run, run_node=run_node,
                        on_child=lambda *args: self._safely(on_child, *args))
        try:
            existing = [(key, _plain(child)) for key, child in node.items()]
        except Exception:
            logger.debug("listing %s failed", node.uri, exc_info=True)
            return
        for key, child in existing:
            self._safely(on_child, key, child, dict(child.metadata), False)

    def _on_stream(self, run: _Run, name: str, node, metadata: dict, fresh: bool) -> None:
        if name not in self.keys:
            return
        self._stream_found(run, name, metadata)
        self._follow_children(_plain(node), run, functools.partial(self._on_data_node, run, name))

    def _on_data_node(self, run: _Run, stream: str, key: str, node, metadata: dict,
                      fresh: bool) -> None:
        family = _family(node.structure_family)
        wanted = self.keys.get(stream, ())
        if family == "array" and key in wanted:
            shape = node.shape
            if not fresh and shape and shape[0]:  # there before us: its last row, over HTTP
                self._array_rows(run, stream, key, shape[0] - 1, node[-1][None], False)

            def on_data(update) -> None:
                offset = update.offset[0] if getattr(update, "offset", None) else 0
                self._safely(self._array_rows, run, stream, key, offset, update.data())

            self._subscribe(node, run, on_data=on_data)
        elif family == "table" and key.startswith("internal"):
            columns = [c for c in wanted if c in node.structure().columns]
            if not columns:
                return
            if not fresh:
                self._safely(self._table_rows, run, stream, node.read())

            def on_table(update) -> None:
                self._safely(self._table_rows, run, stream, update.data())

            self._subscribe(node, run, on_data=on_table)

    def _follow_raw(self, run: _Run) -> None:
        raw_uid = run.start.get("original_run_uid")
        if run.geometry is None or not raw_uid:
            return
        try:
            raw = _plain(self.client[raw_uid])
        except Exception as exc:
            logger.info("derived run %s: raw run %s not readable (%s): no scan path", run.uid,
                        raw_uid, exc)
            return

        def on_raw_data(key: str, node, metadata: dict, fresh: bool) -> None:
            if _family(node.structure_family) != "table" or not key.startswith("internal"):
                return
            self._safely(self._raw_rows, run, node.read())
            self._subscribe(node, None,
                            on_data=lambda u: self._safely(self._raw_rows, run, u.data()))

        def on_raw_stream(key: str, node, metadata: dict, fresh: bool) -> None:
            if key == RAW_STREAM:
                self._follow_children(_plain(node), None, on_raw_data)

        self._follow_children(raw, None, on_raw_stream)

    def _safely(self, func: Callable, *args) -> None:
        try:
            func(*args)
        except Exception:
            if not self._closed.is_set():
                logger.exception("watch: %s failed", getattr(func, "__name__", func))

    # -- polling mode ------------------------------------------------------------------------------
    def _poll_loop(self) -> None:
        while not self._closed.wait(self.poll_interval_s):
            self._safely(self._poll_once)

    def _poll_once(self) -> None:
        for key in self._new_keys():
            if key in self._known_at_start or key in self._runs:
                continue
            node = self.client[key]
            start = node.metadata.get("start") or {}
            if start.get("plan_name") == RECONSTRUCTION_PLAN_NAME:
                self._attach(key, start, node)
            else:
                self._known_at_start.add(key)  # not ours: never look again
        with self._lock:
            active = [run for run in self._runs.values() if not run.done]
        for run in active:
            self._safely(self._poll_run, run)

    def _poll_run(self, run: _Run) -> None:
        node = _plain(self.client[run.uid])  # fresh: its metadata (stop) and children
        stopped = "stop" in node.metadata
        for name, stream in node.items():
            if name not in self.keys:
                continue
            stream = _plain(stream)
            self._stream_found(run, name, dict(stream.metadata))
            for key, child in stream.items():
                family = _family(child.structure_family)
                if family == "array" and key in self.keys[name] and child.shape[0]:
                    last = child.shape[0] - 1
                    if last > run.last_row.get((name, key), -1):
                        self._array_rows(run, name, key, last, child[-1][None], False)
                        run.reread.add((name, key))
                    elif (name, key) in run.reread:  # read once more: it may have been the
                        run.reread.discard((name, key))  # fill value of a node being written
                        self._array_rows(run, name, key, last, child[-1][None], True)
                elif family == "table" and key.startswith("internal"):
                    self._table_rows(run, name, child.read())
        raw_uid = run.start.get("original_run_uid")
        if run.geometry is not None and raw_uid:
            try:
                primary = _plain(_plain(self.client[raw_uid])[RAW_STREAM])
                for key, child in primary.items():
                    if key.startswith("internal"):
                        self._raw_rows(run, child.read())
            except KeyError:
                pass
        if stopped:
            self._finish(run)


class _Discard:
    """An executor that drops what it is given (see :func:`_discard_updates`)."""

    def submit(self, *args, **kwargs) -> None:
        return None

    def shutdown(self, *args, **kwargs) -> None:
        return None


def _discard_updates(subscription) -> None:
    """Drop the updates a subscription still receives while it disconnects.

    tiled 0.2.20 shuts a subscription's executor down while its receiving thread may be
    handing it one more message, which then dies with "cannot schedule new futures after
    shutdown" on stderr; we want no more updates anyway.
    """
    for name in ("child_created", "child_metadata_updated", "new_data", "stream_closed",
                 "disconnected"):
        registry = getattr(subscription, name, None)
        if registry is not None and hasattr(registry, "_executor"):
            registry._executor = _Discard()


def _plain(node):
    """The plain tiled client under bluesky-tiled-plugins' run / stream wrappers."""
    return getattr(node, "base", node)


def watch_derived_runs(client, on_document: Callable[[str, dict], Any], *, once: bool = False,
                       timeout: float | None = None, stop: threading.Event | None = None,
                       on_idle: Callable[[bool], Any] | None = None,
                       ready: threading.Event | None = None, **options) -> WatchResult:
    """Deliver the derived runs of a Tiled server to ``on_document`` as they arrive.

    Blocks; every call of ``on_document`` happens in the calling thread, in arrival order
    (so a matplotlib figure can be drawn there). An exception in ``on_document`` is logged
    and the watch goes on.

    Parameters
    ----------
    client : tiled.client.container.Container
        Client of the container the runs are written to.
    on_document : callable
        ``on_document(name, doc)`` with the documents of the module docstring, e.g. a
        :class:`~bluesky_ptychopinn.callbacks.LiveReconstructionPlot`.
    once : bool
        Return after the first derived run's stop document.
    timeout : float, optional
        Return after this many seconds (``WatchResult.timed_out``).
    stop : threading.Event, optional
        Return once it is set.
    on_idle : callable, optional
        ``on_idle(changed)`` after each batch of documents (``changed``) and at least every
        0.1 s otherwise: where a GUI processes its events or a PNG is saved.
    ready : threading.Event, optional
        Set once subscribed (documents after that are delivered).
    **options
        Passed to :class:`DerivedRunWatcher` (``keys``, ``include_running``, ``mode``,
        ``poll_interval_s``, ``max_size``, ``max_pending``).

    Returns
    -------
    WatchResult

    Raises
    ------
    TiledUnavailableError
        ``mode="websocket"`` and the server cannot stream.

    Examples
    --------
    >>> from bluesky_ptychopinn.callbacks import LiveReconstructionPlot   # doctest: +SKIP
    >>> watch_derived_runs(tiled.client(), LiveReconstructionPlot(), once=True)  # doctest: +SKIP
    WatchResult(mode='websocket', runs=['...'], finished=['...'], timed_out=False)
    """
    deadline = None if timeout is None else time.monotonic() + float(timeout)
    watcher = DerivedRunWatcher(client, **options)
    watcher.start()
    result = WatchResult(mode=watcher.mode)
    if ready is not None:
        ready.set()
    try:
        while True:
            documents = watcher.get(timeout=0.1)
            for name, doc in documents:
                if name == "start":
                    result.runs.append(doc.get("uid", ""))
                try:
                    on_document(name, doc)
                except Exception:
                    logger.exception("watch: the %s document's consumer failed", name)
                if name == "stop":
                    result.finished.append(doc.get("run_start", ""))
            if on_idle is not None:
                try:
                    on_idle(bool(documents))
                except Exception:
                    logger.exception("watch: on_idle failed")
            if once and result.finished:
                break
            if stop is not None and stop.is_set():
                break
            if deadline is not None and time.monotonic() > deadline:
                result.timed_out = True
                break
    finally:
        watcher.close()
    return result
