"""The SAG degrade pass in one launch: x~ = x + M * (G_sigma * s - s), s = c1*x + c2*model_output.

G_sigma is the separable Gaussian (reflect padding), M the (B, h, w) mask nearest-upsampled to (H, W)
inside the kernel with PyTorch's index rule. See DESIGN.md and sag_fast/reference.py `degrade`.

Where it runs (custom op `sag_fast::degrade`):
  CUDA tensors (fp32/fp16/bf16)          the Triton kernel below
  CPU tensors with TRITON_INTERPRET=1    the same kernel, interpreted (how it is tested without a GPU)
  other CPU tensors, and fp64 anywhere   `_degrade_torch`: separable conv2d in fp32 (fp64 for fp64 x)

Kernel design. Triton gives no shared memory and no register shuffles, so a tile cannot be shifted
for the two separable passes. Each program owns (b, c, a strip of BW = 32*num_warps columns, one
column per thread, and a chunk of rows) and walks down the rows: the horizontal blur of an input row
is K shifted loads of x and of model_output (L1/L2 hits: each byte comes from DRAM about once), and
the last K horizontal rows are a register ring held as a tuple of K [BW] vectors. The row loop is
unrolled by K (`static_range`), so which slot is written and which slot is vertical tap t are
compile-time facts: the ring update is register renaming and the vertical pass is K FMAs (checked in
the PTX: no selects, no shared memory, no barriers, the tl.exp weights hoisted out of the loop).
Row chunks (K-1 halo rows) give enough programs to fill the GPU; the reflected tap columns are
loop invariant, so reflection costs nothing in the loop. Cost per output element (PTX, K=9): 2K+3
loads, ~2K 64-bit address adds, ~3K FMAs, one store; for fp16 also 2K+2 conversions. That is issue
bound rather than DRAM bound for fp16 on an H100 (estimate ~40-60% of copy bandwidth, fp32 ~80-100%;
not measured here). The next step would be a register window: V columns per thread, one vector
load of V + 2P values per row, reused by all taps. Channels-last inputs work through the strides.
"""
from __future__ import annotations

import functools
import math

import numpy as np
import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ._dispatch import check_float, check_same_device, use_triton

_MASK_DTYPES = (torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64,
                torch.float16, torch.bfloat16, torch.float32, torch.float64)


