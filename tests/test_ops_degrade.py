"""sag_fast.ops.degrade against sag_fast.reference.degrade (float64) on small odd/prime shapes.

Runs the Triton kernel under TRITON_INTERPRET=1 on CPU tensors (and on CUDA when there is a GPU);
without the interpreter the same tests check the CPU torch path. Tolerances: fp32 1e-5 absolute
(values O(1), fp32 math), fp16 one fp16 ulp of |x~| plus 2e-3 (inputs rounded to fp16 first, so the
reference sees the same inputs), fp64 1e-12 (the fp64 torch path).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sag_fast import reference as ref
from sag_fast.ops import degrade as dg
from sag_fast.ops.degrade import degrade

TOL = {torch.float64: (1e-12, 0.0), torch.float32: (1e-5, 1e-5), torch.float16: (2e-3, 1e-3),
       torch.bfloat16: (2e-2, 8e-3)}


def _inputs(B, C, H, W, dtype, device, mask_hw=(3, 5), mask_dtype=torch.bool):
    x = torch.randn(B, C, H, W, device=device).to(dtype)
    o = torch.randn(B, C, H, W, device=device).to(dtype)
    mask = None
    if mask_hw is not None:
        mask = torch.rand(B, *mask_hw, device=device) > 0.5
        mask = mask.to(mask_dtype)
    return x, o, mask


def _expect(x, o, mask, c1, c2, k=9, sigma=1.0):
    c = [c.double() if isinstance(c, torch.Tensor) else c for c in (c1, c2)]
    return ref.degrade(x.double(), o.double(), mask, c[0], c[1], k, sigma)


def _close(y, expected, dtype):
    atol, rtol = TOL[dtype]
    assert y.dtype == dtype
    torch.testing.assert_close(y.double(), expected, atol=atol, rtol=rtol)


@pytest.mark.parametrize("B,C,H,W,mask_hw,k,sigma", [
    (1, 3, 17, 23, (3, 5), 9, 1.0),     # grid that divides neither H nor W
    (5, 3, 13, 11, (13, 11), 3, 0.5),   # full-resolution mask, batch 5
    (2, 4, 19, 29, None, 9, 3.0),       # blur guidance (mask=None)
    (1, 16, 9, 10, (2, 2), 5, 1.7),     # C = 16, 2x up
    (2, 4, 31, 13, (7, 6), 1, 1.0),     # kernel_size 1: x~ == x
])
def test_matches_reference_fp32(device, B, C, H, W, mask_hw, k, sigma):
    x, o, mask = _inputs(B, C, H, W, torch.float32, device, mask_hw)
    c1, c2 = torch.rand(B, device=device) + 0.5, -torch.rand(B, device=device)
    y = degrade(x, o, mask, c1, c2, k, sigma)
    _close(y, _expect(x, o, mask, c1, c2, k, sigma), torch.float32)
    if k == 1:
        assert torch.equal(y, x)


def test_fp16(device):
    x, o, mask = _inputs(2, 3, 14, 17, torch.float16, device, (5, 4))
    c1, c2 = torch.tensor([1.0, 0.6], device=device), torch.tensor([-0.3, -0.8], device=device)
    _close(degrade(x, o, mask, c1, c2), _expect(x, o, mask, c1, c2), torch.float16)


def test_fp64_uses_fp64_path(device):
    x, o, mask = _inputs(1, 3, 11, 12, torch.float64, device, (4, 3))
    c1, c2 = torch.tensor(0.8, dtype=torch.float64, device=device), torch.tensor(-0.5, dtype=torch.float64, device=device)
    _close(degrade(x, o, mask, c1, c2, 5, 1.3), _expect(x, o, mask, c1, c2, 5, 1.3), torch.float64)


@pytest.mark.parametrize("W,k,block_w,rows", [
    (37, 9, 16, 10),   # odd width: reflected gathers, 3 strips of 2 threads
    (37, 3, 16, 2),
    (24, 9, 8, 10),    # W % 8 == 0: edge mirroring in registers, one thread per strip (3 strips)
    (32, 15, 16, 2),   # widest kernel with mirroring (P = 7 < 8), first and last thread in different strips
    (24, 17, 8, 19),   # P = 8: too wide to mirror from the centre chunk, gathers
])
def test_strips_and_row_chunks(device, W, k, block_w, rows):
    """Several column strips and row chunks per plane (the default plan uses one on tiny images)."""
    if not dg.use_triton(torch.empty(0, device=device)):
        pytest.skip("launcher blocking only applies to the Triton path")
    x, o, mask = _inputs(1, 2, 23, W, torch.float32, device, (5, 7))
    c1, c2 = torch.tensor([0.9], device=device), torch.tensor([-0.4], device=device)
    y = dg._launch(x, o, mask, c1, c2, k, 1.2, block_w=block_w, rows=rows)
    _close(y, _expect(x, o, mask, c1, c2, k, 1.2), torch.float32)


@pytest.mark.parametrize("W", [8, 40])
def test_even_width_mirroring(device, W):
    """W % 8 == 0 (the edge-mirroring path): W = 8 is one thread holding both edges, kernel 9."""
    x, o, mask = _inputs(2, 3, 11, W, torch.float16, device, (3, 3))
    c1, c2 = torch.tensor([1.0, 0.7], device=device), torch.tensor([-0.3, -0.9], device=device)
    _close(degrade(x, o, mask, c1, c2), _expect(x, o, mask, c1, c2), torch.float16)
    x, o, _ = _inputs(1, 2, 9, W, torch.float32, device, None)
    _close(degrade(x, o, None, 0.8, -0.6, 7, 0.9), _expect(x, o, None, 0.8, -0.6, 7, 0.9), torch.float32)


def test_channels_last_and_sliced(device):
    big = torch.randn(2, 4, 21, 30, device=device)
    x = big[:, :, 2:19, 3:28:2]  # non-contiguous: offset, row and column strides
    o = torch.randn(2, 4, 17, 13, device=device).to(memory_format=torch.channels_last)
    mask = (torch.rand(2, 6, 4, device=device) > 0.4)[:, ::2, :]  # sliced mask (3, 4)
    c1, c2 = torch.rand(2, device=device), -torch.rand(2, device=device)
    y = degrade(x, o, mask, c1, c2, 7, 1.1)
    _close(y, _expect(x, o, mask, c1, c2, 7, 1.1), torch.float32)

    xl = torch.randn(2, 3, 11, 16, device=device).to(memory_format=torch.channels_last)
    ol = torch.randn(2, 3, 11, 16, device=device).to(memory_format=torch.channels_last)
    y = degrade(xl, ol, None, c1, c2, 9, 1.0)
    assert y.is_contiguous(memory_format=torch.channels_last)
    _close(y, _expect(xl, ol, None, c1, c2), torch.float32)


def test_coefficient_forms(device):
    x, o, mask = _inputs(3, 3, 10, 9, torch.float32, device, (2, 3))
    want = _expect(x, o, mask, 0.7, -0.2, 3, 1.0)
    for c1, c2 in ((0.7, -0.2),
                   (torch.tensor(0.7, device=device), torch.tensor(-0.2, device=device)),
                   (torch.full((3,), 0.7, device=device), torch.full((3,), -0.2, device=device, dtype=torch.float64))):
        _close(degrade(x, o, mask, c1, c2, 3, 1.0), want, torch.float32)
    strided = torch.tensor([0.7, 9.0, 0.7, 9.0, 0.7, 9.0], device=device)[::2]  # (B,) with stride 2
    _close(degrade(x, o, mask, strided, -0.2, 3, 1.0), want, torch.float32)


@pytest.mark.parametrize("mask_dtype", [torch.uint8, torch.float32])
def test_mask_dtypes(device, mask_dtype):
    x, o, mask = _inputs(2, 3, 12, 9, torch.float32, device, (3, 2), mask_dtype)
    _close(degrade(x, o, mask, 1.0, -0.5, 3, 0.8), _expect(x, o, mask, 1.0, -0.5, 3, 0.8), torch.float32)


def test_all_ones_mask_is_blur_guidance(device):
    x, o, _ = _inputs(1, 3, 10, 11, torch.float32, device, None)
    ones = torch.ones(1, 2, 3, dtype=torch.bool, device=device)
    torch.testing.assert_close(degrade(x, o, ones, 1.0, -0.4, 5, 1.0), degrade(x, o, None, 1.0, -0.4, 5, 1.0),
                               atol=1e-6, rtol=1e-6)


def test_smallest_legal_size_and_one_below(device):
    x, o, mask = _inputs(1, 3, 5, 6, torch.float32, device, (2, 2))  # kernel 9: pad 4, H = 5 is the smallest
    _close(degrade(x, o, mask, 1.0, -0.5), _expect(x, o, mask, 1.0, -0.5), torch.float32)
    x, o, mask = _inputs(1, 3, 7, 4, torch.float32, device, (2, 2))
    with pytest.raises(ValueError, match=r"kernel_size=9.*width=4"):
        degrade(x, o, mask, 1.0, -0.5)
    x, o, mask = _inputs(1, 3, 4, 7, torch.float32, device, (2, 2))
    with pytest.raises(ValueError, match=r"kernel_size=9.*height=4"):
        degrade(x, o, mask, 1.0, -0.5)


@pytest.mark.parametrize("n_in,n_out", [(65, 9), (9, 65), (7, 64), (5, 13), (13, 5), (17, 17), (8, 16),
                                        (3, 100), (100, 3), (37, 111), (64, 64), (96, 128), (48, 200)])
def test_nearest_index_rule_matches_pytorch(n_in, n_out):
    """floor(dst * scale) with scale = fp32(in)/fp32(out), as the kernel computes it, is F.interpolate's."""
    scale = np.float32(dg._nearest_scale(n_in, n_out))
    dst = np.arange(n_out, dtype=np.float32)
    ours = np.minimum(np.floor(dst * scale).astype(np.int64), n_in - 1)
    theirs = F.interpolate(torch.arange(n_in, dtype=torch.float32)[None, None], size=n_out, mode="nearest")
    assert np.array_equal(ours, theirs[0, 0].long().numpy())


