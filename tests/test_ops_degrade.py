"""The op sag_fast::degrade against sag_fast.reference.degrade (float64) on small odd/prime shapes.

Two kernels behind one op: `impl="op"` calls `degrade()`, i.e. the op as the dispatcher routes it (the C++
kernel for CPU tensors, the Triton kernel on a GPU); `impl="triton"` calls the Triton kernel itself
(`degrade_triton`), on CPU tensors under TRITON_INTERPRET=1 or on the GPU. Tolerances: fp32 1e-5 absolute
(values O(1), fp32 math), fp16 one fp16 ulp of |x~| plus 2e-3 (inputs rounded to fp16 first, so the
reference sees the same inputs), fp64 1e-12 (the fp64 path of the C++ kernel).
"""
from __future__ import annotations


import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode

from sag_fast import _profiling
from sag_fast import reference as ref
from sag_fast.ops import _dispatch
from sag_fast.ops.testing import triton_on_cpu
from sag_fast.ops import degrade as dg
from sag_fast.ops.degrade import degrade, degrade_triton

from conftest import HAS_CUDA, INTERPRETED
from triton_aot import functionalised_targets

pytestmark = pytest.mark.skipif(not dg.extension_available(), reason="sag_fast._C is not built")
TRITON_RUNS = INTERPRETED or HAS_CUDA
IMPLS = ["op", pytest.param("triton", marks=pytest.mark.skipif(
    not TRITON_RUNS, reason="the Triton kernel needs a GPU or TRITON_INTERPRET=1"))]


def run(impl, *args, **kwargs):
    """degrade() (the op, dispatched) or the Triton kernel directly, with degrade()'s float coefficients."""
    if impl == "op":
        return degrade(*args, **kwargs)
    x = args[0]
    args = [dg._as_coefficient(a, x) if i in (3, 4) else a for i, a in enumerate(args)]
    return degrade_triton(*args, **kwargs)

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
@pytest.mark.parametrize("impl", IMPLS)
def test_matches_reference_fp32(device, impl, B, C, H, W, mask_hw, k, sigma):
    x, o, mask = _inputs(B, C, H, W, torch.float32, device, mask_hw)
    c1, c2 = torch.rand(B, device=device) + 0.5, -torch.rand(B, device=device)
    y = run(impl, x, o, mask, c1, c2, k, sigma)
    _close(y, _expect(x, o, mask, c1, c2, k, sigma), torch.float32)
    if k == 1:
        assert torch.equal(y, x)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_dtypes(device, impl, dtype):
    x, o, mask = _inputs(2, 3, 14, 17, dtype, device, (5, 4))
    c1, c2 = torch.tensor([1.0, 0.6], device=device), torch.tensor([-0.3, -0.8], device=device)
    _close(run(impl, x, o, mask, c1, c2), _expect(x, o, mask, c1, c2), dtype)


def test_fp64_on_cpu_computes_in_fp64():
    """The C++ kernel's fp64 path: within 1e-12 of the fp64 reference (an fp32 computation misses by ~1e-7)."""
    x, o, mask = _inputs(3, 2, 11, 12, torch.float64, "cpu", (4, 3))
    c1 = torch.tensor([0.8, 0.3, 1.1], dtype=torch.float64)
    c2 = torch.tensor(-0.5, dtype=torch.float64)
    y = degrade(x, o, mask, c1, c2, 5, 1.3)
    _close(y, _expect(x, o, mask, c1, c2, 5, 1.3), torch.float64)
    xl = x.to(memory_format=torch.channels_last)
    assert degrade(xl, o, None, c1, c2, 3, 1.0).is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("W,k,block_w,rows", [
    (37, 9, 16, 10),   # odd width: reflected gathers, 3 strips of 2 threads
    (37, 3, 16, 2),
    (24, 9, 8, 10),    # W % 8 == 0: edge mirroring in registers, one thread per strip (3 strips)
    (32, 15, 16, 2),   # widest kernel with mirroring (P = 7 < 8), first and last thread in different strips
    (24, 17, 8, 19),   # P = 8: too wide to mirror from the centre chunk, gathers
])
@pytest.mark.skipif(not TRITON_RUNS, reason="the Triton kernel needs a GPU or TRITON_INTERPRET=1")
def test_strips_and_row_chunks(device, W, k, block_w, rows):
    """Several column strips and row chunks per plane (the default plan uses one on tiny images)."""
    x, o, mask = _inputs(1, 2, 23, W, torch.float32, device, (5, 7))
    c1, c2 = torch.tensor([0.9], device=device), torch.tensor([-0.4], device=device)
    y = degrade_triton(x, o, mask, c1, c2, k, 1.2, block_w=block_w, rows=rows)
    _close(y, _expect(x, o, mask, c1, c2, k, 1.2), torch.float32)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("W", [8, 40])
