"""Samplers side by side: scorekit's samplers and diffusers' schedulers driven by the same score.

Sections (all in one run, same score functions, same initial noise where it applies):

1. The 2-D imbalanced mixture with its exact score. Deterministic solvers: mean |x - x_ref| against
   each library's own converged solution from the same x_T (scorekit: dopri5 at rtol = atol = 1e-9
   from T = 1 to eps = 1e-3; diffusers: DPMSolverMultistep with 999 steps, to sigma = 0), and sliced
   Wasserstein against true samples; stochastic samplers: sliced W and the rare mode's share (true 0.05).
2. Wall time per NFE at 100 NFE, scorekit / diffusers, total and sampler overhead (time outside the score).
3. Digits: the shared digits teacher (``--digits-net``: the demo's UNet or the MLP) trained with scorekit's Trainer (cached under outputs/), FD-digits
   against the real digits, and the deterministic error as in 1.

diffusers is driven at its discrete timesteps i with the scheduler's own alphas_cumprod: the score at
x_t becomes eps = -sqrt(1 - abar_i) score(x, t_i), with t_i the continuous time whose abar(t) equals
abar_i (t_i = t_from_log_snr(log(abar_i / (1 - abar_i)))). DDPM's discrete abar_999 = 4.04e-5 lies below
the continuous VP's abar(1) = 4.32e-5, so for the mixture the diffusers runs use a VP SDE whose beta_max
is stretched (20.135) to put abar_999 at t = 1 and keep the score exact; the learned digits model is
evaluated at t = 1 for that first step (the only step beyond its training range). EulerDiscrete works
on sigma = sqrt((1 - abar) / abar) and interpolated timesteps, so abar comes from its sigma there.
Peers use their defaults except: DDIM and DDPM with clip_sample=False and timestep_spacing="trailing"
(so that they start at timestep 999 like the others), ScoreSdeVe with sigma_min/max and snr set to
scorekit's (0.01, 50, 0.16). diffusers' DPMSolverMultistep and UniPC produce NaN at 1000 steps with
their default "linspace" spacing (rounded timesteps repeat, h = 0), reported as such.

    python -m benchmarks.samplers            # default run, about 10 minutes on 2 CPU cores
    python -m benchmarks.samplers --quick    # fewer samples and NFE, a minute or two
    python -m benchmarks.samplers --sections mixture timing --n 8000
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    ScoreSdeVeScheduler,
    UniPCMultistepScheduler,
)

from samplers import count_nfe, ode_sample, pc_sample
from scorekit import VESDE, VPSDE, ScoreModel
from scorekit.data import imbalanced_mixture, load_digits
from scorekit.fd_digits import fd_digits
from scorekit.metrics import sliced_wasserstein

from ._harness import RESULTS, describe_teacher, digits_teacher, fmt, gen, write_results

NFES = (5, 10, 20, 50, 100, 1000)
SECTIONS = ("mixture", "timing", "digits")
EPS_VP, EPS_VE = 1e-3, 1e-5


# -- diffusers driven by a continuous-time score ------------------------------------------------------
def vp_time(sde: VPSDE, abar: torch.Tensor) -> torch.Tensor:
    """The continuous time with alpha(t)^2 = abar on ``sde`` (float64)."""
    abar = abar.double()
    return sde.t_from_log_snr(torch.log(abar) - torch.log1p(-abar))


def diffusers_eps(sched, score_fn, sde, x, t, t_max: float):
    """The epsilon the scheduler expects at its timestep ``t``, from a score at the same noise level."""
    inp = sched.scale_model_input(x, t)
    if isinstance(sched, EulerDiscreteScheduler):
        abar = 1 / (1 + sched.sigmas[sched.step_index].double() ** 2)
    else:
        abar = sched.alphas_cumprod[int(t)].double()
    tc = vp_time(sde, abar).clamp(max=t_max).to(x.dtype)
    return -torch.sqrt(1 - abar).to(x.dtype) * score_fn(inp, tc)


def run_diffusers_vp(make, steps, score_fn, sde, x_T, generator=None, t_max=1.0):
    sched = make()
    sched.set_timesteps(steps)
    x = x_T * sched.init_noise_sigma
    for t in sched.timesteps:
        eps = diffusers_eps(sched, score_fn, sde, x, t, t_max)
        extra = {} if generator is None else {"generator": generator}  # UniPC's step takes none
        x = sched.step(eps, t, x, **extra).prev_sample
    return x


def run_score_sde_ve(steps, score_fn, sde, x_T, generator):
    """diffusers' ScoreSdeVe predictor-corrector loop (its pipeline, without the image clamp)."""
    sched = ScoreSdeVeScheduler(
        sigma_min=sde.sigma_min, sigma_max=sde.sigma_max, snr=0.16, sampling_eps=EPS_VE
    )
    sched.set_timesteps(steps)
    sched.set_sigmas(steps)
    x = x_T  # already N(0, sigma_max^2)
    for t in sched.timesteps:
        tc = t.to(x.dtype).expand(len(x))  # same sigma(t) = sigma_min (sigma_max / sigma_min)^t as scorekit
        x = sched.step_correct(score_fn(x, tc), x, generator=generator).prev_sample
        out = sched.step_pred(score_fn(x, tc), t, x, generator=generator)
        x, x_mean = out.prev_sample, out.prev_sample_mean
    return x_mean


