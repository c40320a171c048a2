"""Export a trained gate into a bundle as `gate.onnx` (pixels -> the six probabilities), checked against
PyTorch on ONNX Runtime before it is accepted."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from torch import Tensor, nn

from index.gate import GateSpec
from training.gate.model import GateNet
from training.gate.train import load_gate

GATE_INPUT = "pixels"
GATE_OUTPUT = "gate_probabilities"
PARITY_TOLERANCE = 1e-4
"""Largest absolute difference in any probability between PyTorch and ONNX Runtime."""


class GateGraph(nn.Module):
    """The gate as exported: normalised pixels (B, 3, S, S) -> probabilities (B, 6)."""

    def __init__(self, gate: GateNet) -> None:
        super().__init__()
        self.gate = gate

    def forward(self, pixels: Tensor) -> Tensor:
        """Sigmoid of the gate's logits."""
        return torch.sigmoid(self.gate(pixels))


def export_gate(folder: Path, out: Path, opset: int) -> GateSpec:
    """Write the gate trained in `folder` to `out/<spec.file>` and check it; returns its spec.
    Raises RuntimeError when ONNX Runtime's answers differ from PyTorch's."""
    model, spec = load_gate(folder)
    graph = GateGraph(model).eval()
    size = spec.image.size
    example = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    path = Path(out) / spec.file
    torch.onnx.export(
        graph, (example,), str(path), input_names=[GATE_INPUT], output_names=[GATE_OUTPUT],
        dynamic_shapes=({0: torch.export.Dim.DYNAMIC},), opset_version=opset, dynamo=True,
        external_data=False, verbose=False,
    )
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    check = torch.randn(5, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        expected = graph(check).numpy()
    (found,) = session.run([GATE_OUTPUT], {GATE_INPUT: check.numpy()})
    difference = float(np.abs(found - expected).max())
    if difference > PARITY_TOLERANCE:
        raise RuntimeError(f"{path.name}: ONNX Runtime differs from PyTorch by {difference:.2e} "
                           f"(tolerance {PARITY_TOLERANCE:.0e})")
    return spec
