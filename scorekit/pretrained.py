"""diffusers models as score functions, and scorekit VP models as diffusers pipelines.

:func:`from_diffusers` reads a saved ``DDPMPipeline`` (or ``DDIMPipeline``) directory, a pipeline object
or a ``(unet, scheduler)`` pair as a :class:`~scorekit.score.ScoreModel` on the matching SDE:

- ``DDPMScheduler`` / ``DDIMScheduler`` with linear betas -> :class:`DDPMScoreModel` on a ``VPSDE`` with
  ``beta_min = beta_start N`` and ``beta_max = beta_end N`` (so ``sde.discrete_betas()`` are the
  scheduler's betas). The discrete model is adapted as score_sde's ``get_score_fn`` does for
  non-continuous VP models: the network sees ``t (N - 1)`` and its noise prediction is divided by the
  scheduler's own ``sqrt(1 - alphas_cumprod[k])`` at ``k = floor(t (N - 1))``.
- ``ScoreSdeVeScheduler`` -> a ``ScoreModel`` on a ``VESDE(sigma_min, sigma_max, N)`` whose network is
  fed ``sigma(t)`` and returns the score, exactly as ``ScoreSdeVePipeline`` uses it (diffusers' NCSN++
  UNet, ``time_embedding_type="fourier"``, embeds ``log sigma`` and divides its output by ``sigma``).

:func:`save_diffusers` goes the other way for VP models whose network is a ``UNet2DModel``.
Only safetensors weights are read; nothing is downloaded.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .checkpoint import atomic_dir, load_json
from .score import ScoreModel
from .sde import VESDE, VPSDE

__all__ = [
    "PREDICTION_TYPES",
    "VE_SCHEDULERS",
    "VP_SCHEDULERS",
    "DDPMScoreModel",
    "from_diffusers",
    "save_diffusers",
]

VP_SCHEDULERS = ("DDPMScheduler", "DDIMScheduler")
VE_SCHEDULERS = ("ScoreSdeVeScheduler",)
# diffusers' prediction_type -> ScoreModel's prediction
PREDICTION_TYPES = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}
SUPPORTED = (
    f"{' / '.join(VP_SCHEDULERS)} with beta_schedule='linear' (read as a VPSDE) and "
    f"{' / '.join(VE_SCHEDULERS)} (read as a VESDE)"
)
WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.safetensors.index.json")
PICKLED = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")
# t (N - 1) computed in float32 can land just below the integer step it stands for (e.g. 4.9999995
# for t = 5 / (N - 1)); this tolerance, in steps, keeps such round-off from truncating to step k - 1.
INDEX_TOLERANCE = 1e-3


class DDPMScoreModel(ScoreModel):
    """A discrete-time DDPM network read as the score of its continuous ``VPSDE``.

    ``score(x, t) = -eps(x, t (N - 1)) / sqrt(1 - alphas_cumprod[k])`` with ``k = floor(t (N - 1))``
    (score_sde's ``get_score_fn`` for discrete VP models); ``v`` and ``x0`` predictions use the same
    discrete ``(sqrt(alphas_cumprod[k]), sqrt(1 - alphas_cumprod[k]))`` in place of ``(alpha(t), sigma(t))``.
    A UNet with a learned (table) time embedding is given the integer step ``k`` itself.
    ``scheduler_config`` is kept so that :func:`save_diffusers` can write the model back unchanged.
    """

    def __init__(
        self,
        net: nn.Module,
        sde: VPSDE,
        alphas_cumprod: Tensor,
        prediction: str = "eps",
        scheduler_config: Mapping[str, Any] | None = None,
    ):
        super().__init__(net, sde, prediction=prediction, time_input="index")
        if alphas_cumprod.shape != (sde.N,):
            raise ValueError(
                f"alphas_cumprod has shape {tuple(alphas_cumprod.shape)}, expected ({sde.N},) for N={sde.N}"
            )
        # A plain attribute, not a buffer: model.to(dtype) must not round the schedule.
        self.alphas_cumprod = alphas_cumprod.detach().to("cpu", torch.float64)
        self.scheduler_config = dict(scheduler_config or {})

    def timestep(self, t: Tensor) -> Tensor:
        """The discrete step ``k = floor(t (N - 1))`` (``int64``, clamped to ``[0, N - 1]``)."""
        N = self.sde.N
        return torch.floor(t * (N - 1) + INDEX_TOLERANCE).long().clamp(0, N - 1)

    def coeffs(self, t: Tensor) -> tuple[Tensor, Tensor]:
        abar = self.alphas_cumprod.to(t.device)[self.timestep(t)]
        return abar.sqrt().to(t.dtype), (1 - abar).sqrt().to(t.dtype)

    def network_time(self, t: Tensor) -> Tensor:
        if getattr(getattr(self.net, "config", None), "time_embedding_type", None) == "learned":
            return self.timestep(t)
        return super().network_time(t)


# -- loading -----------------------------------------------------------------------------------------
def _vp_model(unet: nn.Module, scheduler: Any) -> DDPMScoreModel:
    cfg = scheduler.config
    name = type(scheduler).__name__
    if cfg.get("trained_betas") is not None:
        raise ValueError(
            f"{name} has trained_betas: only a linear beta schedule maps onto a VPSDE ({SUPPORTED})"
        )
    if cfg.get("beta_schedule", "linear") != "linear":
        raise ValueError(
            f"{name} has beta_schedule={cfg['beta_schedule']!r}, which has no VPSDE counterpart: "
            f"supported are {SUPPORTED}"
        )
    if cfg.get("rescale_betas_zero_snr", False):
        raise ValueError(
            f"{name} rescales betas to zero terminal SNR, which is not a linear schedule: supported are {SUPPORTED}"
        )
    kind = cfg.get("prediction_type", "epsilon")
    if kind not in PREDICTION_TYPES:
        raise ValueError(f"{name} has prediction_type={kind!r}; supported are {sorted(PREDICTION_TYPES)}")
    variance = cfg.get("variance_type", "fixed_small")
    if variance in ("learned", "learned_range"):
        raise ValueError(
            f"{name} has variance_type={variance!r}: models that also predict the variance are not supported"
        )
    N = int(cfg["num_train_timesteps"])
    sde = VPSDE(beta_min=cfg["beta_start"] * N, beta_max=cfg["beta_end"] * N, N=N)
    return DDPMScoreModel(unet, sde, scheduler.alphas_cumprod, PREDICTION_TYPES[kind], dict(cfg))


def _ve_model(unet: nn.Module, scheduler: Any) -> ScoreModel:
    cfg = scheduler.config
    sde = VESDE(sigma_min=cfg["sigma_min"], sigma_max=cfg["sigma_max"], N=int(cfg["num_train_timesteps"]))
    # ScoreSdeVePipeline feeds sigma(t) = sigma_min (sigma_max / sigma_min)^t and steps with the output as the score.
    return ScoreModel(unet, sde, prediction="score", time_input="sigma")


def _model_from_parts(unet: Any, scheduler: Any) -> ScoreModel:
    if not isinstance(unet, nn.Module):
        raise TypeError(
            f"expected the network to be a torch.nn.Module (a diffusers UNet2DModel), got {type(unet).__name__}"
        )
    name = type(scheduler).__name__
    if not hasattr(scheduler, "config") or name not in VP_SCHEDULERS + VE_SCHEDULERS:
        raise ValueError(f"scheduler {name} is not supported: supported are {SUPPORTED}")
    cfg = getattr(unet, "config", None)
    if cfg is not None and getattr(cfg, "out_channels", None) not in (None, cfg.in_channels):
        raise ValueError(
            f"the UNet has {cfg.out_channels} output channels for {cfg.in_channels} input channels: "
            "models that also predict the variance are not supported"
        )
    return _vp_model(unet, scheduler) if name in VP_SCHEDULERS else _ve_model(unet, scheduler)


def _check_weights(unet_dir: Path) -> None:
    if any((unet_dir / w).is_file() for w in WEIGHTS):
        return
    pickled = sorted(p.name for pattern in PICKLED for p in unet_dir.glob(pattern))
    if pickled:
        raise ValueError(
            f"{unet_dir} holds only pickled weights ({', '.join(pickled)}); scorekit loads safetensors only, "
            "since unpickling can run arbitrary code. Convert them where you trust the file: "
            "UNet2DModel.from_pretrained(dir).save_pretrained(dir, safe_serialization=True)"
        )
    raise ValueError(f"no UNet weights in {unet_dir}: expected {WEIGHTS[0]}")


def _load_dir(path: Path) -> tuple[nn.Module, Any]:
    import diffusers
    from diffusers import UNet2DModel

    expected = (
        "a diffusers pipeline directory (model_index.json, unet/, scheduler/) as written by save_pretrained"
    )
    if not path.exists():
        raise FileNotFoundError(f"no such directory: {path}; expected {expected}")
    if not path.is_dir():
        raise ValueError(f"{path} is a file; expected {expected}")
    if not (path / "model_index.json").is_file():
        raise ValueError(f"{path} has no model_index.json; expected {expected}")
    index = load_json(path / "model_index.json")
    entries = {key: index.get(key) if isinstance(index, dict) else None for key in ("unet", "scheduler")}
    for key, entry in entries.items():
        if not (isinstance(entry, list) and len(entry) == 2 and all(isinstance(e, str) for e in entry)):
            raise ValueError(
                f"{path / 'model_index.json'} has no valid {key!r} entry (got {entry!r}); expected {expected}"
            )
    if entries["unet"][1] != "UNet2DModel":
        raise ValueError(f"{path} holds a {entries['unet'][1]} network; scorekit reads UNet2DModel pipelines")
    scheduler_name = entries["scheduler"][1]
    if scheduler_name not in VP_SCHEDULERS + VE_SCHEDULERS:
        raise ValueError(
            f"{path} uses scheduler {scheduler_name}, which is not supported: supported are {SUPPORTED}"
        )
    _check_weights(path / "unet")
    try:
        unet, info = UNet2DModel.from_pretrained(
            path / "unet", use_safetensors=True, local_files_only=True, output_loading_info=True
        )
    except (OSError, ValueError, RuntimeError, KeyError) as e:
        raise ValueError(
            f"could not load the UNet from {path / 'unet'}: the files are corrupt or foreign ({e})"
        ) from e
    # diffusers only warns when weights are missing and leaves them randomly initialised: refuse instead.
    problems = {k: info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")}
    if any(problems.values()):
        summary = "; ".join(f"{k.replace('_', ' ')}: {v[:4]}" for k, v in problems.items() if v)
        raise ValueError(
            f"the UNet weights in {path / 'unet'} do not match its config.json ({summary}): foreign or corrupt files"
        )
    config_file = path / "scheduler" / "scheduler_config.json"
    config = load_json(config_file) if config_file.is_file() else None
    if not isinstance(config, dict):
        # a corrupt file is bad data, not a bad argument type
        raise ValueError(  # noqa: TRY004
            f"could not load the {scheduler_name} config: {config_file} is missing or not a JSON object"
        )
    try:
        scheduler = getattr(diffusers, scheduler_name).from_config(config)
    except (ValueError, TypeError, KeyError) as e:
        raise ValueError(f"could not build a {scheduler_name} from {config_file} ({e})") from e
    return unet, scheduler


def from_diffusers(
    source: str | os.PathLike | Any,
    scheduler: Any = None,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> ScoreModel:
    """A diffusers model as a scorekit :class:`~scorekit.score.ScoreModel` with ``.sde`` set.

    ``source`` is a pipeline directory (``DDPMPipeline``/``DDIMPipeline``/``ScoreSdeVePipeline``
    ``save_pretrained`` output, safetensors weights), a pipeline object with ``.unet`` and
    ``.scheduler``, a ``(unet, scheduler)`` pair, or a UNet with ``scheduler`` given separately.
    See the module docstring for how each scheduler maps onto an SDE; anything else is refused with
    an error naming what is supported.
    """
    if isinstance(source, (str, os.PathLike)):
        if scheduler is not None:
            raise ValueError(
                "pass either a pipeline directory or a (unet, scheduler) pair, not a directory and a scheduler"
            )
        unet, scheduler = _load_dir(Path(source))
    elif isinstance(source, (tuple, list)):
        if len(source) != 2 or scheduler is not None:
            raise ValueError(f"expected a (unet, scheduler) pair, got a sequence of {len(source)} items")
        unet, scheduler = source
    elif hasattr(source, "unet") and hasattr(source, "scheduler"):
        unet, scheduler = source.unet, source.scheduler
    elif scheduler is not None:
        unet = source
    else:
        raise TypeError(
            f"cannot read a {type(source).__name__}: pass a pipeline directory, a pipeline object, "
            "a (unet, scheduler) pair, or a UNet together with scheduler="
        )
    model = _model_from_parts(unet, scheduler)
    return model.to(device=device, dtype=dtype).eval()


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
    ``eps``, ``v`` or ``x0``. The scheduler is a ``DDPMScheduler`` with ``N = sde.N`` steps and linear
    betas from ``beta_start = beta_min / N`` to ``beta_end = beta_max / N`` (DDPM's discretization of
    the VPSDE, ``sde.discrete_betas()``); diffusers then uses ``alphas_cumprod[k]``, which approximates
    the continuous ``alpha(t_k)^2`` to ``O(1/N)``. ``clip_sample`` turns on diffusers' clipping of the
    predicted ``x0`` to ``[-1, 1]`` (off by default: scorekit models need not live in ``[-1, 1]``).
    A model loaded by :func:`from_diffusers` keeps its original scheduler settings. The directory is
    written to a temporary name and renamed; an existing non-empty one needs ``overwrite=True``.
    """
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    if not isinstance(model, ScoreModel):
        raise TypeError(f"save_diffusers takes a scorekit ScoreModel, got {type(model).__name__}")
    if type(model.sde) is not VPSDE:
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
    if isinstance(model, DDPMScoreModel) and model.scheduler_config:
        scheduler = DDPMScheduler.from_config(model.scheduler_config)
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
