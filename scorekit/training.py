"""A small training loop on accelerate: AdamW with warm-up, gradient clipping, EMA, mixed precision,
atomic safetensors checkpoints that resume bit-for-bit, a NaN guard and a progress bar.

The loop knows nothing about diffusion: it minimises ``loss_fn(model, batch, generator)`` over batches
drawn from in-memory tensors. :func:`scorekit.losses.make_dsm_loss` gives the score-matching loss;
classifiers, value networks, Noise2Score and SaRA reuse the same loop with their own losses.
It runs unchanged under ``accelerate launch --num_processes N``.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import shutil
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from torch import Tensor, nn
from tqdm.auto import tqdm

from .checkpoint import (
    load_json,
    load_tensors,
    optimizer_from_tensors,
    optimizer_to_tensors,
    save_json,
    save_tensors,
)

__all__ = [
    "TrainConfig", "Trainer", "latest_checkpoint", "load_weights", "load_state_checked", "count_parameters",
    "read_checkpoint", "prune_checkpoints", "update_ema", "resolve_precision", "MIXED_PRECISION",
]

MIXED_PRECISION = ("auto", "no", "fp16", "bf16")
FORMAT = "scorekit-trainer/1"
LossFn = Callable[[nn.Module, Any, torch.Generator], Tensor]


@dataclass
class TrainConfig:
    """Optimisation settings of :class:`Trainer` (the ``training:`` section of a YAML config)."""

    steps: int = 2000
    batch_size: int = 128
    lr: float = 2e-4
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    warmup: int = 0
    grad_clip: float | None = 1.0
    ema_decay: float = 0.999
    mixed_precision: str = "auto"
    seed: int = 0
    log_every: int = 50
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    progress: bool = True
    resume: bool = True

    def __post_init__(self):
        self.betas = tuple(self.betas)
        checks = [
            (self.steps >= 1, f"steps must be >= 1, got {self.steps}"),
            (self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}"),
            (self.lr > 0, f"lr must be > 0, got {self.lr}"),
            (self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}"),
            (self.warmup >= 0, f"warmup must be >= 0, got {self.warmup}"),
            (self.grad_clip is None or self.grad_clip > 0, f"grad_clip must be > 0 or null, got {self.grad_clip}"),
            (0 <= self.ema_decay < 1, f"ema_decay must lie in [0, 1), got {self.ema_decay}"),
            (self.mixed_precision in MIXED_PRECISION,
             f"unknown mixed_precision {self.mixed_precision!r}; valid choices are {list(MIXED_PRECISION)}"),
            (self.checkpoint_every >= 0, f"checkpoint_every must be >= 0 (0 = only at the end), got {self.checkpoint_every}"),
            (self.keep_checkpoints >= 1, f"keep_checkpoints must be >= 1, got {self.keep_checkpoints}"),
            (len(self.betas) == 2, f"betas must be two numbers, got {self.betas}"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(msg)


@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, decay: float, step: int) -> None:
    """``ema <- decay' ema + (1 - decay') model`` over the state dict, ``decay' = min(decay, (1 + step) / (10 + step))``.

    The warm-up is TensorFlow's ``ExponentialMovingAverage(num_updates)``, so that short runs are not
    dominated by the random initialisation; integer buffers are copied.
    """
    decay = min(decay, (1 + step) / (10 + step))
    src = model.state_dict()
    for name, value in ema.state_dict().items():
        if value.is_floating_point():
            value.lerp_(src[name].to(value.dtype), 1 - decay)
        else:
            value.copy_(src[name])


def resolve_precision(name: str) -> str:
    """accelerate's ``mixed_precision`` for ``name``; ``"auto"`` is bf16 where the GPU has it, else none."""
    if name != "auto":
        return name
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16"
    return "no"


