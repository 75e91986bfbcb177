"""The ops sag_fast::mask_from_probs / mask_from_qk against sag_fast.reference (float64), on small shapes.

`impl` runs each test twice: "op" is the op as dispatched (the torch kernel on CPU tensors, Triton on a GPU),
"triton" routes CPU tensors to the Triton kernels in the interpreter (sag_fast.ops.testing.triton_on_cpu).
"""
from __future__ import annotations

import math

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from sag_fast import _profiling, reference
from sag_fast.ops.testing import triton_on_cpu
from sag_fast.ops import mask as ops
from sag_fast.ops.mask import launch_mask_from_probs, launch_mask_from_qk, mask_from_probs, mask_from_qk

from conftest import HAS_CUDA, INTERPRETED
from triton_aot import functionalised_targets

triton_path = pytest.mark.skipif(not (INTERPRETED or HAS_CUDA),
                                 reason="the Triton kernels need a GPU or TRITON_INTERPRET=1")


@pytest.fixture(params=["op", "triton"])
def impl(request, device):
    """"op": the op as dispatched; "triton": on CPU tensors, the op with the Triton kernels as CPU kernels."""
    if request.param == "op" or device.type == "cuda":
        yield request.param
        return
    if not INTERPRETED:
        pytest.skip("the Triton kernels run on CPU tensors only under TRITON_INTERPRET=1")
    with triton_on_cpu():
        yield request.param
MARGIN = 1e-5  # masses this close to the threshold may legitimately flip with the summation order


def random_probs(shape, dtype, device, peak=2.0, work=torch.float64):
    """Softmax rows, rounded to dtype; the reference sees exactly the rounded values."""
    logits = torch.randn(shape, dtype=work, device=device if work != torch.float64 else "cpu") * peak
    return torch.softmax(logits, dim=-1).to(device=device, dtype=dtype)


def ref_mass_probs(probs4):
    return reference.attention_mass(probs4.cpu().double())


def ref_mass_qk(q, k, scale=None):
    return reference.attention_mass_from_qk(q.cpu().double(), k.cpu().double(), scale)


def assert_away_from(mass, threshold):
    gap = (mass - threshold).abs().min().item()
    assert gap > MARGIN, f"test input has a mass {gap:.2e} from the threshold: pick other inputs"


def assert_mask(mask, ref_mass, grid_hw, threshold):
    assert mask.dtype == torch.bool
    assert_away_from(ref_mass, threshold)
    expected = reference.mass_to_mask(ref_mass, grid_hw, threshold)
    assert mask.shape == expected.shape
    assert torch.equal(mask.cpu(), expected), f"{(mask.cpu() != expected).sum()} mask bits differ"
    assert expected.any() and not expected.all(), "a test mask should have both values"


PROBS_CASES = [  # (B, heads, Nq, Nk, grid)
    (1, 1, 64, 64, (8, 8)),
    (5, 3, 37, 21, (3, 7)),
    (2, 5, 50, 65, (5, 13)),
    (3, 2, 70, 67, (1, 67)),  # prime Nk
    (1, 4, 97, 60, (6, 10)),
]


# ------------------------------------------------------------------------------ mask_from_probs
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", PROBS_CASES, ids=lambda c: "x".join(map(str, c[:4])))
def test_probs_mass_and_mask_match_reference(case, dtype, device, impl):
    b, heads, nq, nk, grid = case
    probs = random_probs((b, heads, nq, nk), dtype, device)
    ref = ref_mass_probs(probs)
    thr = nq / nk  # the mean mass (1.0 for self-attention, Nq == Nk)
    mask, mass = launch_mask_from_probs(probs, thr, return_mass=True)
    torch.testing.assert_close(mass.cpu().double(), ref, rtol=1e-5, atol=1e-5)
    assert_mask(mask.view(b, *grid), ref, grid, thr)
    assert_mask(mask_from_probs(probs, grid, threshold=thr), ref, grid, thr)


@pytest.mark.parametrize("threshold", [0.7, 1.25])
def test_probs_other_thresholds(threshold, device, impl):
    probs = random_probs((2, 3, 40, 35), torch.float32, device)
    assert_mask(mask_from_probs(probs, (5, 7), threshold=threshold), ref_mass_probs(probs), (5, 7), threshold)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_probs_three_dim_layout(dtype, device, impl):
    b, heads, nq, nk = 3, 5, 33, 39
    probs3 = random_probs((b * heads, nq, nk), dtype, device)
    ref = ref_mass_probs(probs3.view(b, heads, nq, nk))
    out = mask_from_probs(probs3, (3, 13), heads=heads, threshold=nq / nk)
    assert out.shape == (b, 3, 13)
    assert_mask(out, ref, (3, 13), nq / nk)


