"""The streaming reconstructor: batching, stitching, uncertainty, canvas growth, bad input."""

from __future__ import annotations

import inspect
import itertools

import numpy as np
import pytest
import torch

from bluesky_ptychopinn import physics
from bluesky_ptychopinn.errors import InvalidInputError
from bluesky_ptychopinn.models import ptychopinn
from bluesky_ptychopinn.recon._neighbours import FrameStore, QuadrantIndex
from bluesky_ptychopinn.recon._streaming import (
    StreamingReconstructor,
    _FullHistoryReconstructor,
    stitch_window,
)
from bluesky_ptychopinn.training import quadrant_groups_for_inference


@pytest.fixture(scope="module")
def scan():
    rng = np.random.default_rng(0)
    obj = np.exp(1j * rng.uniform(-0.3, 0.3, (160, 160))).astype(np.complex64)
    probe = physics.make_probe("zone_plate", 64, 40e-9, 8_800)
    pos = physics.scan_pattern("fermat", (60.0, 60.0), step=5.0) + 80
    sim = physics.simulate_diffraction(obj, probe, pos, photons=1e5, seed=0)
    return sim.counts, pos


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return ptychopinn(frame_size=64, channels=1, base_width=4).eval()


def test_batch_size_does_not_change_the_result(scan, model):
    counts, pos = scan
    one = StreamingReconstructor(model, object_shape=(160, 160), input_scale=0.2, device="cpu")
    one.add(counts, pos)
    many = StreamingReconstructor(model, object_shape=(160, 160), input_scale=0.2, device="cpu",
                                  batch_size=7)
    for lo in range(0, len(pos), 13):
        many.add(counts[lo : lo + 13], pos[lo : lo + 13])
    a, b = one.finish(), many.finish()
    assert a.n_frames == b.n_frames == len(pos)
    np.testing.assert_allclose(a.object, b.object, atol=1e-5)
    np.testing.assert_allclose(a.weight, b.weight, rtol=1e-5, atol=1e-5)


def test_coverage_follows_the_scan_and_uncertainty_measures_disagreement(scan, model):
    counts, pos = scan
    recon = StreamingReconstructor(model, object_shape=(160, 160), device="cpu")
    recon.add(counts, pos)
    snap = recon.snapshot()
    assert snap.weight[80, 80] > 0 and snap.weight[0, 0] == 0
    assert snap.object[0, 0] == 0
    # Same frame twice at the same place: the two predictions agree, no uncertainty there.
    same = StreamingReconstructor(model, object_shape=(160, 160), device="cpu")
    same.add(torch.stack([counts[0], counts[0]]), np.stack([pos[0], pos[0]]))
    assert same.snapshot().n_frames == 0 and same.pending == 2  # held for the scale estimate
    same.flush()
    assert same.snapshot().uncertainty.max() < 1e-6
    # Different frames at the same place: disagreement shows up as variance.
    # An untrained network barely reacts to its input; sharpen its first layer so two different
    # frames give clearly different patches.
    import copy

    sharp = copy.deepcopy(model)
    with torch.no_grad():
        sharp.encoder[0].conv[0].weight.mul_(200)
    diff = StreamingReconstructor(sharp, object_shape=(160, 160), device="cpu")
    other = torch.zeros(64, 64)
    other[::4, ::4] = 1e4  # a very different pattern
    diff.add(torch.stack([counts[0], other]), np.stack([pos[0], pos[0]]))
    diff.flush()
    disagreement = diff.snapshot().uncertainty.max()
    assert disagreement > 1e-6 and disagreement > 100 * same.snapshot().uncertainty.max()


def test_canvas_grows_when_the_scan_leaves_it(scan, model):
    counts, pos = scan
    recon = StreamingReconstructor(model, object_shape=(96, 96), device="cpu")
    recon.add(counts[:10], pos[:10] - 200)  # far outside, negative coordinates
    snap = recon.finish()
    canvas_pos = pos[:10] - 200 - np.array(snap.origin_px)
    assert (canvas_pos >= 32).all()
    assert (canvas_pos <= np.array(snap.object.shape) - 32).all()
    assert snap.weight[tuple(np.round(canvas_pos[0]).astype(int))] > 0


