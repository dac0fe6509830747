"""SaRA against LoRA (peft, same trainable budget) and full fine-tuning of a digits score model.

A VP score model (scorekit's MLP) is pre-trained with the Trainer on digits 0-4, then fine-tuned on
digits 5-9 only, by each method with the same steps, batches, learning rate and seeds
(``scorekit.finetune``, the code behind ``scorekit finetune``). Reported per method:

- trainable parameters and adapter file size (SaRA: values + int32 indices; LoRA: peft's A/B; full:
  the whole model);
- peak training memory: the peak bytes of live tensors (weights, buffers, gradients, optimizer state,
  activations, temporaries) over three AdamW steps on one batch, counted exactly by a
  ``TorchDispatchMode`` that records every tensor storage an op creates and releases it when the
  storage is freed (``torch.cuda.max_memory_allocated`` on CUDA); next to it the analytic count of
  weights + buffers + gradients + AdamW's two moments. SaRA is measured with and without the
  unstructured backprop (``SaRAConfig(unstructured_backprop=False)``: ordinary autograd through a
  scatter, which keeps a dense copy of every adapted weight for the backward);
- step time: median over timed AdamW steps (no EMA), the methods timed in turn step by step so that
  a shared machine's load affects them alike;
- FD-digits of PC samples against all digits 5-9 (new classes), and the share of samples the digits
  classifier puts in 5-9;
- forgetting: FD-digits against digits 0-4 of *SDEdit reconstructions* of the digits 0-4: each old
  digit is diffused to ``t0`` and denoised back by the fine-tuned model (PC steps from ``t0``). An
  unconditional model fine-tuned on 5-9 samples 5-9, so its plain samples say nothing about whether
  it still knows 0-4; reconstructing them does. Also the share of reconstructions the classifier
  still labels with the original digit (at the default ``t0 = 0.3`` the base model keeps 53%; at 0.5
  it drops to chance, 20%, so the label share says nothing there).

    python -m benchmarks.sara            # default (~15 min on one loaded CPU core; base model cached)
    python -m benchmarks.sara --quick    # smoke run
    python -m benchmarks.sara --methods sara lora --lr_for sara=3e-3 lora=3e-4 --no-costs --name sara_lr

Writes ``benchmarks/results/<name>.md`` (table) and ``<name>.png`` (samples); ``name`` is ``sara`` by default.
"""

from __future__ import annotations

import argparse
import copy
import functools
import statistics
import tempfile
import time
import weakref
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from samplers import CORRECTORS, PREDICTORS, pc_sample, pc_step
from scorekit.config import DataConfig, ModelConfig, RunConfig, build_trainer, load_score_model
from scorekit.data import load_digits
from scorekit.fd_digits import digits_classifier, fd_digits
from scorekit.finetune import FinetuneConfig, make_finetune_trainer, prepare_model, write_outputs
from scorekit.losses import make_dsm_loss
from scorekit.sara import SaRAConfig, rank_penalty
from scorekit.training import TrainConfig

from ._harness import RESULTS, gen, seed_all, write_results

OLD, NEW = [0, 1, 2, 3, 4], [5, 6, 7, 8, 9]
METHODS = ("sara", "lora", "full")


class LiveTensorPeak(TorchDispatchMode):
    """Peak bytes of live tensor storages: those of ``tensors`` plus every storage an op creates inside
    the mode, each released when its storage is freed."""

    def __init__(self, tensors):
        super().__init__()
        self.live: dict[int, int] = {}
        self.now = self.peak = 0
        for t in tensors:
            self._add(t)

    def _add(self, t) -> None:
        if not isinstance(t, Tensor):
            return
        if t.layout == torch.sparse_coo:  # peft's SHiRA builds one: count its index and value storages
            self._add(t._indices())
            self._add(t._values())
            return
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key == 0 or key in self.live:
            return
        self.live[key] = storage.nbytes()
        self.now += storage.nbytes()
        self.peak = max(self.peak, self.now)
        weakref.finalize(storage, self._free, key)

    def _free(self, key: int) -> None:
        self.now -= self.live.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            self._add(t)
        return out


