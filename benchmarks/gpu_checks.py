"""The checks that need a CUDA GPU, prepared as one run for a session that is lent one.

1. **No host-device synchronisation per sampler step** (sampling issue): with
   ``torch.cuda.set_sync_debug_mode("warn")``, ``pc_sample`` (reverse diffusion + Langevin; ancestral),
   ``ode_sample`` (rk4) and DPM-Solver++(2M) sample a ``UNet2DModel`` read by ``from_diffusers`` on the GPU;
   every synchronising call warns, and the count is set against what the samplers allow themselves: the
   NaN check's one read-back every ``CHECK_EVERY`` score evaluations and at the end.
2. **Reduced precision** (pretrained-pipelines issue): ``from_diffusers(dir, dtype=float16 | bfloat16)`` of a tiny
   Stable-Diffusion pipeline, DPM-Solver++(2M) with 20 steps and classifier-free guidance: the sampler state
   stays float32 and the latents are compared with the float32 model's on the same noise.
3. **SaRA's memory at Stable Diffusion scale** (SaRA issue): ``benchmarks.sara_sd --width 1 --device cuda``
   (``torch.cuda.max_memory_allocated``; results in ``sara_sd_cuda.md``).
4. **Loop overhead on the GPU**: ``benchmarks.overhead --device cuda`` (results in ``overhead_cuda.md``).

    python -m benchmarks.gpu_checks                          # CUDA: about 5 minutes on one GPU
    python -m benchmarks.gpu_checks --device cpu --quick     # dry run of sections 1-2 (no sync mode on CPU)

diffusers, transformers, peft and accelerate may be missing on a lent machine: download their wheels here
(``pip download diffusers transformers peft accelerate safetensors --no-deps -d wheels``), carry the folder, and
``pip install --no-deps wheels/*.whl`` there first. Writes ``benchmarks/results/gpu_checks.md``.
"""

from __future__ import annotations

import argparse
import math
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import torch

from ._harness import RESULTS, fmt, gen, markdown_table, seed_all, write_results

SYNC_MESSAGE = "called a synchronizing CUDA operation"


