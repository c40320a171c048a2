"""Retrieval and grading metrics over numpy arrays (DESIGN.md, "Evaluation (honest, and both protocols)").

Every function returns plain floats, ints, lists and dicts (None where a number is undefined), so a
result serialises with `json.dumps` as it is. Shares are fractions in [0, 1], not percentages.

Ties. Embeddings are compared by dot product (rows are expected to be L2-normalised). Two scores within
`tie_tol` (default 1e-6, above float32 rounding noise) are a tie, and ties are broken uniformly at
random *in expectation*: a metric reports its expected value over all orders of the tied items. So a
query whose paired item ties with one other item scores 0.5 at R@1, and a model that gives
indistinguishable records identical embeddings scores exactly the ceiling below. mAP follows
scikit-learn's `average_precision_score` instead: a run of tied scores is one threshold.

The combined dict that `summarise`, `compare_table` and `report.write_report` read:

    {
      "instance":  {setting: bidirectional_instance_recall(...)},  # e.g. "text-image", "text-record"
      "category":  {setting: category_retrieval(...)},
      "consensus": consensus_metrics(...),   # the k nearest photographs' grade vs the model's (image->image)
      "lookalike": within_grade_agreement(...),  # what the nearest of one grade share (the eye, the camera)
      "icdr":      grading_metrics(...),
      "sdrg":      grading_metrics(...),
      "referable": referable_metrics(...),
    }

Every section is optional.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Hashable, Sequence
from typing import Any

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    cohen_kappa_score,
    confusion_matrix,
    f1_score,
    recall_score,
    roc_auc_score,
    roc_curve,
)

from index.consensus import ICDR_GRADES, vote
from index.records import REFERABLE_ICDR

DEFAULT_KS: tuple[int, ...] = (1, 5, 10)
DEFAULT_TIE_TOL = 1e-6
DEFAULT_CHUNK = 1024
TARGET_SENSITIVITY = 0.90


def _as_matrix(name: str, values: Any) -> np.ndarray:
    array = np.asarray(values, dtype=np.float32)
    if array.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array (rows x dimensions), got shape {array.shape}")
    return array


def _check_pair(query_emb: Any, gallery_emb: Any) -> tuple[np.ndarray, np.ndarray]:
    queries = _as_matrix("query_emb", query_emb)
    gallery = _as_matrix("gallery_emb", gallery_emb)
    if queries.shape[1] != gallery.shape[1]:
        raise ValueError(f"query width {queries.shape[1]} differs from gallery width {gallery.shape[1]}")
    if gallery.shape[0] == 0:
        raise ValueError("the gallery is empty")
    return queries, gallery


def _check_ks(ks: Sequence[int]) -> list[int]:
    ordered = sorted(set(int(k) for k in ks))
    if not ordered or ordered[0] < 1:
        raise ValueError(f"ks must be positive integers, got {list(ks)}")
    return ordered


def _factorise(
    query_keys: Sequence[Hashable], gallery_keys: Sequence[Hashable]
) -> tuple[np.ndarray, np.ndarray]:
    codes: dict[Hashable, int] = {}
    query_codes = np.array([codes.setdefault(key, len(codes)) for key in query_keys], dtype=np.int64)
    gallery_codes = np.array([codes.setdefault(key, len(codes)) for key in gallery_keys], dtype=np.int64)
    return query_codes, gallery_codes


def top_k(
    query_emb: Any, gallery_emb: Any, k: int, chunk_size: int = DEFAULT_CHUNK
) -> tuple[np.ndarray, np.ndarray]:
    """Indices and scores of the k highest-scoring gallery rows per query, best first (for examples)."""
    queries, gallery = _check_pair(query_emb, gallery_emb)
    k = min(k, gallery.shape[0])
    indices = np.empty((queries.shape[0], k), dtype=np.int64)
    scores = np.empty((queries.shape[0], k), dtype=np.float32)
    for start in range(0, queries.shape[0], chunk_size):
        sims = queries[start : start + chunk_size] @ gallery.T
        part = np.argpartition(-sims, k - 1, axis=1)[:, :k]
        part_scores = np.take_along_axis(sims, part, axis=1)
        order = np.argsort(-part_scores, axis=1, kind="stable")
        indices[start : start + len(sims)] = np.take_along_axis(part, order, axis=1)
        scores[start : start + len(sims)] = np.take_along_axis(part_scores, order, axis=1)
    return indices, scores


def instance_recall(
    query_emb: Any,
    gallery_emb: Any,
    query_keys: Sequence[Hashable] | None = None,
    gallery_keys: Sequence[Hashable] | None = None,
    ks: Sequence[int] = DEFAULT_KS,
    chunk_size: int = DEFAULT_CHUNK,
    tie_tol: float = DEFAULT_TIE_TOL,
) -> dict[str, Any]:
    """Instance retrieval: query i's own item is gallery row i (rows past the queries are distractors).

    `R@k` is the exact-pair recall: the share of queries whose paired item is within the top k, its rank
    being (gallery scores above the paired score) + a uniformly random place among the items tied with
    it (expected value reported). `mean_rank` / `median_rank` are 1-based expected ranks.

    With keys (hashable descriptors, e.g. the facts a narrative states and the facts of a record), a
    gallery item *fits* a query when their keys are equal, and the result also has:
    `fit_R@k` (lenient: some fitting item in the top k, ties as above), `ceiling@k` (the expected R@k of a
    perfect model that ranks the fitting items first in random order: per query min(1, k / n_fit), 0
    when the paired item does not fit its own query), `unique_fit` (share of queries that exactly one
    gallery item fits, the paired one: the queries a perfect model is sure to get right at R@1),
    `mean_fitting` (mean n_fit) and `paired_unfit` (queries whose paired item does not fit: inconsistent
    keys). The similarity matrix is computed `chunk_size` queries at a time.
    """
    queries, gallery = _check_pair(query_emb, gallery_emb)
    n_queries, n_gallery = queries.shape[0], gallery.shape[0]
    if n_queries == 0:
        raise ValueError("no queries")
    if n_queries > n_gallery:
        raise ValueError(f"{n_queries} queries but only {n_gallery} gallery rows: query i pairs with row i")
    ordered_ks = _check_ks(ks)
    with_keys = query_keys is not None or gallery_keys is not None
    if with_keys:
        if query_keys is None or gallery_keys is None:
            raise ValueError("give both query_keys and gallery_keys, or neither")
        if len(query_keys) != n_queries or len(gallery_keys) != n_gallery:
            raise ValueError(
                f"{len(query_keys)} query keys / {len(gallery_keys)} gallery keys for "
                f"{n_queries} queries / {n_gallery} gallery rows"
            )
        query_codes, gallery_codes = _factorise(query_keys, gallery_keys)
        code_counts = np.bincount(
            gallery_codes, minlength=int(max(query_codes.max(), gallery_codes.max())) + 1
        )
        n_fit = code_counts[query_codes]
        paired_fits = query_codes == gallery_codes[:n_queries]

    hits = {k: np.zeros(n_queries) for k in ordered_ks}
    fit_hits = {k: np.zeros(n_queries) for k in ordered_ks}
    expected_rank = np.zeros(n_queries)
    for start in range(0, n_queries, chunk_size):
        stop = min(start + chunk_size, n_queries)
        sims = queries[start:stop] @ gallery.T
        rows = np.arange(stop - start)
        paired = sims[rows, np.arange(start, stop)][:, None]
        above = (sims > paired + tie_tol).sum(axis=1)
        tied_others = (np.abs(sims - paired) <= tie_tol).sum(axis=1) - 1
        expected_rank[start:stop] = above + 1 + tied_others / 2
        for k in ordered_ks:
            hits[k][start:stop] = np.clip((k - above) / (tied_others + 1), 0.0, 1.0)
        if with_keys:
            fits = gallery_codes[None, :] == query_codes[start:stop, None]
            best_fit = np.where(fits, sims, -np.inf).max(axis=1)[:, None]
            fit_above = (sims > best_fit + tie_tol).sum(axis=1)
            group = np.abs(sims - best_fit) <= tie_tol
            group_size = group.sum(axis=1)
            group_unfit = (group & ~fits).sum(axis=1)
            has_fit = fits.any(axis=1)
            for k in ordered_ks:
                chance = _some_fit_in_top(k - fit_above, group_size, group_unfit)
                fit_hits[k][start:stop] = np.where(has_fit, chance, 0.0)

    result: dict[str, Any] = {"queries": int(n_queries), "gallery_size": int(n_gallery)}
    for k in ordered_ks:
        result[f"R@{k}"] = float(hits[k].mean())
    result["mean_rank"] = float(expected_rank.mean())
    result["median_rank"] = float(np.median(expected_rank))
    if with_keys:
        for k in ordered_ks:
            result[f"fit_R@{k}"] = float(fit_hits[k].mean())
        for k in ordered_ks:
            ceiling = np.where(paired_fits, np.minimum(1.0, k / np.maximum(n_fit, 1)), 0.0)
            result[f"ceiling@{k}"] = float(ceiling.mean())
        result["unique_fit"] = float(((n_fit == 1) & paired_fits).mean())
        result["mean_fitting"] = float(n_fit.mean())
        result["paired_unfit"] = int((~paired_fits).sum())
    return result


def _some_fit_in_top(slots: np.ndarray, group_size: np.ndarray, group_unfit: np.ndarray) -> np.ndarray:
    """Chance that a random order of a tied group puts a fitting item within its first `slots` places."""
    no_fit = np.ones(len(slots))
    for j in range(int(max(slots.max(initial=0), 0))):
        # Drawing place j+1 from the group without replacement: probability it is again an unfit item.
        step = np.maximum(group_unfit - j, 0) / np.maximum(group_size - j, 1)
        no_fit = np.where(j < slots, no_fit * step, no_fit)
    return np.where(slots > 0, 1.0 - no_fit, 0.0)


def bidirectional_instance_recall(
    a_emb: Any,
    b_emb: Any,
    keys_a: Sequence[Hashable] | None = None,
    keys_b: Sequence[Hashable] | None = None,
    ks: Sequence[int] = DEFAULT_KS,
    names: tuple[str, str] = ("a", "b"),
    chunk_size: int = DEFAULT_CHUNK,
    tie_tol: float = DEFAULT_TIE_TOL,
) -> dict[str, Any]:
    """Instance recall both ways over paired rows: {"a_to_b": ..., "b_to_a": ..., "names": [a, b]}.

    `names` (e.g. ("text", "image")) only labels the directions in tables and reports.
    """
    return {
        "a_to_b": instance_recall(a_emb, b_emb, keys_a, keys_b, ks, chunk_size, tie_tol),
        "b_to_a": instance_recall(b_emb, a_emb, keys_b, keys_a, ks, chunk_size, tie_tol),
        "names": [names[0], names[1]],
    }


def _label_name(label: int, names: Sequence[str] | None) -> str:
    return names[label] if names is not None and 0 <= label < len(names) else str(label)


def category_retrieval(
    query_emb: Any,
    gallery_emb: Any,
    query_labels: Sequence[int] | np.ndarray,
    gallery_labels: Sequence[int] | np.ndarray,
    ks: Sequence[int] = DEFAULT_KS,
    names: Sequence[str] | None = None,
    per_class_k: int = 10,
    chunk_size: int = DEFAULT_CHUNK,
    tie_tol: float = DEFAULT_TIE_TOL,
) -> dict[str, Any]:
    """Category retrieval: a retrieved item is a hit when it shares the query's label (ICDR grade).

    `P@k` is the mean precision within the top k (expected over orders of tied items; k is capped at the
    gallery size), `mAP` the mean over queries of the average precision over the full ranking. Queries
    with a missing label (< 0) or a label no gallery item has are excluded and counted
    (`missing_label_queries`, `excluded_queries`); gallery items with a missing label stay in the ranking
    and are never hits. `per_class_P@{per_class_k}` / `per_class_mAP` average over the queries of each
    label (keyed by `names[label]` when names are given) and `macro_*` over those labels, so a majority
    class cannot hide the others.
    """
    queries, gallery = _check_pair(query_emb, gallery_emb)
    q_labels = np.asarray(query_labels, dtype=np.int64)
    g_labels = np.asarray(gallery_labels, dtype=np.int64)
    if q_labels.shape != (queries.shape[0],) or g_labels.shape != (gallery.shape[0],):
        raise ValueError("one label per query row and one per gallery row")
    n_gallery = gallery.shape[0]
    gallery_has = set(int(label) for label in g_labels[g_labels >= 0])
    missing = q_labels < 0
    absent = ~missing & ~np.isin(q_labels, list(gallery_has))
    kept = np.flatnonzero(~missing & ~absent)
    all_ks = sorted(set(_check_ks(ks)) | {int(per_class_k)})

    precision = {k: np.zeros(len(kept)) for k in all_ks}
    average_precision = np.zeros(len(kept))
    for start in range(0, len(kept), chunk_size):
        rows = kept[start : start + chunk_size]
        sims = queries[rows] @ gallery.T
        # One sort per chunk serves every P@k and the AP; the order inside a tie does not matter to either.
        order = np.argsort(-sims, axis=1)
        sorted_sims = np.take_along_axis(sims, order, axis=1)
        sorted_rel = g_labels[order] == q_labels[rows, None]
        for k in all_ks:
            precision[k][start : start + len(rows)] = _expected_precision(
                sorted_sims, sorted_rel, min(k, n_gallery), tie_tol
            )
        average_precision[start : start + len(rows)] = _average_precision(sorted_sims, sorted_rel, tie_tol)

    result: dict[str, Any] = {
        "queries": int(len(kept)),
        "gallery_size": int(n_gallery),
        "excluded_queries": int(absent.sum()),
        "missing_label_queries": int(missing.sum()),
    }
    for k in _check_ks(ks):
        result[f"P@{k}"] = float(precision[k].mean()) if len(kept) else None
    result["mAP"] = float(average_precision.mean()) if len(kept) else None
    kept_labels = q_labels[kept]
    classes = sorted(set(int(label) for label in kept_labels))
    per_class_p = {
        _label_name(c, names): float(precision[per_class_k][kept_labels == c].mean()) for c in classes
    }
    per_class_ap = {_label_name(c, names): float(average_precision[kept_labels == c].mean()) for c in classes}
    result[f"per_class_P@{per_class_k}"] = per_class_p
    result[f"macro_P@{per_class_k}"] = float(np.mean(list(per_class_p.values()))) if classes else None
    result["per_class_mAP"] = per_class_ap
    result["macro_mAP"] = float(np.mean(list(per_class_ap.values()))) if classes else None
    result["per_class_queries"] = {_label_name(c, names): int((kept_labels == c).sum()) for c in classes}
    return result


def self_retrieval(
    embeddings: Any,
    labels: Sequence[int] | np.ndarray,
    ks: Sequence[int] = DEFAULT_KS,
    names: Sequence[str] | None = None,
    per_class_k: int = 10,
    positive_from: int = REFERABLE_ICDR,
    chunk_size: int = DEFAULT_CHUNK,
    tie_tol: float = DEFAULT_TIE_TOL,
) -> dict[str, Any]:
    """Retrieval inside one set (image -> image): every row queries all the other rows, itself excluded.

    `P@k` / `macro_P@{per_class_k}` / `per_class_P@{per_class_k}` as in `category_retrieval` (a hit shares
    the query's label; queries with a missing label are skipped). `positive_P@{per_class_k}`: for the
    queries whose label is >= `positive_from` (referable DR for ICDR), the share of their nearest items
    that are positive too. `similarity`: the mean score of the 1st and of the `per_class_k`-th neighbour
    and their mean gap, so one can tell whether scores spread enough for a person to read them.
    """
    rows_all = _as_matrix("embeddings", embeddings)
    all_labels = np.asarray(labels, dtype=np.int64)
    n = rows_all.shape[0]
    if all_labels.shape != (n,):
        raise ValueError("one label per row")
    if n < 2:
        raise ValueError("self retrieval needs at least two rows")
    kept = np.flatnonzero(all_labels >= 0)
    depth = min(max(_check_ks(ks) + [per_class_k]), n - 1)
    all_ks = sorted({min(k, depth) for k in _check_ks(ks)} | {min(per_class_k, depth)})
    precision = {k: np.zeros(len(kept)) for k in all_ks}
    positive_share = np.zeros(len(kept))
    first, last = np.zeros(len(kept)), np.zeros(len(kept))
    for start in range(0, len(kept), chunk_size):
        rows = kept[start : start + chunk_size]
        sims = rows_all[rows] @ rows_all.T
        sims[np.arange(len(rows)), rows] = -np.inf  # the query itself is not in its gallery
        order = np.argsort(-sims, axis=1)[:, : depth + 1]
        sorted_sims = np.take_along_axis(sims, order, axis=1)
        neighbour_labels = all_labels[order]
        sorted_rel = neighbour_labels == all_labels[rows, None]
        for k in all_ks:
            precision[k][start : start + len(rows)] = _expected_precision(sorted_sims, sorted_rel, k, tie_tol)
        top = min(per_class_k, depth)
        positive_share[start : start + len(rows)] = (neighbour_labels[:, :top] >= positive_from).mean(axis=1)
        first[start : start + len(rows)] = sorted_sims[:, 0]
        last[start : start + len(rows)] = sorted_sims[:, top - 1]
    kept_labels = all_labels[kept]
    result: dict[str, Any] = {"queries": int(len(kept)), "gallery_size": int(n - 1)}
    for k in _check_ks(ks):
        result[f"P@{k}"] = float(precision[min(k, depth)].mean()) if len(kept) else None
    k = min(per_class_k, depth)
    classes = sorted(set(int(label) for label in kept_labels))
    per_class = {_label_name(c, names): float(precision[k][kept_labels == c].mean()) for c in classes}
    result[f"per_class_P@{per_class_k}"] = per_class
    result[f"macro_P@{per_class_k}"] = float(np.mean(list(per_class.values()))) if classes else None
    result["per_class_queries"] = {_label_name(c, names): int((kept_labels == c).sum()) for c in classes}
    positives = kept_labels >= positive_from
    result[f"positive_P@{per_class_k}"] = float(positive_share[positives].mean()) if positives.any() else None
    result["positive_queries"] = int(positives.sum())
    result["similarity"] = {
        "first": float(first.mean()) if len(kept) else None,
        f"at_{per_class_k}": float(last.mean()) if len(kept) else None,
        "gap": float((first - last).mean()) if len(kept) else None,
    }
    return result


def within_grade_agreement(
    embeddings: Any,
    labels: Sequence[int] | np.ndarray,
    attributes: dict[str, Sequence[Hashable | None]],
    k: int = 10,
) -> dict[str, Any]:
    """What a photograph's look-alikes share beyond the grade: for each attribute (e.g. the eye, the camera),
    the share of a query's `k` nearest photographs *of its own grade* that have the query's value, beside
    `chance`, the share among all the other photographs of that grade.

    Ranking within one grade is what the similarity scores order once the grade is found; this says whether
    that order means something a person can see. Rows with an unknown label or attribute value take no part
    in that attribute; grades with fewer than two such rows are skipped.
    """
    rows_all = _as_matrix("embeddings", embeddings)
    all_labels = np.asarray(labels, dtype=np.int64)
    if all_labels.shape != (rows_all.shape[0],):
        raise ValueError("one label per row")
    if k < 1:
        raise ValueError("k must be >= 1")
    result: dict[str, Any] = {"k": k}
    for name, values in attributes.items():
        if len(values) != rows_all.shape[0]:
            raise ValueError(f"attribute {name!r}: one value per row")
        known = np.array([v is not None for v in values]) & (all_labels >= 0)
        codes = np.unique(np.array([str(v) for v in values]), return_inverse=True)[1]
        agree, chance, queries = [], [], 0
        for grade in np.unique(all_labels[known]):
            members = np.flatnonzero(known & (all_labels == grade))
            if len(members) < 2:
                continue
            top = min(k, len(members) - 1)
            member_codes = codes[members]
            same_total = np.bincount(member_codes)[member_codes] - 1  # the other members sharing the value
            for start in range(0, len(members), DEFAULT_CHUNK):
                rows = members[start : start + DEFAULT_CHUNK]
                sims = rows_all[rows] @ rows_all[members].T
                sims[np.arange(len(rows)), np.arange(start, start + len(rows))] = -np.inf
                nearest = np.argsort(-sims, axis=1)[:, :top]
                agree.append((member_codes[nearest] == member_codes[start : start + len(rows), None]).mean(axis=1))
                chance.append(same_total[start : start + len(rows)] / (len(members) - 1))
            queries += len(members)
        result[name] = {
            "agree": float(np.concatenate(agree).mean()) if agree else None,
            "chance": float(np.concatenate(chance).mean()) if chance else None,
            "queries": queries,
        }
    return result


def consensus_metrics(
    embeddings: Any,
    labels: Sequence[int] | np.ndarray,
    predicted: Sequence[int] | np.ndarray,
    k: int = 10,
    groups: Sequence[Hashable] | None = None,
    chunk_size: int = DEFAULT_CHUNK,
) -> dict[str, Any]:
    """The neighbours' consensus (`index.consensus`, what `/grade` and `/search/image` return as `consensus`)
    against the truth and against the model's grades `predicted` (ICDR 0..4, one per row).

    As in `self_retrieval`, every row with a known label queries all the other rows, itself excluded;
    another photograph of the same patient (the other eye, another visit) stays in its gallery. Its `k`
    nearest vote with the service's rules (unknown labels do not vote; ties by summed similarity, then the
    more severe grade; referable when at least half the voters are); a tie in similarity at the k-th place
    is broken by row order. Queries that no neighbour voted for are counted (`no_vote_queries`) and left
    out of the rest.

    For the ICDR grade (`icdr`: the majority grade) and for referable DR (`referable`: the referable vote
    against the model's grade >= 2 and the true grade >= 2), over the queries with a vote:
    `knn_accuracy` and `knn_quadratic_kappa` of the consensus against the truth (for the two referable
    classes the quadratic kappa is Cohen's plain kappa); `model_accuracy`; `agreement` (the share of
    queries where consensus and model agree); `model_error_when_agree` / `model_error_when_disagree`;
    `flag_recall` (the share of the model's wrong grades where the consensus disagrees: what disagreement
    catches) and `flag_precision` (the share of disagreements where the model is wrong); and
    `knn_right_when_disagree` (when they disagree, how often the consensus has the true grade).

    With `groups` (one key per row, e.g. the patient id): `same_group_share`, the share of the k nearest
    that belong to the query's own group, and `other_groups`, the same figures again with the query's whole
    group left out of its gallery (what a new patient's photograph meets in an archive of others).
    """
    rows_all = _as_matrix("embeddings", embeddings)
    all_labels = np.asarray(labels, dtype=np.int64)
    model = np.asarray(predicted, dtype=np.int64)
    n = rows_all.shape[0]
    if all_labels.shape != (n,) or model.shape != (n,):
        raise ValueError("one label and one predicted grade per row")
    if groups is not None and len(groups) != n:
        raise ValueError(f"{len(groups)} groups for {n} rows")
    if n < 2:
        raise ValueError("the consensus needs at least two rows")
    if k < 1:
        raise ValueError(f"k must be at least 1, not {k}")
    if ((model < 0) | (model >= ICDR_GRADES)).any():
        raise ValueError(f"a predicted grade is outside 0..{ICDR_GRADES - 1}")
    codes = None if groups is None else _factorise(groups, [])[0]
    kept = np.flatnonzero(all_labels >= 0)
    votes = _nearest_votes(rows_all, all_labels, kept, k, codes, False, chunk_size)
    result: dict[str, Any] = {"k": int(k), "gallery_size": int(n - 1),
                              "missing_label_queries": int(n - len(kept))}
    result.update(_consensus_result(votes, all_labels[kept], model[kept]))
    if codes is not None:
        result["same_group_share"] = float(votes["same"].mean()) if len(kept) else None
        other = _nearest_votes(rows_all, all_labels, kept, k, codes, True, chunk_size)
        result["other_groups"] = _consensus_result(other, all_labels[kept], model[kept])
    return result


def _nearest_votes(
    rows_all: np.ndarray, all_labels: np.ndarray, kept: np.ndarray, k: int, codes: np.ndarray | None,
    exclude_group: bool, chunk_size: int,
) -> dict[str, np.ndarray]:
    """The votes of each kept row's k nearest other rows (`index.consensus.vote`); with `exclude_group`,
    rows of the query's own group are not in its gallery. `same`: the share of the k nearest in its group."""
    depth = min(k, rows_all.shape[0] - 1)
    out = {"grade": np.full(len(kept), -1, dtype=np.int64), "referable": np.zeros(len(kept), dtype=bool),
           "known": np.zeros(len(kept), dtype=np.int64), "share": np.full(len(kept), np.nan),
           "same": np.zeros(len(kept))}
    for start in range(0, len(kept), chunk_size):
        rows = kept[start : start + chunk_size]
        sims = rows_all[rows] @ rows_all.T
        sims[np.arange(len(rows)), rows] = -np.inf  # the query itself is not in its gallery
        if exclude_group and codes is not None:
            sims[codes[rows, None] == codes[None, :]] = -np.inf
        order = np.argsort(-sims, axis=1, kind="stable")[:, :depth]
        sorted_sims = np.take_along_axis(sims, order, axis=1)
        present = np.isfinite(sorted_sims)  # fewer than k rows left once a group is excluded
        votes = vote(np.where(present, all_labels[order], -1), np.where(present, sorted_sims, 0.0))
        part = slice(start, start + len(rows))
        out["grade"][part], out["referable"][part] = votes.grade, votes.referable
        out["known"][part], out["share"][part] = votes.known, votes.share
        if codes is not None:
            out["same"][part] = ((codes[order] == codes[rows, None]) & present).sum(axis=1) / depth
    return out


def _consensus_result(votes: dict[str, np.ndarray], truth_kept: np.ndarray, model_kept: np.ndarray) -> dict[str, Any]:
    """The consensus figures of `consensus_metrics` from the votes of the kept queries."""
    voted = votes["known"] > 0
    truth, model = truth_kept[voted], model_kept[voted]
    return {
        "queries": int(voted.sum()),
        "no_vote_queries": int((~voted).sum()),
        "mean_known": float(votes["known"][voted].mean()) if voted.any() else None,
        "mean_share": float(votes["share"][voted].mean()) if voted.any() else None,
        "icdr": _agreement(truth, votes["grade"][voted], model, list(range(ICDR_GRADES))),
        "referable": _agreement(
            (truth >= REFERABLE_ICDR).astype(np.int64), votes["referable"][voted].astype(np.int64),
            (model >= REFERABLE_ICDR).astype(np.int64), [0, 1],
        ),
    }


def _agreement(truth: np.ndarray, knn: np.ndarray, model: np.ndarray, labels: list[int]) -> dict[str, Any]:
    """How the consensus `knn` and the `model` compare with the truth and with each other (see
    `consensus_metrics`)."""
    n = len(truth)
    agree = knn == model
    wrong = model != truth
    flagged = ~agree & wrong
    errors, disagreements = int(wrong.sum()), int((~agree).sum())
    kappa = np.nan
    if n:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            kappa = cohen_kappa_score(truth, knn, labels=labels, weights="quadratic", replace_undefined_by=np.nan)
    return {
        "n": int(n),
        "knn_accuracy": float((knn == truth).mean()) if n else None,
        "knn_quadratic_kappa": None if np.isnan(kappa) else float(kappa),
        "model_accuracy": float((~wrong).mean()) if n else None,
        "agreement": float(agree.mean()) if n else None,
        "disagreements": disagreements,
        "model_errors": errors,
        "flagged_errors": int(flagged.sum()),
        "model_error_when_agree": float(wrong[agree].mean()) if agree.any() else None,
        "model_error_when_disagree": float(wrong[~agree].mean()) if disagreements else None,
        "flag_recall": float(flagged.sum() / errors) if errors else None,
        "flag_precision": float(flagged.sum() / disagreements) if disagreements else None,
        "knn_right_when_disagree": float((knn == truth)[~agree].mean()) if disagreements else None,
    }


def _expected_precision(
    sorted_sims: np.ndarray, sorted_rel: np.ndarray, k: int, tie_tol: float
) -> np.ndarray:
    """Precision@k per row (scores sorted descending), expected over orders of the items tied at the k-th."""
    kth = sorted_sims[:, k - 1 : k]
    above = sorted_sims > kth + tie_tol
    tied = (sorted_sims >= kth - tie_tol) & ~above
    slots = k - above.sum(axis=1)
    hits = (sorted_rel & above).sum(axis=1) + slots * (sorted_rel & tied).sum(axis=1) / tied.sum(axis=1)
    return hits / k


def _average_precision(sorted_sims: np.ndarray, sorted_rel: np.ndarray, tie_tol: float) -> np.ndarray:
    """Average precision per row (scores sorted descending), as scikit-learn computes it: a run of tied
    scores is one threshold, so every relevant item in it gets the precision at the run's end."""
    rows, n = sorted_sims.shape
    cum_hits = np.cumsum(sorted_rel, axis=1, dtype=np.int64)
    last_of_run = np.ones(sorted_sims.shape, dtype=bool)
    last_of_run[:, :-1] = sorted_sims[:, :-1] - sorted_sims[:, 1:] > tie_tol
    # Flat index of the end of the run each item belongs to (every row's last item ends a run).
    ends = np.flatnonzero(last_of_run)
    run_end = np.repeat(ends, np.diff(ends, prepend=-1))
    relevant_flat = sorted_rel.ravel()
    relevant_end = run_end[relevant_flat]
    precision = cum_hits.ravel()[relevant_end] / (relevant_end % n + 1)
    row_of = np.flatnonzero(relevant_flat) // n
    total = np.bincount(row_of, weights=precision, minlength=rows)
    return total / np.maximum(cum_hits[:, -1], 1)


def _known_rows(y_true: Any, probabilities: Any, n_classes: int | None) -> tuple[np.ndarray, np.ndarray, int]:
    truth = np.asarray(y_true, dtype=np.int64)
    probs = np.asarray(probabilities, dtype=np.float64)
    if probs.ndim != 2 or truth.shape != (probs.shape[0],):
        raise ValueError(f"y_true shape {truth.shape} does not match probabilities shape {probs.shape}")
    if n_classes is not None and probs.shape[1] != n_classes:
        raise ValueError(f"probabilities have {probs.shape[1]} columns, expected {n_classes}")
    if n_classes is not None and (truth >= n_classes).any():
        raise ValueError(f"a true label is >= {n_classes}")
    known = truth >= 0
    return truth[known], probs[known], int((~known).sum())


def grading_metrics(y_true: Any, probabilities: Any, names: Sequence[str]) -> dict[str, Any]:
    """Grading metrics for predicted = argmax(probabilities) against y_true over labels 0..len(names)-1.

    Rows with a missing truth (y_true < 0) are ignored and counted (`ignored`). `macro_f1` averages the
    F1 of the classes that occur in the truth or the predictions (a class absent from both has none);
    `per_class_recall` is None for a class absent from the truth; `quadratic_kappa` is None where it is
    undefined (e.g. a single class everywhere). `confusion_matrix` rows are truths, columns predictions.
    """
    labels = list(range(len(names)))
    truth, probs, ignored = _known_rows(y_true, probabilities, len(names))
    support = np.bincount(truth, minlength=len(names))
    result: dict[str, Any] = {"n": int(len(truth)), "ignored": ignored, "names": list(names)}
    result["support"] = {name: int(count) for name, count in zip(names, support, strict=True)}
    if len(truth) == 0:
        result.update(accuracy=None, macro_f1=None, quadratic_kappa=None, confusion_matrix=None)
        result["per_class_recall"] = {name: None for name in names}
        result["per_class_f1"] = {name: None for name in names}
        return result
    predicted = probs.argmax(axis=1)
    predicted_counts = np.bincount(predicted, minlength=len(names))
    f1 = f1_score(truth, predicted, labels=labels, average=None, zero_division=0)
    recall = recall_score(truth, predicted, labels=labels, average=None, zero_division=0)
    occurring = (support > 0) | (predicted_counts > 0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        kappa = cohen_kappa_score(
            truth, predicted, labels=labels, weights="quadratic", replace_undefined_by=np.nan
        )
    result["accuracy"] = float(accuracy_score(truth, predicted))
    result["macro_f1"] = float(f1[occurring].mean())
    result["quadratic_kappa"] = None if np.isnan(kappa) else float(kappa)
    result["per_class_recall"] = {
        name: (float(recall[i]) if support[i] > 0 else None) for i, name in enumerate(names)
    }
    result["per_class_f1"] = {name: (float(f1[i]) if occurring[i] else None) for i, name in enumerate(names)}
    result["predicted"] = {name: int(count) for name, count in zip(names, predicted_counts, strict=True)}
    result["confusion_matrix"] = confusion_matrix(truth, predicted, labels=labels).tolist()
    return result


def _sens_spec(positive: np.ndarray, flagged: np.ndarray) -> dict[str, Any]:
    tp = int((positive & flagged).sum())
    fn = int((positive & ~flagged).sum())
    tn = int((~positive & ~flagged).sum())
    fp = int((~positive & flagged).sum())
    return {
        "sensitivity": tp / (tp + fn) if tp + fn else None,
        "specificity": tn / (tn + fp) if tn + fp else None,
        "tp": tp,
        "fn": fn,
        "tn": tn,
        "fp": fp,
    }


def referable_metrics(
    icdr_true: Any,
    icdr_probabilities: Any,
    threshold: float | None = None,
    target_sensitivity: float = TARGET_SENSITIVITY,
) -> dict[str, Any]:
    """Referable DR (ICDR >= 2) from 5-grade ICDR probabilities; the score is P(grade 2) + ... + P(grade 4).

    `auroc` and `average_precision` are None when the data lack positives or negatives. The decision
    (`sensitivity`, `specificity`, `tp`/`fn`/`tn`/`fp`) is `score >= threshold` when a threshold is given,
    else the argmax grade >= 2 (what the grader reports). `operating_point` is the highest threshold that
    reaches `target_sensitivity` on *these* data, with its specificity: chosen on the evaluation set
    itself, so it is optimistic, and it is reported apart from the decision. Missing truths are ignored.
    """
    truth, probs, ignored = _known_rows(icdr_true, icdr_probabilities, None)
    if probs.shape[1] <= REFERABLE_ICDR:
        raise ValueError(f"need ICDR probabilities for grades 0..{REFERABLE_ICDR} or more")
    positive = truth >= REFERABLE_ICDR
    score = probs[:, REFERABLE_ICDR:].sum(axis=1)
    both = bool(positive.any() and (~positive).any())
    if threshold is None:
        flagged = probs.argmax(axis=1) >= REFERABLE_ICDR
        rule = f"argmax grade >= {REFERABLE_ICDR}"
    else:
        flagged = score >= threshold
        rule = f"P(grade >= {REFERABLE_ICDR}) >= {threshold:g}"
    result: dict[str, Any] = {
        "n": int(len(truth)),
        "ignored": ignored,
        "positives": int(positive.sum()),
        "negatives": int((~positive).sum()),
        "auroc": float(roc_auc_score(positive, score)) if both else None,
        "average_precision": float(average_precision_score(positive, score)) if both else None,
        "decision_rule": rule,
        "threshold": threshold,
    }
    result.update(_sens_spec(positive, flagged))
    operating: dict[str, Any] = {"target_sensitivity": target_sensitivity, "threshold": None}
    if both:
        fpr, tpr, thresholds = roc_curve(positive, score, drop_intermediate=False)
        reached = int(np.flatnonzero(tpr >= target_sensitivity)[0])
        operating["threshold"] = float(thresholds[reached])
        operating.update(_sens_spec(positive, score >= thresholds[reached]))
    else:
        operating.update(sensitivity=None, specificity=None)
    result["operating_point"] = operating
    return result


def _ks_of(result: dict[str, Any], prefix: str) -> list[int]:
    pattern = re.compile(rf"^{re.escape(prefix)}@(\d+)$")
    return sorted(int(m.group(1)) for key in result if (m := pattern.match(key)))


def _instance_rows(label: str, result: dict[str, Any]) -> list[tuple[str, float | None]]:
    rows = [(f"{label} R@{k}", result[f"R@{k}"]) for k in _ks_of(result, "R")]
    if "fit_R@1" in result:
        rows.append((f"{label} fit_R@1", result["fit_R@1"]))
    if "ceiling@1" in result:
        rows.append((f"{label} ceiling@1", result["ceiling@1"]))
    return rows


def direction_labels(result: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(label, one-direction result) pairs of an instance entry: both directions, or the one given."""
    if "a_to_b" not in result:
        return [("", result)]
    name_a, name_b = result.get("names", ["a", "b"])
    return [(f"{name_a}->{name_b}", result["a_to_b"]), (f"{name_b}->{name_a}", result["b_to_a"])]


def summarise(metrics: dict[str, Any]) -> list[tuple[str, float | None]]:
    """The headline numbers of a combined metrics dict, in a fixed order (None where undefined).

    Order: instance R@k / fit_R@1 / ceiling@1 per setting and direction; category P@k / mAP /
    macro P@10 per setting; image->image P@k, macro P@10, referable P@10 and the similarity gap; the
    consensus's kappa, accuracy, agreement with the model and flag recall / precision (ICDR, referable);
    ICDR and SDRG accuracy / macro-F1 / kappa; referable AUROC, sensitivity,
    specificity and the specificity at the target-sensitivity operating point.
    """
    rows: list[tuple[str, float | None]] = []
    for setting, entry in metrics.get("instance", {}).items():
        for direction, result in direction_labels(entry):
            rows.extend(_instance_rows(f"instance {setting} {direction}".rstrip(), result))
    for setting, result in metrics.get("category", {}).items():
        rows.extend((f"category {setting} P@{k}", result[f"P@{k}"]) for k in _ks_of(result, "P"))
        rows.append((f"category {setting} mAP", result["mAP"]))
        for k in _ks_of(result, "macro_P"):
            rows.append((f"category {setting} macro P@{k}", result[f"macro_P@{k}"]))
    if "image_image" in metrics:
        result = metrics["image_image"]
        rows.extend((f"image->image P@{k}", result[f"P@{k}"]) for k in _ks_of(result, "P"))
        for k in _ks_of(result, "macro_P"):
            rows.append((f"image->image macro P@{k}", result[f"macro_P@{k}"]))
        for k in _ks_of(result, "positive_P"):
            rows.append((f"image->image referable P@{k} (referable queries)", result[f"positive_P@{k}"]))
        rows.append(("image->image similarity gap 1st-10th", result["similarity"]["gap"]))
    if "lookalike" in metrics:
        result = metrics["lookalike"]
        for name, entry in result.items():
            if isinstance(entry, dict):
                rows.append((f"image->image same-grade {result['k']} nearest: same {name}", entry["agree"]))
                rows.append((f"image->image same-grade {result['k']} nearest: same {name} by chance", entry["chance"]))
    if "consensus" in metrics:
        result = metrics["consensus"]
        knn = f"consensus kNN@{result['k']}"
        for level, name in (("icdr", "ICDR"), ("referable", "referable")):
            entry = result[level]
            rows.append((f"{knn} {name} quadratic kappa", entry["knn_quadratic_kappa"]))
            rows.append((f"{knn} {name} accuracy", entry["knn_accuracy"]))
            rows.append((f"{knn} {name} agreement with the model", entry["agreement"]))
            rows.append((f"{knn} {name} disagreement flags model errors (recall)", entry["flag_recall"]))
            rows.append((f"{knn} {name} disagreements that are model errors (precision)", entry["flag_precision"]))
        if "other_groups" in result:
            entry = result["other_groups"]["icdr"]
            rows.append((f"{knn} ICDR quadratic kappa (other patients only)", entry["knn_quadratic_kappa"]))
            rows.append((f"{knn} ICDR disagreement flags model errors (recall, other patients only)",
                         entry["flag_recall"]))
            rows.append((f"{knn} ICDR disagreements that are model errors (precision, other patients only)",
                         entry["flag_precision"]))
    for task in ("icdr", "sdrg"):
        if task in metrics:
            result = metrics[task]
            rows.append((f"{task.upper()} accuracy", result["accuracy"]))
            rows.append((f"{task.upper()} macro-F1", result["macro_f1"]))
            rows.append((f"{task.upper()} quadratic kappa", result["quadratic_kappa"]))
    if "referable" in metrics:
        result = metrics["referable"]
        rows.append(("referable AUROC", result["auroc"]))
        rows.append(("referable sensitivity", result["sensitivity"]))
        rows.append(("referable specificity", result["specificity"]))
        point = result["operating_point"]
        rows.append(
            (f"referable specificity at sensitivity >= {point['target_sensitivity']:g}", point["specificity"])
        )
    return rows


def format_number(value: float | None, digits: int = 4) -> str:
    """A metric for a table: fixed decimals, or "n/a" when undefined."""
    return "n/a" if value is None else f"{value:.{digits}f}"


def compare_table(metrics_a: dict[str, Any], metrics_b: dict[str, Any], name_a: str, name_b: str) -> str:
    """A markdown table of the headline numbers of two runs side by side, with the difference b - a."""
    values_a = dict(summarise(metrics_a))
    values_b = dict(summarise(metrics_b))
    order = list(values_a) + [name for name in values_b if name not in values_a]
    lines = [f"| metric | {name_a} | {name_b} | {name_b} - {name_a} |", "|---|---:|---:|---:|"]
    for name in order:
        a, b = values_a.get(name), values_b.get(name)
        diff = None if a is None or b is None else b - a
        diff_text = "n/a" if diff is None else f"{diff:+.4f}"
        lines.append(f"| {name} | {format_number(a)} | {format_number(b)} | {diff_text} |")
    return "\n".join(lines) + "\n"
