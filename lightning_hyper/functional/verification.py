"""Open-set face-verification protocol and feature-discriminativeness scores (pure functions).

- :func:`verification_accuracy`: the LFW 10-fold protocol of the SphereFace evaluation code
  (spec sphereface.md §9.2): per test fold, center the features with the mean of the other
  folds, L2-normalize, score = cosine, pick the threshold maximizing accuracy on the other folds
  (mean of all maximizing thresholds on a grid of step ``1/n_thr`` over ``[-1, 1]``), report the
  mean and std of the 10 fold accuracies.
- :func:`angular_fisher_score`: AFS = S_w / S_b (thesis Appendix A.5, Eq. A.1); lower is more
  discriminative.
- :func:`identification_rank1`, :func:`tar_at_far`: generic identification / verification-rate
  utilities (spec §9.3).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_hyper.functional.checks import check_fraction, check_number

__all__ = [
    "VerificationResult",
    "angular_fisher_score",
    "default_fold_ids",
    "identification_rank1",
    "pair_scores",
    "tar_at_far",
    "verification_accuracy",
]


class VerificationResult(NamedTuple):
    """Output of :func:`verification_accuracy`."""

    mean: Tensor  # mean of the fold accuracies
    std: Tensor  # population std of the fold accuracies (MATLAB ``std`` would use n - 1)
    fold_accuracies: Tensor  # (num_folds,)
    thresholds: Tensor  # (num_folds,) threshold chosen for each test fold


def default_fold_ids(num_pairs: int, num_folds: int = 10, device: torch.device | None = None) -> Tensor:
    """Contiguous folds in pair order: pair ``i`` goes to fold ``floor(i * num_folds / num_pairs)``.

    For LFW (6000 pairs, 10 folds) this is the official ``ceil((i+1)/600) - 1``.
    """
    check_number("num_folds", num_folds, low=2, low_inclusive=True, integer=True, owner="default_fold_ids")
    if num_pairs < num_folds:
        raise ValueError(f"need at least num_folds={num_folds} pairs, got {num_pairs}")
    return torch.arange(num_pairs, device=device) * num_folds // num_pairs


def pair_scores(feat_a: Tensor, feat_b: Tensor, mean: Tensor | None = None) -> Tensor:
    """Cosine similarity of each pair after subtracting ``mean`` (if given) from both features."""
    if mean is not None:
        feat_a = feat_a - mean
        feat_b = feat_b - mean
    return (F.normalize(feat_a, dim=1) * F.normalize(feat_b, dim=1)).sum(dim=1)


def _check_pairs(feat_a: Tensor, feat_b: Tensor, is_same: Tensor) -> None:
    if feat_a.dim() != 2 or feat_a.shape != feat_b.shape:
        raise ValueError(
            "feat_a and feat_b must both have shape (num_pairs, dim); "
            f"got {tuple(feat_a.shape)} and {tuple(feat_b.shape)}"
        )
    if is_same.dim() != 1 or is_same.numel() != feat_a.shape[0]:
        raise ValueError(f"is_same must have shape ({feat_a.shape[0]},), got {tuple(is_same.shape)}")


def _best_threshold(scores: Tensor, is_same: Tensor, grid: Tensor) -> Tensor:
    """Mean of all grid thresholds maximizing ``#(same, score > t) + #(diff, score < t)``.

    Sort-based: O((n + T) log n) instead of an (n, T) comparison matrix.
    """
    same_sorted = scores[is_same].sort().values
    diff_sorted = scores[~is_same].sort().values
    # #same with score > t  = n_same - #(same <= t)
    n_same_gt = same_sorted.numel() - torch.searchsorted(same_sorted, grid, right=True)
    # #diff with score < t
    n_diff_lt = torch.searchsorted(diff_sorted, grid, right=False)
    correct = n_same_gt + n_diff_lt
    best = correct.max()
    return grid[correct == best].mean()


def verification_accuracy(
    feat_a: Tensor,
    feat_b: Tensor,
    is_same: Tensor,
    fold_ids: Tensor | None = None,
    center: bool = True,
    n_thr: int = 10000,
    num_folds: int = 10,
) -> VerificationResult:
    """LFW-style k-fold verification accuracy (spec §9.2, [code] SphereFace ``evaluation.m``).

    For each test fold ``f``: ``mu`` = mean of all left *and* right features of the other folds
    (if ``center``); score = cos(feat_a - mu, feat_b - mu); the threshold is the mean of all
    ``t in {-1, -1 + 1/n_thr, ..., 1}`` maximizing ``(#same with score > t + #diff with score < t)
    / #pairs`` on the other folds; the fold accuracy uses the same strict inequalities.

    Args:
        feat_a, feat_b: ``(P, D)`` features of the two images of each pair.
        is_same: ``(P,)`` bool (or 0/1) labels, True for same-identity pairs.
        fold_ids: ``(P,)`` integer fold of each pair; default :func:`default_fold_ids` (pair order).
        center: subtract the training-fold mean before normalizing.
        n_thr: thresholds per unit; the grid has ``2 * n_thr + 1`` points.
        num_folds: used only when ``fold_ids`` is None.
    """
    _check_pairs(feat_a, feat_b, is_same)
    check_number("n_thr", n_thr, low=1, low_inclusive=True, integer=True, owner="verification_accuracy")
    is_same = is_same.to(device=feat_a.device).bool()
    if fold_ids is None:
        fold_ids = default_fold_ids(feat_a.shape[0], num_folds, device=feat_a.device)
    else:
        fold_ids = torch.as_tensor(fold_ids, device=feat_a.device).long()
        if fold_ids.shape != is_same.shape:
            raise ValueError(f"fold_ids must have shape {tuple(is_same.shape)}, got {tuple(fold_ids.shape)}")
    folds = torch.unique(fold_ids)
    if folds.numel() < 2:
        raise ValueError("verification_accuracy needs at least 2 distinct folds in fold_ids")
    # float64 like the reference MATLAB code (features are converted with ``double``).
    dtype = torch.float32 if feat_a.device.type == "mps" else torch.float64
    feat_a, feat_b = feat_a.to(dtype), feat_b.to(dtype)
    # Exact grid -1 + i / n_thr (float64 so that e.g. 0.5 is representable as a grid point).
    grid = (torch.arange(2 * n_thr + 1, dtype=dtype, device=feat_a.device) - n_thr) / n_thr
    accs, thrs = [], []
    for f in folds:
        test = fold_ids == f
        train = ~test
        mu = None
        if center:
            mu = torch.cat([feat_a[train], feat_b[train]]).mean(dim=0, keepdim=True)
        scores = pair_scores(feat_a, feat_b, mu)
        thr = _best_threshold(scores[train], is_same[train], grid)
        s, y = scores[test], is_same[test]
        correct = ((s > thr) & y).sum() + ((s < thr) & ~y).sum()
        accs.append(correct.to(dtype) / test.sum())
        thrs.append(thr)
    acc = torch.stack(accs)
    return VerificationResult(acc.mean(), acc.std(unbiased=False), acc, torch.stack(thrs))


def angular_fisher_score(features: Tensor, labels: Tensor, normalize_first: bool = False) -> Tensor:
    """Angular Fisher score ``S_w / S_b`` (thesis Appendix A.5, Eq. A.1). Lower = more discriminative.

    ``S_w = sum_i sum_{x in X_i} (1 - cos<x, m_i>)``, ``S_b = sum_i n_i (1 - cos<m_i, m>)`` with
    ``m_i`` the class means and ``m`` the mean of all features. ``normalize_first`` L2-normalizes
    the features before taking means (the thesis leaves this open; default raw features).
    Invariant to orthogonal maps and global positive scaling; 0 when every class collapses to one
    direction.
    """
    if features.dim() != 2:
        raise ValueError(f"features must have shape (n, dim), got {tuple(features.shape)}")
    if labels.dim() != 1 or labels.numel() != features.shape[0]:
        raise ValueError(f"labels must have shape ({features.shape[0]},), got {tuple(labels.shape)}")
    x = features if features.is_floating_point() else features.float()
    if normalize_first:
        x = F.normalize(x, dim=1)
    classes, inverse, counts = torch.unique(labels, return_inverse=True, return_counts=True)
    if classes.numel() < 2:
        raise ValueError("angular_fisher_score needs at least 2 classes")
    sums = torch.zeros(classes.numel(), x.shape[1], dtype=x.dtype, device=x.device).index_add_(0, inverse, x)
    means = sums / counts[:, None].to(x.dtype)
    total_mean = x.mean(dim=0, keepdim=True)
    cos_within = F.cosine_similarity(x, means[inverse], dim=1, eps=1e-12)
    cos_between = F.cosine_similarity(means, total_mean.expand_as(means), dim=1, eps=1e-12)
    s_w = (1.0 - cos_within).sum()
    s_b = (counts.to(x.dtype) * (1.0 - cos_between)).sum()
    return s_w / s_b


def identification_rank1(
    probe: Tensor, probe_labels: Tensor, gallery: Tensor, gallery_labels: Tensor
) -> Tensor:
    """Rank-1 identification accuracy: fraction of probes whose cosine nearest gallery item has their label."""
    if probe.dim() != 2 or gallery.dim() != 2 or probe.shape[1] != gallery.shape[1]:
        raise ValueError(
            f"probe (P, D) and gallery (G, D) must share D; got {tuple(probe.shape)} and {tuple(gallery.shape)}"
        )
    sim = F.normalize(probe, dim=1) @ F.normalize(gallery, dim=1).T
    nearest = sim.argmax(dim=1)
    return (gallery_labels[nearest] == probe_labels).to(torch.float64).mean()


def tar_at_far(scores: Tensor, is_same: Tensor, far: float) -> Tensor:
    """True-accept rate at the threshold whose false-accept rate is at most ``far``.

    The threshold is the smallest score ``t`` such that ``#(diff, score > t) / #diff <= far``;
    TAR = ``#(same, score > t) / #same``.
    """
    check_fraction("far", far, allow_one=True, owner="tar_at_far")
    is_same = is_same.bool()
    diff = scores[~is_same].sort(descending=True).values
    same = scores[is_same]
    if diff.numel() == 0 or same.numel() == 0:
        raise ValueError("tar_at_far needs both same and different pairs")
    allowed = int(far * diff.numel())  # number of impostor scores allowed above the threshold
    thr = diff[min(allowed, diff.numel() - 1)]
    return (same > thr).to(torch.float64).mean()
