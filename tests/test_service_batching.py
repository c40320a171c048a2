"""MicroBatcher: concurrent submissions merge into batches; one bad input fails only its own request."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from service.batching import MicroBatcher


def _double(items: Sequence[int]) -> list[int]:
    if any(item < 0 for item in items):
        raise ValueError("negative input")
    return [2 * item for item in items]


async def _submit_all(batcher: MicroBatcher[int, int], items: list[int]) -> list[int | BaseException]:
    batcher.start()
    try:
        return await asyncio.gather(*(batcher.submit(item) for item in items), return_exceptions=True)
    finally:
        await batcher.stop()


def test_concurrent_requests_are_merged_up_to_max_batch() -> None:
    sizes: list[int] = []
    with ThreadPoolExecutor(1) as pool:
        batcher = MicroBatcher("double", _double, pool, max_batch=8, max_wait_s=0.05,
                               on_batch=lambda name, size, seconds: sizes.append(size))
        results = asyncio.run(_submit_all(batcher, list(range(20))))
    assert results == [2 * i for i in range(20)]
    assert sum(sizes) == 20 and max(sizes) == 8 and len(sizes) < 20


def test_one_bad_input_fails_only_its_request() -> None:
    with ThreadPoolExecutor(1) as pool:
        batcher = MicroBatcher("double", _double, pool, max_batch=8, max_wait_s=0.05)
        results = asyncio.run(_submit_all(batcher, [1, -1, 3]))
    assert results[0] == 2 and results[2] == 6
    assert isinstance(results[1], ValueError) and "negative" in str(results[1])


def test_a_model_failure_reaches_every_request_of_the_batch() -> None:
    def broken(items: Sequence[int]) -> list[int]:
        raise RuntimeError("onnxruntime failed")

    with ThreadPoolExecutor(1) as pool:
        batcher = MicroBatcher("broken", broken, pool, max_batch=4, max_wait_s=0.05)
        results = asyncio.run(_submit_all(batcher, [1, 2]))
    assert all(isinstance(r, RuntimeError) for r in results)


def test_batch_size_one_disables_batching_and_bad_sizes_are_refused() -> None:
    sizes: list[int] = []
    with ThreadPoolExecutor(1) as pool:
        batcher = MicroBatcher("double", _double, pool, max_batch=1, on_batch=lambda n, s, t: sizes.append(s))
        assert asyncio.run(_submit_all(batcher, [1, 2, 3])) == [2, 4, 6]
        with pytest.raises(ValueError, match="max_batch"):
            MicroBatcher("x", _double, pool, max_batch=0)
    assert sizes == [1, 1, 1]


def test_submit_before_start_is_an_error() -> None:
    with ThreadPoolExecutor(1) as pool:
        batcher = MicroBatcher("double", _double, pool)
        with pytest.raises(RuntimeError, match="not started"):
            asyncio.run(batcher.submit(1))


@pytest.mark.parametrize("threads", [1, 3])
def test_the_thread_that_searches_runs_faiss_with_the_configured_openmp_threads(threads: int) -> None:
    # OpenMP thread counts are per calling thread: set only where the index loads, the search threads
    # kept one OpenMP thread per core and their searches took 25 ms instead of 1 ms beside the model.
    # Searches now run in the model thread, after the batch's tower pass.
    import faiss

    from service.engine import Engine
    from service.settings import ServiceSettings

    engine = Engine(ServiceSettings(faiss_threads=threads))
    try:
        seen = {engine._model_pool.submit(faiss.omp_get_max_threads).result() for _ in range(8)}
    finally:
        engine._model_pool.shutdown()
    assert seen == {threads}


def test_a_batch_of_mixed_searches_answers_each_as_if_it_ran_alone(paths) -> None:  # noqa: ANN001
    # One batch, one tower pass, one FAISS call per (against, filters) group with the group's largest k:
    # each request must still get exactly its own k, its own filters and its own embeddings.
    from index.metadata import Filters
    from service.engine import Engine, SearchRequest
    from service.settings import ServiceSettings

    bundle, index, _ = paths
    engine = Engine(ServiceSettings(bundle=bundle, index=index, device="cpu", index_check_s=0))
    engine.load()
    try:
        requests = [
            SearchRequest("moderate NPDR in the right eye", 3),
            SearchRequest("no diabetic retinopathy", 7),
            SearchRequest("moderate NPDR in the right eye", 5, "record"),
            SearchRequest("severe NPDR with haemorrhages", 4, "image", Filters(exam_eye="left")),
            SearchRequest("no diabetic retinopathy", 2, "image", Filters(exam_eye="left")),
        ]
        together = engine._run_text_searches(requests)
        alone = [engine._run_text_searches([request])[0] for request in requests]
    finally:
        engine._model_pool.shutdown()
    for request, mixed, single in zip(requests, together, alone, strict=True):
        assert len(mixed.hits) == request.k
        assert [h.id for h in mixed.hits] == [h.id for h in single.hits]
        np.testing.assert_allclose(mixed.query.vector, single.query.vector, atol=1e-5)
        if request.filters is not None:
            assert all(h.row.labels.exam_eye == "left" for h in mixed.hits)
    assert together[0].embed_seconds > 0 and together[0].search_seconds > 0


def test_a_batch_of_photographs_gets_each_its_own_consensus(paths) -> None:  # noqa: ANN001
    # The consensus reuses a batch's unfiltered image search when it went deep enough and searches the rest
    # once: whatever the mix, each photograph gets the consensus it gets alone, and /grade's the same.
    from index.archive.brset import read_archive
    from index.embedder import GradeInput
    from index.metadata import Filters
    from index.preprocess import decode_image
    from service.engine import Engine, GradeRequest, SearchRequest
    from service.settings import ServiceSettings

    bundle, index, archive = paths
    read = read_archive(archive, check_photos=False)
    photos = [decode_image(read.photo_path(record.image_id).read_bytes()) for record in read.records[:4]]
    engine = Engine(ServiceSettings(bundle=bundle, index=index, device="cpu", index_check_s=0))
    engine.load()
    try:
        requests = [
            SearchRequest(photos[0], 3, consensus_k=10),
            SearchRequest(photos[1], 20, consensus_k=5),  # deep enough: reuses its own search
            SearchRequest(photos[2], 4, "record", consensus_k=10),
            SearchRequest(photos[3], 2, "image", Filters(icdr=[4]), consensus_k=7),
            SearchRequest(photos[0], 2, consensus_k=0),
        ]
        together = engine._run_image_searches(requests)
        alone = [engine._run_image_searches([request])[0] for request in requests]
        grades = engine._run_grades([GradeRequest(GradeInput(image=photos[0]), 10), GradeRequest(GradeInput(
            text="no diabetic retinopathy"), 10), GradeRequest(GradeInput(image=photos[3]), 7)])
    finally:
        engine._model_pool.shutdown()
    for request, mixed, single in zip(requests, together, alone, strict=True):
        assert len(mixed.hits) <= request.k and [h.id for h in mixed.hits] == [h.id for h in single.hits]
        if request.consensus_k == 0:
            assert mixed.consensus is None and single.consensus is None
            continue
        assert mixed.consensus is not None and single.consensus is not None
        assert mixed.consensus.counts == single.consensus.counts and mixed.consensus.grade == single.consensus.grade
        assert mixed.consensus.k == request.consensus_k and mixed.consensus.duplicates == 1  # each is archived
        assert sum(mixed.consensus.counts) == mixed.consensus.known
        assert mixed.consensus.agrees == (mixed.consensus.grade == mixed.query.grades.icdr_grade)
    assert grades[1].consensus is None and grades[1].grades.image_embedding is None
    assert grades[0].consensus is not None and together[0].consensus is not None
    assert grades[0].consensus.counts == together[0].consensus.counts
    assert grades[2].consensus is not None and grades[2].consensus.counts == together[3].consensus.counts
