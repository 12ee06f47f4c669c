"""``LiveReconstruction(model="auto")``: each run is reconstructed by the registered model
trained on the probe it references; otherwise the default model, and the derived run says so.
A tiny model is really trained (seconds) on synthetic objects with a beamline probe none of the
shipped models know, saved into a user registry, and chosen for the next scan."""

from __future__ import annotations

import numpy as np
import pytest
from bluesky import RunEngine

from bluesky_ptychopinn.callbacks import LiveReconstruction
from bluesky_ptychopinn.devices import sim_beamline
from bluesky_ptychopinn.models import ModelRegistry, ptychopinn, save_model
from bluesky_ptychopinn.models._checkpoint import read_model_card
from bluesky_ptychopinn.plans import ptycho_scan
from bluesky_ptychopinn.training import GroupedSamples, TrainConfig, synthetic_experiments

NEW_PROBE = "beamline_7_kb_2026"


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    bl = sim_beamline("cells", probe="kb", seed=0)
    probe = bl.probe.numpy() if hasattr(bl.probe, "numpy") else np.asarray(bl.probe)
    experiments = synthetic_experiments({NEW_PROBE: probe}, ("dead_leaves",),
                                        objects_per_class=1, object_shape=(96, 96), seed=0)
    from bluesky_ptychopinn.training import train

    model = ptychopinn(frame_size=probe.shape[-1], channels=1, base_width=4, depth=2)
    result = train(model, GroupedSamples(experiments, channels=1, grouping="single", seed=0),
                   TrainConfig(epochs=1, batch_size=8, max_batches_per_epoch=2, seed=0))
    save_model(result.model, root / "beamline7", provenance={
        "training_data": {"kind": "probe-centric synthetic", "probes": [{"name": NEW_PROBE}]}})
    return ModelRegistry(root)


def _derived_start(live, bl, tmp_path, reference):
    RE = RunEngine()
    RE.subscribe(live)
    docs = []
    live.subscribe(lambda name, doc: docs.append((name, doc)))
    dx = bl.pixel_size_m
    (uid,) = RE(ptycho_scan(bl.detector, bl.stage, geometry=bl.ptycho_metadata(reference),
                            pattern="raster", extent_m=(3 * 5 * dx,) * 2, step_m=5 * dx))
    state = live.wait(uid, timeout=120)
    live._subscribers.pop()
    start = next(d for n, d in docs if n == "start" and d["uid"] == state.derived_uid)
    stop = next(d for n, d in docs if n == "stop" and d["run_start"] == state.derived_uid)
    return start, stop


def test_the_model_trained_on_the_runs_probe_is_chosen(registry, monkeypatch, tmp_path):
    monkeypatch.setenv("PTYCHOPINN_MODELS", str(registry.root))
    card = read_model_card(registry.path("beamline7"))
    assert card["provenance"]["training_data"]["probes"][0]["name"] == NEW_PROBE
    bl = sim_beamline("cells", probe="kb", write_path=tmp_path, seed=1)
    live = LiveReconstruction(isolation="thread", refine=None, torch_threads=1)  # model="auto"
    try:
        start, stop = _derived_start(live, bl, tmp_path, NEW_PROBE)
        assert start["model"]["name"] == "beamline7" and start["model"]["trained_on_run_probe"]
        assert NEW_PROBE in start["model"]["chosen"]
        assert start["model"]["weights_sha256_verified"]
        assert stop["exit_status"] == "success"
        other, stop = _derived_start(live, bl, tmp_path, "a_probe_nobody_trained_on")
        assert other["model"]["name"] == "default"
        assert not other["model"]["trained_on_run_probe"]
        assert "no registered model was trained" in other["model"]["chosen"]
        assert stop["exit_status"] == "success"
    finally:
        live.close()


def _retrained(registry, root, name="beamline7", probes=(NEW_PROBE,), shift=0.01):
    """The registered network with every weight moved, saved again (as a retrain would)."""
    import torch

    model, _ = registry.load(name)
    with torch.no_grad():
        for weight in model.parameters():
            weight.add_(shift)
    save_model(model, root / name, provenance={
        "training_data": {"kind": "probe-centric synthetic",
                          "probes": [{"name": p} for p in probes]}})
    return root / name


def test_a_model_saved_again_during_the_session_reconstructs_the_next_run(
        registry, monkeypatch, tmp_path):
    import shutil

    from bluesky_ptychopinn.models import verify_model

    root = tmp_path / "models"
    shutil.copytree(registry.root, root)
    monkeypatch.setenv("PTYCHOPINN_MODELS", str(root))
    bl = sim_beamline("cells", probe="kb", write_path=tmp_path, seed=1)
    live = LiveReconstruction(isolation="thread", refine=None, torch_threads=1)
    try:
        first, _ = _derived_start(live, bl, tmp_path, NEW_PROBE)
        path = _retrained(ModelRegistry(root), root)
        second, stop = _derived_start(live, bl, tmp_path, NEW_PROBE)
    finally:
        live.close()
    assert first["model"]["name"] == second["model"]["name"] == "beamline7"
    # The run names the model as it is now, and the reconstruction loaded that very network
    # (it refuses one whose hashes differ from the description: the run would have failed).
    assert second["model"]["sha256"] == verify_model(path).sha256 != first["model"]["sha256"]
    assert stop["exit_status"] == "success"


def test_a_model_changed_between_choice_and_load_fails_the_run_not_silently():
    from bluesky_ptychopinn.callbacks._serve import _model
    from bluesky_ptychopinn.errors import CheckpointError
    from bluesky_ptychopinn.models import verify_model

    path = str(ModelRegistry().path("default"))
    models: dict = {}
    chosen = {"sha256": verify_model(path).sha256}
    assert _model(models, path, chosen) is _model(models, path, chosen)  # loaded once
    with pytest.raises(CheckpointError, match="changed on disk since it was chosen"):
        _model(models, path, {"sha256": "0" * 64})


def test_the_choice_follows_cards_edited_on_disk(registry, tmp_path):
    import shutil

    from bluesky_ptychopinn.callbacks._model_choice import choose_model
    from bluesky_ptychopinn.metadata import PtychoMetadata

    root = tmp_path / "models"
    shutil.copytree(registry.root, root)
    local = ModelRegistry(root)
    bl = sim_beamline("cells", probe="kb", seed=0)
    md = PtychoMetadata.parse(bl.ptycho_metadata(NEW_PROBE))
    assert choose_model(md, local).name == "beamline7"
    # Retrained for another probe in the same directory: the next choice reads the new card.
    _retrained(local, root, probes=("some_other_probe",))
    assert not choose_model(md, local).matched
    # A new model for the probe appears: chosen, without restarting anything.
    _retrained(local, root, name="beamline7", probes=(NEW_PROBE, "some_other_probe"))
    shutil.copytree(root / "beamline7", root / "beamline7_only")
    _retrained(ModelRegistry(root), root, name="beamline7_only", probes=(NEW_PROBE,))
    assert choose_model(md, local).name == "beamline7_only"  # trained on that probe alone