def test_mask_upsampling_in_kernel(device):
    """Distinct per-cell influence: blur only where one source cell of the mask is set, for each cell."""
    H, W, h, w = 17, 23, 3, 5
    x, o, _ = _inputs(1, 1, H, W, torch.float32, device, None)
    up = ref.upsample_mask(torch.eye(h * w, dtype=torch.bool).reshape(h * w, h, w), (H, W))
    for cell in (0, 7, 14):
        mask = torch.zeros(1, h, w, dtype=torch.bool, device=device)
        mask.view(-1)[cell] = True
        changed = (degrade(x, o, mask, 1.0, -0.5, 3, 1.0) != x)[0, 0].cpu()
        assert torch.equal(changed, up[cell] & changed) and changed.sum() > 0.5 * up[cell].sum()


@pytest.mark.parametrize("bad,match", [
    (dict(model_output=torch.randn(1, 3, 11, 12)), "model_output"),
    (dict(model_output=torch.randn(1, 3, 12, 12, dtype=torch.float64)), "model_output"),
    (dict(x=torch.randn(3, 12, 12), model_output=torch.randn(3, 12, 12)), "x"),
    (dict(x=torch.randint(0, 3, (1, 3, 12, 12)), model_output=torch.randint(0, 3, (1, 3, 12, 12))), "x"),
    (dict(mask=torch.ones(2, 3, 3, dtype=torch.bool)), "mask"),
    (dict(mask=torch.ones(3, 3, dtype=torch.bool)), "mask"),
    (dict(mask=torch.ones(1, 3, 3, dtype=torch.complex64)), "mask"),
    (dict(c1=torch.ones(2)), "c1"),
    (dict(c2=torch.ones(1, 1)), "c2"),
    (dict(c1=torch.ones(1, dtype=torch.int64)), "c1"),
    (dict(c2="0.5"), "c2"),
    (dict(kernel_size=4), "kernel_size"),
    (dict(kernel_size=0), "kernel_size"),
    (dict(kernel_size=3.0), "kernel_size"),
    (dict(sigma=0.0), "sigma"),
    (dict(sigma=float("nan")), "sigma"),
    (dict(kernel_size=25), "kernel_size=25"),
])
def test_bad_inputs_name_the_argument(bad, match):
    args = dict(x=torch.randn(1, 3, 12, 12), model_output=torch.randn(1, 3, 12, 12),
                mask=torch.ones(1, 3, 3, dtype=torch.bool), c1=1.0, c2=-0.5, kernel_size=9, sigma=1.0)
    args.update(bad)
    with pytest.raises((ValueError, TypeError), match=match):
        degrade(**args)


