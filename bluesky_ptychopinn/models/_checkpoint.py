"""Model files: safetensors weights next to a JSON config + provenance. No pickle anywhere.

A model directory holds::

    model.safetensors   the weights
    model.json          {"format": ..., "architecture": {...}, "sha256": ..., "provenance": {...}}

``sha256`` is the hash of the weights file; loading refuses a file whose hash or tensor shapes do
not match the JSON.
"""

from __future__ import annotations

import hashlib
import json
import os
from datetime import datetime, timezone
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..errors import CheckpointError
from ._ptychopinn import PtychoPINN, PtychoPINNConfig

__all__ = [
    "WEIGHTS_NAME",
    "CONFIG_NAME",
    "FORMAT",
    "save_model",
    "load_model",
    "read_model_card",
    "file_sha256",
]

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "model.json"
FORMAT = "bluesky-ptychopinn/model/1"


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def save_model(
    model: PtychoPINN, directory: str | Path, *, provenance: dict | None = None
) -> Path:
    """Write ``model`` to ``directory`` (created) as safetensors + JSON.

    Parameters
    ----------
    model : PtychoPINN
        The network.
    directory : path
        Target directory; existing files are replaced atomically.
    provenance : dict, optional
        Training data (probes with sha256, object classes, photon range), epochs, metrics...

    Returns
    -------
    pathlib.Path
        The directory.
    """
    from .. import __version__

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    weights = directory / WEIGHTS_NAME
    tmp = weights.with_suffix(".tmp")
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(tmp), metadata={"format": FORMAT})
    os.replace(tmp, weights)
    card = {
        "format": FORMAT,
        "architecture": model.config.model_dump(),
        "sha256": file_sha256(weights),
        "n_parameters": int(sum(v.numel() for v in state.values())),
        "package_version": __version__,
        "saved": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "provenance": provenance or {},
    }
    (directory / CONFIG_NAME).write_text(json.dumps(card, indent=2, default=str))
    return directory


def read_model_card(directory: str | Path) -> dict:
    """The JSON config + provenance of a saved model, validated."""
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise CheckpointError(f"{directory}: no {CONFIG_NAME}; not a bluesky-ptychopinn model")
    try:
        card = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc})") from exc
    if card.get("format") != FORMAT:
        raise CheckpointError(f"{path}: format {card.get('format')!r}, expected {FORMAT!r}")
    for key in ("architecture", "sha256"):
        if key not in card:
            raise CheckpointError(f"{path}: missing {key!r}")
    return card


def load_model(
    directory: str | Path, *, device: str | torch.device = "cpu", verify: bool = True
) -> tuple[PtychoPINN, dict]:
    """Load a model saved by :func:`save_model`.

    Raises
    ------
    CheckpointError
        Missing files, a weights hash that differs from the JSON, an architecture the JSON
        cannot build, or tensors whose names/shapes do not match it.
    """
    directory = Path(directory)
    card = read_model_card(directory)
    weights = directory / WEIGHTS_NAME
    if not weights.is_file():
        raise CheckpointError(f"{directory}: missing {WEIGHTS_NAME}")
    if verify:
        actual = file_sha256(weights)
        if actual != card["sha256"]:
            raise CheckpointError(
                f"{weights}: sha256 {actual[:16]}... does not match {CONFIG_NAME} "
                f"({card['sha256'][:16]}...); the file was modified or corrupted"
            )
    try:
        config = PtychoPINNConfig(**card["architecture"])
    except Exception as exc:  # pydantic's ValidationError, or TypeError for odd JSON
        raise CheckpointError(f"{directory / CONFIG_NAME}: invalid architecture: {exc}") from exc
    model = PtychoPINN(config)
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{weights}: cannot read safetensors ({exc})") from exc
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [k for k in expected if k in state and state[k].shape != expected[k].shape]
    if missing or unexpected or wrong:
        raise CheckpointError(
            f"{weights}: weights do not match the architecture in {CONFIG_NAME} "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]}, wrong shape {wrong[:3]})"
        )
    model.load_state_dict(state)
    return model.to(device).eval(), card
