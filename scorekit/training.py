"""The one training home: a loop on accelerate with AdamW, warm-up, gradient clipping, EMA, mixed
precision, a NaN guard, a progress bar and atomic safetensors checkpoints that resume bit-for-bit.

:class:`TrainingLoop` is the core: it checkpoints any number of named modules, optimizers and EMA
copies into one step directory and runs ``train_step`` until the step count is reached.
:class:`Trainer` is that loop for one model and ``loss_fn(model, batch, generator)`` over batches drawn
from in-memory tensors (:func:`scorekit.losses.make_dsm_loss` gives the score-matching loss;
classifiers, value networks, Noise2Score and SaRA reuse it with their own losses);
:class:`scorekit.distill.FDistill` runs its generator and critics on the same core.
Both run unchanged under ``accelerate launch --num_processes N``.

Faults the loop guards against: a non-finite loss or gradient (the update is skipped on the device and
training stops naming the last finite checkpoint), a second run into the same ``out_dir`` (a run lock), an
unusable ``out_dir`` (created and test-written before the first step), a fresh run over an older one
(refused unless ``overwrite``), a resume with changed data (refused) or config (warned), a power loss
(checkpoints are fsynced before they are published) and cluster preemption (SIGTERM saves a checkpoint at
the end of the step and exits with status 143).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import itertools
import json
import math
import operator
import os
import shutil
import signal
import sys
import tempfile
import threading
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .checkpoint import (
    atomic_dir,
    load_json,
    load_tensors,
    meta_field,
    optimizer_from_tensors,
    optimizer_to_tensors,
    remove_stale_temporaries,
    save_json,
    save_tensors,
)
from .launch import warn_if_launch_was_not_split
from .validate import fraction, int_at_least, non_negative, non_negative_int, positive, positive_int

try:  # POSIX; elsewhere runs are not locked
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None
try:  # torch >= 2.6
    from torch.nn.utils import clip_grads_with_norm_, get_total_norm
except ImportError:  # pragma: no cover
    clip_grads_with_norm_ = get_total_norm = None

if TYPE_CHECKING:
    from accelerate import Accelerator

__all__ = [
    "TrainConfig", "TrainingLoop", "Trainer", "latest_checkpoint", "load_weights", "load_state_checked",
    "count_parameters", "read_checkpoint", "prune_checkpoints", "update_ema", "resolve_precision", "MIXED_PRECISION",
    "adamw_options", "last_finite_checkpoint", "RunLock", "RunDirError", "Preempted",
]

MIXED_PRECISION = ("auto", "no", "fp16", "bf16")
FORMAT = "scorekit-trainer/1"
LossFn = Callable[[nn.Module, Any, torch.Generator], Tensor]
READ_BACK_EVERY = 100  # steps between reads of the device-side history and NaN flags when log_every is 0
PREEMPTED_EXIT_CODE = 128 + signal.SIGTERM  # 143, what a shell reports for a process ended by SIGTERM
# keys whose change between a checkpoint and the run resuming it is expected (a longer run, other logging)
RESUMABLE_CHANGES = frozenset({"steps", "progress", "resume", "overwrite", "log_every", "checkpoint_every",
                               "keep_checkpoints", "out_dir", "n_samples"})


@dataclass
class TrainConfig:
    """Optimisation settings of :class:`Trainer` (the ``training:`` section of a YAML config).

    ``resume``: continue from the newest checkpoint in ``out_dir``. With ``resume: false`` an ``out_dir``
    that already holds checkpoints is refused, unless ``overwrite: true``, which deletes them first.
    """

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
    overwrite: bool = False

    def __post_init__(self):
        self.steps = int_at_least(self.steps, 1, "steps", "optimiser steps")
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
        for name in ("progress", "resume", "overwrite"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")


_EMAGroup = tuple[list[Tensor], list[Tensor], bool]  # EMA tensors, their sources, whether those need a cast


@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, decay: float, step: int) -> None:
    """``ema <- decay' ema + (1 - decay') model`` over the state dict, ``decay' = min(decay, (1 + step) / (10 + step))``.

    The warm-up is TensorFlow's ``ExponentialMovingAverage(num_updates)``, so that short runs are not
    dominated by the random initialisation; integer buffers are copied. The floating tensors are updated
    with one ``torch._foreach_lerp_`` per dtype and device.
    """
    _apply_ema(*_ema_pairs(ema.state_dict(), model.state_dict()), decay, step)


def _ema_pairs(ema_state: dict[str, Tensor], source_state: dict[str, Tensor]
               ) -> tuple[list[_EMAGroup], list[tuple[Tensor, Tensor]]]:
    """What :func:`update_ema` moves: the floating entries of ``ema_state`` grouped by dtype and device with
    their sources, and the ``(target, source)`` pairs of the other entries (copied)."""
    groups: dict[tuple[torch.dtype, torch.device], tuple[list[Tensor], list[Tensor]]] = {}
    copies = []
    for name, value in ema_state.items():
        if value.is_floating_point():
            targets, sources = groups.setdefault((value.dtype, value.device), ([], []))
            targets.append(value)
            sources.append(source_state[name])
        else:
            copies.append((value, source_state[name]))
    return [(targets, sources, any(s.dtype != t.dtype or s.device != t.device for t, s in zip(targets, sources)))
            for targets, sources in groups.values()], copies


def _apply_ema(groups: list[_EMAGroup], copies: list[tuple[Tensor, Tensor]], decay: float, step: int) -> None:
    """One EMA update of what :func:`_ema_pairs` resolved (the caller holds ``no_grad``), warm-up as in :func:`update_ema`."""
    decay = min(decay, (1 + step) / (10 + step))
    for target, source in copies:
        target.copy_(source)
    for targets, sources, cast in groups:
        if cast:
            sources = [s.to(device=t.device, dtype=t.dtype) for t, s in zip(targets, sources)]
        torch._foreach_lerp_(targets, sources, 1 - decay)


_DTYPE_DEVICE = operator.attrgetter("dtype", "device")


class _EMAUpdate:
    """:func:`update_ema` of one EMA copy towards its source, with the two state dicts walked once instead of
    at every step (that walk, with its detached copy of every tensor, cost more than the rest of the
    Trainer's per-step bookkeeping).

    The tensors come from ``state_dict(keep_vars=True)``: the parameters and buffers themselves, so their
    in-place updates and ``.data`` replacements are followed. The resolution is redone when it may no
    longer be what ``state_dict`` gives: when either module gets a parameter, buffer or submodule replaced,
    added or removed (SaRA's re-selection and its resume replace Parameters and buffers), its non-persistent
    buffers or state-dict hooks change, or a resolved tensor changes dtype or device. :meth:`current`
    checks that at every step by iterating those dicts in C, with no Python call per tensor. Where a
    state dict holds anything but the modules' own parameters and buffers (a custom ``_save_to_state_dict``,
    extra state, hooks that add entries), every step takes :func:`update_ema`.
    """

    def __init__(self, ema: nn.Module, source: nn.Module):
        self.ema, self.source = ema, source
        modules = [m for root in (ema, source) for m in root.modules()]
        self._views = [view for m in modules for view in (
            m._parameters.values(), m._buffers.values(), m._modules.values(), m._non_persistent_buffers_set,
            m._state_dict_hooks.values(), m._state_dict_pre_hooks.values())]
        self._layout = tuple(itertools.chain.from_iterable(self._views))
        self.groups, self.copies = _ema_pairs(ema.state_dict(keep_vars=True), source.state_dict(keep_vars=True))
        self._tensors = [t for targets, sources, _ in self.groups for t in (*targets, *sources)]
        self._tensors += [t for pair in self.copies for t in pair]
        own = {id(t) for m in modules for t in itertools.chain(m._parameters.values(), m._buffers.values())}
        self.resolved = all(id(t) in own for t in self._tensors)
        if not self.resolved:  # update_ema at every step: keep no tensors of this state dict alive
            self.groups, self.copies, self._tensors = [], [], []
        self._meta = list(map(_DTYPE_DEVICE, self._tensors))

    def current(self, ema: nn.Module, source: nn.Module) -> bool:
        """Whether this resolution still holds for ``ema`` and ``source``."""
        if ema is not self.ema or source is not self.source:
            return False
        layout = tuple(itertools.chain.from_iterable(self._views))
        return (len(layout) == len(self._layout) and all(map(operator.is_, layout, self._layout))
                and list(map(_DTYPE_DEVICE, self._tensors)) == self._meta)

    @torch.no_grad()
    def __call__(self, decay: float, step: int) -> None:
        if self.resolved:
            _apply_ema(self.groups, self.copies, decay, step)
        else:
            update_ema(self.ema, self.source, decay, step)


def adamw_options(params: Iterable[nn.Parameter | dict]) -> dict[str, bool]:
    """``{"fused": True}`` when torch has a fused AdamW for every parameter's device and dtype, else ``{}``
    (torch's own choice, foreach on CUDA).

    The fused step takes a device-side ``found_inf`` flag and then leaves the parameters, the moments and
    the step count untouched, which is how :meth:`TrainingLoop.optimize` skips a non-finite update
    without a host sync.
    """
    try:
        from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

        devices = set(_get_fused_kernels_supported_devices())
    except ImportError:  # pragma: no cover - an older torch
        return {}
    tensors = [t for p in params for t in (p["params"] if isinstance(p, dict) else [p])]
    fusable = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
    if tensors and all(t.device.type in devices and t.dtype in fusable for t in tensors):
        return {"fused": True}
    return {}


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
    if not isinstance(state, dict):
        raise ValueError(f"{ckpt / 'state.json'} holds a JSON {type(state).__name__}, expected an object with "
                         f"format, step, world_size and history; the checkpoint is corrupt: delete {ckpt} to resume "
                         "from the one before it")
    if state.get("format") != fmt:
        raise ValueError(f"{ckpt} is not {kind} (format {state.get('format')!r}, expected {fmt!r})")
    return ckpt, state


def prune_checkpoints(root: Path, keep: int, final: Path) -> None:
    """Delete the ``step-*`` directories under ``root`` but the ``keep`` newest, ``final`` (just written) always among them."""
    for old in sorted(p for p in root.glob("step-*") if p != final)[: -keep + 1 or None]:
        shutil.rmtree(old, ignore_errors=True)


def _finite_file(path: Path) -> bool:
    tensors, _ = load_tensors(path)
    return all(bool(torch.isfinite(t).all()) for t in tensors.values() if t.is_floating_point())


def last_finite_checkpoint(path: str | os.PathLike, before: int | None = None) -> Path | None:
    """The newest complete checkpoint under ``path`` (of a step below ``before``) whose tensors (weights,
    EMA copies and optimizer states) are all finite, or ``None``: the one to resume from after a NaN."""
    root = Path(path)
    root = root / "checkpoints" if (root / "checkpoints").is_dir() else root
    for ckpt in sorted(root.glob("step-*"), reverse=True):
        try:
            step = int(ckpt.name.split("-")[1])
        except (IndexError, ValueError):
            continue
        if (before is not None and step >= before) or not (ckpt / "state.json").is_file():
            continue
        try:
            if all(_finite_file(f) for f in sorted(ckpt.glob("*.safetensors"))):
                return ckpt
        except ValueError:  # unreadable: not a good checkpoint
            continue
    return None


def _tensor_leaves(entry: Any) -> Iterator[Tensor]:
    """The tensors in a history entry (a tensor, a number, or dicts/lists of them), in order."""
    if torch.is_tensor(entry):
        yield entry
    elif isinstance(entry, dict):
        for value in entry.values():
            yield from _tensor_leaves(value)
    elif isinstance(entry, (list, tuple)):
        for value in entry:
            yield from _tensor_leaves(value)


def _as_numbers(entry: Any, values: Iterator[float]) -> Any:
    """``entry`` with its tensors replaced by the next numbers of ``values`` (0-d: a float, else a list)."""
    if torch.is_tensor(entry):
        numbers = [next(values) for _ in range(entry.numel())]
        return numbers[0] if entry.dim() == 0 else numbers
    if isinstance(entry, dict):
        return {k: _as_numbers(v, values) for k, v in entry.items()}
    if isinstance(entry, (list, tuple)):
        return type(entry)(_as_numbers(v, values) for v in entry)
    return entry


def _flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """Nested JSON objects as ``{"a.b.c": leaf}`` (lists are leaves)."""
    if not isinstance(obj, dict):
        return {prefix: obj}
    out: dict[str, Any] = {}
    for key, value in obj.items():
        out.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def _jsonable(obj: Any) -> Any:
    """``obj`` as it reads back from state.json (tuples become lists, other objects strings)."""
    return json.loads(json.dumps(obj, default=str))


class RunDirError(ValueError):
    """The output folder cannot be used for this run: in use by another run, not writable, or holding an
    older run that a fresh one would not replace."""


class Preempted(SystemExit):
    """Raised by :meth:`TrainingLoop.train` after SIGTERM, once the checkpoint of the current step is saved.

    A ``SystemExit`` with status 143 (128 + SIGTERM), so that a script or the CLI ends cleanly and a
    scheduler sees a preempted job; ``checkpoint`` is the saved directory, ``step`` its step.
    """

    def __init__(self, checkpoint: Path | None, step: int):
        super().__init__(PREEMPTED_EXIT_CODE)
        self.checkpoint, self.step = checkpoint, step


class RunLock:
    """An exclusive lock on a run folder: ``fcntl.flock`` on ``DIR/.scorekit.lock``, which holds the pid.

    :meth:`acquire` raises :class:`RunDirError` naming the holder's pid when another process, or another
    object in this one, holds it. The kernel drops the lock with its process, so a killed run (even by
    SIGKILL) leaves no stale lock; :meth:`release` removes the file. :class:`TrainingLoop` holds it
    during :meth:`~TrainingLoop.train` (and while saving a checkpoint), so that objects trained one after
    the other on one folder in one process do not conflict. Where ``fcntl`` or the file system's locks
    are missing the run goes on unlocked, with a warning.
    """

    name = ".scorekit.lock"

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        self.path = self.directory / self.name
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> RunLock:
        if fcntl is None or self.held:
            return self
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                mine = " (this process: another trainer object is running there)" if holder == str(os.getpid()) else ""
                raise RunDirError(
                    f"{self.directory} is in use by another run, pid {holder}{mine}: two runs writing one out_dir "
                    f"would overwrite each other's checkpoints. Wait for that run to end or stop it, or choose "
                    f"another out_dir (the lock is {self.path}; it is released when that run ends)") from None
            except OSError as e:  # e.g. a network file system without locks
                os.close(fd)
                warnings.warn(f"cannot lock {self.path} ({e}); this run is not protected against a second run "
                              "into the same out_dir", stacklevel=3)
                return self
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)  # the previous holder removed the file between our open and our lock: again
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)  # while still locked, so that no one locks the unlinked file
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    def __del__(self):
        with contextlib.suppress(Exception):  # at interpreter exit the modules may be gone
            self.release()


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
    (backward, gradient norms and clipping, warm-up, optimizer step, NaN guard), returning the history
    entry (numbers or device tensors: :meth:`read_back` turns them into numbers).
    :meth:`train` runs it ``config.steps`` times with EMA updates, callbacks ``cb(self)``, a progress bar and
    a checkpoint every ``config.checkpoint_every`` steps; per-process RNG state goes through
    :meth:`rank_state` / :meth:`load_rank_state`. ``config`` (kept as ``train_config``) is the
    :class:`TrainConfig`; the accelerator is built from its ``mixed_precision`` unless one is passed.

    Checkpoints go to ``out_dir/checkpoints/step-XXXXXXXX/``: every tracked object, ``rank-N.safetensors``
    per process (when there is rank state) and ``state.json`` (``format``, ``step``, ``world_size``,
    ``history``, ``config``, ``meta``, ``data``), written to a temporary directory ``.step-XXXXXXXX.<random>.tmp``,
    fsynced and renamed; the ``keep_checkpoints`` newest are kept, and temporaries left by killed runs
    are removed at the next save. :meth:`resume` restores all of it, so that a continued run is
    bit-for-bit the run that was never interrupted; it refuses a checkpoint written for other data
    (:meth:`data_signature`) and warns, naming the keys, when the config or ``meta`` differ. ``record``
    is the config stored in ``state.json`` (default ``config``), as it was when the loop was built.

    While :meth:`train` runs, the loop holds a :class:`RunLock` on ``out_dir`` (released when it returns
    or raises, and by :meth:`close`); before the first step it creates and test-writes
    ``out_dir/checkpoints`` and, with ``config.resume`` false, refuses an ``out_dir`` that already holds
    checkpoints unless ``config.overwrite`` is true (then they are deleted). On SIGTERM (installed in the
    main thread, during :meth:`train` only, with ``out_dir`` set) the step in progress is finished, its
    checkpoint saved, and :class:`Preempted` (``SystemExit(143)``) is raised.

    The NaN guard costs no host sync per step: the loss and gradient norms stay on the device, a
    non-finite one makes the fused optimizer skip the update there, and they are read back every
    ``config.log_every`` steps (100 when it is 0), before every checkpoint and at the end of
    :meth:`train`, which then raises ``FloatingPointError`` naming the step and the last checkpoint whose
    tensors are all finite; so no checkpoint holds a non-finite update. Between read-backs, the newest
    ``history`` entries may still be device tensors.
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
        self._record_json = _jsonable(dataclasses.asdict(self.record))  # the config as the run was built
        if accelerator is None:
            from accelerate import Accelerator

            # cpu=True on machines without CUDA lets accelerate pick its multi-process CPU (gloo) backend
            # under torchrun / accelerate launch.
            accelerator = Accelerator(mixed_precision=resolve_precision(config.mixed_precision),
                                      cpu=not torch.cuda.is_available())
        self.accelerator = accelerator
        if accelerator.num_processes == 1:  # accelerate joins torchrun's and MPI's groups itself; else it is alone
            warn_if_launch_was_not_split("the whole training run")
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.callbacks, self.meta = list(callbacks), meta or {}
        self.tracked: dict[str, Tracked] = {}
        self._unwrapped: dict[str, tuple[nn.Module, nn.Module]] = {}  # name: (tracked object, it unwrapped)
        self._ema_of: dict[str, str] = {}
        self._ema_updates: dict[str, _EMAUpdate] = {}
        # Without loss scaling, gradient accumulation, DeepSpeed, Megatron or XLA, accelerate's backward,
        # optimizer step and zero_grad are torch's own plus a package look-up or a signature inspection per
        # call: then optimize() calls torch's.
        self._direct = (accelerator.scaler is None and accelerator.gradient_accumulation_steps == 1
                        and accelerator.distributed_type not in ("DEEPSPEED", "MEGATRON_LM", "XLA"))
        self._base_lr: dict[int, float | None] = {}
        self.step = 0
        self.history: list = []
        self._resumed = False
        self._started = False
        self._pending: list[tuple[int, tuple[str, ...], Tensor]] = []  # (step, optimizer names, [loss, norms])
        self._unread = 0  # history[:_unread] holds numbers only
        self._log: Tensor | None = None  # the device buffer the pending [loss, norms] rows are views of
        self._logged = 0  # entries of _log in use
        self._lock: RunLock | None = None
        self._stop_requested = False

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    # -- building ------------------------------------------------------------------------------
    def make_optimizer(self, params: Iterable[nn.Parameter], lr: float | None = None) -> torch.optim.Optimizer:
        """AdamW over ``params`` with the config's betas and weight decay, prepared for accelerate; fused
        where torch has the kernel (:func:`adamw_options`).

        ``lr=None`` follows ``config.lr`` as it is at each step (callbacks may change it); warm-up scales both.
        """
        cfg = self.train_config
        base = cfg.lr if lr is None else lr
        params = list(params)
        opt = torch.optim.AdamW(params, lr=base, betas=cfg.betas, weight_decay=cfg.weight_decay, **adamw_options(params))
        opt = self.accelerator.prepare(opt)
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
        return {k: self._unwrap(k, v) for k, v in self.tracked.items() if isinstance(v, nn.Module)}

    def _unwrap(self, name: str, module: nn.Module) -> nn.Module:
        """``accelerator.unwrap_model(module)``, kept while ``module`` is what ``name`` tracks: unwrapping looks
        packages up on every call, and update_emas needs it at every step."""
        cached = self._unwrapped.get(name)
        if cached is None or cached[0] is not module:
            cached = self._unwrapped[name] = (module, self.accelerator.unwrap_model(module))
        return cached[1]

    def tracked_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {k: v for k, v in self.tracked.items() if isinstance(v, torch.optim.Optimizer)}

    def data_signature(self) -> dict:
        """What a resume must find unchanged about the data (``{"n": ..., "shapes": ...}``); none by default."""
        return {}

    # -- one update ----------------------------------------------------------------------------
    def train_step(self) -> Any:
        """One update (``self.step`` is the number done before it); returns the history entry."""
        raise NotImplementedError

    def autocast(self) -> contextlib.AbstractContextManager:
        """The forward's context: accelerate's autocast under mixed precision; without it, none (accelerate's
        would be a no-op context built at every step)."""
        return self.accelerator.autocast() if self.accelerator.native_amp else contextlib.nullcontext()

    def lr(self, base: float | None = None) -> float:
        """The learning rate of this step: ``base`` (default ``config.lr``) times the linear warm-up."""
        cfg = self.train_config
        lr = cfg.lr if base is None else base
        return lr * min(1.0, (self.step + 1) / cfg.warmup) if cfg.warmup else lr

    def optimize(self, loss: Tensor, optimizers: Sequence[torch.optim.Optimizer]) -> Tensor:
        """Backward, per-optimizer gradient norm and clipping, learning rate, step; returns the loss (mean over
        processes) as a 0-d tensor on the device.

        The NaN guard: the loss and each optimizer's gradient norm (the norm ``clip_grad_norm_`` computes,
        also with clipping off) are queued for :meth:`read_back`. Fused optimizers get a device-side
        ``found_inf`` flag (as ``torch.amp.GradScaler`` passes it), so a non-finite loss or gradient skips
        the update of all of ``optimizers`` without a host sync; any other optimizer is checked before its
        step (one sync). Under fp16 loss scaling the scaler skips overflowing steps itself and only the
        loss is guarded.
        """
        acc, clip = self.accelerator, self.train_config.grad_clip
        value = loss.detach().float()
        if acc.num_processes > 1:
            value = acc.reduce(value, reduction="mean")
        if self._direct:
            loss.backward()
        else:
            acc.backward(loss)
        scaled = acc.scaler is not None
        names = {id(o): k for k, o in self.tracked.items()}
        norms, normed = [], []
        if scaled and clip is not None:
            acc.unscale_gradients(list(optimizers))  # unscale (fp16) once for just these optimizers
        if not scaled or clip is not None:
            for opt in optimizers:  # each optimizer's parameters on their own
                params = [p for g in opt.param_groups for p in g["params"] if p.grad is not None]
                if not params:
                    continue
                if get_total_norm is None:  # pragma: no cover - torch < 2.6
                    norm = torch.nn.utils.clip_grad_norm_(params, math.inf if clip is None else clip)
                else:
                    norm = get_total_norm([p.grad for p in params])
                    if clip is not None:
                        clip_grads_with_norm_(params, clip, norm)
                if not scaled:
                    norms.append(norm.to(device=value.device, dtype=value.dtype))
                    normed.append(names.get(id(opt), "an untracked optimizer"))
        check = torch.stack([value, *norms], out=self._log_row(1 + len(norms), value))
        value = check[0]  # the history's 0-d loss, a view: the loss tensor itself is not kept
        entry = (self.step + 1, tuple(normed), check)
        inner = [getattr(opt, "optimizer", opt) for opt in optimizers]
        on_device = not scaled and all(o.defaults.get("fused") and getattr(o, "_step_supports_amp_scaling", False)
                                       for o in inner)
        if not on_device:
            self._raise_if_nonfinite([entry])  # before the step: nothing is applied
        found = torch.logical_not(torch.isfinite(check).all()).float() if on_device else None
        for opt, raw in zip(optimizers, inner):
            if id(opt) in self._base_lr:  # made by make_optimizer: warm-up and config.lr apply
                lr = self.lr(self._base_lr[id(opt)])
                for group in opt.param_groups:
                    group["lr"] = lr
            stepper = raw if self._direct else opt
            if found is None:
                stepper.step()
            else:
                raw.found_inf, raw.grad_scale = found.to(_param_device(raw, found.device)), None
                try:
                    stepper.step()
                finally:
                    del raw.found_inf, raw.grad_scale
            if raw.defaults.get("fused"):
                # the fused kernel updates the parameters in place without bumping their version counters, which
                # autograd's saved-tensor checks (and any cache keyed on them) rely on
                _bump_versions([p for g in raw.param_groups for p in g["params"] if p.grad is not None])
        for opt, raw in zip(optimizers, inner):
            (raw if self._direct else opt).zero_grad(set_to_none=True)
        self._pending.append(entry)
        return value

    def _log_row(self, width: int, like: Tensor) -> Tensor:
        """``width`` unused entries of one device buffer, for a step's ``[loss, norms]``.

        The rows wait on the device until :meth:`read_back`. As views of one buffer they hold no allocation of
        their own: a hundred small tensors of their own, kept alive between the steps' large temporaries,
        fragment the C heap, which then returns and re-faults the temporaries' pages at every step (the
        Trainer then took 1.15x the time of the same loop reading back at once on a CPU). A full buffer
        is replaced, not overwritten, so entries a callback kept stay valid.
        """
        log, used = self._log, self._logged
        if log is None or used + width > log.numel() or log.device != like.device or log.dtype != like.dtype:
            every = self.train_config.log_every or READ_BACK_EVERY
            log, used = like.new_empty(max(2 * every * width, 64)), 0
            self._log = log
        self._logged = used + width
        return log[used : used + width]

    def read_back(self) -> None:
        """Read what the steps since the last call left on the device, in one host transfer: the new
        ``history`` entries become numbers, and a non-finite loss or gradient norm raises
        ``FloatingPointError`` naming the step and the last checkpoint whose tensors are all finite."""
        start, entries, pending = self._unread, self.history[self._unread :], self._pending
        self._pending, self._unread = [], len(self.history)
        leaves = [t for e in entries for t in _tensor_leaves(e)] + [check for *_, check in pending]
        if not leaves:
            return
        device = leaves[0].device
        # one cast for all leaves: cat into float64 holds every float and integer dtype's values exactly, as a
        # per-leaf .to(float64) would, and no_grad lets out= take leaves that require grad without detaching each
        with torch.no_grad():
            flat = torch.cat([t.reshape(-1).to(device) for t in leaves],
                             out=torch.empty(sum(t.numel() for t in leaves), dtype=torch.float64, device=device))
        values = iter(flat.tolist())
        self.history[start:] = [_as_numbers(e, values) for e in entries]
        self._raise_if_nonfinite([(step, names, [next(values) for _ in range(check.numel())])
                                  for step, names, check in pending])

    def _raise_if_nonfinite(self, checks: Iterable[tuple[int, tuple[str, ...], Any]]) -> None:
        for step, names, check in checks:
            values = check.tolist() if torch.is_tensor(check) else check
            if all(math.isfinite(v) for v in values):
                continue
            loss, norms = values[0], values[1:]
            if not math.isfinite(loss):
                what = f"{self.loss_name} is {loss}"
            else:
                i = next(i for i, v in enumerate(norms) if not math.isfinite(v))
                what = f"the gradient norm of {names[i]} is {norms[i]} (with a finite {self.loss_name} of {loss:.6g})"
            last = last_finite_checkpoint(self.out_dir, before=step) if self.out_dir is not None else None
            where = (f"the last good checkpoint is {last}" if last else
                     "no checkpoint with finite tensors was written")
            raise FloatingPointError(f"{what} at {self.step_name} {step}: training stopped without applying it; "
                                     f"{where}. {self.advice}")

    def update_emas(self) -> None:
        """``update_ema`` of every tracked EMA copy towards its source, at the current step."""
        for name, source in self._ema_of.items():
            ema, src = self._unwrap(name, self.tracked[name]), self._unwrap(source, self.tracked[source])
            update = self._ema_updates.get(name)
            if update is None or not update.current(ema, src):
                update = self._ema_updates[name] = _EMAUpdate(ema, src)
            update(self.train_config.ema_decay, self.step)

    def progress(self) -> dict[str, str]:
        """What the progress bar shows every ``config.log_every`` steps."""
        window = self.history[-self.train_config.log_every :]
        return {"loss": f"{sum(window) / len(window):.4f}"}

    # -- the loop ------------------------------------------------------------------------------
    def describe(self) -> str:
        """One line on where the loop runs: the number of processes, the device and the backend."""
        backend = self.accelerator.state.backend or "none (one process)"
        return (f"{self.desc}: {self.accelerator.num_processes} process(es), device {self.device}, backend {backend}, "
                f"mixed precision {self.accelerator.mixed_precision}")

    def train(self, steps: int | None = None) -> list:
        """Run until ``steps`` (default ``config.steps``) updates are done; returns the history."""
        cfg = self.train_config
        total = steps if steps is not None else cfg.steps
        every = cfg.log_every or READ_BACK_EVERY
        if cfg.progress and self.is_main and not self._started:
            print(self.describe(), flush=True)
        with self._running():
            bar = tqdm(total=total, initial=self.step, disable=not (cfg.progress and self.is_main), desc=self.desc,
                       dynamic_ncols=True)
            try:
                while self.step < total:
                    entry = self.train_step()
                    self.step += 1
                    self.update_emas()
                    self.history.append(entry)
                    for cb in self.callbacks:
                        cb(self)
                    if self.step % every == 0:
                        self.read_back()
                        if cfg.log_every:
                            bar.set_postfix(self.progress())
                    bar.update(1)
                    if self.out_dir is not None and cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0:
                        self.save_checkpoint()
                    if self._preempted():
                        self._stop_preempted()
            finally:
                bar.close()
            self.read_back()
            if self.out_dir is not None and self._latest_step() != self.step:
                self.save_checkpoint()
        return self.history

    @contextlib.contextmanager
    def _running(self) -> Iterator[None]:
        """The life of a :meth:`train` call: the output folder checked, the run lock and the SIGTERM handler
        held, and on the first call the fresh-start check or the resume."""
        if self.out_dir is None:
            self._started = True
            yield
            return
        self._prepare_out_dir()
        with self._holding_lock(), self._sigterm_handler():
            if not self._started:
                self._started = True
                if self.train_config.resume:
                    if not self._resumed:
                        self.resume()
                else:
                    self._fresh_start()
            yield

    def _prepare_out_dir(self) -> None:
        """Create and test-write ``out_dir/checkpoints`` before the first step: a file in the way or a
        read-only place fails now, not at the first checkpoint."""
        if not self.is_main:
            return
        out, root = self.out_dir, self.out_dir / "checkpoints"
        try:
            root.mkdir(parents=True, exist_ok=True)
            fd, probe = tempfile.mkstemp(prefix=".write-test.", suffix=".tmp", dir=root)
            os.close(fd)
            os.remove(probe)
        except (FileExistsError, NotADirectoryError) as e:
            raise RunDirError(f"out_dir {out} cannot hold checkpoints: {e.filename} or a folder above it is a "
                              "file, not a folder; move the file away or choose another out_dir") from e
        except PermissionError as e:
            raise RunDirError(f"out_dir {out} is not writable ({e.filename}: permission denied), so no checkpoint "
                              "could be saved; choose a writable out_dir or change its permissions") from e
        except OSError as e:
            raise RunDirError(f"out_dir {out}: cannot write checkpoints there ({e}); choose another out_dir") from e

    @contextlib.contextmanager
    def _holding_lock(self) -> Iterator[None]:
        """The run lock on ``out_dir`` for the block (main process only; re-entrant)."""
        if self._lock is not None or self.out_dir is None or not self.is_main:
            yield
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._lock = RunLock(self.out_dir).acquire()
        try:
            yield
        finally:
            self._lock.release()
            self._lock = None

    def close(self) -> None:
        """Release the run lock if this object holds it (it does only inside :meth:`train`)."""
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def __del__(self):
        with contextlib.suppress(Exception):
            self.close()

    def _fresh_start(self) -> None:
        """``resume: false``: refuse an ``out_dir`` holding checkpoints (a fresh run would leave the older
        run's newest checkpoint as the newest), or delete them with ``overwrite: true``."""
        root = self.out_dir / "checkpoints"
        old = sorted(root.glob("step-*")) if root.is_dir() else []
        self.accelerator.wait_for_everyone()  # every process has looked before any deletes
        if old and not self.train_config.overwrite:
            raise RunDirError(
                f"{root} already holds checkpoints (newest {old[-1].name}) and training.resume is false: a fresh "
                "run there would leave them in place, and sample, likelihood, distill --teacher and the next resume "
                "would pick up the old run's newest checkpoint. Set training.overwrite: true (the override "
                "training.overwrite=true, or TrainConfig(overwrite=True)) to delete them and start over, "
                "training.resume: true to continue that run, or choose another out_dir.")
        if old and self.is_main:
            for ckpt in old:
                shutil.rmtree(ckpt)
            remove_stale_temporaries(root)
        self.accelerator.wait_for_everyone()

    @contextlib.contextmanager
    def _sigterm_handler(self) -> Iterator[None]:
        """SIGTERM asks for a stop at the end of the current step (main thread only; restored after)."""
        self._stop_requested = False
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def request_stop(signum, frame):
            self._stop_requested = True

        previous = signal.signal(signal.SIGTERM, request_stop)
        handled = False
        try:
            yield
        except Preempted:
            handled = True
            raise
        finally:
            signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)
            if self._stop_requested and not handled:  # it came after the last step's check: deliver it now
                signal.raise_signal(signal.SIGTERM)

    def _preempted(self) -> bool:
        if self.out_dir is None:
            return False
        if self.accelerator.num_processes == 1:
            return self._stop_requested
        # every process stops at the same step, whichever got the signal
        flag = torch.tensor(float(self._stop_requested), device=self.device)
        return bool(self.accelerator.reduce(flag, reduction="sum") > 0)

    def _stop_preempted(self) -> None:
        self.read_back()
        ckpt = self.save_checkpoint() if self._latest_step() != self.step else latest_checkpoint(self.out_dir)
        if self.is_main:
            print(f"{self.desc}: SIGTERM received; saved {ckpt} ({self.step_name} {self.step}); run again with the "
                  "same out_dir and resume on to continue from there", file=sys.stderr, flush=True)
        raise Preempted(ckpt, self.step)

    # -- checkpoints ---------------------------------------------------------------------------
    def rank_state(self) -> dict[str, Tensor]:
        """Per-process state saved as ``rank-N.safetensors`` (RNG streams, data order); none by default."""
        return {}

    def load_rank_state(self, state: dict[str, Tensor]) -> None:
        """Restore what :meth:`rank_state` returned."""

    def _latest_step(self) -> int:
        ckpt = latest_checkpoint(self.out_dir)
        return -1 if ckpt is None else int(ckpt.name.split("-")[1])

    def _shared_path(self, path: Path | None) -> Path:
        """The main process's ``path``, on every process."""
        if self.accelerator.num_processes == 1:
            return path
        from accelerate.utils import broadcast_object_list

        box = [str(path) if self.is_main else None]
        broadcast_object_list(box)
        return Path(box[0])

    def save_checkpoint(self) -> Path:
        """Write ``out_dir/checkpoints/step-XXXXXXXX`` atomically (a per-process temporary directory, fsynced,
        then renamed), after :meth:`read_back` (a non-finite step raises instead), and prune old ones."""
        if self.out_dir is None:
            raise ValueError(f"this {type(self).__name__} has no out_dir; pass out_dir=... to save checkpoints")
        self.read_back()
        acc = self.accelerator
        root = self.out_dir / "checkpoints"
        final = root / f"step-{self.step:08d}"
        with self._holding_lock():
            with contextlib.ExitStack() as publish:
                tmp = None
                if self.is_main:
                    remove_stale_temporaries(root)  # under the lock: only killed runs leave these
                    remove_stale_temporaries(self.out_dir, min_age=3600)
                    tmp = publish.enter_context(atomic_dir(final))  # fsync and rename on leaving
                tmp = self._shared_path(tmp)
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
                        "config": self._record_json,
                        "meta": self.meta,
                        "data": self.data_signature(),
                    }
                    save_json(state, tmp / "state.json")
            if self.is_main:
                prune_checkpoints(root, self.train_config.keep_checkpoints, final)
        acc.wait_for_everyone()
        return final

    def resume(self, path: str | os.PathLike | None = None) -> bool:
        """Restore the newest checkpoint under ``path`` (default ``out_dir``); returns whether one was found.

        A checkpoint written for other data (:meth:`data_signature`) or by another number of processes is
        refused; a changed config or ``meta`` (learning rate, seed, data set, ...) is warned about, naming
        the keys.
        """
        self._resumed = True
        path = path if path is not None else self.out_dir
        found = None if path is None else read_checkpoint(path, self.checkpoint_format, self.checkpoint_kind)
        if found is None:
            return False
        ckpt, state = found
        acc = self.accelerator
        where = ckpt / "state.json"
        step = non_negative_int(meta_field(state, "step", where, "state"), f"{where}: step")
        written_by = positive_int(meta_field(state, "world_size", where, "state"), f"{where}: world_size")
        history = meta_field(state, "history", where, "state")
        if not isinstance(history, list):
            raise ValueError(f"{where}: history must be a list (one entry per step), got a {type(history).__name__}; "
                             f"the checkpoint is corrupt: delete {ckpt} to resume from the one before it")
        if written_by != acc.num_processes:
            raise ValueError(
                f"{ckpt} was written by {written_by} processes but this run has {acc.num_processes}; "
                "resume with the same number of processes"
            )
        for name, module in self.tracked_modules().items():
            tensors, _ = load_tensors(ckpt / f"{name}.safetensors", self.device)
            load_state_checked(module, tensors, ckpt / f"{name}.safetensors")
        self._check_same_run(ckpt, state)  # a model mismatch is named first
        for name, opt in self.tracked_optimizers().items():
            file = ckpt / f"{name}.safetensors"
            tensors, rest = load_tensors(file, self.device)
            try:
                meta_field(rest, "param_groups", file)
                opt.load_state_dict(optimizer_from_tensors(tensors, rest))
            except (ValueError, KeyError, IndexError, TypeError) as e:
                raise ValueError(f"{file} does not match the optimizer {name!r} ({e}); the checkpoint was written "
                                 "for other parameters") from e
            _keep_implementation(opt)
        if self.rank_state():
            self.load_rank_state(load_tensors(ckpt / f"rank-{acc.process_index}.safetensors")[0])
        self.step, self.history = step, list(history)
        self._pending, self._unread = [], len(self.history)
        return True

    def _check_same_run(self, ckpt: Path, state: dict) -> None:
        """Refuse a checkpoint of other data; warn about a changed config or meta, naming the keys."""
        saved, now = state.get("data"), _jsonable(self.data_signature())
        if saved and now and saved != now:
            raise ValueError(
                f"{ckpt} was written for other data ({_describe_data(saved)}) than this run has ({_describe_data(now)}): "
                "the data order it holds cannot continue on these data. Resume with the data the run began with, "
                "or start a fresh run (training.resume: false with training.overwrite: true, or another out_dir)")
        before = _flatten({"config": state.get("config", {}), "meta": state.get("meta", {})})
        after = _flatten(_jsonable({"config": self._record_json, "meta": self.meta}))
        missing = object()
        changed = [key for key in sorted(before.keys() | after.keys())
                   if before.get(key, missing) != after.get(key, missing)
                   and key.rsplit(".", 1)[-1] not in RESUMABLE_CHANGES and ".sampling." not in f".{key}"]
        if changed:
            def show(table, key):
                return repr(table[key]) if key in table else "(absent)"

            diffs = ", ".join(f"{key.removeprefix('config.').removeprefix('meta.')} {show(before, key)} -> "
                              f"{show(after, key)}" for key in changed[:8])
            more = f" and {len(changed) - 8} more" if len(changed) > 8 else ""
            warnings.warn(
                f"resuming {ckpt} with a configuration that differs from the one it was written with: {diffs}{more}. "
                "The continued run is not the one those checkpoints began; to start over instead, set "
                "training.resume: false with training.overwrite: true, or choose another out_dir.", stacklevel=3)