def test_opcheck():
    x, o, mask = _inputs(2, 3, 9, 10, torch.float32, "cpu", (3, 2))
    torch.library.opcheck(torch.ops.sag_fast.degrade.default,
                          (x, o, mask, torch.rand(2), torch.tensor(-0.5), 3, 1.0))
    torch.library.opcheck(torch.ops.sag_fast.degrade.default, (x, o, None, torch.rand(2), torch.rand(2), 5, 0.9))


def test_compile_fullgraph_no_graph_break():
    x, o, mask = _inputs(1, 3, 10, 11, torch.float32, "cpu", (2, 3))
    c1, c2 = torch.tensor([0.9]), torch.tensor([-0.3])

    def step(x, o, mask, c1, c2):
        return degrade(x * 1.0, o, mask, c1, c2, 5, 1.0) + 0.0

    torch._dynamo.reset()
    y = torch.compile(step, fullgraph=True, backend="aot_eager")(x, o, mask, c1, c2)
    _close(y, _expect(x, o, mask, c1, c2, 5, 1.0), torch.float32)


def test_cpu_torch_path_matches_reference():
    """The non-Triton CPU path (used without the interpreter) against the reference."""
    x, o, mask = _inputs(2, 4, 15, 19, torch.float32, "cpu", (4, 7))
    c1, c2 = torch.rand(2), -torch.rand(2)
    y = dg._degrade_torch(x, o, mask, c1, c2, 9, 1.4)
    _close(y, _expect(x, o, mask, c1, c2, 9, 1.4), torch.float32)
    xl, ol = x.to(memory_format=torch.channels_last), o.to(memory_format=torch.channels_last)
    assert dg._degrade_torch(xl, ol, None, c1, c2, 3, 1.0).is_contiguous(memory_format=torch.channels_last)


