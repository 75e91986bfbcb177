"""The engine of a guided model call: the one implementation of SAG's step, used by `enable_sag` and the drop-in
pipelines (diffusers/session.py), the modular guider (diffusers/guider.py) and `SAGSampler` (sampler.py).

    forward(x)  with the capture armed for the unconditional rows     -> out, mask
    x~ = degrade(x_rows, out_rows, mask, c1, c2)                       (sag_fast.ops.degrade, one launch)
    d  = forward(x~) on those rows, with their per-row arguments
    every way of out += s * (u - d)                                    (sag_fast.ops.guidance, in place)

The engine owns, once: reading a denoiser's forward signature (`ForwardBinding`: which argument is x, which is
t), unwrapping its output (`split_output`), putting one named hook on the denoiser, compiled or not (`attach`,
`detach`), arming the capture, the degrade, the extra forward and the shift (`guided_forward`). The per-call facts
go in as one value, `StepFacts`: which rows, which channels, the step's (c1, c2), the arguments of the extra
forward. Adapters (session, guider, sampler) only say what those facts are.

The state of one pipeline call (`ActiveCall`: its arguments, settings, model-call count, the shift of the current
step for the pipeline's other predictions of that step) lives in a context variable set for the duration of the
call, in the calling thread only: a call of the same denoiser from another thread sees none of it, and the
capture is armed for the arming thread only (sag_fast.capture).
"""
from __future__ import annotations

import contextvars
import inspect
from dataclasses import dataclass
from typing import Any, Callable

import torch

from . import named_hooks
from .guidance import SAGConfig
from .ops.degrade import degrade
from .ops.guidance import guidance_combine, guidance_shift_

HOOK_NAME = "sag_fast"


# ------------------------------------------------------------------------------------ the denoiser's call
class ForwardBinding:
    """How a denoiser class's forward is called: its signature (without self), the name of the input x, of the
    timestep (None when it takes none), and whether it takes return_dict."""

    def __init__(self, model: torch.nn.Module):
        signature = inspect.signature(type(model).forward)
        params = list(signature.parameters.values())[1:]
        positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        if not positional:
            raise TypeError(f"the forward of {type(model).__name__} {signature} takes no positional input")
        names = [p.name for p in params]
        self.signature = signature.replace(parameters=params)
        self.x_name = positional[0].name
        self.t_name = "timestep" if "timestep" in names else (positional[1].name if len(positional) > 1 else None)
        self.has_return_dict = "return_dict" in names

    def bind(self, args: tuple, kwargs: dict) -> dict | None:
        """The call's arguments by name, **kwargs flattened; None if they do not bind (the model reports it)."""
        try:
            bound = self.signature.bind(*args, **kwargs)
        except TypeError:
            return None
        arguments = dict(bound.arguments)
        for p in self.signature.parameters.values():
            if p.kind is p.VAR_KEYWORD and p.name in arguments:
                arguments.update(arguments.pop(p.name))
        return arguments


def split_output(result) -> tuple[torch.Tensor, Callable[[torch.Tensor], Any]]:
    """(tensor, rebuild) where rebuild(tensor) gives back the denoiser's own output structure."""
    if isinstance(result, torch.Tensor):
        return result, lambda out: out
    if isinstance(result, tuple):
        return result[0], lambda out: (out, *result[1:])
    keys = list(result.keys()) if hasattr(result, "keys") else []
    if keys and isinstance(result[keys[0]], torch.Tensor):  # a diffusers BaseOutput (dataclass + dict)
        def rebuild(out, key=keys[0]):
            result[key] = out
            return result
        return result[keys[0]], rebuild
    raise TypeError(f"cannot read the denoiser output of type {type(result).__name__}: expected a tensor, a tuple "
                    "or a diffusers BaseOutput")


def is_compiled(module) -> bool:
    """A `torch.compile(module)` wrapper (OptimizedModule)."""
    return isinstance(getattr(module, "_orig_mod", None), torch.nn.Module)


# ------------------------------------------------------------------------------- one named denoiser hook
class _Hook(named_hooks.NamedHook):
    """The named diffusers hook on a plain denoiser: its forward is handler(original_forward, args, kwargs)."""

    def __init__(self, handler):
        super().__init__()
        self.handler = handler

    def new_forward(self, module, *args, **kwargs):
        return self.handler(self.fn_ref.original_forward, args, kwargs)


class _CompiledForward:
    """`forward` of a torch.compile'd denoiser (OptimizedModule keeps its compiled forward on the instance): the
    handler runs around it, outside the compiled graph."""

    def __init__(self, handler, original, name: str):
        self.handler, self.original, self.name = handler, original, name

    def __call__(self, *args, **kwargs):
        return self.handler(self.original, args, kwargs)


