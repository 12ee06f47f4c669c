"""A tiny DDP training run, launched by ``torchrun`` in the tests and usable as a smoke check:

    torchrun --nproc_per_node 2 -m bluesky_ptychopinn.training._ddp_smoke OUT_DIR

Each rank writes the sha256 of its final weights to OUT_DIR/rank{r}.json.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import torch

from .. import physics
from ..models import ptychopinn
from ._data import GroupedSamples, TrainingExperiment
from ._trainer import TrainConfig, train


def _experiment(seed: int) -> TrainingExperiment:
    rng = np.random.default_rng(seed)
    obj = np.exp(1j * rng.uniform(-0.5, 0.5, (96, 96))).astype(np.complex64)
    probe = physics.make_probe("airy", 32, 40e-9, 8_800)
    pos = physics.raster_scan((40.0, 40.0), 5.0) + 48
    sim = physics.simulate_diffraction(obj, probe, pos, photons=1e5, seed=seed)
    return TrainingExperiment(counts=sim.counts, positions=pos, probe=torch.from_numpy(probe))


def main(out_dir: str) -> None:
    torch.set_num_threads(1)
    data = GroupedSamples([_experiment(0)], channels=4, grouping="quadrant", seed=0)
    model = ptychopinn(frame_size=32, channels=4, base_width=4, depth=2)
    torch.manual_seed(0)  # identical initial weights on every rank (DDP also broadcasts them)
    result = train(model, data, TrainConfig(epochs=2, batch_size=8, progress=False, seed=0))
    digest = hashlib.sha256()
    for key, value in sorted(result.model.state_dict().items()):
        digest.update(key.encode())
        digest.update(value.detach().cpu().numpy().tobytes())
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(
        {"rank": rank, "world": world, "sha256": digest.hexdigest(),
         "loss": [h["loss"] for h in result.history]}))
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