def test_even_width_mirroring(device, impl, W):
    """W % 8 == 0 (the edge-mirroring path): W = 8 is one thread holding both edges, kernel 9."""
    x, o, mask = _inputs(2, 3, 11, W, torch.float16, device, (3, 3))
    c1, c2 = torch.tensor([1.0, 0.7], device=device), torch.tensor([-0.3, -0.9], device=device)
    _close(run(impl, x, o, mask, c1, c2), _expect(x, o, mask, c1, c2), torch.float16)
    x, o, _ = _inputs(1, 2, 9, W, torch.float32, device, None)
    _close(run(impl, x, o, None, 0.8, -0.6, 7, 0.9), _expect(x, o, None, 0.8, -0.6, 7, 0.9), torch.float32)


@pytest.mark.parametrize("impl", IMPLS)
def test_channels_last_and_sliced(device, impl):
    big = torch.randn(2, 4, 21, 30, device=device)
    x = big[:, :, 2:19, 3:28:2]  # non-contiguous: offset, row and column strides
    o = torch.randn(2, 4, 17, 13, device=device).to(memory_format=torch.channels_last)
    mask = (torch.rand(2, 6, 4, device=device) > 0.4)[:, ::2, :]  # sliced mask (3, 4)
    c1, c2 = torch.rand(2, device=device), -torch.rand(2, device=device)
    y = run(impl, x, o, mask, c1, c2, 7, 1.1)
    _close(y, _expect(x, o, mask, c1, c2, 7, 1.1), torch.float32)

    xl = torch.randn(2, 3, 11, 16, device=device).to(memory_format=torch.channels_last)
    ol = torch.randn(2, 3, 11, 16, device=device).to(memory_format=torch.channels_last)
    y = run(impl, xl, ol, None, c1, c2, 9, 1.0)
    assert y.is_contiguous(memory_format=torch.channels_last)
    _close(y, _expect(xl, ol, None, c1, c2), torch.float32)


@pytest.mark.parametrize("impl", IMPLS)
def test_coefficient_forms(device, impl):
    x, o, mask = _inputs(3, 3, 10, 9, torch.float32, device, (2, 3))
    want = _expect(x, o, mask, 0.7, -0.2, 3, 1.0)
    for c1, c2 in ((0.7, -0.2),
                   (torch.tensor(0.7, device=device), torch.tensor(-0.2, device=device)),
                   (torch.full((3,), 0.7, device=device), torch.full((3,), -0.2, device=device, dtype=torch.float64))):
        _close(run(impl, x, o, mask, c1, c2, 3, 1.0), want, torch.float32)
    strided = torch.tensor([0.7, 9.0, 0.7, 9.0, 0.7, 9.0], device=device)[::2]  # (B,) with stride 2
    _close(run(impl, x, o, mask, strided, -0.2, 3, 1.0), want, torch.float32)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mask_dtype", [torch.uint8, torch.int64, torch.float32, torch.bfloat16])
def test_mask_dtypes(device, impl, mask_dtype):
    """Any nonzero mask value blurs: a mask with values 0/3 (0/0.25 for float) gives the bool mask's result."""
    x, o, mask = _inputs(2, 3, 12, 9, torch.float32, device, (3, 2))
    scaled = mask.to(mask_dtype) * (3 if not mask_dtype.is_floating_point else 0.25)
    _close(run(impl, x, o, scaled, 1.0, -0.5, 3, 0.8), _expect(x, o, mask, 1.0, -0.5, 3, 0.8), torch.float32)


@pytest.mark.parametrize("impl", IMPLS)
def test_all_ones_mask_is_blur_guidance(device, impl):
    """An all-ones mask equals blur guidance (mask=None), and both equal the reference's full blur."""
    x, o, _ = _inputs(1, 3, 10, 11, torch.float32, device, None)
    ones = torch.ones(1, 2, 3, dtype=torch.bool, device=device)
    _close(run(impl, x, o, ones, 1.0, -0.4, 5, 1.0), _expect(x, o, None, 1.0, -0.4, 5, 1.0), torch.float32)
    _close(run(impl, x, o, None, 1.0, -0.4, 5, 1.0), _expect(x, o, None, 1.0, -0.4, 5, 1.0), torch.float32)


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


