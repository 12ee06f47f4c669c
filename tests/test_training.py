"""Training loop: learning, determinism, resume, multi-probe routing and DDP under torchrun."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from bluesky_ptychopinn import physics
from bluesky_ptychopinn.errors import InvalidInputError
from bluesky_ptychopinn.models import ptychopinn
from bluesky_ptychopinn.training import GroupedSamples, TrainConfig, TrainingExperiment, train


def _experiment(seed, probe_name="airy", n=32, photons=1e5):
    rng = np.random.default_rng(seed)
    from scipy import ndimage

    base = ndimage.gaussian_filter(rng.uniform(size=(96, 96)), 2)
    base = (base - base.min()) / np.ptp(base)
    obj = ((1.1 - 0.3 * base) * np.exp(1j * (2 * base - 1))).astype(np.complex64)
    probe = physics.make_probe(probe_name, n, 40e-9, 8_800)
    pos = physics.scan_pattern("jittered_raster", (40.0, 40.0), step=4.0, seed=seed) + 48
    sim = physics.simulate_diffraction(obj, probe, pos, photons=photons, seed=seed)
    return TrainingExperiment(counts=sim.counts, positions=pos, probe=torch.from_numpy(probe),
                              truth=obj, probe_name=probe_name)


def _weights(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()])


CFG = {"batch_size": 8, "progress": False, "max_batches_per_epoch": 12}


def test_unsupervised_training_reduces_the_physics_loss():
    data = GroupedSamples([_experiment(0), _experiment(1)], channels=4, grouping="quadrant")
    model = ptychopinn(frame_size=32, channels=4, base_width=4, depth=2)
    result = train(model, data, TrainConfig(epochs=4, lr=2e-3, **CFG))
    losses = [h["loss"] for h in result.history]
    assert losses[-1] < 0.8 * losses[0], losses
    assert all(np.isfinite(h["val_loss"]) for h in result.history)
    assert result.patterns_per_s > 0


def test_progress_prints_batch_and_epoch_lines_when_output_is_not_a_terminal(capsys):
    """A batch-job log shows progress within an epoch (per batch, at most every
    ``log_every_s``) and one line per epoch, each with an ETA."""
    data = GroupedSamples([_experiment(0)], channels=1, grouping="single")
    model = ptychopinn(frame_size=32, channels=1, base_width=4, depth=2)
    train(model, data, TrainConfig(epochs=2, batch_size=8, max_batches_per_epoch=3,
                                   progress=True, log_every_s=0))
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("epoch ")]
    epochs = [line for line in lines if " batch " not in line]
    batches = [line for line in lines if " batch " in line]
    assert [line.split(":")[0] for line in epochs] == ["epoch 1/2", "epoch 2/2"]
    assert [line.split(" loss")[0] for line in batches] == [
        f"epoch {e} batch {b}/3" for e in (1, 2) for b in (1, 2, 3)]
    assert all("loss" in line and "patt/s" in line and "ETA" in line for line in lines)
    assert epochs[-1].endswith("ETA 00:00:00")


def test_the_eta_follows_the_recent_batch_rate_not_a_slow_start():
    """A first epoch slowed by a contended machine does not set the ETA: it is the remaining
    batches times the median of the recent batch durations."""
    from bluesky_ptychopinn.training._progress import TrainingProgress

    progress = TrainingProgress(False, total_batches=1_000, window=50)
    for _ in range(100):  # contended: 3 s a batch
        progress.batch(1, 1, 100, loss=1.0, seconds=3.0, patterns=8)
    assert progress.eta_s() == pytest.approx(900 * 3.0)
    for _ in range(100):  # the machine is free again: 0.5 s a batch
        progress.batch(2, 1, 100, loss=1.0, seconds=0.5, patterns=8)
    progress.batch(3, 1, 100, loss=1.0, seconds=60.0, patterns=8)  # one stalled batch
    assert progress.eta_s() == pytest.approx(799 * 0.5)


def test_training_is_deterministic_with_a_seed():
    data = GroupedSamples([_experiment(0)], channels=1, grouping="single")
    runs = []
    for _ in range(2):
        torch.manual_seed(123)
        model = ptychopinn(frame_size=32, channels=1, base_width=4, depth=2)
        runs.append(_weights(train(model, data, TrainConfig(epochs=2, seed=5, **CFG)).model))
    assert torch.equal(runs[0], runs[1])


def test_resume_continues_where_it_stopped(tmp_path):
    data = GroupedSamples([_experiment(0)], channels=1, grouping="single")
    torch.manual_seed(1)
    straight = train(ptychopinn(frame_size=32, channels=1, base_width=4, depth=2), data,
                     TrainConfig(epochs=3, seed=2, val_fraction=0, schedule="constant", **CFG))
    torch.manual_seed(1)
    ckpt = str(tmp_path / "ckpt")
    first = ptychopinn(frame_size=32, channels=1, base_width=4, depth=2)
    train(first, data, TrainConfig(epochs=2, seed=2, val_fraction=0, schedule="constant",
                              checkpoint_dir=ckpt, **CFG))
    resumed = train(ptychopinn(frame_size=32, channels=1, base_width=4, depth=2), data,
                    TrainConfig(epochs=3, seed=2, val_fraction=0, schedule="constant",
                                checkpoint_dir=ckpt, **CFG))
    assert len(resumed.history) == 3
    torch.testing.assert_close(_weights(resumed.model), _weights(straight.model))


def test_samples_are_routed_to_their_own_probe_and_finetune_freezes_the_encoder(tmp_path):
    experiments = [_experiment(0, "airy"), _experiment(1, "kb")]
    data = GroupedSamples(experiments, channels=4, grouping="random")
    counts, offsets, e, members = data[len(data) - 1]
    assert e == 1 and torch.equal(data.probes[1, :1], experiments[1].probe)
    model = ptychopinn(frame_size=32, channels=4, base_width=4, depth=2)
    log = tmp_path / "log.csv"
    train(model, data, TrainConfig(epochs=0, finetune_epochs=1, log_csv=str(log), **CFG))
    before = _weights(model.encoder).clone()
    train(model, data, TrainConfig(epochs=0, finetune_epochs=1, **CFG))
    assert torch.equal(before, _weights(model.encoder))  # frozen during fine-tuning
    assert "patterns_per_s" in log.read_text().splitlines()[0]


def test_supervised_baseline_trains_on_true_patches():
    data = GroupedSamples([_experiment(0)], channels=1, grouping="single")
    model = ptychopinn(frame_size=32, channels=1, base_width=4, depth=2)
    result = train(model, data, TrainConfig(epochs=3, loss="supervised", lr=2e-3, **CFG))
    assert result.history[-1]["loss"] < result.history[0]["loss"]


def test_mismatched_data_and_model_are_clear_errors():
    data = GroupedSamples([_experiment(0)], channels=1, grouping="single")
    with pytest.raises(InvalidInputError, match="channels"):
        train(ptychopinn(frame_size=32, channels=4, base_width=4, depth=2), data)
    with pytest.raises(InvalidInputError, match="frame size"):
        train(ptychopinn(frame_size=64, channels=1, base_width=4), data)
    with pytest.raises(InvalidInputError, match="does not fit"):
        GroupedSamples([_experiment(0)], channels=4, grouping="single")


def test_ddp_with_two_gloo_processes_ends_with_identical_weights(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", "29533",
           "-m", "bluesky_ptychopinn.training._ddp_smoke", str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert {r["world"] for r in ranks} == {2}
    assert ranks[0]["sha256"] == ranks[1]["sha256"]
    assert ranks[0]["loss"] != ranks[1]["loss"]  # each rank saw its own shard


def test_train_resamples_a_library_probe_measured_with_larger_frames(tmp_path):
    """`train --probe NAME -N 64` with a 128-px library probe once failed after simulating."""
    from pathlib import Path

    from bluesky_ptychopinn.io import ProbeLibrary
    from bluesky_ptychopinn.models._checkpoint import read_model_card

    library = tmp_path / "probes"
    ProbeLibrary(library).add("measured128", physics.make_probe("zone_plate", 128, 20e-9, 8800),
                              energy_ev=8800, pixel_size_m=20e-9)
    cli = str(Path(sys.executable).with_name("bluesky-ptychopinn"))
    done = subprocess.run([cli, "train", str(tmp_path / "model"), "--probe", "measured128",
                           "-N", "64", "--class", "dead_leaves", "--objects-per-class", "1",
                           "--epochs", "1", "--channels", "1", "--base-width", "4",
                           "--device", "cpu"], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PTYCHOPINN_PROBE_LIBRARY": str(library)})
    assert done.returncode == 0, done.stdout + done.stderr
    assert "128 px resampled to 64 px" in done.stdout + done.stderr
    card = read_model_card(tmp_path / "model")
    assert card["architecture"]["frame_size"] == 64
    assert card["provenance"]["training_data"]["probes"][0]["name"] == "measured128"


def test_train_cli_defaults_are_the_shipped_recipe():
    """`bluesky-ptychopinn train` and scripts/train_default_model.py call the same function
    with the same defaults (2 vs 4 objects per class and fine-tune 0 vs 2 once differed)."""
    import inspect

    from bluesky_ptychopinn import cli
    from bluesky_ptychopinn.training._recipe import ProbeCentricRecipe

    recipe = ProbeCentricRecipe()
    options = {name: p.default.default for name, p in inspect.signature(cli.train).parameters
               .items() if hasattr(p.default, "default")}
    for name in ("objects_per_class", "object_size", "step_px", "channels", "base_width",
                 "epochs", "finetune_epochs", "batch_size", "lr", "loss", "seed"):
        assert options[name] == getattr(recipe, name), name
    for name in ("photons", "contrast"):
        assert tuple(options[name]) == tuple(getattr(recipe, name)), name
    assert tuple(options["classes"]) == tuple(recipe.object_classes)
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    script = (root / "scripts" / "train_default_model.py").read_text()
    assert "train_probe_centric(" in script
