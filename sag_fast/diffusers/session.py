"""A SAG session: the adapter between one diffusers pipeline and the engine (sag_fast.engine).

`SAGSession(pipe, config, layout)` (built by `enable_sag` and by the drop-in pipelines' constructors) checks
everything that can be checked before sampling, then installs the engine's named hook on the denoiser *as the
pipeline calls it* (`pipe.unet` / `pipe.transformer`, plain or `torch.compile`d) and an `AttentionCapture` on the
SAG layer (the family's default layer unless one is given). Its only job at each model call is to say what the
engine cannot know: which rows are the unconditional way, the step's timestep and coefficients, the arguments of
the extra forward (the batch contract, `contract.py`, from the family's record in `registry.py`), and what to do
with the step's other predictions (split CFG's conditional call, SD3's skip-layer call).

The per-call state is an `engine.ActiveCall` opened by the pipeline's `__call__` (`pipeline_call`), in a context
variable: the guided step runs only inside a call of the pipeline that enabled SAG, in its own thread, so another
pipeline sharing the denoiser (`Pipeline(**pipe.components)`, `from_pipe`, another thread) gets the plain model.
`enable_sag` gives the pipeline a per-instance subclass because `pipe(...)` looks `__call__` up on the type: it is
the one place that sees every call. The same mixin makes copies and pickles carry SAG: `copy.deepcopy` and
`pickle` copy the pipeline without SAG, then enable it again, with the same settings, on the copy.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import inspect
import math
import pickle
import threading

import torch
from diffusers import DiffusionPipeline

from .. import engine, named_hooks
from ..capture import AttentionCapture, unwrap_compiled
from ..guidance import SAGConfig
from ..schedule import check_supported, schedule_position, step_coefficients
from .contract import contract_for

STATE_ATTR = "_sag_fast_state"
DENOISERS = ("unet", "transformer")


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


def _named_signature(cls: type, call) -> inspect.Signature:
    """The signature to read a call's arguments by name: `call`'s, or, when it only forwards (*args, **kwargs),
    as a user subclass's __call__ often does, the nearest base class __call__ that names its parameters."""
    for candidate in (call, *(vars(c)["__call__"] for c in cls.__mro__ if "__call__" in vars(c))):
        signature = inspect.signature(candidate)
        if any(p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) for p in list(signature.parameters.values())[1:]):
            return signature
    return inspect.signature(call)


class _Expert:
    """One denoiser the session guides (Wan 2.2 has two, switched mid-run): the attribute the pipeline reads it
    from, the module itself, what carries the hook (itself or its torch.compile wrapper), its capture."""

    def __init__(self, attr: str, outer: torch.nn.Module):
        self.attr, self.outer, self.model = attr, outer, unwrap_compiled(outer)
        self.binding = engine.ForwardBinding(self.model)
        self.capture: AttentionCapture | None = None
        self.hooked: torch.nn.Module | None = None


