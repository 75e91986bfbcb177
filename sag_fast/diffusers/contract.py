"""The batch contract: for every supported diffusers pipeline, how its denoiser batch is laid out.

SAG runs one extra forward of the denoiser on the unconditional rows of the model batch, degraded. To do that
without guessing, sag_fast needs, at every guided model call:

* how many guidance ways are stacked in the model batch (B rows each, in batch order), and which of them is
  the unconditional one (the rows SAG degrades and feeds to the extra forward);
* how many leading input channels are the latent x_t being denoised (the rest is conditioning concatenated on
  channels, e.g. an inpainting mask: it passes through to the extra forward unchanged);
* which model arguments are per-row (cut to the degraded rows), by name; every other argument is passed
  unchanged: a tensor is never cut only because its first dimension equals the batch.

`contract_for(pipe, model)` gives the `BatchContract` of a pipeline from a table written from diffusers' own
source (every row names the pipeline's CFG condition and batch order; see `TABLE`). A pipeline the table
does not know is refused with the way out: declare its layout with `SAGLayout` and pass it as
`enable_sag(pipe, layout=SAGLayout(...))`:

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

Refused whatever the layout (at enable_sag time): 5-D video denoisers (AnimateDiff and other video UNets and
3-D transformers: video SAG is not supported yet), packed-latent transformers (Flux family: not supported yet),
linear-attention models (Sana: no softmax attention map to build SAG's mask from), PAG pipelines (see
`_refuse_pag`), the latent upscaler (its model output is Karras-preconditioned, not the scheduler's
parameterisation, so SAG's x0 estimate would be wrong), GLIGEN text-image (two UNet calls per step whose ways
its CFG mixes).

Supported (TABLE; each row's CFG condition and batch order are read from diffusers 0.42's source, and
tests/test_diffusers_contract.py checks each against the pipeline's real denoiser call):
SD 1/2 txt2img, img2img, inpaint (4- or 9-channel UNet), Depth2Img (5 ch), the x4 upscaler (7 ch, noise level in
class_labels), InstructPix2Pix SD and SDXL (3 ways [text+image, image, none]: uncond_index 2, 8 ch), SDXL
txt2img/img2img/inpaint, ControlNet SD/SDXL txt2img/img2img/inpaint (guess mode included), GLIGEN, DiT (cond
first: uncond_index 1), PixArt-alpha/Sigma, DDPM/DDIM with UNet2DModel (1 way), DeepFloyd IF stage I and II
(all variants; pixel space, 3 latent channels), Kandinsky 2.2 decoders (txt2img, img2img, inpaint, ControlNet).
With CFG off every row is one way. Adding the same SAG shift to every way is exact for guidance whose weights
sum to 1 (CFG, pix2pix's 3-way guidance).

ControlNet: the ControlNet residuals of the degraded forward are recomputed from the degraded input (the
paper's eps(x~) is the whole model's prediction at the degraded input; reusing the residuals of the undegraded
input re-injects undegraded signal through every skip connection). See `_ControlNetReplay`.
"""
from __future__ import annotations

import inspect
from collections import ChainMap
from dataclasses import dataclass
from typing import Any, Callable

import torch

__all__ = ["CallLayout", "SAGLayout", "BatchContract", "contract_for", "TABLE"]


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


# ----------------------------------------------------------------------------------- per-row arguments
# per denoiser class: the forward arguments that hold one entry per batch row (read from each class's forward)
_UNET_COND_PER_ROW = (
    "encoder_hidden_states", "class_labels", "timestep_cond", "attention_mask", "encoder_attention_mask",
    "added_cond_kwargs",                      # text_embeds, time_ids, IP-adapter image_embeds (a list), hint, ...
    "down_block_additional_residuals", "mid_block_additional_residual",      # ControlNet
    "down_intrablock_additional_residuals",                                  # T2I-Adapter
    "cross_attention_kwargs.gligen",          # GLIGEN boxes / phrase embeddings / masks
)
DENOISER_PER_ROW: dict[str, tuple[str, ...]] = {
    "UNet2DConditionModel": _UNET_COND_PER_ROW,
    "UNet2DModel": ("class_labels",),
    "DiTTransformer2DModel": ("class_labels",),
    "PixArtTransformer2DModel": ("encoder_hidden_states", "encoder_attention_mask", "attention_mask",
                                 "added_cond_kwargs"),
    "SD3Transformer2DModel": ("encoder_hidden_states", "pooled_projections"),
    # Flux: txt_ids / img_ids are (tokens, 3), shared by every row: never cut
    "FluxTransformer2DModel": ("encoder_hidden_states", "pooled_projections", "guidance"),
    "Transformer2DModel": ("encoder_hidden_states", "encoder_attention_mask", "attention_mask", "class_labels",
                           "added_cond_kwargs"),
}
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


