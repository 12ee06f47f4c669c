"""Property-based: random document streams never raise into the RunEngine, never hang, and
every run the callback opened ends with a stop document (real event-model documents).

Streams start from a valid small run and are then mangled: documents dropped, duplicated or
moved, the ``ptycho`` dictionary's fields removed or given wrong types, frames of random
dtypes and shapes, positions of random values.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
from event_model import compose_run
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bluesky_ptychopinn.callbacks import LiveReconstruction
from bluesky_ptychopinn.devices import sim_beamline

BAD_VALUES = st.one_of(st.none(), st.text(max_size=5), st.integers(-3, 3),
                       st.floats(allow_nan=True, allow_infinity=True), st.lists(st.integers(),
                                                                                 max_size=2))


@pytest.fixture(scope="module")
def setup():
    bl = sim_beamline("cells", seed=1)
    live = LiveReconstruction("default", isolation="thread", refine=None, batch_size=4,
                              torch_threads=1, flush_after_s=0.05)
    derived: list[tuple[str, dict]] = []
    live.subscribe(lambda name, doc: derived.append((name, doc)))
    yield bl, live, derived
    live.close(timeout=30)


frame_dtypes = st.sampled_from([np.float32, np.float64, np.uint16, np.uint32, np.int8,
                                np.float16, np.bool_, np.complex64])


@st.composite
def streams(draw):
    n = draw(st.integers(0, 6))
    md = {"detector_key": "img", "positioner_keys": {"y": "sy", "x": "sx"},
          "energy_ev": 8800.0, "detector_distance_m": 2.0, "detector_pixel_size_m": 75e-6,
          "scan": {"extent_m": [1e-7, 1e-7], "center_m": [0.0, 0.0]}}
    for key in draw(st.lists(st.sampled_from(sorted(md)), max_size=2, unique=True)):
        if draw(st.booleans()):
            md.pop(key)
        else:
            md[key] = draw(BAD_VALUES)
    ptycho = md if draw(st.integers(0, 9)) else draw(BAD_VALUES)
    bundle = compose_run(metadata={"ptycho": ptycho})
    size = draw(st.sampled_from([64, 64, 64, 32, 128]))
    keys = {"img": {"source": "s", "dtype": "array", "shape": [size, size]},
            "sy": {"source": "s", "dtype": "number", "shape": []},
            "sx": {"source": "s", "dtype": "number", "shape": []}}
    desc = bundle.compose_descriptor(name="primary", data_keys=keys)
    docs = [("start", bundle.start_doc), ("descriptor", desc.descriptor_doc)]
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    dtype = draw(frame_dtypes)
    for k in range(n):
        shape = (size, size) if draw(st.integers(0, 5)) else (size // 2, size)
        frame = rng.poisson(5.0, shape).astype(dtype)
        pos = draw(st.tuples(st.floats(-1e-6, 1e-6) | st.just(float("nan")),
                             st.floats(-1e-6, 1e-6)))
        data = {"img": frame, "sy": pos[0], "sx": pos[1]}
        docs.append(("event", desc.compose_event(data=data, timestamps=dict.fromkeys(data, 0.0),
                                                 seq_num=k + 1)))
    docs.append(("stop", bundle.compose_stop()))
    tail = docs[1:]
    for _ in range(draw(st.integers(0, 3))):  # mangle everything after the start
        if not tail:
            break
        i = draw(st.integers(0, len(tail) - 1))
        action = draw(st.sampled_from(["drop", "duplicate", "move"]))
        if action == "drop":
            tail.pop(i)
        elif action == "duplicate":
            tail.insert(draw(st.integers(0, len(tail))), tail[i])
        else:
            tail.insert(draw(st.integers(0, len(tail) - 1)), tail.pop(i))
    return [docs[0], *tail]


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(stream=streams())
def test_random_document_streams_never_raise_or_hang(setup, stream):
    bl, live, derived = setup
    t0 = time.monotonic()
    for name, doc in stream:
        live(name, doc)  # must not raise
    assert time.monotonic() - t0 < 5  # the RunEngine thread only queues
    uid = stream[0][1]["uid"]
    state = live.runs.get(uid)
    if state is None:
        return  # not a ptychography run: no derived run at all
    has_stop = any(name == "stop" for name, _ in stream)
    if has_stop:
        state = live.wait(uid, timeout=60)  # never hangs
        stops = [d for n, d in derived if n == "stop" and d["run_start"] == state.derived_uid]
        assert len(stops) == 1  # exactly one stop, even for a duplicated raw stop
        if stops[0]["exit_status"] == "success":
            assert state.frames_done > 0  # never "success" for work not done
