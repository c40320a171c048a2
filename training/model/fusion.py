"""The joint transformer: [fused CLS] + image + text + tabular tokens, any subset present.

Each modality's tokens get a learned modality embedding (their positions are already encoded by their
own tower). A key padding mask hides absent modalities per sample and text padding, so one graph
serves image alone, text alone, image + tabular, or all three; the fused CLS is never masked, so no
row is ever fully masked.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from training.model.config import FusionConfig

MODALITIES: tuple[str, ...] = ("image", "text", "tabular")


class ModalityTokens(NamedTuple):
    """One modality's tokens in the fusion width and which of them are hidden (True = hidden)."""

    tokens: Tensor  # (B, L, width)
    hidden: Tensor  # (B, L) bool


class FusionOutput(NamedTuple):
    """The joint transformer's fused CLS state and the grade logits read from it."""

    cls: Tensor  # (B, width)
    icdr_logits: Tensor  # (B, num_icdr)
    sdrg_logits: Tensor  # (B, num_sdrg)


class FusionTransformer(nn.Module):
    """Pre-norm `nn.TransformerEncoder` over the concatenated modality tokens, plus the grade heads."""

    def __init__(self, config: FusionConfig, num_icdr: int, num_sdrg: int) -> None:
        super().__init__()
        self.width = config.width
        self.cls_token = nn.Parameter(torch.zeros(1, 1, config.width))
        self.modality_embedding = nn.Parameter(torch.zeros(len(MODALITIES), config.width))
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        nn.init.trunc_normal_(self.modality_embedding, std=0.02)
        layer = nn.TransformerEncoderLayer(
            d_model=config.width,
            nhead=config.heads,
            dim_feedforward=int(config.width * config.mlp_ratio),
            dropout=config.dropout,
            activation="gelu",
            batch_first=True,
            norm_first=True,
        )
        # Nested tensors would drop masked positions on the inference fast path; keep one code path.
        self.encoder = nn.TransformerEncoder(layer, config.depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(config.width)
        self.icdr_head = nn.Linear(config.width, num_icdr)
        self.sdrg_head = nn.Linear(config.width, num_sdrg)

    def forward(self, inputs: dict[str, ModalityTokens]) -> FusionOutput:
        """Fuse the given modalities (keys from `MODALITIES`; at least one) into a CLS state and logits."""
        if not inputs:
            raise ValueError("fusion needs at least one modality")
        unknown = set(inputs) - set(MODALITIES)
        if unknown:
            raise ValueError(f"unknown modalities {sorted(unknown)}; expected some of {MODALITIES}")
        first = next(iter(inputs.values())).tokens
        batch = first.shape[0]
        tokens = [self.cls_token.expand(batch, -1, -1).to(first.dtype)]
        hidden = [torch.zeros(batch, 1, dtype=torch.bool, device=first.device)]
        for index, name in enumerate(MODALITIES):
            if name in inputs:
                tokens.append(inputs[name].tokens + self.modality_embedding[index].to(first.dtype))
                hidden.append(inputs[name].hidden)
        x = self.encoder(torch.cat(tokens, dim=1), src_key_padding_mask=torch.cat(hidden, dim=1))
        cls = self.norm(x[:, 0])
        return FusionOutput(cls=cls, icdr_logits=self.icdr_head(cls), sdrg_logits=self.sdrg_head(cls))
