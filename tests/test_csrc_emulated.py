"""The CUDA guidance kernels' index logic, executed on the CPU: csrc/guidance_kernels.cuh compiled as host C++
(nvcc -x c++) with every <<<...>>> launch replaced by a serial loop over blocks and threads
(tests/csrc/guidance_kernels_emu.cpp), against a double-precision expectation. Covers the vector and scalar
paths, padded strides and offset pointers, more planes than gridDim.y, planes longer than one grid, shift with
every uncond_index, and that nothing outside the tensors is written. Skipped where nvcc is absent."""
from __future__ import annotations

import os
import re
import subprocess

import pytest

from test_csrc_nvcc import CSRC, NVCC

HERE = os.path.dirname(os.path.abspath(__file__))
pytestmark = pytest.mark.skipif(NVCC is None, reason="nvcc not found (PATH, /usr/local/bin, $CUDA_HOME/bin)")

LAUNCH = re.compile(r"(guidance_\w+_kernel<T, (?:vec|1)>)<<<(.*?), kGuidanceThreads, 0, stream>>>\(a\);")


def emulated_header() -> str:
    src = open(os.path.join(CSRC, "guidance_kernels.cuh")).read()
    src, n = LAUNCH.subn(lambda m: f"emu_launch({m.group(2)}, kGuidanceThreads, [&]{{ {m.group(1)}(a); }});", src)
    assert n == 4, f"expected the 4 kernel launches of guidance_kernels.cuh, rewrote {n}: update LAUNCH"
    return src.replace("return cudaGetLastError();", "return cudaSuccess;")


def test_kernels_match_expectation_on_host(tmp_path):
    (tmp_path / "kernels_emu.h").write_text(emulated_header())
    exe = tmp_path / "emu"
    build = subprocess.run([NVCC, "-x", "c++", "-std=c++17", "-O1", "-w", f"-I{tmp_path}",
                            os.path.join(HERE, "csrc", "guidance_kernels_emu.cpp"), "-o", str(exe)],
                           capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-6000:]
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and "failures: 0" in run.stdout, run.stdout[-4000:] + run.stderr[-2000:]
