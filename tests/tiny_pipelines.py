"""Tiny random-weight pipelines for the batch-contract tests (tests/test_diffusers_contract.py): every
pipeline of sag_fast's batch-contract table that sag_fast/diffusers/tiny.py does not build, plus the refused
ones (PAG, AnimateDiff, Flux, Sana-like linear attention, the latent upscaler).

Built from configs under a fixed seed (no download), 8x8 latents (64x64 images with the tiny 8x VAE, or 8x8
pixels for IF), from tiny.py's text encoder / tokenizer / VAE / scheduler builders. Pipelines whose text
encoder is T5 (IF, PixArt) are built without one: their tests pass prompt embeddings."""
from __future__ import annotations

import warnings

import torch

from sag_fast.diffusers.tiny import (LATENT_CHANNELS, TEXT_HIDDEN, _seeded, tiny_scheduler, tiny_sd_components,
                                     tiny_sdxl_components, tiny_text_encoder, tiny_tokenizer, tiny_unet, tiny_vae)

EMBED_LEN = 8  # token length of the prompt embeddings passed to the T5-based pipelines


def _place(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe


def cond_unet(in_channels: int = LATENT_CHANNELS, out_channels: int = LATENT_CHANNELS, seed: int = 0,
              cross_dim: int = TEXT_HIDDEN, **extra):
    """tiny.py's UNet2DConditionModel layout with other input/output channels and extra config entries."""
    from diffusers import UNet2DConditionModel

    with _seeded(seed):
        return UNet2DConditionModel(
            sample_size=8, in_channels=in_channels, out_channels=out_channels,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8,
            cross_attention_dim=cross_dim, attention_head_dim=2, **extra,
        ).eval()


def added_kv_unet(in_channels: int, out_channels: int, seed: int = 0, **extra):
    """The block types of the real DeepFloyd IF and Kandinsky 2.2 UNets (ResnetDownsampleBlock2D,
    SimpleCrossAttnDownBlock2D, UNetMidBlock2DSimpleCrossAttn, ...): their attention is added-KV
    (AttnAddedKVProcessor2_0: image queries, keys [text from add_k_proj, image]); 4 heads of 8 in the mid block."""
    from diffusers import UNet2DConditionModel

    with _seeded(seed):
        return UNet2DConditionModel(
            sample_size=8, in_channels=in_channels, out_channels=out_channels,
            down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"),
            up_block_types=("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"),
            mid_block_type="UNetMidBlock2DSimpleCrossAttn", block_out_channels=(16, 32), layers_per_block=1,
            norm_num_groups=8, cross_attention_dim=16, attention_head_dim=8,
            **{"resnet_time_scale_shift": "scale_shift", **extra}).eval()


def _sd(cls, unet=None, **extra):
    c = tiny_sd_components()
    if unet is not None:
        c["unet"] = unet
    c.update(extra)
    return _place(cls(**c))


def sd_inpaint_pipeline(channels: int = 9):
    from diffusers import StableDiffusionInpaintPipeline

    return _sd(StableDiffusionInpaintPipeline, cond_unet(in_channels=channels))


def sd_pix2pix_pipeline():
    from diffusers import StableDiffusionInstructPix2PixPipeline

    return _sd(StableDiffusionInstructPix2PixPipeline, cond_unet(in_channels=2 * LATENT_CHANNELS),
               scheduler=tiny_scheduler("euler"))


def sdxl_pix2pix_pipeline():
    from diffusers import StableDiffusionXLInstructPix2PixPipeline

    c = tiny_sdxl_components()
    sdxl = tiny_unet(sdxl=True)
    c["unet"] = cond_unet(in_channels=2 * LATENT_CHANNELS, cross_dim=2 * TEXT_HIDDEN,
                          addition_embed_type="text_time", addition_time_embed_dim=8,
                          projection_class_embeddings_input_dim=sdxl.config.projection_class_embeddings_input_dim,
                          transformer_layers_per_block=1)
    for k in ("image_encoder", "feature_extractor"):
        c.pop(k)
    return _place(StableDiffusionXLInstructPix2PixPipeline(**c))


def sdxl_pipeline(kind: str = ""):
    """SDXL txt2img ("") or img2img ("Img2Img") with tiny.py's SDXL components."""
    import diffusers

    c = tiny_sdxl_components()
    if kind:
        c["requires_aesthetics_score"] = False
    return _place(getattr(diffusers, f"StableDiffusionXL{kind}Pipeline")(**c))


def sdxl_inpaint_pipeline():
    from diffusers import StableDiffusionXLInpaintPipeline

    c = tiny_sdxl_components()
    c["unet"] = cond_unet(in_channels=9, cross_dim=2 * TEXT_HIDDEN, addition_embed_type="text_time",
                          addition_time_embed_dim=8, projection_class_embeddings_input_dim=6 * 8 + TEXT_HIDDEN,
                          transformer_layers_per_block=1)
    return _place(StableDiffusionXLInpaintPipeline(**c, requires_aesthetics_score=False))


def depth2img_pipeline():
    from diffusers import StableDiffusionDepth2ImgPipeline

    c = tiny_sd_components()
    return _place(StableDiffusionDepth2ImgPipeline(
        vae=c["vae"], text_encoder=c["text_encoder"], tokenizer=c["tokenizer"],
        unet=cond_unet(in_channels=LATENT_CHANNELS + 1), scheduler=c["scheduler"], depth_estimator=None,
        feature_extractor=None))


def x4_upscaler_pipeline():
    """[x_t (4), low-res image (3)] = 7 input channels, noise level in class_labels (num_class_embeds)."""
    from diffusers import DDPMScheduler, StableDiffusionUpscalePipeline

    c = tiny_sd_components()
    return _place(StableDiffusionUpscalePipeline(
        vae=c["vae"], text_encoder=c["text_encoder"], tokenizer=c["tokenizer"],
        unet=cond_unet(in_channels=LATENT_CHANNELS + 3, num_class_embeds=1000),
        low_res_scheduler=DDPMScheduler(), scheduler=tiny_scheduler("ddim"), max_noise_level=350))


def controlnet_model(unet, seed: int = 5):
    from diffusers import ControlNetModel

    with _seeded(seed):
        cn = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 8, 8, 8)).eval()
        # from_unet copies the UNet's encoder and zero-inits the convs that feed the UNet (as when training
        # starts): random small weights there stand for a trained ControlNet whose residuals matter
        zero_init = [*cn.controlnet_down_blocks, cn.controlnet_mid_block, cn.controlnet_cond_embedding.conv_out]
        for conv in zero_init:
            torch.nn.init.normal_(conv.weight, std=0.1)
    return cn


