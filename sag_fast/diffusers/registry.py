"""The registry of model families: everything sag_fast knows about a diffusers pipeline family, one record each.

A `Family` record says, for its pipeline classes: the denoiser classes, how CFG is laid out (ways batched in one
call, or separate calls, or none; which way is unconditional; when CFG is on, re-read at every model call), the
latent channels and packing, the joint-attention token layout, the timestep scale, the per-row model arguments,
the default SAG layer, the other predictions of a step that the pipeline combines with the guided ones, and where
in diffusers' source all that was read. A record with `refusal=` is a family SAG cannot guide correctly: it is
refused at enable_sag with that reason.

Adding a family is one record here plus its tests; nothing else in the integration names a family. The README's
tables are generated from this module (`markdown_tables`) and a test checks that they match.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

__all__ = ["Family", "FAMILIES", "family_of", "rule_refusal", "markdown_tables"]


# ------------------------------------------------------------------------------ CFG conditions (per call)
def scale_above_one(pipe, call) -> bool:
    """A local `do_classifier_free_guidance = guidance_scale > 1` in the pipeline's __call__."""
    return call.get("guidance_scale", 1.0) > 1


def _live_cfg(pipe) -> bool | None:
    """The pipeline's `do_classifier_free_guidance` property as it reads now, or None (no such property, or read
    outside a call, before the pipeline has set its guidance scale)."""
    try:
        value = pipe.do_classifier_free_guidance
    except Exception:  # noqa: BLE001
        return None
    return value if isinstance(value, bool) else None


def cfg_property(pipe, call) -> bool:
    """The pipeline's `do_classifier_free_guidance` property, read live at each model call: a step-end callback
    may switch CFG off mid-run (`pipe._guidance_scale = 0`, diffusers' dynamic-CFG recipe)."""
    live = _live_cfg(pipe)
    return live if live is not None else scale_above_one(pipe, call)


def pix2pix_cfg(pipe, call) -> bool:
    """SD's InstructPix2Pix loop reads its live property (guidance_scale > 1 and image_guidance_scale >= 1, which
    a step-end callback may switch off); SDXL's has no property and decides once from the call's arguments."""
    live = _live_cfg(pipe)
    if live is not None:
        return live
    return call.get("guidance_scale", 1.0) > 1.0 and call.get("image_guidance_scale", 1.0) >= 1.0


def never(pipe, call) -> bool:
    return False


def lumina2_exact_cfg(call) -> str | None:
    """pipeline_lumina2.py: with CFG, `cfg_trunc_ratio < 1` drops the unconditional call in the last steps (the
    split-CFG call order changes mid-run, so SAG could not tell a step's calls apart). Its `cfg_normalization`
    (the guided prediction rescaled to the conditional one's norm) is applied to the SAG-shifted predictions, as
    QwenImage's renormalisation and SD's guidance_rescale are: the pipeline's own combination of the guided ways."""
    if not call.get("guidance_scale", 4.0) > 1:
        return None
    if call.get("cfg_trunc_ratio", 1.0) < 1:
        return ("cfg_trunc_ratio<1 stops the unconditional call in the last steps, so SAG cannot tell the calls of a "
                "step apart; pass cfg_trunc_ratio=1.0")
    return None


def true_cfg(pipe, call) -> bool:
    """pipeline_flux.py, pipeline_hunyuan_video.py: do_true_cfg = true_cfg_scale > 1 and a negative prompt is
    given (as text, or as embeddings and pooled embeddings)."""
    has_neg = call.get("negative_prompt") is not None or (
        call.get("negative_prompt_embeds") is not None and call.get("negative_pooled_prompt_embeds") is not None)
    return call.get("true_cfg_scale", 1.0) > 1 and has_neg


def negative_true_cfg(pipe, call) -> bool:
    """pipeline_qwenimage*.py: do_true_cfg = true_cfg_scale > 1 and (negative_prompt or negative_prompt_embeds)."""
    has_neg = call.get("negative_prompt") is not None or call.get("negative_prompt_embeds") is not None
    return call.get("true_cfg_scale", 1.0) > 1 and has_neg


# ---------------------------------------------------------------------------- latent channels (per model)
def out_channels(model) -> int:     # epsilon/v predictors of the latent: output channels = latent channels
    return int(model.config.out_channels)


def in_channels(model) -> int:      # input = latent only (a learned variance may double the output)
    return int(model.config.in_channels)


def half_in_channels(model) -> int:  # IF super-resolution: [x_t (3), upscaled image (3)]
    return int(model.config.in_channels) // 2


def half_out_channels(model) -> int:  # learned variance: [eps (C), variance (C)] out; the input may carry more
    return int(model.config.out_channels) // 2


def packed_channels(model) -> int:
    """Flux: 2x2 patches packed on channels. The output is the latent alone (64 = 16 x 4); the input may carry
    packed conditioning channels after it (Fill: masked image + mask, 384; Control: control image, 128).
    (QwenImage's config counts its output unpacked, out_channels 16 for 64 packed: its record uses out_channels.)"""
    return int(getattr(model, "out_channels", None) or model.config.in_channels) // 4


