"""Shared benchmark plumbing: timing that synchronises CUDA, a copy-bandwidth floor, and the summary tables.

Each op benchmark calls `record(...)` with what it measured; the end-to-end benchmark calls `record_e2e(...)`.
At the end of the run the tables are printed (op, case, impl, time, GB/s, % of copy bandwidth, ratio to the
baseline impl of the same case; and per model the time of a sampling step for each guidance variant).

Environment (set by bench/run.py, honoured when pytest is run directly too):
    SAG_FAST_BENCH_QUICK=1     fewer and smaller cases (`QUICK`, the `bench_quick` fixture), shorter timing
    SAG_FAST_BENCH_JSONL=PATH  every row is appended to PATH as one JSON line as soon as it is recorded, so a
                               run that is killed still leaves what it measured (bench/run.py reads it)
    SAG_FAST_BENCH_MD=PATH     the tables are appended to PATH at the end of the session
"""
from __future__ import annotations

import json
import os
import time

import pytest
import torch

QUICK = os.environ.get("SAG_FAST_BENCH_QUICK") == "1"
ROWS: list[dict] = []
E2E_ROWS: list[dict] = []
DISPATCH_ROWS: list[dict] = []


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_fn(fn, device="cpu", warmup: int = 2, min_time: float | None = None, max_iters: int = 200) -> float:
    """Median seconds of fn() (CUDA-synchronised); used where pytest-benchmark's fixture is not.

    min_time defaults to 0.2 s of timed calls (0.05 s with SAG_FAST_BENCH_QUICK=1); at least 3 calls are timed.
    """
    if min_time is None:
        min_time = 0.05 if QUICK else 0.2
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


def _stream(kind: str, row: dict) -> None:
    path = os.environ.get("SAG_FAST_BENCH_JSONL")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({"kind": kind, **row}, default=str) + "\n")


def record(op: str, case: str, impl: str, seconds: float, nbytes: int | None = None,
           copy_s: float | None = None, baseline: str | None = None, **extra) -> None:
    """One op measurement. `extra` may carry shape=... and dtype=..., which get their own columns."""
    row = dict(op=op, case=case, impl=impl, seconds=seconds, nbytes=nbytes, copy_s=copy_s,
               baseline=baseline, extra=extra)
    ROWS.append(row)
    _stream("op", row)


def record_e2e(model: str, variant: str, step_seconds: float | None, *, steps: int | None = None,
               baseline: str | None = None, peak_bytes: int | None = None, mem_kind: str | None = None,
               note: str = "", **extra) -> None:
    """One end-to-end measurement: seconds per sampling step of `variant` on `model`.

    baseline: the variant whose step time this one is divided by (e.g. "CFG" for SAG+CFG: the SAG overhead).
    step_seconds=None records a skipped variant; `note` says why.
    """
    row = dict(model=model, variant=variant, step_seconds=step_seconds, steps=steps, baseline=baseline,
               peak_bytes=peak_bytes, mem_kind=mem_kind, note=note, extra=extra)
    E2E_ROWS.append(row)
    _stream("e2e", row)


def record_dispatch(model: str, variant: str, ops: int, host_syncs: int, baseline: str | None = None) -> None:
    """Operators dispatched in one sampling step of `variant` (counted with TorchDispatchMode) and how many
    of them read a device value on the host (a sync on CUDA)."""
    row = dict(model=model, variant=variant, ops=ops, host_syncs=host_syncs, baseline=baseline)
    DISPATCH_ROWS.append(row)
    _stream("dispatch", row)


def bench_seconds(benchmark) -> float:
    """Median seconds from a pytest-benchmark fixture after it ran (None when benchmarks are disabled)."""
    stats = getattr(benchmark, "stats", None)
    return None if stats is None else stats.stats.median


# ------------------------------------------------------------------------------------------ tables
def _speedup(ratio: float, than: str = "") -> str:
    """baseline time / time, said the readable way round."""
    tail = f" than {than}" if than else ""
    return f"{ratio:.2f}x faster{tail}" if ratio >= 1 else f"{1 / ratio:.2f}x slower{tail}"


def _gbs(value: float) -> str:
    return f"{value:.0f}" if value >= 100 else f"{value:.1f}" if value >= 1 else f"{value:.3f}"


def _shape_dtype(row: dict) -> tuple:
    extra = row.get("extra") or {}
    return extra.get("shape"), extra.get("dtype")


def op_table_lines(rows: list[dict]) -> list[str]:
    head = "| op | case | shape | dtype | impl | time (us) | GB/s | % copy BW | vs baseline |"
    lines = [head, "|---|---|---|---|---|---:|---:|---:|---|"]
    for r in rows:
        extra = dict(r.get("extra") or {})
        shape, dtype = extra.pop("shape", ""), extra.pop("dtype", "")
        gbs = pct = ratio = ""
        sec = r.get("seconds")
        if r.get("nbytes") and sec:
            gbs = _gbs(r["nbytes"] / sec / 1e9)
            if r.get("copy_s"):
                pct = f"{100 * r['copy_s'] / sec:.0f}%"
        if r.get("baseline"):
            # the baseline row of the same op, case, shape and dtype
            base = [b for b in rows if b["op"] == r["op"] and b["case"] == r["case"] and b["impl"] == r["baseline"]
                    and _shape_dtype(b) == _shape_dtype(r)]
            if base and base[0].get("seconds") and sec:
                ratio = _speedup(base[0]["seconds"] / sec, r["baseline"])
        tail = " ".join(f"{k}={v}" for k, v in extra.items())
        time_us = f"{sec * 1e6:.1f}" if sec else "n/a"
        lines.append(f"| {r['op']} | {r['case']} | {shape} | {dtype} | {r['impl']}{(' ' + tail) if tail else ''} | "
                     f"{time_us} | {gbs} | {pct} | {ratio} |")
    return lines


