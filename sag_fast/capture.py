"""Attention capture on one self-attention layer, at the attention computation itself.

SAG's mask must come from the q and k the layer really attends with: after LoRA (added before or after
SAG), fused QKV projections, the layer's q/k norms and rotary embeddings, whatever the attention processor.
So the capture does not hook `to_q`/`to_k`: while the armed layer runs, a `TorchFunctionMode` (thread-local,
seen by `torch.compile`) watches the layer's own call of `F.scaled_dot_product_attention` (diffusers'
SDPA processors, its attention dispatch, `nn.MultiheadAttention`, custom modules) or its softmax over keys
(diffusers' eager `AttnProcessor`, `need_weights=True`), and reduces q/k (with `mask_from_qk`, no Nq x Nk
buffer) or the probabilities (`mask_from_probs`) to the (rows, h, w) mask. The layer's output is its own.

The layer gets one named diffusers hook (`sag_fast_capture`, through `HookRegistry`) whose forward runs the
layer's own forward, under the probe when armed: whatever processor the layer has now (swapped, fused, LoRA'd
since) is the one watched, and diffusers' filtering of `cross_attention_kwargs` by the processor's signature is
untouched. `nn.MultiheadAttention` gets a pre-hook that projects q and k itself (its fused path shows no SDPA).
`AttentionCapture(...)` runs the layer once on a 4-token dummy input to prove that the attention is visible (an
xformers or custom CUDA processor is refused here, not mid-sampling), and refuses sliced attention.

Armed for one caller only: `capturing()` records the arming thread, and a forward of the layer from any other
thread (another pipeline sharing the denoiser) passes straight through. Inside a compiled region the thread is
read off the torch-function mode stack instead (thread-local, and guarded by Dynamo): `capturing(compiled=True)`
pushes a marker mode for the armed forward.
"""
from __future__ import annotations

import contextlib
import math
import re
import threading

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode, _get_current_function_mode_stack

from . import named_hooks, sharded
from .ops._dispatch import check_nonnegative
from .ops.mask import mask_from_probs, mask_from_qk

# generic default layers for a model no registry record names, first present wins: a UNet's mid-block
# self-attention (a transformer block's attn1, or the block's own attention)
_DEFAULT_LAYERS = ("mid_block.attentions.0.transformer_blocks.0.attn1", "mid_block.attentions.0")
_SOFTMAX = (torch.softmax, F.softmax, torch.Tensor.softmax)


def _is_diffusers_attention(module) -> bool:
    return all(isinstance(getattr(module, n, None), torch.nn.Module) for n in ("to_q", "to_k")) \
        and isinstance(getattr(module, "heads", None), int)


_ADDED_KV = ("AttnAddedKVProcessor", "AttnAddedKVProcessor2_0")


def _is_added_kv(module) -> bool:
    """diffusers' added-KV attention (DeepFloyd IF's and Kandinsky's UNets, AttnAddedKVProcessor(2_0)): the
    queries are the image tokens, the keys [text keys from add_k_proj, image keys], one softmax over both. The
    processor fixes that key order (SD3's and Flux's layers also have added K/V projections, with another)."""
    return _is_diffusers_attention(module) and getattr(module, "added_kv_proj_dim", None) is not None \
        and type(getattr(module, "processor", None)).__name__ in _ADDED_KV


def _has_processor(module) -> bool:
    return hasattr(module, "processor") and callable(getattr(module, "set_processor", None))


def _is_self_attention(module) -> bool:
    if isinstance(module, torch.nn.MultiheadAttention):
        return True
    return _is_diffusers_attention(module) and not getattr(module, "is_cross_attention", False)


def _looks_like_attention(name: str, module) -> bool:
    """A module SAG can read: a diffusers attention layer, nn.MultiheadAttention, or a module named as attention
    (a custom one that calls SDPA). A conv, a norm or a block of layers is not."""
    if _is_diffusers_attention(module) or isinstance(module, torch.nn.MultiheadAttention):
        return True
    label = (type(module).__name__ + " " + name.rsplit(".", 1)[-1]).lower()
    return any(word in label for word in ("attention", "attn", "sdpa"))


def _default_layer(model, modules: dict) -> str:
    for name in _DEFAULT_LAYERS:
        if name in modules:
            return name
    blocks = getattr(model, "transformer_blocks", None)
    if isinstance(blocks, torch.nn.ModuleList) and len(blocks):  # the middle block: DiT/PixArt attn1, SD3/Flux attn
        for attr in ("attn1", "attn"):
            name = f"transformer_blocks.{len(blocks) // 2}.{attr}"
            if name in modules:
                return name
    raise ValueError(f"layer=None: no default self-attention layer is known for {type(model).__name__}; pass "
                     "layer= a module path (see model.named_modules()) or a regex matching exactly one module")


def unwrap_compiled(model: torch.nn.Module) -> torch.nn.Module:
    """The module under `torch.compile(module)` wrappers (their layers live on `_orig_mod`)."""
    while isinstance(getattr(model, "_orig_mod", None), torch.nn.Module):
        model = model._orig_mod
    return model


