"""Text tokenizers: a WordPiece trained on the archive's narratives (for `tiny`), or a pretrained one.

`train_wordpiece` builds a BERT-style WordPiece with the `tokenizers` library (lower-casing BERT
normaliser, BERT pre-tokeniser, WordPiece model, `[CLS] ... [SEP]` template) and wraps it as a transformers
`BertTokenizerFast`, saved with `save_pretrained` so that `tokenizer.json` can travel in the bundle and
`AutoTokenizer.from_pretrained(folder)` reloads it offline.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import AutoTokenizer, BertTokenizerFast, PreTrainedTokenizerBase

from index.tokens import configure_tokenizer

SPECIAL_TOKENS: tuple[str, ...] = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
"""BERT's special tokens; a trained WordPiece gives them ids 0-4 in this order."""


def train_wordpiece(
    texts: Iterable[str], vocab_size: int, out_dir: Path, max_length: int = 128, min_frequency: int = 2
) -> PreTrainedTokenizerBase:
    """Build a lower-casing BERT WordPiece from `texts`, save it to `out_dir` and return it.

    The vocabulary is the special tokens, every character seen (alone and as a `##` continuation, so
    nothing seen is ever `[UNK]`), then whole words by descending frequency (ties by spelling) while they
    appear at least `min_frequency` times, up to `vocab_size`. Words left out split into pieces.

    Deterministic, which `tokenizers`' own WordPiece trainer is not: it breaks ties between equally
    frequent merges in hash-map order, so the same texts gave a different vocabulary on every run.
    Templated narratives have a small vocabulary, so whole words lose nothing against learned merges.
    """
    normalizer = normalizers.BertNormalizer(lowercase=True, strip_accents=True)
    pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    counts: Counter[str] = Counter()
    for text in texts:
        counts.update(word for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text)))
    alphabet = sorted({char for word in counts for char in word})
    vocab_list = [*SPECIAL_TOKENS, *alphabet, *(f"##{c}" for c in alphabet)]
    if len(vocab_list) > vocab_size:
        needed = len(vocab_list)
        raise ValueError(f"vocab_size {vocab_size} is below the {needed} special and character tokens")
    taken = set(vocab_list)
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    words = [w for w, n in ranked if n >= min_frequency and w not in taken]
    vocab_list += words[: vocab_size - len(vocab_list)]

    tokenizer = Tokenizer(models.WordPiece({t: i for i, t in enumerate(vocab_list)}, unk_token="[UNK]"))
    tokenizer.normalizer = normalizer
    tokenizer.pre_tokenizer = pre_tokenizer
    tokenizer.decoder = decoders.WordPiece(prefix="##")
    cls_id, sep_id = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    wrapped = BertTokenizerFast(
        tokenizer_object=tokenizer,
        unk_token="[UNK]",
        sep_token="[SEP]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        mask_token="[MASK]",
        do_lower_case=True,
        model_max_length=max_length,
    )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    wrapped.save_pretrained(out_dir)
    return wrapped


def load_tokenizer(path_or_name: str | Path) -> PreTrainedTokenizerBase:
    """Load a tokenizer from a saved folder or a hub id (`AutoTokenizer.from_pretrained`, fast only)."""
    try:
        return AutoTokenizer.from_pretrained(str(path_or_name), use_fast=True)
    except OSError as err:
        raise OSError(
            f"cannot load the tokenizer {str(path_or_name)!r}: not a saved tokenizer folder and not "
            f"reachable on the hub ({err})"
        ) from err


def batch_tokenizer(tokenizer: PreTrainedTokenizerBase, max_length: int) -> Tokenizer:
    """A copy of `tokenizer`'s `tokenizers` backend with the text encoder's truncation and padding
    (`index.tokens.configure_tokenizer`): what training batches are tokenised with, and what export writes
    as the bundle's `tokenizer.json`. Raises ValueError for a tokenizer without a pad token."""
    if tokenizer.pad_token_id is None:
        raise ValueError("the tokenizer has no pad token")
    backend = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
    return configure_tokenizer(backend, max_length, tokenizer.pad_token_id)


def encode_texts(tokenizer: Tokenizer, texts: Iterable[str]) -> dict[str, torch.Tensor]:
    """Texts -> `input_ids` and `attention_mask` (N, L) int64 tensors through a `batch_tokenizer`."""
    encodings = tokenizer.encode_batch(list(texts))
    return {
        "input_ids": torch.tensor([e.ids for e in encodings], dtype=torch.int64),
        "attention_mask": torch.tensor([e.attention_mask for e in encodings], dtype=torch.int64),
    }
