"""enable_sag / disable_sag: Self-Attention Guidance on an existing diffusers pipeline, in place.

The denoiser (`pipe.unet` or `pipe.transformer`) gets a diffusers `ModelHook` (registered in its
`HookRegistry`, so it composes with diffusers' own hooks) whose forward is the guided step of
`sag_fast.guidance.sag_guided_forward`: the plain forward with the attention mask captured on the
unconditional rows, the degraded forward, and `+scale*(u - d)` added in place to every CFG way. The
pipeline's own CFG, guidance_rescale and scheduler step run afterwards unchanged, so SAG composes with
them (ways=2: CFG+SAG; ways=1: SAG alone).

Per model call the hook needs what only the pipeline call knows: whether CFG is on (2 ways, and which
way is the unconditional one), the step's (c1, c2) and the step progress for SAGConfig.start/stop.
`enable_sag` therefore also gives the pipeline a per-instance subclass whose `__call__` opens a call
session (resets the host-side model-call counter, records the call's arguments); `disable_sag` puts
the original class back. The drop-in pipelines (sag_fast.diffusers.pipelines) use the same `_SAGSession`
for one call.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import weakref
from typing import Any

import torch

from ..capture import AttentionCapture
from ..guidance import SAGConfig, sag_guided_forward
from ..schedule import check_supported, signal_coefficients_for

try:
    from diffusers.hooks import HookRegistry, ModelHook
except ImportError:  # pragma: no cover - very old diffusers: the wrapper below is installed by hand
    HookRegistry = ModelHook = None

_HOOK_NAME = "sag_fast"
_STATE_ATTR = "_sag_fast_state"
_DENOISERS = ("unet", "transformer")


# ----------------------------------------------------------------------------- model binding
def _forward_layout(signature: inspect.Signature) -> tuple[str, str | None, bool]:
    """(name of the input parameter, name of the timestep parameter, whether it takes return_dict)."""
    params = [p for p in signature.parameters.values() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if not params:
        raise TypeError(f"the denoiser's forward {signature} takes no positional input")
    names = [p.name for p in signature.parameters.values()]
    t_name = "timestep" if "timestep" in names else (params[1].name if len(params) > 1 else None)
    return params[0].name, t_name, "return_dict" in names


def _split_output(result):
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


class _SAGSession:
    """SAG installed on one pipeline's denoiser: the capture hooks, the forward hook and the call state."""

    def __init__(self, pipe, config: SAGConfig):
        model_attr = next((n for n in _DENOISERS if isinstance(getattr(pipe, n, None), torch.nn.Module)), None)
        if model_attr is None:
            raise ValueError(f"pipe: {type(pipe).__name__} has no `unet` or `transformer` torch module to guide; "
                             "enable_sag needs a diffusers pipeline with a denoiser that has self-attention")
        scheduler = getattr(pipe, "scheduler", None)
        if scheduler is None:
            raise ValueError(f"pipe: {type(pipe).__name__} has no `scheduler`; SAG needs one to degrade the input")
        check_supported(scheduler)
        self.model_attr = model_attr
        self.model: torch.nn.Module = getattr(pipe, model_attr)
        self.config = config
        self._pipe = weakref.ref(pipe)
        self.capture = None
        if config.mask == "attention":
            self.capture = AttentionCapture(self.model, config.layer, config.threshold)
        self.calls = 0           # model calls in the current pipeline call (host counter)
        self.offset: int | None = None
        self.call_args: dict[str, Any] = {}
        self._installed = False
        self._layout = None      # (forward, its signature, (input name, timestep name, takes return_dict))
        try:
            self._install_forward()
        except BaseException:
            self._remove_capture()
            raise

    # ------------------------------------------------------------------------------ install
    def _install_forward(self) -> None:
        model = self.model
        self._had_registry = hasattr(model, "_diffusers_hook")
        self._had_forward_attr = "forward" in vars(model)
        if HookRegistry is not None:
            registry = HookRegistry.check_if_exists_or_initialize(model)
            if registry.get_hook(_HOOK_NAME) is not None:
                raise RuntimeError(f"pipe.{self.model_attr} already has a '{_HOOK_NAME}' hook (another pipeline "
                                   "sharing this model has SAG enabled); call disable_sag on it first")
            registry.register_hook(_SAGModelHook(self), _HOOK_NAME)
        else:  # pragma: no cover
            original = model.forward
            self._manual_original = original
            model.forward = functools.wraps(original)(lambda *a, **k: self.forward(original, *a, **k))
        self._installed = True

    def remove(self) -> None:
        """Removes every hook; the denoiser is exactly as before (same forward, no registry if there was none)."""
        model = self.model
        if self._installed:
            if HookRegistry is not None:
                registry = model._diffusers_hook
                registry.remove_hook(_HOOK_NAME, recurse=False)
                # HookRegistry leaves a bound `forward` and an empty registry on the instance: drop what we created
                if not registry.hooks:
                    if not self._had_forward_attr and "forward" in vars(model):
                        del model.forward
                    if not self._had_registry:
                        del model._diffusers_hook
            else:  # pragma: no cover
                if self._had_forward_attr:
                    model.forward = self._manual_original
                else:
                    del model.forward
            self._installed = False
        self._remove_capture()

    def _remove_capture(self) -> None:
        if self.capture is not None:
            self.capture.remove()
            self.capture = None

    # ------------------------------------------------------------------------- pipeline calls
    @contextlib.contextmanager
    def pipeline_call(self, call, pipe, args, kwargs):
        """One pipeline __call__: record its arguments (with defaults), count model calls from zero."""
        try:
            bound = inspect.signature(call).bind(pipe, *args, **kwargs)
            bound.apply_defaults()
            call_args = dict(bound.arguments)
            call_args.update(call_args.pop("kwargs", None) or {})
        except TypeError:
            call_args = dict(kwargs)  # let the pipeline itself report the bad call
        self.call_args, self.calls, self.offset = call_args, 0, None
        try:
            yield self
        finally:
            self.call_args, self.calls, self.offset = {}, 0, None

    def _progress(self, scheduler, t) -> float:
        """Fraction of the trajectory before this model call: (offset + calls so far) / len(timesteps)."""
        timesteps = getattr(scheduler, "timesteps", None)
        n = len(timesteps) if timesteps is not None else 0
        if n == 0:
            return 0.0
        if self.offset is None:
            self.offset = self._start_index(scheduler, timesteps, t)
        return (self.offset + self.calls) / n

    def _start_index(self, scheduler, timesteps, t) -> int:
        # img2img-like calls start part-way through the schedule: the scheduler knows where (begin_index),
        # else find the first timestep once per call (one host read per pipeline call, never per step)
        begin = getattr(scheduler, "begin_index", None)
        if isinstance(begin, int):
            return begin
        if "strength" in self.call_args and isinstance(t, torch.Tensor) and t.numel() > 0:
            first = t.reshape(-1)[0].to(timesteps.device, timesteps.dtype)
            hits = (timesteps == first).nonzero()
            return int(hits[0, 0]) if len(hits) else 0
        return 0

    def _ways(self, pipe, batch: int) -> tuple[int, int]:
        """(number of CFG ways in the model batch, index of the unconditional way)."""
        from diffusers import DiTPipeline

        if isinstance(pipe, DiTPipeline):  # DiT concatenates [cond, null-class]: unconditional second
            scale = self.call_args.get("guidance_scale", 1.0)
            return (2, 1) if scale is not None and scale > 1 else (1, 0)
        try:
            cfg = bool(pipe.do_classifier_free_guidance)
        except (AttributeError, TypeError):  # no such property, or read outside a pipeline call
            cfg = False
        if cfg and batch % 2:
            raise RuntimeError(f"{type(pipe).__name__} does classifier-free guidance but called "
                               f"{self.model_attr} with an odd batch of {batch}")
        return (2, 0) if cfg else (1, 0)

    # ------------------------------------------------------------------------------- forward
    def forward(self, original, *args, **kwargs):
        """The denoiser's forward with SAG: a drop-in for `original(*args, **kwargs)`."""
        pipe = self._pipe()
        if self._layout is None or self._layout[0] is not original:
            signature = inspect.signature(original)
            self._layout = (original, signature, _forward_layout(signature))
        _, signature, (x_name, t_name, has_return_dict) = self._layout
        try:
            bound = signature.bind(*args, **kwargs)
        except TypeError:
            return original(*args, **kwargs)  # the model reports the bad call itself
        arguments = dict(bound.arguments)
        for p in signature.parameters.values():  # flatten **kwargs
            if p.kind is p.VAR_KEYWORD and p.name in arguments:
                arguments.update(arguments.pop(p.name))
        x = arguments.pop(x_name)
        t = arguments.pop(t_name, None) if t_name is not None else None
        scheduler = getattr(pipe, "scheduler", None) if pipe is not None else None

        active = pipe is not None and scheduler is not None and isinstance(x, torch.Tensor) and x.dim() == 4
        if active:
            active = self.config.active_at(self._progress(scheduler, t))
        self.calls += 1
        if not active:
            return original(*args, **kwargs)

        ways, uncond_index = self._ways(pipe, x.shape[0])
        c1, c2 = signal_coefficients_for(scheduler, t)
        return_dict = arguments.pop("return_dict", True) if has_return_dict else None
        capture = self.capture
        first: list = []

        def model(x_in, t_in, **kw):
            call_kw = {x_name: x_in, **kw}
            if t_name is not None:
                call_kw[t_name] = t_in
            if has_return_dict:
                call_kw["return_dict"] = return_dict
            if capture is not None:  # original() skips the model's own pre-hooks, where capture reads the input size
                capture.observe_input(**call_kw)
            result = original(**call_kw)
            tensor, rebuild = _split_output(result)
            if not first:
                first.append(rebuild)
            return tensor

        out = sag_guided_forward(model, x, t, arguments, config=self.config, capture=self.capture, c1=c1, c2=c2,
                                 ways=ways, uncond_index=uncond_index, guided_channels=x.shape[1])
        return first[0](out)


