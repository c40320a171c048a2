"""Retrieval and grading metrics against answers worked out by hand or by brute force."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
from sklearn.metrics import average_precision_score

from index.records import ICDR_NAMES
from training.evaluation.metrics import (
    bidirectional_instance_recall,
    category_retrieval,
    compare_table,
    grading_metrics,
    instance_recall,
    referable_metrics,
    summarise,
    top_k,
)


def _normalised(rng: np.random.Generator, rows: int, dim: int) -> np.ndarray:
    values = rng.normal(size=(rows, dim))
    return values / np.linalg.norm(values, axis=1, keepdims=True)


def _one_hot(labels: list[int], classes: int = 5) -> np.ndarray:
    return np.eye(classes)[labels]


# --- instance retrieval -----------------------------------------------------------------------------


def test_identity_embeddings_are_all_found_first() -> None:
    emb = np.eye(6)
    result = instance_recall(emb, emb)
    assert result["R@1"] == 1.0 and result["R@5"] == 1.0
    assert result["median_rank"] == 1.0
    assert result["queries"] == 6 and result["gallery_size"] == 6


def test_reversed_pairing_is_never_first() -> None:
    queries = np.eye(6)
    result = instance_recall(queries, queries[::-1])
    assert result["R@1"] == 0.0
    # The paired item scores 0 with 4 other zero scores below the one item scoring 1: places 2..6 alike.
    assert result["R@5"] == pytest.approx(4 / 5)
    assert result["mean_rank"] == pytest.approx(4.0)


def test_hand_made_ranks() -> None:
    # With identity queries, similarity[i, j] = gallery[j, i]: the paired scores rank 1, 2, 3 and 4.
    sims = np.array(
        [
            [0.9, 0.1, 0.2, 0.3],
            [0.8, 0.5, 0.1, 0.2],
            [0.7, 0.6, 0.4, 0.1],
            [0.9, 0.8, 0.7, 0.1],
        ]
    )
    result = instance_recall(np.eye(4), sims.T, ks=(1, 2, 3, 4))
    assert [result[f"R@{k}"] for k in (1, 2, 3, 4)] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert result["mean_rank"] == pytest.approx(2.5)


def test_identical_gallery_rows_tie_and_meet_the_ceiling() -> None:
    e0, e1 = np.eye(2)
    queries = np.stack([e0, e0, e1])
    gallery = np.stack([e0, e0, e1])
    keys = ["a", "a", "b"]
    result = instance_recall(queries, gallery, keys, keys, ks=(1, 2))
    # Queries 0 and 1 tie between gallery rows 0 and 1: each is first in half the orders.
    assert result["R@1"] == pytest.approx(2 / 3)
    assert result["R@2"] == 1.0
    assert result["ceiling@1"] == pytest.approx(2 / 3)
    assert result["ceiling@2"] == 1.0
    assert result["unique_fit"] == pytest.approx(1 / 3)
    assert result["fit_R@1"] == 1.0
    assert result["mean_fitting"] == pytest.approx(5 / 3)
    assert result["paired_unfit"] == 0


def test_fitting_item_tied_with_unfitting_items() -> None:
    e0, e1 = np.eye(2)
    gallery = np.stack([e0, e0, e0, e1])
    result = instance_recall(e0[None, :], gallery, ["a"], ["a", "b", "b", "c"], ks=(1, 2, 3))
    # One fitting and two unfitting items tie at the top: P(fit first) = 1/3, within two = 1 - 2/3 * 1/2.
    assert result["fit_R@1"] == pytest.approx(1 / 3)
    assert result["fit_R@2"] == pytest.approx(2 / 3)
    assert result["fit_R@3"] == 1.0
    assert result["R@1"] == pytest.approx(1 / 3)
    assert result["ceiling@1"] == 1.0 and result["unique_fit"] == 1.0


def _brute_force(sims: np.ndarray, q_keys: list[str], g_keys: list[str], k: int) -> tuple[float, float]:
    """Exact-pair and fit recall@k averaged over every tie-breaking order of the gallery."""
    n_queries, n_gallery = sims.shape
    exact = fit = 0.0
    perms = list(itertools.permutations(range(n_gallery)))
    for i in range(n_queries):
        for perm in perms:
            order = sorted(range(n_gallery), key=lambda j, p=perm, i=i: (-sims[i, j], p[j]))[:k]
            exact += i in order
            fit += any(g_keys[j] == q_keys[i] for j in order)
    return exact / (n_queries * len(perms)), fit / (n_queries * len(perms))


def test_ties_match_brute_force_over_all_orders() -> None:
    rng = np.random.default_rng(3)
    # Small integer features give many exact ties.
    queries = rng.integers(0, 2, size=(4, 3)).astype(float)
    gallery = np.vstack([queries, rng.integers(0, 2, size=(1, 3))]).astype(float)
    gallery[1] = gallery[2]
    q_keys = ["a", "b", "b", "c"]
    g_keys = ["a", "b", "b", "c", "a"]
    sims = queries @ gallery.T
    result = instance_recall(queries, gallery, q_keys, g_keys, ks=(1, 2, 3))
    for k in (1, 2, 3):
        exact, fit = _brute_force(sims, q_keys, g_keys, k)
        assert result[f"R@{k}"] == pytest.approx(exact)
        assert result[f"fit_R@{k}"] == pytest.approx(fit)


def test_chunked_equals_unchunked_with_distractors() -> None:
    rng = np.random.default_rng(0)
    queries = _normalised(rng, 50, 16)
    gallery = np.vstack([queries + 0.3 * rng.normal(size=queries.shape), _normalised(rng, 10, 16)])
    gallery /= np.linalg.norm(gallery, axis=1, keepdims=True)
    q_keys = [int(v) for v in rng.integers(0, 5, size=50)]
    g_keys = q_keys + [int(v) for v in rng.integers(0, 5, size=10)]
    small = instance_recall(queries, gallery, q_keys, g_keys, chunk_size=7)
    whole = instance_recall(queries, gallery, q_keys, g_keys, chunk_size=10_000)
    assert small.keys() == whole.keys()
    for key in small:
        assert small[key] == pytest.approx(whole[key])
    assert 0.0 < whole["R@1"] < 1.0
    assert whole["gallery_size"] == 60
    json.dumps(whole, allow_nan=False)


def test_instance_recall_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="pairs with row"):
        instance_recall(np.eye(3), np.eye(3)[:2])
    with pytest.raises(ValueError, match="both"):
        instance_recall(np.eye(3), np.eye(3), ["a", "b", "c"], None)
    with pytest.raises(ValueError, match="width"):
        instance_recall(np.eye(3), np.eye(4))


def test_bidirectional_swaps_roles() -> None:
    rng = np.random.default_rng(1)
    a = _normalised(rng, 20, 8)
    b = _normalised(rng, 20, 8)
    keys_a = [i % 3 for i in range(20)]
    result = bidirectional_instance_recall(a, b, keys_a, keys_a, names=("text", "image"))
    assert result["a_to_b"] == instance_recall(a, b, keys_a, keys_a)
    assert result["b_to_a"] == instance_recall(b, a, keys_a, keys_a)
    assert result["names"] == ["text", "image"]


def test_top_k_matches_a_full_sort() -> None:
    rng = np.random.default_rng(2)
    queries, gallery = _normalised(rng, 9, 8), _normalised(rng, 30, 8)
    indices, scores = top_k(queries, gallery, 5, chunk_size=4)
    expected = np.argsort(-(queries @ gallery.T), axis=1)[:, :5]
    np.testing.assert_array_equal(indices, expected)
    assert np.all(np.diff(scores, axis=1) <= 0)


# --- category retrieval -----------------------------------------------------------------------------


def test_category_retrieval_hand_case() -> None:
    # Identity-like queries make similarity[i, j] = gallery[j, i].
    sims = np.array([[0.9, 0.8, 0.3, 0.1], [0.2, 0.4, 0.95, 0.3]])
    queries = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]])
    labels = [0, 1, 2, -1]  # label 2 is in no gallery item; -1 is a missing grade
    result = category_retrieval(
        queries, sims.T, labels, [0, 1, 0, 1], ks=(1, 2, 3), names=("zero", "one", "two"), per_class_k=2
    )
    # Query 0 ranks rel, -, rel, -: P@1 1, P@2 1/2, P@3 2/3, AP (1 + 2/3) / 2.
    # Query 1 ranks -, rel, rel, -: P@1 0, P@2 1/2, P@3 2/3, AP (1/2 + 2/3) / 2.
    assert result["P@1"] == pytest.approx(0.5)
    assert result["P@2"] == pytest.approx(0.5)
    assert result["P@3"] == pytest.approx(2 / 3)
    assert result["mAP"] == pytest.approx((5 / 6 + 7 / 12) / 2)
    assert result["queries"] == 2
    assert result["excluded_queries"] == 1
    assert result["missing_label_queries"] == 1
    assert result["per_class_P@2"] == {"zero": pytest.approx(0.5), "one": pytest.approx(0.5)}
    assert result["per_class_mAP"] == {"zero": pytest.approx(5 / 6), "one": pytest.approx(7 / 12)}
    assert result["macro_P@2"] == pytest.approx(0.5)
    assert result["per_class_queries"] == {"zero": 1, "one": 1}
    json.dumps(result, allow_nan=False)


def test_category_per_class_shows_the_minority() -> None:
    # Everything embeds to the same point: a grade-0 query always finds grade 0, a grade-4 query rarely.
    gallery = np.ones((20, 2)) / np.sqrt(2)
    gallery_labels = [0] * 18 + [4] * 2
    result = category_retrieval(gallery[:5], gallery, [0, 0, 0, 0, 4], gallery_labels, ks=(10,))
    assert result["per_class_P@10"]["0"] == pytest.approx(0.9)
    assert result["per_class_P@10"]["4"] == pytest.approx(0.1)
    assert result["macro_P@10"] == pytest.approx(0.5)
    assert result["P@10"] == pytest.approx((4 * 0.9 + 0.1) / 5)


def test_map_matches_sklearn_and_precision_matches_brute_force() -> None:
    rng = np.random.default_rng(4)
    queries = np.eye(6)
    gallery = rng.integers(0, 3, size=(6, 6)).astype(float)  # columns of similarity, many ties
    gallery_labels = [int(v) for v in rng.integers(0, 3, size=6)]
    query_labels = [int(v) for v in rng.integers(0, 3, size=6)]
    result = category_retrieval(queries, gallery, query_labels, gallery_labels, ks=(1, 2, 4), chunk_size=4)
    sims = queries @ gallery.T
    relevant = np.array(gallery_labels)[None, :] == np.array(query_labels)[:, None]
    kept = [i for i in range(6) if relevant[i].any()]
    assert result["mAP"] == pytest.approx(
        np.mean([average_precision_score(relevant[i], sims[i]) for i in kept])
    )
    perms = list(itertools.permutations(range(6)))
    for k in (1, 2, 4):
        total = 0.0
        for i in kept:
            for perm in perms:
                order = sorted(range(6), key=lambda j, p=perm, i=i: (-sims[i, j], p[j]))[:k]
                total += relevant[i, order].sum() / k
        assert result[f"P@{k}"] == pytest.approx(total / (len(kept) * len(perms)))


# --- grading ----------------------------------------------------------------------------------------


def test_perfect_grading() -> None:
    truth = [0, 1, 2, 3, 4, 0, 2]
    result = grading_metrics(truth, _one_hot(truth), ICDR_NAMES)
    assert result["accuracy"] == 1.0
    assert result["quadratic_kappa"] == pytest.approx(1.0)
    assert result["macro_f1"] == 1.0
    assert all(value == 1.0 for value in result["per_class_recall"].values())
    assert result["support"][ICDR_NAMES[0]] == 2
    assert result["confusion_matrix"] == np.diag([2, 1, 2, 1, 1]).tolist()


def test_constructed_confusion_matrix() -> None:
    truth = [0, 0, 0, 1, 1, 2, -1, -1]
    predicted = [0, 0, 1, 1, 2, 2, 4, 0]
    result = grading_metrics(truth, _one_hot(predicted), ICDR_NAMES)
    assert result["ignored"] == 2
    assert result["n"] == 6
    assert result["confusion_matrix"][:3] == [[2, 1, 0, 0, 0], [0, 1, 1, 0, 0], [0, 0, 1, 0, 0]]
    assert result["accuracy"] == pytest.approx(4 / 6)
    # F1 by hand: class 0 P=1 R=2/3 -> 0.8; class 1 P=1/2 R=1/2 -> 0.5; class 2 P=1/2 R=1 -> 2/3.
    # Grades 3 and 4 occur in neither truth nor prediction and do not enter the average.
    assert result["macro_f1"] == pytest.approx((0.8 + 0.5 + 2 / 3) / 3)
    assert result["per_class_recall"][ICDR_NAMES[0]] == pytest.approx(2 / 3)
    assert result["per_class_recall"][ICDR_NAMES[3]] is None
    # Quadratic kappa by its definition, over the fixed labels 0..4.
    observed = np.array(result["confusion_matrix"], dtype=float)
    expected = np.outer(observed.sum(axis=1), observed.sum(axis=0)) / observed.sum()
    weights = np.subtract.outer(np.arange(5), np.arange(5)) ** 2
    kappa = 1 - (weights * observed).sum() / (weights * expected).sum()
    assert result["quadratic_kappa"] == pytest.approx(kappa)
    json.dumps(result, allow_nan=False)


def test_grading_degenerate_inputs() -> None:
    single = grading_metrics([0, 0, 0], _one_hot([0, 0, 0]), ICDR_NAMES)
    assert single["accuracy"] == 1.0
    assert single["quadratic_kappa"] is None
    empty = grading_metrics([-1, -1], _one_hot([0, 1]), ICDR_NAMES)
    assert empty["n"] == 0 and empty["ignored"] == 2 and empty["accuracy"] is None
    with pytest.raises(ValueError, match="columns"):
        grading_metrics([0, 1], np.ones((2, 3)), ICDR_NAMES)


def _referable_probs(scores: list[float]) -> np.ndarray:
    """Probabilities whose referable score is `s`: 1 - s on grade 0, s on grade 2."""
    probs = np.zeros((len(scores), 5))
    probs[:, 0] = 1 - np.array(scores)
    probs[:, 2] = scores
    return probs


def test_referable_hand_case() -> None:
    truth = [2, 3, 4, 2, 0, 1, 0, 1, -1]
    scores = [0.9, 0.8, 0.7, 0.2, 0.6, 0.55, 0.1, 0.05, 0.99]
    result = referable_metrics(truth, _referable_probs(scores))
    assert result["ignored"] == 1
    assert result["positives"] == 4 and result["negatives"] == 4
    # Positives beat negatives in 4 + 4 + 4 + 2 of 16 pairs.
    assert result["auroc"] == pytest.approx(14 / 16)
    # Argmax flags scores above 0.5: 3 of 4 positives, 2 of 4 negatives.
    assert (result["tp"], result["fn"], result["tn"], result["fp"]) == (3, 1, 2, 2)
    assert result["sensitivity"] == pytest.approx(0.75)
    assert result["specificity"] == pytest.approx(0.5)
    point = result["operating_point"]
    assert point["threshold"] == pytest.approx(0.2)
    assert point["sensitivity"] == 1.0 and point["specificity"] == pytest.approx(0.5)
    at_075 = referable_metrics(truth, _referable_probs(scores), target_sensitivity=0.75)["operating_point"]
    assert at_075["threshold"] == pytest.approx(0.7) and at_075["specificity"] == 1.0
    fixed = referable_metrics(truth, _referable_probs(scores), threshold=0.58)
    assert fixed["sensitivity"] == pytest.approx(0.75) and fixed["specificity"] == pytest.approx(0.75)
    json.dumps(result, allow_nan=False)


def test_referable_perfect_constant_and_one_class() -> None:
    truth = [0, 1, 2, 3, 4, 0]
    perfect = referable_metrics(truth, _one_hot(truth))
    assert perfect["auroc"] == 1.0 and perfect["sensitivity"] == 1.0 and perfect["specificity"] == 1.0
    constant = referable_metrics(truth, np.full((6, 5), 0.2))
    assert constant["auroc"] == pytest.approx(0.5)
    assert constant["sensitivity"] == 0.0 and constant["specificity"] == 1.0
    negatives_only = referable_metrics([0, 1, 0], _one_hot([0, 1, 2]))
    assert negatives_only["auroc"] is None and negatives_only["sensitivity"] is None
    assert negatives_only["specificity"] == pytest.approx(2 / 3)
    assert negatives_only["operating_point"]["threshold"] is None


# --- summary and comparison -------------------------------------------------------------------------


def _combined(seed: int) -> dict:
    rng = np.random.default_rng(seed)
    text, image = _normalised(rng, 30, 8), _normalised(rng, 30, 8)
    keys = [i % 10 for i in range(30)]
    labels = [i % 5 for i in range(30)]
    truth = [i % 5 for i in range(30)]
    probs = rng.dirichlet(np.ones(5), size=30)
    return {
        "instance": {
            "text-image": bidirectional_instance_recall(text, image, keys, keys, names=("text", "image"))
        },
        "category": {"text-image": category_retrieval(text, image, labels, labels, names=ICDR_NAMES)},
        "icdr": grading_metrics(truth, probs, ICDR_NAMES),
        "referable": referable_metrics(truth, probs),
    }


def test_summarise_order_and_compare_table() -> None:
    metrics_a, metrics_b = _combined(0), _combined(1)
    json.dumps(metrics_a, allow_nan=False)
    rows = summarise(metrics_a)
    names = [name for name, _ in rows]
    assert names[:3] == [
        "instance text-image text->image R@1",
        "instance text-image text->image R@5",
        "instance text-image text->image R@10",
    ]
    assert "instance text-image image->text ceiling@1" in names
    assert (
        names.index("category text-image mAP") < names.index("ICDR accuracy") < names.index("referable AUROC")
    )
    assert "SDRG accuracy" not in names
    table = compare_table(metrics_a, metrics_b, "paper", "clip")
    lines = table.strip().splitlines()
    assert lines[0] == "| metric | paper | clip | clip - paper |"
    assert len(lines) == 2 + len(rows)
    value_a = dict(rows)["ICDR accuracy"]
    value_b = dict(summarise(metrics_b))["ICDR accuracy"]
    accuracy_line = next(line for line in lines if line.startswith("| ICDR accuracy |"))
    assert f"{value_a:.4f}" in accuracy_line and f"{value_b - value_a:+.4f}" in accuracy_line


def test_self_retrieval_excludes_the_query_and_reports_grade_hits_and_spread() -> None:
    from training.evaluation.metrics import self_retrieval

    # Two tight clusters (grades 0 and 2) and one grade-3 row near grade 2; each row's own vector is
    # the closest one to it, so a metric that forgot to exclude the query would score every P@1 as 1.
    centre0, centre2 = np.array([1.0, 0.0, 0.0]), np.array([0.0, 1.0, 0.0])
    rows = [centre0 + [0, 0, 0.01 * i] for i in range(3)] + [centre2 + [0, 0, 0.01 * i] for i in range(3)]
    rows.append(np.array([0.0, 0.9, 0.44]))
    embeddings = np.array(rows) / np.linalg.norm(rows, axis=1, keepdims=True)
    labels = [0, 0, 0, 2, 2, 2, 3]
    result = self_retrieval(embeddings, labels, ks=(1, 2), per_class_k=2)
    assert result["gallery_size"] == 6 and result["queries"] == 7
    assert result["per_class_P@2"] == {"0": 1.0, "2": 1.0, "3": 0.0}
    assert result["P@1"] == pytest.approx(6 / 7)
    assert result["macro_P@2"] == pytest.approx(2 / 3)
    # referable queries (grades 2 and 3): their 2 nearest are all referable
    assert result["positive_queries"] == 4 and result["positive_P@2"] == 1.0
    similarity = result["similarity"]
    assert similarity["first"] >= similarity["at_2"] and similarity["gap"] == pytest.approx(
        similarity["first"] - similarity["at_2"])
    with pytest.raises(ValueError, match="at least two rows"):
        self_retrieval(embeddings[:1], labels[:1])


def test_self_retrieval_skips_queries_without_a_grade() -> None:
    from training.evaluation.metrics import self_retrieval

    embeddings = np.eye(4)
    result = self_retrieval(embeddings, [0, -1, 0, 1], ks=(1,), per_class_k=1)
    assert result["queries"] == 3 and result["per_class_queries"] == {"0": 2, "1": 1}


# --- what look-alikes of one grade share -------------------------------------------------------------


def _graded_with_eye(rng: np.random.Generator, per_grade: int, eye_weight: float) -> tuple[np.ndarray, list, list]:
    """Two grades far apart; inside each, an `eye_weight` offset by the eye plus noise."""
    grades = [g for g in (0, 3) for _ in range(per_grade)]
    eyes = ["left" if i % 2 else "right" for i in range(len(grades))]
    rows = np.zeros((len(grades), 8))
    rows[:, 0] = [10.0 if g == 0 else 0.0 for g in grades]
    rows[:, 1] = [10.0 if g == 3 else 0.0 for g in grades]
    rows[:, 2] = [eye_weight if e == "left" else -eye_weight for e in eyes]
    rows[:, 3:] = rng.normal(size=(len(grades), 5))
    return rows / np.linalg.norm(rows, axis=1, keepdims=True), grades, eyes


def test_within_grade_agreement_finds_what_the_nearest_of_one_grade_share() -> None:
    from training.evaluation.metrics import within_grade_agreement

    rng = np.random.default_rng(0)
    rows, grades, eyes = _graded_with_eye(rng, 40, eye_weight=3.0)
    result = within_grade_agreement(rows, grades, {"eye": eyes}, k=5)
    assert result["eye"]["agree"] == pytest.approx(1.0)
    assert result["eye"]["chance"] == pytest.approx(19 / 39)  # 19 of a query's 39 grade mates share its eye
    assert result["eye"]["queries"] == 80
    blind, _, _ = _graded_with_eye(rng, 40, eye_weight=0.0)
    result = within_grade_agreement(blind, grades, {"eye": eyes}, k=5)
    assert abs(result["eye"]["agree"] - result["eye"]["chance"]) < 0.15


def test_within_grade_agreement_leaves_out_unknown_values_and_grades() -> None:
    from training.evaluation.metrics import summarise, within_grade_agreement

    rows = np.eye(6)
    result = within_grade_agreement(rows, [0, 0, 0, 1, -1, 2], {"camera": ["a", "a", None, "b", "b", "c"]}, k=3)
    assert result["camera"] == {"agree": 1.0, "chance": 1.0, "queries": 2}  # grade 1 and 2 have one row each
    assert ("image->image same-grade 3 nearest: same camera", 1.0) in summarise({"lookalike": result})
    with pytest.raises(ValueError, match="one value per row"):
        within_grade_agreement(rows, [0] * 6, {"eye": ["left"]})


# --- the neighbours' consensus ------------------------------------------------------------------------


def _two_clusters() -> np.ndarray:
    """Rows 0-3 near one axis, rows 4-7 near another: each row's 3 nearest are its cluster mates."""
    rows = [np.array([1.0, 0.0, 0.02 * i]) for i in range(4)] + [np.array([0.0, 1.0, 0.02 * i]) for i in range(4)]
    return np.array(rows) / np.linalg.norm(rows, axis=1, keepdims=True)


