"""Pairing frames with positions from a raw run's documents.

Frames come inline in events or by reference (StreamResource/StreamDatum, or legacy
Resource/Datum) to an HDF5 file the detector is still writing; positions come in events. Either
can arrive first, so both are buffered by sequence number until they meet. What cannot be
paired (a non-finite position, a file outside the data roots, an unsupported resource, frames
the file never received) is counted by cause in :attr:`FramePairer.problems`.
"""

from __future__ import annotations

import collections
import logging
import math
import queue
import stat
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from ._paths import DataRoots, PathRefused

__all__ = ["FramePairer", "ReadTimeout"]

logger = logging.getLogger(__name__)

#: Seconds a detector file may take to open or read before the run gives it up.
READ_TIMEOUT_S = 30.0


class ReadTimeout(OSError):
    """A detector file did not answer in time (a FIFO, a hung network mount)."""


class _Read:
    """One read handed to a :class:`_TimedReader`: done once ``done`` is set. ``started`` is
    when the reader thread began it (None while it waits behind earlier reads): only a read
    in progress can time out, so a long queue of quick reads never does."""

    __slots__ = ("call", "done", "error", "ref", "started", "submitted", "value")

    def __init__(self, call, ref=None) -> None:
        self.call, self.ref, self.done = call, ref, threading.Event()
        self.value = self.error = self.started = None
        self.submitted = time.monotonic()

    def age(self, now: float) -> float:
        return now - self.submitted

    def running_for(self, now: float) -> float:
        """Seconds since the reader began this read (0 while it waits its turn)."""
        return 0.0 if self.started is None else now - self.started


class _TimedReader:
    """One daemon thread that runs a source's reads in order, so that the caller never blocks
    on them: :meth:`submit` returns at once and the caller collects what is done. A read that
    never returns (a hung network mount) is abandoned with its thread: a read stuck in the
    kernel cannot be interrupted, but it holds neither the run's loop nor the other runs. One
    thread per source, not per read: reads are on the per-frame path."""

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self.stopped = False
        threading.Thread(target=self._run, daemon=True, name="ptychopinn-read").start()

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            job.started = time.monotonic()
            try:
                job.value = job.call()
            except BaseException as exc:  # handed to the caller
                job.error = exc
            job.done.set()

    def stop(self) -> None:
        """End the thread once the reads queued before are done (a stuck one never ends)."""
        self.stopped = True
        self._jobs.put(None)

    def submit(self, call, ref=None) -> _Read:
        job = _Read(call, ref)
        if self.stopped:
            job.error = ReadTimeout("the source is closed")
            job.done.set()
        else:
            self._jobs.put(job)
        return job


@dataclass
class _HDF5Source:
    path: Path
    dataset: str
    handle: h5py.File | None = None
    reader: _TimedReader = field(default_factory=_TimedReader)

    def _open(self) -> h5py.File:
        mode = self.path.stat().st_mode
        if not stat.S_ISREG(mode):  # a FIFO or a device would block the open forever
            raise PathRefused(f"{str(self.path)!r} is not a regular file")
        # SWMR read: the detector keeps appending while we read.
        return h5py.File(self.path, "r", swmr=True, libver="latest")

    def submit(self, start: int, stop: int, ref=None) -> _Read:
        """Queue the read of frames ``[start, stop)``; the caller collects it when done."""
        return self.reader.submit(lambda: self._read(start, stop), ref)

    def _read(self, start: int, stop: int) -> np.ndarray:
        if self.handle is None:
            self.handle = self._open()
        dset = self.handle[self.dataset]
        dset.refresh()
        if dset.shape[0] < stop:
            raise IndexError(f"{self.path}: frames [{start}, {stop}) not written yet "
                             f"({dset.shape[0]} available)")
        return np.asarray(dset[start:stop])

    def close(self, wait_s: float = 1.0) -> None:
        """Close the file in the reader's thread, after the reads queued before it (never
        under a read in progress); wait for that at most ``wait_s`` (a stuck source's close
        waits behind its stuck read, and must not block the caller)."""
        closing = self.reader.submit(self._close_handle)
        self.reader.stop()
        closing.done.wait(wait_s)

    def _close_handle(self) -> None:
        if self.handle is not None:
            self.handle.close()
            self.handle = None


#: Frames one StreamDatum may reference at most: more is a malformed document (a detector
#: writes a chunk of frames per document, thousands at most).
MAX_FRAMES_PER_DATUM = 1_000_000


def _datum_range(doc: dict, key: str) -> dict[str, int]:
    """``doc[key]`` as ``{"start": int, "stop": int}``, checked: 0 <= start <= stop and at
    most :data:`MAX_FRAMES_PER_DATUM` long (``ValueError`` otherwise)."""
    value = doc[key]
    start, stop = value["start"], value["stop"]
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (start, stop)):
        raise TypeError(f"{key}: integer start and stop expected, got {value!r}")
    if not 0 <= start <= stop or stop - start > MAX_FRAMES_PER_DATUM:
        raise ValueError(f"{key}: 0 <= start <= stop, at most {MAX_FRAMES_PER_DATUM} frames "
                         f"expected, got {value!r}")
    return {"start": start, "stop": stop}


