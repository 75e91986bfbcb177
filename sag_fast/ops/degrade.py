"""The SAG degrade pass in one launch: x~ = x + M * (G_sigma * s - s), s = c1*x + c2*model_output.

G_sigma is the separable Gaussian (reflect padding), M the (B, h, w) mask nearest-upsampled to (H, W)
inside the kernel with PyTorch's index rule. See DESIGN.md and sag_fast/reference.py `degrade`.

Where it runs (custom op `sag_fast::degrade`):
  CUDA tensors (fp32/fp16/bf16)          the Triton kernel below
  CPU tensors with TRITON_INTERPRET=1    the same kernel, interpreted (how it is tested without a GPU)
  other CPU fp32/fp16/bf16 tensors       the fused C++ kernel `sag_fast::degrade_cpu` (csrc/degrade_cpu.cpp),
                                         one pass per plane, when the extension is built
  fp64, and CPU without the extension    `_degrade_torch`: separable conv2d in fp32 (fp64 for fp64 x)

Kernel design. Triton gives no shared memory and no register shuffles, so neighbours' values come
from loads. Each program owns (b, c, a strip of T*V columns, a chunk of rows); thread t owns V = 8
adjacent columns and walks down the rows. Per input row it loads a window of V + 2*PP columns as three
aligned vectors per tensor (x and model_output; L1/L2 hits past the first read), forms
s = c1*x + c2*o once per window value, splits the window into per-thread scalars (reshape/permute/split
on a dimension a thread owns: register renaming) and does the K horizontal taps from registers. The
last K horizontal rows are a ring of [T, V] tensors; the row loop is unrolled by K (`static_range`), so
the ring update is register renaming and the vertical pass is K FMAs. Reflection: for W % V == 0 the
loads are clamped whole into the row and the first/last thread mirrors P edge values in registers;
other widths gather each window position's reflected column (slower, any width). The mask row is
reloaded only when the nearest source row changes and applied as one FFMA. Row chunks (K-1 halo rows)
give enough programs to fill the GPU. SASS (sm_90, (8, 16, 256, 256), kernel 9, runtime-specialised
like a contiguous launch), steady-state loop per output element: fp16 38 instructions (was 199),
fp32 46 (was 178); see the report in bench/bench_degrade.py's docstring. Channels-last inputs work
through the strides (scalar loads). Not measured on a GPU here.
"""
from __future__ import annotations

import functools
import math

import numpy as np
import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .._lib import extension_available
from ._dispatch import check_float, check_same_device, use_triton

_MASK_DTYPES = (torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64,
                torch.float16, torch.bfloat16, torch.float32, torch.float64)


# ------------------------------------------------------------------------------------ kernel
@triton.jit
def _columns(t, T: tl.constexpr, N: tl.constexpr, LOG2N: tl.constexpr):
    """[T, N] -> tuple of N [T] tensors in column order. A thread owns a whole row, so the
    reshape/permute/split chain only renames registers (checked in the SASS: no shuffles, no shared memory)."""
    parts = (t,)
    for lvl in tl.static_range(LOG2N):
        new = ()
        for i in tl.static_range(1 << lvl):
            lo, hi = tl.split(tl.permute(tl.reshape(parts[i], [T, 2, N >> (lvl + 1)]), (0, 2, 1)))
            new = new + (lo, hi)
        parts = new
    out = ()
    for i in tl.static_range(N):
        out = out + (tl.reshape(parts[i], [T]),)
    return out


@triton.jit
def _stack(vals, T: tl.constexpr, N: tl.constexpr, LOG2N: tl.constexpr):
    """Inverse of `_columns`: tuple of N [T] tensors -> [T, N]."""
    parts = ()
    for i in tl.static_range(N):
        parts = parts + (tl.reshape(vals[i], [T, 1]),)
    for lvl in tl.static_range(LOG2N):
        new = ()
        for i in tl.static_range(N >> (lvl + 1)):
            ab = tl.join(parts[2 * i], parts[2 * i + 1])  # [T, n, 2]
            new = new + (tl.reshape(tl.permute(ab, (0, 2, 1)), [T, 2 << lvl]),)
        parts = new
    return parts[0]