def _describe_data(sig: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in sig.items())


def _bump_versions(tensors: list[Tensor]) -> None:
    try:
        torch.autograd.graph.increment_version(tensors)
    except TypeError:  # pragma: no cover - torch < 2.5 takes one tensor
        for t in tensors:
            torch.autograd.graph.increment_version(t)


def _param_device(optimizer: torch.optim.Optimizer, default: torch.device) -> torch.device:
    for group in optimizer.param_groups:
        for p in group["params"]:
            return p.device
    return default


def _keep_implementation(opt: torch.optim.Optimizer) -> None:
    """After ``load_state_dict``: the param groups keep this optimizer's fused/foreach choice (a checkpoint
    of another one would replace it), and a fused optimizer's step counts sit on the parameters' device."""
    raw = getattr(opt, "optimizer", opt)
    for group in raw.param_groups:
        for key in ("fused", "foreach"):
            if key in raw.defaults:
                group[key] = raw.defaults[key]
    if raw.defaults.get("fused"):
        for p, state in raw.state.items():
            if torch.is_tensor(state.get("step")):
                state["step"] = state["step"].to(device=p.device, dtype=torch.float32)


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
        return self._unwrap("model", self.model)

    # -- one step ------------------------------------------------------------------------------
    def _next_batch(self):
        bs = self.config.batch_size
        chunks, got = [], 0
        while got < bs:
            if self._pos >= self.n:
                self._perm = torch.randperm(self.n, generator=self._data_generator)
                self._pos = 0
            take = self._perm[self._pos : self._pos + bs - got]
            self._pos += len(take)
            got += len(take)
            chunks.append(take)
        idx = (chunks[0] if len(chunks) == 1 else torch.cat(chunks)).to(self.accelerator.device, non_blocking=True)
        batch = tuple(d[idx] for d in self.data)
        return batch[0] if self._single else batch

    def data_signature(self) -> dict:
        return {"n": self.n, "shapes": [list(d.shape[1:]) for d in self.data]}

    def train_step(self) -> Tensor:
        batch = self._next_batch()
        with self.autocast():
            loss = self.loss_fn(self.model, batch, self.generator)
        return self.optimize(loss, [self.optimizer])

    def train(self, steps: int | None = None) -> list[float]:
        """Run until ``steps`` (default ``config.steps``) optimizer steps are done; returns the loss history.

        The history is read back from the device every ``config.log_every`` steps (see
        :class:`TrainingLoop`): a callback may find the newest entries as 0-d tensors."""
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
        if state["perm"].numel() != self.n:  # checkpoints without a data signature
            raise ValueError(f"the checkpoint's data order covers {state['perm'].numel()} samples but this run has "
                             f"{self.n}: resume with the data the run began with, or start a fresh run "
                             "(training.resume: false with training.overwrite: true, or another out_dir)")
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

