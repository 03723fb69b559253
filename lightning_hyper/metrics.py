"""torchmetrics wrappers of the open-set verification protocol and the angular Fisher score.

No Lightning import: usable in any training loop. See :mod:`lightning_hyper.functional.verification`
for the formulas (spec sphereface.md §9.2, §9.4).
"""
from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from lightning_hyper.functional.verification import angular_fisher_score, verification_accuracy

__all__ = ["AngularFisherScore", "VerificationAccuracy"]


class VerificationAccuracy(Metric):
    """LFW-style k-fold verification accuracy of image pairs (SphereFace ``evaluation.m``).

    ``update(feat_a, feat_b, is_same, fold_ids=None)`` accumulates pairs (in order); ``compute()``
    runs :func:`~lightning_hyper.functional.verification.verification_accuracy` on all of them:
    per fold, center with the other folds' mean, cosine score, threshold chosen on the other folds,
    and returns the mean fold accuracy (``(mean, std)`` if ``return_std``). Without ``fold_ids``
    the pairs are split into ``num_folds`` contiguous folds in update order (LFW's ``pairs.txt``
    layout). Works on real LFW-format pair lists as well as synthetic pairs.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(
        self,
        num_folds: int = 10,
        center: bool = True,
        n_thr: int = 10000,
        return_std: bool = False,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        if isinstance(num_folds, bool) or not isinstance(num_folds, int) or num_folds < 2:
            raise ValueError(f"num_folds must be an integer >= 2, got {num_folds!r}")
        if isinstance(n_thr, bool) or not isinstance(n_thr, int) or n_thr < 1:
            raise ValueError(f"n_thr must be a positive integer, got {n_thr!r}")
        self.num_folds = num_folds
        self.center = center
        self.n_thr = n_thr
        self.return_std = return_std
        self.add_state("feat_a", default=[], dist_reduce_fx="cat")
        self.add_state("feat_b", default=[], dist_reduce_fx="cat")
        self.add_state("is_same", default=[], dist_reduce_fx="cat")
        self.add_state("fold_ids", default=[], dist_reduce_fx="cat")

    def update(self, feat_a: Tensor, feat_b: Tensor, is_same: Tensor, fold_ids: Tensor | None = None) -> None:
        if feat_a.dim() != 2 or feat_a.shape != feat_b.shape:
            raise ValueError(
                "feat_a and feat_b must both have shape (pairs, dim); "
                f"got {tuple(feat_a.shape)} and {tuple(feat_b.shape)}"
            )
        if is_same.shape != (feat_a.shape[0],):
            raise ValueError(f"is_same must have shape ({feat_a.shape[0]},), got {tuple(is_same.shape)}")
        if fold_ids is None:
            fold_ids = torch.full((feat_a.shape[0],), -1, dtype=torch.long, device=feat_a.device)
        elif fold_ids.shape != is_same.shape:
            raise ValueError(f"fold_ids must have shape {tuple(is_same.shape)}, got {tuple(fold_ids.shape)}")
        self.feat_a.append(feat_a.detach())
        self.feat_b.append(feat_b.detach())
        self.is_same.append(is_same.detach().bool())
        self.fold_ids.append(fold_ids.detach().long())

    def compute_result(self):
        """The full :class:`~lightning_hyper.functional.verification.VerificationResult`."""
        fa, fb = dim_zero_cat(self.feat_a), dim_zero_cat(self.feat_b)
        same, folds = dim_zero_cat(self.is_same), dim_zero_cat(self.fold_ids)
        if fa.shape[0] < self.num_folds:
            raise ValueError(f"VerificationAccuracy needs at least num_folds={self.num_folds} pairs, got {fa.shape[0]}")
        fold_ids = None if bool((folds < 0).any()) else folds
        return verification_accuracy(fa, fb, same, fold_ids=fold_ids, center=self.center, n_thr=self.n_thr,
                                     num_folds=self.num_folds)

    def compute(self):
        res = self.compute_result()
        mean, std = res.mean.float(), res.std.float()
        return (mean, std) if self.return_std else mean


class AngularFisherScore(Metric):
    """Angular Fisher score ``S_w / S_b`` of labelled features (thesis A.5). Lower is better."""

    is_differentiable = False
    higher_is_better = False
    full_state_update = False

    def __init__(self, normalize_first: bool = False, **kwargs) -> None:
        super().__init__(**kwargs)
        self.normalize_first = normalize_first
        self.add_state("features", default=[], dist_reduce_fx="cat")
        self.add_state("labels", default=[], dist_reduce_fx="cat")

    def update(self, features: Tensor, labels: Tensor) -> None:
        if features.dim() != 2 or labels.shape != (features.shape[0],):
            raise ValueError(
                f"features must be (n, dim) and labels (n,); got {tuple(features.shape)} and {tuple(labels.shape)}"
            )
        self.features.append(features.detach())
        self.labels.append(labels.detach())

    def compute(self) -> Tensor:
        x, y = dim_zero_cat(self.features), dim_zero_cat(self.labels)
        return angular_fisher_score(x.double(), y, normalize_first=self.normalize_first).float()
