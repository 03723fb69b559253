"""Paired statistics for the claims table (pure functions; no torch, no Lightning).

A claim compares a *reference* and a *variant* run with the same seeds: within one seed both see the
same data, batch order and (where the architectures match) initialization, so the per-seed
differences are the unit of analysis. With ``d_i`` the per-seed difference signed so that ``d_i > 0``
is the claimed direction (``variant - reference`` when higher is better, ``reference - variant`` when
lower is better):

* mean difference ``d̄`` and its two-sided 95 % confidence interval ``d̄ ± t_{0.975, n-1} · s_d / √n``
  (Student t, ``s_d`` the sample standard deviation of the differences);
* the paired t-test (``scipy.stats.ttest_rel``, two-sided) — it decides the verdict:
  *reproduced* when ``p < alpha`` and ``d̄ > 0``, *contradicted* when ``p < alpha`` and ``d̄ < 0``,
  *inconclusive* otherwise (so "reproduced" ⇔ the whole 95 % CI lies on the claimed side of 0);
* the exact Wilcoxon signed-rank test (``scipy.stats.wilcoxon(method="exact")``, two-sided, zero
  differences dropped), reported beside it as a check that does not assume normal differences. With
  n = 5 non-zero pairs its smallest possible two-sided p is 2/2⁵ = 0.0625, so at the default 5 seeds it
  can never reach 0.05 by itself; that is why the t-test decides.

Degenerate samples are handled in closed form: all differences equal and non-zero → ``t = ±∞``,
``p = 0``; all differences zero → ``t = 0``, ``p = 1``. With fewer than 2 pairs no test is run.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from collections.abc import Sequence

REPRODUCED, CONTRADICTED, INCONCLUSIVE = "reproduced", "contradicted", "inconclusive"
NO_VERDICT = "no verdict (n < 2)"
VERDICTS = (REPRODUCED, CONTRADICTED, INCONCLUSIVE, NO_VERDICT)
ALPHA = 0.05
CONFIDENCE = 0.95


@dataclass(frozen=True)
class PairedResult:
    """The statistics of one paired comparison (differences signed: > 0 = the claimed direction)."""

    n: int
    mean_diff: float
    sd_diff: float
    ci_low: float
    ci_high: float
    t: float
    p_t: float
    p_wilcoxon: float
    verdict: str

    def as_dict(self) -> dict[str, float | int | str]:
        return asdict(self)


def signed_differences(ref: Sequence[float], var: Sequence[float], higher_is_better: bool) -> list[float]:
    """Per-pair ``variant - reference`` (higher is better) or ``reference - variant`` (lower is better)."""
    if len(ref) != len(var):
        raise ValueError(f"paired samples need equal lengths, got {len(ref)} and {len(var)}")
    sign = 1.0 if higher_is_better else -1.0
    return [sign * (float(v) - float(r)) for r, v in zip(ref, var)]


def mean_ci(diffs: Sequence[float], confidence: float = CONFIDENCE) -> tuple[float, float, float, float]:
    """``(mean, sample sd, ci_low, ci_high)`` with the two-sided Student-t interval."""
    from scipy.stats import t as student_t

    n = len(diffs)
    if n == 0:
        raise ValueError("need at least one difference")
    mean = math.fsum(diffs) / n
    if n < 2:
        return mean, 0.0, mean, mean
    sd = math.sqrt(math.fsum((d - mean) ** 2 for d in diffs) / (n - 1))
    half = float(student_t.ppf(0.5 + confidence / 2, n - 1)) * sd / math.sqrt(n)
    return mean, sd, mean - half, mean + half


def paired_t(diffs: Sequence[float]) -> tuple[float, float]:
    """Two-sided paired t-test of ``mean(diffs) = 0``: ``(t, p)``; closed form for zero spread."""
    from scipy.stats import ttest_1samp

    n = len(diffs)
    if n < 2:
        return math.nan, math.nan
    mean = math.fsum(diffs) / n
    if all(d == diffs[0] for d in diffs):  # zero spread: scipy returns nan
        return (0.0, 1.0) if mean == 0 else (math.copysign(math.inf, mean), 0.0)
    res = ttest_1samp(list(diffs), 0.0)  # = ttest_rel(var, ref) on the signed differences
    return float(res.statistic), float(res.pvalue)


def wilcoxon_exact(diffs: Sequence[float]) -> float:
    """Two-sided exact Wilcoxon signed-rank p-value (zeros dropped; 1.0 when nothing is left)."""
    from scipy.stats import wilcoxon

    nonzero = [d for d in diffs if d != 0]
    if not nonzero:
        return 1.0
    return float(wilcoxon(nonzero, method="exact").pvalue)


def verdict_of(mean_diff: float, p: float, n: int, alpha: float = ALPHA) -> str:
    if n < 2 or math.isnan(p):
        return NO_VERDICT
    if p < alpha:
        return REPRODUCED if mean_diff > 0 else CONTRADICTED
    return INCONCLUSIVE


def paired_test(ref: Sequence[float], var: Sequence[float], higher_is_better: bool = True,
                alpha: float = ALPHA, confidence: float = CONFIDENCE) -> PairedResult:
    """All statistics of the paired comparison ``var`` vs ``ref`` (see the module docstring)."""
    diffs = signed_differences(ref, var, higher_is_better)
    mean, sd, lo, hi = mean_ci(diffs, confidence)
    t, p = paired_t(diffs)
    pw = wilcoxon_exact(diffs) if len(diffs) >= 2 else math.nan
    return PairedResult(n=len(diffs), mean_diff=mean, sd_diff=sd, ci_low=lo, ci_high=hi, t=t, p_t=p,
                        p_wilcoxon=pw, verdict=verdict_of(mean, p, len(diffs), alpha))


def format_p(p: float) -> str:
    """``0.031``, ``4.2e-05``, ``< 1e-12``, ``—`` (nan)."""
    if math.isnan(p):
        return "—"
    if p < 1e-12:
        return "< 1e-12"
    return f"{p:.3f}" if p >= 0.001 else f"{p:.1e}"