# ------------------------------------------------------------------------------------ kernel
@triton.jit
def _degrade_kernel(
    x_ptr, o_ptr, y_ptr, m_ptr, c1_ptr, c2_ptr,
    C, H, W, mh, mw, scale_h, scale_w, neg_half_inv_var, rows_per_prog, n_strips, n_chunks,
    sxb, sxc, sxh, sxw, sob, soc, soh, sow, syb, syc, syh, syw, smb, smh, smw, sc1, sc2,
    K: tl.constexpr, BW: tl.constexpr, HAS_MASK: tl.constexpr,
):
    P: tl.constexpr = K // 2
    pid = tl.program_id(0)
    chunk = pid % n_chunks  # chunks of one strip are neighbours in launch order: halos hit in L2
    rest = pid // n_chunks
    strip = rest % n_strips
    plane = rest // n_strips
    b = plane // C
    ch = plane - b * C

    # Gaussian taps (unnormalised; 1/norm is folded into c1, c2), a tuple of K scalars computed once
    gs = ()
    for u in tl.static_range(K):
        gs = gs + (tl.exp(neg_half_inv_var * ((u - P) * (u - P))),)
    norm = 0.0
    for u in tl.static_range(K):
        norm += gs[u]
    inv_norm = 1.0 / norm

    col0 = strip * BW
    cols = col0 + tl.arange(0, BW)
    cols_c = tl.minimum(cols, W - 1)  # lanes past W read a valid column, their store is masked
    # reflected tap columns: loop invariant, so the row loop only adds the row offset
    x_offs = ()
    o_offs = ()
    for u in tl.static_range(K):
        cu = cols_c + (u - P)
        cu = tl.where(cu < 0, -cu, cu)
        cu = tl.where(cu >= W, 2 * (W - 1) - cu, cu)
        x_offs = x_offs + (cu * sxw,)
        o_offs = o_offs + (cu * sow,)
    x_col = cols_c * sxw
    o_col = cols_c * sow
    y_col = cols_c * syw
    x_plane = x_ptr + b.to(tl.int64) * sxb + ch.to(tl.int64) * sxc
    o_plane = o_ptr + b.to(tl.int64) * sob + ch.to(tl.int64) * soc
    y_plane = y_ptr + b.to(tl.int64) * syb + ch.to(tl.int64) * syc
    c1 = tl.load(c1_ptr + b * sc1).to(tl.float32)
    c2 = tl.load(c2_ptr + b * sc2).to(tl.float32)
    c1n = c1 * (inv_norm * inv_norm)  # both passes use the unnormalised taps
    c2n = c2 * (inv_norm * inv_norm)
    if HAS_MASK:
        m_plane = m_ptr + b.to(tl.int64) * smb
        # PyTorch nearest: src = min(floor(dst * scale), in - 1), scale = fp32(in) / fp32(out); dst >= 0
        m_col = tl.minimum((cols_c.to(tl.float32) * scale_w).to(tl.int32), mw - 1) * smw

    # row arithmetic in int64: scalar (uniform) on the GPU, and the interpreter skips its overflow checks
    r0 = chunk.to(tl.int64) * rows_per_prog
    r_end = tl.minimum(r0 + rows_per_prog, H)
    n_in = r_end - r0 + (K - 1)  # input rows r0-P .. r_end-1+P
    # ring[q] = horizontal blur (times c/norm) of input row it - (K-1) + ((q - it - 1) mod K) + r0 - P
    ring = ()
    for q in tl.static_range(K):
        ring = ring + (tl.zeros([BW], dtype=tl.float32),)
    for grp in range(0, (n_in + K - 1) // K):
        row_base = r0 + grp * K - P
        for ph in tl.static_range(K):
            # horizontal pass of input row row_base + ph (reflected; clamped for the tail past r_end)
            ri = row_base + ph
            ri = tl.where(ri < 0, -ri, ri)
            ri = tl.where(ri >= H, 2 * (H - 1) - ri, ri)
            ri = tl.minimum(tl.maximum(ri, 0), H - 1)
            hx = tl.zeros([BW], dtype=tl.float32)
            ho = tl.zeros([BW], dtype=tl.float32)
            x_row = x_plane + ri * sxh
            o_row = o_plane + ri * soh
            for u in tl.static_range(K):
                hx += gs[u] * tl.load(x_row + x_offs[u]).to(tl.float32)
                ho += gs[u] * tl.load(o_row + o_offs[u]).to(tl.float32)
            # slot ph takes the new row; the loop is unrolled by K, so this is register renaming
            h = c1n * hx + c2n * ho
            new_ring = ()
            for q in tl.static_range(K):
                if q == ph:
                    new_ring = new_ring + (h,)
                else:
                    new_ring = new_ring + (ring[q],)
            ring = new_ring

            # vertical pass for output row r = row_base + ph - P - ... : slot (ph + 1 + t) % K is tap t
            blurred = gs[0] * ring[(ph + 1) % K]
            for t in tl.static_range(1, K):
                blurred += gs[t] * ring[(ph + 1 + t) % K]
            r = row_base + ph - (K - 1 - P)
            # (a scalar-bool & tensor-bool mask breaks the interpreter: fold the row test into a bound)
            ok = cols < tl.where(r >= r0, tl.where(r < r_end, W, 0), 0)
            rc = tl.maximum(r, 0)
            xv = tl.load(x_plane + rc * sxh + x_col, mask=ok, other=0.0)
            ov = tl.load(o_plane + rc * soh + o_col, mask=ok, other=0.0).to(tl.float32)
            xf = xv.to(tl.float32)
            delta = blurred - (c1 * xf + c2 * ov)
            if HAS_MASK:
                m_row = tl.minimum((rc.to(tl.float32) * scale_h).to(tl.int64), mh - 1)
                mv = tl.load(m_plane + m_row * smh + m_col, mask=ok, other=0)
                delta = tl.where(mv != 0, delta, 0.0)
            tl.store(y_plane + rc * syh + y_col, (xf + delta).to(xv.dtype), mask=ok)


# ----------------------------------------------------------------------------------- launcher
@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


@functools.lru_cache(maxsize=4096)
def _nearest_scale(n_in: int, n_out: int) -> float:
    """PyTorch's fp32 nearest scale (float)in / out, exactly (fp32 division, not fp64)."""
    return float(np.float32(n_in) / np.float32(n_out))


@functools.lru_cache(maxsize=4096)
def _plan(planes: int, H: int, W: int, K: int, n_sm: int, block_w: int | None, rows: int | None):
    """(BW, num_warps, n_strips, rows_per_prog, n_chunks): one column per thread."""
    bw = block_w or min(128, max(16, triton.next_power_of_2(W)))
    n_strips = triton.cdiv(W, bw)
    num_warps = max(1, bw // 32)
    if rows is None:  # enough programs for ~32 resident warps per SM
        want_chunks = triton.cdiv(32 * n_sm // num_warps, planes * n_strips)
        rows = max(triton.cdiv(H, want_chunks), 4 * (K - 1) + 1, 8)  # halo <= ~25% of the rows
    # rows = m*K + 1 makes the K-1 halo rows plus the chunk a whole number of K-row groups
    m = max(1, triton.cdiv(rows - 1, K))
    rows = m * K + 1
    return bw, num_warps, n_strips, rows, triton.cdiv(H, rows)


def _launch(x, model_output, mask, c1, c2, kernel_size, sigma, block_w=None, rows=None):
    B, C, H, W = x.shape
    y = torch.empty_like(x)
    if y.numel() == 0:
        return y
    n_sm = _sm_count(x.device.index if x.device.index is not None else torch.cuda.current_device()) \
        if x.is_cuda else 1
    bw, num_warps, n_strips, rows_pp, n_chunks = _plan(B * C, H, W, kernel_size, n_sm, block_w, rows)
    if mask is None:
        m, mh, mw, ms = x, 1, 1, (0, 0, 0)  # never read (HAS_MASK=False)
    else:
        m, mh, mw, ms = mask, mask.shape[1], mask.shape[2], mask.stride()
    _degrade_kernel[(B * C * n_strips * n_chunks,)](
        x, model_output, y, m, c1, c2,
        C, H, W, mh, mw, _nearest_scale(mh, H), _nearest_scale(mw, W), -0.5 / (sigma * sigma),
        rows_pp, n_strips, n_chunks,
        *x.stride(), *model_output.stride(), *y.stride(), *ms,
        c1.stride(0) if c1.dim() else 0, c2.stride(0) if c2.dim() else 0,
        K=kernel_size, BW=bw, HAS_MASK=mask is not None,
        num_warps=num_warps,
    )
    return y


# ------------------------------------------------------------------------------ torch path
_WEIGHTS: dict = {}


def _gaussian_weights(kernel_size: int, sigma: float, dtype, device) -> torch.Tensor:
    """Normalised 1-D Gaussian (diffusers' gaussian_blur_2d), cached per (size, sigma, dtype, device)."""
    key = (kernel_size, float(sigma), dtype, device)
    w = _WEIGHTS.get(key)
    if w is None:
        half = (kernel_size - 1) * 0.5
        pdf = torch.exp(-0.5 * (torch.linspace(-half, half, kernel_size, dtype=torch.float64) / sigma) ** 2)
        w = _WEIGHTS[key] = (pdf / pdf.sum()).to(dtype=dtype, device=device)
    return w


def _degrade_torch(x, model_output, mask, c1, c2, kernel_size, sigma):
    """CPU (and fp64) path: the same math with two 1-D convolutions, in fp32 (fp64 for fp64 x)."""
    B, C, H, W = x.shape
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    xf, of = x.to(acc), model_output.to(acc)
    s = c1.to(acc).reshape(-1, 1, 1, 1) * xf + c2.to(acc).reshape(-1, 1, 1, 1) * of
    p = kernel_size // 2
    w = _gaussian_weights(kernel_size, sigma, acc, x.device)
    blurred = F.pad(s.reshape(B * C, 1, H, W), (p, p, p, p), mode="reflect")
    blurred = F.conv2d(F.conv2d(blurred, w.view(1, 1, 1, -1)), w.view(1, 1, -1, 1)).view(B, C, H, W)
    delta = blurred.sub_(s)
    if mask is not None:
        up = F.interpolate(mask[:, None].to(acc), size=(H, W), mode="nearest") != 0
        delta.mul_(up)
    res = delta.add_(xf).to(x.dtype)
    out = torch.empty_like(x)
    if res.stride() == out.stride():
        return res
    return out.copy_(res)


# ------------------------------------------------------------------------------ validation
def _check(x, model_output, mask, c1, c2, kernel_size, sigma) -> None:
    check_float(x, "x")
    if x.dim() != 4:
        raise ValueError(f"degrade: x must be (B, C, H, W), got shape {tuple(x.shape)}")
    check_float(model_output, "model_output")
    if model_output.shape != x.shape:
        raise ValueError(f"degrade: model_output must have x's shape {tuple(x.shape)}, got {tuple(model_output.shape)}")
    if model_output.dtype != x.dtype:
        raise ValueError(f"degrade: model_output must have x's dtype {x.dtype}, got {model_output.dtype}")
    check_same_device("x", x, "model_output", model_output)
    B, _, H, W = x.shape
    for name, c in (("c1", c1), ("c2", c2)):
        if not isinstance(c, torch.Tensor):
            raise TypeError(f"degrade: {name} must be a tensor or a float, got {type(c).__name__}")
        if not c.is_floating_point():
            raise ValueError(f"degrade: {name} must be a floating point tensor, got {c.dtype}")
        if c.dim() > 1 or (c.dim() == 1 and c.shape[0] != B):
            raise ValueError(f"degrade: {name} must be 0-dim or have shape ({B},), got {tuple(c.shape)}")
        check_same_device("x", x, name, c)
    if mask is not None:
        if not isinstance(mask, torch.Tensor):
            raise TypeError(f"degrade: mask must be a tensor or None, got {type(mask).__name__}")
        if mask.dim() != 3 or mask.shape[0] != B or mask.shape[1] < 1 or mask.shape[2] < 1:
            raise ValueError(f"degrade: mask must be (B={B}, h, w) with h, w >= 1, got {tuple(mask.shape)}")
        if mask.dtype not in _MASK_DTYPES:
            raise ValueError(f"degrade: mask must be bool, integer or floating point, got {mask.dtype}")
        check_same_device("x", x, "mask", mask)
    if isinstance(kernel_size, bool) or not isinstance(kernel_size, int) or kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"degrade: kernel_size must be a positive odd int, got {kernel_size!r}")
    if isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or not (sigma > 0 and math.isfinite(sigma)):
        raise ValueError(f"degrade: sigma must be a positive finite number, got {sigma!r}")
    pad = kernel_size // 2
    if pad >= H or pad >= W:
        raise ValueError(f"degrade: kernel_size={kernel_size} needs height and width > {pad} for reflect padding, "
                         f"got height={H}, width={W}")


def _degrade_impl(x, model_output, mask, c1, c2, kernel_size, sigma):
    _check(x, model_output, mask, c1, c2, kernel_size, sigma)
    if x.dtype != torch.float64 and use_triton(x):
        return _launch(x, model_output, mask, c1, c2, kernel_size, float(sigma))
    return _degrade_torch(x, model_output, mask, c1, c2, kernel_size, float(sigma))


# -------------------------------------------------------------------------------- the op
_SCHEMA = "(Tensor x, Tensor model_output, Tensor? mask, Tensor c1, Tensor c2, int kernel_size, float sigma) -> Tensor"


@torch.library.custom_op("sag_fast::degrade", mutates_args=(), schema=_SCHEMA)
def degrade_op(x, model_output, mask, c1, c2, kernel_size, sigma):
    return _degrade_impl(x, model_output, mask, c1, c2, kernel_size, sigma)


@degrade_op.register_fake
def _(x, model_output, mask, c1, c2, kernel_size, sigma):
    _check(x, model_output, mask, c1, c2, kernel_size, sigma)
    return torch.empty_like(x)


def _as_coefficient(c, like: torch.Tensor):
    if isinstance(c, (int, float)) and not isinstance(c, bool):
        return torch.tensor(float(c), dtype=torch.float32, device=like.device if isinstance(like, torch.Tensor) else None)
    return c


def degrade(x, model_output, mask, c1, c2, kernel_size: int = 9, sigma: float = 1.0) -> torch.Tensor:
    """x~ = x + M * (G_sigma * s - s) with s = c1*x + c2*model_output, in one launch on CUDA.

    x, model_output: (B, C, H, W), same shape/dtype/device, any strides; the result has x's memory format.
    mask: (B, h, w) bool/integer/float at any resolution (nonzero = blur), nearest-upsampled to (H, W);
        None = blur everywhere (blur guidance).
    c1, c2: (B,) or 0-dim float tensors on x's device (read in the kernel, no host sync), or floats.
    fp32/fp16/bf16 compute in fp32; fp64 takes the torch path in fp64.
    """
    c1, c2 = _as_coefficient(c1, x), _as_coefficient(c2, x)
    if torch.compiler.is_compiling():
        return degrade_op(x, model_output, mask, c1, c2, kernel_size, float(sigma))
    # eager: skip the custom-op dispatcher (tens of microseconds) and launch directly; same code
    return _degrade_impl(x, model_output, mask, c1, c2, kernel_size, sigma)