@pytest.mark.parametrize("impl", IMPLS)
def test_nearest_rule_is_pytorchs_fp32_one(device, impl):
    """82 rows and columns from a 2 x 2 mask: fp32(2/82) * 41 rounds below 1, so row and column 41 still read
    mask cell 0 (PyTorch's rule); the exact quotient 41*2/82 = 1 would read cell 1 and leave them unblurred."""
    x, o, _ = _inputs(1, 1, 82, 82, torch.float32, device, None)
    mask = torch.tensor([[[True, False], [False, False]]], device=device)
    y = run(impl, x, o, mask, 1.0, -0.5, 3, 1.0)
    _close(y, _expect(x, o, mask, 1.0, -0.5, 3, 1.0), torch.float32)
    changed = (y != x)[0, 0].cpu()
    assert changed[41, :41].any() and changed[:41, 41].any() and not changed[42:, :].any()


@pytest.mark.parametrize("impl", IMPLS)
def test_mask_upsampling_in_kernel(device, impl):
    """Distinct per-cell influence: blur only where one source cell of the mask is set, for each cell."""
    H, W, h, w = 17, 23, 3, 5
    x, o, _ = _inputs(1, 1, H, W, torch.float32, device, None)
    up = ref.upsample_mask(torch.eye(h * w, dtype=torch.bool).reshape(h * w, h, w), (H, W))
    for cell in (0, 7, 14):
        mask = torch.zeros(1, h, w, dtype=torch.bool, device=device)
        mask.view(-1)[cell] = True
        changed = (run(impl, x, o, mask, 1.0, -0.5, 3, 1.0) != x)[0, 0].cpu()
        assert torch.equal(changed, up[cell] & changed) and changed.sum() > 0.5 * up[cell].sum()


_BAD = [
    (dict(model_output=torch.randn(1, 3, 11, 12)), "model_output"),
    (dict(model_output=torch.randn(1, 3, 12, 12, dtype=torch.float64)), "model_output"),
    (dict(x=torch.randn(3, 12, 12), model_output=torch.randn(3, 12, 12)), "x must be"),
    (dict(x=torch.randint(0, 3, (1, 3, 12, 12)), model_output=torch.randint(0, 3, (1, 3, 12, 12))), "x must be"),
    (dict(mask=torch.ones(2, 3, 3, dtype=torch.bool)), "mask"),
    (dict(mask=torch.ones(3, 3, dtype=torch.bool)), "mask"),
    (dict(mask=torch.ones(1, 3, 0, dtype=torch.bool)), "mask"),
    (dict(mask=torch.ones(1, 3, 3, dtype=torch.complex64)), "mask"),
    (dict(c1=torch.ones(2)), "c1"),
    (dict(c2=torch.ones(1, 1)), "c2"),
    (dict(c1=torch.ones(1, dtype=torch.int64)), "c1"),
    (dict(kernel_size=4), "kernel_size"),
    (dict(kernel_size=0), "kernel_size"),
    (dict(sigma=0.0), "sigma"),
    (dict(sigma=float("nan")), "sigma"),
    (dict(sigma=float("inf")), "sigma"),
    (dict(kernel_size=25), "kernel_size=25.*height=12"),
]


def _args(bad, device="cpu"):
    args = dict(x=torch.randn(1, 3, 12, 12), model_output=torch.randn(1, 3, 12, 12),
                mask=torch.ones(1, 3, 3, dtype=torch.bool), c1=torch.tensor(1.0), c2=torch.tensor(-0.5),
                kernel_size=9, sigma=1.0)
    args.update(bad)
    if device == "cpu" and not torch._guards.detect_fake_mode():
        return args
    # (under FakeTensorMode: CUDA tensors of the same shapes and dtypes)
    return {k: torch.empty(v.shape, dtype=v.dtype, device=device) if isinstance(v, torch.Tensor) else v
            for k, v in args.items()}


@pytest.mark.parametrize("bad,match", _BAD)
def test_bad_inputs_name_the_argument(bad, match):
    """degrade() and the op on CPU tensors: the C++ kernel's checks."""
    with pytest.raises((ValueError, TypeError), match=match):
        degrade(**_args(bad))
    with pytest.raises(ValueError, match=match):
        torch.ops.sag_fast.degrade(*_args(bad).values())


@pytest.mark.parametrize("bad,match", _BAD)
def test_bad_inputs_name_the_argument_cuda_fake(bad, match):
    """The same table on CUDA tensors, as FakeTensors: the checks of the fake (those of the Triton kernel)."""
    with FakeTensorMode():
        args = _args(bad, "cuda")
        with pytest.raises(ValueError, match=match):
            torch.ops.sag_fast.degrade(*args.values())


@pytest.mark.parametrize("bad,match", [(dict(c2="0.5"), "c2"), (dict(kernel_size=3.0), "kernel_size"),
                                       (dict(kernel_size=True), "kernel_size"), (dict(sigma="1"), "sigma"),
                                       (dict(mask=[[1]]), "mask")])
def test_bad_python_arguments(bad, match):
    with pytest.raises((ValueError, TypeError), match=match):
        degrade(**_args(bad))


