"""The retina-align model: configs, towers, joint transformer, losses and the `create_model` factory."""

from training.model.config import ModelConfig
from training.model.factory import create_model, list_configs, load_config, resolve_config
from training.model.fusion import FusionOutput
from training.model.model import RetinaAlignModel

__all__ = [
    "FusionOutput",
    "ModelConfig",
    "RetinaAlignModel",
    "create_model",
    "list_configs",
    "load_config",
    "resolve_config",
]
