"""Training data: an archive split held in memory as model-ready arrays, and batches drawn from it.

Photographs are decoded once through the same numpy preprocessing the service uses
(`index.preprocess`: field-of-view crop, square, resize) and kept as uint8; normalisation happens per
batch. A 3,000-image archive at 224 px is about 450 MB, so no data loader processes are needed.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from index.archive.brset import Archive
from index.preprocess import ImageSpec, decode_image, model_pixels
from index.records import FundusRecord
from index.tabular import FeatureSpec
from training.model.losses import IGNORE_INDEX
from training.text.counterfactual import CounterfactualPool, counterfactual
from training.text.narrative_facts import StatedFacts
from training.text.narratives import compose_narrative, write_narrative
from training.tokenizer import batch_tokenizer, encode_texts

FRESH_NARRATIVE_PROBABILITY = 0.5
"""Share of training texts written afresh each epoch (new template and field order) instead of the
archive's stored narrative, so the text tower learns the facts, not one phrasing."""


@dataclass
class SplitData:
    """One split of an archive, model-ready."""

    records: list[FundusRecord]
    images: np.ndarray  # (N, size, size, 3) uint8, field of view cropped and squared
    tabular: np.ndarray  # (N, F) float32, FeatureSpec.transform
    icdr: np.ndarray  # (N,) int64, IGNORE_INDEX where missing
    sdrg: np.ndarray  # (N,) int64

    def __len__(self) -> int:
        return len(self.records)


def load_photo(path: Path, image_spec: ImageSpec) -> np.ndarray:
    """One archive photograph as a (size, size, 3) uint8 array, prepared exactly as serving prepares it
    (`index.preprocess.model_pixels`: decode, FOV crop, square, resize, illumination)."""
    return model_pixels(decode_image(path), image_spec)


def load_split(
    archive: Archive,
    image_ids: Sequence[str],
    image_spec: ImageSpec,
    spec: FeatureSpec,
    on_progress: Callable[[int], None] | None = None,
) -> SplitData:
    """Decode a split's photographs and encode its labels and structured data."""
    by_id = {r.image_id: r for r in archive.records}
    unknown = [i for i in image_ids if i not in by_id]
    if unknown:
        raise ValueError(f"{len(unknown)} split ids are not in the archive, e.g. {unknown[:3]}")
    records = [by_id[i] for i in image_ids]
    paths = []
    for record in records:
        path = archive.photo_path(record.image_id)
        if path is None:
            raise ValueError(f"{archive.root}: no photograph for image {record.image_id}")
        paths.append(path)

    def load(path: Path) -> np.ndarray:
        array = load_photo(path, image_spec)
        if on_progress:
            on_progress(1)
        return array

    with ThreadPoolExecutor(max_workers=2) as pool:  # Pillow releases the GIL while decoding
        images = list(pool.map(load, paths))
    return SplitData(
        records=records,
        images=np.stack(images) if images else np.zeros((0, image_spec.size, image_spec.size, 3), np.uint8),
        tabular=spec.transform(records),
        icdr=np.array([IGNORE_INDEX if r.dr_icdr is None else r.dr_icdr for r in records], dtype=np.int64),
        sdrg=np.array([IGNORE_INDEX if r.dr_sdrg is None else r.dr_sdrg for r in records], dtype=np.int64),
    )


def stored_narrative(record: FundusRecord, seed: int = 0) -> str:
    """The archive's narrative of a record, or one written from its labels when it has none."""
    return record.narrative or write_narrative(record, seed)


def _fresh_narrative_seed(record: FundusRecord, epoch: int, seed: int) -> int | None:
    """The seed of the fresh paraphrase a record is trained with in an epoch, or None when that epoch uses
    its stored narrative."""
    digest = hashlib.sha256(f"{seed}:{epoch}:{record.image_id}".encode()).digest()
    if int.from_bytes(digest[:4], "little") / 2**32 >= FRESH_NARRATIVE_PROBABILITY:
        return None
    return 1_000_003 * (epoch + 1) + seed


def training_narrative(record: FundusRecord, epoch: int, seed: int) -> str:
    """The text a record is trained with in an epoch: its stored narrative, or a fresh paraphrase."""
    fresh = _fresh_narrative_seed(record, epoch, seed)
    return stored_narrative(record, seed) if fresh is None else write_narrative(record, seed=fresh)


def training_narrative_and_facts(record: FundusRecord, epoch: int, seed: int,
                                 narrative_seed: int) -> tuple[str, StatedFacts | None]:
    """`training_narrative` with the facts it states: None for a stored narrative that is not the one
    `compose_narrative(record, narrative_seed)` writes (the facts of an arbitrary text are unknown)."""
    fresh = _fresh_narrative_seed(record, epoch, seed)
    if fresh is not None:
        return compose_narrative(record, fresh)
    if record.narrative is None:  # `stored_narrative` writes one with `seed`
        return compose_narrative(record, seed)
    written, facts = compose_narrative(record, narrative_seed)
    return record.narrative, facts if written == record.narrative else None


@dataclass
class Counterfactuals:
    """Hard negatives for text -> record: per row, the tabular features of its record with one fact its
    text states made false (`training.text.counterfactual`), and whether the row has one."""

    tabular: np.ndarray
    present: np.ndarray

    @classmethod
    def draw(cls, records: Sequence[FundusRecord], facts: Sequence[StatedFacts | None], rng: random.Random,
             pool: CounterfactualPool, spec: FeatureSpec) -> Counterfactuals:
        """One counterfactual per record where its text states a fact that can be changed."""
        changed = [None if f is None else counterfactual(r, f, rng, pool) for r, f in zip(records, facts, strict=True)]
        present = np.array([c is not None for c in changed], dtype=bool)
        tabular = spec.transform([c if c is not None else r for r, c in zip(records, changed, strict=True)])
        return cls(tabular, present)