# ------------------------------------------------------------------------------------------- the table
@dataclass(frozen=True)
class Row:
    """One table row: how a pipeline class stacks its denoiser batch.

    cfg(pipe, call_args) -> bool: the pipeline's own CFG condition. ways: ways when CFG is on. uncond_index: the
    unconditional way. latent(model) -> int: the latent channels of the model input. denoisers: the denoiser
    classes the pipeline is supported with. source: where the batch order is in diffusers' source."""

    cfg: Callable[[Any, dict], bool]
    ways: int
    uncond_index: int
    latent: Callable[[torch.nn.Module], int]
    denoisers: tuple[str, ...]
    source: str
    controlnet: bool = False
    packed: bool = False                  # Flux: (B, tokens, C*4) 2x2-packed latents
    split_cfg: Callable[[Any, dict], bool] | None = None   # CFG as two calls per step: cond first, then uncond
    t_scale: float = 1.0                  # the model's timestep times t_scale is the scheduler's timestep


def _scale_above_one(pipe, call) -> bool:
    return call.get("guidance_scale", 1.0) > 1


def _scale_above_one_no_lcm(pipe, call) -> bool:
    # `do_classifier_free_guidance`: `guidance_scale > 1 and unet.config.time_cond_proj_dim is None`
    unet = getattr(pipe, "unet", None)
    return call.get("guidance_scale", 1.0) > 1 and getattr(getattr(unet, "config", None), "time_cond_proj_dim",
                                                           None) is None


def _pix2pix_cfg(pipe, call) -> bool:
    return call.get("guidance_scale", 1.0) > 1.0 and call.get("image_guidance_scale", 1.0) >= 1.0


def _never(pipe, call) -> bool:
    return False


def _out_channels(model) -> int:   # epsilon/v predictors of the latent: output channels = latent channels
    return int(model.config.out_channels)


def _in_channels(model) -> int:    # input = latent only (learned variance may double the output)
    return int(model.config.in_channels)


def _half_in_channels(model) -> int:  # IF super-resolution: [x_t (3), upscaled image (3)]
    return int(model.config.in_channels) // 2


def _half_out_channels(model) -> int:  # learned variance: [eps (C), variance (C)] out; input may carry more
    return int(model.config.out_channels) // 2


def _flux_true_cfg(pipe, call) -> bool:
    # pipeline_flux.py: do_true_cfg = true_cfg_scale > 1 and has_neg_prompt
    has_neg = call.get("negative_prompt") is not None or (
        call.get("negative_prompt_embeds") is not None and call.get("negative_pooled_prompt_embeds") is not None)
    return call.get("true_cfg_scale", 1.0) > 1 and has_neg


def _packed_channels(model) -> int:  # Flux: 2x2 patches packed on channels
    return int(model.config.in_channels) // 4


_UNET = ("UNet2DConditionModel",)
_SD = "pipeline_stable_diffusion.py: torch.cat([negative_prompt_embeds, prompt_embeds]), [latents] * 2"

_SD3 = ("SD3Transformer2DModel",)

