"""The whole model: `tiny` from random init, every modality subset, masks, autocast, checkpoints, baseline."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file
from transformers import BertConfig, BertModel

from training.model import RetinaAlignModel, create_model, load_config
from training.model.config import ModalityDropoutConfig, ModelConfig
from training.tokenizer import load_tokenizer, train_wordpiece

TEXTS = [
    "Right eye of a 63-year-old woman with mild NPDR: only a few microaneurysms.",
    "Left eye, no diabetic retinopathy; systemic arterial hypertension.",
    "Proliferative diabetic retinopathy with neovascularisation at the disc, R4.",
    "Moderate non-proliferative diabetic retinopathy, dot and blot haemorrhages.",
]
TABULAR_WIDTH = 24
IMAGE_SIZE = load_config("tiny").vision.image.size
ALL_LOSSES = {
    "contrastive_image_text",
    "contrastive_image_tabular",
    "contrastive_text_tabular",
    "contrastive_text_record",
    "image_reconstruction",
    "text_mlm",
    "icdr",
    "sdrg",
    "total",
}


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory):
    return train_wordpiece(TEXTS * 2, 300, tmp_path_factory.mktemp("tok"))


def every_loss_config() -> ModelConfig:
    """`tiny` with the reconstruction losses on (its budget setting has them off), as `paper` trains."""
    config = load_config("tiny").model_dump()
    config["losses"] |= {"image_reconstruction": 0.5, "text_mlm": 0.5, "icdr_image_only": 0.0, "sdrg_image_only": 0.0}
    return ModelConfig.model_validate(config)


@pytest.fixture(scope="module")
def tiny(tokenizer) -> RetinaAlignModel:
    torch.manual_seed(0)
    return create_model(every_loss_config(), tabular_width=TABULAR_WIDTH, tokenizer=tokenizer)


def _batch(tokenizer, size: int = 4, image_size: int = IMAGE_SIZE, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    text = tokenizer([TEXTS[i % len(TEXTS)] for i in range(size)], padding=True, return_tensors="pt")
    return {
        "pixels": torch.randn(size, 3, image_size, image_size, generator=gen),
        "input_ids": text["input_ids"],
        "attention_mask": text["attention_mask"],
        "tabular": torch.randn(size, TABULAR_WIDTH, generator=gen),
        "icdr": torch.tensor([0, 2, -100, 4][:size] + [1] * max(0, size - 4)),
        "sdrg": torch.tensor([0, 1, 3, -100][:size] + [1] * max(0, size - 4)),
    }


def test_all_modalities_give_every_loss_and_every_parameter_learns(tiny, tokenizer) -> None:
    tiny.train()
    tiny.zero_grad()
    losses = tiny(_batch(tokenizer))
    assert set(losses) == ALL_LOSSES
    assert all(torch.isfinite(v) and v.ndim == 0 for v in losses.values())
    losses["total"].backward()
    assert [n for n, p in tiny.named_parameters() if p.grad is None] == []


@pytest.mark.parametrize(
    ("keys", "expected"),
    [
        (("pixels",), {"image_reconstruction", "icdr", "sdrg"}),
        (("input_ids", "attention_mask"), {"text_mlm", "icdr", "sdrg"}),
        (("pixels", "tabular"), {"contrastive_image_tabular", "image_reconstruction", "icdr", "sdrg"}),
    ],
)
def test_each_modality_subset_trains(tiny, tokenizer, keys: tuple[str, ...], expected: set[str]) -> None:
    batch = _batch(tokenizer)
    subset = {k: batch[k] for k in (*keys, "icdr", "sdrg")}
    tiny.train()
    losses = tiny(subset)
    assert set(losses) == expected | {"total"}
    losses["total"].backward()


def test_image_only_grading_is_the_loss_of_grading_the_photograph_alone(tokenizer) -> None:
    config = load_config("tiny").model_dump()
    config["losses"] |= {"icdr_image_only": 1.0, "sdrg_image_only": 0.5}
    torch.manual_seed(0)
    model = create_model(ModelConfig.model_validate(config), tabular_width=TABULAR_WIDTH, tokenizer=tokenizer)
    model.set_class_weights(torch.tensor([0.5, 1.0, 1.0, 2.0, 2.0]), torch.ones(5))
    batch = _batch(tokenizer)
    model.train()  # tiny has no dropout inside the towers or the fusion: train and eval passes agree
    losses = model(batch)
    assert {"icdr_image_only", "sdrg_image_only", "icdr", "sdrg"} <= set(losses)
    with torch.no_grad():
        alone = model.fuse(pixels=batch["pixels"])
    expected = torch.nn.functional.cross_entropy(
        alone.icdr_logits, batch["icdr"], weight=model.icdr_class_weights, ignore_index=-100
    )
    torch.testing.assert_close(losses["icdr_image_only"].detach(), expected, rtol=1e-4, atol=1e-5)
    total = sum(w * losses[n] for n, w in (("icdr_image_only", 1.0), ("sdrg_image_only", 0.5)))
    assert float(losses["total"].detach()) > float(total.detach())
    # Only the image path feeds it: no text-tower gradient comes from this loss alone.
    model.zero_grad()
    losses["icdr_image_only"].backward()
    assert all(p.grad is None or not p.grad.any() for p in model.text.parameters())
    assert any(p.grad is not None and p.grad.any() for p in model.image.parameters())


def test_embeddings_are_unit_norm_with_the_shared_width(tiny, tokenizer) -> None:
    tiny.eval()
    batch = _batch(tokenizer, size=3)
    embeddings = [
        tiny.encode_image(batch["pixels"]),
        tiny.encode_text(batch["input_ids"], batch["attention_mask"]),
        tiny.encode_tabular(batch["tabular"]),
        tiny.encode_record(batch["pixels"], batch["tabular"]),
        tiny.encode_record(batch["pixels"]),
    ]
    for e in embeddings:
        assert e.shape == (3, 128)
        torch.testing.assert_close(e.norm(dim=-1), torch.ones(3))


def test_fuse_accepts_any_subset(tiny, tokenizer) -> None:
    tiny.eval()
    b = _batch(tokenizer, size=2)
    text = {"input_ids": b["input_ids"], "attention_mask": b["attention_mask"]}
    for inputs in ({"pixels": b["pixels"]}, text, {"pixels": b["pixels"], "tabular": b["tabular"]}, {**b}):
        inputs = {k: v for k, v in inputs.items() if k in ("pixels", "input_ids", "attention_mask", "tabular")}
        out = tiny.fuse(**inputs)
        assert out.icdr_logits.shape == (2, 5) and out.sdrg_logits.shape == (2, 5) and out.cls.shape == (2, 128)


def test_a_hidden_modality_changes_nothing(tiny, tokenizer) -> None:
    tiny.eval()
    b = _batch(tokenizer, size=2)
    with torch.no_grad():
        image_only = tiny.fuse(pixels=b["pixels"], tabular=b["tabular"])
        hidden = torch.zeros(2, dtype=torch.bool)
        with_text_hidden = tiny.fuse(
            b["pixels"], b["input_ids"], b["attention_mask"], b["tabular"], text_present=hidden
        )
        other_ids = torch.randint(5, len(tokenizer), b["input_ids"].shape)
        other_text_hidden = tiny.fuse(b["pixels"], other_ids, b["attention_mask"], b["tabular"], text_present=hidden)
        per_sample = tiny.fuse(
            b["pixels"], b["input_ids"], b["attention_mask"], b["tabular"], text_present=torch.tensor([True, False])
        )
    for out in (with_text_hidden, other_text_hidden):
        torch.testing.assert_close(out.icdr_logits, image_only.icdr_logits, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out.cls, image_only.cls, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(per_sample.cls[1], image_only.cls[1], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(per_sample.cls[0], image_only.cls[0], atol=1e-3)


def test_text_padding_is_masked(tiny, tokenizer) -> None:
    tiny.eval()
    b = _batch(tokenizer, size=2)
    ids, mask = b["input_ids"].clone(), b["attention_mask"]
    ids[mask == 0] = 7  # garbage under the padding mask
    with torch.no_grad():
        clean = tiny.fuse(input_ids=b["input_ids"], attention_mask=mask)
        dirty = tiny.fuse(input_ids=ids, attention_mask=mask)
    torch.testing.assert_close(dirty.cls, clean.cls, atol=1e-5, rtol=1e-5)


def test_modality_dropout_keeps_at_least_one_modality(tiny) -> None:
    original = tiny.config
    tiny.config = original.model_copy(
        update={"modality_dropout": ModalityDropoutConfig(image=0.95, text=0.95, tabular=0.95)}
    )
    try:
        tiny.train()
        present = tiny._modality_dropout(["image", "text", "tabular"], torch.zeros(2000))
        rows = torch.stack(list(present.values()))
        assert rows.any(dim=0).all()
        assert rows.float().mean() < 0.5  # most are hidden, yet every row keeps one
        tiny.eval()
        assert tiny._modality_dropout(["image", "text"], torch.zeros(4)) == {}
    finally:
        tiny.config = original


def test_runs_under_bf16_autocast(tiny, tokenizer) -> None:
    tiny.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = tiny(_batch(tokenizer, size=2))
        image = tiny.encode_image(torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE))
    assert all(torch.isfinite(v) for v in losses.values())
    losses["total"].backward()
    assert image.shape == (2, 128)


def test_checkpoint_round_trip_rebuilds_the_same_model(tiny, tokenizer, tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    save_file(tiny.state_dict(), str(path))
    (tmp_path / "config.json").write_text(tiny.config.model_dump_json())
    again = create_model(tmp_path / "config.json", checkpoint=path).eval()
    tiny.eval()
    b = _batch(tokenizer, size=2)
    with torch.no_grad():
        torch.testing.assert_close(again.encode_image(b["pixels"]), tiny.encode_image(b["pixels"]))
        torch.testing.assert_close(
            again.encode_text(b["input_ids"], b["attention_mask"]),
            tiny.encode_text(b["input_ids"], b["attention_mask"]),
        )


def test_image_states_in_place_of_pixels_give_the_same_losses_but_reconstruction(tokenizer) -> None:
    torch.manual_seed(0)
    model = create_model(every_loss_config(), tabular_width=TABULAR_WIDTH, tokenizer=tokenizer).eval()
    batch = _batch(tokenizer)
    with torch.no_grad():
        from_pixels = model(batch)
        states = model.image(batch["pixels"])
        from_states = model({k: v for k, v in batch.items() if k != "pixels"} | {"image_states": states})
    assert "image_reconstruction" in from_pixels and "image_reconstruction" not in from_states
    for name in set(from_states) - {"total", "text_mlm"}:  # the MLM masks are random draws
        torch.testing.assert_close(from_states[name], from_pixels[name], msg=name)


def test_lock_image_freezes_the_image_tower_and_its_projection_only(tokenizer) -> None:
    model = create_model("tiny", tabular_width=TABULAR_WIDTH, tokenizer=tokenizer)
    model.lock_image()
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen and all(n.startswith(("image.", "image_proj.")) for n in frozen)
    assert all(not p.requires_grad for p in [*model.image.parameters(), *model.image_proj.parameters()])
    assert all(p.requires_grad for p in [*model.text.parameters(), *model.tabular.parameters()])


def test_without_a_record_head_one_text_embedding_searches_both(tiny, tokenizer) -> None:
    tiny.eval()
    b = _batch(tokenizer, size=3)
    with torch.no_grad():
        image_side, record_side, tokens = tiny.encode_text_for_search(b["input_ids"], b["attention_mask"])
        torch.testing.assert_close(image_side, tiny.encode_text(b["input_ids"], b["attention_mask"]))
        torch.testing.assert_close(record_side, image_side)
        torch.testing.assert_close(tokens, tiny.encode_text_for_fusion(b["input_ids"], b["attention_mask"])[1])
    assert not any(name.startswith("text_record_proj") for name in tiny.state_dict())  # older checkpoints load


def test_a_record_head_gives_the_text_its_own_embedding_for_records(tokenizer) -> None:
    config = load_config("tiny").model_copy(update={"record_text_head": True})
    torch.manual_seed(0)
    model = create_model(config, tabular_width=TABULAR_WIDTH, tokenizer=tokenizer)
    b = _batch(tokenizer, size=4)
    model.eval()
    with torch.no_grad():
        image_side, record_side, _ = model.encode_text_for_search(b["input_ids"], b["attention_mask"])
        torch.testing.assert_close(image_side, model.encode_text(b["input_ids"], b["attention_mask"]))
        torch.testing.assert_close(record_side, model.encode_text_for_records(b["input_ids"], b["attention_mask"]))
        torch.testing.assert_close(record_side.norm(dim=-1), torch.ones(4))
    assert (image_side * record_side).sum(-1).abs().max() < 0.99  # two projections, two embeddings

    model.train()
    losses = model(b)

    def grads(loss_name: str) -> tuple[bool, bool]:
        model.zero_grad()
        losses[loss_name].backward(retain_graph=True)
        head, shared = model.text_record_proj.weight.grad, model.text_proj.weight.grad
        return head is not None and bool(head.any()), shared is not None and bool(shared.any())

    # The facts side (records, tabular data) trains the record head only; the photographs the shared one only.
    assert grads("contrastive_text_record") == (True, False)
    assert grads("contrastive_text_tabular") == (True, False)
    assert grads("contrastive_image_text") == (False, True)


def test_the_text_grade_terms_pull_each_text_side_to_its_own_gallery(tokenizer) -> None:
    config = load_config("tiny").model_dump() | {"record_text_head": True}
    config["losses"] |= {"text_image_grade_contrastive": 1.0, "text_record_grade_contrastive": 1.0}
    torch.manual_seed(0)
    model = create_model(ModelConfig.model_validate(config), tabular_width=TABULAR_WIDTH, tokenizer=tokenizer)
    losses = model(_batch(tokenizer, size=4))
    assert losses["text_image_grade_contrastive"] > 0 and losses["text_record_grade_contrastive"] > 0

    def trained(loss_name: str) -> set[str]:
        model.zero_grad()
        losses[loss_name].backward(retain_graph=True)
        names = ("text_proj", "text_record_proj", "record_proj", "image_proj")
        return {n for n in names if getattr(model, n).weight.grad is not None and getattr(model, n).weight.grad.any()}

    assert trained("text_image_grade_contrastive") == {"text_proj", "image_proj"}
    assert trained("text_record_grade_contrastive") == {"text_record_proj", "record_proj"}
    assert not {"text_image_grade_contrastive", "text_record_grade_contrastive"} & set(
        model({k: v for k, v in _batch(tokenizer, size=4).items() if k not in ("icdr", "sdrg")}))
    # a minimum grade leaves the texts below it out as queries: above every grade of the batch nothing is left
    def record_term(min_icdr: int) -> float:
        config["losses"]["text_grade_min_icdr"] = min_icdr
        other = create_model(ModelConfig.model_validate(config), tabular_width=TABULAR_WIDTH, tokenizer=tokenizer)
        other.load_state_dict(model.state_dict())
        return other.eval()(_batch(tokenizer, size=4))["text_record_grade_contrastive"].item()

    assert record_term(5) == 0 and record_term(1) != pytest.approx(record_term(0))
    config["losses"]["text_grade_min_icdr"] = 0
    # the record term alone still scores records (and trains their projection) without the instance term
    config["losses"] |= {"contrastive_text_record": 0.0, "text_image_grade_contrastive": 0.0}
    alone = create_model(ModelConfig.model_validate(config), tabular_width=TABULAR_WIDTH, tokenizer=tokenizer)
    assert alone.record_proj.weight.requires_grad and "text_record_grade_contrastive" in alone(_batch(tokenizer))


def test_grade_counterfactual_records_add_a_negative_of_another_grade_to_each_text(tokenizer) -> None:
    config = load_config("tiny").model_dump()
    config["losses"] |= {"grade_counterfactual_records": True}
    torch.manual_seed(0)
    model = create_model(ModelConfig.model_validate(config), tabular_width=TABULAR_WIDTH, tokenizer=tokenizer).eval()
    plain = create_model(load_config("tiny"), tabular_width=TABULAR_WIDTH, tokenizer=tokenizer).eval()
    plain.load_state_dict(model.state_dict())
    batch = _batch(tokenizer, size=4)  # grades 0, 2, unknown, 4: three rows get a negative
    with torch.no_grad():
        hard, present = model._record_hard_negatives(batch, model.image(batch["pixels"]),
                                                     model.tabular(batch["tabular"]))
        assert hard.shape == (4, 1, model.config.embed_dim) and present[:, 0].tolist() == [True, True, False, True]
        assert model(batch)["contrastive_text_record"] > plain(batch)["contrastive_text_record"]
        one_grade = batch | {"icdr": torch.full((4,), 2)}  # no other grade in the batch: nothing is added
        torch.testing.assert_close(model(one_grade)["contrastive_text_record"],
                                   plain(one_grade)["contrastive_text_record"])


def test_a_mean_pooled_record_head_reads_every_token_and_ignores_padding(tokenizer) -> None:
    config = load_config("tiny").model_copy(update={"record_text_head": True, "record_text_pooling": "mean"})
    torch.manual_seed(0)
    model = create_model(config, tabular_width=TABULAR_WIDTH, tokenizer=tokenizer).eval()
    padded = tokenizer(TEXTS[:2], padding=True, return_tensors="pt")
    alone = tokenizer(TEXTS[1:2], return_tensors="pt")
    assert padded["attention_mask"][1].sum() < padded["attention_mask"].shape[1]  # the second text is padded
    with torch.no_grad():
        states = model.text(padded["input_ids"], padded["attention_mask"])
        mask = padded["attention_mask"].unsqueeze(-1).float()
        expected = torch.nn.functional.normalize(
            model.text_record_proj((states * mask).sum(1) / mask.sum(1)), dim=-1)
        got = model.encode_text_for_records(padded["input_ids"], padded["attention_mask"])
        torch.testing.assert_close(got, expected)
        torch.testing.assert_close(got[1:], model.encode_text_for_records(alone["input_ids"], alone["attention_mask"]),
                                   atol=1e-5, rtol=1e-4)
        cls = torch.nn.functional.normalize(model.text_record_proj(states[:, 0]), dim=-1)
    assert not torch.allclose(got, cls, atol=1e-3)


def test_image_uniformity_is_a_loss_that_trains_the_image_tower(tokenizer) -> None:
    config = load_config("tiny").model_dump()
    config["losses"]["image_uniformity"] = 1.0
    torch.manual_seed(0)
    model = create_model(ModelConfig.model_validate(config), tabular_width=TABULAR_WIDTH, tokenizer=tokenizer)
    losses = model(_batch(tokenizer, size=4))
    assert losses["image_uniformity"] < 0
    model.zero_grad()
    losses["image_uniformity"].backward()
    assert any(p.grad is not None and p.grad.any() for p in model.image.parameters())
    assert model.text_proj.weight.grad is None  # a loss of the image embeddings alone
    assert "image_uniformity" not in create_model(load_config("tiny"), tabular_width=TABULAR_WIDTH,
                                                  tokenizer=tokenizer)(_batch(tokenizer, size=4))


def test_clip_baseline_trains_image_text_contrastive_only(tokenizer) -> None:
    model = create_model("clip-baseline", tabular_width=TABULAR_WIDTH, tokenizer=tokenizer)
    assert model.image_decoder is None and model.mlm_head is None
    model.train()
    losses = model(_batch(tokenizer, size=2))
    assert set(losses) == {"contrastive_image_text", "total"}
    losses["total"].backward()
    trained = {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad}
    assert trained == {"image", "text", "image_proj", "text_proj", "logit_scales"}
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    assert [n for n, p in model.logit_scales.named_parameters() if p.requires_grad] == ["image_text"]
    image = model.encode_image(torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE))
    text = tokenizer(TEXTS, padding=True, return_tensors="pt")
    prompts = model.encode_text(text["input_ids"], text["attention_mask"])
    assert model.zero_shot_logits(image, prompts).shape == (2, 4)


def test_create_model_loads_local_weights_named_in_a_json_config(tmp_path: Path) -> None:
    vit_kwargs = {"depth": 1, "embed_dim": 48, "num_heads": 3}
    vit = timm.create_model("vit_tiny_patch16_224", img_size=32, num_classes=0, **vit_kwargs)
    save_file(vit.state_dict(), str(tmp_path / "vit.safetensors"))
    tokenizer = train_wordpiece(TEXTS * 2, 300, tmp_path / "bert")
    bert_arch = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64}
    bert = BertModel(BertConfig(vocab_size=len(tokenizer), **bert_arch))
    bert.save_pretrained(tmp_path / "bert")
    config = load_config("tiny").model_dump(mode="json")
    config["name"] = "local"
    config["vision"] |= {"image_size": 32, "timm_kwargs": vit_kwargs, "pretrained": True}
    config["vision"]["pretrained_file"] = str(tmp_path / "vit.safetensors")
    config["text"] = {"hf_model_name": str(tmp_path / "bert"), "pretrained": True}
    (tmp_path / "local.json").write_text(json.dumps(config))

    loaded = load_config(tmp_path / "local.json")
    model = create_model(
        tmp_path / "local.json", tabular_width=8, tokenizer=load_tokenizer(loaded.text.tokenizer_source)
    )
    torch.testing.assert_close(model.image.trunk.blocks[0].attn.qkv.weight, vit.blocks[0].attn.qkv.weight)
    torch.testing.assert_close(model.text.word_embeddings, bert.get_input_embeddings().weight)
    assert model.config.text.vocab_size == len(tokenizer) and model.config.text.mask_token_id == tokenizer.mask_token_id
    batch = _batch(tokenizer, size=2, image_size=32)
    model.train()
    model({**batch, "tabular": torch.randn(2, 8)})["total"].backward()


@pytest.mark.slow
def test_paper_config_builds_and_trains_one_step_at_random_init() -> None:
    start = time.perf_counter()
    model = create_model("paper", tabular_width=TABULAR_WIDTH, pretrained=False)
    built = time.perf_counter()
    assert model.image.width == 768 and model.text.width == 768 and model.text.vocab_size == 28996
    batch = {
        "pixels": torch.randn(2, 3, 224, 224),
        "input_ids": torch.randint(104, 28996, (2, 128)),
        "attention_mask": torch.ones(2, 128, dtype=torch.long),
        "tabular": torch.randn(2, TABULAR_WIDTH),
        "icdr": torch.tensor([0, 3]),
        "sdrg": torch.tensor([0, 2]),
    }
    batch["input_ids"][:, 0], batch["input_ids"][:, -1] = 101, 102
    model.train()
    losses = model(batch)
    assert set(losses) == ALL_LOSSES
    losses["total"].backward()
    model.eval()
    with torch.no_grad():
        assert model.encode_image(batch["pixels"]).shape == (2, 512)
        assert model.encode_text(batch["input_ids"], batch["attention_mask"]).shape == (2, 512)
        assert model.fuse(pixels=batch["pixels"]).icdr_logits.shape == (2, 5)
    done = time.perf_counter()
    params = sum(p.numel() for p in model.parameters())
    print(f"paper: {params / 1e6:.1f} M parameters, built in {built - start:.1f} s, step {done - built:.1f} s")