def test_four_channel_models_stream_with_causal_quadrant_groups(scan):
    """C = 4 groups use only earlier frames, so the result does not depend on batching:
    a replay in one batch reproduces a live stream of small batches exactly."""
    counts, pos = scan
    torch.manual_seed(1)
    model = ptychopinn(frame_size=64, channels=4, base_width=4).eval()
    recon = StreamingReconstructor(model, object_shape=(160, 160), device="cpu", batch_size=32)
    for lo in range(0, len(pos), 7):
        recon.add(counts[lo : lo + 7], pos[lo : lo + 7])
    snap = recon.finish()
    assert snap.n_frames == len(pos) and np.isfinite(snap.object).all()
    replay = StreamingReconstructor(model, object_shape=(160, 160), device="cpu")
    replay.add(counts, pos)
    np.testing.assert_allclose(replay.finish().object, snap.object, atol=1e-5)
    assert snap.stats["frames_per_s"] > 0
    with pytest.raises(InvalidInputError, match="finished"):
        recon.add(counts[:1], pos[:1])


@pytest.mark.parametrize(
    "frames,positions,message",
    [
        (torch.rand(4, 32, 32), np.zeros((4, 2)) + 80, "frame_size=64"),
        (torch.full((2, 64, 64), float("nan")), np.zeros((2, 2)) + 80, "non-finite"),
        (torch.zeros(2, 64, 64), np.zeros((2, 2)) + 80, "all-zero"),
        (-torch.ones(2, 64, 64), np.zeros((2, 2)) + 80, "negative"),
        (torch.rand(3, 64, 64), np.zeros((2, 2)) + 80, "2 positions for 3 frames"),
        (torch.rand(1, 64, 64), np.array([[np.nan, 1.0]]), "NaN"),
        (torch.rand(1, 64, 64) + 1j, np.zeros((1, 2)), "complex"),
    ],
    ids=["wrong-size", "nan", "all-zero", "negative", "length", "nan-position", "complex"],
)
def test_bad_batches_are_rejected_and_stitch_nothing(model, frames, positions, message):
    recon = StreamingReconstructor(model, object_shape=(160, 160), device="cpu")
    recon.add(torch.rand(2, 64, 64) * 10 + 1, np.full((2, 2), 80.0))
    recon.flush()
    before = recon.snapshot()
    with pytest.raises(InvalidInputError, match=message):
        recon.add(frames, positions)
    after = recon.snapshot()
    assert after.n_frames == before.n_frames == 2
    np.testing.assert_array_equal(after.object, before.object)


def test_stitch_window_is_a_tent_inside_the_crop():
    w = stitch_window(64, 32)
    assert w[32, 32] > 0.9 and w[0, 0] == 0 and w[31, 5] == 0
    assert torch.allclose(w, w.T) and torch.allclose(w, w.flip(0).flip(1))


# -- the grid-hash grouping against the full-history reference ------------------------------
RADIUS = 64.0  # the engine's neighbour radius for 64-pixel frames


def _reference_groups(pos: np.ndarray, batch: int) -> np.ndarray:
    """Today's path before the index: each batch grouped against every position so far."""
    out = []
    for lo in range(0, len(pos), batch):
        hi = min(lo + batch, len(pos))
        out.append(quadrant_groups_for_inference(pos[lo:hi], pos[:hi],
                                                 anchor_index=np.arange(lo, hi)))
    return np.concatenate(out)


def _index_groups(pos: np.ndarray, cuts, keep: int = 4) -> tuple[np.ndarray, QuadrantIndex]:
    index = QuadrantIndex(RADIUS, keep=keep)
    edges = [0, *cuts, len(pos)]
    groups = [index.add(pos[lo:hi]).members for lo, hi in itertools.pairwise(edges)]
    return np.concatenate(groups), index


