"""Counterfactual records (text -> record hard negatives): one stated, tabular fact made false, nothing else."""

from __future__ import annotations

import random
from collections import Counter

import numpy as np

from index.records import FundusRecord
from index.tabular import fit_feature_spec
from training.data import Counterfactuals, training_narrative_and_facts
from training.synth.priors import sample_records
from training.text.counterfactual import CHANGES, CounterfactualPool, counterfactual
from training.text.narrative_facts import StatedFacts, record_fits
from training.text.narratives import compose_narrative

TABULAR_FIELDS = {"patient_age", "diabetes_time_y", "patient_sex", "exam_eye", "diabetes", "insulin", "camera",
                  "comorbidities"}


def _changed_fields(before: FundusRecord, after: FundusRecord) -> set[str]:
    return {name for name in type(before).model_fields if getattr(before, name) != getattr(after, name)}


def test_a_counterfactual_breaks_the_text_by_one_tabular_field() -> None:
    records = sample_records(400, seed=11)
    pool = CounterfactualPool.from_records(records)
    rng = random.Random(0)
    changed_kinds: Counter[str] = Counter()
    made = 0
    for number, record in enumerate(records):
        _, facts = compose_narrative(record, seed=number)
        changed = counterfactual(record, facts, rng, pool)
        if changed is None:
            assert not facts.kinds() & CHANGES.keys() or all(
                CHANGES[k](record, random.Random(1), pool) is None for k in facts.kinds() & CHANGES.keys())
            continue
        made += 1
        assert record_fits(record, facts) and not record_fits(changed, facts)
        fields = _changed_fields(record, changed)
        assert len(fields) == 1 and fields <= TABULAR_FIELDS, fields
        changed_kinds.update(fields)
    assert made >= 0.9 * len(records)
    # every kind of change occurs, none dominates
    assert {"patient_age", "patient_sex", "exam_eye", "diabetes", "camera", "comorbidities"} <= set(changed_kinds)
    assert max(changed_kinds.values()) < 0.5 * made


def test_no_stated_tabular_fact_gives_no_counterfactual() -> None:
    record = sample_records(1, seed=3)[0]
    pool = CounterfactualPool.from_records(sample_records(50, seed=4))
    assert counterfactual(record, StatedFacts(), random.Random(0), pool) is None
    only_image = StatedFacts(frozenset({("dr_icdr", record.dr_icdr)}))
    assert counterfactual(record, only_image, random.Random(0), pool) is None


def test_training_texts_come_with_their_facts_and_tabular_counterfactuals() -> None:
    records = sample_records(60, seed=5)
    records = [r.model_copy(update={"narrative": compose_narrative(r, 9)[0]}) for r in records]
    written = [training_narrative_and_facts(r, epoch=2, seed=0, narrative_seed=9) for r in records]
    assert all(facts is not None and record_fits(r, facts) for r, (_, facts) in zip(records, written, strict=True))
    foreign = records[0].model_copy(update={"narrative": "Hand-written note."})
    stored_seen = fresh_seen = 0
    for epoch in range(12):
        text, stated = training_narrative_and_facts(foreign, epoch=epoch, seed=0, narrative_seed=9)
        if text == "Hand-written note.":  # the facts of a text not written here are unknown
            stored_seen += 1
            assert stated is None
        else:
            fresh_seen += 1
            assert stated is not None and record_fits(foreign, stated)
    assert stored_seen and fresh_seen

    spec = fit_feature_spec(records)
    facts = [f for _, f in written]
    drawn = Counterfactuals.draw(records, facts, random.Random(1), CounterfactualPool.from_records(records), spec)
    plain = spec.transform(records)
    assert drawn.tabular.shape == plain.shape and drawn.present.dtype == bool and drawn.present.mean() > 0.8
    assert np.all(np.any(drawn.tabular != plain, axis=1) == drawn.present)
