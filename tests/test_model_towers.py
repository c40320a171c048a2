"""Towers load real weights through timm and transformers, strictly, from local files made here."""

from __future__ import annotations

import logging
from pathlib import Path

import huggingface_hub.constants
import pytest
import timm
import torch
from safetensors.torch import load_file, save_file
from transformers import BertConfig, BertForPreTraining, BertModel

from training.model.config import TextConfig, VisionConfig
from training.model.towers import ImageTower, TextTower, WeightsLoadError, build_text_model, build_timm_model
from training.tokenizer import load_tokenizer, train_wordpiece

VIT_KWARGS = {"depth": 1, "embed_dim": 48, "num_heads": 3}
BERT = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64}


def _vision(**fields: object) -> VisionConfig:
    return VisionConfig(model_name="vit_tiny_patch16_224", image_size=32, timm_kwargs=VIT_KWARGS, **fields)


def _timm_checkpoint(path: Path, num_classes: int, extra: dict[str, torch.Tensor] | None = None) -> dict:
    source = timm.create_model("vit_tiny_patch16_224", img_size=32, num_classes=num_classes, **VIT_KWARGS)
    state = {k: v.contiguous() for k, v in source.state_dict().items()} | (extra or {})
    if path.suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save(state, path)
    return state


def _same_weights(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> bool:
    own = model.state_dict()
    return all(torch.equal(own[k], v) for k, v in state.items() if k in own) and len(own) > 0


@pytest.mark.parametrize(("suffix", "num_classes"), [(".safetensors", 10), (".pth", 0)])
def test_timm_weights_load_from_a_local_file_and_the_head_is_dropped(
    tmp_path: Path, suffix: str, num_classes: int
) -> None:
    path = tmp_path / f"vit{suffix}"
    state = _timm_checkpoint(path, num_classes)
    model = build_timm_model(_vision(pretrained_file=str(path)), pretrained=True)
    assert model.num_classes == 0 and "head.weight" not in model.state_dict()
    assert _same_weights(model, state)


def test_timm_checkpoint_with_an_unexpected_key_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "vit.safetensors"
    _timm_checkpoint(path, 0, extra={"blocks.0.extra.weight": torch.zeros(3)})
    with pytest.raises(WeightsLoadError, match="blocks.0.extra.weight"):
        build_timm_model(_vision(pretrained_file=str(path)), pretrained=True)


def test_timm_checkpoint_with_a_missing_key_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "vit.safetensors"
    state = _timm_checkpoint(path, 10)
    del state["blocks.0.mlp.fc1.bias"]
    save_file(state, str(path))
    with pytest.raises(WeightsLoadError, match="blocks.0.mlp.fc1.bias"):
        build_timm_model(_vision(pretrained_file=str(path)), pretrained=True)


def test_missing_weights_file_is_an_error_not_random_init(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        build_timm_model(_vision(pretrained_file=str(tmp_path / "absent.pth")), pretrained=True)


def test_unreachable_hub_falls_back_to_random_init_with_a_warning(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    caplog.set_level(logging.WARNING, logger="training.model.towers")
    model = build_timm_model(_vision(), pretrained=True)
    assert model.num_classes == 0
    text = build_text_model(
        TextConfig(hf_model_name="emilyalsentzer/Bio_ClinicalBERT", pretrained=True, bert_config=BERT, vocab_size=50),
        pretrained=True,
    )
    assert isinstance(text, BertModel) and text.config.vocab_size == 50
    assert sum("unreachable" in r.getMessage() and "random init" in r.getMessage() for r in caplog.records) == 2


def test_image_tower_exposes_tokens_pooling_and_patch_grid() -> None:
    tower = ImageTower(_vision(), pretrained=False).eval()
    assert (tower.patch_size, tower.grid_size, tower.num_patches, tower.width) == (16, (2, 2), 4, 48)
    pixels = torch.randn(2, 3, 32, 32)
    tokens = tower(pixels)
    assert tokens.shape == (2, 1 + 4, 48)
    torch.testing.assert_close(tower.pool(tokens), tokens[:, 0])
    every_patch = torch.arange(4).expand(2, 4)
    torch.testing.assert_close(tower.forward_visible(pixels, every_patch), tokens)
    assert tower.forward_visible(pixels, torch.tensor([[0], [3]])).shape == (2, 2, 48)


def _save_bert(folder: Path, texts: list[str]) -> tuple[Path, BertModel]:
    tokenizer = train_wordpiece(texts, 120, folder)
    model = BertModel(BertConfig(vocab_size=len(tokenizer), **BERT), add_pooling_layer=True)
    model.save_pretrained(folder)
    return folder, model


TEXTS = ["mild npdr with a few microaneurysms", "no diabetic retinopathy in the left eye"] * 3


def test_bert_and_its_tokenizer_load_from_a_saved_folder(tmp_path: Path) -> None:
    folder, source = _save_bert(tmp_path / "bert", TEXTS)
    config = TextConfig(hf_model_name=str(folder), pretrained=True)
    tower = TextTower(config)
    tokenizer = load_tokenizer(config.tokenizer_source)
    assert tower.vocab_size == len(tokenizer) and tower.width == 32
    own = tower.encoder.state_dict()
    assert all(torch.equal(own[k], v) for k, v in source.state_dict().items() if not k.startswith("pooler."))
    batch = tokenizer(TEXTS[:2], padding=True, return_tensors="pt")
    states = tower(batch["input_ids"], batch["attention_mask"])
    assert states.shape == (2, batch["input_ids"].shape[1], 32)


def test_pretraining_heads_and_pooler_are_known_leftovers(tmp_path: Path) -> None:
    tokenizer = train_wordpiece(TEXTS, 120, tmp_path / "bert")
    BertForPreTraining(BertConfig(vocab_size=len(tokenizer), **BERT)).save_pretrained(tmp_path / "bert")
    model = build_text_model(TextConfig(hf_model_name=str(tmp_path / "bert"), pretrained=True), pretrained=True)
    assert isinstance(model, BertModel) and model.pooler is None


def test_bert_checkpoint_with_an_unexpected_key_is_refused(tmp_path: Path) -> None:
    folder, _ = _save_bert(tmp_path / "bert", TEXTS)
    state = load_file(str(folder / "model.safetensors"))
    state["encoder.layer.0.extra.weight"] = torch.zeros(3)
    state["embeddings.position_ids"] = torch.arange(512)[None]  # FLAIR #8: a known buffer, tolerated
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(WeightsLoadError, match=r"unexpected \['encoder.layer.0.extra.weight'\]"):
        build_text_model(TextConfig(hf_model_name=str(folder), pretrained=True), pretrained=True)


def test_bert_checkpoint_with_a_missing_key_is_refused(tmp_path: Path) -> None:
    folder, _ = _save_bert(tmp_path / "bert", TEXTS)
    state = load_file(str(folder / "model.safetensors"))
    del state["encoder.layer.0.output.dense.bias"]
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(WeightsLoadError, match="encoder.layer.0.output.dense.bias"):
        build_text_model(TextConfig(hf_model_name=str(folder), pretrained=True), pretrained=True)


def test_text_tower_from_scratch_uses_the_tokenizer_vocabulary() -> None:
    tower = TextTower(TextConfig(tokenizer="train", bert_config=BERT, vocab_size=77))
    assert tower.vocab_size == 77 and tower.word_embeddings.shape == (77, 32)


def test_a_convolutional_stem_feeds_the_transformer_its_feature_map() -> None:
    from training.model.config import StemConfig

    config = VisionConfig(model_name="vit_tiny_patch16_224", image_size=64, pretrained=False,
                          timm_kwargs={"depth": 1, "patch_size": 2},
                          stem=StemConfig(model_name="lcnet_050", out_index=3))
    tower = ImageTower(config)
    assert type(tower.trunk.patch_embed).__name__ == "HybridEmbed"
    # lcnet_050's stage 3 has stride 16 (4x4 cells at 64 px), the 2x2 patch projection makes a 2x2 grid
    assert tower.grid_size == (2, 2) and tower.num_patches == 4 and tower.patch_size == 32
    tokens = tower(torch.randn(2, 3, 64, 64))
    assert tokens.shape == (2, 1 + 4, tower.width)
    tokens.sum().backward()
    stem_grads = [p.grad for p in tower.trunk.patch_embed.backbone.parameters()]
    assert all(g is not None for g in stem_grads) and any(g.abs().sum() > 0 for g in stem_grads)


def test_a_stem_starts_from_random_init_even_when_pretrained_is_asked(caplog: pytest.LogCaptureFixture) -> None:
    from training.model.config import StemConfig

    config = VisionConfig(model_name="vit_tiny_patch16_224", image_size=64, pretrained=True,
                          timm_kwargs={"depth": 1, "patch_size": 2}, stem=StemConfig())
    with caplog.at_level(logging.WARNING):
        ImageTower(config)
    assert "convolutional stem starts from random init" in caplog.text