DIFFUSERS_VP = {
    "DDIM": lambda: DDIMScheduler(clip_sample=False, timestep_spacing="trailing"),
    "EulerDiscrete": lambda: EulerDiscreteScheduler(),
    "DPMSolverMultistep (2M)": lambda: DPMSolverMultistepScheduler(),
    "UniPCMultistep": lambda: UniPCMultistepScheduler(),
}
DDPM = lambda: DDPMScheduler(clip_sample=False, timestep_spacing="trailing")  # noqa: E731


# -- the samplers compared: name -> (library, NFE per step, run(score, sde, x_T, steps, generator)) ---
def scorekit_ode(**kw):
    return lambda score, sde, x_T, steps, g: ode_sample(
        score, sde, None, x_T=x_T, steps=steps, eps=EPS_VP, **kw
    )


def scorekit_pc(eps, **kw):
    return lambda score, sde, x_T, steps, g: pc_sample(
        score, sde, None, x_T=x_T, steps=steps, eps=eps, generator=g, **kw
    )


DETERMINISTIC_VP = {
    "dpm_solver_2m": ("scorekit", 1, scorekit_ode(method="dpm_solver_2m")),
    "dpm_solver_2m logsnr grid": ("scorekit", 1, scorekit_ode(method="dpm_solver_2m", time_grid="logsnr")),
    "dpm_solver_2m time_uniform": (
        "scorekit",
        1,
        scorekit_ode(method="dpm_solver_2m", time_grid="time_uniform"),
    ),
    "ode euler": ("scorekit", 1, scorekit_ode(method="euler")),
    "ode midpoint": ("scorekit", 2, scorekit_ode(method="midpoint")),
    "ode rk4": ("scorekit", 4, scorekit_ode(method="rk4")),
    **{
        name: (
            "diffusers",
            1,
            lambda score, sde, x_T, steps, g, make=make: run_diffusers_vp(make, steps, score, sde, x_T),
        )
        for name, make in DIFFUSERS_VP.items()
    },
}
STOCHASTIC = {  # name -> (library, sde, NFE per step, run)
    "pc reverse_diffusion+langevin (VP)": ("scorekit", "vp", 2, scorekit_pc(EPS_VP)),
    "pc ancestral (VP)": ("scorekit", "vp", 1, scorekit_pc(EPS_VP, predictor="ancestral", corrector=None)),
    "pc euler_maruyama (VP)": (
        "scorekit",
        "vp",
        1,
        scorekit_pc(EPS_VP, predictor="euler_maruyama", corrector=None),
    ),
    "DDPM ancestral (VP)": (
        "diffusers",
        "vp",
        1,
        lambda score, sde, x_T, steps, g: run_diffusers_vp(DDPM, steps, score, sde, x_T, g),
    ),
    "pc reverse_diffusion+langevin (VE)": ("scorekit", "ve", 2, scorekit_pc(EPS_VE)),
    "pc ancestral (VE)": ("scorekit", "ve", 1, scorekit_pc(EPS_VE, predictor="ancestral", corrector=None)),
    "ScoreSdeVe PC (VE)": (
        "diffusers",
        "ve",
        2,
        lambda score, sde, x_T, steps, g: run_score_sde_ve(steps, score, sde, x_T, g),
    ),
}


