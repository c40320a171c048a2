"""`retina-train`: the offline application (synthetic archive, splits; training joins as it lands)."""

from __future__ import annotations

import io
import os
import platform
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from index.brset import ArchiveError, read_archive, read_labels

app = typer.Typer(no_args_is_help=True, add_completion=False, help=__doc__)
console = Console(stderr=True)


def _fail(message: str) -> typer.Exit:
    console.print(f"[red]error:[/red] {message}")
    return typer.Exit(code=2)


def _progress() -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeRemainingColumn(),
        console=console,
    )


@app.command()
def synth(
    out: Annotated[Path, typer.Option(help="Folder to write the BRSET-layout archive to.")],
    n: Annotated[int | None, typer.Option(help="Number of photographs (default 500; with --labels, all rows).")] = None,
    seed: Annotated[int, typer.Option(help="Random seed: the same seed writes the same archive.")] = 0,
    size: Annotated[int, typer.Option(help="Photograph side in pixels.")] = 512,
    labels: Annotated[
        Path | None, typer.Option(help="A BRSET label CSV: render one photograph per row instead of sampling.")
    ] = None,
    contact_sheet: Annotated[Path | None, typer.Option(help="Also write a PNG grid of examples by grade.")] = None,
    workers: Annotated[int, typer.Option(help="Rendering processes.")] = os.cpu_count() or 1,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing archive at --out.")] = False,
) -> None:
    """Write a synthetic BRSET-layout archive whose photographs match their labels."""
    from training.synth.archive import write_archive
    from training.synth.contact_sheet import write_contact_sheet
    from training.synth.priors import sample_records

    try:
        if labels is not None:
            records, report = read_labels(labels)
            if report.rejected_total:
                console.print(f"[yellow]{report.rejected_total} values in {labels} were rejected "
                              "(kept as missing); run `retina-index describe` for details[/yellow]")
            records = records[:n] if n is not None else records
        else:
            records = sample_records(n if n is not None else 500, seed)
        if not records:
            raise _fail("no records to render")
        with _progress() as progress:
            task = progress.add_task("rendering", total=len(records), rate="")
            started = time.perf_counter()

            def advance(k: int) -> None:
                progress.advance(task, k)
                done = progress.tasks[task].completed
                progress.update(task, rate=f"{done / (time.perf_counter() - started):.1f} img/s")

            summary = write_archive(records, out, size, seed, workers, overwrite, advance)
    except (ArchiveError, ValueError, FileExistsError) as error:
        raise _fail(str(error)) from None
    console.print(
        f"wrote {summary.images} photographs to {summary.out} in {summary.seconds:.1f} s "
        f"({summary.images_per_second:.1f} img/s with {workers} worker(s))"
    )
    if contact_sheet is not None:
        archive = read_archive(out)
        write_contact_sheet(archive.records, archive.photo_path, contact_sheet)
        console.print(f"contact sheet: {contact_sheet}")


@app.command("synth-bench")
def synth_bench(
    n: Annotated[int, typer.Option(help="Photographs to render.")] = 100,
    size: Annotated[int, typer.Option(help="Photograph side in pixels.")] = 512,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
) -> None:
    """Benchmark the generator on one core: images/s for rendering and JPEG encoding."""
    from training.synth.archive import JPEG_QUALITY, image_rng
    from training.synth.priors import sample_records
    from training.synth.render import render_fundus

    records = sample_records(n, seed)
    render_seconds = encode_seconds = 0.0
    for i, record in enumerate(records):
        started = time.perf_counter()
        image, _ = render_fundus(record, size, image_rng(seed, i))
        rendered = time.perf_counter()
        image.save(io.BytesIO(), format="JPEG", quality=JPEG_QUALITY)
        encode_seconds += time.perf_counter() - rendered
        render_seconds += rendered - started
    total = render_seconds + encode_seconds
    print(f"machine: {platform.processor() or platform.machine()}, 1 process, {size} px, {n} images")
    print(f"render only:       {n / render_seconds:7.1f} images/s")
    print(f"render + jpeg:     {n / total:7.1f} images/s per core (target >= 20 at 512 px)")


@app.command()
def split(
    archive: Annotated[Path, typer.Argument(help="A BRSET-layout archive folder.")],
    out: Annotated[Path, typer.Option(help="Where to write splits.json.")],
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    val: Annotated[float, typer.Option(help="Share of images in the validation split.")] = 0.15,
    test: Annotated[float, typer.Option(help="Share of images in the test split.")] = 0.15,
) -> None:
    """Split an archive into train/val/test by patient, stratified by ICDR grade."""
    from training.splits import check_patient_disjoint, make_splits, save_splits

    try:
        records = read_archive(archive, check_photos=False).records
        splits = make_splits(records, seed=seed, fractions=(1 - val - test, val, test))
    except (ArchiveError, ValueError) as error:
        raise _fail(str(error)) from None
    check_patient_disjoint(records, splits)
    save_splits(splits, out)
    grade_of = {r.image_id: r.dr_icdr for r in records}
    for name, ids in splits.items():
        counts = [sum(grade_of[i] == g for i in ids) for g in range(5)]
        console.print(f"{name:5s} {len(ids):6d} images  ICDR 0-4: {' / '.join(map(str, counts))}")
    console.print(f"wrote {out}")


if __name__ == "__main__":
    app()