# ------------------------------------------------------------------------------ ahead of time
# a contiguous launch passes unit strides as constants (Triton specialises ints equal to 1)
_UNIT = ("sxw", "sow", "syw", "smw", "sc1", "sc2")


def _signature(dtype: str) -> dict:
    sig = {"x_ptr": f"*{dtype}", "o_ptr": f"*{dtype}", "y_ptr": f"*{dtype}", "m_ptr": "*i1",
           "c1_ptr": "*fp32", "c2_ptr": "*fp32"}
    sig.update({n: "i32" for n in ("C", "H", "W", "mh", "mw")})
    sig.update({n: "fp32" for n in ("scale_h", "scale_w", "neg_half_inv_var")})
    sig.update({n: "i32" for n in ("rows_per_prog n_strips n_chunks sxb sxc sxh sxw sob soc soh sow "
                                   "syb syc syh syw smb smh smw sc1 sc2").split()})
    sig.update({n: "constexpr" for n in ("K", "T", "V", "LOG2V", "PP", "LOG2PP", "HAS_MASK", "EVEN_W", "ROW64")
                + _UNIT})
    return sig


@pytest.mark.slow
@pytest.mark.parametrize("arch", [80, 90])
@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_aot_compiles_without_spills(arch, dtype):
    """The blocks the launcher uses for (8, 16, 256, 256): 32 threads x 8 columns, kernel 9, with a mask.

    (Without the runtime's divisibility hints the loads compile as scalars: a conservative spill check.)"""
    from triton_aot import compile_report, spilled_bytes

    T, V, pp, num_warps, *_ = dg._plan(8 * 16, 256, 256, 9, 132, None, None)
    consts = {"K": 9, "T": T, "V": V, "LOG2V": V.bit_length() - 1, "PP": pp, "LOG2PP": pp.bit_length() - 1,
              "HAS_MASK": True, "EVEN_W": True, "ROW64": False, **{n: 1 for n in _UNIT}}
    report = compile_report("sag_fast.ops.degrade:_degrade_kernel", _signature(dtype), consts, arch, num_warps)
    assert spilled_bytes(report) == 0, report


# ------------------------------------------------------------------------------------ GPU only
@pytest.mark.gpu
def test_gpu_bf16_and_large_shapes():
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        x, o, mask = _inputs(8, 16, 256, 256, dtype, "cuda", (16, 16))
        c1, c2 = torch.rand(8, device="cuda") + 0.5, -torch.rand(8, device="cuda")
        _close(degrade(x, o, mask, c1, c2), _expect(x, o, mask, c1, c2), dtype)
    x, o, mask = _inputs(2, 4, 127, 509, torch.float32, "cuda", (13, 61))
    _close(degrade(x, o, mask, 1.0, -0.7, 9, 2.0), _expect(x, o, mask, 1.0, -0.7, 9, 2.0), torch.float32)


