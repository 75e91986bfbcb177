"""Attention mass -> SAG mask, as Triton kernels.

    mass[b, j] = mean over heads of sum over queries of A[b, head, i, j]      mask = mass > threshold

`mask_from_probs` reads the softmax probabilities A once. `mask_from_qk` never materialises A: a first
kernel computes each query row's log-sum-exp (flash-style, streaming over keys), a second recomputes
the scores per key block and adds exp(s - lse). Both return a (B, h, w) **torch.bool** mask.

Work split (both mass kernels): program (key block, query split, batch) loops over every head and its
own range of query rows, keeps a (rows x keys) fp32 accumulator, and stores its column sums as a
partial. An integer counter per (batch, key block) tells the last program to finish; that program adds
the partials in split order 0, 1, ... (so the sum does not depend on which program ran last), divides
by heads and thresholds, in the same kernel. Results are bitwise reproducible for a given device
(the split count depends on the SM count).

CUDA tensors run the kernels; CPU tensors run them under TRITON_INTERPRET=1, else the reference.
"""
from __future__ import annotations

import contextlib
import functools
import math
import numbers

import torch
import triton
import triton.language as tl

from .. import reference
from ._dispatch import check_float, check_same_device, use_triton

LOG2E = 1.0 / math.log(2.0)  # scores are kept in base 2 (exp2/log2 are the native instructions)
MAX_HEAD_DIM = 256
_I32 = 2**31


# ------------------------------------------------------------------------------------ block sizes
def probs_config(dtype: torch.dtype) -> dict:
    """Constexprs and warps of `_probs_mass_kernel` for probs of `dtype` (the AOT test compiles these).

    Rows of probs are contiguous along keys, so a tile is BLOCK_Q rows x 256 keys: 512 B (fp16) or
    1 KiB (fp32) per row, read as 16-byte vectors. 8 warps hold the (BLOCK_Q x 256) fp32 accumulator
    at 32 (fp16) or 16 (fp32) registers a thread, so several programs fit on an SM, and each has
    16 KiB in flight per iteration: with >= 4 resident programs per SM that is >= 64 KiB in flight per
    SM, above what ~3 TB/s x ~1 us latency needs (~25 KiB per SM on 132 SMs).
    """
    if dtype == torch.float32:
        return dict(BLOCK_Q=16, BLOCK_K=256, num_warps=8)
    return dict(BLOCK_Q=32, BLOCK_K=256, num_warps=8)


def qk_configs(dtype: torch.dtype, d_pad: int) -> tuple[dict, dict]:
    """(lse kernel, mass kernel) constexprs and warps for q/k of `dtype` and padded head dim `d_pad`.

    fp16/bf16 use the tensor cores (fp32 accumulate); fp32 uses input_precision="ieee" (FMA), whose
    operands live in registers, so its tiles are smaller. Bigger head dims get smaller tiles to keep
    the q and k^T tiles (and the pipelined copies of them) within registers and shared memory.
    """
    ieee = dtype == torch.float32
    # Checked by tests/test_ops_mask.py to compile without register spills for sm_80 and sm_90 even
    # without 16-byte alignment (e.g. contiguous (B, heads, N, 40) q), where every element needs its
    # own address: that, not the tiles, is what bounds these sizes.
    if ieee:
        lse = dict(BLOCK_M=32, BLOCK_N=32, num_warps=4) if d_pad <= 64 else dict(BLOCK_M=16, BLOCK_N=32, num_warps=4)
        if d_pad <= 64:
            mass = dict(BLOCK_M=32, BLOCK_N=32, num_warps=4)
        elif d_pad <= 128:
            mass = dict(BLOCK_M=32, BLOCK_N=32, num_warps=8)
        else:
            mass = dict(BLOCK_M=16, BLOCK_N=16, num_warps=8)
    elif d_pad <= 64:
        lse = dict(BLOCK_M=128, BLOCK_N=64, num_warps=8)
        mass = dict(BLOCK_M=64, BLOCK_N=128, num_warps=8)
    elif d_pad <= 128:
        lse = dict(BLOCK_M=128, BLOCK_N=64, num_warps=8)
        mass = dict(BLOCK_M=64, BLOCK_N=64, num_warps=8)
    else:
        lse = dict(BLOCK_M=64, BLOCK_N=32, num_warps=4)
        mass = dict(BLOCK_M=32, BLOCK_N=32, num_warps=8)
    for cfg in (lse, mass):
        cfg.update(D_PAD=d_pad, IEEE=ieee)
    return lse, mass