def resolve_layer(model: torch.nn.Module, layer: str | None, joint: bool = False,
                  self_context: bool = False) -> tuple[str, torch.nn.Module]:
    """(name, module) of the self-attention layer: an exact module path, else a regex over module names
    (searched). When the matches include attention modules, only their self-attention ones count, else
    a full match beats partial ones; exactly one module must remain, and it must be an attention layer."""
    modules = dict(unwrap_compiled(model).named_modules())
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
    if _is_diffusers_attention(module) and getattr(module, "added_kv_proj_dim", None) is not None and not joint \
            and not _is_added_kv(module) and not _sliced(getattr(module, "processor", None)):
        raise ValueError(f"layer={name!r} is joint attention (added key/value projections: its keys are the text "
                         "tokens and the image tokens together) with a processor that does not fix where the image "
                         f"tokens are ({type(getattr(module, 'processor', None)).__name__}); SAG reads joint attention "
                         "where it knows that (SD3, Flux: AttentionCapture(..., joint=...); diffusers' "
                         "AttnAddedKVProcessor2_0 of IF / Kandinsky); pick a pure self-attention layer with layer=...")
    if _is_added_kv(module) and getattr(module, "only_cross_attention", False):
        raise ValueError(f"layer={name!r} is added-KV attention with only_cross_attention: its keys are the text "
                         "tokens alone, no image keys to build SAG's mask from; pick another layer with layer=...")
    # self_context: a layer flagged as cross-attention that the model calls with its own input as the context
    # (Kandinsky 3); the layer hook checks that at every guided forward
    if _is_diffusers_attention(module) and getattr(module, "is_cross_attention", False) and not _is_added_kv(module) \
            and not self_context:
        raise ValueError(f"layer={name!r} is not self-attention (a cross-attention layer); SAG needs a self-attention "
                         "layer such as an attn1")
    if not _looks_like_attention(name, module):
        raise ValueError(f"layer={name!r} is a {type(module).__name__}, not an attention layer; SAG reads the attention "
                         "of one self-attention layer (e.g. a diffusers Attention such as "
                         "'mid_block.attentions.0.transformer_blocks.0.attn1')")
    return name, module


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
    """A patchifying model's patch size (a DiT-style transformer), read without diffusers' deprecated attribute path."""
    patch = vars(module).get("patch_size")
    config = getattr(module, "config", None)
    if patch is None and isinstance(config, dict):
        patch = config.get("patch_size")
    return patch if isinstance(patch, int) else None


def _spatial_input(args, kwargs):
    """(H, W) of the first 4-D tensor a module receives, else None."""
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor) and value.dim() == 4:
            return int(value.shape[-2]), int(value.shape[-1])
    return None


class _AttentionProbe(TorchFunctionMode):
    """Active only while the armed layer runs: hands the layer's first SDPA call (q, k) or softmax over keys
    (probabilities) to the capture; every op still computes exactly what it would without the mode."""

    def __init__(self, capture: "AttentionCapture"):
        super().__init__()
        self.capture = capture

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        capture = self.capture
        if func is F.scaled_dot_product_attention and not capture._done:
            capture._from_sdpa(*args, **kwargs)
        elif func in _SOFTMAX and not capture._done and _over_last_dim(args, kwargs):
            probs = func(*args, **kwargs)
            capture._from_probs(probs)
            return probs
        elif func is torch.Tensor.unflatten:  # a Python-level Tensor method: as a view, so dynamo traces it
            t, dim, sizes = args[0], kwargs.get("dim", args[1] if len(args) > 1 else None), \
                kwargs.get("sizes", args[2] if len(args) > 2 else None)
            dim = dim % t.dim()
            return t.view(*t.shape[:dim], *sizes, *t.shape[dim + 1:])
        return func(*args, **kwargs)


def _over_last_dim(args, kwargs) -> bool:
    dim = kwargs.get("dim", args[1] if len(args) > 1 else None)
    t = args[0] if args else None
    return isinstance(t, torch.Tensor) and isinstance(dim, int) and dim in (-1, t.dim() - 1) and t.dim() >= 3


HOOK_NAME = "sag_fast_capture"


