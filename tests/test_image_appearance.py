"""The image embedding split into a grade part and an appearance part (`ModelConfig.image_appearance_dims`)."""

from __future__ import annotations

import math

import pytest
import torch
from pydantic import ValidationError

from training.model import create_model, load_config
from training.model.config import ModelConfig
from training.tokenizer import train_wordpiece

TABULAR_WIDTH = 24
SHARE = 0.6
APPEARANCE = 16
TEXTS = ["Right eye, no diabetic retinopathy.", "Left eye of a 70-year-old man with proliferative DR, R3."]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory):
    return train_wordpiece(TEXTS * 4, 200, tmp_path_factory.mktemp("tok"))


def _config(**losses: float) -> ModelConfig:
    config = load_config("tiny").model_dump()
    config |= {"image_appearance_dims": APPEARANCE, "image_appearance_share": SHARE}
    config["losses"] |= {"image_grade_contrastive": 1.0, "image_appearance_uniformity": 1.0} | losses
    return ModelConfig.model_validate(config)


def _batch(tokenizer, size: int = 4) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    image_size = load_config("tiny").vision.image.size
    text = tokenizer([TEXTS[i % 2] for i in range(size)], padding=True, return_tensors="pt")
    return {"pixels": torch.randn(size, 3, image_size, image_size, generator=gen),
            "input_ids": text["input_ids"], "attention_mask": text["attention_mask"],
            "tabular": torch.randn(size, TABULAR_WIDTH, generator=gen),
            "icdr": torch.tensor([0, 0, 4, 4][:size]), "sdrg": torch.tensor([0, 0, 3, 3][:size])}


def test_the_image_embedding_joins_a_grade_part_and_an_appearance_part_by_their_shares(tokenizer) -> None:
    torch.manual_seed(0)
    model = create_model(_config(), tabular_width=TABULAR_WIDTH, tokenizer=tokenizer).eval()
    pixels = _batch(tokenizer)["pixels"]
    with torch.no_grad():
        image = model.encode_image(pixels)
        pooled = model.image.pool(model.image(pixels))
    dim = model.config.embed_dim
    assert image.shape == (4, dim)
    torch.testing.assert_close(image.norm(dim=-1), torch.ones(4))
    grade, appearance = image[:, : dim - APPEARANCE], image[:, dim - APPEARANCE :]
    torch.testing.assert_close(appearance.norm(dim=-1), torch.full((4,), SHARE))
    expected = torch.nn.functional.normalize(model.image_appearance_proj(pooled), dim=-1) * SHARE
    torch.testing.assert_close(appearance, expected)
    expected = torch.nn.functional.normalize(model.image_proj(pooled), dim=-1) * math.sqrt(1 - SHARE**2)
    torch.testing.assert_close(grade, expected)


def test_photographs_with_one_grade_part_read_by_their_appearance(tokenizer) -> None:
    """Identical grade parts: the similarity is (1 - share^2) + share^2 * (appearance cosine)."""
    model = create_model(_config(), tabular_width=TABULAR_WIDTH, tokenizer=tokenizer)
    grade = torch.nn.functional.normalize(torch.ones(2, model.config.embed_dim - APPEARANCE), dim=-1)
    appearance = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0] + [0.0] * (APPEARANCE - 2),
                                                             [0.0, 1.0] + [0.0] * (APPEARANCE - 2)]), dim=-1)
    joined = model._join_image_parts(grade, appearance)
    assert float(joined[0] @ joined[1]) == pytest.approx(1 - SHARE**2)
    assert float(joined[0] @ joined[0]) == pytest.approx(1.0)


def test_the_appearance_loss_trains_the_appearance_part_and_the_grade_loss_the_grade_part(tokenizer) -> None:
    torch.manual_seed(0)
    model = create_model(_config(), tabular_width=TABULAR_WIDTH, tokenizer=tokenizer)
    losses = model(_batch(tokenizer))
    assert losses["image_appearance_uniformity"] < 0
    model.zero_grad()
    losses["image_appearance_uniformity"].backward()
    assert model.image_appearance_proj.weight.grad.any()
    assert model.image_proj.weight.grad is None or not model.image_proj.weight.grad.any()
    assert any(p.grad is not None and p.grad.any() for p in model.image.parameters())
    model.zero_grad()
    model(_batch(tokenizer))["image_grade_contrastive"].backward()
    assert model.image_proj.weight.grad.any()
    assert model.image_appearance_proj.weight.grad is None or not model.image_appearance_proj.weight.grad.any()


def _with(**update: object) -> ModelConfig:
    return ModelConfig.model_validate(_config().model_dump() | update)


