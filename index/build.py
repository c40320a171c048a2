"""`retina-index build`: embed every photograph of an archive with a bundle into an index folder.

For each archive record (id = its row number in the label file, a stable int64), the photograph is
decoded and goes through the image tower once (`Embedder.embed_records`), which gives two vectors:
image-only (what the photograph shows) and, through the grader from the same image tokens, the record
(photograph + structured data, with the model's ICDR/SDRG probabilities). A record whose photo is
missing or cannot be decoded is skipped, with the reason, and the build goes on.

Three steps: plan (the chunks of `chunk_size` consecutive ids), prepare (the output folder and its
`.partial/`), then an engine (`index.engines`: `local`, this process, or `ray`, an actor pool on a Ray
cluster) embeds the chunks still to do, each into its shard (`index.shards`: `INDEX/.partial/chunk-NNNNN.npz`
and its completion marker `chunk-NNNNN.json`, both atomic), and this module assembles the index from the
shards. Both engines write the same shards, so they give the same index. With `--ondisk` (archives whose
vectors do not fit in memory) the assembly never holds them all: each IVF index is trained on a sample of
the shards, filled shard by shard and its inverted lists merged into a memory-mapped file
(`index.ivf_build`).

Resumable: `--resume` checks that the partial build used the same bundle, archive labels and chunk size,
and embeds only the chunks without a finished shard; chunks and batches are the same in every run (and in
both engines), so a resumed build gives the same vectors as an uninterrupted one.

Never half-written: the index files are written atomically one by one and `index.json`, the commit
marker, last (see `index.store`); until it exists `open_index` refuses the folder as an unfinished build.
`.partial/` is deleted after the commit.
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from index.archive.brset import Archive, read_archive
from index.atomic import atomic_target, write_text_atomic
from index.bundle import Manifest, now_iso, read_manifest, sha256_of
from index.engines import ChunkSummary, ChunkTodo, EngineError, EngineReport
from index.engines import local as local_engine
from index.ivf_build import IVFDATA_SUFFIX, build_from_shards, exact_top_k, training_sample
from index.metadata import MetadataRow, MetadataTable, row_of
from index.shards import ChunkResult, ChunkVectors, archive_items, is_finished, load_chunk
from index.store import (
    INDEX_SCHEMA_VERSION,
    PARTIAL_DIR,
    IndexCounts,
    IndexInfo,
    VectorIndexInfo,
    file_digests,
    files_for,
    write_info,
)
from index.vector_index import (
    ONDISK_KINDS,
    IndexKind,
    SearchParams,
    VectorIndex,
    choose_kind,
    tune_against_truth,
    tune_search_params,
)

if TYPE_CHECKING:
    from index.embedder import Embedder

KindChoice = Literal["auto", "flat", "ivf", "hnsw", "ivfsq", "ivfpq", "ivfpqr"]
EngineChoice = Literal["local", "ray"]
PLAN_FILE = "plan.json"
CLUSTER_INSTALL = "pip install 'retina-align[cluster]'"
RECALL_QUERIES = 1000
"""How many indexed vectors (sampled) serve as queries when measuring an approximate index's recall."""


class BuildError(Exception):
    """A build that cannot start or finish; the message says why and what to do."""


