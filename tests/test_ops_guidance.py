"""sag_fast.ops.guidance (the C++/CUDA ops sag_fast::guidance_combine and guidance_shift_) vs the reference."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from sag_fast import _lib, reference
from sag_fast.ops.guidance import guidance_combine, guidance_shift_

pytestmark = pytest.mark.skipif(not _lib.extension_available(), reason="sag_fast._C is not built")

# Kernel and reference both compute in fp32 (fp64) and round once, so they differ by FMA contraction
# at most: a few ulps of the accumulation type, one rounding step of the storage type.
TOL = {
    torch.float64: dict(rtol=1e-12, atol=1e-12),
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.float16: dict(rtol=2e-3, atol=1e-3),
    torch.bfloat16: dict(rtol=1.6e-2, atol=8e-3),
}
W, S = 5.5, 0.75

# (B, C, guided_channels, C' of degraded, dims past the channels): odd batches and channel counts,
# learned-variance layouts (guided C of 2C, degraded with 2C), 0-D, 1-D, 2-D and video-like 3-D extras.
CASES = [
    (1, 4, -1, 4, (8, 8)),
    (3, 3, -1, 3, (5, 7)),
    (5, 16, -1, 16, (3, 11)),
    (3, 8, 4, 8, (7, 5)),       # DiT/ADM: 2C outputs, C guided, degraded has 2C too
    (1, 6, 3, 3, (9,)),         # degraded has exactly the guided channels; 1-D extra dims (tokens)
    (5, 4, 1, 8, (13,)),
    (3, 16, 8, 16, (3, 5, 7)),  # video-like (T, H, W)
    (1, 3, 2, 4, (2, 3, 5)),
    (5, 3, -1, 3, ()),          # no dims past the channels: planes of one element
]


def _ids(case):
    b, c, g, cd, rest = case
    return f"B{b}-C{c}-g{g}-Cd{cd}-{'x'.join(map(str, rest)) or 'none'}"


def rand(*shape, dtype=torch.float32, device="cpu"):
    return torch.randn(*shape, dtype=torch.float64).to(dtype=dtype, device=device)


def same_layout_copy(t):
    """A copy of t with t's strides and storage offset (and, for a view, a copy of the rest of its base)."""
    if t._base is None:
        return t.clone()  # preserve_format keeps channels_last and other dense layouts
    return t._base.clone().as_strided(t.shape, t.stride(), t.storage_offset())


def assert_close_ref(out, ref):
    assert out.dtype == ref.dtype and out.shape == ref.shape
    torch.testing.assert_close(out.double(), ref.double(), **TOL[ref.dtype])


