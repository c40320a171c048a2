"""`retina-train`: the offline application: synthetic archives and splits, training, evaluation, export,
the shipped models (zoo) and their recipe, cross-validation on real photographs, benchmarks and the demo."""

from __future__ import annotations

import io
import json
import os
import platform
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from index.archive.brset import Archive, ArchiveError, read_archive, read_labels
from training.gate.cli import gate_app

if TYPE_CHECKING:  # torch is imported only by the commands that need it
    from training.calibration import OffsetSample
    from training.run import LoadedRun

app = typer.Typer(no_args_is_help=True, add_completion=False, help=__doc__)
app.add_typer(gate_app, name="gate", help="The gradability gate: `gate fit` trains it, `gate evaluate` measures it.")
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
    quality_defects: Annotated[
        float, typer.Option(min=0.0, max=1.0, help="Share of photographs given extra acquisition defects (blur, "
                            "illumination, field, artefacts) and marked inadequate, e.g. to train the gate.")
    ] = 0.0,
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
            records = sample_records(n if n is not None else 500, seed, quality_defects=quality_defects)
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


@app.command()
def fit(
    archive: Annotated[Path, typer.Option(help="A BRSET-layout archive folder.")],
    splits: Annotated[Path, typer.Option(help="splits.json from `retina-train split`.")],
    out: Annotated[Path, typer.Option(help="Run folder to write (or to resume).")],
    config: Annotated[
        str | None,
        typer.Option(help="Model config: a built-in name (tiny, tiny-synth, paper, ...), zoo:NAME, or a JSON path "
                     "(default: the --init run's own config, else tiny)."),
    ] = None,
    epochs: Annotated[int, typer.Option(help="Passes over the training split.")] = 10,
    batch_size: Annotated[int, typer.Option(help="Global batch size (all processes together).")] = 32,
    lr: Annotated[float, typer.Option(help="Peak learning rate (AdamW, warm-up then cosine).")] = 5e-4,
    precision: Annotated[
        str,
        typer.Option(help="auto (bf16 where the GPU or CPU does bf16 natively: AMX, AVX-512 BF16; else fp32), "
                     "bf16 (autocast) or fp32."),
    ] = "auto",
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    resume: Annotated[bool, typer.Option(help="Continue the run in --out from its last checkpoint.")] = False,
    init: Annotated[
        str | None,
        typer.Option(help="Start from earlier weights: a run folder, a model.safetensors, or a shipped model "
                     "(zoo:tiny-synth)."),
    ] = None,
    max_minutes: Annotated[float | None, typer.Option(help="Stop (and checkpoint) after this much time.")] = None,
    max_steps: Annotated[int | None, typer.Option(help="Stop after this many optimiser steps.")] = None,
    checkpoint_every: Annotated[int, typer.Option(help="Also checkpoint every N steps (0: each epoch).")] = 0,
    balance: Annotated[
        float, typer.Option(help="Grade-balanced sampling: draw rows with probability count(grade)^-balance (0: off).")
    ] = 0.0,
    illumination: Annotated[
        str | None,
        typer.Option(help="Photograph illumination normalisation: none or local-contrast (default: the config's)."),
    ] = None,
    lock_image: Annotated[
        bool,
        typer.Option(help="Locked-image tuning (needs --init): freeze the image tower and its projection, cache "
                     "their output once, and train the text, tabular and joint-transformer sides against it."),
    ] = False,
    reinit: Annotated[
        list[str] | None,
        typer.Option(help="A module (e.g. tabular) that starts from random init instead of --init's weights, so "
                     "that --config may change it; repeatable."),
    ] = None,
    freeze: Annotated[
        list[str] | None,
        typer.Option(help="A module (e.g. fusion) that keeps --init's weights and does not train; repeatable."),
    ] = None,
    train_only: Annotated[
        list[str] | None,
        typer.Option(help="Train only this module (e.g. image_proj), every other keeping --init's weights; "
                     "repeatable; instead of --freeze."),
    ] = None,
) -> None:
    """Train the multimodal model (or the CLIP baseline) on an archive's training split."""
    from training.run import RunFiles
    from training.train import FitOptions
    from training.train import fit as run_fit
    from training.zoo import ZooError, resolve_run

    try:
        init_path = resolve_run(init) if init is not None else None
    except ZooError as error:
        raise _fail(str(error)) from None
    if config is None:
        own = init_path / "config.json" if init_path is not None and init_path.is_dir() else None
        config = str(own) if own is not None and own.is_file() else "tiny"

    if precision not in ("auto", "bf16", "fp32"):
        raise _fail(f"--precision must be auto, bf16 or fp32, not {precision!r}")
    if illumination not in (None, "none", "local-contrast"):
        raise _fail(f"--illumination must be none or local-contrast, not {illumination!r}")
    files = RunFiles(out)
    if resume and not files.state.is_file():
        raise _fail(f"--resume: {out} has no checkpoint to resume from")
    if not resume and files.run_json.exists():
        raise _fail(f"{out} already holds a run: pass --resume to continue it, or choose another --out")
    try:
        options = FitOptions(
            config=config, archive=archive, splits=splits, out=out, epochs=epochs, batch_size=batch_size, lr=lr,
            precision=precision, seed=seed, init=init_path, max_minutes=max_minutes, max_steps=max_steps,
            checkpoint_every=checkpoint_every, balance=balance, illumination=illumination, lock_image=lock_image,
            reinit=reinit or [], freeze=freeze or [], train_only=train_only or [],
        )
    except ValidationError as error:
        raise _fail("; ".join(e["msg"].removeprefix("Value error, ") for e in error.errors())) from None
    with _progress() as progress:
        loading = progress.add_task("decoding photographs", total=None, rate="")
        training = progress.add_task("training", total=None, rate="", visible=False)
        caching = progress.add_task("caching the locked image tower's states", total=None, rate="", visible=False)

        def on_load(done: int, total: int) -> None:
            progress.update(loading, completed=done, total=total)

        def on_cache(done: int, total: int) -> None:
            progress.update(loading, visible=False)
            progress.update(caching, visible=True, completed=done, total=total)

        def on_step(metrics: dict) -> None:
            progress.update(loading, visible=False)
            progress.update(caching, visible=False)
            losses = " ".join(
                f"{k.replace('contrastive_', 'c_')}={v:.3f}" for k, v in metrics.items()
                if k not in {"step", "epoch", "lr", "grad_norm", "samples_per_s", "total_steps"}
            )
            progress.update(
                training, visible=True, completed=metrics["step"], total=metrics["total_steps"],
                description=f"epoch {metrics['epoch']:.2f} {losses}", rate=f"{metrics['samples_per_s']:.1f} samples/s",
            )

        try:
            info = run_fit(options, on_step=on_step, on_load=on_load, on_cache=on_cache)
        except (ArchiveError, ValueError, FileExistsError, FileNotFoundError) as error:
            raise _fail(str(error)) from None
    state = "finished" if info["finished"] else "stopped early (resume with --resume)"
    console.print(
        f"{out}: {state} after {info['steps']}/{info['total_steps']} steps, "
        f"{info['samples_per_second']:.1f} samples/s ({info['precision']}, {info['device']}; "
        f"{info['precision_reason']})"
    )


