"""Fine-tuning a trained score model on new data, in one of three ways that share data, steps, seeds and the
:class:`~scorekit.training.Trainer` (progress bar, EMA, atomic checkpoints that resume):

- ``sara``: SaRA sparse adapters (:mod:`scorekit.sara`): the rank penalty is added to the loss at every
  step and the progressive re-selection runs once, after ``sara.progressive_step`` steps;
- ``lora``: LoRA through ``peft`` on the same modules, with the rank chosen so that its trainable
  parameter count is the closest to SaRA's (unless ``lora.r`` is set);
- ``full``: every parameter trains.

:func:`prepare_model` readies a model for a method, :func:`make_finetune_trainer` assembles the Trainer and
:func:`write_outputs` writes ``merged/`` (the Trainer's final checkpoint with the adapters merged into the
weights, readable by ``scorekit sample`` and :func:`scorekit.config.load_score_model`) and, for the adapters,
``adapter.safetensors`` (SaRA also as the peft-style directory ``adapter/``, see :func:`scorekit.sara.save_sara`).
``scorekit finetune`` runs them from a config, also under ``accelerate launch`` / ``torchrun``.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from .checkpoint import atomic_dir, load_json, load_tensors, save_json, save_tensors
from .config import DataConfig, LossConfig, to_dict
from .losses import make_dsm_loss
from .sara import (
    SaRAConfig,
    SaRALayer,
    apply_sara,
    find_targets,
    merge_sara,
    rank_penalty,
    reselect,
    save_sara,
)
from .training import TrainConfig, Trainer, count_parameters, latest_checkpoint
from .validate import fraction, positive, positive_int

__all__ = [
    "METHODS",
    "LoRASection",
    "FinetuneConfig",
    "prepare_model",
    "lora_rank_for_budget",
    "inject_lora",
    "make_finetune_trainer",
    "merged_copy",
    "write_outputs",
]

METHODS = ("sara", "lora", "full")


@dataclass
class LoRASection:
    """``lora:`` section. ``r: null`` matches SaRA's trainable-parameter count; ``alpha: null`` means ``alpha = r``
    (scale 1); ``target_modules: null`` means the modules SaRA adapts."""

    r: int | None = None
    alpha: float | None = None
    dropout: float = 0.0
    target_modules: str | list[str] | None = None

    def __post_init__(self):
        if self.r is not None:
            self.r = positive_int(self.r, "r", "the LoRA rank; null = match SaRA's trainable budget")
        if self.alpha is not None:
            self.alpha = positive(self.alpha, "alpha", "null = alpha equal to r, scale 1")
        self.dropout = fraction(self.dropout, "dropout")


@dataclass
class FinetuneConfig:
    """A fine-tuning run (``configs/finetune_*.yaml``)."""

    method: str = "sara"
    base: str | None = None
    base_ema: bool = True
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    training: TrainConfig = field(default_factory=TrainConfig)
    sara: SaRAConfig = field(default_factory=lambda: SaRAConfig(fraction=0.1))
    lora: LoRASection = field(default_factory=LoRASection)
    out_dir: str = "outputs/finetune"

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; valid choices are {list(METHODS)}")
        step, steps = self.sara.progressive_step, self.training.steps
        if self.method == "sara" and step is not None and step >= steps:
            raise ValueError(
                f"sara.progressive_step={step} is not below training.steps={steps}: the re-selection runs after "
                f"that many steps and training then goes on with the new set; set it below {steps} (the authors: "
                "halfway) or to null for no re-selection"
            )


# -- models ---------------------------------------------------------------------------------------------
def _lora_count(weight: Tensor, r: int) -> int:
    # peft: Linear -> A (r x in), B (out x r); ConvNd -> A conv(in -> r, same kernel), B 1x1 conv(r -> out).
    out_features, fan_in = weight.shape[0], weight[0].numel()
    return min(r, _lora_cap(weight)) * (fan_in + out_features)


def _lora_cap(weight: Tensor) -> int:
    """The largest useful LoRA rank of a weight: its smaller side (a 1-channel output conv takes rank 1)."""
    return min(weight.shape[0], weight[0].numel())


def lora_rank_for_budget(model: nn.Module, modules: list[str], budget: int) -> int:
    """The LoRA rank whose trainable-parameter count on ``modules`` is the closest to ``budget``, each module's
    rank being capped at its weight's smaller side (see :func:`inject_lora`)."""
    weights = [model.get_submodule(n).weight for n in modules]
    ranks = range(1, max(_lora_cap(w) for w in weights) + 1)
    return min(ranks, key=lambda r: abs(sum(_lora_count(w, r) for w in weights) - budget))


