"""Runs the benchmark suite and writes bench/results/<YYYY-MM-DD>-<device>.md (the tables are printed too).

    python -m sag_fast bench [--quick] [--full] [--out PATH] [--only ops|e2e] [-k EXPR]
    python bench/run.py ...   (the same)

Two pytest runs, each in its own process so that TRITON_INTERPRET is fixed before any kernel is defined:
the op benchmarks (bench/bench_*.py but bench_e2e.py; under the Triton interpreter when there is no GPU) and
the end-to-end benchmark (bench/bench_e2e.py; on a CPU without the interpreter, i.e. the path a CPU user
runs). Rows stream to a JSON-lines file as they are measured (bench/conftest.py), so a part that runs past
its time limit still reports what it measured.

--quick: fewer, smaller cases and shorter timing (about 1-2 minutes on a 2-core CPU; the smoke test uses it);
its file is <date>-<device>-quick.md unless --out is given. --full: also the slow rows (torch.compile of the
SDXL-sized UNet on a GPU, of the tiny UNet on a CPU).
"""
from __future__ import annotations

import argparse
import glob
import importlib.util
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import tempfile
import time

BENCH = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH)


def _conftest():
    """bench/conftest.py loaded by path: the table formatting and timing helpers, one copy of them."""
    spec = importlib.util.spec_from_file_location("sag_fast_bench_conftest", os.path.join(BENCH, "conftest.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _slug(text: str) -> str:
    text = re.sub(r"\((r|tm)\)", "", text.lower())
    return re.sub(r"[^a-z0-9]+", "-", text).strip("-")


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def device_info(torch) -> tuple[str, str]:
    """(slug for the file name, description for the header)."""
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name(0)
        props = torch.cuda.get_device_properties(0)
        return _slug(name), (f"{name} ({props.multi_processor_count} SMs, {props.total_memory / 2**30:.0f} GiB, "
                             f"CUDA {torch.version.cuda})")
    model = _cpu_model()
    cores = _cpu_count()
    # "Intel(R) Xeon(R) Platinum 8480+ CPU @ 2.00GHz" -> "intel-xeon-platinum-8480"
    short = re.sub(r"\b(cpu|processor)\b", "", model.split("@")[0], flags=re.I)
    return f"cpu-{_slug(short) or 'unknown'}-{cores}cores", f"CPU: {model}, {cores} cores"


def _version(name: str) -> str:
    try:
        from importlib.metadata import version

        return version(name)
    except Exception:  # noqa: BLE001 - a missing package is reported as such
        return "not installed"


def _command(argv: list[str]) -> str:
    exe = sys.argv[0] if sys.argv else ""
    prog = "python -m sag_fast bench" if exe.endswith(os.path.join("sag_fast", "__main__.py")) else "python bench/run.py"
    return " ".join([prog, shlex.join(argv)]).strip()


def _env_float(name: str) -> float | None:
    value = os.environ.get(name)
    return float(value) if value else None


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bench/run.py", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer and smaller cases (a smoke run, 1-2 minutes on a CPU)")
    p.add_argument("--full", action="store_true", help="also the slow rows (torch.compile of the large UNets)")
    p.add_argument("--out", default=None, help="the markdown file (default bench/results/<date>-<device>.md)")
    p.add_argument("--only", choices=("ops", "e2e"), default=None, help="run one part only")
    p.add_argument("-k", dest="keyword", default=None, help="pytest -k expression, passed to both parts")
    p.add_argument("--timeout", type=float, default=None,
                   help="seconds per part before it is stopped (default 150 quick, 420 otherwise)")
    p.add_argument("--budget", type=float, default=_env_float("SAG_FAST_BENCH_BUDGET"),
                   help="seconds for the whole run (env SAG_FAST_BENCH_BUDGET): the op part gets at most 40%%, "
                        "the end-to-end part what is left")
    return p


def _pytest_cmd(files: list[str], quick: bool, keyword: str | None) -> list[str]:
    cmd = [sys.executable, "-m", "pytest", *files, "-q", "-rs", "-p", "no:cacheprovider",
           "--benchmark-disable-gc", "--benchmark-sort=name", "--benchmark-columns=min,median,max,rounds"]
    if quick:
        cmd += ["--benchmark-min-rounds=3", "--benchmark-max-time=0.05"]
    else:
        cmd += ["--benchmark-min-rounds=5", "--benchmark-max-time=0.5"]
    if keyword:
        cmd += ["-k", keyword]
    return cmd


def _run_part(name: str, files: list[str], env: dict, args, timeout: float) -> dict:
    cmd = _pytest_cmd([os.path.relpath(f, ROOT) for f in files], args.quick, args.keyword)
    interp = env.get("TRITON_INTERPRET") == "1"
    print(f"\n=== bench {name}: {shlex.join(cmd[1:])}" + ("  (TRITON_INTERPRET=1)" if interp else ""), flush=True)
    start = time.perf_counter()
    try:
        rc = subprocess.run(cmd, cwd=ROOT, env=env, timeout=timeout).returncode
        status = {0: "passed", 5: "no benchmarks collected"}.get(rc, f"pytest exit status {rc} (failures above)")
    except subprocess.TimeoutExpired:
        rc, status = 124, f"stopped after {timeout:.0f} s (--timeout); rows measured until then are kept"
    return dict(part=name, rc=rc, status=status, seconds=time.perf_counter() - start, interpreter=interp,
                command=shlex.join(["python", *cmd[1:]]))


def _read_rows(path: str) -> tuple[list[dict], list[dict], list[dict]]:
    rows = {"op": [], "e2e": [], "dispatch": []}
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                if line.strip():
                    row = json.loads(line)
                    rows[row.pop("kind")].append(row)
    return rows["op"], rows["e2e"], rows["dispatch"]


def render(header: dict, parts: list[dict], ops: list[dict], e2e: list[dict], dispatch: list[dict], fmt) -> str:
    h = header
    lines = [
        f"# sag_fast benchmarks: {h['date']}, {h['device_slug']}",
        "",
        f"- device: {h['device']}",
        f"- versions: torch {h['torch']}, triton {h['triton']}, diffusers {h['diffusers']}, sag_fast {h['sag_fast']} "
        f"(C++ extension: {h['extension']})",
        f"- command: `{h['command']}` ({'quick' if h['quick'] else 'full' if h['full'] else 'default'} run, "
        f"{h['seconds']:.0f} s)",
        f"- copy bandwidth: {h['copy']}",
    ]
    for p in parts:
        lines.append(f"- {p['part']}: {p['status']} in {p['seconds']:.0f} s"
                     + (" (Triton interpreter: op times are NOT GPU figures)" if p["interpreter"] else "")
                     + f": `{p['command']}`")
    lines += ["", "## Ops", ""]
    if ops:
        lines += ["time: median; GB/s: bytes the op must read and write / time; % copy BW: a device copy of the "
                  "same bytes / time (100% = at the memory-bandwidth floor); vs baseline: baseline time / time.", ""]
        lines += fmt.op_table_lines(ops)
    else:
        lines.append("(no op rows)")
    lines += ["", "## End to end (one sampling step)", ""]
    if e2e:
        lines += ["Same UNet, same DDIM steps, denoising loop only (output_type=\"latent\"). / baseline step: this "
                  "variant's step over its baseline's (SAG+CFG over CFG is the SAG overhead, floor 1.5).", ""]
        lines += fmt.e2e_table_lines(e2e)
        overhead = fmt.e2e_overhead_lines(e2e)
        if overhead:
            lines += ["", "SAG overhead (SAG+CFG step / CFG step):", ""] + overhead
    else:
        lines.append("(no end-to-end rows)")
    if dispatch:
        lines += ["", "## Ops dispatched in one sampling step", "",
                  "Counted with TorchDispatchMode on the CPU path (a 2-step minus a 1-step run): every op is a "
                  "kernel launch on a GPU; host syncs must be 0.", ""]
        lines += fmt.dispatch_table_lines(dispatch)
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    argv = list(sys.argv[1:] if argv is None else argv)
    import torch

    fmt = _conftest()
    has_cuda = torch.cuda.is_available()
    slug, device = device_info(torch)
    date = time.strftime("%Y-%m-%d")
    out = args.out or os.path.join(BENCH, "results", f"{date}-{slug}{'-quick' if args.quick else ''}.md")
    timeout = args.timeout or (150.0 if args.quick else 420.0)
    if args.budget is not None and args.timeout is None:
        timeout = args.budget

    dev = torch.device("cuda" if has_cuda else "cpu")
    nbytes = (1 << 30) if has_cuda else (64 << 20)
    copy_s = fmt.copy_seconds(nbytes, dev)
    copy = f"{nbytes / copy_s / 1e9:.0f} GB/s (a {nbytes >> 20} MiB device copy, bytes read + written)"
    if has_cuda:
        torch.cuda.empty_cache()  # the benchmarks run in child processes: leave them the whole GPU
    try:
        import sag_fast

        ext = ("built, with CUDA" if sag_fast.extension_has_cuda() else "built, CPU only") \
            if sag_fast.extension_available() else "not built"
        sag_version = sag_fast.__version__
    except Exception as exc:  # noqa: BLE001 - reported, the benchmarks say the rest
        ext, sag_version = f"sag_fast not importable: {exc}", "?"

    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        jsonl = os.path.join(tmp, "rows.jsonl")
        env = dict(os.environ, SAG_FAST_BENCH_JSONL=jsonl, PYTHONUNBUFFERED="1")
        env.pop("SAG_FAST_BENCH_MD", None)
        env["SAG_FAST_BENCH_QUICK"] = "1" if args.quick else "0"
        env["SAG_FAST_BENCH_FULL"] = "1" if args.full else "0"
        e2e_file = os.path.join(BENCH, "bench_e2e.py")
        op_files = [f for f in sorted(glob.glob(os.path.join(BENCH, "bench_*.py"))) if f != e2e_file]
        parts = []
        if args.only in (None, "ops"):
            if op_files:
                op_env = dict(env)
                if has_cuda:
                    op_env.pop("TRITON_INTERPRET", None)
                else:
                    op_env["TRITON_INTERPRET"] = "1"  # Triton kernels only run on a CPU in the interpreter
                limit = timeout if args.budget is None else min(timeout, 0.4 * args.budget)
                parts.append(_run_part("ops", op_files, op_env, args, limit))
            else:
                print("bench: no op benchmarks (bench/bench_*.py) yet")
        if args.only in (None, "e2e") and os.path.exists(e2e_file):
            e2e_env = dict(env)
            e2e_env.pop("TRITON_INTERPRET", None)  # real kernels on a GPU, the CPU path on a CPU
            limit = timeout
            if args.budget is not None:
                limit = min(timeout, max(args.budget - (time.perf_counter() - start), 10.0))
            parts.append(_run_part("end to end", [e2e_file], e2e_env, args, limit))
        ops, e2e, dispatch = _read_rows(jsonl)

    header = dict(date=date, device_slug=slug, device=device, torch=torch.__version__, triton=_version("triton"),
                  diffusers=_version("diffusers"), sag_fast=sag_version, extension=ext,
                  command=_command(argv), quick=args.quick, full=args.full, copy=copy,
                  seconds=time.perf_counter() - start)
    text = render(header, parts, ops, e2e, dispatch, fmt)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        f.write(text)
    print("\n" + text)
    shown = os.path.relpath(out)
    print(f"bench: wrote {out if shown.startswith('..') else shown}")
    failed = [p for p in parts if p["rc"] not in (0, 5)]
    for p in failed:
        print(f"bench: {p['part']}: {p['status']}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