@app.command()
def evaluate(
    run: Annotated[str, typer.Option(help="A run folder from `retina-train fit`, or a shipped model (zoo:NAME).")],
    archive: Annotated[Path, typer.Option(help="The BRSET-layout archive the run was trained on.")],
    splits: Annotated[Path, typer.Option(help="splits.json.")],
    split: Annotated[str, typer.Option(help="Which split to evaluate on.")] = "test",
    consensus_k: Annotated[
        int, typer.Option(min=1, help="The nearest photographs that vote in the consensus section.")
    ] = 10,
    out: Annotated[
        Path | None, typer.Option(help="Output folder (default RUN/eval-SPLIT; for zoo:NAME, ./eval-NAME-SPLIT).")
    ] = None,
    deepeyenet: Annotated[
        Path | None, typer.Option(help="Also run zero-shot text<->image retrieval on a DeepEyeNet folder.")
    ] = None,
    calibration: Annotated[
        Path | None,
        typer.Option(help="Grade temperatures from `retina-train calibrate` for the ECE after calibration "
                     "(default: RUN/calibration.json when present)."),
    ] = None,
) -> None:
    """Evaluate a run: retrieval (instance and category), grading, referable DR, calibration (ECE before and
    after); writes metrics.json, report.md and PNG figures."""
    from training.evaluate import evaluate as run_evaluate
    from training.evaluate import evaluate_deepeyenet
    from training.evaluation.metrics import format_number, summarise
    from training.zoo import ZooError, is_zoo_name, resolve_run

    try:
        run_dir = resolve_run(run)
    except ZooError as error:
        raise _fail(str(error)) from None
    if out is None and is_zoo_name(run):  # a shipped model's folder stays as its checksums say
        out = Path(f"eval-{run.split(':', 1)[1]}-{split}")
    try:
        with console.status("evaluating"):
            metrics = run_evaluate(run_dir, archive, splits, split, out, consensus_k=consensus_k,
                                   calibration=calibration)
            if deepeyenet is not None:
                metrics["zero_shot"] = evaluate_deepeyenet(run_dir, deepeyenet)
    except (ArchiveError, ValueError, FileNotFoundError) as error:
        raise _fail(str(error)) from None
    for name, value in summarise(metrics):
        print(f"{name:45s} {format_number(value)}")
    for head in ("icdr", "sdrg"):
        entry = (metrics.get("calibration") or {}).get(head)
        if entry:
            print(f"{head.upper() + ' ECE before / after calibration':45s} {format_number(entry['ece_before'])} / "
                  f"{format_number(entry['ece_after'])}")
    target = out or run_dir / f"eval-{split}"
    if deepeyenet is not None:
        (target / "metrics.json").write_text(json.dumps(metrics, indent=1) + "\n")
    console.print(f"wrote {target}/metrics.json and report.md")


