"""A SAG session: everything Self-Attention Guidance installs on one diffusers pipeline, and its per-call state.

`SAGSession(pipe, config, layout)` (built by `enable_sag` and by the drop-in pipelines' constructors) checks
everything that can be checked before sampling, then installs:

* the batch contract of the pipeline (`contract.py`): which rows are the unconditional way, how many ways,
  which input channels are latents, which model arguments are per-row; unknown pipelines are refused here;
* an `AttentionCapture` on the chosen self-attention layer of the denoiser (under any `torch.compile` wrapper);
* the guided step around the denoiser *as the pipeline calls it* (`pipe.unet` / `pipe.transformer`): a diffusers
  `ModelHook` on a plain module, a `forward` override on a `torch.compile`d module so that the guided step
  (two compiled forwards, the degrade and the shift between them) stays outside the compiled graph.

Per-call state lives in a context variable set for the duration of one SAG pipeline call (`pipeline_call`):
the guided step runs only inside a call of the pipeline that enabled SAG, so another pipeline sharing the
denoiser (`Pipeline(**pipe.components)`, `from_pipe`) gets the plain model. `enable_sag` gives the pipeline a
per-instance subclass because `pipe(...)` looks `__call__` up on the type: it is the one place that sees every
call. The same mixin makes copies and pickles carry SAG: `copy.deepcopy` and `pickle` copy the pipeline
without SAG, then enable it again, with the same settings, on the copy.
"""
from __future__ import annotations

import contextlib
import contextvars
import copy
import functools
import inspect
import pickle
import torch
from diffusers import DiffusionPipeline
from diffusers.hooks import HookRegistry, ModelHook

from ..capture import AttentionCapture, unwrap_compiled
from ..guidance import SAGConfig, sag_guided_forward
from ..schedule import check_supported, signal_coefficients_for
from .contract import contract_for

HOOK_NAME = "sag_fast"
STATE_ATTR = "_sag_fast_state"
DENOISERS = ("unet", "transformer")

# the SAG pipeline call in progress in this thread / task: (session, call state) or None
_ACTIVE: contextvars.ContextVar = contextvars.ContextVar("sag_fast_call", default=None)


def _forward_layout(model: torch.nn.Module) -> tuple[inspect.Signature, str, str | None, bool]:
    """(signature of the denoiser class's forward without self, input name, timestep name, takes return_dict)."""
    signature = inspect.signature(type(model).forward)
    params = list(signature.parameters.values())[1:]
    signature = signature.replace(parameters=params)
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if not positional:
        raise TypeError(f"the denoiser's forward {signature} takes no positional input")
    names = [p.name for p in params]
    t_name = "timestep" if "timestep" in names else (positional[1].name if len(positional) > 1 else None)
    return signature, positional[0].name, t_name, "return_dict" in names


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


# joint-attention denoisers: where their attention puts the image tokens (read from their processors:
# JointAttnProcessor2_0 concatenates [image, text])
_JOINT = {"SD3Transformer2DModel": "image_first", "FluxTransformer2DModel": "text_first"}


def pack_latents(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H/2*W/2, C*4): Flux's 2x2 packing (pipeline_flux.py's _pack_latents)."""
    b, c, h, w = x.shape
    return x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """(B, H/2*W/2, C*4) -> (B, C, H, W), the inverse of pack_latents (exact: a permutation of elements)."""
    b, n, c4 = x.shape
    if n != (h // 2) * (w // 2) or c4 % 4:
        raise RuntimeError(f"packed latents {tuple(x.shape)} do not fit a {h}x{w} latent with 2x2 patches")
    return x.view(b, h // 2, w // 2, c4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c4 // 4, h, w)


def joint_layout(model: torch.nn.Module) -> str | None:
    """Where a known joint-attention denoiser puts the image tokens ('image_first', 'text_first'), else None."""
    return next((_JOINT[c.__name__] for c in type(model).__mro__ if c.__name__ in _JOINT), None)


def _is_compiled(module) -> bool:
    return isinstance(getattr(module, "_orig_mod", None), torch.nn.Module)


def _named_signature(cls: type, call) -> inspect.Signature:
    """The signature to read a call's arguments by name: `call`'s, or, when it only forwards (*args, **kwargs),
    as a user subclass's __call__ often does, the nearest base class __call__ that names its parameters."""
    for candidate in (call, *(vars(c)["__call__"] for c in cls.__mro__ if "__call__" in vars(c))):
        signature = inspect.signature(candidate)
        if any(p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) for p in list(signature.parameters.values())[1:]):
            return signature
    return inspect.signature(call)


