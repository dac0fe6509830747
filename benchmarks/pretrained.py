"""Few-step samplers on a pretrained text-to-image pipeline: scorekit's DPM-Solver++(2M) against diffusers'.

On a tiny Stable-Diffusion-style pipeline built here (random weights: CLIP text encoder, AutoencoderKL,
UNet2DConditionModel; the scaled-linear table of Stable Diffusion), with classifier-free guidance on two
prompts, every sampler starts from the same latents. Each library is measured against its own converged
probability-flow ODE: scorekit's dopri5 at rtol = atol = 1e-6 (then the table's first-step x0), diffusers'
DPMSolverMultistep with 1000 steps. Errors are mean |x - x_ref| of the final latents at 5 / 10 / 20 / 50
NFE (one guided network evaluation each), all diffusers schedulers with ``timestep_spacing="trailing"`` and
a last step to the clean sample (``final_sigmas_type="zero"``, DDIM's ``set_alpha_to_one``); scorekit's rows
take ``n - 1`` solver steps down to the table's first timestep (where its reference ends too) and a last
first-order step from there to ``t = 0``, which is the x0 estimate there. The network's outputs are not a trained noise estimate, so this is a
test of the solvers on a hard, rough ODE, not of image quality.

    python -m benchmarks.pretrained            # about 3 minutes on 2 CPU cores
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import warnings
import zlib
from pathlib import Path

import torch

from samplers import dpm_solver_2m, ode_sample, solver_time_grid
from scorekit import from_diffusers, tweedie_denoise
from scorekit.checkpoint import load_tensors, save_tensors
from scorekit.testing import tiny_sd

from ._harness import CACHE, RESULTS, fmt, gen, markdown_table, write_results

NFES = (5, 10, 20, 50)
# eight samples, so that one unlucky latent does not decide a row
PROMPTS = ["a cat", "a red dog", "a lake", "a horse", "fruit", "a city", "an old man", "a blue car"]


def rounded_timesteps(model):
    """The same model (shared weights) with its network fed diffusers' rounding of each time to an integer
    timestep, as DPMSolverMultistep does with Karras sigmas: the control row, scorekit's solver on diffusers' ODE."""
    rounded = copy.copy(model)
    read = model.network_time
    rounded.network_time = lambda t: read(t).round() if torch.is_tensor(t) else float(round(read(t)))
    return rounded


def diffusers_run(pipe, scheduler, steps: int, x_T: torch.Tensor, scale: float) -> torch.Tensor:
    pipe.scheduler = scheduler
    return pipe(PROMPTS, guidance_scale=scale, num_inference_steps=steps, latents=x_T.clone(), output_type="latent",
                eta=0.0).images


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--scale", type=float, default=3.0, help="classifier-free guidance scale")
    p.add_argument("--out", type=Path, default=RESULTS / "pretrained.md")
    args = p.parse_args(argv)
    import diffusers

    warnings.filterwarnings("ignore", category=FutureWarning)
    with tempfile.TemporaryDirectory() as tmp:
        pipe = tiny_sd(Path(tmp) / "sd")
        pipe.set_progress_bar_config(disable=True)
        model = from_diffusers(Path(tmp) / "sd")
    config = pipe.scheduler.config
    trailing = dict(timestep_spacing="trailing")
    schedulers = {
        "DPMSolverMultistep (2M)": lambda: diffusers.DPMSolverMultistepScheduler.from_config(
            config, **trailing, final_sigmas_type="zero"),
        "DPMSolverMultistep (2M, Karras sigmas)": lambda: diffusers.DPMSolverMultistepScheduler.from_config(
            config, **trailing, final_sigmas_type="zero", use_karras_sigmas=True),
        "UniPC": lambda: diffusers.UniPCMultistepScheduler.from_config(config, **trailing, final_sigmas_type="zero"),
        "DDIM": lambda: diffusers.DDIMScheduler.from_config(config, **trailing, set_alpha_to_one=True),
    }
    x_T = torch.randn(len(PROMPTS), *model.data_shape, generator=gen(0))
    score = model.condition(prompt=PROMPTS, guidance_scale=args.scale)
    sde, eps = model.sde, model.sde.sampling_eps
    cache = CACHE / f"pretrained_refs_w{args.scale:g}_{zlib.crc32(repr(PROMPTS).encode()):08x}.safetensors"
    with torch.no_grad():
        if cache.is_file():  # the converged solutions are the slow part; the pipeline is rebuilt identically
            refs, _ = load_tensors(cache)
            ref_ours, ref_theirs = refs["scorekit"], refs["diffusers"]
        else:
            print("scorekit's converged ODE ...", flush=True)
            ref_ours = tweedie_denoise(score, sde, ode_sample(score, sde, None, x_T=x_T, eps=eps, rtol=1e-6,
                                                              atol=1e-6), eps)
            print("diffusers' converged ODE ...", flush=True)
            ref_theirs = diffusers_run(pipe, schedulers["DPMSolverMultistep (2M)"](), 1000, x_T, args.scale)
            save_tensors({"scorekit": ref_ours, "diffusers": ref_theirs}, cache)
        rows: dict[str, dict[int, float]] = {}
        for grid in ("quadratic", "logsnr", "time_uniform", "karras"):
            name = f"scorekit DPM-Solver++(2M), {grid} grid"
            rows[name] = {}
            for n in NFES:
                # n - 1 steps down to eps, then the first-order step from eps to t = 0, which is the x0 at eps
                # the reference ends with (diffusers' grids likewise end at the table's first timestep, then 0)
                ts = torch.cat([solver_time_grid(sde, n - 1, eps, grid), torch.zeros(1, dtype=torch.float64)])
                rows[name][n] = float((dpm_solver_2m(score, sde, x_T, ts) - ref_ours).abs().mean())
            print(f"  {name}: " + ", ".join(f"{n}: {fmt(v)}" for n, v in rows[name].items()), flush=True)
        control = "scorekit DPM-Solver++(2M), karras grid, network at diffusers' rounded timesteps (vs diffusers' reference)"
        rounded = rounded_timesteps(model).condition(prompt=PROMPTS, guidance_scale=args.scale)
        rows[control] = {}
        for n in NFES:
            ts = torch.cat([solver_time_grid(sde, n - 1, eps, "karras"), torch.zeros(1, dtype=torch.float64)])
            rows[control][n] = float((dpm_solver_2m(rounded, sde, x_T, ts) - ref_theirs).abs().mean())
        print(f"  {control}: " + ", ".join(f"{n}: {fmt(v)}" for n, v in rows[control].items()), flush=True)
        for name, make in schedulers.items():
            rows[f"diffusers {name}"] = {n: float((diffusers_run(pipe, make(), n, x_T, args.scale) - ref_theirs)
                                                  .abs().mean()) for n in NFES}
            print(f"  diffusers {name}: " + ", ".join(f"{n}: {fmt(v)}" for n, v in rows[f'diffusers {name}'].items()),
                  flush=True)
    gap = float((ref_ours - ref_theirs).abs().mean())
    table = markdown_table(["sampler", *(f"NFE {n}" for n in NFES)],
                           [[name, *(fmt(v[n]) for n in NFES)] for name, v in rows.items()])
    best = {n: min(v[n] for k, v in rows.items() if k.startswith("diffusers")) for n in NFES}
    ours = {n: min(v[n] for k, v in rows.items() if k.startswith("scorekit") and k != control) for n in NFES}
    verdict = ", ".join(f"{n} NFE: scorekit {fmt(ours[n])} vs diffusers' best {fmt(best[n])}" for n in NFES)
    text = f"""# Few-step samplers on a pretrained pipeline (tiny Stable-Diffusion layout, random weights)

