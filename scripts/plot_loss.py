"""Plots the built-in model's training loss (the CSV scripts/train_builtin.py writes) as a PNG.

    python scripts/plot_loss.py /tmp/sag_train/loss.csv docs/builtin_loss.png
"""
import csv
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main(src: str, dst: str) -> None:
    with open(src) as f:
        rows = list(csv.DictReader(f))
    step = [int(r["step"]) for r in rows]
    loss = [float(r["loss"]) for r in rows]
    k = 50  # running mean over 50 steps: the per-step loss is noisy (random timesteps per batch)
    smooth = [sum(loss[max(0, i - k + 1):i + 1]) / len(loss[max(0, i - k + 1):i + 1]) for i in range(len(loss))]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(step, loss, lw=0.5, alpha=0.35, label="per step")
    ax.plot(step, smooth, lw=1.5, label=f"mean of {k} steps")
    ax.set_yscale("log")
    ax.set_xlabel("step (batch 32)")
    ax.set_ylabel("noise-prediction MSE")
    ax.set_title(f"built-in model training: final {k}-step mean {smooth[-1]:.4f}")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.tight_layout()
    fig.savefig(dst, dpi=110)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
