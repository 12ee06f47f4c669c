"""Which network reconstructs a run: the one trained on the probe the run references.

The workflow is probe-centric (the paper): a beamline measures its probe once, a model is
trained on synthetic objects with it and registered with that probe's name, and every later
scan that references the probe (``ptycho.probe``) is reconstructed by that model. With
``LiveReconstruction(model="auto")`` :func:`choose_model` makes the choice per run from the
model cards in the registry; when no registered model knows the probe, the default model
reconstructs the run and the derived run's start document says so (the refinement, which
uses the run's own probe, carries the image).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from ..errors import CheckpointError
from ..metadata import PtychoMetadata
from ..models import CONFIG_NAME, DEFAULT_MODEL, ModelRegistry, read_model_card

__all__ = ["AUTO", "ModelChoice", "card_stamp", "choose_model", "probe_reference"]

logger = logging.getLogger(__name__)

#: ``LiveReconstruction(model=AUTO)``: choose per run.
AUTO = "auto"


@dataclass(frozen=True)
class ModelChoice:
    """The model for one run, and why.

    Attributes
    ----------
    name : str
        Registry name.
    path : str
        Model directory.
    reason : str
        In words, for the derived run's start document and the log.
    matched : bool
        Whether the model was trained on the run's probe.
    """

    name: str
    path: str
    reason: str
    matched: bool


def probe_reference(md: PtychoMetadata) -> str | None:
    """The probe name a run references (``ptycho.probe`` as a name or ``{"reference": ...}``)."""
    probe = md.probe
    if isinstance(probe, str):
        return probe or None
    if isinstance(probe, dict) and isinstance(probe.get("reference"), str):
        return probe["reference"] or None
    return None


def _training_probes(card: dict) -> tuple[str, ...]:
    probes = card.get("provenance", {}).get("training_data", {}).get("probes", []) or []
    return tuple(p.get("name") for p in probes if isinstance(p, dict) and p.get("name"))


def card_stamp(directory: str | Path) -> tuple[int, int, int] | None:
    """(inode, mtime in ns, size) of a model's card, ``None`` if it cannot be read: what
    changes when the model is saved again in the same directory (``os.replace`` of the card)."""
    try:
        stat = (Path(directory) / CONFIG_NAME).stat()
    except OSError:
        return None
    return stat.st_ino, stat.st_mtime_ns, stat.st_size


# Training probes by model directory, with the card stamp they were read at. A run start under
# model="auto" looks at every registered model on the RunEngine's thread; parsing each card
# every time cost ~0.2 ms per model, so a card is parsed again only when its file changes.
_PROBES: dict[Path, tuple[tuple[int, int, int], tuple[str, ...]]] = {}


def _card_probes(directory: Path) -> tuple[str, ...]:
    """The training probes a model's card names (none for a card that cannot be read)."""
    stamp = card_stamp(directory)
    if stamp is None:
        return ()
    cached = _PROBES.get(directory)
    if cached is not None and cached[0] == stamp:
        return cached[1]
    try:
        probes = _training_probes(read_model_card(directory))
    except (CheckpointError, OSError):
        probes = ()
    _PROBES[directory] = (stamp, probes)
    return probes


def choose_model(md: PtychoMetadata, registry: ModelRegistry | None = None,
                 default: str = DEFAULT_MODEL) -> ModelChoice:
    """The registered model trained on the run's probe, else ``default``.

    Among the models whose training probes include the reference, one trained on that probe
    alone is preferred (it was trained for exactly this beamline), then the one trained on the
    fewest probes; ties go to the user's models before the shipped ones, then by name.
    """
    registry = registry or ModelRegistry()
    reference = probe_reference(md)
    if reference:
        shipped = registry.search_path[-1]
        matches = [(len(probes), directory.parent == shipped, name, directory)
                   for name, directory in registry.directories()
                   if reference in (probes := _card_probes(directory))]
        if matches:
            *_, name, directory = min(matches)
            return ModelChoice(name, str(directory),
                               f"trained on the run's probe {reference!r}", True)
    path = str(registry.path(default))
    why = (f"no registered model was trained on the run's probe {reference!r}"
           if reference else "the run references no probe")
    return ModelChoice(default, path, f"{why}: the {default!r} model reconstructs it and the "
                                      "refinement (with the run's own probe) carries the image",
                       False)