@pytest.mark.gpu
def test_gpu_deterministic():
    x, o, mask = _inputs(4, 4, 96, 80, torch.float16, "cuda", (12, 10))
    c1, c2 = torch.rand(4, device="cuda"), -torch.rand(4, device="cuda")
    first = degrade(x, o, mask, c1, c2)
    for _ in range(3):
        assert torch.equal(degrade(x, o, mask, c1, c2), first)


# ------------------------------------------------------------------- the fused C++ CPU kernel
# torch.ops.sag_fast.degrade_cpu is what degrade runs on CPU tensors without the interpreter; these
# tests call it directly, so they check it under TRITON_INTERPRET=1 too.
needs_ext = pytest.mark.skipif(not dg.extension_available(), reason="sag_fast._C is not built")


def _cpp(x, o, mask, c1, c2, k=9, sigma=1.0):
    c1, c2 = (torch.as_tensor(c, dtype=torch.float32) if not isinstance(c, torch.Tensor) else c for c in (c1, c2))
    return torch.ops.sag_fast.degrade_cpu(x, o, mask, c1, c2, k, sigma)


@needs_ext
@pytest.mark.parametrize("B,C,H,W,mask_hw,k,sigma", [
    (1, 3, 17, 23, (3, 5), 9, 1.0),    # grid divides neither H nor W
    (3, 4, 5, 70, (2, 9), 9, 2.3),     # smallest legal height for kernel 9, wide rows (32/8/scalar column blocks)
    (1, 16, 67, 5, None, 3, 0.5),      # blur guidance, narrow rows (scalar tail only)
    (3, 3, 41, 37, (41, 37), 1, 1.0),  # kernel 1: x~ == x; full-resolution mask
    (1, 4, 2, 3, (1, 1), 3, 3.0),      # smallest legal size for kernel 3
    (3, 16, 13, 53, (20, 60), 9, 0.7), # mask finer than the image (nearest downsampling)
    (1, 3, 70, 61, (7, 6), 5, 1.6),    # 3 planes over the threads: row chunks
])
def test_cpp_matches_reference(B, C, H, W, mask_hw, k, sigma):
    x, o, mask = _inputs(B, C, H, W, torch.float32, "cpu", mask_hw)
    c1, c2 = torch.rand(B) + 0.5, -torch.rand(B)
    y = _cpp(x, o, mask, c1, c2, k, sigma)
    _close(y, _expect(x, o, mask, c1, c2, k, sigma), torch.float32)
    assert y.is_contiguous()
    if k == 1:
        assert torch.equal(y, x)


@needs_ext
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_cpp_row_chunks_and_threads(threads):
    """Planes that do not split evenly over the threads are cut into row chunks (halo rows recomputed)."""
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        x, o, mask = _inputs(1, 1, 97, 45, torch.float32, "cpu", (5, 4))
        y = _cpp(x, o, mask, torch.tensor([0.8]), torch.tensor([-0.6]), 9, 1.5)
        _close(y, _expect(x, o, mask, 0.8, -0.6, 9, 1.5), torch.float32)
    finally:
        torch.set_num_threads(before)


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cpp_half_dtypes(dtype):
    x, o, mask = _inputs(3, 4, 19, 43, dtype, "cpu", (4, 6))
    c1, c2 = torch.tensor([1.0, 0.6, 0.9]), torch.tensor([-0.3, -0.8, -0.1])
    _close(_cpp(x, o, mask, c1, c2, 9, 1.2), _expect(x, o, mask, c1, c2, 9, 1.2), dtype)
    xl, ol = x.to(memory_format=torch.channels_last), o.to(memory_format=torch.channels_last)
    y = _cpp(xl, ol, None, c1, c2, 3, 0.8)
    assert y.is_contiguous(memory_format=torch.channels_last)
    _close(y, _expect(x, o, None, c1, c2, 3, 0.8), dtype)


@needs_ext
def test_cpp_strided_inputs_and_coefficients():
    big = torch.randn(3, 5, 23, 40)
    x = big[:, 1:5, 2:21, 3:38:2]  # offset, row and column strides (18 columns)
    o = torch.randn(3, 4, 19, 18).to(memory_format=torch.channels_last)
    mask = (torch.rand(3, 8, 5) > 0.4)[:, ::2, :]  # sliced mask (3, 4, 5)
    c1 = torch.tensor([0.7, 9.0, 0.4, 9.0, 1.1, 9.0], dtype=torch.float64)[::2]  # (B,) fp64, stride 2
    c2 = torch.tensor(-0.35)
    y = _cpp(x, o, mask, c1, c2, 7, 1.1)
    _close(y, _expect(x, o, mask, c1, c2, 7, 1.1), torch.float32)
    xl = torch.randn(2, 3, 11, 16).to(memory_format=torch.channels_last)
    ol = torch.randn(2, 3, 11, 16)
    y = _cpp(xl, ol, None, torch.rand(2), -torch.rand(2).half(), 9, 1.0)
    assert y.is_contiguous(memory_format=torch.channels_last)


