"""Attention capture on one self-attention layer that keeps the layer's own attention (SDPA, flash) for the output.

The mask needs only q and k of the rows being degraded: hooks read them where the layer computes them
(a diffusers `Attention`'s to_q/to_k, the in-projection of `nn.MultiheadAttention`, or the arguments of
`F.scaled_dot_product_attention` inside any other module) and `mask_from_qk` reduces them to the
(B, h, w) mask without an Nq x Nk buffer. Unarmed, every hook returns at once and changes nothing.
"""
from __future__ import annotations

import contextlib
import math
import re

import torch
import torch.nn.functional as F

from . import reference

try:
    from .ops.mask import mask_from_qk as _mask_from_qk
except ImportError:  # pragma: no cover - only before ops/mask.py exists
    def _mask_from_qk(q, k, grid_hw, threshold=1.0, scale=None):
        return reference.mass_to_mask(reference.attention_mass_from_qk(q, k, scale), grid_hw, threshold)

# default layers, first present wins: SD/SDXL UNet mid-block self-attention, UNet2DModel mid-block attention
_DEFAULT_LAYERS = ("mid_block.attentions.0.transformer_blocks.0.attn1", "mid_block.attentions.0")


def _is_diffusers_attention(module) -> bool:
    return all(isinstance(getattr(module, n, None), torch.nn.Module) for n in ("to_q", "to_k")) \
        and isinstance(getattr(module, "heads", None), int)


def _is_self_attention(module) -> bool:
    if isinstance(module, torch.nn.MultiheadAttention):
        return True
    return _is_diffusers_attention(module) and not getattr(module, "is_cross_attention", False)


def _default_layer(model, modules: dict) -> str:
    for name in _DEFAULT_LAYERS:
        if name in modules:
            return name
    blocks = getattr(model, "transformer_blocks", None)
    if isinstance(blocks, torch.nn.ModuleList) and len(blocks):
        name = f"transformer_blocks.{len(blocks) // 2}.attn1"
        if name in modules:
            return name
    raise ValueError(f"layer=None: no default self-attention layer is known for {type(model).__name__}; pass "
                     "layer= a module path (see model.named_modules()) or a regex matching exactly one module")


def resolve_layer(model: torch.nn.Module, layer: str | None) -> tuple[str, torch.nn.Module]:
    """(name, module) of the self-attention layer: an exact module path, else a regex over module names
    (searched). When the matches include attention modules, only their self-attention ones count, else
    a full match beats partial ones; exactly one module must remain."""
    modules = dict(model.named_modules())
    if layer is None:
        name = _default_layer(model, modules)
    elif not isinstance(layer, str) or not layer:
        raise ValueError(f"layer must be None or a non-empty module path / regex, got {layer!r}")
    elif layer in modules:
        name = layer
    else:
        try:
            pattern = re.compile(layer)
        except re.error as exc:
            raise ValueError(f"layer={layer!r} is neither a module path of {type(model).__name__} nor a valid regex ({exc})")
        hits = [n for n in modules if n and pattern.search(n)]
        attention = [n for n in hits if _is_self_attention(modules[n]) or _is_diffusers_attention(modules[n])]
        if attention:  # attention modules among the matches: the self-attention ones are the candidates
            hits = [n for n in attention if _is_self_attention(modules[n])] or attention
        else:  # a plain module (one calling SDPA): a full match wins over its children's names
            hits = [n for n in hits if pattern.fullmatch(n)] or hits
        if len(hits) != 1:
            some = ", ".join(hits[:6]) + (" ..." if len(hits) > 6 else "")
            raise ValueError(f"layer={layer!r} must match exactly one module of {type(model).__name__}, "
                             f"it matches {len(hits)}" + (f": {some}" if hits else ""))
        name = hits[0]
    module = modules[name]
    if _is_diffusers_attention(module) and getattr(module, "is_cross_attention", False):
        raise ValueError(f"layer={name!r} is not self-attention (a cross-attention layer); SAG needs a self-attention "
                         "layer such as an attn1")
    return name, module


