"""The neighbours' consensus: the ICDR grades of the k archived photographs nearest a query photograph
(image -> image), beside the model's grade, and whether the two agree. Pure numpy (no torch, no FAISS):
the service (`service.engine`) and the evaluation (`training.evaluation.metrics.consensus_metrics`) count
votes with the same rules, written here once.

Rules:
- **Unknown grades** (an archived photograph without an ICDR label: None, or < 0 in arrays) do not vote;
  `known` says how many neighbours did.
- **Majority grade**: the ICDR grade with the most votes. A tie on the count goes to the grade whose voters
  are the more similar to the query in sum (a similarity-weighted vote among the tied grades); a tie left
  after that (or no similarities given) goes to the **more severe** grade, the safe side for screening.
- **share**: the share of the known votes that went to the majority grade.
- **Referable** (ICDR >= 2) is a vote of its own, not the majority grade's: `referable_share` is the share
  of known neighbours that are referable, and the consensus is referable when that share is at least one
  half (a tie goes to referable, the more severe side). So 4 grade-0 and 3 + 3 neighbours of grades 2 and 4
  have majority grade 0 but a referable consensus.
- **Agreement**: `agrees` when the majority grade equals the model's ICDR grade exactly; `referable_agrees`
  when the consensus's referable verdict equals the model's (its grade >= 2). Both are None when no
  neighbour's grade is known (or no model grade is given).
- **Exact duplicates**: a neighbour at similarity >= `DUPLICATE_SIMILARITY` (1 - 1e-6) to the query is
  taken to be the query photograph itself (an uploaded photograph that is in the archive finds itself first
  at 1 to within float rounding) and is left out and counted (`duplicates`): its own label would otherwise
  vote for itself, and the consensus is meant as an opinion of *other* photographs (as the evaluation, which
  leaves the query out of its gallery). Ask for k + 1 neighbours to keep k after leaving one out.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from index.records import ICDR_NAMES, REFERABLE_ICDR

ICDR_GRADES = len(ICDR_NAMES)
"""The ICDR scale has 5 grades, 0..4."""
DUPLICATE_SIMILARITY = 1.0 - 1e-6
"""A neighbour at this cosine similarity or more is the query photograph itself (left out of the vote).
The same photograph decoded and embedded again scores 1 to within float32 rounding: measured 1 - 6e-7 at
worst (50 archived photographs uploaded to an index of 3,000 built with the shipped `zoo:tiny-synth`; 1 - 4e-7
with the tests' tiny bundle), while the nearest *other* photograph scored at most 1 - 1.6e-5 (median
1 - 7.5e-5: that model's embeddings sat in a narrow cone, so a looser threshold such as 0.9999 would leave
out real neighbours). With the release that spreads the image embedding (an appearance part), 2026-12-07: the
photograph itself at worst 1 - 1.2e-7, the nearest other at most 1 - 6.0e-5 (median 0.975; 50 uploads, an
index of 3,000). Scores of a compressed index (`ivfpq`) are approximate: there the photograph itself may go
unrecognised and vote. With the grade part of the search embeddings (2026-12-08, `grade_part_weight` 0.75), two
photographs the model grades alike move closer: the photograph itself at worst 1 - 1.8e-7 (50 uploads, an index
of 3,000), the nearest other at most 1 - 3.0e-5 there (median 0.993), but one pair of two patients' grade-0
photographs of a 3,000-photograph held-out archive at 1 - 1.7e-6 (1 - 3.6e-6 without the grade part), which
the former threshold, 1 - 3e-6, took for one photograph; hence 1 - 1e-6."""
TIE_TOLERANCE = 1e-6
"""Summed similarities within this of each other are a tie (then the more severe grade wins)."""


@dataclass(frozen=True)
class Votes:
    """The votes of many queries' neighbours at once (one row per query)."""

    counts: np.ndarray
    """(N, 5) int: known neighbours per ICDR grade."""
    known: np.ndarray
    """(N,) int: neighbours whose grade is known (who voted)."""
    grade: np.ndarray
    """(N,) int: the majority grade, -1 where no neighbour voted."""
    share: np.ndarray
    """(N,) float: the share of the votes for the majority grade (NaN where none voted)."""
    referable_share: np.ndarray
    """(N,) float: the share of voters that are referable, ICDR >= 2 (NaN where none voted)."""
    referable: np.ndarray
    """(N,) bool: the referable verdict, referable_share >= 0.5 (False where none voted: see `known`)."""


