"""The image and text towers, built and loaded through timm and transformers as they are.

Weights load strictly. timm relaxes strictness whenever the classifier is dropped (`num_classes=0`), so
the image tower loads with the checkpoint's own head size and drops the head afterwards
(`reset_classifier(0)`): any other missing or unexpected key is an error. transformers reports what
it skipped (`output_loading_info=True`); anything beyond BERT's known buffers and the pretraining heads
that an encoder does not use is an error (FLAIR issue #8 hid such mismatches). With no weights
reachable on the hub (offline, nothing cached), a tower starts from random init and logs a warning;
a repository that does not exist, or a local file or folder that fails to load, is always an error.
Offline, set `HF_HUB_OFFLINE=1`: otherwise the hub client retries for about a minute before giving up.
"""

from __future__ import annotations

import logging
import re
from functools import partial
from pathlib import Path

import timm
import torch
from huggingface_hub.errors import LocalEntryNotFoundError
from timm.layers import HybridEmbed
from timm.models import get_pretrained_cfg, load_state_dict
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn
from transformers import AutoConfig, AutoModel, BertConfig, PreTrainedModel

from training.model.config import TextConfig, VisionConfig

logger = logging.getLogger(__name__)

ALLOWED_MISSING_TEXT_KEYS: tuple[str, ...] = (r"(^|\.)position_ids$", r"(^|\.)token_type_ids$")
"""Text-model keys that may be absent from a checkpoint: buffers the model rebuilds itself."""

ALLOWED_UNEXPECTED_TEXT_KEYS: tuple[str, ...] = (
    *ALLOWED_MISSING_TEXT_KEYS,
    r"^cls\.",  # BERT's pretraining heads (MLM, next sentence): the encoder does not use them
    r"^(bert\.)?pooler\.",  # the tower is built without BERT's pooler; CLS states are projected
)
"""Checkpoint keys that a text encoder may leave unused; any other one is an error."""


class WeightsLoadError(RuntimeError):
    """A checkpoint does not match the architecture (missing or unexpected keys)."""


class ImageTower(nn.Module):
    """A timm vision transformer without classifier: pixels -> [prefix tokens + patch tokens]."""

    def __init__(self, config: VisionConfig, pretrained: bool | None = None) -> None:
        super().__init__()
        self.trunk = build_timm_model(config, config.pretrained if pretrained is None else pretrained)
        if not isinstance(self.trunk, VisionTransformer):
            raise ValueError(f"{config.model_name}: the image tower needs a timm VisionTransformer")
        self.width: int = self.trunk.num_features
        self.num_prefix_tokens: int = self.trunk.num_prefix_tokens
        self.grid_size: tuple[int, int] = tuple(int(g) for g in self.trunk.patch_embed.grid_size)
        # Pixels per token side: the patch size, or the stem's stride times the patch size with a stem.
        self.patch_size: int = config.image.size // self.grid_size[0]

    @property
    def num_patches(self) -> int:
        """Number of patch tokens (grid height x width)."""
        return self.grid_size[0] * self.grid_size[1]

    def forward(self, pixels: Tensor) -> Tensor:
        """Token states (B, prefix + patches, width) after the final norm."""
        return self.trunk.forward_features(pixels)

    def pool(self, tokens: Tensor) -> Tensor:
        """The pooled image feature (B, width): timm's own pooling (the CLS token for ViT)."""
        return self.trunk.forward_head(tokens, pre_logits=True)

    def forward_visible(self, pixels: Tensor, keep: Tensor) -> Tensor:
        """Token states of the prefix tokens and the kept patches only (MAE): keep is (B, K) patch indices.

        Follows `VisionTransformer.forward_features`, gathering the kept patches after the position
        embedding, so the encoder costs K / num_patches of a full pass.
        """
        trunk = self.trunk
        x = trunk._pos_embed(trunk.patch_embed(pixels))
        prefix, patches = x[:, : self.num_prefix_tokens], x[:, self.num_prefix_tokens :]
        index = keep.unsqueeze(-1).expand(-1, -1, patches.shape[-1])
        x = torch.cat([prefix, torch.gather(patches, 1, index)], dim=1)
        x = trunk.norm_pre(trunk.patch_drop(x))
        x = trunk.blocks(x)
        return trunk.norm(x)


