"""What every benchmark shares: the cached digits teacher, a timer, seeds and atomically written results.

Benchmarks run from the repository root as modules, e.g. ``python -m benchmarks.svdd``, so that
``benchmarks/`` never stands on ``sys.path`` in front of the packages it measures.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch

from scorekit import VPSDE, ScoreModel
from scorekit.checkpoint import atomic_path

__all__ = ["RESULTS", "CACHE", "describe_teacher", "gen", "seed_all", "timer", "best_time", "child_result", "fmt",
           "markdown_table", "write_results",
           "digits_teacher", "DIGITS_UNET"]

RESULTS = Path(__file__).resolve().parent / "results"
#: trained models are cached here (git-ignored); delete a folder to retrain
CACHE = Path("outputs") / "bench_cache"


def gen(seed: int, device: str | torch.device = "cpu") -> torch.Generator:
    """A fresh generator seeded with ``seed``: each draw of a benchmark names its own stream."""
    return torch.Generator(device=device).manual_seed(seed)


def seed_all(seed: int) -> None:
    """Seed torch's global stream, which network initialisation draws from."""
    torch.manual_seed(seed)


@contextmanager
def timer() -> Iterator[dict[str, float]]:
    """``with timer() as t: ...`` leaves the wall time of the block in ``t["seconds"]``."""
    record = {"seconds": math.nan}
    start = time.perf_counter()
    try:
        yield record
    finally:
        record["seconds"] = time.perf_counter() - start


def best_time(fn: Callable[[], object], repeats: int = 3) -> tuple[object, float]:
    """``(result, seconds)``: the result of the last call and the fastest of ``repeats`` wall times."""
    best, out = math.inf, None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return out, best


def child_result(module: str, *args: str) -> dict:
    """Run ``python -m <module> --child ...`` in a fresh process (from the repository root) and return the JSON
    object its last line of output prints: a measurement that nothing earlier in this process can disturb."""
    out = subprocess.run([sys.executable, "-m", module, "--child", *args], capture_output=True, text=True, check=True,
                         cwd=RESULTS.parents[1])
    return json.loads(out.stdout.strip().splitlines()[-1])


def fmt(v: float | None, digits: int = 4) -> str:
    """A table cell: ``–`` for missing, ``NaN`` kept visible, scientific notation for tiny values."""
    if v is None:
        return "–"
    if isinstance(v, float) and math.isnan(v):
        return "NaN"
    return f"{v:.{digits}f}" if abs(v) >= 10**-digits or v == 0 else f"{v:.1e}"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A Markdown table; cells are written with ``str`` (format numbers before, e.g. with :func:`fmt`)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def write_results(path: Path, text: str) -> Path:
    """Write a results file atomically (a reader never sees half a table) and say where it went."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    print(f"wrote {path}", flush=True)
    return path


#: the digits teacher's UNet: the small diffusers UNet2DModel of ``scorekit demo`` (1.05M parameters)
DIGITS_UNET = {"block_out_channels": (32, 64, 64), "layers_per_block": 1}


def describe_teacher(net: str, hidden: int = 256, depth: int = 3) -> str:
    """The results files' words for the teacher :func:`digits_teacher` builds."""
    if net == "mlp":
        return f"MLP (hidden {hidden}, depth {depth})"
    return f"UNet2DModel (blocks {'/'.join(map(str, DIGITS_UNET['block_out_channels']))})"


def digits_teacher(
    *,
    net: str = "unet",
    hidden: int = 256,
    depth: int = 3,
    steps: int = 2000,
    lr: float = 2e-3,
    data: torch.Tensor | None = None,
    cache: Path = CACHE,
    progress: bool = False,
) -> tuple[ScoreModel, int]:
    """``(model, steps)``: the VP eps-prediction score model of the digits train split (or of ``data``,
    digits of shape ``(n, 1, 8, 8)``), the teacher the benchmarks share, with its EMA weights; trained by
    the Trainer, or resumed from ``cache`` (one folder per setting), where a longer earlier run is reused
    as it is.

    ``net="unet"`` (the default) is the demo's small UNet (:data:`DIGITS_UNET`); ``net="mlp"`` the earlier,
    weaker MLP of width ``hidden`` and ``depth`` residual blocks (``hidden`` and ``depth`` apply to it only).
    """
    from scorekit.data import load_digits
    from scorekit.losses import make_dsm_loss
    from scorekit.training import TrainConfig, Trainer

    if net not in ("unet", "mlp"):
        raise ValueError(f"unknown digits teacher net {net!r}; valid choices are ['mlp', 'unet']")
    sde = VPSDE()
    seed_all(0)
    if net == "unet":
        from scorekit.nets import make_unet

        model = ScoreModel(make_unet(8, 1, **DIGITS_UNET), sde, prediction="eps", time_input="index",
                           data_shape=(1, 8, 8))
        name = f"UNet {'-'.join(map(str, DIGITS_UNET['block_out_channels']))}"
        out_dir = cache / f"digits_unet{'-'.join(map(str, DIGITS_UNET['block_out_channels']))}_lr{lr:g}"
        warmup = 200
    else:
        from scorekit.nets import MLP

        model = ScoreModel(MLP((1, 8, 8), hidden=hidden, depth=depth), sde, prediction="eps")
        name = f"MLP {hidden}x{depth}"
        out_dir = cache / f"digits_mlp{hidden}x{depth}_lr{lr:g}"
        warmup = 100
    cfg = TrainConfig(steps=steps, batch_size=128, lr=lr, warmup=warmup, ema_decay=0.999, checkpoint_every=0,
                      progress=progress, mixed_precision="no")
    data = load_digits("train")[0] if data is None else data
    trainer = Trainer(model, make_dsm_loss(sde), data, cfg, out_dir=out_dir)
    with timer() as t:
        trainer.train()
    print(f"  digits teacher: {name}, {trainer.step} steps (cached in {out_dir}; "
          f"{t['seconds']:.0f} s now)", flush=True)
    return trainer.ema.eval().requires_grad_(False), trainer.step
