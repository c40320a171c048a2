"""`retina-index`: archive inspection, index building and queries (no torch)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from index.archive.brset import ArchiveError, read_archive
from index.build import BuildError, BuildOptions, KindChoice, build_index
from index.bundle import BundleError
from index.metadata import MetadataError, parse_filters
from index.preprocess import ImageDecodeError, decode_image
from index.store import Against, IndexStoreError, open_index, read_info

app = typer.Typer(no_args_is_help=True, add_completion=False, help=__doc__)
console = Console(stderr=True)
NARRATIVE_WIDTH = 70


@app.callback()
def main() -> None:
    """Runtime tools over archives, bundles and indexes (no torch)."""


def _fail(message: str) -> typer.Exit:
    console.print(f"[red]error:[/red] {message}", highlight=False, soft_wrap=True)
    return typer.Exit(code=2)


@app.command()
def describe(
    archive: Annotated[Path, typer.Argument(help="A BRSET-layout archive folder.")],
    no_photos: Annotated[bool, typer.Option("--no-photos", help="Skip the photo cross-check.")] = False,
) -> None:
    """Print the parse report of an archive: missing, repaired and rejected values per column, label
    rows without a photo, photos without a row, and counts per ICDR and SDRG grade."""
    try:
        result = read_archive(archive, check_photos=not no_photos)
    except ArchiveError as error:
        raise _fail(str(error)) from None
    print(result.report.render())


@app.command()
def build(
    bundle: Annotated[Path, typer.Option(help="The bundle folder (`retina-train export`).")],
    archive: Annotated[Path, typer.Option(help="The BRSET-layout archive to embed.")],
    out: Annotated[Path, typer.Option(help="The index folder to write (new or empty, or a partial build).")],
    batch_size: Annotated[int, typer.Option(min=1, help="Photographs per model batch.")] = 32,
    kind: Annotated[str, typer.Option(help="auto, flat, ivf, hnsw, ivfsq, ivfpq, ivfpqr (auto: by size).")] = "auto",
    resume: Annotated[bool, typer.Option("--resume", help="Continue an interrupted build in OUT.")] = False,
    chunk_size: Annotated[int, typer.Option(min=1, help="Photographs per resumable chunk.")] = 512,
    cpu: Annotated[bool, typer.Option("--cpu", help="Use the CPU even when a GPU is present.")] = False,
    runtime: Annotated[
        str, typer.Option(help="onnxruntime, or openvino (CPU; the `openvino` extra; the bundle's INT8 IR if any).")
    ] = "onnxruntime",
    store: Annotated[
        str, typer.Option(help="faiss (files in OUT) or milvus (collections; the `milvus` extra).")
    ] = "faiss",
    milvus_uri: Annotated[
        str | None, typer.Option(help="With --store milvus: a milvus-lite file (./retina.db) or http://HOST:19530.")
    ] = None,
    milvus_collection: Annotated[
        str, typer.Option(help="With --store milvus: the collections' prefix (PREFIX_image, PREFIX_record).")
    ] = "retina",
    engine: Annotated[
        str, typer.Option(help="local (this process) or ray (an actor pool on a Ray cluster; the `cluster` extra).")
    ] = "local",
    address: Annotated[
        str | None,
        typer.Option(help="With --engine ray: the cluster (auto, HOST:6379, ray://HOST:10001); default: a local Ray."),
    ] = None,
    workers: Annotated[
        int | None, typer.Option(min=1, help="With --engine ray: actors in the pool (default: as the cluster allows).")
    ] = None,
    cpus_per_worker: Annotated[
        int | None, typer.Option(min=1, help="With --engine ray: CPUs per actor, its ONNX Runtime threads (default 1).")
    ] = None,
    gpus_per_worker: Annotated[
        float | None, typer.Option(min=0.0, help="With --engine ray: GPUs per actor (default 0: CPU).")
    ] = None,
    ondisk: Annotated[
        bool, typer.Option("--ondisk", help="IVF with its inverted lists in memory-mapped files (larger than memory; "
                                            "read-only).")
    ] = False,
) -> None:
    """Embed every photograph of ARCHIVE with BUNDLE (image-only and record embeddings) into an index:
    image.faiss, record.faiss, metadata.sqlite and index.json (written last); with --store milvus the
    vectors go to two Milvus collections instead of the .faiss files, and index.json records where.
    With --engine ray an actor pool on a Ray cluster embeds the chunks (the same shards, the same index)."""
    if kind not in ("auto", "flat", "ivf", "hnsw", "ivfsq", "ivfpq", "ivfpqr"):
        raise _fail(f"--kind must be auto, flat, ivf, hnsw, ivfsq, ivfpq or ivfpqr, not {kind!r}")
    if store not in ("faiss", "milvus"):
        raise _fail(f"--store must be faiss or milvus, not {store!r}")
    if store == "milvus" and not milvus_uri:
        raise _fail("--store milvus needs --milvus-uri (a ./file.db for milvus-lite, or http://HOST:19530)")
    if runtime not in ("onnxruntime", "openvino"):
        raise _fail(f"--runtime must be onnxruntime or openvino, not {runtime!r}")
    if engine not in ("local", "ray"):
        raise _fail(f"--engine must be local or ray, not {engine!r}")
    ray_flags = {"--address": address, "--workers": workers, "--cpus-per-worker": cpus_per_worker,
                 "--gpus-per-worker": gpus_per_worker}
    given = [flag for flag, value in ray_flags.items() if value is not None]
    if engine != "ray" and given:
        raise _fail(f"{', '.join(given)} only apply to --engine ray")
    if cpu and gpus_per_worker:
        raise _fail("--gpus-per-worker and --cpu contradict each other")
    if ondisk and (store != "faiss" or kind not in ("auto", "ivf", "ivfsq", "ivfpq")):
        raise _fail("--ondisk builds FAISS IVF indexes: use it with --store faiss and --kind auto, ivf, ivfsq or ivfpq")
    kind_choice: KindChoice = kind  # type: ignore[assignment]
    options = BuildOptions(bundle=bundle, archive=archive, out=out, batch_size=batch_size, kind=kind_choice,
                           resume=resume, chunk_size=chunk_size, device="cpu" if cpu else "auto",
                           runtime=runtime, store=store, milvus_uri=milvus_uri,  # type: ignore[arg-type]
                           milvus_collection=milvus_collection, engine=engine,  # type: ignore[arg-type]
                           address=address, workers=workers, cpus_per_worker=cpus_per_worker or 1,
                           gpus_per_worker=gpus_per_worker or 0.0, ondisk=ondisk)
    from index.runtimes import RuntimeUnavailable  # onnxruntime: only for commands that embed

    try:
        info = build_index(options, console=console)
    except (BuildError, BundleError, ArchiveError, IndexStoreError) as error:
        raise _fail(escape(str(error))) from None
    except RuntimeUnavailable as error:
        raise _fail(escape(str(error))) from None  # the extra's [brackets] are not rich markup
    table = Table(title=f"index {out}", show_header=False)
    if info.milvus is not None:
        collections = ", ".join(info.milvus.collections.values())
        table.add_row("store", f"Milvus at {info.milvus.uri} ({info.milvus.server}): {collections}")
    table.add_row("bundle", f"{info.bundle_fingerprint} ({info.bundle_path})")
    table.add_row("archive", f"{info.archive_root}: {info.counts.archive_records:,} records")
    table.add_row("indexed", f"{info.counts.indexed:,} photographs, dim {info.dim}")
    table.add_row("skipped", f"{info.counts.skipped:,}")
    for name, vectors in info.indexes.items():
        table.add_row(f"{name} index", f"{vectors.kind} on {vectors.device}, recall@10 {vectors.recall_at_10:.3f}")
    ran = info.runtimes or info.providers
    table.add_row("runtimes", ", ".join(f"{graph}: {runtime}" for graph, runtime in ran.items()))
    table.add_row("throughput", f"{info.images_per_second:.1f} images/s; build {info.build_seconds:.1f} s")
    console.print(table)
    for photo in info.skipped:
        console.print(f"skipped id {photo.id} ({photo.image_id}): {photo.reason}", highlight=False, soft_wrap=True)


@app.command()
def query(
    index: Annotated[Path, typer.Option(help="The index folder.")],
    text: Annotated[str | None, typer.Option(help="A clinical description to search with.")] = None,
    image: Annotated[Path | None, typer.Option(help="A fundus photograph to search with.")] = None,
    k: Annotated[int, typer.Option("-k", min=1, help="Number of results.")] = 10,
    against: Annotated[str, typer.Option(help="image (what photographs show) or record (image + data).")] = "image",
    filter_: Annotated[
        list[str] | None,
        typer.Option("--filter", help="FIELD=VALUE, repeatable: icdr, sdrg (icdr=2,3), exam_eye, age_min, age_max."),
    ] = None,
    bundle: Annotated[Path | None, typer.Option(help="The bundle (default: the one recorded in index.json).")] = None,
    milvus_uri: Annotated[
        str | None, typer.Option(help="A Milvus-backed index: reach its collections here, not at the recorded URI.")
    ] = None,
) -> None:
    """Search an index with a text or a photograph and print the nearest archived cases (FAISS- or
    Milvus-backed: index.json says which)."""
    if (text is None) == (image is None):
        raise _fail("give exactly one of --text or --image")
    if against not in ("image", "record"):
        raise _fail(f"--against must be image or record, not {against!r}")
    against_choice: Against = against  # type: ignore[assignment]
    try:
        filters = parse_filters(filter_ or [])
        info = read_info(index)
    except (MetadataError, IndexStoreError) as error:
        raise _fail(escape(str(error))) from None

    from index.embedder import Embedder  # onnxruntime: only for commands that embed

    try:
        embedder = Embedder(bundle or Path(info.bundle_path))
        store = open_index(index, embedder, milvus_uri=milvus_uri)
    except (BundleError, IndexStoreError) as error:
        raise _fail(escape(str(error))) from None
    if text is not None:
        try:
            embedded = embedder.embed_texts([text])
        except ValueError as error:
            raise _fail(str(error)) from None
        if embedded.truncated[0]:
            console.print(f"note: the text was cut to the model's {embedder.max_length} tokens")
        vector = embedded.against(against_choice)
        title = f"text: {text[:60]!r}"
    else:
        assert image is not None
        try:
            vector = embedder.embed_images([decode_image(image)])
        except (ImageDecodeError, OSError) as error:
            raise _fail(f"{image}: {error}") from None
        title = f"image: {image.name}"
    hits = store.search(vector, k, against_choice, filters)[0]
    table = Table(title=f"{title} against {against} embeddings ({store.ntotal:,} indexed)")
    for column in ("rank", "score", "image_id", "ICDR", "SDRG", "eye", "age", "narrative"):
        table.add_column(column, justify="right" if column in ("rank", "score", "ICDR", "SDRG", "age") else "left")
    for rank, hit in enumerate(hits, start=1):
        labels = hit.row.labels
        narrative = hit.row.narrative or ""
        short = narrative if len(narrative) <= NARRATIVE_WIDTH else narrative[: NARRATIVE_WIDTH - 1] + "…"
        table.add_row(
            str(rank), f"{hit.score:.4f}", hit.row.image_id, _text(labels.icdr), _text(labels.sdrg),
            labels.exam_eye or "-", _text(labels.patient_age), short,
        )
    Console(width=200).print(table)
    if not hits:
        console.print("no results (do the filters exclude everything?)")


@app.command()
def bench(
    models: Annotated[str, typer.Option(help="Model configs (random init), comma-separated.")] = "tiny,paper",
    sizes: Annotated[str, typer.Option(help="Index sizes to search, comma-separated (1e4,1e5,1e6).")] = "1e4,1e5,1e6",
    kinds: Annotated[
        str, typer.Option(help="Index kinds to search: flat, auto (choose_kind's pick) or an explicit kind.")
    ] = "flat,auto,ivf,hnsw",
    batch_size: Annotated[int, typer.Option(min=1, help="Images or texts per embedding batch.")] = 16,
    seconds: Annotated[float, typer.Option(min=0.0, help="Time budget per measurement.")] = 5.0,
    queries: Annotated[int, typer.Option(min=1, help="Single-query searches per index (at most).")] = 300,
    search_threads: Annotated[
        str, typer.Option(help="FAISS thread counts to time searches with, comma-separated (default: all, then 1).")
    ] = "",
    dim: Annotated[int, typer.Option(min=2, help="Width of the searched vectors.")] = 256,
    index: Annotated[
        Path | None, typer.Option(help="Draw the search vectors from a mixture fitted to this index's embeddings.")
    ] = None,
    json_path: Annotated[Path | None, typer.Option("--json", help="Save every number to this JSON file.")] = None,
    skip_embed: Annotated[bool, typer.Option("--skip-embed", help="Skip the embedding benchmark.")] = False,
    skip_search: Annotated[bool, typer.Option("--skip-search", help="Skip the search benchmark.")] = False,
) -> None:
    """Benchmark this machine: embedding throughput per engine (PyTorch, ONNX Runtime, OpenVINO; cosine to
    fp32, roofline) and single-query search latency and recall@10 at each size, against the targets."""
    from index.bench.run import BenchOptions, parse_list, parse_sizes, parse_threads, run_bench, write_json

    try:
        options = BenchOptions(
            models=parse_list(models), sizes=parse_sizes(sizes), kinds=parse_list(kinds), batch_size=batch_size,
            seconds=seconds, queries=queries, search_threads=parse_threads(search_threads), dim=dim,
            index=index, skip_embed=skip_embed, skip_search=skip_search,
        )
        report = run_bench(options, console, Console(width=200))
    except (ValueError, RuntimeError, IndexStoreError) as error:
        raise _fail(str(error)) from None
    if json_path is not None:
        write_json(report, json_path)
        console.print(f"wrote {json_path}")


@app.command("bench-scale")
def bench_scale(
    work: Annotated[Path, typer.Option(help="Folder for the shards and the index (10^7 x 256: ~31 GB at peak).")],
    n: Annotated[str, typer.Option(help="Vectors to index (1e7).")] = "1e7",
    dim: Annotated[int, typer.Option(min=2, help="Width of the vectors.")] = 256,
    shard_size: Annotated[str, typer.Option(help="Vectors per shard.")] = "1e6",
    kind: Annotated[str, typer.Option(help="ivf (IVF-Flat), ivfsq (IVF-SQ8), ivfpq, ivfpqr.")] = "ivf",
    pq_m: Annotated[int | None, typer.Option(min=1, help="ivfpq: bytes per vector (default: by memory).")] = None,
    nlist: Annotated[int | None, typer.Option(min=1, help="IVF lists (default: by size, 65,536 at 10^7).")] = None,
    ondisk: Annotated[bool, typer.Option("--ondisk/--in-memory", help="Merge the lists into a mapped file.")] = True,
    queries: Annotated[int, typer.Option(min=1, help="Timed single-query searches.")] = 1000,
    tune_queries: Annotated[int, typer.Option(min=1, help="Queries used to choose nprobe (not timed).")] = 200,
    target_recall: Annotated[float, typer.Option(min=0.0, max=1.0, help="recall@10 nprobe must reach.")] = 0.95,
    threads: Annotated[int, typer.Option(min=1, help="FAISS threads while searching.")] = 1,
    seed: Annotated[int, typer.Option(help="Seed of the vectors and the build.")] = 0,
    json_path: Annotated[Path | None, typer.Option("--json", help="Save the report to this JSON file.")] = None,
) -> None:
    """Build an index of N clustered vectors from shards, as the Ray engine does (train on a sample, add shard
    by shard, merge the lists on disk), then time single queries against exact search: build time, sizes,
    resident memory, p50/p99, recall@10."""
    import json

    from index.bench.scale import run_scale_bench
    from index.cpus import cpu_model

    if kind not in ("ivf", "ivfsq", "ivfpq", "ivfpqr"):
        raise _fail(f"--kind must be ivf, ivfsq, ivfpq or ivfpqr, not {kind!r}")
    if kind == "ivfpqr" and ondisk:
        raise _fail("--kind ivfpqr keeps its re-ranking vectors in memory: add --in-memory")
    try:
        count, size = int(float(n)), int(float(shard_size))
    except ValueError:
        raise _fail(f"--n and --shard-size take numbers such as 1e7, not {n!r} / {shard_size!r}") from None

    def progress(stage: str, done: int, total: int) -> None:
        console.print(f"{stage}: {done}/{total}")

    report = run_scale_bench(work, count, dim, size, kind, ondisk, queries, tune_queries,  # type: ignore[arg-type]
                             target_recall, threads, seed, progress, pq_m, nlist)
    report.cpu = cpu_model()
    text = json.dumps(report.as_dict(), indent=1)
    typer.echo(text)
    if json_path is not None:
        json_path.write_text(text + "\n")
        console.print(f"wrote {json_path}")


@app.command("bench-stores")
def bench_stores(
    sizes: Annotated[str, typer.Option(help="Index sizes, comma-separated.")] = "1e4,1e5",
    queries: Annotated[int, typer.Option(min=10, help="Held-out single-query searches per measurement.")] = 300,
    dim: Annotated[int, typer.Option(min=2, help="Width of the vectors.")] = 256,
    milvus_uri: Annotated[
        str | None, typer.Option(help="Milvus to measure: a milvus-lite .db file or http://HOST:19530 (default: "
                                      "a milvus-lite file in a temporary folder).")
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed of the vectors and labels.")] = 0,
    json_path: Annotated[Path | None, typer.Option("--json", help="Save every number to this JSON file.")] = None,
) -> None:
    """FAISS and Milvus side by side on the same vectors: build time, p50/p99 per query and recall@10,
    unfiltered and with a selective filter (ICDR >= 2, about 5% of the records)."""
    import json

    from rich.table import Table

    from index.bench.run import parse_sizes
    from index.bench.stores import run_store_bench
    from index.cpus import cpu_model

    try:
        rows = run_store_bench(parse_sizes(sizes), queries, dim, milvus_uri, seed, console.print)
    except (ValueError, IndexStoreError) as error:
        raise _fail(str(error)) from None
    table = Table(title=f"FAISS and Milvus, {dim}-d, single queries, top-10 ({cpu_model()})")
    for column in ("store", "n", "kind", "build s", "p50 ms", "p99 ms", "recall@10", "filtered share",
                   "filtered p50 ms", "filtered p99 ms", "filtered recall@10"):
        table.add_column(column, justify="right")
    for row in rows:
        table.add_row(row.store, f"{row.n:,}", row.kind, f"{row.build_seconds:.1f}", f"{row.p50_ms:.2f}",
                      f"{row.p99_ms:.2f}", f"{row.recall_at_10:.3f}", f"{row.filtered_share:.3f}",
                      f"{row.filtered_p50_ms:.2f}", f"{row.filtered_p99_ms:.2f}", f"{row.filtered_recall_at_10:.3f}")
    Console(width=200).print(table)
    if json_path is not None:
        json_path.write_text(json.dumps([row.as_dict() for row in rows], indent=1) + "\n")
        console.print(f"wrote {json_path}")


@app.command("import")
def import_(
    images: Annotated[Path, typer.Option(help="The folder of photographs (not searched recursively).")],
    labels: Annotated[Path, typer.Option(help="The label file (CSV, TSV or semicolon-separated).")],
    out: Annotated[Path, typer.Option(help="The BRSET-layout archive folder to write (new or empty).")],
    map_: Annotated[
        str,
        typer.Option("--map", help="auto, a built-in mapping (eyepacs, aptos2019, idrid, messidor2) or a JSON file."),
    ] = "auto",
    link: Annotated[bool, typer.Option("--link", help="Hard-link the photos instead of copying them.")] = False,
    symlink: Annotated[bool, typer.Option("--symlink", help="Symlink the photos instead of copying them.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace a non-empty OUT.")] = False,
) -> None:
    """Turn a folder of photographs plus a label spreadsheet into a BRSET-layout archive (labels.csv,
    fundus_photos/, import_report.json). Photos are copied (or linked), never modified; unreadable files,
    duplicate ids, rows without a photo and photos without a row are reported, not fatal."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from index.archive.importer import ArchiveImportError, LinkMode, import_archive

    if link and symlink:
        raise _fail("give at most one of --link and --symlink")
    mode: LinkMode = "hardlink" if link else "symlink" if symlink else "copy"
    columns = (TextColumn("importing"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=True) as bar:
        task = bar.add_task("import", total=None)

        def advance(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        try:
            report = import_archive(images, labels, out, mapping=map_, link=mode, overwrite=overwrite,
                                    progress=advance)
        except ArchiveImportError as error:
            raise _fail(str(error)) from None
        except OSError as error:
            raise _fail(f"import failed: {error}") from None
    table = Table(title=f"archive {out}", show_header=False)
    table.add_row("mapping", report.mapping)
    table.add_row("columns", ", ".join(f"{column} -> {field}" for column, field in report.columns_used.items()))
    if report.columns_ignored:
        table.add_row("ignored columns", ", ".join(report.columns_ignored))
    table.add_row("rows", f"{report.rows:,}")
    table.add_row("imported", f"{report.imported:,} photographs ({report.link}), {report.patients:,} patients")
    table.add_row("skipped files", f"{len(report.skipped):,}")
    table.add_row("duplicate ids", f"{len(report.duplicates):,}")
    table.add_row("rows without photo", f"{len(report.rows_without_photo):,}")
    table.add_row("photos without row", f"{len(report.photos_without_row):,}")
    table.add_row("rejected rows", f"{len(report.rejected_rows):,}")
    table.add_row("rejected values", f"{sum(group.count for group in report.rejected_values):,}")
    table.add_row("ICDR grades", ", ".join(f"{grade}: {count:,}" for grade, count in report.icdr_counts.items()))
    console.print(table)
    for skipped in report.skipped:
        console.print(f"skipped {skipped.file}: {skipped.reason}", highlight=False, soft_wrap=True)
    for problem in report.duplicates + report.rows_without_photo + report.rejected_rows:
        console.print(f"line {problem.line}: {problem.image_id or '-'}: {problem.reason}", highlight=False,
                      soft_wrap=True)
    if report.photos_without_row:
        shown = ", ".join(report.photos_without_row[:10])
        more = len(report.photos_without_row) - 10
        console.print(f"photos without a row: {shown}" + (f" (+{more:,} more)" if more > 0 else ""), highlight=False)
    for group in report.rejected_values:
        console.print(f"rejected {group.count:,} x {group.column}={group.value!r} ({group.reason})", highlight=False)
    console.print(f"report: {out / 'import_report.json'}", highlight=False)


def _text(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


if __name__ == "__main__":
    app()
