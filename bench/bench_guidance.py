"""sag_fast::guidance_combine and sag_fast::guidance_shift_ vs the eager PyTorch expressions they replace,
and vs a copy's bandwidth.

    .venv/bin/python -m pytest bench/bench_guidance.py

combine, eager: `u, c = pred.chunk(2); u + w*(c - u) + s*(u - d)`, six elementwise kernels and five
temporaries. The op reads u, c and d once and writes the output once: 4 tensors of (B, C, H, W) of traffic.
shift_ (what the integration runs: SAG's term added to every way in place, the pipeline's CFG follows),
eager: `delta = s*(u - d); pred.view(2, B, ...).add_(delta)`, three kernels and one temporary. The op reads
u and d once and reads and writes both ways of pred: 6 tensors of (B, C, H, W) of traffic (u is read
again as part of pred).
"""
from __future__ import annotations

import pytest
import torch
from conftest import bench_seconds, copy_seconds, record, time_fn

from sag_fast import _lib
from sag_fast.ops.guidance import guidance_combine, guidance_shift_

pytestmark = pytest.mark.skipif(not _lib.extension_available(), reason="sag_fast._C is not built")

W, S = 7.5, 0.75
SHAPES = [(2, 4, 128, 128), (16, 16, 128, 128)]  # pred (2B, C, H, W): B = 1 and 8
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() and _lib.extension_has_cuda() else [])
# On CUDA each timed call runs this many launches before it synchronises, so the sync is amortised.
CUDA_LOOP = 20


def eager_combine(pred, degraded, w, s):
    u, c = pred.chunk(2)
    return u + w * (c - u) + s * (u - degraded)


def _case(shape, device):
    return f"2-way B={shape[0] // 2} {device}"


def _nbytes(shape):
    b2, c, h, wd = shape
    return 4 * (b2 // 2) * c * h * wd * 4  # read u, c, d + write out, fp32


def _timed(benchmark, fn, device):
    """Median seconds of one fn() call, measured by pytest-benchmark."""
    if device == "cuda":
        def loop():
            for _ in range(CUDA_LOOP):
                fn()
            torch.cuda.synchronize()

        loop()
        benchmark(loop)
        return bench_seconds(benchmark) / CUDA_LOOP
    fn()
    benchmark(fn)
    return bench_seconds(benchmark)


def _inputs(shape, device):
    pred = torch.randn(shape, device=device)
    degraded = torch.randn((shape[0] // 2, *shape[1:]), device=device)
    return pred, degraded


_COPY_S: dict = {}


def _copy_floor(shape, device):
    """Seconds to copy the op's traffic, device to device (conftest.copy_seconds; looped on CUDA)."""
    key = (tuple(shape), device)
    if key not in _COPY_S:
        if device == "cuda":
            n = _nbytes(shape) // 2
            src, dst = torch.empty(n, dtype=torch.uint8, device=device), torch.empty(n, dtype=torch.uint8, device=device)

            def loop():
                for _ in range(CUDA_LOOP):
                    dst.copy_(src)

            _COPY_S[key] = time_fn(loop, device) / CUDA_LOOP
        else:
            _COPY_S[key] = copy_seconds(_nbytes(shape), device)
    return _COPY_S[key]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_eager(benchmark, shape, device):
    pred, degraded = _inputs(shape, device)
    seconds = _timed(benchmark, lambda: eager_combine(pred, degraded, W, S), device)
    if seconds is not None:
        record("guidance_combine", _case(shape, device), "eager", seconds, _nbytes(shape), _copy_floor(shape, device),
               shape=f"pred {tuple(shape)}", dtype="fp32")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_sag_fast(benchmark, shape, device):
    pred, degraded = _inputs(shape, device)
    torch.testing.assert_close(guidance_combine(pred, degraded, W, S), eager_combine(pred, degraded, W, S),
                               rtol=1e-5, atol=1e-5)
    seconds = _timed(benchmark, lambda: guidance_combine(pred, degraded, W, S), device)
    if seconds is not None:
        impl = f"sag_fast._C ({torch.get_num_threads()} threads)" if device == "cpu" else "sag_fast._C"
        record("guidance_combine", _case(shape, device), impl, seconds, _nbytes(shape), _copy_floor(shape, device),
               baseline="eager", shape=f"pred {tuple(shape)}", dtype="fp32")


def eager_shift_(pred, degraded, s):
    u = pred[: degraded.shape[0]]
    delta = s * (u - degraded)
    pred.view(2, *degraded.shape).add_(delta)  # both ways, the unconditional one included
    return pred


def _shift_nbytes(shape):
    b2, c, h, wd = shape
    return 6 * (b2 // 2) * c * h * wd * 4  # read u, d, read + write both ways of pred, fp32


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("impl", ["eager", "sag_fast"])
def test_shift(benchmark, shape, device, impl):
    pred, degraded = _inputs(shape, device)
    fast = f"sag_fast._C ({torch.get_num_threads()} threads)" if device == "cpu" else "sag_fast._C"
    if impl == "sag_fast":
        torch.testing.assert_close(guidance_shift_(pred.clone(), degraded, S), eager_shift_(pred.clone(), degraded, S),
                                   rtol=1e-5, atol=1e-5)
        fn = lambda: guidance_shift_(pred, degraded, S)  # noqa: E731  (values drift; the traffic does not)
    else:
        fn = lambda: eager_shift_(pred, degraded, S)  # noqa: E731
    seconds = _timed(benchmark, fn, device)
    if seconds is not None:
        record("guidance_shift_", _case(shape, device), "eager" if impl == "eager" else fast, seconds,
               _shift_nbytes(shape), _copy_floor(shape, device) * 1.5,
               baseline=None if impl == "eager" else "eager", shape=f"pred {tuple(shape)}", dtype="fp32")
