"""A data key whose type or shape changes in the middle of a run (review of
``catalog/_spool.py``): the run is still delivered whole, the values that fit their column are
kept (converted where that loses nothing), the rest are left out or filled, and the change is
logged once and listed in the run's ``notes`` in Tiled.

``TiledWriter`` types a column by the first batch it writes; without the spool's fitting, a
value of another type fails a whole batch, the writer keeps that batch, and the stop document
fails with it: the run never reaches Tiled (or, across batches, Tiled answers 500 and the spool
takes that for an outage without end).

Real RunEngine and event-model documents, a real Tiled server over HTTP (one child process for
the module).
"""

from __future__ import annotations

import bluesky.plan_stubs as bps
import httpx
import numpy as np
import pandas as pd
import pytest
from _tiled_process import module_server
from bluesky import RunEngine
from bluesky_tiled_plugins import TiledWriter
from event_model import compose_run, pack_event_page
from ophyd import Signal
from ophyd.sim import det

from bluesky_ptychopinn.catalog import SpooledWriter

server = module_server("spool-types")


@pytest.fixture(scope="module")
def client(server):
    return server.client()


def _writer(client, tmp_path, batch_size: int) -> SpooledWriter:
    return SpooledWriter(TiledWriter(client, batch_size=batch_size), spool_dir=tmp_path,
                         label="raw", probe_interval_s=0.2, min_free_bytes=0)


def _table(client, uid: str, stream: str = "primary"):
    return client[uid][stream].base["internal"].read().sort_values("seq_num")


def _uid(docs) -> str:
    return next(d for n, d in docs if n == "start")["uid"]


def _scan_with_a_changing_signal(values) -> list[tuple[str, dict]]:
    """A RunEngine run reading ``det`` and a signal put to each of ``values`` in turn (a PV
    that reports an int, then a float, then text)."""
    sig = Signal(name="x", value=values[0])
    docs: list[tuple[str, dict]] = []
    RE = RunEngine()
    RE.subscribe(lambda name, doc: docs.append((name, doc)))

    def plan():
        yield from bps.open_run()
        for value in values:
            yield from bps.mv(sig, value)
            yield from bps.trigger_and_read([det, sig])
        yield from bps.close_run()

    RE(plan())
    return docs


@pytest.mark.parametrize("batch_size", [2, 10])  # across batches / within one batch
def test_a_signal_whose_type_changes_mid_run_does_not_lose_the_run(client, tmp_path, caplog,
                                                                   batch_size):
    values = [1, 2, 3, 2.5, 4.0, "n/a", 5]
    docs = _scan_with_a_changing_signal(values)
    desc = next(d for n, d in docs if n == "descriptor")
    assert desc["data_keys"]["x"]["dtype"] == "integer"  # as ophyd describes the first value
    writer = _writer(client, tmp_path, batch_size)
    with caplog.at_level("WARNING", logger="bluesky_ptychopinn.catalog"):
        for name, doc in docs:
            writer(name, doc)
        assert writer.flush(30), writer.status()
    uid = _uid(docs)
    table = _table(client, uid)
    assert table["seq_num"].tolist() == list(range(1, 8))  # every event, once
    dets = [d["data"]["det"] for n, d in docs if n == "event"]
    np.testing.assert_array_equal(table["det"].to_numpy(), dets)  # the other key untouched
    x = table["x"].tolist()
    # ints kept, 4.0 converted to 4, 2.5 and "n/a" left out (nulls in the integer column)
    assert [x[i] for i in (0, 1, 2, 4, 6)] == [1, 2, 3, 4, 5]
    assert pd.isna(x[3]) and pd.isna(x[5]), x
    assert client[uid].metadata["stop"]["exit_status"] == "success"
    assert writer.stats.values_dropped == 2 and writer.stats.rejected == 0
    notes = client[uid].metadata["notes"]
    assert any("'x'" in n and "float left out" in n and "seq_num 4" in n for n in notes), notes
    assert any("'x'" in n and "str left out" in n and "seq_num 6" in n for n in notes), notes
    assert any("'x'" in n and "converted from float" in n for n in notes), notes
    warned = [r.message for r in caplog.records if "left out of their events" in r.message]
    assert len(warned) == 2, warned  # one per kind of change, not one per value
    assert not list(tmp_path.glob("*/*.journal"))  # delivered and verified
    writer.close()