@triton.jit
def _reflect(c, n):
    """Reflect-pad index (one reflection: |offset| < n), clamped into [0, n) for lanes past the edge."""
    c = tl.where(c < 0, -c, c)
    c = tl.where(c >= n, 2 * (n - 1) - c, c)
    return tl.minimum(tl.maximum(c, 0), n - 1)


@triton.jit
def _degrade_kernel(
    x_ptr, o_ptr, y_ptr, m_ptr, c1_ptr, c2_ptr,
    C, H, W, mh, mw, scale_h, scale_w, neg_half_inv_var, rows_per_prog, n_strips, n_chunks,
    sxb, sxc, sxh, sxw, sob, soc, soh, sow, syb, syc, syh, syw, smb, smh, smw, sc1, sc2,
    K: tl.constexpr, T: tl.constexpr, V: tl.constexpr, LOG2V: tl.constexpr, PP: tl.constexpr,
    LOG2PP: tl.constexpr, HAS_MASK: tl.constexpr, EVEN_W: tl.constexpr, ROW64: tl.constexpr,
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

    # thread t owns columns c0 .. c0+V-1 and reads a window c0-PP .. c0+V+PP-1 as three aligned
    # chunks (vector loads); the taps then reuse the window's registers
    c0 = strip * (T * V) + tl.arange(0, T) * V
    cc = c0[:, None] + tl.arange(0, V)[None, :]
    cl = c0[:, None] + (tl.arange(0, PP)[None, :] - PP)
    cr = c0[:, None] + (tl.arange(0, PP)[None, :] + V)
    if EVEN_W:
        # W % V == 0 and V > P: chunks clamped whole into the row (no masks, still aligned vectors);
        # the first and last thread of a row then mirror P edge values from their centre chunk
        W = tl.multiple_of(W, V)
        c0c = tl.minimum(c0, W - V)  # threads past W read the last chunk, their store is masked
        gl = tl.maximum(c0c - PP, 0)[:, None] + tl.arange(0, PP)[None, :]
        gc = c0c[:, None] + tl.arange(0, V)[None, :]
        gr = tl.minimum(c0c + V, W - PP)[:, None] + tl.arange(0, PP)[None, :]
        is_left = c0 == 0
        is_right = c0 + V == W
    else:
        # any width: each window position reads its reflected column (gathers, no edge fix-up)
        gl = _reflect(cl, W)
        gc = _reflect(cc, W)  # the centre chunk of the last thread can hold taps past W too
        gr = _reflect(cr, W)
    okc = cc < W
    # loop-invariant column pointers (int32 offsets); the row loop adds one scalar offset per tensor
    x_plane = x_ptr + b.to(tl.int64) * sxb + ch.to(tl.int64) * sxc
    o_plane = o_ptr + b.to(tl.int64) * sob + ch.to(tl.int64) * soc
    y_ptrs = y_ptr + b.to(tl.int64) * syb + ch.to(tl.int64) * syc + cc * syw
    xl_ptrs = x_plane + gl * sxw
    xc_ptrs = x_plane + gc * sxw
    xr_ptrs = x_plane + gr * sxw
    ol_ptrs = o_plane + gl * sow
    oc_ptrs = o_plane + gc * sow
    or_ptrs = o_plane + gr * sow
    c1 = tl.load(c1_ptr + b * sc1).to(tl.float32)
    c2 = tl.load(c2_ptr + b * sc2).to(tl.float32)
    c1n = c1 * (inv_norm * inv_norm)  # both passes use the unnormalised taps
    c2n = c2 * (inv_norm * inv_norm)
    if HAS_MASK:
        # PyTorch nearest: src = min(floor(dst * scale), in - 1), scale = fp32(in) / fp32(out); dst >= 0
        m_ptrs = m_ptr + b.to(tl.int64) * smb \
            + tl.minimum((tl.minimum(cc, W - 1).to(tl.float32) * scale_w).to(tl.int32), mw - 1) * smw
        m_last = -1  # mask row held in m_on (1.0 / 0.0); reloaded only when the nearest source row changes
        m_on = tl.zeros([T, V], dtype=tl.float32)

    # row arithmetic in int32 (uniform registers); offsets in int64 only where a plane needs it (ROW64)
    r0 = chunk * rows_per_prog
    r_end = tl.minimum(r0 + rows_per_prog, H)
    n_in = r_end - r0 + (K - 1)  # input rows r0-P .. r_end-1+P
    # ring[q] = horizontal blur (times c/norm) of input row it - (K-1) + ((q - it - 1) mod K) + r0 - P
    ring = ()
    for q in tl.static_range(K):
        ring = ring + (tl.zeros([T, V], dtype=tl.float32),)
    for grp in range(0, (n_in + K - 1) // K):
        row_base = r0 + grp * K - P
        for ph in tl.static_range(K):
            # s = c1*x + c2*o over the window of input row row_base + ph (reflected; clamped past r_end)
            ri = row_base + ph
            ri = tl.where(ri < 0, -ri, ri)
            ri = tl.where(ri >= H, 2 * (H - 1) - ri, ri)
            ri = tl.minimum(tl.maximum(ri, 0), H - 1)
            if ROW64:
                ri = ri.to(tl.int64)
            xo = ri * sxh
            oo = ri * soh
            # every address is inside the plane, so no load needs a mask
            s_l = c1n * tl.load(xl_ptrs + xo).to(tl.float32) + c2n * tl.load(ol_ptrs + oo).to(tl.float32)
            s_c = c1n * tl.load(xc_ptrs + xo).to(tl.float32) + c2n * tl.load(oc_ptrs + oo).to(tl.float32)
            s_r = c1n * tl.load(xr_ptrs + xo).to(tl.float32) + c2n * tl.load(or_ptrs + oo).to(tl.float32)
            wl = _columns(s_l, T, PP, LOG2PP)
            wc = _columns(s_c, T, V, LOG2V)
            wr = _columns(s_r, T, PP, LOG2PP)
            # win[i] is column c0 + i - P, i in [0, V + 2P)
            win = ()
            for i in tl.static_range(P):
                if EVEN_W:
                    win = win + (tl.where(is_left, wc[P - i], wl[PP - P + i]),)
                else:
                    win = win + (wl[PP - P + i],)
            for i in tl.static_range(V):
                win = win + (wc[i],)
            for i in tl.static_range(P):
                if EVEN_W:
                    win = win + (tl.where(is_right, wc[V - 2 - i], wr[i]),)
                else:
                    win = win + (wr[i],)
            hs = ()
            for j in tl.static_range(V):
                acc = win[j + P]  # the centre tap is exp(0) = 1: no multiply
                for u in tl.static_range(K):
                    if u != P:
                        acc += gs[u] * win[j + u]
                hs = hs + (acc,)
            h = _stack(hs, T, V, LOG2V)
            # slot ph takes the new row; the loop is unrolled by K, so this is register renaming
            new_ring = ()
            for q in tl.static_range(K):
                if q == ph:
                    new_ring = new_ring + (h,)
                else:
                    new_ring = new_ring + (ring[q],)
            ring = new_ring

            # vertical pass for output row r: slot (ph + 1 + t) % K is tap t
            blurred = ring[(ph + 1 + P) % K]
            for t in tl.static_range(K):
                if t != P:
                    blurred += gs[t] * ring[(ph + 1 + t) % K]
            r = row_base + ph - (K - 1 - P)
            # (a scalar-bool & tensor-bool mask breaks the interpreter; a select keeps okc's vector width)
            ok = tl.where((r >= r0) & (r < r_end), okc, False)
            rc = tl.minimum(tl.maximum(r, 0), H - 1)
            if ROW64:
                rc = rc.to(tl.int64)
            xv = tl.load(xc_ptrs + rc * sxh)
            ov = tl.load(oc_ptrs + rc * soh).to(tl.float32)
            xf = xv.to(tl.float32)
            if K == 1:
                delta = blurred - (c1 * xf + c2 * ov)  # the same rounding as blurred: exactly x
            else:
                delta = blurred - c1 * xf - c2 * ov  # two FFMAs
            if HAS_MASK:
                m_row = tl.minimum((rc.to(tl.float32) * scale_h).to(tl.int32), mh - 1)
                if m_row != m_last:
                    m_on = tl.where(tl.load(m_ptrs + m_row * smh) != 0, 1.0, 0.0)
                    m_last = m_row
                yv = xf + m_on * delta  # one FFMA instead of a predicate per column
            else:
                yv = xf + delta
            tl.store(y_ptrs + rc * syh, yv.to(xv.dtype), mask=ok)


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
    """(T, V, PP, num_warps, n_strips, rows_per_prog, n_chunks, even_w): T threads of V columns each.

    V = 8 columns per thread (one 16-byte fp16 vector); PP = the window's halo chunk (a power of two
    >= K//2). EVEN_W (edge mirroring in registers) needs W % V == 0 and V > K//2, else gathers.
    """
    P = K // 2
    V = 8
    pp = triton.next_power_of_2(max(P, 1))
    bw = block_w or min(32 * V * 4, max(V, triton.next_power_of_2(W)))
    T = max(1, bw // V)
    n_strips = triton.cdiv(W, T * V)
    num_warps = max(1, T // 32)
    if rows is None:  # enough programs for ~32 resident warps per SM
        want_chunks = triton.cdiv(32 * n_sm // num_warps, planes * n_strips)
        rows = max(triton.cdiv(H, want_chunks), 2 * (K - 1) + 1, 8)  # halo <= ~50% of the rows
    # rows = m*K + 1 makes the K-1 halo rows plus the chunk a whole number of K-row groups
    m = max(1, triton.cdiv(rows - 1, K))
    rows = m * K + 1
    even_w = W % V == 0 and V > P
    return T, V, pp, num_warps, n_strips, rows, triton.cdiv(H, rows), even_w


def _row64(*tensors) -> bool:
    """Whether a row offset (row * stride_h) inside one plane can pass int32."""
    return any(t.shape[2] * abs(t.stride(2)) >= 2**31 for t in tensors)


def _launch(x, model_output, mask, c1, c2, kernel_size, sigma, block_w=None, rows=None):
    B, C, H, W = x.shape
    y = torch.empty_like(x)
    if y.numel() == 0:
        return y
    n_sm = _sm_count(x.device.index if x.device.index is not None else torch.cuda.current_device()) \
        if x.is_cuda else 1
    T, V, pp, num_warps, n_strips, rows_pp, n_chunks, even_w = _plan(B * C, H, W, kernel_size, n_sm, block_w, rows)
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
        K=kernel_size, T=T, V=V, LOG2V=V.bit_length() - 1, PP=pp, LOG2PP=pp.bit_length() - 1,
        HAS_MASK=mask is not None, EVEN_W=even_w, ROW64=_row64(x, model_output, y),
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


def _use_cpp(x) -> bool:
    """The fused C++ CPU kernel: CPU fp32/fp16/bf16 tensors, when the extension is built."""
    return x.device.type == "cpu" and x.dtype != torch.float64 and extension_available()


def _degrade_impl(x, model_output, mask, c1, c2, kernel_size, sigma):
    _check(x, model_output, mask, c1, c2, kernel_size, sigma)
    if x.dtype != torch.float64 and use_triton(x):
        return _launch(x, model_output, mask, c1, c2, kernel_size, float(sigma))
    if _use_cpp(x):
        return torch.ops.sag_fast.degrade_cpu(x, model_output, mask, c1, c2, kernel_size, float(sigma))
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


if extension_available():
    @torch.library.register_fake("sag_fast::degrade_cpu")
    def _(x, model_output, mask, c1, c2, kernel_size, sigma):
        _check(x, model_output, mask, c1, c2, kernel_size, sigma)
        if x.dtype == torch.float64:
            raise ValueError("degrade_cpu: x must be float32, float16 or bfloat16, got torch.float64")
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
