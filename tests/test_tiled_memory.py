"""The embedded Tiled server's memory stays bounded over many runs (issue 11, soak).

Tiled's in-process streaming cache keeps every streamed update (request bodies: canvas
images) for an hour, bounded only by a count of 1000 entries whatever their size: the main
process of bench/soak.py grew by it run after run. The embedded server bounds it in bytes
(``EmbeddedTiled(stream_cache_mib=...)``). Here: a real server over HTTP on 127.0.0.1, runs of
image events written through bluesky's TiledWriter, the cache's size after each run, and a
websocket subscriber still served live.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
from bluesky_tiled_plugins import TiledWriter
from event_model import compose_run

from bluesky_ptychopinn.catalog import EmbeddedTiled

# tiled 0.2.20's own websocket client, under websockets 17
pytestmark = pytest.mark.filterwarnings("ignore:connect\\(\\) must be used:DeprecationWarning")

SIDE = 128  # one float32 image: 64 KiB
EVENTS = 4  # per run: ~0.5 MiB streamed (the images, the table rows, the nodes)
RUNS = 8
BUDGET_MIB = 1.5


def _write_run(writer, seed: int, side: int = SIDE, events: int = EVENTS) -> str:
    rng = np.random.default_rng(seed)
    bundle = compose_run(metadata={"purpose": "memory test"})
    desc = bundle.compose_descriptor(
        name="primary",
        data_keys={"image": {"source": "test", "dtype": "array", "shape": [side, side]},
                   "x": {"source": "test", "dtype": "number", "shape": []}})
    writer("start", bundle.start_doc)
    writer("descriptor", desc.descriptor_doc)
    for k in range(events):
        writer("event", desc.compose_event(
            data={"image": rng.random((side, side), dtype=np.float32), "x": float(k)},
            timestamps={"image": 0.0, "x": 0.0}))
    writer("stop", bundle.compose_stop())
    return bundle.start_doc["uid"]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """One real server (with a 1.5 MiB streaming cache) for the module: starting one takes
    seconds."""
    with EmbeddedTiled(tmp_path_factory.mktemp("tiled") / "catalog",
                       stream_cache_mib=BUDGET_MIB) as server:
        server.writer = TiledWriter(server.client(), batch_size=1)  # each event streamed
        yield server


def test_streaming_cache_stays_within_its_budget(server):
    cache = server.stream_cache
    assert cache is not None and cache.max_bytes == int(BUDGET_MIB * 2**20)
    first = cache.nbytes
    sizes = []
    for k in range(RUNS):
        uid = _write_run(server.writer, seed=k)
        sizes.append(cache.nbytes)
        assert cache.nbytes <= cache.max_bytes
    per_run = sizes[0] - first  # nothing evicted yet: what one run streams
    assert RUNS * per_run > 2 * cache.max_bytes  # tiled's own cache would hold all of it
    # It grew while it filled, then stayed at the budget instead of growing by a run's
    # worth each run.
    assert sizes[1] > sizes[0] and per_run < 0.5 * cache.max_bytes
    assert min(sizes[-3:]) > cache.max_bytes - 1.5 * per_run
    assert cache.too_large == 0
    # The runs themselves are all stored; only the stream cache forgot the old updates.
    client = server.client()
    assert len(client) >= RUNS
    assert client[uid]["primary"]["image"].shape == (EVENTS, SIDE, SIDE)


def test_update_larger_than_the_budget_is_stored_not_cached(server):
    cache = server.stream_cache
    before = cache.too_large
    side = 1024  # one float32 image: 4 MiB, more than the whole budget
    uid = _write_run(server.writer, seed=0, side=side, events=1)
    assert cache.too_large > before and cache.nbytes <= cache.max_bytes
    image = server.client()[uid]["primary"]["image"].read()
    assert image.shape == (1, side, side) and np.isfinite(image).all()


def test_websocket_subscriber_is_served_live_from_the_bounded_cache(server):
    client = server.client()
    created = threading.Event()
    keys = []

    def on_child(update) -> None:  # held here: tiled keeps only a weak reference
        keys.append(update.key)
        created.set()

    sub = client.subscribe()
    sub.child_created.add_callback(on_child)
    sub.start_in_thread()
    try:
        uid = _write_run(server.writer, seed=1)
        assert created.wait(20), "no child-created update over the websocket"
    finally:
        sub.disconnect()
    assert uid in keys