def vote(grades: np.ndarray | Sequence[Sequence[int]], similarities: np.ndarray | None = None) -> Votes:
    """Count the votes of each row of neighbours: `grades` (N, k) ICDR grades with -1 for unknown,
    `similarities` (N, k) their similarities to the query (for the tie-break), or None. See the module
    docstring for the rules."""
    labels = np.asarray(grades, dtype=np.int64)
    if labels.ndim != 2:
        raise ValueError(f"grades must be a 2-D array (queries x neighbours), got shape {labels.shape}")
    if (labels >= ICDR_GRADES).any():
        raise ValueError(f"an ICDR grade is >= {ICDR_GRADES}")
    voted = labels >= 0
    one_hot = (labels[:, :, None] == np.arange(ICDR_GRADES)[None, None, :]) & voted[:, :, None]
    counts = one_hot.sum(axis=1)
    known = voted.sum(axis=1)
    best = counts.max(axis=1)
    tied = (counts == best[:, None]) & (known[:, None] > 0)
    if similarities is not None:
        sims = np.asarray(similarities, dtype=np.float64)
        if sims.shape != labels.shape:
            raise ValueError(f"similarities shape {sims.shape} differs from grades shape {labels.shape}")
        weight = (one_hot * sims[:, :, None]).sum(axis=1)
        top = np.where(tied, weight, -np.inf).max(axis=1, initial=-np.inf)
        tied &= weight >= top[:, None] - TIE_TOLERANCE
    # The more severe of what is still tied: the highest grade index with a True.
    severest = ICDR_GRADES - 1 - np.argmax(tied[:, ::-1], axis=1)
    grade = np.where(known > 0, severest, -1)
    with np.errstate(invalid="ignore", divide="ignore"):
        share = np.where(known > 0, best / np.maximum(known, 1), np.nan)
        referable_share = np.where(known > 0, counts[:, REFERABLE_ICDR:].sum(axis=1) / np.maximum(known, 1), np.nan)
    referable = (known > 0) & (np.nan_to_num(referable_share, nan=0.0) >= 0.5)
    return Votes(counts=counts, known=known, grade=grade, share=share, referable_share=referable_share,
                 referable=referable)


@dataclass(frozen=True)
class Consensus:
    """The consensus of one query's nearest archived photographs (see the module docstring)."""

    k: int
    """Neighbours taken (after leaving out duplicates of the query)."""
    known: int
    """Of those, how many have a known ICDR grade (the voters)."""
    counts: tuple[int, ...]
    """Voters per ICDR grade 0..4 (they sum to `known`)."""
    grade: int | None
    """The majority ICDR grade; None when no neighbour's grade is known."""
    share: float | None
    """The share of the voters for `grade`."""
    referable_share: float | None
    """The share of the voters that are referable (ICDR >= 2)."""
    referable: bool | None
    """The consensus's referable verdict: referable_share >= 0.5."""
    agrees: bool | None
    """The majority grade equals the model's ICDR grade."""
    referable_agrees: bool | None
    """The referable verdict equals the model's (its grade >= 2)."""
    duplicates: int = 0
    """Neighbours left out as the query photograph itself (similarity >= the duplicate threshold)."""
    mean_similarity: float | None = None
    """The mean similarity of the neighbours taken (None without similarities or neighbours)."""


def neighbour_consensus(
    grades: Sequence[int | None],
    similarities: Sequence[float] | None = None,
    model_grade: int | None = None,
    k: int | None = None,
    duplicate_similarity: float | None = DUPLICATE_SIMILARITY,
) -> Consensus:
    """The consensus of neighbours given best first: their ICDR grades (None: unknown) and, optionally,
    their similarities to the query. Neighbours at similarity >= `duplicate_similarity` are left out as
    the query itself (None: keep every one); then the first `k` (None: all) vote. `model_grade` is the
    model's ICDR grade for the agreement (None: `agrees` and `referable_agrees` are None)."""
    if similarities is not None and len(similarities) != len(grades):
        raise ValueError(f"{len(grades)} grades but {len(similarities)} similarities")
    if k is not None and k < 0:
        raise ValueError(f"k must be >= 0, not {k}")
    if model_grade is not None and not 0 <= model_grade < ICDR_GRADES:
        raise ValueError(f"model_grade must be an ICDR grade 0..{ICDR_GRADES - 1}, not {model_grade}")
    taken: list[int] = []
    duplicates = 0
    for i in range(len(grades)):
        if k is not None and len(taken) >= k:
            break
        if similarities is not None and duplicate_similarity is not None and similarities[i] >= duplicate_similarity:
            duplicates += 1
            continue
        taken.append(i)
    known_grades = [grades[i] for i in taken]
    labels = np.array([-1 if g is None else int(g) for g in known_grades], dtype=np.int64).reshape(1, len(taken))
    sims = None if similarities is None else np.array([float(similarities[i]) for i in taken]).reshape(1, len(taken))
    votes = vote(labels, sims)
    known = int(votes.known[0])
    grade = int(votes.grade[0]) if known else None
    referable = bool(votes.referable[0]) if known else None
    return Consensus(
        k=len(taken),
        known=known,
        counts=tuple(int(c) for c in votes.counts[0]),
        grade=grade,
        share=float(votes.share[0]) if known else None,
        referable_share=float(votes.referable_share[0]) if known else None,
        referable=referable,
        agrees=None if grade is None or model_grade is None else grade == model_grade,
        referable_agrees=(None if referable is None or model_grade is None
                          else referable == (model_grade >= REFERABLE_ICDR)),
        duplicates=duplicates,
        mean_similarity=float(np.mean(sims)) if sims is not None and len(taken) else None,
    )
