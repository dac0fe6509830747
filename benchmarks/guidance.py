"""Minority guidance on imbalanced digits: does guidance toward the most unique level bring back a rare class?

One digit class is cut to 5% of scikit-learn's digits training split (``make_imbalanced``); on that set

1. a VP score model (the shared digits teacher, ``--net unet`` or ``mlp``, predicting noise) is trained with scorekit's Trainer,
2. the minority score of every training image is computed (L2, 5 noise draws at alpha_bar = 0.024, as
   the reference code) and quantised into ``--levels`` equal-mass levels,
3. a noisy-input minority classifier (``ConvClassifier``, a half-UNet encoder) is trained on the levels,
   t uniform over the whole range (``train_minority_classifier``),

all cached under ``--cache``/rare<class> (outputs/ is git-ignored; delete it to retrain). Then the same
initial noise is sampled ancestrally (``pc_sample``, ancestral predictor, no corrector, 250 steps as the
paper's respaced sampler) without guidance, with minority guidance toward the highest level at several
scales and toward level 0, and with self-guided minority sampling (no classifier).

The minority score ranks images by how badly the model reconstructs them, not by their class: a class
made rare is "minority" to it only if its images are unusual. The default rare class is 4, the class
whose images the score ranked highest (per-class mean) in a run with class 0 cut to 5%; class 0 itself
is not singled out (AUC 0.45), and guidance toward the top level then lowers its share while still
raising the samples' minority score (``--rare-class 0``, results in ``guidance_rare0.md``).

Table columns, in the feature space of the shipped FD-digits network (``scorekit.fd_digits``) unless said
otherwise: rare share (fraction of samples the digits classifier labels as the rare class; the training
set has 5%), FD-digits to the real rare class (all ~180 real images of it; lower = closer to the
minority), FD-digits to the training set, k-NN precision/recall (k = 3) against the training set, Vendi
score (diversity), the samples' mean minority score under the model and the share of samples above the
top-level threshold (10% of the training set), NFE per sample (score evaluations, self-guidance's
included) and wall time. Samples are clipped to [-1, 1] as the reference samplers do.

    OMP_NUM_THREADS=1 python -m benchmarks.guidance                 # default run (its time is in the results file)
    OMP_NUM_THREADS=1 python -m benchmarks.guidance --rare-class 0 --out benchmarks/results/guidance_rare0.md
    OMP_NUM_THREADS=1 python -m benchmarks.guidance --quick         # small training and sampling, a few minutes
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from sklearn.metrics import roc_auc_score

from guidance.classifier import default_classifier_config
from guidance.minority import (
    MinorityClassifier,
    MinorityGuidance,
    SelfMinorityGuidance,
    minority_score,
    train_minority_classifier,
)
from samplers import count_nfe, pc_sample
from scorekit.data import load_digits, make_imbalanced
from scorekit.fd_digits import digits_classifier, digits_features
from scorekit.metrics import frechet_distance, precision_recall, vendi_score
from scorekit.nets.classifier import make_classifier
from scorekit.viz import save_image_grid

from ._harness import RESULTS, describe_teacher, digits_teacher, gen, seed_all, write_results


def minority_classifier(args, model, x, scores) -> MinorityClassifier:
    """The noisy-input classifier of the training images' minority levels (cached)."""
    path = args.cache / f"minority_L{args.levels}.safetensors"
    if path.is_file():
        print(f"minority classifier: cached {path}", flush=True)
        return MinorityClassifier.load(path)
    seed_all(1)
    net = make_classifier((1, 8, 8), args.levels, channels=(16, 32))
    cfg = default_classifier_config(steps=args.clf_steps, batch_size=128, lr=1e-3, progress=args.progress,
                                    checkpoint_every=0, mixed_precision="no")
    t0 = time.perf_counter()
    mc = train_minority_classifier(net, model, model.sde, x, cfg, num_levels=args.levels, scores=scores,
                                   out_dir=args.cache / f"clf_L{args.levels}")
    mc.save(path)
    print(f"minority classifier: {args.clf_steps} steps ({time.perf_counter() - t0:.0f} s now), saved {path}", flush=True)
    return mc


