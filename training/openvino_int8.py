"""An ONNX graph -> an OpenVINO INT8 IR: NNCF post-training quantization, the one policy behind both
`retina-train export --openvino-int8` (the bundle's encoders) and `retina-train bench-embed` (the towers
`retina-index bench` times).

The transformer preset (`model_type=TRANSFORMER`) without SmoothQuant: SmoothQuant (on by default for
transformers) cost accuracy here (tiny's image tower 0.9986 -> 0.9996 cosine to fp32 without it, its text
tower 0.9977 -> 0.9999) at the same speed.

Weight range: on x86 CPUs without VNNI or AMX (AVX2 or AVX-512 only) the u8 x s8 int8 kernels saturate
with weights in the full 8-bit range, so on such a CPU NNCF's overflow fix goes on every layer (7-bit
weights, exact on every CPU); with VNNI it stays NNCF's default, the first layer only (8-bit weights, more
precise, but an IR the openvino runtime does not use on a CPU without VNNI: `full_range`). Measured on an
AVX2-only AMD EPYC: a 2-step `tiny` bundle's image encoder reached cosine 0.98976 to fp32 with 8-bit
weights, 0.99985 with 7-bit; the random-init `paper` image tower 0.99813 with 7-bit (0.99912 with 8-bit on
an EPYC with VNNI, `retina-index bench`). (The same reason as the 7-bit weights of ONNX Runtime's int8,
`index/quantize.py`.) Calibration runs one item at a time on inputs the caller picks (never the ones the
result is checked or timed on). The IR keeps the weights NNCF leaves unquantized in fp32.

openvino and nncf are the optional `openvino` extra; nncf imports torch when it is installed, which is why
this lives in `training/`, never in `index/` or `service/`.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from index.runtimes import cpu_has_vnni

PACKAGES = ("openvino", "nncf")
INSTALL = "pip install 'retina-align[openvino]'"


def missing_packages() -> list[str]:
    """Which of openvino and nncf cannot be imported here."""
    missing = []
    for name in PACKAGES:
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            missing.append(name)
    return missing


def full_range() -> bool:
    """Whether `quantize_to_ir` keeps weights in the full 8-bit range here: on a CPU with VNNI or AMX."""
    return cpu_has_vnni()


def quantizer_description() -> str:
    """What `quantize_to_ir` uses here, with versions (recorded in the bundle's manifest)."""
    import nncf
    import openvino as ov

    weights = "8-bit weights (overflow fix on the first layer)" if full_range() else "7-bit weights (overflow fix)"
    return (f"NNCF {nncf.__version__} post-training INT8 (transformer preset, no SmoothQuant, {weights}), "
            f"OpenVINO {ov.__version__.split('-')[0]}")


def quantize_to_ir(onnx_path: Path, items: Sequence[dict[str, np.ndarray]], target: Path) -> Path:
    """NNCF-quantize the ONNX graph at `onnx_path` into an OpenVINO IR at `target` (.xml, and its weights in
    the .bin beside it), calibrated on `items` (one feed dict of a single item each), with weights in the
    range this CPU runs exactly (`full_range`). Returns `target`. Raises ImportError (naming the extra)
    without openvino or nncf."""
    missing = missing_packages()
    if missing:
        raise ImportError(f"{' and '.join(missing)} not installed: {INSTALL}")
    if not items:
        raise ValueError("no calibration items")
    import nncf
    import openvino as ov
    from nncf.quantization.advanced_parameters import (
        AdvancedQuantizationParameters,
        AdvancedSmoothQuantParameters,
        OverflowFix,
    )

    nncf.set_log_level(logging.ERROR)
    model = ov.Core().read_model(str(onnx_path))
    advanced = AdvancedQuantizationParameters(
        smooth_quant_alphas=AdvancedSmoothQuantParameters(matmul=-1),
        overflow_fix=OverflowFix.FIRST_LAYER if full_range() else OverflowFix.ENABLE,
    )
    with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink):  # its progress bars
        quantized = nncf.quantize(model, nncf.Dataset(list(items)), subset_size=len(items),
                                  model_type=nncf.ModelType.TRANSFORMER, advanced_parameters=advanced)
    # Uncompressed: the weights NNCF left unquantized stay fp32 (save_model's default would store them as fp16).
    ov.save_model(quantized, str(target), compress_to_fp16=False)
    return Path(target)
