"""Command-line flags read from a config dataclass, so a default lives in one place (the field)
and `--help` shows it once: add_config_flags(parser, Config, ...) adds them, and
Config(**given(args, names)) builds the config from the flags the user gave.

One `--kebab-case` flag per field (or `rename`), typed from the annotation (`int | None` as int,
`tuple[str, ...]` comma-separated), help and choices from the field's metadata or the dicts
passed; a bool gets store_true (default False) or --x/--no-x (default True). The parser default
is SUPPRESS, so a stage tells "not given" from "given the default" (a resumed run keeps its own
values for the flags not given).
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing


def _comma_list(text: str) -> tuple[str, ...]:
    """ "a, b,,c" -> ("a", "b", "c") """
    return tuple(t.strip() for t in text.split(",") if t.strip())


def _flag_type(hint, where: str):
    """A field's type hint -> bool, int, float, str, or _comma_list; Optional[X] counts as X."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) == 1:
            return _flag_type(args[0], where)
    if hint in (bool, int, float, str):
        return hint
    if typing.get_origin(hint) in (list, tuple) and typing.get_args(hint) in ((str,), (str, ...)):
        return _comma_list
    raise TypeError(f"{where}: a field of type {hint} has no command-line flag; skip it or give parse={{name: function}}")


def show_default(value) -> str:
    """How --help writes a default: tuples as "a,b", odd strings ("\\n", "") as their repr."""
    if isinstance(value, (tuple, list)):
        return ",".join(map(str, value))
    if isinstance(value, str) and (not value or not value.isprintable() or value != value.strip()):
        return repr(value)
    return str(value)


def _field_default(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    raise TypeError(f"field {f.name} has no default: a flag needs one")


def add_config_flags(parser: argparse.ArgumentParser, config_cls, *, skip=(), rename: dict | None = None,
                     help: dict | None = None, choices: dict | None = None, parse: dict | None = None,
                     defaults: dict | None = None) -> list[str]:
    """Add one flag per field of the dataclass `config_cls` (except `skip`); returns the field names.

    `defaults[name]` is the default a stage applies instead of the field's own (SFT's lr, DPO's
    max_steps): --help shows that one, so each flag still states the one default in force.
    The flag's dest is the field name, so `given(args, names)` maps straight back to the config.
    `parse[name]` replaces the parsing function of a field (e.g. `str` for a duration the stage converts).
    """
    rename, help, choices, parse, defaults = rename or {}, help or {}, choices or {}, parse or {}, defaults or {}
    hints = typing.get_type_hints(config_cls)
    names = []
    for f in dataclasses.fields(config_cls):
        if f.name in skip:
            continue
        default = defaults[f.name] if f.name in defaults else _field_default(f)
        flag = rename.get(f.name, f.name).replace("_", "-")
        text = f.metadata.get("help") or help.get(f.name, "")
        kwargs = {"dest": f.name, "default": argparse.SUPPRESS,
                  "help": f"{text} (default: {show_default(default)})".strip().replace("%", "%%")}
        kind = parse.get(f.name) or _flag_type(hints[f.name], f"{config_cls.__name__}.{f.name}")
        if kind is bool:
            action = "store_true" if default is False else argparse.BooleanOptionalAction
            parser.add_argument(f"--{flag}", action=action, **kwargs)
        else:
            field_choices = f.metadata.get("choices") or choices.get(f.name)
            metavar = None if field_choices else ("A,B,..." if kind is _comma_list else flag.replace("-", "_").upper())
            parser.add_argument(f"--{flag}", type=kind, choices=field_choices, metavar=metavar, **kwargs)
        names.append(f.name)
    return names


def given(args: argparse.Namespace, names) -> dict:
    """{field: value} for the flags the user gave among `names` (a list, or a dataclass's fields)."""
    if dataclasses.is_dataclass(names):
        names = [f.name for f in dataclasses.fields(names)]
    return {name: getattr(args, name) for name in names if hasattr(args, name)}
