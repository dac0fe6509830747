"""SaRA against the sparse fine-tuning peers peft ships, on the digits UNet (digits 0-4 -> 5-9).

The question: what do SaRA's nuclear-norm penalty, progressive re-selection and Conv support buy over the
plain sparse selection? Same pre-trained UNet, data, steps, batches, learning rate and seeds as
``benchmarks.sara`` (whose helpers this reuses: FD-digits of new-class samples, forgetting as FD-digits of
SDEdit reconstructions of the old digits, peak memory by counting live tensor bytes, step time). Rows:

- SaRA: the smallest ``--fraction`` of every Linear *and Conv* weight, nuclear norm, progressive step;
- SaRA on the Linear layers only, same fraction: against the next row it isolates the nuclear norm and the
  progressive step, against the first the Conv support;
- peft Super-Tuning with ``select_top=False`` (``SupertuningConfig``: the same smallest-|w| selection of each
  Linear weight, trained as a delta, no nuclear norm, no re-selection; peft supports Linear layers only);
- peft Super-Tuning on *all* Linear entries (``sparsity=0``): the closest a Linear-only method gets to SaRA's
  trainable budget when, as in this UNet, the Linear layers hold fewer entries than that budget;
- peft SHiRA (``ShiraConfig``, random sparse mask, Linear only) with the rank whose count r(m+n) per layer is
  the closest to Super-Tuning's;
- peft LoRA at SaRA's budget (all Linear/Conv modules), and full fine-tuning.

    python -m benchmarks.sara_peers --quick      # smoke run (~3 min)
    python -m benchmarks.sara_peers              # 2 seeds, 1,500 steps (~2 h on one loaded CPU core)

Writes ``benchmarks/results/sara_peers.md`` (table) and ``sara_peers.png`` (FD new vs FD old, every seed).
"""

from __future__ import annotations

import copy
import math
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from scorekit.checkpoint import save_tensors
from scorekit.config import load_score_model
from scorekit.data import load_digits
from scorekit.finetune import make_finetune_trainer, prepare_model, write_outputs
from scorekit.losses import make_dsm_loss
from scorekit.training import Trainer

from ._harness import markdown_table, write_results
from .sara import NEW, OLD, build_parser, evaluate, finetune_config, parse, peak_memory, pretrain, step_times


@dataclass
class Row:
    """One method of the table: ``method`` is a finetune method (its Trainer comes from ``make_finetune_trainer``,
    with ``sara_targets`` narrowing SaRA) or ``"peft"`` (``peer(base_copy, seed)`` injects a peft adapter)."""

    name: str
    method: str
    sara_targets: list[str] | None = None
    peer: Callable[[nn.Module, int], nn.Module] | None = None
    missing: str | None = None  # why the installed peft cannot run it


def linear_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]


def _peft(name: str):
    import peft

    return getattr(peft, name, None)


def supertuning(density: float) -> Callable[[nn.Module, int], nn.Module]:
    def inject(model: nn.Module, seed: int) -> nn.Module:
        from peft import inject_adapter_in_model

        config = _peft("SupertuningConfig")(sparsity=1 - density, select_top=False, target_modules=linear_names(model))
        return inject_adapter_in_model(config, model.requires_grad_(False))

    return inject


def shira(r: int) -> Callable[[nn.Module, int], nn.Module]:
    def inject(model: nn.Module, seed: int) -> nn.Module:
        from peft import inject_adapter_in_model

        config = _peft("ShiraConfig")(r=r, target_modules=linear_names(model), random_seed=seed)
        return inject_adapter_in_model(config, model.requires_grad_(False))

    return inject