def count_syncs(fn) -> int:
    """Synchronising CUDA calls made while ``fn()`` runs (``set_sync_debug_mode("warn")`` warns at each)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
            torch.cuda.synchronize()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum(SYNC_MESSAGE in str(w.message) for w in caught)


def sync_rows(device: str, quick: bool) -> list[list[str]]:
    from diffusers import DDPMScheduler

    from samplers import ode_sample, pc_sample
    from samplers._common import CHECK_EVERY
    from scorekit import from_diffusers
    from scorekit.nets import make_unet

    seed_all(0)
    size, batch, steps = (16, 2, 8) if quick else (32, 16, 64)
    unet = make_unet(size, 3, (32, 64), layers_per_block=1).eval().requires_grad_(False)
    model = from_diffusers((unet, DDPMScheduler(num_train_timesteps=1000))).to(device)
    sde, eps, shape = model.sde, model.sde.sampling_eps, (batch, 3, size, size)
    cases = [
        ("pc_sample, reverse diffusion + Langevin", 2 * steps,
         lambda: pc_sample(model, sde, shape, steps=steps, eps=eps, generator=gen(0, device), device=device)),
        ("pc_sample, ancestral", steps,
         lambda: pc_sample(model, sde, shape, predictor="ancestral", corrector=None, steps=steps, eps=eps,
                           generator=gen(0, device), device=device)),
        ("ode_sample, rk4", 4 * steps,
         lambda: ode_sample(model, sde, shape, method="rk4", steps=steps, eps=eps, generator=gen(0, device),
                            device=device)),
        ("ode_sample, DPM-Solver++(2M)", steps,
         lambda: ode_sample(model, sde, shape, method="dpm_solver_2m", steps=steps, eps=eps,
                            generator=gen(0, device), device=device)),
    ]
    rows = []
    for name, evals, fn in cases:
        fn()  # warm-up: one-off set-up (device tables, kernels) is not a per-step cost
        allowed = math.ceil(evals / CHECK_EVERY) + 1
        syncs = count_syncs(fn) if device.startswith("cuda") else None
        verdict = "—" if syncs is None else ("ok" if syncs <= allowed else "MORE than allowed")
        rows.append([name, str(steps), str(evals), "n/a (CPU)" if syncs is None else str(syncs), str(allowed),
                     verdict])
    return rows


def precision_rows(device: str, quick: bool) -> list[list[str]]:
    from samplers import ode_sample
    from scorekit import from_diffusers
    from scorekit.testing import tiny_sd

    prompts = ["a cat", "a red dog"]
    dtypes = [torch.float16, torch.bfloat16] if device.startswith("cuda") else [torch.bfloat16]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tiny_sd(Path(tmp) / "sd")
        ref_model = from_diffusers(Path(tmp) / "sd").to(device)
        x_T = torch.randn(len(prompts), *ref_model.data_shape, generator=gen(0)).to(device)

        def sample(model):
            score = model.condition(prompt=prompts, guidance_scale=3.0)
            return ode_sample(score, model.sde, None, method="dpm_solver_2m", steps=8 if quick else 20,
                              eps=model.sde.sampling_eps, x_T=x_T)

        with torch.no_grad():
            ref = sample(ref_model)
            for dtype in dtypes:
                model = from_diffusers(Path(tmp) / "sd", dtype=dtype).to(device)
                out = sample(model)
                net = next(model.net.parameters()).dtype
                rel = float((out - ref).abs().mean() / ref.abs().mean())
                rows.append([str(dtype).replace("torch.", ""), str(net).replace("torch.", ""),
                             str(out.dtype).replace("torch.", ""), str(bool(torch.isfinite(out).all())), fmt(rel)])
    return rows


def run_module(module: str, *args: str) -> str:
    done = subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True)
    if done.returncode != 0:
        return f"`python -m {module} {' '.join(args)}` failed:\n\n```\n{done.stderr[-2000:]}\n```\n"
    return f"`python -m {module} {' '.join(args)}`: done (see its results file).\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--quick", action="store_true", help="small sizes (a dry run of the script)")
    p.add_argument("--skip", nargs="*", default=[], choices=["sara", "overhead"], help="sections 3-4 to leave out")
    args = p.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("no CUDA device here: run with --device cpu --quick for a dry run")
    where = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    print("1/4 syncs per sampler run", flush=True)
    syncs = sync_rows(args.device, args.quick)
    print("2/4 reduced precision", flush=True)
    precision = precision_rows(args.device, args.quick)
    extra = []
    if args.device.startswith("cuda") and not args.quick:
        if "sara" not in args.skip:
            print("3/4 SaRA memory at SD scale", flush=True)
            extra.append(run_module("benchmarks.sara_sd", "--width", "1", "--device", args.device, "--out",
                                    str(RESULTS / "sara_sd_cuda.md")))
        if "overhead" not in args.skip:
            print("4/4 loop overhead", flush=True)
            extra.append(run_module("benchmarks.overhead", "--device", args.device))
    text = (f"# Checks on a GPU ({where}, torch {torch.__version__}{', QUICK dry run' if args.quick else ''})\n\n"
            "## Host-device synchronisations per sampler run (set_sync_debug_mode)\n\n"
            + markdown_table(["sampler", "steps", "score evaluations", "synchronising calls",
                              "allowed (NaN read-back every k + end)", "verdict"], syncs)
            + "\n## Reduced-precision networks, float32 sampler state (DPM-Solver++(2M), guidance 3)\n\n"
            + markdown_table(["from_diffusers dtype", "network dtype", "sampler state dtype", "finite",
                              "mean |x - x_fp32| / mean |x_fp32|"], precision)
            + ("\n## Sections 3-4\n\n" + "\n".join(extra) if extra else ""))
    print(text)
    write_results(RESULTS / ("gpu_checks_quick.md" if args.quick else "gpu_checks.md"), text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
