"""LFW 10-fold protocol and angular Fisher score against independent references (spec sphereface.md §9)."""
import math

import numpy as np
import pytest
import torch

from lightning_hyper.functional.verification import (
    angular_fisher_score,
    default_fold_ids,
    identification_rank1,
    pair_scores,
    tar_at_far,
    verification_accuracy,
)


def reference_protocol(fa, fb, same, folds, n_thr, center=True):
    """Line-by-line NumPy port of SphereFace test/code/evaluation.m (brute-force threshold scan)."""
    fa, fb = np.asarray(fa, np.float64), np.asarray(fb, np.float64)
    same = np.asarray(same, bool)
    thresholds = np.arange(-n_thr, n_thr + 1) / n_thr
    accs = []
    for f in np.unique(folds):
        val, test = folds != f, folds == f
        mu = np.concatenate([fa[val], fb[val]]).mean(0) if center else np.zeros(fa.shape[1])
        a, b = fa - mu, fb - mu
        a = a / np.sqrt((a ** 2).sum(1, keepdims=True))
        b = b / np.sqrt((b ** 2).sum(1, keepdims=True))
        scores = (a * b).sum(1)

        def acc(s, y, t):
            return ((s[y] > t).sum() + (s[~y] < t).sum()) / len(s)

        accuracies = np.array([acc(scores[val], same[val], t) for t in thresholds])
        best = thresholds[accuracies == accuracies.max()].mean()
        accs.append(acc(scores[test], same[test], best))
    return np.array(accs)