class TextTower(nn.Module):
    """A transformers encoder without pooler: (input_ids, attention_mask) -> token states."""

    def __init__(self, config: TextConfig, pretrained: bool | None = None) -> None:
        super().__init__()
        self.encoder = build_text_model(config, config.pretrained if pretrained is None else pretrained)
        self.width: int = self.encoder.config.hidden_size
        self.vocab_size: int = self.encoder.config.vocab_size

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Token states (B, L, width); position 0 is the [CLS] state."""
        return self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    @property
    def word_embeddings(self) -> Tensor:
        """The input word-embedding matrix (vocab, width), shared with the MLM decoder."""
        return self.encoder.get_input_embeddings().weight


def build_timm_model(config: VisionConfig, pretrained: bool) -> nn.Module:
    """A timm model with no classifier, with weights from `pretrained_file`, the hub, or random init.

    With `config.stem`, the transformer's patch embedding is timm's `HybridEmbed` over a timm CNN cut at
    the stem's feature stage (random init: pretrained transformer weights do not fit a new stem).
    """
    kwargs = dict(config.timm_kwargs, img_size=config.image.size)
    if config.stem is not None:
        stem = config.stem
        backbone = timm.create_model(
            stem.model_name, pretrained=False, features_only=True, out_indices=(stem.out_index,), **stem.timm_kwargs
        )
        _drop_blocks_after_feature(backbone)
        kwargs["embed_layer"] = partial(HybridEmbed, backbone=backbone)
        if pretrained:
            logger.warning("image tower %s: a convolutional stem starts from random init", config.model_name)
        return timm.create_model(config.model_name, pretrained=False, num_classes=0, **kwargs)
    if pretrained and config.pretrained_file:
        return _timm_from_file(config.model_name, Path(config.pretrained_file), kwargs)
    if pretrained:
        try:
            # Default num_classes: timm loads strictly only when the head matches its checkpoint.
            model = timm.create_model(config.model_name, pretrained=True, **kwargs)
        except OSError as err:
            if not hub_unreachable(err):
                raise
            logger.warning(
                "image tower %s: pretrained weights unreachable (%s); starting from random init",
                config.model_name,
                type(err).__name__,
            )
            return timm.create_model(config.model_name, pretrained=False, num_classes=0, **kwargs)
        except RuntimeError as err:
            raise WeightsLoadError(f"image tower hub weights do not match {config.model_name}: {err}") from err
        model.reset_classifier(0)
        expected = (model.pretrained_cfg.get("mean"), model.pretrained_cfg.get("std"))
        if expected != (config.image.mean, config.image.std):
            logger.warning(
                "image tower %s: its weights were trained with mean/std %s but the config normalises with %s",
                config.model_name,
                expected,
                (config.image.mean, config.image.std),
            )
        return model
    logger.warning("image tower %s: random init (pretrained is off)", config.model_name)
    return timm.create_model(config.model_name, pretrained=False, num_classes=0, **kwargs)


def _drop_blocks_after_feature(backbone: nn.Module) -> None:
    """Remove the blocks a features-only CNN would run after its last output stage (timm keeps them:
    for `lcnet_050` cut at stage 3 that is the whole stride-32 stage, computed and thrown away)."""
    name = backbone.feature_info.module_name()[-1]
    match = re.fullmatch(r"blocks\.(\d+)", name)
    blocks = getattr(backbone, "blocks", None)
    if match and isinstance(blocks, nn.Sequential):
        backbone.blocks = blocks[: int(match.group(1)) + 1]


def _timm_from_file(name: str, path: Path, kwargs: dict[str, object]) -> nn.Module:
    if not path.is_file():
        raise FileNotFoundError(f"image tower weights not found: {path}")
    state = load_state_dict(str(path))
    pretrained_cfg = get_pretrained_cfg(name)
    classifier = (pretrained_cfg.classifier if pretrained_cfg else None) or "head"
    classifiers = (classifier,) if isinstance(classifier, str) else tuple(classifier)
    head = state.get(f"{classifiers[0]}.weight")
    num_classes = int(head.shape[0]) if head is not None else 0
    overlay = dict(file=str(path), num_classes=num_classes, custom_load=path.suffix == ".npz")
    try:
        model = timm.create_model(
            name, pretrained=True, num_classes=num_classes, pretrained_cfg_overlay=overlay, **kwargs
        )
    except RuntimeError as err:
        raise WeightsLoadError(f"image tower weights {path} do not match {name}: {err}") from err
    model.reset_classifier(0)
    logger.info("image tower %s: loaded %s", name, path)
    return model


def build_text_model(config: TextConfig, pretrained: bool) -> PreTrainedModel:
    """A transformers encoder (no pooler) from pretrained weights, or from its config at random init."""
    name = config.hf_model_name
    if pretrained and name:
        local = Path(name).is_dir()
        try:
            model, info = AutoModel.from_pretrained(name, output_loading_info=True, add_pooling_layer=False)
        except OSError as err:
            if local or not hub_unreachable(err):
                raise
            logger.warning(
                "text tower %s: pretrained weights unreachable (%s); starting from random init",
                name,
                type(err).__name__,
            )
        else:
            check_loading_info(name, info)
            return model
    else:
        logger.warning("text tower %s: random init (pretrained is off)", name or "bert_config")
    return AutoModel.from_config(_text_architecture(config), add_pooling_layer=False)


def _text_architecture(config: TextConfig) -> BertConfig:
    """The architecture to build from scratch: `bert_config`, or the hub config when there is none."""
    if config.bert_config is not None:
        return BertConfig(**{**config.bert_config, "vocab_size": config.vocab_size})
    return AutoConfig.from_pretrained(str(config.hf_model_name))


def check_loading_info(name: str, info: dict[str, object]) -> None:
    """Raise `WeightsLoadError` when a checkpoint left any key missing or unexpected beyond the allowed."""
    missing = sorted(k for k in info.get("missing_keys", ()) if not _matches(k, ALLOWED_MISSING_TEXT_KEYS))
    unexpected = sorted(k for k in info.get("unexpected_keys", ()) if not _matches(k, ALLOWED_UNEXPECTED_TEXT_KEYS))
    mismatched = sorted(str(k) for k in info.get("mismatched_keys", ()))
    errors = list(info.get("error_msgs", ()))
    if missing or unexpected or mismatched or errors:
        raise WeightsLoadError(
            f"text tower weights {name} do not match the architecture: missing {missing}, "
            f"unexpected {unexpected}, mismatched {mismatched}, errors {errors}"
        )


def hub_unreachable(err: BaseException) -> bool:
    """Whether an error says the hub could not be reached and nothing was cached (not: no such repo)."""
    seen: BaseException | None = err
    while seen is not None:
        if isinstance(seen, LocalEntryNotFoundError):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _matches(key: str, patterns: tuple[str, ...]) -> bool:
    return any(re.search(p, key) for p in patterns)