@app.command()
def export(
    run: Annotated[str, typer.Option(help="A run folder from `retina-train fit`, or a shipped model (zoo:NAME).")],
    out: Annotated[Path, typer.Option(help="Bundle folder to write (replaced if it exists).")],
    archive: Annotated[
        Path | None, typer.Option(help="The archive parity is checked on (default: the one the run recorded).")
    ] = None,
    splits: Annotated[Path | None, typer.Option(help="Its splits.json (default: the run's).")] = None,
    precision: Annotated[str, typer.Option(help="fp32, or int8 (ONNX Runtime dynamic quantization).")] = "fp32",
    split: Annotated[str, typer.Option(help="Split whose samples the parity check runs on.")] = "val",
    openvino_int8: Annotated[
        bool,
        typer.Option("--openvino-int8", help="Also write the encoders as OpenVINO INT8 IR (NNCF, calibrated on "
                     "training items; parity cosine >= 0.999) for the openvino runtime. fp32 only; needs the "
                     "`openvino` extra."),
    ] = False,
    gate: Annotated[
        Path | None, typer.Option(help="A gradability gate's folder (`retina-train gate fit`); default: RUN/gate "
                                  "when the run has one.")
    ] = None,
    calibration: Annotated[
        Path | None,
        typer.Option(help="A calibration.json from `retina-train calibrate` to put in the manifest (default: "
                     "RUN/calibration.json when present)."),
    ] = None,
    no_calibration: Annotated[
        bool, typer.Option("--no-calibration", help="Leave the probabilities uncalibrated even if the run has a "
                           "calibration.json.")
    ] = False,
) -> None:
    """Export a run to a bundle (ONNX graphs, tokenizer, manifest), checked against PyTorch on the archive
    the run was trained on (as its run.json records it), or on --archive/--splits. The grade heads'
    temperatures (`retina-train calibrate`) go into the manifest when the run has them or --calibration
    names them."""
    from rich.markup import escape

    from index.bundle import read_manifest
    from training.export import ExportError, export_bundle
    from training.openvino_int8 import INSTALL, missing_packages
    from training.zoo import ZooError, resolve_run

    if precision not in ("fp32", "int8"):
        raise _fail(f"--precision must be fp32 or int8, not {precision!r}")
    if openvino_int8 and precision != "fp32":
        raise _fail("--openvino-int8 goes with --precision fp32 (the openvino runtime runs the grader's fp32 graph)")
    if openvino_int8 and missing_packages():
        raise _fail(escape(f"--openvino-int8 needs {' and '.join(missing_packages())}: {INSTALL}"))
    try:
        run_dir = resolve_run(run)
    except ZooError as error:
        raise _fail(str(error)) from None
    if not run_dir.is_dir():
        raise _fail(f"--run {run}: no such run folder")
    archive, splits = _recorded_data(run_dir, run, archive, splits)
    if calibration is not None and no_calibration:
        raise _fail("--calibration and --no-calibration contradict each other")
    from training.calibration import run_calibration

    try:
        temperatures = None if no_calibration else run_calibration(run_dir, calibration)
    except ValueError as error:
        raise _fail(str(error)) from None
    try:
        engines = "ONNX Runtime and OpenVINO INT8" if openvino_int8 else "ONNX Runtime"
        with console.status(f"exporting {run} ({precision}) and checking {engines} against PyTorch"):
            report = export_bundle(run_dir, archive, splits, out, precision=precision, split=split,  # type: ignore[arg-type]
                                   openvino_int8=openvino_int8, gate=gate, grade_calibration=temperatures)
    except ExportError as error:
        raise _fail(f"export failed the parity check, no bundle written:\n{error}") from None
    except (ArchiveError, ValueError, KeyError, OSError) as error:
        raise _fail(str(error)) from None
    for line in report.lines():
        print(line)
    if temperatures is not None:
        print(f"calibrated: temperature ICDR {temperatures.icdr_temperature:.4f}, SDRG "
              f"{temperatures.sdrg_temperature:.4f} (fitted on {temperatures.archive} split {temperatures.split})")
    with_ir = " + OpenVINO INT8 IR" if openvino_int8 else ""
    manifest = read_manifest(out)
    with_gate = " + gradability gate" if manifest.gate else ""
    console.print(f"wrote bundle {out} ({precision}{with_ir}{with_gate}, fingerprint {manifest.fingerprint})")