def synthetic_pairs(n_pairs, dim, separation, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randn(n_pairs, dim, generator=g, dtype=torch.float64)
    same = torch.arange(n_pairs) % 2 == 0
    fa = ids + 0.8 * torch.randn(n_pairs, dim, generator=g, dtype=torch.float64)
    other = torch.randn(n_pairs, dim, generator=g, dtype=torch.float64)
    fb = (torch.where(same[:, None], ids, other) * separation
          + 0.8 * torch.randn(n_pairs, dim, generator=g, dtype=torch.float64))
    return fa + 0.3, fb + 0.3, same


@pytest.mark.parametrize("seed,center", [(0, True), (1, True), (2, False)])
def test_matches_reference_implementation(seed, center):
    fa, fb, same = synthetic_pairs(400, 6, 1.0, seed)
    folds = default_fold_ids(400, 10)
    res = verification_accuracy(fa, fb, same, center=center, n_thr=1000)
    ref = reference_protocol(fa.numpy(), fb.numpy(), same.numpy(), folds.numpy(), 1000, center=center)
    np.testing.assert_allclose(res.fold_accuracies.numpy(), ref, rtol=0, atol=1e-12)
    assert res.mean.item() == pytest.approx(ref.mean(), abs=1e-12)
    assert res.std.item() == pytest.approx(ref.std(), abs=1e-12)
    assert 0.6 < res.mean.item() < 1.0  # the synthetic task is neither trivial nor chance


def test_matches_reference_with_default_grid_and_custom_folds():
    fa, fb, same = synthetic_pairs(120, 4, 0.5, 3)
    folds = torch.randint(0, 4, (120,), generator=torch.Generator().manual_seed(0))
    res = verification_accuracy(fa.float(), fb.float(), same, fold_ids=folds)
    ref = reference_protocol(fa.float().double().numpy(), fb.float().double().numpy(), same.numpy(), folds.numpy(),
                             10000)
    np.testing.assert_allclose(res.fold_accuracies.numpy(), ref, atol=1e-12)
    assert res.fold_accuracies.numel() == 4


def test_lfw_fold_layout():
    folds = default_fold_ids(6000, 10)
    i = np.arange(1, 6001)
    np.testing.assert_array_equal(folds.numpy(), np.ceil(i / 600) - 1)


def test_perfectly_separable_is_one_and_constant_scores_are_half():
    same = torch.arange(200) % 2 == 0
    base = torch.randn(200, 5, dtype=torch.float64)
    fb = torch.where(same[:, None], base, -base)  # cos = +1 for same, -1 for different
    res = verification_accuracy(base, fb, same, center=False)
    assert res.mean.item() == 1.0 and res.std.item() == 0.0
    # identical features everywhere -> every score equal -> best accuracy is chance (balanced pairs)
    const = torch.ones(200, 5, dtype=torch.float64)
    res = verification_accuracy(const, const, same, center=False)
    assert res.mean.item() == pytest.approx(0.5)


def test_hand_computed_two_fold_toy_and_tie_handling():
    """2-D features chosen so the scores are cos(angle) with known values; center=False."""
    angles = torch.tensor([0.0, 0.2, 1.0, 1.2, 0.1, 0.3, 1.1, 1.4], dtype=torch.float64)
    same = torch.tensor([1, 1, 0, 0, 1, 1, 0, 0]).bool()
    fold = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    fa = torch.stack([torch.ones(8, dtype=torch.float64), torch.zeros(8, dtype=torch.float64)], 1)
    fb = torch.stack([torch.cos(angles), torch.sin(angles)], 1)
    scores = torch.cos(angles)
    torch.testing.assert_close(pair_scores(fa, fb), scores)
    res = verification_accuracy(fa, fb, same, fold_ids=fold, center=False, n_thr=10000)
    # train on fold 1: same scores cos(.1), cos(.3); diff cos(1.1), cos(1.4). All t in
    # [cos(1.1), cos(.3)) on the grid separate perfectly -> threshold = mean of those grid points.
    lo, hi = math.cos(1.1), math.cos(0.3)
    grid = np.arange(-10000, 10001) / 10000
    expected_thr0 = grid[(grid > lo) & (grid < hi)].mean()
    assert res.thresholds[0].item() == pytest.approx(expected_thr0, abs=1e-12)
    assert res.thresholds[0].item() == pytest.approx((lo + hi) / 2, abs=1e-4)
    # fold 0 is also separated by that threshold (cos .2 = 0.98 > 0.67 > cos 1 = 0.54)
    assert res.fold_accuracies.tolist() == [1.0, 1.0]


def test_bad_inputs():
    a = torch.randn(20, 3)
    with pytest.raises(ValueError, match="feat_a and feat_b"):
        verification_accuracy(a, torch.randn(20, 4), torch.ones(20).bool())
    with pytest.raises(ValueError, match="is_same"):
        verification_accuracy(a, a, torch.ones(19).bool())
    with pytest.raises(ValueError, match="fold_ids"):
        verification_accuracy(a, a, torch.ones(20).bool(), fold_ids=torch.zeros(5))
    with pytest.raises(ValueError, match="at least 2 distinct folds"):
        verification_accuracy(a, a, torch.ones(20).bool(), fold_ids=torch.zeros(20))
    with pytest.raises(ValueError, match="num_folds"):
        default_fold_ids(20, 1)


# ------------------------------------------------------------------------ angular Fisher score
def afs_reference(x, y):
    x, y = np.asarray(x, np.float64), np.asarray(y)
    m = x.mean(0)
    cos = lambda u, v: u @ v / (np.linalg.norm(u) * np.linalg.norm(v))  # noqa: E731
    sw = sb = 0.0
    for c in np.unique(y):
        xi = x[y == c]
        mi = xi.mean(0)
        sw += sum(1 - cos(v, mi) for v in xi)
        sb += len(xi) * (1 - cos(mi, m))
    return sw / sb


def test_afs_matches_loop_reference_and_invariances():
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 5, (300,), generator=g)
    centers = torch.randn(5, 8, generator=g, dtype=torch.float64) * 3
    x = centers[y] + torch.randn(300, 8, generator=g, dtype=torch.float64)
    afs = angular_fisher_score(x, y)
    assert afs.item() == pytest.approx(afs_reference(x.numpy(), y.numpy()), rel=1e-12)
    q, _ = torch.linalg.qr(torch.randn(8, 8, generator=g, dtype=torch.float64))
    assert angular_fisher_score(x @ q, y).item() == pytest.approx(afs.item(), abs=1e-10)
    assert angular_fisher_score(7.5 * x, y).item() == pytest.approx(afs.item(), abs=1e-10)
    xn = torch.nn.functional.normalize(x, dim=1)
    assert angular_fisher_score(x, y, normalize_first=True).item() == pytest.approx(
        afs_reference(xn.numpy(), y.numpy()), rel=1e-12
    )


