"""Attention mass -> SAG mask, as Triton kernels.

    mass[b, j] = mean over heads of sum over queries of A[b, head, i, j]      mask = mass > threshold

`mask_from_probs` reads the softmax probabilities A once. `mask_from_qk` never materialises A: a first
kernel computes each query row's log-sum-exp (flash-style, streaming over keys), a second recomputes
the scores per key block and adds exp(s - lse). Both return a (B, h, w) **torch.bool** mask, or
(B, f, h, w) for a video's (f, h, w) key grid (keys frame-major): the kernels reduce over keys either way,
the grid only shapes the output (the ops' keyword `frames`, 0 for an image grid).

Work split (both mass kernels): program (key block, query split, batch) loops over every head and its
own range of query rows, keeps a (rows x keys) fp32 accumulator, and stores its column sums as a
partial. An integer counter per (batch, key block) tells the last program to finish; that program adds
the partials in split order 0, 1, ... (so the sum does not depend on which program ran last), divides
by heads and thresholds, in the same kernel. Results are bitwise reproducible for a given device
(the split count depends on the SM count).

Joint attention (`mask_from_qk(..., image_span=(start, length))`, SD3/Flux: image and text tokens in one
softmax): the log-sum-exp kernel reads the image queries (a view of q) against all N keys, the mass kernel
the image queries against the image keys (views of q and k), and the threshold is relative to the mean
image-key mass: the last key block of a batch to finish (a second counter) sums the masses in key order
and thresholds the whole row. q/k in diffusers' (B, N, heads, d) layout are read as a transposed view.

Two custom ops, `sag_fast::mask_from_probs` and `sag_fast::mask_from_qk`, each with a kernel per device:
CUDA the Triton kernels (decomposed into them when torch.compile functionalises the graph, like
sag_fast::degrade); every other device (CPU) a torch implementation in this file that accumulates in
fp32 (fp64 for fp64) and never holds more than a chunk of query rows of the probabilities. Under
TRITON_INTERPRET=1 the Triton path runs on CPU tensors through the launchers, `*_triton`, or inside
`sag_fast.ops.testing.triton_on_cpu()`.
"""
from __future__ import annotations

import math
import numbers

import torch
import triton
import triton.language as tl
from torch._subclasses.functional_tensor import FunctionalTensorMode
from torch.library import wrap_triton

from ._dispatch import (check_float, check_grid, check_same_device, check_threshold, cuda_decomposition, device_guard,
                        grid_shape, real_number, sm_count)

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
def _relative_threshold(mass_row, mask_row, nk, threshold, BLOCK: tl.constexpr):
    """mask = mass > threshold * mean(mass) over one batch row of Nk masses (all stored, made visible)."""
    offs = tl.arange(0, BLOCK)
    acc = tl.zeros([BLOCK], tl.float32)
    for k0 in range(0, nk, BLOCK):  # fixed order: the mean does not depend on which program ran last
        acc += tl.load(mass_row + k0 + offs, mask=k0 + offs < nk, other=0.0, cache_modifier=".cg")
    cut = threshold * (tl.sum(acc, axis=0) / nk)
    for k0 in range(0, nk, BLOCK):
        m = tl.load(mass_row + k0 + offs, mask=k0 + offs < nk, other=0.0, cache_modifier=".cg")
        tl.store(mask_row + k0 + offs, (m > cut).to(tl.uint8), mask=k0 + offs < nk)


@triton.jit
def _finish_mass(col, offs_k, kmask, b, pid_k, pid_s, n_kb, n_split, nk, heads, threshold,
                 part_ptr, count_ptr, mask_ptr, mass_ptr, WRITE_MASS: tl.constexpr,
                 RELATIVE: tl.constexpr, BLOCK: tl.constexpr):
    """Store this program's partial column sums; the last program of (b, key block) reduces them.
    RELATIVE: the threshold is relative to the mean mass of batch row b; the mass is stored, and the last
    key block of the row to finish (counter count_ptr[B * n_kb + b]) thresholds the whole row."""
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
        if RELATIVE:
            tl.store(mass_ptr + out, mass, mask=kmask)
            tl.debug_barrier()  # the same release/acquire as above, one level up: key blocks -> batch row
            row_done = tl.atomic_add(count_ptr + tl.num_programs(2) * n_kb + b, 1, sem="acq_rel")
            if row_done == n_kb - 1:
                row = b.to(tl.int64) * nk
                _relative_threshold(mass_ptr + row, mask_ptr + row, nk, threshold, BLOCK)
        else:
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
                 heads, threshold, part_ptr, count_ptr, mask_ptr, mass_ptr, WRITE_MASS, False, BLOCK_K)


