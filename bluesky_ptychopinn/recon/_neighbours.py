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
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy.spatial import cKDTree

__all__ = ["FrameStore", "QuadrantIndex", "GroupBatch"]

CAP = 64
"""Nearest frames considered per anchor (the reference's k)."""

_SELF = 1e-9
"""Distances at or below this are the anchor's own position: no quadrant neighbour."""

_NEIGHBOURHOOD = np.array([(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)], dtype=np.int64)


class FrameStore:
    """Frames addressed by their stream index, in preallocated chunks.

    Appending writes into free slots of the current chunk (a new chunk is allocated when none is
    left), so it is O(1) amortised and never copies stored frames; discarded frames free their
    slots for reuse, so memory follows the number of frames kept, not the number appended.

    Parameters
    ----------
    frame_shape : tuple of int
        Shape of one frame, e.g. ``(64, 64)``.
    chunk_frames : int
        Frames per allocation.
    """

    def __init__(self, frame_shape: tuple[int, ...], *, chunk_frames: int = 512) -> None:
        self.frame_shape = tuple(int(s) for s in frame_shape)
        self.chunk_frames = int(chunk_frames)
        self._chunks: list[torch.Tensor] = []
        self._free: list[int] = []  # reusable slots, most recently freed last
        self._slot: dict[int, int] = {}  # stream index -> slot
        self._handed_out = 0  # slots ever used; the ones beyond are allocated but untouched
        self.n_appended = 0

    def __len__(self) -> int:
        return len(self._slot)

    @property
    def nbytes(self) -> int:
        """Bytes held by the chunks (allocated, used or free)."""
        return sum(c.element_size() * c.nelement() for c in self._chunks)

    def append(self, frames: torch.Tensor) -> np.ndarray:
        """Store ``frames`` (float32, (k, *frame_shape)); returns their stream indices."""
        k = len(frames)
        indices = np.arange(self.n_appended, self.n_appended + k)
        reused = [self._free.pop() for _ in range(min(k, len(self._free)))]
        fresh = range(self._handed_out, self._handed_out + k - len(reused))
        self._handed_out += len(fresh)
        while len(self._chunks) * self.chunk_frames < self._handed_out:
            self._chunks.append(torch.empty((self.chunk_frames, *self.frame_shape),
                                            dtype=torch.float32))
        slots = np.asarray(reused + list(fresh), dtype=np.int64)
        self._write(slots, frames)
        self._slot.update(zip(indices.tolist(), slots.tolist(), strict=True))
        self.n_appended += k
        return indices

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
        """(len(indices), *frame_shape) copy of the frames with these stream indices."""
        flat = np.asarray(indices, dtype=np.int64).ravel()
        slots = np.fromiter((self._slot[i] for i in flat.tolist()), dtype=np.int64,
                            count=len(flat))
        chunk, offset = np.divmod(slots, self.chunk_frames)
        out = torch.empty((len(flat), *self.frame_shape), dtype=torch.float32)
        for c in np.unique(chunk):
            sel = np.flatnonzero(chunk == c)
            out[torch.from_numpy(sel)] = self._chunks[c][torch.from_numpy(offset[sel])]
        return out

    def discard(self, indices) -> None:
        """Free the slots of these stream indices (unknown indices are ignored)."""
        for i in np.asarray(indices, dtype=np.int64).ravel().tolist():
            slot = self._slot.pop(i, None)
            if slot is not None:
                self._free.append(slot)