TABLE: dict[str, Row] = {
    # Flux.1: packed latents; guidance-distilled (one way, guidance as an input) or true CFG: the transformer is
    # called twice per step, cond then uncond (pipeline_flux.py: noise_pred, then neg_noise_pred); timestep / 1000
    "FluxPipeline": Row(_never, 1, 0, _packed_channels, ("FluxTransformer2DModel",), "flux/pipeline_flux.py",
                        packed=True, split_cfg=_flux_true_cfg, t_scale=1000.0),
    "FluxImg2ImgPipeline": Row(_never, 1, 0, _packed_channels, ("FluxTransformer2DModel",),
                               "flux/pipeline_flux_img2img.py", packed=True, split_cfg=_flux_true_cfg, t_scale=1000.0),
    # SD3 / SD3.5: [uncond, cond] (torch.cat([negative_prompt_embeds, prompt_embeds])), flow matching; the
    # skip-layer-guidance call (skip_layers=...) is a separate, unguided call (see session.py)
    "StableDiffusion3Pipeline": Row(_scale_above_one, 2, 0, _out_channels, _SD3,
                                    "stable_diffusion_3/pipeline_stable_diffusion_3.py"),
    "StableDiffusion3Img2ImgPipeline": Row(_scale_above_one, 2, 0, _out_channels, _SD3,
                                           "stable_diffusion_3/pipeline_stable_diffusion_3_img2img.py"),
    # Stable Diffusion 1/2: [uncond, cond]; `do_classifier_free_guidance` = scale > 1 and not an LCM UNet
    "StableDiffusionPipeline": Row(_scale_above_one_no_lcm, 2, 0, _out_channels, _UNET, _SD),
    "StableDiffusionImg2ImgPipeline": Row(_scale_above_one_no_lcm, 2, 0, _out_channels, _UNET, _SD),
    # 4- or 9-channel UNet: [x_t, mask, masked-image latents] on channels
    "StableDiffusionInpaintPipeline": Row(_scale_above_one_no_lcm, 2, 0, _out_channels, _UNET, _SD),
    # [x_t, depth] (5 channels); `do_classifier_free_guidance` = scale > 1
    "StableDiffusionDepth2ImgPipeline": Row(_scale_above_one, 2, 0, _out_channels, _UNET, _SD),
    # x4 upscaler: local `do_classifier_free_guidance = guidance_scale > 1.0`; [x_t, image] (7 ch), noise_level
    # rides in class_labels
    "StableDiffusionUpscalePipeline": Row(_scale_above_one, 2, 0, _out_channels, _UNET, _SD),
    # InstructPix2Pix: [text+image, image, none] (prompt_embeds [p, n, n], image latents [i, i, 0]);
    # CFG = guidance_scale > 1 and image_guidance_scale >= 1; [x_t, image latents] (8 channels)
    "StableDiffusionInstructPix2PixPipeline": Row(_pix2pix_cfg, 3, 2, _out_channels, _UNET,
                                                  "pipeline_stable_diffusion_instruct_pix2pix.py: chunk(3) -> "
                                                  "text, image, uncond"),
    "StableDiffusionXLInstructPix2PixPipeline": Row(_pix2pix_cfg, 3, 2, _out_channels, _UNET,
                                                    "pipeline_stable_diffusion_xl_instruct_pix2pix.py: local "
                                                    "do_classifier_free_guidance; chunk(3) -> text, image, uncond"),
    # SDXL: [uncond, cond] for prompt_embeds, add_text_embeds, add_time_ids
    "StableDiffusionXLPipeline": Row(_scale_above_one_no_lcm, 2, 0, _out_channels, _UNET, "pipeline_stable_diffusion_xl.py"),
    "StableDiffusionXLImg2ImgPipeline": Row(_scale_above_one_no_lcm, 2, 0, _out_channels, _UNET,
                                            "pipeline_stable_diffusion_xl_img2img.py"),
    "StableDiffusionXLInpaintPipeline": Row(_scale_above_one_no_lcm, 2, 0, _out_channels, _UNET,
                                            "pipeline_stable_diffusion_xl_inpaint.py"),
    # ControlNet: [uncond, cond]; guess mode runs the ControlNet on the cond rows and feeds zeros to the uncond
    "StableDiffusionControlNetPipeline": Row(_scale_above_one_no_lcm, 2, 0, _out_channels, _UNET,
                                             "controlnet/pipeline_controlnet.py", controlnet=True),
    "StableDiffusionControlNetImg2ImgPipeline": Row(_scale_above_one, 2, 0, _out_channels, _UNET,
                                                    "controlnet/pipeline_controlnet_img2img.py", controlnet=True),
    "StableDiffusionControlNetInpaintPipeline": Row(_scale_above_one, 2, 0, _out_channels, _UNET,
                                                    "controlnet/pipeline_controlnet_inpaint.py", controlnet=True),
    "StableDiffusionXLControlNetPipeline": Row(_scale_above_one_no_lcm, 2, 0, _out_channels, _UNET,
                                               "controlnet/pipeline_controlnet_sd_xl.py", controlnet=True),
    "StableDiffusionXLControlNetImg2ImgPipeline": Row(_scale_above_one, 2, 0, _out_channels, _UNET,
                                                      "controlnet/pipeline_controlnet_sd_xl_img2img.py",
                                                      controlnet=True),
    "StableDiffusionXLControlNetInpaintPipeline": Row(_scale_above_one, 2, 0, _out_channels, _UNET,
                                                      "controlnet/pipeline_controlnet_inpaint_sd_xl.py",
                                                      controlnet=True),
    # GLIGEN: local CFG; boxes/phrases per row in cross_attention_kwargs["gligen"] (uncond rows masked to 0)
    "StableDiffusionGLIGENPipeline": Row(_scale_above_one, 2, 0, _out_channels, _UNET,
                                         "deprecated/stable_diffusion_gligen/pipeline_stable_diffusion_gligen.py"),
    # DiT: [cond, null class] (cond first); CFG if guidance_scale > 1; learned sigma doubles the output
    "DiTPipeline": Row(_scale_above_one, 2, 1, _in_channels, ("DiTTransformer2DModel", "Transformer2DModel"),
                       "dit/pipeline_dit.py: torch.cat([class_labels, class_null])"),
    # PixArt-alpha/Sigma: local CFG, [uncond, cond], learned sigma
    "PixArtAlphaPipeline": Row(_scale_above_one, 2, 0, _in_channels, ("PixArtTransformer2DModel", "Transformer2DModel"),
                               "pixart_alpha/pipeline_pixart_alpha.py"),
    "PixArtSigmaPipeline": Row(_scale_above_one, 2, 0, _in_channels, ("PixArtTransformer2DModel", "Transformer2DModel"),
                               "pixart_alpha/pipeline_pixart_sigma.py"),
    # unconditional pixel-space UNets (the paper's setting): one way
    "DDPMPipeline": Row(_never, 1, 0, _in_channels, ("UNet2DModel",), "ddpm/pipeline_ddpm.py"),
    "DDIMPipeline": Row(_never, 1, 0, _in_channels, ("UNet2DModel",), "ddim/pipeline_ddim.py"),
    # DeepFloyd IF: local CFG, [uncond, cond]; pixel space (3 channels), learned variance (6 output channels)
    "IFPipeline": Row(_scale_above_one, 2, 0, _in_channels, _UNET, "deepfloyd_if/pipeline_if.py"),
    "IFImg2ImgPipeline": Row(_scale_above_one, 2, 0, _in_channels, _UNET, "deepfloyd_if/pipeline_if_img2img.py"),
    "IFInpaintingPipeline": Row(_scale_above_one, 2, 0, _in_channels, _UNET, "deepfloyd_if/pipeline_if_inpainting.py"),
    # stage II: [x_t (3), noised upscaled image (3)] on channels, noise level per row in class_labels
    "IFSuperResolutionPipeline": Row(_scale_above_one, 2, 0, _half_in_channels, _UNET,
                                     "deepfloyd_if/pipeline_if_superresolution.py"),
    "IFImg2ImgSuperResolutionPipeline": Row(_scale_above_one, 2, 0, _half_in_channels, _UNET,
                                            "deepfloyd_if/pipeline_if_img2img_superresolution.py"),
    "IFInpaintingSuperResolutionPipeline": Row(_scale_above_one, 2, 0, _half_in_channels, _UNET,
                                               "deepfloyd_if/pipeline_if_inpainting_superresolution.py"),
    # Kandinsky 2.2 decoders: [negative image embeds, image embeds] in added_cond_kwargs (ControlNet: the hint
    # too, [hint, hint]); learned variance (8 output channels for 4 latent ones); inpaint: [x_t, masked image,
    # mask] (9 channels). CFG: the `do_classifier_free_guidance` property, or a local (ControlNet variants)
    "KandinskyV22Pipeline": Row(_scale_above_one, 2, 0, _half_out_channels, _UNET,
                                "kandinsky2_2/pipeline_kandinsky2_2.py"),
    "KandinskyV22Img2ImgPipeline": Row(_scale_above_one, 2, 0, _half_out_channels, _UNET,
                                       "kandinsky2_2/pipeline_kandinsky2_2_img2img.py"),
    "KandinskyV22InpaintPipeline": Row(_scale_above_one, 2, 0, _half_out_channels, _UNET,
                                       "kandinsky2_2/pipeline_kandinsky2_2_inpainting.py"),
    "KandinskyV22ControlnetPipeline": Row(_scale_above_one, 2, 0, _half_out_channels, _UNET,
                                          "kandinsky2_2/pipeline_kandinsky2_2_controlnet.py"),
    "KandinskyV22ControlnetImg2ImgPipeline": Row(_scale_above_one, 2, 0, _half_out_channels, _UNET,
                                                 "kandinsky2_2/pipeline_kandinsky2_2_controlnet_img2img.py"),
}

