"""Model provenance (issue 11): the card is hashed with the weights, an edited or unsigned card
is refused, and a derived run reports only the hashes that were verified.

Real files (a copy of the shipped model), the real CLI in a subprocess, a real RunEngine and a
real Tiled server for the derived run.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bluesky_ptychopinn.errors import CheckpointError
from bluesky_ptychopinn.models import (
    CARD_HASH_KEY,
    CONFIG_NAME,
    WEIGHTS_NAME,
    card_sha256,
    file_sha256,
    load_model,
    load_verified_model,
    packaged_models_dir,
    ptychopinn,
    save_model,
    sign_model,
    verify_model,
)

CLI = str(Path(sys.executable).with_name("bluesky-ptychopinn"))


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([CLI, *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "COLUMNS": "80"})


def _edit_card(directory: Path, **architecture) -> dict:
    """Change the card's architecture in place (same tensor shapes), as a user might."""
    path = directory / CONFIG_NAME
    card = json.loads(path.read_text())
    card["architecture"].update(architecture)
    path.write_text(json.dumps(card, indent=2))
    return card


@pytest.fixture()
def user_model(tmp_path) -> Path:
    """A copy of the shipped default model, as a user's model directory."""
    return Path(shutil.copytree(packaged_models_dir() / "default", tmp_path / "mine"))


def test_shipped_model_card_is_signed():
    identity = verify_model(packaged_models_dir() / "default")
    assert identity.verified
    card = json.loads((packaged_models_dir() / "default" / CONFIG_NAME).read_text())
    assert card[CARD_HASH_KEY] == card_sha256(card) == identity.sha256
    assert identity.weights_sha256 == card["sha256"]


def test_saved_model_is_signed_and_identity_covers_card_and_weights(tmp_path):
    save_model(ptychopinn(base_width=4), tmp_path / "m")
    _, card, identity = load_verified_model(tmp_path / "m")
    assert identity.verified and identity.sha256 == card[CARD_HASH_KEY]
    assert identity.weights_sha256 == file_sha256(tmp_path / "m" / WEIGHTS_NAME)
    assert identity.sha256 != identity.weights_sha256


def test_edited_card_with_same_shapes_is_refused(user_model):
    """Another activation: same tensors, a different network. It used to load silently."""
    _edit_card(user_model, amplitude_activation="softplus")
    with pytest.raises(CheckpointError, match="card was edited") as error:
        load_model(user_model)
    assert "bluesky-ptychopinn models sign" in str(error.value)
    identity = verify_model(user_model)
    assert identity.weights_sha256_verified and not identity.card_sha256_verified


def test_reformatted_card_still_verifies(user_model):
    """Only content counts: re-indenting or reordering keys keeps the hash."""
    path = user_model / CONFIG_NAME
    card = json.loads(path.read_text())
    path.write_text(json.dumps(dict(reversed(list(card.items()))), indent=None))
    assert verify_model(user_model).verified
    load_model(user_model)


def test_unsigned_legacy_card_is_refused_until_signed(user_model):
    path = user_model / CONFIG_NAME
    card = json.loads(path.read_text())
    del card[CARD_HASH_KEY]  # a card saved before cards were signed
    path.write_text(json.dumps(card, indent=2))
    with pytest.raises(CheckpointError, match="unsigned card") as error:
        load_model(user_model)
    assert f"bluesky-ptychopinn models sign {user_model}" in str(error.value)

    verify = _cli("models", "verify", str(user_model))
    assert verify.returncode == 1 and "unsigned" in verify.stdout
    sign = _cli("models", "sign", str(user_model))
    assert sign.returncode == 0, sign.stderr
    identity = verify_model(user_model)
    assert identity.verified and identity.sha256 in sign.stdout
    assert _cli("models", "verify", str(user_model)).returncode == 0
    load_model(user_model)


def test_sign_refuses_modified_weights_unless_accepted(user_model):
    weights = user_model / WEIGHTS_NAME
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0xFF  # inside the last tensor: still a valid safetensors file
    weights.write_bytes(bytes(data))
    result = _cli("models", "sign", str(user_model))
    assert result.returncode != 0 and "--accept-weights" in result.stderr
    assert "Traceback" not in result.stderr
    with pytest.raises(CheckpointError, match="sha256"):
        load_model(user_model)
    identity = sign_model(user_model, accept_weights=True)
    assert identity.verified and identity.weights_sha256 == file_sha256(weights)


def test_sign_refuses_a_card_that_cannot_load(user_model):
    _edit_card(user_model, base_width=4)  # tensors no longer fit: do not bless it
    before = (user_model / CONFIG_NAME).read_text()
    with pytest.raises(CheckpointError, match="do not match the architecture"):
        sign_model(user_model)
    assert (user_model / CONFIG_NAME).read_text() == before


def _scan_into_tiled(tiled, model_dir: Path):
    """A 16-frame raster scan reconstructed live by ``model_dir``; the derived run's start."""
    from bluesky import RunEngine
    from bluesky_tiled_plugins import TiledWriter

    from bluesky_ptychopinn.callbacks import LiveReconstruction
    from bluesky_ptychopinn.devices import sim_beamline
    from bluesky_ptychopinn.plans import ptycho_scan

    live = LiveReconstruction(str(model_dir), batch_size=16, snapshot_every=16,
                              torch_threads=1, isolation="thread", refine=None, crop=24)
    try:
        client = tiled.client()
        RE = RunEngine()
        RE.subscribe(TiledWriter(client, batch_size=20))
        live.subscribe(TiledWriter(client, batch_size=20))
        RE.subscribe(live)
        bl = sim_beamline("cells", write_path=None, seed=1)
        dx = bl.pixel_size_m
        RE(ptycho_scan(bl.detector, bl.stage, geometry=bl.ptycho_metadata(), pattern="raster",
                       extent_m=(5 * dx * 3,) * 2, step_m=5 * dx))
        state = live.wait(timeout=120)
    finally:
        live.close()
    assert state.failed is None and state.frames_done == 16
    return client[state.derived_uid].start["model"]


def test_derived_run_reports_the_verified_identity(tiled, user_model):
    """An edited card is refused by the live callback; once signed, the derived run in Tiled
    carries the new identity (card + weights), not the shipped card's hash."""
    from bluesky_ptychopinn.callbacks import LiveReconstruction

    shipped = verify_model(packaged_models_dir() / "default")
    _edit_card(user_model, amplitude_activation="softplus")
    with pytest.raises(CheckpointError, match="card was edited"):
        LiveReconstruction(str(user_model), isolation="thread", refine=None)

    signed = sign_model(user_model)
    model = _scan_into_tiled(tiled, user_model)
    assert model["sha256"] == signed.sha256 != shipped.sha256
    assert model["weights_sha256"] == shipped.weights_sha256  # the same weights
    assert model["weights_sha256_verified"] is True and model["card_sha256_verified"] is True
    assert model["architecture"]["amplitude_activation"] == "softplus"
