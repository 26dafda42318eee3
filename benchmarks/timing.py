"""Paired timing for noisy shared machines.

Absolute timings on a shared 2-core machine drift by up to 2x within an hour, so variants are never compared
across runs: each round times every variant once, in an order rotated round to round, after waiting for the
CPU to be quiet, and the result is the median (with min and max) of the per-round speed ratios.
"""

import math
import statistics
import time
from collections.abc import Callable


def _cpu_busy_fraction(window: float = 0.2) -> float:
    def sample() -> tuple[int, int]:
        with open("/proc/stat") as f:
            values = [int(v) for v in f.readline().split()[1:]]
        idle = values[3] + values[4]  # idle + iowait
        return sum(values) - idle, sum(values)

    busy0, total0 = sample()
    time.sleep(window)
    busy1, total1 = sample()
    return (busy1 - busy0) / max(total1 - total0, 1)


def wait_until_quiet(threshold: float = 0.15, timeout: float = 10.0) -> None:
    """Wait (up to `timeout` s) until other processes use less than `threshold` of the CPUs."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and _cpu_busy_fraction() > threshold:
        pass


def best_of(fn: Callable[[], object], repeats: int = 1) -> float:
    """Seconds of the fastest of `repeats` calls: the least disturbed one."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def median_interval(values: list[float], confidence: float = 0.95) -> tuple[float, float]:
    """Distribution-free confidence interval of the median: the order statistics j and n + 1 - j, for the largest
    j whose coverage 1 - 2 P(Binomial(n, 1/2) < j) is at least `confidence`. Needs no assumption about the shape
    of the noise, which on a shared machine is skewed; with too few values for that confidence, (min, max)."""
    xs, n = sorted(values), len(values)
    j, below = 0, 0.0  # below = P(Binomial(n, 1/2) <= j - 1)
    while j < n // 2 and 1 - 2 * (below + math.comb(n, j) / 2**n) >= confidence:
        below += math.comb(n, j) / 2**n
        j += 1
    return (xs[j - 1], xs[n - j]) if j else (xs[0], xs[-1])


def paired_ratios(
    variants: dict[str, Callable[[], object]], baseline: str, rounds: int = 9, repeats: int = 1
) -> dict[str, dict[str, float]]:
    """Time every variant once per round (rotating the order), and return for each variant its median
    seconds and the median, min, max and 95% interval of the median over rounds of
    `baseline_seconds / variant_seconds` (> 1: faster)."""
    names = list(variants)
    seconds = {name: [] for name in names}
    for r in range(rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            wait_until_quiet()
            seconds[name].append(best_of(variants[name], repeats))
    result = {}
    for name in names:
        ratios = [b / v for b, v in zip(seconds[baseline], seconds[name], strict=False)]
        result[name] = {
            "seconds": statistics.median(seconds[name]),
            "ratio": statistics.median(ratios),
            "ratio_min": min(ratios),
            "ratio_max": max(ratios),
            "ratio_ci": median_interval(ratios),
        }
    return result


def peak_rss_rise(fn, calls: int = 1) -> float:
    """MiB by which the peak RSS rises above the current RSS during `fn()` (Linux: clear_refs resets the peak);
    with `calls` > 1, the median over that many calls, as the allocator keeps or returns freed blocks differently
    from call to call."""

    def status(key: str) -> int:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(key))

    rises = []
    for _ in range(calls):
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        before = status("VmRSS:")
        fn()
        rises.append((status("VmHWM:") - before) / 1024)
    return statistics.median(rises)


def print_table(title: str, headers: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows, strict=False)]

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=False)) + " |"

    print(f"\n{title}\n")
    print(line(headers))
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in rows:
        print(line(row))
