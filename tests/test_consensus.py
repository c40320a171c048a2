"""The neighbours' consensus (`index.consensus`) on hand-made neighbours: majority, ties, unknown grades,
referable vote, agreement, and the query photograph itself left out."""

from __future__ import annotations

import numpy as np
import pytest

from index.consensus import DUPLICATE_SIMILARITY, neighbour_consensus, vote


def test_majority_counts_shares_and_agreement() -> None:
    result = neighbour_consensus([2, 2, 0, 3, 2], [0.9, 0.8, 0.7, 0.6, 0.5], model_grade=2)
    assert result.k == 5 and result.known == 5 and result.counts == (1, 0, 3, 1, 0)
    assert result.grade == 2 and result.share == pytest.approx(0.6)
    assert result.referable_share == pytest.approx(0.8) and result.referable is True
    assert result.agrees is True and result.referable_agrees is True
    assert result.duplicates == 0 and result.mean_similarity == pytest.approx(0.7)


def test_a_tied_count_goes_to_the_more_similar_grade_then_the_more_severe() -> None:
    # grades 1 and 3 have two votes each: summed similarity 1.4 against 1.5 -> 3; the other way round -> 1
    assert neighbour_consensus([1, 1, 3, 3], [0.9, 0.5, 0.8, 0.7]).grade == 3
    assert neighbour_consensus([1, 1, 3, 3], [0.9, 0.8, 0.5, 0.7]).grade == 1
    # equal sums, or no similarities at all: the more severe grade
    assert neighbour_consensus([0, 2], [0.5, 0.5]).grade == 2
    assert neighbour_consensus([4, 1]).grade == 4
    # a grade with fewer votes never wins on similarity
    assert neighbour_consensus([0, 0, 4], [0.1, 0.1, 0.99]).grade == 0


def test_unknown_grades_do_not_vote() -> None:
    result = neighbour_consensus([None, 3, None, 1, 3], [0.9, 0.8, 0.7, 0.6, 0.5], model_grade=1)
    assert result.k == 5 and result.known == 3 and sum(result.counts) == 3
    assert result.counts == (0, 1, 0, 2, 0) and result.grade == 3 and result.share == pytest.approx(2 / 3)
    assert result.agrees is False and result.referable_agrees is False
    nobody = neighbour_consensus([None, None], [0.9, 0.8], model_grade=0)
    assert nobody.known == 0 and nobody.counts == (0, 0, 0, 0, 0)
    assert nobody.grade is None and nobody.share is None and nobody.referable is None
    assert nobody.agrees is None and nobody.referable_agrees is None
    empty = neighbour_consensus([], [], model_grade=0, k=10)
    assert empty.k == 0 and empty.grade is None and empty.mean_similarity is None


def test_referable_is_its_own_vote() -> None:
    # majority grade 0 (4 votes) but 6 of 10 referable: grade agrees with a model's 0, referable does not
    result = neighbour_consensus([0, 0, 0, 0, 2, 2, 3, 3, 4, 4], model_grade=0)
    assert result.grade == 0 and result.referable_share == pytest.approx(0.6) and result.referable is True
    assert result.agrees is True and result.referable_agrees is False
    # the exact grade can disagree while the referable verdict agrees
    severe = neighbour_consensus([3, 3, 3], model_grade=2)
    assert severe.agrees is False and severe.referable_agrees is True
    # half referable is referable (the more severe side)
    assert neighbour_consensus([0, 2]).referable is True and neighbour_consensus([0, 0, 2]).referable is False
    # no model grade: no agreement
    assert neighbour_consensus([1, 1]).agrees is None


def test_the_query_photograph_itself_is_left_out_and_k_kept() -> None:
    # the photograph is archived (grade 4 there): it comes first at ~1.0 and must not vote for itself
    result = neighbour_consensus([4, 0, 0, 1], [0.999999, 0.95, 0.9, 0.8], model_grade=0, k=2)
    assert result.duplicates == 1 and result.k == 2 and result.counts == (2, 0, 0, 0, 0)
    assert result.grade == 0 and result.agrees is True
    assert result.mean_similarity == pytest.approx(0.925)
    kept = neighbour_consensus([4, 0, 0], [0.999999, 0.95, 0.9], k=2, duplicate_similarity=None)
    assert kept.duplicates == 0 and kept.counts == (1, 0, 0, 0, 1)
    # just under the threshold is a neighbour: the shipped model's nearest other photographs score 0.99995
    near = neighbour_consensus([4, 0], [DUPLICATE_SIMILARITY - 1e-6, 0.99995])
    assert near.duplicates == 0 and near.k == 2


def test_vote_on_many_rows_matches_one_at_a_time() -> None:
    rng = np.random.default_rng(3)
    grades = rng.integers(-1, 5, size=(200, 7))
    sims = rng.uniform(0.2, 0.9, size=(200, 7))
    votes = vote(grades, sims)
    for row in range(200):
        single = neighbour_consensus([None if g < 0 else int(g) for g in grades[row]], sims[row].tolist())
        assert int(votes.known[row]) == single.known
        assert tuple(int(c) for c in votes.counts[row]) == single.counts
        assert (int(votes.grade[row]) if single.known else None) == single.grade
        assert (bool(votes.referable[row]) if single.known else None) == single.referable
    assert (votes.counts.sum(axis=1) == votes.known).all()


def test_bad_input_is_refused() -> None:
    with pytest.raises(ValueError, match=">= 5"):
        neighbour_consensus([5])
    with pytest.raises(ValueError, match="model_grade"):
        neighbour_consensus([1], model_grade=7)
    with pytest.raises(ValueError, match="similarities"):
        neighbour_consensus([1, 2], [0.5])
    with pytest.raises(ValueError, match="2-D"):
        vote(np.array([1, 2]))