def test_the_appearance_part_can_read_the_patch_tokens_beside_the_pooled_feature(tokenizer) -> None:
    torch.manual_seed(0)
    model = create_model(_with(image_appearance_input="pooled_and_patches"), tabular_width=TABULAR_WIDTH,
                         tokenizer=tokenizer).eval()
    assert model.image_appearance_proj.in_features == 2 * model.image.width
    pixels = _batch(tokenizer)["pixels"]
    with torch.no_grad():
        states = model.image(pixels)
        features = torch.cat([model.image.pool(states), states[:, model.image.num_prefix_tokens :].mean(dim=1)], -1)
        appearance = model.encode_image(pixels)[:, -APPEARANCE:]
    expected = torch.nn.functional.normalize(model.image_appearance_proj(features), dim=-1) * SHARE
    torch.testing.assert_close(appearance, expected)


def test_a_detached_appearance_part_teaches_the_image_tower_nothing(tokenizer) -> None:
    torch.manual_seed(0)
    model = create_model(_with(image_appearance_detach=True), tabular_width=TABULAR_WIDTH, tokenizer=tokenizer)
    model(_batch(tokenizer))["image_appearance_uniformity"].backward()
    assert model.image_appearance_proj.weight.grad.any()
    assert all(p.grad is None or not p.grad.any() for p in model.image.parameters())


def test_the_appearance_projection_can_be_a_two_layer_mlp(tokenizer) -> None:
    torch.manual_seed(0)
    model = create_model(_with(image_appearance_hidden=32), tabular_width=TABULAR_WIDTH, tokenizer=tokenizer)
    first, _, last = model.image_appearance_proj
    assert (first.in_features, first.out_features, last.out_features) == (model.image.width, 32, APPEARANCE)
    pixels = _batch(tokenizer)["pixels"]
    with torch.no_grad():
        appearance = model.encode_image(pixels)[:, -APPEARANCE:]
        pooled = model.image.pool(model.image(pixels))
    expected = torch.nn.functional.normalize(last(torch.nn.functional.gelu(first(pooled))), dim=-1) * SHARE
    torch.testing.assert_close(appearance, expected)


def test_the_grade_projection_can_be_a_two_layer_mlp_too(tokenizer) -> None:
    torch.manual_seed(0)
    model = create_model(_with(image_grade_hidden=48), tabular_width=TABULAR_WIDTH, tokenizer=tokenizer)
    first, _, last = model.image_proj
    grade_dims = model.config.embed_dim - APPEARANCE
    assert (first.in_features, first.out_features, last.out_features) == (model.image.width, 48, grade_dims)
    pixels = _batch(tokenizer)["pixels"]
    with torch.no_grad():
        grade = model.encode_image(pixels)[:, :grade_dims]
        pooled = model.image.pool(model.image(pixels))
    expected = torch.nn.functional.normalize(last(torch.nn.functional.gelu(first(pooled))), dim=-1)
    torch.testing.assert_close(grade, expected * math.sqrt(1 - SHARE**2))
    model(_batch(tokenizer))["image_grade_contrastive"].backward()
    assert first.weight.grad.any() and last.weight.grad.any()


def test_lock_image_freezes_the_appearance_projection_too(tokenizer) -> None:
    model = create_model(_config(), tabular_width=TABULAR_WIDTH, tokenizer=tokenizer)
    model.lock_image()
    assert not any(p.requires_grad for p in model.image_appearance_proj.parameters())
    assert all(p.requires_grad for p in model.text_proj.parameters())


def test_without_an_appearance_part_the_model_is_as_before(tokenizer) -> None:
    model = create_model("tiny", tabular_width=TABULAR_WIDTH, tokenizer=tokenizer)
    assert model.image_appearance_proj is None
    assert model.image_proj.out_features == model.config.embed_dim
    assert not any(k.startswith("image_appearance_proj") for k in model.state_dict())


@pytest.mark.parametrize(("update", "losses", "message"), [
    ({"image_appearance_dims": 128}, {}, "leaves no grade part"),
    ({}, {"image_appearance_uniformity": 1.0}, "needs image_appearance_dims"),
    ({"image_appearance_dims": 8, "image_appearance_share": 1.0}, {}, "image_appearance_share"),
])
def test_the_config_refuses_an_appearance_part_that_cannot_work(update: dict, losses: dict, message: str) -> None:
    config = load_config("tiny").model_dump() | update
    config["losses"] |= losses
    with pytest.raises(ValidationError, match=message):
        ModelConfig.model_validate(config)