# -- models -------------------------------------------------------------------------------------------
def pretrain(args) -> Path:
    if args.net == "mlp":
        name, options = f"mlp{args.hidden}x{args.depth}", {"hidden": args.hidden, "depth": args.depth}
    else:
        name = "unet" + "-".join(map(str, args.unet_channels))
        options = {"block_out_channels": args.unet_channels, "layers_per_block": 1}
    out = args.cache / f"base-{name}-{args.pretrain_steps}"
    cfg = RunConfig(
        model=ModelConfig(net=args.net, options=options),
        data=DataConfig(name="digits", split="train", classes=OLD),
        training=TrainConfig(steps=args.pretrain_steps, batch_size=128, lr=1e-3, warmup=100, ema_decay=0.999,
                             checkpoint_every=0, progress=args.progress, seed=0),
        out_dir=str(out),
    )
    build_trainer(cfg).train()  # resumes (does nothing) when the cached run is complete
    return out


def finetune_config(args, method: str, out_dir: str, unstructured_backprop: bool = True) -> FinetuneConfig:
    lr = args.lr_for.get(method, args.lr)
    return FinetuneConfig(
        method=method,
        data=DataConfig(name="digits", split="train", classes=NEW),
        training=TrainConfig(steps=args.steps, batch_size=128, lr=lr, ema_decay=0.999, checkpoint_every=0,
                             progress=args.progress, seed=args.seed, resume=False),
        sara=SaRAConfig(fraction=None if args.threshold else args.fraction, threshold=args.threshold,
                        rank_lambda=args.rank_lambda,
                        progressive_step=int(args.progressive * args.steps) or None,
                        unstructured_backprop=unstructured_backprop),
        out_dir=out_dir,
    )


def _adamw_step(model: nn.Module, opt: torch.optim.Optimizer, dsm, batch: Tensor, g: torch.Generator,
                sara: bool) -> None:
    loss = dsm(model, batch, g)
    if sara:
        loss = loss + rank_penalty(model, g)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def training_step(args, base: nn.Module, x: Tensor, method: str, unstructured_backprop: bool = True,
                  prepare: Callable[[nn.Module], nn.Module] | None = None):
    """A fresh copy of ``base`` prepared for ``method`` (or by ``prepare``) and a closure running one AdamW step
    on one batch (with SaRA's rank penalty for ``method == "sara"``)."""
    cfg = finetune_config(args, method, "", unstructured_backprop)
    seed_all(0)
    model = prepare(copy.deepcopy(base)) if prepare is not None else prepare_model(copy.deepcopy(base), cfg)[0]
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.training.lr)
    batch = x[:128].clone()
    step = functools.partial(_adamw_step, model, opt, make_dsm_loss(base.sde), batch,
                             gen(0), method == "sara")
    return model, batch, step


def state_bytes(model: nn.Module) -> int:
    """Weights and buffers, plus a gradient and AdamW's two moments for every trainable entry."""
    stored = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    return stored + 3 * trainable


def peak_memory(args, base: nn.Module, x: Tensor, method: str, unstructured_backprop: bool = True,
                prepare: Callable[[nn.Module], nn.Module] | None = None) -> dict:
    """Peak live-tensor memory over three AdamW steps, and the analytic :func:`state_bytes`, in MiB."""
    model, batch, step = training_step(args, base, x, method, unstructured_backprop, prepare)
    if x.is_cuda:
        torch.cuda.reset_peak_memory_stats()
        for _ in range(3):
            step()
        peak = torch.cuda.max_memory_allocated()
    else:
        with LiveTensorPeak([*model.parameters(), *model.buffers(), batch]) as tracker:
            for _ in range(3):
                step()
        peak = tracker.peak
    return {"peak_mib": peak / 2**20, "state_mib": state_bytes(model) / 2**20}


def step_times(args, base: nn.Module, x: Tensor, variants: dict[str, tuple]) -> dict[str, float]:
    """Median AdamW step time (ms) of each ``name: (method, unstructured_backprop[, prepare])``, timed in turn."""
    steps = {name: training_step(args, base, x, *v)[2] for name, v in variants.items()}
    times: dict[str, list[float]] = {name: [] for name in variants}
    for i in range(3 + args.time_steps):
        for name, step in steps.items():
            t0 = time.perf_counter()
            step()
            if i >= 3:  # warm-up steps are not timed
                times[name].append(time.perf_counter() - t0)
    return {name: 1e3 * statistics.median(ts) for name, ts in times.items()}