def _cuts(n: int, batch: int) -> list[int]:
    return list(range(batch, n, batch))


SCANS = {
    "raster": lambda: physics.raster_scan((150.0, 150.0), 5.0) + 100,
    "fermat": lambda: physics.fermat_spiral_scan((150.0, 150.0), 5.0) + 100,
    "jittered": lambda: physics.jittered_raster_scan((150.0, 150.0), 5.0, seed=1) + 100,
    "irregular": lambda: np.random.default_rng(2).uniform(0.0, 200.0, (1200, 2)),
}


@pytest.mark.parametrize("name", list(SCANS))
def test_grid_hash_groups_equal_the_full_history_reference(name):
    """Same indices as quadrant_groups_for_inference, streamed in several batch sizes.

    Two documented exceptions (recon/_neighbours.py), both where the reference itself is
    questionable: it may reach for a member farther than one frame width (no shared object
    pixels; only at scan edges / the sparse first frames), and its 64 nearest are taken from the
    history up to the end of the batch, so frames later in the same batch can change an earlier
    anchor's group. Raster and Fermat scans have neither: the groups are identical."""
    pos = SCANS[name]()
    one = _reference_groups(pos, 1)  # the reference's own causal rule, one frame at a time
    far = (np.linalg.norm(pos[one] - pos[:, None], axis=-1) > RADIUS).any(axis=1)
    rng = np.random.default_rng(0)
    irregular_cuts = sorted(rng.choice(np.arange(1, len(pos)), 40, replace=False).tolist())
    new, _ = _index_groups(pos, irregular_cuts)
    # Exactly the reference's rule wherever it stays within one frame width ...
    np.testing.assert_array_equal((new != one).any(axis=1), far)
    assert far.mean() < 0.04
    if name in ("raster", "fermat"):
        assert not far.any()
    for batch in (1, 7, 64, 256):
        # ... whichever way the stream is cut (edge fallbacks included) ...
        cut, _ = _index_groups(pos, _cuts(len(pos), batch))
        np.testing.assert_array_equal(cut, new)
        # ... and the reference streamed in the same batches, except where it depends on them.
        ref = _reference_groups(pos, batch)
        batch_dependent = (ref != one).any(axis=1)
        differ = (ref != new).any(axis=1)
        assert not (differ & ~far & ~batch_dependent).any()
        if name in ("raster", "fermat"):
            np.testing.assert_array_equal(ref, new)


def test_exact_revisits_keep_the_index_and_the_frames_bounded():
    """A raster repeated on the same setpoints: older copies of a position are retired (a group
    never uses more than its newest 4), so memory follows the scanned area; retiring them
    changes no group."""
    base = physics.raster_scan((40.0, 40.0), 5.0) + 100
    pos = np.concatenate([base] * 25)
    kept, index = _index_groups(pos, _cuts(len(pos), 37))
    everything, full = _index_groups(pos, _cuts(len(pos), 37), keep=10**9)
    np.testing.assert_array_equal(kept, everything)
    assert full.n_entries == len(pos) and full.n_retired == 0
    assert index.n_entries <= 5 * len(base)  # 4 copies + 1 ghost per position
    assert index.n_retired == len(pos) - 4 * len(base)
    # The same scan through the engine: the frame store stays at 4 frames per position.
    torch.manual_seed(1)
    model = ptychopinn(frame_size=64, channels=4, base_width=4).eval()
    recon = StreamingReconstructor(model, object_shape=(160, 160), device="cpu",
                                   input_scale=0.1, batch_size=64)
    small = physics.raster_scan((20.0, 20.0), 5.0) + 100
    frames = torch.rand(len(small), 64, 64) * 100 + 1
    sizes = []
    for _ in range(10):
        recon.add(frames, small)
        sizes.append((len(recon._store), recon._store.nbytes, recon._index.n_entries))
    assert recon.n_frames == 10 * len(small)
    assert sizes[-1] == sizes[4]  # nothing grows after the fifth pass
    assert sizes[-1][0] == 4 * len(small)