# rows whose denoising loop reads `self.do_classifier_free_guidance` (the others keep CFG in a local variable)
_CFG_PROPERTY_ROWS = frozenset({
    "StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline", "StableDiffusionInpaintPipeline",
    "StableDiffusionDepth2ImgPipeline", "StableDiffusionInstructPix2PixPipeline", "StableDiffusionXLPipeline",
    "StableDiffusionXLImg2ImgPipeline", "StableDiffusionXLInpaintPipeline", "StableDiffusionControlNetPipeline",
    "StableDiffusionControlNetImg2ImgPipeline", "StableDiffusionControlNetInpaintPipeline",
    "StableDiffusionXLControlNetPipeline", "StableDiffusionXLControlNetImg2ImgPipeline",
    "StableDiffusionXLControlNetInpaintPipeline", "KandinskyV22Pipeline", "KandinskyV22Img2ImgPipeline",
    "KandinskyV22InpaintPipeline", "StableDiffusion3Pipeline", "StableDiffusion3Img2ImgPipeline",
})

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
                 defaults: dict | None = None, check_property: bool = False, packed: bool = False,
                 split_cfg: Callable[[Any, dict], bool] | None = None, t_scale: float = 1.0):
        self.name = name
        self.packed = packed          # the denoiser takes 2x2-packed (B, tokens, C*4) latents (Flux)
        self.t_scale = t_scale        # scheduler timestep = model timestep * t_scale
        self._split_cfg = split_cfg
        self._defaults = dict(defaults or {})   # the pipeline __call__'s defaults, under the call's arguments
        self._check_property = check_property   # cross-check with pipe.do_classifier_free_guidance
        self._cfg = cfg
        self._ways = ways
        self._uncond_index = uncond_index
        self._latent_channels = latent_channels
        self.per_row = tuple(per_row)
        self._paths = tuple((p, tuple(p.split("."))) for p in self.per_row)
        self._controlnet = _ControlNetReplay(pipe) if controlnet else None

    def _with_defaults(self, call_args: dict):
        """The call's arguments, with the pipeline __call__'s defaults under them."""
        return ChainMap(call_args, self._defaults) if self._defaults else call_args

    def split_cfg(self, pipe, call_args: dict) -> bool:
        """Whether this call does CFG as two denoiser calls per step (cond first, then uncond)."""
        if self._split_cfg is None:
            return False
        call = self._with_defaults(call_args)
        return bool(self._split_cfg(pipe, call))

    def latent_hw(self, pipe, call_args: dict) -> tuple[int, int]:
        """(H, W) of the unpacked latent of a packed-latent call (pipeline_flux.py's _unpack_latents rule)."""
        call = self._with_defaults(call_args)
        factor = int(getattr(pipe, "vae_scale_factor", 8))
        size = int(getattr(pipe, "default_sample_size", 128)) * factor
        height, width = call.get("height") or size, call.get("width") or size
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
        if self._check_property:  # the loop of this pipeline reads the property: it must agree
            try:
                prop = pipe.do_classifier_free_guidance
            except Exception:  # read outside a call (no _guidance_scale yet): nothing to compare with
                prop = None
            if isinstance(prop, bool) and prop != cfg:
                raise RuntimeError(f"{self.name}: the batch contract says CFG is {'on' if cfg else 'off'} for this "
                                   f"call but pipe.do_classifier_free_guidance is {prop}; SAG stops rather than "
                                   "degrade the wrong rows (declare the layout with sag_fast.SAGLayout)")
        ways, uncond = (self._ways, self._uncond_index) if cfg else (1, 0)
        total = x.shape[0]
        if total % ways:
            raise RuntimeError(f"{self.name}: the layout says {ways} guidance ways (CFG {'on' if cfg else 'off'}) but "
                               f"the denoiser was called with a batch of {total}, not a multiple of {ways}")
        channels = x.shape[1] if x.dim() > 1 else 0
        latent = channels if self._latent_channels is None else self._latent_channels
        if latent > channels:
            raise RuntimeError(f"{self.name}: the layout says {latent} latent channels but the denoiser input "
                               f"{tuple(x.shape)} has {channels}")
        for name, path in self._paths:
            _check_rows(_get_path(model_kwargs, path), name, total)
        return CallLayout(ways, uncond, latent)

    def degraded_kwargs(self, model_kwargs: dict, rows: slice, total: int, x_degraded: torch.Tensor, t_rows) -> dict:
        """The denoiser kwargs of the extra forward on `rows`: the per-row arguments cut to rows (ControlNet
        residuals recomputed at x_degraded), everything else unchanged. model_kwargs is not modified."""
        out = model_kwargs
        for name, path in self._paths:
            out = _cut_path(out, path, rows, total, name)
        if out is model_kwargs:
            out = dict(model_kwargs)
        if self._controlnet is not None:
            self._controlnet.replay(out, model_kwargs, rows, total, x_degraded, t_rows)
        return out

    def begin_call(self, pipe) -> None:
        if self._controlnet is not None:
            self._controlnet.begin_call(pipe)

    def end_call(self) -> None:
        if self._controlnet is not None:
            self._controlnet.end_call()

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
def _table_class(pipe) -> tuple[type, str | None]:
    """(the diffusers pipeline class the batch layout comes from, its table name or None).

    sag_fast's own classes (the drop-in pipelines, enable_sag's per-instance subclass) and user subclasses that
    keep the pipeline's __call__ are looked through; a subclass that overrides __call__ is not (its batch
    layout may differ)."""
    for cls in type(pipe).__mro__:
        module = cls.__module__ or ""
        if module.startswith("sag_fast.") or "_sag_base_class" in vars(cls):
            continue
        if module.startswith("diffusers."):
            return cls, (cls.__name__ if cls.__name__ in TABLE else None)
        if "__call__" in vars(cls):
            return cls, None
    return type(pipe), None


