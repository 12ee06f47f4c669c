"""Model files: safetensors weights next to a JSON config + provenance. No pickle anywhere.

A model directory holds::

    model.safetensors   the weights
    model.json          {"format": ..., "architecture": {...}, "sha256": ...,
                         "provenance": {...}, "card_sha256": ...}

``sha256`` is the hash of the weights file; ``card_sha256`` the hash of the card itself (its
canonical JSON without ``card_sha256``, see :func:`card_sha256`). The card records the weights'
hash, so ``card_sha256`` pins card and weights together: it is the model's identity, reported
as ``sha256`` in a derived run. Loading refuses weights or a card whose hash does not match, a
card without ``card_sha256`` (saved before cards were signed: ``bluesky-ptychopinn models sign``
after checking it), and tensors whose names or shapes do not match the architecture.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save_file

from ..errors import CheckpointError
from ._ptychopinn import PtychoPINN, PtychoPINNConfig

__all__ = [
    "WEIGHTS_NAME",
    "CONFIG_NAME",
    "CARD_HASH_KEY",
    "FORMAT",
    "ModelIdentity",
    "card_sha256",
    "save_model",
    "load_model",
    "load_verified_model",
    "read_model_card",
    "sign_model",
    "verify_model",
    "file_sha256",
]

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "model.json"
FORMAT = "bluesky-ptychopinn/model/1"
#: Card key of the card's own hash (added in 0.1.x: an older card has none and must be signed).
CARD_HASH_KEY = "card_sha256"
_SIGN_HINT = "bluesky-ptychopinn models sign"


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
    _write_card(directory, _signed(card))
    return directory


def card_sha256(card: Mapping) -> str:
    """sha256 of a model card: its canonical JSON without the ``card_sha256`` key.

    Canonical (sorted keys, no whitespace, UTF-8), so re-indenting or reordering the file
    keeps the hash while any change of a value (an activation, a width, the recorded weights
    hash, the provenance) changes it.

    Parameters
    ----------
    card : mapping
        The card as parsed from ``model.json``.

    Returns
    -------
    str
        Hex digest.
    """
    body = {k: v for k, v in card.items() if k != CARD_HASH_KEY}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _signed(card: dict) -> dict:
    """``card`` as JSON will read it back (``default=str``), with its ``card_sha256``."""
    plain = json.loads(json.dumps({k: v for k, v in card.items() if k != CARD_HASH_KEY},
                                  default=str))
    return {**plain, CARD_HASH_KEY: card_sha256(plain)}


def _write_card(directory: Path, card: dict) -> None:
    """Replace ``model.json`` atomically (a reader never sees half a card)."""
    path = directory / CONFIG_NAME
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(card, indent=2) + "\n")
    os.replace(tmp, path)


def read_model_card(directory: str | Path) -> dict:
    """The JSON config + provenance of a saved model, validated (not verified: see
    :func:`verify_model`)."""
    return _parse_card(Path(directory) / CONFIG_NAME, directory)


def _parse_card(path: Path, directory: str | Path, text: str | None = None) -> dict:
    if text is None:
        if not path.is_file():
            raise CheckpointError(f"{directory}: no {CONFIG_NAME}; not a bluesky-ptychopinn "
                                  "model")
        # Read bytes and decode here: a card damaged on disk (not UTF-8) or unreadable is a
        # corrupt checkpoint like any other, not a UnicodeDecodeError or OSError for callers.
        try:
            text = path.read_bytes().decode("utf-8")
        except UnicodeDecodeError as exc:
            raise CheckpointError(f"{path}: not UTF-8 text ({exc.reason} at byte "
                                  f"{exc.start}); the card is corrupt") from exc
        except OSError as exc:
            raise CheckpointError(f"{path}: cannot be read ({exc})") from exc
    try:
        card = json.loads(text)
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(card, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(card).__name__}")
    if card.get("format") != FORMAT:
        raise CheckpointError(f"{path}: format {card.get('format')!r}, expected {FORMAT!r}")
    for key in ("architecture", "sha256"):
        if key not in card:
            raise CheckpointError(f"{path}: missing {key!r}")
    return card


@dataclass(frozen=True)
class ModelIdentity:
    """What was hashed and checked when a model was loaded or verified.

    Attributes
    ----------
    sha256 : str
        The model's identity: :func:`card_sha256` of the card read (the card records the
        weights' hash, so this covers both).
    weights_sha256 : str
        sha256 of the weights bytes read.
    weights_sha256_verified : bool
        ``weights_sha256`` equals the card's recorded ``sha256``.
    card_sha256_verified : bool
        ``sha256`` equals the card's recorded ``card_sha256`` (False for an unsigned card).
    """

    sha256: str
    weights_sha256: str
    weights_sha256_verified: bool
    card_sha256_verified: bool

    @property
    def verified(self) -> bool:
        """Both weights and card match their recorded hashes."""
        return self.weights_sha256_verified and self.card_sha256_verified

    def as_dict(self) -> dict:
        """The fields, for a derived run's ``model`` metadata."""
        return asdict(self)