def hooked(outer: torch.nn.Module, name: str = HOOK_NAME):
    """The handler of the hook `name` on outer, or None."""
    if is_compiled(outer):
        current = vars(outer).get("forward")
        while isinstance(current, _CompiledForward):
            if current.name == name:
                return current.handler
            current = current.original
        return None
    hook = named_hooks.get(outer, name)
    return None if hook is None else hook.handler


def attach(outer: torch.nn.Module, handler, name: str = HOOK_NAME) -> None:
    """Puts handler(original_forward, args, kwargs) around outer's forward as the hook `name`: a diffusers
    HookRegistry hook on a plain module, a forward wrapper outside the graph on a torch.compile'd one."""
    if hooked(outer, name) is not None:
        raise RuntimeError(f"{type(outer).__name__} already has a {name!r} hook (SAG enabled on another pipeline "
                           "sharing this model?); call disable_sag on that pipeline first")
    if is_compiled(outer):
        current = vars(outer).get("forward")
        outer.forward = _CompiledForward(handler, current if current is not None else outer.forward, name)
        return
    named_hooks.register(outer, _Hook(handler), name)


def keep_outermost(outer: torch.nn.Module, name: str = HOOK_NAME) -> None:
    """Moves the hook `name` back outside every other diffusers hook on outer. A hook registered after it (diffusers'
    context-parallel split of the inputs, when `enable_parallelism` follows enable_sag) would otherwise run first,
    and the guided step would see one rank's slice of the latents instead of the whole batch."""
    registry = vars(outer).get("_diffusers_hook") if not is_compiled(outer) else None
    if registry is None or name not in registry.hooks or registry._hook_order[-1] == name:
        return
    handler = registry.hooks[name].handler
    detach(outer, name)
    attach(outer, handler, name)


def detach(outer: torch.nn.Module, name: str = HOOK_NAME) -> None:
    """Takes the hook `name` off outer (a no-op without one); outer then computes exactly as before."""
    if is_compiled(outer):
        link, current = None, vars(outer).get("forward")
        while isinstance(current, _CompiledForward):
            if current.name == name:
                if link is None:
                    outer.forward = current.original
                else:
                    link.original = current.original
                return
            link, current = current, current.original
        return
    named_hooks.unregister(outer, name)


# ------------------------------------------------------------------------------------ per-call state
_ACTIVE: contextvars.ContextVar = contextvars.ContextVar("sag_fast_active_call", default=None)


@dataclass
class ActiveCall:
    """The state of one guided pipeline call, in one place (see the module docstring). owner: the adapter whose
    call this is (only its hook acts on it). pipe, args: the pipeline and its call's arguments by name. steps:
    steps begun so far; offset: the schedule index of the first. uncond_next: the
    last model call was a split-CFG step's conditional call, so the next is its unconditional call (whether a
    step is split is read at each model call: the pipeline sets its guidance scale after the call began, and a
    step-end callback may switch CFG between steps). pending: that conditional call's output. step_shift:
    s*(u - d) of the current step, for the pipeline's other predictions of that step (SD3's skip-layer call)."""

    owner: Any
    args: dict
    config: SAGConfig
    pipe: Any = None
    steps: int = 0
    uncond_next: bool = False
    offset: int | None = None
    pending: torch.Tensor | None = None
    step_shift: torch.Tensor | None = None


def active_call() -> ActiveCall | None:
    """The guided call in progress in this thread / task, or None."""
    return _ACTIVE.get()


def open_call(call: ActiveCall):
    return _ACTIVE.set(call)


def close_call(token) -> None:
    _ACTIVE.reset(token)


def token_grid(model: torch.nn.Module, x: torch.Tensor) -> tuple[int, ...]:
    """(f, h, w): the token grid of a video transformer's attention over (B, C, F, H, W) latents, from the model
    config's patch size: a 3-tuple (pt, ph, pw) (Wan), or one spatial size with a temporal `patch_size_t`
    (HunyuanVideo); a model without one (a per-frame UNet) has the latent grid itself. The capture checks the
    grid's size against the layer's key count, so a model that patchifies otherwise is refused, not mis-masked.
    (h, w) for (B, C, H, W) image latents, by the same rule (a square `patch_size`, as Lumina 2's)."""
    config = getattr(model, "config", None)
    patch = getattr(config, "patch_size", None)
    if isinstance(patch, (tuple, list)) and len(patch) == 3:
        pt, ph, pw = (int(p) for p in patch)
    elif isinstance(patch, int) and not isinstance(patch, bool):
        pt, ph, pw = int(getattr(config, "patch_size_t", None) or 1), patch, patch
    else:
        pt = ph = pw = 1
    if x.dim() == 4:
        return x.shape[2] // ph, x.shape[3] // pw
    return x.shape[2] // pt, x.shape[3] // ph, x.shape[4] // pw