def head_dim_pad(d: int) -> int:
    return max(16, triton.next_power_of_2(d))  # tl.dot needs a reduction dim >= 16


# ---------------------------------------------------------------------------------------- kernels
@triton.jit
def _finish_mass(col, offs_k, kmask, b, pid_k, pid_s, n_kb, n_split, nk, heads, threshold,
                 part_ptr, count_ptr, mask_ptr, mass_ptr, WRITE_MASS: tl.constexpr):
    """Store this program's partial column sums; the last program of (b, key block) reduces them."""
    part = part_ptr + b.to(tl.int64) * n_split * nk  # partials: (B, n_split, Nk) fp32
    tl.store(part + pid_s * nk + offs_k, col, mask=kmask)
    tl.debug_barrier()  # all threads' partials are stored before the release below
    # acq_rel at gpu scope: releases our partials, and the last program acquires everyone's
    done = tl.atomic_add(count_ptr + b * n_kb + pid_k, 1, sem="acq_rel")
    if done == n_split - 1:
        total = tl.zeros_like(col)
        for s in range(0, n_split):  # fixed order: the sum is independent of who finished last
            total += tl.load(part + s * nk + offs_k, mask=kmask, other=0.0, cache_modifier=".cg")
        mass = total / heads
        out = b.to(tl.int64) * nk + offs_k
        tl.store(mask_ptr + out, (mass > threshold).to(tl.uint8), mask=kmask)
        if WRITE_MASS:
            tl.store(mass_ptr + out, mass, mask=kmask)


@triton.jit
def _probs_mass_kernel(p_ptr, part_ptr, count_ptr, mask_ptr, mass_ptr,
                       heads, nq, nk, stride_b, stride_h, stride_q, stride_k,
                       rows_per_split, n_split, threshold,
                       BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, WRITE_MASS: tl.constexpr):
    pid_k = tl.program_id(0)
    pid_s = tl.program_id(1)
    b = tl.program_id(2)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    kmask = offs_k < nk
    q_lo = pid_s * rows_per_split
    q_hi = tl.minimum(q_lo + rows_per_split, nq)
    # 64-bit scalar base; the in-tile offsets stay 32-bit (the launcher checks they fit)
    tile = tl.arange(0, BLOCK_Q)[:, None] * stride_q + tl.arange(0, BLOCK_K)[None, :] * stride_k
    head = (p_ptr + b.to(tl.int64) * stride_b + (pid_k * BLOCK_K).to(tl.int64) * stride_k
            + q_lo.to(tl.int64) * stride_q)
    acc = tl.zeros((BLOCK_Q, BLOCK_K), tl.float32)  # summed over rows once, after the loops
    for _h in range(0, heads):
        row_ptr = head
        for q0 in range(q_lo, q_hi, BLOCK_Q):
            rmask = (q0 + tl.arange(0, BLOCK_Q)) < q_hi
            acc += tl.load(row_ptr + tile, mask=rmask[:, None] & kmask[None, :], other=0.0).to(tl.float32)
            row_ptr += BLOCK_Q * stride_q
        head += stride_h
    _finish_mass(tl.sum(acc, axis=0), offs_k, kmask, b, pid_k, pid_s, tl.num_programs(0), n_split, nk,
                 heads, threshold, part_ptr, count_ptr, mask_ptr, mass_ptr, WRITE_MASS)


@triton.jit
def _qk_scores(q, kt, qk_scale, IEEE: tl.constexpr):
    """q . k^T in fp32 times scale*log2(e) (scores in base 2). fp32 inputs stay fp32 (tf32 flips bits)."""
    if IEEE:
        s = tl.dot(q, kt, input_precision="ieee")
    else:
        s = tl.dot(q, kt)
    return s * qk_scale