def _spatial_input(args, kwargs):
    """(H, W) of the first 4-D tensor a module receives, else None."""
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor) and value.dim() == 4:
            return int(value.shape[-2]), int(value.shape[-1])
    return None


def _grid_candidates(hw, patch):
    """(h, w) grids an attention layer below an input of spatial size hw may have: the input itself,
    its patches, then halvings (ceil for stride-2 convs, floor for pooling)."""
    h, w = hw
    yield h, w
    if isinstance(patch, int) and patch > 1:
        yield h // patch, w // patch
    n = 2
    while n <= max(h, w):
        yield -(-h // n), -(-w // n)
        yield h // n, w // n
        n *= 2


def _patch_size(module) -> int | None:
    """A patchifying model's patch size (DiT, Transformer2DModel), read without diffusers' deprecated attribute path."""
    patch = vars(module).get("patch_size")
    config = getattr(module, "config", None)
    if patch is None and isinstance(config, dict):
        patch = config.get("patch_size")
    return patch if isinstance(patch, int) else None


def _norm_width(norm) -> int | None:
    for attr in ("normalized_shape", "dim"):
        shape = getattr(norm, attr, None)
        if isinstance(shape, (tuple, list, torch.Size)) and len(shape):
            return int(shape[-1])
        if isinstance(shape, int):
            return shape
    return None


def _heads_view(t: torch.Tensor, heads: int, head_dim: int, norm) -> torch.Tensor:
    """(B, N, heads*d) -> (B, heads, N, d), with the layer's q/k norm (per head, or across heads)."""
    if norm is not None and _norm_width(norm) not in (None, head_dim):
        t = norm(t)
        norm = None
    t = t.unflatten(-1, (heads, head_dim)).transpose(1, 2)  # a view for any strides
    return norm(t) if norm is not None else t


class AttentionCapture:
    """Computes the SAG mask of one self-attention layer on the forward it is armed for.

    AttentionCapture(model, layer=None, threshold=1.0, grid_hw=None): layer as in `resolve_layer`;
    grid_hw overrides the (h, w) attention grid when it cannot be inferred from the model's input.
    `with capture.capturing(rows): model(...)` leaves `capture.mask`, (rows, h, w) bool.
    """

    def __init__(self, model: torch.nn.Module, layer: str | None = None, threshold: float = 1.0,
                 grid_hw: tuple[int, int] | None = None):
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if hasattr(model, "_orig_mod"):  # torch.compile(module) wraps it: its layers are hidden under _orig_mod
            raise TypeError("model is a torch.compile'd module: install SAG on the module itself (model._orig_mod) "
                            "and compile its forward instead, e.g. `unet.forward = torch.compile(unet.forward)`")
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not threshold >= 0:
            raise ValueError(f"threshold must be a number >= 0, got {threshold!r}")
        if grid_hw is not None:
            if len(tuple(grid_hw)) != 2 or any(not isinstance(v, int) or v <= 0 for v in grid_hw):
                raise ValueError(f"grid_hw must be None or two positive ints (h, w), got {grid_hw!r}")
            grid_hw = tuple(grid_hw)
        self.model = model
        self.threshold = float(threshold)
        self.grid_hw = grid_hw
        self.layer_name, self.layer = resolve_layer(model, layer)
        if isinstance(self.layer, torch.nn.MultiheadAttention):
            self.kind = "multihead"
        elif _is_diffusers_attention(self.layer):
            self.kind = "diffusers"
        else:
            self.kind = "sdpa"
        self.mask: torch.Tensor | None = None
        self._armed = False
        self._done = False
        self._rows: slice | None = None
        self._q: torch.Tensor | None = None
        self._sdpa_original = None
        self._shapes: dict[int, tuple[int, int]] = {}
        self._handles: list = []
        self._install()

    # ------------------------------------------------------------------------------------- hooks
    def _install(self) -> None:
        # the spatial size entering the layer and each of its ancestors, nearest first: the grid is read off them
        parts = self.layer_name.split(".")
        modules = dict(self.model.named_modules())
        self._geometry = [modules[".".join(parts[:i])] for i in range(len(parts), -1, -1)
                          if ".".join(parts[:i]) in modules]
        for depth, module in enumerate(self._geometry):
            self._handles.append(module.register_forward_pre_hook(self._make_shape_hook(depth), with_kwargs=True))
        layer = self.layer
        if self.kind == "diffusers":
            self._handles.append(layer.to_q.register_forward_hook(self._on_q))
            self._handles.append(layer.to_k.register_forward_hook(self._on_k))
        elif self.kind == "multihead":
            self._handles.append(layer.register_forward_pre_hook(self._on_multihead, with_kwargs=True))
        else:
            self._handles.append(layer.register_forward_pre_hook(self._patch_sdpa))
        self._handles.append(layer.register_forward_hook(self._after_layer))

    def _make_shape_hook(self, depth: int):
        def hook(module, args, kwargs):
            if self._armed and not self._done:
                hw = _spatial_input(args, kwargs)
                if hw is not None:
                    self._shapes[depth] = hw
        return hook

    def _on_q(self, module, args, output):
        if self._armed and not self._done:
            self._q = output

    def _on_k(self, module, args, output):
        if not self._armed or self._done or self._q is None:
            return
        attn = self.layer
        q, k = self._q[self._slice()], output[self._slice()]
        self._q = None
        if q.dim() != 3 or k.dim() != 3:
            raise RuntimeError(f"layer {self.layer_name!r}: expected (B, N, C) projections, got q {tuple(q.shape)}, "
                               f"k {tuple(k.shape)}")
        head_dim = q.shape[-1] // attn.heads
        qh = _heads_view(q, attn.heads, head_dim, getattr(attn, "norm_q", None))
        kh = _heads_view(k, k.shape[-1] // head_dim, head_dim, getattr(attn, "norm_k", None))
        self._compute(qh, kh, getattr(attn, "scale", None))

    def _on_multihead(self, module, args, kwargs):
        if not self._armed or self._done:
            return
        query = args[0] if len(args) > 0 else kwargs.get("query")
        key = args[1] if len(args) > 1 else kwargs.get("key")
        if query is not key:
            raise ValueError(f"layer {self.layer_name!r} is not self-attention: the MultiheadAttention was called "
                             "with key different from query")
        if module.bias_k is not None or module.add_zero_attn:
            raise ValueError(f"layer {self.layer_name!r}: MultiheadAttention with add_bias_kv/add_zero_attn has extra "
                             "keys off the spatial grid; SAG cannot use it")
        x = query
        if x.dim() == 2:
            x = x.unsqueeze(0)
        elif not module.batch_first:
            x = x.transpose(0, 1)
        x = x[self._slice()]
        e, heads = module.embed_dim, module.num_heads
        bias = module.in_proj_bias
        if module._qkv_same_embed_dim:
            wq, wk = module.in_proj_weight[:e], module.in_proj_weight[e:2 * e]
        else:
            wq, wk = module.q_proj_weight, module.k_proj_weight
        bq, bk = (None, None) if bias is None else (bias[:e], bias[e:2 * e])
        head_dim = e // heads
        qh = _heads_view(F.linear(x, wq, bq), heads, head_dim, None)
        kh = _heads_view(F.linear(x, wk, bk), heads, head_dim, None)
        self._compute(qh, kh, None)

    def _patch_sdpa(self, module, args):
        if self._armed and not self._done and self._sdpa_original is None:
            self._sdpa_original = F.scaled_dot_product_attention
            F.scaled_dot_product_attention = self._sdpa

    def _sdpa(self, query, key, value, *args, **kwargs):
        original = self._sdpa_original
        if self._armed and not self._done:
            scale = kwargs.get("scale", args[3] if len(args) > 3 else None)
            q, k = query, key
            if q.dim() == 3:
                q, k = q.unsqueeze(1), k.unsqueeze(1)
            if q.dim() != 4 or k.dim() != 4:
                raise RuntimeError(f"layer {self.layer_name!r}: scaled_dot_product_attention got q {tuple(query.shape)}, "
                                   "expected (B, heads, N, d)")
            self._compute(q[self._slice()], k[self._slice()], scale)
        return original(query, key, value, *args, **kwargs)

    def _after_layer(self, module, args, output):
        if self._sdpa_original is not None:
            F.scaled_dot_product_attention = self._sdpa_original
            self._sdpa_original = None
        if self._armed and not self._done:
            how = {"diffusers": "to_q/to_k were not called (fused projections?)",
                   "multihead": "the MultiheadAttention did not run",
                   "sdpa": "the module did not call torch.nn.functional.scaled_dot_product_attention"}[self.kind]
            raise RuntimeError(f"layer {self.layer_name!r} ran but no attention was captured: {how}")

    # -------------------------------------------------------------------------------------- mask
    def _slice(self) -> slice:
        return self._rows if self._rows is not None else slice(None)

    def _grid(self, nk: int) -> tuple[int, int]:
        if self.grid_hw is not None:
            return reference.check_grid(self.grid_hw, nk, "grid_hw")
        for depth, module in enumerate(self._geometry):
            hw = self._shapes.get(depth)
            if hw is None:
                continue
            for h, w in _grid_candidates(hw, _patch_size(module)):
                if h * w == nk:
                    return h, w
        seen = [self._shapes[d] for d in sorted(self._shapes)]
        raise ValueError(f"layer {self.layer_name!r}: cannot infer the (h, w) grid of its Nk={nk} keys from the spatial "
                         f"inputs seen {seen}; pass AttentionCapture(..., grid_hw=(h, w))")

    def _compute(self, q: torch.Tensor, k: torch.Tensor, scale) -> None:
        if q.shape[2] != k.shape[2]:
            raise ValueError(f"layer {self.layer_name!r} is not self-attention: {q.shape[2]} queries and {k.shape[2]} keys")
        if k.shape[1] != q.shape[1]:  # grouped-query attention: each key head serves several query heads
            if k.shape[1] == 0 or q.shape[1] % k.shape[1]:
                raise RuntimeError(f"layer {self.layer_name!r}: {q.shape[1]} query heads vs {k.shape[1]} key heads")
            k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
        self.mask = _mask_from_qk(q, k, self._grid(k.shape[2]), self.threshold, scale)
        self._done = True

    # ------------------------------------------------------------------------------------ public
    @contextlib.contextmanager
    def capturing(self, rows: slice | None = None):
        """The layer's next forward computes `self.mask` for batch rows `rows` (None = all)."""
        if rows is not None and not isinstance(rows, slice):
            raise TypeError(f"rows must be a slice or None, got {type(rows).__name__}")
        if not self._handles:
            raise RuntimeError("this AttentionCapture was removed")
        self._armed, self._done, self._rows, self.mask, self._q = True, False, rows, None, None
        self._shapes.clear()
        try:
            yield self
        finally:
            self._armed, self._q = False, None
            self._shapes.clear()
            if self._sdpa_original is not None:  # the layer raised before its forward hook ran
                F.scaled_dot_product_attention = self._sdpa_original
                self._sdpa_original = None

    def observe_input(self, *args, **kwargs) -> None:
        """Record the model's input geometry (as its forward pre-hook would) for a forward that bypasses
        `model.__call__`: a hook that replaced `model.forward` and calls the original forward directly
        (sag_fast.diffusers) never runs the model's own pre-hooks, and DiT's only 4-D input is the model's."""
        if self._geometry and self._geometry[-1] is self.model:
            self._make_shape_hook(len(self._geometry) - 1)(self.model, args, kwargs)

    def remove(self) -> None:
        """Removes every hook; the model is exactly as before."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        if self._sdpa_original is not None:
            F.scaled_dot_product_attention = self._sdpa_original
            self._sdpa_original = None
        self._armed = False
        self._q = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()

    def __repr__(self) -> str:
        return f"AttentionCapture(layer={self.layer_name!r}, kind={self.kind!r}, threshold={self.threshold})"
