"""The text encoder's tokenisation settings, defined once.

Texts are truncated to the model's `max_length` (the `[CLS] ... [SEP]` template fits inside it) and a batch
is padded to its longest text with the pad token. Export writes the bundle's `tokenizer.json` with these
settings set (`training.tokenizer.batch_tokenizer`), training tokenises its batches through the same
configured tokenizer, and the embedder uses the file as it is, so no caller repeats them.
"""

from __future__ import annotations

from tokenizers import Tokenizer


def configure_tokenizer(tokenizer: Tokenizer, max_length: int, pad_id: int) -> Tokenizer:
    """Set the text encoder's truncation (to `max_length` tokens) and padding (to the longest text of a
    batch, with `pad_id`) on `tokenizer` and return it. Raises ValueError when `pad_id` is not a token."""
    pad_token = tokenizer.id_to_token(pad_id)
    if pad_token is None:
        raise ValueError(f"pad token id {pad_id} is not in the tokenizer's vocabulary")
    tokenizer.enable_truncation(max_length=max_length)
    tokenizer.enable_padding(pad_id=pad_id, pad_token=pad_token)
    return tokenizer


def configured_as(tokenizer: Tokenizer) -> tuple[int, int] | None:
    """(max_length, pad id) a tokenizer is configured with, or None when truncation or padding is off
    (a `tokenizer.json` written before the settings travelled inside it)."""
    truncation, padding = tokenizer.truncation, tokenizer.padding
    if truncation is None or padding is None or padding.get("length") is not None:
        return None
    return int(truncation["max_length"]), int(padding["pad_id"])
