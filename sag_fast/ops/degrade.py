"""The SAG degrade pass in one launch: x~ = x + M * (G_sigma * s - s), s = c1*x + c2*model_output.

G_sigma is the separable Gaussian (reflect padding), M the (B, h, w) mask nearest-upsampled to (H, W)
inside the kernel with PyTorch's index rule. Video latents (B, C, F, H, W) are blurred per frame: each
(b, c, frame) is a plane read through x's strides (no copy), and the (B, f, h, w) mask is upsampled to
(F, H, W) with the same rule per axis. See docs/design.md and sag_fast/reference.py `degrade`.

One custom op, `sag_fast::degrade` (schema in csrc/module.cpp), a kernel per device:
  CPU    the fused C++ kernel (csrc/degrade_cpu.cpp): fp32/fp16/bf16 in one pass per plane, fp64 in fp64
  CUDA   the Triton kernel below (`degrade_triton`), fp32/fp16/bf16; registered here with
         torch.library, and decomposed into the Triton kernel (`wrap_triton`) when torch.compile
         functionalises the graph, so that Inductor sees the kernel itself. (`torch.library.triton_op`
         cannot be used: its decomposition runs the Triton body for every device, CPU tensors included;
         see docs/design.md.)
`degrade()` below is the Python face: an eager call dispatches exactly one `sag_fast::degrade`.
Under TRITON_INTERPRET=1 the Triton kernel also runs on CPU tensors: `degrade_triton` directly, or the
op inside `sag_fast.ops.testing.triton_on_cpu()`.

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

import numpy as np
import torch
import triton
import triton.language as tl
from torch._subclasses.functional_tensor import FunctionalTensorMode
from torch.library import wrap_triton

from .._lib import extension_available, require_extension
from ._dispatch import check_blur, check_float, check_same_device, cuda_decomposition, device_guard, sm_count

_OP = "sag_fast::degrade"
_ARGS = ("x", "model_output", "mask", "c1", "c2", "kernel_size", "sigma")
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
    NF, mf, scale_f, sxf, sof, syf, smf,
    K: tl.constexpr, T: tl.constexpr, V: tl.constexpr, LOG2V: tl.constexpr, PP: tl.constexpr,
    LOG2PP: tl.constexpr, HAS_MASK: tl.constexpr, EVEN_W: tl.constexpr, ROW64: tl.constexpr,
    VIDEO: tl.constexpr,
):
    P: tl.constexpr = K // 2
    pid = tl.program_id(0)
    chunk = pid % n_chunks  # chunks of one strip are neighbours in launch order: halos hit in L2
    rest = pid // n_chunks
    strip = rest % n_strips
    plane = rest // n_strips
    if VIDEO:
        # a plane is (b, c, frame): frames are batch rows of the 2-D blur, addressed through their stride
        fr = plane % NF
        plane = plane // NF
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
    y_plane = y_ptr + b.to(tl.int64) * syb + ch.to(tl.int64) * syc
    m_plane = m_ptr + b.to(tl.int64) * smb
    if VIDEO:
        x_plane += fr.to(tl.int64) * sxf
        o_plane += fr.to(tl.int64) * sof
        y_plane += fr.to(tl.int64) * syf
        if HAS_MASK:  # the mask frame by PyTorch's nearest rule, as for rows and columns
            m_plane += tl.minimum((fr.to(tl.float32) * scale_f).to(tl.int32), mf - 1).to(tl.int64) * smf
    y_ptrs = y_plane + cc * syw
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
        m_ptrs = m_plane \
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
    return any(t.shape[-2] * abs(t.stride(-2)) >= 2**31 for t in tensors)


def _strides(t) -> tuple[tuple, int]:
    """((b, c, h, w) strides, frame stride) of a 4-D (frame stride 0) or 5-D tensor."""
    st = t.stride()
    return (st[0], st[1], st[-2], st[-1]), (st[2] if t.dim() == 5 else 0)


def _launch(x, model_output, mask, c1, c2, kernel_size, sigma, block_w=None, rows=None, traced=False):
    """Allocates the output and launches the kernel (on the current device: callers hold `device_guard`).
    traced: the call is being functionalised (torch.compile), so the launch is recorded with wrap_triton."""
    # traced: the launch plan specialises on the sizes; a 4-D x is one frame (VIDEO=False: no frame arithmetic)
    video = x.dim() == 5
    B, C, H, W = (int(v) for v in (x.shape[0], x.shape[1], x.shape[-2], x.shape[-1]))
    NF = int(x.shape[2]) if video else 1
    y = torch.empty_like(x)
    if y.numel() == 0:
        return y
    T, V, pp, num_warps, n_strips, rows_pp, n_chunks, even_w = _plan(B * C * NF, H, W, kernel_size, sm_count(x),
                                                                      block_w, rows)
    if mask is None:
        m, mf, mh, mw, ms, smf = x, 1, 1, 1, (0, 0, 0), 0  # never read (HAS_MASK=False)
    else:
        m, mf, mh, mw = mask, int(mask.shape[1]) if video else 1, int(mask.shape[-2]), int(mask.shape[-1])
        st = mask.stride()
        ms, smf = (st[0], st[-2], st[-1]), (st[1] if video else 0)
    (sx, sxf), (so, sof), (sy, syf) = _strides(x), _strides(model_output), _strides(y)
    kernel = wrap_triton(_degrade_kernel) if traced else _degrade_kernel
    kernel[(B * C * NF * n_strips * n_chunks,)](
        x, model_output, y, m, c1, c2,
        C, H, W, mh, mw, _nearest_scale(mh, H), _nearest_scale(mw, W), -0.5 / (sigma * sigma),
        rows_pp, n_strips, n_chunks,
        *sx, *so, *sy, *ms,
        c1.stride(0) if c1.dim() else 0, c2.stride(0) if c2.dim() else 0,
        NF, mf, _nearest_scale(mf, NF), sxf, sof, syf, smf,
        K=kernel_size, T=T, V=V, LOG2V=V.bit_length() - 1, PP=pp, LOG2PP=pp.bit_length() - 1,
        HAS_MASK=mask is not None, EVEN_W=even_w, ROW64=_row64(x, model_output, y), VIDEO=video,
        num_warps=num_warps,
    )
    return y


# ------------------------------------------------------------------------------ validation
def check_degrade(x, model_output, mask, c1, c2, kernel_size, sigma) -> None:
    """The argument checks of sag_fast::degrade, for its fake and its Triton kernel (the C++ CPU kernel
    checks its own). float64 is accepted on CPU tensors only (the C++ kernel has an fp64 path)."""
    op = "degrade"
    check_float(x, "x", op, allow_fp64=x.device.type == "cpu")
    if x.dim() not in (4, 5):
        raise ValueError(f"degrade: x must be (B, C, H, W) or a video (B, C, F, H, W), got shape {tuple(x.shape)}")
    check_float(model_output, "model_output", op)
    check_same_device(op, "x", x, "model_output", model_output)
    if model_output.shape != x.shape:
        raise ValueError(f"degrade: model_output must have x's shape {tuple(x.shape)}, got {tuple(model_output.shape)}")
    if model_output.dtype != x.dtype:
        raise ValueError(f"degrade: model_output must have x's dtype {x.dtype}, got {model_output.dtype}")
    B, H, W = x.shape[0], x.shape[-2], x.shape[-1]
    for name, c in (("c1", c1), ("c2", c2)):
        if not isinstance(c, torch.Tensor):
            raise TypeError(f"degrade: {name} must be a tensor or a float, got {type(c).__name__}")
        check_same_device(op, "x", x, name, c)
        if not c.is_floating_point():
            raise ValueError(f"degrade: {name} must be a floating point tensor, got {c.dtype}")
        if c.dim() > 1 or (c.dim() == 1 and c.shape[0] != B):
            raise ValueError(f"degrade: {name} must be 0-dim or have shape ({B},), got {list(c.shape)}")
    if mask is not None:
        if not isinstance(mask, torch.Tensor):
            raise TypeError(f"degrade: mask must be a tensor or None, got {type(mask).__name__}")
        check_same_device(op, "x", x, "mask", mask)
        if mask.dim() != x.dim() - 1 or mask.shape[0] != B or min(mask.shape[1:]) < 1:
            want = f"(B={B}, h, w) with h, w >= 1" if x.dim() == 4 else f"(B={B}, f, h, w) with f, h, w >= 1"
            raise ValueError(f"degrade: mask must be {want} for x of shape {tuple(x.shape)}, got {tuple(mask.shape)}")
        if mask.dtype not in _MASK_DTYPES:
            raise ValueError(f"degrade: mask must be bool, integer or floating point, got {mask.dtype}")
    check_blur(kernel_size, sigma, H, W)


# ----------------------------------------------------------------------------- the kernels
def degrade_triton(x, model_output, mask, c1, c2, kernel_size: int = 9, sigma: float = 1.0, *,
                   block_w: int | None = None, rows: int | None = None) -> torch.Tensor:
    """The CUDA kernel of sag_fast::degrade (on CPU tensors under TRITON_INTERPRET=1): checks, then one
    launch under x's device. block_w, rows: force the launch blocking (tests)."""
    check_degrade(x, model_output, mask, c1, c2, kernel_size, sigma)
    with device_guard(x):
        return _launch(x, model_output, mask, c1, c2, kernel_size, float(sigma), block_w, rows)