class _Marker(TorchFunctionMode):
    """Pushed on the arming thread's mode stack around a compiled armed forward: the capture is live in a compiled
    region only where this marker is on the stack. Passes every call through."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


class _LayerHook(named_hooks.NamedHook):
    """The capture's named hook on the attention layer: the layer's own forward, under the probe when armed."""

    def __init__(self, capture: "AttentionCapture"):
        super().__init__()
        self.capture = capture

    def new_forward(self, module, *args, **kwargs):
        capture = self.capture
        if not capture._live():
            return self.fn_ref.original_forward(*args, **kwargs)
        hidden_states = args[0] if args else kwargs.get("hidden_states")
        if capture.self_context:
            context = args[1] if len(args) > 1 else kwargs.get("encoder_hidden_states")
            if context is not None and context is not hidden_states:
                raise RuntimeError(f"layer {capture.layer_name!r} was called with a context other than its own "
                                   "input: it is cross-attention here, not the self-attention SAG reads; choose "
                                   "another layer (layer=...)")
        if isinstance(hidden_states, torch.Tensor) and hidden_states.dim() == 4:  # spatial attention: its grid
            capture._layer_hw = (int(hidden_states.shape[-2]), int(hidden_states.shape[-1]))
        elif isinstance(hidden_states, torch.Tensor) and hidden_states.dim() == 3:  # its own (image) tokens
            capture._layer_tokens = int(hidden_states.shape[1])
        if capture._plan is not None:  # context parallel: read where the attention is sharded (sharded.py)
            with sharded.reading(capture, capture._plan):
                return self.fn_ref.original_forward(*args, **kwargs)
        with _AttentionProbe(capture):
            return self.fn_ref.original_forward(*args, **kwargs)


def _sliced(processor) -> bool:
    """diffusers' attention slicing (SlicedAttnProcessor, SlicedAttnAddedKVProcessor): the softmax in pieces."""
    return type(processor).__name__.startswith("Sliced") or getattr(processor, "slice_size", None) is not None