# -- evaluation ---------------------------------------------------------------------------------------
@torch.no_grad()
def sdedit(model, x0: Tensor, t0: float, steps: int, generator: torch.Generator) -> Tensor:
    """Diffuse ``x0`` to time ``t0`` and denoise it back with PC steps on ``linspace(t0, eps, steps)``."""
    sde = model.sde
    mean, std = sde.marginal_prob(x0, torch.full((len(x0),), t0))
    x = mean + std.view(-1, 1, 1, 1) * torch.randn(x0.shape, generator=generator)
    step = pc_step(model, sde, PREDICTORS["reverse_diffusion"], CORRECTORS["langevin"], generator=generator)
    ts = torch.linspace(t0, 1e-3, steps)
    ts_next = torch.cat([ts[1:], ts.new_zeros(1)])
    for i in range(steps):
        x = step(x, ts[i], ts_next[i])
    return x


def evaluate(model, args, old: tuple[Tensor, Tensor], ref_new: Tensor, seed: int) -> dict:
    model.eval()
    classifier = digits_classifier()
    g = gen(seed)
    samples = pc_sample(model, model.sde, (args.n_samples, 1, 8, 8), steps=args.sample_steps, generator=g)
    recon = sdedit(model, old[0], args.t0, max(1, round(args.sample_steps * args.t0)), g)
    # Pixels outside [-1, 1] are a sampler's overshoot; the data (and the metrics) live in [-1, 1].
    samples, recon = samples.clamp(-1, 1), recon.clamp(-1, 1)
    with torch.no_grad():
        new_share = torch.isin(classifier(samples).argmax(1), torch.tensor(NEW)).float().mean().item()
        kept = (classifier(recon).argmax(1) == old[1]).float().mean().item()
    return {"fd_new": fd_digits(samples, ref_new), "new_share": new_share,
            "fd_old": fd_digits(recon, old[0]), "old_kept": kept, "samples": samples, "recon": recon}


# -- report -------------------------------------------------------------------------------------------
def table(rows: dict[str, dict]) -> str:
    lora = next((r for name, r in rows.items() if name.startswith("LoRA")), {})
    head = ("| method | trainable params | adapter file | peak train memory (MiB) | weights+grads+AdamW (MiB) | "
            "step time (ms) | FD-digits new 5-9 ↓ | samples in 5-9 | FD-digits old 0-4 ↓ (forgetting) | "
            "old digits kept |")
    lines = [head, "|" + "---|" * 10]

    def fmt(v, spec, ref=None):
        if v is None:
            return "—"
        s = format(v, spec)
        return f"{s} ({v / ref:.2f}× LoRA)" if ref else s

    for name, r in rows.items():
        ratio = r is not lora
        lines.append(
            f"| {name} | {fmt(r.get('trainable'), ',')} | "
            f"{fmt(r['adapter_kib'], '.1f') + ' KiB' if r.get('adapter_kib') is not None else '—'} | "
            f"{fmt(r.get('peak_mib'), '.2f', lora.get('peak_mib') if ratio and r.get('peak_mib') else None)} | "
            f"{fmt(r.get('state_mib'), '.2f')} | "
            f"{fmt(r.get('step_ms'), '.1f', lora.get('step_ms') if ratio and r.get('step_ms') else None)} | "
            f"{fmt(r.get('fd_new'), '.2f')} | {fmt(r.get('new_share'), '.0%')} | "
            f"{fmt(r.get('fd_old'), '.2f')} | {fmt(r.get('old_kept'), '.0%')} |"
        )
    return "\n".join(lines)


