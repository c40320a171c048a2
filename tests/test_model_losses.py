"""Losses on cases whose right answer is known, and the global-batch InfoNCE under DDP (gloo, 2 ranks)."""

from __future__ import annotations

import math
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from training.model.losses import (
    IGNORE_INDEX,
    class_weights,
    contrastive_loss,
    contrastive_loss_with_hard_negatives,
    gather_with_grad,
    mask_tokens,
    maskable_tokens,
    masked_patch_loss,
    normalize_patches,
    patchify,
    random_patch_mask,
    uniformity_loss,
    weighted_cross_entropy,
)


def _unit(*shape: int, seed: int = 0) -> torch.Tensor:
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=-1)


def test_infonce_of_random_embeddings_at_scale_one_is_log_batch() -> None:
    a, b = _unit(64, 128, seed=1), _unit(64, 128, seed=2)
    assert contrastive_loss(a, b, 1.0).item() == pytest.approx(math.log(64), abs=0.1)


def test_infonce_of_aligned_orthogonal_embeddings_at_large_scale_is_zero() -> None:
    a = torch.eye(16, 32)
    assert contrastive_loss(a, a.clone(), 100.0).item() < 1e-6


def test_infonce_is_symmetric() -> None:
    a, b = _unit(8, 16, seed=3), _unit(8, 16, seed=4)
    torch.testing.assert_close(contrastive_loss(a, b, 10.0), contrastive_loss(b, a, 10.0))


def test_gather_is_identity_when_not_distributed() -> None:
    x = torch.randn(3, 4)
    assert gather_with_grad(x) is x


def test_zero_class_weight_removes_that_class() -> None:
    logits = torch.randn(12, 5, generator=torch.Generator().manual_seed(0))
    targets = torch.tensor([0, 1, 2, 3, 4, 0, 1, 2, 0, 0, 4, 3])
    weight = torch.tensor([0.0, 1.0, 2.0, 1.0, 0.5])
    kept = targets != 0
    expected = F.cross_entropy(logits[kept], targets[kept], weight=weight)
    torch.testing.assert_close(weighted_cross_entropy(logits, targets, weight), expected)


def test_cross_entropy_ignores_missing_labels_and_never_returns_nan() -> None:
    logits = torch.randn(4, 5, requires_grad=True)
    targets = torch.tensor([2, IGNORE_INDEX, 1, IGNORE_INDEX])
    torch.testing.assert_close(
        weighted_cross_entropy(logits, targets), F.cross_entropy(logits[[0, 2]], targets[[0, 2]])
    )
    nothing = weighted_cross_entropy(logits, torch.full((4,), IGNORE_INDEX))
    assert nothing.item() == 0.0 and nothing.requires_grad


def test_class_weights_from_counts() -> None:
    counts = [900, 100, 0, 25, 400]
    w = class_weights(counts, "inverse_sqrt")
    assert w[2] == 0
    assert w[3] / w[1] == pytest.approx(2.0) and w[1] / w[0] == pytest.approx(3.0)
    assert (w * torch.tensor(counts, dtype=torch.float32)).sum() / sum(counts) == pytest.approx(1.0)
    assert class_weights(counts, "inverse")[3] / class_weights(counts, "inverse")[1] == pytest.approx(4.0)
    assert torch.equal(class_weights(counts, "none"), torch.ones(5))


def test_mlm_masks_about_15_percent_and_never_special_tokens() -> None:
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 1000, (64, 128), generator=gen)
    ids[:, 0], ids[:, 100] = 2, 3  # [CLS] ... [SEP]
    ids[:, 101:] = 0  # [PAD]
    attention = (ids != 0).long()
    maskable = maskable_tokens(ids, attention, torch.tensor([0, 1, 2, 3, 4]))
    masked, labels = mask_tokens(ids, maskable, mask_token_id=4, vocab_size=1000, prob=0.15, generator=gen)
    picked = labels != IGNORE_INDEX
    assert picked.float().sum() / maskable.float().sum() == pytest.approx(0.15, abs=0.01)
    assert not picked[:, 0].any() and not picked[:, 100:].any()
    assert torch.equal(labels[picked], ids[picked]) and torch.equal(masked[~picked], ids[~picked])
    became_mask = (masked[picked] == 4).float().mean()
    unchanged = (masked[picked] == ids[picked]).float().mean()
    assert became_mask == pytest.approx(0.8, abs=0.03) and unchanged == pytest.approx(0.1 + 0.1 / 1000, abs=0.03)


def test_patchify_orders_patches_as_a_vit_grid() -> None:
    pixels = torch.arange(2 * 3 * 4 * 6, dtype=torch.float32).reshape(2, 3, 4, 6)
    patches = patchify(pixels, 2)
    assert patches.shape == (2, 6, 12)
    torch.testing.assert_close(patches[1, 4].reshape(2, 2, 3).permute(2, 0, 1), pixels[1, :, 2:4, 2:4])


def test_patch_mask_keeps_the_right_share() -> None:
    keep, masked = random_patch_mask(3, 196, 0.75, generator=torch.Generator().manual_seed(0))
    assert keep.shape == (3, 49) and masked.sum(dim=1).tolist() == [147] * 3
    assert not masked.gather(1, keep).any()


