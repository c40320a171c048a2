"""The service's model and index: one bundle (ONNX Runtime or OpenVINO) and one index (FAISS + metadata), the
batched model calls of each route, and searches.

Model work never runs on the event loop: each route kind has a `MicroBatcher` whose batches run in one
model thread (the runtime already spreads one run over every core, so runs go one at a time). A search
batch runs its queries through the tower and then through FAISS in the same thread, one FAISS call for the
batch (per distinct `against` and filters): each search request is one hand-off to the model thread and
back, and FAISS gets the batched queries it is fastest with.

The index is served from memory, loaded from the bytes its integrity record verified. A watcher thread
looks at the index folder every few seconds: a newly committed generation (a new `index.json`) is loaded,
verified and swapped in whole (a request uses one generation from start to end, never a mix); files changed
in place under a running server are reported by /readyz while the verified copy keeps serving.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, TypeVar

import faiss
import numpy as np
from PIL import Image

from index.consensus import Consensus, neighbour_consensus
from index.embedder import Embedder, GradeInput, Grades, SearchQuery
from index.explain import Explanation, explain_photograph
from index.gate import Gradability
from index.metadata import Filters
from index.store import INFO_FILE, Against, Hit, IndexStore, IndexStoreError, file_digests, open_index, read_info
from service.batching import MicroBatcher
from service.settings import ServiceSettings

log = logging.getLogger(__name__)

Q = TypeVar("Q")


class NotReady(Exception):
    """The bundle and index are still loading, or failed to load (the message says which)."""


@dataclass(frozen=True)
class SearchRequest(Generic[Q]):
    """One search: a query (a text or a photograph), how many neighbours, against which embeddings, and
    the filters."""

    query: Q
    k: int
    against: Against = "image"
    filters: Filters | None = None
    consensus_k: int = 0
    """The archived photographs nearest the query photograph whose grades form its consensus (0: none)."""


@dataclass(frozen=True)
class SearchAnswer:
    """A search's query pass (vector and grades), its neighbours, and the seconds its batch spent in the
    model and in FAISS."""

    query: SearchQuery
    hits: list[Hit]
    embed_seconds: float
    search_seconds: float
    consensus: Consensus | None = None
    """The grades of the query photograph's nearest archived photographs (when asked for)."""


@dataclass(frozen=True)
class GradeRequest:
    """One grading request: its inputs, and how many archived photographs nearest its photograph form the
    consensus (0: none; no photograph: none)."""

    input: GradeInput
    consensus_k: int = 0


@dataclass(frozen=True)
class GradeAnswer:
    """The grades, and the consensus of the photograph's nearest archived photographs (when asked for)."""

    grades: Grades
    consensus: Consensus | None = None


FileStamp = tuple[str, int, int, int]
"""(file name, inode, size, modification time in ns): enough to notice a file replaced or changed."""


def folder_stamp(folder: Path, names: Sequence[str]) -> tuple[FileStamp, ...]:
    """The stamps of `names` in `folder` (a missing file has inode, size and time -1)."""
    stamps = []
    for name in names:
        try:
            stat = os.stat(Path(folder) / name)
        except OSError:
            stamps.append((name, -1, -1, -1))
        else:
            stamps.append((name, stat.st_ino, stat.st_size, stat.st_mtime_ns))
    return tuple(stamps)


_ABSOLUTE_PATH = re.compile(r"(?<![\w.])/(?:[^\s/:'\"(),]+/)*([^\s/:'\"(),]+)")
_FAISS_DETAIL = re.compile(r"\s*\((?:Error in|FAISS|faiss)[^)]*\)")


def public_reason(message: str, named: dict[str, str]) -> str:
    """A failure message as a client may see it: the configured folders by their role (`named` maps a path
    to e.g. "the index folder"), any other absolute path by its last component, no FAISS internals."""
    for path, role in sorted(named.items(), key=lambda item: -len(item[0])):
        if path:
            message = message.replace(path, role)
    message = _FAISS_DETAIL.sub(" (not a readable FAISS index file)", message)
    return _ABSOLUTE_PATH.sub(lambda match: match.group(1), message)