def test_float64_cuda_is_refused_naming_x():
    with FakeTensorMode():
        x = torch.empty(1, 3, 12, 12, dtype=torch.float64, device="cuda")
        with pytest.raises(ValueError, match=r"x must be one of .*float64 only on CPU"):
            torch.ops.sag_fast.degrade(x, x, None, torch.ones(1, device="cuda"), torch.ones(1, device="cuda"), 3, 1.0)


# the arguments that must sit on x's device, and the error that names them
_MOVED = ["model_output", "mask", "c1", "c2"]


@pytest.mark.parametrize("moved", _MOVED)
@pytest.mark.parametrize("x_device,other", [("cuda:0", "cpu"), ("cpu", "cuda:0"), ("cuda:0", "cuda:1")])
def test_mixed_devices_name_both_arguments(moved, x_device, other):
    """e.g. c1 on the CPU while x is on the GPU (a scheduler whose timesteps stay on the CPU): refused by the
    fake (FakeTensorMode makes CUDA tensors without a GPU), whichever of the two devices the dispatcher picks."""
    with FakeTensorMode():
        args = _args({}, x_device)
        args[moved] = torch.empty(args[moved].shape, dtype=args[moved].dtype, device=other)
        want = f"{moved} is on {torch.device(other)} but x is on {torch.device(x_device)}"
        with pytest.raises(ValueError, match=want.replace("(", r"\(")):
            torch.ops.sag_fast.degrade(*args.values())


@pytest.mark.parametrize("moved", _MOVED)
def test_mixed_devices_on_real_tensors(moved):
    """On real tensors: meta for the moved argument (a second device this machine has) against CPU x."""
    args = _args({})
    args[moved] = args[moved].to("meta")
    with pytest.raises(ValueError, match=f"{moved} is on meta but x is on cpu"):
        degrade(**args)


def test_device_guard_makes_the_tensor_device_current():
    """A launch for a tensor on cuda:1 runs under cuda:1 (the current device may be cuda:0)."""
    with FakeTensorMode():
        t1 = torch.empty(2, device="cuda:1")
        t0 = torch.empty(2, device="cuda")
    guard = _dispatch.device_guard(t1)
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1
    assert _dispatch.device_guard(t0).idx == 0
    assert not isinstance(_dispatch.device_guard(torch.empty(2)), torch.cuda.device)


def test_eager_call_dispatches_exactly_one_op():
    x, o, mask = _inputs(2, 3, 9, 10, torch.float32, "cpu", (3, 2))
    c1, c2 = torch.rand(2), torch.tensor(-0.5)
    y, counts = _profiling.count_dispatched_ops(lambda: degrade(x, o, mask, c1, c2, 3, 1.0))
    assert counts == {"sag_fast.degrade": 1}
    _close(y, _expect(x, o, mask, c1, c2, 3, 1.0), torch.float32)


def test_dispatch_table_one_kernel_per_device():
    """CPU: the C++ kernel (csrc/degrade_cpu.cpp); CUDA: the Triton kernel registered from Python; a fake."""
    table = torch._C._dispatch_dump_table("sag_fast::degrade")
    rows = {line.split(":")[0].strip(): line for line in table.splitlines() if ":" in line}
    assert "degrade_cpu.cpp" in rows["CPU"]
    assert "kernel" in rows["CUDA"] and "fallthrough" not in rows["CUDA"]
    assert torch._library.simple_registry.singleton.find("sag_fast::degrade").fake_impl.kernel is not None


def test_opcheck_cpu_kernel():
    x, o, mask = _inputs(2, 3, 9, 10, torch.float32, "cpu", (3, 2))
    torch.library.opcheck(torch.ops.sag_fast.degrade.default, (x, o, mask, torch.rand(2), torch.tensor(-0.5), 3, 1.0))
    xh, oh, _ = _inputs(1, 4, 7, 12, torch.bfloat16, "cpu", None)
    torch.library.opcheck(torch.ops.sag_fast.degrade.default, (xh, oh, None, torch.rand(1), torch.rand(1), 5, 0.9))
    xd, od, maskd = _inputs(2, 2, 8, 9, torch.float64, "cpu", (2, 3))
    torch.library.opcheck(torch.ops.sag_fast.degrade.default, (xd, od, maskd, torch.rand(2), torch.rand(2), 3, 1.5))


