"""SAG for diffusers' modular pipelines: `SelfAttentionGuidance`, a guider (`diffusers.guiders.BaseGuidance`).

    pipe.update_components(guider=SelfAttentionGuidance(guidance_scale=5.0, sag_scale=0.75, scheduler=pipe.scheduler))

A modular denoise loop asks the guider for its batches (`prepare_inputs`), runs the denoiser once per batch
between `prepare_models(denoiser)` and `cleanup_models(denoiser)`, and hands the predictions to the guider
(`forward`). With CFG on, SAG adds a third batch after the unconditional one:

    pred_cond      the conditional fields                  denoiser(x)
    pred_uncond    the unconditional fields                denoiser(x), the mask captured during it
    pred_degraded  the unconditional fields again          denoiser(x~), x~ = degrade(x, pred_uncond, mask)

The loop gives every batch the same latents x, so the degraded batch gets x~ from a hook that the guider puts
on the denoiser for that batch only: `prepare_models` installs, for the unconditional batch, the
`AttentionCapture` on the SAG layer and a hook that keeps (x, t, output, mask), and for the degraded batch a
hook that swaps x for x~; `cleanup_models` removes them, so between batches and after the loop the denoiser is
exactly as it was. (c1, c2) of the degrade come from the pipeline's scheduler at the step's timestep, as in
`enable_sag`. With CFG off (guidance_scale 1, or outside its window) the conditional batch guides and is degraded.

The combination is enable_sag's: both ways shifted by s*(u - d), then CFG, then guidance_rescale against the
shifted conditional prediction: pred = u' + w*(c' - u'), c' = c + s*(u - d), u' = u + s*(u - d). The output's
pred_cond and pred_uncond are c' and u', so a loop that post-processes with them (QwenImage rescales pred to the
norm of pred_cond) sees what the classic pipeline sees with enable_sag.

Packed latents (B, H/2*W/2, 4C): for a family whose registry record has `packed_hw` (QwenImage reads (H, W) off
its `img_shapes` argument), the guide batch's x and output are unpacked for the mask grid and the degrade, and x~
is packed again for the degraded batch. The model's timestep is the scheduler's / the record's `t_scale`; a loop
that recomputes it for each batch (QwenImage's `timestep / 1000`) is checked by value, on the device.
"""
from __future__ import annotations

import math
import os
import weakref

import torch
from diffusers.configuration_utils import register_to_config
from diffusers.guiders import BaseGuidance
from diffusers.guiders.guider_utils import GuiderOutput, rescale_noise_cfg

from .. import engine, named_hooks
from ..capture import AttentionCapture, unwrap_compiled
from ..guidance import SAGConfig, make_config
from ..ops._dispatch import check_finite
from ..ops.guidance import guidance_combine
from ..schedule import check_supported, step_coefficients
from .session import pack_latents, unpack_latents
from .registry import denoiser_family, joint_layout  # where a joint-attention denoiser (SD3, Flux) puts its image tokens

_HOOK = "sag_fast_guider"
_WHERE = "SelfAttentionGuidance"
# model arguments that carry features computed from the latents outside the denoiser (ControlNet residuals):
# the degraded batch would get the residuals of the undegraded latents, so such loops are refused
_EXTERNAL_FEATURES = ("down_block_additional_residuals", "mid_block_additional_residual",
                      "down_intrablock_additional_residuals", "block_controlnet_hidden_states",
                      "controlnet_block_samples", "controlnet_single_block_samples")
_GUIDE, _DEGRADED = "guide", "degraded"


def _finite(name: str, value) -> float:
    return check_finite(value, f"{_WHERE}: {name}")


def _same_tensor(a, b) -> bool:
    """a and b are the same memory viewed the same way (the loop's one latent tensor); no device read."""
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return (a is b) or (a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride()
                            and a.dtype == b.dtype and a.device == b.device)
    return not isinstance(a, torch.Tensor) and not isinstance(b, torch.Tensor) and a == b