def controlnet_pipeline(sdxl: bool = False, multi: bool = False, kind: str = ""):
    """SD or SDXL ControlNet pipeline (kind: "", "Img2Img" or "Inpaint": the diffusers class of that name);
    multi=True: two ControlNets (diffusers wraps them in a MultiControlNetModel)."""
    import diffusers

    cls = getattr(diffusers, f"StableDiffusion{'XL' if sdxl else ''}ControlNet{kind}Pipeline")
    c = tiny_sdxl_components() if sdxl else tiny_sd_components()
    if sdxl:
        c.pop("image_encoder"), c.pop("feature_extractor")
    if kind == "Inpaint" and sdxl:
        c["requires_aesthetics_score"] = False
    if multi:
        c["controlnet"] = [controlnet_model(c["unet"], seed=5), controlnet_model(c["unet"], seed=6)]
    else:
        c["controlnet"] = controlnet_model(c["unet"])
    return _place(cls(**c))


def gligen_pipeline():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from diffusers import StableDiffusionGLIGENPipeline
    c = tiny_sd_components()
    c.pop("image_encoder")
    return _place(StableDiffusionGLIGENPipeline(**{**c, "unet": cond_unet(attention_type="gated")}))


def pixart_pipeline(sigma: bool = False):
    from diffusers import PixArtAlphaPipeline, PixArtSigmaPipeline, PixArtTransformer2DModel

    with _seeded(0):
        transformer = PixArtTransformer2DModel(
            num_attention_heads=2, attention_head_dim=8, in_channels=LATENT_CHANNELS,
            out_channels=2 * LATENT_CHANNELS, num_layers=2, sample_size=8, patch_size=2,
            caption_channels=TEXT_HIDDEN, cross_attention_dim=16, norm_num_groups=8,
        ).eval()
    cls = PixArtSigmaPipeline if sigma else PixArtAlphaPipeline
    return _place(cls(tokenizer=None, text_encoder=None, vae=tiny_vae(1), transformer=transformer,
                      scheduler=tiny_scheduler("ddim", beta_schedule="linear", beta_start=0.0001, beta_end=0.02)))


