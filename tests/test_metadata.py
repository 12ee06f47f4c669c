"""The ``ptycho`` start-document dictionary: one type validates it for plans and callback."""

from __future__ import annotations

import pytest
from bluesky import RunEngine

from bluesky_ptychopinn.callbacks import LiveReconstruction
from bluesky_ptychopinn.devices import sim_beamline
from bluesky_ptychopinn.metadata import InvalidMetadataError, PtychoMetadata
from bluesky_ptychopinn.plans import ptycho_scan

GOOD = {"detector_key": "det_image", "positioner_keys": {"y": "sy", "x": "sx"},
        "energy_ev": 8800.0, "detector_distance_m": 2.0, "detector_pixel_size_m": 75e-6}


def test_a_valid_dictionary_round_trips_and_keeps_unknown_keys():
    md = PtychoMetadata.parse({**GOOD, "position_units": "um", "beamline_note": "x"})
    assert md.position_scale_m == 1e-6 and md.position_sign == 1
    assert md.to_document()["beamline_note"] == "x"
    assert PtychoMetadata.parse(md.to_document()) == md


@pytest.mark.parametrize("bad, field", [
    ({k: v for k, v in GOOD.items() if k != "energy_ev"}, "ptycho.energy_ev"),
    ({**GOOD, "positioner_keys": {"y": "sy"}}, "ptycho.positioner_keys.x"),
    ({**GOOD, "detector_distance_m": -1.0}, "ptycho.detector_distance_m"),
    ({**GOOD, "position_units": "furlong"}, "ptycho.position_units"),
])
def test_a_bad_field_is_named(bad, field):
    with pytest.raises(InvalidMetadataError, match=field.replace(".", r"\.")):
        PtychoMetadata.parse(bad)


def test_a_non_dictionary_says_what_was_expected():
    with pytest.raises(InvalidMetadataError, match="expected a dictionary.*str"):
        PtychoMetadata.from_start({"uid": "u", "ptycho": "yes"})
    assert PtychoMetadata.from_start({"uid": "u"}) is None  # not a ptychography run


def test_overrides_apply_only_to_runs_that_declare_ptycho_metadata():
    assert PtychoMetadata.from_start({"uid": "u"}, detector_key="other") is None
    md = PtychoMetadata.from_start({"uid": "u", "ptycho": GOOD}, detector_key="other")
    assert md.detector_key == "other"


def test_plans_write_what_the_callback_reads(tmp_path):
    bl = sim_beamline("cells", write_path=tmp_path)
    geometry = {k: v for k, v in bl.ptycho_metadata().items() if k != "energy_ev"}
    with pytest.raises(InvalidMetadataError, match="energy_ev"):
        list(ptycho_scan(bl.detector, bl.stage, geometry={**geometry, "energy_ev": -5},
                         pattern="raster", extent_m=(1e-7, 1e-7), step_m=1e-7))


def test_a_start_document_with_a_missing_field_fails_its_derived_run_at_once(tmp_path):
    """No KeyError deep in the reconstruction, no derived run left open: the derived run
    stops with "fail" and names the field, the scan itself succeeds."""
    bl = sim_beamline("cells", write_path=tmp_path)
    raw = []
    RE = RunEngine()
    RE.subscribe(lambda name, doc: raw.append((name, doc)))
    dx = bl.pixel_size_m
    RE(ptycho_scan(bl.detector, bl.stage, geometry=bl.ptycho_metadata(), pattern="raster",
                   extent_m=(3 * 5 * dx,) * 2, step_m=5 * dx))
    start = dict(raw[0][1])
    start["ptycho"] = {k: v for k, v in start["ptycho"].items() if k != "detector_distance_m"}
    live = LiveReconstruction("default", isolation="thread", refine=None, torch_threads=1)
    docs = []
    live.subscribe(lambda name, doc: docs.append((name, doc)))
    try:
        for name, doc in [("start", start), *raw[1:]]:
            live(name, doc)
        state = live.wait(timeout=30)
    finally:
        live.close()
    assert state.raw_uid == start["uid"] and "ptycho.detector_distance_m" in state.failed
    assert [n for n, _ in docs] == ["start", "stop"]
    assert docs[0][1]["original_run_uid"] == start["uid"]
    assert docs[-1][1]["exit_status"] == "fail"
    assert "ptycho.detector_distance_m" in docs[-1][1]["reason"]


BAD_PTYCHO = [
    *[({k: v for k, v in GOOD.items() if k != key}, f"ptycho.{key}") for key in GOOD],
    ({**GOOD, "energy_ev": "8.8 keV"}, "ptycho.energy_ev"),
    ({**GOOD, "energy_ev": 0}, "ptycho.energy_ev"),
    ({**GOOD, "detector_pixel_size_m": None}, "ptycho.detector_pixel_size_m"),
    ({**GOOD, "detector_pixel_size_m": [75e-6]}, "ptycho.detector_pixel_size_m"),
    ({**GOOD, "detector_key": ""}, "ptycho.detector_key"),
    ({**GOOD, "detector_key": 7}, "ptycho.detector_key"),
    ({**GOOD, "positioner_keys": ["sy", "sx"]}, "ptycho.positioner_keys"),
    ({**GOOD, "positioner_keys": {"x": "sx"}}, "ptycho.positioner_keys.y"),
    ({**GOOD, "positioner_keys": {"y": "", "x": "sx"}}, "ptycho.positioner_keys.y"),
    ({**GOOD, "position_units": "inch"}, "ptycho.position_units"),
    ({**GOOD, "position_sign": 0}, "ptycho.position_sign"),
    ({**GOOD, "dc_position": "middle"}, "ptycho.dc_position"),
    ({**GOOD, "frame_size": 0}, "ptycho.frame_size"),
    ({**GOOD, "frame_size": 64.5}, "ptycho.frame_size"),
    ({**GOOD, "scan": "raster"}, "ptycho.scan"),
    ("yes", "expected a dictionary"),
    (None, "expected a dictionary"),
    ([GOOD], "expected a dictionary"),
]


@pytest.fixture(scope="module")
def live():
    live = LiveReconstruction("default", isolation="thread", refine=None, torch_threads=1)
    yield live
    live.close()


@pytest.mark.parametrize("ptycho, field", BAD_PTYCHO)
def test_each_bad_ptycho_dictionary_fails_its_derived_run_at_once_naming_it(live, ptycho,
                                                                            field):
    from event_model import compose_run

    bundle = compose_run(metadata={"ptycho": ptycho})
    out = []
    live.subscribe(lambda name, doc: out.append((name, doc)))
    live("start", bundle.start_doc)
    state = live.wait(bundle.start_doc["uid"], timeout=10)  # at once: no stop needed
    live("stop", bundle.compose_stop())
    live._subscribers.pop()
    assert field in state.failed
    assert [n for n, _ in out] == ["start", "stop"] and out[1][1]["exit_status"] == "fail"