@triton.jit
def _qk_lse_kernel(q_ptr, k_ptr, lse_ptr, heads, nq, nk, d,
                   sq_b, sq_h, sq_m, sq_d, sk_b, sk_h, sk_n, sk_d, qk_scale,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D_PAD: tl.constexpr, IEEE: tl.constexpr):
    """lse2[b, h, i] = log2 sum_j 2^(s_ij), s in base 2, streaming over key blocks (online max)."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // heads
    h = bh % heads
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D_PAD)
    dmask = offs_d < d
    q_base = q_ptr + b.to(tl.int64) * sq_b + h.to(tl.int64) * sq_h + (pid_m * BLOCK_M).to(tl.int64) * sq_m
    q = tl.load(q_base + tl.arange(0, BLOCK_M)[:, None] * sq_m + offs_d[None, :] * sq_d,
                mask=(offs_m < nq)[:, None] & dmask[None, :], other=0.0)
    kt_ptr = k_ptr + b.to(tl.int64) * sk_b + h.to(tl.int64) * sk_h
    kt_tile = offs_d[:, None] * sk_d + offs_n[None, :] * sk_n  # k^T tile: (D_PAD, BLOCK_N)
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_M], tl.float32)
    for n0 in range(0, nk, BLOCK_N):
        nmask = (n0 + offs_n) < nk
        kt = tl.load(kt_ptr + kt_tile, mask=dmask[:, None] & nmask[None, :], other=0.0)
        s = tl.where(nmask[None, :], _qk_scores(q, kt, qk_scale, IEEE), float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))  # finite: every block has >= 1 valid key
        l = l * tl.exp2(m - m_new) + tl.sum(tl.exp2(s - m_new[:, None]), axis=1)
        m = m_new
        kt_ptr += BLOCK_N * sk_n
    tl.store(lse_ptr + bh.to(tl.int64) * nq + offs_m, m + tl.log2(l), mask=offs_m < nq)


@triton.jit
def _qk_mass_kernel(q_ptr, k_ptr, lse_ptr, part_ptr, count_ptr, mask_ptr, mass_ptr,
                    heads, nq, nk, d, sq_b, sq_h, sq_m, sq_d, sk_b, sk_h, sk_n, sk_d, qk_scale,
                    rows_per_split, n_split, threshold,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D_PAD: tl.constexpr, IEEE: tl.constexpr,
                    WRITE_MASS: tl.constexpr):
    """Per key block: sum over heads and this program's query rows of 2^(s_ij - lse2_i)."""
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    b = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = offs_n < nk
    offs_d = tl.arange(0, D_PAD)
    dmask = offs_d < d
    q_lo = pid_s * rows_per_split
    q_hi = tl.minimum(q_lo + rows_per_split, nq)
    q_tile = tl.arange(0, BLOCK_M)[:, None] * sq_m + offs_d[None, :] * sq_d
    kt_tile = offs_d[:, None] * sk_d + tl.arange(0, BLOCK_N)[None, :] * sk_n
    q_head = q_ptr + b.to(tl.int64) * sq_b + q_lo.to(tl.int64) * sq_m
    k_head = k_ptr + b.to(tl.int64) * sk_b + (pid_n * BLOCK_N).to(tl.int64) * sk_n
    lse_head = lse_ptr + b.to(tl.int64) * heads * nq + q_lo
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for _h in range(0, heads):
        kt = tl.load(k_head + kt_tile, mask=dmask[:, None] & nmask[None, :], other=0.0)
        q_cur = q_head
        lse_cur = lse_head
        for m0 in range(q_lo, q_hi, BLOCK_M):
            rmask = (m0 + tl.arange(0, BLOCK_M)) < q_hi
            q = tl.load(q_cur + q_tile, mask=rmask[:, None] & dmask[None, :], other=0.0)
            lse = tl.load(lse_cur + tl.arange(0, BLOCK_M), mask=rmask, other=float("inf"))  # rows past q_hi add 0
            acc += tl.exp2(_qk_scores(q, kt, qk_scale, IEEE) - lse[:, None])
            q_cur += BLOCK_M * sq_m
            lse_cur += BLOCK_M
        q_head += sq_h
        k_head += sk_h
        lse_head += nq
    _finish_mass(tl.sum(acc, axis=0), offs_n, nmask, b, pid_n, pid_s, tl.num_programs(0), n_split, nk,
                 heads, threshold, part_ptr, count_ptr, mask_ptr, mass_ptr, WRITE_MASS)