# ------------------------------------------------------------------------------------- the guided step
@dataclass(frozen=True)
class StepFacts:
    """What the adapter knows about one guided model call.

    ways: guidance ways stacked in the batch (B rows each); uncond_index: the way degraded and guiding every way.
    latent_channels: leading input channels that are x_t (None: all; the rest rides along unchanged).
    guided_channels: output channels shifted: -1 (all), a count, or None (all for C outputs, the first C for 2C).
    c1, c2: the step's signal coefficients (s = c1 x + c2 out), scalars or per row. degraded_kwargs(model_kwargs,
    rows, total, x_degraded, t_rows): the model arguments of the extra forward (None: `slice_batch`).
    compiled: the forward runs under torch.compile (the capture arms through the mode stack too). cfg_scale: for a
    caller that combines [uncond, cond] itself (SAGSampler): the result is CFG+SAG in one fused pass,
    u + w (c - u) + s (u - d), B rows (guidance_combine), instead of every way shifted. grid: the SAG layer's
    token grid when the caller knows it ((f, h, w) for video latents, whose grid the capture cannot infer).
    frames: the model folds this many frames per row into the SAG layer's batch (AnimateDiff): one mask per frame."""

    c1: Any
    c2: Any
    ways: int = 1
    uncond_index: int = 0
    latent_channels: int | None = None
    guided_channels: int | None = -1
    degraded_kwargs: Callable[..., dict] | None = None
    compiled: bool = False
    cfg_scale: float | None = None
    grid: tuple[int, ...] | None = None
    frames: int | None = None