# -- helpers -----------------------------------------------------------------------------------------
def table(
    title: str, rows: dict[str, dict[int, float | None]], nfes, digits=4, lib: dict | None = None
) -> str:
    head = "| sampler |" + (" library |" if lib else "") + "".join(f" NFE {n} |" for n in nfes)
    sep = "|---|" + ("---|" if lib else "") + "---|" * len(nfes)
    lines = [f"### {title}", "", head, sep]
    for name, vals in rows.items():
        cells = " | ".join(fmt(vals.get(n), digits) for n in nfes)
        lines.append(f"| {name} | " + (f"{lib[name]} | " if lib else "") + cells + " |")
    return "\n".join(lines) + "\n"


def finite_or_nan(x: torch.Tensor):
    return x if bool(torch.isfinite(x).all()) else None


# -- section 1: the mixture --------------------------------------------------------------------------
def mixture_section(args, nfes, out: list[str], curves: dict):
    mix = imbalanced_mixture()
    n = args.n
    true = mix.sample(n, gen(123))
    vp, ve = VPSDE(), VESDE()
    abar999 = DDIMScheduler().alphas_cumprod[-1].double().item()
    vp_d = VPSDE(
        beta_max=2 * (-math.log(abar999) - vp.beta_min) + vp.beta_min
    )  # abar(1) = abar_999, see docstring
    x_T = torch.randn(n, 2, generator=gen(0))

    ref_sk = ode_sample(
        mix.score_fn(vp), vp, None, x_T=x_T.double(), rtol=1e-9, atol=1e-9, eps=EPS_VP
    ).float()
    ref_df = run_diffusers_vp(DIFFUSERS_VP["DPMSolverMultistep (2M)"], 999, mix.score_fn(vp_d), vp_d, x_T)
    ref_df2 = run_diffusers_vp(DIFFUSERS_VP["UniPCMultistep"], 999, mix.score_fn(vp_d), vp_d, x_T)
    out.append(
        f"Converged references: scorekit dopri5 (rtol=atol=1e-9, float64); diffusers DPMSolverMultistep "
        f"999 steps (agrees with UniPC 999 steps to {(ref_df - ref_df2).abs().mean():.1e}). NaN: diffusers' "
        "DPMSolverMultistep and UniPC at 1000 steps, where their default 'linspace' spacing rounds two timesteps "
        "to 500 and the step size h = lambda_t - lambda_s is 0.\n"
    )

    err, sw, lib = {}, {}, {}
    for name, (library, per_step, run) in DETERMINISTIC_VP.items():
        sde = vp if library == "scorekit" else vp_d
        ref = ref_sk if library == "scorekit" else ref_df
        lib[name] = library
        err[name], sw[name] = {}, {}
        for nfe in nfes:
            steps = nfe // per_step
            if steps < 1:
                continue
            with torch.no_grad():
                x = run(mix.score_fn(sde), sde, x_T, steps, None)
            if finite_or_nan(x) is None:
                err[name][nfe] = sw[name][nfe] = float("nan")
                continue
            err[name][nfe] = (x - ref).abs().mean().item()
            sw[name][nfe] = sliced_wasserstein(x, true)
        print(f"  {name}: " + ", ".join(f"{k}: {fmt(v)}" for k, v in err[name].items()), flush=True)
    out.append(
        table(
            "Mixture, deterministic: mean |x - x_ref| against the library's own converged ODE solution "
            "(VP, DDPM linear schedule)",
            err,
            nfes,
            lib=lib,
        )
    )
    curves["mixture_err"] = (err, lib)

    # dopri5: the tolerance, not the NFE, is the knob
    lines = [
        "### Mixture, adaptive dopri5 (scorekit)",
        "",
        "| rtol = atol | NFE | mean abs err | sliced W |",
        "|---|---|---|---|",
    ]
    dopri = {}
    for tol in args.dopri_tols:
        score = count_nfe(mix.score_fn(vp))
        x = ode_sample(score, vp, None, x_T=x_T, rtol=tol, atol=tol, eps=EPS_VP)
        e = (x - ref_sk).abs().mean().item()
        dopri[score.nfe] = e
        lines.append(f"| {tol:g} | {score.nfe} | {fmt(e)} | {fmt(sliced_wasserstein(x, true))} |")
    out.append("\n".join(lines) + "\n")
    curves["dopri5"] = dopri

    share, lib_s = {}, {}
    for name, (library, which, per_step, run) in STOCHASTIC.items():
        sde = {"vp": vp if library == "scorekit" else vp_d, "ve": ve}[which]
        lib_s[name] = library
        sw[name], share[name] = {}, {}
        for nfe in nfes:
            steps = nfe // per_step
            if steps < 1:
                continue
            g = gen(1)
            x_T_s = sde.prior_sampling((n, 2), generator=gen(0))
            with torch.no_grad():
                x = run(mix.score_fn(sde), sde, x_T_s, steps, g)
            if finite_or_nan(x) is None:
                sw[name][nfe] = share[name][nfe] = float("nan")
                continue
            sw[name][nfe] = sliced_wasserstein(x, true)
            share[name][nfe] = (mix.classify(x) == 2).float().mean().item()
        print(f"  {name}: " + ", ".join(f"{k}: {fmt(v)}" for k, v in sw[name].items()), flush=True)
    lib.update(lib_s)
    floors = torch.tensor([sliced_wasserstein(mix.sample(n, gen(7 + i)), true) for i in range(10)])
    floor = floors.mean().item()
    out.append(
        table(
            f"Mixture, sliced Wasserstein to {n} true samples (noise floor: fresh true sample sets are "
            f"{floor:.4f} +- {floors.std():.4f} away; the deterministic rows share one x_T)",
            sw,
            nfes,
            lib=lib,
        )
    )
    out.append(
        table(
            "Mixture, stochastic samplers: share of the rare mode (true 0.05; std error "
            f"{math.sqrt(0.05 * 0.95 / n):.4f})",
            share,
            nfes,
            lib=lib_s,
        )
    )
    curves["mixture_sw"] = (sw, lib, floor)