def inject_lora(model: nn.Module, modules: list[str], r: int, alpha: float, dropout: float) -> nn.Module:
    """peft LoRA (rank ``r``, scale ``alpha / r``) on ``modules`` of ``model``, in place; each module's rank is
    capped at its weight's smaller side, with alpha scaled alike."""
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError as err:
        raise ImportError("method 'lora' trains through the peft package, which is not installed: "
                          "pip install peft (or scorekit[bench])") from err

    # An anchored alternation of the full names: peft reads a string as a regex over full module names.
    pattern = "|".join(f"(?:{n.replace('.', '[.]')})" for n in modules)
    # Modules narrower than r (the 1-channel input/output convs of an image UNet) get their own smaller rank,
    # with alpha scaled alike so that every module keeps the scale alpha / r; one global rank capped at the
    # narrowest module would leave the others far below the budget.
    caps = {n: _lora_cap(model.get_submodule(n).weight) for n in modules}
    small = {re.escape(n): c for n, c in caps.items() if c < r}
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=pattern, rank_pattern=small,
                        alpha_pattern={k: alpha * c / r for k, c in small.items()})
    return inject_adapter_in_model(config, model)


def prepare_model(base: nn.Module, cfg: FinetuneConfig) -> tuple[nn.Module, dict]:
    """``base`` made ready for ``cfg.method`` (in place), and a summary (method, trainable count, LoRA rank)."""
    if cfg.method == "full":
        model = base.requires_grad_(True)
        return model, {"method": "full", "trainable": count_parameters(model, trainable_only=True)}
    probe = apply_sara(copy.deepcopy(base), cfg.sara)
    sara_modules = [n for n, m in probe.named_modules() if isinstance(m, SaRALayer)]
    if cfg.method == "sara":
        model = apply_sara(base, cfg.sara)
        return model, {"method": "sara", "trainable": count_parameters(model, trainable_only=True),
                       "modules": len(sara_modules)}
    budget = count_parameters(probe, trainable_only=True)
    del probe
    modules = sara_modules if cfg.lora.target_modules is None else find_targets(base, cfg.lora.target_modules)
    r = cfg.lora.r if cfg.lora.r is not None else lora_rank_for_budget(base, modules, budget)
    model = inject_lora(base, modules, r, cfg.lora.alpha or r, cfg.lora.dropout)
    return model, {"method": "lora", "trainable": count_parameters(model, trainable_only=True), "rank": r,
                   "sara_budget": budget}


def merged_copy(model: nn.Module) -> nn.Module:
    """A plain copy of a fine-tuned model: SaRA or LoRA merged into the weights, original module types."""
    model = copy.deepcopy(model)
    if any(isinstance(m, SaRALayer) for m in model.modules()):
        return merge_sara(model)
    from peft.tuners.lora import LoraLayer

    for name, module in list(model.named_modules()):
        if isinstance(module, LoraLayer):
            module.merge()
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, module.get_base_layer())
    return model


# -- training -------------------------------------------------------------------------------------------
def _sara_loss(dsm: Callable) -> Callable:
    def loss_fn(model, batch, generator=None):
        # The nuclear-norm term is added at every step (the authors apply it in every optimizer step).
        return dsm(model, batch, generator) + rank_penalty(model, generator)

    return loss_fn


def _prepare_again(trainer: Trainer) -> None:
    """Wrap the model for its processes anew after :func:`reselect` replaced Parameters: the DDP wrapper of a
    multi-process run holds the old ones, and would wait for their gradients ("Expected to have finished
    reduction in the prior iteration") while the new ones went unsynchronised and the ranks drifted apart.
    Wrapping again registers the new Parameters and broadcasts rank 0's state, so the ranks start the second
    phase identical."""
    acc, model = trainer.accelerator, trainer.unwrapped
    old = trainer.model
    models = getattr(acc, "_models", None)
    if isinstance(models, list) and old in models:
        models.remove(old)  # accelerate keeps every prepared model; the old wrapper is dead
    trainer.model = trainer.track("model", acc.prepare(model))
    trainer.model.train()


