"""Named models: the shipped default plus any directory of saved models."""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import CheckpointError
from ._checkpoint import CONFIG_NAME, load_model, read_model_card

__all__ = ["ModelRegistry", "DEFAULT_MODEL", "packaged_models_dir"]

#: Name of the model shipped with the package (trained by scripts/train_default_model.py).
DEFAULT_MODEL = "default"


def packaged_models_dir() -> Path:
    """Directory of the models shipped inside the package."""
    return Path(__file__).resolve().parent.parent / "data" / "models"


class ModelRegistry:
    """Models by name: ``<root>/<name>/model.{safetensors,json}``.

    Search order: the user directory (``root``, default ``$PTYCHOPINN_MODELS`` or
    ``~/.local/share/bluesky-ptychopinn/models``), then the models shipped with the package.
    A path to a model directory is accepted wherever a name is.

    Examples
    --------
    >>> registry = ModelRegistry()
    >>> "default" in [m["name"] for m in registry.list()]
    True
    """

    def __init__(self, root: str | Path | None = None) -> None:
        env = os.environ.get("PTYCHOPINN_MODELS")
        default = Path.home() / ".local" / "share" / "bluesky-ptychopinn" / "models"
        self.root = Path(root) if root else Path(env) if env else default
        self.search_path = [self.root, packaged_models_dir()]

    def path(self, name: str | Path) -> Path:
        """Directory of the model ``name`` (or the path itself if it is a model directory)."""
        candidate = Path(name)
        if (candidate / CONFIG_NAME).is_file():
            return candidate
        for base in self.search_path:
            if (base / str(name) / CONFIG_NAME).is_file():
                return base / str(name)
        known = ", ".join(sorted(m["name"] for m in self.list())) or "none"
        raise CheckpointError(f"model {str(name)!r} not found in {self.search_path} "
                              f"(known models: {known})")

    def directories(self) -> list[tuple[str, Path]]:
        """``(name, directory)`` of every model found, in search order, without reading a
        card; a user model hides a shipped one of the same name."""
        found: dict[str, Path] = {}
        for base in self.search_path:
            if not base.is_dir():
                continue
            for directory in sorted(base.iterdir()):
                if directory.name not in found and (directory / CONFIG_NAME).is_file():
                    found[directory.name] = directory
        return list(found.items())

    def list(self) -> list[dict]:
        """Model cards of every model found, with ``name`` and ``path`` added."""
        cards = []
        for name, directory in self.directories():
            try:
                card = read_model_card(directory)
            except (CheckpointError, OSError) as exc:
                # One corrupt or unreadable card must not hide every other model.
                card = {"error": str(exc)}
            cards.append({"name": name, "path": str(directory), **card})
        return cards

    def load(self, name: str | Path = DEFAULT_MODEL, *, device="cpu"):
        """Load a model by name; returns ``(model, card)``."""
        return load_model(self.path(name), device=device)
