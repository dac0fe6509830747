"""YAML configs mapped onto dataclasses, and the builders that turn a run config into data, SDE and model.

``load_config(path, RunConfig)`` reads YAML (or a dict) into nested dataclasses. Unknown keys and
values of the wrong type are errors that name the key and list what is valid; malformed YAML is an
error that names the file and line. Command-line overrides use dotted keys: ``training.steps=500``.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch
import yaml
from torch import Tensor

from .data import SPLITS, TOY_SETS, GaussianMixture, imbalanced_mixture, load_digits, make_imbalanced, toy_2d
from .losses import make_dsm_loss
from .nets import MLP, make_unet
from .score import ScoreModel
from .sde import SDE, make_sde
from .training import TrainConfig, Trainer, latest_checkpoint, load_state_checked, load_weights
from .validate import fraction, non_negative, non_negative_int, positive, positive_int

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
        raise ValueError(errors[0] if len(errors) == 1 else f"{where}: {value!r} matches none of {tp}")
    if _is_dataclass_type(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ValueError(f"{where}: expected a mapping for section {tp.__name__}, got {type(value).__name__}")
        return from_dict(tp, value, where)
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{where}: expected a list, got {value!r}")
        args = typing.get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise ValueError(f"{where}: expected {len(args)} values, got {len(value)}")
            return tuple(_convert(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        inner = args[0] if args else Any
        out = [_convert(v, inner, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ValueError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{where}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ValueError(f"{where}: expected a string, got {value!r}")
        return value
    return value


def from_dict(cls: type[T], data: dict, where: str = "") -> T:
    """Build dataclass ``cls`` from a (nested) mapping; unknown keys raise an error listing the valid ones."""
    if not isinstance(data, dict):
        raise ValueError(f"{where or cls.__name__}: expected a mapping, got {type(data).__name__}")
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


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader, with floats read as YAML 1.2 reads them (``1e-3``, ``1.0e6``: PyYAML's YAML 1.1
    takes them for strings) and duplicate keys refused (PyYAML keeps the last)."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=deep)
            try:
                first = seen.setdefault(key, key_node.start_mark)
            except TypeError:  # an unhashable key: the base class says so
                continue
            if first is not key_node.start_mark:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (first given at line {first.line + 1}); give each key once",
                    key_node.start_mark)
        return super().construct_mapping(node, deep)


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"""),
    list("-+0123456789."),
)


def _parse_yaml(text: str, source: str):
    """``text`` parsed by :class:`_Loader`; malformed YAML is a ``ValueError`` naming ``source`` and the line."""
    try:
        return yaml.load(text, Loader=_Loader)  # noqa: S506 (a SafeLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise ValueError(f"{source}: malformed YAML{where}: {getattr(e, 'problem', None) or e}") from e


def _read_yaml(path: Path) -> dict:
    if path.is_dir():
        raise IsADirectoryError(f"the config {path} is a folder; pass a YAML file (see configs/)")
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    try:
        text = path.read_text()
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not a text (UTF-8) YAML file: {e}") from e
    data = _parse_yaml(text, str(path))
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
        node[parts[-1]] = _parse_yaml(raw, f"override {item!r}")
    return data


def load_config(source: str | os.PathLike | dict, cls: type[T], overrides: list[str] | tuple[str, ...] = ()) -> T:
    """Load a YAML file (or a dict) into dataclass ``cls``, after applying dotted ``overrides``."""
    data = dict(source) if isinstance(source, dict) else _read_yaml(Path(source))
    apply_overrides(data, overrides)
    return from_dict(cls, data)