def _recorded_data(run_dir: Path, run: str, archive: Path | None, splits: Path | None) -> tuple[Path, Path]:
    """--archive/--splits, or the ones the run's run.json records; a clear error when they moved."""
    import json

    info_path = run_dir / "run.json"
    options = json.loads(info_path.read_text()).get("options", {}) if info_path.is_file() else {}
    chosen: list[Path] = []
    for flag, given, key in (("--archive", archive, "archive"), ("--splits", splits, "splits")):
        if given is not None:
            chosen.append(Path(given))
            continue
        recorded = options.get(key)
        if not recorded:
            raise _fail(f"--run {run} records no {key}: pass {flag}")
        if not Path(recorded).exists():
            raise _fail(f"--run {run} was trained with {key} {recorded}, which is not there any more "
                        f"(moved, or another machine): pass {flag}")
        chosen.append(Path(recorded))
    return chosen[0], chosen[1]


@app.command("explain-eval")
def explain_eval(
    bundle: Annotated[Path, typer.Option(help="An exported bundle (`retina-train export`).")],
    archive: Annotated[Path, typer.Option(help="A synthetic archive with lesion positions (`synth`).")],
    n: Annotated[int | None, typer.Option(min=1, help="At most this many DR photographs, in order.")] = 200,
    window: Annotated[int | None, typer.Option(help="Occlusion window, model-input pixels (~1/7 side).")] = None,
    stride: Annotated[int | None, typer.Option(help="Occlusion stride, model-input pixels (window/2).")] = None,
    threads: Annotated[int | None, typer.Option(min=1, help="ONNX Runtime threads (default: all allowed).")] = None,
    json_path: Annotated[Path | None, typer.Option("--json", help="Write the report (every photograph) here.")] = None,
    overlays: Annotated[Path | None, typer.Option(help="Write overlays of the first photographs here (PNG).")] = None,
) -> None:
    """The occlusion heatmap's pointing game on a synthetic archive's DR photographs (peak within a drawn
    lesion's radius + 15 px at 512 px), against a random point of the field and the field's centre, and the
    latency per photograph."""
    from index.bundle import BundleError
    from index.explain import ExplainError
    from training.explain_eval import ExplainEvalError, evaluate_pointing, format_summary, write_report

    with _progress() as progress:
        task = progress.add_task("explaining", total=n, rate="")
        try:
            report = evaluate_pointing(bundle, archive, n=n, window=window, stride=stride, threads=threads,
                                       overlays=overlays,
                                       on_photograph=lambda score: progress.advance(task))
        except (ExplainEvalError, ExplainError, BundleError, ArchiveError, FileNotFoundError) as error:
            raise _fail(str(error)) from None
    if json_path is not None:
        write_report(report, json_path)
    print(format_summary(report.summary()))


