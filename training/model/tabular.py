"""The tabular tower: an MLP over `index.tabular.FeatureSpec` features -> one hidden vector.

The model projects that vector twice, like every tower's output: to one token of the joint
transformer's width, and to the shared embedding space (`RetinaAlignModel.encode_tabular`).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from training.model.config import TabularConfig


class PeriodicEmbedding(nn.Module):
    """Numeric values (B, K) -> (B, K * frequencies): per value, sin and cos of 2 pi x times its learned
    frequencies, then its own linear layer and a ReLU (the PLR embedding of Gorishniy et al. 2022)."""

    def __init__(self, values: int, frequencies: int, scale: float) -> None:
        super().__init__()
        self.frequencies = nn.Parameter(torch.randn(values, frequencies) * scale)
        self.weight = nn.Parameter(torch.empty(values, 2 * frequencies, frequencies))
        self.bias = nn.Parameter(torch.zeros(values, frequencies))
        bound = 1 / math.sqrt(2 * frequencies)  # nn.Linear's default init, per value
        nn.init.uniform_(self.weight, -bound, bound)
        self.width = values * frequencies

    def forward(self, values: Tensor) -> Tensor:
        """(B, K) standardised values -> (B, K * frequencies)."""
        angles = 2 * math.pi * values.unsqueeze(-1) * self.frequencies  # (B, K, F)
        periodic = torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1)  # (B, K, 2F)
        embedded = torch.einsum("bkp,kpf->bkf", periodic, self.weight) + self.bias
        return torch.relu(embedded).flatten(1)


class TabularEncoder(nn.Module):
    """`layers` x (Linear -> GELU -> Dropout) from the feature width to `hidden`, then LayerNorm; under
    `numeric_encoding` "periodic" the numeric value columns enter through a `PeriodicEmbedding` first."""

    def __init__(self, input_width: int, config: TabularConfig) -> None:
        super().__init__()
        self.periodic: PeriodicEmbedding | None = None
        self.numeric_columns: list[int] = []
        self.other_columns: list[int] = list(range(input_width))
        width = input_width
        if config.numeric_encoding == "periodic":
            if not config.numeric_columns:
                raise ValueError("tabular.numeric_encoding 'periodic' needs numeric_columns "
                                 "(create_model sets them from the feature spec)")
            self.numeric_columns = list(config.numeric_columns)
            self.other_columns = [c for c in range(input_width) if c not in self.numeric_columns]
            self.periodic = PeriodicEmbedding(len(self.numeric_columns), config.frequencies, config.frequency_scale)
            width = len(self.other_columns) + self.periodic.width
        blocks: list[nn.Module] = []
        for _ in range(config.layers):
            blocks += [nn.Linear(width, config.hidden), nn.GELU(), nn.Dropout(config.dropout)]
            width = config.hidden
        self.mlp = nn.Sequential(*blocks)
        self.norm = nn.LayerNorm(config.hidden)
        self.width: int = config.hidden

    def forward(self, features: Tensor) -> Tensor:
        """(B, input_width) float features -> (B, hidden)."""
        if self.periodic is not None:
            features = torch.cat([features[:, self.other_columns],
                                  self.periodic(features[:, self.numeric_columns])], dim=-1)
        return self.norm(self.mlp(features))
