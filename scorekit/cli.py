"""The ``scorekit`` command: ``scorekit train|sample|likelihood|distill|finetune|denoise|demo``.

Each subcommand lives in ``scorekit/commands/<name>.py`` with ``add_parser(subparsers)`` and
``run(args)``; a command module imports only the standard library at module level (its ``run`` imports
the library), so that ``scorekit --help`` starts fast, and ``scorekit SUB ...`` imports only SUB's module.
Options follow ``accelerate launch``'s spelling (``--mixed_precision``, ``--out_dir``; dashed forms are
accepted too), and every training command runs unchanged under
``accelerate launch --multi_gpu --num_processes N -m scorekit.cli train ...`` or ``torchrun``.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Iterable

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


def build_parser(commands: Iterable[str] | None = None) -> argparse.ArgumentParser:
    """The parser with the subcommands ``commands`` (default: all of :data:`COMMANDS`)."""
    parser = argparse.ArgumentParser(prog="scorekit", description="Score-based generative modeling through SDEs.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="command")
    for name in COMMANDS if commands is None else commands:
        module_name = COMMANDS[name]
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
    argv = sys.argv[1:] if argv is None else list(argv)
    # `scorekit SUB ...` needs SUB's parser only: the other command modules are not imported
    args = build_parser(argv[:1] if argv[:1] and argv[0] in COMMANDS else None).parse_args(argv)
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