@app.command()
def calibrate(
    run: Annotated[str, typer.Option(help="A run folder from `retina-train fit`, or a shipped model (zoo:NAME).")],
    archive: Annotated[
        Path | None, typer.Option(help="The archive to fit on (default: the one the run recorded).")
    ] = None,
    splits: Annotated[Path | None, typer.Option(help="Its splits.json (default: the run's).")] = None,
    split: Annotated[str, typer.Option(help="The split whose photographs the temperatures are fitted on.")] = "val",
    out: Annotated[
        Path | None,
        typer.Option(help="Where to write the calibration (default RUN/calibration.json; required for zoo:NAME, "
                     "whose folder is verified by checksum)."),
    ] = None,
    bins: Annotated[int, typer.Option(min=1, help="Equal-width confidence bins of the ECE.")] = 15,
    batch_size: Annotated[int, typer.Option(min=1, help="Photographs per forward pass.")] = 64,
    offsets_split: Annotated[
        str | None,
        typer.Option(help="Also fit per-grade decision offsets (softmax(logits / T + b), for macro-F1) on this "
                     "split, normally train (default: none, temperatures only)."),
    ] = None,
    offsets_per_grade: Annotated[
        int | None, typer.Option(min=1, help="The most photographs of one ICDR grade the offset fit grades; the "
                                 "rest of a larger grade is weighted in (default 2000).")
    ] = None,
) -> None:
    """Fit one temperature per grade head (ICDR, SDRG) on a split's photographs, graded from the photograph
    alone, by minimising the NLL of softmax(logits / T), and with --offsets-split per-grade decision offsets
    b that maximise the macro-F1 of softmax(logits / T + b); write calibration.json (temperatures, offsets, ECE
    and NLL before and after) for `retina-train export` (into the bundle) and `retina-train evaluate`."""
    from index.bundle import sha256_of
    from training.calibration import (
        CALIBRATION_FILE,
        DEFAULT_PER_GRADE,
        HEADS,
        fit_calibration,
        image_logits,
        save_calibration,
    )
    from training.run import load_run, split_for_evaluation
    from training.splits import load_splits
    from training.zoo import ZooError, is_zoo_name, resolve_run

    try:
        run_dir = resolve_run(run)
    except ZooError as error:
        raise _fail(str(error)) from None
    if not run_dir.is_dir():
        raise _fail(f"--run {run}: no such run folder")
    if is_zoo_name(run):
        if out is None:
            raise _fail(f"--run {run} is a shipped model whose folder is verified by checksum: pass --out FILE "
                        "(then `retina-train export --calibration FILE`)")
        if out.resolve().is_relative_to(run_dir.resolve()):
            raise _fail(f"--out {out} is inside the shipped model {run}, whose files are verified by checksum: "
                        "write it elsewhere")
    target = out if out is not None else run_dir / CALIBRATION_FILE
    archive, splits = _recorded_data(run_dir, run, archive, splits)
    try:
        split_ids = load_splits(splits)
        if split not in split_ids:
            raise ValueError(f"{splits} has no split {split!r} (it has {sorted(split_ids)})")
        if not split_ids[split]:
            sizes = ", ".join(f"{name} {len(ids)}" for name, ids in split_ids.items())
            raise ValueError(f"split {split!r} of {splits} is empty ({sizes}): choose another --split")
        if offsets_split is not None and not split_ids.get(offsets_split):
            raise ValueError(f"--offsets-split {offsets_split!r}: {splits} has no such split or it is empty "
                             f"(it has {sorted(split_ids)})")
        photographs = read_archive(archive)
        with console.status(f"grading the {len(split_ids[split])} photographs of split {split} (image only)"):
            loaded = load_run(run_dir)
            data = split_for_evaluation(photographs, split_ids[split], loaded)
            logits = image_logits(loaded, data, batch_size)
        sample = None
        if offsets_split is not None:
            sample = _offset_sample(photographs, split_ids[offsets_split], offsets_split,
                                    offsets_per_grade or DEFAULT_PER_GRADE, loaded, batch_size)
        calibration = fit_calibration(
            logits, {"icdr": data.icdr, "sdrg": data.sdrg}, archive=str(archive), split=split,
            weights_sha256=sha256_of(loaded.files.weights), bins=bins, offsets=sample,
        )
    except (ArchiveError, ValueError, FileNotFoundError) as error:
        raise _fail(str(error)) from None
    save_calibration(calibration, target)
    print(f"{run}: temperature scaling on {archive} split {split} ({len(data)} photographs, image only), "
          f"ECE in {bins} bins")
    print(f"{'head':6s} {'items':>6s} {'T':>8s} {'ECE before':>11s} {'ECE after':>10s} {'NLL before':>11s} "
          f"{'NLL after':>10s}")
    for head in HEADS:
        print(f"{head:6s} {calibration.items[head]:6d} {calibration.temperature(head):8.4f} "
              f"{calibration.ece_before[head]:11.4f} {calibration.ece_after[head]:10.4f} "
              f"{calibration.nll_before[head]:11.4f} {calibration.nll_after[head]:10.4f}")
    if calibration.offsets is not None:
        fit = calibration.offsets
        print(f"decision offsets on split {fit.split} (at most {fit.per_grade} photographs per ICDR grade, "
              "weighted to the split); ECE and NLL after include them")
        for head in HEADS:
            shown = " ".join(f"{value:+.1f}" for value in calibration.offsets_of(head))
            print(f"{head:6s} {fit.items[head]:6d} b = [{shown}]  macro-F1 {fit.macro_f1_before[head]:.4f} -> "
                  f"{fit.macro_f1_after[head]:.4f}")
    console.print(f"wrote {target}")


def _offset_sample(photographs: Archive, ids: list[str], split: str, per_grade: int, loaded: LoadedRun,
                   batch_size: int) -> OffsetSample:
    """The image-only logits, labels and weights of at most `per_grade` photographs per ICDR grade of the
    split `ids` (`training.calibration.stratified_sample`)."""
    from training.calibration import OffsetSample, image_logits, stratified_sample
    from training.run import split_for_evaluation

    by_id = {record.image_id: record for record in photographs.records}
    kept = [image_id for image_id in ids if image_id in by_id]
    grades = [-1 if by_id[image_id].dr_icdr is None else by_id[image_id].dr_icdr for image_id in kept]
    rows, weights = stratified_sample(grades, per_grade)
    with console.status(f"grading {len(rows)} of the {len(kept)} photographs of split {split} for the offsets"):
        data = split_for_evaluation(photographs, [kept[row] for row in rows], loaded)
        logits = image_logits(loaded, data, batch_size)
    return OffsetSample(logits, {"icdr": data.icdr, "sdrg": data.sdrg}, weights, split, per_grade)


