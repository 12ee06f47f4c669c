"""Pairing frames with positions from a raw run's documents.

Frames come inline in events or by reference (StreamResource/StreamDatum, or legacy
Resource/Datum) to an HDF5 file the detector is still writing; positions come in events. Either
can arrive first, so both are buffered by sequence number until they meet.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import h5py
import numpy as np

__all__ = ["FramePairer", "uri_to_path"]

logger = logging.getLogger(__name__)


def uri_to_path(uri: str) -> Path:
    """``file://localhost/abs/path`` or ``file:///abs/path`` -> Path."""
    parsed = urlparse(uri)
    if parsed.scheme not in ("file", ""):
        raise ValueError(f"unsupported URI scheme {parsed.scheme!r} in {uri!r}")
    return Path(parsed.path if parsed.scheme else uri)


@dataclass
class _HDF5Source:
    path: Path
    dataset: str
    handle: h5py.File | None = None

    def read(self, start: int, stop: int) -> np.ndarray:
        if self.handle is None:
            # SWMR read: the detector keeps appending while we read.
            self.handle = h5py.File(self.path, "r", swmr=True, libver="latest")
        dset = self.handle[self.dataset]
        dset.refresh()
        if dset.shape[0] < stop:
            raise IndexError(f"{self.path}: frames [{start}, {stop}) not written yet "
                             f"({dset.shape[0]} available)")
        return np.asarray(dset[start:stop])

    def close(self) -> None:
        if self.handle is not None:
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
    """

    image_key: str
    y_key: str
    x_key: str
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

    def descriptor(self, doc: dict) -> bool:
        """Track descriptors that carry both the image and the positions."""
        keys = doc["data_keys"]
        if self.image_key in keys and self.y_key in keys and self.x_key in keys:
            self.descriptors.add(doc["uid"])
            return True
        return False

    def stream_resource(self, doc: dict) -> None:
        if doc.get("data_key") != self.image_key:
            return
        if doc.get("mimetype") not in ("application/x-hdf5",):
            raise ValueError(f"unsupported detector file type {doc.get('mimetype')!r}")
        self.sources[doc["uid"]] = _HDF5Source(uri_to_path(doc["uri"]),
                                               doc["parameters"]["dataset"])

    def stream_datum(self, doc: dict) -> None:
        source = doc["stream_resource"]
        if source not in self.sources:
            return
        seq, idx = doc["seq_nums"], doc["indices"]
        for k in range(seq["stop"] - seq["start"]):
            self.pending_refs[seq["start"] + k] = (source, idx["start"] + k, idx["start"] + k + 1)

    def resource(self, doc: dict) -> None:
        """Legacy Resource: AD HDF5 files addressed by datum ``point_number``.

        As databroker's ``AD_HDF5`` handler: datum ``point_number`` p refers to frames
        ``[p * frame_per_point, (p + 1) * frame_per_point)``; several frames of one point are
        summed (photon counts of repeated exposures at the same position).
        """
        if doc.get("spec", "").upper().startswith("AD_HDF5") or doc.get("spec") == "HDF5":
            root = doc.get("root", "")
            path = Path(root) / doc["resource_path"] if root else Path(doc["resource_path"])
            kwargs = doc.get("resource_kwargs", {})
            dataset = kwargs.get("dataset", "/entry/data/data")
            self.sources[doc["uid"]] = _HDF5Source(path, dataset)
            self.frames_per_point[doc["uid"]] = max(int(kwargs.get("frame_per_point", 1)), 1)

    def datum(self, doc: dict) -> None:
        """Legacy Datum: one point of a Resource."""
        if doc["resource"] in self.sources:
            kwargs = doc.get("datum_kwargs", {})
            point = int(kwargs.get("point_number", kwargs.get("frame", 0)))
            fpp = self.frames_per_point.get(doc["resource"], 1)
            ref = (doc["resource"], point * fpp, (point + 1) * fpp)
            if doc["datum_id"] in self.unresolved:
                self.pending_refs[self.unresolved.pop(doc["datum_id"])] = ref
            else:
                self.datum_map[doc["datum_id"]] = ref

    def event(self, doc: dict) -> None:
        if doc["descriptor"] not in self.descriptors:
            return
        data, seq = doc["data"], int(doc["seq_num"])
        self.positions[seq] = (float(data[self.y_key]), float(data[self.x_key]))
        value = data.get(self.image_key)
        if isinstance(value, str):  # legacy datum reference
            if value in self.datum_map:
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
        frames = np.stack([self.frames.pop(s) for s in ready])
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

    def close(self) -> None:
        for source in self.sources.values():
            source.close()
