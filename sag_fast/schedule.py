"""(alpha, sigma) of the model's input, and SAG's (c1, c2), for the timestep of a diffusers scheduler.

The model input (after `scheduler.scale_model_input`) is written x_in = alpha*x0 + sigma*eps. Three cases:

- VP discrete time (DDPM, DDIM, PNDM, LCM): the input is the raw latents, alpha^2 = alphas_cumprod[t].
- sigma tables (Euler family, LMS, Heun, KDPM2 after their x/sqrt(s^2+1) input scaling; DPM-Solver, DEIS,
  UniPC, which keep the VP ratio s = sqrt((1-a)/a) and feed the latents as is): alpha = 1/sqrt(s^2+1),
  sigma = s*alpha; with `use_flow_sigmas` (DPM family) alpha = 1-s, sigma = s.
- flow matching (FlowMatchEulerDiscrete): the input is the latents, alpha = 1-s, sigma = s.

s is the scheduler's own `sigmas[step_index]` (a host int, no sync) or, before the first step, the timestep
looked up in `timesteps` on the device. Nothing here reads a device value back to the host: no .item(),
no bool(tensor), no nonzero(), so a sampling step stays free of host round trips.
"""
from __future__ import annotations

import torch

from . import reference

# class name -> how its model input is parametrised (subclasses inherit the entry of their base)
_VP_DISCRETE = ("DDPMScheduler", "DDIMScheduler", "PNDMScheduler", "LCMScheduler")
_SIGMA_SCALED_INPUT = ("EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler", "HeunDiscreteScheduler",
                       "LMSDiscreteScheduler", "KDPM2DiscreteScheduler")
_SIGMA_RAW_INPUT = ("DPMSolverMultistepScheduler", "DPMSolverSinglestepScheduler", "DEISMultistepScheduler",
                    "UniPCMultistepScheduler")
_FLOW = ("FlowMatchEulerDiscreteScheduler",)
_KINDS = {**{n: "vp" for n in _VP_DISCRETE}, **{n: "sigma" for n in _SIGMA_SCALED_INPUT},
          **{n: "dpm" for n in _SIGMA_RAW_INPUT}, **{n: "flow" for n in _FLOW}}
SUPPORTED = tuple(_KINDS)

_PREDICTION_TYPES = {"epsilon": "epsilon", "v_prediction": "v_prediction", "sample": "sample",
                     "original_sample": "sample", "flow_prediction": "flow"}


def _kind(scheduler) -> str | None:
    for cls in type(scheduler).__mro__:
        if cls.__name__ in _KINDS:
            return _KINDS[cls.__name__]
    return None


def check_supported(scheduler) -> None:
    """ValueError naming the scheduler if its model input is not one this module knows how to describe."""
    kind = _kind(scheduler)
    name = type(scheduler).__name__
    if kind is None:
        raise ValueError(f"scheduler {name} is not supported by sag_fast; supported: {', '.join(SUPPORTED)}")
    ptype = prediction_type(scheduler)
    cfg = scheduler.config
    if kind == "dpm" and (ptype == "flow") != bool(getattr(cfg, "use_flow_sigmas", False)):
        # diffusers' flow_prediction uses the raw sigma as the flow time; only consistent with flow sigmas
        raise ValueError(f"scheduler {name}: prediction_type={cfg.prediction_type!r} needs use_flow_sigmas="
                         f"{ptype == 'flow'}, got use_flow_sigmas={getattr(cfg, 'use_flow_sigmas', False)}")
    if kind in ("vp", "sigma") and ptype == "flow":
        raise ValueError(f"scheduler {name}: prediction_type={cfg.prediction_type!r} is not supported with it")


def prediction_type(scheduler) -> str:
    """What the model predicts, as reference.signal_coefficients spells it: epsilon | v_prediction | sample | flow."""
    if _kind(scheduler) == "flow" or type(scheduler).__name__.startswith("FlowMatch"):
        return "flow"
    ptype = getattr(getattr(scheduler, "config", None), "prediction_type", None)
    if ptype not in _PREDICTION_TYPES:
        raise ValueError(f"scheduler {type(scheduler).__name__} has prediction_type={ptype!r}; "
                         f"expected one of {sorted(_PREDICTION_TYPES)}")
    return _PREDICTION_TYPES[ptype]


# ------------------------------------------------------------------------------- device tables
_TABLES: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
_MAX_TABLES = 256


