"""The batch contract: how a pipeline's denoiser batch is laid out at each guided model call.

SAG runs one extra forward of the denoiser on the unconditional rows of the model batch, degraded. To do that
without guessing, sag_fast needs, at every guided model call: how many guidance ways are stacked in the batch and
which is the unconditional one; how many leading input channels are the latent x_t (the rest is conditioning
concatenated on channels, passed through unchanged); which model arguments are per-row (cut to the degraded rows),
by name. A tensor is never cut only because its first dimension equals the batch.

The facts come from the pipeline family's record (sag_fast.diffusers.registry) or, for a pipeline sag_fast does
not know, from the user's `SAGLayout`:

    from sag_fast import SAGLayout
    layout = SAGLayout(
        cfg=lambda call: call["guidance_scale"] > 1,   # is CFG on in this call? (call: the pipeline's
                                                       #   __call__ arguments by name, defaults filled in)
        ways=2,                                        # ways stacked in the model batch when CFG is on
        uncond_index=0,                                # which way is the unconditional one ([uncond, cond])
        latent_channels=4,                             # leading input channels that are the latent x_t
        per_row=("encoder_hidden_states", "added_cond_kwargs"),   # per-row model arguments, by name
    )

`per_row` names model arguments; a dotted name reaches into a dict argument ("cross_attention_kwargs.gligen").
Every tensor under a named argument (in nested dicts, lists and tuples too) is cut to the degraded rows, and
must have the model batch as its first dimension (else a RuntimeError names it). `cfg` is a bool or a function
of the call arguments; with CFG off the batch is one way. `latent_channels=None` means all input channels.
A pipeline whose SAGLayout.cfg is a lambda cannot be pickled (pickle cannot store lambdas): use a module-level
function (or a bool) if the SAG pipeline is to be pickled.

ControlNet: the ControlNet residuals of the degraded forward are recomputed from the degraded input (the
paper's eps(x~) is the whole model's prediction at the degraded input; reusing the residuals of the undegraded
input re-injects undegraded signal through every skip connection). See `_ControlNetReplay`.
"""
from __future__ import annotations

import contextlib
import inspect
from collections import ChainMap
from dataclasses import dataclass
from typing import Any, Callable

import torch

from . import registry

__all__ = ["CallLayout", "SAGLayout", "BatchContract", "contract_for"]


# ------------------------------------------------------------------------------------------- public types
@dataclass(frozen=True)
class CallLayout:
    """The layout of one guided model call.

    ways: guidance ways stacked in the model batch, B rows each, in batch order. uncond_index: the way SAG
    degrades (its rows are the input of the extra forward). latent_channels: leading input channels that are
    the latent x_t; the rest is conditioning concatenated on channels, passed unchanged to the extra forward.
    """

    ways: int
    uncond_index: int
    latent_channels: int


def _default_cfg(call_args: dict) -> bool:
    scale = call_args.get("guidance_scale")
    return scale is not None and scale > 1


@dataclass(frozen=True)
class SAGLayout:
    """A user-declared batch layout for a pipeline sag_fast does not know (see the module docstring).

    cfg: whether the call stacks guidance ways: a bool, or a function of the pipeline call's arguments (a dict
    by parameter name, defaults filled in) returning a bool; default `guidance_scale > 1`. ways: the number of
    ways when cfg is on (1 when off). uncond_index: the unconditional way (0 for diffusers' usual
    [uncond, cond]). latent_channels: leading input channels that are the latent (None: all). per_row: model
    argument names (dotted for nested dict entries) whose tensors are per-row. joint: for a denoiser whose
    attention puts text and image tokens in one softmax and that sag_fast does not know, where the image tokens
    sit in that sequence ("image_first" as SD3, "text_first" as Flux); None: plain self-attention.
    """

    cfg: bool | Callable[[dict], bool] = _default_cfg
    ways: int = 2
    uncond_index: int = 0
    latent_channels: int | None = None
    per_row: tuple[str, ...] = ("encoder_hidden_states",)
    joint: str | None = None   # joint attention (text and image tokens in one softmax): "image_first" | "text_first"

    def __post_init__(self):
        if not (isinstance(self.cfg, bool) or callable(self.cfg)):
            raise TypeError(f"SAGLayout.cfg must be a bool or a function of the call arguments, got {self.cfg!r}")
        if isinstance(self.ways, bool) or not isinstance(self.ways, int) or self.ways < 1:
            raise ValueError(f"SAGLayout.ways must be a positive int, got {self.ways!r}")
        if isinstance(self.uncond_index, bool) or not isinstance(self.uncond_index, int) \
                or not 0 <= self.uncond_index < self.ways:
            raise ValueError(f"SAGLayout.uncond_index must be in [0, ways={self.ways}), got {self.uncond_index!r}")
        lc = self.latent_channels
        if lc is not None and (isinstance(lc, bool) or not isinstance(lc, int) or lc < 1):
            raise ValueError(f"SAGLayout.latent_channels must be None or a positive int, got {lc!r}")
        if self.joint not in (None, "image_first", "text_first"):
            raise ValueError(f"SAGLayout.joint must be None, 'image_first' or 'text_first', got {self.joint!r}")
        per_row = self.per_row
        if isinstance(per_row, str):
            per_row = (per_row,)
        if not isinstance(per_row, (tuple, list)) or not all(isinstance(p, str) and p for p in per_row):
            raise TypeError(f"SAGLayout.per_row must be a tuple of argument names, got {self.per_row!r}")
        object.__setattr__(self, "per_row", tuple(per_row))


