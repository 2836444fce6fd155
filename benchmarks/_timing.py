"""Timing shared by the benchmark suites (benchmarks/bench_*.py)."""
import timeit


def interleaved_min(fns, rounds=3, target_s=0.05):
    """Min seconds per call of each callable, timed round-robin with timeit so that drift in the
    machine's load hits all of them alike. Each is called once first (allocator, lazy init)."""
    for fn in fns:
        fn()
    per_call = [max(timeit.timeit(fn, number=1), 1e-7) for fn in fns]
    numbers = [max(1, int(target_s / t)) for t in per_call]
    best = [float("inf")] * len(fns)
    for _ in range(rounds):
        for i, (fn, number) in enumerate(zip(fns, numbers)):
            best[i] = min(best[i], timeit.timeit(fn, number=number) / number)
    return best
