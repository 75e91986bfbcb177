"""Helpers of the test_diffusers_* files: run tiny pipelines, record one denoiser call, recompute a
guided step from sag_fast.reference with materialised attention probabilities, snapshot hook state."""
from __future__ import annotations

import contextlib

import numpy as np
import torch

from sag_fast import reference


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def images(pipe, *args, seed: int = 0, **kwargs) -> np.ndarray:
    """The pipeline's output as a float array, always from the same noise."""
    kwargs.setdefault("output_type", "np")
    kwargs.setdefault("num_inference_steps", 2)
    return np.asarray(pipe(*args, generator=gen(seed), **kwargs).images)


def _own_forward(m: torch.nn.Module) -> bool:
    """An instance-level forward other than the class's own bound to m (diffusers' HookRegistry.remove_hook puts
    the class's forward back as an instance attribute: that computes exactly as before)."""
    forward = vars(m).get("forward")
    return forward is not None and not (getattr(forward, "__self__", None) is m
                                        and getattr(forward, "__func__", None) is type(m).forward)


def hook_state(model: torch.nn.Module) -> dict:
    """Everything a hook could leave behind on a model: per module, its hook dicts, the names of the hooks in its
    diffusers hook registry, its instance attributes, an instance-level forward, its processor."""
    state = {}
    for name, m in model.named_modules():
        registry = vars(m).get("_diffusers_hook")
        state[name] = (
            tuple(m._forward_hooks), tuple(m._forward_pre_hooks), tuple(m._forward_hooks_with_kwargs),
            tuple(m._forward_pre_hooks_with_kwargs), tuple(m._backward_hooks),
            tuple(sorted(k for k in vars(m) if not k.startswith("_") and k != "forward")),
            tuple(registry.hooks) if registry is not None else (),
            _own_forward(m), type(m), vars(m).get("processor"),
        )
    return state


@contextlib.contextmanager
def record_call(model: torch.nn.Module, index: int, scheduler=None):
    """Records the `index`-th call (0-based) of model (through its __call__: the guided output when SAG
    is on): its args, kwargs, a clone of the output tensor and, if given, the scheduler's step_index."""
    seen = {"n": 0}
    record: dict = {}

    def hook(module, args, kwargs, output):
        if seen["n"] == index:
            out = output if isinstance(output, torch.Tensor) else output[0]
            record.update(args=args, kwargs=dict(kwargs), output=out.clone(),
                          step_index=getattr(scheduler, "step_index", None))
        seen["n"] += 1

    handle = model.register_forward_hook(hook, with_kwargs=True)
    try:
        yield record
    finally:
        handle.remove()


def plain_forward(model, *args, **kwargs) -> torch.Tensor:
    """The model's class forward: no instance-level hook (SAG's) on the way."""
    kwargs["return_dict"] = False
    return type(model).forward(model, *args, **kwargs)[0]


def materialised_mask(model, attn_path: str, grid_path, call, rows: slice, threshold: float = 1.0):
    """(B_rows, H, W) SAG mask at the latent resolution from the softmax probabilities of `attn_path`,
    computed the way diffusers' attention processors do (head_to_batch_dim, get_attention_scores) in
    float64, during a plain forward of `call` (a no-arg function). The grid is the spatial size of the
    output of module `grid_path` (the deprecated pipeline's rule for the SD mid block), or grid_path
    itself when it is an (h, w) tuple (DiT: the latent size over the patch size)."""
    modules = dict(model.named_modules())
    attn = modules[attn_path]
    seen: dict = {}
    def keep(key, pick=lambda o: o):
        def hook(module, args, output):  # returns None: the output is left alone
            seen.setdefault(key, pick(output))
        return hook

    handles = [
        attn.to_q.register_forward_hook(keep("q")),
        attn.to_k.register_forward_hook(keep("k")),
    ]
    if isinstance(grid_path, str):
        handles.append(modules[grid_path].register_forward_hook(
            keep("hw", lambda o: (o if isinstance(o, torch.Tensor) else o[0]).shape[-2:])))
    try:
        x = call()
    finally:
        for h in handles:
            h.remove()
    q = attn.head_to_batch_dim(seen["q"][rows].double())
    k = attn.head_to_batch_dim(seen["k"][rows].double())
    probs = attn.get_attention_scores(q, k, None)
    grid = tuple(seen["hw"]) if isinstance(grid_path, str) else tuple(grid_path)
    return x, reference.attention_mask(probs, grid, x.shape[-2:] if x.dim() == 4 else None, threshold,
                                       heads=attn.heads)


def vp_input_alpha_sigma_from_sigma(sigma_k: float):
    """alpha, sigma of the model input for a VP schedule described by its sigma = sqrt((1-a)/a)
    (Euler/Heun/LMS feed x/sqrt(sigma^2+1), DPM-Solver feeds x with x = a^.5 x0 + (1-a)^.5 eps: the same)."""
    s = torch.as_tensor(float(sigma_k), dtype=torch.float64)
    return 1 / torch.sqrt(s * s + 1), s / torch.sqrt(s * s + 1)


def expected_guided_step(model, x, t, kwargs, *, attn_path, grid_path, alpha, sigma, prediction_type, scale,
                         ways, uncond_index=0, guided=None, blur=(9, 1.0)):
    """The guided denoiser output recomputed from the reference: plain forward with materialised attention
    probabilities, the mask of the unconditional rows, x~ = reference.degrade with (c1, c2) from
    reference.signal_coefficients, the degraded forward, and reference.guidance_shift."""
    b = x.shape[0] // ways
    rows = slice(uncond_index * b, (uncond_index + 1) * b)
    c = x.shape[1] if guided is None else guided
    holder = {}

    def first():
        holder["out"] = plain_forward(model, x, t, **kwargs)
        return x

    _, mask = materialised_mask(model, attn_path, grid_path, first, rows)
    out = holder["out"]
    c1, c2 = reference.signal_coefficients(alpha, sigma, prediction_type)
    x_deg = reference.degrade(x[rows].double(), out[rows, :c].double(), mask, c1, c2, *blur).float()

    def cut(v):
        if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == x.shape[0]:
            return v[rows]
        if isinstance(v, dict):
            return {kk: cut(vv) for kk, vv in v.items()}
        return v

    t_rows = cut(t)
    degraded = plain_forward(model, x_deg, t_rows, **{k: cut(v) for k, v in kwargs.items()})
    # reference.guidance_shift takes the unconditional way first: rotate it there and back
    order = [uncond_index] + [i for i in range(ways) if i != uncond_index]
    ways_of = [out[i * b:(i + 1) * b] for i in range(ways)]
    shifted = reference.guidance_shift(torch.cat([ways_of[i] for i in order]).double(), degraded.double(), scale, c)
    back = [None] * ways
    for slot, i in enumerate(order):
        back[i] = shifted[slot * b:(slot + 1) * b]
    return torch.cat(back).float(), out, mask
