"""Subcommands of the ``scorekit`` CLI, one module each (``add_parser(subparsers)``, ``run(args)``)."""

from __future__ import annotations

import argparse

__all__ = ["add_config_args", "config_overrides", "load_run_config", "check_device"]


def add_config_args(p: argparse.ArgumentParser, default_config: str | None = None) -> None:
    """``--config``, ``--out_dir``, ``--mixed_precision``, ``--seed`` and ``section.key=value`` overrides (anywhere
    among the options: the CLI's subcommand parsers are :class:`~scorekit.cli.IntermixedParser`)."""
    p.add_argument("--config", "--config_file", "--config-file", dest="config", default=default_config,
                   required=default_config is None, help="YAML run config (see configs/)")
    p.add_argument("--out_dir", "--out-dir", dest="out_dir", default=None, help="output directory (overrides out_dir)")
    p.add_argument("--mixed_precision", "--mixed-precision", dest="mixed_precision", default=None,
                   choices=["auto", "no", "fp16", "bf16"], help="as accelerate launch's --mixed_precision")
    p.add_argument("--seed", type=int, default=None, help="overrides training.seed")
    p.add_argument("overrides", nargs="*", metavar="section.key=value",
                   help="config overrides, anywhere on the line, e.g. training.steps=500 sampling.n=16")


def config_overrides(args: argparse.Namespace, flags: dict[str, str]) -> list[str]:
    """The trailing ``section.key=value`` overrides plus ``key=value`` for each given flag.

    ``flags`` maps an attribute of ``args`` to the dotted config key it overrides; flags left at
    ``None`` are skipped, so the config's own value stands.
    """
    overrides = list(args.overrides)
    for attr, key in flags.items():
        value = getattr(args, attr)
        if value is not None:
            overrides.append(f"{key}={value}")
    return overrides


def load_run_config(args: argparse.Namespace, cls: type | None = None, **flags: str):
    """The run config (``cls``, default :class:`~scorekit.config.RunConfig`) named by ``args.config`` with the
    command-line overrides applied: those of :func:`add_config_args`, plus ``flags`` (attribute -> dotted key)."""
    from ..config import RunConfig, load_config

    flags = {"out_dir": "out_dir", "mixed_precision": "training.mixed_precision", "seed": "training.seed", **flags}
    return load_config(args.config, cls or RunConfig, config_overrides(args, flags))


def check_device(device: str | None) -> str | None:
    """``--device`` if torch knows it and this machine has it; else a ``ValueError`` naming the flag."""
    if device is None:
        return None
    import torch

    try:
        parsed = torch.device(device)
    except RuntimeError:
        raise ValueError(f"--device {device!r} is not a device name; use cpu, cuda, cuda:1, mps ...") from None
    if parsed.type == "cuda" and (not torch.cuda.is_available() or (parsed.index or 0) >= torch.cuda.device_count()):
        raise ValueError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s) "
                         f"available to torch {torch.__version__}; use --device cpu or leave --device out")
    return device
