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


class _TimedReader:
    """One daemon thread that runs a source's reads; a read that does not return in time
    raises :class:`ReadTimeout` (the thread is abandoned: a read stuck in the kernel cannot be
    interrupted, but it no longer holds the run, and the other runs go on). One thread per
    source, not per read: reads are on the per-frame path."""

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self.stuck = self.stopped = False
        threading.Thread(target=self._run, daemon=True, name="ptychopinn-read").start()

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            call, result, done = job
            try:
                result["value"] = call()
            except BaseException as exc:  # handed to the caller
                result["error"] = exc
            done.set()

    def stop(self) -> None:
        """End the thread once the reads queued before are done (a stuck one never ends)."""
        self.stopped = True
        self._jobs.put(None)

    def call(self, call, timeout_s: float, what: str):
        if self.stuck or self.stopped:
            raise ReadTimeout(f"{what}: an earlier read never returned" if self.stuck
                              else f"{what}: the source is closed")
        result, done = {}, threading.Event()
        self._jobs.put((call, result, done))
        if not done.wait(timeout_s):
            self.stuck = True
            raise ReadTimeout(f"{what}: no answer in {timeout_s:g} s")
        if "error" in result:
            raise result["error"]
        return result["value"]


@dataclass
class _HDF5Source:
    path: Path
    dataset: str
    timeout_s: float = READ_TIMEOUT_S
    handle: h5py.File | None = None
    reader: _TimedReader = field(default_factory=_TimedReader)

    def _open(self) -> h5py.File:
        mode = self.path.stat().st_mode
        if not stat.S_ISREG(mode):  # a FIFO or a device would block the open forever
            raise PathRefused(f"{str(self.path)!r} is not a regular file")
        # SWMR read: the detector keeps appending while we read.
        return h5py.File(self.path, "r", swmr=True, libver="latest")

    def read(self, start: int, stop: int) -> np.ndarray:
        return self.reader.call(lambda: self._read(start, stop), self.timeout_s,
                                f"reading {self.path}")

    def _read(self, start: int, stop: int) -> np.ndarray:
        if self.handle is None:
            self.handle = self._open()
        dset = self.handle[self.dataset]
        dset.refresh()
        if dset.shape[0] < stop:
            raise IndexError(f"{self.path}: frames [{start}, {stop}) not written yet "
                             f"({dset.shape[0]} available)")
        return np.asarray(dset[start:stop])

    def close(self) -> None:
        self.reader.stop()
        if self.handle is not None and not self.reader.stuck:
            self.handle.close()
        self.handle = None


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
    """

    image_key: str
    y_key: str
    x_key: str
    data_roots: DataRoots = field(default_factory=DataRoots)
    frames: dict[int, np.ndarray] = field(default_factory=dict)
    positions: dict[int, tuple[float, float]] = field(default_factory=dict)
    #: seq_num -> (source uid, first frame, stop frame) in the source's dataset
    pending_refs: dict[int, tuple[str, int, int]] = field(default_factory=dict)
    sources: dict[str, _HDF5Source] = field(default_factory=dict)
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
        seq, idx = doc["seq_nums"], doc["indices"]
        count = seq["stop"] - seq["start"]
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

    def event(self, doc: dict) -> None:
        if doc["descriptor"] not in self.descriptors:
            self.other_rows += 1
            return
        self.events_seen += 1
        data, seq = doc["data"], int(doc["seq_num"])
        if seq in self.skipped:  # given up already (and counted) at its StreamDatum
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
            self.frames[seq] = np.asarray(value)

    def pop_ready(self) -> tuple[np.ndarray, np.ndarray, list[int]]:
        """Frames and (y, x) positions of every sequence number that has both, in order.

        Referenced frames are read from their files now; one not yet on disk stays pending.
        """
        for seq in sorted(self.pending_refs):
            if seq not in self.positions:
                continue
            source, start, stop = self.pending_refs[seq]
            try:
                block = self.sources[source].read(start, stop)
            except IndexError:
                continue
            except (OSError, PathRefused) as exc:  # unreadable, hung, not a regular file
                self._refuse(source, exc)
                for s in [s for s, ref in self.pending_refs.items() if ref[0] == source]:
                    self._give_up(s, "file_unreadable")
                self.sources.pop(source).close()
                break
            self.frames[seq] = block[0] if len(block) == 1 else block.sum(axis=0)
            del self.pending_refs[seq]
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
        missing = [s for s in self.pending_refs if s in self.positions]
        for seq in missing:
            self._give_up(seq, "missing_in_file")
        return len(missing)

    def close(self) -> None:
        for source in self.sources.values():
            source.close()
