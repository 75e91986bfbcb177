"""Benchmarks of sag_fast.ops.mask: bandwidth of mask_from_probs, and mask_from_qk vs materialised probabilities.

GPU: (2, 20, 4096, 4096) fp16 probabilities (1.34 GB, read once: target >= 80% of a copy's bandwidth),
and q/k at N = 4096 against softmax(q k^T) materialised (target: faster, peak extra memory < 1% of the
probabilities). Joint attention (GPU only; the CPU run records the rows as skipped): mask_from_qk with
image_span on (B, N, heads, d) q/k slices of a fused projection, SD3-like (B=2, 24 heads, 4096 image + 333
text tokens, d=64) and Flux-like (B=1, guidance-distilled; 24 heads, 512 text + 4096 image, d=128), fp16,
against the materialised softmax. CPU: small shapes that run in seconds, timing the ops' CPU kernel (torch,
in chunks of query rows; TRITON_INTERPRET does not change which kernel a CPU tensor gets).
Run: `python -m pytest bench/bench_mask.py`.
"""
from __future__ import annotations

import pytest
import torch

from conftest import bench_seconds, copy_seconds, record, sync, time_fn
from sag_fast.ops.mask import mask_from_probs, mask_from_qk

CUDA = torch.cuda.is_available()
if CUDA:
    PROBS_SHAPE, QK_SHAPE, DTYPE = (2, 20, 4096, 4096), (2, 20, 4096, 64), torch.float16
else:
    PROBS_SHAPE, QK_SHAPE, DTYPE = (2, 5, 256, 256), (2, 5, 256, 64), torch.float32
IMPL = "sag_fast " + ("triton" if CUDA else "torch kernel (CPU)")


def _grid(n: int) -> tuple[int, int]:
    side = int(n ** 0.5)
    return side, n // side


DTYPE_NAME = str(DTYPE).removeprefix("torch.")


def _measure(benchmark, fn, device) -> float:
    def run():
        out = fn()
        sync(device)
        return out

    benchmark(run)
    return bench_seconds(benchmark) or time_fn(fn, device)


def _peak_extra_bytes(fn, device) -> int | None:
    """Peak memory allocated during fn() above what was allocated before it (CUDA only)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


@pytest.fixture(scope="module")
def probs(bench_device):
    b, h, nq, nk = PROBS_SHAPE
    # diffusers stores (B*heads, N, N); values only need to be plausible: rows of a softmax
    p = torch.rand((b * h, nq, nk), device=bench_device, dtype=DTYPE)
    return p / p.sum(-1, keepdim=True)


@pytest.fixture(scope="module")
def qk(bench_device):
    return (torch.randn(QK_SHAPE, device=bench_device, dtype=DTYPE),
            torch.randn(QK_SHAPE, device=bench_device, dtype=DTYPE))


def _diffusers_mask(attn_map, heads: int):
    """The deprecated StableDiffusionSAGPipeline's own expression (fp16 mean/sum, no fp32 accumulate)."""
    bh, n, _ = attn_map.shape
    b = bh // heads
    return attn_map.reshape(b, heads, n, n).mean(1).sum(1).gt(1.0)


@pytest.mark.parametrize("impl", ["diffusers expr", IMPL])
def test_bench_mask_from_probs(benchmark, probs, bench_device, impl):
    heads, n = PROBS_SHAPE[1], PROBS_SHAPE[3]
    if impl == IMPL:
        fn = lambda: mask_from_probs(probs, _grid(n), heads=heads)  # noqa: E731
    else:
        fn = lambda: _diffusers_mask(probs, heads)  # noqa: E731
    seconds = _measure(benchmark, fn, bench_device)
    nbytes = probs.numel() * probs.element_size()  # probabilities read once; the mask is negligible
    copy_s = copy_seconds(nbytes, bench_device) if bench_device.type == "cuda" else None
    extra = _peak_extra_bytes(fn, bench_device)
    record("mask_from_probs", "probs (B*heads, N, N) -> mask", impl, seconds, nbytes=nbytes, copy_s=copy_s,
           baseline=None if impl == "diffusers expr" else "diffusers expr",
           shape=str(PROBS_SHAPE), dtype=DTYPE_NAME,
           **({} if extra is None else {"peak_extra_MB": f"{extra / 2**20:.1f}"}))