class _Cell:
    """Entries of one grid cell: stream index, position, weight (frames it stands for) and
    whether its frame is still stored (``live``; a ghost only counts towards the cap)."""

    __slots__ = ("ids", "pos", "weight", "live", "n")

    def __init__(self, capacity: int = 16) -> None:
        self.ids = np.empty(capacity, dtype=np.int64)
        self.pos = np.empty((capacity, 2), dtype=np.float64)
        self.weight = np.empty(capacity, dtype=np.int64)
        self.live = np.empty(capacity, dtype=bool)
        self.n = 0

    def append(self, ids: np.ndarray, pos: np.ndarray) -> None:
        k = len(ids)
        if self.n + k > len(self.ids):
            capacity = max(2 * len(self.ids), self.n + k)
            for name in ("ids", "pos", "weight", "live"):
                old = getattr(self, name)
                new = np.empty((capacity, *old.shape[1:]), dtype=old.dtype)
                new[: self.n] = old[: self.n]
                setattr(self, name, new)
        sl = slice(self.n, self.n + k)
        self.ids[sl], self.pos[sl], self.weight[sl], self.live[sl] = ids, pos, 1, True
        self.n += k

    def keep(self, mask: np.ndarray) -> None:
        """Drop the entries where ``mask`` is False (order preserved)."""
        n = int(mask.sum())
        for name in ("ids", "pos", "weight", "live"):
            arr = getattr(self, name)
            arr[:n] = arr[: self.n][mask]
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
        object pixels). Also the cell side, so the 3 x 3 cells around an anchor's cell hold
        every frame within ``radius`` of it.
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
        self.cap = int(cap)
        self.keep = int(keep)
        self._cells: dict[int, _Cell] = {}  # by _code(cell)
        self.n_points = 0
        self.n_retired = 0
        self.last_searched = 0  # entries the last add() searched (its cost; tests watch it)

    @property
    def n_entries(self) -> int:
        """Entries held (stored frames plus one ghost per exactly revisited position)."""
        return sum(c.n for c in self._cells.values())

    @property
    def nbytes(self) -> int:
        """Bytes held by the cells' arrays."""
        return sum(c.ids.nbytes + c.pos.nbytes + c.weight.nbytes + c.live.nbytes
                   for c in self._cells.values())

    def _cell_of(self, positions: np.ndarray) -> np.ndarray:
        """(n, 2) integer cell coordinates."""
        return np.floor(positions / self.radius).astype(np.int64)

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
        dirty = self._insert(ids, pos, _code(cells))
        members, member_pos = self._group(ids, pos, cells)
        # Retire only after grouping: an anchor earlier in this call may still use a copy
        # that a later copy in the same call supersedes.
        retired = self._retire(dirty)
        return GroupBatch(members, member_pos, retired)

    # -- insertion and retirement ----------------------------------------------------------
    def _insert(self, ids: np.ndarray, pos: np.ndarray, codes: np.ndarray) -> list:
        """Append to the cells; returns the cells where a position now occurs twice."""
        dirty = []
        uniq, inverse = np.unique(codes, return_inverse=True)
        for u, key in enumerate(uniq.tolist()):
            sel = np.flatnonzero(inverse == u)
            cell = self._cells.get(key)
            if cell is None:
                cell = self._cells[key] = _Cell()
            new = pos[sel]
            points = _as_points(new)
            repeated = len(np.unique(points)) < len(points)
            if not repeated and cell.n:
                repeated = bool(np.isin(points, _as_points(cell.pos[: cell.n])).any())
            cell.append(ids[sel], new)
            if repeated:
                dirty.append(cell)
        return dirty

    def _retire(self, cells: list) -> np.ndarray:
        """Retire all but the newest ``keep`` copies of each exactly repeated position, folding
        them into that position's ghost entry."""
        retired = []
        for cell in cells:
            n = cell.n
            _, site, counts = np.unique(_as_points(cell.pos[:n]), return_inverse=True,
                                        return_counts=True)
            keep = np.ones(n, dtype=bool)
            for s in np.flatnonzero(counts > self.keep).tolist():
                members = np.flatnonzero(site == s)
                live = members[cell.live[members]]
                if len(live) <= self.keep:
                    continue
                order = live[np.argsort(cell.ids[live])]
                old = order[: len(order) - self.keep]
                retired.append(cell.ids[old].copy())
                ghosts = members[~cell.live[members]]  # at most one per position
                ghost = ghosts[0] if len(ghosts) else old[-1]
                cell.weight[ghost] = int(cell.weight[ghosts].sum()) + len(old)
                cell.ids[ghost] = max(int(cell.ids[ghost]), int(cell.ids[old].max()))
                cell.live[ghost] = False
                drop = np.setdiff1d(np.concatenate([old, ghosts]), [ghost])
                keep[drop] = False
            if not keep.all():
                cell.keep(keep)
        if not retired:
            return np.zeros(0, dtype=np.int64)
        out = np.concatenate(retired)
        self.n_retired += len(out)
        return out

    # -- the query ------------------------------------------------------------------------
    def _local(self, cells: np.ndarray):
        """Entries of the 3 x 3 cells around each anchor's cell, concatenated."""
        near = np.unique(_code(cells[:, None, :] + _NEIGHBOURHOOD[None]))
        cells = [c for c in map(self._cells.get, near.tolist()) if c is not None and c.n]
        return (np.concatenate([c.ids[: c.n] for c in cells]),
                np.concatenate([c.pos[: c.n] for c in cells]),
                np.concatenate([c.weight[: c.n] for c in cells]),
                np.concatenate([c.live[: c.n] for c in cells]))

    def _group(self, ids: np.ndarray, pos: np.ndarray, cells: np.ndarray):
        loc_ids, loc_pos, loc_weight, loc_live = self._local(cells)
        self.last_searched = len(loc_ids)
        tree = cKDTree(loc_pos)
        m = len(ids)
        members = np.empty((m, 4), dtype=np.int64)
        member_pos = np.empty((m, 4, 2), dtype=np.float64)
        # cap + m nearest always hold the cap nearest frames <= the anchor: at most m - 1 of
        # them come after it. Rows whose cut might split a tie at d_cap are asked again.
        todo = np.arange(m)
        k = self.cap + m
        while len(todo):
            k = min(k, len(loc_ids))
            d, j = tree.query(pos[todo], k=k, distance_upper_bound=self.radius * (1 + 1e-12))
            d, j = d.reshape(len(todo), -1), j.reshape(len(todo), -1)
            done = self._select(todo, ids, pos, d, j, loc_ids, loc_pos, loc_weight, loc_live,
                                complete=k >= len(loc_ids), members=members,
                                member_pos=member_pos)
            todo = todo[~done]
            k *= 2
        return members, member_pos

    def _select(self, rows, ids, pos, d, j, loc_ids, loc_pos, loc_weight, loc_live, *,
                complete, members, member_pos) -> np.ndarray:
        """Groups for anchors ``rows`` from their k nearest local entries; returns which rows
        were decided (the others need a larger k)."""
        n_loc = len(loc_ids)
        found_any = j < n_loc
        js = np.where(found_any, j, 0)
        anchor_id = ids[rows]
        cid = np.where(found_any, loc_ids[js], np.iinfo(np.int64).max)
        # Nearest first, the newer frame first among equal distances.
        order = np.lexsort((-cid, d), axis=1)
        d = np.take_along_axis(d, order, axis=1)
        js = np.take_along_axis(js, order, axis=1)
        cid = np.take_along_axis(cid, order, axis=1)
        ok = np.take_along_axis(found_any, order, axis=1) & (d <= self.radius)
        allowed = ok & (cid <= anchor_id[:, None])
        cum = np.cumsum(np.where(allowed, loc_weight[js], 0), axis=1)
        reach = cum >= self.cap
        has_cap = reach.any(axis=1)
        n = len(rows)
        r = np.arange(n)
        d_cap = np.where(has_cap, d[r, reach.argmax(axis=1)], np.inf)
        full = found_any.all(axis=1)
        decided = complete | ~full | (has_cap & (d_cap < d[:, -1]))
        cand = allowed & loc_live[js] & (d <= d_cap[:, None])
        delta = loc_pos[js] - pos[rows][:, None, :]
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
        safe = np.where(own, 0, col)
        out_ids = np.where(own, anchor_id[:, None], np.take_along_axis(cid, safe, axis=1))
        out_pos = np.where(own[..., None], pos[rows][:, None, :],
                           loc_pos[np.take_along_axis(js, safe, axis=1)])
        done_rows = rows[decided]
        members[done_rows] = out_ids[decided]
        member_pos[done_rows] = out_pos[decided]
        return decided