if ModelHook is not None:
    class _SAGModelHook(ModelHook):
        """diffusers hook whose forward is the SAG-guided step of its session."""

        def __init__(self, session: _SAGSession):
            super().__init__()
            self.session = session

        def new_forward(self, module, *args, **kwargs):
            return self.session.forward(self.fn_ref.original_forward, *args, **kwargs)


# ------------------------------------------------------------------------ per-instance class
@functools.lru_cache(maxsize=None)
def _sag_class(cls: type) -> type:
    """A subclass of `cls` (same name) whose __call__ opens a SAG call session around the pipeline's own."""

    def __call__(self, *args, **kwargs):
        state = vars(self).get(_STATE_ATTR)
        if state is None:  # disabled by hand without restoring the class: behave as the base class
            return cls.__call__(self, *args, **kwargs)
        with state.pipeline_call(cls.__call__, self, args, kwargs):
            return cls.__call__(self, *args, **kwargs)

    __call__.__doc__ = cls.__call__.__doc__
    __call__.__signature__ = inspect.signature(cls.__call__)
    return type(cls.__name__, (cls,), {"__call__": __call__, "__module__": cls.__module__,
                                       "__qualname__": cls.__qualname__, "_sag_base_class": cls})


def make_config(scale: float | None = None, config: SAGConfig | None = None, fields: dict | None = None,
                where: str = "enable_sag") -> SAGConfig:
    """SAGConfig from an optional base config, a scale (None: the base's, else 0.75) and field overrides."""
    if config is not None and not isinstance(config, SAGConfig):
        raise TypeError(f"{where}: config must be a sag_fast.SAGConfig, got {type(config).__name__}")
    fields = dict(fields or {})
    names = {f.name for f in dataclasses.fields(SAGConfig)}
    unknown = sorted(set(fields) - names)
    if unknown:
        raise TypeError(f"{where} got unknown setting(s) {unknown}; the SAGConfig fields are {sorted(names)}")
    if "scale" in fields and scale is not None:
        raise TypeError(f"{where}: scale given twice")
    if scale is not None:
        fields["scale"] = scale
    return dataclasses.replace(config if config is not None else SAGConfig(), **fields)