class AttentionCapture:
    """Computes the SAG mask of one self-attention layer on the forward it is armed for.

    AttentionCapture(model, layer=None, threshold=1.0, grid_hw=None): layer as in `resolve_layer` (model may be
    a `torch.compile`d module); grid_hw overrides the (h, w) attention grid when it cannot be inferred.
    `with capture.capturing(rows): model(...)` leaves `capture.mask`, (rows, h, w) bool.
    """

    def __init__(self, model: torch.nn.Module, layer: str | None = None, threshold: float = 1.0,
                 grid_hw: tuple[int, int] | None = None, probe: bool = True, joint: str | None = None,
                 self_context: bool = False):
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        check_nonnegative(threshold, "threshold")
        if grid_hw is not None:
            if len(tuple(grid_hw)) != 2 or any(not isinstance(v, int) or v <= 0 for v in grid_hw):
                raise ValueError(f"grid_hw must be None or two positive ints (h, w), got {grid_hw!r}")
            grid_hw = tuple(grid_hw)
        if joint not in (None, "image_first", "text_first"):
            raise ValueError(f"joint must be None, 'image_first' (SD3) or 'text_first' (Flux), got {joint!r}")
        self.model = unwrap_compiled(model)
        self._through_compiled = self.model is not model  # built on a torch.compile wrapper: it is what runs
        self.threshold = float(threshold)
        self.grid_hw = grid_hw
        self.joint = joint            # where the image tokens sit in a joint attention's sequence
        self.image_tokens: int | None = None   # their count, when the layer's own input does not tell
        self.trailing_tokens = 0               # tokens after them that are not the image's (Kontext's context)
        self._layer_tokens: int | None = None
        self.self_context = bool(self_context)  # the layer's context must be its own input (registry.Family)
        self.layer_name, self.layer = resolve_layer(self.model, layer, joint=joint is not None,
                                                    self_context=self.self_context)
        self._added_kv = _is_added_kv(self.layer)
        if self._added_kv:  # keys [text, image], image queries: the layer itself says where they are
            self.joint = "text_first"
        if _has_processor(self.layer):
            self.kind = "processor"
        elif isinstance(self.layer, torch.nn.MultiheadAttention):
            self.kind = "multihead"
        else:
            self.kind = "sdpa"
        self.mask: torch.Tensor | None = None
        self._armed = False
        self._done = False
        self._probing = False  # the construction-time dummy forward: stop at the first attention seen
        self._plan: sharded.ShardPlan | None = None  # the armed forward's context-parallel sharding, if any
        self._reads_sharded = False  # put the sharded reader in diffusers' dispatch (removed with the capture)
        self._geometry: list = []
        self._rows: slice | None = None
        self._input_hw: tuple[int, int] | None = None
        self._layer_hw: tuple[int, int] | None = None
        self._shapes: dict[int, tuple[int, int]] = {}
        self._call_grid: tuple[int, ...] | None = None
        self._handles: list = []
        self._hooked = False
        self._owner: int | None = None      # the thread that armed the capture
        self._marker: _Marker | None = None  # its mode-stack marker, for an armed forward in a compiled region
        self.check_processor()
        self._install()
        if probe:
            try:
                self._probe()
            except BaseException:
                self.remove()
                raise

    # ------------------------------------------------------------------------------------- hooks
    def _install(self) -> None:
        # the spatial size entering the layer's ancestors, nearest first: the grid is read off them
        parts = self.layer_name.split(".")
        modules = dict(self.model.named_modules())
        self._geometry = [modules[".".join(parts[:i])] for i in range(len(parts) - 1, -1, -1)
                          if ".".join(parts[:i]) in modules]
        for depth, module in enumerate(self._geometry):
            self._handles.append(module.register_forward_pre_hook(self._make_shape_hook(depth), with_kwargs=True))
        if self.kind == "multihead":  # its fused native path shows torch no SDPA call: project q, k here
            self._handles.append(self.layer.register_forward_pre_hook(self._on_multihead, with_kwargs=True))
        else:
            if named_hooks.get(self.layer, HOOK_NAME) is not None:
                raise RuntimeError(f"the model already has SAG enabled (a sag_fast capture on layer {self.layer_name!r}: "
                                   "another pipeline sharing this model?); call disable_sag on that pipeline first")
            named_hooks.register(self.layer, _LayerHook(self), HOOK_NAME)
            self._hooked = True

    def _live(self) -> bool:
        """Armed, not yet done, and this forward is the arming caller's (never another thread's)."""
        if not self._armed or self._done:
            return False
        if torch.compiler.is_compiling():  # no thread id in a graph: the arming thread's mode stack tells
            marker = self._marker
            return marker is not None and any(m is marker for m in _get_current_function_mode_stack())
        return self._owner == threading.get_ident()

    def check_processor(self) -> None:
        """Refuses what the capture cannot read whole, at enable time and again before each pipeline call:
        xFormers' processors (their own attention kernel); attention slicing computes the softmax one slice of heads
        at a time; an added-KV processor replaced since enabling; under context parallelism, what the sharded
        capture cannot read exactly (sharded.check)."""
        if getattr(self, "_added_kv", False) and not _is_added_kv(self.layer):
            raise ValueError(f"layer {self.layer_name!r}: its AttnAddedKVProcessor was replaced by a "
                             f"{type(self.layer.processor).__name__} since SAG was enabled; the key layout SAG reads "
                             "may differ: enable SAG again")
        sharded.check(self.model, self.layer, self.layer_name,
                      compiled=self._through_compiled or self._in_compiled_region())
        processor = getattr(self.layer, "processor", None)
        if type(processor).__name__.startswith("XFormers"):
            raise ValueError(f"layer {self.layer_name!r} uses xFormers ({type(processor).__name__}): its "
                             "attention runs in xFormers' own kernel, where SAG cannot read the attention map; call "
                             "pipe.disable_xformers_memory_efficient_attention() (torch's scaled_dot_product_"
                             "attention, the default processor, is as memory-efficient)")
        if _sliced(processor):
            raise ValueError(f"layer {self.layer_name!r} uses attention slicing ({type(processor).__name__}): "
                             "its softmax runs one slice of heads at a time, so SAG cannot read the layer's whole "
                             "attention map; call pipe.disable_attention_slicing() (torch's scaled_dot_product_"
                             "attention, the default processor, already avoids the memory slicing saves)")

    def _make_shape_hook(self, depth: int):
        def hook(module, args, kwargs):
            if self._live():
                hw = _spatial_input(args, kwargs)
                if hw is not None:
                    self._shapes[depth] = hw
        return hook

    def _on_multihead(self, module, args, kwargs):
        if not self._live():
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
        d = e // heads
        qh = F.linear(x, wq, bq).unflatten(-1, (heads, d)).transpose(1, 2)
        kh = F.linear(x, wk, bk).unflatten(-1, (heads, d)).transpose(1, 2)
        self._compute(qh, kh, None)

    def _probe(self) -> None:
        """Runs the layer alone on a (1, 4, C) dummy input with the probe armed: the layer must show its attention
        to torch (SDPA or softmax); other processors are refused here. Skipped where no dummy input can be made."""
        dim = getattr(self.layer, "query_dim", None) if self.kind == "processor" else None
        params = list(self.layer.parameters())
        if not isinstance(dim, int) or not params or any(p.device.type == "meta" for p in params):
            return
        if any(type(p).__name__ == "FakeTensor" or p.is_cuda and not torch.cuda.is_available() for p in params):
            return
        if sharded.cp_config(self.model) is not None:  # its attention is a collective: the sharded reader reads
            return                                      # every CP backend (they all run diffusers' CP template)
        dummy = torch.zeros(1, 4, dim, device=params[0].device, dtype=params[0].dtype)
        self._armed, self._done, self._probing = True, False, True
        self._owner = threading.get_ident()
        try:
            with torch.no_grad():
                self.layer(dummy)
        except _Seen:
            return
        except Exception:  # the layer needs inputs we cannot invent: the check happens at the first guided step
            return
        finally:
            self._armed, self._probing, self._owner = False, False, None
            self._shapes.clear()
            self._layer_hw = None
        what = type(getattr(self.layer, "processor", self.layer)).__name__
        raise ValueError(f"layer {self.layer_name!r} ({what}) computes its attention without torch's "
                         "scaled_dot_product_attention or a softmax, so SAG cannot read it (xformers, a custom "
                         "kernel?); use a torch processor, e.g. "
                         "`from diffusers.models.attention_processor import AttnProcessor2_0; "
                         "model.set_attn_processor(AttnProcessor2_0())`")

    # -------------------------------------------------------------------------------------- mask
    def _slice(self) -> slice:
        return self._rows if self._rows is not None else slice(None)

    def _grid(self, nk: int) -> tuple[int, ...]:
        if self._call_grid is not None:
            if math.prod(self._call_grid) != nk:
                raise ValueError(f"layer {self.layer_name!r} attends over {nk} keys, but the token grid of this call "
                                 f"is {self._call_grid} ({math.prod(self._call_grid)} tokens)")
            return self._call_grid
        if self.grid_hw is not None:
            if self.grid_hw[0] * self.grid_hw[1] != nk:
                raise ValueError(f"grid_hw={self.grid_hw} has {self.grid_hw[0] * self.grid_hw[1]} cells but layer "
                                 f"{self.layer_name!r} attends over {nk} keys")
            return self.grid_hw
        if self._layer_hw is not None and self._layer_hw[0] * self._layer_hw[1] == nk:
            return self._layer_hw
        seen = [(self._shapes[d], _patch_size(self._geometry[d])) for d in sorted(self._shapes)]
        if self._input_hw is not None:
            seen.append((self._input_hw, _patch_size(self.model)))
        for hw, patch in seen:
            for h, w in _grid_candidates(hw, patch):
                if h * w == nk:
                    return h, w
        raise ValueError(f"layer {self.layer_name!r}: cannot infer the (h, w) grid of its Nk={nk} keys from the spatial "
                         f"inputs seen {[hw for hw, _ in seen]}; pass AttentionCapture(..., grid_hw=(h, w))")

    def _from_sdpa(self, query, key, value=None, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                   enable_gqa=False, **_):
        if self._probing:
            raise _Seen
        if is_causal:
            raise RuntimeError(f"layer {self.layer_name!r} attends causally: the SAG mass would ignore it; choose "
                               "another layer (layer=...)")
        q, k = query, key
        if q.dim() == 3:  # (B*heads, N, d) or unbatched (heads, N, d): one head each
            q, k = q.unsqueeze(1), k.unsqueeze(1)
        if q.dim() != 4 or k.dim() != 4:
            raise RuntimeError(f"layer {self.layer_name!r}: scaled_dot_product_attention got q {tuple(query.shape)}, "
                               "expected (B, heads, N, d)")
        bias = None if attn_mask is None else self._key_bias(attn_mask, q, k)
        rows = self._slice()
        bias = None if bias is None else bias[rows]
        if self.joint is not None:
            self._compute_joint(q[rows], k[rows], scale, bias)
        else:
            self._compute(q[rows], k[rows], scale, bias)

    def _key_bias(self, attn_mask: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """The (B, Nk) per-key additive bias that `attn_mask` is for the queries SAG reads (the image queries
        of joint attention): padded text keys (QwenImage, Chroma) are dropped from their softmax. A mask that
        differs between those queries (or heads) is not a per-key mask: refused, as the mass would ignore it."""
        bias = _additive(attn_mask, self.layer_name)
        b, heads, nq, nk = q.shape[0], q.shape[1], q.shape[2], k.shape[2]
        try:
            bias = bias.expand(b, heads, nq, nk) if bias.dim() <= 4 else None
        except RuntimeError:
            bias = None
        if bias is None:
            raise RuntimeError(f"layer {self.layer_name!r}: an attention mask of shape {tuple(attn_mask.shape)} does "
                               f"not broadcast to the attention's (B, heads, Nq, Nk) = {(b, heads, nq, nk)}")
        start, n = 0, nq  # the query rows SAG reads: all, or joint attention's image queries
        if self.joint is not None and nq == nk:
            start, n = self._image_span(nq, nk)
        # SDPA aligns the mask's dims to the right: (..., heads, Nq, Nk); size 1 on both is a per-key mask
        per_key = attn_mask.shape[-2] == 1 and (attn_mask.dim() < 3 or attn_mask.shape[-3] == 1)
        first = bias[:, 0, start]
        if not per_key:  # e.g. Chroma's outer product of the token mask: per key for the (unpadded) image queries
            same = bias[:, :, start:start + n] == first[:, None, None]
            # compiled, or fake tensors (no value to read): the check runs on the device
            if torch.compiler.is_compiling() or type(same).__name__ == "FakeTensor":
                torch._assert_async(same.all(), "SAG: the attention mask is not the same for every image query")
            elif not bool(same.all()):
                raise RuntimeError(f"layer {self.layer_name!r} attends with a mask that differs between its image "
                                   "queries (or heads): it is not a per-key mask, and the SAG mass would ignore it; "
                                   "choose another layer (layer=...)")
        return first

    def _image_span(self, n_q: int, n_k: int) -> tuple[int, int]:
        """(start, n) of the image keys among n_k. Joint attention (n_q == n_k, SD3/Flux): the image tokens
        (image_tokens, else the layer's own input) with `trailing_tokens` after them ([text, image, context]);
        added-KV attention (n_q < n_k, IF/Kandinsky): the queries are the image tokens, the keys [text, image]."""
        n = n_q if n_q != n_k else (self.image_tokens if self.image_tokens is not None else self._layer_tokens)
        trailing = self.trailing_tokens or 0
        if n is None or not 0 < n or n + trailing > n_k:
            raise RuntimeError(f"layer {self.layer_name!r}: joint attention over {n_q} queries / {n_k} keys with {n} "
                               f"image tokens (+{trailing} after them): the image tokens cannot be located")
        return (0 if self.joint == "image_first" else n_k - n - trailing), n

    def _compute_joint(self, q: torch.Tensor, k: torch.Tensor, scale, key_bias=None) -> None:
        """Joint attention (image and text tokens in one softmax): the mass of the image keys from the image
        queries, the row softmax over every key (text and context tokens included); see
        reference.joint_attention_mass. Image-only queries (added-KV) sit at their keys' places in a zero-padded
        query block, so the one joint kernel reads them (the padding rows are outside the span: never summed)."""
        n_q, n_k = q.shape[2], k.shape[2]
        start, n = self._image_span(n_q, n_k)
        scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
        if n == n_k:  # no text tokens in this call: plain self-attention
            self._compute(q, k, scale, key_bias)
            return
        if n_q != n_k:
            q = F.pad(q, (0, 0, start, n_k - start - n))
        if key_bias is not None and self.joint == "text_first":
            q, k, key_bias = _end_at_last_kept_key(q, k, key_bias)
        self.mask = mask_from_qk(q, k, self._grid(n), self.threshold, scale, image_span=(start, n), key_bias=key_bias)
        self._done = True

    def _from_sharded(self, plan: sharded.ShardPlan, query: torch.Tensor, calls: list, is_causal: bool) -> None:
        """The mask from the layer's context-parallel attention (sharded.py): this rank's part of the image-key
        mass from the (query, key) pairs the backend's forward op got, all-reduced over the CP group (N floats)."""
        if self._done:
            return
        if is_causal:
            raise RuntimeError(f"layer {self.layer_name!r} attends causally: the SAG mass would ignore it; choose "
                               "another layer (layer=...)")
        if plan.kind == "ring" and any(c.attn_mask is not None for c in calls):  # sharded.refuse_ring_mask first
            raise RuntimeError(f"layer {self.layer_name!r}: ring attention with an attention mask is not read")
        expected = 1 if plan.kind == "ulysses" else plan.degree
        if len(calls) != expected:
            raise RuntimeError(f"layer {self.layer_name!r}: {plan.kind} attention ran its forward op {len(calls)} "
                               f"times (expected {expected}); SAG cannot place the key chunks")
        rows = self._slice()
        heads = int(query.shape[2])  # the template's query: this rank's tokens, every head
        q = calls[0].query[rows]
        scale = 1.0 / math.sqrt(q.shape[-1]) if calls[0].scale is None else float(calls[0].scale)
        joint = self.joint
        if plan.kind == "ulysses":  # one pair: the gathered sequence [slice_0, slice_1, ...], heads / N
            n = int(q.shape[1])
            image_total = self._sharded_image_tokens(plan, n)
            texts = sharded.split_sizes(n - image_total, plan.degree, plan.anything, "text tokens") \
                if joint is not None else [0] * plan.degree
            images = sharded.split_sizes(image_total, plan.degree, plan.anything, "image tokens")
            segments = sharded.rank_segments([t + i for t, i in zip(texts, images)], image_total, plan, joint,
                                             list(range(plan.degree)))
            q_slices = sharded.positioned(segments)
            k_chunks = [(calls[0].key[rows], q_slices)]
            # the template all-gathered a local per-key mask ([text_r, image_r] of each rank) into the gathered order
            mask = calls[0].attn_mask
            if mask is not None and not sharded.mask_gather_aligned(segments):
                raise RuntimeError(
                    f"SAG under ulysses_anything (ulysses_degree={plan.degree}): layer {self.layer_name!r} attends "
                    "with an attention mask over uneven slices "
                    f"{[s.text + s.image for s in segments]} tokens per rank; diffusers pads each rank's mask to the "
                    "longest slice, gathers and trims only the end, so the gathered mask is misaligned with the keys "
                    "(the attention itself is not the single-process one); use a degree that splits the text and "
                    "image tokens evenly (without ulysses_anything), or ulysses_degree=2")
            biases = None if mask is None else [self._sharded_key_bias(mask, int(calls[0].query.shape[0]), n, rows)]
        else:  # ring: this rank's queries against every rank's key chunk, visited in the order r, r+1, ...
            owners = [(plan.rank + i) % plan.degree for i in range(plan.degree)]
            lengths = [int(c.key.shape[1]) for c in calls]
            image_total = self._sharded_image_tokens(plan, sum(lengths))
            segments = sharded.rank_segments(lengths, image_total, plan, joint, owners)
            if int(q.shape[1]) != lengths[0]:
                raise RuntimeError(f"layer {self.layer_name!r}: ring attention's first key chunk is not this "
                                   "rank's own; SAG cannot place the key chunks")
            q_slices = [(0, segments[0])]
            k_chunks = [(c.key[rows], [(0, s)]) for c, s in zip(calls, segments)]
            biases = None
        text_total = sum(s.text for s in segments) if plan.kind == "ring" else n - image_total
        mass = sharded.image_key_mass(q, q_slices, k_chunks, scale, image_total, biases)
        mass = sharded.all_reduce(mass, plan.group) / heads  # every rank: the single-process mass
        relative = text_total > 0  # as single-process: relative to the mean image-key mass only with text keys
        bar = self.threshold * mass.mean(dim=-1, keepdim=True) if relative else self.threshold
        self.mask = (mass > bar).view(mass.shape[0], *self._grid(image_total))
        self._done = True

    def _sharded_key_bias(self, attn_mask: torch.Tensor, batch: int, n_keys: int, rows) -> torch.Tensor:
        """The (batch, n_keys) key bias of a mask the Ulysses template gathered (keys in the gathered order): the
        single-process rule (_key_bias), for per-key masks only (one row for every query and head, as QwenImage's
        text padding); other masks would need the global query order here: refused."""
        per_key = attn_mask.shape[-1] == n_keys and attn_mask.dim() <= 4 and all(d == 1 for d in attn_mask.shape[1:-1])
        if not per_key:
            raise RuntimeError(f"layer {self.layer_name!r}: under context parallelism SAG reads per-key attention "
                               f"masks (B, 1, 1, Nk); this one is {tuple(attn_mask.shape)} for {n_keys} keys; choose "
                               "another layer (layer=...) or run without context parallelism")
        bias = _additive(attn_mask, self.layer_name)
        bias = bias.reshape(bias.shape[0] if bias.dim() > 1 else 1, n_keys)
        return bias.expand(batch, n_keys)[rows]  # batch: the attention's, before the capture's row slice

    def _sharded_image_tokens(self, plan: sharded.ShardPlan, n_tokens: int) -> int:
        """The model's image tokens in all (global): every token without joint attention, else the count the caller
        gave (the packed latent's), else this rank's own image tokens times the degree (equal splits only)."""
        if self.joint is None:
            return n_tokens
        if self.image_tokens is not None:
            return self.image_tokens
        if self._layer_tokens is not None and not plan.anything:
            return self._layer_tokens * plan.degree
        raise RuntimeError(f"layer {self.layer_name!r}: joint attention under context parallelism with an unknown "
                           "number of image tokens; set the capture's image_tokens (the whole latent's token count)")

    def _from_probs(self, probs: torch.Tensor):
        if self._probing:
            raise _Seen
        if probs.shape[-1] != probs.shape[-2] and self.joint is None:
            raise ValueError(f"layer {self.layer_name!r} is not self-attention: {probs.shape[-2]} queries and "
                             f"{probs.shape[-1]} keys")
        heads = getattr(self.layer, "heads", None) or getattr(self.layer, "num_heads", None)
        if probs.dim() == 3:
            if not isinstance(heads, int) or probs.shape[0] % heads:
                raise RuntimeError(f"layer {self.layer_name!r}: softmax over {tuple(probs.shape)} does not split into "
                                   f"{heads} heads")
            probs = probs.unflatten(0, (probs.shape[0] // heads, heads))
        probs = probs[self._slice()]
        if self.joint is not None:
            start, n = self._image_span(probs.shape[-2], probs.shape[-1])
            if n < probs.shape[-1]:  # joint: image keys, image queries (all of them when only they query)
                q_rows = slice(None) if probs.shape[-2] != probs.shape[-1] else slice(start, start + n)
                acc = torch.float64 if probs.dtype == torch.float64 else torch.float32
                mass = probs[:, :, q_rows, start:start + n].to(acc).sum(-2).mean(1)
                self.mask = (mass > self.threshold * mass.mean(-1, keepdim=True)).reshape(-1, *self._grid(n))
                self._done = True
                return
        self.mask = mask_from_probs(probs, self._grid(probs.shape[-1]), self.threshold)
        self._done = True

    def _compute(self, q: torch.Tensor, k: torch.Tensor, scale, key_bias=None) -> None:
        if q.shape[2] != k.shape[2]:
            raise ValueError(f"layer {self.layer_name!r} is not self-attention: {q.shape[2]} queries and {k.shape[2]} keys")
        if k.shape[1] != q.shape[1]:  # grouped-query attention: each key head serves several query heads
            if k.shape[1] == 0 or q.shape[1] % k.shape[1]:
                raise RuntimeError(f"layer {self.layer_name!r}: {q.shape[1]} query heads vs {k.shape[1]} key heads")
            k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
        self.mask = mask_from_qk(q, k, self._grid(k.shape[2]), self.threshold, scale, key_bias=key_bias)
        self._done = True

    # ------------------------------------------------------------------------------------ public
    @contextlib.contextmanager
    def capturing(self, rows: slice | None = None, input_hw: tuple[int, int] | None = None, compiled: bool = False,
                  grid: tuple[int, ...] | None = None, frames: int | None = None):
        """The layer's next forward in this thread computes `self.mask` for batch rows `rows` (None = all).
        input_hw: the model input's (H, W), for a caller that runs the model's forward without its pre-hooks.
        compiled: the forward runs (partly) under torch.compile: arm through the thread's mode stack too.
        grid: the layer's token grid for this forward ((f, h, w) for video), when the caller knows it.
        frames: the model folds this many frames per batch row into the layer's batch (b-major): rows are scaled
        to the layer's rows, and the mask comes out (rows, frames, h, w)."""
        if frames is not None and rows is not None:
            rows = slice(rows.start * frames, rows.stop * frames)
        if rows is not None and not isinstance(rows, slice):
            raise TypeError(f"rows must be a slice or None, got {type(rows).__name__}")
        if not self._handles and not self._hooked:
            raise RuntimeError("this AttentionCapture was removed")
        if self._armed:
            raise RuntimeError(f"layer {self.layer_name!r}: the SAG capture is already armed by another call (one SAG "
                               "pipeline called from two threads at once?); use one pipeline per thread")
        self.check_processor()
        self._plan = sharded.plan_of(self.model)  # the strategy, from the model's parallel config now
        if self._plan is not None and not self._reads_sharded:
            sharded.install()
            self._reads_sharded = True
        self._owner = threading.get_ident()
        self._marker = _Marker() if compiled or self._through_compiled or self._in_compiled_region() else None
        self._armed, self._done, self._rows, self.mask = True, False, rows, None
        self._input_hw, self._layer_hw, self._layer_tokens = input_hw, None, None
        self._call_grid = tuple(grid) if grid is not None else None
        self._shapes.clear()
        try:
            with self._marker if self._marker is not None else contextlib.nullcontext():
                yield self
            if self.mask is not None and frames is not None:
                if self.mask.shape[0] % frames:
                    raise RuntimeError(f"layer {self.layer_name!r}: {self.mask.shape[0]} attention rows are not "
                                       f"{frames} frames per batch row")
                self.mask = self.mask.unflatten(0, (self.mask.shape[0] // frames, frames))
            if self.mask is None:
                how = {"processor": "its attention processor was not called",
                       "multihead": "the MultiheadAttention did not run",
                       "sdpa": "it did not call torch.nn.functional.scaled_dot_product_attention or a softmax"}
                raise RuntimeError(f"layer {self.layer_name!r}: no attention was captured during the forward "
                                   f"({how[self.kind]}); is that layer run by this model?")
        finally:
            self._armed, self._owner, self._marker = False, None, None
            self._shapes.clear()

    def _in_compiled_region(self) -> bool:
        """The layer or an ancestor was compiled in place (`module.compile()`, diffusers' regional compilation)."""
        return any(getattr(m, "_compiled_call_impl", None) is not None for m in (self.layer, *self._geometry))

    def remove(self) -> None:
        """Removes every hook (the registry's named hook included); the model computes exactly as before."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        if self._hooked:
            named_hooks.unregister(self.layer, HOOK_NAME)
            self._hooked = False
        if self._reads_sharded:
            sharded.uninstall()
            self._reads_sharded = False
        self._armed = False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()

    def __repr__(self) -> str:
        return f"AttentionCapture(layer={self.layer_name!r}, kind={self.kind!r}, threshold={self.threshold})"


def _additive(attn_mask: torch.Tensor, layer_name: str) -> torch.Tensor:
    """An attention mask as the additive bias SDPA applies: bool True = kept (0), False = dropped (-inf)."""
    if attn_mask.dtype == torch.bool:
        # where, not masked_fill with a Python -inf: the scalar fill does not replay on fake CUDA tensors
        return torch.where(attn_mask, 0.0, float("-inf")).float()
    if attn_mask.is_floating_point():
        return attn_mask
    raise RuntimeError(f"layer {layer_name!r} attends with a {attn_mask.dtype} attention mask; SAG reads "
                       "boolean or additive float masks, as scaled_dot_product_attention does")


def _end_at_last_kept_key(q: torch.Tensor, k: torch.Tensor, key_bias: torch.Tensor):
    """[text, image, padding] rows (Lumina 2 packs each row's own text length, then pads at the end) rotated to
    [padding, text, image]: each row's tokens turned so its last kept key ends the sequence, on the device (no
    host read). The softmax over keys does not depend on their order, so the image tokens' mass is unchanged;
    rows without trailing padding (Chroma, QwenImage: image last) are left as they are."""
    n_all = key_bias.shape[-1]
    position = torch.arange(1, n_all + 1, device=key_bias.device)
    end = torch.where(key_bias > float("-inf"), position, torch.zeros_like(position)).amax(-1)   # (B,)
    index = (torch.arange(n_all, device=key_bias.device)[None] + end[:, None]) % n_all            # (B, N)
    gather = index[:, None, :, None]
    q = q.gather(2, gather.expand(-1, q.shape[1], -1, q.shape[3]))
    k = k.gather(2, gather.expand(-1, k.shape[1], -1, k.shape[3]))
    return q, k, key_bias.gather(1, index)


class _Seen(Exception):
    """The probe saw the layer's attention: stop the dummy forward there."""
