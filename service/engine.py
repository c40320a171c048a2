"""The service's model and index: one bundle (ONNX Runtime) and one index (FAISS + metadata), the
batched model calls of each route, and searches.

Model work never runs on the event loop: each route kind has a `MicroBatcher` whose batches run in one
model thread (ONNX Runtime already spreads one run over every core, so runs go one at a time), and
searches run in their own small thread pool (FAISS CPU indexes are safe to search from several threads;
GPU indexes are serialised inside `index.vector_index`).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np
from PIL import Image

from index.embedder import Embedder, GradeInput, Grades
from index.metadata import Filters
from index.store import Against, Hit, IndexStore, open_index
from service.batching import MicroBatcher
from service.settings import ServiceSettings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TextQuery:
    """A text embedded for search, with the grades predicted from it."""

    vector: np.ndarray  # (D,)
    truncated: bool
    grades: Grades


@dataclass(frozen=True)
class ImageQuery:
    """A photograph embedded for search, with the grades predicted from it."""

    vector: np.ndarray  # (D,)
    grades: Grades


class NotReady(Exception):
    """The bundle and index are still loading, or failed to load (the message says which)."""


class Engine:
    """Loads the bundle and index (in the background, so /healthz answers at once) and runs the model
    calls and searches of the routes."""

    def __init__(self, settings: ServiceSettings, on_batch: Callable[[str, int, float], None] | None = None) -> None:
        self.settings = settings
        self.embedder: Embedder | None = None
        self.store: IndexStore | None = None
        self.error: str | None = None
        self._loaded = threading.Event()
        self._model_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model")
        # OpenMP thread counts are per calling thread: each search thread sets its own, or FAISS would
        # start one OpenMP team per core in every search and fight the model thread for the cores.
        self._search_pool = ThreadPoolExecutor(
            max_workers=2, thread_name_prefix="search", initializer=faiss.omp_set_num_threads,
            initargs=(settings.faiss_threads,),
        )
        self.decode_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="decode")
        wait_s = settings.batch_wait_ms / 1000
        batch = settings.batch_max
        self.texts: MicroBatcher[str, TextQuery] = MicroBatcher(
            "text", self._run_texts, self._model_pool, batch, wait_s, on_batch
        )
        self.images: MicroBatcher[Image.Image, ImageQuery] = MicroBatcher(
            "image", self._run_images, self._model_pool, batch, wait_s, on_batch
        )
        self.grades: MicroBatcher[GradeInput, Grades] = MicroBatcher(
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
                spin=self.settings.ort_spinning,
            )
            store = open_index(Path(self.settings.index), embedder)
        except Exception as error:  # every load failure is reported by /readyz, never raised into uvicorn
            self.error = str(error)
            log.error("loading failed: %s", error)
        else:
            self.embedder, self.store = embedder, store
            log.info(
                "ready in %.1f s: bundle %s, index of %d photographs, providers %s",
                time.perf_counter() - started, embedder.fingerprint, store.ntotal, embedder.providers,
            )
        finally:
            self._loaded.set()

    def start(self) -> None:
        """Start the batchers (on the running event loop) and load in a background thread."""
        for batcher in (self.texts, self.images, self.grades):
            batcher.start()
        threading.Thread(target=self.load, name="load", daemon=True).start()

    async def stop(self) -> None:
        """Stop the batchers and the thread pools."""
        for batcher in (self.texts, self.images, self.grades):
            await batcher.stop()
        for pool in (self._model_pool, self._search_pool, self.decode_pool):
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
                raise NotReady(f"the service could not load its bundle and index: {self.error}")
            raise NotReady("the service is still loading its bundle and index; retry in a moment")
        return self.embedder, self.store

    # --- searches ---------------------------------------------------------------------------------

    async def search(self, vector: np.ndarray, k: int, against: Against, filters: Filters | None) -> list[Hit]:
        """The `k` nearest archived cases of one query vector, in the search pool."""
        _, store = self.parts()
        loop = asyncio.get_running_loop()
        hits = await loop.run_in_executor(self._search_pool, store.search, vector, k, against, filters)
        return hits[0]

    # --- batched model calls (run in the model thread) ----------------------------------------------

    def _run_texts(self, texts: Sequence[str]) -> list[TextQuery]:
        embedder, _ = self.parts()
        embedded = embedder.embed_texts(list(texts), batch_size=len(texts))
        grades = embedder.grade_many([GradeInput(text=text) for text in texts])
        return [
            TextQuery(vector=embedded.vectors[i], truncated=embedded.truncated[i], grades=grades[i])
            for i in range(len(texts))
        ]

    def _run_images(self, images: Sequence[Image.Image]) -> list[ImageQuery]:
        embedder, _ = self.parts()
        vectors = embedder.embed_images(list(images), batch_size=len(images))
        grades = embedder.grade_many([GradeInput(image=image) for image in images])
        return [ImageQuery(vector=vectors[i], grades=grades[i]) for i in range(len(images))]

    def _run_grades(self, inputs: Sequence[GradeInput]) -> list[Grades]:
        embedder, _ = self.parts()
        return embedder.grade_many(list(inputs))