# --------------------------------------------------------------------------------------- launchers
@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _target_programs(t: torch.Tensor, per_sm: int) -> int:
    # The interpreter runs programs one by one: few programs, but still > 1 split on small tests.
    return per_sm * _sm_count(t.device.index if t.device.index is not None else torch.cuda.current_device()) \
        if t.is_cuda else 8


def query_split(nq: int, block: int, programs_per_split: int, target: int) -> tuple[int, int]:
    """(n_split, rows_per_split): enough programs to fill the GPU, each a whole number of row blocks."""
    n_blocks = triton.cdiv(nq, block)
    n_split = max(1, min(n_blocks, triton.cdiv(target, max(programs_per_split, 1))))
    rows = triton.cdiv(n_blocks, n_split) * block
    return triton.cdiv(nq, rows), rows


def _check_tile_offsets(name: str, *spans: int) -> None:
    if max(spans) >= _I32:
        raise ValueError(f"{name}: strides too large for 32-bit in-tile offsets (span {max(spans)} >= 2**31); "
                         "pass a tensor with a more compact layout")


def _device_ctx(t: torch.Tensor):
    # Triton launches on the current device: make it the tensor's one
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _outputs(bsz: int, n_kb: int, n_split: int, nk: int, device, return_mass: bool):
    part = torch.empty((bsz, n_split, nk), dtype=torch.float32, device=device)
    count = torch.zeros((bsz, n_kb), dtype=torch.int32, device=device)
    mask = torch.empty((bsz, nk), dtype=torch.bool, device=device)
    mass = torch.empty((bsz, nk), dtype=torch.float32, device=device) if return_mass else part  # dummy ptr
    return part, count, mask, mass


def _split_queries(nq: int, block: int, programs: int, target: int, n_split: int | None) -> tuple[int, int]:
    """(splits, query rows per split): chosen by query_split for `target` programs, or from a forced n_split."""
    if n_split is None:
        return query_split(nq, block, programs, target)
    rows = triton.cdiv(triton.cdiv(nq, block), n_split) * block
    return triton.cdiv(nq, rows), rows


def launch_mask_from_probs(probs: torch.Tensor, threshold: float, *, n_split: int | None = None,
                           return_mass: bool = False):
    """Triton path for 4-D probs (B, heads, Nq, Nk), any strides. -> (mask (B, Nk) bool, mass or None)."""
    bsz, heads, nq, nk = probs.shape
    cfg = probs_config(probs.dtype)
    bq, bk = cfg["BLOCK_Q"], cfg["BLOCK_K"]
    sb, sh, sq, sk = probs.stride()
    _check_tile_offsets("probs", (bq - 1) * sq + (bk - 1) * sk)
    n_kb = triton.cdiv(nk, bk)
    # B * Nk/256 programs alone are too few (32 at (2, 20, 4096, 4096)): split queries to ~16
    # programs per SM, several waves of ~4 resident ones, so that the last wave's tail is short.
    n_split, rows = _split_queries(nq, bq, bsz * n_kb, _target_programs(probs, 16), n_split)
    part, count, mask, mass = _outputs(bsz, n_kb, n_split, nk, probs.device, return_mass)
    with _device_ctx(probs):
        _probs_mass_kernel[(n_kb, n_split, bsz)](
            probs, part, count, mask.view(torch.uint8), mass, heads, nq, nk, sb, sh, sq, sk,
            rows, n_split, float(threshold), WRITE_MASS=return_mass, **cfg)
    return mask, (mass if return_mass else None)