class BuildOptions(BaseModel):
    """Everything `retina-index build` takes."""

    model_config = ConfigDict(extra="forbid")

    bundle: Path
    archive: Path
    out: Path
    batch_size: int = Field(default=32, ge=1)
    kind: KindChoice = "auto"
    resume: bool = False
    chunk_size: int = Field(default=512, ge=1)
    target_recall: float = Field(default=0.95, gt=0, le=1)
    device: Literal["auto", "cpu"] = "auto"
    runtime: Literal["onnxruntime", "openvino"] = "onnxruntime"  # index.runtimes.Runtime (not imported here)
    progress: bool = True
    seed: int = 0
    store: Literal["faiss", "milvus"] = "faiss"
    """Where the vectors go: FAISS files in `out`, or Milvus collections (`index.milvus_store`)."""
    milvus_uri: str | None = None
    """A milvus-lite file (`./retina.db`) or a server (`http://HOST:19530`); required with store milvus."""
    milvus_collection: str = "retina"
    """The collections' name prefix: `<prefix>_image` and `<prefix>_record`."""
    ondisk: bool = False
    """Build each IVF index chunk by chunk and merge its inverted lists into a memory-mapped `.ivfdata`
    file (`index.ivf_build`): for archives whose vectors do not fit in memory. The index is read-only."""
    engine: EngineChoice = "local"
    """Who embeds the chunks: this process, or an actor pool on a Ray cluster (`index.engines`)."""
    address: str | None = None
    """The Ray cluster (engine ray): anything `ray.init` accepts; None starts a local Ray."""
    workers: int | None = Field(default=None, ge=1)
    """Actors in the Ray pool (engine ray); None: as many as the cluster's CPUs (or GPUs) allow."""
    cpus_per_worker: int = Field(default=1, ge=1)
    """CPUs each Ray actor reserves, and its ONNX Runtime threads (engine ray)."""
    gpus_per_worker: float = Field(default=0.0, ge=0)
    """GPUs each Ray actor reserves (engine ray); with a GPU it runs on CUDA where onnxruntime-gpu is installed."""

    @model_validator(mode="after")
    def _engine_options(self) -> BuildOptions:
        if self.engine != "ray":
            given = [flag for flag, value in (("--address", self.address), ("--workers", self.workers),
                                              ("--cpus-per-worker", self.cpus_per_worker != 1),
                                              ("--gpus-per-worker", self.gpus_per_worker))
                     if value]
            if given:
                raise ValueError(f"{', '.join(given)} only apply to --engine ray")
        if self.gpus_per_worker and self.device == "cpu":
            raise ValueError("--gpus-per-worker and --cpu contradict each other")
        if self.ondisk and (self.store != "faiss" or self.kind not in ("auto", *ONDISK_KINDS)):
            raise ValueError("--ondisk builds FAISS IVF indexes: use it with --store faiss and an IVF --kind (or auto)")
        return self


class PartialPlan(BaseModel):
    """`.partial/plan.json`: what a partial build was embedding, so a resume can check it is the same."""

    model_config = ConfigDict(extra="forbid")

    bundle_fingerprint: str
    labels_sha256: str
    records: int
    chunk_size: int
    batch_size: int


def _prepare_out(options: BuildOptions, plan: PartialPlan, console: Console) -> Path:
    """Check the output folder and return its `.partial/` folder, ready for this plan."""
    out = Path(options.out)
    partial = out / PARTIAL_DIR
    if out.exists() and not out.is_dir():
        raise BuildError(f"{out} is a file, not a folder; choose another --out")
    if (out / "index.json").exists():
        raise BuildError(f"{out} already holds a finished index; choose another --out or delete it first")
    if out.exists() and any(entry.name != PARTIAL_DIR for entry in out.iterdir()):
        raise BuildError(f"{out} is not empty and holds no partial build; choose an empty or new --out")
    plan_path = partial / PLAN_FILE
    if partial.is_dir():
        if options.resume and plan_path.is_file():
            previous = PartialPlan.model_validate_json(plan_path.read_text())
            if previous != plan:
                changed = [name for name in PartialPlan.model_fields if getattr(previous, name) != getattr(plan, name)]
                raise BuildError(
                    f"cannot resume {out}: the partial build differs in {', '.join(changed)} "
                    f"(it had {previous.model_dump()}); build without --resume to start over"
                )
            return partial
        if not options.resume:
            console.print(f"starting over: removing the partial build in {partial} (use --resume to continue it)")
        shutil.rmtree(partial)
    elif options.resume:
        console.print(f"nothing to resume in {out}; starting a new build")
    partial.mkdir(parents=True)
    write_text_atomic(plan_path, plan.model_dump_json(indent=1) + "\n")
    return partial