def test_consensus_hand_case() -> None:
    from sklearn.metrics import cohen_kappa_score

    from training.evaluation.metrics import consensus_metrics

    truth = [0, 0, 0, 2, 3, 3, 3, 3]
    # kNN@3 majority: cluster A votes 0 (row 3's mates are all 0; rows 0-2 see two 0s and one 2), B votes 3
    knn = [0, 0, 0, 0, 3, 3, 3, 3]
    model = [0, 1, 0, 2, 3, 3, 4, 3]  # wrong on rows 1 and 6; disagrees with the kNN on rows 1, 3 and 6
    result = consensus_metrics(_two_clusters(), truth, model, k=3)
    assert result["k"] == 3 and result["queries"] == 8 and result["gallery_size"] == 7
    assert result["no_vote_queries"] == 0 and result["mean_known"] == 3.0
    icdr = result["icdr"]
    assert icdr["knn_accuracy"] == pytest.approx(7 / 8)
    expected = cohen_kappa_score(truth, knn, labels=list(range(5)), weights="quadratic")  # on the 0-4 scale
    assert icdr["knn_quadratic_kappa"] == pytest.approx(expected)
    assert icdr["model_accuracy"] == pytest.approx(6 / 8) and icdr["agreement"] == pytest.approx(5 / 8)
    assert (icdr["disagreements"], icdr["model_errors"], icdr["flagged_errors"]) == (3, 2, 2)
    assert icdr["model_error_when_agree"] == 0.0 and icdr["model_error_when_disagree"] == pytest.approx(2 / 3)
    assert icdr["flag_recall"] == 1.0 and icdr["flag_precision"] == pytest.approx(2 / 3)
    assert icdr["knn_right_when_disagree"] == pytest.approx(2 / 3)  # rows 1 and 6, not row 3
    referable = result["referable"]  # truth 00011111, kNN 00001111, model 00011111
    assert referable["knn_accuracy"] == pytest.approx(7 / 8) and referable["agreement"] == pytest.approx(7 / 8)
    assert referable["model_errors"] == 0 and referable["flag_recall"] is None
    assert referable["disagreements"] == 1 and referable["flag_precision"] == 0.0
    assert referable["knn_quadratic_kappa"] == pytest.approx(cohen_kappa_score([0, 0, 0, 1, 1, 1, 1, 1],
                                                                               [0, 0, 0, 0, 1, 1, 1, 1]))
    json.dumps(result, allow_nan=False)


