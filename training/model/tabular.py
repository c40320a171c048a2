"""The tabular tower: an MLP over `index.tabular.FeatureSpec` features -> one hidden vector.

The model projects that vector twice, like every tower's output: to one token of the joint
transformer's width, and to the shared embedding space (`RetinaAlignModel.encode_tabular`).
"""

from __future__ import annotations

from torch import Tensor, nn

from training.model.config import TabularConfig


class TabularEncoder(nn.Module):
    """`layers` x (Linear -> GELU -> Dropout) from the feature width to `hidden`, then LayerNorm."""

    def __init__(self, input_width: int, config: TabularConfig) -> None:
        super().__init__()
        blocks: list[nn.Module] = []
        width = input_width
        for _ in range(config.layers):
            blocks += [nn.Linear(width, config.hidden), nn.GELU(), nn.Dropout(config.dropout)]
            width = config.hidden
        self.mlp = nn.Sequential(*blocks)
        self.norm = nn.LayerNorm(config.hidden)
        self.width: int = config.hidden

    def forward(self, features: Tensor) -> Tensor:
        """(B, input_width) float features -> (B, hidden)."""
        return self.norm(self.mlp(features))