Written by `python -m benchmarks.pretrained` (torch {torch.__version__}, {torch.get_num_threads()} thread(s)).
Classifier-free guidance scale {args.scale}, prompts {PROMPTS}, latents {tuple(x_T.shape)}; errors are mean |x - x_ref|
of the final latents against each library's own converged ODE (see the script's docstring). The two converged
ODEs differ by {fmt(gap)} (mean |.|), the gap between the two libraries' readings of one model.

{table}
Target: scorekit at least as accurate as diffusers' best at 10 and 20 NFE. {verdict}.

Every scorekit row takes n - 1 solver steps down to the table's first timestep and a last first-order step to
t = 0 (the x0 there), the grid diffusers' Karras row uses and the point where the converged reference ends. With
Karras' grid the two libraries then run the same algorithm; what is left between their rows is diffusers'
rounding of each Karras time to an integer timestep (the network sees integer timesteps, the update uses the
unrounded sigma), which scorekit does not do: its network sees the fractional timestep the grid asks for, as
the continuous table SDE defines it. The control row shows it: scorekit's solver with the network fed
diffusers' rounded timesteps, measured against diffusers' own reference, gives
{", ".join(fmt(rows[control][n]) for n in NFES)} at {" / ".join(map(str, NFES))} NFE, diffusers' Karras row
({", ".join(fmt(rows["diffusers DPMSolverMultistep (2M, Karras sigmas)"][n]) for n in NFES)}). The two
libraries' solvers are the same on the same ODE; the rows above differ by which ODE the network's timestep
reading defines (the control is left out of the verdict). Plot: `pretrained.png`.
"""
    print(text)
    write_results(args.out, text)
    plot(rows, args.out.with_suffix(".png"))
    return 0


def plot(rows: dict[str, dict[int, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for name, values in rows.items():
        ax.loglog(list(values), list(values.values()), marker="o", ls="-" if name.startswith("scorekit") else "--",
                  label=name)
    ax.set_xlabel("NFE")
    ax.set_ylabel("mean |x - x_ref| (latents)")
    ax.set_title("error to each library's converged ODE")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
