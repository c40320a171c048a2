"""`retina-index build`: embed every photograph of an archive with a bundle into an index folder.

For each archive record (id = its row number in the label file, a stable int64), the photograph is
decoded and goes through the image tower once (`Embedder.embed_records`), which gives two vectors:
image-only (what the photograph shows) and, through the grader from the same image tokens, the record
(photograph + structured data, with the model's ICDR/SDRG probabilities). A record whose photo is
missing or cannot be decoded is skipped, with the reason, and the build goes on.

Resumable: records are embedded in chunks of `chunk_size` consecutive ids; each finished chunk is written
to `INDEX/.partial/chunk-NNNNN.npz` (ids, vectors, probabilities) and then `chunk-NNNNN.json` (the ids it
covers, the photos it skipped) as its completion marker, both atomically. `--resume` checks that the
partial build used the same bundle, archive labels and chunk size, and skips finished chunks; chunks and
batches are the same in every run, so a resumed build gives the same vectors as an uninterrupted one.

Never half-written: the index files are written atomically one by one and `index.json`, the commit
marker, last (see `index.store`); until it exists `open_index` refuses the folder as an unfinished build.
`.partial/` is deleted after the commit.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from index.archive.brset import Archive, read_archive
from index.atomic import atomic_target, write_text_atomic
from index.bundle import now_iso, sha256_of
from index.metadata import MetadataRow, MetadataTable, row_of
from index.preprocess import ImageDecodeError, decode_image
from index.records import FundusRecord
from index.store import (
    INDEX_SCHEMA_VERSION,
    PARTIAL_DIR,
    IndexCounts,
    IndexInfo,
    SkippedPhoto,
    VectorIndexInfo,
    file_digests,
    files_for,
    write_info,
)
from index.vector_index import (
    IndexKind,
    SearchParams,
    VectorIndex,
    choose_kind,
    tune_search_params,
)

if TYPE_CHECKING:
    from index.embedder import Embedder

KindChoice = Literal["auto", "flat", "ivf", "hnsw", "ivfpq"]
PLAN_FILE = "plan.json"
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


class PartialPlan(BaseModel):
    """`.partial/plan.json`: what a partial build was embedding, so a resume can check it is the same."""

    model_config = ConfigDict(extra="forbid")

    bundle_fingerprint: str
    labels_sha256: str
    records: int
    chunk_size: int
    batch_size: int


class ChunkDone(BaseModel):
    """`.partial/chunk-NNNNN.json`: a finished chunk (written after its .npz)."""

    model_config = ConfigDict(extra="forbid")

    chunk: int
    ids: list[int]
    """The ids this chunk covers (embedded or skipped)."""
    skipped: list[SkippedPhoto]
    seconds: float


@dataclass
class ChunkResult:
    """What embedding one chunk produced."""

    ids: np.ndarray
    image: np.ndarray
    record: np.ndarray
    icdr: np.ndarray
    sdrg: np.ndarray
    skipped: list[SkippedPhoto]


def load_photo(archive: Archive, record: FundusRecord) -> Image.Image | str:
    """The decoded photograph of a record, or the reason it cannot be used."""
    path = archive.photo_path(record.image_id)
    if path is None:
        return f"no photo file in {archive.photos_dir}"
    try:
        return decode_image(path)
    except ImageDecodeError as error:
        return f"{path.name}: {error}"
    except OSError as error:
        return f"{path.name}: cannot read ({error.strerror or error})"


def embed_chunk(
    embedder: Embedder,
    archive: Archive,
    ids: np.ndarray,
    batch_size: int,
    on_batch: Callable[[int], None] | None = None,
) -> ChunkResult:
    """Embed the records `ids` (row numbers of the archive), batch by batch; only one batch of decoded
    photographs is in memory at a time. `on_batch(n)` reports each batch's size."""
    kept: list[int] = []
    image_parts, record_parts, icdr_parts, sdrg_parts = [], [], [], []
    skipped: list[SkippedPhoto] = []
    for start in range(0, len(ids), batch_size):
        batch_ids = ids[start : start + batch_size]
        images: list[Image.Image] = []
        records: list[FundusRecord] = []
        for identifier in batch_ids:
            record = archive.records[int(identifier)]
            photo = load_photo(archive, record)
            if isinstance(photo, str):
                skipped.append(SkippedPhoto(id=int(identifier), image_id=record.image_id, reason=photo))
                continue
            images.append(photo)
            records.append(record)
            kept.append(int(identifier))
        if images:
            embedded = embedder.embed_records(images, records, batch_size)
            image_parts.append(embedded.image_vectors)
            record_parts.append(embedded.record_vectors)
            icdr_parts.append(embedded.icdr)
            sdrg_parts.append(embedded.sdrg)
        if on_batch is not None:
            on_batch(len(batch_ids))
    dim = embedder.dim
    classes = len(embedder.manifest.icdr_names)

    def stack(parts: list[np.ndarray], width: int) -> np.ndarray:
        return np.concatenate(parts).astype(np.float32) if parts else np.zeros((0, width), np.float32)

    return ChunkResult(
        ids=np.asarray(kept, dtype=np.int64),
        image=stack(image_parts, dim),
        record=stack(record_parts, dim),
        icdr=stack(icdr_parts, classes),
        sdrg=stack(sdrg_parts, classes),
        skipped=skipped,
    )