def test_a_number_key_that_starts_as_ints_keeps_its_floats(client, tmp_path):
    """A key declared ``number`` whose first batch holds only ints (and a first batch of
    nulls) used to type its column int64 (or text); the floats of later batches then failed.
    Declared floats are kept as floats: nothing is lost, nothing said beyond a note."""
    keys = {"x": {"source": "sim", "dtype": "number", "shape": []},
            "y": {"source": "sim", "dtype": "number", "shape": []}}
    bundle = compose_run()
    desc = bundle.compose_descriptor(name="primary", data_keys=keys)
    xs = [1, 2, 3, 4.5, 5.5, 6.5]
    ys = [None, None, 3.0, 4.0, 5.0, 6.0]
    events = [desc.compose_event(data={"x": x, "y": y}, timestamps={"x": 0.0, "y": 0.0},
                                 seq_num=k) for k, (x, y) in enumerate(zip(xs, ys, strict=True), 1)]
    writer = _writer(client, tmp_path, batch_size=2)
    for name, doc in [("start", bundle.start_doc), ("descriptor", desc.descriptor_doc),
                      ("event_page", pack_event_page(*events[:2])),  # a page too
                      *[("event", e) for e in events[2:]], ("stop", bundle.compose_stop())]:
        writer(name, doc)
    assert writer.flush(30), writer.status()
    table = _table(client, bundle.start_doc["uid"])
    assert table["seq_num"].tolist() == list(range(1, 7))
    assert table["x"].dtype == np.float64 and table["x"].tolist() == xs
    assert table["y"].dtype == np.float64  # not text
    np.testing.assert_array_equal(table["y"].to_numpy(), [np.nan, np.nan, 3, 4, 5, 6])
    assert writer.stats.values_dropped == 0
    writer.close()


def test_an_array_whose_shape_changes_is_filled_and_rows_stay_aligned(client, tmp_path,
                                                                      caplog):
    """An array key stored as a zarr array (over 16 elements) whose shape changes mid-run:
    the odd value is replaced by NaN of the column's shape (a row per event, as Tiled's run
    is verified), the others are stored exactly."""
    keys = {"spectrum": {"source": "sim", "dtype": "array", "shape": [32],
                         "dtype_numpy": "<f8"},
            "n": {"source": "sim", "dtype": "integer", "shape": []}}
    bundle = compose_run()
    desc = bundle.compose_descriptor(name="primary", data_keys=keys)
    arrays = [np.arange(32.0) + k for k in range(5)]
    arrays[2] = np.arange(33.0)  # one frame of another shape
    events = [desc.compose_event(data={"spectrum": a, "n": k},
                                 timestamps={"spectrum": 0.0, "n": 0.0}, seq_num=k + 1)
              for k, a in enumerate(arrays)]
    writer = _writer(client, tmp_path, batch_size=10)
    with caplog.at_level("WARNING", logger="bluesky_ptychopinn.catalog"):
        for name, doc in [("start", bundle.start_doc), ("descriptor", desc.descriptor_doc),
                          *[("event", e) for e in events], ("stop", bundle.compose_stop())]:
            writer(name, doc)
        assert writer.flush(30), writer.status()
    run = client[bundle.start_doc["uid"]]
    stored = run["primary"].base["spectrum"].read()
    assert stored.shape == (5, 32)
    for k in (0, 1, 3, 4):
        np.testing.assert_array_equal(stored[k], arrays[k])
    assert np.isnan(stored[2]).all()
    assert _table(client, bundle.start_doc["uid"])["n"].tolist() == [0, 1, 2, 3, 4]
    assert writer.stats.values_dropped == 1
    assert any("'spectrum'" in n and "(33,)" in n for n in run.metadata["notes"])
    assert sum("replaced by NaN" in r.message for r in caplog.records) == 1
    writer.close()


def test_a_replayed_run_is_fitted_again_and_counted_once(client, tmp_path):
    """A lost reply makes the spool delete and replay the run: the replay's fresh writer gets
    the same fitted values, and the loss is counted and noted once."""
    docs = _scan_with_a_changing_signal([1, 2, "n/a", 3, 4, 5])
    writer = _writer(client, tmp_path, batch_size=2)
    make = writer._delivery.new_writer
    calls = {"n": 0}

    def writer_losing_one_reply():
        inner = make()

        def write(name, doc):
            inner(name, doc)  # reaches Tiled ...
            calls["n"] += 1
            if calls["n"] == 6:  # ... but the caller sees the connection drop
                raise httpx.ReadError("connection reset after the request was sent")
        return write

    writer._delivery.new_writer = writer_losing_one_reply
    for name, doc in docs:
        writer(name, doc)
    assert writer.flush(60), writer.status()
    assert writer.stats.replays == 1
    uid = _uid(docs)
    assert _table(client, uid)["seq_num"].tolist() == list(range(1, 7))
    assert writer.stats.values_dropped == 1
    notes = [n for n in client[uid].metadata["notes"] if n.startswith("spool:")]
    assert len(notes) == 1 and "1 value(s) of 'x'" in notes[0], notes
    writer.close()
