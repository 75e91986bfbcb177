"""Trains the built-in model (sag_fast/models/builtin): an unconditional DDPM UNet2DModel on seeded shapes, on CPU.

Seeded and resumable: the batch, noise and timesteps of step k are functions of k alone (shapes.batch_for_step and
a generator seeded with SEED + k), so a run resumed from the checkpoint of step k continues exactly as an
uninterrupted one would. Checkpoints every --ckpt-every seconds to --work (model, EMA, optimizer, step); the loss
of every step goes to <work>/loss.csv. At the end the EMA weights are written as a diffusers model folder to --out.
Never run by `make test` or CI.

The shipped weights (sag_fast/models/builtin) are the EMA at step 2009 of this command's 2800-step schedule, cut
there for time (one hour of a shared 2-core CPU; steps 0-383 ran under a 4500-step schedule, whose learning
rate differs from this one's by < 1% over those steps), exported with --export-only:

    python scripts/train_builtin.py --work /tmp/sag_train --out sag_fast/models/builtin
    python scripts/train_builtin.py --work /tmp/sag_train --out sag_fast/models/builtin --export-only
"""
from __future__ import annotations

import argparse
import copy
import csv
import json
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from sag_fast.models.shapes import batch_for_step  # noqa: E402

SEED = 20260101


def build_unet(width: int = 32):
    from diffusers import UNet2DModel

    # Self-attention at 16x16 and 8x8 (two resolutions, as SAG's mask is taken from a middle-block
    # or decoder attention map), one head per 32 channels.
    return UNet2DModel(
        sample_size=32, in_channels=3, out_channels=3, layers_per_block=1,
        block_out_channels=(width, 2 * width, 2 * width),
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=32, norm_num_groups=8,
    )


def build_scheduler():
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="epsilon",
                         clip_sample=True)


def lr_at(step: int, steps: int, lr: float, warmup: int = 200) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup))))


def export(ema, scheduler, out: str, fp16: bool = True) -> None:
    """A DDPMPipeline folder with the EMA weights and a DDIM scheduler (same betas): the pipeline's default
    sampler is then a fast deterministic one (20 steps are enough), and DDIMPipeline loads it as it is."""
    from diffusers import DDIMScheduler, DDPMPipeline

    unet = copy.deepcopy(ema)
    if fp16:
        unet = unet.half()  # halves the package size; loaders upcast to float32
    DDPMPipeline(unet=unet, scheduler=DDIMScheduler.from_config(scheduler.config)).save_pretrained(
        out, safe_serialization=True)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=2800)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=6e-4)
    p.add_argument("--width", type=int, default=32)
    p.add_argument("--ema", type=float, default=0.999)
    p.add_argument("--work", default="/tmp/sag_train")
    p.add_argument("--out", default=None, help="diffusers folder for the EMA weights (default: none)")
    p.add_argument("--ckpt-every", type=float, default=180.0, help="seconds between checkpoints")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--time-only", type=int, default=0, help="time this many steps and exit")
    p.add_argument("--export-only", action="store_true", help="write --out from the last checkpoint's EMA and exit")
    a = p.parse_args(argv)
    if a.export_only:
        state = torch.load(os.path.join(a.work, "ckpt.pt"), weights_only=False)
        ema = build_unet(a.width)
        ema.load_state_dict(state["ema"])
        export(ema, build_scheduler(), a.out)
        print(f"wrote {a.out} from the checkpoint of step {state['step']}", flush=True)
        return

    torch.set_num_threads(a.threads)
    torch.manual_seed(SEED)
    os.makedirs(a.work, exist_ok=True)
    unet = build_unet(a.width)
    ema = copy.deepcopy(unet).requires_grad_(False)
    sched = build_scheduler()
    opt = torch.optim.AdamW(unet.parameters(), lr=a.lr, weight_decay=0.0)
    ckpt = os.path.join(a.work, "ckpt.pt")
    start, elapsed = 0, 0.0
    if os.path.exists(ckpt):
        state = torch.load(ckpt, weights_only=False)
        unet.load_state_dict(state["unet"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["opt"])
        start, elapsed = state["step"], state["elapsed"]
        print(f"resumed at step {start} ({elapsed:.0f} s trained)", flush=True)
    n_params = sum(p.numel() for p in unet.parameters())
    print(f"params {n_params}  steps {a.steps}  batch {a.batch}", flush=True)
    with open(os.path.join(a.work, "config.json"), "w") as f:
        json.dump({**vars(a), "params": n_params, "seed": SEED}, f, indent=1)

    log_path = os.path.join(a.work, "loss.csv")
    if start == 0 or not os.path.exists(log_path):
        with open(log_path, "w") as f:
            f.write("step,loss,lr,elapsed_s\n")
    else:  # drop rows logged after the checkpoint: they are re-run
        with open(log_path) as f:
            rows = [r for r in csv.reader(f)]
        with open(log_path, "w") as f:
            csv.writer(f).writerows([rows[0]] + [r for r in rows[1:] if int(r[0]) < start])
    log = open(log_path, "a")
    alphas = sched.alphas_cumprod
    t0, last_ckpt = time.time(), time.time()
    unet.train()
    for step in range(start, a.steps):
        g = torch.Generator().manual_seed(SEED + step)
        x0 = batch_for_step(step, a.batch)
        noise = torch.randn(x0.shape, generator=g)
        t = torch.randint(0, sched.config.num_train_timesteps, (a.batch,), generator=g)
        ab = alphas[t].view(-1, 1, 1, 1)
        xt = ab.sqrt() * x0 + (1 - ab).sqrt() * noise
        loss = torch.nn.functional.mse_loss(unet(xt, t).sample, noise)
        lr = lr_at(step, a.steps, a.lr)
        for group in opt.param_groups:
            group["lr"] = lr
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        decay = min(a.ema, (1 + step) / (10 + step))  # short warm-up so the early EMA is not the random init
        with torch.no_grad():
            for pe, pm in zip(ema.parameters(), unet.parameters()):
                pe.lerp_(pm, 1 - decay)
        now = time.time()
        log.write(f"{step},{loss.item():.5f},{lr:.6f},{elapsed + now - t0:.1f}\n")
        if a.time_only and step + 1 - start >= a.time_only:
            print(f"{(now - t0) / a.time_only:.3f} s/step", flush=True)
            return
        if step % 100 == 0:
            log.flush()
            print(f"step {step} loss {loss.item():.4f} lr {lr:.2e} {elapsed + now - t0:.0f}s", flush=True)
        if now - last_ckpt > a.ckpt_every or step + 1 == a.steps:
            tmp = ckpt + ".tmp"
            torch.save({"unet": unet.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(),
                        "step": step + 1, "elapsed": elapsed + now - t0}, tmp)
            os.replace(tmp, ckpt)  # atomic: a crash mid-save keeps the previous checkpoint
            log.flush()
            last_ckpt = now
    log.close()
    if a.out:
        export(ema, sched, a.out)
        print(f"wrote {a.out}", flush=True)


if __name__ == "__main__":
    main()