def _identity(card: dict, weights_bytes: bytes) -> ModelIdentity:
    weights = hashlib.sha256(weights_bytes).hexdigest()
    model = card_sha256(card)
    return ModelIdentity(sha256=model, weights_sha256=weights,
                         weights_sha256_verified=weights == card["sha256"],
                         card_sha256_verified=model == card.get(CARD_HASH_KEY))


def _read_files(directory: Path) -> tuple[dict, bytes]:
    """The card and the weights' bytes, each read once (what is hashed is what is loaded)."""
    card = read_model_card(directory)
    weights = directory / WEIGHTS_NAME
    if not weights.is_file():
        raise CheckpointError(f"{directory}: missing {WEIGHTS_NAME}")
    return card, weights.read_bytes()


def _refuse_unverified(directory: Path, card: dict, identity: ModelIdentity) -> None:
    weights, path = directory / WEIGHTS_NAME, directory / CONFIG_NAME
    if not identity.weights_sha256_verified:
        raise CheckpointError(
            f"{weights}: sha256 {identity.weights_sha256[:16]}... does not match {CONFIG_NAME} "
            f"({str(card['sha256'])[:16]}...); the file was modified or corrupted")
    if CARD_HASH_KEY not in card:
        raise CheckpointError(
            f"{path}: unsigned card (no {CARD_HASH_KEY}; saved by an older version), so its "
            f"architecture and provenance cannot be verified; if you trust it: "
            f"{_SIGN_HINT} {directory}")
    if not identity.card_sha256_verified:
        raise CheckpointError(
            f"{path}: sha256 {identity.sha256[:16]}... does not match its {CARD_HASH_KEY} "
            f"({str(card[CARD_HASH_KEY])[:16]}...); the card was edited after the model was "
            f"saved; if the edit is deliberate: {_SIGN_HINT} {directory}")


def _config(directory: Path, card: dict) -> PtychoPINNConfig:
    try:
        return PtychoPINNConfig(**card["architecture"])
    except Exception as exc:  # pydantic's ValidationError, or TypeError for odd JSON
        raise CheckpointError(f"{directory / CONFIG_NAME}: invalid architecture: {exc}") from exc


def _tensors(directory: Path, weights_bytes: bytes) -> dict[str, torch.Tensor]:
    try:
        return load_safetensors(weights_bytes)
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{directory / WEIGHTS_NAME}: cannot read safetensors ({exc})"
                              ) from exc


def _check_fit(directory: Path, config: PtychoPINNConfig, state: dict) -> None:
    """Tensor names and shapes against the architecture, on the meta device: nothing is
    allocated, so a card asking for a huge network is refused before it costs memory."""
    with torch.device("meta"):
        expected = PtychoPINN(config).state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [k for k in expected if k in state and state[k].shape != expected[k].shape]
    if missing or unexpected or wrong:
        raise CheckpointError(
            f"{directory / WEIGHTS_NAME}: weights do not match the architecture in "
            f"{CONFIG_NAME} (missing {missing[:3]}, unexpected {unexpected[:3]}, wrong shape "
            f"{wrong[:3]})")


def _checked(directory: Path, card: dict, weights_bytes: bytes
             ) -> tuple[PtychoPINNConfig, dict[str, torch.Tensor]]:
    """The architecture and the tensors, once they are known to fit each other."""
    config = _config(directory, card)
    state = _tensors(directory, weights_bytes)
    _check_fit(directory, config, state)
    return config, state


def _build(config: PtychoPINNConfig, state: dict[str, torch.Tensor]) -> PtychoPINN:
    model = PtychoPINN(config)  # as large as the weights file: _check_fit came first
    model.load_state_dict(state)
    return model