def normalise(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> float32 (B, 3, H, W) normalised by mean/std."""
    pixels = images.permute(0, 3, 1, 2).float().div_(255.0)
    mean_t = torch.tensor(mean, dtype=pixels.dtype).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=pixels.dtype).view(1, 3, 1, 1)
    return (pixels - mean_t) / std_t


def draw_jitter(generator: torch.Generator, batch: int, strength: float = 0.1) -> torch.Tensor:
    """Random (gain, bias) per image of a global batch, shape (batch, 2); every rank draws the same
    numbers and takes its own rows, so a multi-process step matches a single-process one."""
    uniform = torch.rand(batch, 2, generator=generator) * 2 - 1
    return uniform * torch.tensor([strength, strength * 40])


def jitter(images: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """Brightness and contrast jitter of uint8 images (B, H, W, 3) with `draw_jitter` rows (B, 2).
    No flips or rotations: laterality (the disc's side) is a label."""
    pixels = images.float()
    gain = (1 + params[:, 0]).view(-1, 1, 1, 1)
    bias = params[:, 1].view(-1, 1, 1, 1)
    mean = pixels.mean(dim=(1, 2, 3), keepdim=True)
    return ((pixels - mean) * gain + mean + bias).clamp_(0, 255).to(torch.uint8)


class BatchBuilder:
    """Turns rows of a `SplitData` into model batches (tensors keyed as `RetinaAlignModel.forward` takes)."""

    def __init__(
        self,
        data: SplitData,
        tokenizer: PreTrainedTokenizerBase,
        image: ImageSpec,
        max_length: int,
    ) -> None:
        """Hold the split, the tokenizer and the image spec (its normalisation constants)."""
        self.data = data
        self.tokenizer = tokenizer
        self.mean, self.std = image.mean, image.std
        self.max_length = max_length
        self.text_tokenizer = batch_tokenizer(tokenizer, max_length)
        # A locked image tower's output per row (`training.train.locked_image_states`): batches then carry
        # "image_states" in place of "pixels".
        self.image_states: torch.Tensor | None = None

    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Tokenise texts as the bundle will (`training.tokenizer.batch_tokenizer`)."""
        return encode_texts(self.text_tokenizer, texts)

    def batch(
        self,
        rows: np.ndarray,
        texts: Sequence[str],
        jitter_params: torch.Tensor | None = None,
        counterfactuals: Counterfactuals | None = None,
    ) -> dict[str, torch.Tensor]:
        """A batch of the given rows, with `texts` as their narratives; images jittered if params given;
        with `counterfactuals`, their tabular features and mask as "counterfactual_tabular" /
        "counterfactual_present". With `image_states` set, the rows' states replace the pixels (and the
        jitter)."""
        extra: dict[str, torch.Tensor] = {}
        if self.image_states is not None:
            extra["image_states"] = self.image_states[torch.from_numpy(np.asarray(rows))]
        else:
            images = torch.from_numpy(self.data.images[rows])
            if jitter_params is not None:
                images = jitter(images, jitter_params)
            extra["pixels"] = normalise(images, self.mean, self.std)
        if counterfactuals is not None:
            extra["counterfactual_tabular"] = torch.from_numpy(counterfactuals.tabular)
            extra["counterfactual_present"] = torch.from_numpy(counterfactuals.present)
        return {
            **extra,
            **self.tokenize(texts),
            "tabular": torch.from_numpy(self.data.tabular[rows]),
            "icdr": torch.from_numpy(self.data.icdr[rows]),
            "sdrg": torch.from_numpy(self.data.sdrg[rows]),
        }


def sampling_weights(grades: np.ndarray, balance: float) -> np.ndarray | None:
    """Per-row sampling probabilities proportional to count(grade) ** -balance (missing grades form their
    own group); None when balance is 0 (plain shuffling). balance 0.5 draws a grade-0-heavy archive
    like BRSET (93.5% grade 0) with about a third DR images instead of 7%."""
    if balance <= 0:
        return None
    groups, inverse, counts = np.unique(grades, return_inverse=True, return_counts=True)
    weights = counts.astype(np.float64)[inverse] ** -balance
    return weights / weights.sum()


def epoch_order(n: int, seed: int, epoch: int, weights: np.ndarray | None = None) -> np.ndarray:
    """The row order of an epoch: a function of (seed, epoch) only, so a resumed run replays it. With
    `weights`, n rows drawn with replacement by those probabilities; else a permutation."""
    rng = np.random.default_rng([seed, epoch])
    return rng.permutation(n) if weights is None else rng.choice(n, size=n, replace=True, p=weights)


def global_batches(
    n: int, batch_size: int, seed: int, epoch: int, weights: np.ndarray | None = None
) -> Iterator[np.ndarray]:
    """Full global batches of an epoch (the last, partial batch is dropped: contrastive losses need
    equal, reasonably large batches, and every rank must take the same number of steps)."""
    order = epoch_order(n, seed, epoch, weights)
    for start in range(0, n - batch_size + 1, batch_size):
        yield order[start : start + batch_size]


def fingerprint(archive: Archive, splits: dict[str, list[str]]) -> str:
    """sha256 over the label file, the photographs' names and sizes, and the splits."""
    sha = hashlib.sha256()
    sha.update(archive.labels_path.read_bytes())
    photos = archive.photos_dir
    if photos.is_dir():
        for path in sorted(photos.iterdir()):
            sha.update(f"{path.name}:{path.stat().st_size}\n".encode())
    sha.update(json.dumps(splits, sort_keys=True).encode())
    return sha.hexdigest()
