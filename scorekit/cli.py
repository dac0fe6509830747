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


#: the errors that bad input or the user's environment cause (files, permissions, numbers, disk space); they are
#: printed as ``scorekit CMD: error: ...``, others (bugs) keep their traceback
USER_ERRORS = (ValueError, OSError, FloatingPointError)


class IntermixedParser(argparse.ArgumentParser):
    """A subcommand's parser that takes positionals (the ``section.key=value`` overrides, the input files)
    anywhere among the options, as :meth:`~argparse.ArgumentParser.parse_intermixed_args` does."""

    _intermixed = False

    def parse_known_args(self, args=None, namespace=None):
        if self._intermixed:  # the two passes of parse_known_intermixed_args
            return super().parse_known_args(args, namespace)
        self._intermixed = True
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._intermixed = False


def build_parser(commands: Iterable[str] | None = None) -> argparse.ArgumentParser:
    """The parser with the subcommands ``commands`` (default: all of :data:`COMMANDS`)."""
    parser = argparse.ArgumentParser(prog="scorekit", description="Score-based generative modeling through SDEs.")
    parser.add_argument("--debug", action="store_true",
                        help="show the full traceback of an error instead of a one-line message")
    sub = parser.add_subparsers(dest="command", required=True, metavar="command", parser_class=IntermixedParser)
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
    named = [a for a in argv if not a.startswith("-")][:1]
    args = build_parser(named if named and named[0] in COMMANDS else None).parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except USER_ERRORS as e:
        if args.debug:
            raise
        print(f"scorekit {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"scorekit {args.command}: interrupted; completed checkpoints are kept", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
