"""YAML configs mapped onto dataclasses, and the builders that turn a run config into data, SDE and model.

``load_config(path, RunConfig)`` reads YAML (or a dict) into nested dataclasses. Unknown keys and
values of the wrong type are errors that name the key and list what is valid; malformed YAML is an
error that names the file and line. Command-line overrides use dotted keys: ``training.steps=500``.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch
import yaml
from torch import Tensor

from .data import TOY_SETS, GaussianMixture, imbalanced_mixture, load_digits, make_imbalanced, toy_2d
from .losses import make_dsm_loss
from .nets import MLP, make_unet
from .score import ScoreModel
from .sde import SDE, make_sde
from .training import TrainConfig, Trainer, latest_checkpoint, load_state_checked, load_weights

__all__ = [
    "SDEConfig",
    "ModelConfig",
    "DataConfig",
    "LossConfig",
    "SampleConfig",
    "RunConfig",
    "load_config",
    "from_dict",
    "to_dict",
    "apply_overrides",
    "build_data",
    "build_score_model",
    "load_score_model",
    "build_trainer",
    "NETS",
    "DATASETS",
]

T = TypeVar("T")


# -- generic YAML <-> dataclass mapping ------------------------------------------------------------
def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _convert(value: Any, tp: Any, where: str) -> Any:
    """Check/convert ``value`` against the annotation ``tp`` (dataclasses, Optional, tuple, list, dict, scalars)."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, where)
            except (TypeError, ValueError) as e:
                errors.append(str(e))
        raise TypeError(errors[0] if len(errors) == 1 else f"{where}: {value!r} matches none of {tp}")
    if _is_dataclass_type(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise TypeError(f"{where}: expected a mapping for section {tp.__name__}, got {type(value).__name__}")
        return from_dict(tp, value, where)
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise TypeError(f"{where}: expected a list, got {value!r}")
        args = typing.get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise TypeError(f"{where}: expected {len(args)} values, got {len(value)}")
            return tuple(_convert(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        inner = args[0] if args else Any
        out = [_convert(v, inner, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise TypeError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise TypeError(f"{where}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise TypeError(f"{where}: expected a string, got {value!r}")
        return value
    return value


def from_dict(cls: type[T], data: dict, where: str = "") -> T:
    """Build dataclass ``cls`` from a (nested) mapping; unknown keys raise an error listing the valid ones."""
    if not isinstance(data, dict):
        raise TypeError(f"{where or cls.__name__}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        section = f"section '{where}'" if where else f"{cls.__name__}"
        raise ValueError(f"unknown key(s) {unknown} in {section}; valid keys are {sorted(fields)}")
    kwargs = {k: _convert(v, hints[k], f"{where}.{k}" if where else k) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise type(e)(f"{where or cls.__name__}: {e}") from e


def to_dict(obj: Any) -> dict:
    """A dataclass as plain nested dicts/lists (tuples become lists), ready for YAML/JSON."""
    def plain(v):
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        return v

    return plain(dataclasses.asdict(obj))


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise ValueError(f"{path}: malformed YAML{where}: {getattr(e, 'problem', e)}") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a YAML mapping of sections at the top level, got {type(data).__name__}")
    return data


def apply_overrides(data: dict, overrides: list[str] | tuple[str, ...]) -> dict:
    """Apply ``key.sub=value`` overrides (values parsed as YAML scalars) to a nested dict, in place."""
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like section.key=value (e.g. training.steps=500)")
        key, raw = item.split("=", 1)
        node = data
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {item!r}: {p!r} is not a section")
        node[parts[-1]] = yaml.safe_load(raw)
    return data


def load_config(source: str | os.PathLike | dict, cls: type[T], overrides: list[str] | tuple[str, ...] = ()) -> T:
    """Load a YAML file (or a dict) into dataclass ``cls``, after applying dotted ``overrides``."""
    data = dict(source) if isinstance(source, dict) else _read_yaml(Path(source))
    apply_overrides(data, overrides)
    return from_dict(cls, data)


# -- the run config --------------------------------------------------------------------------------
@dataclass
class SDEConfig:
    """``sde:`` section. Only the parameters of the chosen SDE are used."""

    name: str = "vp"
    beta_min: float = 0.1
    beta_max: float = 20.0
    sigma_min: float = 0.01
    sigma_max: float = 50.0
    N: int = 1000

    def build(self) -> SDE:
        if self.name.lower() == "ve":
            return make_sde("ve", sigma_min=self.sigma_min, sigma_max=self.sigma_max, N=self.N)
        return make_sde(self.name, beta_min=self.beta_min, beta_max=self.beta_max, N=self.N)


@dataclass
class ModelConfig:
    """``model:`` section: the network (``mlp`` or ``unet``), its options, and how it reads as a score."""

    net: str = "unet"
    prediction: str | None = None
    time_input: str | None = None
    options: dict = field(default_factory=dict)


@dataclass
class DataConfig:
    """``data:`` section: ``digits``, ``mixture`` (the imbalanced 2-D test mixture) or a toy 2-D set."""

    name: str = "digits"
    split: str = "train"
    classes: list[int] | None = None
    rare_class: int | None = None
    rare_share: float | None = None
    n: int = 20000
    seed: int = 0


@dataclass
class LossConfig:
    """``loss:`` section: options of :func:`scorekit.losses.dsm_loss`."""

    reduce: str = "mean"
    likelihood_weighting: bool = False
    eps: float = 1e-5


@dataclass
class SampleConfig:
    """``sampling:`` section: which sampler and its settings (see ``samplers``)."""

    sampler: str = "pc"
    n: int = 64
    batch_size: int = 256
    steps: int | None = None
    predictor: str | None = "reverse_diffusion"
    corrector: str | None = "langevin"
    snr: float = 0.16
    n_corrector_steps: int = 1
    method: str = "dopri5"
    rtol: float = 1e-5
    atol: float = 1e-5
    eps: float = 1e-3
    seed: int = 0
    #: the noise-free last step from eps to 0; None: each sampler's default (PC yes, ODE no)
    denoise: bool | None = None


@dataclass
class RunConfig:
    """A whole training + sampling run (``configs/*.yaml``)."""

    sde: SDEConfig = field(default_factory=SDEConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    training: TrainConfig = field(default_factory=TrainConfig)
    sampling: SampleConfig = field(default_factory=SampleConfig)
    out_dir: str = "outputs/run"


# -- builders --------------------------------------------------------------------------------------
DATASETS = ("digits", "mixture", *TOY_SETS)


def build_data(cfg: DataConfig) -> tuple[Tensor, Tensor | None]:
    """``(x, labels)`` for the data section (labels ``None`` for unlabelled toy sets)."""
    if cfg.name == "digits":
        x, y = load_digits(cfg.split, classes=cfg.classes, seed=cfg.seed)
        if cfg.rare_class is not None:
            if cfg.rare_share is None:
                raise ValueError("data.rare_class needs data.rare_share (the rare class's share, e.g. 0.05)")
            x, y = make_imbalanced(x, y, cfg.rare_class, cfg.rare_share, seed=cfg.seed)
        return x, y
    # synthetic sets: the test split is an independent draw
    seed = cfg.seed + (1 if cfg.split == "test" else 0)
    if cfg.name == "mixture":
        gm: GaussianMixture = imbalanced_mixture()
        x, y = gm.sample(cfg.n, torch.Generator().manual_seed(seed), return_labels=True)
        return x, y
    if cfg.name in TOY_SETS:
        return toy_2d(cfg.name, cfg.n, seed=seed), None
    raise ValueError(f"unknown data set {cfg.name!r}; valid names are {list(DATASETS)}")


NETS = {"mlp": MLP, "unet": make_unet}


def build_score_model(cfg: ModelConfig, sde: SDE, data_shape: tuple[int, ...]) -> ScoreModel:
    """The network of ``cfg`` for per-sample shape ``data_shape``, wrapped as a :class:`ScoreModel`.

    Defaults follow the reference conventions (the SDE's ``network_time``): VP/sub-VP networks predict
    noise from the step index; a VE UNet uses diffusers' NCSN++ convention (Fourier features of
    ``log sigma``, output divided by ``sigma``: a score); a VE MLP predicts noise from Fourier features of
    ``log sigma``.
    """
    if cfg.net not in NETS:
        raise ValueError(f"unknown net {cfg.net!r}; valid names are {sorted(NETS)}")
    options = dict(cfg.options)
    log_sigma = sde.network_time == "log_sigma"  # a continuous time input: Fourier features
    if cfg.net == "unet":
        if len(data_shape) != 3 or data_shape[1] != data_shape[2]:
            raise ValueError(f"the unet needs square images (C, H, H), got data of shape {data_shape}")
        options.setdefault("time_embedding", "fourier" if log_sigma else "positional")
        net = make_unet(sample_size=data_shape[1], channels=data_shape[0], **options)
        fourier = options["time_embedding"] == "fourier"
        prediction = cfg.prediction or ("score" if fourier else "eps")
        time_input = cfg.time_input or ("sigma" if fourier else "index")
    else:
        options.setdefault("embedding", "fourier" if log_sigma else "sinusoidal")
        net = MLP(data_shape, **options)
        prediction = cfg.prediction or "eps"
        time_input = cfg.time_input
    return ScoreModel(net, sde, prediction=prediction, time_input=time_input, data_shape=data_shape)


def load_score_model(path: str | os.PathLike, ema: bool = True, device: str | torch.device = "cpu"
                     ) -> tuple[ScoreModel, RunConfig]:
    """Rebuild the score model of a training run (``scorekit train`` output or a checkpoint directory)
    with its EMA weights (or the raw weights with ``ema=False``)."""
    weights, state = load_weights(path, ema=ema)
    ckpt = latest_checkpoint(path)
    meta = state.get("meta", {})
    if not isinstance(meta, dict) or "run_config" not in meta or "data_shape" not in meta:
        raise ValueError(f"{path}: this checkpoint does not record a run config; it was not written by `scorekit train`")
    try:
        run = from_dict(RunConfig, meta["run_config"])
        data_shape = tuple(meta["data_shape"])
    except (TypeError, ValueError) as e:
        raise ValueError(f"{ckpt / 'state.json'}: meta.run_config / meta.data_shape is malformed ({e}); "
                         "the checkpoint was edited or not written by `scorekit train`") from e
    model = build_score_model(run.model, run.sde.build(), data_shape)
    load_state_checked(model, weights, ckpt / ("ema.safetensors" if ema else "model.safetensors"))
    return model.to(device).eval().requires_grad_(False), run


def build_trainer(cfg: RunConfig, **trainer_kwargs) -> Trainer:
    """The :class:`~scorekit.training.Trainer` of a run config: data, SDE, score model and DSM loss, with the
    config stored in its checkpoints (so that :func:`load_score_model` rebuilds the model).

    ``trainer_kwargs`` (``callbacks``, ``accelerator``, ...) go to the Trainer.
    """
    x, _ = build_data(cfg.data)
    sde = cfg.sde.build()
    torch.manual_seed(cfg.training.seed)
    model = build_score_model(cfg.model, sde, tuple(x.shape[1:]))
    loss = make_dsm_loss(sde, reduce=cfg.loss.reduce, likelihood_weighting=cfg.loss.likelihood_weighting, eps=cfg.loss.eps)
    meta = {"run_config": to_dict(cfg), "data_shape": list(x.shape[1:])}
    return Trainer(model, loss, x, cfg.training, out_dir=cfg.out_dir, meta=meta, **trainer_kwargs)
