"""Model configs as data: built-in names, JSON paths, validation, resolution of data-dependent widths."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from training.model import ModelConfig, list_configs, load_config, resolve_config
from training.model.config import TextConfig
from training.model.model import CONTRASTIVE_PAIRS
from training.tokenizer import train_wordpiece


def test_builtin_configs_are_listed_and_valid() -> None:
    assert {"paper", "tiny", "clip-baseline"} <= set(list_configs())
    for name in list_configs():
        assert load_config(name).name == name


def test_paper_config_is_vit_b16_and_bio_clinicalbert() -> None:
    paper = load_config("paper")
    assert paper.vision.model_name == "vit_base_patch16_224" and paper.vision.image.size == 224
    assert paper.text.hf_model_name == "emilyalsentzer/Bio_ClinicalBERT" and paper.text.pretrained
    assert paper.text.max_length == 128 and paper.text.tokenizer_source == "emilyalsentzer/Bio_ClinicalBERT"
    assert paper.grading == "heads" and paper.losses.needs_fusion


def test_the_appearance_configs_are_the_shipped_stages_plus_an_appearance_part() -> None:
    """tiny-synth-appearance / tiny-synth-lit-appearance change nothing of tiny-synth / tiny-synth-lit but the
    appearance part (and its uniformity loss), so a run of one starts from a run of the other."""
    appearance = {"image_appearance_dims", "image_appearance_share", "image_appearance_input",
                  "image_appearance_hidden"}
    for plain, with_part in (("tiny-synth", "tiny-synth-appearance"), ("tiny-synth-lit", "tiny-synth-lit-appearance")):
        a, b = load_config(plain).model_dump(), load_config(with_part).model_dump()
        changed = {key for key in a if a[key] != b[key]}
        assert changed - {"losses"} == appearance | {"name"}
        assert b["image_appearance_dims"] == 32 and b["image_appearance_hidden"] == 256
        losses = {key for key in a["losses"] if a["losses"][key] != b["losses"][key]}
        assert losses == {"image_appearance_uniformity"} and b["losses"]["image_appearance_uniformity"] == 2.0


def test_the_facts_config_is_the_appearance_config_plus_the_grade_aware_record_terms_and_the_grade_part() -> None:
    """tiny-synth-lit-facts, the last stage of zoo:tiny-synth, changes only text->record losses of the config it
    starts from, so the facts stage loads the appearance stage's weights as they are, and adds the search
    embeddings' grade part, which no loss sees."""
    a, b = load_config("tiny-synth-lit-appearance").model_dump(), load_config("tiny-synth-lit-facts").model_dump()
    assert {key for key in a if a[key] != b[key]} == {"name", "losses", "grade_part_weight"}
    assert b["grade_part_weight"] == 0.75
    losses = {key: b["losses"][key] for key in a["losses"] if a["losses"][key] != b["losses"][key]}
    assert losses == {"grade_counterfactual_records": True, "text_record_grade_contrastive": 0.025,
                      "text_grade_min_icdr": 1}


def test_clip_baseline_shares_tiny_towers_and_trains_image_text_only() -> None:
    tiny, clip = load_config("tiny"), load_config("clip-baseline")
    assert clip.vision == tiny.vision and clip.text == tiny.text and clip.embed_dim == tiny.embed_dim
    losses = [f"contrastive_{a}_{b}" for a, b in CONTRASTIVE_PAIRS]
    grading = ["icdr", "sdrg", "icdr_image_only", "sdrg_image_only"]
    losses += ["image_reconstruction", "text_mlm", *grading]
    assert {name for name in losses if getattr(clip.losses, name) > 0} == {"contrastive_image_text"}
    # tiny's 15-minute CPU budget: every contrastive pair and grading loss, the reconstruction losses off
    # (README, Results: they cost more steps than they gave at that budget).
    assert {name for name in losses if getattr(tiny.losses, name) > 0} == {
        *(f"contrastive_{a}_{b}" for a, b in CONTRASTIVE_PAIRS), *grading
    }
    paper = load_config("paper")
    assert paper.losses.image_reconstruction > 0 and paper.losses.text_mlm > 0
    assert not clip.losses.needs_fusion and clip.grading == "zero_shot"


def test_json_path_loads_and_unknown_names_are_refused(tmp_path: Path) -> None:
    data = load_config("tiny").model_dump(mode="json") | {"name": "mine", "embed_dim": 64}
    path = tmp_path / "mine.json"
    path.write_text(json.dumps(data))
    assert load_config(path).embed_dim == 64
    assert load_config(str(path)).name == "mine"
    with pytest.raises(ValueError, match="unknown model config"):
        load_config("no-such-config")


def test_invalid_configs_name_the_problem(tmp_path: Path) -> None:
    bad = load_config("tiny").model_dump(mode="json")
    bad["fusion"]["heads"] = 3  # width 128 is not divisible by 3
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="divisible"):
        load_config(path)
    typo = load_config("tiny").model_dump(mode="json") | {"embed_dimm": 3}
    with pytest.raises(ValueError, match="embed_dimm"):
        ModelConfig.model_validate(typo)
    with pytest.raises(ValueError, match="trained tokenizer"):
        TextConfig(hf_model_name="x", pretrained=True, tokenizer="train")


def test_resolve_fills_tabular_width_and_tokenizer_ids(tmp_path: Path) -> None:
    tokenizer = train_wordpiece(["mild npdr in the right eye", "no retinopathy"] * 3, 100, tmp_path / "tok")
    config = resolve_config(load_config("tiny"), tabular_width=37, tokenizer=tokenizer)
    assert config.tabular.input_width == 37
    assert config.text.vocab_size == len(tokenizer)
    assert config.text.mask_token_id == tokenizer.mask_token_id
    assert set(config.text.special_token_ids) == set(tokenizer.all_special_ids)
    assert ModelConfig.model_validate_json(config.model_dump_json()) == config
    with pytest.raises(ValueError, match="tabular_width"):
        resolve_config(load_config("tiny"))
