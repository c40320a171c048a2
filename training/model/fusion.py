"""The joint transformer: [fused CLS] + image + text + tabular tokens, any subset present.

Each modality's tokens get a learned modality embedding (their positions are already encoded by their
own tower). A key padding mask hides absent modalities per sample and text padding, so one graph
serves image alone, text alone, image + tabular, or all three; the fused CLS is never masked, so no
row is ever fully masked.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
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


class FusionSelfAttention(nn.Module):
    """Multi-head self-attention with `nn.MultiheadAttention`'s parameter names (`in_proj_weight`,
    `in_proj_bias`, `out_proj`), written with shapes taken from the input so that ONNX export keeps the
    batch and sequence axes dynamic (the fused `nn.TransformerEncoderLayer` path bakes them in)."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"fusion width {width} is not divisible by {heads} heads")
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, x: Tensor, additive_mask: Tensor) -> Tensor:
        """x (B, N, W); additive_mask (B, 1, 1, N): 0 where a key is visible, a large negative where hidden."""
        batch, length, width = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)
        qkv = qkv.reshape(batch, length, 3, self.heads, width // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], attn_mask=additive_mask.to(qkv.dtype))
        return self.out_proj(out.transpose(1, 2).reshape(batch, length, width))


class FusionLayer(nn.Module):
    """A pre-norm transformer layer with `nn.TransformerEncoderLayer`'s parameter names."""

    def __init__(self, config: FusionConfig) -> None:
        super().__init__()
        hidden = int(config.width * config.mlp_ratio)
        self.self_attn = FusionSelfAttention(config.width, config.heads)
        self.linear1 = nn.Linear(config.width, hidden)
        self.linear2 = nn.Linear(hidden, config.width)
        self.norm1 = nn.LayerNorm(config.width)
        self.norm2 = nn.LayerNorm(config.width)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor, additive_mask: Tensor) -> Tensor:
        """One layer: x + attention(norm1(x)), then x + MLP(norm2(x))."""
        x = x + self.dropout(self.self_attn(self.norm1(x), additive_mask))
        return x + self.dropout(self.linear2(self.dropout(F.gelu(self.linear1(self.norm2(x))))))


class FusionEncoder(nn.Module):
    """A stack of `FusionLayer`s (named `layers`, as in `nn.TransformerEncoder`)."""

    def __init__(self, config: FusionConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(FusionLayer(config) for _ in range(config.depth))

    def forward(self, x: Tensor, hidden: Tensor) -> Tensor:
        """x (B, N, W); hidden (B, N) True for tokens no query may attend to."""
        additive_mask = torch.zeros(hidden.shape, dtype=x.dtype, device=x.device)
        additive_mask = additive_mask.masked_fill(hidden, torch.finfo(x.dtype).min)[:, None, None, :]
        for layer in self.layers:
            x = layer(x, additive_mask)
        return x


class FusionTransformer(nn.Module):
    """Pre-norm transformer over the concatenated modality tokens, plus the grade heads."""

    def __init__(self, config: FusionConfig, num_icdr: int, num_sdrg: int) -> None:
        super().__init__()
        self.width = config.width
        self.cls_token = nn.Parameter(torch.zeros(1, 1, config.width))
        self.modality_embedding = nn.Parameter(torch.zeros(len(MODALITIES), config.width))
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        nn.init.trunc_normal_(self.modality_embedding, std=0.02)
        self.encoder = FusionEncoder(config)
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
        x = self.encoder(torch.cat(tokens, dim=1), torch.cat(hidden, dim=1))
        cls = self.norm(x[:, 0])
        return FusionOutput(cls=cls, icdr_logits=self.icdr_head(cls), sdrg_logits=self.sdrg_head(cls))