def call_image_size(pipe, call) -> tuple[int, int]:
    """pipeline_flux.py: (height, width) in pixels, `height or default_sample_size * vae_scale_factor`."""
    factor = int(getattr(pipe, "vae_scale_factor", 8))
    size = int(getattr(pipe, "default_sample_size", 128)) * factor
    return int(call.get("height") or size), int(call.get("width") or size)


def kontext_image_size(pipe, call) -> tuple[int, int]:
    """pipeline_flux_kontext.py: the requested size's aspect ratio at `max_area` pixels, rounded down to a
    multiple of 2 * vae_scale_factor (the output's size, whatever the context image's)."""
    height, width = call_image_size(pipe, call)
    area, multiple = call.get("max_area") or 1024 ** 2, 2 * int(getattr(pipe, "vae_scale_factor", 8))
    ratio = width / height
    width, height = round((area * ratio) ** 0.5), round((area / ratio) ** 0.5)
    return height // multiple * multiple, width // multiple * multiple


def pag_ways(pipe, call) -> int:
    """pag_utils.py: PAG stacks a perturbed copy of the conditional way after the CFG ways (read live, as
    `do_classifier_free_guidance`)."""
    try:
        return int(bool(pipe.do_perturbed_attention_guidance))
    except Exception:  # noqa: BLE001 - read outside a call: the call's scale
        return int(call.get("pag_scale", 0.0) > 0)


def img_shapes_hw(model_kwargs: dict) -> tuple[int, int] | None:
    """QwenImage: img_shapes[0] = [(1, H/2, W/2)], the packed token grid its rotary embedding is built for. More
    than one shape (Edit's reference images appended to the latent tokens) is not a plain packed latent: None."""
    try:
        (frames, h, w), = model_kwargs["img_shapes"][0]
    except (KeyError, TypeError, IndexError, ValueError):
        return None
    return (2 * int(h), 2 * int(w)) if frames == 1 else None


def skip_layer_call(model_kwargs: dict) -> bool:
    """SD3's skip-layer-guidance call: pred += slg * (c' - skip), so skip gets the step's shift too."""
    return model_kwargs.get("skip_layers") is not None


_UNET_PER_ROW = (
    "encoder_hidden_states", "class_labels", "timestep_cond", "attention_mask", "encoder_attention_mask",
    "added_cond_kwargs",                      # text_embeds, time_ids, IP-adapter image_embeds (a list), hint, ...
    "down_block_additional_residuals", "mid_block_additional_residual",      # ControlNet
    "down_intrablock_additional_residuals",                                  # T2I-Adapter
    "cross_attention_kwargs.gligen",          # GLIGEN boxes / phrase embeddings / masks
)
_UNET = ("UNet2DConditionModel",)
_UNET_MID = "mid_block.attentions.0.transformer_blocks.0.attn1"
_MIDDLE_ATTN1 = "transformer_blocks.{middle}.attn1"
_MIDDLE_ATTN = "transformer_blocks.{middle}.attn"
# IF's and Kandinsky 2.2's real UNets: UNetMidBlock2DSimpleCrossAttn's added-KV attention (keys [text, image])
_ADDED_KV_MID = (_UNET_MID, "mid_block.attentions.0")


