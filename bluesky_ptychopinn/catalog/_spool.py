"""A Tiled writer that never blocks or aborts the scan: documents are journaled to disk and
delivered by a background thread, through a fresh ``TiledWriter`` per run.

Why not ``TiledWriter(backup_directory=...)``: in bluesky-tiled-plugins 2.0.12 it still calls
Tiled in the caller's thread (the client retries a dead server for up to 45 s per request, so
the RunEngine waits), and once a request fails it writes the rest of the run to JSON lines that
nobody delivers; the half-written run stays in Tiled.

How a run reaches Tiled exactly once:

* Every document is appended to the run's journal (``<spool>/<label>/<start uid>.journal``)
  before ``__call__`` returns; a small in-memory buffer spares the thread reading it back.
* The delivery thread feeds the documents to the run's writer. If a call fails, the run's
  state in Tiled is unknown (the request may have been applied and only its reply lost, or
  the writer's own retries may have appended a batch twice), so it is never patched up: once
  Tiled answers again the run's container is deleted and the whole run replayed from its
  journal into a fresh writer, then followed live.
* After the stop document the run is checked in Tiled: stop metadata present, every stream
  with the same ``seq_num`` values (a RunEngine rewind repeats some) and as many array entries
  as events were handed over. A run that does not pass is replayed the same way. Only then is
  its journal deleted.
* A document the writer refuses (not a Tiled outage: e.g. an event its writer has no
  descriptor for) is left out and counted (``rejected``), as the RunEngine does with a
  subscriber that raises; the rest of the run still goes. A refused start or stop fails the
  pass, since the run could not be whole.
* An event value that cannot go into its column in Tiled is made to fit before it is handed
  over, since the writer only finds out when it flushes a batch (at the stop document at the
  latest) and then loses the whole run: a scalar whose type changes mid-run is converted to
  its column's type (the declared dtype, or the first value's type if that does not fit it)
  where that loses nothing (``3`` into a float column), and is otherwise left out of that
  event (a null in its column); an array of another shape than the column's first is replaced
  by a fill of the column's shape (NaN, or zero for a dtype without NaN), so that rows stay
  aligned with events. Each kind of change is logged once and listed in the run's ``notes``
  metadata in Tiled; values lost so are counted (``values_dropped``).
* Documents are routed to their run by ``run_start``, descriptor or resource; one of no open
  run (an event of an unknown descriptor, a late document of a stopped run) is dropped and
  counted, never put into another run. A document seen before in its run (a redelivered start
  or event, same uid) is dropped and counted as a duplicate.

A crash leaves journals behind; the next writer of the same label, or
``bluesky-ptychopinn spool flush``, delivers them. Such a journal is first compared with
Tiled: if Tiled already holds all of it (stop included; the journal may have lost its last,
not yet fsynced, second), only the journal is removed. Otherwise the run is deleted in Tiled
and replayed; a journal without a stop document is finished with a synthesized one
(``exit_status="abort"``), so that the writer writes its last rows. A journal being written is
locked (flock), so two processes never deliver the same run.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import os
import shutil
import threading
import time
import uuid
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ._journal import JournalWriter, encode_document, read_headers, read_record_at

__all__ = ["SpooledWriter", "SpoolStats", "default_spool_dir", "flush_spool", "spool_status"]

logger = logging.getLogger(__name__)

#: Documents routed to their run by ``run_start``, by descriptor, by resource.
_BY_RUN_START = ("descriptor", "stop", "resource", "stream_resource")
_BY_DESCRIPTOR = ("event", "event_page", "stream_datum")
_BY_RESOURCE = ("datum", "datum_page")
#: Uids of delivered runs remembered by a writer, to drop a redelivered start of one.
_DONE_REMEMBERED = 4096
#: Why ``_route`` returns no run for a document seen before in its run.
_DUPLICATE = "duplicate"
#: A delivery call running longer than this means Tiled is not answering: count as spooled.
#: (Healthy requests take well under a second, a loaded machine's first writes up to ~2 s.)
_STALLED_S = 5.0
#: close(): how long past its timeout it waits for an idle delivery thread to notice
_EXIT_GRACE_S = 1.0


def default_spool_dir() -> Path:
    """``$PTYCHOPINN_SPOOL`` or ``~/.local/share/bluesky-ptychopinn/spool``."""
    env = os.environ.get("PTYCHOPINN_SPOOL")
    return Path(env) if env else Path.home() / ".local" / "share" / "bluesky-ptychopinn" / "spool"


def _private_dir(path: Path) -> Path:
    # Documents are the experiment's data: readable by the user only, as the catalog is.
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    if os.name == "posix" and path.stat().st_mode & 0o077:
        os.chmod(path, 0o700)
    return path


def _try_lock(fd: int) -> bool:
    if os.name != "posix":
        return True
    import fcntl

    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return False
    return True


class JournalError(RuntimeError):
    """A journaled document cannot be read back (a missing, cut or damaged journal).

    Not an ``OSError`` on purpose: it is a local fault, never "Tiled is unreachable", so the
    run fails (and is counted) instead of being deleted and replayed at every probe.
    """


def _transient(exc: BaseException) -> bool:
    """Whether ``exc`` says "Tiled is not reachable now" rather than "this cannot be written".

    Only what the HTTP client raises for the network or an overloaded server counts. Any other
    ``OSError`` (a local file, ``EMFILE``) would be taken for an outage that never ends.
    """
    import httpx

    if isinstance(exc, httpx.HTTPStatusError):
        return exc.response.status_code >= 500 or exc.response.status_code == 429
    return isinstance(exc, (httpx.TransportError, ConnectionError, TimeoutError))


@dataclass
class SpoolStats:
    """Counters of a :class:`SpooledWriter` (or of one :func:`flush_spool`).

    Attributes
    ----------
    received : int
        Documents handed to the writer.
    spooled : int
        Documents that arrived while Tiled was unreachable (or a delivery call had been stuck
        for over 5 s): they waited in the journal for Tiled.
    delivered : int
        Documents handed to a run's writer that were kept (a run's final, verified pass).
    redelivered : int
        Documents sent again because their run was deleted and replayed.
    replays : int
        Runs deleted in Tiled and written again from their journal.
    runs_done : int
        Runs delivered and verified in Tiled (their journal removed).
    outages : int
        Times delivery found Tiled unreachable.
    dropped : int
        Documents that could not be journaled: no open run to route them to (an event of an
        unknown descriptor, a document arriving after its run's stop), a disk error, or the
        spool's disk below ``min_free_bytes``.
    disk_low : int
        Of ``dropped``, those refused because the disk was nearly full.
    duplicates : int
        Documents not journaled because their run already has them (same uid: a redelivered
        start, descriptor or event).
    rejected : int
        Documents a run's writer refused (not an outage), left out of Tiled as a plain
        ``TiledWriter`` would leave them; each is logged once.
    max_backlog : int
        Most documents waiting for delivery at one time.
    values_dropped : int
        Event values that did not fit their column in Tiled (a string in a number column, an
        array of another shape) and were left out or replaced by a fill; each kind is logged
        once and listed in the run's ``notes`` metadata.
    """

    received: int = 0
    spooled: int = 0
    delivered: int = 0
    redelivered: int = 0
    replays: int = 0
    runs_done: int = 0
    outages: int = 0
    dropped: int = 0
    disk_low: int = 0
    duplicates: int = 0
    rejected: int = 0
    max_backlog: int = 0
    values_dropped: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


@dataclass
class _Run:
    """One run's journal and where its delivery stands."""

    uid: str
    path: Path
    offsets: list[int] = field(default_factory=list)
    journal: JournalWriter | None = None  # None: an orphan journal (written by an ended process)
    lock_fd: int = -1
    stop_uid: str | None = None
    stop_seen: bool = False
    cursor: int = 0  # documents handed to the current writer
    attempted: int = 0  # most documents ever handed to a writer (to count redeliveries)
    writer: Any = None
    dirty: bool = False  # Tiled's copy is unknown: delete and replay before going on
    failures: int = 0  # non-transient failures (a replay that fails the same way each time)
    # stream -> Counter of the seq_nums handed over (and accepted) in the current pass; a
    # multiset, since a RunEngine rewind repeats seq_nums
    seqs: dict = field(default_factory=dict)
    streams: dict = field(default_factory=dict)  # descriptor uid -> stream name
    reader: Any = None
    synced: int = 0  # journal bytes made durable (fsync)
    lost: int = 0  # documents not journaled (the disk was nearly full)
    tail: list = field(default_factory=list)  # documents after the journal's (a synthesized stop)
    unchecked: bool = False  # an orphan journal not yet compared with Tiled
    seen: set = field(default_factory=set)  # keys of the journaled documents (duplicates)
    start_record: bytes = b""  # the journaled start, to tell a redelivery from a conflict
    rejected: int = 0  # documents the writer refused in the current pass
    columns: _Columns = field(default_factory=lambda: _Columns())  # of the current pass
    closed: bool = False  # its journal closed by SpooledWriter.close()

    @property
    def written(self) -> int:
        return len(self.offsets) + len(self.tail)

    def count(self, name: str, doc: dict) -> None:
        """Note a descriptor's stream, or an event's seq_nums (for :meth:`_Delivery.verify`)."""
        if name == "descriptor":
            self.streams[doc["uid"]] = doc["name"]
        elif name in ("event", "event_page"):
            stream = self.streams.get(doc.get("descriptor"))
            self.seqs.setdefault(stream, Counter()).update(_seq_nums(name, doc))

    def close(self) -> None:
        self.closed = True  # no reading after this (the delivery thread may still be in a call)
        if self.reader is not None:
            self.reader.close()
            self.reader = None
        if self.journal is not None:
            self.journal.close()  # releases the flock with the descriptor
            self.journal = None
        elif self.lock_fd >= 0:
            os.close(self.lock_fd)
        self.lock_fd = -1


def _seq_nums(name: str, doc: dict) -> list[int]:
    """The seq_nums of an event or event page."""
    if name == "event":
        return [int(doc["seq_num"])]
    seq = doc["seq_num"]
    return [int(s) for s in (seq.tolist() if hasattr(seq, "tolist") else seq)]


def _doc_key(name: str, doc: dict) -> Any:
    """What identifies a document within its run (None: nothing to tell duplicates by)."""
    key = doc.get("datum_id" if name in ("datum", "datum_page") else "uid")
    if isinstance(key, str):
        return name, key
    if isinstance(key, list) and key:  # a page: its uids together
        return name, tuple(key)
    return None


# -- event values that fit their column in Tiled ------------------------------------------
#: The one Python type a scalar column's values are handed over as, by numpy dtype kind: a
#: batch of ``3`` and ``3.0`` (or ``np.float32``) must give pyarrow the schema of the first.
_PY_TYPES = {"f": float, "i": int, "u": int, "b": bool, "U": str, "S": str}
_JSON_KINDS = {"number": "f", "integer": "i", "boolean": "b", "string": "U"}
_KIND_NAMES = {"f": "float", "i": "integer", "u": "integer", "b": "boolean", "U": "string",
               "S": "string"}
#: ``fit`` returns this for a value left out of its event.
_LEFT_OUT = object()


def _declared_kind(spec: dict) -> str | None:
    """The numpy dtype kind a descriptor's data key declares (None: none usable)."""
    dtype = spec.get("dtype_numpy") or spec.get("dtype_str")
    if isinstance(dtype, str) and dtype:
        try:
            kind = np.dtype(dtype).kind
        except TypeError:
            kind = None
        if kind in _PY_TYPES:
            return kind
    return _JSON_KINDS.get(spec.get("dtype"))


def _kind_of(value: Any) -> str | None:
    """The kind of a scalar value as pyarrow would type it (None: not a plain scalar)."""
    if isinstance(value, (bool, np.bool_)):
        return "b"
    if isinstance(value, (int, np.integer)):
        return "i"
    if isinstance(value, (float, np.floating)):
        return "f"
    if isinstance(value, (str, np.str_)):
        return "U"
    return None


def _convert(value: Any, kind: str) -> Any:
    """``value`` as the Python type of ``kind`` if no information is lost, else ``_LEFT_OUT``."""
    have = _kind_of(value)
    if have is None:
        return _LEFT_OUT
    if kind in ("U", "S"):
        return str(value) if have == "U" else _LEFT_OUT
    if have == "U":
        return _LEFT_OUT  # a number parsed from text would be a guess
    if kind == "f":
        out = float(value)
        # an integer above 2**53 has no exact double
        return out if have != "i" or int(out) == int(value) else _LEFT_OUT
    if kind in ("i", "u"):
        if have == "f" and not (math.isfinite(value) and float(value).is_integer()):
            return _LEFT_OUT
        out = int(value)
        return out if kind == "i" or out >= 0 else _LEFT_OUT
    # kind "b": only 0 and 1 are booleans
    return bool(value) if have == "b" or value in (0, 1) else _LEFT_OUT


class _Columns:
    """Makes event values fit their column in Tiled, for one pass of a run through a writer.

    ``TiledWriter`` types each column by the first batch it writes (pyarrow for the table, the
    first array for a zarr node); a later value of another type or shape fails a whole batch,
    and the writer keeps that batch and fails again at the stop document: the run is lost. A
    column's type is its declared dtype, or the type of its first value when that value does
    not convert to the declared one (a mis-declared key keeps being written as before); its
    shape is that of its first array.
    """

    def __init__(self) -> None:
        self.keys: dict[str, dict[str, tuple[str, str | None, bool]]] = {}
        self.columns: dict[tuple[str, str], Any] = {}  # (stream, key) -> kind, or (shape, dtype)
        # (stream, key, what, lossy) -> [count, first seq_num]; ``what``: what became of them
        self.changes: dict[tuple[str, str, str, bool], list] = {}

    def descriptor(self, doc: dict) -> None:
        """Note the internal data keys of a descriptor (external ones go by reference)."""
        keys = {}
        for key, spec in (doc.get("data_keys") or {}).items():
            if not isinstance(spec, dict) or "external" in spec:
                continue
            shape = spec.get("shape") or []
            if None in shape:
                continue  # ragged: the writer takes any length
            keys[key] = (doc.get("name"), _declared_kind(spec),
                         spec.get("dtype") == "array" or bool(shape))
        self.keys[doc.get("uid")] = keys

    def fit(self, name: str, doc: dict) -> tuple[dict, list[str]]:
        """The event (or page) to hand over, and what changed in it that was not seen before.

        Returns
        -------
        doc : dict
            ``doc`` itself when every value fits; otherwise a copy with new ``data``.
        new : list of str
            Descriptions of the kinds of change first made in this document (to log once).
        """
        keys = self.keys.get(doc.get("descriptor"))
        data = doc.get("data")
        if not keys or not isinstance(data, dict):
            return doc, []
        seqs = _seq_nums(name, doc)
        new_data, new = None, []
        for key, (stream, declared, is_array) in keys.items():
            if key not in data:
                continue
            rows = [data[key]] if name == "event" else list(data[key])
            out = [self._fit_one(stream, key, declared, is_array, value, seq, new)
                   for value, seq in zip(rows, seqs, strict=False)]
            if all(a is b for a, b in zip(out, rows, strict=False)):
                continue
            # A value left out is a null, not a missing key: pyarrow takes a batch's columns
            # from its first row, so a batch that starts with an event lacking the key
            # would have no such column (and Tiled would refuse the batch).
            out = [None if v is _LEFT_OUT else v for v in out]
            new_data = new_data if new_data is not None else dict(data)
            new_data[key] = out[0] if name == "event" else out
        if new_data is None:
            return doc, new
        return {**doc, "data": new_data}, new

    def _fit_one(self, stream: str, key: str, declared: str | None, is_array: bool,
                 value: Any, seq: int, new: list[str]) -> Any:
        column = self.columns.get((stream, key))
        if is_array:
            array = np.asarray(value)
            if column is None:
                if array.dtype.hasobject:
                    return value  # nothing to hold it to
                self.columns[(stream, key)] = column = (array.shape, array.dtype)
            shape, dtype = column
            if array.shape == shape:
                return value
            # NaN says "no value"; a dtype without NaN gets zeros (the note says where)
            nan = dtype.kind in "fc"
            self._note(stream, key, f"of shape {array.shape} replaced by "
                       f"{'NaN' if nan else 'zeros'} of the column's shape {shape}", seq, new)
            return np.full(shape, np.nan, dtype=dtype) if nan else np.zeros(shape, dtype)
        if isinstance(value, np.ndarray) and value.ndim == 0:
            value = value[()]  # the same number; pyarrow refuses a 0-d array
        if value is None:
            if (column[0] if column else declared) == "f":
                return math.nan  # a null first batch would make pyarrow type it as text
            return value
        have = _kind_of(value)
        if column is None:
            if have is None:
                return value  # not a scalar pyarrow types by itself: as the writer would
            kind = declared
            if kind is None or _convert(value, kind) is _LEFT_OUT:
                kind = have
            # the first value's own type if it is of the column's kind (np.float32 stays a
            # float32 column), else the Python type of the kind
            self.columns[(stream, key)] = column = \
                (kind, type(value) if _KIND_NAMES[have] == _KIND_NAMES[kind] else None)
        kind, like = column
        if have is not None and _KIND_NAMES[have] == _KIND_NAMES[kind]:
            return value  # of the column's kind: handed over as it came, as before
        out = _convert(value, kind)
        if out is not _LEFT_OUT and like is not None:
            out = like(out)  # the width of the column's first value (pyarrow's schema)
            if _convert(out, kind) != _convert(value, kind):
                out = _LEFT_OUT
        if out is _LEFT_OUT:
            self._note(stream, key, f"of type {type(value).__name__} left out of their events "
                       f"(the column holds {_KIND_NAMES[kind]} values)", seq, new, lossy=True)
        else:
            self._note(stream, key, f"converted from {type(value).__name__} to the column's "
                       f"{_KIND_NAMES[kind]} type", seq, new, lossy=False)
        return out

    def _note(self, stream: str, key: str, what: str, seq: int, new: list[str], *,
              lossy: bool = True) -> None:
        entry = self.changes.setdefault((stream, key, what, lossy), [0, seq])
        if entry[0] == 0:
            new.append(f"stream {stream!r}: values of {key!r} {what} (first at seq_num {seq})")
        entry[0] += 1

    @property
    def lost(self) -> int:
        """Values left out or replaced by a fill (not those converted without loss)."""
        return sum(n for (*_, lossy), (n, _) in self.changes.items() if lossy)

    def notes(self) -> list[str]:
        """One line per kind of change, for the run's ``notes`` metadata in Tiled."""
        return [f"spool: stream {stream!r}: {n} value(s) of {key!r} {what} (first at "
                f"seq_num {seq})"
                for (stream, key, what, _), (n, seq) in self.changes.items()]


def _open_orphan(path: Path) -> _Run | None:
    """A journal no live process holds, with its records indexed; None if it is held."""
    fd = os.open(path, os.O_RDONLY)
    if not _try_lock(fd):
        os.close(fd)
        return None
    run = _Run(uid=path.stem, path=path, lock_fd=fd, unchecked=True)
    try:
        with open(path, "rb") as fh:
            for offset, name, doc in read_headers(path):
                run.offsets.append(offset)
                if name == "stop":
                    run.stop_seen, run.stop_uid = True, doc.get("uid")
                    continue
                if name == "event_page" and not isinstance(doc.get("seq_num"), list):
                    name, doc = read_record_at(fh, offset)  # seq_num journaled as an array
                # seq_nums per stream: to tell whether Tiled already holds the run
                run.count(name, doc)
    except BaseException:
        os.close(fd)
        raise
    return run


def _nothing(key) -> None:
    return None


class _Delivery:
    """Feeding journaled runs through fresh TiledWriters, deleting and replaying on doubt."""

    def __init__(self, template, stats: SpoolStats, max_failures: int = 3) -> None:
        self.template = template
        self.client = template.client
        self.stats = stats
        self.max_failures = max_failures

    def new_writer(self):
        """A TiledWriter like the template, with no run state (its own RunRouter)."""
        from event_model import RunRouter

        writer = copy.copy(self.template)
        if hasattr(writer, "_run_router"):
            writer._run_router = RunRouter([writer._factory])
        return writer

    def document(self, run: _Run, index: int, take: Callable) -> tuple[str, dict]:
        """Document ``index`` of the run: buffered, synthesized, or read from its journal.

        Raises
        ------
        JournalError
            The journal cannot be read there (a local fault, not an outage).
        """
        if index >= len(run.offsets):
            return run.tail[index - len(run.offsets)]
        cached = take((run.uid, index))
        if cached is not None:
            return cached
        if run.closed:  # the writer was closed during a call to Tiled: not reopened (a leak)
            raise JournalError(f"journal {run.path}: closed")
        try:
            if run.reader is None:
                run.reader = open(run.path, "rb")  # noqa: SIM115 (kept open across calls)
            return read_record_at(run.reader, run.offsets[index])
        except (OSError, ValueError, EOFError) as exc:
            raise JournalError(f"journal {run.path}: document {index}: {exc}") from exc

    def reset(self, run: _Run) -> None:
        """Delete the run's container in Tiled (if any) and start a fresh writer at 0."""
        try:
            self.client.delete_contents([run.uid], recursive=True, external_only=False)
        except Exception as exc:  # 404: it never got there (or a replay already removed it)
            response = getattr(exc, "response", None)
            if getattr(response, "status_code", None) != 404:
                raise
        run.writer, run.cursor, run.dirty = self.new_writer(), 0, False
        run.seqs.clear()
        run.rejected = 0
        run.columns = _Columns()  # a fresh writer types its columns anew
        self.stats.replays += 1

    def deliver(self, run: _Run, upto: int, take: Callable = _nothing,
                busy: list | None = None) -> None:
        """Hand documents ``run.cursor .. upto`` to the run's writer.

        A document the writer refuses for a reason other than an outage is left out (logged
        the first time, counted as ``rejected``) and the next one goes, as the RunEngine does
        with a subscriber; :meth:`verify` then expects only what the writer accepted.

        Raises
        ------
        Exception
            A transient error (Tiled unreachable), or the writer refusing the start or the
            stop document (the run cannot be whole): the run must be replayed.
        JournalError
            A document cannot be read from the journal.
        """
        if run.dirty:
            self.reset(run)
        if run.writer is None:
            run.writer = self.new_writer()
        busy = busy if busy is not None else [None]
        while run.cursor < upto:
            name, doc = self.document(run, run.cursor, take)
            if name == "descriptor":  # (also when refused: its events are then left out)
                run.streams[doc["uid"]] = doc["name"]
                run.columns.descriptor(doc)
            elif name in ("event", "event_page"):
                doc = self._fit(run, name, doc)
            busy[0] = time.monotonic()
            try:
                run.writer(name, doc)
                if name == "stop" and run.columns.changes:
                    self._add_notes(run)
            except Exception as exc:
                if _transient(exc) or name in ("start", "stop"):
                    raise
                self._reject(run, name, exc)
                run.cursor += 1
                run.attempted = max(run.attempted, run.cursor)
                continue
            finally:
                busy[0] = None
            run.count(name, doc)
            if run.cursor < run.attempted:
                self.stats.redelivered += 1
            else:
                self.stats.delivered += 1
            run.cursor += 1
            run.attempted = max(run.attempted, run.cursor)

    def _fit(self, run: _Run, name: str, doc: dict) -> dict:
        """The event (page) with its values made to fit their columns; news logged once."""
        lost = run.columns.lost
        doc, new = run.columns.fit(name, doc)
        if run.cursor >= run.attempted:  # the first pass only: a replay does the same again
            self.stats.values_dropped += run.columns.lost - lost
            for line in new:
                logger.warning("run %s: %s; the rest of the run goes on (listed in its notes "
                               "in Tiled)", run.uid, line)
        return doc

    def _add_notes(self, run: _Run) -> None:
        """List what :class:`_Columns` changed in the run's ``notes`` metadata in Tiled,
        after the writer's own (it writes them with the stop document)."""
        node = self.client[run.uid]
        notes = list(node.metadata.get("notes") or []) + run.columns.notes()
        node.update_metadata(metadata={"notes": notes}, drop_revision=True)

    def _reject(self, run: _Run, name: str, exc: Exception) -> None:
        run.rejected += 1
        if run.cursor >= run.attempted:  # the first time only: a replay refuses it again
            self.stats.rejected += 1
            logger.error("run %s: its %r document #%d was refused by the writer (%s: %s); "
                         "it is left out of Tiled, the rest of the run goes on", run.uid, name,
                         run.cursor, type(exc).__name__, exc, exc_info=exc)

    def verify(self, run: _Run, at_least: bool = False) -> str | None:
        """Why the run in Tiled is not exactly what was handed over, or None when it is.

        Parameters
        ----------
        run : _Run
            Its ``seqs`` are the seq_nums expected per stream.
        at_least : bool
            Accept a Tiled copy holding more than that, with any stop document: for a journal
            that lost its last records (and its stop) while Tiled got all of them.
        """
        try:
            node = self.client[run.uid]
        except KeyError:
            return "not in Tiled"
        stop = (node.metadata.get("stop") or {}).get("uid")
        if stop is None or (run.stop_seen and stop != run.stop_uid):
            return "no stop document"
        for stream, want in run.seqs.items():
            n = sum(want.values())
            if stream is None or n == 0:
                continue
            try:  # a writer that never flushed a stream's rows leaves no table
                base = node[stream].base
                seq = base["internal"].read(["seq_num"])["seq_num"]
            except KeyError:
                return f"stream {stream!r}: no rows in Tiled for {n} events"
            # Compared as multisets: a RunEngine rewind repeats seq_nums, a batch written
            # twice repeats them too (and then counts differ from the journal's).
            got = Counter(int(s) for s in seq.tolist())
            if at_least and want - got:
                return f"stream {stream!r}: {sum((want - got).values())} of {n} events missing"
            if not at_least and got != want:
                return (f"stream {stream!r}: {len(seq)} rows for {n} events"
                        + (" (other seq_nums)" if len(seq) == n else ""))
            for key in base:
                if key == "internal":
                    continue
                item = base[key]
                sources = item.data_sources() or []
                if sources and sources[0].management != "writable":
                    continue  # external (detector files): shape set by StreamDatums
                shape = getattr(item, "shape", None)
                if shape and (shape[0] < n if at_least else shape[0] != n):
                    return f"stream {stream!r}: {key!r} has {shape[0]} entries for {n} events"
        return None

    def finish(self, run: _Run) -> bool:
        """Verify a fully handed-over run; True (journal removed) or mark it for a replay."""
        why = self.verify(run)
        if why is not None:
            logger.warning("run %s in Tiled is not complete (%s): replaying it from %s",
                           run.uid, why, run.path)
            run.dirty = True
            run.failures += 1
            return False
        self._remove(run)
        logger.info("run %s delivered to Tiled and verified", run.uid)
        return True

    def _remove(self, run: _Run) -> None:
        run.close()
        with contextlib.suppress(FileNotFoundError):
            run.path.unlink()
        self.stats.runs_done += 1

    def settle(self, run: _Run) -> bool:
        """Compare a journal left by an ended process with Tiled before replaying anything.

        Returns
        -------
        bool
            True when Tiled already holds all of it (the journal is removed, Tiled is left
            alone: a machine crash may have cut the journal's unsynced tail, stop included,
            after Tiled, on another host, got the whole run). False when the run must be
            deleted and replayed; it is then marked so, and a journal without a stop gets a
            synthesized one, without which the writer never writes its last batch of rows.

        Raises
        ------
        Exception
            Tiled did not answer (the check is made again later).
        """
        why = self.verify(run, at_least=not run.stop_seen)
        if why is None:
            self._remove(run)
            logger.info("run %s: Tiled already holds all of %s; the journal is removed",
                        run.uid, run.path)
            run.unchecked = False
            return True
        if not run.stop_seen:
            stop = {"run_start": run.uid, "time": time.time(), "uid": str(uuid.uuid4()),
                    "exit_status": "abort",
                    "reason": "writer process ended; delivered from spool",
                    "num_events": {s: sum(c.values()) for s, c in run.seqs.items()
                                   if s is not None}}
            run.tail.append(("stop", stop))
            run.stop_seen, run.stop_uid = True, stop["uid"]
        logger.info("spool: replaying run %s from %s (%s in Tiled)", run.uid, run.path, why)
        run.unchecked, run.dirty, run.cursor = False, True, 0
        return False

    def ready(self, run: _Run) -> bool:
        """Whether every document of a finished run has been handed over."""
        finished = run.stop_seen or run.journal is None
        return finished and not run.dirty and run.writer is not None \
            and run.cursor == run.written


def tiled_answers(client, timeout: float = 2.0) -> bool:
    """Whether the Tiled server of ``client`` answers ``/healthz`` (no retries, no auth)."""
    import httpx

    api = str(client.context.api_uri)
    root = api.split("/api/v1", 1)[0]
    try:
        with httpx.Client(trust_env=False, timeout=timeout) as http:
            return http.get(f"{root}/healthz").status_code == 200
    except httpx.HTTPError:
        return False


class SpooledWriter:
    """Wrap a ``TiledWriter`` so that a slow or dead Tiled never blocks or aborts the scan.

    Documents are journaled to ``spool_dir/label`` (created 0700) and delivered in order by a
    background thread. After an outage each affected run is deleted in Tiled and replayed from
    its journal, and every run is verified in Tiled before its journal is removed: none lost,
    none duplicated, even when a request reached Tiled but its reply did not.

    Parameters
    ----------
    writer : bluesky_tiled_plugins.TiledWriter
        The writer to deliver through (its client, batch size, normalizer are used); a fresh
        copy of it is made for every run.
    spool_dir : path, optional
        Default :func:`default_spool_dir`.
    label : str
        Sub-directory of this writer's journals (``"raw"``, ``"derived"``): journals left by
        an earlier process under the same label are delivered by this one.
    memory_docs, memory_bytes : int
        Bound of the in-memory buffer in front of the delivery thread; beyond it documents
        are read back from the journal.
    probe_interval_s : float
        How often an unreachable Tiled is probed.
    sync_interval_s : float
        Journals are made durable (fsync, in the delivery thread) at least this often while
        documents arrive, and at every stop document: a machine that loses power loses at most
        the last second of an outage's documents.
    min_free_bytes : int
        Documents are not journaled (they are dropped and counted, ``disk_low``) while the
        spool's file system has less free space than this, so that a long outage can never
        fill the disk the detector writes its frames to (default 1 GiB).

    Examples
    --------
    >>> raw = SpooledWriter(TiledWriter(tiled, batch_size=50), label="raw")  # doctest: +SKIP
    >>> RE.subscribe(raw)                                                  # doctest: +SKIP
    """

    def __init__(self, writer, *, spool_dir: str | Path | None = None, label: str = "raw",
                 memory_docs: int = 512, memory_bytes: int = 64 << 20,
                 probe_interval_s: float = 1.0, sync_interval_s: float = 1.0,
                 min_free_bytes: int = 1 << 30) -> None:
        self.directory = _private_dir(Path(spool_dir or default_spool_dir()).resolve())
        self.directory = _private_dir(self.directory / label)
        self.label = label
        self.stats = SpoolStats()
        self._delivery = _Delivery(writer, self.stats)
        self._memory: dict[tuple[str, int], tuple[str, dict, int]] = {}
        self._memory_bytes = 0
        self._limits = (memory_docs, memory_bytes)
        self._probe_interval = probe_interval_s
        if not sync_interval_s > 0:
            raise ValueError(f"sync_interval_s: > 0 seconds, got {sync_interval_s!r}")
        self._sync_interval = float(sync_interval_s)
        self._synced_at = time.monotonic()
        self._min_free = int(min_free_bytes)
        self._disk_checked_at = -math.inf
        self._disk_low = False
        self._runs: dict[str, _Run] = {}
        self._route_map: dict[str, str] = {}  # descriptor / resource uid -> run uid
        self._open: list[str] = []  # runs without a stop document, newest last
        # runs delivered lately: a redelivered start of one must not open it again (its
        # writer's start would conflict in Tiled, and the replay delete the complete run)
        self._done: OrderedDict[str, None] = OrderedDict()
        self._cond = threading.Condition(threading.RLock())
        self._down = False
        self._busy: list = [None]  # monotonic time a writer call started, None when idle
        self._closing = False
        for path in sorted(self.directory.glob("*.journal")):
            self._adopt(path)
        self._thread = threading.Thread(target=self._loop, name=f"spool-{label}", daemon=True)
        self._thread.start()

    # -- the caller's side (RunEngine / LiveReconstruction): journal and return ----------
    def __call__(self, name: str, doc: dict) -> None:
        try:
            self._receive(name, doc)
        except Exception:  # a subscriber must never raise into the RunEngine
            self.stats.dropped += 1
            logger.exception("spool %s: could not journal a %r document", self.label, name)

    def _receive(self, name: str, doc: dict) -> None:
        with self._cond:
            self.stats.received += 1
            run, why = self._route(name, doc)
            if why == _DUPLICATE:
                self.stats.duplicates += 1
                return
            if run is None:
                self.stats.dropped += 1
                logger.error("spool %s: a %r document was dropped: %s", self.label, name, why)
                return
            # A start or stop is always journaled (a few hundred bytes): runs stay whole
            # units, and the documents of the next run are never routed into this one.
            if name not in ("start", "stop") and self._disk_is_low():
                self.stats.dropped += 1
                self.stats.disk_low += 1
                run.lost += 1
                return
            record = encode_document(name, doc)
            try:
                run.offsets.append(run.journal.append(record))
            except BaseException:
                if name == "start":  # the run is not opened: its documents are dropped
                    run.close()
                    with contextlib.suppress(OSError):
                        run.path.unlink()
                raise
            if name == "start":  # opened only once its start is in the journal
                run.start_record = record
                self._runs[run.uid] = run
                self._open.append(run.uid)
            key = _doc_key(name, doc)
            if key is not None:
                run.seen.add(key)
            if name == "stop":
                run.stop_seen, run.stop_uid = True, doc.get("uid")
                run.journal.sync()
                run.synced = run.journal.size
                if run.lost:
                    logger.error("spool %s: run %s is incomplete: %d of its documents were not "
                                 "journaled while the disk was nearly full", self.label,
                                 run.uid, run.lost)
            busy = self._busy[0]
            if self._down or (busy is not None and time.monotonic() - busy > _STALLED_S):
                self.stats.spooled += 1
            docs, nbytes = self._limits
            if len(self._memory) < docs and self._memory_bytes + len(record) <= nbytes:
                self._memory[(run.uid, run.written - 1)] = (name, doc, len(record))
                self._memory_bytes += len(record)
            backlog = sum(r.written - r.cursor for r in self._runs.values())
            self.stats.max_backlog = max(self.stats.max_backlog, backlog)
            self._cond.notify_all()

    def _disk_is_low(self) -> bool:
        """Whether the spool's file system has less than ``min_free_bytes`` free (checked at
        most once a second: cheap, but not free on every event)."""
        now = time.monotonic()
        if now - self._disk_checked_at >= 1.0:
            self._disk_checked_at = now
            try:
                low = shutil.disk_usage(self.directory).free < self._min_free
            except OSError:
                low = False
            if low and not self._disk_low:
                logger.error("spool %s: less than %.1f GiB free on %s: documents are dropped "
                             "(counted as disk_low), not journaled, until space is freed",
                             self.label, self._min_free / 2**30, self.directory)
            elif self._disk_low and not low:
                logger.warning("spool %s: disk space is back; journaling again", self.label)
            self._disk_low = low
        return self._disk_low

    def _sync_journals(self) -> None:
        """fsync the journals written since their last sync (in the delivery thread)."""
        now = time.monotonic()
        if now - self._synced_at < self._sync_interval:
            return
        self._synced_at = now
        with self._cond:
            todo = [(r, r.journal, r.journal.size) for r in self._runs.values()
                    if r.journal is not None and r.journal.size > r.synced]
        for run, journal, size in todo:
            try:
                journal.sync()
            except (OSError, ValueError):  # closed meanwhile (delivered, or closing)
                continue
            run.synced = max(run.synced, size)

    def _route(self, name: str, doc: dict) -> tuple[_Run | None, str | None]:
        """The run of a document, or None and why it is not journaled (``_DUPLICATE``, or a
        reason that is logged as an error)."""
        if name == "start":
            return self._route_start(doc)
        if name in _BY_RUN_START:
            uid = doc.get("run_start")
            if uid is None and name in ("resource", "stream_resource") and self._open:
                uid = self._open[-1]  # a (Stream)Resource may lack run_start: the newest run
        elif name in _BY_DESCRIPTOR:
            uid = self._route_map.get(doc.get("descriptor"))
        elif name in _BY_RESOURCE:
            uid = self._route_map.get(doc.get("resource"))
        else:
            uid = None
        # Never a guess for the rest: an event of an unknown descriptor put into the newest
        # run would be refused by its writer, and a late document of a stopped run would
        # land in another, healthy run.
        run = self._runs.get(uid) if uid is not None else None
        if run is None:
            return None, "no open run for it (unknown run_start, descriptor or resource)"
        key = _doc_key(name, doc)
        if key is not None and key in run.seen:
            logger.info("spool %s: run %s already has %r %s: the duplicate is dropped",
                        self.label, run.uid, name, key[1])
            return None, _DUPLICATE
        if run.journal is None:
            return None, f"run {run.uid} was written by an ended process"
        if run.stop_seen:
            return None, f"it came after the stop document of run {run.uid}"
        if name in ("descriptor", "resource", "stream_resource"):
            self._route_map[doc["uid"]] = run.uid
        if name == "stop":
            with contextlib.suppress(ValueError):
                self._open.remove(run.uid)
            self._route_map = {k: v for k, v in self._route_map.items() if v != run.uid}
        return run, None

    def _route_start(self, doc: dict) -> tuple[_Run | None, str | None]:
        """A new run for a start document, unless its run is known (a redelivered start: a
        second run over the same journal would lose the documents journaled before it)."""
        uid = doc["uid"]
        path = self.directory / f"{uid}.journal"
        run = self._runs.get(uid)
        if run is not None and run.journal is not None:
            if encode_document("start", doc) == run.start_record:
                logger.info("spool %s: run %s: the start document came again; the duplicate "
                            "is dropped", self.label, uid)
                return None, _DUPLICATE
            return None, f"a different start document with the uid of open run {uid}"
        if uid in self._done:
            logger.warning("spool %s: run %s, already delivered, started again: the start "
                           "document is dropped", self.label, uid)
            return None, _DUPLICATE
        if run is not None or path.exists():
            return None, f"run {uid} already has a journal, {path}, of an ended process"
        run = _Run(uid=uid, path=path, journal=JournalWriter(path))
        _try_lock(run.journal.fileno())  # ours: a flush elsewhere leaves it alone
        return run, None

    def _adopt(self, path: Path) -> None:
        try:
            run = _open_orphan(path)
        except Exception:  # one unreadable journal must not stop the writer
            logger.exception("spool %s: cannot read %s; it is left there", self.label, path)
            return
        if run is not None:
            # What reached Tiled before the process ended is unknown: the delivery thread
            # compares it with Tiled first (settle), then replays it if needed.
            run.dirty = True
            logger.info("spool %s: delivering %d documents left in %s", self.label,
                        run.written, path)
            self._runs[run.uid] = run

    # -- the delivery thread ----------------------------------------------------------
    def _pending(self) -> list[_Run]:
        return [r for r in self._runs.values()
                if r.failures < self._delivery.max_failures
                and (r.dirty or r.cursor < r.written or self._delivery.ready(r))]

    def _loop(self) -> None:
        while True:
            self._sync_journals()
            with self._cond:
                if not self._closing and not self._pending():
                    self._cond.wait(timeout=self._sync_interval)
                if self._closing:
                    return
                if not self._pending():
                    continue  # (back to the top: sync what was written, then wait again)
                work = [(run, run.written) for run in self._pending()]
            if self._down:
                if not tiled_answers(self._delivery.client):
                    self._pause(self._probe_interval)
                    continue
                logger.warning("spool %s: Tiled answers again, delivering the backlog",
                               self.label)
                self._down = False
            for run, upto in work:
                if self._closing:
                    return
                self._sync_journals()  # also while a long backlog is being delivered
                ok = self._step(run, upto)
                with self._cond:
                    self._cond.notify_all()  # flush() waits on progress
                if not ok:
                    break

    def _pause(self, seconds: float) -> None:
        """Sleep between probes of an unreachable Tiled, but not past close(): it waits for
        this thread only about a second beyond its timeout."""
        deadline = time.monotonic() + seconds
        with self._cond:
            while not self._closing and (left := deadline - time.monotonic()) > 0:
                self._cond.wait(timeout=left)  # (woken by every document too: wait on)

    def _step(self, run: _Run, upto: int) -> bool:
        """Advance one run; False when Tiled failed (the loop then probes before going on)."""
        try:
            if run.unchecked:  # a journal of an ended process: maybe Tiled has it all
                if self._delivery.settle(run):
                    self._delivered(run)
                    return True
                upto = run.written  # with its synthesized stop
            self._delivery.deliver(run, upto, self._take, self._busy)
            if self._delivery.ready(run) and self._delivery.finish(run):
                self._delivered(run)
            return True
        except JournalError as exc:  # local: not an outage, and the same on every try
            run.dirty = True
            run.failures += 1
            logger.error("spool %s: run %s cannot be delivered (%d of %d tries): %s",
                         self.label, run.uid, run.failures, self._delivery.max_failures, exc)
            return True
        except Exception as exc:
            run.dirty = True
            if not _transient(exc) or self._refused_by_healthy_server(exc):
                run.failures += 1
                logger.exception("spool %s: run %s failed in Tiled (%d of %d tries)",
                                 self.label, run.uid, run.failures,
                                 self._delivery.max_failures)
                return True
            if not self._down:
                self.stats.outages += 1
                logger.warning("spool %s: Tiled unreachable (%s); documents are spooled in "
                               "%s until it answers", self.label, exc, self.directory)
            self._down = True
            return False

    def _refused_by_healthy_server(self, exc: BaseException) -> bool:
        """A 500 from a server whose ``/healthz`` answers: this run, not an outage.

        A deterministic server error (a document the server cannot store) would otherwise be
        retried as an outage for ever: the run never counted as failed and ``flush`` never
        done. 502-504 and 429 stay outages (a proxy, an overloaded or restarting server).
        """
        import httpx

        if not (isinstance(exc, httpx.HTTPStatusError)
                and exc.response.status_code in (500, 501, 505)):
            return False
        return tiled_answers(self._delivery.client)

    def _delivered(self, run: _Run) -> None:
        with self._cond:
            self._runs.pop(run.uid, None)
            self._done[run.uid] = None
            while len(self._done) > _DONE_REMEMBERED:
                self._done.popitem(last=False)

    def _take(self, key: tuple[str, int]) -> tuple[str, dict] | None:
        """The buffered copy of a document (then released), or None: read the journal."""
        with self._cond:
            item = self._memory.pop(key, None)
            if item is None:
                return None
            self._memory_bytes -= item[2]
            return item[0], item[1]

    # -- control ---------------------------------------------------------------------------
    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every journaled run is delivered and verified (or ``timeout`` s).

        Returns
        -------
        bool
            True when nothing is left to deliver; False on the timeout, or when a run could
            not be delivered (``status()["runs"]`` says which; its journal stays).
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while self._runs_left():
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._cond.wait(timeout=0.1 if left is None else min(left, 0.1))
            return not any(r.failures >= self._delivery.max_failures
                           for r in self._runs.values())

    def _runs_left(self) -> list[_Run]:
        # A run still open (no stop yet) counts only for the documents it has.
        return [r for r in self._runs.values()
                if r.failures < self._delivery.max_failures
                and (r.stop_seen or r.journal is None or r.cursor < r.written or r.dirty)]

    def status(self) -> dict:
        """Counters (:class:`SpoolStats`) and the runs not yet delivered."""
        with self._cond:
            runs = [{"uid": r.uid, "documents": r.written, "delivered": r.cursor,
                     "stopped": r.stop_seen, "failed": r.failures >= self._delivery.max_failures,
                     "lost_disk_low": r.lost}
                    for r in self._runs.values()]
        return {"label": self.label, "directory": str(self.directory),
                "tiled_reachable": not self._down, **self.stats.as_dict(), "runs": runs}

    def close(self, timeout: float = 30.0) -> bool:
        """Deliver what is left (up to ``timeout`` s), then stop; undelivered journals stay
        for ``bluesky-ptychopinn spool flush`` or the next writer of this label.

        Returns within ``timeout`` plus about a second, the journals closed (and their
        locks released), also while the delivery thread is stuck in a call to a Tiled
        server that does not answer.

        Returns
        -------
        bool
            True when everything was delivered.
        """
        deadline = time.monotonic() + max(timeout, 0.0)
        done = self.flush(timeout) if timeout > 0 else not self._runs_left()
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        # An idle thread wakes at once; one inside a writer call (a server that does not
        # answer, a client retrying) is not waited for: it stops when the call returns, and
        # reads no journal after this (_Run.closed).
        self._thread.join(timeout=max(deadline - time.monotonic(), _EXIT_GRACE_S))
        if self._thread.is_alive():
            logger.warning("spool %s: delivery is still in a call to Tiled; closing without "
                           "it (the journals stay for a later flush)", self.label)
        # Under the lock _receive appends under: a journal closed while a document is
        # appended to it is an EBADF, or a write into the file that reused its descriptor.
        with self._cond:
            for run in list(self._runs.values()):
                run.close()
        return done


# -- the CLI's side: journals left behind ------------------------------------------------
def spool_status(spool_dir: str | Path | None = None) -> list[dict]:
    """The journals waiting in ``spool_dir``: one dict per run.

    Returns
    -------
    list of dict
        ``label``, ``uid``, ``documents``, ``bytes``, ``stopped`` (its stop document is in),
        ``in_use`` (a running writer holds it), ``path``.
    """
    root = Path(spool_dir or default_spool_dir())
    out = []
    for path in sorted(root.glob("*/*.journal")):
        fd = os.open(path, os.O_RDONLY)
        try:
            in_use = not _try_lock(fd)
        finally:
            os.close(fd)
        names = [name for _, name, _ in read_headers(path)]
        out.append({"label": path.parent.name, "uid": path.stem, "documents": len(names),
                    "bytes": path.stat().st_size, "stopped": "stop" in names,
                    "in_use": in_use, "path": str(path)})
    return out


def flush_spool(writer, spool_dir: str | Path | None = None, *,
                label: str | None = None) -> dict:
    """Deliver, in this thread, every journal no running writer holds, through ``writer``.

    A journal whose run Tiled already holds in full is only removed (Tiled may hold more
    than a journal that lost its unsynced tail). Any other run is deleted in Tiled, replayed
    from its journal (finished with a synthesized ``"abort"`` stop document if the journal
    has none) and verified; a delivered journal is removed.

    Parameters
    ----------
    writer : bluesky_tiled_plugins.TiledWriter
        Template of the writer (client, batch size).
    spool_dir : path, optional
        Default :func:`default_spool_dir`.
    label : str, optional
        Only this sub-directory (default: all).

    Returns
    -------
    dict
        :class:`SpoolStats` counters plus ``busy`` (journals held by a running writer) and
        ``failed`` (uid: reason) for runs that could not be delivered.
    """
    root = Path(spool_dir or default_spool_dir())
    stats = SpoolStats()
    delivery = _Delivery(writer, stats)
    busy, failed = 0, {}
    for path in sorted(root.glob(f"{label or '*'}/*.journal")):
        try:
            run = _open_orphan(path)
        except Exception as exc:
            failed[path.stem] = f"{type(exc).__name__}: {exc}"
            logger.exception("spool flush: cannot read %s", path)
            continue
        if run is None:
            busy += 1
            continue
        try:
            # Already complete in Tiled (a crash after the last write)? Then only the journal
            # goes. Otherwise delete what is there and write it once.
            if delivery.settle(run):
                continue
            why = "not complete in Tiled after replays"
            while run.failures < delivery.max_failures:
                try:
                    delivery.deliver(run, run.written)
                except Exception as exc:
                    if _transient(exc):
                        raise
                    # refused start or stop, unreadable journal: counted like a failed check
                    run.dirty = True
                    run.failures += 1
                    why = f"{type(exc).__name__}: {exc}"
                    logger.error("spool flush: run %s failed (%d of %d tries): %s", run.uid,
                                 run.failures, delivery.max_failures, why)
                    continue
                if delivery.finish(run):
                    break
            else:
                failed[run.uid] = why
        except Exception as exc:
            failed[run.uid] = f"{type(exc).__name__}: {exc}"
            logger.exception("spool flush: run %s", run.uid)
        finally:
            run.close()
    return {**stats.as_dict(), "busy": busy, "failed": failed}