def load_verified_model(
    directory: str | Path, *, device: str | torch.device = "cpu", verify: bool = True
) -> tuple[PtychoPINN, dict, ModelIdentity]:
    """Load a model saved by :func:`save_model`, with what was verified.

    Parameters
    ----------
    directory : path
        The model directory.
    device : str or torch.device
        Where the network goes.
    verify : bool
        Refuse weights or a card that do not match their recorded hashes, and an unsigned
        card. ``False`` loads them anyway; the identity then says what did not match.

    Returns
    -------
    model : PtychoPINN
        In eval mode.
    card : dict
        The card as read.
    identity : ModelIdentity
        The hashes of the bytes loaded and whether they matched the card.

    Raises
    ------
    CheckpointError
        Missing files, a weights or card hash that differs from the card, an unsigned card,
        an architecture the card cannot build, or tensors whose names/shapes do not match it.
    """
    directory = Path(directory)
    card, weights_bytes = _read_files(directory)
    identity = _identity(card, weights_bytes)
    if verify and not identity.weights_sha256_verified:
        _refuse_unverified(directory, card, identity)
    # A card that cannot describe these tensors gets the specific message (invalid
    # architecture, wrong shapes) before the card hash is judged; nothing is built yet.
    config, state = _checked(directory, card, weights_bytes)
    if verify:
        _refuse_unverified(directory, card, identity)
    return _build(config, state).to(device).eval(), card, identity


def load_model(
    directory: str | Path, *, device: str | torch.device = "cpu", verify: bool = True
) -> tuple[PtychoPINN, dict]:
    """Load a model saved by :func:`save_model`: :func:`load_verified_model` without the
    identity.

    Raises
    ------
    CheckpointError
        Missing files, a weights or card hash that differs from the card, an unsigned card,
        an architecture the card cannot build, or tensors whose names/shapes do not match it.
    """
    model, card, _ = load_verified_model(directory, device=device, verify=verify)
    return model, card


def verify_model(directory: str | Path) -> ModelIdentity:
    """Check a model's weights and card against their recorded hashes, and that the weights
    fit the architecture; nothing is changed.

    Parameters
    ----------
    directory : path
        The model directory.

    Returns
    -------
    ModelIdentity
        Which hashes matched (an unsigned card has ``card_sha256_verified`` False).

    Raises
    ------
    CheckpointError
        Missing or unreadable files, or weights that do not fit the card's architecture.
    """
    directory = Path(directory)
    card, weights_bytes = _read_files(directory)
    _checked(directory, card, weights_bytes)
    return _identity(card, weights_bytes)


def sign_model(directory: str | Path, *, accept_weights: bool = False) -> ModelIdentity:
    """Record the card's hash in the card (``card_sha256``): accept the card as it is now.

    For a card saved before cards were signed, or a card edited on purpose. Run it only on
    a model you have checked: signing is what makes a later load trust it.

    Parameters
    ----------
    directory : path
        The model directory (its ``model.json`` is rewritten atomically).
    accept_weights : bool
        Also record the current weights' hash when it differs from the card's (weights
        replaced on purpose); otherwise such weights are refused.

    Returns
    -------
    ModelIdentity
        The new identity (verified).

    Raises
    ------
    CheckpointError
        Weights that differ from the recorded hash (without ``accept_weights``), weights
        that do not fit the card's architecture, or weights holding NaN or infinity (such a
        card is not signed).
    """
    directory = Path(directory)
    card, weights_bytes = _read_files(directory)
    identity = _identity(card, weights_bytes)
    if not identity.weights_sha256_verified and not accept_weights:
        raise CheckpointError(
            f"{directory / WEIGHTS_NAME}: sha256 {identity.weights_sha256[:16]}... differs "
            f"from the card's ({str(card['sha256'])[:16]}...); if the weights were replaced on "
            "purpose, sign with --accept-weights")
    config, state = _checked(directory, card, weights_bytes)
    # A network with a NaN weight loads and outputs NaN everywhere: signing it would make a
    # later verified load trust it. The check reads each tensor once (cheap next to _build).
    bad = [name for name, tensor in state.items()
           if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all())]
    if bad:
        raise CheckpointError(
            f"{directory / WEIGHTS_NAME}: {len(bad)} tensor(s) hold NaN or infinity (first: "
            f"{bad[0]!r}); the model would output NaN, so the card is not signed")
    _build(config, state)  # never sign a card that cannot load
    signed = _signed({**card, "sha256": identity.weights_sha256})
    _write_card(directory, signed)
    return _identity(signed, weights_bytes)
