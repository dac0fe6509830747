"""SVDD on digits with a non-differentiable reward: reward quantiles and naturalness at equal network evaluations.

The reward is PNG compressibility (minus the PNG file size in bytes of the 8x8 image quantised to the
digits' 17 grey levels, ``guidance.rewards.digits_compressibility``), the small-image counterpart of the
paper's JPEG compressibility task; it is piecewise constant, so gradient guidance cannot use it. On
scikit-learn's digits

1. a VP score model (the shared digits teacher, ``--net unet`` or ``mlp``, noise prediction) is trained with scorekit's Trainer
   and cached under ``--cache`` (outputs/ is git-ignored; delete it to retrain);
2. the same sampler (``pc_sample``, reverse-diffusion predictor, no corrector, ``--steps`` steps) runs
   without guidance, as the pool of Best-of-N (N = M: the paper's top-1/N quantile, and the per-group
   maximum), with SVDD-PM, SVDD-MC (value network fitted on pretrained rollouts, ``fit_value_function``)
   and SVDD-R (PM plus global resampling), all with argmax selection (alpha = 0, the reference code's).

Columns: network evaluations (NFE) of the score model per sample, reward calls and value-network calls
per sample, the reward's median / 90th percentile / mean (the paper's Table 1 reports median and 90th
percentile), FD-digits to the held-out test split (``scorekit.fd_digits``: do samples stay
digits?) and wall time. SVDD-MC's rollouts are a one-off cost, listed separately.

    OMP_NUM_THREADS=1 python -m benchmarks.svdd           # default run (time in the results file)
    OMP_NUM_THREADS=1 python -m benchmarks.svdd --quick   # a short training and fewer samples
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch

from guidance.rewards import digits_compressibility
from guidance.svdd import SVDD, best_of_n, default_value_config, fit_value_function
from samplers import count_nfe, pc_sample
from scorekit import ScoreModel
from scorekit.data import load_digits
from scorekit.fd_digits import fd_digits
from scorekit.nets.classifier import make_classifier
from scorekit.viz import image_grid

from ._harness import RESULTS, describe_teacher, digits_teacher, gen, seed_all, write_results

REWARD = digits_compressibility


def run(args, model: ScoreModel, n: int, guidance=(), seed: int = 0) -> tuple[torch.Tensor, float]:
    """``(samples, NFE per sample)`` of the shared sampler, clipped to the data range [-1, 1]."""
    counted = count_nfe(model)
    x = pc_sample(counted, model.sde, (n, 1, 8, 8), predictor="reverse_diffusion", corrector=None, steps=args.steps,
                  guidance=guidance, generator=gen(seed), progress=args.progress)
    return x.clamp(-1, 1), counted.samples / n


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="short training, fewer samples and rollouts")
    p.add_argument("--samples", type=int, default=256)
    p.add_argument("--candidates", type=int, default=8, help="M for SVDD, N for Best-of-N")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--net", choices=["unet", "mlp"], default="unet", help="the shared digits teacher's network")
    p.add_argument("--hidden", type=int, default=512, help="MLP width (--net mlp)")
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--score_steps", type=int, default=3000, help="teacher steps (3000: the shared digits teacher's)")
    p.add_argument("--lr", type=float, default=None, help="teacher learning rate (default 2e-3 UNet, 1e-3 MLP)")
    p.add_argument("--rollouts", type=int, default=512, help="pretrained rollouts for SVDD-MC's value network")
    p.add_argument("--value_steps", type=int, default=2000)
    p.add_argument("--cache", type=Path, default=Path("outputs/svdd_bench"),
                   help="cached teacher and value network (another benchmark's cache reuses its teacher of the same "
                        "setting, e.g. outputs/bench_distill)")
    p.add_argument("--progress", action="store_true")
    args = p.parse_args(argv)
    if args.quick:
        args.samples, args.score_steps, args.rollouts, args.value_steps = 64, 800, 128, 500
    t_start = time.perf_counter()
    lr = args.lr if args.lr is not None else (2e-3 if args.net == "unet" else 1e-3)
    model, _ = digits_teacher(net=args.net, hidden=args.hidden, depth=args.depth, steps=args.score_steps, lr=lr,
                              cache=args.cache, progress=args.progress)
    m, n, k = args.candidates, args.samples, args.steps
    test = load_digits("test")[0]
    rows, grids = [], []

    def record(name, x, nfe, reward_calls, value_calls, seconds, rewards=None):
        r = REWARD(x) if rewards is None else rewards
        rows.append({"method": name, "NFE": nfe, "reward calls": reward_calls, "value calls": value_calls,
                     "median": float(r.median()), "90%": float(r.quantile(0.9)), "mean": float(r.mean()),
                     "FD-digits": fd_digits(x, test), "time [s]": seconds, "rewards": r.double()})
        grids.append((name, x[:64]))
        print(f"{name}: median {rows[-1]['median']:.1f}, 90% {rows[-1]['90%']:.1f}, "
              f"FD {rows[-1]['FD-digits']:.1f} ({seconds:.0f} s)", flush=True)

    train = load_digits("train")[0]
    record("digits (train split)", train, float("nan"), float("nan"), float("nan"), 0.0)

    t0 = time.perf_counter()
    x, nfe = run(args, model, n, seed=1)
    record("pretrained", x, nfe, 1, 0, time.perf_counter() - t0)

    t0 = time.perf_counter()
    pool, nfe = run(args, model, m * n, seed=2)
    pool_time = time.perf_counter() - t0
    for per_group, label in ((False, "top 1/N"), (True, "per-group max")):
        x, r = best_of_n(lambda count: pool, REWARD, m, n, per_group=per_group)
        record(f"best-of-{m} ({label})", x, m * nfe, m, 0, pool_time, r)

    t0 = time.perf_counter()
    svdd = SVDD(REWARD, m, seed=0)
    x, nfe = run(args, model, n, [svdd], seed=1)
    record(f"SVDD-PM (M={m})", x, nfe, svdd.reward_evals / n, 0, time.perf_counter() - t0)

    t0 = time.perf_counter()
    svdd = SVDD(REWARD, m, resample=True, seed=0)
    x, nfe = run(args, model, n, [svdd], seed=1)
    record(f"SVDD-R (M={m}, worst 5% resampled)", x, nfe, svdd.reward_evals / n, 0, time.perf_counter() - t0)

    t0 = time.perf_counter()
    seed_all(0)
    value = fit_value_function(model, model.sde, REWARD, (1, 8, 8), num_rollouts=args.rollouts, steps=k,
                               net=make_classifier((1, 8, 8), 1, net="mlp", hidden=256),
                               config=default_value_config(steps=args.value_steps, progress=args.progress),
                               generator=gen(3),
                               out_dir=args.cache / f"value_s{args.score_steps}_r{args.rollouts}_v{args.value_steps}")
    fit_time = time.perf_counter() - t0
    t0 = time.perf_counter()
    svdd = SVDD(REWARD, m, value_fn=value, seed=0)
    x, nfe = run(args, model, n, [svdd], seed=1)
    record(f"SVDD-MC (M={m})", x, nfe, svdd.reward_evals / n, svdd.value_evals / n, time.perf_counter() - t0)

    total = time.perf_counter() - t_start
    report(args, rows, grids, fit_time, total)
    return 0


def report(args, rows, grids, fit_time: float, total: float) -> None:
    name = "svdd_quick" if args.quick else "svdd"
    cols = ["method", "NFE", "reward calls", "value calls", "median", "90%", "mean", "FD-digits", "time [s]"]

    def fmt(v):
        return v if isinstance(v, str) else ("–" if math.isnan(v) else f"{v:.1f}")

    table = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    table += ["| " + " | ".join(fmt(r[c]) for c in cols) + " |" for r in rows]
    m, k = args.candidates, args.steps
    text = f"""# SVDD on digits: PNG compressibility

