"""The `flashcupy` command line (also `python -m flashcupy`).

Each subcommand is a module with two functions: add_arguments(parser) declares its options and
run(args) -> int does the work. Adding one is a line in COMMANDS; only the module of the subcommand
being run is imported. A subcommand reports options that cannot work by raising CommandError; main
prints it and returns exit status 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help)
COMMANDS = {
    "train": ("flashcupy.train", "train a byte-level GPT on real text with flashcupy attention"),
    "bench": ("flashcupy.bench", "benchmark flashcupy against the attention implementations present"),
    "fuzz": ("flashcupy.fuzz", "check random attention problems against the float64 oracle (GPU or CPU)"),
}


class CommandError(Exception):
    """A subcommand's options cannot work together (the message says which and why)."""


class _DefaultsHelp(argparse.ArgumentDefaultsHelpFormatter):
    """Appends "(default: X)" to an option's help, except where X is None (the option's real default
    depends on other options or the device, and its help text says it) or False (a flag)."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def build_parser(argv) -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="flashcupy", description="Exact FlashAttention on CuPy, "
                                     "and a small autodiff tape to train with it.")
    parser.add_argument("--version", action="version", version=f"flashcupy {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    chosen = next((a for a in argv if not a.startswith("-")), None)
    for name, (module_name, help_line) in COMMANDS.items():
        if name != chosen:
            sub.add_parser(name, help=help_line)
            continue
        module = importlib.import_module(module_name)
        p = sub.add_parser(name, help=help_line, description=(module.__doc__ or help_line).split("\n\n")[0],
                           formatter_class=_DefaultsHelp)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser(argv).parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except CommandError as e:
        print(f"flashcupy {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