def _fake(x, model_output, mask, c1, c2, kernel_size, sigma):
    check_degrade(x, model_output, mask, c1, c2, kernel_size, sigma)
    return torch.empty_like(x)  # x's memory format, as both kernels return


def _traced(x, model_output, mask, c1, c2, kernel_size, sigma):
    """The launch as torch.compile records it (see `cuda_decomposition`): no device guard, wrap_triton."""
    check_degrade(x, model_output, mask, c1, c2, kernel_size, sigma)
    return _launch(x, model_output, mask, c1, c2, kernel_size, float(sigma), traced=True)


if extension_available():
    torch.library.register_kernel(_OP, "cuda", degrade_triton)
    torch.library.register_fake(_OP, _fake)
    torch.library.register_torch_dispatch(_OP, FunctionalTensorMode, cuda_decomposition(_ARGS, _traced))


# ------------------------------------------------------------------------------ public API
def _as_coefficient(c, like: torch.Tensor):
    if isinstance(c, (int, float)) and not isinstance(c, bool) and isinstance(like, torch.Tensor):
        return torch.tensor(float(c), dtype=torch.float32, device=like.device)
    return c


def degrade(x, model_output, mask, c1, c2, kernel_size: int = 9, sigma: float = 1.0) -> torch.Tensor:
    """x~ = x + M * (G_sigma * s - s) with s = c1*x + c2*model_output: one call of sag_fast::degrade.

    x, model_output: (B, C, H, W), or video latents (B, C, F, H, W) blurred per frame; same shape/dtype/device,
        any strides (never copied); the result has x's memory format.
    mask: (B, h, w) bool/integer/float at any resolution (nonzero = blur), nearest-upsampled to (H, W); for
        video (B, f, h, w), nearest-upsampled to (F, H, W) per axis; None = blur everywhere (blur guidance).
    c1, c2: (B,) or 0-dim float tensors on x's device (read in the kernel, no host sync), or floats.
    fp32/fp16/bf16 compute in fp32; fp64 (CPU only) in fp64.
    """
    require_extension()
    c1, c2 = _as_coefficient(c1, x), _as_coefficient(c2, x)
    # what the schema would convert silently (3.0, True) or refuse without naming the argument
    for name, t in (("x", x), ("model_output", model_output), ("c1", c1), ("c2", c2), ("mask", mask)):
        if not isinstance(t, torch.Tensor) and not (name == "mask" and t is None):
            kind = "a tensor or None" if name == "mask" else "a tensor or a float" if name in ("c1", "c2") else "a tensor"
            raise TypeError(f"degrade: {name} must be {kind}, got {type(t).__name__}")
    check_blur(kernel_size, sigma)
    return torch.ops.sag_fast.degrade(x, model_output, mask, c1, c2, kernel_size, float(sigma))
