"""SAGSampler: a complete sampling loop with Self-Attention Guidance for any model and diffusers scheduler.

    sampler = SAGSampler(unet, DDIMScheduler(...), SAGConfig(scale=0.75), guidance_scale=5.0)
    x0 = sampler((4, 4, 64, 64), cond={"encoder_hidden_states": e}, uncond={"encoder_hidden_states": e0},
                 num_inference_steps=50, generator=torch.Generator().manual_seed(0))

The model maps (x, t, **kwargs) to an output of a known prediction type: diffusers UNet2DModel,
UNet2DConditionModel (encoder_hidden_states), DiT (class_labels) or a plain nn.Module returning a tensor.
"""
from __future__ import annotations

import inspect
from typing import Any

import torch

from . import reference
from .capture import AttentionCapture, resolve_layer
from .engine import StepFacts, guided_forward
from .guidance import SAGConfig
from .ops._dispatch import check_blur, check_finite
from .schedule import check_supported, step_coefficients
from .schedule import prediction_type as scheduler_prediction_type


def _concat_ways(uncond, cond, path: str = "cond"):
    """The two ways' kwargs batched, unconditional first (recursing into dicts, lists and tuples)."""
    if isinstance(cond, torch.Tensor):
        if not isinstance(uncond, torch.Tensor) or uncond.shape != cond.shape:
            raise ValueError(f"uncond{path[4:]} must be a tensor of the shape of cond{path[4:]} "
                             f"{tuple(cond.shape)}, got {getattr(uncond, 'shape', type(uncond).__name__)}")
        return torch.cat([uncond, cond])
    if isinstance(cond, dict):
        if not isinstance(uncond, dict) or set(uncond) != set(cond):
            raise ValueError(f"uncond{path[4:]} must have the keys of cond{path[4:]} {sorted(cond)}, "
                             f"got {sorted(uncond) if isinstance(uncond, dict) else type(uncond).__name__}")
        return {k: _concat_ways(uncond[k], v, f"{path}[{k!r}]") for k, v in cond.items()}
    if isinstance(cond, (list, tuple)):
        if not isinstance(uncond, (list, tuple)) or len(uncond) != len(cond):
            raise ValueError(f"uncond{path[4:]} must be a sequence of {len(cond)} like cond{path[4:]}")
        return type(cond)(_concat_ways(u, c, f"{path}[{i}]") for i, (u, c) in enumerate(zip(uncond, cond)))
    return cond  # scalars, None, strings: shared by both ways


def _check_batch(kwargs, batch: int, path: str) -> None:
    """Conditioning tensors must have the batch as their first dim (they are cut to the degraded rows)."""
    if isinstance(kwargs, torch.Tensor):
        if kwargs.dim() == 0 or kwargs.shape[0] != batch:
            raise ValueError(f"{path} must have the batch size {batch} as its first dim, got {tuple(kwargs.shape)}")
    elif isinstance(kwargs, dict):
        for k, v in kwargs.items():
            _check_batch(v, batch, f"{path}[{k!r}]")
    elif isinstance(kwargs, (list, tuple)):
        for i, v in enumerate(kwargs):
            _check_batch(v, batch, f"{path}[{i}]")


def _model_device_dtype(model: torch.nn.Module):
    for p in model.parameters():
        return p.device, p.dtype
    return torch.device("cpu"), torch.float32


