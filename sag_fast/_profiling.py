"""Counting the operators one call dispatches: the cost of a guided step in launches, and a check for host syncs."""
from __future__ import annotations

from collections import Counter
from typing import Any, Callable

from torch.utils._python_dispatch import TorchDispatchMode

# aten ops that copy a device value to the host (a sync on CUDA)
HOST_SYNC_OPS = ("aten._local_scalar_dense", "aten.item", "aten.nonzero", "aten.is_nonzero", "aten.equal")


class _Counter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.counts: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[str(func.overloadpacket._qualified_op_name).replace("::", ".")] += 1
        return func(*args, **(kwargs or {}))


def count_dispatched_ops(fn: Callable[[], Any]) -> tuple[Any, Counter]:
    """Runs fn() and returns (its result, Counter of op name -> calls), e.g. {"aten.convolution": 12, ...}.

    Ops are counted at the top of the dispatcher: a custom op (sag_fast.degrade) counts once, whatever it
    launches inside."""
    mode = _Counter()
    with mode:
        result = fn()
    return result, mode.counts


def host_syncs(counts: Counter) -> dict[str, int]:
    """The ops in `counts` that read a device value on the host."""
    return {name: n for name, n in counts.items() if name in HOST_SYNC_OPS}
