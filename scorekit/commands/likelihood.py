"""``scorekit likelihood --checkpoint RUN``: log-likelihood of held-out data under the probability-flow ODE.

Reports the mean log-density in nats and bits per dimension (Song et al. 2021, App. D), with its
standard error over samples, and the number of score evaluations the ODE solver used. Data point j's
Hutchinson probe comes from its own stream (seed ``--seed + j``), so under ``torchrun --nproc_per_node N``
(or ``accelerate launch``) the batches are dealt across the processes and rank 0 gathers the same
numbers a single process computes (put ``--`` before ``likelihood``: torchrun's parser reads ``--n``
as an abbreviation of its own ``--nnodes``).

A diffusers pipeline directory takes ``--data``: a folder of images or a ``samples.npz`` (uint8 ``arr_0``,
``(N, H, W, C)``, what ``scorekit sample --outdir`` writes), in ``[-1, 1]`` after scaling; latent pipelines
are scored on the latents of ``model.encode`` (so bits/dim are per latent dimension), conditional ones
under ``--prompt`` or ``--class-label``.
"""

from __future__ import annotations

import argparse
import math
import time


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("likelihood", help="log-likelihood / bits per dim of data under a trained model",
                              description=__doc__)
    p.add_argument("--checkpoint", required=True, help="training run directory or diffusers pipeline directory")
    p.add_argument("--split", default="test", help="data split to evaluate (the run config's data set)")
    p.add_argument("--data", default=None, help="pipelines: an image folder or a samples.npz to evaluate")
    p.add_argument("--prompt", default=None, help="pipelines: the text prompt the data is scored under")
    p.add_argument("--class-label", "--class_label", dest="class_label", type=int, default=None,
                   help="pipelines: the class the data is scored under")
    p.add_argument("--n", type=int, default=128, help="number of data points")
    p.add_argument("--batch_size", "--batch-size", dest="batch_size", type=int, default=64)
    p.add_argument("--estimator", default="rademacher", choices=["rademacher", "gaussian", "exact"])
    p.add_argument("--rtol", type=float, default=1e-5)
    p.add_argument("--atol", type=float, default=1e-5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--raw_weights", "--raw-weights", dest="raw_weights", action="store_true")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    return p


def _data(args: argparse.Namespace, model):
    """``(x, description)``: the run config's split for a scorekit run, ``--data`` (encoded) for a pipeline."""
    import dataclasses
    from pathlib import Path

    import numpy as np
    import torch

    from ..config import build_data, load_score_model
    from ..data import load_image_folder

    pipeline = (Path(args.checkpoint) / "model_index.json").is_file()
    if not pipeline:
        if args.data is not None:
            raise ValueError("--data is for diffusers pipelines; a scorekit run is scored on its config's --split")
        cfg = load_score_model(args.checkpoint, ema=not args.raw_weights)[1]
        return build_data(dataclasses.replace(cfg.data, split=args.split))[0], f"{cfg.data.name} ({args.split})"
    if args.data is None:
        raise ValueError("a diffusers pipeline has no data split of its own: pass --data FOLDER or samples.npz")
    data = Path(args.data)
    if data.suffix == ".npz":
        with np.load(data) as f:
            if "arr_0" not in f or f["arr_0"].dtype != np.uint8 or f["arr_0"].ndim != 4:
                raise ValueError(f"{data}: expected uint8 images (N, H, W, C) in arr_0, as scorekit sample --outdir "
                                 "writes")
            images = torch.from_numpy(f["arr_0"]).permute(0, 3, 1, 2).float() / 127.5 - 1
    else:
        images = load_image_folder(data)
    device = next(model.parameters()).device
    with torch.no_grad():
        x = torch.cat([model.encode(images[i : i + 16].to(device)).float() for i in range(0, len(images), 16)])
    return x, f"{data.name} ({'latents' if getattr(model, 'autoencoder', None) is not None else 'pixels'})"


def run(args: argparse.Namespace) -> int:
    import torch

    from samplers import StackedGenerator, likelihood

    from ..sampling import condition_score, init_processes, load_model, rank_batches
    from ..validate import non_negative_int, positive_int
    from . import check_device

    n, batch_size = positive_int(args.n, "--n", "number of data points"), positive_int(args.batch_size, "--batch_size")
    args.device = check_device(args.device)
    seed = non_negative_int(args.seed, "--seed")
    procs = init_processes(args.device)
    try:
        device = procs.device(args.device)
        model, _ = load_model(args.checkpoint, ema=not args.raw_weights, device=device)
        x, what = _data(args, model)
        x = x[:n]
        score = condition_score(model, prompt=args.prompt, class_label=args.class_label)
        logps, index, nfe, t0 = [], [], 0, time.perf_counter()
        for batch in rank_batches(range(len(x)), batch_size, procs):
            res = likelihood(score, model.sde, x[batch].to(device), estimator=args.estimator, rtol=args.rtol,
                             atol=args.atol, generator=StackedGenerator([seed + j for j in batch], device))
            logps.append(res.logp.detach().cpu())
            index += batch
            nfe += res.nfe
        parts = procs.gather((logps, index, nfe))
        if parts is None:
            return 0
        order = torch.tensor([j for _, idx, _ in parts for j in idx]).argsort()
        logp = torch.cat([lp for part, _, _ in parts for lp in part]).double()[order]
        nfe = sum(k for _, _, k in parts)
    finally:
        procs.close()
    D = x[0].numel()
    se = logp.std().item() / math.sqrt(len(logp)) if len(logp) > 1 else float("nan")
    bpd = -logp.mean().item() / (D * math.log(2))
    print(f"{len(x)} {what} points: log p = {logp.mean().item():.3f} ± {se:.3f} nats, "
          f"{bpd:.4f} bits/dim (continuous density, no dequantization), {nfe} ODE evaluations, "
          f"{time.perf_counter() - t0:.1f}s on {procs.world} process(es)")
    return 0