def event_seq_num(doc: dict) -> int | None:
    """An event's sequence number, or None when it has none that is an integer."""
    try:
        value = doc["seq_num"]
        return int(value) if not isinstance(value, bool) and int(value) == value else None
    except (KeyError, TypeError, ValueError, OverflowError):
        return None


@dataclass
class FramePairer:
    """Collects (seq_num -> frame) and (seq_num -> position) and releases complete pairs.

    Parameters
    ----------
    image_key : str
        The detector's image field.
    y_key, x_key : str
        Positioner fields (stage readbacks).
    data_roots : DataRoots
        Where detector files may be read from.
    read_timeout_s : float
        Seconds a detector file may leave a read unanswered before its frames are given up
        (``file_unreadable``).
    slow_after_s : float
        A read is waited for this long at most; after that its source is only polled, so a
        hung file never holds the loop that serves the other runs.
    """

    image_key: str
    y_key: str
    x_key: str
    data_roots: DataRoots = field(default_factory=DataRoots)
    read_timeout_s: float = READ_TIMEOUT_S
    slow_after_s: float = 1.0
    frames: dict[int, np.ndarray] = field(default_factory=dict)
    positions: dict[int, tuple[float, float]] = field(default_factory=dict)
    #: seq_num -> (source uid, first frame, stop frame) in the source's dataset
    pending_refs: dict[int, tuple[str, int, int]] = field(default_factory=dict)
    sources: dict[str, _HDF5Source] = field(default_factory=dict)
    #: seq_num -> its frame's read, asked for and not yet collected
    reads: dict[int, _Read] = field(default_factory=dict)
    #: sources with a read unanswered for over ``slow_after_s``: polled, not waited on
    slow_sources: set[str] = field(default_factory=set)
    #: the run's stop has come: frames not in their file now never will be
    stopping: bool = False
    #: legacy datum id -> (resource uid, first frame, stop frame)
    datum_map: dict[str, tuple[str, int, int]] = field(default_factory=dict)
    #: legacy datum ids seen in an event before their Datum -> seq_num
    unresolved: dict[str, int] = field(default_factory=dict)
    frames_per_point: dict[str, int] = field(default_factory=dict)
    descriptors: set[str] = field(default_factory=set)
    #: sequence numbers already handed out by pop_ready, and repeats of them dropped
    done: set[int] = field(default_factory=set)
    repeated: int = 0
    #: frames that will never be paired, by cause
    problems: collections.Counter = field(default_factory=collections.Counter)
    #: sequence numbers given up (their partner is dropped when it arrives)
    skipped: set[int] = field(default_factory=set)
    events_seen: int = 0  # rows in the descriptors that carry image and positions
    #: rows in other descriptors of the run, and their data keys (to explain a wrong key)
    other_rows: int = 0
    other_keys: set[str] = field(default_factory=set)
    refused: dict[str, str] = field(default_factory=dict)  # resource uid -> why not read
    unsupported_datums: set[str] = field(default_factory=set)

    def descriptor(self, doc: dict) -> bool:
        """Track descriptors that carry both the image and the positions."""
        keys = doc["data_keys"]
        if self.image_key in keys and self.y_key in keys and self.x_key in keys:
            self.descriptors.add(doc["uid"])
            return True
        self.other_keys.update(keys)
        return False

    def _refuse(self, uid: str, exc: Exception) -> None:
        self.refused[uid] = str(exc)
        logger.error("detector file not read: %s", exc)

    def stream_resource(self, doc: dict) -> None:
        if doc.get("data_key") != self.image_key:
            return
        if doc.get("mimetype") not in ("application/x-hdf5",):
            self._refuse(doc["uid"], ValueError(
                f"unsupported detector file type {doc.get('mimetype')!r}"))
            return
        try:
            path = self.data_roots.resolve(doc["uri"])
        except PathRefused as exc:
            self._refuse(doc["uid"], exc)
            return
        self.sources[doc["uid"]] = _HDF5Source(path, doc["parameters"]["dataset"])

    def stream_datum(self, doc: dict) -> None:
        source = doc["stream_resource"]
        try:
            seq, idx = _datum_range(doc, "seq_nums"), _datum_range(doc, "indices")
        except (KeyError, TypeError, ValueError) as exc:
            # Not a range of frames this run can have: nothing is built from it (a declared
            # stop of 2**31 would make millions of entries here), and it is counted.
            self.problems["malformed_stream_datum"] += 1
            logger.error("stream datum %s refused: %s", doc.get("uid"), exc)
            return
        count = seq["stop"] - seq["start"]
        if idx["stop"] - idx["start"] != count:
            self.problems["malformed_stream_datum"] += 1
            logger.error("stream datum %s refused: %d sequence numbers for %d frames",
                         doc.get("uid"), count, idx["stop"] - idx["start"])
            return
        if source in self.refused:
            self.problems["file_refused"] += count
            self.skipped.update(range(seq["start"], seq["stop"]))
            return
        if source not in self.sources:
            return
        for k in range(count):
            if seq["start"] + k not in self.skipped:  # e.g. its position was not finite
                self.pending_refs[seq["start"] + k] = (source, idx["start"] + k,
                                                       idx["start"] + k + 1)

    def resource(self, doc: dict) -> None:
        """Legacy Resource: AD HDF5 files addressed by datum ``point_number``.

        As databroker's ``AD_HDF5`` handler: datum ``point_number`` p refers to frames
        ``[p * frame_per_point, (p + 1) * frame_per_point)``; several frames of one point are
        summed (photon counts of repeated exposures at the same position). Other specs (e.g.
        ``NPY_SEQ``) are refused and their frames counted, never silently ignored.
        """
        spec = doc.get("spec", "")
        if not (spec.upper().startswith("AD_HDF5") or spec == "HDF5"):
            self._refuse(doc["uid"], ValueError(
                f"resource spec {spec!r} is not supported (AD_HDF5 / HDF5 are)"))
            return
        try:
            path = self.data_roots.resolve(doc["resource_path"], root=doc.get("root", ""))
        except PathRefused as exc:
            self._refuse(doc["uid"], exc)
            return
        kwargs = doc.get("resource_kwargs", {})
        dataset = kwargs.get("dataset", "/entry/data/data")
        self.sources[doc["uid"]] = _HDF5Source(path, dataset)
        self.frames_per_point[doc["uid"]] = max(int(kwargs.get("frame_per_point", 1)), 1)

    def datum(self, doc: dict) -> None:
        """Legacy Datum: one point of a Resource."""
        if doc["resource"] in self.refused:
            self.unsupported_datums.add(doc["datum_id"])
            seq = self.unresolved.pop(doc["datum_id"], None)
            if seq is not None:
                self._give_up(seq, "file_refused")
            return
        if doc["resource"] in self.sources:
            kwargs = doc.get("datum_kwargs", {})
            point = int(kwargs.get("point_number", kwargs.get("frame", 0)))
            fpp = self.frames_per_point.get(doc["resource"], 1)
            ref = (doc["resource"], point * fpp, (point + 1) * fpp)
            if doc["datum_id"] in self.unresolved:
                self.pending_refs[self.unresolved.pop(doc["datum_id"])] = ref
            else:
                self.datum_map[doc["datum_id"]] = ref

    def _give_up(self, seq: int, cause: str) -> None:
        self.problems[cause] += 1
        self.skipped.add(seq)
        self.frames.pop(seq, None)
        self.positions.pop(seq, None)
        self.pending_refs.pop(seq, None)
        self.reads.pop(seq, None)

    def event(self, doc: dict) -> None:
        if doc["descriptor"] not in self.descriptors:
            self.other_rows += 1
            return
        self.events_seen += 1
        seq = event_seq_num(doc)
        data = doc.get("data")
        if seq is None or not isinstance(data, dict):
            self.problems["malformed_event"] += 1
            return
        if seq in self.skipped:  # given up already (and counted) at its StreamDatum
            return
        if self.y_key not in data or self.x_key not in data:
            # One bad row is one frame lost, never the run (the next rows are good).
            self._give_up(seq, "malformed_event")
            return
        try:
            position = (float(data[self.y_key]), float(data[self.x_key]))
        except (TypeError, ValueError):
            position = (math.nan, math.nan)
        if not all(math.isfinite(v) for v in position):
            self._give_up(seq, "nonfinite_position")
            return
        self.positions[seq] = position
        value = data.get(self.image_key)
        if isinstance(value, str):  # legacy datum reference
            if value in self.unsupported_datums:
                self._give_up(seq, "file_refused")
            elif value in self.datum_map:
                self.pending_refs[seq] = self.datum_map.pop(value)
            else:  # its Datum has not arrived (yet)
                self.unresolved[value] = seq
        elif value is not None:
            try:
                self.frames[seq] = np.asarray(value)
            except (TypeError, ValueError):  # e.g. a ragged nested list
                self._give_up(seq, "malformed_event")

    def pop_ready(self) -> tuple[np.ndarray, np.ndarray, list[int]]:
        """Frames and (y, x) positions of every sequence number that has both, in order.

        Referenced frames are asked of their files now and taken when read; one not yet on
        disk, or from a file slow to answer, stays pending.
        """
        self.collect_reads()
        ready = sorted(set(self.frames) & set(self.positions))
        # A RunEngine that rewinds (a pause without defer, a suspender) re-takes points under
        # sequence numbers it has already used: each point is reconstructed once, from its
        # first measurement, and the repeats are counted.
        for s in [s for s in ready if s in self.done]:
            del self.frames[s], self.positions[s]
            self.repeated += 1
        ready = [s for s in ready if s not in self.done]
        self.done.update(ready)
        if not ready:
            return np.empty((0,)), np.empty((0, 2)), []
        popped = [self.frames.pop(s) for s in ready]
        try:
            frames = np.stack(popped)
        except ValueError:  # frames of different shapes: the sanitizer sorts them out
            frames = np.empty(len(popped), dtype=object)
            frames[:] = popped
        positions = np.array([self.positions.pop(s) for s in ready], dtype=np.float64)
        return frames, positions, ready

    def collect_reads(self) -> None:
        """Ask for every referenced frame whose position is known; take the reads that are
        done. A source is waited for only while it answers promptly (``slow_after_s``); a
        slow one (a hung mount) is polled, never waited on, and given up once the read in
        progress has gone ``read_timeout_s`` without an answer (reads queued behind it are
        not timed: a long queue of quick reads is not a hung file). After :attr:`stopping`
        is set, a frame the file does not hold is given up (``missing_in_file``) instead of
        being asked for again."""
        for seq in sorted(self.pending_refs):
            if seq in self.positions and seq not in self.reads:
                ref = self.pending_refs[seq]
                self.reads[seq] = self.sources[ref[0]].submit(ref[1], ref[2], ref)
        for seq in sorted(self.reads):
            read = self.reads.get(seq)
            if read is None:  # given up with its source
                continue
            source = read.ref[0]
            if source not in self.slow_sources:
                read.done.wait(max(self.slow_after_s - read.age(time.monotonic()), 0.0))
                if not read.done.is_set():
                    self.slow_sources.add(source)
            if not read.done.is_set():
                if read.running_for(time.monotonic()) >= self.read_timeout_s:
                    self._give_up_source(source, ReadTimeout(
                        f"reading {self.sources[source].path}: no answer in "
                        f"{self.read_timeout_s:g} s"))
                continue  # the source's later reads queue behind this one
            del self.reads[seq]
            self.slow_sources.discard(source)
            if self.pending_refs.get(seq) != read.ref:  # re-taken meanwhile (a rewind)
                continue  # the new reference is asked for next time
            if isinstance(read.error, IndexError):
                if self.stopping:  # the run is over: the file will not get it
                    self._give_up(seq, "missing_in_file")
                continue  # not written yet: asked again next time
            if isinstance(read.error, Exception):  # unreadable, not a regular file, no such
                self._give_up_source(source, read.error)  # dataset (h5py's KeyError), ...
                continue
            if read.error is not None:  # KeyboardInterrupt, SystemExit: not ours to keep
                raise read.error
            block = read.value
            self.frames[seq] = block[0] if len(block) == 1 else block.sum(axis=0)
            del self.pending_refs[seq]

    def _give_up_source(self, source: str, exc: Exception) -> None:
        self._refuse(source, exc)
        for s in [s for s, ref in self.pending_refs.items() if ref[0] == source]:
            self._give_up(s, "file_unreadable")
        self._close_source(source)

    def _close_source(self, uid: str) -> None:
        # a slow source's close waits behind its unanswered read: do not wait for it
        wait_s = 0.0 if uid in self.slow_sources else 1.0
        self.slow_sources.discard(uid)
        self.sources.pop(uid).close(wait_s=wait_s)

    @property
    def reading(self) -> bool:
        """Reads asked for and not answered yet (a file slow to answer)."""
        return bool(self.reads)

    def put_back(self, frames: np.ndarray, positions: np.ndarray, seqs: list[int]) -> None:
        """Return pairs from :meth:`pop_ready` unused (waiting for a fuller batch)."""
        for k, s in enumerate(seqs):
            self.frames[s] = frames[k]
            self.positions[s] = tuple(positions[k])
            self.done.discard(s)

    @property
    def unpaired(self) -> int:
        """Frames or positions still waiting for their partner."""
        return len(self.frames) + len(self.pending_refs) + len(
            set(self.positions) - set(self.frames) - set(self.pending_refs))

    def abandon(self) -> int:
        """At the stop: frames still referenced but never written to their file are given up
        (``missing_in_file``); returns how many."""
        for seq in list(self.reads):  # asked for, never answered
            self._give_up(seq, "file_unreadable")
        missing = [s for s in self.pending_refs if s in self.positions]
        for seq in missing:
            self._give_up(seq, "missing_in_file")
        return len(missing)

    def close(self) -> None:
        for uid in list(self.sources):
            self._close_source(uid)
