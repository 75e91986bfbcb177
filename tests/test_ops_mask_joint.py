"""sag_fast::mask_from_qk for joint attention (image_span=..., SD3/Flux) and diffusers' (B, N, heads, d) layout,
against sag_fast.reference (float64, materialised probabilities), on small shapes.

The joint mask: image queries, softmax over all N keys (text included), mass over the image keys, threshold
relative to the mean image-key mass (docs/design.md, "The mask for joint attention").
`impl` (from test_ops_mask) runs each test with the op as dispatched and with the Triton kernels interpreted.
"""
from __future__ import annotations


import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from sag_fast import _profiling, reference
from sag_fast.ops import mask as ops
from sag_fast.ops.mask import launch_mask_from_qk, mask_from_qk
from sag_fast.ops.testing import triton_on_cpu

from conftest import INTERPRETED
from fake_cuda import fake_cuda
from test_ops_mask import _aot_spec, impl, triton_path  # noqa: F401  (impl is a fixture)
from triton_aot import functionalised_targets

NEAR = 1e-4  # masses this close to the cut are left out of the comparison (fp32 summation order)


def joint_qkv(b, heads, n_img, n_txt, d, dtype, device, text_first, txt_peak=2.0):
    """q, k as a joint-attention layer has them: one fused (B, N, 3*heads*d) projection of [text, image]
    (Flux) or [image, text] (SD3) tokens, q and k slices of it .unflatten(-1, (heads, d)): (B, N, heads, d)
    views, not contiguous. Text keys are larger so that they take a sizeable share of every row."""
    n = n_img + n_txt
    qkv = torch.randn(b, n, 3 * heads * d, dtype=torch.float64)
    txt = slice(0, n_txt) if text_first else slice(n_img, n)
    qkv[:, :, : heads * d] *= 1.5  # q: peakier rows
    qkv[:, txt, heads * d: 2 * heads * d] *= txt_peak
    qkv = qkv.to(device=device, dtype=dtype)
    q = qkv[..., : heads * d].unflatten(-1, (heads, d))
    k = qkv[..., heads * d: 2 * heads * d].unflatten(-1, (heads, d))
    assert not q.is_contiguous() and not k.is_contiguous()
    return q, k, (n_txt if text_first else 0, n_img)


def in_layout(t, layout):
    """A (B, N, heads, d) view as the layout's tensor: itself, or its (B, heads, N, d) transpose."""
    return t if layout == "BNHD" else t.transpose(1, 2)


def ref_joint_mass(q_bnhd, k_bnhd, span, scale=None):
    return reference.joint_attention_mass_from_qk(q_bnhd.transpose(1, 2).cpu().double(),
                                                  k_bnhd.transpose(1, 2).cpu().double(), span, scale)


def assert_joint_mask(mask, ref_mass, grid_hw, threshold):
    """mask equals the reference's relative rule wherever the reference mass is more than NEAR from the cut."""
    assert mask.dtype == torch.bool
    expected = reference.joint_mass_to_mask(ref_mass, grid_hw, threshold)
    assert mask.shape == expected.shape
    cut = threshold * ref_mass.mean(-1, keepdim=True)
    far = ((ref_mass - cut).abs() > NEAR).view_as(expected)
    assert far.float().mean() > 0.9, "too many masses at the threshold: pick other inputs"
    assert torch.equal(mask.cpu()[far], expected[far]), f"{(mask.cpu() != expected)[far].sum()} mask bits differ"
    assert expected.any() and not expected.all(), "a test mask should have both values"


JOINT_CASES = [  # (B, heads, latent (H, W), patch, text tokens, text first, d)
    (2, 3, (3, 5), 1, 7, True, 16),     # Flux order [text, image], odd span 15 at odd offset 7
    (1, 2, (6, 10), 2, 5, False, 40),   # SD3 order [image, text]: 2x2 patches of a 6x10 latent -> 3x5 grid
    (2, 2, (7, 4), 1, 11, False, 24),
    (3, 1, (14, 8), 2, 9, True, 32),    # 7x4 grid of 2x2 patches
    (1, 4, (5, 7), 1, 1, True, 8),      # a single text token
]


