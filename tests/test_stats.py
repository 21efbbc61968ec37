"""The reproduction's statistics against closed forms and independent computations."""

import math

import numpy as np
import pytest
from scipy import stats as scipy_stats

from jaxspec.experiments import stats


def test_t_interval_equals_scipys():
    x = np.array([0.8, 1.9, -0.3, 1.1, 0.6])
    got = stats.t_interval(x)
    low, high = scipy_stats.t.interval(0.95, len(x) - 1, loc=x.mean(), scale=scipy_stats.sem(x))
    assert got.mean == pytest.approx(x.mean()) and got.n == 5
    assert (got.low, got.high) == pytest.approx((low, high), rel=1e-12)
    assert stats.t_interval([1.0]).half_width == math.inf  # one seed has no width, not a zero width


def test_paired_bootstrap_matches_the_normal_approximation_and_keeps_pairs():
    rng = np.random.default_rng(0)
    n = 4000
    a = rng.random(n) < 0.80
    b = np.where(rng.random(n) < 0.9, a, ~a)  # b agrees with a on most images: a strongly paired design
    got = stats.paired_bootstrap(a, b, resamples=4000, seed=1)
    d = a.astype(float) - b.astype(float)
    se = d.std(ddof=1) / math.sqrt(n)
    assert got.mean == pytest.approx(d.mean())
    assert got.half_width == pytest.approx(1.96 * se, rel=0.1)
    # Unpaired resampling would see the two accuracies' own variances: a much wider interval.
    unpaired_se = math.sqrt(a.var(ddof=1) / n + b.var(ddof=1) / n)
    assert got.half_width < 0.8 * 1.96 * unpaired_se
    with pytest.raises(ValueError, match="equal 1-d shapes"):
        stats.paired_bootstrap(a, b[:-1])


def test_seeds_to_resolve_is_the_smallest_n_reaching_the_half_width():
    sd, effect = 0.6, 0.5
    n = stats.seeds_to_resolve(sd, effect)
    assert scipy_stats.t.ppf(0.975, n - 1) * sd / math.sqrt(n) <= effect
    assert scipy_stats.t.ppf(0.975, n - 2) * sd / math.sqrt(n - 1) > effect


@pytest.mark.parametrize(
    "low,high,direction,expected",
    [
        (0.1, 0.9, 1, "reproduced"),
        (-0.9, -0.1, 1, "contradicted"),
        (-0.1, 0.4, 1, "inconclusive"),
        (-0.9, -0.1, -1, "reproduced"),
    ],
)
def test_verdicts(low, high, direction, expected):
    assert stats.verdict(stats.Interval((low + high) / 2, low, high, 5), direction) == expected


def test_replicates_give_the_paired_bootstrap_of_a_score_that_is_not_a_mean():
    """Per resample, the seeds' differences are averaged (as the effect is); the interval is its quantiles."""
    rng = np.random.default_rng(0)
    a, b = rng.normal(0.6, 0.02, (3, 400)), rng.normal(0.5, 0.02, (3, 400))  # 3 seeds x 400 resamples
    got = stats.replicate_interval(a, b, observed=0.1, num_images=50)
    means = (a - b).mean(axis=0)
    assert (got.mean, got.n) == (0.1, 150)
    assert (got.low, got.high) == (np.quantile(means, 0.025), np.quantile(means, 0.975))
    with pytest.raises(ValueError, match="equal shapes"):
        stats.replicate_interval(a, b[:2], observed=0.1, num_images=50)
    # through a grid's cell records: replicates round-trip through the JSON's packed form
    records = [
        {
            "cell": {"seed": s},
            "metrics": {"dF": 0.1 + 0.01 * s, "test_images": 50},
            "replicates": {"specialist_F": stats.pack_floats(a[s]), "generalist_F": stats.pack_floats(b[s])},
        }
        for s in range(3)
    ]
    np.testing.assert_array_equal(
        stats.unpack_floats(records[0]["replicates"]["generalist_F"]), b[0].astype(np.float32)
    )
    effect = stats.paired_effect(records, "dF", ("specialist_F", "generalist_F"))
    want = stats.replicate_interval(
        a.astype(np.float32), b.astype(np.float32), observed=float(np.mean(effect.values)), num_images=50
    )
    assert [effect.boot.mean, effect.boot.low, effect.boot.high] == pytest.approx([want.mean, want.low, want.high])
    assert effect.boot.n == 150
    assert effect.t.mean == pytest.approx(0.11)
