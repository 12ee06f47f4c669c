"""The CUDA paths (bf16 autocast, channels_last, GPU training and PIE) agree with the CPU.

Skipped on machines without a GPU (CI); run on a GPU host with ``pytest tests/test_cuda.py``.
The physics tests already run on CUDA through the ``device`` fixture.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bluesky_ptychopinn import physics
from bluesky_ptychopinn.models import ptychopinn
from bluesky_ptychopinn.recon import PIEOptions, StreamingReconstructor, pie_reconstruct
from bluesky_ptychopinn.training import GroupedSamples, TrainConfig, TrainingExperiment, train

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def experiment():
    rng = np.random.default_rng(0)
    phase = rng.uniform(-0.5, 0.5, (160, 160))
    obj = (0.9 * np.exp(1j * phase)).astype(np.complex64)
    probe = physics.make_probe("zone_plate", 64, 40e-9, 8_800)
    pos = physics.scan_pattern("fermat", (70.0, 70.0), step=5.0) + 80
    sim = physics.simulate_diffraction(obj, probe, pos, photons=1e6, seed=0)
    return obj, probe, pos, sim.counts


@pytest.mark.parametrize("channels", [1, 4])
def test_streaming_on_cuda_matches_cpu_within_bf16_precision(experiment, channels):
    _, _, pos, counts = experiment
    torch.manual_seed(0)
    model = ptychopinn(frame_size=64, channels=channels, base_width=8).eval()
    snaps = {}
    for device in ("cpu", "cuda"):
        recon = StreamingReconstructor(model, object_shape=(160, 160), device=device,
                                       batch_size=64)
        recon.add(counts, pos)
        snaps[device] = recon.finish()
    cpu, gpu = snaps["cpu"], snaps["cuda"]
    assert gpu.stats["device"].startswith("cuda")
    assert gpu.n_frames == cpu.n_frames == len(pos)
    np.testing.assert_allclose(gpu.weight, cpu.weight, rtol=1e-4, atol=1e-4)
    covered = cpu.weight > 0.3 * cpu.weight.max()
    # bf16 keeps 8 bits of mantissa: agreement to a few per cent of the object's modulus.
    error = np.abs(gpu.object - cpu.object)[covered]
    scale = np.abs(cpu.object)[covered].mean()
    assert error.mean() / scale < 0.03, error.mean() / scale


def test_training_on_cuda_with_bf16_lowers_the_physics_loss(experiment):
    obj, probe, pos, counts = experiment
    exp = TrainingExperiment(counts=counts, positions=pos, probe=torch.from_numpy(
        physics.normalize_probe(probe)), truth=obj)
    data = GroupedSamples([exp], channels=4, grouping="quadrant", seed=0)
    model = ptychopinn(frame_size=64, channels=4, base_width=8)
    result = train(model, data, TrainConfig(epochs=4, batch_size=16, device="cuda", bf16=True,
                                            val_fraction=0.0, progress=False, seed=0))
    losses = [h["loss"] for h in result.history]
    assert all(np.isfinite(losses))
    assert losses[-1] < 0.8 * losses[0], losses
    assert next(result.model.parameters()).device.type == "cuda"


def test_rpie_on_cuda_matches_cpu(experiment):
    obj, probe, pos, counts = experiment
    results = {}
    for device in ("cpu", "cuda"):
        results[device] = pie_reconstruct(
            counts, pos, probe, object_shape=obj.shape,
            options=PIEOptions(engine="rpie", n_epochs=10, probe_update=False, seed=0,
                               device=device, progress=False),
        )
    a, b = results["cpu"].object, results["cuda"].object
    inner = (slice(50, 110), slice(50, 110))
    rel = np.linalg.norm(a[inner] - b[inner]) / np.linalg.norm(a[inner])
    assert rel < 1e-3, rel