_VIDEO_MARKERS = ("3D", "Motion", "SpatioTemporal", "Video", "I2VGenXL", "Temporal")


def _refusal(pipe, model) -> str | None:
    """Why no layout can make SAG correct on this pipeline/denoiser (None: nothing against it)."""
    name = type(pipe).__name__
    model_name = type(model).__name__
    mro_names = {c.__name__ for c in type(pipe).__mro__}
    if any(m in model_name for m in _VIDEO_MARKERS) or "AnimateDiff" in name or "Video" in name:
        return (f"{name} denoises 5-D video latents with {model_name}: video SAG is not supported yet "
                "(SAG degrades 4-D (batch, channels, height, width) inputs); use an image pipeline")
    if "PAGMixin" in mro_names:
        return _refuse_pag(name)
    packed_row = any(c.__name__ in TABLE and TABLE[c.__name__].packed for c in type(pipe).__mro__)
    if not packed_row and (hasattr(type(pipe), "_pack_latents") or model_name.startswith(("Flux", "Chroma", "QwenImage"))):
        return (f"{name} feeds {model_name} packed 3-D latents (batch, tokens, channels): packed-latent "
                "transformers other than FluxPipeline / FluxImg2ImgPipeline are not supported yet; SAG needs to "
                "know how to unpack the latent to blur it")
    for module in model.modules():
        proc = getattr(module, "processor", None)
        if "LinearAttention" in type(module).__name__ or (proc is not None and "LinearAttn" in type(proc).__name__):
            return (f"{model_name} uses linear attention ({type(proc or module).__name__}): it has no softmax "
                    "attention map to build SAG's mask from, so SAG is not supported on it")
    return _REFUSED_PIPELINES.get(name)