@triton.jit
def _qk_scores(q, kt, qk_scale, IEEE: tl.constexpr):
    """q . k^T in fp32 times scale*log2(e) (scores in base 2). fp32 inputs stay fp32 (tf32 flips bits)."""
    if IEEE:
        s = tl.dot(q, kt, input_precision="ieee")
    else:
        s = tl.dot(q, kt)
    return s * qk_scale


@triton.jit
def _qk_lse_kernel(q_ptr, k_ptr, lse_ptr, bias_ptr, heads, nq, nk, d,
                   sq_b, sq_h, sq_m, sq_d, sk_b, sk_h, sk_n, sk_d, qk_scale,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D_PAD: tl.constexpr, IEEE: tl.constexpr,
                   HAS_BIAS: tl.constexpr):
    """lse2[b, h, i] = log2 sum_j 2^(s_ij), s in base 2, streaming over key blocks (online max).
    HAS_BIAS: s_ij += bias2[b, j] (a per-key additive mask, base 2, -inf drops the key); a row with no
    key left gets lse2 = +inf, so that its probabilities read as 0."""
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
        s = _qk_scores(q, kt, qk_scale, IEEE)
        if HAS_BIAS:
            s += tl.load(bias_ptr + b.to(tl.int64) * nk + n0 + offs_n, mask=nmask, other=0.0)[None, :]
        s = tl.where(nmask[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))  # without a bias finite: every block has >= 1 valid key
        m_use = m_new
        if HAS_BIAS:  # dropped keys only so far: m_new = -inf, shift by 0 instead (exp2(-inf - 0) = 0, no NaN)
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        l = l * tl.exp2(m - m_use) + tl.sum(tl.exp2(s - m_use[:, None]), axis=1)
        m = m_new
        kt_ptr += BLOCK_N * sk_n
    lse = m + tl.log2(l)
    if HAS_BIAS:
        lse = tl.where(l > 0, lse, float("inf"))
    tl.store(lse_ptr + bh.to(tl.int64) * nq + offs_m, lse, mask=offs_m < nq)


@triton.jit
def _qk_mass_kernel(q_ptr, k_ptr, lse_ptr, bias_ptr, part_ptr, count_ptr, mask_ptr, mass_ptr,
                    heads, nq, nk, d, sq_b, sq_h, sq_m, sq_d, sk_b, sk_h, sk_n, sk_d, qk_scale, bias_stride_b,
                    rows_per_split, n_split, threshold,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D_PAD: tl.constexpr, IEEE: tl.constexpr,
                    WRITE_MASS: tl.constexpr, RELATIVE: tl.constexpr, HAS_BIAS: tl.constexpr):
    """Per key block: sum over heads and this program's query rows of 2^(s_ij + bias2_j - lse2_i).
    RELATIVE: threshold relative to each batch row's mean mass (joint attention)."""
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
    kbias = tl.zeros([BLOCK_N], tl.float32)
    if HAS_BIAS:  # the bias of this block's keys (a view of the LSE keys' bias: row stride bias_stride_b)
        kbias = tl.load(bias_ptr + b.to(tl.int64) * bias_stride_b + offs_n, mask=nmask, other=0.0)
    for _h in range(0, heads):
        kt = tl.load(k_head + kt_tile, mask=dmask[:, None] & nmask[None, :], other=0.0)
        q_cur = q_head
        lse_cur = lse_head
        for m0 in range(q_lo, q_hi, BLOCK_M):
            rmask = (m0 + tl.arange(0, BLOCK_M)) < q_hi
            q = tl.load(q_cur + q_tile, mask=rmask[:, None] & dmask[None, :], other=0.0)
            lse = tl.load(lse_cur + tl.arange(0, BLOCK_M), mask=rmask, other=float("inf"))  # rows past q_hi add 0
            acc += tl.exp2(_qk_scores(q, kt, qk_scale, IEEE) + kbias[None, :] - lse[:, None])
            q_cur += BLOCK_M * sq_m
            lse_cur += BLOCK_M
        q_head += sq_h
        k_head += sk_h
        lse_head += nq
    _finish_mass(tl.sum(acc, axis=0), offs_n, nmask, b, pid_n, pid_s, tl.num_programs(0), n_split, nk,
                 heads, threshold, part_ptr, count_ptr, mask_ptr, mass_ptr, WRITE_MASS, RELATIVE, BLOCK_N)


