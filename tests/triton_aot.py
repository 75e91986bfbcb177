"""Ahead-of-time compilation of Triton kernels for sm_80/sm_90 without a GPU, and ptxas spill checks.

Under TRITON_INTERPRET=1 (how the suite runs without a GPU) `triton.jit` yields interpreted functions
that cannot be compiled, so `compile_report` compiles in a subprocess with the interpreter off.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile

ARCHS = (80, 90)


def ptxas_paths() -> list[str]:
    """The ptxas binaries that ship in the triton wheel (triton picks the newer one for newer PTX)."""
    import triton

    folder = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    paths = [os.path.join(folder, n) for n in ("ptxas-blackwell", "ptxas") if os.path.exists(os.path.join(folder, n))]
    if not paths:
        raise FileNotFoundError(f"no ptxas ships with triton in {folder}")
    return paths


def functionalised_targets(script: str) -> dict[str, str]:
    """Runs a trace script (it prints "<device> <count> <targets>" per line) in a process without
    TRITON_INTERPRET (interpreted kernels cannot be traced) and returns {device: the rest of its line}."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    return dict(line.split(" ", 1) for line in out.stdout.strip().splitlines())


def compile_report(kernel: str, signature: dict, constexprs: dict, arch: int, num_warps: int = 4) -> str:
    """Compiles `module:function` to PTX for sm_<arch> and returns `ptxas -v`'s resource report."""
    spec = json.dumps({"kernel": kernel, "signature": signature, "constexprs": constexprs,
                       "arch": arch, "num_warps": num_warps})
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, __file__, spec], capture_output=True, text=True, env=env,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if out.returncode != 0:
        raise AssertionError(f"compiling {kernel} for sm_{arch} failed:\n{out.stderr[-4000:]}")
    return out.stdout


def spilled_bytes(report: str) -> int:
    """Sum of the spill stores and loads that ptxas reports (0 means no spill)."""
    found = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", report)
    if not found:
        raise AssertionError(f"ptxas printed no spill figures:\n{report}")
    return sum(int(a) + int(b) for a, b in found)


def _main(spec: dict) -> None:
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    module, name = spec["kernel"].split(":")
    fn = getattr(importlib.import_module(module), name)
    src = ASTSource(fn=fn, signature=spec["signature"], constexprs=spec["constexprs"])
    compiled = triton.compile(src, target=GPUTarget("cuda", spec["arch"], 32),
                              options={"num_warps": spec["num_warps"]})
    target = re.search(r"^\.target\s+(sm_\w+)", compiled.asm["ptx"], re.M).group(1)  # sm_90a on Hopper
    with tempfile.TemporaryDirectory() as tmp:
        ptx = os.path.join(tmp, "k.ptx")
        with open(ptx, "w") as f:
            f.write(compiled.asm["ptx"])
        errors = []
        for ptxas in ptxas_paths():  # the first whose PTX ISA version is new enough
            res = subprocess.run([ptxas, f"-arch={target}", "-v", ptx, "-o", os.path.join(tmp, "k.cubin")],
                                 capture_output=True, text=True)
            if res.returncode == 0:
                print(res.stdout + res.stderr)
                return
            errors.append(f"{ptxas}: {res.stderr}")
    raise SystemExit("ptxas failed:\n" + "\n".join(errors))


if __name__ == "__main__":
    _main(json.loads(sys.argv[1]))