def test_exact_revisits_in_small_adds_keep_the_eviction_record_bounded():
    """The record of which frames each add() brought (what evict_oldest walks) forgets an add()
    once all its frames are retired: on a grid revisited in adds of 4 positions it stopped
    growing (it held 1,500 records after 30 passes for 400 live frames), and evict_oldest
    counts only the frames still live, so it frees what it is asked for and not more."""
    grid = physics.raster_scan((45.0, 45.0), 5.0) + 100  # 10 x 10
    index = QuadrantIndex(RADIUS)
    records = []
    for _ in range(30):
        for lo in range(0, len(grid), 4):
            index.add(grid[lo : lo + 4])
        records.append(len(index._added))
    live = 4 * len(grid)  # the newest 4 copies of each position
    assert index.n_retired == 30 * len(grid) - live
    assert max(records[5:]) <= 2 * live // 4 + 1  # bounded by the area, not the passes
    assert records[-1] <= records[10]
    before = index.n_evicted
    freed = index.evict_oldest(40)
    # whole adds of 4 live frames each: exactly 40 live frames, not 40 stream indices of
    # which most were retired long ago
    assert index.n_evicted - before == 40
    assert len(freed) >= 40


def test_the_search_per_batch_does_not_grow_with_the_scan():
    """Work per add() is (anchor, entry) pairs from the cells around each anchor: the same at
    the end of a long raster as near its start, and a small fraction of all frames."""
    pos = physics.raster_scan((600.0, 600.0), 5.0)
    index = QuadrantIndex(RADIUS)
    searched = []
    for lo in range(0, len(pos), 64):
        index.add(pos[lo : lo + 64])
        searched.append(index.last_searched)
    rows = len(physics.raster_scan((600.0, 0.0), 5.0))
    assert len(pos) > 14_000 and rows > 100
    early, late = max(searched[30:60]), max(searched[-30:])
    assert late <= early * 1.1 and late / 64 < 0.05 * len(pos)


def test_frame_store_appends_in_chunks_and_reuses_freed_slots():
    store = FrameStore((4, 4), chunk_frames=8)
    frames = torch.arange(20 * 16, dtype=torch.float32).reshape(20, 4, 4)
    np.testing.assert_array_equal(store.append(frames[:13]), np.arange(13))
    assert store.nbytes == 16 * 16 * 2  # two chunks of 8, counts in 16 bits
    store.discard([0, 1, 2, 3, 4])
    np.testing.assert_array_equal(store.append(frames[13:18]), np.arange(13, 18))
    assert store.nbytes == 16 * 16 * 2 and len(store) == 13  # freed slots reused, no new chunk
    picked = np.array([[17, 5], [12, 13]])
    assert torch.equal(store.gather(picked), frames[picked.ravel()])


def test_frame_store_keeps_counts_in_16_bits_losslessly_and_widens_when_it_must():
    counts = torch.tensor([0.0, 1.0, 32767.0, 32768.0, 65535.0]).repeat(4, 1).reshape(2, 2, 5)
    store = FrameStore((2, 5), chunk_frames=4)
    store.append(counts)
    assert store.dtype == torch.int16
    assert torch.equal(store.gather(np.array([1, 0])), counts[[1, 0]])
    odd = torch.full((1, 2, 5), 0.5)  # not a count: the store turns float32, nothing lost
    big = torch.full((1, 2, 5), 70000.0)
    store.append(odd)
    store.append(big)
    assert store.dtype == torch.float32
    assert torch.equal(store.gather(np.arange(4)), torch.cat([counts, odd, big]))