@app.command()
def compare(
    run_a: Annotated[Path, typer.Argument(help="A run folder (or a metrics.json).")],
    run_b: Annotated[Path, typer.Argument(help="Another run folder (or a metrics.json).")],
    split: Annotated[str, typer.Option(help="Which evaluation to compare (RUN/eval-SPLIT).")] = "test",
) -> None:
    """Print two evaluations side by side (e.g. ours against the CLIP baseline)."""
    from training.evaluation.metrics import compare_table

    loaded = []
    for run in (run_a, run_b):
        path = run if run.suffix == ".json" else run / f"eval-{split}" / "metrics.json"
        if not path.is_file():
            raise _fail(f"{path} not found: run `retina-train evaluate --run {run} ...` first")
        loaded.append(json.loads(path.read_text()))
    name_a = loaded[0].get("run", {}).get("config", str(run_a))
    name_b = loaded[1].get("run", {}).get("config", str(run_b))
    print(compare_table(loaded[0], loaded[1], name_a, name_b))


@app.command()
def bench(
    configs: Annotated[list[str] | None, typer.Option("--config", help="Configs to time (repeatable).")] = None,
    batch_size: Annotated[int, typer.Option(help="Batch size.")] = 32,
    steps: Annotated[int, typer.Option(help="Timed steps per measurement.")] = 6,
) -> None:
    """Training throughput: samples/s of a full step in fp32 and bf16 autocast, per config."""
    import torch

    from training.bench.step import machine_line, time_training_step
    from training.hardware import choose_precision

    print(f"machine: {machine_line()}; batch {batch_size}, random init, random data, text length 64")
    choice = choose_precision("auto", torch.device("cpu"))
    print(f"--precision auto would pick {choice.precision} here ({choice.reason})")
    for config in configs or ["tiny", "clip-baseline"]:
        timings = {p: time_training_step(config, p, batch_size, steps) for p in ("fp32", "bf16")}
        fp32, bf16 = timings["fp32"].samples_per_second, timings["bf16"].samples_per_second
        print(f"{config:15s} fp32 {fp32:7.1f} samples/s   bf16 {bf16:7.1f} samples/s   bf16/fp32 {bf16 / fp32:4.2f}x")


@app.command("bench-embed")
def bench_embed(
    out_dir: Annotated[Path, typer.Option(help="Folder for the ONNX towers and the reference embeddings.")],
    config: Annotated[str, typer.Option(help="Model config (random init): tiny, paper, or a JSON path.")] = "tiny",
    json_path: Annotated[Path | None, typer.Option("--json", help="Write the report to this JSON file.")] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Images or texts per batch.")] = 16,
    seconds: Annotated[float, typer.Option(min=0.0, help="Time budget per measurement.")] = 5.0,
    export: Annotated[bool, typer.Option(help="Export the image and text towers to ONNX.")] = True,
) -> None:
    """Embedding throughput in PyTorch (eager fp32, bf16 autocast), FLOPs per item and matmul GFLOP/s, and
    the towers exported to ONNX: the PyTorch half of `retina-index bench`."""
    from training.bench.towers import run_embed_bench, write_report

    try:
        report = run_embed_bench(config, out_dir, batch_size=batch_size, seconds=seconds, export=export)
    except ValueError as error:
        raise _fail(str(error)) from None
    if json_path is not None:
        write_report(report, json_path)
    towers = report["towers"]
    for tower, data in towers.items():  # type: ignore[union-attr]
        for engine in data["engines"]:
            console.print(
                f"{config} {tower}: {engine['engine']} {engine['items_per_second']:.1f} items/s, "
                f"cosine {engine['min_cosine']:.5f}, {data['gflop_per_item']:.2f} GFLOP/item"
            )



@app.command()
def demo(
    folder: Annotated[Path, typer.Option("--dir", help="The demo folder (created; reused later).")] = Path("demo"),
    n: Annotated[int, typer.Option(min=10, help="Synthetic records.")] = 3000,
    seed: Annotated[int, typer.Option(help="Seed of the synthetic archive.")] = 1,
    model: Annotated[str, typer.Option(help="The shipped model to serve (zoo:NAME).")] = "zoo:tiny-synth",
    train: Annotated[
        bool, typer.Option("--train/--no-train", help="Train `tiny` from scratch on the demo archive instead.")
    ] = False,
    epochs: Annotated[int, typer.Option(min=1, help="With --train: training epochs of `tiny`.")] = 16,
    max_minutes: Annotated[float, typer.Option(help="With --train: training time budget, minutes.")] = 8.0,
    balance: Annotated[float, typer.Option(min=0, max=1, help="Grade-balanced sampling (as `fit --balance`).")] = 0.5,
    serve: Annotated[bool, typer.Option("--serve/--no-serve", help="Start the service when ready.")] = True,
    host: Annotated[str, typer.Option(help="Address the service listens on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port of the service.")] = 8000,
) -> None:
    """The embedded default, end to end: synthetic archive, splits, the shipped model (zoo:tiny-synth)
    exported to an ONNX bundle, FAISS index, then the service; with --train, `tiny` is trained and evaluated
    on the archive first. Stages already built for the same inputs (by fingerprint) are reused, so a second
    run is serving within seconds."""
    from training.demo import DemoError, DemoOptions, prepare
    from training.demo import serve as start_service

    started = time.perf_counter()
    try:
        options = DemoOptions(root=folder, n=n, seed=seed, model=model, train=train, epochs=epochs,
                              max_minutes=max_minutes, balance=balance)
        paths = prepare(options, console)
    except DemoError as error:
        raise _fail(str(error)) from None
    seconds = time.perf_counter() - started
    console.print(f"demo ready in {seconds:.0f} s: evaluation report {paths.evaluation}/report.md")
    if serve:
        console.print(f"[bold]serving the demo at http://{host}:{port}/ (Ctrl+C to stop)[/bold]")
        start_service(paths, host, port)