def slice_batch(kwargs: dict, rows: slice, batch: int, keep=("cross_attention_kwargs",)) -> dict:
    """Every tensor in kwargs (recursing into dicts, lists and tuples) whose first dim == batch is sliced
    to `rows`; the rest (0-dim timesteps, scalars, None, keys in `keep`) passes unchanged."""

    def cut(value):
        if isinstance(value, torch.Tensor):
            return value[rows] if value.dim() > 0 and value.shape[0] == batch else value
        if isinstance(value, dict):
            return {k: cut(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            cut_items = [cut(v) for v in value]
            return type(value)(*cut_items) if hasattr(value, "_fields") else type(value)(cut_items)
        return value

    return {k: (v if k in keep else cut(v)) for k, v in kwargs.items()}


def _rows_of(c, rows: slice, total: int):
    """c1/c2 given for the whole (ways*B,) batch are cut to the degraded rows; scalars pass."""
    if isinstance(c, torch.Tensor) and c.dim() == 1 and c.shape[0] == total and rows != slice(0, total):
        return c[rows]
    return c


def _cut(t: torch.Tensor, rows: slice, total: int) -> torch.Tensor:
    return t if rows == slice(0, total) else t[rows]


def degrade_input(x: torch.Tensor, out: torch.Tensor, mask, c1, c2, channels: int, config: SAGConfig) -> torch.Tensor:
    """x~: the first `channels` of x degraded with the prediction out (fused op), the rest of x unchanged."""
    x_deg = degrade(x if channels == x.shape[1] else x[:, :channels], out if channels == out.shape[1] else
                    out[:, :channels], mask, c1, c2, config.kernel_size, config.blur_sigma)
    if channels < x.shape[1]:  # conditioning channels ride along unchanged
        x_deg = torch.cat([x_deg, x[:, channels:]], dim=1)
    return x_deg


def guided_forward(forward: Callable[..., torch.Tensor], x: torch.Tensor, t, model_kwargs: dict | None = None, *,
                   config: SAGConfig, capture: Any = None, facts: StepFacts,
                   on_shift: Callable[[torch.Tensor], None] | None = None) -> torch.Tensor:
    """One guided model evaluation (docs/design.md). forward(x, t, **kwargs) -> (ways*B, C', H, W).

    Returns the first forward's output with +scale*(u - d) added in place to every way; the caller's CFG
    afterwards gives CFG+SAG. on_shift(delta) receives s*(u - d) (B rows, the guided channels, fp32; fp64 for
    fp64) for the caller's other predictions of the step."""
    model_kwargs = {} if model_kwargs is None else model_kwargs
    ways, uncond_index = facts.ways, facts.uncond_index
    if not isinstance(config, SAGConfig):
        raise TypeError(f"config must be a SAGConfig, got {type(config).__name__}")
    if not isinstance(x, torch.Tensor) or x.dim() not in (4, 5):
        raise ValueError(f"x must be a (ways*B, C, H, W) or video (ways*B, C, F, H, W) tensor, got "
                         f"{getattr(x, 'shape', type(x).__name__)}")
    if not isinstance(ways, int) or ways < 1 or x.shape[0] % ways:
        raise ValueError(f"ways={ways!r} must be a positive int dividing the batch x.shape[0]={x.shape[0]}")
    if not isinstance(uncond_index, int) or not 0 <= uncond_index < ways:
        raise ValueError(f"uncond_index={uncond_index!r} must be in [0, ways={ways})")
    channels = x.shape[1] if facts.latent_channels is None else facts.latent_channels
    if isinstance(channels, bool) or not isinstance(channels, int) or not 0 < channels <= x.shape[1]:
        raise ValueError(f"latent_channels={facts.latent_channels!r} must be in [1, {x.shape[1]}] (the input's "
                         "channels)")
    if config.mask == "attention" and capture is None:
        raise ValueError("capture is required when config.mask == 'attention' (or use mask='global')")
    if config.scale == 0.0:  # SAG off: exactly the plain forward, bit for bit
        return forward(x, t, **model_kwargs)

    total = x.shape[0]
    b = total // ways
    rows = slice(uncond_index * b, (uncond_index + 1) * b)
    if config.mask == "attention":
        with capture.capturing(rows, input_hw=(int(x.shape[-2]), int(x.shape[-1])), compiled=facts.compiled,
                               grid=facts.grid, frames=facts.frames):
            out = forward(x, t, **model_kwargs)
        mask = capture.mask
    else:
        out = forward(x, t, **model_kwargs)
        mask = None
    if not isinstance(out, torch.Tensor) or out.dim() != x.dim() or out.shape[0] != total or out.shape[1] < channels \
            or out.shape[2:] != x.shape[2:]:
        raise ValueError(f"the model output {tuple(getattr(out, 'shape', ()))} must be (ways*B={total}, C' >= "
                         f"{channels}, {', '.join(map(str, x.shape[2:]))}) for x {tuple(x.shape)}")
    guided = facts.guided_channels
    if guided is None:
        if out.shape[1] not in (channels, 2 * channels):
            raise ValueError(f"guided_channels=None: the model outputs {out.shape[1]} channels for {channels} latent "
                             "channels (expected C or 2C); pass guided_channels explicitly")
        guided = -1 if out.shape[1] == channels else channels
    x_deg = degrade_input(_cut(x, rows, total), _cut(out, rows, total), mask, _rows_of(facts.c1, rows, total),
                          _rows_of(facts.c2, rows, total), channels, config)
    t_rows = t[rows] if isinstance(t, torch.Tensor) and t.dim() > 0 and t.shape[0] == total else t
    if facts.degraded_kwargs is None:
        kwargs_rows = slice_batch(model_kwargs, rows, total)
    else:
        kwargs_rows = facts.degraded_kwargs(model_kwargs, rows, total, x_deg, t_rows)
    degraded = forward(x_deg, t_rows, **kwargs_rows)
    if on_shift is not None:
        g = out.shape[1] if guided == -1 else guided
        wide = torch.promote_types(out.dtype, torch.float32)  # fp32 for half types; a float64 model stays float64
        on_shift(config.scale * (out[rows, :g].to(wide) - degraded[:, :g].to(wide)))
    if facts.cfg_scale is not None:
        if ways != 2 or uncond_index != 0:
            raise ValueError(f"cfg_scale needs the batch [uncond, cond] (ways=2, uncond_index=0), got ways={ways}, "
                             f"uncond_index={uncond_index}")
        return guidance_combine(out, degraded, facts.cfg_scale, config.scale, guided)
    return guidance_shift_(out, degraded, config.scale, guided, uncond_index)


def sag_guided_forward(forward, x, t, model_kwargs=None, *, config: SAGConfig, capture=None, c1, c2, ways: int = 1,
                       uncond_index: int = 0, guided_channels: int | None = -1, latent_channels: int | None = None,
                       degraded_kwargs=None, on_shift=None) -> torch.Tensor:
    """`guided_forward` with the facts as keywords (the model-agnostic form for a hand-written loop)."""
    facts = StepFacts(c1=c1, c2=c2, ways=ways, uncond_index=uncond_index, latent_channels=latent_channels,
                      guided_channels=guided_channels, degraded_kwargs=degraded_kwargs)
    return guided_forward(forward, x, t, model_kwargs, config=config, capture=capture, facts=facts,
                          on_shift=on_shift)
