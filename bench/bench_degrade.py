"""Benchmarks of sag_fast.ops.degrade.

GPU (skipped without one): the fused kernel's bytes that must move (x and model_output read once,
the output written once, plus the low-resolution mask and c1/c2) over its time -> GB/s and % of a
device copy of the same bytes, for (8, 16, 256, 256) and (8, 4, 128, 128), fp16 and fp32, and the
launch time of an empty Triton kernel for the small case (the floor a single launch can reach).
Times are per call from 50 back-to-back calls per synchronised measurement; the copy is timed the same way.
CPU (always): the CPU kernel of sag_fast::degrade (the fused C++ kernel, whatever TRITON_INTERPRET says)
and the unfused torch reference (sag_fast.reference.degrade, conv2d) against the deprecated diffusers SAG
pipeline's sequence for the same stage (x0 = (x - sigma*eps)/alpha, blur, upsample the mask, blend, DDIM
add_noise), SD latents; (2, 4, 128, 128) also with one thread.

    .venv/bin/python -m pytest bench/bench_degrade.py -q -s

Static proxy (no GPU here): SASS of the steady-state row loop at the launcher's configuration for
(8, 16, 256, 256), sm_90, specialised as a contiguous launch (unit strides constant, %16 hints),
instructions per output element, per thread:
    one column per thread (before): fp16 199 (21 LDG, 36 FP32, 27 conversions, 114 int/address),
                                    fp32 178 (21 LDG, 36 FP32, 115 int/address)
    8 columns per thread (now):     fp16 38 (1 LDG, 26 FP32, 6.6 conversions, 3.3 int/address),
                                    fp32 46 (1.5 LDG, 35 FP32 incl. selects, 3.8 SHFL, 3.7 int)
Halo rows (19-row chunks + 8) multiply this by 1.42. At 132 SMs x 4 issue/clk x 1.7 GHz that is
~16 us of issue for fp16 against ~15 us for 50 MB at 3.35 TB/s (before: ~66 us, ~23% of copy), and
~17 us for fp32 against ~30 us: issue no longer bounds fp16 far below copy bandwidth (estimate, unmeasured).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import triton

from conftest import QUICK, record, time_fn  # bench/conftest.py
from sag_fast import reference
from sag_fast.ops import degrade as dg

GPU = torch.cuda.is_available()


@triton.jit
def _empty_kernel(x_ptr):
    pass


def _batched_seconds(fn, device, reps: int) -> float:
    """Seconds per call of fn, from `reps` back-to-back calls per synchronised measurement."""
    def many():
        for _ in range(reps):
            fn()
    return time_fn(many, device) / reps


def _case(B, C, H, W, dtype, device, grid=(16, 16)):
    x = torch.randn(B, C, H, W, device=device, dtype=dtype)
    o = torch.randn(B, C, H, W, device=device, dtype=dtype)
    mask = torch.rand(B, *grid, device=device) > 0.5
    c1 = torch.ones(B, device=device)
    c2 = -torch.rand(B, device=device)
    return x, o, mask, c1, c2


def _moved_bytes(x, mask, c1, c2) -> int:
    return 3 * x.numel() * x.element_size() + mask.numel() * mask.element_size() + 2 * c1.numel() * c1.element_size()


@pytest.mark.skipif(not GPU, reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
@pytest.mark.parametrize("shape", [(8, 16, 256, 256), (8, 4, 128, 128)], ids=str)
def test_bench_degrade_gpu(shape, dtype):
    device = torch.device("cuda")
    x, o, mask, c1, c2 = _case(*shape, dtype, device)
    nbytes = _moved_bytes(x, mask, c1, c2)
    reps = 50
    seconds = _batched_seconds(lambda: dg.degrade(x, o, mask, c1, c2), device, reps)
    src = torch.empty(max(nbytes // 2, 1), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    copy_s = _batched_seconds(lambda: dst.copy_(src), device, reps)
    case, cols = "latents", dict(shape=str(shape), dtype=str(dtype).removeprefix("torch."))
    record("degrade", case, "device copy of the same bytes", copy_s, nbytes, copy_s, **cols)
    if shape == (8, 4, 128, 128):
        empty = _batched_seconds(lambda: _empty_kernel[(1,)](x), device, reps)
        record("degrade", case, "empty triton launch", empty, degrade_over_empty=f"{seconds / empty:.2f}x", **cols)
    alpha, sigma = 0.6, 0.8
    seq = _batched_seconds(lambda: _diffusers_sequence(x, o, mask, alpha, sigma, None), device, 10)
    record("degrade", case, "diffusers SAG sequence (no add_noise)", seq, nbytes, copy_s, **cols)
    record("degrade", case, "sag_fast triton", seconds, nbytes, copy_s,
           baseline="diffusers SAG sequence (no add_noise)", **cols)


# ------------------------------------------------------------------------------------------ CPU
def _diffusers_sequence(x, eps, mask, alpha, sigma, add_noise):
    """The deprecated StableDiffusionSAGPipeline's degrade stage (pred_x0, sag_masking)."""
    from diffusers.pipelines.deprecated.stable_diffusion_sag.pipeline_stable_diffusion_sag import gaussian_blur_2d

    b, c, h, w = x.shape
    x0 = (x - sigma * eps) / alpha
    m = mask[:, None].repeat(1, c, 1, 1).type(x.dtype)
    m = F.interpolate(m, (h, w))
    degraded = gaussian_blur_2d(x0, kernel_size=9, sigma=1.0)
    degraded = degraded * m + x0 * (1 - m)
    if add_noise is None:
        return alpha * degraded + sigma * eps
    return add_noise(degraded, eps)


