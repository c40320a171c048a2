"""`retina-train gate fit` and `retina-train gate evaluate`: train the gradability gate, and measure it
through the exported bundle."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from index.archive.brset import ArchiveError, read_archive

gate_app = typer.Typer(no_args_is_help=True, add_completion=False, help=__doc__)
console = Console(stderr=True)


def _fail(message: str) -> typer.Exit:
    console.print(f"[red]error:[/red] {message}")
    return typer.Exit(code=2)


@gate_app.command()
def fit(
    archive: Annotated[Path, typer.Option(help="A labelled archive (BRSET layout, `quality` and defect columns).")],
    out: Annotated[Path, typer.Option(help="Folder for the gate (e.g. RUN/gate, which `export --run RUN` picks up).")],
    splits: Annotated[Path | None, typer.Option(help="Its splits.json (default: a patient-level 85/15 split).")] = None,
    epochs: Annotated[int, typer.Option(min=1, help="Passes over the training photographs.")] = 6,
    batch_size: Annotated[int, typer.Option(min=2, help="Photographs per step.")] = 64,
    lr: Annotated[float, typer.Option(min=0.0, help="Peak learning rate (one-cycle).")] = 3e-3,
    negative_share: Annotated[float, typer.Option(min=0.0, help="Fresh non-fundus images per epoch, as a share "
                                                  "of the training photographs.")] = 0.3,
    realism: Annotated[float, typer.Option(min=0.0, max=1.0, help="Share of training images given colour casts, "
                                           "softness and noise (0: none; see README 'Trust').")] = 0.0,
    seed: Annotated[int, typer.Option(help="Seed of the negatives, the order and the weights.")] = 0,
    threads: Annotated[int | None, typer.Option(min=1, help="Torch threads (default: all CPUs).")] = None,
) -> None:
    """Train the gradability gate on an archive's photographs and rendered and photographic negatives."""
    from training.gate.train import GateOptions, fit_gate
    from training.splits import load_splits, make_splits

    try:
        loaded = read_archive(archive)
        chosen = load_splits(splits) if splits else make_splits(loaded.records, fractions=(0.85, 0.15, 0.0))
    except (ArchiveError, ValueError, OSError) as error:
        raise _fail(str(error)) from None
    options = GateOptions(epochs=epochs, batch_size=batch_size, lr=lr, negative_share=negative_share, seed=seed,
                          threads=threads, realism=realism)
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  console=console) as progress:
        tasks: dict[str, int] = {}

        def report(stage: str, done: int, total: int) -> None:
            if stage not in tasks:
                tasks[stage] = progress.add_task(stage, total=total)
            progress.update(tasks[stage], completed=done)

        try:
            spec = fit_gate(loaded, chosen, out, options, report)
        except (ValueError, FileNotFoundError) as error:
            raise _fail(str(error)) from None
    for name, value in spec.metrics.items():
        console.print(f"{name:28s} {value:.4f}")
    console.print(f"adequate threshold {spec.adequate_threshold:.3f}; wrote {out}")


@gate_app.command()
def evaluate(
    bundle: Annotated[Path, typer.Option(help="A bundle with a gate (`retina-train export` of a run with RUN/gate).")],
    archive: Annotated[Path | None, typer.Option(help="A labelled archive: ungradable-vs-gradable AUROC.")] = None,
    photos: Annotated[Path | None, typer.Option(help="A folder of unlabelled photographs: the share flagged.")] = None,
    sheet: Annotated[Path | None, typer.Option(help="With --photos: a PNG contact sheet of the flagged ones.")] = None,
    json_path: Annotated[Path | None, typer.Option("--json", help="Save the whole report to this JSON file.")] = None,
    threads: Annotated[int | None, typer.Option(min=1, help="ONNX Runtime threads (default: all CPUs).")] = None,
) -> None:
    """Measure a bundle's gate through ONNX Runtime, as the service runs it: AUROC on a labelled archive,
    scikit-image's non-fundus samples, and the share of a folder of photographs it flags."""
    from index.bundle import BundleError
    from training.gate.evaluate import evaluate_gate

    with Progress(TextColumn("gating"), BarColumn(), MofNCompleteColumn(), console=console) as progress:
        task = progress.add_task("gating", total=None)
        try:
            report = evaluate_gate(bundle, archive, photos, sheet, lambda n: progress.advance(task, n), threads)
        except (BundleError, ArchiveError, ValueError, OSError) as error:
            raise _fail(str(error)) from None
    if "archive" in report:
        figures = report["archive"]
        console.print(f"archive {figures['path']}: {figures['photographs']} photographs, {figures['ungradable']} "
                      f"ungradable; AUROC {figures.get('ungradable_auroc', 'n/a')}, "
                      f"flagged {figures['flagged_share']:.1%}")
    samples = report["skimage"]
    for group in ("trained_on", "never_seen"):
        missed = [name for name, answer in samples[group].items() if not answer["flagged_not_fundus"]]
        console.print(f"scikit-image samples {group}: {len(samples[group]) - len(missed)}/{len(samples[group])} "
                      f"flagged not fundus" + (f" (missed: {', '.join(missed)})" if missed else ""))
    retina = samples["retina"]
    console.print(f"scikit-image retina: {'gradable' if retina['ok'] else '; '.join(retina['reasons'])} "
                  f"(probability {retina['probability']:.3f})")
    if "photos" in report:
        figures = report["photos"]
        console.print(f"photos {figures['path']}: {figures['photographs']} photographs, flagged "
                      f"{figures['flagged_share']:.1%} (not fundus {figures['not_fundus_share']:.1%})")
    console.print(f"gate latency: {report['latency_ms_one_photograph']} ms per photograph")
    if json_path is not None:
        json_path.write_text(json.dumps(report, indent=1) + "\n")
        console.print(f"wrote {json_path}")