def test_mae_loss_is_zero_at_the_target_and_counts_masked_patches_only() -> None:
    target = normalize_patches(torch.randn(2, 8, 12))
    torch.testing.assert_close(target.mean(-1), torch.zeros(2, 8), atol=1e-5, rtol=0)
    masked = torch.zeros(2, 8, dtype=torch.bool)
    masked[:, :3] = True
    assert masked_patch_loss(target, target, masked).item() == 0.0
    pred = target.clone()
    pred[~masked] += 5.0  # errors on visible patches do not count
    assert masked_patch_loss(pred, target, masked).item() == 0.0
    pred[masked] += 1.0
    assert masked_patch_loss(pred, target, masked).item() == pytest.approx(1.0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, a: torch.Tensor, b: torch.Tensor, out: Path) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        rows = slice(rank * 4, (rank + 1) * 4)
        local_a, local_b = a[rows].clone().requires_grad_(), b[rows].clone().requires_grad_()
        loss = contrastive_loss(local_a, local_b, 5.0)
        loss.backward()
        torch.save((loss.detach(), local_a.grad, local_b.grad), out / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_ddp_infonce_sees_the_global_batch_with_gradients(tmp_path: Path) -> None:
    a, b = _unit(8, 16, seed=5), _unit(8, 16, seed=6)
    full_a, full_b = a.clone().requires_grad_(), b.clone().requires_grad_()
    full = contrastive_loss(full_a, full_b, 5.0)
    full.backward()

    mp.spawn(_ddp_worker, args=(2, _free_port(), a, b, tmp_path), nprocs=2)
    out = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    # The mean of the ranks' losses is the full-batch loss; all_gather's backward sums every rank's
    # gradient, so each rank holds world x the full-batch gradient (DDP then averages over ranks).
    torch.testing.assert_close((out[0][0] + out[1][0]) / 2, full.detach())
    torch.testing.assert_close(torch.cat([out[0][1], out[1][1]]) / 2, full_a.grad)
    torch.testing.assert_close(torch.cat([out[0][2], out[1][2]]) / 2, full_b.grad)


def test_class_weights_of_a_scale_without_labels_are_uniform() -> None:
    assert class_weights([0, 0, 0, 0, 0]).tolist() == [1.0] * 5  # e.g. SDRG on an EyePACS import
    with pytest.raises(ValueError, match="non-negative"):
        class_weights([3, -1, 0, 0, 0])


def test_supervised_contrastive_rewards_grade_clusters_and_skips_rows_without_positives() -> None:
    from training.model.losses import supervised_contrastive_loss

    labels = torch.tensor([0, 0, 1, 1, 2, -100])
    centres = torch.nn.functional.normalize(torch.randn(3, 16), dim=-1)
    clustered = torch.cat([centres[[0, 0, 1, 1, 2]], torch.nn.functional.normalize(torch.randn(1, 16), dim=-1)])
    shuffled = clustered[[0, 2, 1, 3, 4, 5]]  # same vectors, grades no longer sharing theirs
    good = supervised_contrastive_loss(clustered, labels, 10.0)
    bad = supervised_contrastive_loss(shuffled, labels, 10.0)
    assert good < 0.5 < bad
    # rows 4 (grade 2 alone) and 5 (missing grade) have no positive and do not count: 4 rows are scored
    per_row = -torch.log(torch.tensor(1.0))  # a perfectly clustered pair at infinite scale scores 0
    assert supervised_contrastive_loss(clustered, labels, 1e4) <= per_row + 1e-3
    nothing = supervised_contrastive_loss(clustered[4:], labels[4:], 10.0)
    assert nothing == 0 and not torch.isnan(nothing)
    embeddings = clustered.clone().requires_grad_(True)
    supervised_contrastive_loss(embeddings, labels, 10.0).backward()
    assert embeddings.grad is not None and embeddings.grad[:4].abs().sum() > 0


def test_cross_modal_supervised_contrastive_pulls_queries_to_every_key_of_their_grade() -> None:
    from training.model.losses import cross_modal_supervised_contrastive_loss

    labels = torch.tensor([0, 0, 1, 1, 2, -100])
    centres = torch.nn.functional.normalize(torch.randn(3, 16, generator=torch.Generator().manual_seed(0)), dim=-1)
    keys = centres[[0, 0, 1, 1, 2, 2]]
    queries = keys.clone()
    wrong = centres[[1, 1, 2, 2, 0, 0]]  # each query at a centre of another grade
    good = cross_modal_supervised_contrastive_loss(queries, keys, labels, 10.0)
    assert good < cross_modal_supervised_contrastive_loss(wrong, keys, labels, 10.0)
    # at a large scale each query splits its probability between the two keys at its centre: for grades 0 and 1
    # both are positives (log 2 each), for grade 2 one is (the unlabelled key 5 shares the centre): log 2 per row
    sharp = cross_modal_supervised_contrastive_loss(queries, keys, labels, 1e4)
    assert sharp.item() == pytest.approx(math.log(2), abs=1e-3)
    # the unlabelled query counts for nothing, and a batch of it alone is a graph-keeping 0
    none = cross_modal_supervised_contrastive_loss(queries[5:], keys[5:], labels[5:], 10.0)
    assert none == 0 and not torch.isnan(none)
    q, k = queries.clone().requires_grad_(True), keys.clone().requires_grad_(True)
    cross_modal_supervised_contrastive_loss(q, k, labels, 10.0).backward()
    assert q.grad[:5].abs().sum() > 0 and q.grad[5].abs().sum() == 0 and k.grad.abs().sum() > 0


def test_hard_negatives_only_add_to_the_a_to_b_direction() -> None:
    a, b = _unit(16, 32, seed=1), _unit(16, 32, seed=2)
    none = torch.zeros(16, dtype=torch.bool)
    plain = contrastive_loss(a, b, 5.0)
    assert contrastive_loss_with_hard_negatives(a, b, 5.0, _unit(16, 32, seed=3), none).item() == pytest.approx(
        plain.item(), abs=1e-6)
    # a hard negative as close as the positive: the a -> b half rises by about log(2) at a large scale
    aligned = _unit(16, 32, seed=4)
    hard = contrastive_loss_with_hard_negatives(aligned, aligned, 50.0, aligned, torch.ones(16, dtype=torch.bool))
    assert hard.item() == pytest.approx(math.log(2) / 2, abs=0.05)
    hard_b = _unit(16, 32, seed=5).requires_grad_()
    scale = torch.tensor(5.0, requires_grad=True)
    some = torch.arange(16) % 3 > 0  # rows without a hard negative must not poison the scale's gradient
    contrastive_loss_with_hard_negatives(a, b, scale, hard_b, some).backward()
    assert hard_b.grad is not None and hard_b.grad[some].abs().sum() > 0 and hard_b.grad[~some].abs().sum() == 0
    assert scale.grad is not None and torch.isfinite(scale.grad)


def test_uniformity_is_zero_for_a_collapsed_batch_and_lower_the_more_it_spreads() -> None:
    point = F.normalize(torch.randn(1, 16), dim=-1)
    assert uniformity_loss(point.repeat(8, 1)).item() == pytest.approx(0.0, abs=1e-6)
    near = F.normalize(point + 0.05 * torch.randn(8, 16, generator=torch.Generator().manual_seed(0)), dim=-1)
    spread = F.normalize(torch.randn(8, 16, generator=torch.Generator().manual_seed(1)), dim=-1)
    assert uniformity_loss(spread) < uniformity_loss(near) < 0
    # Two antipodal points: ||x - y||^2 = 4 for the one pair, so the mean potential is exp(-2 * 4).
    assert uniformity_loss(torch.cat([point, -point])).item() == pytest.approx(-8.0, abs=1e-4)
    one = point.clone().requires_grad_(True)
    loss = uniformity_loss(one)
    loss.backward()
    assert loss.item() == 0.0 and one.grad is not None  # one row: nothing to spread, the graph is kept
    rows = near.clone().requires_grad_(True)
    uniformity_loss(rows).backward()
    stepped = F.normalize(rows - 0.1 * rows.grad, dim=-1)
    assert uniformity_loss(stepped) < uniformity_loss(near)  # its gradient spreads the rows


def test_several_hard_negatives_per_row_each_compete_where_present() -> None:
    aligned = _unit(16, 32, seed=4)
    one = contrastive_loss_with_hard_negatives(aligned, aligned, 50.0, aligned, torch.ones(16, dtype=torch.bool))
    stacked = torch.stack([aligned, _unit(16, 32, seed=6)], dim=1)  # (B, 2, D): the second one is far
    both = torch.ones(16, 2, dtype=torch.bool)
    two = contrastive_loss_with_hard_negatives(aligned, aligned, 50.0, stacked, both)
    assert two.item() == pytest.approx(one.item(), abs=0.02)  # a far negative adds next to nothing
    twice = contrastive_loss_with_hard_negatives(aligned, aligned, 50.0, torch.stack([aligned, aligned], 1), both)
    assert twice.item() == pytest.approx(math.log(3) / 2, abs=0.05)  # two negatives as close as the positive
    absent = torch.tensor([[True, False]] * 16)
    half = contrastive_loss_with_hard_negatives(aligned, aligned, 50.0, torch.stack([aligned, aligned], 1), absent)
    assert half.item() == pytest.approx(one.item(), abs=1e-6)


def test_other_label_partners_differ_in_label_and_skip_unknown_or_lone_labels() -> None:
    from training.model.losses import other_label_partners

    torch.manual_seed(0)
    labels = torch.tensor([0, 0, 2, 4, -100, 0])
    for _ in range(20):
        partner, present = other_label_partners(labels)
        assert present.tolist() == [True, True, True, True, False, True]
        chosen = labels[partner[present]]
        assert (chosen != labels[present]).all() and (chosen != -100).all()
    partner, present = other_label_partners(torch.tensor([1, 1, -100]))
    assert not present.any()  # one grade only: no row has a partner of another