@needs_ext
@pytest.mark.parametrize("mask_dtype", [torch.uint8, torch.int64, torch.float32, torch.bfloat16])
def test_cpp_mask_dtypes(mask_dtype):
    x, o, mask = _inputs(2, 3, 12, 9, torch.float32, "cpu", (3, 2), mask_dtype)
    want = _cpp(x, o, mask.bool(), 1.0, -0.5, 3, 0.8)
    assert torch.equal(_cpp(x, o, mask, 1.0, -0.5, 3, 0.8), want)
    _close(want, _expect(x, o, mask, 1.0, -0.5, 3, 0.8), torch.float32)


@needs_ext
def test_cpp_is_the_cpu_branch(monkeypatch):
    """Without the interpreter, degrade on CPU fp32/fp16/bf16 runs the C++ op; fp64 the torch path."""
    monkeypatch.setattr(dg, "use_triton", lambda t: False)
    calls = []
    torch_path = dg._degrade_torch
    monkeypatch.setattr(dg, "_degrade_torch", lambda *a: calls.append(a[0].dtype) or torch_path(*a))
    x, o, mask = _inputs(2, 3, 11, 13, torch.float32, "cpu", (3, 3))
    _close(degrade(x, o, mask, 1.0, -0.4, 5, 1.0), _expect(x, o, mask, 1.0, -0.4, 5, 1.0), torch.float32)
    degrade(x.double(), o.double(), mask, 1.0, -0.4, 5, 1.0)
    assert calls == [torch.float64]


@needs_ext
def test_cpp_opcheck():
    x, o, mask = _inputs(2, 3, 9, 10, torch.float32, "cpu", (3, 2))
    torch.library.opcheck(torch.ops.sag_fast.degrade_cpu.default, (x, o, mask, torch.rand(2), torch.tensor(-0.5), 3, 1.0))
    xh, oh, _ = _inputs(1, 4, 7, 12, torch.bfloat16, "cpu", None)
    torch.library.opcheck(torch.ops.sag_fast.degrade_cpu.default, (xh, oh, None, torch.rand(1), torch.rand(1), 5, 0.9))


@needs_ext
@pytest.mark.parametrize("bad,match", [
    (dict(x=torch.randn(1, 3, 12, 12, dtype=torch.float64), model_output=torch.randn(1, 3, 12, 12, dtype=torch.float64)), "x must be"),
    (dict(x=torch.randn(3, 12, 12), model_output=torch.randn(3, 12, 12)), "x must be"),
    (dict(model_output=torch.randn(1, 3, 11, 12)), "model_output"),
    (dict(model_output=torch.randn(1, 3, 12, 12).half()), "model_output"),
    (dict(mask=torch.ones(2, 3, 3, dtype=torch.bool)), "mask"),
    (dict(mask=torch.ones(1, 3, 0, dtype=torch.bool)), "mask"),
    (dict(mask=torch.ones(1, 3, 3, dtype=torch.complex64)), "mask"),
    (dict(c1=torch.ones(2)), "c1"),
    (dict(c2=torch.ones(1, dtype=torch.int64)), "c2"),
    (dict(kernel_size=4), "kernel_size"),
    (dict(kernel_size=25), "kernel_size=25.*height=12"),
    (dict(sigma=0.0), "sigma"),
    (dict(sigma=float("inf")), "sigma"),
])
def test_cpp_bad_inputs_name_the_argument(bad, match):
    args = dict(x=torch.randn(1, 3, 12, 12), model_output=torch.randn(1, 3, 12, 12),
                mask=torch.ones(1, 3, 3, dtype=torch.bool), c1=torch.tensor(1.0), c2=torch.tensor(-0.5),
                kernel_size=9, sigma=1.0)
    args.update(bad)
    with pytest.raises(ValueError, match=match):
        torch.ops.sag_fast.degrade_cpu(*args.values())