@pytest.mark.skipif(not INTERPRETED, reason="runs the Triton kernel on CPU tensors: TRITON_INTERPRET=1")
@pytest.mark.parametrize("latents", ["image", "video"])
def test_opcheck_triton_kernel_interpreted(latents):
    """opcheck of the op with its CPU kernel swapped for the Triton one (interpreted) for the duration; image
    (B, C, H, W) and video (B, C, F, H, W) latents."""
    if latents == "image":
        x, o, mask = _inputs(2, 3, 9, 10, torch.float32, "cpu", (3, 2))
    else:
        x, o, mask = _video(2, 1, 3, 9, 10, torch.float32, "cpu", (2, 3, 2))
    c1, c2 = torch.rand(2), torch.tensor(-0.5)
    with triton_on_cpu():
        y, counts = _profiling.count_dispatched_ops(lambda: degrade(x, o, mask, c1, c2, 3, 1.0))
        torch.library.opcheck(torch.ops.sag_fast.degrade.default, (x, o, mask, c1, c2, 3, 1.0))
    assert counts == {"sag_fast.degrade": 1}
    _close(y, _expect(x, o, mask, c1, c2, 3, 1.0), torch.float32)
    assert "degrade_cpu.cpp" in torch._C._dispatch_dump_table("sag_fast::degrade").split("CPU:")[1].splitlines()[0]


def test_compile_fullgraph_no_graph_break():
    x, o, mask = _inputs(1, 3, 10, 11, torch.float32, "cpu", (2, 3))
    c1, c2 = torch.tensor([0.9]), torch.tensor([-0.3])

    def step(x, o, mask, c1, c2):
        return degrade(x * 1.0, o, mask, c1, c2, 5, 1.0) + 0.0

    torch._dynamo.reset()
    y = torch.compile(step, fullgraph=True, backend="aot_eager")(x, o, mask, c1, c2)
    _close(y, _expect(x, o, mask, c1, c2, 5, 1.0), torch.float32)


_TRACE = """
import torch, sag_fast
from torch._subclasses.fake_tensor import FakeTensorMode
from torch._subclasses.functional_tensor import dispatch_functionalize
from torch.fx.experimental.proxy_tensor import make_fx
from sag_fast.ops.degrade import degrade

def f(x, o, m, c1, c2):
    return degrade(x, o, m, c1, c2, 5, 1.0)

for name, device, frames in (("cuda", "cuda", ()), ("cpu", "cpu", ()), ("cuda-video", "cuda", (5,))):
    with FakeTensorMode():
        x = torch.empty(2, 3, *frames, 16, 24, device=device)
        args = (x, torch.empty_like(x), torch.empty(2, *(f - 2 for f in frames), 4, 6, dtype=torch.bool, device=device),
                torch.empty(2, device=device), torch.empty(2, device=device))
    gm = make_fx(dispatch_functionalize(f), tracing_mode="fake")(*args)
    print(name, sorted({str(n.target) for n in gm.graph.nodes if n.op == "call_function"}))
"""


def test_compile_sees_the_triton_kernel_on_cuda():
    """Functionalised (what torch.compile's AOT step does), a CUDA call is the Triton kernel itself, which
    Inductor compiles with the graph; a CPU call stays the op. Traced with fake CUDA tensors in a process
    without TRITON_INTERPRET (interpreted kernels cannot be traced)."""
    lines = functionalised_targets(_TRACE)
    assert "triton_kernel_wrapper_functional" in lines["cuda"] and "sag_fast.degrade" not in lines["cuda"]
    assert "sag_fast.degrade.default" in lines["cpu"] and "triton" not in lines["cpu"]
    assert "triton_kernel_wrapper_functional" in lines["cuda-video"] and "sag_fast.degrade" not in lines["cuda-video"]


# ------------------------------------------------------------------------------ ahead of time
# a contiguous launch passes unit strides as constants (Triton specialises ints equal to 1)
_UNIT = ("sxw", "sow", "syw", "smw", "sc1", "sc2")


def _signature(dtype: str) -> dict:
    sig = {"x_ptr": f"*{dtype}", "o_ptr": f"*{dtype}", "y_ptr": f"*{dtype}", "m_ptr": "*i1",
           "c1_ptr": "*fp32", "c2_ptr": "*fp32"}
    sig.update({n: "i32" for n in ("C", "H", "W", "mh", "mw")})
    sig.update({n: "fp32" for n in ("scale_h", "scale_w", "neg_half_inv_var")})
    sig.update({n: "i32" for n in ("rows_per_prog n_strips n_chunks sxb sxc sxh sxw sob soc soh sow "
                                   "syb syc syh syw smb smh smw sc1 sc2 NF mf").split()})
    sig.update({"scale_f": "fp32", **{n: "i32" for n in ("sxf", "sof", "syf", "smf")}})
    sig.update({n: "constexpr" for n in ("K", "T", "V", "LOG2V", "PP", "LOG2PP", "HAS_MASK", "EVEN_W", "ROW64",
                                         "VIDEO") + _UNIT})
    return sig