# -- section 2: wall time per NFE --------------------------------------------------------------------
class TimedScore:
    def __init__(self, score_fn):
        self.score_fn, self.seconds, self.nfe = score_fn, 0.0, 0

    def __call__(self, x, t):
        t0 = time.perf_counter()
        out = self.score_fn(x, t)
        self.seconds += time.perf_counter() - t0
        self.nfe += 1
        return out


def timing_section(args, out: list[str]):
    mix = imbalanced_mixture()
    vp, ve = VPSDE(), VESDE()
    runs = {name: entry[-1] for name, entry in {**DETERMINISTIC_VP, **STOCHASTIC}.items()}
    pairs = [  # scorekit, diffusers, SDE, steps (100 NFE each)
        ("dpm_solver_2m", "DPMSolverMultistep (2M)", vp, 100),
        ("ode euler", "EulerDiscrete", vp, 100),
        ("pc ancestral (VP)", "DDPM ancestral (VP)", vp, 100),
        ("pc reverse_diffusion+langevin (VE)", "ScoreSdeVe PC (VE)", ve, 50),
    ]
    n = args.timing_n
    lines = [
        f"### Wall time per NFE at 100 NFE (batch {n}, float32; runs interleaved, best of {args.repeats})",
        "",
        "| scorekit | diffusers | scorekit ms/NFE | diffusers ms/NFE | ratio | scorekit overhead ms/NFE "
        "| diffusers overhead ms/NFE | overhead ratio |",
        "|---|---|---|---|---|---|---|---|",
    ]

    def measure(name, sde, steps) -> tuple[float, float]:
        score = TimedScore(mix.score_fn(sde))
        t0 = time.perf_counter()
        with torch.no_grad():
            runs[name](score, sde, sde.prior_sampling((n, 2), generator=gen(0)), steps, gen(1))
        wall = time.perf_counter() - t0
        return wall / score.nfe, (wall - score.seconds) / score.nfe

    for sk_name, df_name, sde, steps in pairs:
        # alternate the two so that both see the same machine load; keep each one's best
        times = [(measure(sk_name, sde, steps), measure(df_name, sde, steps)) for _ in range(args.repeats)]
        sk = [min(t[0][i] for t in times) for i in (0, 1)]
        df = [min(t[1][i] for t in times) for i in (0, 1)]
        lines.append(
            f"| {sk_name} | {df_name} | {sk[0] * 1e3:.3f} | {df[0] * 1e3:.3f} | {sk[0] / df[0]:.2f} "
            f"| {sk[1] * 1e3:.3f} | {df[1] * 1e3:.3f} | {sk[1] / df[1]:.2f} |"
        )
        print("  " + lines[-1], flush=True)
    out.append(
        "\n".join(lines) + "\n\nOverhead is the wall time outside the score function (the sampler's "
        "own arithmetic, input checks and the scheduler bookkeeping). `ode euler` runs through torchdiffeq, "
        "whose solver machinery adds to the overhead.\n"
    )


