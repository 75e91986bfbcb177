"""Tiny diffusers pipelines with random weights: for tests, the CLI's default model and quick demos.

Everything is built from small configs under a fixed seed, never downloaded: a byte-level CLIP
tokenizer from an in-memory vocabulary, CLIP text encoders, a 4-level AutoencoderKL (8x down, so a
64x64 image has 8x8 latents), UNet2DConditionModel (SD1/SD2/SDXL flavours), DiT and UNet2DModel.
The images are noise-like; what matters is that every code path of a real pipeline runs, fast
(a 64x64 SD image in 10 steps takes well under a second on a CPU) and bit-for-bit reproducibly.

Conventions the deprecated diffusers SAG pipeline relies on are kept: UNet2DConditionModel's
`attention_head_dim` is an int and is the number of heads of every attention layer (diffusers' legacy
naming), and the SAG layer `mid_block.attentions[0].transformer_blocks[0].attn1` exists.
"""
from __future__ import annotations

import contextlib
import functools
from typing import Any

import torch

from .schedulers import SCHEDULERS, make_scheduler

# sizes shared by the tiny models
TEXT_HIDDEN = 32
TEXT_MAX_LENGTH = 77
LATENT_CHANNELS = 4


@contextlib.contextmanager
def _seeded(seed: int):
    """Run model construction under a fixed CPU seed without disturbing the caller's RNG state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte-level alphabet: printable bytes map to themselves, the others to code points 256+."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


@functools.lru_cache(maxsize=1)
def _vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A few hundred tokens: every byte symbol alone and word-final (needed so that any text encodes),
    merges of frequent English letter pairs, and CLIP's two special tokens last (as in real CLIP)."""
    symbols = list(_bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols]
    merges: list[tuple[str, str]] = []
    frequent = "etaoinshrdl"
    for a in frequent:
        for b in frequent:
            merges.append((a, b + "</w>"))
    for a in "etaoin":
        for b in "etaoin":
            merges.append((a, b))
    for a, b in merges:
        tokens.append(a + b)
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(tokens))}
    return vocab, merges


def tiny_tokenizer():
    """A CLIPTokenizer over the tiny vocabulary; pads/truncates to TEXT_MAX_LENGTH tokens."""
    from transformers import CLIPTokenizer

    vocab, merges = _vocab_and_merges()
    return CLIPTokenizer(vocab=dict(vocab), merges=list(merges), model_max_length=TEXT_MAX_LENGTH)


def _text_config(projection_dim: int = TEXT_HIDDEN):
    from transformers import CLIPTextConfig

    vocab, _ = _vocab_and_merges()
    eos = vocab["<|endoftext|>"]
    return CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=TEXT_HIDDEN, intermediate_size=37, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=TEXT_MAX_LENGTH, projection_dim=projection_dim,
        hidden_act="quick_gelu", bos_token_id=vocab["<|startoftext|>"], eos_token_id=eos, pad_token_id=eos,
    )


def tiny_text_encoder(seed: int = 0, with_projection: bool = False):
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    with _seeded(seed):
        cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
        return cls(_text_config()).eval()


def tiny_vae(seed: int = 0, latent_channels: int = LATENT_CHANNELS, **config):
    """AutoencoderKL with 4 levels (vae_scale_factor 8) and 8-16 channels; config: e.g. SD3's shift_factor."""
    from diffusers import AutoencoderKL

    with _seeded(seed):
        return AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=latent_channels,
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(8, 8, 16, 16), layers_per_block=1, norm_num_groups=8, sample_size=64, **config,
        ).eval()


def tiny_unet(seed: int = 0, sdxl: bool = False, use_linear_projection: bool = False, sample_size: int = 8):
    """UNet2DConditionModel: 2 levels (16, 32 channels), attention at the second level and in the mid
    block (a 4x4 grid for 8x8 latents). attention_head_dim=2 is the number of heads (diffusers' naming)."""
    from diffusers import UNet2DConditionModel

    kwargs: dict[str, Any] = {}
    cross_dim = TEXT_HIDDEN
    if sdxl:
        time_embed = 8
        cross_dim = 2 * TEXT_HIDDEN  # SDXL concatenates the hidden states of both text encoders
        kwargs.update(addition_embed_type="text_time", addition_time_embed_dim=time_embed,
                      # 6 micro-conditioning numbers (original size, crop, target size) + the pooled text
                      projection_class_embeddings_input_dim=6 * time_embed + TEXT_HIDDEN,
                      transformer_layers_per_block=1)
    with _seeded(seed):
        return UNet2DConditionModel(
            sample_size=sample_size, in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8,
            cross_attention_dim=cross_dim, attention_head_dim=2, use_linear_projection=use_linear_projection,
            **kwargs,
        ).eval()