# the ControlNet forward's per-row arguments (ControlNetModel and MultiControlNetModel)
_CONTROLNET_PER_ROW = ("encoder_hidden_states", "controlnet_cond", "class_labels", "timestep_cond", "attention_mask",
                       "added_cond_kwargs")


def _get_path(mapping: dict, path: tuple[str, ...]):
    value = mapping
    for key in path:
        if not isinstance(value, dict) or key not in value:
            return None
        value = value[key]
    return value


def _tensors_under(value, where: str):
    """(name, tensor) for every tensor in value (nested dicts, lists, tuples)."""
    if isinstance(value, torch.Tensor):
        yield where, value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from _tensors_under(v, f"{where}.{k}")
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            yield from _tensors_under(v, f"{where}[{i}]")


def _check_rows(value, where: str, total: int) -> None:
    for name, tensor in _tensors_under(value, where):
        if tensor.dim() == 0 or tensor.shape[0] != total:
            raise RuntimeError(f"the per-row model argument {name} has shape {tuple(tensor.shape)}, but the model "
                               f"batch has {total} rows: the batch does not fit the declared layout")


def _cut_deep(value, rows: slice, total: int, where: str):
    if isinstance(value, torch.Tensor):
        if value.dim() == 0 or value.shape[0] != total:
            raise RuntimeError(f"the per-row model argument {where} has shape {tuple(value.shape)}, but the model "
                               f"batch has {total} rows: the batch does not fit the declared layout")
        return value[rows]
    if isinstance(value, dict):
        return {k: _cut_deep(v, rows, total, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        items = [_cut_deep(v, rows, total, f"{where}[{i}]") for i, v in enumerate(value)]
        return type(value)(*items) if hasattr(value, "_fields") else type(value)(items)
    return value


def _cut_path(mapping: dict, path: tuple[str, ...], rows: slice, total: int, where: str) -> dict:
    """A copy of mapping whose entry at `path` is cut to rows (the containers on the path are copied, never
    modified; an absent or None entry is left as it is)."""
    key = path[0]
    if not isinstance(mapping, dict) or mapping.get(key) is None:
        return mapping
    out = dict(mapping)
    if len(path) == 1:
        out[key] = _cut_deep(mapping[key], rows, total, where)
    else:
        out[key] = _cut_path(mapping[key], path[1:], rows, total, where)
    return out


_WAY_OUT = ("declare the batch layout of its denoiser calls with sag_fast.SAGLayout and pass it as "
            "enable_sag(pipe, layout=SAGLayout(cfg=..., ways=..., uncond_index=..., latent_channels=..., "
            "per_row=(...)))")


# ---------------------------------------------------------------------------------- contract classes
class BatchContract:
    """The batch layout of one pipeline's guided model calls (built by `contract_for` at enable_sag).

    layout(...) at each guided model call; degraded_kwargs(...) for the extra forward; begin_call/end_call
    around each SAG pipeline call; remove() undoes what the contract installed (the ControlNet recorder)."""

    def __init__(self, pipe, model: torch.nn.Module, *, name: str, cfg: Callable[[Any, dict], bool], ways: int,
                 uncond_index: int, latent_channels: int | None, per_row: tuple[str, ...], controlnet: bool = False,
                 defaults: dict | None = None, family: "registry.Family | None" = None, joint: str | None = None):
        self.name = name
        self.family = family
        self.packed = family is not None and family.packed  # 2x2-packed (B, tokens, C*4) latents (Flux)
        self.extra_tokens = family is not None and family.extra_tokens  # conditioning tokens after the latent's
        self._image_size = family.image_size if family is not None else registry.call_image_size
        self._extra_ways = family.extra_ways if family is not None else None
        self._model = model
        self._restore = family is not None and family.restore_processors
        self._processors: dict | None = None   # restore_processors: the processors as the pipeline call began
        self.video = family is not None and family.video    # (B, C, F, H, W) latents (Wan, AnimateDiff)
        self.frames_in_batch = family is not None and family.frames_in_batch
        self.t_scale = family.t_scale if family is not None else 1.0  # scheduler t = t_offset + model t * t_scale
        self.t_offset = family.t_offset if family is not None else 0.0
        self.output_sign = family.output_sign if family is not None else 1.0  # the scheduler gets sign * output
        self.self_context = family is not None and family.self_context
        self._call_refusal = family.call_refusal if family is not None else None
        self.joint = family.joint if family is not None else joint    # where joint attention puts image tokens
        self.shifted_calls = family.shifted_calls if family is not None else None
        self._split = family is not None and family.cfg == "split"
        self._defaults = dict(defaults or {})   # the pipeline __call__'s defaults, under the call's arguments
        self._cfg = cfg
        self._ways = ways
        self._uncond_index = uncond_index
        self._latent_channels = latent_channels
        self.per_row = tuple(per_row)
        self._paths = tuple((p, tuple(p.split("."))) for p in self.per_row)
        # arguments with one entry per (row, frame), b-major (AnimateDiff repeats the text per frame)
        self._frame_paths = tuple((p, tuple(p.split("."))) for p in (family.per_frame_row if family else ()))
        self._controlnet = _ControlNetReplay(pipe) if controlnet else None

    def _with_defaults(self, call_args: dict):
        """The call's arguments, with the pipeline __call__'s defaults under them."""
        return ChainMap(call_args, self._defaults) if self._defaults else call_args

    def check_call(self, call_args: dict) -> None:
        """Refuses a pipeline call whose arguments would make the pipeline's combination of the ways change SAG's
        term (the record's call_refusal), before it samples."""
        why = self._call_refusal(self._with_defaults(call_args)) if self._call_refusal is not None else None
        if why is not None:
            raise ValueError(f"{self.name} with SAG: {why}")

    def split_cfg(self, pipe, call_args: dict) -> bool:
        """Whether this call does CFG as two denoiser calls per step (cond first, then uncond)."""
        if not self._split:
            return False
        return bool(self._cfg(pipe, self._with_defaults(call_args)))

    def latent_hw(self, pipe, call_args: dict) -> tuple[int, int]:
        """(H, W) of the unpacked latent of a packed-latent call (pipeline_flux.py's _unpack_latents rule)."""
        height, width = self._image_size(pipe, self._with_defaults(call_args))
        factor = int(getattr(pipe, "vae_scale_factor", 8))
        return 2 * (int(height) // (factor * 2)), 2 * (int(width) // (factor * 2))

    def __repr__(self):
        return (f"BatchContract({self.name}: ways_if_cfg={self._ways}, uncond_index={self._uncond_index}, "
                f"latent_channels={self._latent_channels}, per_row={self.per_row})")

    # ------------------------------------------------------------------------------------ per call
    def layout(self, pipe, call_args: dict, x: torch.Tensor, model_kwargs: dict) -> CallLayout:
        call = self._with_defaults(call_args)
        try:
            cfg = bool(self._cfg(pipe, call))
        except Exception as e:  # a user cfg function that cannot read this call
            raise RuntimeError(f"{self.name}: the CFG condition of the batch layout failed on this call: {e!r}") from e
        ways, uncond = (self._ways, self._uncond_index) if cfg and not self._split else (1, 0)
        extra = int(self._extra_ways(pipe, call)) if self._extra_ways is not None else 0
        ways += extra   # after the CFG ways (PAG's perturbed copy of the conditional way)
        total = x.shape[0]
        if total % ways:
            raise RuntimeError(f"{self.name}: the layout says {ways} guidance ways (CFG {'on' if cfg else 'off'}"
                               f"{f', {extra} more' if extra else ''}) but "
                               f"the denoiser was called with a batch of {total}, not a multiple of {ways}")
        channels = x.shape[1] if x.dim() > 1 else 0
        latent = channels if self._latent_channels is None else self._latent_channels
        if latent > channels:
            raise RuntimeError(f"{self.name}: the layout says {latent} latent channels but the denoiser input "
                               f"{tuple(x.shape)} has {channels}")
        for name, path in self._paths:
            _check_rows(_get_path(model_kwargs, path), name, total)
        frames = x.shape[2] if x.dim() == 5 else 1
        for name, path in self._frame_paths:
            _check_rows(_get_path(model_kwargs, path), name, total * frames)
        return CallLayout(ways, uncond, latent)

    def degraded_kwargs(self, model_kwargs: dict, rows: slice, total: int, x_degraded: torch.Tensor, t_rows) -> dict:
        """The denoiser kwargs of the extra forward on `rows`: the per-row arguments cut to rows (ControlNet
        residuals recomputed at x_degraded), everything else unchanged. model_kwargs is not modified."""
        out = model_kwargs
        for name, path in self._paths:
            out = _cut_path(out, path, rows, total, name)
        if self._frame_paths:
            f = x_degraded.shape[2] if x_degraded.dim() == 5 else 1
            for name, path in self._frame_paths:
                out = _cut_path(out, path, slice(rows.start * f, rows.stop * f), total * f, name)
        if out is model_kwargs:
            out = dict(model_kwargs)
        if self._controlnet is not None:
            self._controlnet.replay(out, model_kwargs, rows, total, x_degraded, t_rows)
        return out

    def begin_call(self, pipe) -> None:
        if self._controlnet is not None:
            self._controlnet.begin_call(pipe)
        if self._restore:  # before the pipeline swaps any (PAG sets its processors inside its __call__)
            self._processors = {m: m.processor for m in self._model.modules()
                                if callable(getattr(m, "set_processor", None)) and hasattr(m, "processor")}
            left = sorted({type(p).__name__ for p in self._processors.values() if type(p).__name__.startswith("PAG")})
            if left:  # a PAG call that raised does not put the model's processors back (diffusers' pag_utils)
                self._processors = None
                raise RuntimeError(f"{self.name}: the denoiser still has PAG's attention processors "
                                   f"({', '.join(left)}) from an earlier call that did not finish; the extra forward "
                                   "would run with them and split its rows into PAG's ways. Put the model's own "
                                   "back first, e.g. pipe.unet.set_attn_processor(AttnProcessor2_0())")

    def end_call(self) -> None:
        if self._controlnet is not None:
            self._controlnet.end_call()
        self._processors = None

    @contextlib.contextmanager
    def call_processors(self):
        """For the extra forward (restore_processors): the attention processors the pipeline swapped since the
        call began are put back for its duration (PAG's would split the degraded rows into PAG's ways)."""
        swapped = [(m, m.processor) for m, p in (self._processors or {}).items() if m.processor is not p]
        for m, _ in swapped:
            m.set_processor(self._processors[m])
        try:
            yield
        finally:
            for m, p in swapped:
                m.set_processor(p)

    def remove(self) -> None:
        if self._controlnet is not None:
            self._controlnet.remove()


class _ControlNetReplay:
    """Recomputes the ControlNet residuals for the degraded rows.

    During a SAG pipeline call (begin_call to end_call) a forward hook on `pipe.controlnet` records its last call
    (arguments and output); there is no hook between calls, so copying or pickling the pipeline sees nothing of
    it. When the denoiser call being guided received exactly that output as its residuals (the pipeline passed
    the ControlNet's result through), the extra forward gets the ControlNet run again at the degraded latents
    with its per-row arguments (text, control image, SDXL added conditions) cut to the degraded rows, and the
    same conditioning scale and guess mode. Otherwise (guess mode with CFG: the unconditional rows got zeros;
    or residuals the pipeline built itself) the residuals are cut to the rows like any per-row argument."""

    def __init__(self, pipe):
        self._module = None
        self._handle = None
        self._signature = None
        self._record = None
        self._replaying = False
        self.replays = 0          # ControlNet re-runs in this contract's life (tests read it)

    def _hook(self, module, args, kwargs, output):
        if not self._replaying:
            self._record = (args, kwargs, output)

    def begin_call(self, pipe) -> None:
        self.end_call()
        module = getattr(pipe, "controlnet", None)
        if isinstance(module, torch.nn.Module):
            if self._signature is None or self._module is not module:
                self._signature = inspect.signature(module.forward)
            self._module = module
            self._handle = module.register_forward_hook(self._hook, with_kwargs=True)

    def end_call(self) -> None:
        self._record = None
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def remove(self) -> None:
        self.end_call()
        self._module = self._signature = None

    def replay(self, out: dict, model_kwargs: dict, rows: slice, total: int, x_degraded, t_rows) -> None:
        record = self._record
        mid = model_kwargs.get("mid_block_additional_residual")
        if record is None or mid is None:
            return
        args, kwargs, output = record
        produced = output[1] if isinstance(output, (tuple, list)) else getattr(output, "mid_block_res_sample", None)
        if produced is not mid:   # guess mode with CFG (zeros for the uncond rows) or the pipeline's own residuals
            return
        bound = self._signature.bind(*args, **kwargs)
        call = dict(bound.arguments)
        for p in self._signature.parameters.values():   # flatten **kwargs
            if p.kind is p.VAR_KEYWORD and p.name in call:
                call.update(call.pop(p.name))
        params = list(self._signature.parameters)
        sample_name = params[0]
        sample = call[sample_name]
        if not isinstance(sample, torch.Tensor) or sample.shape[0] != total:
            return
        latent = sample.shape[1]
        if x_degraded.shape[1] < latent:
            raise RuntimeError(f"the ControlNet took a {latent}-channel input but the degraded denoiser input has "
                               f"{x_degraded.shape[1]} channels")
        call[sample_name] = x_degraded[:, :latent]
        t_name = "timestep" if "timestep" in call else (params[1] if len(params) > 1 else None)
        if t_name is not None:
            t = call[t_name]
            if isinstance(t, torch.Tensor) and t.dim() > 0 and t.shape[0] == total:
                call[t_name] = t[rows]
        for name in _CONTROLNET_PER_ROW:
            if call.get(name) is not None:
                call[name] = _cut_deep(call[name], rows, total, f"controlnet {name}")
        self._replaying = True
        try:
            result = self._module(**call)
        finally:
            self._replaying = False
        if isinstance(result, (tuple, list)):
            down, mid_rows = result[0], result[1]
        else:
            down, mid_rows = result.down_block_res_samples, result.mid_block_res_sample
        out["down_block_additional_residuals"] = down
        out["mid_block_additional_residual"] = mid_rows
        self.replays += 1


# ----------------------------------------------------------------------------------------- contract_for
def contract_for(pipe, model: torch.nn.Module, layout: SAGLayout | None = None) -> BatchContract:
    """The BatchContract of `pipe` whose denoiser is `model` (the uncompiled module), from its registry record
    (sag_fast.diffusers.registry) or the user's SAGLayout (for a pipeline the registry does not know, or to
    override its record). Raises TypeError for a bad layout, ValueError for a pipeline/denoiser SAG cannot run on
    or does not know, naming the pipeline class, why, and the way out."""
    if layout is not None and not isinstance(layout, SAGLayout):
        raise TypeError(f"layout must be a sag_fast.SAGLayout, got {type(layout).__name__}")
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be the pipeline's denoiser torch module, got {type(model).__name__}")
    cls, family = registry.pipeline_class(pipe)
    if family is not None and family.refusal is not None:  # a refusal record's own reason before the rules'
        raise ValueError(f"{type(pipe).__name__}: {family.refusal}; it is not supported")
    why = registry.rule_refusal(pipe, model)
    if why is not None:
        raise ValueError(why)
    controlnet = isinstance(getattr(pipe, "controlnet", None), torch.nn.Module)
    if layout is not None:
        cfg = layout.cfg
        cfg_fn = (lambda pipe, call, value=cfg: value) if isinstance(cfg, bool) else (lambda pipe, call: cfg(call))
        return BatchContract(pipe, model, name=type(pipe).__name__, cfg=cfg_fn, ways=layout.ways,
                             uncond_index=layout.uncond_index, latent_channels=layout.latent_channels,
                             per_row=layout.per_row, controlnet=controlnet and
                             "mid_block_additional_residual" in layout.per_row, joint=layout.joint)
    if family is None:
        known = ("not in sag_fast's model registry" if (cls.__module__ or "").startswith("diffusers.")
                 else "a class whose own __call__ may stack the batch differently")
        raise ValueError(f"{type(pipe).__name__}: SAG does not know how this pipeline stacks its denoiser batch "
                         f"({cls.__name__} is {known}); {_WAY_OUT}")
    config = getattr(pipe, "config", None) or {}
    for key, why in family.refused_configs:
        if config.get(key):
            raise ValueError(f"{type(pipe).__name__} with {key}={config.get(key)!r}: {why}; it is not supported")
    model_name = next((c.__name__ for c in type(model).__mro__ if c.__name__ in family.denoisers), None)
    if model_name is None:
        raise ValueError(f"{type(pipe).__name__} with a {type(model).__name__} denoiser is not supported (the "
                         f"{family.name} record covers {', '.join(family.denoisers)}); {_WAY_OUT}")
    defaults = {n: p.default for n, p in inspect.signature(cls.__call__).parameters.items()
                if p.default is not inspect.Parameter.empty}
    return BatchContract(pipe, model, name=cls.__name__, cfg=family.cfg_on, ways=family.ways,
                         uncond_index=family.uncond_index, latent_channels=family.latent(model),
                         per_row=family.per_row, controlnet=family.controlnet and controlnet, defaults=defaults,
                         family=family)
