"""The WordPiece trained on the archive's narratives: BERT conventions, saved, reloaded, deterministic."""

from __future__ import annotations

from pathlib import Path

from transformers import AutoTokenizer

from training.tokenizer import SPECIAL_TOKENS, load_tokenizer, train_wordpiece

TEXTS = [
    "Right eye of a 63-year-old woman with mild NPDR: only a few microaneurysms.",
    "Left eye, no diabetic retinopathy; systemic arterial hypertension.",
    "Proliferative diabetic retinopathy with neovascularisation at the disc.",
] * 4


def test_trained_wordpiece_follows_bert_conventions(tmp_path: Path) -> None:
    tokenizer = train_wordpiece(TEXTS, 300, tmp_path / "tok", max_length=16)
    assert tokenizer.convert_ids_to_tokens(list(range(5))) == list(SPECIAL_TOKENS)
    encoded = tokenizer("RIGHT eye, NPDR!", padding="max_length", max_length=16, truncation=True)
    tokens = tokenizer.convert_ids_to_tokens(encoded["input_ids"])
    assert tokens[:4] == ["[CLS]", "right", "eye", ","] and "[SEP]" in tokens and tokens[-1] == "[PAD]"
    assert "[UNK]" not in tokenizer.tokenize("unseen words split into pieces")  # every letter is known
    assert tokenizer.model_max_length == 16


def test_saved_tokenizer_reloads_offline_with_autotokenizer(tmp_path: Path) -> None:
    tokenizer = train_wordpiece(TEXTS, 300, tmp_path / "tok")
    assert (tmp_path / "tok" / "tokenizer.json").is_file()
    for reloaded in (AutoTokenizer.from_pretrained(tmp_path / "tok"), load_tokenizer(tmp_path / "tok")):
        assert reloaded.get_vocab() == tokenizer.get_vocab()
        assert reloaded(TEXTS[0])["input_ids"] == tokenizer(TEXTS[0])["input_ids"]


def test_training_is_deterministic_and_respects_vocab_size(tmp_path: Path) -> None:
    first = train_wordpiece(TEXTS, 200, tmp_path / "a")
    second = train_wordpiece(TEXTS, 200, tmp_path / "b")
    assert first.get_vocab() == second.get_vocab()
    assert len(first) <= 200
    assert (tmp_path / "a" / "tokenizer.json").read_bytes() == (tmp_path / "b" / "tokenizer.json").read_bytes()