class _Progress:
    """The build's progress bar: photographs, chunks done, and this run's images/s (wall clock since the
    engine started; photographs of resumed chunks count toward the bar, not the rate)."""

    def __init__(self, progress: Progress, total: int, chunks: int) -> None:
        self.progress = progress
        self.task = progress.add_task("embedding", total=total, rate=0.0, chunks=f"0/{chunks}")
        self.chunks_total = chunks
        self.chunks_done = 0
        self.done = 0
        self.started = time.perf_counter()

    def resumed(self, photos: int) -> None:
        """A chunk finished in an earlier run."""
        self.chunks_done += 1
        self.progress.update(self.task, advance=photos, chunks=f"{self.chunks_done}/{self.chunks_total}")

    def start(self) -> None:
        """The engine starts now: the rate counts from here."""
        self.started = time.perf_counter()

    def photos(self, count: int) -> None:
        """`count` more photographs were processed (embedded or skipped)."""
        self.done += count
        rate = self.done / max(time.perf_counter() - self.started, 1e-9)
        self.progress.update(self.task, advance=count, rate=rate)

    def chunk(self, summary: ChunkSummary) -> None:
        """A chunk's shard was written."""
        self.chunks_done += 1
        self.progress.update(self.task, chunks=f"{self.chunks_done}/{self.chunks_total}")