class SAGSampler:
    """Sampling loop with SAG (and optional CFG) for `model` and a diffusers `scheduler`.

    config: SAGConfig. prediction_type: what the model predicts (default: the scheduler's). guidance_scale:
    the CFG scale, used when `uncond` is given. guided_channels: channels SAG/CFG act on (None: all, or C when
    the model outputs 2C channels, a learned variance). output_key: the attribute/key of the model output
    holding the prediction. progress: a tqdm bar. cuda_graph: capture the guided step once per call, replay it.
    """

    def __init__(self, model: torch.nn.Module, scheduler, config: SAGConfig | None = None, *,
                 prediction_type: str | None = None, guidance_scale: float = 1.0, guided_channels: int | None = None,
                 output_key: str = "sample", progress: bool = True, cuda_graph: bool = False):
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        config = SAGConfig() if config is None else config
        if not isinstance(config, SAGConfig):
            raise TypeError(f"config must be a SAGConfig, got {type(config).__name__}")
        for name in ("set_timesteps", "step", "scale_model_input"):
            if not callable(getattr(scheduler, name, None)):
                raise TypeError(f"scheduler must be a diffusers scheduler (with .{name}), got {type(scheduler).__name__}")
        check_supported(scheduler)
        ptype = scheduler_prediction_type(scheduler) if prediction_type is None else prediction_type
        if ptype not in reference.PREDICTION_TYPES:
            raise ValueError(f"prediction_type={ptype!r} must be one of {reference.PREDICTION_TYPES}")
        check_finite(guidance_scale, "guidance_scale")
        if guided_channels is not None and (isinstance(guided_channels, bool) or not isinstance(guided_channels, int)
                                            or guided_channels < 1):
            raise ValueError(f"guided_channels must be None or a positive int, got {guided_channels!r}")
        if not isinstance(output_key, str):
            raise TypeError(f"output_key must be a str, got {type(output_key).__name__}")
        device, _ = _model_device_dtype(model)
        if cuda_graph and (device.type != "cuda" or not torch.cuda.is_available()):
            raise ValueError(f"cuda_graph=True needs the model on a CUDA device, it is on {device}")
        self.model = model
        self.scheduler = scheduler
        self.config = config
        self.prediction_type = ptype
        self.guidance_scale = float(guidance_scale)
        self.guided_channels = guided_channels
        self.output_key = output_key
        self.progress = bool(progress)
        self.cuda_graph = bool(cuda_graph)
        self._step_accepts_generator = "generator" in inspect.signature(scheduler.step).parameters
        self.capture: AttentionCapture | None = None
        if config.scale != 0.0 and config.mask == "attention":
            resolve_layer(model, config.layer)  # a missing or cross-attention layer raises here
        self._graph = None

    # ------------------------------------------------------------------------------------ helpers
    def _forward(self, x, t, **kwargs) -> torch.Tensor:
        out = self.model(x, t, **kwargs)
        if isinstance(out, torch.Tensor):
            return out
        if isinstance(out, dict) and self.output_key in out:
            return out[self.output_key]
        if hasattr(out, self.output_key):
            return getattr(out, self.output_key)
        if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
            return out[0]
        raise TypeError(f"the model returned {type(out).__name__}; expected a tensor or an output with "
                        f"output_key={self.output_key!r}")

    def _guided_channels(self, out_channels: int, channels: int) -> int:
        if self.guided_channels is not None:
            if self.guided_channels > out_channels:
                raise ValueError(f"guided_channels={self.guided_channels} exceeds the model's {out_channels} "
                                 "output channels")
            return self.guided_channels
        if out_channels == channels:
            return -1
        if out_channels == 2 * channels:
            return channels  # a learned variance in the second half
        raise ValueError(f"the model outputs {out_channels} channels for {channels} input channels; pass "
                         "guided_channels= (the channels of the prediction)")

    def _active(self, step: int, steps: int) -> bool:
        return self.config.active_at(step / steps)

    def _prepare(self, x_T, cond, uncond, num_inference_steps, generator, model_kwargs):
        """Every check before the first model call; returns (latents, batched kwargs, ways)."""
        if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int) or num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be a positive int, got {num_inference_steps!r}")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
        for name, value in (("cond", cond), ("uncond", uncond)):
            if value is not None and not isinstance(value, dict):
                raise TypeError(f"{name} must be a dict of model keyword arguments or None, got {type(value).__name__}")
        if uncond is not None and cond is None:
            raise ValueError("uncond is given but cond is not: CFG needs both (cond={...}, uncond={...})")
        if uncond is None and self.guidance_scale != 1.0:
            raise ValueError(f"guidance_scale={self.guidance_scale} needs uncond= (the unconditional kwargs) for CFG")
        overlap = set(model_kwargs) & set(cond or {})
        if overlap:
            raise ValueError(f"{sorted(overlap)} given both in cond and as keyword arguments")
        device, dtype = _model_device_dtype(self.model)
        if isinstance(x_T, torch.Tensor):
            if x_T.dim() != 4:
                raise ValueError(f"x_T must be (B, C, H, W), got {tuple(x_T.shape)}")
            noise = x_T.to(device=device, dtype=dtype)
        elif isinstance(x_T, (tuple, list, torch.Size)) and len(x_T) == 4 \
                and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in x_T):
            gen_device = generator.device if generator is not None else device
            noise = torch.randn(tuple(x_T), generator=generator, device=gen_device, dtype=dtype).to(device)
        else:
            raise ValueError(f"x_T must be a (B, C, H, W) tensor or shape, got {x_T!r}")
        batch, _, height, width = noise.shape
        ways = 1 if uncond is None else 2
        if cond is not None:
            _check_batch(cond, batch, "cond")
        if uncond is not None:
            _check_batch(uncond, batch, "uncond")
        kwargs = dict(model_kwargs)
        if cond is not None:
            kwargs.update(cond if uncond is None else _concat_ways(uncond, cond))
        if self.config.scale != 0.0 and self.config.start < self.config.stop:
            try:
                check_blur(self.config.kernel_size, self.config.blur_sigma, height, width)
            except ValueError as exc:
                raise ValueError(f"the latent ({height}x{width}) is too small for config.kernel_size="
                                 f"{self.config.kernel_size}: {exc}") from None
        return noise, kwargs, ways

    def _combine_cfg(self, out: torch.Tensor, g: int) -> torch.Tensor:
        u, c = out.chunk(2)
        if g == -1:
            return u + self.guidance_scale * (c - u)
        combined = c.clone()  # a learned variance: the conditional way's
        combined[:, :g] = u[:, :g] + self.guidance_scale * (c[:, :g] - u[:, :g])
        return combined

    # ------------------------------------------------------------------------------------ the step
    def model_output(self, latents: torch.Tensor, t: torch.Tensor, kwargs: dict, ways: int, guided: bool):
        """The (CFG-combined, SAG-guided when `guided`) model output for the scheduler at timestep t."""
        x_in = torch.cat([latents] * ways) if ways > 1 else latents
        x_in = self.scheduler.scale_model_input(x_in, t)
        t_in = t.expand(x_in.shape[0]) if isinstance(t, torch.Tensor) else \
            torch.full((x_in.shape[0],), t, device=x_in.device)
        channels = latents.shape[1]
        if guided:  # with CFG, the engine returns CFG+SAG combined in one fused pass (guidance_combine)
            c1, c2 = step_coefficients(self.scheduler, t_in, self.prediction_type)
            out = self._guided(x_in, t_in, kwargs, c1, c2, ways)
        else:
            out = self._forward(x_in, t_in, **kwargs)
            if ways == 2:
                out = self._combine_cfg(out, self._guided_channels(out.shape[1], channels))
        g = self._guided_channels(out.shape[1], channels)
        learned = getattr(self.scheduler.config, "variance_type", None) in ("learned", "learned_range")
        return out if g == -1 or learned else out[:, :channels]

    def _guided(self, x_in, t_in, kwargs, c1, c2, ways):
        cfg = float(self.guidance_scale) if ways == 2 else None
        run = lambda x, t, c1, c2: guided_forward(  # noqa: E731
            self._forward, x, t, kwargs, config=self.config, capture=self.capture,
            facts=StepFacts(c1=c1, c2=c2, ways=ways, guided_channels=self.guided_channels, cfg_scale=cfg))
        if not self.cuda_graph:
            return run(x_in, t_in, c1, c2)
        return self._graph_replay(run, x_in, t_in, c1, c2)

    def _graph_replay(self, run, x_in, t_in, c1, c2):
        """The guided step as a CUDA graph: captured on the first guided step of a call, replayed after."""
        key = (tuple(x_in.shape), x_in.dtype, tuple(t_in.shape), t_in.dtype)
        if self._graph is None or self._graph[0] != key:
            static = [x_in.clone(), t_in.clone(), torch.as_tensor(c1, device=x_in.device).clone(),
                      torch.as_tensor(c2, device=x_in.device).clone()]
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):  # warm up outside the graph (allocator, lazy init, autotuning)
                for _ in range(2):
                    run(*static)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = run(*static)
            self._graph = (key, graph, static, out)
        _, graph, static, out = self._graph
        for buf, value in zip(static, (x_in, t_in, c1, c2)):
            buf.copy_(value)
        graph.replay()
        return out.clone()  # the next replay overwrites the static output

    # ------------------------------------------------------------------------------------- public
    @torch.no_grad()
    def __call__(self, x_T, cond: dict | None = None, uncond: dict | None = None, num_inference_steps: int = 50,
                 generator: torch.Generator | None = None, **model_kwargs: Any) -> torch.Tensor:
        """x_0 from x_T (unit-variance noise, scaled by scheduler.init_noise_sigma) or a (B, C, H, W) shape."""
        noise, kwargs, ways = self._prepare(x_T, cond, uncond, num_inference_steps, generator, model_kwargs)
        self.scheduler.set_timesteps(num_inference_steps, device=noise.device)
        timesteps = self.scheduler.timesteps
        steps = len(timesteps)
        any_guided = any(self._active(i, steps) for i in range(steps))
        if any_guided and self.config.mask == "attention" and self.capture is None:
            self.capture = AttentionCapture(self.model, self.config.layer, self.config.threshold)
        self._graph = None
        latents = noise * self.scheduler.init_noise_sigma
        step_kwargs = {"generator": generator} if self._step_accepts_generator else {}
        try:
            for i, t in enumerate(_progress(timesteps, self.progress)):
                out = self.model_output(latents, t, kwargs, ways, self._active(i, steps))
                latents = self.scheduler.step(out, t, latents, **step_kwargs, return_dict=False)[0]
        finally:
            self._graph = None  # the graph holds the call's kwargs: never replayed on another call
        return latents

    def remove(self) -> None:
        """Removes the attention hooks from the model (a later call installs them again)."""
        if self.capture is not None:
            self.capture.remove()
            self.capture = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()


def _progress(timesteps, enabled: bool):
    if not enabled:
        return timesteps
    from tqdm.auto import tqdm
    return tqdm(timesteps, total=len(timesteps), desc="SAG sampling")
