"""Summary statistics for benchmark rounds (standard library only).

The benchmark suites (benchmarks/_timing.py) time every implementation of a case in interleaved
rounds: round i of every implementation ran back to back, so the rounds are paired. These
helpers reduce the per-round seconds to what the report shows: the median, the interquartile
range, and a paired bootstrap interval for the ratio of two medians.
"""
import math
import random

__all__ = ["median", "quantile", "iqr", "bootstrap_ratio_ci"]


def _values(xs, name="xs"):
    values = [float(x) for x in xs]
    if not values:
        raise ValueError(f"{name} is empty")
    if any(math.isnan(v) or math.isinf(v) for v in values):
        raise ValueError(f"{name} holds a NaN or an infinity")
    return values


def median(xs):
    """The median of xs (mean of the two middle values for an even count)."""
    values = sorted(_values(xs))
    n = len(values)
    mid = n // 2
    return values[mid] if n % 2 else (values[mid - 1] + values[mid]) / 2.0


def quantile(xs, q):
    """The q-quantile of xs, linear interpolation between order statistics (numpy's default,
    'linear' / type 7): position q * (n - 1) in the sorted values."""
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"q must lie in [0, 1], got {q}")
    values = sorted(_values(xs))
    pos = q * (len(values) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (pos - lo)


def iqr(xs):
    """Interquartile range q75 - q25 (linear interpolation)."""
    return quantile(xs, 0.75) - quantile(xs, 0.25)


def bootstrap_ratio_ci(base, impl, confidence=0.95, resamples=2000, seed=0):
    """Percentile interval (lo, hi) of median(base) / median(impl) by a paired bootstrap over
    rounds: base[i] and impl[i] ran back to back (interleaved rounds), so each resample draws
    round indices with replacement and takes the same indices from both. Deterministic for a
    given seed. With baseline times in ``base`` and bertkern's in ``impl`` the ratio is the
    speedup; an interval containing 1.0 means the run cannot tell the two apart."""
    base, impl = _values(base, "base"), _values(impl, "impl")
    if len(base) != len(impl):
        raise ValueError(f"paired samples need equal lengths, got {len(base)} and {len(impl)}")
    if any(v <= 0 for v in base + impl):
        raise ValueError("times must be positive")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence}")
    if int(resamples) != resamples or resamples < 1:
        raise ValueError(f"resamples must be a positive integer, got {resamples}")
    rng = random.Random(seed)
    n = len(base)
    ratios = []
    for _ in range(int(resamples)):
        idx = [rng.randrange(n) for _ in range(n)]
        ratios.append(median([base[i] for i in idx]) / median([impl[i] for i in idx]))
    alpha = (1.0 - confidence) / 2.0
    return quantile(ratios, alpha), quantile(ratios, 1.0 - alpha)
