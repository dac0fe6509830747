"""Loop overhead of the samplers and the Trainer, against the code they replace, in one run.

1. **Reference samplers** at equal NFE on the same score network: ``pc_sample`` (reverse diffusion +
   Langevin, one corrector step) against score_sde's ``pc_sampler`` loop (``ReverseDiffusionPredictor`` +
   ``LangevinCorrector``, written out below as ``sampling.py`` does it), and ``ode_sample`` (dopri5) against
   score_sde's ``ode_sampler`` (``scipy.integrate.solve_ivp`` RK45 on flattened numpy arrays). The ODE
   solvers pick their own steps, so the ratio is of seconds per score evaluation. Each contender runs in fresh
   processes (``--rounds``, interleaved), since in a shared process the C heap's state decides the ratio
   (``in_processes``).
2. **diffusers' scheduler loop** on the same ``UNet2DModel`` (64 x 3 x 32 x 32): ``pc_sample`` with the
   ancestral predictor against ``DDPMScheduler``, ``dpm_solver_2m`` against ``DPMSolverMultistepScheduler``;
   overhead = loop time minus the time of the same network calls alone, per step; and the same loops on a stub
   network (a fixed noise estimate of the UNet's output shape), where the loop's own work is all there is.
3. **Trainer vs bare loop**: ``benchmarks.training.run_variant`` (steps/s), against the bare loop with the same
   AdamW, gradient clipping and EMA (``bare+clip+ema``); ``bare`` (AdamW alone) for scale; fresh processes as 1.
4. **Host reads per step**: ``Tensor.item`` / ``tolist`` / ``__bool__`` calls from ``samplers/`` per sampler step
   (the every-k NaN check is the only one left).

    python -m benchmarks.overhead                 # CPU, a few minutes on 2 cores (--unet: also the real UNet, +10 min)
    python -m benchmarks.overhead --device cuda   # a minute or two
    python -m benchmarks.overhead --quick         # smoke run (seconds; numbers not meaningful)

Writes ``benchmarks/results/overhead.md`` (``overhead_cuda.md`` on a GPU). A ratio <= 1 means scorekit is no slower.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch

from ._harness import RESULTS, child_result, fmt, gen, markdown_table, seed_all, write_results

ROOT = Path(__file__).resolve().parents[1]


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed_together(fns, device: str, repeats: int) -> list[tuple[object, float]]:
    """``(result, fastest seconds)`` of each of ``fns`` over ``repeats`` runs after a warm-up, the runs interleaved
    (one of each per round, the order rotating), so that a slow spell of a shared machine hits every contender of a
    ratio alike."""
    results: list = [None] * len(fns)
    best = [math.inf] * len(fns)
    for r in range(repeats + 1):  # round 0 is the warm-up
        for i in (list(range(len(fns)))[r % len(fns):] + list(range(len(fns)))[: r % len(fns)]):
            start = time.perf_counter()
            results[i] = fns[i]()
            _sync(device)
            if r:
                best[i] = min(best[i], time.perf_counter() - start)
    return list(zip(results, best))


# -- 1. score_sde's reference samplers, written out as its sampling.py does ----------------------
def reference_pc(score_fn, sde, shape, snr: float, eps: float, device: str) -> torch.Tensor:
    """score_sde ``pc_sampler`` with ``ReverseDiffusionPredictor`` and ``LangevinCorrector`` (n_steps=1) on a
    VP SDE: its discretization ties every step to ``sde.N`` (``timestep = (t (N - 1) / T).long()``)."""
    N = sde.N
    betas = torch.linspace(sde.beta_min / N, sde.beta_max / N, N, device=device)
    alphas = 1.0 - betas
    with torch.no_grad():
        x = sde.prior_sampling(shape, device=device)
        timesteps = torch.linspace(sde.T, eps, N, device=device)
        for i in range(N):
            t = timesteps[i]
            vec_t = torch.ones(shape[0], device=t.device) * t
            # corrector (LangevinCorrector.update_fn)
            timestep = (vec_t * (N - 1) / sde.T).long()
            alpha = alphas[timestep]
            grad = score_fn(x, vec_t)
            noise = torch.randn_like(x)
            grad_norm = torch.norm(grad.reshape(grad.shape[0], -1), dim=-1).mean()
            noise_norm = torch.norm(noise.reshape(noise.shape[0], -1), dim=-1).mean()
            step_size = (snr * noise_norm / grad_norm) ** 2 * 2 * alpha
            view = (-1,) + (1,) * (x.ndim - 1)
            x_mean = x + step_size.view(view) * grad
            x = x_mean + torch.sqrt(step_size * 2).view(view) * noise
            # predictor (ReverseDiffusionPredictor.update_fn on rsde.discretize)
            timestep = (vec_t * (N - 1) / sde.T).long()
            beta = betas[timestep]
            f = torch.sqrt(1 - beta).view(view) * x - x
            G = torch.sqrt(beta)
            rev_f = f - G.view(view) ** 2 * score_fn(x, vec_t)
            z = torch.randn_like(x)
            x_mean = x - rev_f
            x = x_mean + G.view(view) * z
    return x_mean


def reference_ode(score_fn, sde, shape, eps: float, rtol: float, atol: float, device: str):
    """score_sde ``ode_sampler``: RK45 of ``scipy.integrate.solve_ivp`` on flattened numpy arrays."""
    from scipy import integrate

    with torch.no_grad():
        x = sde.prior_sampling(shape, device=device)
        rsde = sde.reverse(score_fn, probability_flow=True)

        def ode_func(t, x):
            x = torch.from_numpy(x.reshape(shape)).to(device).type(torch.float32)
            vec_t = torch.ones(shape[0], device=x.device) * t
            drift = rsde.sde(x, vec_t)[0]
            return drift.detach().cpu().numpy().reshape((-1,)).astype(np.float64)

        solution = integrate.solve_ivp(ode_func, (sde.T, eps), x.detach().cpu().numpy().reshape((-1,)),
                                       rtol=rtol, atol=atol, method="RK45")
        x = torch.tensor(solution.y[:, -1]).reshape(shape).to(device).type(torch.float32)
    return x, solution.nfev


def digits_score(device: str, hidden: int):
    from scorekit import VPSDE, ScoreModel
    from scorekit.nets import MLP

    seed_all(0)
    sde = VPSDE(N=100)
    return ScoreModel(MLP((1, 8, 8), hidden=hidden, depth=3), sde).to(device).eval().requires_grad_(False), sde


def reference_case(case: str, device: str, batch: int, steps: int, repeats: int, hidden: int) -> dict:
    """One contender of section 1 in this process: ``{"seconds": fastest run, "nfe": per run, "faults": minor
    page faults per run}`` after a warm-up run."""
    from samplers import count_nfe, ode_sample, pc_sample
    from scorekit import VPSDE

    model, _ = digits_score(device, hidden)
    sde = VPSDE(N=steps)
    shape = (batch, 1, 8, 8)
    counted = count_nfe(model)
    run = {"pc": lambda: (pc_sample(model, sde, shape, steps=steps, generator=gen(0, device), device=device),
                          2 * steps),
           "pc_ref": lambda: (reference_pc(model, sde, shape, 0.16, 1e-3, device), 2 * steps),
           "ode": lambda: (ode_sample(counted, sde, shape, rtol=1e-3, atol=1e-3, generator=gen(0, device),
                                      device=device), None),
           "ode_ref": lambda: reference_ode(model, sde, shape, 1e-3, 1e-3, 1e-3, device)}[case]
    best, faults, nfe = math.inf, [], 0
    for r in range(repeats + 1):  # run 0 is the warm-up
        counted.reset()
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        start = time.perf_counter()
        _, nfe = run()
        _sync(device)
        if r:
            best = min(best, time.perf_counter() - start)
            faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    return {"seconds": best, "nfe": counted.nfe if nfe is None else nfe, "faults": sorted(faults)[len(faults) // 2]}


def in_processes(cases: list[str], args: list[str], rounds: int) -> dict[str, list[dict]]:
    """Each case's child results over ``rounds`` fresh processes (``python -m benchmarks.overhead --child CASE``),
    the rounds interleaved with the order rotating.

    A fresh process per run because the timing of these loops depends on the state of the C heap: in one
    process the allocator's heuristics settle (or do not) into trimming and re-faulting the network's
    activations, so two loops doing the same tensor work differ by tens of thousands of minor page faults
    per run depending on what ran before them. Each contender gets its own fresh heaps; the rows pair the
    processes of one round and report the median of those ratios.
    """
    runs: dict[str, list[dict]] = {case: [] for case in cases}
    for r in range(rounds):
        for case in cases[r % len(cases):] + cases[: r % len(cases)]:
            runs[case].append(child_result("benchmarks.overhead", case, *args))
    return runs


def _fastest(runs: list[dict]) -> dict:
    return min(runs, key=lambda r: r["seconds"])


def _median(values: list[float]) -> float:
    # the ratio of a round pairs two processes run one after the other: robust to drift, and the median to the
    # one process whose heap happened to settle well
    return float(np.median(values))


def reference_rows(args: list[str], rounds: int) -> list[list[str]]:
    runs = in_processes(["pc", "pc_ref", "ode", "ode_ref"], args, rounds)
    rows = []
    for name, ours, ref in (("PC (reverse diffusion + Langevin)", "pc", "pc_ref"),
                            ("probability-flow ODE (dopri5 vs RK45, rtol 1e-3)", "ode", "ode_ref")):
        a, b = _fastest(runs[ours]), _fastest(runs[ref])
        ratios = [(x["seconds"] / x["nfe"]) / (y["seconds"] / y["nfe"]) for x, y in zip(runs[ours], runs[ref])]
        rows.append([name, str(a["nfe"]), str(b["nfe"]), fmt(a["seconds"] / a["nfe"] * 1e3),
                     fmt(b["seconds"] / b["nfe"] * 1e3), fmt(_median(ratios), 3), ", ".join(fmt(r, 3) for r in ratios),
                     f"{a['faults']} / {b['faults']}"])
    return rows


# -- 2. diffusers' scheduler loops on one UNet2DModel ---------------------------------------------
def _diffusers_pair(unet, scheduler, kind: str, shape, steps: int, device: str, repeats: int):
    """``(network, diffusers loop, scorekit loop)`` seconds for one scheduler and its scorekit counterpart."""
    from samplers import ode_sample, pc_sample
    from scorekit import from_diffusers

    model = from_diffusers((unet, scheduler))
    scheduler.set_timesteps(steps)
    timesteps = list(scheduler.timesteps)
    x0 = torch.randn(shape, generator=gen(0)).to(device)

    @torch.no_grad()
    def network_only():
        for t in timesteps:
            _ = unet(x0, t).sample

    @torch.no_grad()
    def diffusers_loop():
        scheduler.set_timesteps(steps)
        x = x0
        for t in scheduler.timesteps:
            eps = unet(x, t).sample
            x = scheduler.step(eps, t, x, generator=gen(1, device)).prev_sample
        return x

    def scorekit_loop():
        if kind == "pc":
            return pc_sample(model, model.sde, shape, predictor="ancestral", corrector=None, steps=steps,
                             eps=model.sde.sampling_eps, x_T=x0, generator=gen(1, device))
        return ode_sample(model, model.sde, shape, method="dpm_solver_2m", steps=steps, x_T=x0,
                          eps=model.sde.sampling_eps)

    return tuple(t for _, t in timed_together([network_only, diffusers_loop, scorekit_loop], device, repeats))


def _stub(unet, shape, device: str):
    """The UNet with its forward replaced by a fixed noise estimate of ``shape``: the loops then cost only their
    own work (scheduler math, Python), measured directly instead of as a small difference of large times."""
    eps = torch.randn(shape, generator=gen(2)).to(device)
    stub = copy.deepcopy(unet)

    def forward(sample, timestep, *args, return_dict: bool = True, **kwargs):
        from diffusers.models.unets.unet_2d import UNet2DOutput

        return UNet2DOutput(sample=eps) if return_dict else (eps,)

    stub.forward = forward
    return stub


def diffusers_rows(device: str, batch: int, size: int, steps: int, repeats: int, channels,
                   real_unet: bool) -> list[list[str]]:
    from diffusers import DDPMScheduler, DPMSolverMultistepScheduler

    from scorekit.nets import make_unet

    seed_all(0)
    shape = (batch, 3, size, size)
    unet = make_unet(size, 3, channels, layers_per_block=2).to(device).eval().requires_grad_(False)
    pairs = [("ancestral PC vs DDPMScheduler", lambda: DDPMScheduler(num_train_timesteps=1000, clip_sample=False),
              "pc"),
             ("DPM-Solver++(2M) vs DPMSolverMultistepScheduler",
              lambda: DPMSolverMultistepScheduler(num_train_timesteps=1000, algorithm_type="dpmsolver++",
                                                  solver_order=2), "dpm")]
    rows = []
    networks = [("UNet", unet)] if real_unet else []
    for network, net in (*networks, ("stub", _stub(unet, shape, device))):
        # the stub costs nothing, so its loops run 10x the steps and twice the repeats: millisecond loops are noisy
        n, reps = (steps, repeats) if network == "UNet" else (10 * steps, 2 * repeats)
        for name, scheduler, kind in pairs:
            t_net, t_diff, t_ours = _diffusers_pair(net, scheduler(), kind, shape, n, device, reps)
            o_diff, o_ours = (t_diff - t_net) / n, (t_ours - t_net) / n
            ratio = o_ours / o_diff if o_diff > 0 else math.nan
            rows.append([name, network, str(n), fmt(t_net / n * 1e3), fmt(o_ours * 1e3), fmt(o_diff * 1e3),
                         fmt(ratio, 3)])
    return rows


# -- 3. Trainer vs bare loop -----------------------------------------------------------------------
def trainer_rows(args: list[str], rounds: int) -> list[list[str]]:
    # the target compares with the loop doing the Trainer's math (AdamW, clipping, EMA); "bare" (AdamW only) shows
    # what clipping and EMA cost in themselves; each variant in its own fresh processes, as the samplers
    variants = ["bare", "bare+clip+ema", "Trainer"]
    runs = in_processes(variants, args, rounds)
    rows = []
    for v in variants:
        ratios = [x["seconds"] / y["seconds"] for x, y in zip(runs[v], runs["bare+clip+ema"])]
        rows.append([v, fmt(1 / _fastest(runs[v])["seconds"], 1), fmt(_median(ratios), 3),
                     ", ".join(fmt(r, 3) for r in ratios), ", ".join(str(round(x["faults"])) for x in runs[v])])
    return rows


def trainer_case(variant: str, device: str, steps: int) -> dict:
    """One Trainer variant in this process: seconds per optimiser step (``benchmarks.training.run_variant``)."""
    from .training import run_variant

    run = run_variant(variant, "mlp", steps, 10, 128, device)
    return {"seconds": 1 / run["steps_per_s"], "faults": run["faults_per_step"]}


# -- 4. host reads per step ------------------------------------------------------------------------
def count_reads(fn) -> int:
    """``Tensor.item`` / ``tolist`` / ``__bool__`` calls made from ``samplers/`` files while ``fn()`` runs."""
    root, count = str(ROOT / "samplers"), [0]
    originals = {name: getattr(torch.Tensor, name) for name in ("item", "tolist", "__bool__")}

    def wrap(original):
        def counted(tensor, *args):
            if sys._getframe(1).f_code.co_filename.startswith(root):
                count[0] += 1
            return original(tensor, *args)

        return counted

    try:
        for name, original in originals.items():
            setattr(torch.Tensor, name, wrap(original))
        fn()
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)
    return count[0]


def read_rows(steps: int) -> list[list[str]]:
    from samplers import ode_sample, pc_sample
    from samplers._common import CHECK_EVERY
    from scorekit import VPSDE
    from scorekit.data import imbalanced_mixture

    sde, mix = VPSDE(), imbalanced_mixture()
    score = mix.score_fn(sde)
    cases = [("pc_sample (corrector + predictor)", 2 * steps,
              lambda: pc_sample(score, sde, (64, 2), steps=steps, generator=gen(0))),
             ("ode_sample rk4", 4 * steps, lambda: ode_sample(score, sde, (64, 2), method="rk4", steps=steps)),
             ("ode_sample dpm_solver_2m", steps,
              lambda: ode_sample(score, sde, (64, 2), method="dpm_solver_2m", steps=steps))]
    rows = []
    for name, evals, fn in cases:
        reads = count_reads(fn)
        rows.append([name, str(steps), str(reads), str(math.ceil(evals / CHECK_EVERY) + 1)])
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per loop; the fastest counts")
    p.add_argument("--rounds", type=int, default=3,
                   help="fresh processes per contender of the sampler-vs-reference and Trainer ratios")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run, not a measurement")
    p.add_argument("--unet", action=argparse.BooleanOptionalAction, default=None,
                   help="also time the loops around the real UNet (default: on CUDA only; on a CPU its seconds per "
                        "step bury the overhead in noise, and the stub rows measure it)")
    args = p.parse_args(argv)
    quick, dev, rep = args.quick, args.device, args.repeats if not args.quick else 1
    ref_batch, ref_steps, hidden = (8, 5, 32) if quick else (256, 200, 512)
    unet_batch, size, unet_steps = (2, 16, 3) if quick else (64, 32, 20)
    channels = (32, 32) if quick else (64, 128, 256)
    train_steps = 5 if quick else 200
    if args.child:
        result = (trainer_case(args.child, dev, train_steps) if args.child in ("bare", "bare+clip+ema", "Trainer")
                  else reference_case(args.child, dev, ref_batch, ref_steps, rep, hidden))
        print(json.dumps(result))
        return 0
    child_args = ["--device", dev, "--repeats", str(rep), *(["--quick"] if quick else [])]
    rounds = 1 if quick else args.rounds

    print("1/4 reference samplers", flush=True)
    ref = reference_rows(child_args, rounds)
    print("2/4 diffusers loops", flush=True)
    real_unet = args.unet if args.unet is not None else dev.startswith("cuda")
    diff = diffusers_rows(dev, unet_batch, size, unet_steps, rep, channels, real_unet)
    print("3/4 Trainer vs bare loop", flush=True)
    train = trainer_rows(child_args, rounds)
    print("4/4 host reads per step", flush=True)
    reads = read_rows(10 if quick else 200)

    text = (f"# Loop overhead (device {dev}, torch {torch.__version__}, {torch.get_num_threads()} threads"
            f"{', QUICK smoke run: numbers not meaningful' if quick else ''})\n\n"
            f"## Samplers vs score_sde's reference code (MLP {hidden}x3 on 1x8x8, batch {ref_batch})\n\n"
            f"Each contender runs in {rounds} fresh processes (interleaved), {rep} timed runs each after a warm-up, the\n"
            "fastest run of each process counting; a round's ratio pairs the two processes it ran, the ratio is their\n"
            "median. The page faults (minor, per run, of each side's fastest process) show the C heap's part in the\n"
            "spread (see `in_processes`).\n\n"
            + markdown_table(["sampler", "NFE scorekit", "NFE reference", "ms/NFE scorekit", "ms/NFE reference",
                              "ratio, median of rounds (<= 1: no slower)", "ratio per round",
                              "page faults scorekit / reference"],
                             ref)
            + f"\n## Sampler overhead vs diffusers' scheduler loop (UNet2DModel {list(channels)} on "
              f"{unet_batch}x3x{size}x{size})\n\n"
            + "Overhead = loop time minus the same network calls alone, per step. With the stub network (the UNet's\n"
              "forward replaced by a fixed noise estimate of the same shape) the loops cost only their own work, so\n"
              "the overhead is measured directly; with the real UNet it is a small difference of two large times.\n\n"
            + markdown_table(["loop", "network", "steps", "network ms/step", "scorekit overhead ms/step",
                              "diffusers overhead ms/step", "ratio (<= 1: no more overhead)"], diff)
            + f"\n## Trainer vs bare loop (benchmarks.training.run_variant, MLP on digits, {train_steps} steps, "
              f"{rounds} fresh processes each, paired by round, the median ratio counts)\n\n"
            + markdown_table(["variant", "steps/s", "time per step vs bare+clip+ema, median of rounds (target <= 1.05)",
                              "ratio per round", "minor page faults per step, per round"], train)
            + "\n## Host reads (item / tolist / bool) from samplers/ per run, exact 2-D mixture score: none per "
              "step beyond the every-k NaN check (and a few tolist calls on the host grid at set-up)\n\n"
            + markdown_table(["sampler", "steps", "reads (grid set-up + NaN checks)", "NaN checks (every k + end)"],
                             reads))
    print(text)
    device_tag = "" if dev == "cpu" else "_" + dev.split(":")[0]  # a GPU run keeps the CPU table
    write_results(RESULTS / f"overhead{'_quick' if quick else ''}{device_tag}.md", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
