"""An ONNX graph -> an OpenVINO INT8 IR: NNCF post-training quantization, the one policy behind both
`retina-train export --openvino-int8` (the bundle's encoders) and `retina-train bench-embed` (the towers
`retina-index bench` times).

The transformer preset (`model_type=TRANSFORMER`) without SmoothQuant: SmoothQuant (on by default for
transformers) cost accuracy here (tiny's image tower 0.9986 -> 0.9996 cosine to fp32 without it, its text
tower 0.9977 -> 0.9999) at the same speed. NNCF's overflow fix on every layer (7-bit weights), not only the
first (its default): on x86 CPUs without VNNI (AVX2 only) the u8 x s8 int8 kernels saturate with full 8-bit
weights, and the IR does not know which CPU will serve it. Measured on an AVX2-only AMD EPYC, a 2-step
`tiny` bundle's image encoder: cosine 0.98976 to fp32 with the default, 0.99985 with the fix on every layer.
(The same reason as the 7-bit weights of ONNX Runtime's int8, `index/quantize.py`.) Calibration runs one
item at a time on inputs the caller picks (never the ones the result is checked or timed on). The IR keeps
the weights NNCF leaves unquantized in fp32.

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


def quantizer_description() -> str:
    """What `quantize_to_ir` uses, with versions (recorded in the bundle's manifest)."""
    import nncf
    import openvino as ov

    return (f"NNCF {nncf.__version__} post-training INT8 (transformer preset, no SmoothQuant, overflow fix on "
            f"every layer), OpenVINO {ov.__version__.split('-')[0]}")


def quantize_to_ir(onnx_path: Path, items: Sequence[dict[str, np.ndarray]], target: Path) -> Path:
    """NNCF-quantize the ONNX graph at `onnx_path` into an OpenVINO IR at `target` (.xml, and its weights in
    the .bin beside it), calibrated on `items` (one feed dict of a single item each). Returns `target`.
    Raises ImportError (naming the extra) without openvino or nncf."""
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
        smooth_quant_alphas=AdvancedSmoothQuantParameters(matmul=-1), overflow_fix=OverflowFix.ENABLE
    )
    with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink):  # its progress bars
        quantized = nncf.quantize(model, nncf.Dataset(list(items)), subset_size=len(items),
                                  model_type=nncf.ModelType.TRANSFORMER, advanced_parameters=advanced)
    # Uncompressed: the weights NNCF left unquantized stay fp32 (save_model's default would store them as fp16).
    ov.save_model(quantized, str(target), compress_to_fp16=False)
    return Path(target)
