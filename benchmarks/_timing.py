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
