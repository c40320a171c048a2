"""Training losses: symmetric InfoNCE over the global batch, masked patches (MAE), masked tokens (MLM),
class-weighted cross-entropy; and the masking that the reconstruction losses need.

Contrastive losses under DDP: each rank all-gathers both embeddings *with gradients*
(`torch.distributed.nn.functional.all_gather`) and scores its own rows against every rank's columns
(open_clip's `local_loss` + `gather_with_grad`). Each rank's loss is the mean over its local rows of
the global-batch InfoNCE; DDP's gradient averaging then gives exactly the gradient of the full-batch
loss. Every rank must hold the same number of rows (use `drop_last` in the sampler).

Every loss is computed in float32, also under bf16 autocast, and returns a zero that keeps the graph
(never NaN) when it has nothing to score.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

IGNORE_INDEX = -100
"""Target value that a cross-entropy ignores (missing grade, unmasked token)."""


def world() -> tuple[int, int]:
    """(rank, world size) of the default process group, or (0, 1) when not distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_with_grad(x: Tensor) -> Tensor:
    """Concatenate `x` from every rank along dim 0, keeping gradients; identity when not distributed."""
    _, size = world()
    if size == 1:
        return x
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(x), dim=0)


def contrastive_loss(a: Tensor, b: Tensor, logit_scale: Tensor | float) -> Tensor:
    """Symmetric InfoNCE between row-paired L2-normalised embeddings a and b (B, D), global batch.

    `logit_scale` multiplies the cosine similarities (CLIP's exp(log-scale), already clamped).
    """
    a, b = a.float(), b.float()
    rank, _ = world()
    all_a, all_b = gather_with_grad(a), gather_with_grad(b)
    labels = torch.arange(a.shape[0], device=a.device) + rank * a.shape[0]
    loss_ab = F.cross_entropy(logit_scale * a @ all_b.T, labels)
    loss_ba = F.cross_entropy(logit_scale * b @ all_a.T, labels)
    return (loss_ab + loss_ba) / 2


def contrastive_loss_with_hard_negatives(
    a: Tensor, b: Tensor, logit_scale: Tensor | float, hard_b: Tensor, hard_present: Tensor
) -> Tensor:
    """`contrastive_loss` where each row of `a` also competes against its own hard negatives `hard_b`, (B, D) for
    one per row or (B, K, D) for K, in the a -> b direction (where `hard_present`, (B,) or (B, K) bool, is False
    there is none). The b -> a direction is the plain one: a hard negative of b is not a text."""
    if hard_b.dim() == 2:
        hard_b, hard_present = hard_b.unsqueeze(1), hard_present.view(-1, 1)
    a, b, hard_b = a.float(), b.float(), hard_b.float()
    rank, _ = world()
    all_a, all_b = gather_with_grad(a), gather_with_grad(b)
    labels = torch.arange(a.shape[0], device=a.device) + rank * a.shape[0]
    logits = logit_scale * torch.cat([a @ all_b.T, torch.einsum("bd,bkd->bk", a, hard_b)], dim=1)
    # Masked after scaling: -inf times the scale would send NaN into the scale's gradient (0 * inf).
    absent = torch.cat([torch.zeros_like(logits[:, : all_b.shape[0]], dtype=torch.bool), ~hard_present], dim=1)
    loss_ab = F.cross_entropy(logits.masked_fill(absent, float("-inf")), labels)
    loss_ba = F.cross_entropy(logit_scale * b @ all_a.T, labels)
    return (loss_ab + loss_ba) / 2


def other_label_partners(labels: Tensor) -> tuple[Tensor, Tensor]:
    """For each row, a random other row of the (local) batch with a different known label, and whether it has
    one: (partner index (B,) long, present (B,) bool). Rows with an unknown label (-100) have none."""
    known = labels != IGNORE_INDEX
    differs = (labels[:, None] != labels[None, :]) & known[:, None] & known[None, :]
    draw = torch.rand(differs.shape, device=labels.device).masked_fill(~differs, -1.0)
    return draw.argmax(dim=1), differs.any(dim=1)


def gather_labels(labels: Tensor) -> Tensor:
    """Concatenate a label tensor from every rank along dim 0 (no gradients); identity when not distributed."""
    _, size = world()
    if size == 1:
        return labels
    parts = [torch.empty_like(labels) for _ in range(size)]
    dist.all_gather(parts, labels.contiguous())
    return torch.cat(parts, dim=0)


