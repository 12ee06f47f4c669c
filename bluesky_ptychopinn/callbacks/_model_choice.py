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

from ..metadata import PtychoMetadata
from ..models import DEFAULT_MODEL, ModelRegistry

__all__ = ["AUTO", "ModelChoice", "choose_model", "probe_reference"]

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


def _training_probes(card: dict) -> list[str]:
    probes = card.get("provenance", {}).get("training_data", {}).get("probes", []) or []
    return [p.get("name") for p in probes if isinstance(p, dict) and p.get("name")]


def choose_model(md: PtychoMetadata, registry: ModelRegistry | None = None,
                 default: str = DEFAULT_MODEL) -> ModelChoice:
    """The registered model trained on the run's probe, else ``default``.

    Among the models whose training probes include the reference, one trained on that probe
    alone is preferred (it was trained for exactly this beamline), then the one trained on the
    fewest probes; ties go to the user's models before the shipped ones, then by name.
    """
    registry = registry or ModelRegistry()
    reference = probe_reference(md)
    cards = [c for c in registry.list() if "error" not in c]
    if reference:
        shipped = str(Path(registry.search_path[-1]).resolve())
        matches = [c for c in cards if reference in _training_probes(c)]
        if matches:
            best = min(matches, key=lambda c: (len(_training_probes(c)),
                                               str(Path(c["path"]).resolve()).startswith(shipped),
                                               c["name"]))
            return ModelChoice(best["name"], best["path"],
                               f"trained on the run's probe {reference!r}", True)
    path = str(registry.path(default))
    why = (f"no registered model was trained on the run's probe {reference!r}"
           if reference else "the run references no probe")
    return ModelChoice(default, path, f"{why}: the {default!r} model reconstructs it and the "
                                      "refinement (with the run's own probe) carries the image",
                       False)