def launch_mask_from_qk(q: torch.Tensor, k: torch.Tensor, threshold: float, scale: float, *,
                        n_split: int | None = None, return_mass: bool = False):
    """Triton path for q (B, heads, Nq, d), k (B, heads, Nk, d). -> (mask (B, Nk) bool, mass or None)."""
    bsz, heads, nq, d = q.shape
    nk = k.shape[2]
    d_pad = head_dim_pad(d)
    lse_cfg, mass_cfg = qk_configs(q.dtype, d_pad)
    qs, ks = q.stride(), k.stride()
    for cfg in (lse_cfg, mass_cfg):
        _check_tile_offsets("q", (cfg["BLOCK_M"] - 1) * qs[2] + (d_pad - 1) * qs[3])
        _check_tile_offsets("k", (cfg["BLOCK_N"] - 1) * ks[2] + (d_pad - 1) * ks[3])
    # Work: 2 x B*heads*Nq*Nk*d MACs (scores are recomputed) and B*heads*Nq*Nk exp2 per kernel, like a
    # flash-attention forward without the P.V product; the mass kernel splits queries so that
    # B * Nk/BLOCK_N programs (64 at B=2, N=4096) become ~8 per SM.
    qk_scale = float(scale) * LOG2E
    lse = torch.empty((bsz, heads, nq), dtype=torch.float32, device=q.device)
    bm, bn = mass_cfg["BLOCK_M"], mass_cfg["BLOCK_N"]
    n_kb = triton.cdiv(nk, bn)
    n_split, rows = _split_queries(nq, bm, bsz * n_kb, _target_programs(q, 8), n_split)
    part, count, mask, mass = _outputs(bsz, n_kb, n_split, nk, q.device, return_mass)
    with _device_ctx(q):
        _qk_lse_kernel[(triton.cdiv(nq, lse_cfg["BLOCK_M"]), bsz * heads)](
            q, k, lse, heads, nq, nk, d, *qs, *ks, qk_scale, **lse_cfg)
        _qk_mass_kernel[(n_kb, n_split, bsz)](
            q, k, lse, part, count, mask.view(torch.uint8), mass, heads, nq, nk, d, *qs, *ks, qk_scale,
            rows, n_split, float(threshold), WRITE_MASS=return_mass, **mass_cfg)
    return mask, (mass if return_mass else None)


# ------------------------------------------------------------------------------------------ checks
def _grid(grid_hw) -> tuple[int, int]:
    try:
        h, w = grid_hw
        return int(h), int(w)
    except (TypeError, ValueError):
        raise TypeError(f"grid_hw must be a pair of ints (h, w), got {grid_hw!r}") from None