def test_consensus_excludes_the_query_and_skips_unknown_grades() -> None:
    from training.evaluation.metrics import consensus_metrics

    # Identical rows: a metric that kept the query would let it vote for itself.
    result = consensus_metrics(np.tile([[1.0, 0.0]], (2, 1)), [2, 0], [2, 0], k=1)
    assert result["icdr"]["knn_accuracy"] == 0.0 and result["icdr"]["agreement"] == 0.0  # each sees the other only
    # Row 0's two nearest have no grade: no vote; rows 1 and 2 have none and are not queries.
    unknown = consensus_metrics(np.eye(3), [1, -1, -1], [1, 0, 0], k=2)
    assert unknown["queries"] == 0 and unknown["no_vote_queries"] == 1 and unknown["missing_label_queries"] == 2
    assert unknown["icdr"]["n"] == 0 and unknown["icdr"]["knn_quadratic_kappa"] is None
    assert unknown["mean_known"] is None
    with pytest.raises(ValueError, match="one label"):
        consensus_metrics(np.eye(3), [0, 0], [0, 0, 0])
    with pytest.raises(ValueError, match="predicted grade"):
        consensus_metrics(np.eye(3), [0, 0, 0], [0, 0, 5])


def test_consensus_matches_the_service_rule_query_by_query() -> None:
    from index.consensus import neighbour_consensus
    from training.evaluation.metrics import consensus_metrics

    rng = np.random.default_rng(11)
    embeddings = _normalised(rng, 120, 8)
    truth = rng.integers(-1, 5, size=120)
    model = rng.integers(0, 5, size=120)
    result = consensus_metrics(embeddings, truth, model, k=7, chunk_size=16)
    sims = embeddings @ embeddings.T
    knn, kept_truth, kept_model = [], [], []
    for row in np.flatnonzero(truth >= 0):
        order = [j for j in np.argsort(-sims[row]) if j != row][:7]
        single = neighbour_consensus([None if truth[j] < 0 else int(truth[j]) for j in order],
                                     [float(sims[row, j]) for j in order], int(model[row]), duplicate_similarity=None)
        if single.grade is not None:
            knn.append(single.grade)
            kept_truth.append(truth[row])
            kept_model.append(model[row])
    assert result["queries"] == len(knn)
    assert result["icdr"]["knn_accuracy"] == pytest.approx(np.mean(np.array(knn) == np.array(kept_truth)))
    assert result["icdr"]["agreement"] == pytest.approx(np.mean(np.array(knn) == np.array(kept_model)))


