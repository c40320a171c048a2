"""Train the gradability gate (`retina-train gate fit`).

Positives and quality labels come from an archive's photographs: every photograph is a fundus
photograph (`fundus` = 1); `adequate` is its `quality` label and each defect output its BRSET column
(`focus`, `illumination`, `image_field`, `artifacts`: abnormal = 1), each left out of the loss where the
label is missing. Negatives (`training.gate.negatives`) teach `fundus` = 0 and nothing else; they are
drawn afresh every epoch. The archive's patient-level split decides what is trained on (`train`) and
what chooses the threshold and reports the figures (`val`), with validation negatives from a stream
the training never draws.

A synthetic archive has BRSET's quality rates (12% inadequate, illumination and artefact defects under
1%): render one with `retina-train synth --quality-defects 0.4` to give the gate enough of each.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from sklearn.metrics import roc_auc_score, roc_curve

from index.archive.brset import Archive
from index.gate import DEFECTS, GATE_OUTPUTS, GateSpec
from index.preprocess import ImageSpec, model_pixels
from index.records import Assessment, FundusRecord
from training.data import draw_jitter, jitter, load_photo, normalise
from training.gate.model import GateNet
from training.gate.negatives import SKIMAGE_TRAIN, negatives, skimage_samples

log = logging.getLogger(__name__)

GATE_WEIGHTS = "gate.safetensors"
GATE_SPEC = "gate.json"
GATE_IMAGE = ImageSpec(size=224, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), crop_fov=True,
                       illumination="none")
"""How the gate sees a photograph: the field-of-view crop, but no illumination normalisation."""


def realism(images: torch.Tensor, generator: torch.Generator, share: float = 0.8) -> torch.Tensor:
    """Colour casts, gamma, a little softness and sensor noise on `share` of a uint8 batch (B, H, W, 3).

    Rendered photographs are crisper, more evenly orange and less noisy than real ones; a gate trained on
    them alone calls every real photograph "not a fundus photograph" and "out of focus" (measured on the
    EyePACS sample). These changes are kept well below the defects the labels name (a blurred photograph
    is rendered with a sigma of 1.3-2.7 px at 224 px, a dark one at a fraction of the light), so the
    labels stay true.
    """
    from torchvision.transforms.v2.functional import gaussian_blur

    batch = images.shape[0]
    x = images.permute(0, 3, 1, 2).float() / 255
    chosen = torch.rand(batch, generator=generator) < share
    gains = 1 + (torch.rand(batch, 3, 1, 1, generator=generator) * 2 - 1) * 0.2
    gamma = torch.exp((torch.rand(batch, 1, 1, 1, generator=generator) * 2 - 1) * 0.3)
    noise = torch.randn(x.shape, generator=generator) * torch.rand(batch, 1, 1, 1, generator=generator) * 0.015
    changed = (x.clamp(1e-4, 1) ** gamma) * gains + noise
    soften = torch.rand(batch, generator=generator) < 0.5
    for row in torch.nonzero(soften & chosen).flatten().tolist():
        sigma = float(0.3 + 0.5 * torch.rand(1, generator=generator))
        changed[row] = gaussian_blur(changed[row], kernel_size=[5, 5], sigma=[sigma, sigma])
    x = torch.where(chosen.view(-1, 1, 1, 1), changed, x)
    return (x.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()


@dataclass(frozen=True)
class GateOptions:
    """How to train the gate."""

    epochs: int = 6
    batch_size: int = 64
    lr: float = 3e-3
    weight_decay: float = 1e-4
    negative_share: float = 0.3
    """Negatives per epoch, as a share of the training photographs."""
    realism: float = 0.0
    """Share of the training images given `realism`'s colour casts, softness and noise (0: none; the shipped
    gate, see README "Trust")."""
    seed: int = 0
    threads: int | None = None


@dataclass
class GateExamples:
    """Prepared photographs (N, S, S, 3) uint8 with their targets and which targets count (N, 6)."""

    pixels: np.ndarray
    targets: np.ndarray
    known: np.ndarray

    def __len__(self) -> int:
        return len(self.pixels)


def record_targets(record: FundusRecord) -> tuple[np.ndarray, np.ndarray]:
    """A fundus photograph's gate targets and which of them its labels give."""
    targets = np.zeros(len(GATE_OUTPUTS), np.float32)
    known = np.zeros(len(GATE_OUTPUTS), bool)
    targets[0], known[0] = 1.0, True
    if record.quality_adequate is not None:
        targets[1], known[1] = float(record.quality_adequate), True
    for i, name in enumerate(DEFECTS, start=2):
        value = getattr(record, name)
        if value is not None:
            targets[i], known[i] = float(value == Assessment.ABNORMAL), True
    return targets, known


