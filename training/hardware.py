"""What the machine is, and which training precision it should use: `--precision auto` (the default).

bf16 autocast only pays where the hardware does bf16 arithmetic natively: a GPU with bf16 support, or a
CPU with AMX (`amx_bf16`) or AVX-512 BF16 (`avx512_bf16`). Elsewhere PyTorch emulates bf16 with
conversions around fp32 work, which is slower than fp32 itself (measured on an Intel Xeon with AVX-512
VNNI and neither flag: `tiny` fp32 19.3, bf16 5.6 samples/s). So `auto` reads the CPU flags (or asks
CUDA) and picks bf16 only where it is native; the choice and its reason are recorded with the run.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Literal

import torch

from index.cpus import cpu_flags, cpu_model

Precision = Literal["bf16", "fp32"]
PrecisionRequest = Literal["auto", "bf16", "fp32"]
PRECISION_CHOICES: tuple[str, ...] = ("auto", "bf16", "fp32")
NATIVE_BF16_CPU_FLAGS: tuple[str, ...] = ("amx_bf16", "avx512_bf16")
"""Linux /proc/cpuinfo flags of CPUs that do bf16 arithmetic in hardware."""


@dataclass(frozen=True)
class PrecisionChoice:
    """The precision a run uses and why."""

    precision: Precision
    reason: str


def describe_machine(device: torch.device) -> str:
    """One line naming the hardware a run used: GPU name, or CPU model, cores and bf16 support."""
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA), torch {torch.__version__}"
    flags = cpu_flags() or set()
    native = [f for f in NATIVE_BF16_CPU_FLAGS if f in flags]
    return (f"{cpu_model()}, {torch.get_num_threads()} torch threads, "
            f"bf16 {'native (' + ', '.join(native) + ')' if native else 'not native'}, torch {torch.__version__}")


def choose_precision(
    requested: str, device: torch.device, flags: set[str] | None = None
) -> PrecisionChoice:
    """Resolve a `--precision` value (auto, bf16, fp32) for a device; `flags` overrides the CPU's own."""
    if requested not in PRECISION_CHOICES:
        raise ValueError(f"precision must be one of {', '.join(PRECISION_CHOICES)}, not {requested!r}")
    if requested != "auto":
        return PrecisionChoice(requested, "asked for")  # type: ignore[arg-type]
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return PrecisionChoice("bf16", f"auto: {torch.cuda.get_device_name(device)} supports bf16")
        return PrecisionChoice("fp32", f"auto: {torch.cuda.get_device_name(device)} has no bf16 support")
    flags = cpu_flags() if flags is None else flags
    if flags is None:
        return PrecisionChoice("fp32", "auto: the CPU's flags cannot be read, so bf16 is not known to be native")
    native = [flag for flag in NATIVE_BF16_CPU_FLAGS if flag in flags]
    if native:
        return PrecisionChoice("bf16", f"auto: the CPU does bf16 natively ({', '.join(native)})")
    return PrecisionChoice(
        "fp32", f"auto: the CPU has neither {' nor '.join(NATIVE_BF16_CPU_FLAGS)}, so bf16 would be emulated (slower)"
    )


def autocast_context(precision: str, device: torch.device) -> AbstractContextManager:
    """bf16 autocast on CPU (fast on AMX) or GPU; nothing for fp32."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()