def test_probs_transposed_view(device, impl):
    b, heads, nq, nk = 2, 3, 45, 28
    # stored (..., Nk, Nq): along keys the stride is Nq
    probs = random_probs((b, heads, nq, nk), torch.float32, device).transpose(-1, -2).contiguous().transpose(-1, -2)
    assert not probs.is_contiguous()
    assert_mask(mask_from_probs(probs, (4, 7), threshold=nq / nk), ref_mass_probs(probs), (4, 7), nq / nk)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_probs_sliced_views(dtype, device, impl):
    b, heads, nq, nk = 2, 3, 41, 26
    big = random_probs((b + 1, heads + 2, nq + 5, nk + 7), dtype, device)
    probs = big[1:, 1:-1, 3:-2, 4:-3]
    assert probs.shape == (b, heads, nq, nk) and not probs.is_contiguous()
    ref = ref_mass_probs(probs)
    thr = ref.mean().item()  # sliced rows no longer sum to 1
    assert_mask(mask_from_probs(probs, (2, 13), threshold=thr), ref, (2, 13), thr)
    # a strided (B*heads, Nq, Nk) view, as a processor might slice a larger buffer
    big3 = random_probs((b * heads, nq, 2 * nk), dtype, device)
    probs3 = big3[:, :, ::2]
    ref = ref_mass_probs(probs3.reshape(b, heads, nq, nk))
    thr = ref.mean().item()
    assert_mask(mask_from_probs(probs3, (13, 2), heads=heads, threshold=thr), ref, (13, 2), thr)


@triton_path
def test_probs_query_split_does_not_change_the_mask(device):
    probs = random_probs((2, 3, 100, 30), torch.float32, device)
    ref = ref_mass_probs(probs)
    masses = []
    for n_split in (1, 2, 4):  # 4 row blocks of 32 (fp32: 16): one program, two, four per key block
        mask, mass = launch_mask_from_probs(probs, 100 / 30, n_split=n_split, return_mass=True)
        assert_mask(mask.view(2, 5, 6), ref, (5, 6), 100 / 30)
        masses.append(mass)
    for m in masses[1:]:
        torch.testing.assert_close(m, masses[0], rtol=1e-6, atol=1e-6)


