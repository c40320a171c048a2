"""`GateNet`: the gradability gate's network, small enough to run beside every query.

Six plain stride-2 convolution blocks (224 px -> 4 x 4 cells), then a head over the flattened 4 x 4
map: where things are matters (an off-centre field, a dark crescent on one side), so the cells are not
averaged away. Plain 3x3 convolutions train several times faster on CPUs than the depthwise blocks of
mobile networks of the same cost (timm's `mobilenetv3_small_050` trained at 11 images/s on one core
here, this one at about 60), and the gate is trained where the model is, often on CPUs.
"""

from __future__ import annotations

from torch import Tensor, nn

from index.gate import GATE_OUTPUTS

WIDTHS: tuple[int, ...] = (16, 24, 32, 48, 64, 96)
GRID = 4
HIDDEN = 64


def _block(width_in: int, width_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(width_in, width_out, 3, stride=2, padding=1, bias=False),
        nn.BatchNorm2d(width_out),
        nn.ReLU(inplace=True),
    )


class GateNet(nn.Module):
    """Normalised pixels (B, 3, S, S) -> one logit per `GATE_OUTPUTS` name (B, 6)."""

    def __init__(self, widths: tuple[int, ...] = WIDTHS, outputs: int = len(GATE_OUTPUTS)) -> None:
        super().__init__()
        blocks, width = [], 3
        for out in widths:
            blocks.append(_block(width, out))
            width = out
        self.features = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(GRID)
        self.head = nn.Sequential(
            nn.Flatten(), nn.Dropout(0.2), nn.Linear(width * GRID * GRID, HIDDEN), nn.ReLU(inplace=True),
            nn.Linear(HIDDEN, outputs),
        )

    def forward(self, pixels: Tensor) -> Tensor:
        """Logits (B, outputs); the probabilities are their sigmoids (the exported graph applies it)."""
        return self.head(self.pool(self.features(pixels)))