def enable_sag(pipe, scale: float | None = None, *, config: SAGConfig | None = None, **fields):
    """Turn `pipe` into a SAG pipeline in place and return it.

    pipe: a diffusers pipeline with a `unet` or `transformer` (SD 1/2, img2img, SDXL, DiT, DDPM/DDIM with
    UNet2DModel, ...). scale: the SAG scale (default 0.75, or config's; 0: unguided, bit for bit). Other settings are SAGConfig fields
    (blur_sigma, kernel_size, threshold, layer, mask, start, stop), or pass config=SAGConfig(...).

    Calling enable_sag again replaces the settings. The pipeline's CFG (guidance_scale), guidance_rescale
    and scheduler are used as they are. Errors (no denoiser, an unsupported scheduler, a layer that is not
    there or not self-attention) are raised here, not during sampling.
    """
    from .pipelines import _SAGPipelineMixin

    if isinstance(pipe, _SAGPipelineMixin):
        raise TypeError(f"pipe is already a {type(pipe).__name__} (SAG on every call); set its sag_scale per call "
                        "instead of enable_sag, or use the base diffusers pipeline")
    new_config = make_config(scale, config, fields)
    if vars(pipe).get(_STATE_ATTR) is not None:
        disable_sag(pipe)
    session = _SAGSession(pipe, new_config)
    base = type(pipe)
    try:
        object.__setattr__(pipe, _STATE_ATTR, session)
        pipe.__class__ = _sag_class(base)
    except BaseException:
        session.remove()
        vars(pipe).pop(_STATE_ATTR, None)
        raise
    return pipe


def disable_sag(pipe):
    """Undo enable_sag: the denoiser and the pipeline's class are exactly as before. A pipeline without SAG
    enabled is returned unchanged (a no-op, not an error). Returns pipe."""
    session = vars(pipe).pop(_STATE_ATTR, None)
    if session is not None:
        session.remove()
    base = getattr(type(pipe), "_sag_base_class", None)
    if base is not None and type(pipe) is _sag_class(base):
        pipe.__class__ = base
    return pipe


def sag_config(pipe) -> SAGConfig | None:
    """The SAGConfig enabled on `pipe`, or None."""
    session = vars(pipe).get(_STATE_ATTR)
    return None if session is None else session.config