# --------------------------------------------------------------------------------------- launchers
def _target_programs(t: torch.Tensor, per_sm: int) -> int:
    # The interpreter runs programs one by one: few programs, but still > 1 split on small tests.
    return per_sm * sm_count(t) if t.device.type == "cuda" else 8


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


def _outputs(bsz: int, n_kb: int, n_split: int, nk: int, device, return_mass: bool, relative: bool = False):
    """Partials, counters (per key block; relative: then one per batch row), mask, mass (relative needs it)."""
    part = torch.empty((bsz, n_split, nk), dtype=torch.float32, device=device)
    count = torch.zeros((bsz * n_kb + (bsz if relative else 0),), dtype=torch.int32, device=device)
    mask = torch.empty((bsz, nk), dtype=torch.bool, device=device)
    keep = return_mass or relative
    mass = torch.empty((bsz, nk), dtype=torch.float32, device=device) if keep else part  # else a dummy ptr
    return part, count, mask, mass


def _split_queries(nq: int, block: int, programs: int, target: int, n_split: int | None) -> tuple[int, int]:
    """(splits, query rows per split): chosen by query_split for `target` programs, or from a forced n_split."""
    if n_split is None:
        return query_split(nq, block, programs, target)
    rows = triton.cdiv(triton.cdiv(nq, block), n_split) * block
    return triton.cdiv(nq, rows), rows


def launch_mask_from_probs(probs: torch.Tensor, threshold: float, *, n_split: int | None = None,
                           return_mass: bool = False, traced: bool = False):
    """Triton path for 4-D probs (B, heads, Nq, Nk), any strides. -> (mask (B, Nk) bool, mass or None).
    Launches under probs' device. traced: record the launch with wrap_triton (torch.compile)."""
    bsz, heads, nq, nk = (int(v) for v in probs.shape)
    cfg = probs_config(probs.dtype)
    bq, bk = cfg["BLOCK_Q"], cfg["BLOCK_K"]
    sb, sh, sq, sk = probs.stride()
    _check_tile_offsets("probs", (bq - 1) * sq + (bk - 1) * sk)
    n_kb = triton.cdiv(nk, bk)
    # B * Nk/256 programs alone are too few (32 at (2, 20, 4096, 4096)): split queries to ~16
    # programs per SM, several waves of ~4 resident ones, so that the last wave's tail is short.
    n_split, rows = _split_queries(nq, bq, bsz * n_kb, _target_programs(probs, 16), n_split)
    part, count, mask, mass = _outputs(bsz, n_kb, n_split, nk, probs.device, return_mass)
    kernel = wrap_triton(_probs_mass_kernel) if traced else _probs_mass_kernel
    with device_guard(probs, traced):
        kernel[(n_kb, n_split, bsz)](
            probs, part, count, mask.view(torch.uint8), mass, heads, nq, nk, sb, sh, sq, sk,
            rows, n_split, float(threshold), WRITE_MASS=return_mass, **cfg)
    return mask, (mass if return_mass else None)