def _if_scheduler():
    return tiny_scheduler("ddpm", beta_schedule="squaredcos_cap_v2", variance_type="learned_range")


def if_pipeline(kind: str = "", added_kv: bool = False):
    """IF stage I (kind "", "Img2Img", "Inpainting"): 3 pixel channels in, 6 out (learned variance), 8x8 images.
    added_kv: the real IF UNet's block types (text projected by encoder_hid_proj, pooled by addition_embed_type
    "text")."""
    import diffusers

    cls = getattr(diffusers, f"IF{kind}Pipeline")
    unet = added_kv_unet(3, 6, encoder_hid_dim=TEXT_HIDDEN, addition_embed_type="text",
                         addition_embed_type_num_heads=2) if added_kv else cond_unet(3, 6)
    return _place(cls(tokenizer=None, text_encoder=None, unet=unet, scheduler=_if_scheduler(),
                      safety_checker=None, feature_extractor=None, watermarker=None, requires_safety_checker=False))


def if_superresolution_pipeline(kind: str = "", added_kv: bool = False):
    """IF stage II (kind "", "Img2Img", "Inpainting"): [x_t (3), noised upscaled image (3)] in, 6 out, noise
    level in class_labels. added_kv: the real stage II UNet's block types."""
    import diffusers
    from diffusers import DDPMScheduler

    cls = getattr(diffusers, f"IF{kind}SuperResolutionPipeline")
    unet = added_kv_unet(6, 6, class_embed_type="timestep", encoder_hid_dim=TEXT_HIDDEN, addition_embed_type="text",
                         addition_embed_type_num_heads=2) if added_kv else cond_unet(6, 6, class_embed_type="timestep")
    return _place(cls(
        tokenizer=None, text_encoder=None, unet=unet, scheduler=_if_scheduler(),
        image_noising_scheduler=DDPMScheduler(beta_schedule="squaredcos_cap_v2"), safety_checker=None,
        feature_extractor=None, watermarker=None, requires_safety_checker=False))


IMAGE_EMBED = 16  # Kandinsky 2.2 image embedding size


def kandinsky22_pipeline(controlnet: bool = False, kind: str = "", added_kv: bool = False):
    """Kandinsky 2.2 decoder: a UNet with image-embedding conditioning (image_proj + addition_embed_type
    "image", or "image_hint" with a 64x64 hint for the ControlNet variant), learned variance (4 -> 8 channels),
    a 2-level VQ movq (16x16 images, 8x8 latents). added_kv: the real decoder UNet's block types (the image
    embedding projected to 32 tokens, the added-KV attention's "text" keys)."""
    import diffusers
    from diffusers import VQModel

    # image_hint: the UNet concatenates the 4-channel hint embedding to its input itself (in_channels 8);
    # inpaint: [x_t, masked image latents, mask] (9 channels)
    in_channels = 2 * LATENT_CHANNELS if controlnet else (9 if kind == "Inpaint" else LATENT_CHANNELS)
    unet = (added_kv_unet if added_kv else cond_unet)(in_channels, 2 * LATENT_CHANNELS,
                     encoder_hid_dim=IMAGE_EMBED,
                     encoder_hid_dim_type="image_proj", addition_embed_type="image_hint" if controlnet else "image",
                     resnet_time_scale_shift="scale_shift")
    with _seeded(4):
        movq = VQModel(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                       up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                       latent_channels=LATENT_CHANNELS, norm_num_groups=8, num_vq_embeddings=16,
                       vq_embed_dim=LATENT_CHANNELS).eval()
    sched = tiny_scheduler("ddpm", beta_schedule="linear", beta_start=0.00085, beta_end=0.012,
                           variance_type="learned_range")
    cls = getattr(diffusers, f"KandinskyV22{'Controlnet' if controlnet else ''}{kind}Pipeline")
    return _place(cls(unet=unet, scheduler=sched, movq=movq))