class Engine:
    """Loads the bundle and index (in the background, so /healthz answers at once) and runs the model
    calls and searches of the routes."""

    def __init__(self, settings: ServiceSettings, on_batch: Callable[[str, int, float], None] | None = None) -> None:
        self.settings = settings
        self.embedder: Embedder | None = None
        self.store: IndexStore | None = None
        self.error: str | None = None
        self.index_warning: str | None = None
        """Set while the index folder on disk differs from the generation being served (said by /readyz)."""
        self._index_stamp: tuple[FileStamp, ...] = ()
        self._loaded = threading.Event()
        self._stopping = threading.Event()
        # OpenMP thread counts are per calling thread: the model thread, which also searches, sets its own,
        # or FAISS would start one OpenMP team per core in every search and fight ONNX Runtime for the cores.
        self._model_pool = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="model", initializer=faiss.omp_set_num_threads,
            initargs=(settings.faiss_threads,),
        )
        self.decode_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="decode")
        wait_s = settings.batch_wait_ms / 1000
        batch = settings.batch_max
        self.texts: MicroBatcher[SearchRequest[str], SearchAnswer] = MicroBatcher(
            "text", self._run_text_searches, self._model_pool, batch, wait_s, on_batch
        )
        self.images: MicroBatcher[SearchRequest[Image.Image], SearchAnswer] = MicroBatcher(
            "image", self._run_image_searches, self._model_pool, batch, wait_s, on_batch
        )
        self.grades: MicroBatcher[GradeRequest, GradeAnswer] = MicroBatcher(
            "grade", self._run_grades, self._model_pool, batch, wait_s, on_batch
        )

    # --- lifecycle --------------------------------------------------------------------------------

    def load(self) -> None:
        """Open the bundle and the index (blocking). Failures are kept in `error` for /readyz."""
        started = time.perf_counter()
        try:
            if self.settings.bundle is None or self.settings.index is None:
                raise NotReady("no bundle or index configured: start with --bundle BUNDLE --index INDEX")
            embedder = Embedder(
                Path(self.settings.bundle), device=self.settings.device, threads=self.settings.threads,
                spin=self.settings.ort_spinning, runtime=self.settings.runtime,
            )
            stamp = self._stamp_of_folder()
            store = self._open(Path(self.settings.index), embedder)
        except Exception as error:  # every load failure is reported by /readyz, never raised into uvicorn
            self.error = str(error)
            log.error("loading failed: %s", error)
        else:
            self.embedder, self.store = embedder, store
            self._index_stamp = stamp
            log.info(
                "ready in %.1f s: bundle %s, index of %d photographs, runtimes %s",
                time.perf_counter() - started, embedder.fingerprint, store.ntotal, embedder.runtimes,
            )
        finally:
            self._loaded.set()

    def start(self) -> None:
        """Start the batchers (on the running event loop), load in a background thread, then watch the
        index folder (every `index_check_s` seconds; 0: never)."""
        for batcher in (self.texts, self.images, self.grades):
            batcher.start()
        threading.Thread(target=self._load_then_watch, name="load", daemon=True).start()

    def _load_then_watch(self) -> None:
        self.load()
        interval = self.settings.index_check_s
        while interval > 0 and self.ready and not self._stopping.wait(interval):
            try:
                self.check_index()
            except Exception as error:  # the watcher must never die; the served generation stays valid
                log.error("checking the index folder failed: %s", type(error).__name__)

    def _open(self, folder: Path, embedder: Embedder) -> IndexStore:
        """Open the index in memory (a Milvus-backed one at `milvus_uri` when set), checking its store."""
        store = open_index(folder, embedder, in_memory=True, milvus_uri=self.settings.milvus_uri)
        if self.settings.store is not None and store.info.store != self.settings.store:
            raise IndexStoreError(
                f"{folder}: the index uses the {store.info.store} store, but the service was started with "
                f"--store {self.settings.store}"
            )
        return store

    def _stamp_of_folder(self) -> tuple[FileStamp, ...]:
        folder = Path(self.settings.index or ".")
        try:
            names = read_info(folder).files.names()
        except IndexStoreError:
            names = []
        return folder_stamp(folder, [INFO_FILE, *names])

    def check_index(self) -> None:
        """Compare the index folder with the generation being served. A new commit (`index.json`
        changed) is loaded, verified and swapped in; if it cannot be, the served generation stays and
        `index_warning` says why. Files changed in place are verified again: a mismatch sets
        `index_warning` (the verified copy in memory keeps serving), a match clears it."""
        if self.embedder is None or self.store is None:
            return
        folder = Path(self.settings.index or ".")
        stamp = self._stamp_of_folder()
        if stamp == self._index_stamp:
            return
        served = self.store
        info_changed = stamp[0] != self._index_stamp[0]
        if info_changed:
            try:
                fresh = self._open(folder, self.embedder)
            except Exception as error:
                self._warn(f"the index on disk changed and cannot be loaded ({error}); still serving generation "
                           f"{served.info.generation}, loaded and verified earlier")
                self._index_stamp = stamp
                return
            self.store = fresh
            self.index_warning = None
            self._index_stamp = stamp
            log.info("index generation %d loaded (%d photographs); it replaces generation %d",
                     fresh.info.generation, fresh.ntotal, served.info.generation)
            return
        recorded = served.info.sha256
        if recorded is not None and file_digests(folder, served.info.files) != recorded:
            self._warn("index files changed on disk since they were loaded (their sha256 differs from the "
                       "integrity record); still serving the verified copy in memory; restore the files or "
                       "rebuild the index before the next start")
        else:
            self.index_warning = None
        self._index_stamp = stamp

    def _warn(self, message: str) -> None:
        if message != self.index_warning:
            log.error("%s", message)
        self.index_warning = message

    def public_message(self, message: str) -> str:
        """`message` without this server's paths or library internals (see `public_reason`)."""
        named: dict[str, str] = {}
        for path, role in ((self.settings.bundle, "the bundle folder"), (self.settings.index, "the index folder")):
            if path is not None:
                named[str(path)] = role
                named[str(Path(path).resolve())] = role
        return public_reason(message, named)

    async def stop(self) -> None:
        """Stop the watcher, the batchers and the thread pools."""
        self._stopping.set()
        for batcher in (self.texts, self.images, self.grades):
            await batcher.stop()
        for pool in (self._model_pool, self.decode_pool):
            pool.shutdown(wait=False, cancel_futures=True)

    def wait_loaded(self, timeout: float | None = None) -> bool:
        """Block until loading finished (ready or failed); False on timeout."""
        return self._loaded.wait(timeout)

    @property
    def ready(self) -> bool:
        """True once the bundle and index are loaded."""
        return self.embedder is not None and self.store is not None

    def parts(self) -> tuple[Embedder, IndexStore]:
        """The loaded embedder and index; raises NotReady while loading or after a failed load."""
        if self.embedder is None or self.store is None:
            if self.error is not None:
                raise NotReady(
                    f"the service could not load its bundle and index: {self.public_message(self.error)}"
                )
            raise NotReady("the service is still loading its bundle and index; retry in a moment")
        return self.embedder, self.store

    # --- searches ---------------------------------------------------------------------------------

    # --- batched model calls (run in the model thread) ----------------------------------------------

    def _run_text_searches(self, requests: Sequence[SearchRequest[str]]) -> list[SearchAnswer]:
        embedder, store = self.parts()
        return _searched(store, requests, lambda: embedder.query_texts([r.query for r in requests]))

    def _run_image_searches(self, requests: Sequence[SearchRequest[Image.Image]]) -> list[SearchAnswer]:
        embedder, store = self.parts()
        return _searched(store, requests, lambda: embedder.query_images([r.query for r in requests]))

    def _run_grades(self, requests: Sequence[GradeRequest]) -> list[GradeAnswer]:
        embedder, store = self.parts()
        grades = embedder.grade_many([request.input for request in requests])
        consensus = _consensus(
            store, [g.image_embedding for g in grades], [r.consensus_k for r in requests],
            [g.icdr_grade for g in grades],
        )
        return [GradeAnswer(g, c) for g, c in zip(grades, consensus, strict=True)]

    def explain(
        self, image: Image.Image, window: int | None = None, stride: int | None = None
    ) -> Future[tuple[Explanation, Gradability | None]]:
        """The occlusion heatmap of one photograph (`index.explain`) and the gate's answer on it, computed on
        the model thread like every model call (never on the event loop). It is heavy (some 170 graded copies
        at the defaults), so batches submitted after it wait for it."""
        return self._model_pool.submit(self._run_explain, image, window, stride)

    def _run_explain(
        self, image: Image.Image, window: int | None, stride: int | None
    ) -> tuple[Explanation, Gradability | None]:
        embedder, _ = self.parts()
        explanation = explain_photograph(embedder, image, window=window, stride=stride)
        gradability = embedder.check_gradability([image])[0] if embedder.has_gate else None
        return explanation, gradability


