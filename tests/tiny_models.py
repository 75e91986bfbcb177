"""Tiny random diffusers denoisers shared by the capture, guidance and sampler tests (a few thousand weights)."""
from diffusers import UNet2DConditionModel, UNet2DModel


def tiny_unet(out_channels: int = 3) -> UNet2DModel:
    """Unconditional UNet with self-attention in its mid block; out_channels=6 gives a learned variance."""
    return UNet2DModel(
        sample_size=8, in_channels=3, out_channels=out_channels, block_out_channels=(8, 16), layers_per_block=1,
        norm_num_groups=4, attention_head_dim=4,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    ).eval()


def tiny_unet_cond() -> UNet2DConditionModel:
    """Text-conditioned UNet (cross_attention_dim 8)."""
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16), layers_per_block=1,
        cross_attention_dim=8, attention_head_dim=4, norm_num_groups=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    ).eval()