def launch_mask_from_qk(q: torch.Tensor, k: torch.Tensor, threshold: float, scale: float, *,
                        image_span: tuple[int, int] | None = None, key_bias: torch.Tensor | None = None,
                        n_split: int | None = None, return_mass: bool = False, traced: bool = False):
    """Triton path for q (B, heads, Nq, d), k (B, heads, Nk, d), any strides (a (B, N, heads, d) tensor is
    passed as its .transpose(1, 2)). -> (mask (B, Nk) bool, mass or None).
    image_span=(start, length): joint attention (Nq == Nk == N): image queries and keys are the span, the
    softmax runs over all N keys, the threshold is relative to the mean mass -> (mask (B, length), mass).
    key_bias: None, or (B, Nk) added to every query's scores of key j (natural-log units, as an attention
    mask; -inf drops the key from the softmax). Launches under q's device. traced: record the launches with
    wrap_triton (torch.compile)."""
    relative = image_span is not None
    lse_keys = k  # the keys of each row's log-sum-exp: all of them
    # base 2, contiguous fp32 (B, Nk): a few KB; the mass kernel reads the image span's part of it
    bias2 = None if key_bias is None else (key_bias.to(torch.float32) * LOG2E).contiguous()
    mass_bias = bias2
    if relative and bias2 is not None:
        mass_bias = bias2.narrow(1, image_span[0], image_span[1])
    if relative:  # views (no copy): image queries; the mass is summed over image keys only
        start, length = image_span
        q, k = q.narrow(2, start, length), k.narrow(2, start, length)
    bsz, heads, nq, d = (int(v) for v in q.shape)
    nk, nk_lse = int(k.shape[2]), int(lse_keys.shape[2])
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
    part, count, mask, mass = _outputs(bsz, n_kb, n_split, nk, q.device, return_mass, relative)
    lse_kernel = wrap_triton(_qk_lse_kernel) if traced else _qk_lse_kernel
    mass_kernel = wrap_triton(_qk_mass_kernel) if traced else _qk_mass_kernel
    with device_guard(q, traced):
        has_bias = bias2 is not None
        dummy = lse  # the bias pointer is never read without HAS_BIAS
        lse_kernel[(triton.cdiv(nq, lse_cfg["BLOCK_M"]), bsz * heads)](
            q, lse_keys, lse, bias2 if has_bias else dummy, heads, nq, nk_lse, d, *qs, *lse_keys.stride(),
            qk_scale, HAS_BIAS=has_bias, **lse_cfg)
        mass_kernel[(n_kb, n_split, bsz)](
            q, k, lse, mass_bias if has_bias else dummy, part, count, mask.view(torch.uint8), mass, heads, nq, nk,
            d, *qs, *ks, qk_scale, nk_lse, rows, n_split, float(threshold), WRITE_MASS=return_mass,
            RELATIVE=relative, HAS_BIAS=has_bias, **mass_cfg)
    return mask, (mass if return_mass else None)


# ------------------------------------------------------------------------------------------ checks
def _grid(grid_hw, op: str) -> tuple[int, int, int]:
    """(h, w, frames) of an (h, w) grid (frames = 0) or a video's (f, h, w) grid (frames = f >= 1)."""
    try:
        dims = tuple(int(v) for v in grid_hw)
    except (TypeError, ValueError):
        dims = ()
    if len(dims) not in (2, 3):
        raise TypeError(f"{op}: grid_hw must be (h, w) or (f, h, w) ints, got {grid_hw!r}")
    if min(dims) < 1:  # frames = 0 would otherwise read as "no frame axis"
        raise ValueError(f"{op}: grid_hw must be positive, got {tuple(grid_hw)!r}")
    return (dims[0], dims[1], 0) if len(dims) == 2 else (dims[1], dims[2], dims[0])


def check_probs(probs, h: int, w: int, threshold: float, heads, frames: int = 0) -> int:
    """The argument checks of sag_fast::mask_from_probs (its fake and both kernels); returns heads."""
    op = "mask_from_probs"
    check_float(probs, "probs", op, allow_fp64=probs.device.type == "cpu" if isinstance(probs, torch.Tensor) else True)
    if heads is not None and (isinstance(heads, bool) or not isinstance(heads, int) or heads < 1):
        raise ValueError(f"{op}: heads must be a positive int, got {heads!r}")
    if probs.dim() == 4:
        if heads is not None and heads != probs.shape[1]:
            raise ValueError(f"{op}: heads={heads} does not match probs.shape[1]={probs.shape[1]} of "
                             "(B, heads, Nq, Nk) probs")
        heads = probs.shape[1]
    elif probs.dim() == 3:
        if heads is None:
            raise ValueError(f"{op}: heads is required when probs is (B*heads, Nq, Nk)")
    else:
        raise ValueError(f"{op}: probs must be (B, heads, Nq, Nk) or (B*heads, Nq, Nk), got shape {tuple(probs.shape)}")
    if probs.dim() == 3 and probs.shape[0] % heads:
        raise ValueError(f"{op}: heads={heads} does not divide probs.shape[0]={probs.shape[0]} (B*heads)")
    if probs.shape[-2] < 1:
        raise ValueError(f"{op}: probs must have at least one query (Nq >= 1), got shape {tuple(probs.shape)}")
    check_grid(h, w, probs.shape[-1], op, frames)
    check_threshold(threshold, op)
    return heads