def _compute_dtype(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "mps" else torch.float64


def _device_table(scheduler, attr: str, device: torch.device) -> torch.Tensor:
    """A device copy of scheduler.<attr>, rebuilt only when the scheduler replaces that tensor
    (set_timesteps assigns new ones). The source is kept in the entry, so `is` can't match a recycled id."""
    src = getattr(scheduler, attr)
    dtype = _compute_dtype(device)
    key = (id(scheduler), attr, str(device), dtype)
    hit = _TABLES.get(key)
    if hit is not None and hit[0] is src:
        return hit[1]
    if len(_TABLES) >= _MAX_TABLES:
        _TABLES.clear()
    table = torch.as_tensor(src).to(device=device, dtype=dtype)
    _TABLES[key] = (src, table)
    return table


def _lookup_index(timesteps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Index of t in the schedule, on the device, with diffusers' rule for the first step: the second of
    several equal entries, else the only one. The nearest entry counts as equal, so a timestep that went
    through fp16/bf16 (as some pipelines pass it) still finds its place."""
    dist = (timesteps - t.to(timesteps.dtype)[..., None]).abs()
    match = dist == dist.min(dim=-1, keepdim=True).values
    rank = match.cumsum(-1)
    want = rank[..., -1:].clamp(max=2)
    return ((rank == want) & match).to(torch.uint8).argmax(dim=-1)


def _gather(table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """table[index] for a 0-dim or (B,) index tensor without a host sync (table[t] with a 0-dim t calls
    .item()) and in a form inductor lowers (torch.take graph-breaks under torch.compile)."""
    return table.index_select(0, index.reshape(-1)).reshape(index.shape)


def _scheduler_step(scheduler) -> int | None:
    """The scheduler's own index of the current step (a host int), or where it will begin, or None."""
    step = getattr(scheduler, "step_index", None)
    return getattr(scheduler, "begin_index", None) if step is None else step


def _sigma_table(scheduler, kind: str) -> str:
    """The scheduler's sigma table for the current evaluation: KDPM2's second one is at the interpolated sigma."""
    if kind == "sigma" and not getattr(scheduler, "state_in_first_order", True) \
            and hasattr(scheduler, "sigmas_interpol"):
        return "sigmas_interpol"
    return "sigmas"


def _vp_alpha_sigma(a: torch.Tensor):
    """(alpha, sigma) of a VP input from alphas_cumprod a."""
    return a.sqrt(), (1 - a).sqrt()


def _sigma_alpha_sigma(scheduler, kind: str, s: torch.Tensor):
    """(alpha, sigma) of the model input from the scheduler's sigma s: flow sigmas are the flow time; otherwise
    the input is x / sqrt(s^2 + 1) (or the VP latents, the same ratio)."""
    if kind == "flow" or (kind == "dpm" and getattr(scheduler.config, "use_flow_sigmas", False)):
        return 1 - s, s
    alpha = (s * s + 1).rsqrt()
    return alpha, s * alpha


def _sigma_at(scheduler, table_attr: str, t: torch.Tensor) -> torch.Tensor:
    """scheduler.<table_attr>[current step] on t's device, shaped like t."""
    sigmas = _device_table(scheduler, table_attr, t.device)
    step = _scheduler_step(scheduler)
    if step is not None:
        return sigmas[step].expand(t.shape)
    return _gather(sigmas, _lookup_index(_device_table(scheduler, "timesteps", t.device), t))


def model_input_alpha_sigma(scheduler, timestep, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(alpha, sigma) with model input = alpha*x0 + sigma*eps at `timestep` (the value the pipeline passes
    to the model), as fp32 tensors shaped like timestep (0-dim or (B,)) on its device (or `device`)."""
    check_supported(scheduler)
    kind = _kind(scheduler)
    if isinstance(timestep, torch.Tensor):
        t = timestep if device is None else timestep.to(device)
    else:
        t = torch.as_tensor(timestep, device=device)
    if t.dim() > 1:
        raise ValueError(f"timestep must be a scalar or have shape (B,), got {tuple(t.shape)}")

    if kind == "vp":
        acp = _device_table(scheduler, "alphas_cumprod", t.device)
        # no bounds check on the device (it would sync): an out-of-range timestep is clamped to the table.
        alpha, sigma = _vp_alpha_sigma(_gather(acp, t.long().clamp(0, acp.shape[0] - 1)))
    else:
        alpha, sigma = _sigma_alpha_sigma(scheduler, kind, _sigma_at(scheduler, _sigma_table(scheduler, kind), t))
    return alpha.to(torch.float32), sigma.to(torch.float32)


def signal_coefficients_for(scheduler, timestep, prediction_type: str | None = None, device=None):
    """(c1, c2) with c1*x_in + c2*model_output = alpha*x0_hat for the model input x_in at `timestep`."""
    ptype = _scheduler_prediction_type(scheduler) if prediction_type is None else prediction_type
    alpha, sigma = model_input_alpha_sigma(scheduler, timestep, device=device)
    return reference.signal_coefficients(alpha, sigma, ptype)


_scheduler_prediction_type = prediction_type


# ------------------------------------------------------------------- per-step coefficients, computed once
_STEP_TABLES: dict[tuple, tuple[object, tuple, tuple]] = {}


def _step_lists(scheduler, kind: str, attr: str, ptype: str, device: torch.device):
    """(c1, c2) for every entry of scheduler.<attr> as lists of 0-dim fp32 tensors on `device`: computed once
    per table (set_timesteps replaces the table object, which rebuilds the lists)."""
    src = getattr(scheduler, attr)
    key = (id(scheduler), attr, ptype, str(device))
    hit = _STEP_TABLES.get(key)
    if hit is not None and hit[0] is src:
        return hit[1], hit[2]
    if len(_STEP_TABLES) >= _MAX_TABLES:
        _STEP_TABLES.clear()
    if kind == "vp":  # attr == "timesteps": alphas_cumprod at each timestep of the schedule
        acp = _device_table(scheduler, "alphas_cumprod", device)
        alpha, sigma = _vp_alpha_sigma(acp.index_select(0, torch.as_tensor(src).to(device).long()
                                                        .clamp(0, acp.shape[0] - 1)))
    else:
        s = torch.as_tensor(src).to(device=device, dtype=_compute_dtype(device))
        alpha, sigma = _sigma_alpha_sigma(scheduler, kind, s)
    c1, c2 = reference.signal_coefficients(alpha.to(torch.float32), sigma.to(torch.float32), ptype)
    lists = (tuple(torch.as_tensor(c1).expand(alpha.shape).unbind(0)),
             tuple(torch.as_tensor(c2).expand(alpha.shape).unbind(0)))
    _STEP_TABLES[key] = (src, *lists)
    return lists


def schedule_position(scheduler, t) -> int | None:
    """Where t sits in scheduler.timesteps, read from tensor metadata alone (no device read): the loop's
    timestep is a view of that tensor (`for t in timesteps`, expanded or not). None when t is not such a view."""
    timesteps = getattr(scheduler, "timesteps", None)
    if not isinstance(t, torch.Tensor) or not isinstance(timesteps, torch.Tensor) or timesteps.dim() != 1:
        return None
    if type(t).__name__ == "FakeTensor" or t.device != timesteps.device or t.dtype != timesteps.dtype:
        return None
    if t.dim() > 1 or (t.dim() == 1 and t.stride(0) != 0) or timesteps.stride(0) < 1:
        return None  # per-row timesteps: not one position
    if t.untyped_storage().data_ptr() != timesteps.untyped_storage().data_ptr():
        return None
    offset = t.storage_offset() - timesteps.storage_offset()
    if offset < 0 or offset % timesteps.stride(0):
        return None
    position = offset // timesteps.stride(0)
    return position if position < timesteps.shape[0] else None


def step_coefficients(scheduler, timestep, prediction_type: str | None = None, device=None):
    """(c1, c2) of `signal_coefficients_for`, for one sampling step, without per-step arithmetic: 0-dim tensors
    picked from lists computed once per schedule. The step is the scheduler's own step index (sigma-table and
    flow schedulers) or the timestep's position in `scheduler.timesteps` (read from the view's offset, no device
    read). Where neither is known (a first DPM-Solver step, per-row timesteps, a timestep that is not a view of
    the schedule) it falls back to `signal_coefficients_for`."""
    check_supported(scheduler)
    kind = _kind(scheduler)
    ptype = _scheduler_prediction_type(scheduler) if prediction_type is None else prediction_type
    t = timestep
    target = torch.device(device) if device is not None else (t.device if isinstance(t, torch.Tensor) else None)
    if target is not None and isinstance(t, torch.Tensor) and t.dim() <= 1:
        if kind == "vp":
            position = schedule_position(scheduler, t)
            if position is not None:
                c1s, c2s = _step_lists(scheduler, kind, "timesteps", ptype, target)
                return c1s[position], c2s[position]
        else:
            step = _scheduler_step(scheduler)
            if isinstance(step, int) and type(t).__name__ != "FakeTensor":
                c1s, c2s = _step_lists(scheduler, kind, _sigma_table(scheduler, kind), ptype, target)
                if step < len(c1s):
                    return c1s[step], c2s[step]
    return signal_coefficients_for(scheduler, timestep, ptype, device=device)