def _searched(
    store: IndexStore, requests: Sequence[SearchRequest[Q]], run_queries: Callable[[], list[SearchQuery]]
) -> list[SearchAnswer]:
    """Run the batch's queries through the model (one tower pass each: vector and grades), then search
    FAISS once per group of requests with the same `against` and filters (with the group's largest k), and
    the consensus of the photographs that ask for one (`_consensus`, reusing an unfiltered image search)."""
    started = time.perf_counter()
    queries = run_queries()
    embedded = time.perf_counter()
    groups: list[tuple[Against, Filters | None, list[int]]] = []
    for i, request in enumerate(requests):
        group = next((g for g in groups if g[0] == request.against and g[1] == request.filters), None)
        if group is None:
            groups.append((request.against, request.filters, [i]))
        else:
            group[2].append(i)
    hits: list[list[Hit]] = [[] for _ in requests]
    unfiltered: list[list[Hit] | None] = [None] * len(requests)
    for against, filters, members in groups:
        vectors = np.stack([queries[i].against(against) for i in members])
        depth = max(requests[i].k for i in members)
        whole_archive = against == "image" and (filters is None or filters.is_empty())
        if whole_archive:  # deep enough for the consensus too (k + 1: the photograph itself may be archived)
            depth = max([depth] + [requests[i].consensus_k + 1 for i in members if requests[i].consensus_k > 0])
        found = store.search(vectors, depth, against, filters)
        for i, neighbours in zip(members, found, strict=True):
            hits[i] = neighbours[: requests[i].k]
            if whole_archive:
                unfiltered[i] = neighbours  # the consensus reuses this search
    consensus = _consensus(
        store, [q.vector for q in queries], [r.consensus_k for r in requests], [q.grades.icdr_grade for q in queries],
        unfiltered,
    )
    searched = time.perf_counter()
    return [
        SearchAnswer(query, neighbours, embedded - started, searched - embedded, agreed)
        for query, neighbours, agreed in zip(queries, hits, consensus, strict=True)
    ]


