"""Resuming a checkpoint continues the same training, or says why it cannot.

A checkpoint directory resumed with other data used to continue silently: its best validation
loss, measured on other samples, could never be beaten, so the run returned the old weights.
"""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from bluesky_ptychopinn import physics
from bluesky_ptychopinn.errors import InvalidInputError
from bluesky_ptychopinn.models import ptychopinn
from bluesky_ptychopinn.training import GroupedSamples, TrainConfig, TrainingExperiment, train

N = 32
CFG = {"batch_size": 8, "progress": False, "max_batches_per_epoch": 3, "device": "cpu",
       "val_fraction": 0.2}


def _data(seed: int = 0, probe_name: str = "airy", photons: float = 1e5) -> GroupedSamples:
    rng = np.random.default_rng(seed)
    obj = np.exp(1j * rng.uniform(-0.5, 0.5, (80, 80))).astype(np.complex64)
    probe = physics.make_probe(probe_name, N, 40e-9, 8_800)
    pos = physics.scan_pattern("raster", (24.0, 24.0), step=4.0) + 28
    sim = physics.simulate_diffraction(obj, probe, pos, photons=photons, seed=seed)
    exp = TrainingExperiment(counts=sim.counts, positions=pos, probe=torch.from_numpy(probe),
                             probe_name=probe_name)
    return GroupedSamples([exp], channels=1, grouping="single")


def _model(base_width: int = 4):
    torch.manual_seed(0)
    return ptychopinn(frame_size=N, channels=1, base_width=base_width, depth=2)


def _files(path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


@pytest.fixture
def checkpoint(tmp_path):
    """A checkpoint of 2 epochs on ``_data(0)``, and its files' bytes."""
    ckpt = tmp_path / "ckpt"
    train(_model(), _data(0), TrainConfig(epochs=2, checkpoint_dir=str(ckpt), **CFG))
    return ckpt, _files(ckpt)


def test_the_same_training_resumes_and_records_what_it_was(checkpoint):
    ckpt, _ = checkpoint
    key = json.loads((ckpt / "trainer_state.json").read_text())["resume_key"]
    assert key["model"]["base_width"] == 4 and key["data"]["samples"] == 49
    assert len(key["data"]["digest"]) == 32
    result = train(_model(), _data(0), TrainConfig(epochs=3, checkpoint_dir=str(ckpt), **CFG))
    assert [h["epoch"] for h in result.history] == [1, 2, 3]


@pytest.mark.parametrize("other", [
    pytest.param({"data": {"seed": 1}}, id="other counts"),
    pytest.param({"data": {"probe_name": "kb"}}, id="other probe"),
    pytest.param({"data": {"photons": 1e4}}, id="other dose"),
])
def test_other_data_is_refused_and_the_checkpoint_kept(checkpoint, other):
    ckpt, before = checkpoint
    with pytest.raises(InvalidInputError, match=r"different training \(data: 49 samples"):
        train(_model(), _data(**other["data"]),
              TrainConfig(epochs=3, checkpoint_dir=str(ckpt), **CFG))
    assert _files(ckpt) == before


def test_another_network_is_refused_by_name_not_by_a_torch_error(checkpoint):
    ckpt, before = checkpoint
    with pytest.raises(InvalidInputError, match=r"network base_width 4 -> 8"):
        train(_model(base_width=8), _data(0),
              TrainConfig(epochs=3, checkpoint_dir=str(ckpt), **CFG))
    assert _files(ckpt) == before


@pytest.mark.parametrize("setting", [{"seed": 3}, {"val_fraction": 0.3}, {"loss": "mae"}])
def test_another_split_or_loss_is_refused(checkpoint, setting):
    """The seed and the fraction choose the validation samples: the saved best loss was
    measured on others. Another loss is another number altogether."""
    ckpt, before = checkpoint
    name, value = next(iter(setting.items()))
    with pytest.raises(InvalidInputError, match=rf"{name} .* -> {value!r}"):
        train(_model(), _data(0),
              TrainConfig(epochs=3, checkpoint_dir=str(ckpt), **{**CFG, **setting}))
    assert _files(ckpt) == before


def test_a_lower_learning_rate_on_resume_is_allowed_and_logged(checkpoint, caplog):
    ckpt, _ = checkpoint
    with caplog.at_level(logging.WARNING, logger="bluesky_ptychopinn.training._resume"):
        result = train(_model(), _data(0), TrainConfig(epochs=3, lr=1e-4, patience=2,
                                                       checkpoint_dir=str(ckpt), **CFG))
    assert len(result.history) == 3 and result.history[-1]["lr"] <= 1e-4  # the new rate
    messages = [r.getMessage() for r in caplog.records]
    assert any("lr 0.001 -> 0.0001" in m for m in messages), messages
    assert not any("patience" in m or "epochs" in m for m in messages), messages


def test_a_checkpoint_from_before_the_record_resumes_with_a_warning(checkpoint, caplog):
    ckpt, _ = checkpoint
    state = json.loads((ckpt / "trainer_state.json").read_text())
    del state["resume_key"]
    (ckpt / "trainer_state.json").write_text(json.dumps(state))
    with caplog.at_level(logging.WARNING, logger="bluesky_ptychopinn.training._resume"):
        result = train(_model(), _data(0),
                       TrainConfig(epochs=3, checkpoint_dir=str(ckpt), **CFG))
    assert len(result.history) == 3
    assert any("without checking" in r.getMessage() for r in caplog.records)


def test_train_cli_into_an_output_trained_on_another_probe_fails_with_one_line(tmp_path):
    """`train OUTPUT --probe airy` then `train OUTPUT --probe kb`: the second used to resume
    the first's checkpoint with the other probe's data."""
    from bluesky_ptychopinn.cli import app

    out = tmp_path / "model"
    common = ["--class", "dead_leaves", "--objects-per-class", "1", "--object-size", "96",
              "--epochs", "1", "--finetune-epochs", "0", "--channels", "1", "--base-width",
              "4", "-N", "32", "--device", "cpu"]
    runner = CliRunner()
    first = runner.invoke(app, ["train", str(out), "--probe", "airy", *common])
    assert first.exit_code == 0, first.output
    before = _files(out / "checkpoint")
    second = runner.invoke(app, ["train", str(out), "--probe", "kb", *common])
    assert second.exit_code == 2, second.output
    assert "error:" in second.output and "different training (data:" in second.output
    assert "--no-resume" in second.output and "Traceback" not in second.output
    assert _files(out / "checkpoint") == before