def _number(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):  # a tensor would need a host sync
        raise TypeError(f"{name} must be a real number (Python float), got {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return float(value)


def _check_fp64(t: torch.Tensor, name: str) -> None:
    if t.dtype == torch.float64 and t.device.type != "cpu":
        raise ValueError(f"{name}: float64 is supported on CPU tensors only, got {t.dtype} on {t.device}")


def _probs_heads(probs: torch.Tensor, heads) -> int:
    check_float(probs, "probs")
    _check_fp64(probs, "probs")
    if probs.dim() == 4:
        if heads is not None and heads != probs.shape[1]:
            raise ValueError(f"heads={heads} does not match probs.shape[1]={probs.shape[1]} of (B, heads, Nq, Nk) probs")
        heads = probs.shape[1]
    elif probs.dim() == 3:
        if heads is None:
            raise ValueError("heads is required when probs is (B*heads, Nq, Nk)")
    else:
        raise ValueError(f"probs must be (B, heads, Nq, Nk) or (B*heads, Nq, Nk), got shape {tuple(probs.shape)}")
    if isinstance(heads, bool) or not isinstance(heads, int) or heads < 1:
        raise ValueError(f"heads must be a positive int, got {heads!r}")
    if probs.dim() == 3 and probs.shape[0] % heads:
        raise ValueError(f"heads={heads} does not divide probs.shape[0]={probs.shape[0]} (B*heads)")
    if probs.shape[-2] < 1:
        raise ValueError(f"probs must have at least one query (Nq >= 1), got shape {tuple(probs.shape)}")
    return heads


def _check_qk(q: torch.Tensor, k: torch.Tensor) -> None:
    check_float(q, "q")
    check_float(k, "k")
    check_same_device("q", q, "k", k)
    _check_fp64(q, "q")
    if k.dtype != q.dtype:
        raise ValueError(f"k must have the dtype of q ({q.dtype}), got {k.dtype}")
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(f"q and k must be (B, heads, N, d), got q {tuple(q.shape)} and k {tuple(k.shape)}")
    if q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
        raise ValueError(f"k {tuple(k.shape)} must match q {tuple(q.shape)} in B, heads and d")
    if q.shape[1] < 1 or q.shape[2] < 1 or q.shape[3] < 1:
        raise ValueError(f"q must have heads, Nq and d >= 1, got {tuple(q.shape)}")
    if use_triton(q) and q.dtype != torch.float64 and q.shape[3] > MAX_HEAD_DIM:
        raise ValueError(f"q: head dim d={q.shape[3]} exceeds {MAX_HEAD_DIM}, the most the kernels support")


# ------------------------------------------------------------------------------------------- ops
@torch.library.custom_op("sag_fast::mask_from_probs", mutates_args=())
def _mask_from_probs_op(probs: torch.Tensor, h: int, w: int, threshold: float, heads: int) -> torch.Tensor:
    heads = _probs_heads(probs, heads)
    reference.check_grid((h, w), probs.shape[-1])
    p4 = probs.unflatten(0, (probs.shape[0] // heads, heads)) if probs.dim() == 3 else probs  # a view
    if p4.shape[0] == 0:
        return torch.empty((0, h, w), dtype=torch.bool, device=probs.device)
    if use_triton(p4) and p4.dtype != torch.float64:
        mask, _ = launch_mask_from_probs(p4, threshold)
        return mask.view(-1, h, w)
    return reference.mass_to_mask(reference.attention_mass(p4), (h, w), threshold)


@_mask_from_probs_op.register_fake
def _(probs, h, w, threshold, heads):
    bsz = probs.shape[0] if probs.dim() == 4 else probs.shape[0] // heads
    return probs.new_empty((bsz, h, w), dtype=torch.bool)


@torch.library.custom_op("sag_fast::mask_from_qk", mutates_args=())
def _mask_from_qk_op(q: torch.Tensor, k: torch.Tensor, h: int, w: int, threshold: float,
                     scale: float) -> torch.Tensor:
    _check_qk(q, k)
    reference.check_grid((h, w), k.shape[2])
    if q.shape[0] == 0:
        return torch.empty((0, h, w), dtype=torch.bool, device=q.device)
    if use_triton(q) and q.dtype != torch.float64:
        mask, _ = launch_mask_from_qk(q, k, threshold, scale)
        return mask.view(-1, h, w)
    return reference.mass_to_mask(reference.attention_mass_from_qk(q, k, scale), (h, w), threshold)


@_mask_from_qk_op.register_fake
def _(q, k, h, w, threshold, scale):
    return q.new_empty((q.shape[0], h, w), dtype=torch.bool)


# ------------------------------------------------------------------------------------- public API
def mask_from_probs(probs: torch.Tensor, grid_hw, threshold: float = 1.0, heads: int | None = None) -> torch.Tensor:
    """SAG mask from softmax probabilities: (B, h, w) torch.bool, True where mass > threshold.

    probs: (B, heads, Nq, Nk), or (B*heads, Nq, Nk) as diffusers stores it (then `heads` is required);
    fp32/fp16/bf16 (fp64 on CPU), any strides (never copied). grid_hw: (h, w) with h*w == Nk.
    mass = mean over heads of the sum over queries, accumulated in fp32; threshold 1.0 is the mean.
    """
    h, w = _grid(grid_hw)
    threshold = _number(threshold, "threshold")
    heads = _probs_heads(probs, heads)
    reference.check_grid((h, w), probs.shape[-1])
    return torch.ops.sag_fast.mask_from_probs(probs, h, w, threshold, heads)


def mask_from_qk(q: torch.Tensor, k: torch.Tensor, grid_hw, threshold: float = 1.0,
                 scale: float | None = None) -> torch.Tensor:
    """The same (B, h, w) torch.bool mask from q (B, heads, Nq, d) and k (B, heads, Nk, d), without
    materialising the (Nq, Nk) probabilities: A = softmax(q k^T * scale) over keys, scale 1/sqrt(d) by
    default. Any strides (e.g. (B, N, heads*d).view(B, N, heads, d).transpose(1, 2)); d <= 256.
    Extra memory O(B*heads*(Nq+Nk)).
    """
    h, w = _grid(grid_hw)
    threshold = _number(threshold, "threshold")
    _check_qk(q, k)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else _number(scale, "scale")
    reference.check_grid((h, w), k.shape[2])
    return torch.ops.sag_fast.mask_from_qk(q, k, h, w, threshold, scale)