def evaluate(samples, train_feats, rare_feats, rare_class, ms, top_threshold) -> dict:
    feats = digits_features(samples)
    with torch.no_grad():
        labels = digits_classifier()(samples).argmax(1)
    pr = precision_recall(train_feats, feats, k=3)
    return {"rare share": float((labels == rare_class).double().mean()),
            "FD to rare class": frechet_distance(feats, rare_feats),
            "FD to train set": frechet_distance(feats, train_feats),
            "precision": pr.precision, "recall": pr.recall, "Vendi": vendi_score(feats),
            "minority score": float(ms.mean()), "top-level share": float((ms > top_threshold).double().mean())}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rare-class", type=int, default=4)
    p.add_argument("--share", type=float, default=0.05, help="the rare class's share of the training set")
    p.add_argument("--levels", type=int, default=10, help="minority levels L (the reference code uses 100 "
                   "on 300k-image sets; the digits set has ~1.3k images)")
    p.add_argument("--n", type=int, default=500, help="samples per configuration")
    p.add_argument("--steps", type=int, default=250, help="ancestral sampling steps")
    p.add_argument("--scales", type=float, nargs="+", default=[1.0, 2.0, 4.0], help="minority guidance scales")
    p.add_argument("--self-scales", type=float, nargs="+", default=[1.0, 4.0], help="self-guidance scales")
    p.add_argument("--hidden", type=int, default=512, help="width of the score MLP (--net mlp)")
    p.add_argument("--net", choices=["unet", "mlp"], default="unet", help="the shared digits teacher's network")
    p.add_argument("--score-steps", type=int, default=3000)
    p.add_argument("--clf-steps", type=int, default=2000)
    p.add_argument("--cache", type=Path, default=Path("outputs/bench_guidance"))
    p.add_argument("--quick", action="store_true", help="short training, 200 samples, 100 steps")
    p.add_argument("--progress", action="store_true")
    p.add_argument("--out", type=Path, default=RESULTS / "guidance.md")
    args = p.parse_args(argv)
    if args.quick:
        args.n, args.steps, args.score_steps, args.clf_steps = 200, 100, 800, 400
        args.hidden, args.cache = 256, args.cache.with_name(args.cache.name + "_quick")
        args.out = args.out.with_name(args.out.stem + "_quick.md")
    args.cache = args.cache / f"rare{args.rare_class}"
    t_start = time.perf_counter()

    x_all, y_all = load_digits("train")
    x, y = make_imbalanced(x_all, y_all, args.rare_class, args.share, seed=0)
    rare = y == args.rare_class
    print(f"training set: {len(x)} images, {int(rare.sum())} of class {args.rare_class} ({float(rare.double().mean()):.3f})")
    model, _ = digits_teacher(net=args.net, hidden=args.hidden, steps=args.score_steps, lr=1e-3, data=x, cache=args.cache,
                              progress=args.progress)
    sde = model.sde
    scores = minority_score(model, sde, x, generator=gen(2))
    mc = minority_classifier(args, model, x, scores)
    auc = roc_auc_score(rare.numpy(), scores.numpy())
    top = float((mc.assign(scores)[rare] == args.levels - 1).double().mean())
    per_class = ", ".join(f"{c}: {float(scores[y == c].mean()):.1f}" for c in range(10))

    real_rare, _ = load_digits("all", classes=[args.rare_class])
    train_feats, rare_feats = digits_features(x), digits_features(real_rare)
    # each entry builds the plug-ins for one run from the (NFE-counting) score, so that self-guidance's
    # own network evaluations are counted too
    top_level = args.levels - 1
    configs = {"unguided": lambda score: []}
    for w in args.scales:
        configs[f"minority, level {top_level}, w={w:g}"] = lambda score, w=w: [MinorityGuidance(mc, top_level, w)]
    configs[f"minority, level 0, w={args.scales[-1]:g}"] = lambda score: [MinorityGuidance(mc, 0, args.scales[-1])]
    for w in args.self_scales:
        configs[f"self-guided, w={w:g}"] = lambda score, w=w: [
            SelfMinorityGuidance(score, sde, w, generator=gen(3))]

    x_T = torch.randn(args.n, 1, 8, 8, generator=gen(4))
    rows: list[dict] = []
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for i, (name, plugins) in enumerate(configs.items()):
        score = count_nfe(model)
        t0 = time.perf_counter()
        samples = pc_sample(score, sde, None, predictor="ancestral", corrector=None, steps=args.steps, x_T=x_T,
                            guidance=plugins(score), generator=gen(5), progress=args.progress)
        seconds = time.perf_counter() - t0
        samples = samples.clamp(-1, 1)  # the pixel range, as the reference samplers clip their output
        ms = minority_score(model, sde, samples, generator=gen(6))
        row = {"name": name, **evaluate(samples, train_feats, rare_feats, args.rare_class, ms, mc.thresholds[-1]),
               "NFE": score.samples / args.n, "time [s]": seconds}
        rows.append(row)
        grid = args.out.with_name(f"{args.out.stem}_{i}.png")
        save_image_grid(samples[:100], grid, nrow=10)
        print(f"{name}: " + ", ".join(f"{k} {v:.3f}" for k, v in row.items() if k != "name") + f"  -> {grid.name}",
              flush=True)

    ref = {"name": "training set (reference)", **evaluate(x, train_feats, rare_feats, args.rare_class, scores,
                                                                        mc.thresholds[-1]),
           "NFE": float("nan"), "time [s]": float("nan")}
    cols = [k for k in rows[0] if k != "name"]
    command = " ".join(argv if argv is not None else sys.argv[1:])
    header = (
        f"Written by `python -m benchmarks.guidance {command}` (torch {torch.__version__}, {torch.get_num_threads()} "
        f"thread(s); {time.perf_counter() - t_start:.0f} s, which includes training only when it was not cached)."
    )
    setup = (
        f"Training set: scikit-learn digits train split with class {args.rare_class} cut to {args.share:.0%} "
        f"({len(x)} images, {int(rare.sum())} of class {args.rare_class}). Score model: {describe_teacher(args.net, args.hidden)}, "
        f"eps prediction on the VP SDE, {args.score_steps} Trainer steps. Minority score: L2, n = 5, "
        f"alpha_bar = {mc.alpha_bar:.4f} (t = {mc.t:.3f}); {args.levels} equal-mass levels. The minority score "
        f"ranks the rare class first with AUC {auc:.3f}; {top:.0%} of its images are in the top level "
        f"(mean minority score per class: {per_class}). "
        f"Minority classifier: ConvClassifier (16, 32), {args.clf_steps} steps. Sampling: {args.n} samples, "
        f"ancestral, {args.steps} steps, the same initial noise for every row. Self-guidance: authors' defaults "
        "(p_ratio 0.8, inter_rate 5, one re-noising, max-abs normalisation), L2 distance."
    )
    lines = [
        "# Minority guidance on imbalanced digits", "", header, "", setup, "",
        "| configuration | " + " | ".join(cols) + " |",
        "|---|" + "---|" * len(cols),
    ]
    for row in [ref, *rows]:
        lines.append(f"| {row['name']} | " + " | ".join(f"{row[c]:.3f}" if c != "NFE" else f"{row[c]:.0f}"
                                                          for c in cols) + " |")
    lines += ["", "Grids (first 100 samples of each row, same order): "
              + ", ".join(f"`{args.out.stem}_{i}.png` ({name})" for i, name in enumerate(configs)), ""]
    text = "\n".join(lines)
    print("\n" + text)
    write_results(args.out, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