def summary_lines() -> list[str]:
    return op_table_lines(ROWS)


def _mib(nbytes) -> str:
    return "" if nbytes is None else f"{nbytes / 2**20:.1f}"


def e2e_table_lines(rows: list[dict]) -> list[str]:
    """Per model: ms per step, the ratio to the variant's baseline (SAG+CFG / CFG: floor 1.5), speedup over
    diffusers' SAG pipeline, peak memory."""
    head = ("| model | variant | ms/step | / baseline step (SAG floor 1.5) | vs diffusers SAG | peak extra mem (MiB) "
            "| memory measured as | note |")
    lines = [head, "|---|---|---:|---|---:|---:|---|---|"]
    for r in rows:
        same = [b for b in rows if b["model"] == r["model"]]
        sec = r.get("step_seconds")
        over = vs_diff = ""
        if sec and r.get("baseline"):
            base = [b for b in same if b["variant"] == r["baseline"] and b.get("step_seconds")]
            if base:
                over = f"{sec / base[0]['step_seconds']:.2f}x {r['baseline']}"
        diff = [b for b in same if b["variant"].startswith("diffusers SAG") and b.get("step_seconds")]
        if sec and diff and "SAG" in r["variant"] and not r["variant"].startswith("diffusers"):
            vs_diff = _speedup(diff[0]["step_seconds"] / sec)
        ms = f"{sec * 1e3:.2f}" if sec else ("on paper" if (r.get("extra") or {}).get("on_paper") else "skipped")
        lines.append(f"| {r['model']} | {r['variant']} | {ms} | {over} | {vs_diff} | {_mib(r.get('peak_bytes'))} | "
                     f"{r.get('mem_kind') or ''} | {r.get('note') or ''} |")
    return lines


def e2e_overhead_lines(rows: list[dict]) -> list[str]:
    """Per model: the SAG overhead (SAG+CFG step / CFG step) of each SAG variant against its floor.

    SAG+CFG runs a batch-2 and a batch-1 forward where CFG runs the batch-2 one, so the floor is 1.5 when a
    forward's time is proportional to its batch; (CFG + no guidance) / CFG is the floor measured on this device.
    """
    lines = []
    for model in dict.fromkeys(r["model"] for r in rows):
        step = {r["variant"]: r["step_seconds"] for r in rows if r["model"] == model and r.get("step_seconds")}
        parts = []
        for variant, sec in step.items():
            base = next((r.get("baseline") for r in rows if r["model"] == model and r["variant"] == variant), None)
            if "SAG+CFG" in variant and base in step:
                parts.append(f"{variant}: {sec / step[base]:.2f}x {base}")
        if not parts:
            continue
        floor = "1.5 nominal"
        if "CFG" in step and "no guidance" in step:
            floor += f", {(step['CFG'] + step['no guidance']) / step['CFG']:.2f} measured = (CFG + no guidance) / CFG"
        lines.append(f"- {model}: " + "; ".join(parts) + f" (floor {floor})")
    return lines


def dispatch_table_lines(rows: list[dict]) -> list[str]:
    lines = ["| model | variant | aten ops / step | host syncs / step | vs baseline |", "|---|---|---:|---:|---|"]
    for r in rows:
        base = [b for b in rows if b["model"] == r["model"] and b["variant"] == r["baseline"]]
        vs = f"{r['ops'] - base[0]['ops']:+d} ops vs {r['baseline']}" if base else ""
        lines.append(f"| {r['model']} | {r['variant']} | {r['ops']} | {r['host_syncs']} | {vs} |")
    return lines


def _all_lines() -> list[str]:
    lines: list[str] = []
    if ROWS:
        lines += ["", "Ops:"] + op_table_lines(ROWS)
    if E2E_ROWS:
        lines += ["", "End to end (one sampling step):"] + e2e_table_lines(E2E_ROWS)
        overhead = e2e_overhead_lines(E2E_ROWS)
        if overhead:
            lines += ["", "SAG overhead (SAG+CFG step / CFG step):"] + overhead
    if DISPATCH_ROWS:
        lines += ["", "Ops dispatched in one sampling step:"] + dispatch_table_lines(DISPATCH_ROWS)
    return lines


def pytest_terminal_summary(terminalreporter):
    lines = _all_lines()
    if not lines:
        return
    # bench/run.py prints its own report; repeating the tables here would only add noise
    if not os.environ.get("SAG_FAST_BENCH_JSONL"):
        for line in lines:
            terminalreporter.write_line(line)
    out = os.environ.get("SAG_FAST_BENCH_MD")
    if out:
        with open(out, "a") as f:
            f.write("\n".join(lines) + "\n")


@pytest.fixture(scope="session")  # usable from module-scoped fixtures (inputs built once per file)
def bench_device():
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(scope="session")
def bench_quick() -> bool:
    """True for a quick run (bench/run.py --quick): use fewer and smaller cases."""
    return QUICK