def _progress(console: Console, enabled: bool) -> Progress:
    return Progress(
        TextColumn("[bold]embedding"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("chunks {task.fields[chunks]}"),
        TextColumn("{task.fields[rate]:>6.1f} images/s"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        disable=not enabled,
    )


def _vector_index(
    vectors: np.ndarray, ids: np.ndarray, kind: IndexKind, options: BuildOptions
) -> tuple[VectorIndex, VectorIndexInfo]:
    index = VectorIndex.create(kind, vectors.shape[1], train_vectors=vectors, n_hint=len(vectors),
                               seed=options.seed, device=options.device)
    index.add(vectors, ids)
    if kind == "flat":
        params, recall = SearchParams(), 1.0
        note = "exact search (flat): recall 1.0 by definition"
    else:
        rng = np.random.default_rng(options.seed)
        queries = vectors[rng.choice(len(vectors), min(RECALL_QUERIES, len(vectors)), replace=False)]
        params, recall = tune_search_params(index, vectors, ids, queries, options.target_recall)
        note = (
            f"10-recall@10 against exact flat search, {len(queries)} indexed vectors as queries, with the "
            f"search parameters above (the cheapest reaching {options.target_recall}, or the most thorough tried)"
        )
    info = VectorIndexInfo(kind=kind, ntotal=index.ntotal, parameters=index.describe(), search=params,
                           recall_at_10=recall, recall_note=note, device=index.device)
    return index, info


def _ondisk_index(
    partial: Path, chunks: int, embedding: Literal["image", "record"], kind: IndexKind, path: Path,
    options: BuildOptions,
) -> VectorIndexInfo:
    """One embedding's on-disk IVF index, built from the chunks' shards; nprobe tuned against an exact scan
    of the shards with indexed vectors as queries."""
    shards = [ChunkVectors(partial, number, embedding) for number in range(chunks)]
    shards = [shard for shard in shards if len(shard)]
    built = build_from_shards(shards, kind, path, ondisk=True, seed=options.seed)  # type: ignore[arg-type]
    index = VectorIndex.load(path, device="cpu")
    queries = training_sample(shards, RECALL_QUERIES, options.seed + 1)
    params, recall = tune_against_truth(index, queries, exact_top_k(shards, queries, 10), options.target_recall)
    note = (
        f"10-recall@10 against an exact scan of the shards, {len(queries)} indexed vectors as queries, with the "
        f"search parameters above (the cheapest reaching {options.target_recall}, or the most thorough tried); "
        f"inverted lists on disk ({path.name}{IVFDATA_SUFFIX}, memory-mapped), built in "
        + ", ".join(f"{stage} {seconds:.1f} s" for stage, seconds in built.seconds.items())
    )
    return VectorIndexInfo(kind=kind, ntotal=index.ntotal, parameters=index.describe(), search=params,
                           recall_at_10=recall, recall_note=note, device="cpu")


def build_index(options: BuildOptions, embedder: Embedder | None = None, console: Console | None = None) -> IndexInfo:
    """Build (or, with `options.resume`, finish) an index; returns its `index.json`. `embedder` may be
    passed in (it must be the bundle at `options.bundle`; the local engine embeds with it, the Ray engine's
    actors open their own)."""
    started = time.perf_counter()
    console = console or Console(stderr=True)
    ray_engine = _ray_engine() if options.engine == "ray" else None  # before anything is written
    if embedder is None and options.engine == "local":
        from index.embedder import Embedder  # onnxruntime is loaded only when a build really runs

        # OpenVINO's throughput hint: a build's batches are split over parallel streams (ONNX Runtime ignores it).
        embedder = Embedder(options.bundle, device="cpu" if options.device == "cpu" else "auto",
                            runtime=options.runtime, performance="throughput")
    manifest: Manifest = embedder.manifest if embedder is not None else read_manifest(options.bundle)
    archive = read_archive(options.archive, check_photos=False)
    n = len(archive.records)
    if n == 0:
        raise BuildError(f"{archive.labels_path}: no records to index")
    plan = PartialPlan(
        bundle_fingerprint=manifest.fingerprint,
        labels_sha256=sha256_of(archive.labels_path),
        records=n,
        chunk_size=options.chunk_size,
        batch_size=options.batch_size,
    )
    if options.store == "milvus":
        if not options.milvus_uri:
            raise BuildError("--store milvus needs --milvus-uri (a ./file.db for milvus-lite, or http://HOST:19530)")
        from index.milvus_store import check_kind, existing_collections

        if options.kind != "auto":
            check_kind(options.milvus_uri, options.kind)

        taken = existing_collections(options.milvus_uri, options.milvus_collection)  # before anything is embedded
        if taken:
            raise BuildError(
                f"Milvus at {options.milvus_uri} already has the collection(s) {', '.join(taken)}; choose another "
                "--milvus-collection or drop them first"
            )
    partial = _prepare_out(options, plan, console)

    all_ids = np.arange(n, dtype=np.int64)
    chunks = [all_ids[start : start + options.chunk_size] for start in range(0, n, options.chunk_size)]
    with _progress(console, options.progress) as bar:
        progress = _Progress(bar, n, len(chunks))
        todo: list[ChunkTodo] = []
        for number, covered in enumerate(chunks):
            if options.resume and is_finished(partial, number, covered.tolist()):
                progress.resumed(len(covered))
            else:
                todo.append(ChunkTodo(number, archive_items(archive, covered)))
        try:
            if ray_engine is not None:
                settings = ray_engine.RaySettings(
                    bundle=options.bundle, fingerprint=manifest.fingerprint, batch_size=options.batch_size,
                    device=options.device, runtime=options.runtime, address=options.address, workers=options.workers,
                    cpus_per_worker=options.cpus_per_worker, gpus_per_worker=options.gpus_per_worker,
                )
                report: EngineReport = ray_engine.embed_chunks(todo, partial, settings, progress, console)
            else:
                assert embedder is not None
                report = local_engine.embed_chunks(embedder, todo, partial, options.batch_size, progress)
        except EngineError as error:
            raise BuildError(str(error)) from None

    results: list[ChunkResult] = []
    for number, covered in enumerate(chunks):
        result = load_chunk(partial, number, covered.tolist())
        if result is None:
            raise BuildError(f"chunk {number} has no finished shard in {partial} after the {options.engine} engine ran")
        if options.ondisk:  # the vectors stay in the shards; the builder reads them one chunk at a time
            empty = np.zeros((0, manifest.embedding_dim), np.float32)
            result = dataclasses.replace(result, image=empty, record=empty)
        results.append(result)
    ids = np.concatenate([r.ids for r in results])
    skipped = [photo for r in results for photo in r.skipped]
    if len(ids) == 0:
        raise BuildError(f"none of the {n} photographs could be embedded: " + "; ".join(s.reason for s in skipped[:5]))
    icdr = np.concatenate([r.icdr for r in results])
    sdrg = np.concatenate([r.sdrg for r in results])

    kind: IndexKind = choose_kind(len(ids), manifest.embedding_dim) if options.kind == "auto" else options.kind
    if options.store == "milvus" and options.kind == "auto":
        from index.milvus_store import supported_kinds

        if kind not in supported_kinds(options.milvus_uri or ""):
            kind = "ivf"  # milvus-lite 2.5: FLAT or IVF_FLAT only
    if options.ondisk and kind not in ONDISK_KINDS:
        kind = "ivf"  # an on-disk index is IVF whatever its size
    console.print(f"indexing {len(ids):,} photographs ({kind}{', on disk' if options.ondisk else ''}, {options.store})")
    rows = _metadata_rows(archive, ids, icdr, sdrg)
    out = Path(options.out)
    files = files_for(1, options.store, options.ondisk)
    milvus_info = None
    if options.ondisk:
        assert files.image is not None and files.record is not None
        image_info = _ondisk_index(partial, len(chunks), "image", kind, out / files.image, options)
        record_info = _ondisk_index(partial, len(chunks), "record", kind, out / files.record, options)
    else:
        image_vectors = np.concatenate([r.image for r in results])
        record_vectors = np.concatenate([r.record for r in results])
        if options.store == "milvus":
            from index.milvus_store import write_collections

            milvus_info, image_info, record_info = write_collections(
                options.milvus_uri or "", options.milvus_collection, kind, ids, image_vectors, record_vectors, rows,
                options.target_recall, options.seed,
            )
        else:
            image_index, image_info = _vector_index(image_vectors, ids, kind, options)
            record_index, record_info = _vector_index(record_vectors, ids, kind, options)
            assert files.image is not None and files.record is not None
            image_index.save(out / files.image)
            record_index.save(out / files.record)

    metadata = MetadataTable.in_memory()
    metadata.insert(rows)
    with atomic_target(out / files.metadata) as temp:
        metadata.write(temp)
    metadata.close()
    info = IndexInfo(
        schema_version=INDEX_SCHEMA_VERSION,
        created=now_iso(),
        generation=1,
        bundle_fingerprint=manifest.fingerprint,
        bundle_path=str(Path(options.bundle).resolve()),
        archive_root=str(archive.root.resolve()),
        dim=manifest.embedding_dim,
        counts=IndexCounts(archive_records=n, indexed=len(ids), skipped=len(skipped)),
        indexes={"image": image_info, "record": record_info},
        files=files,
        store=options.store,
        milvus=milvus_info,
        skipped=skipped,
        build_seconds=round(time.perf_counter() - started, 3),
        images_per_second=round(report.images_per_second, 2),
        providers=report.providers,
        runtimes=report.runtimes,
        sha256=file_digests(out, files),
    )
    write_info(out, info)  # the commit
    shutil.rmtree(partial, ignore_errors=True)
    return info


def _ray_engine() -> ModuleType:
    """`index.engines.ray_engine`, or BuildError naming the extra that installs Ray."""
    try:
        from index.engines import ray_engine
    except ImportError as error:
        if (error.name or "").split(".")[0] != "ray":
            raise
        raise BuildError(f"--engine ray needs Ray (Ray Data), which is not installed: install the cluster extra: "
                         f"{CLUSTER_INSTALL}") from None
    return ray_engine


def _metadata_rows(archive: Archive, ids: np.ndarray, icdr: np.ndarray, sdrg: np.ndarray) -> list[MetadataRow]:
    rows = []
    for identifier, icdr_row, sdrg_row in zip(ids.tolist(), icdr, sdrg, strict=True):
        record = archive.records[identifier]
        photo = archive.photo_path(record.image_id)
        assert photo is not None  # it was embedded
        row = row_of(identifier, record, photo.relative_to(archive.root).as_posix())
        labels = row.labels.model_copy(
            update={"predicted_icdr": [round(float(p), 5) for p in icdr_row],
                    "predicted_sdrg": [round(float(p), 5) for p in sdrg_row]}
        )
        rows.append(row.model_copy(update={"labels": labels}))
    return rows

