"""benchmarks/claim_stats.py: paired t-test, exact Wilcoxon, t-based CI and the three verdicts, against
hand-computed values, closed forms and scipy."""
from __future__ import annotations

import itertools
import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import claim_stats


@pytest.fixture(scope="module")
def cs():
    return claim_stats


# ref / var of 5 paired seeds; differences var - ref = [2, 1, 3, 0, 3]
REF = [10.0, 12.0, 11.0, 13.0, 9.0]
VAR = [12.0, 13.0, 14.0, 13.0, 12.0]


def test_hand_computed_sample(cs):
    r = cs.paired_test(REF, VAR, higher_is_better=True)
    # by hand: mean 9/5 = 1.8; squared deviations 0.04 + 0.64 + 1.44 + 3.24 + 1.44 = 6.8 -> s = sqrt(6.8 / 4)
    assert r.n == 5 and r.mean_diff == pytest.approx(1.8)
    assert r.sd_diff == pytest.approx(math.sqrt(1.7))
    se = math.sqrt(1.7) / math.sqrt(5)
    assert r.t == pytest.approx(1.8 / se) and r.t == pytest.approx(3.0869745, abs=1e-6)
    # 95 % CI with the tabulated t quantile t_{0.975, 4} = 2.776445
    assert r.ci_low == pytest.approx(1.8 - 2.776445 * se, abs=1e-5)
    assert r.ci_high == pytest.approx(1.8 + 2.776445 * se, abs=1e-5)
    # two-sided p from the closed-form Student-t CDF with 4 degrees of freedom:
    # F(t) = 1/2 + (3/4) a (1 - a^2 / 3), a = t / sqrt(t^2 + 4)
    a = r.t / math.sqrt(r.t**2 + 4)
    assert r.p_t == pytest.approx(2 * (0.5 - 0.75 * a * (1 - a * a / 3)), rel=1e-9)
    assert r.p_t == pytest.approx(0.0366820, abs=1e-6)
    # Wilcoxon: the zero difference is dropped, the 4 others are all positive -> p = 2 / 2^4
    assert r.p_wilcoxon == pytest.approx(0.125)
    assert r.verdict == cs.REPRODUCED


def test_matches_scipy(cs):
    from scipy.stats import ttest_rel, wilcoxon

    ref = [0.71, 0.68, 0.74, 0.70, 0.69, 0.73]
    var = [0.73, 0.67, 0.78, 0.74, 0.70, 0.72]
    r = cs.paired_test(ref, var)
    t = ttest_rel(var, ref)
    assert r.t == pytest.approx(float(t.statistic)) and r.p_t == pytest.approx(float(t.pvalue))
    assert r.p_wilcoxon == pytest.approx(float(wilcoxon([v - q for v, q in zip(var, ref)], method="exact").pvalue))
    ci = t.confidence_interval(0.95)
    assert (r.ci_low, r.ci_high) == (pytest.approx(float(ci.low)), pytest.approx(float(ci.high)))


def test_exact_wilcoxon_enumerates_the_sign_flips(cs):
    """The exact null distribution, with mid-ranks for ties: every one of the 2^n sign assignments."""
    from scipy.stats import rankdata

    diffs = [1.5, -0.5, 2.0, 2.0, -2.0, 3.0, 4.0]
    ranks = rankdata([abs(d) for d in diffs])
    w_plus = sum(r for r, d in zip(ranks, diffs) if d > 0)
    total = sum(ranks)
    observed = min(w_plus, total - w_plus)
    hits = 0
    for signs in itertools.product((0, 1), repeat=len(diffs)):
        w = sum(r for r, s in zip(ranks, signs) if s)
        hits += min(w, total - w) <= observed + 1e-9
    assert cs.wilcoxon_exact(diffs) == pytest.approx(hits / 2 ** len(diffs))
    # n = 5, all positive: the smallest two-sided p the exact test can give
    assert cs.wilcoxon_exact([1, 2, 3, 4, 5]) == pytest.approx(2 / 32)


def test_direction_and_three_verdicts(cs):
    # lower is better (errors): a decrease is the claimed direction
    r = cs.paired_test([30.0, 30.5, 29.5, 31.0, 30.2], [25.0, 25.7, 24.4, 26.1, 25.0], higher_is_better=False)
    assert r.mean_diff > 0 and r.verdict == cs.REPRODUCED
    r = cs.paired_test([25.0, 25.7, 24.4, 26.1, 25.0], [30.0, 30.5, 29.5, 31.0, 30.2], higher_is_better=False)
    assert r.mean_diff < 0 and r.verdict == cs.CONTRADICTED and r.ci_high < 0
    r = cs.paired_test([1.0, 2.0, 3.0, 4.0, 5.0], [1.5, 1.0, 3.5, 3.0, 6.0])  # noise
    assert r.verdict == cs.INCONCLUSIVE and r.ci_low < 0 < r.ci_high
    # the verdict is the 95 % CI excluding zero
    for ref, var in ((REF, VAR), ([1, 2, 3, 4, 5], [1.2, 2.5, 2.9, 4.4, 5.3])):
        r = cs.paired_test(ref, var)
        assert (r.verdict == cs.REPRODUCED) == (r.ci_low > 0)


def test_degenerate_samples(cs):
    r = cs.paired_test([1.0, 2.0, 3.0], [2.0, 3.0, 4.0])  # identical non-zero differences
    assert r.sd_diff == 0 and r.t == math.inf and r.p_t == 0.0 and r.verdict == cs.REPRODUCED
    assert r.ci_low == r.ci_high == pytest.approx(1.0)
    r = cs.paired_test([1.0, 2.0, 3.0], [1.0, 2.0, 3.0])  # no difference at all
    assert r.t == 0.0 and r.p_t == 1.0 and r.p_wilcoxon == 1.0 and r.verdict == cs.INCONCLUSIVE
    r = cs.paired_test([1.0], [5.0])  # one pair: no test
    assert r.verdict == cs.NO_VERDICT and math.isnan(r.p_t) and r.mean_diff == 4.0
    with pytest.raises(ValueError, match="equal lengths"):
        cs.paired_test([1.0, 2.0], [1.0])


def test_format_p(cs):
    assert cs.format_p(0.0366) == "0.037" and cs.format_p(4.2e-5) == "4.2e-05"
    assert cs.format_p(0.0) == "< 1e-12" and cs.format_p(math.nan) == "—"