# pipelines whose denoiser calls no declared layout can describe (checked by exact class name)
_REFUSED_PIPELINES = {
    "StableDiffusionLatentUpscalePipeline": (
        "StableDiffusionLatentUpscalePipeline: its UNet output is Karras-preconditioned (the pipeline turns it into "
        "a noise prediction after the call, and drops a variance channel), not the scheduler's parameterisation, "
        "so SAG's estimate of x0 from the raw output would be wrong; the latent upscaler is not supported"),
    "StableDiffusionGLIGENTextImagePipeline": (
        "StableDiffusionGLIGENTextImagePipeline calls the UNet twice per step (with and without grounding) and "
        "takes the conditional way from the first call and the unconditional way from the second, so a SAG shift "
        "added inside each call would not cancel in its CFG; it is not supported (StableDiffusionGLIGENPipeline "
        "is)"),
}


def _refuse_pag(name: str) -> str:
    # Why refuse rather than support: diffusers' PAG processors (PAGCFGIdentitySelfAttnProcessor2_0 /
    # PAGIdentitySelfAttnProcessor2_0) split every batch they see into ways by chunk(3) / chunk(2). SAG's extra
    # forward runs the denoiser on the B unconditional rows only, so every PAG layer would misread it (chunk(3)
    # of 1 row fails, of 3 rows treats them as [u, c, perturbed]); it would need PAG's layers switched back to
    # plain attention for that forward. And PAG's default layer ("mid") is SAG's default layer, where the
    # attention runs on 2/3 of the batch. PAG is itself an attention-perturbation guidance in the SAG line.
    return (f"{name} is a PAG (perturbed-attention guidance) pipeline: its attention processors split the batch "
            "into [uncond, cond, perturbed] ways inside the model, which SAG's extra forward on the unconditional "
            "rows cannot go through; PAG and SAG together are not supported. Use the pipeline without PAG for "
            "SAG (e.g. StableDiffusionPipeline.from_pipe(pipe)), or PAG without SAG")


