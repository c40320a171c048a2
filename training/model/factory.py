"""One factory: a built-in config name or a JSON path -> a `RetinaAlignModel` (as open_clip does).

Data-dependent widths are resolved here and written into the model's config: the tabular input width
(`FeatureSpec.width`) and the tokenizer's vocabulary size and special ids. The resolved
`model.config` therefore rebuilds the same architecture from a checkpoint:
`create_model(model.config, pretrained=False, checkpoint=path)`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from pydantic import ValidationError
from safetensors.torch import load_file
from transformers import PreTrainedTokenizerBase

from training.model.config import ModelConfig
from training.model.model import RetinaAlignModel

CONFIG_DIR = Path(__file__).parent / "configs"
"""Folder of the built-in configs, `<name>.json`."""


def list_configs() -> list[str]:
    """Names of the built-in configs."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.json"))


def load_config(name_or_path: str | Path | ModelConfig) -> ModelConfig:
    """A built-in config by name, a config JSON file by path, or `zoo:NAME` (a shipped model's config); a
    `ModelConfig` passes through."""
    if isinstance(name_or_path, ModelConfig):
        return name_or_path
    if str(name_or_path).startswith("zoo:"):  # a shipped model's config (its files are verified first)
        from training.zoo import ZooError, resolve_run

        try:
            name_or_path = resolve_run(str(name_or_path)) / "config.json"
        except ZooError as err:
            raise ValueError(str(err)) from err
    path = Path(name_or_path)
    if not path.is_file():
        if str(name_or_path) not in list_configs():
            raise ValueError(f"unknown model config {str(name_or_path)!r}: not a file, and not one of {list_configs()}")
        path = CONFIG_DIR / f"{name_or_path}.json"
    try:
        return ModelConfig.model_validate(json.loads(path.read_text(encoding="utf-8")))
    except (json.JSONDecodeError, ValidationError) as err:
        raise ValueError(f"invalid model config {path}: {err}") from err


def resolve_config(
    config: ModelConfig,
    tabular_width: int | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None,
    numeric_columns: Sequence[int] | None = None,
) -> ModelConfig:
    """The config with the tabular input width and numeric value columns and the tokenizer's vocabulary and
    special ids filled in."""
    data = config.model_dump()
    if tabular_width is not None:
        data["tabular"]["input_width"] = tabular_width
    if numeric_columns is not None and data["tabular"]["numeric_encoding"] == "periodic":
        data["tabular"]["numeric_columns"] = tuple(numeric_columns)
    if data["tabular"]["input_width"] is None:
        raise ValueError(f"model config {config.name!r} has no tabular input width: pass tabular_width")
    if tokenizer is not None:
        if tokenizer.pad_token_id is None or tokenizer.mask_token_id is None:
            raise ValueError("the tokenizer needs [PAD] and [MASK] tokens")
        # Pretrained weights, when they load, overrule this with their own vocabulary size.
        data["text"]["vocab_size"] = len(tokenizer)
        data["text"]["pad_token_id"] = tokenizer.pad_token_id
        data["text"]["mask_token_id"] = tokenizer.mask_token_id
        data["text"]["special_token_ids"] = sorted(set(tokenizer.all_special_ids))
    return ModelConfig.model_validate(data)


def create_model(
    name_or_path: str | Path | ModelConfig,
    *,
    tabular_width: int | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None,
    pretrained: bool | None = None,
    checkpoint: str | Path | None = None,
    numeric_columns: Sequence[int] | None = None,
) -> RetinaAlignModel:
    """Build the model of a config name, JSON path or `ModelConfig`.

    `tabular_width` and `numeric_columns`: `FeatureSpec.width` and `FeatureSpec.numeric_value_columns`
    (unless the config already holds them). `tokenizer`: its vocabulary
    size and special ids go into the config. `pretrained`: overrides both towers' `pretrained` flags
    (False: random init, nothing is fetched). `checkpoint`: a safetensors state dict of this exact
    architecture, loaded strictly (the towers are then built without their pretrained weights).
    """
    config = resolve_config(load_config(name_or_path), tabular_width, tokenizer, numeric_columns)
    model = RetinaAlignModel(config, pretrained=False if checkpoint is not None else pretrained)
    if tokenizer is not None and len(tokenizer) > model.text.vocab_size:
        raise ValueError(f"the tokenizer has {len(tokenizer)} tokens but the text tower embeds {model.text.vocab_size}")
    if checkpoint is not None:
        model.load_state_dict(load_file(str(checkpoint)), strict=True)
    return model
