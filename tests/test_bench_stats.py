"""bertkern.bench.stats: median, IQR and the paired bootstrap interval of a ratio of medians."""
import statistics

import pytest

from bertkern.bench.stats import bootstrap_ratio_ci, iqr, median, quantile


def test_median_odd_even():
    assert median([3, 1, 2]) == 2
    assert median([4, 1, 3, 2]) == 2.5
    assert median([7.0]) == 7.0


def test_quantile_and_iqr_linear_interpolation():
    xs = [1, 2, 3, 4]  # numpy.percentile(xs, [25, 75]) == [1.75, 3.25]
    assert quantile(xs, 0.25) == pytest.approx(1.75)
    assert quantile(xs, 0.75) == pytest.approx(3.25)
    assert iqr(xs) == pytest.approx(1.5)
    assert iqr(list(range(1, 10))) == pytest.approx(4.0)  # q25 = 3, q75 = 7
    assert iqr([5.0]) == 0.0
    assert quantile([2, 9, 4], 0.0) == 2 and quantile([2, 9, 4], 1.0) == 9
    # agrees with the standard library's 'inclusive' method (the same type-7 definition)
    data = [0.31, 0.12, 0.57, 0.44, 0.29, 0.91, 0.38]
    q1, _, q3 = statistics.quantiles(data, n=4, method="inclusive")
    assert iqr(data) == pytest.approx(q3 - q1)


def test_identical_samples_give_a_point_interval_at_one():
    xs = [0.011, 0.010, 0.013, 0.012, 0.010, 0.015, 0.011, 0.012, 0.014]
    lo, hi = bootstrap_ratio_ci(xs, list(xs))
    assert lo == 1.0 and hi == 1.0


def test_clear_2x_difference_excludes_one():
    impl = [0.010, 0.011, 0.0105, 0.012, 0.0098, 0.0102, 0.0115, 0.0101, 0.0108]
    base = [2 * t * f for t, f in zip(impl, [1.0, 0.97, 1.04, 1.02, 0.99, 1.01, 0.96, 1.03, 1.0])]
    lo, hi = bootstrap_ratio_ci(base, impl)
    point = median(base) / median(impl)
    # The interval holds the point ratio and stays within the per-round ratios 2 x [0.96, 1.04]:
    # a resample's medians come from rounds whose ratios lie in that range.
    assert lo <= point <= hi
    assert 2 * 0.96 - 1e-12 <= lo and hi <= 2 * 1.04 + 1e-12
    assert hi - lo < 0.2  # nine rounds within +-4% give a tight interval, far from 1.0
    # and the reverse ratio lies below 1
    lo_r, hi_r = bootstrap_ratio_ci(impl, base)
    assert hi_r < 1.0


def test_noisy_equal_samples_cross_one():
    a = [1.0, 1.3, 0.9, 1.1, 1.25, 0.95, 1.05, 1.2, 0.85]
    b = [1.1, 0.9, 1.2, 1.0, 0.95, 1.3, 1.15, 0.88, 1.02]
    lo, hi = bootstrap_ratio_ci(a, b)
    assert lo < 1.0 < hi


def test_deterministic_for_a_seed():
    a = [1.0, 1.3, 0.9, 1.1, 1.25, 0.95, 1.05]
    b = [0.7, 0.6, 0.8, 0.75, 0.72, 0.66, 0.9]
    assert bootstrap_ratio_ci(a, b, seed=3) == bootstrap_ratio_ci(a, b, seed=3)
    assert bootstrap_ratio_ci(a, b) == bootstrap_ratio_ci(a, b, confidence=0.95, resamples=2000, seed=0)
    # a narrower confidence gives a nested interval
    lo95, hi95 = bootstrap_ratio_ci(a, b)
    lo50, hi50 = bootstrap_ratio_ci(a, b, confidence=0.5)
    assert lo95 <= lo50 <= hi50 <= hi95


def test_pairing_uses_the_same_round_indices():
    # Rounds share a load drift (round i of both slow alike): the paired interval stays tight
    # around the true 1.5x although each sample on its own spreads by 4x.
    drift = [1.0, 4.0, 1.5, 3.0, 2.0, 2.5, 1.2, 3.5, 1.8]
    impl = [d * 0.01 for d in drift]
    base = [1.5 * t for t in impl]
    lo, hi = bootstrap_ratio_ci(base, impl)
    assert lo == pytest.approx(1.5) and hi == pytest.approx(1.5)


@pytest.mark.parametrize("base,impl,kwargs", [
    ([], [], {}),
    ([1.0, 2.0], [1.0], {}),
    ([1.0, 0.0], [1.0, 1.0], {}),
    ([1.0, -1.0], [1.0, 1.0], {}),
    ([1.0, float("nan")], [1.0, 1.0], {}),
    ([1.0, 1.0], [1.0, float("inf")], {}),
    ([1.0, 1.0], [1.0, 1.0], {"confidence": 1.0}),
    ([1.0, 1.0], [1.0, 1.0], {"confidence": 0.0}),
    ([1.0, 1.0], [1.0, 1.0], {"resamples": 0}),
    ([1.0, 1.0], [1.0, 1.0], {"resamples": 2.5}),
])
def test_bootstrap_input_validation(base, impl, kwargs):
    with pytest.raises(ValueError):
        bootstrap_ratio_ci(base, impl, **kwargs)


def test_median_iqr_validation():
    with pytest.raises(ValueError):
        median([])
    with pytest.raises(ValueError):
        iqr([])
    with pytest.raises(ValueError):
        quantile([1.0], 1.5)