Written by `python -m benchmarks.svdd{' --quick' if args.quick else ''}` (torch {torch.__version__}, {torch.get_num_threads()} thread(s), total {total:.0f} s including cached training).

Score model: {describe_teacher(args.net, args.hidden, args.depth)}, eps prediction, on the VP SDE, {args.score_steps} Trainer steps on the digits train split.
Sampler: `pc_sample`, reverse-diffusion predictor, no corrector, {k} steps; {args.samples} samples per row. Reward: minus the PNG size in bytes at 17 grey levels (higher = more compressible).
Selection: argmax (alpha = 0). Best-of-{m} draws {m} x {args.samples} pretrained samples. SVDD-MC's value network (MLPClassifier, hidden 256) was fitted on {args.rollouts} rollouts x {k} states ({args.rollouts * k / args.samples:.0f} NFE per reported sample, one-off) in {args.value_steps} steps; fitting took {fit_time:.0f} s.
FD-digits is measured against the test split (the train split's own row is the floor).

{chr(10).join(table)}

NFE and calls are per sample. Grids (first 64 samples of each row): `{name}_grids.png`; reward distributions: `{name}_rewards.png`.
"""
    print(text)
    write_results(RESULTS / f"{name}.md", text)

    fig, axes = plt.subplots(1, len(grids), figsize=(2.2 * len(grids), 2.6))
    for ax, (label, x) in zip(axes, grids):
        ax.imshow(image_grid(x, nrow=8), cmap="gray", vmin=0, vmax=255)
        ax.set_title(label, fontsize=7)
        ax.axis("off")
    fig.savefig(RESULTS / f"{name}_grids.png", dpi=150, bbox_inches="tight")
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(8, 3.5))
    ax.boxplot([r["rewards"].numpy() for r in rows], whis=(10, 90), showfliers=False)
    ax.set_xticks(range(1, len(rows) + 1), [r["method"] for r in rows], rotation=25, ha="right", fontsize=7)
    ax.set_ylabel("reward: minus PNG bytes")
    ax.set_title("reward distribution (box: quartiles, whiskers: 10% / 90%)")
    fig.savefig(RESULTS / f"{name}_rewards.png", dpi=150, bbox_inches="tight")
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