def _progressive(step: int) -> Callable[[Trainer], None]:
    def callback(trainer: Trainer) -> None:
        if trainer.step == step:
            reselect(trainer.unwrapped)
            if trainer.model is not trainer.unwrapped:  # accelerate/DDP-wrapped (several processes)
                _prepare_again(trainer)
            # The authors restart the optimizer here; the EMA copy restarts from the current weights.
            trainer.rebuild_optimizer()

    return callback


def make_finetune_trainer(cfg: FinetuneConfig, base: nn.Module, data: Tensor, meta: dict | None = None
                          ) -> tuple[Trainer, dict]:
    """The :class:`Trainer` of a fine-tuning run on ``data`` from the score model ``base`` (changed in place).

    With ``out_dir`` holding checkpoints written after the progressive step, the SaRA selection is
    restored from the newest one before the Trainer is built, so that resuming works.
    """
    sde = base.sde
    torch.manual_seed(cfg.training.seed)
    model, summary = prepare_model(base, cfg)
    dsm = make_dsm_loss(sde, reduce=cfg.loss.reduce, likelihood_weighting=cfg.loss.likelihood_weighting, eps=cfg.loss.eps)
    loss_fn, callbacks = dsm, []
    if cfg.method == "sara":
        loss_fn = _sara_loss(dsm)
        if cfg.sara.progressive_step is not None:
            callbacks.append(_progressive(cfg.sara.progressive_step))
            ckpt = latest_checkpoint(cfg.out_dir) if cfg.training.resume else None
            if ckpt is not None:
                weights, _ = load_tensors(ckpt / "model.safetensors")
                model.load_state_dict(weights)  # SaRALayer resizes to the checkpoint's selection
    trainer = Trainer(model, loss_fn, data, cfg.training, out_dir=cfg.out_dir, callbacks=callbacks,
                      meta={"finetune_config": to_dict(cfg), **(meta or {})})
    return trainer, summary


def write_outputs(trainer: Trainer, cfg: FinetuneConfig, base_meta: dict) -> dict[str, Path]:
    """``merged/`` (plain checkpoint for ``scorekit sample``) and the adapter file, after ``trainer.train()``.

    ``merged/`` is the Trainer's final checkpoint with the adapters merged into the weights (model and EMA)
    and ``base_meta`` (the base run's config) as its meta, so that the base's loader rebuilds it.
    """
    ckpt = latest_checkpoint(trainer.out_dir) if trainer.out_dir is not None else None
    state = load_json(ckpt / "state.json") if ckpt is not None else None
    if state is None or state["step"] != trainer.step:
        raise ValueError(f"write_outputs needs the Trainer's checkpoint of step {trainer.step}: build the Trainer "
                         "with out_dir=... and call trainer.train() first")
    out = Path(cfg.out_dir)
    paths = {"merged": out / "merged"}
    with atomic_dir(paths["merged"]) as tmp:
        save_tensors(merged_copy(trainer.unwrapped).state_dict(), tmp / "model.safetensors")
        save_tensors(merged_copy(trainer.ema).state_dict(), tmp / "ema.safetensors")
        save_json({**state, "meta": base_meta}, tmp / "state.json")
    if cfg.method == "sara":
        paths["adapter"] = out / "adapter.safetensors"
        save_sara(trainer.ema, paths["adapter"])
        paths["adapter_dir"] = out / "adapter"
        save_sara(trainer.ema, paths["adapter_dir"], base_model_name_or_path=cfg.base)
    elif cfg.method == "lora":
        from peft import get_peft_model_state_dict

        paths["adapter"] = out / "adapter.safetensors"
        save_tensors(get_peft_model_state_dict(trainer.ema), paths["adapter"],
                     {"format": "peft-lora", "lora": to_dict(cfg.lora)})
    return paths
