"""Plots the built-in models' training loss (the CSVs scripts/train_builtin.py writes) as a PNG.

    python scripts/plot_loss.py docs/builtin_training_loss.csv docs/builtin_loss.png
    python scripts/plot_loss.py run1/loss.csv run2/loss.csv docs/builtin_loss.png --extra "cond fine-tune=c/loss.csv"

Several CSVs (or the runs of one CSV's `run` column) are segments of one run (a continuation starts at a later step; a step logged twice keeps the later
segment's row), each drawn in its own colour with the first step of each marked; --extra adds another run (the
class-conditional fine-tune) as its own curve. The title gives the mean loss of the last 500 steps and of the 500
before them: whether the curve is still falling.
"""
import argparse
import csv

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

K = 200  # running mean over 200 steps: the per-step loss is noisy (random timesteps per batch)


def read(path: str):
    with open(path) as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise SystemExit(f"{path}: no loss rows")
    return [int(r["step"]) for r in rows], [float(r["loss"]) for r in rows]


def read_segments(path: str):
    """[(steps, losses)] of a CSV, split by its `run` column where it has one (docs/builtin_training_loss.csv
    holds both runs of the built-in model)."""
    with open(path) as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise SystemExit(f"{path}: no loss rows")
    out = {}
    for r in rows:
        s, l = out.setdefault(r.get("run", "1"), ([], []))
        s.append(int(r["step"]))
        l.append(float(r["loss"]))
    return list(out.values())


def smooth(loss):
    out, total = [], 0.0
    for i, v in enumerate(loss):
        total += v - (loss[i - K] if i >= K else 0.0)
        out.append(total / min(i + 1, K))
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("paths", nargs="+", help="loss CSVs (segments of one run, in order), then the output PNG")
    p.add_argument("--extra", action="append", default=[], help="LABEL=CSV: another run drawn as its own curve")
    a = p.parse_args(argv)
    if len(a.paths) < 2:
        raise SystemExit("give at least one loss CSV and the output PNG")
    *srcs, dst = a.paths
    merged = {}
    segments = []
    for src in srcs:
        for steps, loss in read_segments(src):
            segments.append((src, steps, loss))
            merged.update(zip(steps, loss))
    steps = sorted(merged)
    loss = [merged[s] for s in steps]
    mean = smooth(loss)
    fig, ax = plt.subplots(figsize=(7, 3.8))
    for i, (src, s, l) in enumerate(segments):
        ax.plot(s, l, lw=0.4, alpha=0.25, color=f"C{i}")
        if i:
            ax.axvline(s[0], color="gray", ls=":", lw=1)
            ax.annotate(f"continued at {s[0]}", (s[0], max(l)), fontsize=7, xytext=(3, -10),
                        textcoords="offset points")
    ax.plot(steps, mean, lw=1.6, color="k", label=f"unconditional, mean of {K} steps")
    for spec in a.extra:
        label, _, path = spec.partition("=")
        if not path:
            raise SystemExit(f"--extra {spec!r}: expected LABEL=CSV")
        s, l = read(path)
        ax.plot(s, smooth(l), lw=1.4, color="C3", ls="--", label=f"{label}, mean of {K} steps")
    last = loss[-500:]
    before = loss[-1000:-500]
    title = f"built-in model: step {steps[-1] + 1}, last 500 steps {sum(last) / len(last):.4f}"
    if before:
        title += f" (500 before: {sum(before) / len(before):.4f})"
    ax.set_yscale("log")
    ax.set_ylim(0.015, 0.2)
    ax.set_xlabel("step (batch 32)")
    ax.set_ylabel("noise-prediction MSE")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(dst, dpi=110)
    print(title)


if __name__ == "__main__":
    main()