class _CallState:
    """One SAG pipeline call: its arguments (bound, defaults filled in), config and model-call counter."""

    def __init__(self, session: "SAGSession", pipe, call_args: dict, config: SAGConfig):
        self.session, self.pipe, self.args, self.config = session, pipe, call_args, config
        self.calls = 0           # model calls so far in this pipeline call (host counter)
        self.offset: int | None = None
        self.split = session.contract.split_cfg(pipe, call_args)  # CFG as two calls per step (Flux true CFG)
        self.pending = None      # the conditional output of this step's first call, when split


class _SAGModelHook(ModelHook):
    """diffusers hook (plain denoiser): its forward is the session's guided step."""

    def __init__(self, session: "SAGSession"):
        super().__init__()
        self.session = session

    def new_forward(self, module, *args, **kwargs):
        return self.session.forward(self.fn_ref.original_forward, *args, **kwargs)


class _GuidedForward:
    """`forward` of a torch.compile'd denoiser (OptimizedModule): the guided step around the compiled forward."""

    def __init__(self, session: "SAGSession", original):
        self.session, self.original = session, original

    def __call__(self, *args, **kwargs):
        return self.session.forward(self.original, *args, **kwargs)


class SAGSession:
    """SAG installed on one pipeline: contract, capture, the guided step on the denoiser, per-call state."""

    def __init__(self, pipe, config: SAGConfig, layout=None):
        model_attr = next((n for n in DENOISERS if isinstance(getattr(pipe, n, None), torch.nn.Module)), None)
        if model_attr is None:
            raise ValueError(f"pipe: {type(pipe).__name__} has no `unet` or `transformer` torch module to guide; "
                             "SAG needs a diffusers pipeline with a denoiser that has self-attention")
        scheduler = getattr(pipe, "scheduler", None)
        if scheduler is None:
            raise ValueError(f"pipe: {type(pipe).__name__} has no `scheduler`; SAG needs one to degrade the input")
        check_supported(scheduler)
        self.model_attr = model_attr
        outer: torch.nn.Module = getattr(pipe, model_attr)       # what the pipeline calls
        self.model: torch.nn.Module = unwrap_compiled(outer)  # the module itself
        self.config = config
        self.layout = layout
        self.contract = contract_for(pipe, self.model, layout)
        self.capture: AttentionCapture | None = None
        self._signature = _forward_layout(self.model)
        self._hooked: torch.nn.Module | None = None
        self._had_registry = self._had_forward = False
        try:
            if config.mask == "attention":
                joint = joint_layout(self.model) or getattr(layout, "joint", None)
                self.capture = AttentionCapture(self.model, config.layer, config.threshold, joint=joint)
            self._install_outer(outer)
        except BaseException:
            self.remove()
            raise

    # ------------------------------------------------------------------------------ install
    def _install_outer(self, outer: torch.nn.Module) -> None:
        if _is_compiled(outer):
            current = vars(outer).get("forward")
            if isinstance(current, _GuidedForward):
                raise RuntimeError(f"pipe.{self.model_attr} already has SAG enabled (another pipeline sharing this "
                                   "model?); call disable_sag on that pipeline first")
            # OptimizedModule keeps `forward` on the instance: wrap it there, outside the compiled graph
            outer.forward = _GuidedForward(self, current if current is not None else outer.forward)
        else:
            self._had_registry = "_diffusers_hook" in vars(outer)
            self._had_forward = "forward" in vars(outer)
            registry = HookRegistry.check_if_exists_or_initialize(outer)
            if registry.get_hook(HOOK_NAME) is not None:
                raise RuntimeError(f"pipe.{self.model_attr} already has SAG enabled (another pipeline sharing this "
                                   "model?); call disable_sag on that pipeline first")
            registry.register_hook(_SAGModelHook(self), HOOK_NAME)
        self._hooked = outer

    def _remove_outer(self) -> None:
        outer, self._hooked = self._hooked, None
        if outer is None:
            return
        if _is_compiled(outer):
            current = vars(outer).get("forward")
            if isinstance(current, _GuidedForward) and current.session is self:
                outer.forward = current.original
            return
        registry = vars(outer).get("_diffusers_hook")
        if registry is None or registry.get_hook(HOOK_NAME) is None:
            return
        registry.remove_hook(HOOK_NAME, recurse=False)
        # HookRegistry leaves a bound `forward` and an empty registry on the instance: drop what we created
        if not registry.hooks:
            if not self._had_forward and "forward" in vars(outer):
                del outer.forward
            if not self._had_registry:
                del outer._diffusers_hook

    def remove(self) -> None:
        """Removes everything SAG installed; the denoiser is exactly as before."""
        self._remove_outer()
        if self.capture is not None:
            self.capture.remove()
            self.capture = None
        self.contract.remove()

    def _sync(self, pipe) -> None:
        """The pipeline's denoiser may have been wrapped since enable_sag (`pipe.unet = torch.compile(pipe.unet)`):
        move the guided step to the object the pipeline now calls. A different model is refused."""
        outer = getattr(pipe, self.model_attr, None)
        if outer is self._hooked:
            return
        if not isinstance(outer, torch.nn.Module) or unwrap_compiled(outer) is not self.model:
            raise RuntimeError(f"pipe.{self.model_attr} was replaced by another model after enable_sag; call "
                               "sag_fast.enable_sag(pipe, ...) again to guide the new one")
        self._remove_outer()
        self._install_outer(outer)

    # ------------------------------------------------------------------------- pipeline calls
    @contextlib.contextmanager
    def pipeline_call(self, call, pipe, args, kwargs, config: SAGConfig | None = None):
        """One pipeline __call__: the guided step is live for this session's denoiser until it returns."""
        self._sync(pipe)
        try:
            bound = _named_signature(type(pipe), call).bind(pipe, *args, **kwargs)
            bound.apply_defaults()
            call_args = dict(bound.arguments)
            call_args.update(call_args.pop("kwargs", None) or {})
        except TypeError:
            call_args = dict(kwargs)  # let the pipeline itself report the bad call
        token = _ACTIVE.set(_CallState(self, pipe, call_args, config or self.config))
        self.contract.begin_call(pipe)
        try:
            yield self
        finally:
            _ACTIVE.reset(token)
            self.contract.end_call()

    def _progress(self, state: _CallState, scheduler, t) -> float:
        """Fraction of the trajectory before this model call: (offset + calls so far) / len(timesteps)."""
        timesteps = getattr(scheduler, "timesteps", None)
        n = len(timesteps) if timesteps is not None else 0
        if n == 0:
            return 0.0
        if state.offset is None:
            state.offset = self._start_index(state, scheduler, timesteps, t)
        return (state.offset + (state.calls // 2 if state.split else state.calls)) / n

    @staticmethod
    def _start_index(state: _CallState, scheduler, timesteps, t) -> int:
        # img2img-like calls start part-way through the schedule: the scheduler knows where (begin_index),
        # else find the first timestep once per call (one host read per pipeline call, never per step)
        begin = getattr(scheduler, "begin_index", None)
        if isinstance(begin, int):
            return begin
        if "strength" in state.args and isinstance(t, torch.Tensor) and t.numel() > 0:
            first = t.reshape(-1)[0].to(timesteps.device, timesteps.dtype)
            hits = (timesteps == first).nonzero()
            return int(hits[0, 0]) if len(hits) else 0
        return 0

    # ------------------------------------------------------------------------------- forward
    def forward(self, original, *args, **kwargs):
        """The denoiser's forward with SAG: a drop-in for `original(*args, **kwargs)`."""
        state = _ACTIVE.get()
        if state is None or state.session is not self:  # not inside this pipeline's SAG call: the plain model
            return original(*args, **kwargs)
        signature, x_name, t_name, has_return_dict = self._signature
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
        pipe, config = state.pipe, state.config
        scheduler = pipe.scheduler
        if arguments.get("skip_layers") is not None:  # SD3's skip-layer-guidance call: its own guidance term
            return original(*args, **kwargs)
        contract = self.contract
        packed = contract.packed and isinstance(x, torch.Tensor) and x.dim() == 3
        if not isinstance(x, torch.Tensor) or (x.dim() != 4 and not packed):  # the contract refuses these early
            raise RuntimeError(f"SAG: pipe.{self.model_attr} was called with a {getattr(x, 'shape', type(x))} input; "
                               "SAG guides (B, C, H, W) latents (or the packed latents of a known pipeline) only")
        active = config.active_at(self._progress(state, scheduler, t))
        way = state.calls % 2 if state.split else None  # split CFG: 0 = the conditional call, 1 = the unconditional
        state.calls += 1
        if not active:
            return original(*args, **kwargs)
        if way == 0:  # keep the conditional prediction: the unconditional call adds SAG's shift to it too
            result = original(*args, **kwargs)
            state.pending = _split_output(result)[0]
            return result

        if packed:
            h, w = contract.latent_hw(pipe, state.args)
            x4 = unpack_latents(x, h, w)
        else:
            x4 = x
        layout = contract.layout(pipe, state.args, x4, arguments)
        t_sched = t * contract.t_scale if contract.t_scale != 1.0 and isinstance(t, torch.Tensor) else t
        c1, c2 = signal_coefficients_for(scheduler, t_sched, device=x.device)
        return_dict = arguments.pop("return_dict", True) if has_return_dict else None
        first: list = []

        def model(x_in, t_in, **kw):
            call_kw = {x_name: pack_latents(x_in) if packed else x_in, **kw}
            if t_name is not None:
                call_kw[t_name] = t_in
            if has_return_dict:
                call_kw["return_dict"] = return_dict
            tensor, rebuild = _split_output(original(**call_kw))
            if not first:
                first.append(rebuild)
            return unpack_latents(tensor, h, w) if packed else tensor

        on_shift = None
        if way == 1 and state.pending is not None:
            pending, state.pending = state.pending, None

            def on_shift(delta):  # the conditional way, returned by the step's first call and held by the pipeline
                if packed:
                    pending.add_(pack_latents(delta).to(pending.dtype))
                else:
                    pending[:, :delta.shape[1]].add_(delta.to(pending.dtype))

        if self.capture is not None:
            self.capture.threshold = config.threshold
            self.capture.image_tokens = x.shape[1] if packed else None
        out = sag_guided_forward(model, x4, t, arguments, config=config, capture=self.capture, c1=c1, c2=c2,
                                 ways=layout.ways, uncond_index=layout.uncond_index,
                                 guided_channels=layout.latent_channels, latent_channels=layout.latent_channels,
                                 degraded_kwargs=contract.degraded_kwargs, on_shift=on_shift)
        return first[0](pack_latents(out) if packed else out)


# ------------------------------------------------------------------------------ copies and pickles
def _unpickle_sag_pipeline(payload: bytes, config: SAGConfig, layout, dropin: bool):
    pipe = _unpickle_plain(payload)
    if dropin:
        attach_session(pipe, SAGSession(pipe, config, layout))
    else:
        install(pipe, config, layout)
    return pipe


def attach_session(pipe, session: SAGSession) -> None:
    object.__setattr__(pipe, STATE_ATTR, session)


class SAGCopyMixin:
    """deepcopy / pickle of a pipeline with SAG: copy it without SAG (hooks hold closures and references to this
    pipeline's modules that a plain copy would share or fail on), then enable SAG on the copy, same settings."""

    @contextlib.contextmanager
    def _sag_detached(self):
        session = vars(self).pop(STATE_ATTR, None)
        if session is None:
            yield None
            return
        config, layout = session.config, session.layout
        session.remove()
        try:
            yield session
        finally:
            attach_session(self, SAGSession(self, config, layout))

    def __deepcopy__(self, memo):
        with self._sag_detached() as session:
            rv = object.__reduce_ex__(self, 4)
            clone = copy._reconstruct(self, memo, *rv)  # the default deepcopy, same class
        if session is not None:
            attach_session(clone, SAGSession(clone, session.config, session.layout))
        return clone

    def __reduce_ex__(self, protocol):
        base = getattr(type(self), "_sag_base_class", None)  # enable_sag's per-instance class pickles as its base
        dropin = base is None
        with self._sag_detached() as session:
            state = {k: v for k, v in vars(self).items() if k != STATE_ATTR}
            payload = pickle.dumps((type(self) if dropin else base, state), protocol)
        if session is None:
            return _unpickle_plain, (payload,)
        return _unpickle_sag_pipeline, (payload, session.config, session.layout, dropin)


def _unpickle_plain(payload: bytes):
    cls, state = pickle.loads(payload)
    pipe = object.__new__(cls)
    pipe.__dict__.update(state)
    return pipe


@functools.lru_cache(maxsize=None)
def sag_class(cls: type) -> type:
    """A subclass of `cls` (same name) whose __call__ opens the SAG call of the pipeline's session."""

    def __call__(self, *args, **kwargs):
        session = vars(self).get(STATE_ATTR)
        if session is None:  # disabled by hand without restoring the class: behave as the base class
            return cls.__call__(self, *args, **kwargs)
        with session.pipeline_call(cls.__call__, self, args, kwargs):
            return cls.__call__(self, *args, **kwargs)

    __call__.__doc__ = cls.__call__.__doc__
    __call__.__signature__ = inspect.signature(cls.__call__)
    return type(cls.__name__, (SAGCopyMixin, cls), {"__call__": __call__, "__module__": cls.__module__,
                                                    "__qualname__": cls.__qualname__, "_sag_base_class": cls})


def install(pipe, config: SAGConfig, layout=None) -> SAGSession:
    """SAG on `pipe` until `uninstall`: a session, and the per-instance subclass that opens its calls."""
    if not isinstance(pipe, DiffusionPipeline):
        raise TypeError(f"enable_sag: pipe must be a diffusers pipeline, got {type(pipe).__name__}")
    if vars(pipe).get(STATE_ATTR) is not None:
        uninstall(pipe)
    session = SAGSession(pipe, config, layout)
    base = type(pipe)
    try:
        attach_session(pipe, session)
        if not hasattr(base, "_sag_base_class"):
            pipe.__class__ = sag_class(base)
    except BaseException:
        session.remove()
        vars(pipe).pop(STATE_ATTR, None)
        raise
    return session


def uninstall(pipe) -> None:
    """Undo `install`: the denoiser and the pipeline's class exactly as before; a no-op without SAG."""
    session = vars(pipe).pop(STATE_ATTR, None)
    if session is not None:
        session.remove()
    base = getattr(type(pipe), "_sag_base_class", None)
    if base is not None and type(pipe) is sag_class(base):
        pipe.__class__ = base