@pytest.mark.parametrize("pattern", ["fermat", "jittered_raster"])
def test_snapshots_match_the_full_history_engine(pattern):
    """The stitched result of the grid-hash engine equals the old full-history engine's, and
    does not depend on how the stream is cut. The old engine's does on the jittered raster
    (one call with every frame: its 64 nearest include frames after the anchor), so there it is
    compared where it is causal: one or nine frames per call."""
    rng = np.random.default_rng(3)
    obj = np.exp(1j * rng.uniform(-0.3, 0.3, (200, 200))).astype(np.complex64)
    probe = physics.make_probe("zone_plate", 64, 40e-9, 8_800)
    pos = physics.scan_pattern(pattern, (66.0, 66.0), step=6.0, seed=0) + 100
    counts = physics.simulate_diffraction(obj, probe, pos, photons=1e5, seed=0).counts
    torch.manual_seed(1)
    model = ptychopinn(channels=4, base_width=4).eval()
    assert not (np.linalg.norm(pos[_reference_groups(pos, 1)] - pos[:, None], axis=-1)
                > RADIUS).any()

    def run(engine, batch):
        recon = engine(model, object_shape=(200, 200), device="cpu", batch_size=32)
        for lo in range(0, len(pos), batch):
            recon.add(counts[lo : lo + batch], pos[lo : lo + batch])
        return recon.finish()

    def assert_same(a, b):
        assert a.n_frames == b.n_frames == len(pos)
        assert a.origin_px == b.origin_px and a.object.shape == b.object.shape
        np.testing.assert_allclose(a.object, b.object, atol=1e-5)
        np.testing.assert_allclose(a.weight, b.weight, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(a.uncertainty, b.uncertainty, atol=1e-5)

    new = {batch: run(StreamingReconstructor, batch) for batch in (1, 9, len(pos))}
    for batch in (9, len(pos)):
        assert_same(new[batch], new[1])
    causal = (1, 9) if pattern == "jittered_raster" else (1, 9, len(pos))
    for batch in causal:
        assert_same(run(_FullHistoryReconstructor, batch), new[batch])
    if pattern == "jittered_raster":
        old_one_call = run(_FullHistoryReconstructor, len(pos))
        assert np.abs(old_one_call.object - new[1].object).max() > 1e-3


def test_public_api_of_the_reconstructor_is_unchanged():
    """Callbacks, the file CLI and remote workers use add, flush, snapshot, finish, stats,
    pending and n_frames; the grid hash changed none of them."""
    cls = StreamingReconstructor
    assert list(inspect.signature(cls.add).parameters) == ["self", "frames", "positions"]
    for name in ("flush", "finish", "stats"):
        assert list(inspect.signature(getattr(cls, name)).parameters) == ["self"]
    # snapshot() may take an optional crop (crop="auto"); every call without one still works
    snapshot = inspect.signature(cls.snapshot).parameters
    assert all(p.default is not inspect.Parameter.empty for k, p in snapshot.items()
               if k != "self")
    assert isinstance(cls.pending, property)
    init = list(inspect.signature(cls.__init__).parameters)
    old = ["self", "model", "object_shape", "origin_px", "crop", "input_scale", "batch_size",
           "device", "scale_frames"]
    assert [name for name in init if name in old] == old  # added keywords only
    torch.manual_seed(0)
    recon = cls(ptychopinn(channels=4, base_width=4).eval(), object_shape=(96, 96),
                device="cpu")
    assert recon.add(torch.rand(20, 64, 64) * 100 + 1, torch.full((20, 2), 48.0)) == 20
    assert recon.n_frames == 20 and recon.pending == 0 and recon.flush() == 20
    assert set(recon.stats()) == {"frames", "busy_s", "frames_per_s", "batch_latency_p50_s",
                                  "batch_latency_p99_s", "device"}
    assert recon.finish().n_frames == 20


def test_a_frame_budget_bounds_memory_and_changes_nothing_on_a_scan_that_moves_on():
    """Beyond ``frame_memory_bytes`` the oldest frames are dropped. A raster leaves each row
    behind: with room for a few rows the stitched result is the unbudgeted one. A raster
    scanned again and again (jittered, so no exact revisits are retired) stays within the
    budget and still stitches every frame; only groups that would reach back that far
    differ."""
    rng = np.random.default_rng(4)
    obj = np.exp(1j * rng.uniform(-0.3, 0.3, (200, 200))).astype(np.complex64)
    probe = physics.make_probe("zone_plate", 64, 40e-9, 8_800)
    pos = physics.raster_scan((66.0, 66.0), 6.0) + 100  # 12 x 12
    counts = physics.simulate_diffraction(obj, probe, pos, photons=1e5, seed=0).counts
    torch.manual_seed(1)
    model = ptychopinn(channels=4, base_width=4).eval()
    frame_bytes = 64 * 64 * 2

    def run(positions, frames, budget_frames=None):
        extra = {} if budget_frames is None else {"frame_memory_bytes":
                                                  budget_frames * frame_bytes}
        recon = StreamingReconstructor(model, object_shape=(200, 200), device="cpu",
                                       batch_size=32, **extra)
        stored = []
        for lo in range(0, len(positions), 24):
            recon.add(frames[lo : lo + 24], positions[lo : lo + 24])
            stored.append(len(recon._store))
        return recon.finish(), recon, max(stored)

    exact, _, _ = run(pos, counts)
    budgeted, recon, most = run(pos, counts, budget_frames=60)  # 5 rows of 12
    assert recon._index.n_evicted > 0 and most <= 60
    np.testing.assert_allclose(budgeted.object, exact.object, atol=1e-5)
    np.testing.assert_allclose(budgeted.weight, exact.weight, rtol=1e-5, atol=1e-5)
    passes = [pos + rng.normal(0, 0.5, pos.shape) for _ in range(6)]
    again, recon, most = run(np.concatenate(passes), counts.repeat(6, 1, 1), budget_frames=60)
    assert again.n_frames == 6 * len(pos) and most <= 60
    assert np.isfinite(again.object).all()


# --- review of 2026-12-02: empty batches, bad settings, one far position -------------------


def test_an_empty_batch_is_a_no_op_and_never_poisons_the_input_scale(model):
    recon = StreamingReconstructor(model, object_shape=(128, 128), device="cpu",
                                   origin_px=(0.0, 0.0))
    n = recon.frame_size
    assert recon.add(np.zeros((0, n, n), np.float32), np.zeros((0, 2))) == 0
    assert recon.flush() == 0 and recon.input_scale is None
    rng = np.random.default_rng(0)
    frames = rng.poisson(20.0, (20, n, n)).astype(np.float32)
    recon.add(frames, np.full((20, 2), 64.0) + rng.uniform(-4, 4, (20, 2)))
    recon.flush()
    assert np.isfinite(recon.input_scale) and recon.input_scale > 0
    snap = recon.snapshot()
    assert np.isfinite(snap.object[snap.weight > 0]).all()


@pytest.mark.parametrize("kwargs", [{"input_scale": float("nan")}, {"input_scale": 0.0},
                                    {"input_scale": -0.5}, {"scale_frames": 0},
                                    {"crop": 0}, {"crop": True}, {"crop": 1000}])
def test_bad_settings_are_refused_up_front(model, kwargs):
    with pytest.raises(InvalidInputError):
        StreamingReconstructor(model, object_shape=(128, 128), device="cpu", **kwargs)


def test_one_far_position_is_refused_not_allocated(model):
    recon = StreamingReconstructor(model, object_shape=(128, 128), device="cpu",
                                   max_canvas_px=1024, crop="auto")
    n = recon.frame_size
    frames = np.random.default_rng(1).poisson(20.0, (2, n, n)).astype(np.float32)
    with pytest.raises(InvalidInputError, match="max_canvas_px=1024"):
        recon.add(frames, [[64.0, 64.0], [64.0, 4064.0]])  # 4000 px away: a 4k x 4k canvas
    assert recon.n_frames == 0 and recon.pending == 0  # nothing kept from the refused batch
    assert all(c.shape == (128, 128) for c in recon._canvases.values())
