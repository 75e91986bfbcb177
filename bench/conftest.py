"""Shared benchmark plumbing: timing that synchronises CUDA, a copy-bandwidth floor, and one summary table.

Each benchmark calls `record(...)` with what it measured; at the end of the run the table is printed
(op, case, impl, time, GB/s, % of copy bandwidth, ratio to the baseline impl of the same case).
"""
from __future__ import annotations

import os
import time

import pytest
import torch

ROWS: list[dict] = []


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_fn(fn, device="cpu", warmup: int = 2, min_time: float = 0.2, max_iters: int = 200) -> float:
    """Median seconds of fn() (CUDA-synchronised); used where pytest-benchmark's fixture is not."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    start = time.perf_counter()
    while len(times) < max_iters and (time.perf_counter() - start < min_time or len(times) < 3):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2]


def copy_seconds(nbytes: int, device) -> float:
    """Time of a device-to-device copy of nbytes (read + write of nbytes/2 each): the bandwidth floor."""
    n = max(nbytes // 2, 1)
    src = torch.empty(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return time_fn(lambda: dst.copy_(src), device)


def record(op: str, case: str, impl: str, seconds: float, nbytes: int | None = None,
           copy_s: float | None = None, baseline: str | None = None, **extra) -> None:
    ROWS.append(dict(op=op, case=case, impl=impl, seconds=seconds, nbytes=nbytes, copy_s=copy_s,
                     baseline=baseline, extra=extra))


def bench_seconds(benchmark) -> float:
    """Median seconds from a pytest-benchmark fixture after it ran (None when benchmarks are disabled)."""
    stats = getattr(benchmark, "stats", None)
    return None if stats is None else stats.stats.median


def summary_lines() -> list[str]:
    head = "| op | case | impl | time (us) | GB/s | % copy BW | vs baseline |"
    lines = [head, "|---|---|---|---:|---:|---:|---:|"]
    for r in ROWS:
        gbs = pct = ratio = ""
        if r["nbytes"] and r["seconds"]:
            gbs = f"{r['nbytes'] / r['seconds'] / 1e9:.1f}"
            if r["copy_s"]:
                pct = f"{100 * r['copy_s'] / r['seconds']:.0f}%"
        if r["baseline"]:
            base = [b for b in ROWS if b["op"] == r["op"] and b["case"] == r["case"] and b["impl"] == r["baseline"]]
            if base and r["seconds"]:
                ratio = f"{base[0]['seconds'] / r['seconds']:.2f}x faster than {r['baseline']}"
        extra = " ".join(f"{k}={v}" for k, v in r["extra"].items())
        lines.append(f"| {r['op']} | {r['case']} | {r['impl']}{(' ' + extra) if extra else ''} | "
                     f"{r['seconds'] * 1e6:.1f} | {gbs} | {pct} | {ratio} |")
    return lines


def pytest_terminal_summary(terminalreporter):
    if ROWS:
        terminalreporter.write_line("")
        for line in summary_lines():
            terminalreporter.write_line(line)
        out = os.environ.get("SAG_FAST_BENCH_MD")
        if out:
            with open(out, "a") as f:
                f.write("\n".join(summary_lines()) + "\n")


@pytest.fixture
def bench_device():
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