def _self_mask(local: int, total: int, device: torch.device) -> Tensor:
    """(local, total) bool: True where a row of this rank's batch meets itself in the all-gathered batch."""
    rank, _ = world()
    rows = torch.arange(local, device=device)
    mask = torch.zeros(local, total, dtype=torch.bool, device=device)
    mask[rows, rows + rank * local] = True
    return mask


def supervised_contrastive_loss(embeddings: Tensor, labels: Tensor, logit_scale: Tensor | float) -> Tensor:
    """Supervised contrastive loss (Khosla et al. 2020, "SupCon" L_out) over the global batch.

    Each row with a known label (not -100) is pulled towards every other row of its label and pushed from
    the rest: the mean over its positives of -log softmax over all other rows. Rows without a positive in
    the global batch do not count; with none at all the loss is a graph-keeping 0.
    """
    embeddings = embeddings.float()
    all_embeddings, all_labels = gather_with_grad(embeddings), gather_labels(labels)
    is_self = _self_mask(embeddings.shape[0], all_embeddings.shape[0], embeddings.device)
    logits = (logit_scale * embeddings @ all_embeddings.T).masked_fill(is_self, float("-inf"))
    known = labels != IGNORE_INDEX
    return _mean_positive_log_loss(logits, (labels[:, None] == all_labels[None, :]) & known[:, None] & ~is_self)


def _mean_positive_log_loss(logits: Tensor, positive: Tensor) -> Tensor:
    """SupCon's L_out from (rows, columns) logits and a same-shape bool mask of each row's positives: per row the
    mean over its positives of -log softmax, averaged over the rows that have a positive (a graph-keeping 0 when
    none has)."""
    log_prob = logits.log_softmax(dim=-1)
    counts = positive.sum(dim=1)
    per_row = -log_prob.masked_fill(~positive, 0.0).sum(dim=1) / counts.clamp(min=1)
    scored = counts > 0
    return (per_row * scored).sum() / scored.sum().clamp(min=1)


def cross_modal_supervised_contrastive_loss(
    queries: Tensor, keys: Tensor, labels: Tensor, logit_scale: Tensor | float, key_labels: Tensor | None = None
) -> Tensor:
    """Supervised contrastive loss from one modality to another, global batch (queries -> keys only).

    Row i of `queries` is paired with row i of `keys`; the query carries `labels[i]`, the key `key_labels[i]`
    (default: the same). Each query with a known label (not -100) is pulled towards every key of its label, its
    own key included, and pushed from the rest: the mean over those keys of -log softmax over all keys. Queries
    without such a key do not count; with none at all it is a graph-keeping 0.
    """
    queries, keys = queries.float(), keys.float()
    all_keys, all_labels = gather_with_grad(keys), gather_labels(labels if key_labels is None else key_labels)
    known = labels != IGNORE_INDEX
    return _mean_positive_log_loss(logit_scale * queries @ all_keys.T,
                                   (labels[:, None] == all_labels[None, :]) & known[:, None])


def uniformity_loss(embeddings: Tensor, t: float = 2.0) -> Tensor:
    """Uniformity of L2-normalised embeddings on the sphere (Wang & Isola 2020): the log of the mean Gaussian
    potential exp(-t ||x - y||^2) over all pairs of distinct rows of the global batch. Lower is more spread;
    a batch that collapsed to one point scores 0. With fewer than two rows it is a graph-keeping 0."""
    embeddings = embeddings.float()
    all_embeddings = gather_with_grad(embeddings)
    if all_embeddings.shape[0] < 2:
        return embeddings.sum() * 0.0
    is_self = _self_mask(embeddings.shape[0], all_embeddings.shape[0], embeddings.device)
    squared = (2 - 2 * embeddings @ all_embeddings.T).clamp(min=0)  # unit rows: ||x - y||^2 = 2 - 2 x.y
    potential = (-t * squared).exp().masked_fill(is_self, 0.0)
    pairs = embeddings.shape[0] * (all_embeddings.shape[0] - 1)
    return (potential.sum() / pairs).log()


def weighted_cross_entropy(logits: Tensor, targets: Tensor, weight: Tensor | None = None) -> Tensor:
    """Cross-entropy averaged with class weights (like `F.cross_entropy(weight=...)`), ignoring -100.

    A class of weight 0 contributes nothing; with no scorable target the loss is a graph-keeping 0.
    """
    logits = logits.float()
    valid = targets != IGNORE_INDEX
    per_row = F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="none")
    row_weight = valid.float()
    if weight is not None:
        row_weight = row_weight * weight.float()[targets.clamp(min=0)]
    return (per_row * row_weight).sum() / row_weight.sum().clamp(min=1e-12)