def latest_checkpoint(path: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint directory under ``path`` (a run dir or its ``checkpoints/``), or ``None``."""
    path = Path(path)
    if (path / "state.json").is_file():
        return path
    root = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    if not root.is_dir():
        return None
    done = sorted(p for p in root.glob("step-*") if (p / "state.json").is_file())
    return done[-1] if done else None


def read_checkpoint(path: str | os.PathLike, fmt: str = FORMAT, kind: str = "a scorekit training checkpoint"
                    ) -> tuple[Path, dict] | None:
    """``(directory, state.json)`` of the newest complete checkpoint under ``path``, or ``None`` if there is
    none; a checkpoint written in another format than ``fmt`` is an error naming ``kind``."""
    ckpt = latest_checkpoint(path)
    if ckpt is None:
        return None
    state = load_json(ckpt / "state.json")
    if state.get("format") != fmt:
        raise ValueError(f"{ckpt} is not {kind} (format {state.get('format')!r}, expected {fmt!r})")
    return ckpt, state


def prune_checkpoints(root: Path, keep: int, final: Path) -> None:
    """Delete the ``step-*`` directories under ``root`` but the ``keep`` newest, ``final`` (just written) always among them."""
    for old in sorted(p for p in root.glob("step-*") if p != final)[: -keep + 1 or None]:
        shutil.rmtree(old, ignore_errors=True)


def load_weights(path: str | os.PathLike, ema: bool = True) -> tuple[dict[str, Tensor], dict]:
    """``(state_dict, state)`` of the newest checkpoint under ``path``: the EMA weights by default, and the
    checkpoint's JSON state (``state["meta"]`` holds what the caller stored, e.g. the run config)."""
    found = read_checkpoint(path)
    if found is None:
        raise FileNotFoundError(f"no scorekit checkpoint found under {path} (expected checkpoints/step-*/state.json)")
    ckpt, state = found
    weights, _ = load_tensors(ckpt / ("ema.safetensors" if ema else "model.safetensors"))
    return weights, state


class Trainer:
    """Minimise ``loss_fn(model, batch, generator)`` with AdamW on accelerate.

    ``data`` is a tensor or a tuple of tensors sharing their first dimension; each step draws a batch of
    ``config.batch_size`` rows from a per-process random permutation (epochs without replacement).
    ``loss_fn`` must call ``model(...)`` (its forward) so that multi-process gradient sync works.
    ``params`` restricts the optimised parameters (default: those with ``requires_grad``).
    ``callbacks`` are called as ``cb(trainer)`` after every optimizer step (``trainer.step`` is the number
    of steps done). ``meta`` is stored in every checkpoint (e.g. the run config, to rebuild the model).

    With ``out_dir`` set, checkpoints go to ``out_dir/checkpoints/step-XXXXXXXX/`` (safetensors weights,
    EMA, optimizer and per-process RNG state, plus ``state.json``), each written to a temporary directory
    and renamed, and :meth:`train` resumes from the newest one: the continued run is bit-for-bit the run
    that was never interrupted.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        data: Tensor | Sequence[Tensor],
        config: TrainConfig | None = None,
        *,
        out_dir: str | os.PathLike | None = None,
        params: Iterable[nn.Parameter] | None = None,
        callbacks: Sequence[Callable[[Trainer], None]] = (),
        meta: dict | None = None,
        accelerator: Accelerator | None = None,
    ):
        self.config = cfg = config if config is not None else TrainConfig()
        # cpu=True on machines without CUDA lets accelerate pick its multi-process CPU (gloo) backend
        # under torchrun / accelerate launch.
        self.accelerator = acc = accelerator or Accelerator(
            mixed_precision=resolve_precision(cfg.mixed_precision), cpu=not torch.cuda.is_available()
        )
        self.loss_fn, self.callbacks, self.meta = loss_fn, list(callbacks), meta or {}
        self.out_dir = Path(out_dir) if out_dir is not None else None

        tensors = (data,) if torch.is_tensor(data) else tuple(data)
        if not tensors or not all(torch.is_tensor(d) for d in tensors):
            raise TypeError("data must be a tensor or a tuple of tensors")
        n = tensors[0].shape[0]
        if n == 0 or any(d.shape[0] != n for d in tensors):
            raise ValueError(f"data tensors must be non-empty and share their first dimension, got {[tuple(d.shape) for d in tensors]}")
        self._single = torch.is_tensor(data)
        self.data = tuple(d.to(acc.device) for d in tensors)
        self.n = n

        rank = acc.process_index
        self.generator = torch.Generator(device=acc.device).manual_seed(cfg.seed + 7919 * rank)
        self._data_generator = torch.Generator().manual_seed(cfg.seed + 104729 * (rank + 1))
        self._perm = torch.randperm(n, generator=self._data_generator)
        self._pos = 0

        self.ema = copy.deepcopy(model).requires_grad_(False).eval()
        model.to(acc.device)
        self.ema.to(acc.device)
        self.model = acc.prepare(model)
        self._make_optimizer(params)
        self.step = 0
        self.history: list[float] = []
        self._resumed = False

    # -- setup ---------------------------------------------------------------------------------
    def _make_optimizer(self, params: Iterable[nn.Parameter] | None) -> None:
        model = self.accelerator.unwrap_model(self.model)
        self.params = list(params) if params is not None else [p for p in model.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError("no trainable parameters: every parameter has requires_grad=False and none were passed")
        cfg = self.config
        opt = torch.optim.AdamW(self.params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
        self.optimizer = self.accelerator.prepare(opt)

    def rebuild_optimizer(self, params: Iterable[nn.Parameter] | None = None) -> None:
        """Start a fresh optimizer (and EMA copy) over ``params``: for callbacks that replace parameters
        (SaRA's progressive re-selection)."""
        self._make_optimizer(params)
        self.ema = copy.deepcopy(self.accelerator.unwrap_model(self.model)).requires_grad_(False).eval()

    @property
    def unwrapped(self) -> nn.Module:
        """The model without accelerate/DDP wrappers."""
        return self.accelerator.unwrap_model(self.model)

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    # -- one step ------------------------------------------------------------------------------
    def _next_batch(self):
        bs = self.config.batch_size
        idx = []
        while len(idx) < bs:
            if self._pos >= self.n:
                self._perm = torch.randperm(self.n, generator=self._data_generator)
                self._pos = 0
            take = self._perm[self._pos : self._pos + bs - len(idx)]
            self._pos += len(take)
            idx.extend(take.tolist())
        idx_t = torch.tensor(idx, device=self.accelerator.device)
        batch = tuple(d[idx_t] for d in self.data)
        return batch[0] if self._single else batch

    def _lr(self) -> float:
        cfg = self.config
        return cfg.lr * min(1.0, (self.step + 1) / cfg.warmup) if cfg.warmup else cfg.lr

    def _update_ema(self) -> None:
        update_ema(self.ema, self.unwrapped, self.config.ema_decay, self.step)

    def train(self, steps: int | None = None) -> list[float]:
        """Run until ``steps`` (default ``config.steps``) optimizer steps are done; returns the loss history."""
        cfg, acc = self.config, self.accelerator
        total = steps if steps is not None else cfg.steps
        if self.out_dir is not None and cfg.resume and not self._resumed:
            self.resume()
        bar = tqdm(total=total, initial=self.step, disable=not (cfg.progress and self.is_main), desc="train",
                   dynamic_ncols=True)
        self.model.train()
        while self.step < total:
            batch = self._next_batch()
            with acc.autocast():
                loss = self.loss_fn(self.model, batch, self.generator)
            mean_loss = acc.reduce(loss.detach().float(), reduction="mean")
            if not torch.isfinite(mean_loss):
                self._fail(mean_loss.item())
            acc.backward(loss)
            if cfg.grad_clip is not None:
                acc.clip_grad_norm_(self.params, cfg.grad_clip)
            for group in self.optimizer.param_groups:
                group["lr"] = self._lr()
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.step += 1
            self._update_ema()
            self.history.append(mean_loss.item())
            for cb in self.callbacks:
                cb(self)
            if cfg.log_every and self.step % cfg.log_every == 0:
                window = self.history[-cfg.log_every :]
                bar.set_postfix(loss=f"{sum(window) / len(window):.4f}")
            bar.update(1)
            if self.out_dir is not None and cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0:
                self.save_checkpoint()
        bar.close()
        if self.out_dir is not None and self._latest_step() != self.step:
            self.save_checkpoint()
        return self.history

    def _fail(self, value: float) -> None:
        last = latest_checkpoint(self.out_dir) if self.out_dir is not None else None
        where = f"the last good checkpoint is {last}" if last else "no checkpoint was written"
        raise FloatingPointError(
            f"loss is {value} at step {self.step + 1}: training stopped before applying it; {where}. "
            "Lower the learning rate, clip gradients or use mixed_precision='no', then resume."
        )

    # -- checkpoints ---------------------------------------------------------------------------
    def _latest_step(self) -> int:
        ckpt = latest_checkpoint(self.out_dir)
        return -1 if ckpt is None else int(ckpt.name.split("-")[1])

    def _rank_state(self) -> dict[str, Tensor]:
        return {
            "generator": self.generator.get_state(),
            "data_generator": self._data_generator.get_state(),
            "perm": self._perm,
            "pos": torch.tensor(self._pos),
        }

    def save_checkpoint(self) -> Path:
        """Write ``out_dir/checkpoints/step-XXXXXXXX`` atomically (temp dir, then rename) and prune old ones."""
        if self.out_dir is None:
            raise ValueError("this Trainer has no out_dir; pass out_dir=... to save checkpoints")
        acc = self.accelerator
        root = self.out_dir / "checkpoints"
        final = root / f"step-{self.step:08d}"
        tmp = root / f".step-{self.step:08d}.tmp"
        if self.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        save_tensors(self._rank_state(), tmp / f"rank-{acc.process_index}.safetensors")
        acc.wait_for_everyone()
        if self.is_main:
            save_tensors(self.unwrapped.state_dict(), tmp / "model.safetensors")
            save_tensors(self.ema.state_dict(), tmp / "ema.safetensors")
            opt_tensors, opt_rest = optimizer_to_tensors(self.optimizer.state_dict())
            save_tensors(opt_tensors, tmp / "optimizer.safetensors", opt_rest)
            state = {
                "format": FORMAT,
                "step": self.step,
                "world_size": acc.num_processes,
                "history": self.history,
                "config": dataclasses.asdict(self.config),
                "meta": self.meta,
            }
            save_json(state, tmp / "state.json")
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            prune_checkpoints(root, self.config.keep_checkpoints, final)
        acc.wait_for_everyone()
        return final

    def resume(self, path: str | os.PathLike | None = None) -> bool:
        """Restore the newest checkpoint under ``path`` (default ``out_dir``); returns whether one was found."""
        self._resumed = True
        found = read_checkpoint(path if path is not None else self.out_dir)
        if found is None:
            return False
        ckpt, state = found
        acc = self.accelerator
        if state["world_size"] != acc.num_processes:
            raise ValueError(
                f"{ckpt} was written by {state['world_size']} processes but this run has {acc.num_processes}; "
                "resume with the same number of processes"
            )
        device = acc.device
        model_sd, _ = load_tensors(ckpt / "model.safetensors", device)
        load_state_checked(self.unwrapped, model_sd, ckpt / "model.safetensors")
        ema_sd, _ = load_tensors(ckpt / "ema.safetensors", device)
        load_state_checked(self.ema, ema_sd, ckpt / "ema.safetensors")
        opt_tensors, opt_rest = load_tensors(ckpt / "optimizer.safetensors", device)
        self.optimizer.load_state_dict(optimizer_from_tensors(opt_tensors, opt_rest))
        rank, _ = load_tensors(ckpt / f"rank-{acc.process_index}.safetensors")
        self.generator.set_state(rank["generator"])
        self._data_generator.set_state(rank["data_generator"])
        self._perm, self._pos = rank["perm"], int(rank["pos"])
        self.step, self.history = state["step"], list(state["history"])
        return True


def load_state_checked(module: nn.Module, state: dict[str, Tensor], source: Path) -> None:
    """``load_state_dict`` with an error that names the file and the mismatching keys."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [k for k in own if k in state and own[k].shape != state[k].shape]
    if missing or unexpected or shapes:
        raise ValueError(
            f"{source} does not match the model: missing keys {missing[:5]}, unexpected keys {unexpected[:5]}, "
            f"shape mismatches {[(k, tuple(state[k].shape), tuple(own[k].shape)) for k in shapes[:5]]}"
        )
    module.load_state_dict(state)


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (optionally only those with ``requires_grad``)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)