def contract_for(pipe, model: torch.nn.Module, layout: SAGLayout | None = None) -> BatchContract:
    """The BatchContract of `pipe` whose denoiser is `model` (the uncompiled module).

    layout: a user-declared SAGLayout (for a pipeline the table does not know, or to override its row).
    Raises TypeError for a bad layout, ValueError for a pipeline/denoiser SAG cannot run on or does not know,
    naming the pipeline class, why, and the way out."""
    if layout is not None and not isinstance(layout, SAGLayout):
        raise TypeError(f"layout must be a sag_fast.SAGLayout, got {type(layout).__name__}")
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be the pipeline's denoiser torch module, got {type(model).__name__}")
    why = _refusal(pipe, model)
    if why is not None:
        raise ValueError(why)
    # the denoiser's class, or the diffusers class it derives from
    model_name = next((c.__name__ for c in type(model).__mro__ if c.__name__ in DENOISER_PER_ROW),
                      type(model).__name__)
    cls, table_name = _table_class(pipe)
    controlnet = isinstance(getattr(pipe, "controlnet", None), torch.nn.Module)
    if layout is not None:
        cfg = layout.cfg
        cfg_fn = (lambda pipe, call, value=cfg: value) if isinstance(cfg, bool) else (lambda pipe, call: cfg(call))
        return BatchContract(pipe, model, name=type(pipe).__name__, cfg=cfg_fn, ways=layout.ways,
                             uncond_index=layout.uncond_index, latent_channels=layout.latent_channels,
                             per_row=layout.per_row, controlnet=controlnet and
                             "mid_block_additional_residual" in layout.per_row)
    if table_name is None:
        known = ("not in sag_fast's batch-contract table" if (cls.__module__ or "").startswith("diffusers.")
                 else "a class whose own __call__ may stack the batch differently")
        raise ValueError(f"{type(pipe).__name__}: SAG does not know how this pipeline stacks its denoiser batch "
                         f"({cls.__name__} is {known}); {_WAY_OUT}")
    row = TABLE[table_name]
    if model_name not in row.denoisers:
        raise ValueError(f"{type(pipe).__name__} with a {model_name} denoiser is not supported (the batch contract of "
                         f"{table_name} covers {', '.join(row.denoisers)}); {_WAY_OUT}")
    per_row = DENOISER_PER_ROW[model_name]
    latent = row.latent(model)
    defaults = {n: p.default for n, p in inspect.signature(cls.__call__).parameters.items()
                if p.default is not inspect.Parameter.empty}
    return BatchContract(pipe, model, name=table_name, cfg=row.cfg, ways=row.ways, uncond_index=row.uncond_index,
                         latent_channels=latent, per_row=per_row, controlnet=row.controlnet and controlnet,
                         defaults=defaults, check_property=table_name in _CFG_PROPERTY_ROWS, packed=row.packed,
                         split_cfg=row.split_cfg, t_scale=row.t_scale)