def shira_rank(model: nn.Module, budget: int) -> int:
    """SHiRA's r (r(m+n) entries per m x n weight, at most m*n) whose total is the closest to ``budget``."""
    shapes = [model.get_submodule(n).weight.shape for n in linear_names(model)]
    most = min(m * n // (m + n) for m, n in shapes)
    return min(range(1, most + 1), key=lambda r: abs(sum(r * (m + n) for m, n in shapes) - budget))


def rows_for(base: nn.Module, args) -> list[Row]:
    linear = linear_names(base)
    n_linear = sum(base.get_submodule(n).weight.numel() for n in linear)
    per_weight = sum(math.ceil(args.fraction * base.get_submodule(n).weight.numel()) for n in linear)
    rows = [Row(f"SaRA (fraction {args.fraction}, Linear + Conv)", "sara"),
            Row(f"SaRA, Linear only (fraction {args.fraction})", "sara", sara_targets=linear)]
    missing = {name: None if _peft(name) else f"peft {__import__('peft').__version__} has no {name}"
               for name in ("SupertuningConfig", "ShiraConfig")}
    rows += [
        Row(f"Super-Tuning bottom (peft, {args.fraction:.0%} of each Linear)", "peft",
            peer=supertuning(args.fraction), missing=missing["SupertuningConfig"]),
        Row(f"Super-Tuning (peft, all {n_linear:,} Linear entries)", "peft", peer=supertuning(1.0),
            missing=missing["SupertuningConfig"]),
    ]
    if missing["ShiraConfig"]:
        rows.append(Row("SHiRA (peft)", "peft", missing=missing["ShiraConfig"]))
    else:
        r = shira_rank(base, per_weight)
        rows.append(Row(f"SHiRA (peft, r {r}, random mask, Linear)", "peft", peer=shira(r)))
    return rows + [Row("LoRA (peft, SaRA's budget)", "lora"), Row("full fine-tuning", "full")]


def train_row(row: Row, base: nn.Module, x_new, args, tmp: str) -> tuple[Trainer, dict, Path]:
    """The trained Trainer of ``row``, its summary and the file whose size the table reports."""
    out = f"{tmp}/{row.name}"
    cfg = finetune_config(args, row.method if row.method != "peft" else "full", out)
    if row.sara_targets is not None:
        cfg = replace(cfg, sara=replace(cfg.sara, target_modules=row.sara_targets))
    if row.method != "peft":
        trainer, summary = make_finetune_trainer(cfg, copy.deepcopy(base).requires_grad_(False), x_new)
        trainer.train()
        paths = write_outputs(trainer, cfg, {})
        return trainer, summary, paths.get("adapter", paths["merged"] / "ema.safetensors")
    from peft import get_peft_model_state_dict

    torch.manual_seed(cfg.training.seed)
    model = row.peer(copy.deepcopy(base), cfg.training.seed)
    trainer = Trainer(model, make_dsm_loss(base.sde), x_new, cfg.training, out_dir=out)
    trainer.train()
    path = Path(out) / "adapter.safetensors"
    save_tensors(get_peft_model_state_dict(trainer.ema), path, {"format": "peft"})
    return trainer, {"trainable": sum(p.numel() for p in trainer.params)}, path


def prepare_for(row: Row, args) -> Callable[[nn.Module], nn.Module]:
    if row.method == "peft":
        return lambda model: row.peer(model, args.seed)
    cfg = finetune_config(args, row.method, "")
    if row.sara_targets is not None:
        cfg = replace(cfg, sara=replace(cfg.sara, target_modules=row.sara_targets))
    return lambda model: prepare_model(model, cfg)[0]


def cell(values: list, spec: str) -> str:
    shown = [format(v, spec) for v in values if v is not None]
    return " / ".join(shown) if shown else "—"


def table(rows: list[Row], results: dict[str, dict]) -> str:
    header = ["method", "trainable params", "adapter file (KiB)", "peak train memory (MiB)", "step time (ms)",
              "FD-digits new 5-9 ↓ (per seed)", "FD-digits old 0-4 ↓ forgetting (per seed)", "old digits kept"]
    lines = []
    for name in ["base (digits 0-4)"] + [r.name for r in rows]:
        r = results.get(name, {})
        if r.get("missing"):
            lines.append([name, "—", "—", "—", "—", f"not run: {r['missing']}", "—", "—"])
            continue
        lines.append([name, cell([r.get("trainable")], ","), cell([r.get("adapter_kib")], ".1f"),
                      cell([r.get("peak_mib")], ".2f"), cell([r.get("step_ms")], ".1f"),
                      cell(r.get("fd_new", []), ".2f"), cell(r.get("fd_old", []), ".2f"),
                      cell(r.get("old_kept", []), ".0%")])
    return markdown_table(header, lines)


def plot(results: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for name, r in results.items():
        if r.get("fd_new"):
            ax.scatter(r["fd_new"], r["fd_old"], label=name, s=30)
    ax.set_xlabel("FD-digits of samples vs digits 5-9 (new; lower is better)")
    ax.set_ylabel("FD-digits of SDEdit reconstructions vs 0-4\n(forgetting; lower is better)")
    ax.set_xscale("log")
    ax.legend(fontsize=6, loc="best")
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def main(argv=None) -> int:
    p = build_parser(__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2], help="fine-tuning seeds")
    p.set_defaults(net="unet", pretrain_steps=3000, steps=1500, n_samples=500, sample_steps=150, name="sara_peers")
    args = parse(p, argv)
    base_dir = pretrain(args)
    base, _ = load_score_model(base_dir)
    x_new, _ = load_digits("train", classes=NEW)
    ref_new, _ = load_digits("all", classes=NEW)
    old = load_digits("all", classes=OLD)
    rows = rows_for(base, args)
    start = time.perf_counter()
    base_eval = evaluate(copy.deepcopy(base), args, old, ref_new, seed=2)
    results: dict[str, dict] = {"base (digits 0-4)": {k: [base_eval[k]] for k in ("fd_new", "fd_old", "old_kept")}}
    for row in rows:
        results[row.name] = {"missing": row.missing} if row.missing else {"fd_new": [], "fd_old": [], "old_kept": []}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            args.seed = seed
            for row in (r for r in rows if not r.missing):
                trainer, summary, size_file = train_row(row, base, x_new, args, f"{tmp}/seed{seed}")
                ev = evaluate(trainer.ema, args, old, ref_new, seed=2)
                res = results[row.name]
                res.update(trainable=summary["trainable"], adapter_kib=size_file.stat().st_size / 1024)
                for key in ("fd_new", "fd_old", "old_kept"):
                    res[key].append(ev[key])
                print(f"  seed {seed} {row.name}: FD new {ev['fd_new']:.2f}, FD old {ev['fd_old']:.2f}", flush=True)
    if args.costs:
        args.seed = args.seeds[0]
        variants = {}
        for row in (r for r in rows if not r.missing):
            method = "sara" if row.method == "sara" else "full"  # "sara": the step adds the rank penalty
            prepare = prepare_for(row, args)
            results[row.name].update(peak_memory(args, base, x_new, method, prepare=prepare))
            variants[row.name] = (method, True, prepare)
        for name, ms in step_times(args, base, x_new, variants).items():
            results[name]["step_ms"] = ms
    elapsed = time.perf_counter() - start
    n_params = sum(q.numel() for q in base.parameters())
    settings = (
        f"diffusers UNet2DModel score model (block_out_channels {args.unet_channels}, one layer per block, "
        f"{n_params:,} parameters, of which {sum(base.get_submodule(n).weight.numel() for n in linear_names(base)):,} "
        f"in Linear weights), VP SDE; pre-trained {args.pretrain_steps} steps on digits 0-4, fine-tuned "
        f"{args.steps} steps on digits 5-9 (batch 128, AdamW lr {args.lr}, EMA 0.999) by each method, seeds "
        f"{' / '.join(map(str, args.seeds))} (cells: one value per seed). SaRA: rank_lambda {args.rank_lambda:g}, "
        + (f"progressive re-selection at step {int(args.progressive * args.steps)}" if args.progressive
           else "no re-selection")
        + f". PC sampler ({args.sample_steps} steps), {args.n_samples} samples; SDEdit from t0 = {args.t0}. Peak "
        f"memory: live tensor bytes over three AdamW steps on a batch of 128 (CPU count); step time: median of "
        f"{args.time_steps} steps, methods interleaved, {torch.get_num_threads()} thread(s). Took {elapsed:.0f} s "
        f"(`python -m benchmarks.sara_peers{' --quick' if args.quick else ''}`)."
    )
    text = (f"# SaRA vs peft's sparse peers (digits 0-4 -> 5-9, UNet)\n\n{settings}\n\n{table(rows, results)}\n"
            f"![FD new vs FD old]({args.name}.png)\n")
    args.out.mkdir(parents=True, exist_ok=True)
    write_results(args.out / f"{args.name}.md", text)
    plot(results, args.out / f"{args.name}.png")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