def embeds(batch: int, seed: int) -> torch.Tensor:
    """Prompt embeddings for the T5-based pipelines (IF, PixArt)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, EMBED_LEN, TEXT_HIDDEN, generator=g)


# ------------------------------------------------------------------------------------------ refused ones
def pag_pipeline(sdxl: bool = False):
    from diffusers import StableDiffusionPAGPipeline, StableDiffusionXLPAGPipeline

    if sdxl:
        return _place(StableDiffusionXLPAGPipeline(**tiny_sdxl_components(), pag_applied_layers="mid"))
    return _place(StableDiffusionPAGPipeline(**tiny_sd_components(), pag_applied_layers="mid"))


def animatediff_pipeline(cls=None):
    from diffusers import AnimateDiffPipeline, MotionAdapter

    cls = AnimateDiffPipeline if cls is None else cls
    c = tiny_sd_components()
    with _seeded(3):
        adapter = MotionAdapter(block_out_channels=(16, 32), motion_layers_per_block=1, motion_norm_num_groups=8,
                                motion_num_attention_heads=2, motion_max_seq_length=8)
    return _place(cls(vae=c["vae"], text_encoder=c["text_encoder"], tokenizer=c["tokenizer"],
                                      unet=c["unet"], motion_adapter=adapter, scheduler=c["scheduler"]))


def flux_pipeline():
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    with _seeded(0):
        transformer = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                             attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32,
                                             pooled_projection_dim=32, axes_dims_rope=(2, 2, 4))
    return FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=tiny_vae(1), text_encoder=None,
                        tokenizer=None, text_encoder_2=None, tokenizer_2=None, transformer=transformer)


def latent_upscaler_pipeline():
    from diffusers import EulerDiscreteScheduler, StableDiffusionLatentUpscalePipeline

    c = tiny_sd_components()
    return StableDiffusionLatentUpscalePipeline(vae=c["vae"], text_encoder=c["text_encoder"],
                                                tokenizer=c["tokenizer"], unet=cond_unet(8, 5),
                                                scheduler=EulerDiscreteScheduler())


def gligen_text_image_pipeline():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from diffusers import StableDiffusionGLIGENTextImagePipeline
    c = tiny_sd_components()
    return StableDiffusionGLIGENTextImagePipeline(
        vae=c["vae"], text_encoder=c["text_encoder"], tokenizer=c["tokenizer"], processor=None, image_encoder=None,
        image_project=None, unet=cond_unet(attention_type="gated-text-image"), scheduler=c["scheduler"],
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def text_tokenizer():
    return tiny_tokenizer()


def text_encoder():
    return tiny_text_encoder(2)


# ------------------------------------------------- Chroma, Lumina 2, CogView4, AuraFlow, HunyuanDiT, Kandinsky 3, LCM
# No text encoders (T5, Gemma 2, GLM, BERT): their tests pass prompt embeddings (and masks). Each calls
# height=width=64 -> 8x8 latents (16 image tokens under 2x2 patches), TEXT_HIDDEN-wide embeddings.
def _flow(**config):
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(**config)


def chroma_pipeline(cls=None):
    from diffusers import ChromaTransformer2DModel
    if cls is None:
        from diffusers import ChromaPipeline as cls

    with _seeded(0):
        transformer = ChromaTransformer2DModel(
            patch_size=1, in_channels=64, num_layers=3, num_single_layers=2, attention_head_dim=8,
            num_attention_heads=2, joint_attention_dim=TEXT_HIDDEN, axes_dims_rope=(2, 2, 4),
            approximator_num_channels=8, approximator_hidden_dim=16, approximator_layers=1).eval()
    return _place(cls(scheduler=_flow(), vae=tiny_vae(1, latent_channels=16, shift_factor=0.1159, scaling_factor=0.3611),
                      text_encoder=None, tokenizer=None,
                      transformer=transformer))


def lumina2_pipeline():
    from diffusers import Lumina2Pipeline, Lumina2Transformer2DModel

    with _seeded(0):
        transformer = Lumina2Transformer2DModel(
            sample_size=8, patch_size=2, in_channels=4, hidden_size=32, num_layers=3, num_refiner_layers=1,
            num_attention_heads=4, num_kv_heads=2, multiple_of=16, axes_dim_rope=(4, 2, 2), axes_lens=(64, 16, 16),
            cap_feat_dim=TEXT_HIDDEN).eval()
    return _place(Lumina2Pipeline(transformer=transformer, scheduler=_flow(), vae=tiny_vae(1), text_encoder=None,
                                  tokenizer=None))


def cogview4_pipeline():
    from diffusers import CogView4Pipeline, CogView4Transformer2DModel

    with _seeded(0):
        transformer = CogView4Transformer2DModel(
            patch_size=2, in_channels=4, out_channels=4, num_layers=3, attention_head_dim=8, num_attention_heads=2,
            text_embed_dim=TEXT_HIDDEN, time_embed_dim=16, condition_dim=8, pos_embed_max_size=16, sample_size=8,
            rope_axes_dim=(4, 4)).eval()
    return _place(CogView4Pipeline(tokenizer=None, text_encoder=None, vae=tiny_vae(1), transformer=transformer,
                                   scheduler=_flow(base_shift=0.25, max_shift=0.75, base_image_seq_len=256,
                                                   use_dynamic_shifting=True, time_shift_type="linear")))


def auraflow_pipeline():
    from diffusers import AuraFlowPipeline, AuraFlowTransformer2DModel

    with _seeded(0):
        transformer = AuraFlowTransformer2DModel(
            sample_size=8, patch_size=2, in_channels=4, num_mmdit_layers=1, num_single_dit_layers=3,
            attention_head_dim=8, num_attention_heads=2, joint_attention_dim=TEXT_HIDDEN, caption_projection_dim=16,
            out_channels=4, pos_embed_max_size=16).eval()
    return _place(AuraFlowPipeline(tokenizer=None, text_encoder=None, vae=tiny_vae(1), transformer=transformer,
                                   scheduler=_flow()))


def hunyuandit_pipeline():
    from diffusers import DDPMScheduler, HunyuanDiT2DModel, HunyuanDiTPipeline

    with _seeded(0):
        transformer = HunyuanDiT2DModel(
            num_attention_heads=2, attention_head_dim=8, in_channels=4, patch_size=2, sample_size=8, hidden_size=16,
            num_layers=4, cross_attention_dim=TEXT_HIDDEN, cross_attention_dim_t5=TEXT_HIDDEN,
            pooled_projection_dim=16, text_len=EMBED_LEN, text_len_t5=EMBED_LEN).eval()
    return _place(HunyuanDiTPipeline(
        vae=tiny_vae(1), text_encoder=None, tokenizer=None, transformer=transformer,
        scheduler=DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.03),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False))


def kandinsky3_pipeline(cls=None):
    from diffusers import DDPMScheduler, Kandinsky3UNet, VQModel
    if cls is None:
        from diffusers import Kandinsky3Pipeline as cls

    with _seeded(0):
        unet = Kandinsky3UNet(in_channels=4, time_embedding_dim=8, groups=4, attention_head_dim=8,
                              layers_per_block=2, block_out_channels=(16, 32), cross_attention_dim=16,
                              encoder_hid_dim=TEXT_HIDDEN).eval()
        movq = VQModel(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8, 8, 8),
                       down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                       layers_per_block=1, norm_num_groups=4, num_vq_embeddings=16, vq_embed_dim=4).eval()
    return _place(cls(tokenizer=None, text_encoder=None, unet=unet, movq=movq, scheduler=DDPMScheduler(
        beta_schedule="linear", beta_start=0.00085, beta_end=0.012, clip_sample=False, thresholding=False)))


def lcm_pipeline(cls=None):
    from diffusers import LCMScheduler
    if cls is None:
        from diffusers import LatentConsistencyModelPipeline as cls

    c = tiny_sd_components()
    return _place(cls(vae=c["vae"], text_encoder=c["text_encoder"], tokenizer=c["tokenizer"],
                      unet=cond_unet(time_cond_proj_dim=8), scheduler=LCMScheduler(
                          beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
                      safety_checker=None, feature_extractor=None, requires_safety_checker=False))
