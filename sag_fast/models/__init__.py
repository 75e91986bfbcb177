"""Models that ship with sag_fast: the built-in unconditional diffusion model (a diffusers folder, builtin/)
trained on seeded shapes (shapes.py, scripts/train_builtin.py), its class-conditional fine-tune (builtin_cond/:
unet/, scheduler/ and labels.json; the class is the largest object's shape, the last class index is the null class
for classifier-free guidance), and the quality benchmark's feature network."""
from __future__ import annotations

import os

BUILTIN_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "builtin")
BUILTIN_COND_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "builtin_cond")


def builtin_pipeline(cls=None, device=None, dtype=None):
    """The built-in model as a diffusers pipeline (DDPMPipeline by default; DDIMPipeline works too), loaded offline
    from the package. The weights are stored in fp16 to keep the package small; they load as `dtype`
    (default float32)."""
    import torch
    from diffusers import DDPMPipeline

    cls = DDPMPipeline if cls is None else cls
    if not os.path.isfile(os.path.join(BUILTIN_DIR, "model_index.json")):
        raise FileNotFoundError(f"the built-in model is missing from {BUILTIN_DIR} (scripts/train_builtin.py writes it)")
    pipe = cls.from_pretrained(BUILTIN_DIR, dtype=dtype or torch.float32, local_files_only=True)
    if device is not None:
        pipe = pipe.to(device)
    return pipe


def builtin_cond(device=None, dtype=None):
    """(unet, DDIM scheduler, labels) of the class-conditional built-in model, loaded offline from the package.
    labels: {"classes": [names], "null_class": index} -- pass class_labels=<index> to the unet; the null class is
    the unconditional way of classifier-free guidance (SAGSampler(..., guidance_scale=g) with
    cond={"class_labels": y}, uncond={"class_labels": null})."""
    import json

    import torch
    from diffusers import DDIMScheduler, UNet2DModel

    if not os.path.isfile(os.path.join(BUILTIN_COND_DIR, "labels.json")):
        raise FileNotFoundError(f"the class-conditional built-in model is missing from {BUILTIN_COND_DIR} "
                                "(scripts/train_builtin.py --classes 5 writes it)")
    unet = UNet2DModel.from_pretrained(BUILTIN_COND_DIR, subfolder="unet", dtype=dtype or torch.float32,
                                       local_files_only=True).eval()
    if device is not None:
        unet = unet.to(device)
    scheduler = DDIMScheduler.from_pretrained(BUILTIN_COND_DIR, subfolder="scheduler", local_files_only=True)
    with open(os.path.join(BUILTIN_COND_DIR, "labels.json")) as f:
        labels = json.load(f)
    return unet, scheduler, labels