def test_afs_zero_for_collapsed_classes_and_larger_for_mixed():
    y = torch.arange(60) % 3
    dirs = torch.eye(3, dtype=torch.float64)
    scales = torch.rand(60, 1, dtype=torch.float64) + 0.5
    assert angular_fisher_score(dirs[y] * scales, y).item() == pytest.approx(0.0, abs=1e-12)
    noisy = dirs[y] + 0.5 * torch.randn(60, 3, dtype=torch.float64)
    assert angular_fisher_score(noisy, y) > 0.01
    with pytest.raises(ValueError, match="at least 2 classes"):
        angular_fisher_score(noisy, torch.zeros(60, dtype=torch.long))


def test_identification_and_tar_at_far():
    gallery = torch.eye(4, dtype=torch.float64)
    probe = gallery + 0.1
    labels = torch.arange(4)
    assert identification_rank1(probe, labels, gallery, labels).item() == 1.0
    assert identification_rank1(probe, labels.flip(0), gallery, labels).item() == 0.0
    scores = torch.tensor([0.9, 0.8, 0.7, 0.2, 0.85, 0.1, 0.0, -0.3])
    same = torch.tensor([1, 1, 1, 1, 0, 0, 0, 0]).bool()
    # far = 0: threshold = top impostor (0.85) -> only 0.9 accepted
    assert tar_at_far(scores, same, 0.0).item() == pytest.approx(0.25)
    # far = 0.25: one impostor may pass -> threshold 0.1 -> 0.9, 0.8, 0.7, 0.2 accepted
    assert tar_at_far(scores, same, 0.25).item() == pytest.approx(1.0)


# ------------------------------------------------------------------------ torchmetrics wrappers
def test_verification_metric_accumulates_like_the_functional():
    from lightning_hyper.metrics import VerificationAccuracy

    fa, fb, same = synthetic_pairs(200, 5, 1.0, 7)
    metric = VerificationAccuracy(n_thr=1000)
    for i in range(0, 200, 64):  # uneven batches, in order
        metric.update(fa[i:i + 64], fb[i:i + 64], same[i:i + 64])
    ref = verification_accuracy(fa, fb, same, n_thr=1000)
    assert metric.compute().item() == pytest.approx(ref.mean.item(), abs=1e-6)
    metric.reset()
    folds = torch.arange(200) % 5
    metric = VerificationAccuracy(n_thr=1000, return_std=True)
    metric.update(fa, fb, same, folds)
    mean, std = metric.compute()
    ref = verification_accuracy(fa, fb, same, fold_ids=folds, n_thr=1000)
    assert mean.item() == pytest.approx(ref.mean.item(), abs=1e-6)
    assert std.item() == pytest.approx(ref.std.item(), abs=1e-6)
    with pytest.raises(ValueError, match="num_folds"):
        VerificationAccuracy(num_folds=1)
    with pytest.raises(ValueError, match="is_same"):
        metric.update(fa, fb, same[:3])


def test_afs_metric_matches_functional():
    from lightning_hyper.metrics import AngularFisherScore

    y = torch.randint(0, 4, (90,))
    x = torch.randn(90, 6) + torch.randn(4, 6)[y] * 2
    metric = AngularFisherScore()
    metric.update(x[:50], y[:50])
    metric.update(x[50:], y[50:])
    assert metric.compute().item() == pytest.approx(afs_reference(x.numpy(), y.numpy()), rel=1e-5)
    assert AngularFisherScore.higher_is_better is False
