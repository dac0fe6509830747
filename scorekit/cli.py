"""The ``scorekit`` command: ``scorekit train|sample|likelihood|distill|finetune|denoise|demo``.

Each subcommand lives in ``scorekit/commands/<name>.py`` with ``add_parser(subparsers)`` and
``run(args)``. Options follow ``accelerate launch``'s spelling (``--mixed_precision``, ``--out_dir``;
dashed forms are accepted too), and every training command runs unchanged under
``accelerate launch --multi_gpu --num_processes N -m scorekit.cli train ...`` or ``torchrun``.
"""

from __future__ import annotations

import argparse
import importlib
import sys

__all__ = ["COMMANDS", "build_parser", "main"]

COMMANDS = {
    "train": "scorekit.commands.train",
    "sample": "scorekit.commands.sample",
    "likelihood": "scorekit.commands.likelihood",
    "distill": "scorekit.commands.distill",
    "finetune": "scorekit.commands.finetune",
    "denoise": "scorekit.commands.denoise",
    "demo": "scorekit.commands.demo",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="scorekit", description="Score-based generative modeling through SDEs.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="command")
    for module_name in COMMANDS.values():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            if e.name == module_name:  # a subcommand that is not part of this installation
                continue
            raise
        module.add_parser(sub).set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``scorekit`` console script; returns the process exit code."""
    args = build_parser().parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except (ValueError, TypeError, FileNotFoundError, FloatingPointError) as e:
        print(f"scorekit {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"scorekit {args.command}: interrupted; completed checkpoints are kept", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
