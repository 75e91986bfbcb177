"""The argument checks are written once in Python (sag_fast/ops/_dispatch.py, used by SAGConfig, the guider, the
sampler, the capture, the CLI and the ops' fakes); the C++ ops keep their own checks for direct calls. Both must
say the same thing: each bad call below runs on the C++ CPU kernel and on the op's Python fake (FakeTensorMode),
and the two messages are compared."""
from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import sag_fast  # noqa: F401  (registers the ops and their fakes)
from sag_fast.guidance import SAGConfig
from sag_fast.ops._dispatch import check_blur

pytestmark = pytest.mark.skipif(not sag_fast.extension_available(), reason="needs the compiled extension")


def _message(fn) -> str:
    with pytest.raises((ValueError, RuntimeError)) as info:
        fn()
    return str(info.value).split("\n")[0]


def _both(op, make):
    """(C++ kernel's message, Python fake's message) for op(*make())."""
    cpp = _message(lambda: op(*make()))
    with FakeTensorMode():
        fake = _message(lambda: op(*make()))
    return cpp, fake


def _degrade_args(kernel_size=9, sigma=1.0, c1_shape=(), x_shape=(2, 3, 16, 16)):
    return lambda: (torch.randn(*x_shape), torch.randn(*x_shape), None, torch.ones(c1_shape), torch.ones(()),
                    kernel_size, sigma)


@pytest.mark.parametrize("case", [
    dict(kernel_size=4), dict(kernel_size=-3), dict(sigma=-1.0), dict(sigma=0.0), dict(sigma=float("nan")),
    dict(c1_shape=(3,)), dict(kernel_size=33),
], ids=str)
def test_degrade_cpp_and_python_say_the_same(case):
    cpp, fake = _both(torch.ops.sag_fast.degrade, _degrade_args(**case))
    assert cpp == fake


@pytest.mark.parametrize("make", [
    lambda: (torch.randn(4, 3, 8, 8), torch.randn(2, 3, 8, 8).double(), 1.0, 0.5, -1),
    lambda: (torch.randn(4, 3, 8, 8), torch.randn(2, 3, 8, 9), 1.0, 0.5, -1),
    lambda: (torch.randn(4, 3, 8, 8), torch.randn(2, 3, 8, 8), 1.0, 0.5, 7),
    lambda: (torch.randn(3, 3, 8, 8), torch.randn(2, 3, 8, 8), 1.0, 0.5, -1),
], ids=["dtype", "shape", "guided_channels", "batch"])
def test_guidance_combine_cpp_and_python_say_the_same(make):
    cpp, fake = _both(torch.ops.sag_fast.guidance_combine, make)
    assert cpp == fake


def test_the_python_rules_are_the_ones_the_kernel_enforces():
    """The config and the op share one rule and one wording (only the label differs)."""
    for bad in (4, 0, -1):
        with pytest.raises(ValueError) as op:
            check_blur(bad, 1.0)
        with pytest.raises(ValueError) as cfg:
            SAGConfig(kernel_size=bad)
        assert str(op.value).replace("degrade: kernel_size", "X") == str(cfg.value).replace("SAGConfig.kernel_size", "X")