@app.command()
def zoo(
    out: Annotated[Path, typer.Option(help="Folder of the recipe's archives, runs, bundle and model card.")],
    config: Annotated[str, typer.Option(help="Model config to train.")] = "tiny-synth",
    n: Annotated[int, typer.Option(min=100, help="Records of the synthetic training archive.")] = 30_000,
    seed: Annotated[int, typer.Option(help="Seed of the training archive.")] = 7001,
    heldout_n: Annotated[int, typer.Option(min=10, help="Records of the held-out archive.")] = 3_000,
    heldout_seed: Annotated[int, typer.Option(help="Seed of the held-out archive (never used in training).")] = 7002,
    size: Annotated[int, typer.Option(help="Photograph side of both archives, pixels.")] = 224,
    epochs: Annotated[int, typer.Option(min=1, help="Passes over the training split.")] = 3,
    batch_size: Annotated[int, typer.Option(min=2, help="Global batch size.")] = 48,
    lr: Annotated[float, typer.Option(help="Peak learning rate.")] = 5e-4,
    balance: Annotated[float, typer.Option(min=0, max=1, help="Grade-balanced sampling (as `fit --balance`).")] = 0.5,
    precision: Annotated[str, typer.Option(help="auto, bf16 or fp32 (as `fit --precision`).")] = "auto",
    max_minutes: Annotated[
        float | None, typer.Option(help="Training time budget per run; the same command resumes a stopped run.")
    ] = None,
    baseline: Annotated[
        bool, typer.Option(help="Also train and evaluate the CLIP-style baseline the same way.")
    ] = False,
    release: Annotated[
        str | None, typer.Option(help="Ship the result as zoo:NAME (training/zoo/models/NAME, with checksums).")
    ] = None,
    appearance_config: Annotated[
        str | None,
        typer.Option(help="After tuning, the appearance stage with this config (one with image_appearance_dims): "
                     "only the image embedding's grade projection (re-learnt), its appearance projection and the "
                     "text's projection against photographs train (`fit --train-only`), so image->image scores "
                     "spread and no grade changes."),
    ] = None,
    appearance_epochs: Annotated[int, typer.Option(min=1, help="Epochs of the appearance stage.")] = 3,
    appearance_batch_size: Annotated[int, typer.Option(min=2, help="Global batch size of the appearance stage.")] = 48,
    appearance_lr: Annotated[float, typer.Option(help="Peak learning rate of the appearance stage.")] = 2e-3,
    facts_config: Annotated[
        str | None,
        typer.Option(help="Last, the facts stage with this config: only the text's record head and the record "
                     "projection train (`fit --lock-image --train-only`), so text->record search changes and no "
                     "photograph's embedding or grade does; the last stage's run is the one evaluated, exported "
                     "and released."),
    ] = None,
    facts_epochs: Annotated[int, typer.Option(min=1, help="Epochs of the facts stage.")] = 3,
    facts_batch_size: Annotated[int, typer.Option(min=2, help="Global batch size of the facts stage.")] = 256,
    facts_lr: Annotated[float, typer.Option(help="Peak learning rate of the facts stage.")] = 1e-3,
    tune_config: Annotated[
        str | None,
        typer.Option(help="After training, locked-image tuning (`fit --lock-image`) with this config; the tuned "
                     "run is the one evaluated, exported and released (without an appearance stage)."),
    ] = None,
    tune_epochs: Annotated[int, typer.Option(min=1, help="Epochs of the tuning stage.")] = 10,
    tune_batch_size: Annotated[int, typer.Option(min=2, help="Global batch size of the tuning stage.")] = 256,
    tune_lr: Annotated[float, typer.Option(help="Peak learning rate of the tuning stage.")] = 1e-3,
    tune_reinit: Annotated[
        list[str] | None, typer.Option(help="A module the tuning stage starts from random init (as `fit --reinit`).")
    ] = None,
    tune_freeze: Annotated[
        list[str] | None, typer.Option(help="A module the tuning stage keeps as trained (as `fit --freeze`).")
    ] = None,
    calibrate: Annotated[
        bool, typer.Option(help="Calibrate the final run before evaluating it (`retina-train calibrate`: "
                           "temperatures on val, decision offsets on --offsets-split).")
    ] = True,
    offsets_split: Annotated[
        str, typer.Option(help="The split the decision offsets are fitted on ('none': temperatures only).")
    ] = "train",
) -> None:
    """The recipe of a shipped model: synthetic training and held-out archives, training (and optionally
    locked-image tuning, an appearance stage and a facts stage), calibration, held-out evaluation, export, model
    card (and with --release, the shipped copy). Runs on a GPU when there is one; a stopped or interrupted recipe
    continues where it stopped when run again."""
    from training.stages import StageError
    from training.zoo import ZooError
    from training.zoo.recipe import ZooOptions, run_recipe

    if precision not in ("auto", "bf16", "fp32"):
        raise _fail(f"--precision must be auto, bf16 or fp32, not {precision!r}")
    options = ZooOptions(
        out=out, config=config, n=n, seed=seed, heldout_n=heldout_n, heldout_seed=heldout_seed, size=size,
        epochs=epochs, batch_size=batch_size, lr=lr, balance=balance, precision=precision, max_minutes=max_minutes,
        baseline=baseline, release=release, appearance_config=appearance_config,
        appearance_epochs=appearance_epochs, appearance_batch_size=appearance_batch_size, appearance_lr=appearance_lr,
        facts_config=facts_config, facts_epochs=facts_epochs, facts_batch_size=facts_batch_size, facts_lr=facts_lr,
        tune_config=tune_config, tune_epochs=tune_epochs,
        tune_batch_size=tune_batch_size, tune_lr=tune_lr, tune_reinit=tuple(tune_reinit or ()),
        tune_freeze=tuple(tune_freeze or ()), calibrate=calibrate,
        offsets_split=None if offsets_split == "none" else offsets_split,
    )
    started = time.perf_counter()
    try:
        paths = run_recipe(options, console)
    except (StageError, ZooError) as error:
        raise _fail(str(error)) from None
    console.print(f"recipe done in {time.perf_counter() - started:.0f} s: {paths.root}/MODEL_CARD.md")


