"""Noise2Score against BM3D, non-local means and wavelet shrinkage on scikit-image's bundled images.

The score networks see **noisy images only**: noisy copies of the training images are drawn once, and
AR-DAE learns from patches of them. The test images (camera, astronaut, coins) are never seen in
training; every method is scored on their central ``--crop`` x ``--crop`` pixels (256: BM3D takes
about 20 s per 256^2 image on one core, so full 512^2 images do not fit a CPU run). Settings follow
the paper's Table 2 where it has them:

- Gaussian noise sigma = 15, 25, 50 (8-bit units): ONE network, trained on the noisy training images
  at all three levels, serves every level; only sigma^2 in Tweedie's formula changes. Blind mode
  (sigma estimated by the code's TV grid search) is reported on the same network.
- Poisson noise zeta = 0.01 (y = zeta Poisson(x / zeta)); baselines run on the Anscombe transform with
  the closed-form exact unbiased inverse (Makitalo & Foi 2011), i.e. Anscombe + BM3D.
- Gamma noise k = 50 (y = x Gamma(k, 1/k)); baselines run on log(y) (variance trigamma(k), bias
  digamma(k) - log k removed) and exponentiate back.

BM3D gets the true noise level; NL-means uses h = 0.8 sigma, 7x7 patches, distance 11 (fast mode);
wavelet is BayesShrink (db1, soft) with the true sigma. "supervised" is the paper's SL column for the
Gaussian rows: the same network trained on the same patches with their clean targets. PSNR/SSIM are on
outputs clipped to [0, 1] (``scorekit.metrics``, which match scikit-image). CPU only:

    python -m benchmarks.noise2score            # full run (~35 min of training + 5 min on one core)
    python -m benchmarks.noise2score --quick    # smoke run: tiny training, one test image
    # on two cores: train in two processes, then evaluate (trained networks are cached under --cache)
    python -m benchmarks.noise2score --train-only gaussian & python -m benchmarks.noise2score \
        --train-only supervised poisson gamma; wait; python -m benchmarks.noise2score
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from scipy import special

from scorekit.checkpoint import load_json, save_json
from scorekit.data import load_image
from scorekit.metrics import psnr, ssim
from scorekit.noise2score import Noise2Score, ScoreUNet, _extract_patches, _random_dihedral, _step_decay
from scorekit.training import TrainConfig, Trainer

from ._harness import RESULTS, gen, seed_all, write_results

TRAIN = ("coffee", "chelsea", "rocket", "brick", "grass", "gravel", "moon", "page", "text")
TEST = ("camera", "astronaut", "coins")
GAUSSIAN_SIGMAS = (15, 25, 50)
POISSON_ZETA = 0.01
GAMMA_K = 50.0
CLASSICAL = ("BM3D", "NL-means", "wavelet")
METHODS = ("noisy", "Noise2Score", "supervised", *CLASSICAL)


# -- noise -----------------------------------------------------------------------------------------
def add_noise(x: torch.Tensor, noise: str, level: float, rng: np.random.Generator) -> torch.Tensor:
    """A noisy copy of ``x`` (float32, [0, 1] units); Gaussian noise is not clipped."""
    a = x.double().numpy()
    if noise == "gaussian":
        y = a + level * rng.standard_normal(a.shape)
    elif noise == "poisson":
        y = level * rng.poisson(a / level)
    else:
        y = a * rng.gamma(level, 1 / level, a.shape)
    return torch.from_numpy(y).float()


# -- classical baselines ---------------------------------------------------------------------------
def _anscombe_inverse(d: np.ndarray) -> np.ndarray:
    """Closed-form approximation of the exact unbiased inverse Anscombe transform (Makitalo & Foi 2011)."""
    d = np.maximum(d, 0.8)
    return 0.25 * d**2 + 0.25 * math.sqrt(1.5) / d - 11 / 8 / d**2 + 5 / 8 * math.sqrt(1.5) / d**3 - 0.125


def classical(method: str, y: np.ndarray, noise: str, level: float) -> np.ndarray:
    """``method`` in (BM3D, NL-means, wavelet) on one grayscale image ``(H, W)``, through a variance-stabilising
    transform for Poisson (Anscombe) and Gamma (log) noise."""
    import bm3d
    from skimage.restoration import denoise_nl_means, denoise_wavelet

    if noise == "gaussian":
        v, sigma = y, level
    elif noise == "poisson":
        v, sigma = 2 * np.sqrt(y / level + 3 / 8), 1.0
    else:
        v = np.log(np.maximum(y, 1e-6)) - (special.digamma(level) - math.log(level))
        sigma = math.sqrt(special.polygamma(1, level))
    if method == "BM3D":
        d = bm3d.bm3d(v, sigma_psd=sigma)
    elif method == "NL-means":
        d = denoise_nl_means(v, patch_size=7, patch_distance=11, h=0.8 * sigma, sigma=sigma, fast_mode=True)
    else:
        d = denoise_wavelet(v, sigma=sigma, wavelet="db1", mode="soft", method="BayesShrink", rescale_sigma=True)
    if noise == "poisson":
        return level * _anscombe_inverse(d)
    return np.exp(d) if noise == "gamma" else d


# -- Noise2Score -------------------------------------------------------------------------------------
def _config(steps: int, args) -> TrainConfig:
    return TrainConfig(steps=steps, batch_size=args.batch_size, lr=args.lr, betas=(0.9, 0.999), grad_clip=None,
                       ema_decay=0.999, seed=args.seed, progress=args.progress, checkpoint_every=0, log_every=50)


def train(noise: str, noisy: list[torch.Tensor], level, steps: int, args) -> tuple[Noise2Score, float]:
    seed_all(args.seed)
    scale = level if noise == "poisson" else 1.0  # the Poisson network sees counts; this keeps its inputs in [0, 1]
    model = Noise2Score(ScoreUNet(1, args.width, args.depth, input_scale=scale), noise)
    t0 = time.perf_counter()
    model.fit(noisy, level, config=_config(steps, args), patch_size=args.patch_size, n_patches=args.n_patches,
              anneal_steps=int(args.anneal * steps))
    return model, time.perf_counter() - t0


def train_supervised(noisy: list[torch.Tensor], clean: list[torch.Tensor], sigmas: list[float], steps: int,
                     args) -> tuple[Noise2Score, float]:
    """The paper's "SL" column: the same network, patches, optimiser and schedule, but trained on clean targets
    with denoising score matching, ``|| R(y) - (x - y) / sigma^2 ||^2``. Its minimiser is the score of the
    noisy data, so Tweedie's formula applies unchanged, and it weights the score error of every noise level
    alike, as AR-DAE does; the ``sigma^2``-weighted form usual in diffusion models spends the network on
    sigma 50 instead (camera, sigma 15 / 25 / 50: 27.7 / 23.2 / 23.3 dB, against AR-DAE's 30.0 / 26.5 / 23.1).
    The gap to it is what learning from noisy images alone costs."""
    seed_all(args.seed)
    net = ScoreUNet(1, args.width, args.depth)
    stacks = [torch.cat([y, x, torch.full_like(y, s)]) for y, x, s in zip(noisy, clean, sigmas)]
    data = _extract_patches(stacks, args.patch_size, args.n_patches, gen(args.seed))

    def dsm(model, batch, generator):
        batch = _random_dihedral(batch, generator)
        y, x, s = batch[:, :1], batch[:, 1:2], batch[:, 2:3]
        return (model(y) - (x - y) / s**2).square().mean()

    cfg = _config(steps, args)
    t0 = time.perf_counter()
    trainer = Trainer(net, dsm, data, cfg, callbacks=[_step_decay(cfg.lr, steps // 2)])
    trainer.train()
    net.load_state_dict(trainer.ema.state_dict())
    return Noise2Score(net.eval(), "gaussian"), time.perf_counter() - t0


def cached(name: str, steps: int, args, fit: Callable[[], tuple[Noise2Score, float]]) -> tuple[Noise2Score, float]:
    """``fit()``, or the network an earlier run with the same settings saved under ``args.cache``
    (with its training time), so that re-running the evaluation does not re-train."""
    key = (f"{name}-w{args.width}-d{args.depth}-steps{steps}-lr{args.lr:g}-b{args.batch_size}-p{args.patch_size}"
           f"-n{args.n_patches}-anneal{args.anneal:g}-seed{args.seed}")
    path, timing = args.cache / f"{key}.safetensors", args.cache / f"{key}.json"
    if path.exists() and timing.exists():
        print(f"loaded {path}", flush=True)
        return Noise2Score.load(path), load_json(timing)["seconds"]
    model, took = fit()
    args.cache.mkdir(parents=True, exist_ok=True)
    model.save(path)
    save_json({"seconds": took}, timing)  # written last: its presence marks a complete entry
    return model, took


def center_crop(x: torch.Tensor, size: int) -> torch.Tensor:
    """The central ``size x size`` pixels of ``x`` (all of it for ``size`` 0)."""
    if not size:
        return x
    top, left = (x.shape[-2] - size) // 2, (x.shape[-1] - size) // 2
    return x[..., top : top + size, left : left + size]


def scores(clean: torch.Tensor, est: torch.Tensor) -> tuple[float, float]:
    a, b = clean[None].double(), est.clamp(0, 1)[None].double()
    return psnr(a, b, 1.0).item(), ssim(a, b, 1.0).item()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke run: 30 steps, camera only, no baselines but BM3D")
    ap.add_argument("--gaussian-steps", type=int, default=6000)
    ap.add_argument("--steps", type=int, default=3000, help="training steps of the Poisson and Gamma networks")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--patch-size", type=int, default=48)
    ap.add_argument("--n-patches", type=int, default=4096)
    ap.add_argument("--width", type=int, default=32)
    ap.add_argument("--depth", type=int, default=3)
    ap.add_argument("--lr", type=float, default=1e-3,
                    help="Adam learning rate (3e-3 diverged late in the sigma_a annealing)")
    ap.add_argument("--supervised", action=argparse.BooleanOptionalAction, default=True,
                    help="also train the supervised (clean-target) network for the Gaussian rows")
    ap.add_argument("--crop", type=int, default=256, help="test on the central crop x crop pixels (0: whole images)")
    ap.add_argument("--anneal", type=float, default=0.5, help="share of the steps over which sigma_a is annealed")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--progress", action="store_true")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--train-only", nargs="+", choices=("gaussian", "supervised", "poisson", "gamma"),
                    help="train (and cache) only these networks, then stop: run several at once on a multi-core "
                         "machine, then once more without it to evaluate")
    ap.add_argument("--cache", type=Path, default=Path("outputs/bench_noise2score"),
                    help="trained networks are saved here and reused by runs with the same settings")
    args = ap.parse_args()
    if args.quick:
        args.gaussian_steps = args.steps = 30
    test_names = TEST[:1] if args.quick else TEST
    torch.set_num_threads(max(1, torch.get_num_threads()))
    rng = np.random.default_rng(0)
    clean_train = [load_image(n) for n in TRAIN]
    clean_test = {n: center_crop(load_image(n), args.crop) for n in test_names}

    # -- train on noisy images only ------------------------------------------------------------------
    settings = [("gaussian", s / 255, f"Gaussian sigma {s}") for s in GAUSSIAN_SIGMAS]
    settings += [("poisson", POISSON_ZETA, f"Poisson zeta {POISSON_ZETA}"), ("gamma", GAMMA_K, f"Gamma k {GAMMA_K:g}")]
    gauss_noisy = [add_noise(x, "gaussian", s / 255, rng) for s in GAUSSIAN_SIGMAS for x in clean_train]
    models, train_time = {}, {}
    poisson_noisy = [add_noise(x, "poisson", POISSON_ZETA, rng) for x in clean_train]
    gamma_noisy = [add_noise(x, "gamma", GAMMA_K, rng) for x in clean_train]
    sigmas = [s / 255 for s in GAUSSIAN_SIGMAS for _ in clean_train]
    jobs = {
        "gaussian": (args.gaussian_steps, lambda: train("gaussian", gauss_noisy, None, args.gaussian_steps, args)),
        "supervised": (args.gaussian_steps, lambda: train_supervised(
            gauss_noisy, clean_train * len(GAUSSIAN_SIGMAS), sigmas, args.gaussian_steps, args)),
        "poisson": (args.steps, lambda: train("poisson", poisson_noisy, POISSON_ZETA, args.steps, args)),
        "gamma": (args.steps, lambda: train("gamma", gamma_noisy, GAMMA_K, args.steps, args)),
    }
    if not args.supervised:
        del jobs["supervised"]
    for name, (steps, fit) in jobs.items():
        if not args.train_only or name in args.train_only:
            models[name], train_time[name] = cached(name, steps, args, fit)
    if args.train_only:
        return
    for k, v in train_time.items():
        print(f"trained {k} network in {v:.0f} s", flush=True)

    # -- evaluate ----------------------------------------------------------------------------------
    rows: dict[tuple[str, str], dict[str, tuple[float, float]]] = {}
    blind: dict[tuple[str, int], tuple[float, float]] = {}
    panel: dict[str, dict[str, np.ndarray]] = {}
    method_time = {m: 0.0 for m in METHODS[1:] if m != "supervised" or "supervised" in models}
    baselines = CLASSICAL[:1] if args.quick else CLASSICAL
    for noise, level, label in settings:
        for name, x in clean_test.items():
            y = add_noise(x, noise, level, rng)
            res = {"noisy": scores(x, y)}
            t0 = time.perf_counter()
            ours = models[noise].denoise(y, level)
            method_time["Noise2Score"] += time.perf_counter() - t0
            res["Noise2Score"] = scores(x, ours)
            outs = {"Noise2Score": ours}
            if noise == "gaussian" and "supervised" in models:
                t0 = time.perf_counter()
                res["supervised"] = scores(x, models["supervised"].denoise(y, level))
                method_time["supervised"] += time.perf_counter() - t0
            for m in baselines:
                t0 = time.perf_counter()
                d = torch.from_numpy(classical(m, y[0].double().numpy(), noise, level)).float()[None]
                method_time[m] += time.perf_counter() - t0
                res[m] = scores(x, d)
                outs[m] = d
            rows[(label, name)] = res
            if noise == "gaussian":
                est, info = models[noise].denoise(y, None, return_info=True)
                blind[(name, round(level * 255))] = (info["levels"][0] * 255, scores(x, est)[0])
            if name == "camera" and label in ("Gaussian sigma 25", f"Poisson zeta {POISSON_ZETA}", f"Gamma k {GAMMA_K:g}"):
                panel[label] = {"noisy": y[0].numpy(), "Noise2Score": outs["Noise2Score"][0].numpy(),
                                "BM3D": outs["BM3D"][0].numpy(), "clean": x[0].numpy()}
            print(label, name, {k: f"{v[0]:.2f}/{v[1]:.3f}" for k, v in res.items()}, flush=True)

    report = render(rows, blind, train_time, method_time, args, test_names)
    print(report)
    args.out.mkdir(parents=True, exist_ok=True)
    suffix = "_quick" if args.quick else ""
    write_results(args.out / f"noise2score{suffix}.md", report)
    plot(panel, args.out / f"noise2score{suffix}.png")


def render(rows, blind, train_time, method_time, args, test_names) -> str:
    methods = [m for m in METHODS if any(m in r for r in rows.values())]
    lines = [
        "# Noise2Score benchmark (CPU)",
        "",
        f"Score networks trained on noisy copies of {', '.join(TRAIN)} only; tested on {', '.join(test_names)} "
        f"({f'central {args.crop}x{args.crop} crops' if args.crop else 'whole images'}; every method on the same pixels).",
        f"Network: ScoreUNet(width={args.width}, depth={args.depth}, unshuffle=2; Poisson: input_scale=zeta), AR-DAE with antithetic pairs, "
        f"batch {args.batch_size} x {args.patch_size}^2 patches, Adam lr {args.lr}, EMA 0.999, sigma_a annealed over "
        f"the first {args.anneal:.0%} of the steps.",
        "",
        "Training time: " + ", ".join(
            f"{k} {v / 60:.1f} min ({args.steps if k in ('poisson', 'gamma') else args.gaussian_steps} steps)"
            for k, v in train_time.items()),
        "One Gaussian network serves sigma 15, 25 and 50 (only sigma^2 in Tweedie's formula changes). "
        "'supervised' is the paper's SL baseline: the same network and schedule trained on the same noisy patches "
        "with their clean targets (denoising score matching), then the same Tweedie formula.",
        "",
        "## PSNR (dB) / SSIM, outputs clipped to [0, 1]",
        "",
        "| noise | image | " + " | ".join(methods) + " |",
        "|---" * (len(methods) + 2) + "|",
    ]
    labels = list(dict.fromkeys(label for label, _ in rows))
    for label in labels:
        names = [n for (lab, n) in rows if lab == label]
        for n in names:
            r = rows[(label, n)]
            lines.append(f"| {label} | {n} | " + " | ".join(
                f"{r[m][0]:.2f} / {r[m][1]:.3f}" if m in r else "—" for m in methods) + " |")
        mean = {m: (np.mean([rows[(label, n)][m][0] for n in names]), np.mean([rows[(label, n)][m][1] for n in names]))
                for m in methods if m in rows[(label, names[0])]}
        lines.append(f"| {label} | **mean** | " + " | ".join(
            f"**{mean[m][0]:.2f}** / {mean[m][1]:.3f}" if m in mean else "—" for m in methods) + " |")
    gap = {}
    for label in labels:
        names = [n for (lab, n) in rows if lab == label]
        if all("BM3D" in rows[(label, n)] for n in names):
            gap[label] = np.mean([rows[(label, n)]["Noise2Score"][0] - rows[(label, n)]["BM3D"][0] for n in names])
    lines += ["", "Noise2Score minus BM3D, mean PSNR: " + ", ".join(f"{k}: {v:+.2f} dB" for k, v in gap.items())]
    sl = {label: np.mean([rows[(label, n)]["Noise2Score"][0] - rows[(label, n)]["supervised"][0]
                          for n in test_names]) for label in labels if "supervised" in rows[(label, test_names[0])]}
    if sl:
        lines += ["", "Noise2Score minus supervised, mean PSNR: " + ", ".join(f"{k}: {v:+.2f} dB" for k, v in sl.items())]
    lines += [""]
    lines += ["## Blind mode (sigma estimated by the code's Charbonnier-TV grid search, 6..55/255)", "",
              "| image | true sigma | estimated sigma | error | PSNR blind | PSNR known sigma |", "|---|---|---|---|---|---|"]
    for (n, s), (est, p) in blind.items():
        known = rows[(f"Gaussian sigma {s}", n)]["Noise2Score"][0]
        lines.append(f"| {n} | {s} | {est:.0f} | {est - s:+.0f} | {p:.2f} | {known:.2f} |")
    lines += ["", "## Denoising time, all test images and settings (s)", "",
              "| " + " | ".join(method_time) + " |", "|---" * len(method_time) + "|",
              "| " + " | ".join(f"{v:.1f}" for v in method_time.values()) + " |", ""]
    return "\n".join(lines)


def plot(panel: dict[str, dict[str, np.ndarray]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = ("noisy", "Noise2Score", "BM3D", "clean")
    fig, axes = plt.subplots(len(panel), 4, figsize=(12, 3.1 * len(panel)), squeeze=False)
    for r, (label, imgs) in enumerate(panel.items()):
        for c, key in enumerate(cols):
            ax = axes[r, c]
            img = np.clip(imgs[key], 0, 1)
            ax.imshow(img, cmap="gray", vmin=0, vmax=1)
            ref = imgs["clean"][None, None]
            title = key if key == "clean" else f"{key} {psnr(torch.from_numpy(ref).double(), torch.from_numpy(img[None, None]).double(), 1.0).item():.2f} dB"
            ax.set_title(title, fontsize=9)
            ax.set_xticks([])
            ax.set_yticks([])
        axes[r, 0].set_ylabel(label, fontsize=9)
    fig.suptitle("camera (central crop); Noise2Score trained on other noisy images only")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