LAYOUTS = {"BHND": "(B, heads, N, d)", "BNHD": "(B, N, heads, d)"}


def heads_first(t: torch.Tensor, layout: str) -> torch.Tensor:
    """q or k as a (B, heads, N, d) view (a transpose of a (B, N, heads, d) tensor: strides only)."""
    return t if layout == "BHND" else t.transpose(1, 2)


def image_span_pair(image_span, op: str = "mask_from_qk") -> tuple[int, int] | None:
    """image_span as (start, length) Python ints, or None; a TypeError naming it otherwise."""
    if image_span is None:
        return None
    try:
        start, length = image_span
    except (TypeError, ValueError):
        raise TypeError(f"{op}: image_span must be None or a pair of ints (start, length), "
                        f"got {image_span!r}") from None
    for v in (start, length):
        if isinstance(v, bool) or not isinstance(v, (numbers.Integral, torch.SymInt)):
            raise TypeError(f"{op}: image_span must be a pair of ints (start, length), got {image_span!r}")
    return tuple(v if isinstance(v, torch.SymInt) else int(v) for v in (start, length))


def check_qk(q, k, h: int, w: int, threshold: float, scale: float, triton: bool, layout: str = "BHND",
             image_span=None, frames: int = 0, key_bias=None) -> tuple[int, int] | None:
    """The argument checks of sag_fast::mask_from_qk (its fake and both kernels); triton: the Triton kernel
    will run it (head dims up to MAX_HEAD_DIM). Returns image_span as (start, length), or None."""
    op = "mask_from_qk"
    if layout not in LAYOUTS:
        raise ValueError(f"{op}: layout must be one of {list(LAYOUTS)}, got {layout!r}")
    span = image_span_pair(image_span, op)
    check_float(q, "q", op, allow_fp64=q.device.type == "cpu" if isinstance(q, torch.Tensor) else True)
    check_float(k, "k", op)
    check_same_device(op, "q", q, "k", k)
    if k.dtype != q.dtype:
        raise ValueError(f"{op}: k must have the dtype of q ({q.dtype}), got {k.dtype}")
    shape = LAYOUTS[layout]
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(f"{op}: q and k must be {shape} (layout={layout!r}), got q {tuple(q.shape)} and "
                         f"k {tuple(k.shape)}")
    qh, kh = heads_first(q, layout), heads_first(k, layout)
    if qh.shape[:2] != kh.shape[:2] or qh.shape[3] != kh.shape[3]:
        raise ValueError(f"{op}: k {tuple(k.shape)} must match q {tuple(q.shape)} in B, heads and d "
                         f"(layout={layout!r}: {shape})")
    if qh.shape[1] < 1 or qh.shape[2] < 1 or qh.shape[3] < 1:
        raise ValueError(f"{op}: q must have heads, N and d >= 1 (layout={layout!r}: {shape}), got {tuple(q.shape)}")
    if triton and qh.shape[3] > MAX_HEAD_DIM:
        raise ValueError(f"{op}: q has head dim d={qh.shape[3]}, more than the {MAX_HEAD_DIM} the kernels support")
    if span is None:
        check_grid(h, w, kh.shape[2], op, frames)
    else:
        n = kh.shape[2]
        if qh.shape[2] != n:
            raise ValueError(f"{op}: image_span is for joint attention, where q and k hold the same N tokens; "
                             f"got Nq={qh.shape[2]} and Nk={n}")
        start, length = span
        if length < 1 or start < 0 or start + length > n:
            raise ValueError(f"{op}: image_span=({start}, {length}) is out of range for N={n} tokens "
                             "(need start >= 0, length >= 1, start + length <= N)")
        check_grid(h, w, length, op, frames, what="image_span's length {}")
    if key_bias is not None:
        check_float(key_bias, "key_bias", op, allow_fp64=True)
        check_same_device(op, "q", q, "key_bias", key_bias)
        if tuple(key_bias.shape) != (kh.shape[0], kh.shape[2]):
            raise ValueError(f"{op}: key_bias must be (B, Nk) = ({kh.shape[0]}, {kh.shape[2]}), one additive bias "
                             f"per key, got {tuple(key_bias.shape)}")
    check_threshold(threshold, op)
    real_number(scale, "scale", op)
    return span