@dataclass(frozen=True, kw_only=True)
class Family:
    """One model family (see the module docstring). `cfg`: "batched" (the ways stacked in one call), "split" (one
    call per way, conditional first, as Flux's true CFG) or "none". `cfg_on(pipe, call)`: whether CFG is on at
    this model call (call: the pipeline __call__'s arguments by name, defaults filled in). `shifted_calls(kwargs)`:
    a model call that is another prediction of the same step, combined by the pipeline with the guided ones: its
    output gets the step's shift too. `default_layer`: a module path, `{middle}` standing for the middle index of
    the block list the path starts with (`transformer_blocks`, Wan's `blocks`). `video`: (B, C, F, H, W) latents,
    blurred per frame, the mask over the (F, H, W) token grid of the model's `patch_size`; `frames_in_batch`: the
    model folds the frames into its attention batch; `per_frame_row`: arguments with one entry per (row, frame) (b-major, as AnimateDiff's UNet), so the SAG layer's spatial
    self-attention gives one (h, w) mask per frame. `experts`: other
    denoiser attributes the pipeline may call instead in some steps (Wan 2.2's `transformer_2`): each gets the
    hook and a capture on the same layer path, and SAG guides with whichever is called. `refused_configs`: (pipeline
    config key, why) pairs: a pipeline whose `config[key]` is truthy is refused at enable_sag with that reason (a
    variant of a supported pipeline class, such as Wan 2.2 TI2V-5B's `expand_timesteps`, that SAG cannot guide).

    Packed latents (`packed`, Flux): (B, tokens, C*4), unpacked to (B, C, H, W) for the blur, H and W from
    `image_size(pipe, call)` (pixels; the call's height/width by default). `latent(model)` counts the latent
    channels; packed channels after them are conditioning that passes through (Fill, Control). `extra_tokens`:
    the sequence may go on after the latent tokens with conditioning tokens (Kontext's context image): they
    pass through the extra forward undegraded, the guidance leaves their outputs alone, and in the joint
    attention the image span is the latent tokens only ([text, image, extra] for "text_first").
    `extra_ways(pipe, call)`: ways stacked after the CFG ways (PAG's perturbed copy of the conditional way),
    each shifted like the others. `restore_processors`: the pipeline swaps attention processors during its
    call (PAG's, which split the batch into its ways): the extra forward runs with the processors the
    denoiser had when the call began. `default_layer` may be a tuple of paths: the first the model has.

    `t_scale`, `t_offset`:
    the scheduler's timestep is `t_offset + t_scale * t` of the model's (Flux t/1000: 1000, 0; Lumina 2's
    reversed 1 - t/1000: -1000, 1000). `output_sign`: the scheduler is given `output_sign *` the model output
    (Lumina 2 negates it), so x0's estimate uses that sign. `call_refusal(call)`: a reason to refuse this pipeline
    call before it samples (arguments under which the pipeline's combination of the ways would not keep SAG's
    term exact), else None. `self_context`: the SAG layer is a diffusers Attention built with a context dimension
    (so flagged as cross-attention) that the model calls with its own input as the context (Kandinsky 3); the
    capture checks at each guided forward that the context is the input itself. Joint attention with padded text
    (`joint="text_first"` and an attention mask) may pad each row at its end (Lumina 2): the image tokens are the
    last `n` before the padding, which the capture finds from the mask. `packed_hw(model_kwargs)`:
    the (H, W) of a packed latent read off the denoiser call's own arguments, for the modular guider, which does not
    see the pipeline call's height and width (enable_sag reads those); None: the guider refuses packed latents."""

    name: str
    pipelines: tuple[str, ...]
    denoisers: tuple[str, ...] = ()
    cfg: str = "batched"
    cfg_on: Callable[[Any, dict], bool] = scale_above_one
    ways: int = 2
    uncond_index: int = 0
    latent: Callable[[torch.nn.Module], int] = out_channels
    packed: bool = False
    image_size: Callable[[Any, dict], tuple[int, int]] = call_image_size
    extra_tokens: bool = False
    extra_ways: Callable[[Any, dict], int] | None = None
    restore_processors: bool = False
    packed_hw: Callable[[dict], tuple[int, int] | None] | None = None
    video: bool = False
    frames_in_batch: bool = False
    experts: tuple[str, ...] = ()
    joint: str | None = None
    t_scale: float = 1.0
    t_offset: float = 0.0
    output_sign: float = 1.0
    call_refusal: Callable[[dict], str | None] | None = None
    self_context: bool = False
    per_row: tuple[str, ...] = ("encoder_hidden_states",)
    per_frame_row: tuple[str, ...] = ()
    default_layer: str | tuple[str, ...] = _UNET_MID
    controlnet: bool = False
    shifted_calls: Callable[[dict], bool] | None = None
    refused_configs: tuple[tuple[str, str], ...] = ()
    layout_note: str = ""
    source: str = ""
    refusal: str | None = None

    def __post_init__(self):
        if self.cfg not in ("batched", "split", "none"):
            raise ValueError(f"Family {self.name}: cfg must be 'batched', 'split' or 'none', got {self.cfg!r}")
        if self.joint not in (None, "image_first", "text_first"):
            raise ValueError(f"Family {self.name}: joint must be None, 'image_first' or 'text_first'")
        if self.extra_tokens and not self.packed:
            raise ValueError(f"Family {self.name}: extra_tokens is a packed-latent (token sequence) field")
        if self.refusal is None and not self.denoisers:
            raise ValueError(f"Family {self.name}: a supported family names its denoiser classes")

    def layer_for(self, model: torch.nn.Module) -> str:
        paths = (self.default_layer,) if isinstance(self.default_layer, str) else self.default_layer
        formatted = []
        for path in paths:
            blocks = getattr(model, path.split(".")[0], None)
            formatted.append(path.format(middle=len(blocks) // 2 if isinstance(blocks, torch.nn.ModuleList) else 0))
        if len(formatted) > 1:
            names = {n for n, _ in model.named_modules()}
            return next((p for p in formatted if p in names), formatted[0])
        return formatted[0]   # absent: resolve_layer names it in its error

    @property
    def layer_text(self) -> str:
        paths = (self.default_layer,) if isinstance(self.default_layer, str) else self.default_layer
        return " or ".join(f"`{p.replace('{middle}', 'n//2')}`" for p in paths)


_WAN_EXPAND = (
    "expand_timesteps (Wan 2.2 TI2V-5B) gives the transformer one timestep per token, shape (batch, tokens), and in "
    "image-to-video mixes the clean image latent into the first frame at timestep 0; SAG's step coefficients are "
    "one per row, so its x0 estimate and its degrade would treat the clean frame as noisy. Use a Wan 2.1 or Wan 2.2 "
    "A14B pipeline (expand_timesteps=False) for SAG")
_SD = "pipeline_stable_diffusion.py: torch.cat([negative_prompt_embeds, prompt_embeds]), [latents] * 2"

FAMILIES: tuple[Family, ...] = (
    Family(name="SD 1.x/2.x", pipelines=(
        "StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline", "StableDiffusionInpaintPipeline",
        "StableDiffusionDepth2ImgPipeline"), denoisers=_UNET, cfg_on=cfg_property, per_row=_UNET_PER_ROW,
        layout_note="[uncond, cond]; inpaint (4/9 ch) and depth (5 ch) channels pass through", source=_SD),
    Family(name="SD x4 upscaler", pipelines=("StableDiffusionUpscalePipeline",), denoisers=_UNET,
           per_row=_UNET_PER_ROW, layout_note="[uncond, cond]; [x_t, image] (7 ch), noise level in class_labels",
           source="pipeline_stable_diffusion_upscale.py: local do_classifier_free_guidance"),
    Family(name="InstructPix2Pix", pipelines=(
        "StableDiffusionInstructPix2PixPipeline", "StableDiffusionXLInstructPix2PixPipeline"), denoisers=_UNET,
        cfg_on=pix2pix_cfg, ways=3, uncond_index=2, per_row=_UNET_PER_ROW,
        layout_note="3 ways [text+image, image, none], `none` degraded; 8 ch",
        source="pipeline_stable_diffusion_instruct_pix2pix.py: chunk(3) -> text, image, uncond"),
    Family(name="SDXL", pipelines=(
        "StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline", "StableDiffusionXLInpaintPipeline"),
        denoisers=_UNET, cfg_on=cfg_property, per_row=_UNET_PER_ROW, layout_note="[uncond, cond]",
        source="pipeline_stable_diffusion_xl.py"),
    Family(name="ControlNet (SD, SDXL)", pipelines=(
        "StableDiffusionControlNetPipeline", "StableDiffusionControlNetImg2ImgPipeline",
        "StableDiffusionControlNetInpaintPipeline", "StableDiffusionXLControlNetPipeline",
        "StableDiffusionXLControlNetImg2ImgPipeline", "StableDiffusionXLControlNetInpaintPipeline"),
        denoisers=_UNET, cfg_on=cfg_property, per_row=_UNET_PER_ROW, controlnet=True,
        layout_note="[uncond, cond]; residuals recomputed for the degraded rows (guess mode, multi)",
        source="controlnet/pipeline_controlnet*.py"),
    Family(name="GLIGEN (text boxes)", pipelines=("StableDiffusionGLIGENPipeline",), denoisers=_UNET,
           per_row=_UNET_PER_ROW, layout_note="[uncond, cond]; per-row boxes in cross_attention_kwargs cut",
           source="deprecated/stable_diffusion_gligen/pipeline_stable_diffusion_gligen.py"),
    Family(name="PAG (SD, SDXL)", pipelines=("StableDiffusionPAGPipeline", "StableDiffusionXLPAGPipeline"),
           denoisers=_UNET, cfg_on=cfg_property, extra_ways=pag_ways, restore_processors=True,
           per_row=_UNET_PER_ROW,
           layout_note="[uncond, cond, cond perturbed] (PAG's way after CFG's; [cond, perturbed] without CFG), every "
           "way shifted; the extra forward runs with the processors PAG swapped out",
           source="pag/pag_utils.py: _prepare_perturbed_attention_guidance, noise_pred.chunk(3)"),
    Family(name="DiT", pipelines=("DiTPipeline",), denoisers=("DiTTransformer2DModel", "Transformer2DModel"),
           uncond_index=1, latent=in_channels, per_row=("class_labels",), default_layer=_MIDDLE_ATTN1,
           layout_note="[cond, null class]; learned variance kept",
           source="dit/pipeline_dit.py: torch.cat([class_labels, class_null])"),
    Family(name="PixArt-α/Σ", pipelines=("PixArtAlphaPipeline", "PixArtSigmaPipeline"),
           denoisers=("PixArtTransformer2DModel", "Transformer2DModel"), latent=in_channels,
           per_row=("encoder_hidden_states", "encoder_attention_mask", "attention_mask", "added_cond_kwargs"),
           default_layer=_MIDDLE_ATTN1, layout_note="[uncond, cond] (local CFG); learned variance kept",
           source="pixart_alpha/pipeline_pixart_alpha.py"),
    Family(name="DDPM/DDIM (unconditional)", pipelines=("DDPMPipeline", "DDIMPipeline"), denoisers=("UNet2DModel",),
           cfg="none", cfg_on=never, ways=1, latent=in_channels, per_row=("class_labels",),
           default_layer="mid_block.attentions.0", layout_note="one way (the paper's setting)",
           source="ddpm/pipeline_ddpm.py"),
    Family(name="SD3 / SD3.5", pipelines=("StableDiffusion3Pipeline", "StableDiffusion3Img2ImgPipeline"),
           denoisers=("SD3Transformer2DModel",), cfg_on=cfg_property, joint="image_first",
           per_row=("encoder_hidden_states", "pooled_projections"), default_layer=_MIDDLE_ATTN,
           shifted_calls=skip_layer_call,
           layout_note="[uncond, cond]; joint attention, image tokens first; the skip-layer call gets the shift",
           source="stable_diffusion_3/pipeline_stable_diffusion_3.py"),
    Family(name="Flux.1", pipelines=("FluxPipeline", "FluxImg2ImgPipeline"), denoisers=("FluxTransformer2DModel",),
           cfg="split", cfg_on=true_cfg, ways=1, latent=packed_channels, packed=True, joint="text_first",
           t_scale=1000.0, per_row=("encoder_hidden_states", "pooled_projections", "guidance"),
           default_layer=_MIDDLE_ATTN,
           layout_note="packed latents; distilled (one way) or true CFG (cond call, then uncond call)",
           source="flux/pipeline_flux.py: noise_pred, then neg_noise_pred; timestep / 1000"),
    Family(name="Flux.1 Fill / Control", pipelines=("FluxFillPipeline", "FluxControlPipeline"),
           denoisers=("FluxTransformer2DModel",), cfg="none", cfg_on=never, ways=1, latent=packed_channels,
           packed=True, joint="text_first", t_scale=1000.0,
           per_row=("encoder_hidden_states", "pooled_projections", "guidance"), default_layer=_MIDDLE_ATTN,
           layout_note="distilled (one way); packed [latent, condition] channels: only the latent's are degraded",
           source="flux/pipeline_flux_fill.py: cat((latents, masked_image_latents), dim=2); "
           "pipeline_flux_control.py: cat([latents, control_image], dim=2)"),
    Family(name="Flux.1 Kontext", pipelines=("FluxKontextPipeline",), denoisers=("FluxTransformer2DModel",),
           cfg="split", cfg_on=true_cfg, ways=1, latent=packed_channels, packed=True,
           image_size=kontext_image_size, extra_tokens=True, joint="text_first", t_scale=1000.0,
           per_row=("encoder_hidden_states", "pooled_projections", "guidance"), default_layer=_MIDDLE_ATTN,
           layout_note="packed latent tokens, then the context image's (passed through); joint attention "
           "[text, image, context], mask over the image; distilled or true CFG (cond call, then uncond call)",
           source="flux/pipeline_flux_kontext.py: cat([latents, image_latents], dim=1), "
           "noise_pred[:, : latents.size(1)]; size from max_area"),
    Family(name="QwenImage", pipelines=("QwenImagePipeline", "QwenImageImg2ImgPipeline", "QwenImageInpaintPipeline"),
           denoisers=("QwenImageTransformer2DModel",), cfg="split", cfg_on=negative_true_cfg, ways=1,
           latent=out_channels, packed=True, packed_hw=img_shapes_hw, joint="text_first", t_scale=1000.0,
           per_row=("encoder_hidden_states", "encoder_hidden_states_mask", "guidance"), default_layer=_MIDDLE_ATTN,
           layout_note="packed latents; true CFG (cond call, then uncond call): both get SAG's shift, then the "
           "pipeline's CFG and its norm rescaling act on the shifted predictions; padded text keys masked",
           source="qwenimage/pipeline_qwenimage.py: noise_pred, then neg_noise_pred, comb_pred * (cond_norm / "
           "noise_norm); timestep / 1000"),
    Family(name="DeepFloyd IF", pipelines=(
        "IFPipeline", "IFImg2ImgPipeline", "IFInpaintingPipeline"), denoisers=_UNET, latent=in_channels,
        per_row=_UNET_PER_ROW, default_layer=_ADDED_KV_MID,
        layout_note="[uncond, cond]; pixel space, learned variance; added-KV attention: image queries, keys "
        "[text, image], mask from the image keys",
        source="deepfloyd_if/pipeline_if.py"),
    Family(name="DeepFloyd IF stage II", pipelines=(
        "IFSuperResolutionPipeline", "IFImg2ImgSuperResolutionPipeline", "IFInpaintingSuperResolutionPipeline"),
        denoisers=_UNET, latent=half_in_channels, per_row=_UNET_PER_ROW, default_layer=_ADDED_KV_MID,
        layout_note="[uncond, cond]; [x_t, upscaled image] (6 ch), noise level in class_labels; added-KV attention",
        source="deepfloyd_if/pipeline_if_superresolution.py"),
    Family(name="Kandinsky 2.2", pipelines=(
        "KandinskyV22Pipeline", "KandinskyV22Img2ImgPipeline", "KandinskyV22InpaintPipeline"), denoisers=_UNET,
        cfg_on=cfg_property, latent=half_out_channels, per_row=_UNET_PER_ROW, default_layer=_ADDED_KV_MID,
        layout_note="[negative, positive] image embeds in added_cond_kwargs; learned variance; added-KV attention: "
        "image queries, keys [image-embedding tokens, image]",
        source="kandinsky2_2/pipeline_kandinsky2_2.py"),
    Family(name="Kandinsky 2.2 ControlNet", pipelines=(
        "KandinskyV22ControlnetPipeline", "KandinskyV22ControlnetImg2ImgPipeline"), denoisers=_UNET,
        latent=half_out_channels, per_row=_UNET_PER_ROW, default_layer=_ADDED_KV_MID,
        layout_note="[negative, positive] image embeds and [hint, hint]; local CFG; learned variance; added-KV "
        "attention",
        source="kandinsky2_2/pipeline_kandinsky2_2_controlnet.py"),
    Family(name="AnimateDiff", pipelines=("AnimateDiffPipeline",), denoisers=("UNetMotionModel",),
           cfg_on=cfg_property, video=True, frames_in_batch=True,
           per_row=tuple(p for p in _UNET_PER_ROW if p != "encoder_hidden_states"),
           per_frame_row=("encoder_hidden_states",),
           layout_note="[uncond, cond] 5-D latents; the spatial self-attention sees the frames as batch rows: one "
           "mask per frame (the motion modules' temporal attention is not a mask source)",
           source="animatediff/pipeline_animatediff.py: torch.cat([latents] * 2)"),
    Family(name="Wan 2.1 / 2.2 T2V", pipelines=("WanPipeline",), denoisers=("WanTransformer3DModel",), cfg="split",
           cfg_on=cfg_property, ways=1, latent=out_channels, video=True, experts=("transformer_2",),
           per_row=("encoder_hidden_states", "encoder_hidden_states_image"), default_layer="blocks.{middle}.attn1",
           layout_note="5-D video latents, blurred per frame; cond call, then uncond call (true CFG); "
           "self-attention over the video tokens only (text by cross-attention); Wan 2.2's two experts both guided",
           refused_configs=(("expand_timesteps", _WAN_EXPAND),),
           source="wan/pipeline_wan.py: noise_pred = current_model(...prompt_embeds), then noise_uncond"),
    Family(name="Wan 2.1 / 2.2 I2V", pipelines=("WanImageToVideoPipeline",), denoisers=("WanTransformer3DModel",),
           cfg="split", cfg_on=cfg_property, ways=1, latent=out_channels, video=True, experts=("transformer_2",),
           per_row=("encoder_hidden_states", "encoder_hidden_states_image"), default_layer="blocks.{middle}.attn1",
           refused_configs=(("expand_timesteps", _WAN_EXPAND),),
           layout_note="as T2V; input [x_t (16), mask (4), image latent (16)] = 36 ch: the conditioning channels "
           "pass through undegraded; CLIP image tokens (2.1) the same in both calls; Wan 2.2 A14B's two experts",
           source="wan/pipeline_wan_i2v.py: torch.cat([latents, condition], dim=1); image_embeds in both calls"),
    Family(name="HunyuanVideo", pipelines=("HunyuanVideoPipeline",), denoisers=("HunyuanVideoTransformer3DModel",),
           cfg="split", cfg_on=true_cfg, ways=1, latent=out_channels, video=True, joint="image_first",
           per_row=("encoder_hidden_states", "encoder_attention_mask", "pooled_projections", "guidance"),
           default_layer=_MIDDLE_ATTN,
           layout_note="5-D video latents, blurred per frame, patch (1, 2, 2); guidance-distilled (one way, "
           "`guidance` embedded) or true CFG (true_cfg_scale > 1 and a negative prompt: cond call, then uncond "
           "call); joint attention, video tokens first, text padding masked out of the softmax (a key bias)",
           source="hunyuan_video/pipeline_hunyuan_video.py: noise_pred, then neg_noise_pred; "
           "transformer_hunyuan_video.py: cat([video, text]) keys, attention_mask (B, 1, 1, N)"),
    Family(name="Chroma", pipelines=("ChromaPipeline", "ChromaImg2ImgPipeline"),
           denoisers=("ChromaTransformer2DModel",), cfg="split", cfg_on=cfg_property, ways=1, latent=packed_channels,
           packed=True, joint="text_first", t_scale=1000.0, per_row=("encoder_hidden_states", "attention_mask"),
           default_layer=_MIDDLE_ATTN,
           layout_note="packed latents; cond call, then uncond call; [text, image] joint attention, padded text "
           "masked out (attention_mask)",
           source="chroma/pipeline_chroma.py: noise_pred, then neg_noise_pred; timestep / 1000"),
    Family(name="Lumina 2", pipelines=("Lumina2Pipeline",), denoisers=("Lumina2Transformer2DModel",), cfg="split",
           cfg_on=cfg_property, ways=1, latent=in_channels, joint="text_first", t_scale=-1000.0, t_offset=1000.0,
           output_sign=-1.0, per_row=("encoder_hidden_states", "encoder_attention_mask"),
           default_layer="layers.{middle}.attn", call_refusal=lumina2_exact_cfg,
           layout_note="cond call, then uncond call; [text, image, padding] per row; model t = 1 - t/1000, output "
           "negated; cfg_normalization rescales the SAG-guided prediction; needs cfg_trunc_ratio=1 with CFG",
           source="lumina2/pipeline_lumina2.py: noise_pred_cond, then noise_pred_uncond; noise_pred = -noise_pred"),
    Family(name="CogView4", pipelines=("CogView4Pipeline",), denoisers=("CogView4Transformer2DModel",), cfg="split",
           cfg_on=cfg_property, ways=1, joint="text_first",
           per_row=("encoder_hidden_states", "original_size", "target_size", "crop_coords"),
           default_layer=_MIDDLE_ATTN1, layout_note="cond call, then uncond call; [text, image] joint attention",
           source="cogview4/pipeline_cogview4.py: noise_pred_cond, then noise_pred_uncond"),
    Family(name="AuraFlow", pipelines=("AuraFlowPipeline",), denoisers=("AuraFlowTransformer2DModel",),
           joint="text_first", t_scale=1000.0, default_layer="single_transformer_blocks.{middle}.attn",
           layout_note="[uncond, cond] (local CFG); [registers, text, image] joint attention",
           source="aura_flow/pipeline_aura_flow.py: torch.cat([latents] * 2); timestep = t / 1000"),
    Family(name="HunyuanDiT", pipelines=("HunyuanDiTPipeline",), denoisers=("HunyuanDiT2DModel",),
           cfg_on=cfg_property, latent=in_channels,
           per_row=("encoder_hidden_states", "text_embedding_mask", "encoder_hidden_states_t5",
                    "text_embedding_mask_t5", "image_meta_size", "style"),
           default_layer="blocks.{middle}.attn1",
           layout_note="[uncond, cond]; two text encoders, size and style per row; learned variance kept",
           source="hunyuandit/pipeline_hunyuandit.py: torch.cat([negative_prompt_embeds, prompt_embeds])"),
    Family(name="Kandinsky 3", pipelines=("Kandinsky3Pipeline", "Kandinsky3Img2ImgPipeline"),
           denoisers=("Kandinsky3UNet",), cfg_on=cfg_property, latent=in_channels,
           per_row=("encoder_hidden_states", "encoder_attention_mask"),
           default_layer="up_blocks.0.attentions.0.attention", self_context=True,
           layout_note="[uncond, cond], (w+1) c - w u; the bottleneck's self-attention (first of the up path)",
           source="kandinsky3/pipeline_kandinsky3.py, pipeline_kandinsky3_img2img.py: "
           "torch.cat([negative_prompt_embeds, prompt_embeds]), torch.cat([latents] * 2)"),
    Family(name="LCM", pipelines=("LatentConsistencyModelPipeline", "LatentConsistencyModelImg2ImgPipeline"),
           denoisers=_UNET, cfg="none", cfg_on=never, ways=1, per_row=_UNET_PER_ROW,
           layout_note="one way (guidance-distilled: w in timestep_cond)",
           source="latent_consistency_models/pipeline_latent_consistency_text2img.py, "
           "pipeline_latent_consistency_img2img.py: one unet call with timestep_cond=w_embedding"),
    # --------------------------------------------------------------------------------------- refused
    Family(name="latent upscaler", pipelines=("StableDiffusionLatentUpscalePipeline",), refusal=(
        "its UNet output is Karras-preconditioned (the pipeline turns it into a noise prediction after the call, and "
        "drops a variance channel), not the scheduler's parameterisation, so SAG's estimate of x0 from the raw "
        "output would be wrong")),
    Family(name="QwenImage Edit", pipelines=(
        "QwenImageEditPipeline", "QwenImageEditPlusPipeline", "QwenImageEditInpaintPipeline"), refusal=(
        "its transformer input is the packed latent tokens followed by the reference images' tokens "
        "(torch.cat([latents, image_latents], dim=1)), its output cut back to the latent tokens, and its size comes "
        "from the reference image; SAG would have to unpack and blur the latent tokens only and locate them in the "
        "joint sequence: not supported yet (QwenImagePipeline, Img2Img and Inpaint are)")),
    Family(name="GLIGEN text-image", pipelines=("StableDiffusionGLIGENTextImagePipeline",), refusal=(
        "it calls the UNet twice per step (with and without grounding) and takes the conditional way from the first "
        "call and the unconditional way from the second, so a SAG shift added inside each call would not cancel in "
        "its CFG (StableDiffusionGLIGENPipeline is supported)")),
    Family(name="LTX-Video", pipelines=("LTXPipeline", "LTXImageToVideoPipeline", "LTXConditionPipeline"), refusal=(
        "its latents reach the transformer packed as 3-D token sequences (batch, frames*height*width, channels) "
        "(pipeline_ltx.py's _pack_latents with the transformer's spatial and temporal patch sizes); SAG unpacks "
        "only Flux's 2x2 image packing, so it cannot blur the frames or lay the mask on them")),
    Family(name="CogVideoX", pipelines=(
        "CogVideoXPipeline", "CogVideoXImageToVideoPipeline", "CogVideoXVideoToVideoPipeline"), refusal=(
        "its latents are (batch, frames, channels, height, width), frames before channels, and every block is joint "
        "attention with the text tokens first over a grid patched by patch_size (and patch_size_t in CogVideoX 1.5); "
        "SAG's video layout is (batch, channels, frames, height, width) with a 3-D patch_size, so it would blur and "
        "mask the wrong axes")),
)

# the refusals by rule (checked before the records): what a whole class of models cannot do
_VIDEO_MARKERS = ("3D", "Motion", "SpatioTemporal", "Video", "I2VGenXL", "Temporal")
RULES = (
    ("5-D video denoisers without a record (AnimateDiff video-to-video, Stable Video Diffusion, I2VGen-XL, ...)",
     "their video layout is not in the registry yet (Wan T2V and I2V, HunyuanVideo and AnimateDiff text-to-video "
     "are); use a supported pipeline"),
    ("other PAG pipelines", "PAG's batch layout and processor swap are known for StableDiffusionPAGPipeline and "
     "StableDiffusionXLPAGPipeline only; for the others use the pipeline without PAG for SAG (e.g. "
     "StableDiffusionPipeline.from_pipe(pipe)), or PAG without SAG"),
    ("other packed-latent pipelines (Flux Control img2img / inpaint, Kontext inpaint, QwenImage ControlNet / Layered)",
     "packed-latent transformers without a record (Flux, Fill, Control, Kontext, Chroma and QwenImage have one) are not supported yet; "
     "SAG needs to know how to unpack the latent to blur it"),
    ("Sana and other linear-attention models", "linear attention has no softmax attention map to build SAG's "
     "mask from"),
)


def rule_refusal(pipe, model) -> str | None:
    """Why no record or layout can make SAG correct on this pipeline/denoiser (None: no rule against it)."""
    name, model_name = type(pipe).__name__, type(model).__name__
    mro = {c.__name__ for c in type(pipe).__mro__}
    record = family_of(pipe)
    video_record = record is not None and record.video
    if not video_record and (any(m in model_name for m in _VIDEO_MARKERS) or "AnimateDiff" in name or "Video" in name):
        return f"{name} denoises 5-D video latents with {model_name}: {RULES[0][1]}"
    if "PAGMixin" in mro and record is None:
        return f"{name} is a PAG (perturbed-attention guidance) pipeline: {RULES[1][1]}"
    if record is None and (
            hasattr(type(pipe), "_pack_latents") or model_name.startswith(("Flux", "Chroma", "QwenImage"))):
        return f"{name} feeds {model_name} packed 3-D latents (batch, tokens, channels): {RULES[2][1]}"
    for module in model.modules():
        proc = getattr(module, "processor", None)
        if "LinearAttention" in type(module).__name__ or (proc is not None and "LinearAttn" in type(proc).__name__):
            return f"{model_name} uses linear attention ({type(proc or module).__name__}): {RULES[3][1]}"
    return None


_BY_PIPELINE = {p: f for f in FAMILIES for p in f.pipelines}


def family_by_name(pipeline_class_name: str) -> Family | None:
    return _BY_PIPELINE.get(pipeline_class_name)


def pipeline_class(pipe) -> tuple[type, Family | None]:
    """(the diffusers pipeline class the batch layout comes from, its record or None). sag_fast's own classes
    and user subclasses that keep the pipeline's __call__ are looked through; one that overrides __call__ is not
    (its batch layout may differ)."""
    for cls in type(pipe).__mro__:
        module = cls.__module__ or ""
        if module.startswith("sag_fast.") or "_sag_base_class" in vars(cls):
            continue
        if module.startswith("diffusers."):
            return cls, _BY_PIPELINE.get(cls.__name__)
        if "__call__" in vars(cls):
            return cls, None
    return type(pipe), None


def family_of(pipe) -> Family | None:
    return pipeline_class(pipe)[1]


def markdown_tables() -> str:
    """The README's supported / refused tables, from the records and the rules."""
    lines = ["| family (`enable_sag`) | pipelines | CFG layout | default layer |", "|---|---|---|---|"]
    for f in FAMILIES:
        if f.refusal is None:
            cfg = {"batched": f"{f.ways} ways in one call" if f.ways > 1 else "one way", "split": "separate calls",
                   "none": "none"}[f.cfg]
            lines.append(f"| {f.name} | {', '.join(f'`{p}`' for p in f.pipelines)} | {cfg}: {f.layout_note} | "
                         f"{f.layer_text} |")
    lines += ["", "| refused at `enable_sag` | why |", "|---|---|"]
    for f in FAMILIES:
        if f.refusal is not None:
            lines.append(f"| {f.name} ({', '.join(f'`{p}`' for p in f.pipelines)}) | {f.refusal} |")
    for what, why in RULES:
        lines.append(f"| {what} | {why} |")
    return "\n".join(lines)


def denoiser_family(model: torch.nn.Module) -> Family | None:
    """The first supported record whose denoisers include model's class (for callers that see only the model:
    the modular guider)."""
    names = {c.__name__ for c in type(model).__mro__}
    return next((f for f in FAMILIES if f.refusal is None and names & set(f.denoisers)), None)


def joint_layout(model: torch.nn.Module) -> str | None:
    """Where a known joint-attention denoiser puts the image tokens ('image_first', 'text_first'), else None."""
    names = {c.__name__ for c in type(model).__mro__}
    return next((f.joint for f in FAMILIES if f.joint is not None and names & set(f.denoisers)), None)