def tiny_scheduler(name: str = "ddim", prediction_type: str = "epsilon", **overrides):
    """A scheduler with Stable Diffusion's training schedule (scaled_linear betas 0.00085..0.012)."""
    # SD's scheduler settings; each class takes the ones it has
    sd = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
              steps_offset=1, clip_sample=False, set_alpha_to_one=False, skip_prk_steps=True)
    return make_scheduler(name, defaults=sd, prediction_type=prediction_type, **overrides)


def _place(pipe, device, dtype):
    if device is not None or dtype is not None:
        pipe.to(device=device, dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_sd_components(prediction_type: str = "epsilon", scheduler: str = "ddim", seed: int = 0) -> dict:
    """Components of a tiny SD1 (epsilon) or SD2-like (v_prediction, linear projections) pipeline, usable
    as `StableDiffusionPipeline(**c)` and by diffusers' deprecated `StableDiffusionSAGPipeline(**c)`."""
    return dict(
        vae=tiny_vae(seed + 1),
        text_encoder=tiny_text_encoder(seed + 2),
        tokenizer=tiny_tokenizer(),
        unet=tiny_unet(seed, use_linear_projection=prediction_type == "v_prediction"),
        scheduler=tiny_scheduler(scheduler, prediction_type),
        safety_checker=None,
        feature_extractor=None,
        image_encoder=None,
        requires_safety_checker=False,
    )


def tiny_sd_pipeline(cls=None, prediction_type: str = "epsilon", scheduler: str = "ddim", seed: int = 0,
                     device=None, dtype=None):
    """A tiny Stable Diffusion pipeline of class `cls` (default StableDiffusionPipeline; any class taking SD's
    components works: img2img, diffusers' deprecated SAG pipeline, sag_fast's). 64x64 images, 8x8 latents."""
    if cls is None:
        from diffusers import StableDiffusionPipeline as cls
    return _place(cls(**tiny_sd_components(prediction_type, scheduler, seed)), device, dtype)


def tiny_sdxl_components(prediction_type: str = "epsilon", scheduler: str = "euler", seed: int = 0) -> dict:
    return dict(
        vae=tiny_vae(seed + 1),
        text_encoder=tiny_text_encoder(seed + 2),
        text_encoder_2=tiny_text_encoder(seed + 3, with_projection=True),
        tokenizer=tiny_tokenizer(),
        tokenizer_2=tiny_tokenizer(),
        unet=tiny_unet(seed, sdxl=True),
        scheduler=tiny_scheduler(scheduler, prediction_type),
        image_encoder=None,
        feature_extractor=None,
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )


def tiny_sdxl_pipeline(cls=None, prediction_type: str = "epsilon", scheduler: str = "euler", seed: int = 0,
                       device=None, dtype=None):
    """A tiny SDXL pipeline (two text encoders, text_time micro-conditioning). 64x64 images, 8x8 latents."""
    if cls is None:
        from diffusers import StableDiffusionXLPipeline as cls
    return _place(cls(**tiny_sdxl_components(prediction_type, scheduler, seed)), device, dtype)


TINY_LABELS = {0: "tench, Tinca tinca", 1: "goldfish", 2: "white shark", 3: "umbrella"}


def tiny_dit_pipeline(scheduler: str = "ddim", seed: int = 0, learned_sigma: bool = True, device=None, dtype=None):
    """A tiny DiTPipeline: 8x8 latents, patch 2 (a 4x4 token grid), 1000 classes + the null class,
    learned sigma (8 output channels for 4 latent channels) unless learned_sigma=False."""
    from diffusers import DiTPipeline, DiTTransformer2DModel

    with _seeded(seed):
        transformer = DiTTransformer2DModel(
            num_attention_heads=2, attention_head_dim=8, in_channels=LATENT_CHANNELS,
            out_channels=2 * LATENT_CHANNELS if learned_sigma else LATENT_CHANNELS, num_layers=3,
            sample_size=8, patch_size=2, num_embeds_ada_norm=1000,
        ).eval()
    sched = tiny_scheduler(scheduler, "epsilon", beta_schedule="linear", beta_start=0.0001, beta_end=0.02)
    pipe = DiTPipeline(transformer=transformer, vae=tiny_vae(seed + 1), scheduler=sched, id2label=TINY_LABELS)
    return _place(pipe, device, dtype)


def tiny_unet2d(seed: int = 0, learned_variance: bool = False, sample_size: int = 16):
    """UNet2DModel on 3-channel pixels: 2 levels, attention at the second level and in the mid block (8x8)."""
    from diffusers import UNet2DModel

    with _seeded(seed):
        return UNet2DModel(
            sample_size=sample_size, in_channels=3, out_channels=6 if learned_variance else 3,
            down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
            block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8, attention_head_dim=8,
        ).eval()


def tiny_unet2d_pipeline(cls=None, scheduler: str | None = None, seed: int = 0, learned_variance: bool = False,
                         device=None, dtype=None):
    """A tiny unconditional pixel-space pipeline (the paper's ADM setting): DDPMPipeline (default) or
    DDIMPipeline with a UNet2DModel on 16x16 images. learned_variance=True (DDPM only) makes the model
    output 6 channels and the scheduler use variance_type="learned_range"."""
    from diffusers import DDIMPipeline, DDPMPipeline

    cls = DDPMPipeline if cls is None else cls
    if scheduler is None:
        scheduler = "ddim" if cls is DDIMPipeline else "ddpm"
    overrides: dict[str, Any] = dict(beta_schedule="linear", beta_start=0.0001, beta_end=0.02)
    if learned_variance:
        if scheduler != "ddpm":
            raise ValueError(f"learned_variance=True needs scheduler='ddpm', got scheduler={scheduler!r}")
        overrides["variance_type"] = "learned_range"
    sched = tiny_scheduler(scheduler, "epsilon", **overrides)
    if scheduler == "ddim":
        # DDIMPipeline converts any scheduler to DDIM; keep the SD-style DDIM options
        sched = tiny_scheduler("ddim", "epsilon", **overrides)
    pipe = cls(unet=tiny_unet2d(seed, learned_variance), scheduler=sched)
    return _place(pipe, device, dtype)


def tiny_sd3_pipeline(cls=None, seed: int = 0, shift: float = 3.0, device=None, dtype=None):
    """A tiny SD3 pipeline: an SD3Transformer2DModel with joint attention (image and text tokens in one softmax),
    patch 2 (a 4x4 token grid for 8x8 latents), 16 latent channels, flow matching with shift; two tiny CLIP
    text encoders and no T5 (diffusers then uses zeros for the T5 tokens: pass max_sequence_length=4)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    if cls is None:
        from diffusers import StableDiffusion3Pipeline as cls

    with _seeded(seed):
        transformer = SD3Transformer2DModel(
            sample_size=8, patch_size=2, in_channels=16, out_channels=16, num_layers=3, attention_head_dim=8,
            num_attention_heads=2, joint_attention_dim=2 * TEXT_HIDDEN, caption_projection_dim=16,
            pooled_projection_dim=2 * TEXT_HIDDEN, pos_embed_max_size=16,
        ).eval()
    return _place(cls(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=shift),
        vae=tiny_vae(seed + 1, latent_channels=16, shift_factor=0.0609, scaling_factor=1.5305),
        text_encoder=tiny_text_encoder(seed + 2, with_projection=True), tokenizer=tiny_tokenizer(),
        text_encoder_2=tiny_text_encoder(seed + 3, with_projection=True), tokenizer_2=tiny_tokenizer(),
        text_encoder_3=None, tokenizer_3=None,
    ), device, dtype)


def tiny_t5_encoder(seed: int = 0):
    """A T5 encoder over the tiny byte-level vocabulary (Flux's second text encoder; its tokenizer is the tiny
    CLIP one: any tokenizer producing ids below the vocabulary size serves)."""
    from transformers import T5Config, T5EncoderModel

    vocab, _ = _vocab_and_merges()
    with _seeded(seed):
        return T5EncoderModel(T5Config(vocab_size=len(vocab), d_model=TEXT_HIDDEN, d_kv=8, d_ff=37, num_layers=2,
                                       num_heads=4, pad_token_id=vocab["<|endoftext|>"])).eval()


def tiny_umt5_encoder(seed: int = 0):
    """A UMT5 encoder (Wan's text encoder class) over the tiny byte-level vocabulary."""
    from transformers import UMT5Config, UMT5EncoderModel

    vocab, _ = _vocab_and_merges()
    with _seeded(seed):
        return UMT5EncoderModel(UMT5Config(vocab_size=len(vocab), d_model=TEXT_HIDDEN, d_kv=8, d_ff=37, num_layers=2,
                                           num_heads=4, pad_token_id=vocab["<|endoftext|>"])).eval()


def tiny_flux_pipeline(cls=None, seed: int = 0, guidance_embeds: bool = True, text_encoders: bool = False,
                       device=None, dtype=None, in_channels: int = 64):
    """A tiny Flux.1 pipeline: FluxTransformer2DModel (3 double-stream + 2 single-stream blocks, rotary
    embeddings, 16 latent channels packed 2x2 into 64), flow matching with dynamic shifting, a 16-channel VAE.
    Without text_encoders: call it with prompt_embeds (B, T, 32) and pooled_prompt_embeds (B, 32); with them
    (a tiny CLIP and a tiny T5), with prompts (and max_sequence_length <= 77). height=width=64: 8x8 latents,
    16 image tokens. in_channels: 64 + the packed conditioning channels (FluxFillPipeline: 384, FluxControlPipeline:
    128); the output stays 64."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    if cls is None:
        from diffusers import FluxPipeline as cls

    with _seeded(seed):
        transformer = FluxTransformer2DModel(
            patch_size=1, in_channels=in_channels, out_channels=64, num_layers=3, num_single_layers=2, attention_head_dim=8,
            num_attention_heads=2, joint_attention_dim=TEXT_HIDDEN, pooled_projection_dim=TEXT_HIDDEN,
            guidance_embeds=guidance_embeds, axes_dims_rope=(2, 2, 4),
        ).eval()
    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_image_seq_len=16,
                                                max_image_seq_len=256, base_shift=0.5, max_shift=1.15)
    return _place(cls(
        transformer=transformer, scheduler=scheduler,
        vae=tiny_vae(seed + 1, latent_channels=16, shift_factor=0.1159, scaling_factor=0.3611),
        text_encoder=tiny_text_encoder(seed + 2) if text_encoders else None,
        tokenizer=tiny_tokenizer() if text_encoders else None,
        text_encoder_2=tiny_t5_encoder(seed + 3) if text_encoders else None,
        tokenizer_2=tiny_tokenizer() if text_encoders else None,
    ), device, dtype)


def tiny_wan_pipeline(seed: int = 0, two_experts: bool = False, text_encoders: bool = False, device=None,
                      dtype=None):
    """A tiny Wan text-to-video pipeline: WanTransformer3DModel (3 blocks, patch (1, 2, 2), 4 latent channels,
    rotary embeddings, self-attention over the video tokens and cross-attention to the text), flow matching with
    UniPC, no VAE and no text encoder: call it with prompt_embeds (B, T, 32), negative_prompt_embeds and
    output_type="latent". height=width=64, num_frames=5: (2, 8, 8) latents, a (2, 4, 4) grid of 32 tokens.
    two_experts: Wan 2.2's layout, a second transformer for the low-noise steps (boundary_ratio 0.7).
    text_encoders: a tiny UMT5 encoder and tokenizer and a tiny AutoencoderKLWan, for prompts and decoded videos."""
    from diffusers import UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel

    def transformer(offset):
        with _seeded(seed + offset):
            return WanTransformer3DModel(
                patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=LATENT_CHANNELS,
                out_channels=LATENT_CHANNELS, text_dim=TEXT_HIDDEN, freq_dim=16, ffn_dim=32, num_layers=3,
                cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=32,
            ).eval()

    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    extra = dict(transformer_2=transformer(10), boundary_ratio=0.7) if two_experts else {}
    if text_encoders:
        extra.update(tokenizer=tiny_tokenizer(), text_encoder=tiny_umt5_encoder(seed + 2), vae=tiny_wan_vae(seed + 1))
    return _place(WanPipeline(**{"tokenizer": None, "text_encoder": None, "vae": None, **extra},
                              transformer=transformer(0), scheduler=scheduler), device, dtype)


def tiny_wan_vae(seed: int = 0, z_dim: int = LATENT_CHANNELS):
    """AutoencoderKLWan: 8x spatial and 4x temporal compression (5 frames -> 2 latent frames), a few channels."""
    from diffusers import AutoencoderKLWan

    with _seeded(seed):
        return AutoencoderKLWan(base_dim=4, z_dim=z_dim, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                                temperal_downsample=[False, True, True], latents_mean=[0.0] * z_dim,
                                latents_std=[1.0] * z_dim).eval()


def tiny_clip_vision(seed: int = 0, hidden: int = 8):
    """A CLIPVisionModel on 32x32 images (patch 8: 16 tokens + class) and its CLIPImageProcessor."""
    from transformers import CLIPVisionConfig, CLIPVisionModel
    try:  # the PIL processor: CLIPImageProcessor's default backend needs torchvision
        from transformers import CLIPImageProcessorPil as CLIPImageProcessor
    except ImportError:
        from transformers import CLIPImageProcessor

    with _seeded(seed):
        model = CLIPVisionModel(CLIPVisionConfig(
            hidden_size=hidden, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2, image_size=32,
            patch_size=8, projection_dim=hidden)).eval()
    return model, CLIPImageProcessor(crop_size=32, size=32)


def tiny_wan_i2v_pipeline(seed: int = 0, image_embeds: bool = True, two_experts: bool = False, device=None,
                          dtype=None):
    """A tiny Wan image-to-video pipeline. The transformer's input is [x_t (4 ch), mask (4 ch: the VAE's temporal
    factor), image latent (4 ch)] = 12 channels, its output 4 (the latent). image_embeds=True: Wan 2.1 I2V (a tiny
    CLIP vision encoder, image tokens in the cross-attention's added K/V); False: Wan 2.2 I2V A14B's layout (no image
    encoder; two_experts adds `transformer_2`). No text encoder: call it with prompt_embeds (B, T, 32),
    negative_prompt_embeds, an image, height=width=64, num_frames=5: (2, 8, 8) latents, a (2, 4, 4) token grid."""
    from diffusers import UniPCMultistepScheduler, WanImageToVideoPipeline, WanTransformer3DModel

    vision, processor = tiny_clip_vision(seed + 2) if image_embeds else (None, None)

    def transformer(offset):
        with _seeded(seed + offset):
            return WanTransformer3DModel(
                patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=3 * LATENT_CHANNELS,
                out_channels=LATENT_CHANNELS, text_dim=TEXT_HIDDEN, freq_dim=16, ffn_dim=32, num_layers=3,
                cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=32,
                image_dim=vision.config.hidden_size if vision is not None else None,
                added_kv_proj_dim=16 if vision is not None else None,
            ).eval()

    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    extra = dict(transformer_2=transformer(10), boundary_ratio=0.7) if two_experts else {}
    return _place(WanImageToVideoPipeline(
        tokenizer=None, text_encoder=None, vae=tiny_wan_vae(seed + 1), scheduler=scheduler,
        image_processor=processor, image_encoder=vision, transformer=transformer(0), **extra), device, dtype)


def tiny_hunyuan_video_pipeline(seed: int = 0, device=None, dtype=None):
    """A tiny HunyuanVideo text-to-video pipeline: HunyuanVideoTransformer3DModel (3 double-stream blocks, joint
    attention with the video tokens first and the text tokens after, a key mask over the text padding; 1
    single-stream block; patch 2, patch_size_t 1; guidance embedding), flow matching, no VAE and no text encoders:
    call it with prompt_embeds (B, T, 32), prompt_attention_mask (B, T), pooled_prompt_embeds (B, 8) (and the
    negative ones with true_cfg_scale > 1) and output_type="latent". height=width=64, num_frames=5: (2, 8, 8)
    latents, a (2, 4, 4) grid of 32 video tokens."""
    from diffusers import FlowMatchEulerDiscreteScheduler, HunyuanVideoPipeline, HunyuanVideoTransformer3DModel

    with _seeded(seed):
        transformer = HunyuanVideoTransformer3DModel(
            in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS, num_attention_heads=2, attention_head_dim=8,
            num_layers=3, num_single_layers=1, num_refiner_layers=1, mlp_ratio=2.0, patch_size=2, patch_size_t=1,
            qk_norm="rms_norm", guidance_embeds=True, text_embed_dim=TEXT_HIDDEN, pooled_projection_dim=8,
            rope_axes_dim=(2, 2, 4)).eval()
    return _place(HunyuanVideoPipeline(text_encoder=None, tokenizer=None, transformer=transformer, vae=None,
                                       scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0), text_encoder_2=None,
                                       tokenizer_2=None), device, dtype)


@functools.lru_cache(maxsize=1)
def _qwen_vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """The tiny byte-level alphabet without CLIP's word-end marks (Qwen2's BPE has none), merges of frequent
    letter pairs, and Qwen's chat-template special tokens."""
    symbols = list(_bytes_to_unicode().values())
    merges = [(a, b) for a in "etaoinshrd" for b in "etaoinshrd"]
    tokens = symbols + [a + b for a, b in merges] + ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    return {tok: i for i, tok in enumerate(dict.fromkeys(tokens))}, merges