@pytest.mark.slow
@pytest.mark.parametrize("video", [False, True], ids=["image", "video"])
@pytest.mark.parametrize("arch", [80, 90])
@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_aot_compiles_without_spills(arch, dtype, video):
    """The blocks the launcher uses for (8, 16, 256, 256): 32 threads x 8 columns, kernel 9, with a mask; video:
    the same planes as (1, 16, 8, 256, 256) frames (frame strides and the mask's frame index).

    (Without the runtime's divisibility hints the loads compile as scalars: a conservative spill check.)"""
    from triton_aot import compile_report, spilled_bytes

    T, V, pp, num_warps, *_ = dg._plan(8 * 16, 256, 256, 9, 132, None, None)
    consts = {"K": 9, "T": T, "V": V, "LOG2V": V.bit_length() - 1, "PP": pp, "LOG2PP": pp.bit_length() - 1,
              "HAS_MASK": True, "EVEN_W": True, "ROW64": False, "VIDEO": video, **{n: 1 for n in _UNIT}}
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
def test_gpu_runs_on_the_current_stream():
    """On a side stream, x is written after a long sleep: a launch on the default stream (or any other) would
    read x before the write lands and differ from the reference."""
    x, o, mask = _inputs(4, 4, 64, 64, torch.float32, "cuda", (8, 8))
    c1, c2 = torch.rand(4, device="cuda"), -torch.rand(4, device="cuda")
    fresh = torch.randn_like(x)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        torch.cuda._sleep(50_000_000)
        x.copy_(fresh)
        y = degrade(x, o, mask, c1, c2)
    torch.cuda.synchronize()
    _close(y, _expect(fresh, o, mask, c1, c2), torch.float32)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_gpu_tensor_on_another_device_than_the_current_one():
    x, o, mask = _inputs(2, 3, 32, 40, torch.float16, "cuda:1", (4, 5))
    c1, c2 = torch.rand(2, device="cuda:1"), -torch.rand(2, device="cuda:1")
    with torch.cuda.device(0):
        y = degrade(x, o, mask, c1, c2)
    assert y.device == torch.device("cuda:1")
    _close(y, _expect(x, o, mask, c1, c2), torch.float16)


@pytest.mark.gpu
def test_gpu_inductor_compiles_the_triton_kernel_into_the_graph():
    x, o, mask = _inputs(2, 4, 32, 48, torch.float16, "cuda", (4, 6))
    c1, c2 = torch.rand(2, device="cuda"), -torch.rand(2, device="cuda")
    torch._dynamo.reset()
    from torch._inductor.utils import run_and_get_code
    y, code = run_and_get_code(torch.compile(lambda *a: degrade(*a) * 2, fullgraph=True), x, o, mask, c1, c2)
    assert "_degrade_kernel" in "\n".join(code)
    _close(y / 2, _expect(x, o, mask, c1, c2), torch.float16)


@pytest.mark.gpu
def test_gpu_deterministic():
    x, o, mask = _inputs(4, 4, 96, 80, torch.float16, "cuda", (12, 10))
    c1, c2 = torch.rand(4, device="cuda"), -torch.rand(4, device="cuda")
    first = degrade(x, o, mask, c1, c2)
    for _ in range(3):
        assert torch.equal(degrade(x, o, mask, c1, c2), first)


# ------------------------------------------------------------------- the fused C++ CPU kernel
# What sag_fast::degrade runs on CPU tensors: sizes that exercise its column blocks, row chunks and threads.


def _cpp(x, o, mask, c1, c2, k=9, sigma=1.0):
    c1, c2 = (torch.as_tensor(c, dtype=torch.float32) if not isinstance(c, torch.Tensor) else c for c in (c1, c2))
    return torch.ops.sag_fast.degrade(x, o, mask, c1, c2, k, sigma)


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


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cpp_half_dtypes(dtype):
    x, o, mask = _inputs(3, 4, 19, 43, dtype, "cpu", (4, 6))
    c1, c2 = torch.tensor([1.0, 0.6, 0.9]), torch.tensor([-0.3, -0.8, -0.1])
    _close(_cpp(x, o, mask, c1, c2, 9, 1.2), _expect(x, o, mask, c1, c2, 9, 1.2), dtype)
    xl, ol = x.to(memory_format=torch.channels_last), o.to(memory_format=torch.channels_last)
    y = _cpp(xl, ol, None, c1, c2, 3, 0.8)
    assert y.is_contiguous(memory_format=torch.channels_last)
    _close(y, _expect(x, o, None, c1, c2, 3, 0.8), dtype)


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


# ------------------------------------------------------------------------- video (B, C, F, H, W)
# Each (b, c, frame) is a plane of the 2-D blur (frames do not mix); the (B, f, h, w) mask is nearest-upsampled
# to (F, H, W) with PyTorch's fp32 rule on each axis.