class SAGSession:
    """SAG installed on one pipeline: contract, a capture and the engine's hook on each guided denoiser."""

    def __init__(self, pipe, config: SAGConfig, layout=None):
        model_attr = next((n for n in DENOISERS if isinstance(getattr(pipe, n, None), torch.nn.Module)), None)
        if model_attr is None:
            raise ValueError(f"pipe: {type(pipe).__name__} has no `unet` or `transformer` torch module to guide; "
                             "SAG needs a diffusers pipeline with a denoiser that has self-attention")
        scheduler = getattr(pipe, "scheduler", None)
        if scheduler is None:
            raise ValueError(f"pipe: {type(pipe).__name__} has no `scheduler`; SAG needs one to degrade the input")
        self.model_attr = model_attr
        self.model: torch.nn.Module = unwrap_compiled(getattr(pipe, model_attr))  # the (first) denoiser itself
        self.config = config
        self.layout = layout
        self.contract = contract_for(pipe, self.model, layout)  # a refused family says why before its scheduler
        check_supported(scheduler)
        family = self.contract.family
        extra = [a for a in (family.experts if family is not None else ())
                 if isinstance(getattr(pipe, a, None), torch.nn.Module)]
        self.experts = [_Expert(attr, getattr(pipe, attr)) for attr in (model_attr, *extra)]
        for expert in self.experts:
            named_hooks.refuse_caches(expert.model, f"pipe.{expert.attr}")
        for expert in self.experts[1:]:
            if type(expert.model) is not type(self.model):
                raise ValueError(f"pipe.{expert.attr} is a {type(expert.model).__name__}, pipe.{model_attr} a "
                                 f"{type(self.model).__name__}: SAG guides experts of the one denoiser class")
        self.capture: AttentionCapture | None = None  # the capture of the denoiser guided last
        self._running = threading.Lock()  # held for a pipeline call: one at a time (see pipeline_call)
        try:
            for expert in self.experts:
                if config.mask == "attention":
                    layer = config.layer if config.layer is not None or family is None else family.layer_for(expert.model)
                    expert.capture = AttentionCapture(expert.outer, layer, config.threshold, joint=self.contract.joint,
                                                      self_context=self.contract.self_context)
                self._attach(expert, expert.outer)
            self.capture = self.experts[0].capture
        except BaseException:
            self.remove()
            raise

    @property
    def joint_layout(self) -> str | None:
        return self.contract.joint

    def _attach(self, expert: _Expert, outer: torch.nn.Module) -> None:
        engine.attach(outer, lambda original, args, kwargs: self.forward(original, args, kwargs, expert))
        expert.hooked = outer

    def remove(self) -> None:
        """Removes everything SAG installed; the denoisers compute exactly as before."""
        for expert in getattr(self, "experts", ()):
            if expert.hooked is not None:
                engine.detach(expert.hooked)
                expert.hooked = None
            if expert.capture is not None:
                expert.capture.remove()
                expert.capture = None
        self.capture = None
        self.contract.remove()

    def _sync(self, pipe) -> None:
        """A denoiser may have been wrapped since enable_sag (`pipe.unet = torch.compile(pipe.unet)`): move the
        hook to the object the pipeline now calls. A different model is refused."""
        for expert in self.experts:
            outer = getattr(pipe, expert.attr, None)
            if outer is expert.hooked:
                engine.keep_outermost(outer)  # outside hooks added since (enable_parallelism's input split)
                continue
            if not isinstance(outer, torch.nn.Module) or unwrap_compiled(outer) is not expert.model:
                raise RuntimeError(f"pipe.{expert.attr} was replaced by another model after enable_sag; call "
                                   "sag_fast.enable_sag(pipe, ...) again to guide the new one")
            engine.detach(expert.hooked)
            self._attach(expert, outer)
        family, guided = self.contract.family, {expert.attr for expert in self.experts}
        for attr in family.experts if family is not None else ():
            if attr not in guided and isinstance(getattr(pipe, attr, None), torch.nn.Module):
                raise RuntimeError(f"pipe.{attr} was set after enable_sag, so SAG does not guide it; call "
                                   "sag_fast.enable_sag(pipe, ...) again to guide every denoiser the pipeline calls")

    # ------------------------------------------------------------------------- pipeline calls
    @contextlib.contextmanager
    def pipeline_call(self, call, pipe, args, kwargs, config: SAGConfig | None = None):
        """One pipeline __call__: the guided step is live for this session's denoiser, in this thread, until it
        returns. Everything that can go wrong before sampling is checked here, before the pipeline runs.
        One call at a time: a second call of the same pipeline while one runs (another thread, or re-entered from a
        callback) would share the first's scheduler state and the contract's per-call records (ControlNet's
        residuals, PAG's processors), so it is refused."""
        if not self._running.acquire(blocking=False):
            raise RuntimeError(f"{type(pipe).__name__} with SAG is already running a call (in another thread, or "
                               "this call was made from inside it, e.g. a callback); a diffusers pipeline's "
                               "scheduler and SAG's per-call state serve one call at a time: serialise the calls, "
                               "or give each thread its own pipeline and denoiser with SAG enabled on it")
        try:
            with self._one_call(call, pipe, args, kwargs, config):
                yield self
        finally:
            self._running.release()

    @contextlib.contextmanager
    def _one_call(self, call, pipe, args, kwargs, config):
        self._sync(pipe)
        check_supported(pipe.scheduler)  # a scheduler swapped in since enable_sag
        for expert in self.experts:
            named_hooks.refuse_caches(expert.model, f"pipe.{expert.attr}")  # enable_cache since enable_sag
            if expert.capture is not None:
                expert.capture.check_processor()  # attention slicing switched on since enable_sag
        try:
            bound = _named_signature(type(pipe), call).bind(pipe, *args, **kwargs)
            bound.apply_defaults()
            call_args = dict(bound.arguments)
            call_args.update(call_args.pop("kwargs", None) or {})
        except TypeError:
            call_args = dict(kwargs)  # let the pipeline itself report the bad call
        self.contract.check_call(call_args)
        active = engine.ActiveCall(owner=self, args=call_args, config=config or self.config, pipe=pipe)
        try:
            self.contract.begin_call(pipe)  # may refuse (PAG's processors left over): nothing of the call stays
        except BaseException:
            self.contract.end_call()
            raise
        token = engine.open_call(active)
        try:
            yield self
        finally:
            engine.close_call(token)
            self.contract.end_call()

    def _progress(self, call: engine.ActiveCall, scheduler, t) -> float:
        """Fraction of the trajectory before this model call: the timestep's position in scheduler.timesteps
        (read from the view's offset, no device read; right however often the loop runs the schedule, as
        AnimateDiff's FreeInit does), else (offset + steps so far) / len(timesteps)."""
        timesteps = getattr(scheduler, "timesteps", None)
        n = len(timesteps) if timesteps is not None else 0
        if n == 0:
            return 0.0
        position = schedule_position(scheduler, t)
        if position is not None:
            return position / n
        if call.offset is None:
            call.offset = self._start_index(call, scheduler, timesteps, t)
        return (call.offset + call.steps - 1) / n

    @staticmethod
    def _start_index(call: engine.ActiveCall, scheduler, timesteps, t) -> int:
        # img2img-like calls start part-way through the schedule: the scheduler knows where (begin_index),
        # else find the first timestep once per call (one host read per pipeline call, never per step)
        begin = getattr(scheduler, "begin_index", None)
        if isinstance(begin, int):
            return begin
        if "strength" in call.args and isinstance(t, torch.Tensor) and t.numel() > 0:
            first = t.reshape(-1)[0].to(timesteps.device, timesteps.dtype)
            hits = (timesteps == first).nonzero()
            return int(hits[0, 0]) if len(hits) else 0
        return 0

    # ------------------------------------------------------------------------------- forward
    def forward(self, original, args, kwargs, expert: _Expert):
        """The engine hook's handler: the denoiser's forward with SAG, a drop-in for `original(*args, **kwargs)`."""
        call = engine.active_call()
        if call is None or call.owner is not self:  # not inside this pipeline's SAG call: the plain model
            return original(*args, **kwargs)
        b = expert.binding
        arguments = b.bind(args, kwargs)
        if arguments is None:
            return original(*args, **kwargs)  # the model reports the bad call itself
        contract = self.contract
        if contract.shifted_calls is not None and contract.shifted_calls(arguments):
            return self._shifted(call, original(*args, **kwargs))  # another prediction of this step
        x = arguments.pop(b.x_name)
        t = arguments.pop(b.t_name, None) if b.t_name is not None else None
        pipe, config = call.pipe, call.config
        scheduler = pipe.scheduler
        packed = contract.packed and isinstance(x, torch.Tensor) and x.dim() == 3
        video = contract.video and isinstance(x, torch.Tensor) and x.dim() == 5
        if not isinstance(x, torch.Tensor) or (x.dim() != 4 and not packed and not video):  # refused earlier
            raise RuntimeError(f"SAG: pipe.{expert.attr} was called with a {getattr(x, 'shape', type(x))} input; "
                               "SAG guides (B, C, H, W) latents (or the packed or video latents of a known "
                               "pipeline) only")
        # split CFG: 0 = a step's conditional call, 1 = its unconditional call. Read at each model call, not at the
        # pipeline call's start: the pipeline sets this call's guidance scale first, and a step-end callback may
        # switch CFG off or on between steps (diffusers' dynamic-CFG recipe)
        way = (1 if call.uncond_next else 0) if contract.split_cfg(pipe, call.args) else None
        call.uncond_next = way == 0
        if way is None:
            call.pending = None  # nothing of an earlier step's is ever shifted by this one
        if way != 1:
            call.steps += 1
            call.step_shift = None  # a new step: its other predictions get this step's shift, or none
        active = config.active_at(self._progress(call, scheduler, t))
        if not active:
            return original(*args, **kwargs)
        if way == 0:  # keep the conditional prediction: the unconditional call adds SAG's shift to it too
            result = original(*args, **kwargs)
            call.pending = engine.split_output(result)[0]
            return result

        tail = None  # packed: conditioning tokens after the latent's (Kontext's context image), passed through
        if packed:
            h, w = contract.latent_hw(pipe, call.args)
            n = (h // 2) * (w // 2)
            if x.shape[1] < n or (x.shape[1] > n and not contract.extra_tokens):
                raise RuntimeError(f"SAG: pipe.{expert.attr} got {x.shape[1]} tokens for a {h}x{w} latent ({n} "
                                   "tokens with 2x2 patches); SAG stops rather than blur the wrong tokens")
            if x.shape[1] > n:
                x, tail = x[:, :n], x[:, n:]
            x4 = unpack_latents(x, h, w)
        else:
            x4 = x
        layout = contract.layout(pipe, call.args, x4, arguments)
        t_sched = t
        if (contract.t_scale, contract.t_offset) != (1.0, 0.0) and isinstance(t, torch.Tensor):
            t_sched = contract.t_offset + t * contract.t_scale
        c1, c2 = step_coefficients(scheduler, t_sched, device=x.device)
        if contract.output_sign != 1.0:  # x0's estimate from the prediction the scheduler is given: sign * output
            c2 = c2 * contract.output_sign
        return_dict = arguments.pop("return_dict", True) if b.has_return_dict else None
        total, per_way = x.shape[0], x.shape[0] // layout.ways
        rows = slice(layout.uncond_index * per_way, (layout.uncond_index + 1) * per_way)
        first: list = []

        def model(x_in, t_in, **kw):
            x_call = x_in
            if packed:
                x_call = pack_latents(x_in)
                if tail is not None:
                    x_call = torch.cat([x_call, tail if x_in.shape[0] == total else tail[rows]], dim=1)
            call_kw = {b.x_name: x_call, **kw}
            if b.t_name is not None:
                call_kw[b.t_name] = t_in
            if b.has_return_dict:
                call_kw["return_dict"] = return_dict
            # the extra forward (after the first) with the attention processors of the call's start (PAG's off)
            with contract.call_processors() if first else contextlib.nullcontext():
                tensor, rebuild = engine.split_output(original(**call_kw))
            if not first:
                first.append((rebuild, tensor))
            if not packed:
                return tensor
            return unpack_latents(tensor[:, :n] if tail is not None else tensor, h, w)

        pending, call.pending = call.pending, None

        def on_shift(delta):
            call.step_shift = pack_latents(delta) if packed else delta
            if pending is not None:  # split CFG: the conditional way, returned by the step's first call
                _add_leading(pending, call.step_shift)

        capture = self.capture = expert.capture
        if capture is not None:
            capture.threshold = config.threshold
            # joint attention: the image tokens' count, when the layer's own input may be the joint sequence
            capture.image_tokens = x.shape[1] if packed else (
                math.prod(engine.token_grid(expert.model, x4)) if contract.joint is not None and x4.dim() == 4
                else None)
            capture.trailing_tokens = tail.shape[1] if tail is not None else 0
        facts = engine.StepFacts(c1=c1, c2=c2, ways=layout.ways, uncond_index=layout.uncond_index,
                                 latent_channels=layout.latent_channels, guided_channels=layout.latent_channels,
                                 degraded_kwargs=contract.degraded_kwargs, compiled=engine.is_compiled(expert.hooked),
                                 grid=engine.token_grid(expert.model, x4) if video and not contract.frames_in_batch
                                 else None, frames=x4.shape[2] if video and contract.frames_in_batch else None)
        wants_shift = pending is not None or contract.shifted_calls is not None  # else skip computing it
        out = engine.guided_forward(model, x4, t, arguments, config=config, capture=capture, facts=facts,
                                    on_shift=on_shift if wants_shift else None)
        rebuild, full = first[0]
        if not packed:
            return rebuild(out)
        if tail is not None:  # the context tokens' outputs as the model gave them (the pipeline drops them)
            return rebuild(torch.cat([pack_latents(out), full[:, n:]], dim=1))
        return rebuild(pack_latents(out))

    @staticmethod
    def _shifted(call: engine.ActiveCall, result):
        """A prediction the pipeline combines with this step's guided ones (SD3's skip-layer call): add the step's
        shift, so that SAG's term keeps its strength after the pipeline's combination."""
        shift = call.step_shift
        if shift is None:
            return result
        tensor = engine.split_output(result)[0]
        if tensor.shape[0] != shift.shape[0]:
            raise RuntimeError(f"SAG: the step's other prediction has {tensor.shape[0]} rows, its shift "
                               f"{shift.shape[0]}; SAG stops rather than add the shift to the wrong rows")
        _add_leading(tensor, shift)
        return result


def _add_leading(target: torch.Tensor, shift: torch.Tensor) -> None:
    """target's leading block of shift's shape += shift: the latent channels (conditioning channels after them)
    or, packed, the latent tokens (context tokens after them) of another prediction of the step."""
    target[(slice(None),) + tuple(slice(0, s) for s in shift.shape[1:])].add_(shift.to(target.dtype))


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
            clone = object.__new__(type(self))
            memo[id(self)] = clone
            clone.__dict__.update(copy.deepcopy({k: v for k, v in vars(self).items() if k != STATE_ATTR}, memo))
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