def tiny_qwen_tokenizer():
    """A Qwen2Tokenizer (byte-level BPE) over the tiny vocabulary, with <|im_start|>/<|im_end|> as special tokens:
    QwenImage's prompt template encodes with them, as the real tokenizer does."""
    from transformers import Qwen2Tokenizer

    vocab, merges = _qwen_vocab_and_merges()
    return Qwen2Tokenizer(vocab=dict(vocab), merges=list(merges),
                          additional_special_tokens=["<|im_start|>", "<|im_end|>"])


def tiny_qwen_text_encoder(seed: int = 0):
    """Qwen2_5_VLForConditionalGeneration from a tiny config (2 text layers of width 32, a 1-layer vision tower
    the text-only prompts never run): QwenImage takes the last hidden states of its text model."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    vocab, _ = _qwen_vocab_and_merges()
    n = len(vocab)
    config = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=n + 4, hidden_size=TEXT_HIDDEN, intermediate_size=37, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=2048,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 2, 4]},
                         bos_token_id=vocab["<|im_start|>"], eos_token_id=vocab["<|im_end|>"],
                         pad_token_id=vocab["<|endoftext|>"]),
        vision_config=dict(depth=1, hidden_size=16, intermediate_size=16, num_heads=2, out_hidden_size=TEXT_HIDDEN),
        image_token_id=n, video_token_id=n + 1, vision_start_token_id=n + 2, vision_end_token_id=n + 3,
    )
    with _seeded(seed):
        return Qwen2_5_VLForConditionalGeneration(config).eval()


def tiny_qwenimage_transformer(seed: int = 0):
    """QwenImageTransformer2DModel: 3 double-stream blocks (joint attention [text, image], rotary embeddings,
    text padding masked out of the softmax), 16 latent channels packed 2x2 into 64, text width 32."""
    from diffusers import QwenImageTransformer2DModel

    with _seeded(seed):
        return QwenImageTransformer2DModel(
            patch_size=2, in_channels=64, out_channels=16, num_layers=3, attention_head_dim=8, num_attention_heads=2,
            joint_attention_dim=TEXT_HIDDEN, axes_dims_rope=(2, 2, 4)).eval()


def tiny_qwenimage_pipeline(cls=None, seed: int = 0, text_encoder: bool = False, device=None, dtype=None):
    """A tiny QwenImage pipeline (`cls`: QwenImagePipeline by default, or its img2img / inpaint classes): the
    transformer above, a 16-channel AutoencoderKLQwenImage with 4x spatial compression (vae_scale_factor 4),
    flow matching with dynamic shifting. height=width=32: 8x8 latents, 16 image tokens. Without text_encoder:
    call it with prompt_embeds (B, T, 32) and prompt_embeds_mask (B, T); with it (tiny Qwen2.5-VL and
    tokenizer), with prompts."""
    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler
    if cls is None:
        from diffusers import QwenImagePipeline as cls

    with _seeded(seed + 1):
        vae = AutoencoderKLQwenImage(base_dim=16, z_dim=16, dim_mult=[1, 2, 2], num_res_blocks=1,
                                     temperal_downsample=[False, True], latents_mean=[0.0] * 16,
                                     latents_std=[1.0] * 16).eval()
    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_image_seq_len=16,
                                                max_image_seq_len=256, base_shift=0.5, max_shift=1.15)
    return _place(cls(transformer=tiny_qwenimage_transformer(seed), scheduler=scheduler, vae=vae,
                      text_encoder=tiny_qwen_text_encoder(seed + 2) if text_encoder else None,
                      tokenizer=tiny_qwen_tokenizer() if text_encoder else None), device, dtype)
