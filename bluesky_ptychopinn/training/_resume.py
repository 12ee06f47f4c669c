"""What a checkpoint was trained on, so that a resumed run continues the same training.

A checkpoint directory holds weights, optimiser state, the history and the best validation
loss. Resuming it with another network, other data or another validation split would mix two
trainings silently: the saved best loss was measured on other samples (a new run might never
beat it and return the old weights), and the history would describe neither. The
:func:`resume_key` saved with the state says what the training was; :func:`check_resume`
compares it with the run about to resume.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import numpy as np
import torch

from ..errors import InvalidInputError

__all__ = ["check_resume", "resume_key"]

logger = logging.getLogger(__name__)

# Settings that define which samples are trained and validated on and what is minimised: a
# resume with another value would compare losses of two different problems.
PROBLEM_FIELDS = ("seed", "val_fraction", "loss", "overlap")
# Settings that may change between two parts of one training: how long it runs, where it logs,
# on what device. The rest (optimiser, step size, schedule, batch) is allowed with a warning:
# a lower learning rate on resume is common practice.
FREE_FIELDS = ("epochs", "finetune_epochs", "patience", "checkpoint_dir", "log_csv",
               "tensorboard", "progress", "log_every_s", "device", "bf16",
               "max_batches_per_epoch")


def _update(digest, value) -> None:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu()
        if value.is_complex():
            value = torch.view_as_real(value.resolve_conj())
        value = value.contiguous().numpy()
    array = np.ascontiguousarray(value)
    digest.update(f"{array.dtype.str}{array.shape}".encode())
    digest.update(memoryview(array).cast("B"))


def data_digest(data) -> str:
    """Hex digest of everything in a :class:`~._data.GroupedSamples` the loss depends on: every
    experiment's counts, positions, probe and mask, the groups and offsets, photons and input
    scales. BLAKE2b: about a second per GB of frames, once per resume, next to hours of
    training."""
    digest = hashlib.blake2b(digest_size=16)
    for exp in data.experiments:
        for value in (exp.counts, exp.positions, exp.probe):
            _update(digest, value)
        _update(digest, exp.mask if exp.mask is not None else np.zeros(0, bool))
    for value in (*data.groups, *data.offsets, data.photons, data.input_scales):
        _update(digest, value)
    return digest.hexdigest()


def resume_key(model, data, config) -> dict:
    """What a checkpoint records about its training: the architecture, the data's digest and
    size, and the training settings (JSON-ready)."""
    return {
        "model": model.config.model_dump(mode="json"),
        "data": {"digest": data_digest(data), "samples": len(data),
                 "experiments": len(data.experiments), "channels": data.channels,
                 "frame_size": data.frame_size},
        "train": config.model_dump(mode="json"),
    }


def _differences(saved: dict, current: dict, keys) -> list[str]:
    return [f"{k} {saved.get(k)!r} -> {current.get(k)!r}" for k in keys
            if saved.get(k) != current.get(k)]


def check_resume(saved: dict | None, current: dict, path: Path) -> None:
    """Refuse to resume ``path`` for another network, other data or another validation split.

    Parameters
    ----------
    saved : dict or None
        The checkpoint's :func:`resume_key`; None for a checkpoint written before it was
        recorded (resumed with a warning: it cannot be checked).
    current : dict
        :func:`resume_key` of the run about to resume.
    path : Path
        The checkpoint directory, for the messages.

    Raises
    ------
    InvalidInputError
        Naming each difference; the checkpoint is left as it is.
    """
    if saved is None:
        logger.warning("%s: saved by an older version that did not record its network, data "
                       "and settings; resuming without checking that they match", path)
        return
    problems = []
    model_keys = sorted(set(saved["model"]) | set(current["model"]))
    problems += [f"network {d}" for d in _differences(saved["model"], current["model"],
                                                      model_keys)]
    if saved["data"] != current["data"]:
        was, now = saved["data"], current["data"]
        problems.append(
            f"data: {was.get('samples')} samples from {was.get('experiments')} experiment(s) "
            f"(digest {was.get('digest')}) -> {now['samples']} from {now['experiments']} "
            f"(digest {now['digest']})")
    problems += _differences(saved["train"], current["train"], PROBLEM_FIELDS)
    if problems:
        raise InvalidInputError(
            f"checkpoint_dir {path}: it holds a different training ({'; '.join(problems)}). "
            "Resume with the same network, data and settings, give another checkpoint_dir "
            f"(train: another OUTPUT, or --no-resume), or delete {path} to start over")
    tuned = [k for k in sorted(set(saved["train"]) | set(current["train"]))
             if k not in PROBLEM_FIELDS and k not in FREE_FIELDS]
    changed = _differences(saved["train"], current["train"], tuned)
    if changed:
        logger.warning("%s: resuming with changed settings: %s", path, "; ".join(changed))
