"""Sample the rare features of an imbalanced data set with minority guidance (Um, Lee & Ye, ICLR 2024).

The digits training split with one class cut to 5% stands in for a data set whose unusual samples a
diffusion model under-produces. The minority score flags images the model reconstructs badly, which
is a rare class only when that class looks unusual: 4s do (a rare 4 is ranked first with AUC ~0.8),
0s do not (see benchmarks/results/guidance.md). The script

1. trains a VP score model on it (a ``scorekit train`` run directory, so the CLI can sample it too),
2. labels every training image with its minority score (how badly the model reconstructs it from
   heavy noise) in equal-mass levels and trains a noisy-input classifier of those levels,
3. samples the same initial noise without and with guidance toward the most unique level, and
   writes both grids side by side with the share of the rare class each contains.

    python examples/minority_digits.py                       # ~10 min on 2 CPU cores; re-runs reuse the training
    python examples/minority_digits.py --rare-class 7 --scale 4 --out-dir outputs/minority_7

The trained classifier also drives the CLI:

    scorekit sample --checkpoint OUT_DIR/score --sampler pc --predictor ancestral --corrector none \\
        --guidance minority --classifier OUT_DIR/minority.safetensors --target-level 9 --scale 2
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch

from guidance.classifier import default_classifier_config
from guidance.minority import MinorityGuidance, train_minority_classifier
from samplers import pc_sample
from scorekit.config import RunConfig, build_data, build_trainer, load_config, load_score_model
from scorekit.fd_digits import digits_classifier
from scorekit.nets.classifier import make_classifier
from scorekit.viz import image_grid


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rare-class", type=int, default=4)
    ap.add_argument("--levels", type=int, default=10, help="equal-mass minority levels")
    ap.add_argument("--scale", type=float, default=2.0, help="minority guidance scale w")
    ap.add_argument("--n", type=int, default=100, help="samples per grid")
    ap.add_argument("--out-dir", type=Path, default=Path("outputs/minority_digits"))
    args = ap.parse_args()
    torch.set_num_threads(1)  # small tensors: more threads only contend

    run = load_config({
        "sde": {"name": "vp"},
        "model": {"net": "mlp", "options": {"hidden": 512, "depth": 3}},
        "data": {"name": "digits", "split": "train", "rare_class": args.rare_class, "rare_share": 0.05},
        "training": {"steps": 3000, "batch_size": 128, "lr": 1e-3, "warmup": 100, "checkpoint_every": 1000},
        "sampling": {"sampler": "pc", "predictor": "ancestral", "corrector": None, "steps": 250},
        "out_dir": str(args.out_dir / "score"),
    }, RunConfig)
    build_trainer(run).train()  # resumes (or returns at once) when the run directory holds checkpoints
    model, _ = load_score_model(run.out_dir)
    x, y = build_data(run.data)
    print(f"{len(x)} training images, {int((y == args.rare_class).sum())} of them {args.rare_class}s")

    torch.manual_seed(0)
    classifier = make_classifier((1, 8, 8), args.levels, channels=(16, 32))
    minority = train_minority_classifier(classifier, model, model.sde, x, default_classifier_config(progress=True),
                                         num_levels=args.levels, generator=torch.Generator().manual_seed(0),
                                         out_dir=args.out_dir / "classifier")
    minority.save(args.out_dir / "minority.safetensors")

    x_T = torch.randn(args.n, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    panels = {}
    for title, guidance in (("unguided", []),
                            (f"minority guidance, level {args.levels - 1}, w = {args.scale:g}",
                             [MinorityGuidance(minority, args.levels - 1, args.scale)])):
        samples = pc_sample(model, model.sde, None, predictor="ancestral", corrector=None, steps=250, x_T=x_T,
                            guidance=guidance, generator=torch.Generator().manual_seed(2), progress=True).clamp(-1, 1)
        share = float((digits_classifier()(samples).argmax(1) == args.rare_class).double().mean())
        panels[f"{title}: {share:.0%} {args.rare_class}s"] = samples
        print(f"{title}: {share:.1%} of the samples are {args.rare_class}s (5% of the training set)")

    fig, axes = plt.subplots(1, 2, figsize=(10, 5.4))
    for ax, (title, samples) in zip(axes, panels.items()):
        ax.imshow(image_grid(samples, nrow=10, scale=4), cmap="gray")
        ax.set_title(title)
        ax.axis("off")
    path = args.out_dir / "minority_digits.png"
    fig.savefig(path, dpi=100, bbox_inches="tight")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