def archive_examples(
    archive: Archive, ids: Sequence[str], spec: ImageSpec, on_progress: Callable[[int], None] | None = None
) -> GateExamples:
    """The photographs `ids` of `archive`, prepared with `spec`, and their targets."""
    by_id = {r.image_id: r for r in archive.records}
    pixels, targets, known = [], [], []
    for image_id in ids:
        path = archive.photo_path(image_id)
        if path is None:
            raise FileNotFoundError(f"{archive.root}: no photograph for record {image_id}")
        pixels.append(load_photo(path, spec))
        t, k = record_targets(by_id[image_id])
        targets.append(t)
        known.append(k)
        if on_progress:
            on_progress(1)
    return GateExamples(np.stack(pixels), np.stack(targets), np.stack(known))


def negative_examples(count: int, seed: int, spec: ImageSpec) -> GateExamples:
    """`count` non-fundus images prepared with `spec`: only their `fundus` target (0) counts."""
    images = negatives(count, seed, spec.size, skimage_samples(SKIMAGE_TRAIN))
    known = np.zeros((count, len(GATE_OUTPUTS)), bool)
    known[:, 0] = True
    empty = np.zeros((0, spec.size, spec.size, 3), np.uint8)
    pixels = np.stack([model_pixels(image, spec) for image in images]) if images else empty
    return GateExamples(pixels, np.zeros((count, len(GATE_OUTPUTS)), np.float32), known)


def _concat(a: GateExamples, b: GateExamples) -> GateExamples:
    return GateExamples(np.concatenate([a.pixels, b.pixels]), np.concatenate([a.targets, b.targets]),
                        np.concatenate([a.known, b.known]))


