"""`--precision auto`: bf16 only where the hardware does bf16 natively, fp32 elsewhere, with the reason."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from training.hardware import choose_precision, cpu_flags, cpu_model, describe_machine

CPU = torch.device("cpu")


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        ({"avx2", "avx512f", "amx_bf16", "amx_tile"}, "bf16"),  # Intel Sapphire Rapids and later
        ({"avx2", "avx512f", "avx512_bf16"}, "bf16"),  # AMD Zen 4, Intel Cooper Lake
        ({"avx2", "avx512f", "avx512_vnni"}, "fp32"),  # Xeon with VNNI only: bf16 is emulated, 0.29x fp32
        ({"avx2", "fma"}, "fp32"),
    ],
)
def test_auto_picks_bf16_only_where_it_is_native(flags: set[str], expected: str) -> None:
    choice = choose_precision("auto", CPU, flags=flags)
    assert choice.precision == expected
    assert choice.reason.startswith("auto: ")
    if expected == "bf16":
        assert any(flag in choice.reason for flag in ("amx_bf16", "avx512_bf16"))


def test_unknown_flags_mean_fp32_and_an_explicit_choice_is_kept() -> None:
    assert choose_precision("auto", CPU, flags=None).precision in ("bf16", "fp32")  # this machine's own flags
    assert choose_precision("bf16", CPU, flags=set()).precision == "bf16"
    assert choose_precision("fp32", CPU, flags={"amx_bf16"}).precision == "fp32"
    with pytest.raises(ValueError, match="auto, bf16, fp32"):
        choose_precision("fp16", CPU)


def test_cpuinfo_is_parsed(tmp_path: Path) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: Test CPU 9000\nflags\t\t: fpu avx2 avx512_bf16\n\n")
    assert cpu_flags(cpuinfo) == {"fpu", "avx2", "avx512_bf16"}
    assert cpu_model(cpuinfo) == "Test CPU 9000"
    assert cpu_flags(tmp_path / "absent") is None
    line = describe_machine(CPU)
    assert "torch threads" in line and "bf16" in line


def test_fit_records_the_precision_it_chose(tmp_path: Path) -> None:
    from index.archive.brset import read_archive
    from training.splits import make_splits, save_splits
    from training.synth.archive import write_archive
    from training.synth.priors import sample_records
    from training.train import FitOptions, fit

    write_archive(sample_records(24, seed=5), tmp_path / "archive", size=96, seed=5)
    save_splits(make_splits(read_archive(tmp_path / "archive").records, seed=0), tmp_path / "splits.json")
    info = fit(FitOptions(config="tiny", archive=tmp_path / "archive", splits=tmp_path / "splits.json",
                          out=tmp_path / "run", epochs=1, batch_size=8, max_steps=1))
    expected = choose_precision("auto", CPU)
    assert info["precision"] == expected.precision and info["precision_reason"] == expected.reason
    assert info["machine"] == describe_machine(CPU)
