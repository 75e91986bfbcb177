"""Run code on *fake* CUDA tensors on a CPU-only torch, to catch device bugs without a GPU.

`FakeTensorMode` creates `device="cuda"` tensors on a CPU-only torch and raises on any device mix (custom ops
run their fakes). One gap: a CPU-only build refuses Python-level indexing (`t[0]`, `t[:, :n]`, `t[None]`) of
a cuda tensor (and `~t`) before the fake mode sees it. `fake_cuda()` adds a TorchFunctionMode that performs
exactly that indexing with the equivalent aten ops (select / slice / unsqueeze / index; bitwise_not for `~t`),
which keep devices as they are.
"""
from __future__ import annotations

import contextlib

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.overrides import TorchFunctionMode

aten = torch.ops.aten


def _index(t: torch.Tensor, index):
    if not isinstance(index, tuple):
        index = (index,)
    if any(i is Ellipsis for i in index):
        k = index.index(Ellipsis)
        used = sum(1 for i in index if i is not None and i is not Ellipsis)
        index = index[:k] + (slice(None),) * (t.dim() - used) + index[k + 1:]
    dim = 0
    tensors = []
    for i in index:
        if i is None:
            t = aten.unsqueeze(t, dim)
            dim += 1
        elif isinstance(i, bool):
            raise NotImplementedError("boolean scalar index")
        elif isinstance(i, int):
            t = aten.select(t, dim, i)
        elif isinstance(i, slice):
            step = 1 if i.step is None else i.step
            t = aten.slice(t, dim, i.start, i.stop, step)
            dim += 1
        elif isinstance(i, torch.Tensor):
            tensors.append((dim, i))
            dim += 1
        else:
            raise NotImplementedError(f"index {i!r}")
    if tensors:
        spec = [None] * t.dim()
        for d, i in tensors:
            spec[d] = i
        t = aten.index(t, spec)
    return t


class _Indexing(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.__getitem__ and args[0].is_cuda:
            return _index(args[0], args[1])
        if func is torch.Tensor.__setitem__ and args[0].is_cuda:
            target = _index(args[0], args[1])
            value = args[2]
            return target.copy_(value if isinstance(value, torch.Tensor) else torch.full_like(target, value))
        if func is torch.Tensor.__invert__ and args[0].is_cuda:  # `~mask`, refused the same way
            return aten.bitwise_not(args[0])
        if func is torch.Tensor.contiguous and args[0].is_cuda:
            t = args[0]
            return t if t.is_contiguous() else aten.clone(t, memory_format=torch.contiguous_format)
        return func(*args, **kwargs)


@contextlib.contextmanager
def fake_cuda():
    """`with fake_cuda() as mode:` fake tensors, cuda indexing enabled; real CPU tensors may flow in."""
    with FakeTensorMode(allow_non_fake_inputs=True) as mode, _Indexing():
        yield mode


def to_fake_cuda(module: torch.nn.Module) -> None:
    """Replace every parameter and buffer of module by an uninitialised fake cuda tensor (inside fake_cuda())."""
    prev = torch.__future__.get_overwrite_module_params_on_conversion()
    torch.__future__.set_overwrite_module_params_on_conversion(True)
    try:
        module._apply(lambda t: torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="cuda"))
    finally:
        torch.__future__.set_overwrite_module_params_on_conversion(prev)