@app.command()
def crossval(
    archive: Annotated[
        Path, typer.Option(help="A BRSET-layout archive with ICDR grades (e.g. from `retina-index import`).")
    ],
    out: Annotated[Path, typer.Option(help="Folder for the folds' runs and crossval.json / crossval.md.")],
    init: Annotated[str, typer.Option(help="The starting model: zoo:NAME or a run folder.")] = "zoo:tiny-synth",
    folds: Annotated[int, typer.Option(min=2, help="Number of patient-level folds.")] = 5,
    epochs: Annotated[int, typer.Option(min=1, help="Training epochs of finetune and scratch.")] = 10,
    batch_size: Annotated[int, typer.Option(min=2, help="Batch size of finetune and scratch.")] = 16,
    lr: Annotated[float, typer.Option(help="Peak learning rate of finetune and scratch.")] = 2e-4,
    seed: Annotated[int, typer.Option(help="Seed of the folds and the training.")] = 0,
    method: Annotated[
        list[str] | None, typer.Option(help="finetune, scratch, probe (repeatable; default: all three).")
    ] = None,
) -> None:
    """Patient-level k-fold cross-validation of fine-tuning the starting model, training the same
    architecture from scratch, and a linear probe on its frozen image embeddings: ICDR kappa and
    referable AUROC per fold, mean and spread."""
    from training.crossval import METHODS, CrossValOptions, cross_validate, format_summary
    from training.zoo import ZooError, resolve_run

    try:
        init_path = resolve_run(init)
        options = CrossValOptions(archive=archive, init=init_path, out=out, folds=folds, epochs=epochs,
                                  batch_size=batch_size, lr=lr, seed=seed, methods=tuple(method or METHODS))

        def report(score) -> None:  # type: ignore[no-untyped-def]
            kappa = "n/a" if score.kappa is None else f"{score.kappa:.3f}"
            auroc = "n/a" if score.referable_auroc is None else f"{score.referable_auroc:.3f}"
            console.print(f"fold {score.fold} {score.method:9s} kappa {kappa} referable AUROC {auroc} "
                          f"({score.test_images} test photographs)")

        result = cross_validate(options, on_fold=report)
    except (ZooError, ArchiveError, ValueError, FileNotFoundError) as error:
        raise _fail(str(error)) from None
    print(format_summary(result["summary"]), end="")
    console.print(f"wrote {out}/crossval.json and crossval.md")


if __name__ == "__main__":
    app()