def figure(evals: dict[str, dict], old: Tensor, path: Path, k: int = 12) -> None:
    """Rows: the old digits, then each model; left: new-class samples, right: SDEdit reconstructions."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from scorekit.viz import image_grid

    rows = [("old digits 0-4", None, old[:k])] + [(n, e["samples"][:k], e["recon"][:k]) for n, e in evals.items()]
    fig, axes = plt.subplots(len(rows), 2, figsize=(9, 0.9 * len(rows)), squeeze=False)
    for (name, samples, recon), (left, right) in zip(rows, axes):
        for ax, imgs in ((left, samples), (right, recon)):
            ax.set_xticks([])
            ax.set_yticks([])
            if imgs is None:
                ax.axis("off")
            else:
                ax.imshow(image_grid(imgs, nrow=k, scale=4), cmap="gray", vmin=0, vmax=255)
        left.text(-0.02, 0.5, name, transform=left.transAxes, ha="right", va="center", fontsize=8)
    axes[1, 0].set_title("samples (should be 5-9)", fontsize=9)
    axes[0, 1].set_title("SDEdit reconstructions of the old digits (should stay 0-4)", fontsize=9)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def build_parser(description: str) -> argparse.ArgumentParser:
    """The options every SaRA benchmark shares (this one's and ``benchmarks.sara_peers``')."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="tiny settings for a smoke run")
    p.add_argument("--net", choices=("mlp", "unet"), default="mlp", help="the pre-trained score network")
    p.add_argument("--unet_channels", type=int, nargs="+", default=[16, 32, 32], help="--net unet: block_out_channels")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--depth", type=int, default=3)
    p.add_argument("--pretrain_steps", type=int, default=4000)
    p.add_argument("--steps", type=int, default=2000, help="fine-tuning steps (all methods)")
    p.add_argument("--lr", type=float, default=1e-3, help="fine-tuning learning rate (all methods)")
    p.add_argument("--lr_for", nargs="*", default=[], metavar="METHOD=LR", help="a method's own learning rate")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--costs", action=argparse.BooleanOptionalAction, default=True,
                   help="measure peak memory and step time (they do not depend on the learning rate)")
    p.add_argument("--name", default="sara", help="stem of the result files")
    p.add_argument("--fraction", type=float, default=0.1, help="SaRA: smallest-|w| share trained per weight")
    p.add_argument("--threshold", type=float, default=None,
                   help="SaRA: train the entries with |w| < threshold (the paper's rule) instead of --fraction")
    p.add_argument("--rank_lambda", type=float, default=5e-4, help="SaRA: nuclear-norm weight (the authors' 5e-4)")
    p.add_argument("--progressive", type=float, default=0.5,
                   help="SaRA: re-select at this share of the steps (the authors: 2,500 of 5,000); 0 for never")
    p.add_argument("--seed", type=int, default=1, help="fine-tuning seed (the samplers' seed is fixed)")
    p.add_argument("--n_samples", type=int, default=1000)
    p.add_argument("--sample_steps", type=int, default=250)
    p.add_argument("--t0", type=float, default=0.3, help="SDEdit noise level for the forgetting metric")
    p.add_argument("--time_steps", type=int, default=30)
    p.add_argument("--cache", type=Path, default=Path("outputs/bench_sara"))
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--progress", action="store_true")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (small models gain nothing from more; oversubscription costs a lot)")
    return p


def parse(p: argparse.ArgumentParser, argv=None) -> argparse.Namespace:
    """Parse, check ``--lr_for``, set the threads and apply ``--quick``."""
    args = p.parse_args(argv)
    try:
        args.lr_for = {m: float(v) for m, v in (item.split("=") for item in args.lr_for)}
    except ValueError:
        p.error(f"--lr_for takes METHOD=LR items, got {args.lr_for}")
    if set(args.lr_for) - set(METHODS):
        p.error(f"--lr_for: unknown method in {sorted(args.lr_for)}; choose from {list(METHODS)}")
    torch.set_num_threads(args.threads)
    if args.quick:
        args.pretrain_steps, args.steps, args.n_samples, args.sample_steps, args.time_steps = 200, 40, 200, 50, 5
        args.out = args.cache / "quick"
    seed_all(0)
    return args