def _video(B, C, F, H, W, dtype, device, mask_fhw=(3, 3, 5)):
    x = torch.randn(B, C, F, H, W, device=device).to(dtype)
    o = torch.randn(B, C, F, H, W, device=device).to(dtype)
    mask = None if mask_fhw is None else torch.rand(B, *mask_fhw, device=device) > 0.5
    return x, o, mask


@pytest.mark.parametrize("B,C,F,H,W,mask_fhw,k,sigma", [
    (2, 3, 1, 11, 13, (1, 3, 4), 5, 1.2),    # one frame
    (1, 2, 5, 9, 14, (3, 3, 7), 9, 1.0),     # odd frame count, non-square, grid divides nothing
    (1, 2, 3, 12, 8, (5, 6, 4), 3, 0.8),     # more mask frames than latent frames; W % 8 == 0 (mirroring)
    (1, 2, 7, 10, 16, None, 7, 1.5),         # blur guidance
])
@pytest.mark.parametrize("impl", IMPLS)
def test_video_matches_reference_fp32(device, impl, B, C, F, H, W, mask_fhw, k, sigma):
    x, o, mask = _video(B, C, F, H, W, torch.float32, device, mask_fhw)
    c1, c2 = torch.rand(B, device=device) + 0.5, -torch.rand(B, device=device)
    _close(run(impl, x, o, mask, c1, c2, k, sigma), _expect(x, o, mask, c1, c2, k, sigma), torch.float32)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16])
def test_video_cpp_other_dtypes(dtype):
    """The C++ kernel's fp64 path (ATen ops, per frame) within 1e-12, and its fp32-math path on fp16."""
    x, o, mask = _video(2, 3, 5, 10, 11, dtype, "cpu", (2, 4, 3))
    c1, c2 = torch.tensor([0.8, 1.1], dtype=torch.float64), torch.tensor(-0.45)
    _close(_cpp(x, o, mask, c1, c2, 5, 1.3), _expect(x, o, mask, c1, c2, 5, 1.3), dtype)


@pytest.mark.parametrize("impl", IMPLS)
def test_video_non_contiguous_inputs(device, impl):
    """Frames through strides, no copy: x frame-major (B, F, C, H, W) permuted, o every other frame of a longer
    clip, a transposed mask; the result keeps x's (dense) layout."""
    B, C, F, H, W = 2, 2, 3, 9, 12
    x = torch.randn(B, F, C, H, W, device=device).transpose(1, 2)
    o = torch.randn(B, C, 2 * F, H, W + 3, device=device)[:, :, ::2, :, 1:W + 1]
    mask = (torch.rand(B, 2, 5, 3, device=device) > 0.5).transpose(2, 3)  # (B, 2, 3, 5)
    c1, c2 = torch.rand(B, device=device) + 0.5, -torch.rand(B, device=device)
    y = run(impl, x, o, mask, c1, c2, 7, 1.1)
    assert y.stride() == x.stride()
    _close(y, _expect(x, o, mask, c1, c2, 7, 1.1), torch.float32)


@pytest.mark.parametrize("impl", IMPLS)
def test_video_frames_do_not_mix(device, impl):
    """Changing one frame of x and model_output changes that frame of the result only (no temporal blur)."""
    x, o, _ = _video(1, 2, 4, 9, 10, torch.float32, device, None)
    y = run(impl, x, o, None, 1.0, -0.5, 5, 1.0)
    x2, o2 = x.clone(), o.clone()
    x2[:, :, 2] += 1.0
    o2[:, :, 2] -= 0.5
    changed = (run(impl, x2, o2, None, 1.0, -0.5, 5, 1.0) != y).flatten(3).any(-1)[0].cpu()  # (C, F)
    assert changed[:, 2].all() and not changed[:, [0, 1, 3]].any()


@pytest.mark.parametrize("impl", IMPLS)
def test_video_mask_frames_follow_the_nearest_rule(device, impl):
    """3 mask frames over 7 latent frames: frame d reads mask frame floor(d * 3/7) = 0 0 0 1 1 2 2 (worked out
    by hand). Only mask frame 1 set: latent frames 3 and 4 are blurred, every other frame is exactly x."""
    x, o, _ = _video(1, 2, 7, 8, 9, torch.float32, device, None)
    mask = torch.zeros(1, 3, 2, 2, dtype=torch.bool, device=device)
    mask[:, 1] = True
    changed = (run(impl, x, o, mask, 1.0, -0.5, 3, 1.0) != x).flatten(3).any(-1).any(1)[0].cpu()
    assert changed.tolist() == [False, False, False, True, True, False, False]


