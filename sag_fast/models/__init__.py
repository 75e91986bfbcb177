"""Models that ship with sag_fast: the built-in unconditional diffusion model (a diffusers folder, builtin/)
trained on seeded shapes (shapes.py, scripts/train_builtin.py), and the quality benchmark's feature network."""
from __future__ import annotations

import os

BUILTIN_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "builtin")


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
