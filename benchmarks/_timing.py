"""Timing shared by the benchmark suites (benchmarks/bench_*.py)."""
import timeit

from bertkern.bench.stats import bootstrap_ratio_ci, iqr, median

DEFAULT_ROUNDS = 9  # enough for a stable median; suites whose calls take > 0.5 s use 7


def interleaved_rounds(fns, rounds=DEFAULT_ROUNDS, target_s=0.05):
    """Per-round seconds per call of each callable: a list (one per callable, in order) of
    ``rounds`` floats. The callables are timed round-robin with timeit, round i of every one
    back to back, so that drift in the machine's load hits them alike and round i of two
    implementations forms a pair (bertkern.bench.stats.bootstrap_ratio_ci). Each is called once
    first (allocator, lazy init), then timed to calibrate (_calibrate): a round repeats a
    callable ``max(1, target_s / its time)`` times and records the mean of those calls."""
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    for fn in fns:
        fn()
    per_call = [_calibrate(fn, target_s) for fn in fns]
    numbers = [max(1, int(target_s / t)) for t in per_call]
    samples = [[] for _ in fns]
    for _ in range(rounds):
        for i, (fn, number) in enumerate(zip(fns, numbers)):
            samples[i].append(timeit.timeit(fn, number=number) / number)
    return samples


def _calibrate(fn, target_s):
    """Seconds of one call of fn: one timed call, or the fastest of three where a call is
    shorter than target_s (one stall of a shared machine would otherwise set the calls per
    round to 1 for a callable that takes a millisecond)."""
    t = timeit.timeit(fn, number=1)
    if t < target_s:
        t = min([t] + timeit.repeat(fn, number=1, repeat=2))
    return max(t, 1e-7)


def summary(round_seconds):
    """The extra_info keys of one implementation's rounds: median_s, iqr_s, min_s, rounds,
    round_seconds."""
    xs = [float(x) for x in round_seconds]
    return dict(median_s=median(xs), iqr_s=iqr(xs), min_s=min(xs), rounds=len(xs), round_seconds=xs)


def ratio_info(name, base_rounds, impl_rounds):
    """``speedup_vs_<name>`` (median of the baseline's rounds / median of the implementation's)
    and ``speedup_vs_<name>_ci95`` ([lo, hi], paired bootstrap over the interleaved rounds)."""
    lo, hi = bootstrap_ratio_ci(base_rounds, impl_rounds)
    return {f"speedup_vs_{name}": median(base_rounds) / median(impl_rounds),
            f"speedup_vs_{name}_ci95": [lo, hi]}


def cpu_peak_bytes(fn):
    """Peak bytes of CPU tensor memory allocated by ``fn()`` above what was live when it
    started: the running sum of the allocations and frees the profiler records
    (profile_memory=True), in time order. The CPU allocator keeps no peak statistics of its
    own (torch.cuda.max_memory_allocated's counterpart)."""
    import torch

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    deltas = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU)
    live = peak = 0
    for _, nbytes in deltas:
        live += nbytes
        peak = max(peak, live)
    return int(peak)
