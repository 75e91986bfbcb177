"""TEST-ONLY shims that make a CPU process look enough like a GPU rank for diffusers' context parallelism.

They belong to the tests and are never imported by the package. With them, two gloo processes on the CPU run a
tiny transformer under `enable_parallelism(ContextParallelConfig(ulysses_degree=2 | ring_degree=2))` and match the
single-process forward to ~1e-7:

1. `torch.accelerator.device_count()` is 0 without an accelerator, and diffusers' `_resolve_parallel_config`
   computes `rank % device_count()`: the shim answers 1 (every rank on the one "device", the CPU).
2. Ring attention asks its backend's forward op for the log-sum-exp of each key chunk; the "native" backend's op
   refuses (`return_lse=True`). The shim's op returns it from `aten._scaled_dot_product_flash_attention_for_cpu`,
   the CPU flash kernel, which computes it anyway. Without `return_lse` it is the native op, unchanged.
"""
from __future__ import annotations

import torch


def _cpu_native_forward_op(ctx, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                           enable_gqa=False, return_lse=False, _save_ctx=True, _parallel_config=None):
    from diffusers.models import attention_dispatch

    if not return_lse:
        return _ORIGINAL_OP(ctx, query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, return_lse,
                            _save_ctx=_save_ctx, _parallel_config=_parallel_config)
    if attn_mask is not None or enable_gqa:
        raise ValueError("cp_test_shims: the CPU log-sum-exp op takes no attn_mask / gqa")
    q, k, v = (x.permute(0, 2, 1, 3) for x in (query, key, value))  # (B, S, H, D) -> (B, H, S, D)
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, dropout_p, is_causal, scale=scale)[:2]
    del attention_dispatch
    return out.permute(0, 2, 1, 3), lse.permute(0, 2, 1)  # the ring wants (B, S, H, D) and (B, S, H)


_ORIGINAL_OP = None


def install() -> None:
    """Both shims, in this process (call in each spawned rank before enable_parallelism)."""
    global _ORIGINAL_OP
    from diffusers.models import attention_dispatch

    torch.accelerator.device_count = lambda: 1
    if _ORIGINAL_OP is None:
        _ORIGINAL_OP = attention_dispatch._native_attention_forward_op
        attention_dispatch._native_attention_forward_op = _cpu_native_forward_op


def init_process_group(rank: int, world_size: int, rendezvous_file: str) -> None:
    """gloo over a file:// rendezvous (no network), plus the shims."""
    torch.distributed.init_process_group("gloo", init_method=f"file://{rendezvous_file}", rank=rank,
                                         world_size=world_size)
    install()
