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
``adapter.safetensors`` and the peft-style directory ``adapter/`` (:func:`scorekit.sara.save_sara`, :func:`save_lora`)
that ``scorekit sample --adapter`` applies.
``scorekit finetune`` runs them from a config, also under ``accelerate launch`` / ``torchrun``.

A Stable-Diffusion-style pipeline directory as the base fine-tunes its UNet on a captioned image folder
(``finetune:`` section, :class:`PipelineSection`): :func:`prepare_pipeline_data` encodes the images with the
frozen VAE and the captions with the frozen text encoder once, :func:`make_pipeline_trainer` trains the UNet
(in a :class:`PipelineDenoiser`) with :func:`pipeline_dsm_loss` on the pipeline's own table, and
:func:`write_pipeline_outputs` writes ``merged/`` (a diffusers pipeline directory) and ``adapter/`` (SaRA, or
peft LoRA added through diffusers' ``unet.add_adapter``), which :func:`load_adapter` applies unmerged.
"""

from __future__ import annotations

import copy
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .checkpoint import atomic_dir, load_json, load_tensors, save_json, save_tensors
from .config import DataConfig, LossConfig, to_dict
from .losses import make_dsm_loss
from .sara import (  # CONFIG_NAME, WEIGHTS_NAME: peft's adapter-directory names, SaRA's too
    CONFIG_NAME,
    WEIGHTS_NAME,
    SaRAConfig,
    SaRALayer,
    _is_diffusers_model,
    apply_sara,
    find_targets,
    load_sara,
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
    "PipelineSection",
    "PipelineFinetuneData",
    "PipelineDenoiser",
    "is_pipeline",
    "prepare_pipeline_data",
    "pipeline_dsm_loss",
    "make_pipeline_trainer",
    "save_lora",
    "write_pipeline_outputs",
    "load_adapter",
]

METHODS = ("sara", "lora", "full")
LATENTS = ("sample", "mean")


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
class PipelineSection:
    """``finetune:`` section, read when ``base`` is a diffusers pipeline directory (Stable Diffusion style).

    ``images``: a folder of images with a ``metadata.jsonl`` (``file_name``, ``text``), ``--data`` overrides;
    ``resolution``: shorter side resized to it, then centre-cropped square; ``caption_dropout``: the share of
    captions replaced by the empty prompt at each step (classifier-free guidance); ``latents``: ``sample`` (one
    draw of the VAE posterior per image, seeded by ``training.seed``; diffusers' scripts draw one per step) or
    ``mean`` (its mode); ``encode_batch_size``: images and captions encoded at once before training."""

    images: str | None = None
    resolution: int = 512
    caption_dropout: float = 0.1
    latents: str = "sample"
    encode_batch_size: int = 16

    def __post_init__(self):
        self.resolution = positive_int(self.resolution, "resolution", "pixels of the square training images")
        self.caption_dropout = fraction(self.caption_dropout, "caption_dropout", "the share of empty captions",
                                        closed=True)
        self.encode_batch_size = positive_int(self.encode_batch_size, "encode_batch_size")
        if self.latents not in LATENTS:
            raise ValueError(f"unknown latents {self.latents!r}; valid choices are {list(LATENTS)} (a draw of the "
                             "VAE posterior, or its mean)")


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
    finetune: PipelineSection = field(default_factory=PipelineSection)
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
    capped at its weight's smaller side, with alpha scaled alike. A diffusers model (a pipeline's UNet) takes
    it through its own ``add_adapter(LoraConfig)``, as diffusers' LoRA training scripts do."""
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
    if _is_diffusers_model(model):
        model.add_adapter(config)  # diffusers' PeftAdapterMixin: inject_adapter_in_model + set_adapter
        return model
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
    return _method_trainer(cfg, model, dsm, data, meta), summary


def _method_trainer(cfg: FinetuneConfig, model: nn.Module, loss_fn: Callable, data, meta: dict | None) -> Trainer:
    """The Trainer of ``model`` (prepared for ``cfg.method``) on ``loss_fn``, with SaRA's rank penalty, its
    progressive re-selection and the restored selection of a resumed run."""
    callbacks = []
    if cfg.method == "sara":
        loss_fn = _sara_loss(loss_fn)
        if cfg.sara.progressive_step is not None:
            callbacks.append(_progressive(cfg.sara.progressive_step))
            ckpt = latest_checkpoint(cfg.out_dir) if cfg.training.resume else None
            if ckpt is not None:
                weights, _ = load_tensors(ckpt / "model.safetensors")
                model.load_state_dict(weights)  # SaRALayer resizes to the checkpoint's selection
    return Trainer(model, loss_fn, data, cfg.training, out_dir=cfg.out_dir, callbacks=callbacks,
                   meta={"finetune_config": to_dict(cfg), **(meta or {})})


def _final_state(trainer: Trainer, caller: str) -> dict:
    """``state.json`` of the Trainer's checkpoint of its last step (the outputs are written from it)."""
    ckpt = latest_checkpoint(trainer.out_dir) if trainer.out_dir is not None else None
    state = load_json(ckpt / "state.json") if ckpt is not None else None
    if state is None or state["step"] != trainer.step:
        raise ValueError(f"{caller} needs the Trainer's checkpoint of step {trainer.step}: build the Trainer "
                         "with out_dir=... and call trainer.train() first")
    return state


def write_outputs(trainer: Trainer, cfg: FinetuneConfig, base_meta: dict) -> dict[str, Path]:
    """``merged/`` (plain checkpoint for ``scorekit sample``) and the adapter file, after ``trainer.train()``.

    ``merged/`` is the Trainer's final checkpoint with the adapters merged into the weights (model and EMA)
    and ``base_meta`` (the base run's config) as its meta, so that the base's loader rebuilds it.
    """
    state = _final_state(trainer, "write_outputs")
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
        paths["adapter_dir"] = save_lora(trainer.ema, out / "adapter", base_model_name_or_path=cfg.base)
    return paths


# -- Stable-Diffusion-style pipelines ---------------------------------------------------------------------
def is_pipeline(path: str | os.PathLike | None) -> bool:
    """Whether ``path`` is a diffusers pipeline directory (it has a ``model_index.json``)."""
    return path is not None and (Path(path) / "model_index.json").is_file()


@dataclass
class PipelineFinetuneData:
    """What a pipeline is fine-tuned on, encoded once by its frozen VAE and text encoder: ``latents``
    ``(n, C, h, w)`` (already times the VAE's ``scaling_factor``), ``embeddings`` ``(n, L, D)`` (the text
    encoder's ``encoder_hidden_states`` of each caption), ``empty`` ``(1, L, D)`` (those of the empty prompt,
    for caption dropout) and the captions ``texts``."""

    latents: Tensor
    embeddings: Tensor
    empty: Tensor
    texts: list[str]

    def tensors(self) -> tuple[Tensor, Tensor]:
        """The Trainer's data: one row per image, ``(latents, embeddings)``."""
        return self.latents, self.embeddings


@torch.no_grad()
def prepare_pipeline_data(model, folder: str | os.PathLike, *, resolution: int, latents: str = "sample",
                          seed: int = 0, batch_size: int = 16) -> PipelineFinetuneData:
    """Encode the captioned image folder (:func:`scorekit.data.load_image_folder` with ``captions=True``)
    with the pipeline's VAE (``model.encode``: a posterior draw from a generator seeded ``seed``, or its mean
    with ``latents="mean"``) and its text encoder (``model.conditioning(prompt=...)``, the pipeline's own
    ``encode_prompt``), on the device of ``model``."""
    from .data import load_image_folder

    if not getattr(model, "text", False) or getattr(model, "autoencoder", None) is None:
        raise ValueError(f"fine-tuning on captioned images needs a text-to-image latent pipeline (tokenizer, text "
                         f"encoder and VAE, as Stable Diffusion); this {getattr(model, 'kind', type(model).__name__)} "
                         "pipeline lacks them")
    if latents not in LATENTS:
        raise ValueError(f"unknown latents {latents!r}; valid choices are {list(LATENTS)}")
    factor = int(getattr(model.pipeline, "vae_scale_factor", 1) or 1)
    if resolution % factor:
        raise ValueError(f"resolution {resolution} is not a multiple of {factor}, the VAE's downsampling factor; "
                         f"use e.g. {max(factor, resolution // factor * factor)}")
    images, texts = load_image_folder(folder, resolution=resolution, captions=True)
    device = next(model.net.parameters()).device
    generator = torch.Generator(device).manual_seed(seed) if latents == "sample" else None
    z, embeds = [], []
    for i in range(0, len(images), batch_size):
        z.append(model.encode(images[i : i + batch_size].to(device), generator=generator).float().cpu())
        embeds.append(_text_embeddings(model, texts[i : i + batch_size]))
    return PipelineFinetuneData(torch.cat(z), torch.cat(embeds), _text_embeddings(model, [""]), texts)


def _text_embeddings(model, texts: list[str]) -> Tensor:
    return model.conditioning(prompt=texts).cond["encoder_hidden_states"].float().cpu()


class PipelineDenoiser(nn.Module):
    """A pipeline's UNet as the module the Trainer trains: ``forward(x_t, t, encoder_hidden_states)`` is the
    network's own output (``model.raw``: noise, ``v`` or ``x0``) at the table's time ``t``. The loss calls this
    forward, so that the DDP wrapper of a multi-process run syncs the gradients. ``score`` holds the UNet
    alone (no VAE or text encoder: they stay frozen outside and out of the checkpoints)."""

    def __init__(self, score: nn.Module):
        super().__init__()
        self.score = score

    @property
    def unet(self) -> nn.Module:
        return self.score.net

    def forward(self, x: Tensor, t: Tensor, encoder_hidden_states: Tensor) -> Tensor:
        return self.score.raw(x, t, {"encoder_hidden_states": encoder_hidden_states})


def _target(prediction: str, x0: Tensor, eps: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    """What the network predicts at ``x_t = alpha x0 + sigma eps``: diffusers' ``epsilon``, ``v_prediction``
    (``v = alpha eps - sigma x0``, Salimans & Ho 2022, ``scheduler.get_velocity``) or ``sample``."""
    if prediction == "eps":
        return eps
    if prediction == "v":
        return alpha * eps - sigma * x0
    if prediction == "x0":
        return x0
    raise ValueError(f"cannot fine-tune a model predicting {prediction!r}; supported are eps, v and x0")


def pipeline_dsm_loss(sde, prediction: str, empty: Tensor, caption_dropout: float = 0.0) -> Callable:
    """The loss of diffusers' text-to-image training scripts on the pipeline's own table: for each row,
    a step ``k`` uniform over the table's ``N`` steps (``t = (k + 1) / N``, where ``alpha(t)^2 =
    alphas_cumprod[k]``), ``eps ~ N(0, I)``, ``x_t = alpha x0 + sigma eps``, and
    ``mean ||net(x_t, t, c) - target||^2`` with ``target`` the network's own parameterization (eps, v or x0).
    For eps it is Ho et al.'s simple loss, the eps-weighted denoising score matching
    ``sigma^2 ||s(x_t) + eps / sigma||^2``. Each caption is replaced by the empty prompt's ``empty``
    embedding with probability ``caption_dropout``, so that the model keeps its unconditional branch for
    classifier-free guidance. Draws from ``generator``, in this order: ``k``, ``eps``, then (dropout > 0) the
    dropout uniforms."""
    N = sde.N

    def loss_fn(model, batch, generator=None):
        x0, context = batch
        b, device = x0.shape[0], x0.device
        k = torch.randint(0, N, (b,), generator=generator, device=device)
        eps = torch.randn(x0.shape, generator=generator, device=device, dtype=x0.dtype)
        if caption_dropout > 0:
            drop = torch.rand(b, generator=generator, device=device) < caption_dropout
            context = torch.where(drop[:, None, None], empty.to(context), context)
        t = (k + 1).to(x0.dtype) / N
        alpha, sigma = (c.view(b, *[1] * (x0.ndim - 1)) for c in sde.marginal_coeffs(t))
        out = model(alpha * x0 + sigma * eps, t, context)
        # Ho et al. (2020) eq. 14: || eps - eps_theta(sqrt(abar) x0 + sqrt(1 - abar) eps, t) ||^2
        return F.mse_loss(out.float(), _target(prediction, x0, eps, alpha, sigma).float())

    return loss_fn


def make_pipeline_trainer(cfg: FinetuneConfig, base, data: PipelineFinetuneData, meta: dict | None = None
                          ) -> tuple[Trainer, dict]:
    """The :class:`Trainer` fine-tuning the UNet of the pipeline model ``base`` (:func:`scorekit.from_diffusers`;
    its UNet is changed in place) on ``data`` with :func:`pipeline_dsm_loss`. The adapters go into the UNet
    itself (module names as in the pipeline, so that ``adapter/`` loads into any copy of its UNet); LoRA
    through diffusers' ``unet.add_adapter``."""
    from .pretrained import PretrainedScoreModel

    torch.manual_seed(cfg.training.seed)
    unet, summary = prepare_model(base.net, cfg)
    score = PretrainedScoreModel(unet, base.sde, base.prediction, scheduler_config=base.scheduler_config,
                                 data_shape=tuple(data.latents.shape[1:]))
    loss = pipeline_dsm_loss(base.sde, base.prediction, data.empty, cfg.finetune.caption_dropout)
    return _method_trainer(cfg, PipelineDenoiser(score), loss, data.tensors(), meta), summary


def save_lora(unet: nn.Module, path: str | os.PathLike, base_model_name_or_path: str | None = None) -> Path:
    """peft's adapter directory of a LoRA-adapted model: ``adapter_config.json`` (its ``LoraConfig``) and
    ``adapter_model.safetensors`` (``get_peft_model_state_dict``), what ``PeftModel.save_pretrained`` writes."""
    from peft import get_peft_model_state_dict

    config = copy.copy(unet.peft_config["default"])
    config.base_model_name_or_path = base_model_name_or_path
    with atomic_dir(path) as tmp:
        config.save_pretrained(str(tmp))
        save_tensors(get_peft_model_state_dict(unet), tmp / WEIGHTS_NAME)
    return Path(path)


def _plain_unet(unet: nn.Module) -> nn.Module:
    """A copy of the fine-tuned UNet with its adapters merged into the weights, without peft's traces."""
    plain = merged_copy(unet)
    for attr in ("peft_config", "_hf_peft_config_loaded"):
        plain.__dict__.pop(attr, None)
    return plain


def write_pipeline_outputs(trainer: Trainer, cfg: FinetuneConfig, base) -> dict[str, Path]:
    """After ``trainer.train()`` of :func:`make_pipeline_trainer`: ``merged/``, the base pipeline with the
    fine-tuned UNet (EMA weights, adapters merged), a diffusers directory that
    ``StableDiffusionPipeline.from_pretrained`` and ``scorekit sample --checkpoint`` read, and ``adapter/``
    for SaRA (:func:`scorekit.sara.save_sara`) and LoRA (:func:`save_lora`), for ``scorekit sample --adapter``."""
    _final_state(trainer, "write_pipeline_outputs")
    out, unet = Path(cfg.out_dir), trainer.ema.unet
    pipe = copy.copy(base.pipeline)  # a shallow copy: the base pipeline keeps its own UNet entry
    pipe.register_modules(unet=_plain_unet(unet))
    paths = {"merged": out / "merged"}
    with atomic_dir(paths["merged"]) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
    if cfg.method == "sara":
        paths["adapter"] = out / "adapter"
        save_sara(unet, paths["adapter"], base_model_name_or_path=cfg.base)
    elif cfg.method == "lora":
        paths["adapter"] = save_lora(unet, out / "adapter", base_model_name_or_path=cfg.base)
    return paths


# -- adapters at sampling time ----------------------------------------------------------------------------
def load_adapter(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Put the adapter at ``path`` into ``model`` without merging (in place; returns it): a SaRA adapter
    (``save_sara``'s directory or file: :func:`scorekit.sara.load_sara`) or a peft LoRA directory
    (:func:`save_lora`; injected with the model's ``add_adapter`` where it has one, as diffusers does).
    Errors name the modules that do not fit."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no adapter at {path}: expected the adapter/ directory that scorekit finetune writes")
    config = path / CONFIG_NAME
    peft_type = load_json(config).get("peft_type") if path.is_dir() and config.is_file() else "SARA"
    if peft_type == "SARA":
        return load_sara(model, path)
    if peft_type == "LORA":
        return _load_lora(model, path)
    raise ValueError(f"{config} holds a {peft_type} adapter; scorekit applies SARA and LORA adapters")


def _lora_problems(model: nn.Module, state: dict[str, Tensor]) -> list[str]:
    """What does not fit: modules the model lacks, and weights whose shape disagrees with ``lora_A``/``lora_B``."""
    problems = []
    for name in sorted({k.rsplit(".lora_A.", 1)[0] for k in state if ".lora_A." in k}):
        try:
            weight = model.get_submodule(name).weight
        except AttributeError:
            problems.append(f"the adapter has module {name!r} but the model has no Linear/Conv module of that name")
            continue
        a, b = state[f"{name}.lora_A.weight"], state.get(f"{name}.lora_B.weight")
        if tuple(a.shape[1:]) != tuple(weight.shape[1:]) or b is None or b.shape[0] != weight.shape[0]:
            problems.append(f"module {name!r} has a weight of shape {tuple(weight.shape)}, which LoRA factors of "
                            f"shapes {tuple(a.shape)} and {tuple(b.shape) if b is not None else None} do not fit")
    return problems


def _load_lora(model: nn.Module, path: Path) -> nn.Module:
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict

    if not (path / WEIGHTS_NAME).is_file():
        raise FileNotFoundError(f"{path} has no {WEIGHTS_NAME}: the LoRA adapter directory is incomplete")
    state, _ = load_tensors(path / WEIGHTS_NAME)
    problems = _lora_problems(model, state)
    if problems:
        more = f" (and {len(problems) - 8} more)" if len(problems) > 8 else ""
        raise ValueError(f"the LoRA adapter in {path} does not fit this model in {len(problems)} modules: "
                         + "; ".join(problems[:8]) + more + "; was it made for another base model?")
    config = LoraConfig.from_pretrained(str(path))
    if _is_diffusers_model(model):
        model.add_adapter(config)
    else:
        inject_adapter_in_model(config, model)
    result = set_peft_model_state_dict(model, state)
    unexpected = list(getattr(result, "unexpected_keys", []) or [])
    if unexpected:
        raise ValueError(f"the LoRA adapter in {path} has tensors this model has no place for: {unexpected[:5]}")
    return model.requires_grad_(False)
