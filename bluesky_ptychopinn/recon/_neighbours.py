"""Incremental causal 4-quadrant grouping for the streaming engine, at a cost per frame that does
not grow with the scan.

:func:`~bluesky_ptychopinn.training.quadrant_groups_for_inference` (the reference) answers each
anchor from a k-d tree over *every* frame seen so far. :class:`QuadrantIndex` answers the same
question from a grid hash: only the cells around the anchors are searched, so the work per frame
depends on how densely the neighbourhood was scanned, not on how many frames came before.
:class:`FrameStore` keeps the frames the groups draw on in preallocated chunks (appending never
copies what is already stored).

The rule (shared with the reference, made exact and batch-independent)
----------------------------------------------------------------------
For anchor ``i`` (every frame anchors one group, in stream order), the *candidates* are the frames
``j <= i`` (the anchor itself included) at distance ``d <= min(radius, d_cap)``, where ``d_cap``
is the distance of the ``cap``-th (64th) nearest frame ``<= i``. The group is, per quadrant TL,
TR, BL, BR (``2 * (dy >= 0) + (dx >= 0)``), the nearest candidate with ``d > 1e-9``; empty
quadrants take, in slot order, the nearest candidates not already chosen (the anchor itself comes
first: it is at distance 0), then the anchor itself. Equal distances go to the newer frame.

Where this can differ from the reference, and why:

* The reference fills its 64 nearest from the history *up to the end of the batch* and only then
  drops frames after the anchor, so frames later in the same batch can push an earlier neighbour
  out and the groups change with the batching (rows of a jittered raster's first scan line, see
  tests/test_streaming.py). Here the cap counts only frames ``<= i``: the groups are the
  reference's with the stream cut into batches of one frame, whichever way it was cut.
* ``radius`` (the engine passes the frame size): frames farther than one frame width share no
  object pixels with the anchor's patch. The reference reaches that far only at the first frames
  of a sparse scan or at scan edges, and then stitches a group whose members tell the network
  nothing about each other.
* Ties: the reference resolves equal distances in k-d-tree order (arbitrary); here the newer
  frame wins, and every frame tied at ``d_cap`` is a candidate.

Eviction (why memory is bounded on exact revisits, and only there)
------------------------------------------------------------------
Frames measured at bitwise the same position (a scan repeated on the same setpoints) are ordered
newest first, so a group can only ever draw the newest ``keep`` (4) copies of one position: one
per slot at most, always a newest-first prefix. Older copies are retired (their frames freed);
the index keeps one weightless-for-selection *ghost* entry per position carrying their count, so
``d_cap`` and hence every later group is exactly what it would have been without eviction.

No other frame can be retired without possibly changing a later group: a future anchor may land
arbitrarily close to any frame, in any quadrant of it, and that frame is then its nearest. So on
a single pass memory grows with the scanned area (one entry and one frame per position), on exact
revisits it stays bounded by the area, and on revisits at new (e.g. jittered) positions it grows
with the number of passes over each spot, as does the work per frame there (more frames in the
searched cells); it still never depends on the frames measured elsewhere.

A memory budget (:meth:`QuadrantIndex.evict_oldest`, used by the engine beyond its frame budget)
bounds the frames in any case: the oldest frames become ghosts (their entries still count
towards ``d_cap``, their frames are freed), so a later group differs from the exact one only if
it would have drawn on a frame that old, i.e. where the scan comes back to a spot it left more
than a budget's worth of frames ago; a scan that moves on (a raster's rows, a spiral) never does.
The entries themselves (40 bytes a frame) stay. The record of which frames each ``add()``
brought (what eviction walks, oldest first) is dropped once none of its frames is live, so on
exact revisits it too stays bounded by the area, whatever the number of passes.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["FrameStore", "QuadrantIndex", "GroupBatch"]

CAP = 64
"""Nearest frames considered per anchor (the reference's k)."""

_OFFSET = 32768
"""16-bit counts are stored as ``count - _OFFSET`` (int16)."""

_SELF = 1e-9
"""Distances at or below this are the anchor's own position: no quadrant neighbour."""

_REACHES = (3, 4)
"""Search blocks, in cells either side of the anchor's cell; the last covers the radius."""



class FrameStore:
    """Frames addressed by their stream index, in preallocated chunks.

    Appending writes into free slots of the current chunk (a new chunk is allocated when none is
    left), so it is O(1) amortised and never copies stored frames; discarded frames free their
    slots for reuse, so memory follows the number of frames kept, not the number appended.

    Photon counts are whole numbers and, on the detectors this package reads, below 2**16: such
    frames are kept in 16 bits (as ``count - 32768`` in int16, which torch indexes; it has no
    uint16 indexing), half of float32, losslessly. The first frame that is not (a fraction, or
    a count above 65535) turns the store to float32 for good; the frames read back are the
    same either way.

    Parameters
    ----------
    frame_shape : tuple of int
        Shape of one frame, e.g. ``(64, 64)``.
    chunk_frames : int
        Frames per allocation.
    compact : bool
        Start in 16 bits (False: float32 from the start).
    """

    def __init__(self, frame_shape: tuple[int, ...], *, chunk_frames: int = 512,
                 compact: bool = True) -> None:
        self.frame_shape = tuple(int(s) for s in frame_shape)
        self.chunk_frames = int(chunk_frames)
        self.dtype = torch.int16 if compact else torch.float32
        self._chunks: list[torch.Tensor] = []
        self._free: list[int] = []  # reusable slots, most recently freed last
        self._slot: dict[int, int] = {}  # stream index -> slot
        self._handed_out = 0  # slots ever used; the ones beyond are allocated but untouched
        self.n_appended = 0

    def __len__(self) -> int:
        return len(self._slot)

    @property
    def frame_nbytes(self) -> int:
        """Bytes one stored frame takes."""
        return self.dtype.itemsize * int(np.prod(self.frame_shape))

    @property
    def nbytes(self) -> int:
        """Bytes held by the chunks (allocated, used or free)."""
        return sum(c.element_size() * c.nelement() for c in self._chunks)

    def append(self, frames: torch.Tensor) -> np.ndarray:
        """Store ``frames`` ((k, *frame_shape), any real dtype); returns their stream
        indices."""
        k = len(frames)
        indices = np.arange(self.n_appended, self.n_appended + k)
        encoded = self._encode(frames.detach().to("cpu", torch.float32))
        reused = [self._free.pop() for _ in range(min(k, len(self._free)))]
        fresh = range(self._handed_out, self._handed_out + k - len(reused))
        self._handed_out += len(fresh)
        while len(self._chunks) * self.chunk_frames < self._handed_out:
            self._chunks.append(torch.empty((self.chunk_frames, *self.frame_shape),
                                            dtype=self.dtype))
        slots = np.asarray(reused + list(fresh), dtype=np.int64)
        self._write(slots, encoded)
        self._slot.update(zip(indices.tolist(), slots.tolist(), strict=True))
        self.n_appended += k
        return indices

    def _encode(self, frames: torch.Tensor) -> torch.Tensor:
        """``frames`` in the store's dtype, widening the store first if they need it."""
        if self.dtype == torch.int16:
            if (len(frames) == 0 or bool(((frames >= 0) & (frames <= 65535)
                                          & (frames == frames.round())).all())):
                return (frames - _OFFSET).to(torch.int16)
            self._chunks = [c.to(torch.float32) + _OFFSET for c in self._chunks]
            self.dtype = torch.float32
        return frames

    def _write(self, slots: np.ndarray, frames: torch.Tensor) -> None:
        chunk, offset = np.divmod(slots, self.chunk_frames)
        for c in np.unique(chunk):
            sel = np.flatnonzero(chunk == c)
            off = offset[sel]
            if (np.diff(off) == 1).all() and sel[-1] - sel[0] == len(sel) - 1:
                self._chunks[c][off[0] : off[-1] + 1] = frames[sel[0] : sel[-1] + 1]
            else:
                self._chunks[c][torch.from_numpy(off)] = frames[torch.from_numpy(sel)]

    def gather(self, indices: np.ndarray) -> torch.Tensor:
        """(len(indices), *frame_shape) float32 copy of the frames with these stream
        indices."""
        flat = np.asarray(indices, dtype=np.int64).ravel()
        slots = np.fromiter((self._slot[i] for i in flat.tolist()), dtype=np.int64,
                            count=len(flat))
        chunk, offset = np.divmod(slots, self.chunk_frames)
        out = torch.empty((len(flat), *self.frame_shape), dtype=torch.float32)
        for c in np.unique(chunk):
            sel = np.flatnonzero(chunk == c)
            picked = torch.index_select(self._chunks[c], 0, torch.from_numpy(offset[sel]))
            if len(sel) == len(flat):
                out.copy_(picked)  # the usual case: one chunk, no scattered write
            else:
                out[torch.from_numpy(sel)] = picked.to(torch.float32)
        if self.dtype == torch.int16:
            out += _OFFSET
        return out

    def discard(self, indices) -> None:
        """Free the slots of these stream indices (unknown indices are ignored)."""
        for i in np.asarray(indices, dtype=np.int64).ravel().tolist():
            slot = self._slot.pop(i, None)
            if slot is not None:
                self._free.append(slot)


_ID, _Y, _X, _WEIGHT, _LIVE = range(5)
"""Columns of a cell's entries (float64; stream indices are exact up to 2**53)."""


class _Cell:
    """Entries of one grid cell, one row each: stream index, y, x, weight (frames the entry
    stands for) and live (1 while its frame is stored; a ghost only counts towards the cap)."""

    __slots__ = ("data", "n")

    def __init__(self, capacity: int = 8) -> None:
        self.data = np.empty((capacity, 5), dtype=np.float64)
        self.n = 0

    def append(self, ids: np.ndarray, pos: np.ndarray) -> None:
        k = len(ids)
        if self.n + k > len(self.data):
            grown = np.empty((max(2 * len(self.data), self.n + k), 5), dtype=np.float64)
            grown[: self.n] = self.data[: self.n]
            self.data = grown
        rows = self.data[self.n : self.n + k]
        rows[:, _ID], rows[:, _Y : _X + 1], rows[:, _WEIGHT], rows[:, _LIVE] = ids, pos, 1, 1
        self.n += k

    def keep(self, mask: np.ndarray) -> None:
        """Drop the entries where ``mask`` is False (order preserved)."""
        n = int(mask.sum())
        self.data[:n] = self.data[: self.n][mask]
        self.n = n


@dataclass
class GroupBatch:
    """The groups anchored by one call of :meth:`QuadrantIndex.add`.

    Attributes
    ----------
    members : numpy.ndarray
        (m, 4) int64 stream indices, columns TL, TR, BL, BR.
    positions : numpy.ndarray
        (m, 4, 2) float64 member positions.
    retired : numpy.ndarray
        Stream indices whose frames no later group can use (free them after gathering
        ``members``).
    """

    members: np.ndarray
    positions: np.ndarray
    retired: np.ndarray


def _nearest_first(d: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Row-wise order by distance, the newer frame first among equal distances.

    A plain sort, then a two-key sort only for the rows where two finite distances tie (a
    raster's symmetric neighbours, repeated positions): np.lexsort costs ~10x np.argsort."""
    order = np.argsort(d, axis=1)
    ds = np.take_along_axis(d, order, axis=1)
    tied = ((ds[:, 1:] == ds[:, :-1]) & np.isfinite(ds[:, 1:])).any(axis=1)
    if tied.any():
        order[tied] = np.lexsort((-ids[tied], d[tied]), axis=1)
    return order


def _code(cells: np.ndarray) -> np.ndarray:
    """One int64 per (row, column) cell, so cells sort and hash as scalars."""
    return (cells[..., 0] << 32) + (cells[..., 1] & 0xFFFFFFFF)


def _as_points(pos: np.ndarray) -> np.ndarray:
    """(n,) complex view of (n, 2) positions: equal entries are equal positions."""
    return np.ascontiguousarray(pos).view(np.complex128).ravel()


class QuadrantIndex:
    """Grid hash of scan positions answering the causal 4-quadrant query incrementally.

    Parameters
    ----------
    radius : float
        Farthest neighbour (same unit as the positions; the engine uses the frame size in
        object pixels). Cells are ``radius / 4`` wide; the groups do not depend on that, only
        the work does.
    cap : int
        Nearest frames considered per anchor (64, as in the reference).
    keep : int
        Copies kept per exactly repeated position (4: a group never uses more, see the module
        docstring); older copies are retired.

    Examples
    --------
    >>> index = QuadrantIndex(radius=64.0)
    >>> grid = np.stack(np.meshgrid(np.arange(3.0), np.arange(3.0), indexing="ij"), -1) * 5
    >>> index.add(grid.reshape(-1, 2)).members[4].tolist()  # centre: TL, TR, BL, then itself
    [0, 1, 3, 4]
    """

    def __init__(self, radius: float, *, cap: int = CAP, keep: int = 4) -> None:
        if not radius > 0:
            raise ValueError(f"radius: expected > 0, got {radius!r}")
        self.radius = float(radius)
        # Cells a quarter of the radius: the first search block (7 x 7 cells) covers 3/4 of
        # the radius around the anchor, the second (9 x 9) all of it.
        self.cell = self.radius / 4
        self._reaches = _REACHES
        self._offsets = {k: np.array([(dy, dx) for dy in range(-k, k + 1)
                                      for dx in range(-k, k + 1)], dtype=np.int64)
                         for k in self._reaches}
        self.cap = int(cap)
        self.keep = int(keep)
        self._cells: dict[int, _Cell] = {}  # by _code(cell)
        #: [first stream index, end, cells touched, frames still live] of every add() that
        #: still has live frames, oldest first: what evict_oldest() turns into ghosts. A
        #: record whose frames have all been retired is dropped (on exact revisits one add()
        #: after another would otherwise stay here for ever, ~260 bytes each).
        self._added: collections.deque[list] = collections.deque()
        #: stream indices retired since the records' live counts were last brought up to date
        #: (done in bulk, once there are as many as records, so it costs O(1) a frame)
        self._retired_unresolved: list[np.ndarray] = []
        self._n_unresolved = 0
        self.n_points = 0
        self.n_retired = 0
        self.n_evicted = 0
        self.last_searched = 0  # (anchor, entry) pairs the last add() compared: its cost

    @property
    def n_entries(self) -> int:
        """Entries held (stored frames plus one ghost per exactly revisited position)."""
        return sum(c.n for c in self._cells.values())

    @property
    def nbytes(self) -> int:
        """Bytes held by the cells' arrays."""
        return sum(c.data.nbytes for c in self._cells.values())

    def _cell_of(self, positions: np.ndarray) -> np.ndarray:
        """(n, 2) integer cell coordinates."""
        return np.floor(positions / self.cell).astype(np.int64)

    def add(self, positions: np.ndarray) -> GroupBatch:
        """Insert ``positions`` (the next frames of the stream) and group each of them.

        Parameters
        ----------
        positions : numpy.ndarray
            (m, 2) float64 (y, x) positions of the next ``m`` frames.

        Returns
        -------
        GroupBatch
            Their groups, and the frames retired by this call.
        """
        pos = np.asarray(positions, dtype=np.float64).reshape(-1, 2)
        ids = np.arange(self.n_points, self.n_points + len(pos))
        self.n_points += len(pos)
        if not len(pos):
            empty = np.zeros((0, 4), dtype=np.int64)
            return GroupBatch(empty, np.zeros((0, 4, 2)), np.zeros(0, dtype=np.int64))
        cells = self._cell_of(pos)
        codes = _code(cells)
        self._insert(ids, pos, codes)
        self._added.append([int(ids[0]), int(ids[-1]) + 1, np.unique(codes), len(pos)])
        members, member_pos, repeated = self._group(ids, pos, cells)
        # Retire only after grouping: an anchor earlier in this call may still use a copy
        # that a later copy in the same call supersedes.
        retired = self._retire(np.unique(codes[repeated]))
        if len(retired):
            self._retired_unresolved.append(retired)
            self._n_unresolved += len(retired)
            if self._n_unresolved >= len(self._added):
                self._resolve_retired()
        return GroupBatch(members, member_pos, retired)

    def _resolve_retired(self) -> None:
        """Take the frames retired since the last call off their add() records' live counts
        and drop the records left with none."""
        if not self._retired_unresolved:
            return
        retired = np.concatenate(self._retired_unresolved)
        self._retired_unresolved, self._n_unresolved = [], 0
        starts = np.fromiter((r[0] for r in self._added), dtype=np.int64,
                             count=len(self._added))
        # Records are contiguous, increasing ranges of stream indices: the record of index i
        # is the last one starting at or before i.
        which = np.searchsorted(starts, retired, side="right") - 1
        record, counts = np.unique(which[which >= 0], return_counts=True)
        records = list(self._added)  # (a deque's middle is O(n) to index)
        for r, c in zip(record.tolist(), counts.tolist(), strict=True):
            records[r][3] -= c
        self._added = collections.deque(r for r in records if r[3] > 0)

    # -- insertion and retirement ----------------------------------------------------------
    def _insert(self, ids: np.ndarray, pos: np.ndarray, codes: np.ndarray) -> None:
        order = np.argsort(codes, kind="stable")
        uniq, start = np.unique(codes[order], return_index=True)
        bounds = [*start.tolist(), len(codes)]
        for u, key in enumerate(uniq.tolist()):
            sel = order[bounds[u] : bounds[u + 1]]
            cell = self._cells.get(key)
            if cell is None:
                cell = self._cells[key] = _Cell()
            cell.append(ids[sel], pos[sel])

    def _retire(self, codes: np.ndarray) -> np.ndarray:
        """Retire all but the newest ``keep`` copies of each exactly repeated position in
        these cells, folding them into that position's ghost entry."""
        retired = []
        for key in codes.tolist():
            cell = self._cells[key]
            n = cell.n
            data = cell.data[:n]
            _, site, counts = np.unique(_as_points(data[:, _Y : _X + 1]), return_inverse=True,
                                        return_counts=True)
            keep = np.ones(n, dtype=bool)
            for s in np.flatnonzero(counts > self.keep).tolist():
                members = np.flatnonzero(site == s)
                alive = data[members, _LIVE] > 0
                live = members[alive]
                if len(live) <= self.keep:
                    continue
                order = live[np.argsort(data[live, _ID])]
                old = order[: len(order) - self.keep]
                retired.append(data[old, _ID].astype(np.int64))
                ghosts = members[~alive]  # one per position, more after evict_oldest()
                ghost = ghosts[0] if len(ghosts) else old[-1]
                data[ghost, _WEIGHT] = data[ghosts, _WEIGHT].sum() + len(old)
                data[ghost, _ID] = data[np.concatenate([ghosts, old]), _ID].max()
                data[ghost, _LIVE] = 0
                keep[np.setdiff1d(np.concatenate([old, ghosts]), [ghost])] = False
            if not keep.all():
                cell.keep(keep)
        if not retired:
            return np.zeros(0, dtype=np.int64)
        out = np.concatenate(retired)
        self.n_retired += len(out)
        return out

    def evict_oldest(self, count: int) -> np.ndarray:
        """Make ghosts of the oldest frames still live, ``count`` at least (whole add() calls
        at a time), so their frames can be freed; returns their stream indices (some may have
        been retired already: only live ones count towards ``count``). Later groups never
        draw on them; ``d_cap`` is unchanged."""
        self._resolve_retired()
        evicted, n = [], 0
        while self._added and n < count:
            lo, hi, codes, live = self._added.popleft()
            n += live
            for key in codes.tolist():
                cell = self._cells[key]
                data = cell.data[: cell.n]
                data[(data[:, _ID] >= lo) & (data[:, _ID] < hi), _LIVE] = 0
            evicted.append(np.arange(lo, hi))
        if not evicted:
            return np.zeros(0, dtype=np.int64)
        out = np.concatenate(evicted)
        self.n_evicted += n
        return out

    # -- the query ------------------------------------------------------------------------
    def _rows(self, cells: np.ndarray, reach: int) -> tuple[np.ndarray, np.ndarray]:
        """Entries of the (2 reach + 1)^2 cells around each anchor's cell: (n, L, 5) rows,
        padded, and (n, L) which of them are real.

        Each distinct cell is looked up once; the ragged rows are then built with array
        arithmetic, so scattered anchors (consecutive points of a spiral lie all around it)
        cost no more Python work than clustered ones."""
        block = _code(cells[:, None, :] + self._offsets[reach][None])  # (n, K)
        uniq, inverse = np.unique(block, return_inverse=True)
        found = list(map(self._cells.get, uniq.tolist()))
        length = np.fromiter((0 if c is None else c.n for c in found), dtype=np.int64,
                             count=len(found))
        start = np.cumsum(length) - length
        flat = np.concatenate([c.data[: c.n] for c in found if c is not None and c.n])
        # row r holds the entries of its K cells back to back
        lens = length[inverse.reshape(block.shape)].ravel()
        starts = start[inverse.reshape(block.shape)].ravel()
        row_len = lens.reshape(block.shape).sum(axis=1)
        total = int(row_len.sum())
        source = np.repeat(starts - (np.cumsum(lens) - lens), lens) + np.arange(total)
        row = np.repeat(np.arange(len(cells)), row_len)
        column = np.arange(total) - np.repeat(np.cumsum(row_len) - row_len, row_len)
        index = np.zeros((len(cells), max(int(row_len.max()), 1)), dtype=np.int64)
        valid = np.zeros(index.shape, dtype=bool)
        index[row, column] = source
        valid[row, column] = True
        return flat[index], valid

    def _group(self, ids: np.ndarray, pos: np.ndarray, cells: np.ndarray):
        """Groups of the anchors ``ids`` at ``pos``, searched in widening blocks of cells.

        The first block holds every frame within ``3 * cell`` of the anchor; on a scan with a
        step under ~radius / 8 that already contains its 64 nearest, even at the scan's
        front. Anchors whose 64th nearest lies farther (sparse scans, the first frames) are
        answered from the block covering the whole radius. Also returns which anchors share
        their exact position with another stored frame (their cell has copies to retire).
        """
        m = len(ids)
        members = np.empty((m, 4), dtype=np.int64)
        member_pos = np.empty((m, 4, 2), dtype=np.float64)
        repeated = np.zeros(m, dtype=bool)
        self.last_searched = 0
        todo = np.arange(m)
        for reach in self._reaches:
            entries, valid = self._rows(cells[todo], reach)
            self.last_searched += valid.size
            decided = self._select(todo, ids, pos, entries, valid,
                                   coverage=reach * self.cell, members=members,
                                   member_pos=member_pos, repeated=repeated)
            todo = todo[~decided]
            if not len(todo):
                break
        return members, member_pos, repeated

    def _select(self, rows, ids, pos, entries, valid, *, coverage, members, member_pos,
                repeated) -> np.ndarray:
        """Groups for anchors ``rows`` from the entries in their rows; returns which rows were
        decided: those whose candidates all lie within ``coverage`` of the anchor, the
        distance up to which a row holds every stored entry."""
        anchor_id = ids[rows]
        anchor_pos = pos[rows]
        delta = entries[..., _Y : _X + 1] - anchor_pos[:, None, :]
        same_place = valid & (delta == 0).all(axis=-1)
        repeated[rows] |= (same_place & (entries[..., _ID] != anchor_id[:, None])).any(axis=1)
        # the reference's distance (cKDTree: root of the summed squares), so ties tie alike
        d = np.where(valid, np.sqrt(delta[..., 0] ** 2 + delta[..., 1] ** 2), np.inf)
        order = _nearest_first(d, entries[..., _ID])
        d = np.take_along_axis(d, order, axis=1)
        cid = np.take_along_axis(entries[..., _ID], order, axis=1)
        weight = np.take_along_axis(entries[..., _WEIGHT], order, axis=1)
        allowed = (d <= self.radius) & (cid <= anchor_id[:, None])
        cum = np.cumsum(np.where(allowed, weight, 0), axis=1)
        reach = cum >= self.cap
        has_cap = reach.any(axis=1)
        n = len(rows)
        r = np.arange(n)
        d_cap = np.where(has_cap, d[r, reach.argmax(axis=1)], np.inf)
        # (a hair inside the block: a frame exactly at its edge may round into the next cell)
        decided = np.minimum(d_cap, self.radius) <= coverage * (1 - 1e-12)
        if coverage >= self.radius:
            decided[:] = True
        # Only the sorted prefix up to d_cap can be chosen: carry just those columns on.
        within = d <= d_cap[:, None]
        width = max(int(within.sum(axis=1).max()), 1)
        order, d, within, allowed = (a[:, :width] for a in (order, d, within, allowed))
        entries = np.take_along_axis(entries, order[..., None], axis=1)
        delta = entries[..., _Y : _X + 1] - anchor_pos[:, None, :]
        cid = entries[..., _ID]
        cand = allowed & (entries[..., _LIVE] > 0) & within
        quadrant = 2 * (delta[..., 0] >= 0) + (delta[..., 1] >= 0)  # TL, TR, BL, BR = 0..3
        usable = cand & (d > _SELF)
        col = np.full((n, 4), -1, dtype=np.int64)
        for q in range(4):
            hit = usable & (quadrant == q)
            first = hit.argmax(axis=1)
            found = hit[r, first]
            col[found, q] = first[found]
        # Empty quadrants (scan edges, first frames): nearest unchosen candidates in slot
        # order -- the anchor itself first -- then the anchor itself.
        missing = col < 0
        if missing.any():
            spare = cand.copy()
            chosen = ~missing
            spare[np.repeat(r, 4)[chosen.ravel()], col[chosen]] = False
            rank = np.cumsum(spare, axis=1)
            nth = np.cumsum(missing, axis=1)  # 1-based rank of each missing slot
            for slot in range(4):
                need = np.flatnonzero(missing[:, slot])
                if not len(need):
                    continue
                hit = spare[need] & (rank[need] == nth[need, slot][:, None])
                first = hit.argmax(axis=1)
                col[need, slot] = np.where(hit[np.arange(len(need)), first], first, -1)
        own = col < 0
        picked = np.take_along_axis(entries, np.where(own, 0, col)[..., None], axis=1)
        out_ids = np.where(own, anchor_id[:, None], picked[..., _ID].astype(np.int64))
        out_pos = np.where(own[..., None], anchor_pos[:, None, :], picked[..., _Y : _X + 1])
        done_rows = rows[decided]
        members[done_rows] = out_ids[decided]
        member_pos[done_rows] = out_pos[decided]
        return decided
