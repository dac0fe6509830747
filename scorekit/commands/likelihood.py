"""``scorekit likelihood --checkpoint RUN``: log-likelihood of held-out data under the probability-flow ODE.

Reports the mean log-density in nats and bits per dimension (Song et al. 2021, App. D), with its
standard error over samples, and the number of score evaluations the ODE solver used.
"""

from __future__ import annotations

import argparse
import math
import time


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("likelihood", help="log-likelihood / bits per dim of data under a trained model",
                              description=__doc__)
    p.add_argument("--checkpoint", required=True, help="training run directory")
    p.add_argument("--split", default="test", help="data split to evaluate (the run config's data set)")
    p.add_argument("--n", type=int, default=128, help="number of data points")
    p.add_argument("--batch_size", "--batch-size", dest="batch_size", type=int, default=64)
    p.add_argument("--estimator", default="rademacher", choices=["rademacher", "gaussian", "exact"])
    p.add_argument("--rtol", type=float, default=1e-5)
    p.add_argument("--atol", type=float, default=1e-5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--raw_weights", "--raw-weights", dest="raw_weights", action="store_true")
    return p


def run(args: argparse.Namespace) -> int:
    import dataclasses

    import torch

    from samplers import likelihood

    from ..config import build_data, load_score_model
    from ..validate import positive_int

    n, batch_size = positive_int(args.n, "--n", "number of data points"), positive_int(args.batch_size, "--batch_size")
    model, cfg = load_score_model(args.checkpoint, ema=not args.raw_weights)
    x, _ = build_data(dataclasses.replace(cfg.data, split=args.split))
    x = x[:n]
    g = torch.Generator().manual_seed(args.seed)
    logps, nfe, t0 = [], 0, time.perf_counter()
    for start in range(0, len(x), batch_size):
        res = likelihood(model, model.sde, x[start : start + batch_size], estimator=args.estimator,
                         rtol=args.rtol, atol=args.atol, generator=g)
        logps.append(res.logp)
        nfe += res.nfe
    logp = torch.cat(logps).double()
    D = x[0].numel()
    se = logp.std().item() / math.sqrt(len(logp)) if len(logp) > 1 else float("nan")
    bpd = -logp.mean().item() / (D * math.log(2))
    print(f"{len(x)} {cfg.data.name} ({args.split}) points: log p = {logp.mean().item():.3f} ± {se:.3f} nats, "
          f"{bpd:.4f} bits/dim (continuous density, no dequantization), {nfe} ODE evaluations, "
          f"{time.perf_counter() - t0:.1f}s")
    return 0
