"""The `lmforge` command: one table of stages, each a thin module that parses flags and calls
the library.

Every module in COMMANDS defines `register(subparsers)`, which adds its subcommand(s) with
`add_command`. A subcommand's `func(args)` returns an exit code (or None for 0). Errors a user can
cause are raised as `UserError` (or ValueError/FileNotFoundError from the library) and printed as
one line, without a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import warnings

# stage modules, in the order `lmforge --help` lists them
COMMANDS = [
    "lmforge.cli.demo",  # demo
    "lmforge.cli.eval",  # eval
    "lmforge.cli.world",  # world generate|stats
    "lmforge.cli.tokenizer",  # tokenizer train|encode|decode|show
    "lmforge.cli.data",  # data prepare
    "lmforge.cli.model",  # params
    "lmforge.cli.train",  # pretrain
    "lmforge.cli.infer",  # sample, generate, chat, quantize
    "lmforge.cli.alignment",  # sft, lora merge (reward, dpo, ppo, grpo)
    "lmforge.cli.prompting",  # ask, rag index|search|ask
    "lmforge.cli.distill",  # distill
    "lmforge.cli.scale",  # scale
    "lmforge.cli.serve",  # serve
    "lmforge.cli.export",  # export hf|gguf
]


class UserError(Exception):
    """An error the user caused and can fix; printed as one line."""


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows each flag's default once: argparse's own, or the config field's (lmforge.cli.config_flags)."""

    def _get_help_string(self, action):
        # a required flag has no default to show
        return action.help or "" if action.required else super()._get_help_string(action)


def add_command(subparsers, name: str, help: str, func=None, description: str | None = None):
    """Add one subcommand whose flags show their defaults in --help."""
    parser = subparsers.add_parser(name, help=help, description=description or help, formatter_class=HelpFormatter)
    if func is not None:
        parser.set_defaults(func=func)
    return parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lmforge",
        description="lmforge: the whole life of an LLM in one small codebase.",
        formatter_class=HelpFormatter,
    )
    subparsers = parser.add_subparsers(title="stages", metavar="<stage>")
    for module_name in COMMANDS:
        importlib.import_module(module_name).register(subparsers)
    return parser


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    return f"lmforge: warning: {message}\n"


def main(argv: list[str] | None = None) -> int:
    warnings.formatwarning = _one_line_warning  # library warnings read as one line, not a source dump
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "func"):
        # a stage with sub-stages (e.g. `lmforge tokenizer`) given without one
        (getattr(args, "_parser", None) or parser).print_help()
        return 2
    try:
        return args.func(args) or 0
    except (UserError, ValueError, FileNotFoundError, NotADirectoryError, PermissionError) as e:
        if isinstance(e, (FileNotFoundError, PermissionError)) and e.filename:
            msg = f"{e.strerror}: {e.filename}"
        else:
            msg = str(e)
        print(f"lmforge: error: {msg}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nlmforge: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # output piped into `head` and closed early: not an error; silence the flush at exit
        sys.stdout = open(os.devnull, "w")
        return 0
