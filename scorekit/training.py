"""The one training home: a loop on accelerate with AdamW, warm-up, gradient clipping, EMA, mixed
precision, a NaN guard, a progress bar and atomic safetensors checkpoints that resume bit-for-bit.

:class:`TrainingLoop` is the core: it checkpoints any number of named modules, optimizers and EMA
copies into one step directory and runs ``train_step`` until the step count is reached.
:class:`Trainer` is that loop for one model and ``loss_fn(model, batch, generator)`` over batches drawn
from in-memory tensors (:func:`scorekit.losses.make_dsm_loss` gives the score-matching loss;
classifiers, value networks, Noise2Score and SaRA reuse it with their own losses);
:class:`scorekit.distill.FDistill` runs its generator and critics on the same core.
Both run unchanged under ``accelerate launch --num_processes N``.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import shutil
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
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
from .validate import fraction, non_negative, non_negative_int, positive, positive_int

if TYPE_CHECKING:
    from accelerate import Accelerator

__all__ = [
    "TrainConfig", "TrainingLoop", "Trainer", "latest_checkpoint", "load_weights", "load_state_checked",
    "count_parameters", "read_checkpoint", "prune_checkpoints", "update_ema", "resolve_precision", "MIXED_PRECISION",
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
        if isinstance(self.steps, (int, float)) and self.steps < 1:  # the wording configs have always reported
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        self.steps = positive_int(self.steps, "steps")
        self.batch_size = positive_int(self.batch_size, "batch_size")
        self.lr = positive(self.lr, "lr")
        self.weight_decay = non_negative(self.weight_decay, "weight_decay")
        self.betas = tuple(self.betas)
        if len(self.betas) != 2:
            raise ValueError(f"betas must be two numbers, got {self.betas}")
        self.betas = (fraction(self.betas[0], "betas[0]"), fraction(self.betas[1], "betas[1]"))
        self.warmup = non_negative_int(self.warmup, "warmup", "steps of linear learning-rate warm-up")
        if self.grad_clip is not None:
            self.grad_clip = positive(self.grad_clip, "grad_clip", "null = no clipping")
        self.ema_decay = fraction(self.ema_decay, "ema_decay")
        if self.mixed_precision not in MIXED_PRECISION:
            raise ValueError(f"unknown mixed_precision {self.mixed_precision!r}; valid choices are {list(MIXED_PRECISION)}")
        self.log_every = non_negative_int(self.log_every, "log_every", "0 = no loss in the progress bar")
        self.checkpoint_every = non_negative_int(self.checkpoint_every, "checkpoint_every", "0 = only at the end")
        self.keep_checkpoints = positive_int(self.keep_checkpoints, "keep_checkpoints")


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


Tracked = nn.Module | torch.optim.Optimizer


class TrainingLoop:
    """The core every trainer runs on: named state in one checkpoint, and the loop around ``train_step``.

    A subclass builds its networks with :meth:`make_optimizer` / :meth:`make_ema`, registers what a
    checkpoint holds with :meth:`track` (modules, optimizers, EMA copies, each saved as
    ``NAME.safetensors``), and implements :meth:`train_step`: one update, done through :meth:`optimize`
    (NaN guard, backward, gradient clipping, warm-up, optimizer step), returning the history entry.
    :meth:`train` runs it ``config.steps`` times with EMA updates, callbacks ``cb(self)``, a progress bar and
    a checkpoint every ``config.checkpoint_every`` steps; per-process RNG state goes through
    :meth:`rank_state` / :meth:`load_rank_state`. ``config`` (kept as ``train_config``) is the
    :class:`TrainConfig`; the accelerator is built from its ``mixed_precision`` unless one is passed.

    Checkpoints go to ``out_dir/checkpoints/step-XXXXXXXX/``: every tracked object, ``rank-N.safetensors``
    per process (when there is rank state) and ``state.json`` (``format``, ``step``, ``world_size``,
    ``history``, ``config``, ``meta``), written to a temporary directory and renamed; the ``keep_checkpoints``
    newest are kept. :meth:`resume` restores all of it, so that a continued run is bit-for-bit the run that
    was never interrupted. ``record`` is the config stored in ``state.json`` (default ``config``).
    """

    checkpoint_format = FORMAT
    checkpoint_kind = "a scorekit training checkpoint"
    desc = "train"
    loss_name, step_name = "loss", "step"
    advice = "Lower the learning rate, clip gradients or use mixed_precision='no', then resume."

    def __init__(
        self,
        config: TrainConfig,
        *,
        record: Any = None,
        out_dir: str | os.PathLike | None = None,
        callbacks: Iterable[Callable[[Any], None]] = (),
        meta: dict | None = None,
        accelerator: Accelerator | None = None,
    ):
        self.train_config = config
        self.record = record if record is not None else config
        if accelerator is None:
            from accelerate import Accelerator

            # cpu=True on machines without CUDA lets accelerate pick its multi-process CPU (gloo) backend
            # under torchrun / accelerate launch.
            accelerator = Accelerator(mixed_precision=resolve_precision(config.mixed_precision),
                                      cpu=not torch.cuda.is_available())
        self.accelerator = accelerator
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.callbacks, self.meta = list(callbacks), meta or {}
        self.tracked: dict[str, Tracked] = {}
        self._ema_of: dict[str, str] = {}
        self._base_lr: dict[int, float | None] = {}
        self.step = 0
        self.history: list = []
        self._resumed = False

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    # -- building ------------------------------------------------------------------------------
    def make_optimizer(self, params: Iterable[nn.Parameter], lr: float | None = None) -> torch.optim.Optimizer:
        """AdamW over ``params`` with the config's betas and weight decay, prepared for accelerate.

        ``lr=None`` follows ``config.lr`` as it is at each step (callbacks may change it); warm-up scales both.
        """
        cfg = self.train_config
        base = cfg.lr if lr is None else lr
        opt = self.accelerator.prepare(torch.optim.AdamW(params, lr=base, betas=cfg.betas, weight_decay=cfg.weight_decay))
        self._base_lr[id(opt)] = lr
        return opt

    def make_ema(self, module: nn.Module) -> nn.Module:
        """A frozen copy of ``module`` on the device, in eval mode: the start of an EMA."""
        return copy.deepcopy(module).requires_grad_(False).eval().to(self.device)

    def track(self, name: str, obj: Tracked, *, ema_of: str | None = None) -> Tracked:
        """Save and restore ``obj`` (a module, possibly accelerate-wrapped, or an optimizer) as ``NAME.safetensors``.

        With ``ema_of``, ``obj`` is the EMA of the tracked module of that name, updated after every step.
        Tracking a name again replaces its object (e.g. a rebuilt optimizer).
        """
        if not isinstance(obj, (nn.Module, torch.optim.Optimizer)):
            raise TypeError(f"{name}: only modules and optimizers can be checkpointed, got {type(obj).__name__}")
        if ema_of is not None and ema_of not in self.tracked:
            raise ValueError(f"{name}: the EMA source {ema_of!r} is not tracked; track it first")
        self.tracked[name] = obj
        if ema_of is not None:
            self._ema_of[name] = ema_of
        return obj

    def tracked_modules(self) -> dict[str, nn.Module]:
        """The tracked modules by name, without accelerate/DDP wrappers."""
        unwrap = self.accelerator.unwrap_model
        return {k: unwrap(v) for k, v in self.tracked.items() if isinstance(v, nn.Module)}

    def tracked_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {k: v for k, v in self.tracked.items() if isinstance(v, torch.optim.Optimizer)}

    # -- one update ----------------------------------------------------------------------------
    def train_step(self) -> Any:
        """One update (``self.step`` is the number done before it); returns the history entry."""
        raise NotImplementedError

    def lr(self, base: float | None = None) -> float:
        """The learning rate of this step: ``base`` (default ``config.lr``) times the linear warm-up."""
        cfg = self.train_config
        lr = cfg.lr if base is None else base
        return lr * min(1.0, (self.step + 1) / cfg.warmup) if cfg.warmup else lr

    def check_loss(self, loss: Tensor) -> Tensor:
        """The mean of ``loss`` over processes; a non-finite one stops training before it is applied."""
        value = self.accelerator.reduce(loss.detach().float(), reduction="mean")
        if not torch.isfinite(value):
            last = latest_checkpoint(self.out_dir) if self.out_dir is not None else None
            where = f"the last good checkpoint is {last}" if last else "no checkpoint was written"
            raise FloatingPointError(f"{self.loss_name} is {value.item()} at {self.step_name} {self.step + 1}: "
                                     f"training stopped before applying it; {where}. {self.advice}")
        return value

    def optimize(self, loss: Tensor, optimizers: Sequence[torch.optim.Optimizer]) -> float:
        """NaN guard, backward, per-optimizer gradient clipping, learning rate, step; returns the mean loss."""
        acc, clip = self.accelerator, self.train_config.grad_clip
        value = self.check_loss(loss)
        acc.backward(loss)
        if clip is not None:
            # unscale (fp16) once for just these optimizers, then clip each one's parameters on their own
            acc.unscale_gradients(list(optimizers))
            for opt in optimizers:
                torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], clip)
        for opt in optimizers:
            if id(opt) in self._base_lr:  # made by make_optimizer: warm-up and config.lr apply
                lr = self.lr(self._base_lr[id(opt)])
                for group in opt.param_groups:
                    group["lr"] = lr
            opt.step()
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
        return value.item()

    def update_emas(self) -> None:
        """``update_ema`` of every tracked EMA copy towards its source, at the current step."""
        modules = self.tracked_modules()
        for name, source in self._ema_of.items():
            update_ema(modules[name], modules[source], self.train_config.ema_decay, self.step)

    def progress(self) -> dict[str, str]:
        """What the progress bar shows every ``config.log_every`` steps."""
        window = self.history[-self.train_config.log_every :]
        return {"loss": f"{sum(window) / len(window):.4f}"}

    # -- the loop ------------------------------------------------------------------------------
    def train(self, steps: int | None = None) -> list:
        """Run until ``steps`` (default ``config.steps``) updates are done; returns the history."""
        cfg = self.train_config
        total = steps if steps is not None else cfg.steps
        if self.out_dir is not None and cfg.resume and not self._resumed:
            self.resume()
        bar = tqdm(total=total, initial=self.step, disable=not (cfg.progress and self.is_main), desc=self.desc,
                   dynamic_ncols=True)
        while self.step < total:
            entry = self.train_step()
            self.step += 1
            self.update_emas()
            self.history.append(entry)
            for cb in self.callbacks:
                cb(self)
            if cfg.log_every and self.step % cfg.log_every == 0:
                bar.set_postfix(self.progress())
            bar.update(1)
            if self.out_dir is not None and cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0:
                self.save_checkpoint()
        bar.close()
        if self.out_dir is not None and self._latest_step() != self.step:
            self.save_checkpoint()
        return self.history

    # -- checkpoints ---------------------------------------------------------------------------
    def rank_state(self) -> dict[str, Tensor]:
        """Per-process state saved as ``rank-N.safetensors`` (RNG streams, data order); none by default."""
        return {}

    def load_rank_state(self, state: dict[str, Tensor]) -> None:
        """Restore what :meth:`rank_state` returned."""

    def _latest_step(self) -> int:
        ckpt = latest_checkpoint(self.out_dir)
        return -1 if ckpt is None else int(ckpt.name.split("-")[1])

    def save_checkpoint(self) -> Path:
        """Write ``out_dir/checkpoints/step-XXXXXXXX`` atomically (temp dir, then rename) and prune old ones."""
        if self.out_dir is None:
            raise ValueError(f"this {type(self).__name__} has no out_dir; pass out_dir=... to save checkpoints")
        acc = self.accelerator
        root = self.out_dir / "checkpoints"
        final = root / f"step-{self.step:08d}"
        tmp = root / f".step-{self.step:08d}.tmp"
        if self.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        rank = self.rank_state()
        if rank:
            save_tensors(rank, tmp / f"rank-{acc.process_index}.safetensors")
        acc.wait_for_everyone()
        if self.is_main:
            for name, module in self.tracked_modules().items():
                save_tensors(module.state_dict(), tmp / f"{name}.safetensors")
            for name, opt in self.tracked_optimizers().items():
                tensors, rest = optimizer_to_tensors(opt.state_dict())
                save_tensors(tensors, tmp / f"{name}.safetensors", rest)
            state = {
                "format": self.checkpoint_format,
                "step": self.step,
                "world_size": acc.num_processes,
                "history": self.history,
                "config": dataclasses.asdict(self.record),
                "meta": self.meta,
            }
            save_json(state, tmp / "state.json")
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            prune_checkpoints(root, self.train_config.keep_checkpoints, final)
        acc.wait_for_everyone()
        return final

    def resume(self, path: str | os.PathLike | None = None) -> bool:
        """Restore the newest checkpoint under ``path`` (default ``out_dir``); returns whether one was found."""
        self._resumed = True
        path = path if path is not None else self.out_dir
        found = None if path is None else read_checkpoint(path, self.checkpoint_format, self.checkpoint_kind)
        if found is None:
            return False
        ckpt, state = found
        acc = self.accelerator
        written_by = state.get("world_size", acc.num_processes)
        if written_by != acc.num_processes:
            raise ValueError(
                f"{ckpt} was written by {written_by} processes but this run has {acc.num_processes}; "
                "resume with the same number of processes"
            )
        for name, module in self.tracked_modules().items():
            tensors, _ = load_tensors(ckpt / f"{name}.safetensors", self.device)
            load_state_checked(module, tensors, ckpt / f"{name}.safetensors")
        for name, opt in self.tracked_optimizers().items():
            tensors, rest = load_tensors(ckpt / f"{name}.safetensors", self.device)
            opt.load_state_dict(optimizer_from_tensors(tensors, rest))
        if self.rank_state():
            self.load_rank_state(load_tensors(ckpt / f"rank-{acc.process_index}.safetensors")[0])
        self.step, self.history = state["step"], list(state["history"])
        return True


class Trainer(TrainingLoop):
    """Minimise ``loss_fn(model, batch, generator)`` with AdamW on accelerate.

    ``data`` is a tensor or a tuple of tensors sharing their first dimension; each step draws a batch of
    ``config.batch_size`` rows from a per-process random permutation (epochs without replacement).
    ``loss_fn`` must call ``model(...)`` (its forward) so that multi-process gradient sync works.
    ``params`` restricts the optimised parameters (default: those with ``requires_grad``).
    ``callbacks`` are called as ``cb(trainer)`` after every optimizer step (``trainer.step`` is the number
    of steps done). ``meta`` is stored in every checkpoint (e.g. the run config, to rebuild the model).

    With ``out_dir`` set, checkpoints go to ``out_dir/checkpoints/step-XXXXXXXX/`` (``model``, ``ema`` and
    ``optimizer.safetensors``, per-process RNG state ``rank-N.safetensors``, plus ``state.json``), each written
    to a temporary directory and renamed, and :meth:`train` resumes from the newest one: the continued run is
    bit-for-bit the run that was never interrupted.
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
        super().__init__(cfg, out_dir=out_dir, callbacks=callbacks, meta=meta, accelerator=accelerator)
        acc = self.accelerator
        self.loss_fn = loss_fn

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

        ema = self.make_ema(model)
        self.model = self.track("model", acc.prepare(model.to(acc.device)))
        self.ema = self.track("ema", ema, ema_of="model")
        self._make_optimizer(params)

    # -- setup ---------------------------------------------------------------------------------
    def _make_optimizer(self, params: Iterable[nn.Parameter] | None) -> None:
        self.params = list(params) if params is not None else [p for p in self.unwrapped.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError("no trainable parameters: every parameter has requires_grad=False and none were passed")
        self.optimizer = self.track("optimizer", self.make_optimizer(self.params))

    def rebuild_optimizer(self, params: Iterable[nn.Parameter] | None = None) -> None:
        """Start a fresh optimizer (and EMA copy) over ``params``: for callbacks that replace parameters
        (SaRA's progressive re-selection)."""
        self._make_optimizer(params)
        self.ema = self.track("ema", self.make_ema(self.unwrapped), ema_of="model")

    @property
    def unwrapped(self) -> nn.Module:
        """The model without accelerate/DDP wrappers."""
        return self.accelerator.unwrap_model(self.model)

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

    def train_step(self) -> float:
        batch = self._next_batch()
        with self.accelerator.autocast():
            loss = self.loss_fn(self.model, batch, self.generator)
        return self.optimize(loss, [self.optimizer])

    def train(self, steps: int | None = None) -> list[float]:
        """Run until ``steps`` (default ``config.steps``) optimizer steps are done; returns the loss history."""
        self.model.train()
        return super().train(steps)

    # -- per-process state ---------------------------------------------------------------------
    def rank_state(self) -> dict[str, Tensor]:
        return {
            "generator": self.generator.get_state(),
            "data_generator": self._data_generator.get_state(),
            "perm": self._perm,
            "pos": torch.tensor(self._pos),
        }

    def load_rank_state(self, state: dict[str, Tensor]) -> None:
        self.generator.set_state(state["generator"])
        self._data_generator.set_state(state["data_generator"])
        self._perm, self._pos = state["perm"], int(state["pos"])


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

