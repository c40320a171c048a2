"""The grade part of the search embeddings (`ModelConfig.grade_part_weight`)."""

from __future__ import annotations

import math

import pytest
import torch
from pydantic import ValidationError

from training.model import create_model, load_config
from training.model.config import ModelConfig
from training.tokenizer import train_wordpiece

TABULAR_WIDTH = 24
WEIGHT = 0.6
TEXTS = ["Right eye, no diabetic retinopathy.", "Left eye of a 70-year-old man with proliferative DR, R3."]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory):
    return train_wordpiece(TEXTS * 4, 200, tmp_path_factory.mktemp("tok"))


def _model(tokenizer, weight: float, record_text_head: bool = True):
    config = load_config("tiny").model_copy(update={"grade_part_weight": weight, "record_text_head": record_text_head})
    torch.manual_seed(0)
    return create_model(config, tabular_width=TABULAR_WIDTH, tokenizer=tokenizer).eval()


def _inputs(tokenizer, size: int = 4) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    image_size = load_config("tiny").vision.image.size
    text = tokenizer([TEXTS[i % 2] for i in range(size)], padding=True, return_tensors="pt")
    return {"pixels": torch.randn(size, 3, image_size, image_size, generator=gen),
            "input_ids": text["input_ids"], "attention_mask": text["attention_mask"],
            "tabular": torch.randn(size, TABULAR_WIDTH, generator=gen)}


def test_photographs_end_in_the_square_root_of_their_own_icdr_probabilities(tokenizer) -> None:
    model = _model(tokenizer, WEIGHT)
    inputs = _inputs(tokenizer)
    with torch.no_grad():
        image, tokens = model.encode_image_for_fusion(inputs["pixels"])
        probabilities = model.fuse(pixels=inputs["pixels"]).icdr_logits.softmax(-1)
        learnt = model._embed_image(model.image(inputs["pixels"]))
    dim = model.config.embed_dim
    assert model.search_dim == dim + 5 and image.shape == (4, dim + 5)
    torch.testing.assert_close(image.norm(dim=-1), torch.ones(4))
    torch.testing.assert_close(image[:, dim:], probabilities.sqrt() * WEIGHT)
    torch.testing.assert_close(image[:, :dim], learnt * math.sqrt(1 - WEIGHT**2))
    torch.testing.assert_close(model.encode_image(inputs["pixels"]), image)
    assert tokens.shape[-1] == model.config.fusion.width


def test_texts_against_photographs_carry_the_text_alone_grade_and_records_zeros(tokenizer) -> None:
    model = _model(tokenizer, WEIGHT)
    inputs = _inputs(tokenizer)
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    with torch.no_grad():
        image_side, record_side, _ = model.encode_text_for_search(ids, mask)
        text_alone = model.fuse(input_ids=ids, attention_mask=mask).icdr_logits.softmax(-1)
        record = model.encode_record(inputs["pixels"], inputs["tabular"])
    dim = model.config.embed_dim
    torch.testing.assert_close(image_side[:, dim:], text_alone.sqrt() * WEIGHT)
    torch.testing.assert_close(model.encode_text(ids, mask), image_side)
    torch.testing.assert_close(model.encode_text_for_records(ids, mask), record_side)
    for embedding in (record_side, record):
        assert embedding.shape == (4, dim + 5)
        assert not embedding[:, dim:].any()
        torch.testing.assert_close(embedding.norm(dim=-1), torch.ones(4))


def test_scores_mix_the_learnt_cosine_and_the_bhattacharyya_coefficient(tokenizer) -> None:
    model = _model(tokenizer, WEIGHT)
    inputs = _inputs(tokenizer)
    with torch.no_grad():
        image = model.encode_image(inputs["pixels"])
        text = model.encode_text(inputs["input_ids"], inputs["attention_mask"])
        learnt_image = model._embed_image(model.image(inputs["pixels"]))
        learnt_text = model._embed_text(model.text(inputs["input_ids"], inputs["attention_mask"]))
        p = model.fuse(pixels=inputs["pixels"]).icdr_logits.softmax(-1)
        q = model.fuse(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).icdr_logits.softmax(-1)
    expected = (1 - WEIGHT**2) * learnt_text @ learnt_image.T + WEIGHT**2 * q.sqrt() @ p.sqrt().T
    torch.testing.assert_close(text @ image.T, expected)


def test_weight_zero_leaves_every_embedding_as_it_was(tokenizer) -> None:
    model = _model(tokenizer, 0.0)
    inputs = _inputs(tokenizer)
    with torch.no_grad():
        image = model.encode_image(inputs["pixels"])
        text, record_side, _ = model.encode_text_for_search(inputs["input_ids"], inputs["attention_mask"])
        learnt = model._embed_image(model.image(inputs["pixels"]))
    assert model.search_dim == model.config.embed_dim
    torch.testing.assert_close(image, learnt)
    assert text.shape == record_side.shape == (4, model.config.embed_dim)


def test_the_training_losses_never_see_the_grade_part(tokenizer) -> None:
    inputs = _inputs(tokenizer) | {"icdr": torch.tensor([0, 0, 4, 4]), "sdrg": torch.tensor([0, 0, 3, 3])}
    with_part, without = _model(tokenizer, WEIGHT).train(), _model(tokenizer, 0.0).train()
    without.load_state_dict(with_part.state_dict())
    torch.manual_seed(1)
    a = with_part(inputs)
    torch.manual_seed(1)
    b = without(inputs)
    torch.testing.assert_close(a["total"], b["total"])


def test_the_weight_is_checked() -> None:
    tiny = load_config("tiny").model_dump()
    with pytest.raises(ValidationError, match="grade_part_weight"):
        ModelConfig.model_validate(tiny | {"grade_part_weight": 1.0})
    baseline = load_config("clip-baseline").model_dump()
    with pytest.raises(ValidationError, match="grade_part_weight needs grading 'heads'"):
        ModelConfig.model_validate(baseline | {"grade_part_weight": 0.5})


def test_without_a_record_head_texts_search_records_with_their_one_embedding(tokenizer) -> None:
    model = _model(tokenizer, WEIGHT, record_text_head=False)
    inputs = _inputs(tokenizer)
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    with torch.no_grad():
        image_side, record_side, _ = model.encode_text_for_search(ids, mask)
        for_records = model.encode_text_for_records(ids, mask)
    torch.testing.assert_close(record_side, image_side)
    torch.testing.assert_close(for_records, image_side)