def _materialised_mask(q, k, grid):
    """What an SDPA-style capture does: the whole (B, heads, N, N) softmax, then the mass."""
    scale = q.shape[-1] ** -0.5
    attn = torch.softmax((q @ k.transpose(-1, -2)) * scale, dim=-1)
    return (attn.mean(1).sum(1) > 1.0).view(q.shape[0], *grid)


@pytest.mark.parametrize("impl", ["materialised probs", IMPL])
def test_bench_mask_from_qk(benchmark, qk, bench_device, impl):
    q, k = qk
    b, h, n, _ = q.shape
    grid = _grid(n)
    if impl == IMPL:
        fn = lambda: mask_from_qk(q, k, grid)  # noqa: E731
    else:
        fn = lambda: _materialised_mask(q, k, grid)  # noqa: E731
    seconds = _measure(benchmark, fn, bench_device)
    probs_bytes = b * h * n * n * q.element_size()
    extra = _peak_extra_bytes(fn, bench_device)
    fields = {}
    if extra is not None:
        fields = {"peak_extra_MB": f"{extra / 2**20:.1f}", "pct_of_probs": f"{100 * extra / probs_bytes:.2f}%"}
    record("mask_from_qk", "q, k (B, heads, N, d) -> mask", impl, seconds,
           baseline=None if impl == "materialised probs" else "materialised probs",
           shape=str(QK_SHAPE), dtype=DTYPE_NAME, **fields)


# ------------------------------------------------------------------------------ joint attention
JOINT_CASES = {  # name: (B, heads, image tokens, text tokens, d, text first)
    "SD3-like [image, text]": (2, 24, 4096, 333, 64, False),
    "Flux-like [text, image]": (1, 24, 4096, 512, 128, True),
}


def _joint_qk(b, heads, n_img, n_txt, d, text_first, device):
    """q, k (B, N, heads, d) as diffusers' attention dispatch has them: slices of a fused qkv projection."""
    qkv = torch.randn(b, n_img + n_txt, 3 * heads * d, device=device, dtype=torch.float16)
    q = qkv[..., : heads * d].unflatten(-1, (heads, d))
    k = qkv[..., heads * d: 2 * heads * d].unflatten(-1, (heads, d))
    return q, k, (n_txt if text_first else 0, n_img)


def _materialised_joint_mask(q, k, span, grid):
    """The joint mask the plain way: the whole (B, heads, N, N) softmax, the image block summed."""
    start, length = span
    qh, kh = q.transpose(1, 2), k.transpose(1, 2)
    attn = torch.softmax((qh @ kh.transpose(-1, -2)) * qh.shape[-1] ** -0.5, dim=-1)
    mass = attn[:, :, start:start + length, start:start + length].float().sum(2).mean(1)
    return (mass > mass.mean(-1, keepdim=True)).view(q.shape[0], *grid)


@pytest.mark.parametrize("impl", ["materialised probs", "sag_fast triton"])
@pytest.mark.parametrize("case", list(JOINT_CASES))
def test_bench_mask_from_qk_joint(benchmark, bench_device, case, impl):
    b, heads, n_img, n_txt, d, text_first = JOINT_CASES[case]
    shape = f"(B={b}, N={n_img}+{n_txt}, heads={heads}, d={d}) BNHD"
    if bench_device.type != "cuda":
        record("mask_from_qk joint", case, f"{impl} (GPU only: skipped)", None, shape=shape, dtype="float16")
        pytest.skip("joint-attention mask benchmark: GPU only")
    q, k, span = _joint_qk(b, heads, n_img, n_txt, d, text_first, bench_device)
    grid = _grid(n_img)
    if impl == "sag_fast triton":
        fn = lambda: mask_from_qk(q, k, grid, layout="BNHD", image_span=span)  # noqa: E731
    else:
        fn = lambda: _materialised_joint_mask(q, k, span, grid)  # noqa: E731
    seconds = _measure(benchmark, fn, bench_device)
    n = n_img + n_txt
    probs_bytes = b * heads * n * n * q.element_size()
    extra = _peak_extra_bytes(fn, bench_device)
    record("mask_from_qk joint", case, impl, seconds,
           baseline=None if impl == "materialised probs" else "materialised probs", shape=shape, dtype="float16",
           peak_extra_MB=f"{extra / 2**20:.1f}", pct_of_probs=f"{100 * extra / probs_bytes:.2f}%")