def class_weights(counts: Sequence[int], scheme: Literal["inverse_sqrt", "inverse", "none"] = "inverse_sqrt") -> Tensor:
    """Class weights from training-split counts: 1/sqrt(n) or 1/n, scaled so a sample weighs 1 on average.

    A class never seen gets weight 0 (it has no rows to weigh anyway). A scale with no labels at all (an
    archive without SDRG grades, e.g. EyePACS) gets uniform weights: every row of it is ignored by the loss.
    """
    n = torch.as_tensor(list(counts), dtype=torch.float64)
    if (n < 0).any():
        raise ValueError(f"class counts must be non-negative, got {list(counts)}")
    if scheme == "none" or n.sum() == 0:
        return torch.ones(len(n), dtype=torch.float32)
    power = 0.5 if scheme == "inverse_sqrt" else 1.0
    w = torch.where(n > 0, n.clamp(min=1) ** -power, torch.zeros_like(n))
    w = w * n.sum() / (w * n).sum()
    return w.float()


def patchify(pixels: Tensor, patch_size: int) -> Tensor:
    """(B, C, H, W) -> (B, N, patch_size**2 * C), patches in row-major grid order (as a ViT sees them)."""
    b, c, h, w = pixels.shape
    p = patch_size
    x = pixels.reshape(b, c, h // p, p, w // p, p)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(b, (h // p) * (w // p), p * p * c)


def normalize_patches(patches: Tensor, eps: float = 1e-6) -> Tensor:
    """Each patch minus its mean over its pixels, divided by its std (MAE's `norm_pix_loss` target)."""
    patches = patches.float()
    mean = patches.mean(dim=-1, keepdim=True)
    var = patches.var(dim=-1, keepdim=True, unbiased=False)
    return (patches - mean) / (var + eps).sqrt()


def random_patch_mask(
    batch: int,
    num_patches: int,
    ratio: float,
    device: torch.device | None = None,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """A random MAE mask: (kept patch indices (B, K) sorted, masked (B, N) bool), K = N * (1 - ratio)."""
    keep_count = max(1, round(num_patches * (1 - ratio)))
    noise = torch.rand(batch, num_patches, device=device, generator=generator)
    keep = noise.argsort(dim=1)[:, :keep_count].sort(dim=1).values
    masked = torch.ones(batch, num_patches, dtype=torch.bool, device=device)
    masked.scatter_(1, keep, False)
    return keep, masked


def masked_patch_loss(pred: Tensor, target: Tensor, masked: Tensor) -> Tensor:
    """Mean squared error over the masked patches only: pred/target (B, N, P), masked (B, N) bool."""
    per_patch = (pred.float() - target.float()).pow(2).mean(dim=-1)
    weight = masked.float()
    return (per_patch * weight).sum() / weight.sum().clamp(min=1.0)


def maskable_tokens(input_ids: Tensor, attention_mask: Tensor, special_token_ids: Tensor) -> Tensor:
    """(B, L) bool: real tokens that are not special ([CLS], [SEP], [PAD], ...) and may be masked."""
    return attention_mask.bool() & ~torch.isin(input_ids, special_token_ids.to(input_ids.device))


def mask_tokens(
    input_ids: Tensor,
    maskable: Tensor,
    mask_token_id: int,
    vocab_size: int,
    prob: float = 0.15,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """BERT's masking: pick `prob` of the maskable tokens; of those 80% -> [MASK], 10% random, 10% kept.

    Returns (masked input ids, labels) where labels hold the original id at picked positions and -100
    elsewhere.
    """
    device = input_ids.device
    picked = (torch.rand(input_ids.shape, device=device, generator=generator) < prob) & maskable
    labels = torch.where(picked, input_ids, torch.full_like(input_ids, IGNORE_INDEX))
    roll = torch.rand(input_ids.shape, device=device, generator=generator)
    random_ids = torch.randint(vocab_size, input_ids.shape, device=device, generator=generator)
    masked = torch.where(picked & (roll < 0.8), torch.full_like(input_ids, mask_token_id), input_ids)
    masked = torch.where(picked & (roll >= 0.8) & (roll < 0.9), random_ids, masked)
    return masked, labels