def _consensus(
    store: IndexStore, vectors: Sequence[np.ndarray | None], ks: Sequence[int], model_grades: Sequence[int],
    searched: Sequence[list[Hit] | None] | None = None,
) -> list[Consensus | None]:
    """The consensus of each query photograph's `ks[i]` nearest archived photographs (None where `ks[i]` is
    0 or there is no photograph vector): an image->image search of the whole archive, never filtered (the
    consensus describes the archive, not the page of results). k + 1 neighbours are fetched so that k remain
    when the photograph itself is in the archive (`index.consensus` leaves out exact duplicates). A query
    whose unfiltered image search (`searched[i]`) already went deep enough reuses it; the others share one
    search."""
    reuse = searched or [None] * len(vectors)
    photographs = {i: vector for i, (vector, k) in enumerate(zip(vectors, ks, strict=True))
                   if k > 0 and vector is not None}
    wanted = list(photographs)
    neighbours: dict[int, list[Hit]] = {}
    for i in wanted:
        done = reuse[i]
        if done is not None and len(done) >= min(ks[i] + 1, store.ntotal):
            neighbours[i] = done
    missing = [i for i in wanted if i not in neighbours]
    if missing:
        depth = max(ks[i] for i in missing) + 1
        found = store.search(np.stack([photographs[i] for i in missing]), depth, "image", None)
        neighbours.update(zip(missing, found, strict=True))
    answers: list[Consensus | None] = [None] * len(vectors)
    for i, hits in neighbours.items():
        nearest = hits[: ks[i] + 1]  # the same depth whichever search found them
        answers[i] = neighbour_consensus([hit.row.labels.icdr for hit in nearest], [hit.score for hit in nearest],
                                         model_grades[i], ks[i])
    return answers
