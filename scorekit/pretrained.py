"""diffusers pipelines as score models, and scorekit VP models as diffusers pipelines.

:func:`from_diffusers` reads a saved pipeline directory, a pipeline object or a ``(denoiser, scheduler)``
pair as a :class:`~scorekit.score.ScoreModel` with ``.sde`` set:

- any scheduler that carries betas (DDPM, DDIM, PNDM, Euler, EulerAncestral, Heun, LMS, DEIS,
  DPMSolverMultistep/Singlestep, UniPC, ...; ``linear``, ``scaled_linear``, ``squaredcos_cap_v2`` or
  ``trained_betas``, zero terminal SNR included) -> a :class:`PretrainedScoreModel` on the
  :class:`~scorekit.sde.DiscreteVPSDE` of ``alphas_cumprod = cumprod(1 - betas)``. At the scheduler's own
  timesteps ``t_k = (k + 1) / N`` the score is the network's prediction (``epsilon``, ``v_prediction`` or
  ``sample``) converted with that table; between them the network sees fractional timesteps. Scheduler
  classes with the same betas give the same score function, so scorekit and diffusers solve one ODE.
- ``ScoreSdeVeScheduler`` -> a ``ScoreModel`` on a ``VESDE(sigma_min, sigma_max, N)`` whose network is
  fed ``sigma(t)`` and returns the score, exactly as ``ScoreSdeVePipeline`` uses it.

The denoiser is whatever network class the pipeline names as ``unet`` or ``transformer``
(``UNet2DModel``, ``UNet2DConditionModel``, ``DiTTransformer2DModel``, ...), read from safetensors only.
Text-to-image pipelines keep their tokenizers and text encoders, class-conditional ones their classes,
and latent pipelines (Stable Diffusion, SDXL, LDM, DiT) their autoencoder: ``model.data_shape`` is the
latent shape, ``model.decode(z)`` the pipeline's own VAE decode. Conditional models are sampled through
:meth:`PretrainedScoreModel.condition`; SDXL's prompts carry its pooled text embedding and the size/crop time
ids that ``StableDiffusionXLPipeline`` builds for the model's height and width. :func:`save_diffusers` goes the
other way for VP models whose network is a ``UNet2DModel``. Nothing is downloaded.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .checkpoint import atomic_dir, load_json
from .score import Conditioning, ScoreModel
from .sde import VESDE, VPSDE, DiscreteVPSDE
from .validate import positive

__all__ = ["PREDICTION_TYPES", "PretrainedScoreModel", "from_diffusers", "save_diffusers"]

# diffusers' prediction_type -> ScoreModel's prediction
PREDICTION_TYPES = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}
DENOISERS = ("unet", "transformer")
AUTOENCODERS = ("vae", "vqvae")
VE_SCHEDULER = "ScoreSdeVeScheduler"
SUPPORTED = (
    "pipelines with a 'unet' or 'transformer' denoiser and a scheduler that carries betas (DDPM, DDIM, PNDM, "
    f"Euler, Heun, LMS, DEIS, DPM-Solver, UniPC, ...), or a {VE_SCHEDULER}"
)
#: the keywords StableDiffusionXLPipeline takes beside prompt= and negative_prompt=, with the same meaning here
SDXL_KEYWORDS = ("prompt_2", "negative_prompt_2", "original_size", "crops_coords_top_left", "target_size",
                 "negative_original_size", "negative_crops_coords_top_left", "negative_target_size",
                 "aesthetic_score", "negative_aesthetic_score")
PICKLED = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")
# what diffusers' schedulers do that scorekit's samplers do not, and what scorekit does instead
SAMPLING_FLAGS = {
    "clip_sample": "diffusers clips the predicted x0 to [-clip_sample_range, clip_sample_range] at every step; "
                   "scorekit's samplers follow the model's SDE unclipped (clip the final samples if needed)",
    "thresholding": "diffusers applies dynamic thresholding to the predicted x0 at every step; scorekit's "
                    "samplers follow the model's SDE unthresholded",
}


def _table(scheduler: Any) -> Tensor:
    """``alphas_cumprod = cumprod(1 - betas)`` in float64, from any scheduler with betas."""
    betas = getattr(scheduler, "betas", None)
    if not torch.is_tensor(betas):
        raise ValueError(f"scheduler {type(scheduler).__name__} is not supported: it has no betas; supported are "
                         f"{SUPPORTED}")
    return torch.cumprod(1 - betas.detach().to(torch.float64), 0)


class PretrainedScoreModel(ScoreModel):
    """A diffusers denoiser read as the score of the :class:`DiscreteVPSDE` of its scheduler's table.

    ``score(x, t) = convert(net(x, k(t)))`` with the fractional timestep ``k(t) = N t - 1`` (integer at the
    table's steps; a learned time-embedding table gets ``k`` rounded) and the conversion of ``prediction``
    with ``(alpha(t), sigma(t))`` of the table. ``pipeline`` (optional) holds the other components: text
    encoders and tokenizers (prompts, :meth:`conditioning`), the autoencoder (``decode``/``encode``). A
    learned-variance output (``2 C`` channels, DiT) is read for its noise half, as ``DiTPipeline`` does.
    ``scheduler_config`` is kept so that :func:`save_diffusers` can write the model back unchanged.
    """

    def __init__(
        self,
        net: nn.Module,
        sde: DiscreteVPSDE,
        prediction: str = "eps",
        *,
        scheduler_config: Mapping[str, Any] | None = None,
        pipeline: Any = None,
        data_shape: tuple[int, ...] | None = None,
    ):
        config = getattr(net, "config", {})
        size = _get(config, "sample_size")
        if data_shape is None and size is not None:
            h, w = (size, size) if isinstance(size, int) else tuple(size)
            data_shape = (_get(config, "in_channels"), h, w)
        super().__init__(net, sde, prediction=prediction, time_input="index", data_shape=data_shape)
        self.scheduler_config = dict(scheduler_config or {})
        self.pipeline = pipeline
        self.autoencoder = next((getattr(pipeline, k) for k in AUTOENCODERS if getattr(pipeline, k, None) is not None),
                                None)
        ae_config = getattr(self.autoencoder, "config", {})
        ae = _get(ae_config, "scaling_factor")
        self.scaling_factor = float(ae) if ae is not None else 1.0
        shift = _get(ae_config, "shift_factor")
        self.shift_factor = float(shift) if shift is not None else 0.0
        # SDXL-family pipelines (their UNets take the "text_time" added embedding) (de)normalise latents with the
        # VAE's per-channel latents_mean / latents_std when it sets both, and run a VAE with force_upcast in
        # float32, since SDXL's VAE overflows in float16; the Stable Diffusion and DiT pipelines do neither
        sdxl = self.sdxl = _get(config, "addition_embed_type") == "text_time"
        mean, std = _get(ae_config, "latents_mean"), _get(ae_config, "latents_std")
        stats = sdxl and mean is not None and std is not None
        self.latents_mean, self.latents_std = (tuple(mean), tuple(std)) if stats else (None, None)
        self.upcast_autoencoder = sdxl and bool(_get(ae_config, "force_upcast"))
        self.kind = type(net).__name__
        self.num_classes = _num_classes(net)
        # the SDXL refiner has only the second tokenizer and text encoder
        self.text = any(getattr(pipeline, f"tokenizer{n}", None) is not None
                        and getattr(pipeline, f"text_encoder{n}", None) is not None for n in ("", "_2"))
        # the refiner's time ids: original size, crop and an aesthetic score (no target size)
        self.aesthetic = sdxl and bool(_get(getattr(pipeline, "config", {}), "requires_aesthetics_score"))
        self.requires_condition = self.kind.endswith("ConditionModel") or self.num_classes is not None
        self.condition_help = "prompt=, negative_prompt=, guidance_scale=" if self.text else (
            "class_labels=, guidance_scale=" if self.num_classes is not None else "encoder_hidden_states=")
        self.learned_variance = _get(config, "out_channels") == 2 * _get(config, "in_channels")

    # -- the network -------------------------------------------------------------------------------
    def network_time(self, t: Tensor | float) -> Tensor | float:
        k = self.sde.timestep(t)
        if _get(getattr(self.net, "config", {}), "time_embedding_type") == "learned":
            return k.round().long() if torch.is_tensor(k) else round(k)
        return k

    # -- conditioning ------------------------------------------------------------------------------
    def conditioning(self, *, guided: bool = False, prompt: str | list[str] | None = None,
                     negative_prompt: str | list[str] | None = None, class_labels: Any = None,
                     encoder_hidden_states: Tensor | None = None,
                     negative_encoder_hidden_states: Tensor | None = None,
                     added_cond_kwargs: dict | None = None,
                     negative_added_cond_kwargs: dict | None = None,
                     **sdxl: Any) -> Conditioning:
        """Network keywords for a prompt (encoded exactly as the pipeline encodes it: its own
        ``encode_prompt``, so a missing negative prompt is what the pipeline makes of none: the empty
        string's embedding for Stable Diffusion, zeros for SDXL's ``force_zeros_for_empty_prompt``),
        precomputed ``encoder_hidden_states`` (SDXL also ``added_cond_kwargs``, and for guidance
        ``negative_added_cond_kwargs``), or ``class_labels`` (DiT's null class ``1000`` as in ``DiTPipeline``
        for the unconditional branch).

        Stable Diffusion XL pipelines also take ``StableDiffusionXLPipeline``'s keywords of the same names
        (:data:`SDXL_KEYWORDS`; Podell et al. 2023, https://arxiv.org/abs/2307.01952, Sec. 2.2):

        - ``prompt_2`` / ``negative_prompt_2`` (``str | list[str]``, default: ``prompt`` / ``negative_prompt``):
          the prompts of the second text encoder;
        - ``original_size``, ``target_size`` (``(height, width)`` in pixels, default: the model's image size)
          and ``crops_coords_top_left`` (``(top, left)``, default ``(0, 0)``): the size and crop
          micro-conditioning of the time ids;
        - ``negative_original_size``, ``negative_target_size`` (both or neither) and
          ``negative_crops_coords_top_left`` (default ``(0, 0)``): the unconditional branch's own time ids;
          without them it takes the conditional branch's, as in the pipeline.

        The refiner (``StableDiffusionXLImg2ImgPipeline`` with ``requires_aesthetics_score``, one text encoder)
        has the time ids ``(original size, crop, aesthetic score)`` of that pipeline: ``aesthetic_score``
        (``float``, default 6.0) and ``negative_aesthetic_score`` (default 2.5; Podell et al. 2023, App. I), with
        ``negative_original_size`` (default: ``original_size``) and ``negative_crops_coords_top_left`` (default
        ``(0, 0)``); it takes no ``target_size``.
        """
        unknown = sorted(set(sdxl) - set(SDXL_KEYWORDS))
        if unknown:
            raise TypeError(f"condition() got unexpected keyword(s) {unknown}")
        sdxl = {k: v for k, v in sdxl.items() if v is not None}
        if sdxl and not self.sdxl:
            raise ValueError(f"{sorted(sdxl)} are Stable Diffusion XL keywords (two text encoders, size and crop "
                             f"time ids); this {self.kind} pipeline takes {self.condition_help}")
        if sdxl and prompt is None:
            raise ValueError(f"{sorted(sdxl)} go with prompt=: the pipeline builds them into the prompt's "
                             "conditioning (with precomputed embeddings, pass the time ids in added_cond_kwargs)")
        if prompt is not None or negative_prompt is not None:
            if prompt is None:
                raise ValueError("negative_prompt= needs prompt= as well")
            if not self.text:
                raise ValueError(f"this {self.kind} pipeline has no tokenizer and text encoder, so it takes no prompt; "
                                 f"condition it with {self.condition_help}")
            return self._encode_prompt(prompt, negative_prompt, guided, **sdxl)
        if class_labels is not None:
            return self._class_conditioning(class_labels, guided)
        return super().conditioning(guided=guided, encoder_hidden_states=encoder_hidden_states,
                                    negative_encoder_hidden_states=negative_encoder_hidden_states,
                                    added_cond_kwargs=added_cond_kwargs,
                                    negative_added_cond_kwargs=negative_added_cond_kwargs)

    def _encode_prompt(self, prompt, negative_prompt, guided: bool, prompt_2=None, negative_prompt_2=None,
                       **sizes) -> Conditioning:
        pipe = self.pipeline
        prompts = _texts("prompt", prompt, 1)
        negative_prompt, prompt_2, negative_prompt_2 = (
            None if v is None else _texts(name, v, len(prompts))
            for name, v in (("negative_prompt", negative_prompt), ("prompt_2", prompt_2),
                            ("negative_prompt_2", negative_prompt_2)))
        for name, v in (("negative prompts", negative_prompt), ("prompt_2 prompts", prompt_2),
                        ("negative_prompt_2 prompts", negative_prompt_2)):
            if v is not None and len(v) != len(prompts):
                raise ValueError(f"got {len(prompts)} prompts but {len(v)} {name}; pass one or one per prompt")
        extra = {} if not self.sdxl else dict(prompt_2=prompt_2, negative_prompt_2=negative_prompt_2)
        device = next(self.net.parameters()).device
        with torch.no_grad():
            out = pipe.encode_prompt(prompts, device=device, num_images_per_prompt=1, do_classifier_free_guidance=guided,
                                     negative_prompt=negative_prompt, **extra)
        if len(out) == 4:  # SDXL: pooled embeddings and the size/crop time ids go in added_cond_kwargs
            embeds, negative, pooled, negative_pooled = out
            ids, negative_ids = self._time_ids(len(prompts), embeds.dtype, device, pooled, **sizes)
            cond = {"encoder_hidden_states": embeds, "added_cond_kwargs": {"text_embeds": pooled, "time_ids": ids}}
            uncond = {"encoder_hidden_states": negative,
                      "added_cond_kwargs": {"text_embeds": negative_pooled, "time_ids": negative_ids}} if guided else None
            return Conditioning(cond, uncond)
        embeds, negative = out
        return Conditioning({"encoder_hidden_states": embeds},
                            {"encoder_hidden_states": negative} if guided else None)

    def _time_ids(self, batch: int, dtype: torch.dtype, device, pooled: Tensor, original_size=None,
                  crops_coords_top_left=None, target_size=None, negative_original_size=None,
                  negative_crops_coords_top_left=None, negative_target_size=None, aesthetic_score=None,
                  negative_aesthetic_score=None) -> tuple[Tensor, Tensor]:
        """SDXL's time ids of both branches, with the pipelines' defaults. Base: ``(original size, crop, target
        size)``, both sizes the image's ``(height, width)``, crop ``(0, 0)``, and the conditional branch's ids for
        the unconditional one unless both its sizes are given (``StableDiffusionXLPipeline``). Refiner:
        ``(original size, crop, aesthetic score)`` per branch (``StableDiffusionXLImg2ImgPipeline``)."""
        pipe = self.pipeline
        projection = int(pooled.shape[-1]) if getattr(pipe, "text_encoder_2", None) is None else \
            pipe.text_encoder_2.config.projection_dim
        size = tuple(int(s) * pipe.vae_scale_factor for s in self.data_shape[1:])
        original = _pair("original_size", original_size or size, 1)
        crop = _pair("crops_coords_top_left", crops_coords_top_left or (0, 0), 0)
        negative_crop = _pair("negative_crops_coords_top_left", negative_crops_coords_top_left or (0, 0), 0)

        def ids(*values) -> Tensor:
            expected = self.net.add_embedding.linear_1.in_features - projection
            if expected != len(values) * self.net.config.addition_time_embed_dim:  # a config that does not fit
                raise ValueError(f"this SDXL UNet embeds {expected // self.net.config.addition_time_embed_dim} time "
                                 f"ids, but its pipeline's config makes {len(values)} (requires_aesthetics_score="
                                 f"{self.aesthetic}); fix requires_aesthetics_score in model_index.json")
            return torch.tensor([values], dtype=dtype, device=device).repeat(batch, 1)

        if self.aesthetic:
            if target_size is not None or negative_target_size is not None:
                raise ValueError("the SDXL refiner's time ids hold no target size (original size, crop, aesthetic "
                                 "score): pass original_size=, crops_coords_top_left= and aesthetic_score=")
            score = positive(6.0 if aesthetic_score is None else aesthetic_score, "aesthetic_score")
            negative_score = positive(2.5 if negative_aesthetic_score is None else negative_aesthetic_score,
                                      "negative_aesthetic_score")
            negative_original = _pair("negative_original_size", negative_original_size or original, 1)
            return ids(*original, *crop, score), ids(*negative_original, *negative_crop, negative_score)
        if aesthetic_score is not None or negative_aesthetic_score is not None:
            raise ValueError("aesthetic_score= is for the SDXL refiner (requires_aesthetics_score); this SDXL "
                             "pipeline's time ids are original size, crop and target size")
        if (negative_original_size is None) != (negative_target_size is None):
            raise ValueError("negative_original_size= and negative_target_size= go together: pass both for the "
                             "unconditional branch's own time ids, or neither to reuse the prompt's")
        cond = ids(*original, *crop, *_pair("target_size", target_size or size, 1))
        if negative_original_size is None:
            return cond, cond
        return cond, ids(*_pair("negative_original_size", negative_original_size, 1), *negative_crop,
                         *_pair("negative_target_size", negative_target_size, 1))

    def _class_conditioning(self, class_labels, guided: bool) -> Conditioning:
        if self.num_classes is None:
            raise ValueError(f"this {self.kind} network is not class-conditional; it takes no class_labels")
        labels = torch.as_tensor(class_labels).reshape(-1)
        if labels.is_floating_point() or labels.numel() == 0:
            raise ValueError(f"class_labels must be integers, got {class_labels!r}")
        if int(labels.min()) < 0 or int(labels.max()) >= self.num_classes:
            raise ValueError(f"class label {labels.tolist()} out of range: this model has classes 0..{self.num_classes - 1}")
        labels = labels.long().to(next(self.net.parameters()).device)
        uncond = None
        if guided:
            if self.kind == "UNet2DModel":
                raise ValueError("this class-conditional UNet2DModel has no null class, so classifier-free guidance "
                                 "(guidance_scale > 1) is not defined for it")
            uncond = {"class_labels": torch.full_like(labels, self.num_classes)}
        return Conditioning({"class_labels": labels}, uncond)

    # -- latent models -----------------------------------------------------------------------------
    def decode(self, z: Tensor) -> Tensor:
        """Images in [-1, 1] from latents, as the pipeline decodes them: ``vae.decode(z / scaling + shift)``,
        or ``vae.decode(z * std / scaling + mean)`` for a VAE with per-channel ``latents_mean`` /
        ``latents_std`` (SDXL); an SDXL float16 VAE with ``force_upcast`` decodes in float32, as
        ``StableDiffusionXLPipeline`` does."""
        if self.autoencoder is None:
            return z
        mean, std = self._latent_stats(z)
        return self._autoencoder("decode", z * std / self.scaling_factor + mean).sample.to(z.dtype)

    def encode(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Latents of images in [-1, 1]: the VAE posterior's mean (a draw with ``generator``), then
        ``(z - shift) * scaling`` or ``(z - mean) * scaling / std`` (the inverse of :meth:`decode`; VQ
        autoencoders: their encoder output). An SDXL VAE with ``force_upcast`` encodes in float32 in any
        precision, as ``StableDiffusionXLImg2ImgPipeline`` does."""
        if self.autoencoder is None:
            return images
        out = self._autoencoder("encode", images)
        dist = getattr(out, "latent_dist", None)
        z = out.latents if dist is None else (dist.mode() if generator is None else dist.sample(generator))
        mean, std = self._latent_stats(z)
        return ((z - mean) * self.scaling_factor / std).to(images.dtype)

    def _latent_stats(self, z: Tensor) -> tuple[Tensor | float, Tensor | float]:
        """``(mean, std)`` of the latents as the pipeline (de)normalises them, broadcastable against ``z``."""
        if self.latents_mean is None:
            return self.shift_factor, 1.0
        shape = (1, -1) + (1,) * (z.ndim - 2)
        return z.new_tensor(self.latents_mean).view(shape), z.new_tensor(self.latents_std).view(shape)

    def _autoencoder(self, method: str, x: Tensor) -> Any:
        """``autoencoder.<method>(x)`` in the autoencoder's precision, or in float32 where the SDXL pipelines
        upcast: decoding with a float16 VAE, encoding with any."""
        ae = self.autoencoder
        dtype = next(ae.parameters()).dtype
        upcast = dtype == torch.float16 if method == "decode" else dtype != torch.float32
        if not (self.upcast_autoencoder and upcast):
            return getattr(ae, method)(x.to(dtype))
        # The pipeline converts its VAE to float32 and back; here float32 copies of the weights stand in for
        # the module's own, so that the module is left as it is and gradients through decode still flow.
        state = {f"module.{k}": v.float() if v.is_floating_point() else v
                 for k, v in (*ae.named_parameters(), *ae.named_buffers())}
        return torch.func.functional_call(_Method(ae, method), state, (x.float(),))

    def extra_repr(self) -> str:
        return f"{self.kind}, sde={self.sde!r}, prediction={self.prediction!r}, data_shape={self.data_shape}"


def _pair(name: str, value: Any, least: int) -> tuple[int, int]:
    """A ``(height, width)`` / ``(top, left)`` pair of integers ``>= least``, as SDXL's time ids take them."""
    ok = isinstance(value, (tuple, list)) and len(value) == 2 and all(
        isinstance(v, int) and not isinstance(v, bool) and v >= least for v in value)
    if not ok:
        raise ValueError(f"{name}= must be two integers >= {least} (pixels: (height, width), or (top, left) for the "
                         f"crop), got {value!r}")
    return tuple(value)


def _texts(name: str, value: Any, copies: int) -> list[str]:
    """A prompt argument as a list of strings: a string is ``copies`` of it, a list or tuple one per sample."""
    if isinstance(value, str):
        return [value] * copies
    if not isinstance(value, (list, tuple)) or not value or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{name}= must be a string or a non-empty list of strings (one per sample), got {value!r}")
    return list(value)


class _Method(nn.Module):
    """``module.<name>`` as a module's forward, so that ``torch.func.functional_call`` can run it on other weights."""

    def __init__(self, module: nn.Module, name: str):
        super().__init__()
        self.module, self.name = module, name

    def forward(self, *args: Any) -> Any:
        return getattr(self.module, self.name)(*args)


def _get(config: Any, key: str) -> Any:
    return config.get(key) if isinstance(config, Mapping) else getattr(config, key, None)


def _num_classes(net: nn.Module) -> int | None:
    """The number of classes of a class-conditional denoiser, or ``None``."""
    config = getattr(net, "config", {})
    if type(net).__name__ in ("DiTTransformer2DModel", "Transformer2DModel"):
        # DiT's label table has one more row, the null class 1000 (DiTPipeline hard-codes it)
        return _get(config, "num_embeds_ada_norm") if _get(config, "norm_type") == "ada_norm_zero" else None
    return _get(config, "num_class_embeds")


# -- loading -----------------------------------------------------------------------------------------
def _warn_flags(scheduler: Any) -> None:
    for flag, instead in SAMPLING_FLAGS.items():
        if scheduler.config.get(flag):
            warnings.warn(f"{type(scheduler).__name__} has {flag}=True: {instead}", stacklevel=3)


def _vp_model(net: nn.Module, scheduler: Any, pipeline: Any, data_shape) -> PretrainedScoreModel:
    cfg = scheduler.config
    name = type(scheduler).__name__
    kind = cfg.get("prediction_type", "epsilon")
    if kind not in PREDICTION_TYPES:
        raise ValueError(f"{name} has prediction_type={kind!r}; supported are {sorted(PREDICTION_TYPES)}")
    net_cfg = getattr(net, "config", {})
    out, inp = _get(net_cfg, "out_channels"), _get(net_cfg, "in_channels")
    if out not in (None, inp, 2 * (inp or 0)):
        raise ValueError(f"the {type(net).__name__} has {out} output channels for {inp} input channels; expected "
                         f"{inp} (or {2 * inp}: noise and a learned variance)")
    _warn_flags(scheduler)
    return PretrainedScoreModel(net, DiscreteVPSDE(_table(scheduler)), PREDICTION_TYPES[kind],
                                scheduler_config=dict(cfg), pipeline=pipeline, data_shape=data_shape)


def _ve_model(net: nn.Module, scheduler: Any) -> ScoreModel:
    cfg = scheduler.config
    sde = VESDE(sigma_min=cfg["sigma_min"], sigma_max=cfg["sigma_max"], N=int(cfg["num_train_timesteps"]))
    # ScoreSdeVePipeline feeds sigma(t) = sigma_min (sigma_max / sigma_min)^t and steps with the output as the score.
    return ScoreModel(net, sde, prediction="score", time_input="sigma")


def _model_from_parts(net: Any, scheduler: Any, pipeline: Any = None, data_shape=None) -> ScoreModel:
    if not isinstance(net, nn.Module):
        raise TypeError(f"expected the denoiser to be a torch.nn.Module (a diffusers UNet or transformer), got "
                        f"{type(net).__name__}")
    if not hasattr(scheduler, "config"):
        raise ValueError(f"scheduler {type(scheduler).__name__} is not supported: supported are {SUPPORTED}")
    if type(scheduler).__name__ == VE_SCHEDULER:
        return _ve_model(net, scheduler)
    return _vp_model(net, scheduler, pipeline, data_shape)


def _check_weights(component: Path) -> None:
    """Refuse a component directory that holds only pickled weights (unpickling can run code)."""
    if any(component.glob("*.safetensors")) or any(component.glob("*.safetensors.index.json")):
        return
    pickled = sorted(p.name for pattern in PICKLED for p in component.glob(pattern))
    if pickled:
        raise ValueError(
            f"{component} holds only pickled weights ({', '.join(pickled)}); scorekit loads safetensors only, "
            "since unpickling can run arbitrary code. Convert them where you trust the file: "
            "Model.from_pretrained(dir).save_pretrained(dir, safe_serialization=True)"
        )
    raise ValueError(f"no weights in {component}: expected a *.safetensors file")


def _load_denoiser(path: Path, key: str, class_name: str, library: str) -> nn.Module:
    import diffusers

    cls = getattr(diffusers, class_name, None)
    if library != "diffusers" or cls is None or not isinstance(cls, type) or not issubclass(cls, nn.Module):
        raise ValueError(f"{path} names its {key} a {library}.{class_name}, which scorekit cannot read as a denoiser; "
                         f"supported are {SUPPORTED}")
    _check_weights(path / key)
    try:
        net, info = cls.from_pretrained(path / key, use_safetensors=True, local_files_only=True,
                                        output_loading_info=True)
    except (OSError, ValueError, RuntimeError, KeyError) as e:
        what = "UNet" if key == "unet" else "transformer"
        raise ValueError(f"could not load the {what} from {path / key}: the files are corrupt or foreign ({e})") from e
    # diffusers only warns when weights are missing and leaves them randomly initialised: refuse instead.
    problems = {k: info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")}
    if any(problems.values()):
        summary = "; ".join(f"{k.replace('_', ' ')}: {v[:4]}" for k, v in problems.items() if v)
        raise ValueError(f"the {key} weights in {path / key} do not match its config.json ({summary}): foreign or "
                         "corrupt files")
    return net.eval()


def _load_scheduler(path: Path, class_name: str) -> Any:
    import diffusers

    config_file = path / "scheduler" / "scheduler_config.json"
    config = load_json(config_file) if config_file.is_file() else None
    if not isinstance(config, dict):
        # a corrupt file is bad data, not a bad argument type
        raise ValueError(  # noqa: TRY004
            f"could not load the {class_name} config: {config_file} is missing or not a JSON object"
        )
    cls = getattr(diffusers, class_name, None)
    if cls is None:
        raise ValueError(f"{path} uses scheduler {class_name}, which this diffusers does not have: supported are "
                         f"{SUPPORTED}")
    try:
        return cls.from_config(config)
    except (ValueError, TypeError, KeyError) as e:
        raise ValueError(f"could not build a {class_name} from {config_file} ({e})") from e


def _load_dir(path: Path, dtype: torch.dtype | None) -> tuple[nn.Module, Any, Any]:
    """``(denoiser, scheduler, pipeline)`` of a pipeline directory; ``pipeline`` holds the other components."""
    import diffusers

    expected = "a diffusers pipeline directory (model_index.json, unet/ or transformer/, scheduler/) as written " \
               "by save_pretrained"
    if not path.exists():
        raise FileNotFoundError(f"no such directory: {path}; expected {expected}")
    if not path.is_dir():
        raise ValueError(f"{path} is a file; expected {expected}")
    if not (path / "model_index.json").is_file():
        raise ValueError(f"{path} has no model_index.json; expected {expected}")
    index = load_json(path / "model_index.json")
    if not isinstance(index, dict):
        raise ValueError(f"{path / 'model_index.json'} is not a JSON object; expected {expected}")
    # components are [library, class] pairs ([null, null] when left out); other keys are pipeline options
    entries = {k: v for k, v in index.items() if isinstance(v, list) and not k.startswith("_")}
    for key, entry in entries.items():
        if entry != [None, None] and not (len(entry) == 2 and all(isinstance(e, str) for e in entry)):
            raise ValueError(f"{path / 'model_index.json'} has no valid {key!r} entry (got {entry!r}); expected {expected}")
    key = next((k for k in DENOISERS if isinstance(entries.get(k), list) and entries[k][0]), None)
    if key is None:
        raise ValueError(f"{path / 'model_index.json'} names no 'unet' or 'transformer' component; supported are "
                         f"{SUPPORTED}")
    if not isinstance(entries.get("scheduler"), list):
        raise ValueError(f"{path / 'model_index.json'} has no valid 'scheduler' entry; expected {expected}")
    net = _load_denoiser(path, key, entries[key][1], entries[key][0])
    scheduler = _load_scheduler(path, entries["scheduler"][1])
    others = [k for k, v in entries.items() if k not in (key, "scheduler") and isinstance(v, list) and v[0]]
    if not others:
        return net, scheduler, None
    for other in others:
        if other not in ("tokenizer", "tokenizer_2", "feature_extractor") and (path / other).is_dir():
            _check_weights(path / other)
    pipeline_cls = getattr(diffusers, index.get("_class_name", ""), None) or diffusers.DiffusionPipeline
    try:
        pipeline = pipeline_cls.from_pretrained(path, use_safetensors=True, local_files_only=True,
                                                **{key: net, "scheduler": scheduler},
                                                **({"torch_dtype": dtype} if dtype is not None else {}))
    except (OSError, ValueError, RuntimeError, KeyError, TypeError) as e:
        raise ValueError(f"could not load the pipeline components in {path} ({e})") from e
    return net, scheduler, pipeline


def from_diffusers(
    source: str | os.PathLike | Any,
    scheduler: Any = None,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    height: int | None = None,
    width: int | None = None,
) -> ScoreModel:
    """A diffusers model as a scorekit :class:`~scorekit.score.ScoreModel` with ``.sde`` set.

    ``source`` is a pipeline directory (``save_pretrained`` output, safetensors weights), a pipeline object
    with a ``unet`` or ``transformer`` and a ``scheduler``, a ``(denoiser, scheduler)`` pair, or a denoiser
    with ``scheduler`` given separately. See the module docstring for how schedulers map onto SDEs.
    ``dtype`` (e.g. ``torch.float16``) is the precision the networks run in; the samplers' state stays in
    the dtype they are given. ``height`` / ``width`` (pixels) set the sample size of a latent pipeline (its
    latent ``data_shape`` is ``(C, height / f, width / f)``, ``f`` the VAE's downsampling factor) or a pixel one.
    """
    pipeline = None
    if isinstance(source, (str, os.PathLike)):
        if scheduler is not None:
            raise ValueError(
                "pass either a pipeline directory or a (unet, scheduler) pair, not a directory and a scheduler"
            )
        net, scheduler, pipeline = _load_dir(Path(source), dtype)
    elif isinstance(source, (tuple, list)):
        if len(source) != 2 or scheduler is not None:
            raise ValueError(f"expected a (unet, scheduler) pair, got a sequence of {len(source)} items")
        net, scheduler = source
    elif hasattr(source, "scheduler") and any(getattr(source, k, None) is not None for k in DENOISERS):
        pipeline, scheduler = source, source.scheduler
        net = next(getattr(source, k) for k in DENOISERS if getattr(source, k, None) is not None)
    elif scheduler is not None:
        net = source
    else:
        raise TypeError(
            f"cannot read a {type(source).__name__}: pass a pipeline directory, a pipeline object, "
            "a (unet, scheduler) pair, or a UNet together with scheduler="
        )
    model = _model_from_parts(net, scheduler, pipeline, _data_shape(net, pipeline, height, width))
    # a directory's pipeline was loaded in dtype already; casting it again makes diffusers warn about to()
    cast = None if isinstance(source, (str, os.PathLike)) else dtype
    if pipeline is not None and (device is not None or cast is not None):
        pipeline.to(device=device, dtype=cast)
    return model.to(device=device, dtype=dtype).eval()


def _data_shape(net: Any, pipeline: Any, height: int | None, width: int | None) -> tuple[int, ...] | None:
    if height is None and width is None:
        return None
    config = getattr(net, "config", {})
    size = _get(config, "sample_size")
    factor = int(getattr(pipeline, "vae_scale_factor", 1) or 1) if any(
        getattr(pipeline, k, None) is not None for k in AUTOENCODERS) else 1
    h0, w0 = (size, size) if isinstance(size, int) else tuple(size)
    height, width = height or h0 * factor, width or w0 * factor
    for name, value in (("height", height), ("width", width)):
        if int(value) != value or value < factor or value % factor:
            raise ValueError(f"{name}={value} must be a positive multiple of {factor} (the autoencoder's "
                             "downsampling factor)")
    return (_get(config, "in_channels"), int(height) // factor, int(width) // factor)


# -- saving ------------------------------------------------------------------------------------------
def save_diffusers(
    model: ScoreModel,
    directory: str | os.PathLike,
    *,
    overwrite: bool = False,
    clip_sample: bool = False,
) -> Path:
    """Write a VP :class:`ScoreModel` as a ``DDPMPipeline`` directory that diffusers loads and samples from.

    The network must be a ``UNet2DModel`` taking the step index (``time_input="index"``) and predicting
    ``eps``, ``v`` or ``x0``. For a ``VPSDE`` the scheduler is a ``DDPMScheduler`` with ``N = sde.N`` steps and
    linear betas from ``beta_start = beta_min / N`` to ``beta_end = beta_max / N`` (DDPM's discretization of
    the VPSDE, ``sde.discrete_betas()``); diffusers then uses ``alphas_cumprod[k]``, which approximates the
    continuous ``alpha(t_k)^2`` to ``O(1/N)``. A model loaded by :func:`from_diffusers` keeps its original
    scheduler settings. ``clip_sample`` turns on diffusers' clipping of the predicted ``x0`` to ``[-1, 1]``
    (off by default: scorekit models need not live in ``[-1, 1]``). The directory is written to a
    temporary name and renamed; an existing non-empty one needs ``overwrite=True``.
    """
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    if not isinstance(model, ScoreModel):
        raise TypeError(f"save_diffusers takes a scorekit ScoreModel, got {type(model).__name__}")
    if type(model.sde) not in (VPSDE, DiscreteVPSDE):
        raise ValueError(
            f"save_diffusers writes VP models as a DDPMPipeline; this model's SDE is {model.sde!r}"
        )
    if not isinstance(model.net, UNet2DModel):
        raise TypeError(
            f"save_diffusers needs a diffusers UNet2DModel network, got {type(model.net).__name__}"
        )
    embedding = model.net.config.time_embedding_type
    if model.time_input != "index" or embedding not in ("positional", "learned"):
        raise ValueError(
            f"DDPMPipeline feeds the network the integer step k: the model must use time_input='index' and a "
            f"positional or learned time embedding, got time_input={model.time_input!r}, time_embedding_type={embedding!r}"
        )
    to_diffusers = {v: k for k, v in PREDICTION_TYPES.items()}
    if model.prediction not in to_diffusers:
        raise ValueError(
            f"DDPMScheduler has no prediction_type for prediction={model.prediction!r}; "
            f"save models predicting {sorted(to_diffusers)}"
        )
    directory = Path(directory)
    if directory.exists() and not (directory.is_dir() and not any(directory.iterdir())) and not overwrite:
        raise FileExistsError(
            f"{directory} exists and is not an empty directory; pass overwrite=True to replace it"
        )
    if isinstance(model, PretrainedScoreModel) and model.scheduler_config:
        scheduler = DDPMScheduler.from_config(model.scheduler_config)
    elif isinstance(model.sde, DiscreteVPSDE):
        scheduler = DDPMScheduler(num_train_timesteps=model.sde.N, trained_betas=model.sde.discrete_betas().tolist(),
                                  prediction_type=to_diffusers[model.prediction], clip_sample=clip_sample)
    else:
        sde = model.sde
        scheduler = DDPMScheduler(
            num_train_timesteps=sde.N,
            beta_start=sde.beta_min / sde.N,
            beta_end=sde.beta_max / sde.N,
            beta_schedule="linear",
            prediction_type=to_diffusers[model.prediction],
            clip_sample=clip_sample,
        )
    with atomic_dir(directory) as tmp:
        DDPMPipeline(unet=model.net, scheduler=scheduler).save_pretrained(tmp, safe_serialization=True)
    return directory