# ----------------------------------------------------------------------- the torch (CPU) kernels
_QUERY_CHUNK_ELEMENTS = 1 << 24  # probabilities held at once by the qk path: 64 MiB of fp32


def _mass_probs_torch(p4: torch.Tensor) -> torch.Tensor:
    """(B, heads, Nq, Nk) -> (B, Nk): sum over queries, then mean over heads, accumulated in fp32 (fp64)."""
    acc = torch.float64 if p4.dtype == torch.float64 else torch.float32
    return p4.sum(dim=2, dtype=acc).mean(dim=1)


def _mass_qk_torch(q: torch.Tensor, k: torch.Tensor, scale: float, image_span=None, key_bias=None) -> torch.Tensor:
    """(B, Nk) mass of softmax(q k^T * scale), a chunk of query rows at a time (never all Nq x Nk).
    image_span=(start, length): the rows of the span's queries, softmax over all keys, summed over the
    span's keys -> (B, length). key_bias: (B, Nk) added to the scores of each key (-inf drops it); a row left
    with no key has probabilities 0.

    One (chunk x Nk) buffer per chunk: the scores are exponentiated in place, and the column sums of the
    normalised rows are one matmul with the rows' 1/sum (softmax would allocate a second buffer)."""
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    start, length = (0, k.shape[2]) if image_span is None else image_span
    q = q.narrow(2, start, length) if image_span is not None else q
    bsz, heads, nq, _ = q.shape
    nk = k.shape[2]
    kt = k.to(acc).transpose(-1, -2)
    rows = max(1, _QUERY_CHUNK_ELEMENTS // max(1, bsz * heads * nk))
    mass = torch.zeros(bsz, heads, 1, length, dtype=acc, device=q.device)
    bias = None if key_bias is None else key_bias.to(acc)[:, None, None, :]
    for i in range(0, nq, rows):
        e = torch.matmul(q[:, :, i:i + rows].to(acc), kt).mul_(scale)
        if bias is not None:
            e.add_(bias)
            e.sub_(e.amax(dim=-1, keepdim=True).nan_to_num_(neginf=0.0)).exp_()  # all-dropped rows: e = 0
        else:
            e.sub_(e.amax(dim=-1, keepdim=True)).exp_()
        total = e.sum(dim=-1, keepdim=True)
        inv = total.reciprocal_() if bias is None else torch.where(total > 0, total.reciprocal(), 0.0)
        mass += torch.matmul(inv.transpose(-1, -2), e.narrow(-1, start, length))
        del e  # before the next chunk's matmul allocates its buffer: one chunk alive at a time
    return mass.squeeze(2).mean(dim=1)


def _threshold_mass(mass: torch.Tensor, threshold: float, relative: bool) -> torch.Tensor:
    """mass > threshold, or (joint attention) mass > threshold * the row's mean mass."""
    return mass > (threshold * mass.mean(dim=-1, keepdim=True) if relative else threshold)


def _mask_from_probs_torch(probs, h, w, threshold, heads, *, frames=0):
    heads = check_probs(probs, h, w, threshold, heads, frames)
    p4 = probs.unflatten(0, (probs.shape[0] // heads, heads)) if probs.dim() == 3 else probs  # a view
    return (_mass_probs_torch(p4) > threshold).view(p4.shape[0], *grid_shape(h, w, frames))


def _mask_from_qk_torch(q, k, h, w, threshold, scale, *, layout="BHND", image_span=None, frames=0, key_bias=None):
    span = check_qk(q, k, h, w, threshold, scale, triton=False, layout=layout, image_span=image_span, frames=frames,
                    key_bias=key_bias)
    mass = _mass_qk_torch(heads_first(q, layout), heads_first(k, layout), scale, span, key_bias)
    return _threshold_mass(mass, threshold, span is not None).view(q.shape[0], *grid_shape(h, w, frames))


# ------------------------------------------------------------------------ the Triton (CUDA) kernels
def _probs_triton(probs, h, w, threshold, heads, traced, frames=0):
    heads = check_probs(probs, h, w, threshold, heads, frames)
    p4 = probs.unflatten(0, (probs.shape[0] // heads, heads)) if probs.dim() == 3 else probs  # a view
    grid = grid_shape(h, w, frames)
    if p4.shape[0] == 0:
        return torch.empty((0, *grid), dtype=torch.bool, device=probs.device)
    mask, _ = launch_mask_from_probs(p4, threshold, traced=traced)
    return mask.view(-1, *grid)


def _qk_triton(q, k, h, w, threshold, scale, traced, layout="BHND", image_span=None, frames=0, key_bias=None):
    span = check_qk(q, k, h, w, threshold, scale, triton=True, layout=layout, image_span=image_span, frames=frames,
                    key_bias=key_bias)
    grid = grid_shape(h, w, frames)
    if q.shape[0] == 0:
        return torch.empty((0, *grid), dtype=torch.bool, device=q.device)
    mask, _ = launch_mask_from_qk(heads_first(q, layout), heads_first(k, layout), threshold, scale,
                                  image_span=span, key_bias=key_bias, traced=traced)
    return mask.view(-1, *grid)


def mask_from_probs_triton(probs, h: int, w: int, threshold: float, heads: int, *, frames: int = 0) -> torch.Tensor:
    """The CUDA kernel of sag_fast::mask_from_probs (on CPU tensors under TRITON_INTERPRET=1)."""
    return _probs_triton(probs, h, w, threshold, heads, traced=False, frames=frames)


def mask_from_qk_triton(q, k, h: int, w: int, threshold: float, scale: float, *, layout: str = "BHND",
                        image_span=None, frames: int = 0, key_bias=None) -> torch.Tensor:
    """The CUDA kernel of sag_fast::mask_from_qk (on CPU tensors under TRITON_INTERPRET=1)."""
    return _qk_triton(q, k, h, w, threshold, scale, traced=False, layout=layout, image_span=image_span,
                      frames=frames, key_bias=key_bias)


# ------------------------------------------------------------------------------------------- ops
def _probs_fake(probs, h, w, threshold, heads, *, frames=0):
    heads = check_probs(probs, h, w, threshold, heads, frames)
    bsz = probs.shape[0] if probs.dim() == 4 else probs.shape[0] // heads
    return probs.new_empty((bsz, *grid_shape(h, w, frames)), dtype=torch.bool)


def _qk_fake(q, k, h, w, threshold, scale, *, layout="BHND", image_span=None, frames=0, key_bias=None):
    check_qk(q, k, h, w, threshold, scale, triton=q.device.type == "cuda", layout=layout, image_span=image_span,
             frames=frames, key_bias=key_bias)
    return q.new_empty((q.shape[0], *grid_shape(h, w, frames)), dtype=torch.bool)


_LIB = torch.library.Library("sag_fast", "FRAGMENT")  # noqa: TOR901
_PROBS_ARGS = ("probs", "h", "w", "threshold", "heads")
_QK_ARGS = ("q", "k", "h", "w", "threshold", "scale")
# frames: 0 for an (h, w) key grid, mask (B, h, w); f >= 1 for a video's (f, h, w) grid, mask (B, f, h, w)
_LIB.define("mask_from_probs(Tensor probs, int h, int w, float threshold, int heads, *, int frames=0) -> Tensor")
_LIB.define("mask_from_qk(Tensor q, Tensor k, int h, int w, float threshold, float scale, *, "
            "str layout=\"BHND\", int[]? image_span=None, int frames=0, Tensor? key_bias=None) -> Tensor")
# every device but CUDA: the torch kernels (CompositeExplicitAutograd is the default for backends without their own)
_LIB.impl("mask_from_probs", _mask_from_probs_torch, "CompositeExplicitAutograd")
_LIB.impl("mask_from_qk", _mask_from_qk_torch, "CompositeExplicitAutograd")
_LIB.impl("mask_from_probs", mask_from_probs_triton, "CUDA")
_LIB.impl("mask_from_qk", mask_from_qk_triton, "CUDA")
torch.library.register_fake("sag_fast::mask_from_probs", _probs_fake, lib=_LIB)
torch.library.register_fake("sag_fast::mask_from_qk", _qk_fake, lib=_LIB)
torch.library.register_torch_dispatch("sag_fast::mask_from_probs", FunctionalTensorMode, cuda_decomposition(
    _PROBS_ARGS, lambda *args, **kwargs: _probs_triton(*args, traced=True, **kwargs)), lib=_LIB)
torch.library.register_torch_dispatch("sag_fast::mask_from_qk", FunctionalTensorMode, cuda_decomposition(
    _QK_ARGS, lambda *args, **kwargs: _qk_triton(*args, traced=True, **kwargs)), lib=_LIB)


# ------------------------------------------------------------------------------------- public API
def mask_from_probs(probs: torch.Tensor, grid_hw, threshold: float = 1.0, heads: int | None = None) -> torch.Tensor:
    """SAG mask from softmax probabilities: (B, h, w) torch.bool, True where mass > threshold.

    probs: (B, heads, Nq, Nk), or (B*heads, Nq, Nk) as diffusers stores it (then `heads` is required);
    fp32/fp16/bf16 (fp64 on CPU), any strides (never copied). grid_hw: (h, w) with h*w == Nk, or a video's
    (f, h, w) with f*h*w == Nk (keys frame-major) -> mask (B, f, h, w).
    mass = mean over heads of the sum over queries, accumulated in fp32; threshold 1.0 is the mean.
    One call of sag_fast::mask_from_probs.
    """
    h, w, frames = _grid(grid_hw, "mask_from_probs")
    threshold = check_threshold(threshold, "mask_from_probs")  # a Python number: the schema would take a tensor
    if isinstance(probs, torch.Tensor) and probs.dim() == 4 and heads is None:
        heads = probs.shape[1]
    if heads is None:
        check_probs(probs, h, w, threshold, heads, frames)  # raises the message that names heads (or probs)
    if frames == 0:  # today's call, exactly
        return torch.ops.sag_fast.mask_from_probs(probs, h, w, threshold, heads)
    return torch.ops.sag_fast.mask_from_probs(probs, h, w, threshold, heads, frames=frames)


def mask_from_qk(q: torch.Tensor, k: torch.Tensor, grid_hw, threshold: float = 1.0,
                 scale: float | None = None, *, layout: str = "BHND", image_span=None,
                 key_bias: torch.Tensor | None = None) -> torch.Tensor:
    """The same (B, h, w) torch.bool mask from q (B, heads, Nq, d) and k (B, heads, Nk, d), without
    materialising the (Nq, Nk) probabilities: A = softmax(q k^T * scale) over keys, scale 1/sqrt(d) by
    default. Any strides (e.g. (B, N, heads*d).view(B, N, heads, d).transpose(1, 2)); d <= 256 on CUDA.
    Extra memory O(B*heads*(Nq+Nk)) on CUDA. One call of sag_fast::mask_from_qk.

    layout: "BHND" (q, k are (B, heads, N, d)) or "BNHD" ((B, N, heads, d), as diffusers' attention
    dispatch has them); read through strides either way, never copied.
    image_span: None (every token is an image token; mask = mass > threshold), or (start, length) for joint
    attention (image and text tokens in one softmax, SD3/Flux; Nq == Nk == N): the image tokens are
    start .. start+length-1 (text before or after them), the softmax runs over all N keys, the mass is
    summed over the image queries for the image keys, and mask = mass > threshold * mean image-key mass
    (so 1.0 is "above the average image token"); grid_hw is the image grid, h*w == length.
    Video: grid_hw = (f, h, w) with f*h*w == Nk (or == length), keys frame-major -> mask (B, f, h, w); the
    CPU kernel streams over query chunks as for images (no Nq x Nk buffer).
    key_bias: None, or a (B, Nk) float tensor added to every query's scores of key j before the softmax, as a
    per-key attention mask (scaled_dot_product_attention's float attn_mask; -inf drops the key, e.g. padded
    text tokens); a row with no key left contributes nothing.
    """
    h, w, frames = _grid(grid_hw, "mask_from_qk")
    threshold = check_threshold(threshold, "mask_from_qk")
    span = image_span_pair(image_span)
    if scale is None:
        if not isinstance(q, torch.Tensor):
            check_float(q, "q", "mask_from_qk")
        scale = 1.0 / math.sqrt(q.shape[-1])  # d is the last dim in both layouts
    scale = real_number(scale, "scale", "mask_from_qk")
    if layout == "BHND" and span is None and frames == 0 and key_bias is None:  # today's call, exactly
        return torch.ops.sag_fast.mask_from_qk(q, k, h, w, threshold, scale)
    extra = {"frames": frames} if frames else {}
    if key_bias is not None:
        extra["key_bias"] = key_bias
    return torch.ops.sag_fast.mask_from_qk(q, k, h, w, threshold, scale, layout=layout,
                                           image_span=None if span is None else list(span), **extra)