def main(argv=None) -> int:
    args = parse(build_parser(__doc__.splitlines()[0]), argv)

    base_dir = pretrain(args)
    base, _ = load_score_model(base_dir)
    x_new, _ = load_digits("train", classes=NEW)
    ref_new, _ = load_digits("all", classes=NEW)
    old = load_digits("all", classes=OLD)

    rows: dict[str, dict] = {}
    evals: dict[str, dict] = {}
    t_start = time.perf_counter()
    evals["base (digits 0-4)"] = evaluate(copy.deepcopy(base), args, old, ref_new, seed=2)
    rows["base (digits 0-4)"] = {k: v for k, v in evals["base (digits 0-4)"].items() if k not in ("samples", "recon")}
    rule = f"threshold {args.threshold:g}" if args.threshold else f"fraction {args.fraction}"
    names = {"sara": f"SaRA ({rule})", "lora": "LoRA (peft)", "full": "full fine-tuning"}
    names = {m: names[m] + (f", lr {args.lr_for[m]:g}" if m in args.lr_for else "") for m in args.methods}
    with tempfile.TemporaryDirectory() as tmp:
        for method in args.methods:
            trainer, summary = make_finetune_trainer(finetune_config(args, method, f"{tmp}/{method}"),
                                                     copy.deepcopy(base).requires_grad_(False), x_new)
            trainer.train()
            paths = write_outputs(trainer, finetune_config(args, method, f"{tmp}/{method}"), {})
            size_file = paths.get("adapter", paths["merged"] / "ema.safetensors")
            ev = evaluate(trainer.ema, args, old, ref_new, seed=2)
            evals[names[method]] = ev
            rows[names[method]] = {
                "trainable": summary["trainable"],
                "adapter_kib": size_file.stat().st_size / 1024,
                **(peak_memory(args, base, x_new, method) if args.costs else {}),
                **{k: v for k, v in ev.items() if k not in ("samples", "recon")},
            }
            if method == "lora":
                rows[names[method]]["rank"] = summary["rank"]
    if args.costs:
        variants = {names[m]: (m, True) for m in args.methods}
        if "sara" in args.methods:
            no_ub = "SaRA without unstructured backprop"
            rows[no_ub] = peak_memory(args, base, x_new, "sara", unstructured_backprop=False)
            variants[no_ub] = ("sara", False)
        for name, ms in step_times(args, base, x_new, variants).items():
            rows[name]["step_ms"] = ms
    elapsed = time.perf_counter() - t_start

    args.out.mkdir(parents=True, exist_ok=True)
    md = table(rows)
    net = (f"MLP score model (hidden {args.hidden}, depth {args.depth}, " if args.net == "mlp" else
           f"diffusers UNet2DModel score model (block_out_channels {args.unet_channels}, one layer per block, ")
    settings = (net +
                f"{sum(p.numel() for p in base.parameters()):,} parameters), VP SDE; pre-trained {args.pretrain_steps} "
                f"steps on digits 0-4, fine-tuned {args.steps} steps on digits 5-9 (batch 128, AdamW lr {args.lr} unless "
                f"the row says otherwise, EMA 0.999, seed {args.seed}) by each method. SaRA: "
                + (f"entries with |w| < {args.threshold:g}" if args.threshold else f"smallest {args.fraction:.0%}")
                + " of every Linear/Conv weight, "
                f"rank_lambda {args.rank_lambda:g}, "
                + (f"progressive re-selection at step {int(args.progressive * args.steps)}" if args.progressive else "no progressive re-selection")
                + ". LoRA: rank "
                f"{next((r['rank'] for r in rows.values() if 'rank' in r), '—')} on the same modules (closest "
                f"trainable count). PC sampler "
                f"({args.sample_steps} steps, reverse diffusion + Langevin), {args.n_samples} samples; SDEdit from "
                f"t0 = {args.t0} on the {len(old[0])} digits 0-4. Peak memory: "
                + ("torch.cuda.max_memory_allocated" if x_new.is_cuda else "peak live tensor bytes (dispatch-mode count, CPU)")
                + f" over three AdamW steps on a batch of 128; step time: median of {args.time_steps} AdamW steps "
                f"(methods interleaved) on {torch.get_num_threads()} CPU thread(s). "
                f"Fine-tuning + evaluation took {elapsed:.0f} s.")
    text = f"# SaRA vs LoRA vs full fine-tuning (digits 0-4 -> 5-9)\n\n{settings}\n\n{md}\n"
    write_results(args.out / f"{args.name}.md", text)
    figure(evals, old[0], args.out / f"{args.name}.png")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