class _Saved:
    """What the guide batch leaves for the degraded one: its x and t as the loop gave them, the (B, C, H, W)
    latent and prediction the degrade reads (unpacked for packed latents), the mask, the latent channels, and
    the unpacked (H, W) of packed latents (None: 4-D latents)."""

    def __init__(self, x, t, x4, out4, mask, channels, packed_hw):
        self.x, self.t, self.x4, self.out4, self.mask = x, t, x4, out4, mask
        self.channels, self.packed_hw = channels, packed_hw


class _Role:
    """What the guider's hook does on the denoiser for one batch: `guide` runs it (capture armed) and keeps what
    the degrade needs; `degraded` runs it on x~ instead of x."""

    def __init__(self, guider: "SelfAttentionGuidance", role: str, model: torch.nn.Module, compiled: bool):
        self.guider, self.role, self.compiled, self.model = guider, role, compiled, model
        self.binding = engine.ForwardBinding(model)
        self.family = denoiser_family(model)

    def __call__(self, original, args, kwargs):
        return self.guider._run(self, original, args, kwargs)


class SelfAttentionGuidance(BaseGuidance):
    """Classifier-free guidance plus Self-Attention Guidance (SAG, Hong et al. 2023) for modular pipelines.

    pred = u' + guidance_scale * (c' - u'),  c' = c + sag_scale * (u - d),  u' = u + sag_scale * (u - d)

    c, u: the conditional and unconditional predictions; d: the prediction at x~, the latents with the regions
    that the unconditional pass attends to blurred (x~ = degrade(x, u, mask), sag_fast.ops.degrade). Three
    denoiser calls per step (cond, uncond, degraded), in that order; with CFG off, two (cond, degraded from
    cond), as `enable_sag` does. `sag_scale=0` (or outside the SAG window) is diffusers'
    `ClassifierFreeGuidance`, bit for bit.

    Args:
        guidance_scale: CFG scale (1.0: no CFG, as in ClassifierFreeGuidance).
        sag_scale: SAG scale s (0: no SAG; negative guides away from the blur).
        blur_sigma, kernel_size, threshold, layer, mask: as in `sag_fast.SAGConfig` (the Gaussian blur, the
            attention-mass threshold, the self-attention layer as a module path or regex (None: the model's
            default), "attention" or "global" (blur guidance)).
        sag_start, sag_stop: SAG runs on steps whose progress is in [sag_start, sag_stop): enable_sag's
            start/stop, progress being the step's index in the scheduler's whole schedule over its length
            (img2img's skipped steps count; for txt2img, step / num_inference_steps).
        guidance_rescale: as in ClassifierFreeGuidance, against the SAG-shifted conditional prediction c'
            (what the classic pipelines do with enable_sag).
        use_original_formulation: CFG around c' instead of u', as in ClassifierFreeGuidance.
        start, stop, enabled: the window of the whole guider, as in diffusers' guiders (outside it, or when
            disabled: the conditional prediction alone, one denoiser call). The modular SDXL loop sets `enabled`
            itself (off for LCM UNets only).
        scheduler: the pipeline's scheduler (`pipe.scheduler`); it gives each step's (alpha, sigma) for the
            degrade. It is not part of the saved config. It may be omitted only when SAG never runs
            (sag_scale=0, enabled=False); otherwise set it before sampling: `guider.scheduler = pipe.scheduler`
            (also after `from_pretrained`/`from_config`, which take it as `scheduler=`, and after replacing the
            pipeline's scheduler). The first SAG step refuses a missing scheduler, and one whose timesteps are
            not the loop's (a stale scheduler), before any denoiser call of that step.

    The denoiser must take (B, C, H, W) image latents (or packed ones, see the module docstring) or (B, C, F, H, W)
    video latents (the mask over the (f, h, w) token grid of the model's patch size, `sag_fast.engine.token_grid`;
    each frame blurred: the modular Wan pipelines, Wan 2.2's `guider_2` too) and show the SAG layer's attention to
    torch (see
    `sag_fast.capture`; SD3's joint attention is read with its image tokens first, as by enable_sag); a layer
    the capture cannot read (e.g. the joint attention of a model whose token layout sag_fast does not know) is
    refused at the first `prepare_models`, before the denoiser runs; packed latents at the first
    guided call. ControlNet loops are refused (their residuals come from the undegraded latents).
    """

    _input_predictions = ["pred_cond", "pred_uncond", "pred_degraded"]
    ignore_for_config = ["scheduler"]

    @register_to_config
    def __init__(self, guidance_scale: float = 7.5, sag_scale: float = 0.75, blur_sigma: float = 1.0,
                 kernel_size: int = 9, threshold: float = 1.0, layer: str | None = None, mask: str = "attention",
                 sag_start: float = 0.0, sag_stop: float = 1.0, guidance_rescale: float = 0.0,
                 use_original_formulation: bool = False, start: float = 0.0, stop: float = 1.0,
                 enabled: bool = True, scheduler=None):
        super().__init__(start, stop, enabled)
        self.guidance_scale = _finite("guidance_scale", guidance_scale)
        self.guidance_rescale = _finite("guidance_rescale", guidance_rescale)
        if not 0.0 <= self.guidance_rescale <= 1.0:
            raise ValueError(f"{_WHERE}: guidance_rescale must be in [0, 1], got {guidance_rescale!r}")
        if not isinstance(use_original_formulation, bool):
            raise ValueError(f"{_WHERE}: use_original_formulation must be a bool, got {use_original_formulation!r}")
        self.use_original_formulation = use_original_formulation
        fields = dict(blur_sigma=blur_sigma, kernel_size=kernel_size, threshold=threshold, layer=layer, mask=mask,
                      start=sag_start, stop=sag_stop)
        try:
            self.sag_config: SAGConfig = make_config(sag_scale, fields=fields, where=_WHERE)
        except ValueError as exc:  # name the guider's arguments, not SAGConfig's fields
            text = str(exc).replace("SAGConfig.start", "sag_start").replace("SAGConfig.stop", "sag_stop")
            raise ValueError(f"{_WHERE}: " + text.replace("SAGConfig.", "")) from None
        self._scheduler = None
        self.scheduler = scheduler
        self._plan: list[tuple[int, str]] | None = None
        self._hooks: list[tuple[torch.nn.Module, object]] = []
        self._capture: AttentionCapture | None = None
        self._saved: _Saved | None = None
        self._channels: int | None = None
        self._checked: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> layer checked

    # ------------------------------------------------------------------------------------ settings
    @property
    def sag_scale(self) -> float:
        return self.sag_config.scale

    @property
    def scheduler(self):
        return self._scheduler

    @scheduler.setter
    def scheduler(self, scheduler) -> None:
        if scheduler is not None:
            if not callable(getattr(scheduler, "set_timesteps", None)):
                raise TypeError(f"{_WHERE}: scheduler must be the pipeline's diffusers scheduler (pipe.scheduler), "
                                f"got {type(scheduler).__name__}")
            try:
                check_supported(scheduler)
            except ValueError as exc:
                raise ValueError(f"{_WHERE}: scheduler: {exc}") from None
        self._scheduler = scheduler

    def new(self, **kwargs):
        """A copy with the same config (and scheduler), some settings overridden."""
        scheduler = kwargs.pop("scheduler", self.scheduler)
        return type(self).from_config(self.config, scheduler=scheduler, **kwargs)

    @classmethod
    def from_config(cls, config=None, return_unused_kwargs=False, scheduler=None, **kwargs):
        """ConfigMixin.from_config, plus `scheduler=` (not part of the config)."""
        result = super().from_config(config, return_unused_kwargs=return_unused_kwargs, **kwargs)
        guider = result[0] if isinstance(result, tuple) else result
        if scheduler is not None:
            guider.scheduler = scheduler
        return result

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike | None = None, subfolder=None,
                        return_unused_kwargs=False, scheduler=None, **kwargs):
        """BaseGuidance.from_pretrained, plus `scheduler=` (not part of the saved config)."""
        result = super().from_pretrained(pretrained_model_name_or_path, subfolder=subfolder,
                                         return_unused_kwargs=return_unused_kwargs, **kwargs)
        guider = result[0] if isinstance(result, tuple) else result
        if scheduler is not None:
            guider.scheduler = scheduler
        return result

    # ----------------------------------------------------------------------------------- the plan
    def _in_window(self) -> bool:
        if not self._enabled:
            return False
        if self._num_inference_steps is None:
            return True
        # diffusers' guiders' rule, so that sag_scale=0 is ClassifierFreeGuidance with the same window
        return int(self._start * self._num_inference_steps) <= self._step < int(self._stop * self._num_inference_steps)

    def _is_cfg_enabled(self) -> bool:
        if not self._in_window():
            return False
        off = 0.0 if self.use_original_formulation else 1.0
        return not math.isclose(self.guidance_scale, off)

    def _is_sag_enabled(self) -> bool:
        if not self._in_window() or self.sag_config.scale == 0.0:
            return False
        if self._num_inference_steps is None:  # before the loop (e.g. an encoder asking num_conditions)
            return True
        return self.sag_config.active_at(self._progress())

    def _progress(self) -> float:
        """The step's place in the scheduler's whole schedule, as enable_sag counts it: img2img's skipped steps
        (the scheduler's begin_index) included, one entry per timestep (second-order schedulers' too)."""
        timesteps = getattr(self.scheduler, "timesteps", None)
        if isinstance(timesteps, torch.Tensor) and len(timesteps) \
                and getattr(self.scheduler, "num_inference_steps", None) is not None:
            begin = getattr(self.scheduler, "begin_index", None)
            return ((begin if isinstance(begin, int) else 0) + self._step) / len(timesteps)
        return self._step / self._num_inference_steps

    def _batches(self) -> list[tuple[int, str]]:
        """(tuple index of the loop's (cond, uncond) fields, prediction name) per batch, in run order."""
        plan = [(0, "pred_cond")]
        cfg = self._is_cfg_enabled()
        if cfg:
            plan.append((1, "pred_uncond"))
        if self._is_sag_enabled():
            plan.append((1 if cfg else 0, "pred_degraded"))
        return plan

    @property
    def num_conditions(self) -> int:
        return len(self._batches())

    @property
    def is_conditional(self) -> bool:
        plan = self._plan or self._batches()
        index = self._count_prepared - 1
        return 0 <= index < len(plan) and plan[index][0] == 0

    def set_state(self, step: int, num_inference_steps: int, timestep) -> None:
        super().set_state(step, num_inference_steps, timestep)
        self._teardown()  # what a step that raised between prepare_models and cleanup_models left behind
        self._plan, self._saved = None, None

    def prepare_inputs(self, data) -> list:
        self._plan = self._batches()
        return [self._prepare_batch(data, index, name) for index, name in self._plan]

    def prepare_inputs_from_block_state(self, data, input_fields) -> list:
        self._plan = self._batches()
        return [self._prepare_batch_from_block_state(input_fields, data, index, name) for index, name in self._plan]

    # ------------------------------------------------------------------------------- the denoiser
    def prepare_models(self, denoiser: torch.nn.Module) -> None:
        self._count_prepared += 1
        plan = self._plan or self._batches()
        if plan[-1][1] != "pred_degraded":  # no SAG this step: the denoiser stays plain
            return
        if self._count_prepared == 1:
            self._check(denoiser)  # before the step's first denoiser call
        index = self._count_prepared - 1
        if index >= len(plan):
            return
        guide_index = len(plan) - 2  # the batch just before the degraded one
        if index == guide_index:
            self._install(denoiser, _GUIDE)
        elif index == len(plan) - 1:
            if self._saved is None:
                raise RuntimeError(f"{_WHERE}: the degraded batch runs before its guide batch "
                                   f"({plan[guide_index][1]}) ran through the denoiser in this step")
            self._install(denoiser, _DEGRADED)

    def cleanup_models(self, denoiser: torch.nn.Module) -> None:
        self._teardown()

    def _teardown(self) -> None:
        self._remove_hooks()
        if self._capture is not None:
            self._capture.remove()
            self._capture = None

    def _check(self, denoiser: torch.nn.Module) -> None:
        """Everything that can be refused, refused before the step's first denoiser call."""
        if self.scheduler is None:
            raise ValueError(f"{_WHERE}: sag_scale={self.sag_scale} needs the pipeline's scheduler for the degrade: "
                             "SelfAttentionGuidance(..., scheduler=pipe.scheduler), or guider.scheduler = "
                             "pipe.scheduler")
        self._check_timestep(self._timestep)
        if not isinstance(denoiser, torch.nn.Module):
            raise TypeError(f"{_WHERE}: prepare_models needs the denoiser module, got {type(denoiser).__name__}")
        model = unwrap_compiled(denoiser)
        named_hooks.refuse_caches(model, f"{_WHERE}: the denoiser ({type(model).__name__})")
        if self.sag_config.mask != "attention" or model in self._checked \
                and self._checked[model] == self.sag_config.layer:
            return
        try:  # builds the capture once (layer lookup, probe of the attention), then takes it off again
            self._new_capture(model, probe=True).remove()
        except ValueError as exc:
            raise ValueError(f"{_WHERE}: cannot read the self-attention of {type(model).__name__}: {exc}") from None
        self._checked[model] = self.sag_config.layer

    def _new_capture(self, model: torch.nn.Module, probe: bool) -> AttentionCapture:
        inner = unwrap_compiled(model)
        joint = joint_layout(inner)
        extra = {"joint": joint} if joint is not None else {}
        family = denoiser_family(inner)
        layer = self.sag_config.layer if self.sag_config.layer is not None or family is None \
            else family.layer_for(inner)
        return AttentionCapture(model, layer, self.sag_config.threshold, probe=probe, **extra)

    def _check_timestep(self, t) -> None:
        """The scheduler must be the one this loop steps: a replaced pipeline scheduler leaves the guider with a stale
        one whose timesteps may be equal but whose state (step index, sigmas) is another run's. The loop's timestep
        is a view of the live scheduler's `timesteps` (checked without a device read); a sigma scheduler's step
        index must be this step's. Anything else is refused, naming the fix."""
        timesteps = getattr(self.scheduler, "timesteps", None)
        name = type(self.scheduler).__name__
        fix = "set guider.scheduler = pipe.scheduler (again after replacing pipe.scheduler)"
        if not isinstance(timesteps, torch.Tensor) or timesteps.numel() == 0 \
                or getattr(self.scheduler, "num_inference_steps", None) is None:
            raise ValueError(f"{_WHERE}: the scheduler ({name}) has no timesteps (set_timesteps was never called on "
                             f"it): it is not the pipeline's; {fix}")
        step_index = getattr(self.scheduler, "step_index", None)
        begin = getattr(self.scheduler, "begin_index", None)
        if isinstance(step_index, int) and step_index != (begin if isinstance(begin, int) else 0) + self._step:
            raise ValueError(f"{_WHERE}: guider.scheduler ({name}) is at step index {step_index}, but the loop is at "
                             f"step {self._step}: it is not the scheduler this loop steps (pipe.scheduler replaced?); "
                             f"{fix}")
        if t is None:
            return
        if isinstance(t, torch.Tensor) and t.device == timesteps.device \
                and t.untyped_storage().data_ptr() == timesteps.untyped_storage().data_ptr():
            return
        if isinstance(t, torch.Tensor) and t.device == timesteps.device:
            raise ValueError(f"{_WHERE}: the step's timestep is not one of guider.scheduler's timesteps (another "
                             f"scheduler's, or a copy): guider.scheduler is not the pipeline's scheduler; {fix}")
        value = torch.as_tensor(t).reshape(-1)[:1].to(timesteps.device, timesteps.dtype)
        if not bool((timesteps == value).any()):
            raise ValueError(f"{_WHERE}: the step's timestep {t!r} is not in the scheduler's timesteps: "
                             f"guider.scheduler is not the pipeline's scheduler (replaced since?); {fix}")

    def _install(self, denoiser: torch.nn.Module, role: str) -> None:
        self._teardown()
        model = unwrap_compiled(denoiser)
        hook = _Role(self, role, model, engine.is_compiled(denoiser))
        if role == _GUIDE and self.sag_config.mask == "attention":
            # probe=False: _check probed this model's layer already
            self._capture = self._new_capture(denoiser, probe=False)
        try:
            engine.detach(denoiser, _HOOK)  # another guider's, left by a loop that raised mid-batch
            engine.attach(denoiser, hook, _HOOK)
            self._hooks.append(denoiser)
        except BaseException:
            self.cleanup_models(denoiser)
            raise

    def _remove_hooks(self) -> None:
        while self._hooks:
            engine.detach(self._hooks.pop(), _HOOK)

    def _run(self, hook: _Role, original, args, kwargs):
        """The denoiser call of the guide or the degraded batch; on an error the hooks come off first."""
        try:
            return self._guided_call(hook, original, args, kwargs)
        except BaseException:
            self._teardown()
            raise

    def _guided_call(self, hook: _Role, original, args, kwargs):
        b = hook.binding
        arguments = b.bind(args, kwargs)
        if arguments is None:
            return original(*args, **kwargs)  # the model reports the bad call itself
        x = arguments.get(b.x_name)
        t = arguments.get(b.t_name) if b.t_name is not None else None
        family = hook.family
        # packed latents (B, H/2*W/2, 4C) of a family whose record says how to read (H, W) off the call
        hw = family.packed_hw(arguments) if family is not None and family.packed_hw is not None \
            and isinstance(x, torch.Tensor) and x.dim() == 3 else None
        if not isinstance(x, torch.Tensor) or (x.dim() not in (4, 5) and hw is None):
            raise ValueError(f"{_WHERE}: the denoiser got a {tuple(getattr(x, 'shape', ()))} {b.x_name}; SAG "
                             "guides (B, C, H, W) image or (B, C, F, H, W) video latents (packed latents are not "
                             "supported)")
        extra = {k: v for k, v in arguments.items() if v is not None and k in _EXTERNAL_FEATURES}
        if extra:
            raise ValueError(f"{_WHERE}: the denoiser gets {sorted(extra)} (ControlNet) computed from the "
                             "undegraded latents; SAG's degraded pass would reuse them. ControlNet modular "
                             "pipelines are not supported; use enable_sag on the classic ControlNet pipelines")
        x4 = x if hw is None else unpack_latents(x, *hw)
        if hook.role == _GUIDE:
            if self._capture is not None:
                self._capture.image_tokens = x.shape[1] if hw is not None else None
                # video: the (f, h, w) token grid of the model's patches, which the capture cannot infer
                grid = engine.token_grid(hook.model, x) if x.dim() == 5 else None
                with self._capture.capturing(None, input_hw=(int(x4.shape[-2]), int(x4.shape[-1])),
                                             compiled=hook.compiled, grid=grid):
                    result = original(*args, **kwargs)
                mask = self._capture.mask
            else:
                result, mask = original(*args, **kwargs), None
            out = engine.split_output(result)[0]
            out4 = out if hw is None or out.shape != x.shape else unpack_latents(out, *hw)
            if out4.dim() != x4.dim() or out4.shape[0] != x4.shape[0] or out4.shape[2:] != x4.shape[2:]:
                raise ValueError(f"{_WHERE}: the denoiser output {tuple(out.shape)} does not match its input "
                                 f"{tuple(x.shape)} (expected (B, C', {', '.join(map(str, x.shape[2:]))}))")
            # an inpainting UNet takes mask and image channels after the latents and predicts the latents only
            channels = min(x4.shape[1], out4.shape[1])
            # the predictions' channels SAG shifts in forward(): all of a packed one
            self._channels = channels if hw is None else out.shape[1]
            self._saved = _Saved(x, t, x4, out4, mask, channels, hw)
            return result
        saved = self._saved
        if not _same_tensor(x, saved.x) or not (_same_tensor(t, saved.t) or self._equal_values(t, saved.t)):
            raise RuntimeError(f"{_WHERE}: the degraded batch got other latents than the batch that guides it; "
                               "the denoise loop must give every guider batch the same latents and timestep")
        if hw != saved.packed_hw:
            raise RuntimeError(f"{_WHERE}: the degraded batch's latents are laid out as {hw}, its guide batch's as "
                               f"{saved.packed_hw}")
        scale = family.t_scale if family is not None else 1.0  # the model's t is the scheduler's / t_scale
        t_sched = t * scale if scale != 1.0 and isinstance(t, torch.Tensor) else t
        c1, c2 = step_coefficients(self.scheduler, t_sched, device=x.device)
        x_deg = engine.degrade_input(saved.x4, saved.out4, saved.mask, c1, c2, saved.channels, self.sag_config)
        bound = b.signature.bind(*args, **kwargs)
        bound.arguments[b.x_name] = x_deg if hw is None else pack_latents(x_deg)
        return original(*bound.args, **bound.kwargs)

    @staticmethod
    def _equal_values(t, saved_t) -> bool:
        """A timestep the loop recomputes for each batch (QwenImage's `timestep / 1000`, Wan's `t.expand(B)` cast to
        the model dtype): equal values are checked on the device (an asynchronous assert, no host read)."""
        if not (isinstance(t, torch.Tensor) and isinstance(saved_t, torch.Tensor) and t.shape == saved_t.shape
                and t.device == saved_t.device and t.dtype == saved_t.dtype):
            return False
        torch._assert_async((t == saved_t).all(), f"{_WHERE}: the degraded batch got another timestep than the "
                                                  "batch that guides it")
        return True

    # ---------------------------------------------------------------------------------- combination
    def forward(self, pred_cond: torch.Tensor, pred_uncond: torch.Tensor | None = None,
                pred_degraded: torch.Tensor | None = None) -> GuiderOutput:
        cfg = self._is_cfg_enabled()
        if pred_degraded is None:  # no SAG this step: ClassifierFreeGuidance's arithmetic, in its order
            if not cfg:
                pred = pred_cond
            else:
                shift = pred_cond - pred_uncond
                pred = pred_cond if self.use_original_formulation else pred_uncond
                pred = pred + self.guidance_scale * shift
            if self.guidance_rescale > 0.0:
                pred = rescale_noise_cfg(pred, pred_cond, self.guidance_rescale)
            return GuiderOutput(pred=pred, pred_cond=pred_cond, pred_uncond=pred_uncond)

        guide = pred_uncond if cfg else pred_cond
        c = self._channels if self._channels is not None else pred_cond.shape[1]
        if cfg and c == pred_cond.shape[1] and self.guidance_rescale == 0.0 and not self.use_original_formulation:
            # u + w (c - u) + s (u - d) in one fused pass over the three predictions
            pred = guidance_combine(torch.cat([pred_uncond, pred_cond]), pred_degraded, self.guidance_scale,
                                    self.sag_config.scale)
            sag = self.sag_config.scale * (guide - pred_degraded)
            return GuiderOutput(pred=pred, pred_cond=pred_cond + sag, pred_uncond=pred_uncond + sag)
        # the shift on the latent channels only (a learned variance stays as predicted), on every way
        if c == pred_cond.shape[1]:
            sag = self.sag_config.scale * (guide - pred_degraded)
        else:
            sag = torch.zeros_like(pred_cond)
            sag[:, :c] = self.sag_config.scale * (guide[:, :c] - pred_degraded[:, :c])
        cond = pred_cond + sag
        if not cfg:
            pred = cond
        else:
            uncond = pred_uncond + sag
            pred = cond if self.use_original_formulation else uncond
            pred = pred + self.guidance_scale * (cond - uncond)
        if self.guidance_rescale > 0.0:
            pred = rescale_noise_cfg(pred, cond, self.guidance_rescale)
        return GuiderOutput(pred=pred, pred_cond=cond, pred_uncond=uncond if cfg else pred_uncond)