def _exact_probs(b, heads, nq, nk, dtype, device):
    """Rows of 1/nk (a power of two), except that the first half of the rows move key 0's share to
    key 1: every sum is exact in floating point, key 0 has mass 0.5, key 1 1.5, the others exactly 1."""
    probs = torch.full((b, heads, nq, nk), 1.0 / nk, dtype=dtype, device=device)
    probs[:, :, : nq // 2, 0] = 0.0
    probs[:, :, : nq // 2, 1] = 2.0 / nk
    return probs


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_probs_mass_exactly_at_threshold_is_false(dtype, device, impl):
    b, heads, n = 2, 3, 64
    probs = _exact_probs(b, heads, n, n, dtype, device)
    ref = ref_mass_probs(probs)
    assert (ref == 1.0).sum() == b * (n - 2)  # the construction is exact
    expected = torch.zeros(b, n, dtype=torch.bool)
    expected[:, 1] = True
    out = mask_from_probs(probs, (8, 8))
    assert torch.equal(out.cpu().view(b, n), expected)
    assert not mask_from_probs(probs, (8, 8), threshold=1.5).any()  # key 1 sits exactly at 1.5
    assert mask_from_probs(probs, (8, 8), threshold=0.5).sum() == b * (n - 1)


@triton_path
def test_probs_repeated_runs_are_identical(device):
    probs = random_probs((3, 4, 55, 55), torch.float16, device)
    first_mask, first_mass = launch_mask_from_probs(probs, 1.0, return_mass=True)
    for _ in range(2):
        mask, mass = launch_mask_from_probs(probs, 1.0, return_mass=True)
        assert torch.equal(mask, first_mask)
        assert torch.equal(mass.view(torch.int32), first_mass.view(torch.int32))  # bitwise


def test_probs_float64_cpu_path():
    probs = random_probs((2, 3, 24, 24), torch.float64, "cpu")
    assert_mask(mask_from_probs(probs, (4, 6)), ref_mass_probs(probs), (4, 6), 1.0)


def test_probs_batch_zero(device, impl):
    out = mask_from_probs(torch.zeros((0, 2, 5, 6), device=device), (2, 3))
    assert out.shape == (0, 2, 3) and out.dtype == torch.bool


# --------------------------------------------------------------------------------- mask_from_qk
def qk_views(b, heads, nq, nk, d, dtype, device, peak=1.5):
    """q, k as attention processors make them: (B, N, heads*d).view(B, N, heads, d).transpose(1, 2)."""
    q = (torch.randn(b, nq, heads * d) * peak).to(device=device, dtype=dtype)
    k = torch.randn(b, nk, heads * d).to(device=device, dtype=dtype)
    return (q.view(b, nq, heads, d).transpose(1, 2), k.view(b, nk, heads, d).transpose(1, 2))


QK_CASES = [  # (B, heads, Nq, Nk, d, grid)
    (1, 1, 64, 64, 16, (8, 8)),
    (5, 3, 37, 21, 40, (3, 7)),
    (2, 5, 50, 65, 8, (5, 13)),
    (2, 2, 29, 67, 64, (67, 1)),
    (1, 2, 40, 36, 160, (4, 9)),  # SD1 mid block head dim: padded to 256
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", QK_CASES, ids=lambda c: "x".join(map(str, c[:5])))
def test_qk_mass_and_mask_match_reference(case, dtype, device, impl):
    b, heads, nq, nk, d, grid = case
    q, k = qk_views(b, heads, nq, nk, d, dtype, device)
    assert heads == 1 or not q.is_contiguous()
    ref = ref_mass_qk(q, k)
    thr = nq / nk
    mask, mass = launch_mask_from_qk(q, k, thr, 1.0 / math.sqrt(d), return_mass=True)
    torch.testing.assert_close(mass.cpu().double(), ref, rtol=2e-5, atol=2e-5)
    assert_mask(mask.view(b, *grid), ref, grid, thr)
    assert_mask(mask_from_qk(q, k, grid, threshold=thr), ref, grid, thr)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_qk_contiguous_and_scale(dtype, device, impl):
    q = torch.randn(2, 3, 45, 32, dtype=dtype, device=device)
    k = torch.randn(2, 3, 30, 32, dtype=dtype, device=device)
    ref = ref_mass_qk(q, k, scale=0.4)
    assert_mask(mask_from_qk(q, k, (5, 6), threshold=1.1, scale=0.4), ref, (5, 6), 1.1)


@triton_path
def test_qk_query_split_does_not_change_the_mask(device):
    q, k = qk_views(2, 3, 100, 30, 24, torch.float32, device)
    ref = ref_mass_qk(q, k)
    for n_split in (1, 3, 7):
        mask, mass = launch_mask_from_qk(q, k, 100 / 30, 24 ** -0.5, n_split=n_split, return_mass=True)
        torch.testing.assert_close(mass.double().cpu(), ref, rtol=2e-5, atol=2e-5)
        assert_mask(mask.view(2, 6, 5), ref, (6, 5), 100 / 30)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_qk_mass_exactly_at_threshold_is_false(dtype, device, impl):
    """q = 0: every row is uniform, 1/64 exactly, so each key's mass is Nq/64 exactly."""
    b, heads, nk, d = 2, 3, 64, 16
    k = torch.randn(b, heads, nk, d, dtype=dtype, device=device)
    for nq, threshold in ((64, 1.0), (128, 2.0)):
        q = torch.zeros(b, heads, nq, d, dtype=dtype, device=device)
        assert (ref_mass_qk(q, k) == threshold).all()
        assert not mask_from_qk(q, k, (8, 8), threshold=threshold).any()
        assert mask_from_qk(q, k, (8, 8), threshold=threshold - 2**-10).all()


@triton_path
def test_qk_repeated_runs_are_identical(device):
    q, k = qk_views(3, 2, 42, 42, 32, torch.float16, device)
    first_mask, first_mass = launch_mask_from_qk(q, k, 1.0, 32 ** -0.5, return_mass=True)
    for _ in range(2):
        mask, mass = launch_mask_from_qk(q, k, 1.0, 32 ** -0.5, return_mass=True)
        assert torch.equal(mask, first_mask)
        assert torch.equal(mass.view(torch.int32), first_mass.view(torch.int32))


def test_qk_float64_cpu_path():
    q, k = qk_views(2, 2, 20, 20, 12, torch.float64, "cpu")
    assert_mask(mask_from_qk(q, k, (4, 5)), ref_mass_qk(q, k), (4, 5), 1.0)


# ------------------------------------------------------------------------------------- errors
def test_probs_errors():
    p = random_probs((2, 3, 8, 12), torch.float32, "cpu")
    with pytest.raises(ValueError, match="grid_hw"):
        mask_from_probs(p, (3, 5))
    with pytest.raises(ValueError, match="grid_hw"):
        mask_from_probs(p, (0, 12))
    with pytest.raises(TypeError, match="grid_hw"):
        mask_from_probs(p, 12)
    with pytest.raises(ValueError, match="probs"):
        mask_from_probs(p[0, 0], (3, 4))
    with pytest.raises(ValueError, match="probs"):
        mask_from_probs(p.to(torch.int32), (3, 4))
    with pytest.raises(TypeError, match="probs"):
        mask_from_probs(p.numpy(), (3, 4))
    with pytest.raises(ValueError, match="heads"):
        mask_from_probs(p.view(6, 8, 12), (3, 4))  # 3-D needs heads
    with pytest.raises(ValueError, match="heads"):
        mask_from_probs(p.view(6, 8, 12), (3, 4), heads=4)  # 4 does not divide 6
    with pytest.raises(ValueError, match="heads"):
        mask_from_probs(p, (3, 4), heads=2)  # disagrees with the 4-D shape
    with pytest.raises(ValueError, match="threshold"):
        mask_from_probs(p, (3, 4), threshold=float("nan"))
    with pytest.raises(ValueError, match="threshold"):
        mask_from_probs(p, (3, 4), threshold=float("inf"))
    with pytest.raises(TypeError, match="threshold"):
        mask_from_probs(p, (3, 4), threshold=torch.tensor(1.0))


def test_qk_errors():
    q = torch.randn(2, 3, 10, 8)
    k = torch.randn(2, 3, 12, 8)
    with pytest.raises(ValueError, match="grid_hw"):
        mask_from_qk(q, k, (2, 5))
    with pytest.raises(ValueError, match="k"):
        mask_from_qk(q, k[:, :2], (3, 4))
    with pytest.raises(ValueError, match="k"):
        mask_from_qk(q, k[..., :4], (3, 4))
    with pytest.raises(ValueError, match="q"):
        mask_from_qk(q[0], k, (3, 4))
    with pytest.raises(ValueError, match="k must have the dtype"):
        mask_from_qk(q, k.half(), (3, 4))
    with pytest.raises(ValueError, match="q"):
        mask_from_qk(q.to(torch.int64), k, (3, 4))
    with pytest.raises(ValueError, match="k is on meta"):
        mask_from_qk(q, k.to("meta"), (3, 4))
    with pytest.raises(ValueError, match="threshold"):
        mask_from_qk(q, k, (3, 4), threshold=float("-inf"))
    with pytest.raises(ValueError, match="scale"):
        mask_from_qk(q, k, (3, 4), scale=float("nan"))


@triton_path
def test_qk_head_dim_limit(device):
    """d > 256 is refused by the Triton kernel (and the fake of a CUDA call); the torch kernel takes it."""
    q = torch.randn(1, 1, 4, 257, device=device)
    with pytest.raises(ValueError, match="d=257"):
        ops.mask_from_qk_triton(q, q, 2, 2, 1.0, 0.1)
    with FakeTensorMode():
        qc = torch.empty(1, 1, 4, 257, device="cuda")
        with pytest.raises(ValueError, match="d=257"):
            mask_from_qk(qc, qc, (2, 2))
    qd, kd = torch.randn(1, 2, 8, 257, dtype=torch.float64) * 0.3, torch.randn(1, 2, 6, 257, dtype=torch.float64)
    assert_mask(mask_from_qk(qd, kd, (2, 3), threshold=8 / 6), ref_mass_qk(qd, kd), (2, 3), 8 / 6)


@pytest.mark.gpu
def test_float64_on_gpu_is_rejected():
    p = random_probs((1, 1, 4, 4), torch.float64, "cuda")
    with pytest.raises(ValueError, match="float64"):
        mask_from_probs(p, (2, 2))
    with pytest.raises(ValueError, match="float64"):
        mask_from_qk(p, p, (2, 2))


# ------------------------------------------------------------------------ torch.library / compile
def test_opcheck_mask_from_probs():
    probs = random_probs((2, 3, 20, 12), torch.float32, "cpu")
    torch.library.opcheck(torch.ops.sag_fast.mask_from_probs.default, (probs, 3, 4, 1.0, 3))
    torch.library.opcheck(torch.ops.sag_fast.mask_from_probs.default, (probs.view(6, 20, 12), 4, 3, 0.9, 3))


def test_opcheck_mask_from_qk():
    q, k = qk_views(2, 3, 20, 12, 16, torch.float32, "cpu")
    torch.library.opcheck(torch.ops.sag_fast.mask_from_qk.default, (q, k, 3, 4, 1.0, 0.25))


@pytest.mark.skipif(not INTERPRETED, reason="runs the Triton kernels on CPU tensors: TRITON_INTERPRET=1")
def test_opcheck_triton_kernels_interpreted():
    probs = random_probs((2, 3, 20, 12), torch.float32, "cpu")
    q, k = qk_views(2, 3, 20, 12, 16, torch.float32, "cpu")
    with triton_on_cpu():
        torch.library.opcheck(torch.ops.sag_fast.mask_from_probs.default, (probs, 3, 4, 1.0, 3))
        torch.library.opcheck(torch.ops.sag_fast.mask_from_qk.default, (q, k, 3, 4, 1.0, 0.25))


def test_eager_call_dispatches_exactly_one_op():
    probs = random_probs((2, 3, 20, 12), torch.float32, "cpu")
    q, k = qk_views(2, 3, 20, 12, 16, torch.float32, "cpu")
    _, counts = _profiling.count_dispatched_ops(lambda: mask_from_probs(probs, (3, 4)))
    assert counts == {"sag_fast.mask_from_probs": 1}
    _, counts = _profiling.count_dispatched_ops(lambda: mask_from_qk(q, k, (3, 4)))
    assert counts == {"sag_fast.mask_from_qk": 1}


def test_fake_cuda_shapes():
    with FakeTensorMode():
        probs = torch.empty(6, 20, 12, dtype=torch.float16, device="cuda")
        out = mask_from_probs(probs, (3, 4), heads=3)
        assert out.shape == (2, 3, 4) and out.dtype == torch.bool and out.device.type == "cuda"
        q = torch.empty(2, 3, 20, 16, device="cuda")
        k = torch.empty(2, 3, 12, 16, device="cuda")
        out = mask_from_qk(q, k, (4, 3))
        assert out.shape == (2, 4, 3) and out.dtype == torch.bool and out.device.type == "cuda"


@pytest.mark.parametrize("q_device,k_device", [("cuda:0", "cpu"), ("cpu", "cuda:0"), ("cuda:0", "cuda:1")])
def test_mixed_devices_name_both_arguments(q_device, k_device):
    with FakeTensorMode():
        q = torch.empty(2, 3, 20, 16, device=q_device)
        k = torch.empty(2, 3, 12, 16, device=k_device)
        with pytest.raises(ValueError, match=f"k is on {k_device} but q is on {q_device}"):
            mask_from_qk(q, k, (3, 4))


@pytest.mark.parametrize("call,match", [
    (lambda: mask_from_probs(torch.empty(2, 3, 8, 12, device="cuda"), (3, 5)), "grid_hw"),
    (lambda: mask_from_probs(torch.empty(6, 8, 12, device="cuda"), (3, 4)), "heads is required"),
    (lambda: mask_from_probs(torch.empty(2, 3, 8, 12, dtype=torch.float64, device="cuda"), (3, 4)), "float64"),
    (lambda: mask_from_probs(torch.empty(2, 3, 8, 12, dtype=torch.int32, device="cuda"), (3, 4)), "probs"),
    (lambda: mask_from_qk(torch.empty(2, 3, 8, 4, device="cuda"), torch.empty(2, 2, 12, 4, device="cuda"), (3, 4)),
     "k .* must match q"),
    (lambda: mask_from_qk(torch.empty(2, 3, 8, 4, device="cuda"), torch.empty(2, 3, 12, 4, device="cuda"), (3, 4),
                          threshold=-1.0), "threshold"),
])
def test_fake_cuda_bad_inputs(call, match):
    with FakeTensorMode():
        with pytest.raises(ValueError, match=match):
            call()


_TRACE = """
import torch, sag_fast
from torch._subclasses.fake_tensor import FakeTensorMode
from torch._subclasses.functional_tensor import dispatch_functionalize
from torch.fx.experimental.proxy_tensor import make_fx
from sag_fast.ops.mask import mask_from_probs, mask_from_qk

def f(p, q, k):
    return mask_from_probs(p, (3, 4)) | mask_from_qk(q, k, (3, 4))

def video(p, q, k):  # (f, h, w) grids: the frames keyword reaches the Triton path
    return mask_from_probs(p, (2, 2, 3)) | mask_from_qk(q, k, (2, 2, 3))

for name, device, fn in (("cuda", "cuda", f), ("cpu", "cpu", f), ("cuda-video", "cuda", video)):
    with FakeTensorMode():
        args = (torch.empty(2, 3, 20, 12, device=device), torch.empty(2, 3, 20, 16, device=device),
                torch.empty(2, 3, 12, 16, device=device))
    gm = make_fx(dispatch_functionalize(fn), tracing_mode="fake")(*args)
    targets = [str(n.target) for n in gm.graph.nodes if n.op == "call_function"]
    print(name, targets.count("triton_kernel_wrapper_functional"), sorted(set(targets)))
"""


def test_compile_sees_the_triton_kernels_on_cuda():
    """Functionalised, CUDA calls are their Triton launches (1 for probs, 2 for q/k); CPU calls stay ops."""
    lines = functionalised_targets(_TRACE)
    assert lines["cuda"].startswith("3 ") and "sag_fast.mask" not in lines["cuda"]
    assert lines["cpu"].startswith("0 ") and "sag_fast.mask_from_probs.default" in lines["cpu"]
    assert lines["cuda-video"].startswith("3 ") and "sag_fast.mask" not in lines["cuda-video"]


def test_torch_compile_fullgraph():
    probs = random_probs((2, 3, 20, 12), torch.float32, "cpu")
    q, k = qk_views(2, 3, 20, 12, 16, torch.float32, "cpu")

    def both(p, q, k):
        return mask_from_probs(p, (3, 4)) | mask_from_qk(q, k, (4, 3)).view(2, 3, 4)

    compiled = torch.compile(both, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(probs, q, k), both(probs, q, k))


# ---------------------------------------------------------------------------- AOT / ptxas spills
_PTR = {"p_ptr": None, "q_ptr": None, "k_ptr": None, "lse_ptr": "*fp32", "part_ptr": "*fp32",
        "mass_ptr": "*fp32", "count_ptr": "*i32", "mask_ptr": "*u8", "bias_ptr": "*fp32"}
_CONTIGUOUS_LAST = ("stride_k", "sq_d", "sk_d")  # stride 1 is specialised to a constexpr at launch
_FLOATS = ("threshold", "qk_scale")


def _aot_spec(fn, dtype: str, constexprs: dict):
    """The signature a launch with contiguous last dims compiles: tensors, ints, fp32 scalars, constexprs."""
    cx = {**constexprs, **{n: 1 for n in _CONTIGUOUS_LAST if n in fn.arg_names}}
    if "WRITE_MASS" in fn.arg_names:
        cx["WRITE_MASS"] = False  # what the custom ops launch
    if "RELATIVE" in fn.arg_names:
        cx.setdefault("RELATIVE", False)  # absolute threshold; the joint-attention tests compile True
    if "HAS_BIAS" in fn.arg_names:
        cx.setdefault("HAS_BIAS", False)  # no key bias; the joint-attention tests compile True
    sig = {}
    for name in fn.arg_names:
        if name in cx:
            sig[name] = "constexpr"
        elif name in _PTR:
            sig[name] = _PTR[name] or f"*{dtype}"
        else:
            sig[name] = "fp32" if name in _FLOATS else "i32"
    return sig, cx


def _aot_cases():
    cases = []
    for dt, tdt in (("fp16", torch.float16), ("fp32", torch.float32)):
        cfg = dict(ops.probs_config(tdt))
        cases.append(("_probs_mass_kernel", dt, cfg))
        for d_pad in (64, 128, 256):  # the largest head dim of each block-size bucket
            lse, mass = ops.qk_configs(tdt, d_pad)
            cases += [("_qk_lse_kernel", dt, dict(lse)), ("_qk_mass_kernel", dt, dict(mass))]
    return cases


@pytest.mark.slow
@pytest.mark.parametrize("arch", [80, 90])
@pytest.mark.parametrize("case", _aot_cases(), ids=lambda c: f"{c[0]}-{c[1]}-d{c[2].get('D_PAD', '')}")
def test_kernels_compile_without_spills(case, arch):
    from triton_aot import compile_report, spilled_bytes

    name, dtype, cfg = case
    cfg = dict(cfg)  # shared by the arch parametrisations
    num_warps = cfg.pop("num_warps")
    sig, cx = _aot_spec(getattr(ops, name), dtype, cfg)
    report = compile_report(f"sag_fast.ops.mask:{name}", sig, cx, arch, num_warps=num_warps)
    assert spilled_bytes(report) == 0, report


# ------------------------------------------------------------------------------------ GPU only
@pytest.mark.gpu
def test_gpu_bfloat16():
    probs = random_probs((2, 3, 256, 256), torch.bfloat16, "cuda")
    ref = ref_mass_probs(probs)
    mask, mass = launch_mask_from_probs(probs, 1.0, return_mass=True)
    torch.testing.assert_close(mass.double().cpu(), ref, rtol=1e-5, atol=1e-5)
    assert_mask(mask.view(2, 16, 16), ref, (16, 16), 1.0)
    q, k = qk_views(2, 3, 256, 256, 64, torch.bfloat16, "cuda")
    ref = ref_mass_qk(q, k)
    mask, mass = launch_mask_from_qk(q, k, 1.0, 0.125, return_mass=True)
    torch.testing.assert_close(mass.double().cpu(), ref, rtol=1e-4, atol=1e-4)
    near = (ref - 1.0).abs() < 1e-3
    assert torch.equal(mask.cpu()[~near], (ref > 1.0)[~near])


def _agree_away_from_threshold(mask, ref, threshold=1.0, tol=1e-4):
    far = (ref - threshold).abs() > tol
    assert far.float().mean() > 0.9
    assert torch.equal(mask.cpu()[far], (ref > threshold)[far])


@pytest.mark.gpu
def test_gpu_large_probs_and_determinism():
    probs = random_probs((2, 20, 4096, 4096), torch.float16, "cuda", peak=3.0, work=torch.float32)
    ref = reference.attention_mass(probs.double()).cpu()  # 11 GB of float64 on the GPU
    mask, mass = launch_mask_from_probs(probs, 1.0, return_mass=True)
    torch.testing.assert_close(mass.double().cpu(), ref, rtol=1e-5, atol=1e-4)
    _agree_away_from_threshold(mask, ref)
    assert torch.equal(mask_from_probs(probs, (64, 64)).view(2, -1), mask)
    for _ in range(3):
        again, mass2 = launch_mask_from_probs(probs, 1.0, return_mass=True)
        assert torch.equal(again, mask) and torch.equal(mass2.view(torch.int32), mass.view(torch.int32))


@pytest.mark.gpu
@pytest.mark.parametrize("d", [64, 160])
def test_gpu_large_qk_and_determinism(d):
    q, k = qk_views(2, 10, 4096, 4096, d, torch.float16, "cuda", peak=2.0)
    ref = reference.attention_mass_from_qk(q, k).double().cpu()  # fp32 reference (fp64 would be 2.7 GB x 2)
    mask, mass = launch_mask_from_qk(q, k, 1.0, d ** -0.5, return_mass=True)
    torch.testing.assert_close(mass.double().cpu(), ref, rtol=1e-4, atol=1e-3)
    _agree_away_from_threshold(mask, ref, tol=1e-3)
    for _ in range(3):
        again, mass2 = launch_mask_from_qk(q, k, 1.0, d ** -0.5, return_mass=True)
        assert torch.equal(again, mask) and torch.equal(mass2.view(torch.int32), mass.view(torch.int32))


@pytest.mark.gpu
def test_gpu_runs_on_the_current_stream():
    """probs/q are written on a side stream after a long sleep: a launch on another stream reads them early."""
    probs = random_probs((2, 3, 256, 256), torch.float16, "cuda")
    q, k = qk_views(2, 3, 256, 256, 64, torch.float16, "cuda")
    p_dst, q_dst = torch.zeros_like(probs), torch.zeros_like(q)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        torch.cuda._sleep(50_000_000)
        p_dst.copy_(probs)
        q_dst.copy_(q)
        m1 = mask_from_probs(p_dst, (16, 16))
        m2 = mask_from_qk(q_dst, k, (16, 16))
    torch.cuda.synchronize()
    _agree_away_from_threshold(m1.view(2, -1), ref_mass_probs(probs))
    _agree_away_from_threshold(m2.view(2, -1), ref_mass_qk(q, k), tol=1e-3)


@pytest.mark.gpu
def test_gpu_fp32_qk_is_not_tf32():
    q, k = qk_views(2, 4, 256, 256, 64, torch.float32, "cuda")
    ref = ref_mass_qk(q, k)
    mask, mass = launch_mask_from_qk(q, k, 1.0, 0.125, return_mass=True)
    torch.testing.assert_close(mass.double().cpu(), ref, rtol=2e-5, atol=2e-5)  # tf32 would miss by ~1e-3


# ------------------------------------------------------------------------- video: (f, h, w) key grids
# The keys are frame-major (frame, row, column); the kernels reduce over keys as for images and the grid only
# shapes the (B, f, h, w) output, so these tests cover the argument handling and the shapes on both paths.
VIDEO_GRIDS = [(1, 5, 7), (3, 4, 5), (5, 3, 2)]  # one frame; odd frame counts, non-square


@pytest.mark.parametrize("grid", VIDEO_GRIDS, ids=lambda g: "x".join(map(str, g)))
def test_video_qk_matches_reference(grid, device, impl):
    n = math.prod(grid)
    q, k = qk_views(2, 3, n, n, 16, torch.float32, device)  # transposed views of (B, N, heads*d)
    ref = ref_mass_qk(q, k)
    mask = mask_from_qk(q, k, grid)
    assert mask.shape == (2, *grid)
    assert_mask(mask, ref, grid, 1.0)


@pytest.mark.parametrize("grid", VIDEO_GRIDS, ids=lambda g: "x".join(map(str, g)))
def test_video_probs_matches_reference(grid, device, impl):
    n = math.prod(grid)
    probs = random_probs((2 * 3, n, n), torch.float32, device)  # (B*heads, N, N), as diffusers stores it
    mask = mask_from_probs(probs, grid, heads=3)
    assert mask.shape == (2, *grid)
    assert_mask(mask, ref_mass_probs(probs.view(2, 3, n, n)), grid, 1.0)


def test_video_float64_cpu_path():
    q, k = qk_views(2, 2, 45, 45, 12, torch.float64, "cpu")
    assert_mask(mask_from_qk(q, k, (3, 5, 3)), ref_mass_qk(q, k), (3, 5, 3), 1.0)
    probs = random_probs((2, 2, 45, 45), torch.float64, "cpu")
    assert_mask(mask_from_probs(probs, (5, 3, 3)), ref_mass_probs(probs), (5, 3, 3), 1.0)


def test_video_bnhd_layout(device, impl):
    """q, k in diffusers' (B, N, heads, d) with a video grid: read as the transposed view."""
    q, k = qk_views(2, 2, 24, 24, 16, torch.float32, device)
    mask = mask_from_qk(q.transpose(1, 2), k.transpose(1, 2), (2, 3, 4), layout="BNHD")
    assert_mask(mask, ref_mass_qk(q, k), (2, 3, 4), 1.0)


def test_video_joint_attention(device, impl):
    """Joint attention over video tokens (CogVideoX, HunyuanVideo): image_span is the video, the grid (f, h, w)."""
    text, f, h, w = 5, 3, 2, 4
    n = text + f * h * w
    q, k = qk_views(2, 2, n, n, 16, torch.float32, device)
    span = (text, f * h * w)
    ref = reference.joint_attention_mass_from_qk(q.cpu().double(), k.cpu().double(), span)
    mask = mask_from_qk(q, k, (f, h, w), image_span=span)
    expected = reference.joint_mass_to_mask(ref, (f, h, w))
    assert mask.shape == (2, f, h, w) and torch.equal(mask.cpu(), expected)
    assert expected.any() and not expected.all()


def test_video_batch_zero(device, impl):
    assert mask_from_probs(torch.zeros((0, 2, 6, 6), device=device), (2, 1, 3)).shape == (0, 2, 1, 3)
    assert mask_from_qk(torch.zeros((0, 2, 6, 4), device=device), torch.zeros((0, 2, 6, 4), device=device),
                        (3, 2, 1)).shape == (0, 3, 2, 1)


def test_video_grid_errors():
    p = random_probs((2, 3, 8, 24), torch.float32, "cpu")
    q, k = torch.randn(2, 3, 10, 8), torch.randn(2, 3, 24, 8)
    with pytest.raises(ValueError, match=r"grid_hw=\(2, 3, 5\) does not match the number of keys Nk=24 "
                                         r"\(need f\*h\*w == 24\)"):
        mask_from_qk(q, k, (2, 3, 5))
    with pytest.raises(ValueError, match=r"grid_hw=\(3, 3, 3\) does not match.*Nk=24"):
        mask_from_probs(p, (3, 3, 3))
    with pytest.raises(ValueError, match="grid_hw must be positive"):  # f = 0 is not "no frame axis"
        mask_from_qk(q, k, (0, 4, 6))
    with pytest.raises(TypeError, match=r"grid_hw must be \(h, w\) or \(f, h, w\)"):
        mask_from_probs(p, (1, 2, 3, 4))
    with pytest.raises(ValueError, match="frames must be an int >= 0"):  # the op itself
        torch.ops.sag_fast.mask_from_qk(q, k, 4, 6, 1.0, 0.3, frames=-1)
    qj = torch.randn(2, 3, 30, 8)
    with pytest.raises(ValueError, match=r"grid_hw=\(2, 2, 5\) does not match image_span's length 24"):
        mask_from_qk(qj, qj, (2, 2, 5), image_span=(6, 24))


def test_video_fake_cuda_shapes_and_errors():
    with FakeTensorMode():
        probs = torch.empty(6, 20, 24, dtype=torch.float16, device="cuda")
        out = mask_from_probs(probs, (2, 3, 4), heads=3)
        assert out.shape == (2, 2, 3, 4) and out.dtype == torch.bool and out.device.type == "cuda"
        q, k = torch.empty(2, 3, 20, 16, device="cuda"), torch.empty(2, 3, 24, 16, device="cuda")
        out = mask_from_qk(q, k, (4, 3, 2))
        assert out.shape == (2, 4, 3, 2) and out.dtype == torch.bool and out.device.type == "cuda"
        with pytest.raises(ValueError, match=r"grid_hw=\(4, 3, 3\)"):
            mask_from_qk(q, k, (4, 3, 3))


def test_video_opcheck():
    probs = random_probs((2, 3, 20, 12), torch.float32, "cpu")
    q, k = qk_views(2, 3, 20, 12, 16, torch.float32, "cpu")
    torch.library.opcheck(torch.ops.sag_fast.mask_from_probs.default, (probs, 2, 3, 1.0, 3), {"frames": 2})
    torch.library.opcheck(torch.ops.sag_fast.mask_from_qk.default, (q, k, 3, 2, 1.0, 0.25), {"frames": 2})


@pytest.mark.skipif(not INTERPRETED, reason="runs the Triton kernels on CPU tensors: TRITON_INTERPRET=1")
def test_video_opcheck_triton_kernels_interpreted():
    probs = random_probs((2, 3, 20, 12), torch.float32, "cpu")
    q, k = qk_views(2, 3, 20, 12, 16, torch.float32, "cpu")
    with triton_on_cpu():
        torch.library.opcheck(torch.ops.sag_fast.mask_from_probs.default, (probs, 2, 3, 1.0, 3), {"frames": 2})
        torch.library.opcheck(torch.ops.sag_fast.mask_from_qk.default, (q, k, 3, 2, 1.0, 0.25), {"frames": 2})


def test_video_eager_call_dispatches_exactly_one_op():
    probs = random_probs((2, 3, 20, 12), torch.float32, "cpu")
    q, k = qk_views(2, 3, 20, 12, 16, torch.float32, "cpu")
    _, counts = _profiling.count_dispatched_ops(lambda: mask_from_probs(probs, (2, 2, 3)))
    assert counts == {"sag_fast.mask_from_probs": 1}
    _, counts = _profiling.count_dispatched_ops(lambda: mask_from_qk(q, k, (2, 3, 2)))
    assert counts == {"sag_fast.mask_from_qk": 1}


def test_video_torch_compile_fullgraph():
    probs = random_probs((2, 3, 20, 12), torch.float32, "cpu")
    q, k = qk_views(2, 3, 20, 12, 16, torch.float32, "cpu")

    def both(p, q, k):
        return mask_from_probs(p, (2, 2, 3)) | mask_from_qk(q, k, (2, 3, 2)).view(2, 2, 2, 3)

    compiled = torch.compile(both, fullgraph=True, backend="aot_eager")
    out = compiled(probs, q, k)
    assert out.shape == (2, 2, 2, 3) and torch.equal(out, both(probs, q, k))


_MEMORY = """
import resource, sys, torch
import sag_fast
from sag_fast.ops.mask import mask_from_qk

torch.manual_seed(0)
torch.set_num_threads(1)
f, h, w, d = 16, 32, 32, 16
n = f * h * w
q, k = torch.randn(1, 1, n, d), torch.randn(1, 1, n, d)
mask_from_qk(q[:, :, :64], k[:, :, :64], (1, 8, 8))  # one-time allocations (thread pools, dispatch) first


def rss():
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * resource.getpagesize()


def peak_rss():
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) * 1024 for line in fh if line.startswith("VmHWM:"))  # kB


# reset the peak (VmHWM) to the current RSS: a transient peak while importing must not count
with open("/proc/self/clear_refs", "w") as fh:
    fh.write("5")
before = rss()
mask = mask_from_qk(q, k, (f, h, w))
peak = peak_rss()
assert mask.shape == (1, f, h, w) and mask.any() and not mask.all()
print(peak - before)
"""


def test_video_mask_from_qk_memory_stays_far_below_n_squared():
    """16 x 32 x 32 = 16,384 tokens on CPU: the N x N probabilities would be 1 GiB of fp32. The process's peak
    RSS (in a fresh subprocess; tracemalloc does not see torch's allocations) may grow by a quarter of that at
    most; streaming over query chunks keeps it near one 64 MiB chunk."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", _MEMORY], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    grown = int(out.stdout.strip().splitlines()[-1])
    n = 16 * 32 * 32
    assert grown < n * n * 4 // 4, f"peak RSS grew by {grown / 2**20:.0f} MiB"