@dataclass
class _Meter:
    """Embedding throughput of this run: photographs (decoded + both embeddings) per second."""

    images: int = 0
    seconds: float = 0.0
    _since: float | None = None

    def start(self) -> None:
        self._since = time.perf_counter()

    def stop(self) -> float:
        elapsed = time.perf_counter() - (self._since or time.perf_counter())
        self.seconds += elapsed
        self._since = None
        return elapsed

    def rate(self) -> float:
        running = time.perf_counter() - self._since if self._since is not None else 0.0
        total = self.seconds + running
        return self.images / total if total > 0 else 0.0


def _chunk_paths(partial: Path, chunk: int) -> tuple[Path, Path]:
    return partial / f"chunk-{chunk:05d}.npz", partial / f"chunk-{chunk:05d}.json"


def _save_chunk(partial: Path, chunk: int, result: ChunkResult, seconds: float, covered: np.ndarray) -> None:
    arrays_path, done_path = _chunk_paths(partial, chunk)
    with atomic_target(arrays_path) as temp:
        with temp.open("wb") as handle:
            np.savez(
                handle, ids=result.ids, image=result.image, record=result.record, icdr=result.icdr, sdrg=result.sdrg
            )
    done = ChunkDone(chunk=chunk, ids=covered.tolist(), skipped=result.skipped, seconds=seconds)
    write_text_atomic(done_path, done.model_dump_json() + "\n")


def _load_chunk(partial: Path, chunk: int, covered: np.ndarray) -> ChunkResult | None:
    """A finished chunk, or None when it is not finished (or its marker does not match)."""
    arrays_path, done_path = _chunk_paths(partial, chunk)
    if not (done_path.is_file() and arrays_path.is_file()):
        return None
    done = ChunkDone.model_validate_json(done_path.read_text())
    if done.ids != covered.tolist():
        return None
    with np.load(arrays_path) as data:
        return ChunkResult(
            ids=data["ids"], image=data["image"], record=data["record"], icdr=data["icdr"], sdrg=data["sdrg"],
            skipped=done.skipped,
        )


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


def _progress(console: Console, enabled: bool) -> Progress:
    return Progress(
        TextColumn("[bold]embedding"),
        BarColumn(),
        MofNCompleteColumn(),
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


def build_index(options: BuildOptions, embedder: Embedder | None = None, console: Console | None = None) -> IndexInfo:
    """Build (or, with `options.resume`, finish) an index; returns its `index.json`. `embedder` may be
    passed in (it must be the bundle at `options.bundle`)."""
    started = time.perf_counter()
    console = console or Console(stderr=True)
    if embedder is None:
        from index.embedder import Embedder  # onnxruntime is loaded only when a build really runs

        # OpenVINO's throughput hint: a build's batches are split over parallel streams (ONNX Runtime ignores it).
        embedder = Embedder(options.bundle, device="cpu" if options.device == "cpu" else "auto",
                            runtime=options.runtime, performance="throughput")
    archive = read_archive(options.archive, check_photos=False)
    n = len(archive.records)
    if n == 0:
        raise BuildError(f"{archive.labels_path}: no records to index")
    plan = PartialPlan(
        bundle_fingerprint=embedder.fingerprint,
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
    results: list[ChunkResult] = []
    meter = _Meter()
    with _progress(console, options.progress) as progress:
        task = progress.add_task("embedding", total=n, rate=0.0)

        def advance(count: int) -> None:
            meter.images += count
            progress.update(task, advance=count, rate=meter.rate())

        for number, covered in enumerate(chunks):
            result = _load_chunk(partial, number, covered) if options.resume else None
            if result is None:
                meter.start()
                result = embed_chunk(embedder, archive, covered, options.batch_size, advance)
                seconds = meter.stop()
                _save_chunk(partial, number, result, seconds, covered)
            else:
                progress.update(task, advance=len(covered))
            results.append(result)

    ids = np.concatenate([r.ids for r in results])
    skipped = [photo for r in results for photo in r.skipped]
    if len(ids) == 0:
        raise BuildError(f"none of the {n} photographs could be embedded: " + "; ".join(s.reason for s in skipped[:5]))
    image_vectors = np.concatenate([r.image for r in results])
    record_vectors = np.concatenate([r.record for r in results])
    icdr = np.concatenate([r.icdr for r in results])
    sdrg = np.concatenate([r.sdrg for r in results])

    kind: IndexKind = choose_kind(len(ids), embedder.dim) if options.kind == "auto" else options.kind
    if options.store == "milvus" and options.kind == "auto":
        from index.milvus_store import supported_kinds

        if kind not in supported_kinds(options.milvus_uri or ""):
            kind = "ivf"  # milvus-lite 2.5: FLAT or IVF_FLAT only
    console.print(f"indexing {len(ids):,} photographs ({kind}, {options.store})")
    rows = _metadata_rows(archive, ids, icdr, sdrg)
    out = Path(options.out)
    files = files_for(1, options.store)
    milvus_info = None
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
        bundle_fingerprint=embedder.fingerprint,
        bundle_path=str(Path(options.bundle).resolve()),
        archive_root=str(archive.root.resolve()),
        dim=embedder.dim,
        counts=IndexCounts(archive_records=n, indexed=len(ids), skipped=len(skipped)),
        indexes={"image": image_info, "record": record_info},
        files=files,
        store=options.store,
        milvus=milvus_info,
        skipped=skipped,
        build_seconds=round(time.perf_counter() - started, 3),
        images_per_second=round(meter.rate(), 2),
        providers=dict(embedder.providers),
        runtimes=dict(embedder.runtimes),
        sha256=file_digests(out, files),
    )
    write_info(out, info)  # the commit
    shutil.rmtree(partial, ignore_errors=True)
    return info


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

