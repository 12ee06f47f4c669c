"""The PtychoPINN network, its training-time physics decoder, and model files.

Examples
--------
>>> import torch
>>> from bluesky_ptychopinn.models import ptychopinn
>>> model = ptychopinn(frame_size=64, channels=1, base_width=8)
>>> model(torch.rand(3, 1, 64, 64) * 1e3, 0.1).dtype
torch.complex64
"""

from ._checkpoint import (
    CARD_HASH_KEY,
    CONFIG_NAME,
    WEIGHTS_NAME,
    ModelIdentity,
    card_sha256,
    file_sha256,
    load_model,
    load_verified_model,
    read_model_card,
    save_model,
    sign_model,
    verify_model,
)
from ._physics_layer import PhysicsDecoder, merge_overlapping_patches, merge_window, poisson_nll
from ._ptychopinn import PtychoPINN, PtychoPINNConfig, input_scale, ptychopinn
from ._registry import DEFAULT_MODEL, ModelRegistry, packaged_models_dir

__all__ = [
    "CARD_HASH_KEY",
    "CONFIG_NAME",
    "DEFAULT_MODEL",
    "ModelIdentity",
    "ModelRegistry",
    "packaged_models_dir",
    "WEIGHTS_NAME",
    "PhysicsDecoder",
    "PtychoPINN",
    "PtychoPINNConfig",
    "card_sha256",
    "file_sha256",
    "input_scale",
    "load_model",
    "load_verified_model",
    "merge_overlapping_patches",
    "merge_window",
    "poisson_nll",
    "ptychopinn",
    "read_model_card",
    "save_model",
    "sign_model",
    "verify_model",
]
