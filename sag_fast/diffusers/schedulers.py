"""Scheduler names used by the CLI and the tiny models: one table, name -> diffusers class + settings."""
from __future__ import annotations

import inspect

SCHEDULERS = {
    "ddim": ("DDIMScheduler", {}),
    "ddpm": ("DDPMScheduler", {}),
    # PLMS only: the Runge-Kutta warm-up (skip_prk_steps=False) needs >= 4 steps and runs 13 model calls for 4
    "pndm": ("PNDMScheduler", {"skip_prk_steps": True}),
    "deis": ("DEISMultistepScheduler", {}),
    "unipc": ("UniPCMultistepScheduler", {}),
    "dpm": ("DPMSolverMultistepScheduler", {}),
    "dpm_karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    "dpm_single": ("DPMSolverSinglestepScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "lms": ("LMSDiscreteScheduler", {}),
    "kdpm2": ("KDPM2DiscreteScheduler", {}),
}


def make_scheduler(name: str, config=None, defaults: dict | None = None, **settings):
    """The scheduler called `name`, from an existing scheduler's `config` (a pipeline's: keeps its betas and
    prediction type) or from `defaults` + `settings`. `defaults` a class does not take are dropped (they are
    meant for a family, e.g. steps_offset); `settings` are passed as given."""
    import diffusers

    if name not in SCHEDULERS:
        raise ValueError(f"scheduler={name!r} is not one of {sorted(SCHEDULERS)}")
    cls_name, extra = SCHEDULERS[name]
    cls = getattr(diffusers, cls_name)
    if config is not None:
        return cls.from_config(config, **{**extra, **settings})  # settings may override the table's
    params = inspect.signature(cls.__init__).parameters
    kept = {k: v for k, v in (defaults or {}).items() if k in params}
    return cls(**{**kept, **extra, **settings})