@pytest.mark.parametrize("shape,threads", [((2, 4, 64, 64), None)]
                         + ([] if QUICK else [((2, 4, 128, 128), None), ((2, 4, 128, 128), 1)]), ids=str)
def test_bench_degrade_cpu(shape, threads):
    before = torch.get_num_threads()
    try:
        if threads is not None:
            torch.set_num_threads(threads)
        _bench_degrade_cpu(shape)
    finally:
        torch.set_num_threads(before)


def _bench_degrade_cpu(shape):
    from diffusers import DDIMScheduler

    torch.manual_seed(0)
    scheduler = DDIMScheduler()
    scheduler.set_timesteps(50)
    t = scheduler.timesteps[10]
    acp = scheduler.alphas_cumprod[t]
    alpha, sigma = float(acp.sqrt()), float((1 - acp).sqrt())
    x, eps, mask, _, _ = _case(*shape, torch.float32, "cpu", grid=(shape[2] // 8, shape[3] // 8))
    c1, c2 = torch.tensor(1.0), torch.tensor(-sigma)  # epsilon prediction: s = x - sigma*eps = alpha*x0

    def add_noise(sample, noise):
        return scheduler.add_noise(sample, noise, t[None])

    def ours():
        return dg.degrade(x, eps, mask, c1, c2)  # one sag_fast::degrade: the C++ kernel on CPU tensors

    # same stage, same answer (blur and re-noising are linear)
    torch.testing.assert_close(ours(), _diffusers_sequence(x, eps, mask, alpha, sigma, add_noise), atol=1e-4, rtol=1e-4)
    base = time_fn(lambda: _diffusers_sequence(x, eps, mask, alpha, sigma, add_noise), "cpu")
    mine = time_fn(ours, "cpu")
    unfused = time_fn(lambda: reference.degrade(x, eps, mask, c1, c2, 9, 1.0), "cpu")
    case = f"cpu ({torch.get_num_threads()} threads), SD latents, eps-prediction DDIM"
    cols = dict(shape=str(shape), dtype="float32")
    nbytes = _moved_bytes(x, mask, c1, c2)
    record("degrade", case, "diffusers SAG sequence", base, nbytes, **cols)
    record("degrade", case, "torch reference (conv2d, unfused)", unfused, nbytes,
           baseline="diffusers SAG sequence", **cols)
    record("degrade", case, "sag_fast C++ kernel (sag_fast::degrade on CPU)", mine, nbytes,
           baseline="diffusers SAG sequence", **cols)