def test_summarise_lists_the_consensus() -> None:
    from training.evaluation.metrics import consensus_metrics

    metrics = {"consensus": consensus_metrics(_two_clusters(), [0, 0, 0, 2, 3, 3, 3, 3], [0, 1, 0, 2, 3, 3, 4, 3], k=3)}
    rows = dict(summarise(metrics))
    assert rows["consensus kNN@3 ICDR agreement with the model"] == pytest.approx(5 / 8)
    assert rows["consensus kNN@3 ICDR disagreement flags model errors (recall)"] == 1.0
    assert rows["consensus kNN@3 referable disagreements that are model errors (precision)"] == 0.0


def test_consensus_without_the_query_patient() -> None:
    from training.evaluation.metrics import consensus_metrics

    # Rows 0 and 1 are one patient's two eyes (grade 3), each the other's nearest; rows 2-4 are others (grade 0).
    rows = np.array([[1.0, 0.0, 0.0], [1.0, 0.01, 0.0], [0.9, 0.0, 0.3], [0.9, 0.0, 0.35], [0.9, 0.0, 0.4]])
    embeddings = rows / np.linalg.norm(rows, axis=1, keepdims=True)
    truth, model = [3, 3, 0, 0, 0], [3, 3, 0, 0, 0]
    result = consensus_metrics(embeddings, truth, model, k=1, groups=["a", "a", "b", "c", "d"])
    assert result["icdr"]["knn_accuracy"] == 1.0  # each eye finds the other
    assert result["same_group_share"] == pytest.approx(2 / 5)
    other = result["other_groups"]
    assert other["queries"] == 5 and other["icdr"]["knn_accuracy"] == pytest.approx(3 / 5)
    assert other["icdr"]["agreement"] == pytest.approx(3 / 5) and other["icdr"]["flag_precision"] == 0.0
    # a patient whose photographs are all alike is left with fewer neighbours, never with itself
    alone = consensus_metrics(np.eye(2), [1, 2], [1, 2], k=1, groups=["a", "a"])
    assert alone["other_groups"]["no_vote_queries"] == 2 and alone["other_groups"]["queries"] == 0