def test_video_eager_call_dispatches_exactly_one_op():
    x, o, mask = _video(2, 3, 3, 9, 10, torch.float32, "cpu", (2, 3, 2))
    c1, c2 = torch.rand(2), torch.tensor(-0.5)
    y, counts = _profiling.count_dispatched_ops(lambda: degrade(x, o, mask, c1, c2, 3, 1.0))
    assert counts == {"sag_fast.degrade": 1}
    _close(y, _expect(x, o, mask, c1, c2, 3, 1.0), torch.float32)


def test_video_opcheck_cpu_kernel():
    x, o, mask = _video(2, 2, 3, 9, 10, torch.float32, "cpu", (2, 3, 2))
    torch.library.opcheck(torch.ops.sag_fast.degrade.default, (x, o, mask, torch.rand(2), torch.tensor(-0.5), 3, 1.0))
    xd, od, _ = _video(1, 2, 2, 8, 9, torch.float64, "cpu", None)
    torch.library.opcheck(torch.ops.sag_fast.degrade.default, (xd, od, None, torch.rand(1), torch.rand(1), 5, 1.5))




def test_video_fake_cuda_keeps_x_layout():
    with FakeTensorMode():
        x = torch.empty(2, 5, 3, 16, 24, device="cuda").transpose(1, 2)  # (B, C, F, H, W), frame-major
        y = torch.ops.sag_fast.degrade(x, torch.empty_like(x), torch.empty(2, 2, 4, 6, dtype=torch.bool, device="cuda"),
                                       torch.empty(2, device="cuda"), torch.empty(2, device="cuda"), 5, 1.0)
    assert y.shape == x.shape and y.stride() == x.stride() and y.device.type == "cuda"


def _video_args(bad, device="cpu"):
    args = dict(x=torch.randn(1, 3, 4, 12, 12), model_output=torch.randn(1, 3, 4, 12, 12),
                mask=torch.ones(1, 2, 3, 3, dtype=torch.bool), c1=torch.tensor(1.0), c2=torch.tensor(-0.5),
                kernel_size=9, sigma=1.0)
    args.update(bad)
    if device == "cpu":
        return args
    return {k: torch.empty(v.shape, dtype=v.dtype, device=device) if isinstance(v, torch.Tensor) else v
            for k, v in args.items()}


_BAD_VIDEO = [
    (dict(mask=torch.ones(1, 3, 3, dtype=torch.bool)), r"mask must be \(B=1, f, h, w\).*got \[?\(?1, 3, 3"),
    (dict(mask=torch.ones(2, 2, 3, 3, dtype=torch.bool)), r"mask must be \(B=1, f, h, w\)"),
    (dict(mask=torch.ones(1, 0, 3, 3, dtype=torch.bool)), r"mask must be \(B=1, f, h, w\) with f, h, w >= 1"),
    (dict(model_output=torch.randn(1, 3, 5, 12, 12)), "model_output must have x's shape"),
    (dict(x=torch.randn(1, 3, 4, 12, 12, 1), model_output=torch.randn(1, 3, 4, 12, 12, 1)),
     r"x must be .*\(B, C, F, H, W\)"),
    (dict(c1=torch.ones(4)), "c1"),
    (dict(kernel_size=25), "kernel_size=25.*height=12"),
]


@pytest.mark.parametrize("bad,match", _BAD_VIDEO)
def test_video_bad_inputs_name_the_argument(bad, match):
    """5-D x: the C++ kernel's checks (CPU) and the fake's (those of the Triton kernel, on fake CUDA tensors)."""
    with pytest.raises(ValueError, match=match):
        degrade(**_video_args(bad))
    with FakeTensorMode():
        args = _video_args(bad, "cuda")
        with pytest.raises(ValueError, match=match):
            torch.ops.sag_fast.degrade(*args.values())


def test_image_x_refuses_a_video_mask():
    args = _args(dict(mask=torch.ones(1, 2, 3, 3, dtype=torch.bool)))
    with pytest.raises(ValueError, match=r"mask must be \(B=1, h, w\)"):
        degrade(**args)


@pytest.mark.parametrize("threads", [2, 4])
def test_video_cpp_row_chunks_and_threads(threads):
    """B*C*F = 3 frame planes over 2 or 4 threads: planes cut into row chunks (halo rows recomputed)."""
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        x, o, mask = _video(1, 1, 3, 70, 21, torch.float32, "cpu", (2, 5, 4))
        y = _cpp(x, o, mask, torch.tensor([0.8]), torch.tensor([-0.6]), 9, 1.5)
        _close(y, _expect(x, o, mask, 0.8, -0.6, 9, 1.5), torch.float32)
    finally:
        torch.set_num_threads(before)
