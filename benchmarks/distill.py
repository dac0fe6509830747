"""f-distill benchmark: divergences on the 2-D imbalanced mixture, and one-step digits vs the teacher's PC sampler.

1. Mixture (exact teacher score, weights 0.6 / 0.35 / 0.05). The generator (an MLP on 2-D noise) starts
   on the two common modes only (a short reverse-KL run on the mixture without its 5% mode, with exact
   critics), then each divergence distils the full mixture. Two critic variants:
   - learned: the method itself. Fake score initialised from the teacher: here the teacher is a closed
     form, so the fake score is the exact teacher score plus a residual eps-network whose output layer
     starts at zero, trained by DSM on generator samples; discriminator: an MLP on (x_t, t) against
     teacher samples. (An MLP fitted separately to teacher samples instead carries a DSM error of about
     0.1 at t >= 0.4, ten to a hundred times the true |s_q - s_p| there, which is where the rare mode
     pulls: its generator never left the common modes. Starting the fake score at the teacher removes
     that error, as initialising both from one network does in the paper.)
   - oracle: exact critics of the generator's empirical law (scorekit.distill.EmpiricalCritic), which
     isolates the h(r) weighting of the paper (eq. 7) from critic errors.
   Reported per divergence and variant (mean over seeds): the rare mode's share at the end (true 0.05),
   its mean share over the run (how fast the missed mode is recovered), and sliced W to the mixture.
2. Digits. A VP teacher (an MLP score model trained here and cached under outputs/, or any `scorekit
   train` run with --teacher, e.g. configs/digits_vp.yaml's UNet) is distilled per divergence into a
   one-step generator started from the teacher network. FD-digits of the samples to the 1797 real
   digits, against the teacher's own PC sampler at 1000 NFE (500 reverse-diffusion + Langevin steps),
   and wall time per sample. Image grids per divergence go to benchmarks/results/.

    OMP_NUM_THREADS=1 python -m benchmarks.distill              # default, about 20 min on one core
    OMP_NUM_THREADS=1 python -m benchmarks.distill --quick      # a few minutes
    python -m benchmarks.distill --divergences all --seeds 3 --digits-steps 2000
    python -m benchmarks.distill --sections digits --teacher outputs/digits_vp
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch
from torch import nn

from samplers import pc_sample
from scorekit import VPSDE, ScoreModel
from scorekit.data import GaussianMixture, imbalanced_mixture, load_digits
from scorekit.distill import (
    DIVERGENCES,
    DistillConfig,
    DistillTrainConfig,
    EmpiricalCritic,
    FDistill,
    MLPDiscriminator,
)
from scorekit.fd_digits import fd_digits
from scorekit.metrics import sliced_wasserstein
from scorekit.nets import MLP

from ._harness import RESULTS, best_time, digits_teacher, gen, seed_all, write_results

SECTIONS = ("mixture", "digits")
DEFAULT_DIVERGENCES = ("reverse_kl", "softened_reverse_kl", "js", "hellinger", "forward_kl", "jeffreys")


# -- 1. the mixture ------------------------------------------------------------------------------------
def distill_2d(args, generator, teacher_mix, divergence, steps, lr, variant, seed, data=None, record=None):
    """One f-distill run on a 2-D mixture teacher with exact score; returns the FDistill object."""
    sde = VPSDE()
    cfg = DistillConfig(divergence=divergence, gan_weight=0.0 if variant == "oracle" else args.gan_weight,
                        training=DistillTrainConfig(steps=steps, batch_size=256, lr=lr, ema_decay=0.95, seed=seed,
                                                    progress=False))
    callbacks = [record] if record else []
    kw = {}
    if variant == "oracle":
        critic = EmpiricalCritic(generator, sde, lambda x, t: teacher_mix.log_prob(x, t, sde), (2,), n=1024,
                                 bandwidth=0.1, seed=seed)
        kw = dict(fake_score=critic.score, discriminator=critic.log_ratio)
        callbacks.insert(0, critic.refresh)
    else:
        seed_all(seed)
        fake = ResidualFakeScore(teacher_mix.score_fn(sde), sde)
        kw = dict(fake_score=fake, discriminator=MLPDiscriminator(2), data=data)
    fd = FDistill(teacher_mix.score_fn(sde), sde, generator, config=cfg, data_shape=(2,), callbacks=callbacks, **kw)
    fd.train()
    return fd


class ResidualFakeScore(nn.Module):
    """``s_fake(x, t) = s_teacher(x, t) - net(x, t) / sigma_t``: a fake score initialised from a closed-form
    teacher (``net``, an :class:`~scorekit.nets.MLP`, has a zero output layer, so ``s_fake = s_teacher`` at start)."""

    def __init__(self, teacher_score, sde, dim: int = 2, hidden: int = 128):
        super().__init__()
        self.teacher_score, self.sde = teacher_score, sde
        self.net = MLP(dim, hidden=hidden, depth=3)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        sigma = self.sde.marginal_coeffs(t)[1]
        return self.teacher_score(x, t) - self.net(x, t) / sigma[:, None]


def mixture_section(args, out: list[str]) -> None:
    mix = imbalanced_mixture()
    common = GaussianMixture(mix.weights[:2] / mix.weights[:2].sum(), mix.means[:2], mix.stds[:2])
    ref = mix.sample(args.n_eval, gen(2))
    data = mix.sample(20000, gen(1))
    z_eval = torch.randn(args.n_eval, 2, generator=gen(5))
    floor = sliced_wasserstein(mix.sample(args.n_eval, gen(7)), ref)
    share = lambda x: float((mix.classify(x.double()) == 2).float().mean())  # noqa: E731
    rows: dict[tuple[str, str], list[tuple[float, float, float, float]]] = {}
    finals: dict[tuple[str, str], torch.Tensor] = {}
    for seed in range(args.seeds):
        seed_all(seed)
        start = nn.Sequential(nn.Linear(2, 64), nn.SiLU(), nn.Linear(64, 64), nn.SiLU(), nn.Linear(64, 2))
        distill_2d(args, start, common, "reverse_kl", 100, 1e-2, "oracle", seed)
        start_sw, start_share = sliced_wasserstein(start(z_eval).detach(), ref), share(start(z_eval).detach())
        print(f"  seed {seed}: start on the common modes, rare share {start_share:.3f}, sliced W {start_sw:.3f}",
              flush=True)
        for name in args.divergences:
            for variant in args.variants:
                if variant == "learned" and name not in args.learned_divergences:
                    continue
                shares = []
                record = lambda fd: shares.append(share(fd.ema(z_eval))) if fd.step % 20 == 0 else None  # noqa: E731, B023 (called within the iteration)
                c0 = time.process_time()
                fd = distill_2d(args, copy.deepcopy(start), mix, name, args.steps, args.lr, variant, seed,
                                data=data, record=record)
                x = fd.sample(args.n_eval, gen(3))
                result = (share(x), sum(shares) / len(shares), sliced_wasserstein(x, ref), time.process_time() - c0)
                rows.setdefault((name, variant), []).append(result)
                finals[(name, variant)] = x
                print(f"  seed {seed} {name:20s} {variant:7s} rare share {result[0]:.3f} (mean over run "
                      f"{result[1]:.3f}), sliced W {result[2]:.3f}, {result[3]:.0f} s CPU", flush=True)
    out.append(f"## 1. Imbalanced 2-D mixture, exact teacher score\n\n"
               f"Generator: MLP 2-64-64-2 started on the two common modes (rare share {start_share:.3f}, sliced W "
               f"{start_sw:.3f} for the last seed); {args.steps} generator steps, lr {args.lr}, batch 256, 5 critic "
               f"steps per generator step, GAN weight {args.gan_weight} (learned) / 0 (oracle), EMA 0.95; mean over "
               f"{args.seeds} seed(s). Sliced W of {args.n_eval} samples (true vs true: {floor:.3f}). Learned critics: "
               f"fake score = exact teacher score + a zero-initialised residual eps-MLP trained by DSM on generator "
               f"samples, MLP discriminator on (x_t, t) against teacher samples; oracle: exact critics of the "
               f"generator's empirical law (EmpiricalCritic).\n")
    lines = ["| divergence | critics | rare share at end (true 0.05) | mean rare share over run | sliced W | CPU s / run |",
             "|---|---|---|---|---|---|"]
    for (name, variant), res in rows.items():
        mean = [sum(r[i] for r in res) / len(res) for i in range(4)]
        lines.append(f"| {name} | {variant} | {mean[0]:.3f} | {mean[1]:.3f} | {mean[2]:.3f} | {mean[3]:.0f} |")
    out.append("\n".join(lines) + "\n")
    plot_mixture(finals, args.divergences, args.variants, RESULTS / f"distill{args.tag}_mixture.png")


def plot_mixture(finals, names, variants, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(variants), len(names), figsize=(2.6 * len(names), 2.6 * len(variants)),
                             squeeze=False)
    for i, variant in enumerate(variants):
        for j, name in enumerate(names):
            ax = axes[i][j]
            if (name, variant) not in finals:  # a divergence run with oracle critics only
                ax.axis("off")
                continue
            x = finals[(name, variant)][:2000]
            ax.scatter(x[:, 0], x[:, 1], s=1, alpha=0.4)
            ax.set(xlim=(-4, 4), ylim=(-3, 4.5), xticks=[], yticks=[], title=f"{name}\n{variant}")
            ax.title.set_fontsize(8)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    tmp.replace(path)
    plt.close(fig)


# -- 2. digits -----------------------------------------------------------------------------------------
def load_teacher(args) -> ScoreModel:
    if args.teacher is not None:
        from scorekit.config import load_score_model

        return load_score_model(args.teacher)[0]
    return digits_teacher(hidden=args.teacher_hidden, steps=args.teacher_steps, cache=args.cache,
                          progress=args.progress)[0]


def per_sample_seconds(fn, n: int, repeats: int) -> tuple[torch.Tensor, float]:
    x, best = best_time(fn, repeats)
    return x, best / n


def digits_section(args, out: list[str]) -> None:
    from scorekit.viz import save_image_grid

    teacher = load_teacher(args)
    sde = teacher.sde
    real, _ = load_digits("all")
    train, _ = load_digits("train")
    n = args.digits_n
    floor = fd_digits(load_digits("train")[0], load_digits("test")[0])
    with torch.no_grad():
        x_pc, pc_time = per_sample_seconds(lambda: pc_sample(teacher, sde, (n, 1, 8, 8), steps=500, generator=gen(0)),
                                           n, 1)
    fd_teacher = fd_digits(x_pc.clamp(-1, 1), real)
    save_image_grid(x_pc[:64], RESULTS / f"distill{args.tag}_digits_teacher_pc1000.png")
    print(f"  teacher PC 1000 NFE: FD-digits {fd_teacher:.2f}, {pc_time * 1e3:.2f} ms/sample", flush=True)
    rows = [("teacher, PC reverse diffusion + Langevin", 1000, fd_teacher, pc_time)]
    for name in args.digits_divergences:
        cfg = DistillConfig(divergence=name, generator_time=args.generator_time,
                            training=DistillTrainConfig(steps=args.digits_steps, batch_size=args.digits_batch,
                                                        lr=args.digits_lr, ema_decay=0.99, checkpoint_every=250,
                                                        progress=args.progress, seed=0))
        out_dir = args.cache / f"fd_{args.teacher_tag()}_{name}_t{args.generator_time}_lr{args.digits_lr}"
        fd = FDistill(teacher, sde, config=cfg, data=train, out_dir=out_dir)
        if name == args.digits_divergences[0]:
            x0 = fd.sample(n, gen(1))
            rows.append(("one-step generator at initialisation (teacher copy)", 1, fd_digits(x0.clamp(-1, 1), real),
                         float("nan")))
        c0 = time.process_time()
        fd.train()
        x, one_step = per_sample_seconds(lambda: fd.sample(n, gen(1)), n, 3)  # noqa: B023 (called within the iteration)
        rows.append((f"f-distill {name}, {fd.step} steps", 1, fd_digits(x.clamp(-1, 1), real), one_step))
        save_image_grid(x[:64], RESULTS / f"distill{args.tag}_digits_{name}.png")
        print(f"  {name}: FD-digits {rows[-1][2]:.2f}, {one_step * 1e6:.1f} us/sample "
              f"({time.process_time() - c0:.0f} s CPU to train now; checkpoints in {out_dir})", flush=True)
    out.append(f"## 2. Digits: one-step generators vs the teacher's sampler\n\n"
               f"Teacher: {args.teacher_desc()}. f-distill: generator and fake score start as copies of the teacher, "
               f"the generator at t = {args.generator_time}; discriminator head on the teacher's features; "
               f"{args.digits_steps} generator steps, batch {args.digits_batch}, lr {args.digits_lr}, 5 critic steps per "
               f"generator step, GAN weight 1e-3, EMA 0.99. FD-digits of {n} samples (clamped to [-1, 1]) to the "
               f"1797 real digits; train-vs-test split: {floor:.2f}. Time: best of 3 for the one-step generators, "
               f"one run for PC, {n} samples per batch.\n")
    lines = ["| sampler | NFE | FD-digits | FD / teacher's | ms per sample | speed-up vs teacher |",
             "|---|---|---|---|---|---|"]
    for label, nfe, fdv, sec in rows:
        speed = "" if sec != sec else f"{pc_time / sec:.0f}x"
        ms = "" if sec != sec else f"{sec * 1e3:.4f}"
        lines.append(f"| {label} | {nfe} | {fdv:.2f} | {fdv / fd_teacher:.2f} | {ms} | {speed} |")
    out.append("\n".join(lines) + "\n")


# -- main ----------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=SECTIONS)
    p.add_argument("--quick", action="store_true", help="one seed, 3 divergences, short runs")
    p.add_argument("--divergences", nargs="+", default=list(DEFAULT_DIVERGENCES),
                   help=f"mixture divergences, or 'all' ({sorted(DIVERGENCES)})")
    p.add_argument("--variants", nargs="+", default=["oracle", "learned"], choices=["oracle", "learned"])
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--steps", type=int, default=400, help="generator steps per mixture run")
    p.add_argument("--lr", type=float, default=2e-3, help="mixture learning rate (generator and critics)")
    p.add_argument("--gan-weight", type=float, default=1e-3, help="GAN weight of the learned mixture runs")
    p.add_argument("--learned-divergences", nargs="+", default=["reverse_kl", "js", "forward_kl"],
                   help="the divergences also run with learned critics (about 10x the oracle's cost)")
    p.add_argument("--n-eval", type=int, default=4000)
    p.add_argument("--teacher", type=Path, default=None, help="a `scorekit train` run to distil (default: MLP trained here)")
    p.add_argument("--teacher-hidden", type=int, default=256)
    p.add_argument("--teacher-steps", type=int, default=3000)
    p.add_argument("--digits-divergences", nargs="+", default=["reverse_kl", "js", "forward_kl"])
    p.add_argument("--digits-steps", type=int, default=400)
    p.add_argument("--digits-batch", type=int, default=128)
    p.add_argument("--digits-lr", type=float, default=1e-4)
    p.add_argument("--generator-time", type=float, default=0.4)
    p.add_argument("--digits-n", type=int, default=1000)
    p.add_argument("--cache", type=Path, default=Path("outputs/bench_distill"), help="cached teacher and runs")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--progress", action="store_true")
    args = p.parse_args(argv)
    if args.divergences == ["all"]:
        args.divergences = list(DIVERGENCES)
    args.tag = ""
    if args.quick:
        args.seeds, args.steps = 1, 200
        args.divergences = ["reverse_kl", "js", "forward_kl"]
        args.digits_divergences, args.digits_steps, args.digits_n, args.teacher_steps = ["reverse_kl"], 100, 500, 1500
        args.tag = "_quick"
    args.teacher_tag = lambda: args.teacher.name if args.teacher else "unet32-64-64"
    args.teacher_desc = lambda: (f"`scorekit train` run {args.teacher}" if args.teacher else
                                 f"the digits UNet (32-64-64) eps-prediction on VP, {args.teacher_steps} Trainer steps "
                                 "(EMA weights)")
    torch.set_num_threads(args.threads)
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = ["# f-distill benchmark\n", f"Command: `python -m benchmarks.distill {' '.join(argv or sys.argv[1:])}`\n"]
    t0 = time.perf_counter()
    if "mixture" in args.sections:
        print("mixture:", flush=True)
        mixture_section(args, out)
    if "digits" in args.sections:
        print("digits:", flush=True)
        digits_section(args, out)
    out.append(f"Total wall time {time.perf_counter() - t0:.0f} s ({args.threads} thread(s)).\n")
    text = "\n".join(out)
    print(text)
    write_results(RESULTS / f"distill{args.tag}.md", text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
