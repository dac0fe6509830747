"""Trainer overhead: steps/s of ``scorekit.training.Trainer`` against a bare PyTorch loop on the same model,
loss and batches, and peak memory of each.

Each variant runs in its own process (so peak memory is its own): ``bare`` is forward/backward/AdamW
only; ``bare+clip+ema`` adds what the Trainer does per step, with the same math: gradient clipping at
1.0, the EMA of ``scorekit.training.update_ema`` (decay 0.999 with its warm-up, one foreach lerp, integer
buffers copied) and the AdamW the Trainer builds (same hyper-parameters, fused where
``scorekit.training.adamw_options`` picks it); neither reads the loss back per step. ``Trainer`` is the
real thing (accelerate, EMA, the on-device NaN guard, loss bookkeeping read back every 100 steps; no
checkpoints inside the timed window). Peak memory is the process's peak resident set on CPU
(``ru_maxrss``) and ``torch.cuda.max_memory_allocated`` on GPU.

    python -m benchmarks.training --net mlp --steps 300
    python -m benchmarks.training --net unet --steps 50 --device cuda
"""

from __future__ import annotations

import argparse
import copy
import json
import resource
import sys
import time

from ._harness import RESULTS, child_result, write_results

VARIANTS = ("bare", "bare+clip+ema", "Trainer")


def build(net: str, device: str):
    import torch

    from scorekit import VPSDE, ScoreModel
    from scorekit.data import load_digits
    from scorekit.nets import MLP, make_unet

    torch.manual_seed(0)
    x, _ = load_digits("train")
    sde = VPSDE()
    network = MLP((1, 8, 8), hidden=512, depth=4) if net == "mlp" else make_unet(8, 1, (32, 64, 64))
    return ScoreModel(network, sde).to(device), sde, x.to(device)


def run_variant(variant: str, net: str, steps: int, warmup: int, batch: int, device: str) -> dict:
    import torch

    from scorekit.losses import dsm_loss, make_dsm_loss
    from scorekit.training import TrainConfig, Trainer, adamw_options

    model, sde, x = build(net, device)
    cuda = device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    total = warmup + steps
    if variant == "Trainer":
        cfg = TrainConfig(steps=total, batch_size=batch, lr=1e-3, ema_decay=0.999, progress=False,
                          mixed_precision="no", log_every=0)
        trainer = Trainer(model, make_dsm_loss(sde), x, cfg)
        trainer.train(steps=warmup)
        sync()
        faults, t0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
        trainer.train(steps=total)
        sync()
        seconds = time.perf_counter() - t0
    else:
        params = list(model.parameters())
        # TrainConfig's defaults: betas (0.9, 0.999), no weight decay
        opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0, **adamw_options(params))
        ema = copy.deepcopy(model).requires_grad_(False) if variant != "bare" else None
        if ema is not None:  # update_ema's tensors: floats lerped in one foreach call, integer buffers copied
            pairs = list(zip(ema.state_dict().values(), model.state_dict().values()))
            ema_floats = [e for e, _ in pairs if e.is_floating_point()]
            model_floats = [m for e, m in pairs if e.is_floating_point()]
            ints = [(e, m) for e, m in pairs if not e.is_floating_point()]
        g = torch.Generator(device).manual_seed(0)
        losses = []
        for i in range(total):
            if i == warmup:
                sync()
                faults, t0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
            idx = torch.randint(0, len(x), (batch,), generator=g, device=device)
            loss = dsm_loss(model, sde, x[idx], generator=g)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if ema is not None:
                torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            if ema is not None:
                with torch.no_grad():
                    decay = min(0.999, (1 + i + 1) / (10 + i + 1))
                    torch._foreach_lerp_(ema_floats, model_floats, 1 - decay)
                    for e, m in ints:
                        e.copy_(m)
            losses.append(loss.detach())
        torch.stack(losses).tolist()  # the losses, read back once (the Trainer reads them every 100 steps)
        sync()
        seconds = time.perf_counter() - t0
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"variant": variant, "steps_per_s": steps / seconds, "peak_mb": peak, "faults_per_step": faults / steps}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--net", choices=["mlp", "unet"], default="mlp")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeats", type=int, default=3, help="runs per variant; the median is reported")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(run_variant(args.child, args.net, args.steps, args.warmup, args.batch, args.device)))
        return 0

    rows = {}
    for variant in VARIANTS:
        runs = []
        for _ in range(args.repeats):
            runs.append(child_result("benchmarks.training", variant, "--net", args.net, "--steps", str(args.steps),
                                     "--warmup", str(args.warmup), "--batch", str(args.batch), "--device", args.device))
        runs.sort(key=lambda r: r["steps_per_s"])
        rows[variant] = runs[len(runs) // 2]
    base = rows["bare"]["steps_per_s"]
    import torch

    header = (f"Trainer overhead, {args.net} on digits, batch {args.batch}, {args.steps} timed steps, device {args.device}, "
              f"torch {torch.__version__}, {torch.get_num_threads()} threads (median of {args.repeats} runs)")
    lines = [header, "", "| variant | steps/s | time per step vs bare | peak memory (MB) |", "|---|---|---|---|"]
    for v in VARIANTS:
        r = rows[v]
        lines.append(f"| {v} | {r['steps_per_s']:.1f} | {base / r['steps_per_s']:.3f}x | {r['peak_mb']:.0f} |")
    table = "\n".join(lines)
    print(table)
    write_results(RESULTS / f"training_{args.net}_{args.device.split(':')[0]}.md", table + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(8, 3))
    axes[0].bar(VARIANTS, [rows[v]["steps_per_s"] for v in VARIANTS])
    axes[0].set(ylabel="steps / s", title="throughput")
    axes[1].bar(VARIANTS, [rows[v]["peak_mb"] for v in VARIANTS])
    axes[1].set(ylabel="MB", title="peak memory")
    for ax in axes:
        ax.tick_params(axis="x", labelsize=8)
    fig.tight_layout()
    fig.savefig(RESULTS / f"training_{args.net}_{args.device.split(':')[0]}.png", dpi=120)
    return 0


if __name__ == "__main__":
    sys.exit(main())
