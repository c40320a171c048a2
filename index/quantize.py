"""ONNX Runtime dynamic int8 quantization, one policy for the export and the benchmark.

Weights are quantized to 7 bits (`reduce_range=True`). On x86 CPUs without VNNI (AVX2 only, e.g. this
project's AMD EPYC machines without AVX-512), ONNX Runtime's u8 x s8 kernels add pairs of products in
16 bits, which saturate with full 8-bit weights: the `tiny` image tower's int8 embeddings fell to cosine
0.989 to fp32 there, and to 0.99989 with 7-bit weights. A bundle may be served on any CPU, so the
portable setting is always used; on VNNI CPUs it costs nothing measurable in speed.
"""

from __future__ import annotations

from pathlib import Path


def quantize_int8(source: Path, target: Path, per_channel: bool = False, optimized: bool = False) -> Path:
    """ONNX Runtime dynamic quantization of `source` to `target`: int8 weights (7-bit range), activations
    quantized per batch at run time; optionally per output channel, or of a graph the transformer
    optimizer has fused (which needs the default tensor type to be stated)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    extra: dict[str, object] = {}
    if optimized:
        import onnx

        # The optimizer's fused ops carry no type information the quantizer can read without this.
        extra["DefaultTensorType"] = onnx.TensorProto.FLOAT
    quantize_dynamic(str(source), str(target), weight_type=QuantType.QInt8, per_channel=per_channel,
                     reduce_range=True, extra_options=extra)
    return Path(target)