# --------------------------------------------------------------------------------------- combine
@pytest.mark.parametrize("case", CASES, ids=_ids)
@pytest.mark.parametrize("ways", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
def test_combine_matches_reference(case, ways, dtype):
    b, c, g, cd, rest = case
    pred, deg = rand(ways * b, c, *rest, dtype=dtype), rand(b, cd, *rest, dtype=dtype)
    out = guidance_combine(pred, deg, W, S, g)
    assert out.is_contiguous()
    assert_close_ref(out, reference.guidance_combine(pred, deg, W, S, g))


def test_combine_copies_unguided_channels_from_the_conditional_way():
    pred, deg = rand(6, 8, 5, 3), rand(3, 8, 5, 3)
    out = guidance_combine(pred, deg, W, S, guided_channels=4)
    assert torch.equal(out[:, 4:], pred[3:, 4:])  # bit-exact copy of the learned variance
    one = guidance_combine(pred[:3], deg, W, S, guided_channels=4)
    assert torch.equal(one[:, 4:], pred[:3, 4:])


def test_combine_scales_are_used():
    # Independent of the reference: zero scales give the unconditional way, w=1 the conditional one.
    pred, deg = rand(4, 3, 7, 5), rand(2, 3, 7, 5)
    torch.testing.assert_close(guidance_combine(pred, deg, 0.0, 0.0), pred[:2])
    torch.testing.assert_close(guidance_combine(pred, deg, 1.0, 0.0), pred[2:])
    torch.testing.assert_close(guidance_combine(pred[:2], deg, 3.0, 1.0), 2 * pred[:2] - deg)


def test_combine_empty_batch_and_plane():
    assert guidance_combine(rand(0, 4, 3), rand(0, 4, 3), W, S).shape == (0, 4, 3)
    assert guidance_combine(rand(4, 4, 0, 5), rand(2, 4, 0, 5), W, S).shape == (2, 4, 0, 5)


# ---------------------------------------------------------------------------------------- shift
@pytest.mark.parametrize("case", CASES, ids=_ids)
@pytest.mark.parametrize("ways,uncond_index", [(1, 0), (2, 0), (2, 1), (3, 0), (3, 2)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16])
def test_shift_matches_reference(case, ways, uncond_index, dtype):
    b, c, g, cd, rest = case
    pred, deg = rand(ways * b, c, *rest, dtype=dtype), rand(b, cd, *rest, dtype=dtype)
    expected = reference.guidance_shift(pred, deg, S, g, uncond_index)
    work = pred.clone()
    assert guidance_shift_(work, deg, S, g, uncond_index) is work
    assert_close_ref(work, expected)


def test_shift_reads_uncond_before_writing_it():
    # Independent of the reference: every way moves by the same delta, computed from the original u.
    for uncond_index in (0, 1):
        pred, deg = rand(4, 4, 600), rand(2, 4, 600)  # planes longer than the CPU kernel's block
        u = pred[2 * uncond_index:2 * uncond_index + 2].clone()
        work = guidance_shift_(pred.clone(), deg, 2.0, uncond_index=uncond_index)
        torch.testing.assert_close(work - pred, torch.cat([2.0 * (u - deg)] * 2))


# ------------------------------------------------------------------------------- strided inputs
def _strided_pairs():
    """(name, pred, degraded) with layouts the kernels read in place or copy (see ops/guidance.py)."""
    b, c = 3, 4
    full = rand(2 * b, c, 9, 11)
    deg_full = rand(b, 8, 9, 11)
    big = rand(2 * b + 1, c, 9, 11)
    yield "contiguous", full, deg_full[:, :c].contiguous()
    yield "degraded channel slice", full, deg_full[:, :c]            # out[:, :4] of an 8-channel tensor
    yield "degraded channel slice from 1", full, deg_full[:, 1:1 + c]  # offset start
    yield "pred batch offset view", big[1:], deg_full                 # storage offset, in place
    yield "channels_last pred", full.to(memory_format=torch.channels_last), deg_full
    yield "channels_last both", full.to(memory_format=torch.channels_last), \
        deg_full.contiguous(memory_format=torch.channels_last)
    yield "transposed", full.transpose(2, 3), deg_full.transpose(2, 3)
    yield "transposed pred only", full.transpose(2, 3).contiguous().transpose(2, 3), deg_full
    yield "expanded degraded", full, rand(1, c, 9, 11).expand(b, c, 9, 11)
    yield "channel-strided pred", rand(2 * b, 2 * c, 9, 11)[:, ::2], deg_full


@pytest.mark.parametrize("name,pred,deg", list(_strided_pairs()), ids=lambda v: v if isinstance(v, str) else "")
def test_combine_strided_inputs(name, pred, deg):
    for p in (pred, pred[: pred.shape[0] // 2]):  # two ways, and one way
        for g in (-1, 2):
            out = guidance_combine(p, deg, W, S, g)
            assert out.is_contiguous()
            assert_close_ref(out, reference.guidance_combine(p, deg, W, S, g))


@pytest.mark.parametrize("name,pred,deg", list(_strided_pairs()), ids=lambda v: v if isinstance(v, str) else "")
def test_shift_strided_inputs_land_in_pred(name, pred, deg):
    for uncond_index in (0, 1):
        work = same_layout_copy(pred)
        ptr, strides = work.data_ptr(), work.stride()
        expected = reference.guidance_shift(pred, deg, S, 2, uncond_index)
        guidance_shift_(work, deg, S, 2, uncond_index)
        assert work.data_ptr() == ptr and work.stride() == strides
        assert_close_ref(work, expected)
        if pred._base is not None:  # the rest of the underlying storage is untouched
            outside = torch.ones(pred._base.numel(), dtype=torch.bool)
            outside[torch.arange(pred._base.numel()).as_strided(pred.shape, pred.stride(), pred.storage_offset())] = False
            assert torch.equal(work._base.flatten()[outside], pred._base.flatten()[outside])


# ------------------------------------------------------------------------------------- bad input
def _bad_inputs():
    h = torch.float16
    # (op, args, expected words in the message: the argument and what was expected)
    yield "combine", (rand(2, 4, 3), rand(1, 4, 3, dtype=h)), "degraded has dtype"
    yield "combine", (torch.ones(2, 4, 3, dtype=torch.int32), torch.ones(1, 4, 3, dtype=torch.int32)), "pred must be float32"
    yield "combine", (rand(4), rand(2)), "pred must have at least 2 dims"
    yield "combine", (rand(2, 4, 3), rand(1, 4, 5)), "degraded must match pred past the channels"
    yield "combine", (rand(2, 4, 3, 1), rand(1, 4, 3)), "degraded must match pred past the channels"
    yield "combine", (rand(5, 4, 3), rand(2, 4, 3)), "pred batch 5 must be B .one way. or 2B"
    yield "combine", (rand(3, 4, 3), rand(2, 4, 3)), "pred batch 3 must be B"
    yield "combine", (rand(2, 4, 3), rand(1, 4, 3), 0), "guided_channels=0 must be -1"
    yield "combine", (rand(2, 4, 3), rand(1, 4, 3), 5), r"guided_channels=5 must be -1 \(all\) or in 1..4"
    yield "combine", (rand(2, 4, 3), rand(1, 4, 3), -2), "guided_channels=-2"
    yield "combine", (rand(2, 4, 3), rand(1, 2, 3), -1), r"guided_channels=4 exceeds the channels of degraded \(2\)"
    yield "combine", (rand(2, 0, 3), rand(1, 0, 3)), "no channels to guide|guided_channels"
    yield "shift", (rand(2, 4, 3), rand(1, 4, 3, dtype=h)), "degraded has dtype"
    yield "shift", (rand(5, 4, 3), rand(2, 4, 3)), "pred batch 5 must be a positive multiple k.B"
    yield "shift", (rand(2, 4, 3), rand(0, 4, 3)), "pred batch 2 must be a positive multiple"
    yield "shift", (rand(6, 4, 3), rand(2, 4, 3), -1, 3), r"uncond_index=3 must be in 0..2 \(pred holds 3 ways\)"
    yield "shift", (rand(4, 4, 3), rand(2, 4, 3), -1, -1), "uncond_index=-1"
    yield "shift", (rand(2, 4, 3), rand(1, 4, 3), 7), "guided_channels=7"
    yield "shift", (rand(2, 4, 3), rand(1, 4, 7)), "degraded must match pred"


def _call(op, args):
    if op == "combine":
        pred, deg, *rest = args
        return guidance_combine(pred, deg, W, S, *rest)
    pred, deg, *rest = args
    return guidance_shift_(pred, deg, S, *rest)


@pytest.mark.parametrize("device", ["cpu", "meta"])  # meta runs the fake: its checks mirror the kernels'
@pytest.mark.parametrize("op,args,match", list(_bad_inputs()), ids=lambda v: v if isinstance(v, str) else "")
def test_bad_input_names_the_argument(device, op, args, match):
    args = tuple(a.to(device) if isinstance(a, torch.Tensor) else a for a in args)
    prefix = "guidance_combine" if op == "combine" else "guidance_shift_"
    with pytest.raises(ValueError, match=match) as info:
        _call(op, args)
    assert str(info.value).split("\n")[0].startswith(prefix)


def test_mixed_devices_are_rejected():
    with pytest.raises(ValueError, match="degraded is on meta but pred is on cpu"):
        guidance_combine(rand(2, 4, 3), torch.empty(1, 4, 3, device="meta"), W, S)
    with pytest.raises(ValueError, match="same device"):
        guidance_shift_(torch.empty(2, 4, 3, device="meta"), rand(1, 4, 3), S)


@pytest.mark.parametrize("op", ["combine", "shift"])
@pytest.mark.parametrize("pred_device,deg_device", [("cuda:0", "cpu"), ("cpu", "cuda:0"), ("cuda:0", "cuda:1")])
def test_mixed_devices_name_both_arguments_fake(op, pred_device, deg_device):
    """Under FakeTensorMode (CUDA tensors without a GPU) the fakes refuse a device mix, naming both."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        pred = torch.empty(4, 3, 5, 6, device=pred_device)
        deg = torch.empty(2, 3, 5, 6, device=deg_device)
        with pytest.raises(ValueError, match=f"degraded is on {deg_device} but pred is on {pred_device}"):
            _call(op, (pred, deg))


def test_fake_cuda_results():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        pred = torch.empty(4, 6, 5, 7, dtype=torch.bfloat16, device="cuda")
        deg = torch.empty(2, 6, 5, 7, dtype=torch.bfloat16, device="cuda")
        out = guidance_combine(pred, deg, W, S, 3)
        assert out.shape == (2, 6, 5, 7) and out.dtype == torch.bfloat16 and out.device.type == "cuda"
        assert guidance_shift_(pred, deg, S, 3, 1) is pred
        with pytest.raises(ValueError, match="float32, float16 or bfloat16 on cuda"):
            guidance_combine(pred.double(), deg.double(), W, S)


def test_shift_rejects_overlapping_memory():
    with pytest.raises(ValueError, match="pred has elements that share memory"):
        guidance_shift_(rand(1, 4, 3).expand(2, 4, 3), rand(1, 4, 3), S)
    pred = rand(2, 4, 3)
    with pytest.raises(ValueError, match="degraded shares memory with pred"):
        guidance_shift_(pred, pred[1:], S)


def test_extension_loads_when_sag_fast_is_imported_before_torch():
    code = "import sag_fast; assert sag_fast.extension_available(), sag_fast._lib._error"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr


def test_missing_extension_raises_a_clear_error():
    code = (
        "import sys; sys.modules['sag_fast._C'] = None\n"
        "import torch, sag_fast\n"
        "from sag_fast.ops.guidance import guidance_combine\n"
        "assert not sag_fast.extension_available()\n"
        "try:\n"
        "    guidance_combine(torch.zeros(2, 4, 3), torch.zeros(1, 4, 3), 1.0, 1.0)\n"
        "except RuntimeError as e:\n"
        "    print('ERR', e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "ERR sag_fast._C, the compiled extension, is not available" in out.stdout


# ------------------------------------------------------------------------------ torch.library / compile
def test_opcheck_combine():
    for pred, deg, g in [(rand(6, 4, 5, 3), rand(3, 8, 5, 3), 2), (rand(3, 4, 7), rand(3, 4, 7), -1),
                         (rand(4, 3, 5, 5).to(memory_format=torch.channels_last), rand(2, 6, 5, 5)[:, :3], -1)]:
        torch.library.opcheck(torch.ops.sag_fast.guidance_combine.default, (pred, deg, W, S, g))


def test_opcheck_shift():
    for pred, deg, g, ui in [(rand(6, 4, 5, 3), rand(3, 8, 5, 3), 2, 1), (rand(9, 3, 7), rand(3, 3, 7), -1, 2),
                             (rand(4, 3, 5, 5).transpose(2, 3), rand(2, 3, 5, 5), -1, 0)]:
        torch.library.opcheck(torch.ops.sag_fast.guidance_shift_.default, (pred, deg, S, g, ui))


def _step(pred, degraded):
    """A DiT-like step: shift the cond-first batch in place, then combine with guided channels."""
    shifted = guidance_shift_(pred.clone(), degraded, 0.5, guided_channels=4, uncond_index=1)
    return guidance_combine(shifted, degraded, 4.0, 0.75, guided_channels=4) * 2


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_compile_fullgraph(backend):
    torch._dynamo.reset()
    pred, deg = rand(6, 8, 5, 7), rand(3, 4, 5, 7)
    compiled = torch.compile(_step, fullgraph=True, backend=backend)
    torch.testing.assert_close(compiled(pred, deg), _step(pred, deg))
    pred, deg = rand(10, 8, 3, 9), rand(5, 4, 3, 9)  # new shapes: recompiles (dynamic) without a break
    torch.testing.assert_close(compiled(pred, deg), _step(pred, deg))


@pytest.mark.slow
def test_compile_fullgraph_inductor():
    torch._dynamo.reset()
    pred, deg = rand(6, 8, 5, 7), rand(3, 4, 5, 7)
    compiled = torch.compile(_step, fullgraph=True, backend="inductor")
    torch.testing.assert_close(compiled(pred, deg), _step(pred, deg))


# ------------------------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("rest", [(64, 64), (7, 9), (3, 5, 7), (13,)], ids=str)  # vector path, odd (scalar) sizes
@pytest.mark.parametrize("ways", [1, 2])
def test_cuda_combine_matches_reference(dtype, rest, ways):
    b, c, g = 3, 8, 4
    pred, deg = rand(ways * b, c, *rest, dtype=dtype, device="cuda"), rand(b, c, *rest, dtype=dtype, device="cuda")
    for gc in (-1, g):
        out = guidance_combine(pred, deg, W, S, gc)
        assert out.is_cuda and out.is_contiguous()
        assert_close_ref(out, reference.guidance_combine(pred, deg, W, S, gc))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cuda_unaligned_and_strided_inputs(dtype):
    big = rand(7, 8, 32, 32, dtype=dtype, device="cuda")
    deg_full = rand(3, 9, 32, 32, dtype=dtype, device="cuda")
    flat = rand(6 * 8 * 32 * 32 + 1, dtype=dtype, device="cuda")
    cases = [
        (big[1:], deg_full[:, :8]),                              # aligned planes, vector path
        (flat[1:].view(6, 8, 32, 32), deg_full[:, 1:]),          # every plane start off by one element
        (big[1:].to(memory_format=torch.channels_last), deg_full),
        (big[1:].transpose(2, 3), deg_full.transpose(2, 3)),
        (rand(6, 8, 31, 33, dtype=dtype, device="cuda"), rand(3, 8, 31, 33, dtype=dtype, device="cuda")),
    ]
    for pred, deg in cases:
        assert_close_ref(guidance_combine(pred, deg, W, S, 4), reference.guidance_combine(pred, deg, W, S, 4))
        for ui in (0, 1):
            work = same_layout_copy(pred)
            expected = reference.guidance_shift(work, deg, S, 4, ui)
            ptr = work.data_ptr()
            guidance_shift_(work, deg, S, 4, ui)
            assert work.data_ptr() == ptr
            assert_close_ref(work, expected)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("ways,uncond_index", [(1, 0), (2, 1), (3, 2)])
def test_cuda_shift_matches_reference(dtype, ways, uncond_index):
    pred = rand(ways * 3, 8, 24, 40, dtype=dtype, device="cuda")
    deg = rand(3, 8, 24, 40, dtype=dtype, device="cuda")
    expected = reference.guidance_shift(pred, deg, S, 4, uncond_index)
    assert_close_ref(guidance_shift_(pred, deg, S, 4, uncond_index), expected)


@pytest.mark.gpu
def test_cuda_large_batch_of_small_planes_and_side_stream():
    """More planes than gridDim.y allows (65535): the plane loop's grid stride. On a side stream whose inputs
    are written after a long sleep: a launch on the default stream would read them before the write lands."""
    src_pred, src_deg = rand(2 * 9000, 16, 3, device="cuda"), rand(9000, 16, 3, device="cuda")
    pred, deg = torch.zeros_like(src_pred), torch.zeros_like(src_deg)
    shifted = torch.zeros_like(src_pred)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        torch.cuda._sleep(50_000_000)
        pred.copy_(src_pred)
        deg.copy_(src_deg)
        shifted.copy_(src_pred)
        out = guidance_combine(pred, deg, W, S)
        guidance_shift_(shifted, deg, S)
    torch.cuda.synchronize()
    assert_close_ref(out, reference.guidance_combine(src_pred, src_deg, W, S))
    assert_close_ref(shifted, reference.guidance_shift(src_pred, src_deg, S))


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_cuda_tensors_on_another_device_than_the_current_one():
    pred, deg = rand(6, 8, 16, 16, device="cuda:1"), rand(3, 8, 16, 16, device="cuda:1")
    with torch.cuda.device(0):
        out = guidance_combine(pred, deg, W, S)
    assert out.device == torch.device("cuda:1")
    assert_close_ref(out, reference.guidance_combine(pred, deg, W, S))


@pytest.mark.gpu
def test_cuda_rejects_fp64_and_mixed_devices():
    with pytest.raises(ValueError, match="pred must be float32, float16 or bfloat16 on cuda"):
        guidance_combine(rand(2, 4, 3, dtype=torch.float64, device="cuda"),
                         rand(1, 4, 3, dtype=torch.float64, device="cuda"), W, S)
    with pytest.raises(ValueError, match="same device"):
        guidance_combine(rand(2, 4, 3, device="cuda"), rand(1, 4, 3), W, S)


@pytest.mark.gpu
def test_cuda_opcheck_and_compile():
    pred, deg = rand(6, 8, 16, 16, device="cuda"), rand(3, 8, 16, 16, device="cuda")
    torch.library.opcheck(torch.ops.sag_fast.guidance_combine.default, (pred, deg, W, S, 4))
    torch.library.opcheck(torch.ops.sag_fast.guidance_shift_.default, (pred.clone(), deg, S, 4, 1))
    torch._dynamo.reset()
    torch.testing.assert_close(torch.compile(_step, fullgraph=True)(pred, deg), _step(pred, deg))