def _case_id(c):
    return f"{c[2][0]}x{c[2][1]}p{c[3]}t{c[4]}{'pre' if c[5] else 'post'}"


@pytest.mark.parametrize("layout", ["BNHD", "BHND"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", JOINT_CASES, ids=_case_id)
def test_joint_mask_matches_reference(case, dtype, layout, device, impl):
    b, heads, (lat_h, lat_w), patch, n_txt, text_first, d = case
    grid = (lat_h // patch, lat_w // patch)
    q, k, span = joint_qkv(b, heads, grid[0] * grid[1], n_txt, d, dtype, device, text_first)
    ref = ref_joint_mass(q, k, span)
    out = mask_from_qk(in_layout(q, layout), in_layout(k, layout), grid, layout=layout, image_span=span)
    assert out.shape == (b, *grid)
    assert_joint_mask(out, ref, grid, 1.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", JOINT_CASES[:3], ids=lambda c: f"t{c[4]}{'pre' if c[5] else 'post'}")
def test_joint_mass_matches_reference(case, dtype, device):
    """The masses themselves: the Triton launcher (interpreted without a GPU) and the torch (CPU) kernel."""
    b, heads, (lat_h, lat_w), patch, n_txt, text_first, d = case
    grid = (lat_h // patch, lat_w // patch)
    q, k, span = joint_qkv(b, heads, grid[0] * grid[1], n_txt, d, dtype, device, text_first)
    ref = ref_joint_mass(q, k, span)
    assert (ref.sum(-1) < 0.9 * span[1]).all(), "the text keys should take a visible share of the mass"
    qh, kh = q.transpose(1, 2), k.transpose(1, 2)
    torch.testing.assert_close(ops._mass_qk_torch(qh.cpu(), kh.cpu(), d ** -0.5, span).double(), ref,
                               rtol=2e-5, atol=2e-5)
    if INTERPRETED or device.type == "cuda":
        mask, mass = launch_mask_from_qk(qh, kh, 1.0, d ** -0.5, image_span=span, return_mass=True)
        torch.testing.assert_close(mass.cpu().double(), ref, rtol=2e-5, atol=2e-5)
        assert_joint_mask(mask.view(b, *grid), ref, grid, 1.0)


@pytest.mark.parametrize("threshold", [0.6, 1.4])
def test_joint_other_thresholds_and_scale(threshold, device, impl):
    q, k, span = joint_qkv(2, 3, 28, 6, 16, torch.float32, device, text_first=False)
    ref = ref_joint_mass(q, k, span, scale=0.3)
    out = mask_from_qk(q, k, (4, 7), threshold=threshold, scale=0.3, layout="BNHD", image_span=span)
    assert_joint_mask(out, ref, (4, 7), threshold)


def test_joint_rule_without_text_is_todays_rule(device, impl):
    """image_span covering every token: the relative cut is the mean, 1, so the mask is today's absolute one."""
    q, k, span = joint_qkv(2, 3, 30, 0, 16, torch.float32, device, text_first=True)
    assert span == (0, 30)
    ref_plain = reference.attention_mass_from_qk(q.transpose(1, 2).double().cpu(), k.transpose(1, 2).double().cpu())
    ref_joint = ref_joint_mass(q, k, span)
    torch.testing.assert_close(ref_joint.mean(-1), torch.ones(2, dtype=torch.float64), rtol=0, atol=1e-12)
    out = mask_from_qk(q, k, (5, 6), layout="BNHD", image_span=span)
    far = ((ref_plain - 1.0).abs() > NEAR).view(2, 5, 6)
    assert far.float().mean() > 0.9
    expected = reference.mass_to_mask(ref_plain, (5, 6), 1.0)
    assert torch.equal(out.cpu()[far], expected[far]) and expected.any() and not expected.all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_joint_mass_exactly_at_the_mean_is_false(dtype, device, impl):
    """q = 0: every row is uniform, 1/64 exactly, so every image key has mass 48/64 exactly, the mean too."""
    b, heads, n, d = 2, 3, 64, 16
    k = torch.randn(b, n, heads, d, dtype=dtype, device=device)
    q = torch.zeros_like(k)
    for span in ((16, 48), (0, 48)):
        assert (ref_joint_mass(q, k, span) == 0.75).all()
        assert not mask_from_qk(q, k, (6, 8), layout="BNHD", image_span=span).any()
        assert mask_from_qk(q, k, (6, 8), threshold=1.0 - 2**-10, layout="BNHD", image_span=span).all()


@triton_path
def test_joint_query_split_and_repeated_runs(device):
    q, k, span = joint_qkv(2, 3, 90, 13, 24, torch.float32, device, text_first=True)
    ref = ref_joint_mass(q, k, span)
    qh, kh = q.transpose(1, 2), k.transpose(1, 2)
    first = None
    for n_split in (1, 2, 3, 3):  # 3 row blocks of 32: one, two, three programs per key block
        mask, mass = launch_mask_from_qk(qh, kh, 1.0, 24 ** -0.5, image_span=span, n_split=n_split,
                                         return_mass=True)
        torch.testing.assert_close(mass.cpu().double(), ref, rtol=2e-5, atol=2e-5)
        assert_joint_mask(mask.view(2, 9, 10), ref, (9, 10), 1.0)
        if n_split == 3:
            if first is not None:  # the same launch again: bitwise the same
                assert torch.equal(mask, first[0]) and torch.equal(mass.view(torch.int32), first[1].view(torch.int32))
            first = (mask, mass)


def test_joint_float64_cpu_and_batch_zero(device, impl):
    q, k, span = joint_qkv(2, 2, 20, 5, 12, torch.float64, "cpu", text_first=False)
    assert_joint_mask(mask_from_qk(q, k, (4, 5), layout="BNHD", image_span=span), ref_joint_mass(q, k, span),
                      (4, 5), 1.0)
    empty = torch.zeros(0, 25, 2, 8, device=device)
    out = mask_from_qk(empty, empty, (4, 5), layout="BNHD", image_span=(5, 20))
    assert out.shape == (0, 4, 5) and out.dtype == torch.bool


def test_layout_bnhd_without_span_is_todays_op(device, impl):
    """layout alone: q, k (B, N, heads, d) of different lengths (cross-attention shape), absolute rule."""
    qkv = torch.randn(2, 40, 3 * 3 * 16, device=device)
    q = qkv[..., :48].unflatten(-1, (3, 16))
    k = torch.randn(2, 30, 2 * 48, device=device)[..., 48:].unflatten(-1, (3, 16))
    ref = reference.attention_mass_from_qk(q.transpose(1, 2).double().cpu(), k.transpose(1, 2).double().cpu())
    out = mask_from_qk(q, k, (5, 6), threshold=40 / 30, layout="BNHD")
    far = ((ref - 40 / 30).abs() > NEAR).view(2, 5, 6)
    expected = reference.mass_to_mask(ref, (5, 6), 40 / 30)
    assert far.float().mean() > 0.9 and torch.equal(out.cpu()[far], expected[far])


# ------------------------------------------------------------------------------------- reference
def test_reference_joint_mass_is_the_image_block_of_the_full_softmax():
    """The spec by another route: one softmax per row written out with exp, then the image block summed."""
    q, k, span = joint_qkv(2, 3, 12, 5, 8, torch.float64, "cpu", text_first=True)
    qh, kh = q.transpose(1, 2), k.transpose(1, 2)
    e = torch.exp(qh @ kh.transpose(-1, -2) / 8 ** 0.5)
    p = e / e.sum(-1, keepdim=True)  # every key in the denominator, text included
    start, length = span
    img = p[:, :, start:start + length, start:start + length]
    torch.testing.assert_close(reference.joint_attention_mass(p, span), img.sum(2).mean(1), rtol=1e-12, atol=0)
    # the text share: the image keys' total is what the text keys leave over
    text_share = 1 - img.sum(-1)
    torch.testing.assert_close(reference.joint_attention_mass(p, span).sum(-1),
                               (length - text_share.sum(-1)).mean(1), rtol=1e-12, atol=0)
    with pytest.raises(ValueError, match="image_span"):
        reference.joint_attention_mass(p, (5, 13))


# ---------------------------------------------------------------------------------------- errors
def test_joint_errors():
    q, k, _ = joint_qkv(2, 3, 15, 5, 8, torch.float32, "cpu", text_first=True)  # N = 20
    with pytest.raises(ValueError, match=r"image_span=\(6, 15\) is out of range for N=20"):
        mask_from_qk(q, k, (3, 5), layout="BNHD", image_span=(6, 15))
    with pytest.raises(ValueError, match="image_span=.-1, 15. is out of range"):
        mask_from_qk(q, k, (3, 5), layout="BNHD", image_span=(-1, 15))
    with pytest.raises(ValueError, match="image_span=.3, 0. is out of range"):
        mask_from_qk(q, k, (3, 5), layout="BNHD", image_span=(3, 0))
    with pytest.raises(TypeError, match="image_span"):
        mask_from_qk(q, k, (3, 5), layout="BNHD", image_span=15)
    with pytest.raises(TypeError, match="image_span"):
        mask_from_qk(q, k, (3, 5), layout="BNHD", image_span=(5.0, 15))
    with pytest.raises(TypeError, match="image_span"):
        mask_from_qk(q, k, (3, 5), layout="BNHD", image_span=(True, 15))
    with pytest.raises(ValueError, match=r"grid_hw=\(4, 4\) does not match image_span's length 15"):
        mask_from_qk(q, k, (4, 4), layout="BNHD", image_span=(5, 15))
    with pytest.raises(ValueError, match="layout must be one of"):
        mask_from_qk(q, k, (3, 5), layout="BSHD", image_span=(5, 15))
    with pytest.raises(ValueError, match="layout must be one of"):
        mask_from_qk(q, k, (4, 5), layout="bnhd")
    with pytest.raises(ValueError, match="joint attention.*Nq=10 and Nk=20"):
        mask_from_qk(q[:, :10], k, (3, 5), layout="BNHD", image_span=(5, 15))
    with pytest.raises(ValueError, match=r"layout='BHND'"):  # (B, N, heads, d) read as (B, heads, N, d)
        mask_from_qk(q, k[:, :12], (3, 4))
    with pytest.raises(ValueError, match="grid_hw"):  # no span: h*w must be N
        mask_from_qk(q, k, (3, 5), layout="BNHD")


# ------------------------------------------------------------------------ torch.library / compile
def test_opcheck_joint():
    q, k, span = joint_qkv(2, 3, 12, 5, 16, torch.float32, "cpu", text_first=False)
    op = torch.ops.sag_fast.mask_from_qk.default
    torch.library.opcheck(op, (q, k, 3, 4, 1.0, 0.25), dict(layout="BNHD", image_span=list(span)))
    torch.library.opcheck(op, (q.transpose(1, 2), k.transpose(1, 2), 4, 3, 0.9, 0.25), dict(image_span=list(span)))
    torch.library.opcheck(op, (q, k, 1, 17, 1.0, 0.25), dict(layout="BNHD"))  # no span: all 17 tokens


@pytest.mark.skipif(not INTERPRETED, reason="runs the Triton kernels on CPU tensors: TRITON_INTERPRET=1")
def test_opcheck_joint_triton_interpreted():
    q, k, span = joint_qkv(2, 3, 12, 5, 16, torch.float32, "cpu", text_first=True)
    with triton_on_cpu():
        torch.library.opcheck(torch.ops.sag_fast.mask_from_qk.default, (q, k, 3, 4, 1.0, 0.25),
                              dict(layout="BNHD", image_span=list(span)))


def test_eager_joint_call_dispatches_exactly_one_op():
    q, k, span = joint_qkv(2, 3, 12, 5, 16, torch.float32, "cpu", text_first=True)
    _, counts = _profiling.count_dispatched_ops(lambda: mask_from_qk(q, k, (3, 4), layout="BNHD", image_span=span))
    assert counts == {"sag_fast.mask_from_qk": 1}


def test_fake_cuda_joint():
    with fake_cuda():
        qkv = torch.empty(2, 333 + 64, 3 * 4 * 16, dtype=torch.float16, device="cuda")
        q = qkv[..., :64].unflatten(-1, (4, 16))
        k = qkv[..., 64:128].unflatten(-1, (4, 16))
        out = mask_from_qk(q, k, (8, 8), layout="BNHD", image_span=(0, 64))  # SD3 order
        assert out.shape == (2, 8, 8) and out.dtype == torch.bool and out.device.type == "cuda"
        out = mask_from_qk(q.transpose(1, 2), k.transpose(1, 2), (4, 16), image_span=(333, 64))  # Flux order
        assert out.shape == (2, 4, 16) and out.device.type == "cuda"
        with pytest.raises(ValueError, match="image_span=.334, 64. is out of range"):
            mask_from_qk(q, k, (8, 8), layout="BNHD", image_span=(334, 64))
        with pytest.raises(ValueError, match="grid_hw"):
            mask_from_qk(q, k, (8, 9), layout="BNHD", image_span=(0, 64))
        with pytest.raises(ValueError, match="k is on cpu but q is on cuda"):
            mask_from_qk(q, torch.empty(2, 397, 4, 16, dtype=torch.float16), (8, 8), layout="BNHD", image_span=(0, 64))
    with FakeTensorMode():
        big = torch.empty(1, 20, 2, 257, device="cuda")
        with pytest.raises(ValueError, match="d=257"):
            mask_from_qk(big, big, (3, 5), layout="BNHD", image_span=(5, 15))


_TRACE = """
import torch, sag_fast
from torch._subclasses.fake_tensor import FakeTensorMode
from torch._subclasses.functional_tensor import dispatch_functionalize
from torch.fx.experimental.proxy_tensor import make_fx
from sag_fast.ops.mask import mask_from_qk

def f(q, k):
    return mask_from_qk(q, k, (3, 4), layout="BNHD", image_span=(5, 12))

for device in ("cuda", "cpu"):
    with FakeTensorMode():
        args = (torch.empty(2, 17, 3, 16, device=device), torch.empty(2, 17, 3, 16, device=device))
    gm = make_fx(dispatch_functionalize(f), tracing_mode="fake")(*args)
    targets = [str(n.target) for n in gm.graph.nodes if n.op == "call_function"]
    print(device, targets.count("triton_kernel_wrapper_functional"), sorted(set(targets)))
"""


def test_compile_sees_the_joint_triton_kernels_on_cuda():
    """Functionalised, a joint CUDA call is its two Triton launches; a CPU call stays the op."""
    lines = functionalised_targets(_TRACE)
    assert lines["cuda"].startswith("2 ") and "sag_fast.mask" not in lines["cuda"]
    assert lines["cpu"].startswith("0 ") and "sag_fast.mask_from_qk.default" in lines["cpu"]


def test_torch_compile_fullgraph_joint():
    q, k, span = joint_qkv(2, 3, 12, 5, 16, torch.float32, "cpu", text_first=False)

    def f(q, k):
        return mask_from_qk(q, k, (3, 4), layout="BNHD", image_span=span)

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    ref = ref_joint_mass(q, k, span)
    assert_joint_mask(compiled(q, k), ref, (3, 4), 1.0)


# ---------------------------------------------------------------------------- AOT / ptxas spills
def _joint_aot_cases():
    cases = []
    for dt, tdt in (("fp16", torch.float16), ("fp32", torch.float32)):
        for d_pad in (64, 128, 256):
            lse, mass = ops.qk_configs(tdt, d_pad)
            cases += [("_qk_mass_kernel", dt, {**mass, "RELATIVE": True}), ("_qk_lse_kernel", dt, dict(lse))]
    return cases


@pytest.mark.slow
@pytest.mark.parametrize("arch", [80, 90])
@pytest.mark.parametrize("case", _joint_aot_cases(), ids=lambda c: f"{c[0][4:-7]}-{c[1]}-d{c[2]['D_PAD']}")
def test_joint_mass_kernel_compiles_without_spills(case, arch):
    """The relative-threshold mass kernel and both qk kernels with a key bias (padded text keys); the kernels
    without the bias are the ones test_ops_mask compiles."""
    from triton_aot import compile_report, spilled_bytes

    kernel, dtype, cfg = case
    cfg = dict(cfg)
    num_warps = cfg.pop("num_warps")
    sig, cx = _aot_spec(getattr(ops, kernel), dtype, {**cfg, "HAS_BIAS": True})
    report = compile_report(f"sag_fast.ops.mask:{kernel}", sig, cx, arch, num_warps=num_warps)
    assert spilled_bytes(report) == 0, report


# ------------------------------------------------------------------------------------ GPU only
@pytest.mark.gpu
@pytest.mark.parametrize("text_first,d", [(False, 64), (True, 128)])
def test_gpu_joint_sd3_and_flux_like(text_first, d):
    """SD3-like [image, text] at d=64 and Flux-like [text, image] at d=128, fp16, against an fp64 reference."""
    q, k, span = joint_qkv(2, 8, 32 * 32, 333, d, torch.float16, "cuda", text_first)
    ref = reference.joint_attention_mass_from_qk(q.transpose(1, 2).double(), k.transpose(1, 2).double(),
                                                 span).cpu()
    mask, mass = launch_mask_from_qk(q.transpose(1, 2), k.transpose(1, 2), 1.0, d ** -0.5, image_span=span,
                                     return_mass=True)
    torch.testing.assert_close(mass.double().cpu(), ref, rtol=1e-4, atol=1e-4)
    assert_joint_mask(mask.view(2, 32, 32), ref, (32, 32), 1.0)
    for _ in range(3):
        again, mass2 = launch_mask_from_qk(q.transpose(1, 2), k.transpose(1, 2), 1.0, d ** -0.5, image_span=span,
                                           return_mass=True)
        assert torch.equal(again, mask) and torch.equal(mass2.view(torch.int32), mass.view(torch.int32))
    assert torch.equal(mask_from_qk(q, k, (32, 32), layout="BNHD", image_span=span).view(2, -1), mask)


# ------------------------------------------------------------------------ key_bias (padded text keys)
def padded_text_bias(b, n, text, valid, dtype=torch.float32, finite=None):
    """(B, N) key bias: -inf on the text keys of `text` (a slice) past each row's valid count; finite: instead
    of -inf, these values (a float mask as Chroma passes it: 1 on kept keys, 0 on padding)."""
    bias = torch.zeros(b, n, dtype=dtype)
    for row, keep in enumerate(valid):
        pad = torch.arange(text.start, text.stop)[keep:]
        if finite is None:
            bias[row, pad] = float("-inf")
        else:
            bias[row] = finite[1]
            bias[row, pad] = finite[0]
    return bias


@pytest.mark.parametrize("text_first", [True, False], ids=["text-first", "text-last"])
def test_joint_key_bias_matches_reference(text_first, device, impl):
    """Padded text keys dropped per row (QwenImage's and Chroma's text masks), the rows with different padding;
    70 dropped keys in a row fill whole key blocks (the log-sum-exp's all-dropped-block path)."""
    n_img, n_txt, grid = 35, 80, (5, 7)
    q, k, span = joint_qkv(3, 2, n_img, n_txt, 16, torch.float32, device, text_first)
    text = slice(0, n_txt) if text_first else slice(n_img, n_img + n_txt)
    bias = padded_text_bias(3, n_img + n_txt, text, valid=[10, 80, 0]).to(device)
    ref = reference.joint_attention_mass_from_qk(q.transpose(1, 2).cpu().double(), k.transpose(1, 2).cpu().double(),
                                                 span, key_bias=bias.cpu().double())
    unbiased = ref_joint_mass(q, k, span)
    assert (ref - unbiased).abs().amax() > 0.1, "the dropped keys should change the mass"
    out = mask_from_qk(q, k, grid, layout="BNHD", image_span=span, key_bias=bias)
    assert_joint_mask(out, ref, grid, 1.0)
    if impl == "op":
        torch.testing.assert_close(ops._mass_qk_torch(q.transpose(1, 2).cpu(), k.transpose(1, 2).cpu(), 16 ** -0.5,
                                                      span, bias.cpu()).double(), ref, rtol=2e-5, atol=2e-5)
    elif INTERPRETED or device.type == "cuda":
        _, mass = launch_mask_from_qk(q.transpose(1, 2), k.transpose(1, 2), 1.0, 16 ** -0.5, image_span=span,
                                      key_bias=bias, return_mass=True)
        torch.testing.assert_close(mass.cpu().double(), ref, rtol=2e-5, atol=2e-5)


def test_key_bias_finite_and_without_span(device, impl):
    """A finite additive bias (SDPA adds a float attn_mask: Chroma's 0/1 mask is +1 on kept keys), and a key
    bias on plain self-attention (no image_span): both as the float64 softmax with the bias added."""
    q, k, span = joint_qkv(2, 3, 24, 9, 16, torch.float32, device, text_first=True)
    bias = padded_text_bias(2, 33, slice(0, 9), valid=[3, 9], finite=(0.0, 1.0)).to(device)
    qd, kd = q.transpose(1, 2).cpu().double(), k.transpose(1, 2).cpu().double()
    ref = reference.joint_attention_mass_from_qk(qd, kd, span, key_bias=bias.cpu().double())
    assert_joint_mask(mask_from_qk(q, k, (4, 6), layout="BNHD", image_span=span, key_bias=bias), ref, (4, 6), 1.0)
    qi, ki = q[:, 9:], k[:, 9:]  # image tokens only: plain self-attention, one key dropped per row
    drop = torch.zeros(2, 24, device=device)
    drop[0, 5], drop[1, 17] = float("-inf"), float("-inf")
    ref_plain = reference.attention_mass_from_qk(qi.transpose(1, 2).cpu().double(), ki.transpose(1, 2).cpu().double(),
                                                 key_bias=drop.cpu().double())
    assert ref_plain[0, 5] == 0 and ref_plain[1, 17] == 0
    out = mask_from_qk(qi, ki, (4, 6), layout="BNHD", key_bias=drop)
    far = ((ref_plain - 1.0).abs() > NEAR).view(2, 4, 6)
    expected = reference.mass_to_mask(ref_plain, (4, 6), 1.0)
    assert torch.equal(out.cpu()[far], expected[far]) and not out[0, 0, 5] and not out[1, 2, 5]


def test_key_bias_bad_shape_names_it():
    q, k, span = joint_qkv(2, 1, 12, 3, 8, torch.float32, torch.device("cpu"), text_first=True)
    with pytest.raises(ValueError, match=r"key_bias must be \(B, Nk\) = \(2, 15\)"):
        mask_from_qk(q, k, (3, 4), layout="BNHD", image_span=span, key_bias=torch.zeros(2, 12))
    with pytest.raises(ValueError, match="key_bias must be one of"):
        mask_from_qk(q, k, (3, 4), layout="BNHD", image_span=span, key_bias=torch.zeros(2, 15, dtype=torch.long))