# -- section 3: digits -------------------------------------------------------------------------------
def digits_model(args) -> ScoreModel:
    model, args.digits_trained = digits_teacher(net=args.digits_net, hidden=args.digits_hidden, steps=args.digits_steps,
                                                cache=args.digits_dir, progress=args.progress)
    return model


def digits_section(args, nfes, out: list[str], curves: dict):
    model = digits_model(args)
    sde = model.sde
    real, _ = load_digits("all")
    n = args.digits_n
    x_T = torch.randn(n, 1, 8, 8, generator=gen(0))
    det = [
        "dpm_solver_2m",
        "ode euler",
        "ode rk4",
        "DDIM",
        "EulerDiscrete",
        "DPMSolverMultistep (2M)",
        "UniPCMultistep",
    ]
    sto = ["pc reverse_diffusion+langevin (VP)", "pc ancestral (VP)", "DDPM ancestral (VP)"]
    with torch.no_grad():
        ref_sk = ode_sample(model, sde, None, x_T=x_T, rtol=1e-6, atol=1e-6, eps=EPS_VP)
        ref_df = run_diffusers_vp(DIFFUSERS_VP["DPMSolverMultistep (2M)"], 999, model, sde, x_T)
    fd, err, lib = {}, {}, {}
    for name in det + sto:
        library, per_step, run = (
            DETERMINISTIC_VP[name]
            if name in DETERMINISTIC_VP
            else (STOCHASTIC[name][0],) + STOCHASTIC[name][2:]
        )
        lib[name] = library
        fd[name], err[name] = {}, {}
        for nfe in nfes:
            steps = nfe // per_step
            if steps < 1:
                continue
            with torch.no_grad():
                x = run(model, sde, x_T, steps, gen(1))
            if finite_or_nan(x) is None:
                fd[name][nfe] = float("nan")
                continue
            fd[name][nfe] = fd_digits(x.clamp(-1, 1), real)
            if name in det:
                err[name][nfe] = (x - (ref_sk if library == "scorekit" else ref_df)).abs().mean().item()
        print(f"  {name}: " + ", ".join(f"{k}: {fmt(v, 2)}" for k, v in fd[name].items()), flush=True)
    floor = fd_digits(load_digits("train")[0], load_digits("test")[0])
    out.append(
        f"Digits model: {describe_teacher(args.digits_net, args.digits_hidden)} eps-prediction on VP, "
        f"{args.digits_trained} Trainer steps (EMA weights). "
        "Samples are clamped to [-1, 1] for FD-digits only.\n"
    )
    out.append(
        table(
            f"Digits, FD-digits of {n} samples to the 1797 real digits (train-vs-test split: {floor:.2f})",
            fd,
            nfes,
            digits=2,
            lib=lib,
        )
    )
    out.append(
        table(
            "Digits, deterministic: mean |x - x_ref| against the library's own converged solution",
            {k: v for k, v in err.items() if v},
            nfes,
            lib=lib,
        )
    )
    curves["digits_fd"] = (fd, lib)


