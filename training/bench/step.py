"""Training-step throughput: samples/s of a full step (forward, backward, AdamW) in fp32 and bf16."""

from __future__ import annotations

import platform
import statistics
import time
from dataclasses import dataclass

import torch

from training.hardware import autocast_context
from training.model.factory import create_model

TEXT_LENGTH = 64
TABULAR_WIDTH = 39
NUMERIC_COLUMNS = (0, 2)  # the BRSET feature spec's age and diabetes-duration values


@dataclass(frozen=True)
class StepTiming:
    """One measured configuration."""

    config: str
    precision: str
    batch_size: int
    samples_per_second: float


def _batch(batch_size: int, image_size: int, vocab_size: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {
        "pixels": torch.randn(batch_size, 3, image_size, image_size, generator=generator),
        "input_ids": torch.randint(5, vocab_size, (batch_size, TEXT_LENGTH), generator=generator),
        "attention_mask": torch.ones(batch_size, TEXT_LENGTH, dtype=torch.long),
        "tabular": torch.randn(batch_size, TABULAR_WIDTH, generator=generator),
        "icdr": torch.randint(0, 5, (batch_size,), generator=generator),
        "sdrg": torch.randint(0, 5, (batch_size,), generator=generator),
    }


def time_training_step(config: str, precision: str, batch_size: int, steps: int = 6, warmup: int = 2) -> StepTiming:
    """Median samples/s over `steps` full training steps of a randomly initialised model on random data."""
    torch.manual_seed(0)
    model = create_model(config, tabular_width=TABULAR_WIDTH, numeric_columns=NUMERIC_COLUMNS, pretrained=False)
    model.train()
    batch = _batch(batch_size, model.config.vision.image.size, model.text.vocab_size)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    device = torch.device("cpu")
    seconds = []
    for _ in range(warmup + steps):
        started = time.perf_counter()
        with autocast_context(precision, device):
            losses = model(batch)
        losses["total"].backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        seconds.append(time.perf_counter() - started)
    return StepTiming(config, precision, batch_size, batch_size / statistics.median(seconds[warmup:]))


def machine_line() -> str:
    """The machine the numbers were measured on."""
    return (f"{platform.machine()} {platform.processor() or ''}, {torch.get_num_threads()} torch threads, "
            f"torch {torch.__version__}")
