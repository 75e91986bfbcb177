"""sag_fast.diffusers.tiny: random tiny pipelines are deterministic, offline, and shaped like the real ones."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from diffusers_checks import images
from sag_fast.diffusers.tiny import (SCHEDULERS, tiny_dit_pipeline, tiny_scheduler, tiny_sd_pipeline, tiny_tokenizer,
                                     tiny_unet2d_pipeline)


def test_sd_pipeline_is_deterministic_and_leaves_the_global_rng_alone():
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    a = tiny_sd_pipeline()
    assert torch.equal(torch.random.get_rng_state(), before)
    b = tiny_sd_pipeline()
    for (na, pa), (nb, pb) in zip(a.unet.state_dict().items(), b.unet.state_dict().items()):
        assert na == nb and torch.equal(pa, pb)
    assert not torch.equal(a.unet.conv_in.weight, tiny_sd_pipeline(seed=1).unet.conv_in.weight)
    out = images(a, "a cat", height=64, width=96)
    assert out.shape == (1, 64, 96, 3) and np.array_equal(out, images(b, "a cat", height=64, width=96))
    assert a.vae_scale_factor == 8 and a.unet.config.attention_head_dim == a.unet.mid_block.attentions[0] \
        .transformer_blocks[0].attn1.heads


def test_tokenizer_encodes_any_text():
    tok = tiny_tokenizer()
    ids = tok(["a photo of an astronaut", "ünïcödé ☃ 123!"], padding="max_length", truncation=True).input_ids
    assert all(len(row) == tok.model_max_length for row in ids)
    assert ids[0][0] == tok.bos_token_id and tok.eos_token_id in ids[1]
    assert tok.unk_token_id not in ids[1][1:ids[1].index(tok.eos_token_id)]


def test_other_pipelines_shapes():
    dit = tiny_dit_pipeline()
    assert dit.transformer.config.out_channels == 2 * dit.transformer.config.in_channels
    assert dit.get_label_ids(["goldfish"]) == [1]
    assert images(dit, [0], num_inference_steps=1).shape == (1, 64, 64, 3)
    assert images(tiny_unet2d_pipeline(), batch_size=1, num_inference_steps=1).shape == (1, 16, 16, 3)


def test_scheduler_names():
    for name in SCHEDULERS:
        assert tiny_scheduler(name, "v_prediction").config.prediction_type == "v_prediction"
    with pytest.raises(ValueError, match="scheduler='nope'"):
        tiny_scheduler("nope")
    with pytest.raises(ValueError, match="learned_variance"):
        tiny_unet2d_pipeline(scheduler="ddim", learned_variance=True)
