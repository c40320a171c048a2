"""ONNX Runtime dynamic int8 quantization, one policy for the export and the benchmark.

Weights are quantized to 7 bits (`reduce_range=True`). On x86 CPUs without VNNI (AVX2 only, e.g. this
project's AMD EPYC machines without AVX-512), ONNX Runtime's u8 x s8 kernels add pairs of products in
16 bits, which saturate with full 8-bit weights: the `tiny` image tower's int8 embeddings fell to cosine
0.989 to fp32 there, and to 0.99989 with 7-bit weights. A bundle may be served on any CPU, so the
portable setting is always used; on VNNI CPUs it costs nothing measurable in speed.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

EXPORT_OP_TYPES: tuple[str, ...] = ("MatMul",)
"""What `retina-train export --precision int8` quantizes: the transformers' matrix products, per output
channel. Convolutions (a ViT's patch embedding, a convolutional stem) see raw pixels, where int8 loses
the most, and stay fp32: the `tiny` image tower on noise went from cosine 0.9991 (everything, per tensor)
to 0.9994 to fp32, at 2.8 instead of 2.4 MB (fp32: 8.2 MB)."""


def quantize_int8(
    source: Path,
    target: Path,
    per_channel: bool = False,
    optimized: bool = False,
    op_types: Sequence[str] | None = None,
) -> Path:
    """ONNX Runtime dynamic quantization of `source` to `target`: int8 weights (7-bit range), activations
    quantized per batch at run time; optionally per output channel, only some operator types (default:
    ONNX Runtime's own list), or of a graph the transformer optimizer has fused (which needs the default
    tensor type to be stated)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    extra: dict[str, object] = {}
    if optimized:
        import onnx

        # The optimizer's fused ops carry no type information the quantizer can read without this.
        extra["DefaultTensorType"] = onnx.TensorProto.FLOAT
    quantize_dynamic(str(source), str(target), weight_type=QuantType.QInt8, per_channel=per_channel,
                     reduce_range=True, op_types_to_quantize=list(op_types) if op_types else None,
                     extra_options=extra)
    return Path(target)