# -- plot and main -----------------------------------------------------------------------------------
def plot(curves: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = []  # (title, rows, lib, names, extra)
    if "mixture_err" in curves:
        err, lib = curves["mixture_err"]
        panels.append(("mixture, deterministic: mean |x - x_ref|", err, lib, list(err), "dopri5"))
        sw, lib, floor = curves["mixture_sw"]
        panels.append(("mixture, stochastic: sliced W", sw, lib, [k for k in sw if k not in err], floor))
    if "digits_fd" in curves:
        fd, lib = curves["digits_fd"]
        panels.append(("digits: FD-digits", fd, lib, list(fd), None))
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 5), squeeze=False)
    colors = plt.get_cmap("tab20").colors
    for ax, (title, rows, lib, names, extra) in zip(axes[0], panels):
        for i, name in enumerate(names):
            pts = sorted(
                (k, v) for k, v in rows[name].items() if v is not None and math.isfinite(v) and v > 0
            )
            if pts:
                scorekit = lib[name] == "scorekit"
                ax.plot(
                    *zip(*pts),
                    color=colors[i % len(colors)],
                    marker="o" if scorekit else "s",
                    ms=3,
                    ls="-" if scorekit else "--",
                    label=f"{name} ({lib[name]})",
                )
        if extra == "dopri5" and curves.get("dopri5"):
            ax.plot(
                *zip(*sorted(curves["dopri5"].items())), "k*", label="dopri5 at rtol 1e-2..1e-5 (scorekit)"
            )
        elif isinstance(extra, float):
            ax.axhline(extra, color="gray", lw=0.8, ls=":", label="noise floor (true vs true)")
        ax.set(xscale="log", yscale="log", xlabel="NFE", title=title)
        ax.legend(fontsize=6)
    fig.suptitle("scorekit (solid) vs diffusers (dashed) on the same score")
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=120)
    tmp.replace(path)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=4000, help="mixture samples per run")
    p.add_argument("--nfe", type=int, nargs="+", default=list(NFES))
    p.add_argument("--quick", action="store_true", help="1000 samples, NFE up to 100, short digits training")
    p.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=SECTIONS, help="what to run")
    p.add_argument("--digits-steps", type=int, default=2000, help="Trainer steps for the digits model")
    p.add_argument("--digits-net", choices=["unet", "mlp"], default="unet", help="the digits teacher's network")
    p.add_argument("--digits-hidden", type=int, default=256, help="width of the digits MLP (--digits-net mlp)")
    p.add_argument("--digits-n", type=int, default=500, help="digits samples per run")
    p.add_argument(
        "--digits-dir",
        type=Path,
        default=Path("outputs/bench_samplers_digits"),
        help="where the trained digits model is cached (one folder per width; delete to retrain)",
    )
    p.add_argument("--dopri-tols", type=float, nargs="+", default=[1e-2, 1e-3, 1e-4, 1e-5])
    p.add_argument("--repeats", type=int, default=7, help="timing repeats (best is kept)")
    p.add_argument("--timing-n", type=int, default=1000, help="batch size of the timing runs")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--progress", action="store_true")
    p.add_argument("--out", type=Path, default=RESULTS / "samplers.md")
    args = p.parse_args(argv)
    if args.quick:
        args.n, args.nfe, args.digits_n, args.digits_steps = 1000, [n for n in args.nfe if n <= 100], 300, 500
    if args.threads:
        torch.set_num_threads(args.threads)
    nfes = sorted(args.nfe)
    flags = " ".join(sys.argv[1:] if argv is None else argv)
    docs = "see its docstring for the discrete-to-continuous time mapping and peer settings"
    out = [
        "# Samplers benchmark: scorekit vs diffusers on the same score",
        "",
        f"Written by `python -m benchmarks.samplers {flags}`; {docs}. "
        f"torch {torch.__version__}, {torch.get_num_threads()} thread(s).",
        "",
    ]
    curves: dict = {}
    t0 = time.perf_counter()
    sections = {
        "mixture": lambda: mixture_section(args, nfes, out, curves),
        "timing": lambda: timing_section(args, out),
        "digits": lambda: digits_section(args, nfes, out, curves),
    }
    for name in SECTIONS:
        if name in args.sections:
            t1 = time.perf_counter()
            print(f"{name} ...", flush=True)
            sections[name]()
            print(f"{name} done in {time.perf_counter() - t1:.0f} s", flush=True)
    out.append(f"Total run time {time.perf_counter() - t0:.0f} s.\n")
    text = "\n".join(out)
    print("\n" + text)
    write_results(args.out, text)
    if curves:  # the timing section alone has nothing to plot
        plot(curves, args.out.with_suffix(".png"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