def masked_bce(logits: torch.Tensor, targets: torch.Tensor, known: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy over the targets that count."""
    losses = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    return (losses * known).sum() / known.sum().clamp(min=1)


def predict(model: GateNet, examples: GateExamples, spec: ImageSpec, batch_size: int = 128) -> np.ndarray:
    """Sigmoid probabilities (N, 6) of prepared photographs."""
    model.eval()
    out = []
    with torch.inference_mode():
        for start in range(0, len(examples), batch_size):
            images = torch.from_numpy(examples.pixels[start : start + batch_size])
            out.append(torch.sigmoid(model(normalise(images, spec.mean, spec.std))).numpy())
    return np.concatenate(out) if out else np.zeros((0, len(GATE_OUTPUTS)), np.float32)


def gate_metrics(probabilities: np.ndarray, examples: GateExamples) -> dict[str, float]:
    """AUROC of each output on the examples whose target counts and has both classes."""
    metrics: dict[str, float] = {}
    for i, name in enumerate(GATE_OUTPUTS):
        rows = examples.known[:, i]
        if name != "fundus":
            rows = rows & (examples.targets[:, 0] == 1)
        truth = examples.targets[rows, i]
        if len(np.unique(truth)) == 2:
            # adequate: AUROC of "ungradable" scored by 1 - P(adequate), the figure the issue asks for
            score = 1 - probabilities[rows, i] if name == "adequate" else probabilities[rows, i]
            positive = 1 - truth if name == "adequate" else truth
            key = "ungradable_auroc" if name == "adequate" else f"{name}_auroc"
            metrics[key] = round(float(roc_auc_score(positive, score)), 4)
    return metrics


def adequate_threshold(probabilities: np.ndarray, examples: GateExamples) -> float:
    """The P(adequate) threshold maximising Youden's J (sensitivity + specificity - 1) for ungradable
    photographs on the validation fundus photographs; 0.5 when they lack a class."""
    rows = examples.known[:, 1] & (examples.targets[:, 0] == 1)
    truth = examples.targets[rows, 1]
    if len(np.unique(truth)) < 2:
        return 0.5
    fpr, tpr, thresholds = roc_curve(1 - truth, 1 - probabilities[rows, 1])
    best = int(np.argmax(tpr - fpr))
    return float(np.clip(1 - thresholds[best], 0.01, 0.99))


def fit_gate(
    archive: Archive,
    splits: dict[str, list[str]],
    out: Path,
    options: GateOptions = GateOptions(),
    progress: Callable[[str, int, int], None] | None = None,
) -> GateSpec:
    """Train the gate on `splits["train"]`, choose its threshold on `splits["val"]`, and write
    `GATE_WEIGHTS` and `GATE_SPEC` to `out`. Returns the spec (with the validation metrics)."""
    for name in ("train", "val"):
        if not splits.get(name):
            raise ValueError(f"the splits have no {name!r} photographs: the gate needs both train and val")
    if options.threads:
        torch.set_num_threads(options.threads)
    torch.manual_seed(options.seed)
    started = time.perf_counter()
    report = progress or (lambda stage, done, total: None)
    spec = GATE_IMAGE
    train = archive_examples(archive, splits["train"], spec, lambda n: None)
    report("photographs", len(train), len(train))
    val = _concat(archive_examples(archive, splits["val"], spec),
                  negative_examples(max(64, len(splits["val"]) // 2), options.seed + 1_000_003, spec))
    model = GateNet()
    optimizer = torch.optim.AdamW(model.parameters(), lr=options.lr, weight_decay=options.weight_decay)
    negatives_per_epoch = max(1, int(len(train) * options.negative_share))
    steps_per_epoch = -(-(len(train) + negatives_per_epoch) // options.batch_size)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=options.lr, total_steps=options.epochs * steps_per_epoch, pct_start=0.15
    )
    generator = torch.Generator().manual_seed(options.seed)
    history = []
    for epoch in range(options.epochs):
        data = _concat(train, negative_examples(negatives_per_epoch, options.seed * 1000 + epoch, spec))
        order = torch.randperm(len(data), generator=generator).numpy()
        model.train()
        total = 0.0
        for step in range(steps_per_epoch):
            rows = order[step * options.batch_size : (step + 1) * options.batch_size]
            images = torch.from_numpy(data.pixels[rows])
            images = jitter(images, draw_jitter(generator, len(rows), 0.1))
            if options.realism > 0:
                images = realism(images, generator, options.realism)
            flip = torch.rand(len(rows), generator=generator) < 0.5
            images[flip] = images[flip].flip(2)  # left and right eyes look alike to the gate
            logits = model(normalise(images, spec.mean, spec.std))
            loss = masked_bce(logits, torch.from_numpy(data.targets[rows]), torch.from_numpy(data.known[rows]))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            total += float(loss.detach())
            report(f"epoch {epoch + 1}/{options.epochs}", step + 1, steps_per_epoch)
        metrics = gate_metrics(predict(model, val, spec), val)
        history.append({"epoch": epoch + 1, "loss": round(total / steps_per_epoch, 4), **metrics})
        log.info("gate epoch %d: %s", epoch + 1, history[-1])
    probabilities = predict(model, val, spec)
    metrics = gate_metrics(probabilities, val)
    seconds = time.perf_counter() - started
    result = GateSpec(
        image=spec,
        adequate_threshold=round(adequate_threshold(probabilities, val), 4),
        metrics={f"val_{k}": v for k, v in metrics.items()},
        trained_on=(f"{archive.root.name}: {len(train)} training photographs "
                    f"({int((train.targets[:, 1] == 0).sum())} inadequate) and {negatives_per_epoch} fresh "
                    f"non-fundus images per epoch, {options.epochs} epochs, {seconds / 60:.1f} min"),
    )
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_file(model.state_dict(), str(out / GATE_WEIGHTS))
    info = {"spec": json.loads(result.model_dump_json()), "history": history, "seconds": round(seconds, 1),
            "options": options.__dict__}
    (out / GATE_SPEC).write_text(json.dumps(info, indent=1) + "\n")
    return result


def load_gate(folder: Path) -> tuple[GateNet, GateSpec]:
    """A trained gate (`fit_gate`'s folder): the network in eval mode and its spec."""
    folder = Path(folder)
    spec_path, weights = folder / GATE_SPEC, folder / GATE_WEIGHTS
    for path in (spec_path, weights):
        if not path.is_file():
            raise FileNotFoundError(f"{folder}: no {path.name} (train a gate with `retina-train gate fit`)")
    spec = GateSpec.model_validate(json.loads(spec_path.read_text())["spec"])
    model = GateNet()
    model.load_state_dict(load_file(str(weights)))
    return model.eval(), spec