# -- the run config --------------------------------------------------------------------------------
def _one_of(value: Any, valid, what: str) -> None:
    """``value`` must be one of the names ``valid`` (a tuple or a registry dict)."""
    if value not in valid:
        raise ValueError(f"unknown {what} {value!r}; valid names are {list(valid)}")


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

    def __post_init__(self):
        from .score import PREDICTIONS, TIME_INPUTS

        _one_of(self.net, NETS, "net")
        if self.prediction is not None:
            _one_of(self.prediction, PREDICTIONS, "prediction")
        if self.time_input is not None:
            _one_of(self.time_input, TIME_INPUTS, "time_input")


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

    def __post_init__(self):
        _one_of(self.name, DATASETS, "data set")
        _one_of(self.split, SPLITS, "split")
        if self.split == "all" and self.name != "digits":
            raise ValueError(f"data.split 'all' is for digits; the synthetic set {self.name!r} has the splits "
                             "'train' and 'test' (independent draws)")
        self.n = positive_int(self.n, "n", "number of points of a synthetic set")
        if self.rare_share is not None:
            fraction(self.rare_share, "rare_share", "the rare class's share, e.g. 0.05", closed=True)


@dataclass
class LossConfig:
    """``loss:`` section: options of :func:`scorekit.losses.dsm_loss`."""

    reduce: str = "mean"
    likelihood_weighting: bool = False
    eps: float = 1e-5

    def __post_init__(self):
        from .losses import REDUCTIONS

        _one_of(self.reduce, REDUCTIONS, "reduce")
        self.eps = fraction(self.eps, "eps", "the smallest training time, in [0, T) = [0, 1)")


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

    def __post_init__(self):
        from samplers import CORRECTORS, ODE_METHODS, PREDICTORS

        from .sampling import SAMPLERS

        _one_of(self.sampler, SAMPLERS, "sampler")
        self.n = positive_int(self.n, "n", "number of samples")
        self.batch_size = positive_int(self.batch_size, "batch_size")
        if self.steps is not None:
            self.steps = positive_int(self.steps, "steps", "number of sampler steps")
        for name, registry in (("predictor", PREDICTORS), ("corrector", CORRECTORS)):
            value = getattr(self, name)
            if isinstance(value, str) and value.lower() == "none":
                setattr(self, name, None)
            elif value is not None:
                _one_of(value, (*registry, "none"), name)
        self.snr = non_negative(self.snr, "snr", "the corrector's signal-to-noise ratio, e.g. 0.16")
        self.n_corrector_steps = non_negative_int(self.n_corrector_steps, "n_corrector_steps")
        _one_of(self.method, ODE_METHODS, "ODE method")
        self.rtol = positive(self.rtol, "rtol", "relative tolerance of the adaptive ODE solver")
        self.atol = positive(self.atol, "atol", "absolute tolerance of the adaptive ODE solver")
        self.eps = positive(self.eps, "eps", "the last time of the sampler, 1e-3 VP, 1e-5 VE")


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


def _build_net(factory, *args, **options):
    """``factory(*args, **options)``; a refused option is named as the config key it came from."""
    try:
        return factory(*args, **options)
    except ValueError as e:
        raise ValueError(f"model.options: {e}") from e


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
    fixed = ("sample_size", "channels") if cfg.net == "unet" else ("data_shape",)  # set from the data
    valid = sorted(set(inspect.signature(NETS[cfg.net]).parameters) - set(fixed))
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ValueError(f"unknown model.options {unknown} for net {cfg.net!r}; valid options are {valid}"
                         + (f" ({', '.join(fixed)}: taken from the data)" if set(unknown) & set(fixed) else ""))
    log_sigma = sde.network_time == "log_sigma"  # a continuous time input: Fourier features
    if cfg.net == "unet":
        if len(data_shape) != 3 or data_shape[1] != data_shape[2]:
            raise ValueError(f"the unet needs square images (C, H, H), got data of shape {data_shape}")
        options.setdefault("time_embedding", "fourier" if log_sigma else "positional")
        net = _build_net(make_unet, sample_size=data_shape[1], channels=data_shape[0], **options)
        fourier = options["time_embedding"] == "fourier"
        prediction = cfg.prediction or ("score" if fourier else "eps")
        time_input = cfg.time_input or ("sigma" if fourier else "index")
    else:
        options.setdefault("embedding", "fourier" if log_sigma else "sinusoidal")
        net = _build_net(MLP, data_shape, **options)
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
