"""Command configs as dataclasses; CLI flags are generated from them, not written twice.

Each field carries its help text in `metadata`. `add_arguments` turns a dataclass into argparse
flags (`max_length` -> `--max-length`, bools -> `--x/--no-x`, lists -> comma-separated values),
and `from_args` merges an optional `--config run.yaml|json` file under the flags actually given.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import types
import typing
from typing import Any

from .errors import UserError

_MISSING = dataclasses.MISSING

# shared by every command that packs (fastdpo.packing.Layout.row_budget)
PACKED_ROW_HELP = ("cap on a packed row's tokens (default: a whole micro-batch per row with FlexAttention, "
                   "the longest sequence's length with SDPA/eager's dense masks)")


def opt(default=_MISSING, help: str = "", *, choices=None, metavar=None, required: bool = False,
        cli: bool = True, default_factory=_MISSING):
    """A config field: default, one-line help, optional choices. `required` is checked after merging."""
    meta = {"help": help, "choices": choices, "metavar": metavar, "required": required, "cli": cli}
    if default_factory is not _MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def _unwrap_optional(tp):
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
        return tp, True
    return tp, False


def _scalar_parser(tp, name):
    def parse(text: str):
        if text.lower() in ("none", "null") and tp is not str:
            return None
        try:
            return tp(text)
        except (TypeError, ValueError):
            raise argparse.ArgumentTypeError(f"{flag_name(name)} expects {tp.__name__}, got {text!r}") from None

    return parse


def _list_parser(item_tp, name):
    scalar = _scalar_parser(item_tp, name)

    def parse(text: str):
        return [scalar(x.strip()) for x in text.split(",") if x.strip()]

    return parse


def field_kind(cls, f: dataclasses.Field):
    """(base type, is_list, is_optional) of a dataclass field."""
    hints = typing.get_type_hints(cls)
    tp, optional = _unwrap_optional(hints[f.name])
    if typing.get_origin(tp) in (list, tuple):
        return typing.get_args(tp)[0], True, optional
    return tp, False, optional


def add_arguments(parser: argparse.ArgumentParser, cls, groups: dict[str, str] | None = None) -> None:
    """Add one flag per dataclass field. Defaults are suppressed so we can tell what was given."""
    arg_groups = {}
    for f in dataclasses.fields(cls):
        meta = f.metadata
        if not meta.get("cli", True):
            continue
        group_name = (groups or {}).get(f.name)
        target = parser
        if group_name:
            target = arg_groups.setdefault(group_name, parser.add_argument_group(group_name))
        tp, is_list, _ = field_kind(cls, f)
        default = f.default if f.default is not _MISSING else (
            f.default_factory() if f.default_factory is not _MISSING else None)
        help_text = meta.get("help", "")
        if meta.get("required"):
            help_text += " (required)"
        elif default not in (None, "", []) and tp is not bool:
            shown = ",".join(map(str, default)) if isinstance(default, list | tuple) else default
            help_text += f" (default: {shown})"
        kw: dict[str, Any] = dict(dest=f.name, default=argparse.SUPPRESS, help=help_text.replace("%", "%%"))
        if tp is bool and not is_list:
            kw["action"] = argparse.BooleanOptionalAction
            if default:
                kw["help"] += " (default: on)"
        else:
            kw["type"] = _list_parser(tp, f.name) if is_list else _scalar_parser(tp, f.name)
            if meta.get("choices"):
                kw["choices"] = meta["choices"] if not is_list else None
                kw["metavar"] = "{" + ",".join(map(str, meta["choices"])) + "}"
            if meta.get("metavar"):
                kw["metavar"] = meta["metavar"]
        target.add_argument(flag_name(f.name), **kw)


def load_config_file(path: str) -> dict:
    """Parse a YAML or JSON config file as plain data (never executes anything)."""
    if not os.path.isfile(path):
        raise UserError(f"config file not found: {path}")
    with open(path, encoding="utf-8") as fh:
        text = fh.read()
    try:
        if path.endswith((".yaml", ".yml")):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as e:  # yaml and json raise different types
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"cannot parse config file {path}: {first}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"config file {path} must hold a mapping of option: value")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def _coerce(cls, f: dataclasses.Field, value, source: str):
    """Check and convert a value from a config file to the field's type."""
    tp, is_list, optional = field_kind(cls, f)
    if value is None:
        if optional or f.default is None:
            return None
        raise UserError(f"{source}: {f.name} must not be null")
    if is_list:
        if isinstance(value, str):
            return _list_parser(tp, f.name)(value)
        if not isinstance(value, list | tuple):
            value = [value]
        return [_coerce_scalar(tp, v, f.name, source) for v in value]
    return _coerce_scalar(tp, value, f.name, source)


def _coerce_scalar(tp, value, name, source):
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise UserError(f"{source}: {name} must be true or false, got {value!r}")
    if tp is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if tp is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if tp is str and isinstance(value, str):
        return value
    if tp in (int, float) and isinstance(value, str):
        try:
            return tp(value)
        except ValueError:
            pass
    if tp is typing.Any:
        return value
    raise UserError(f"{source}: {name} must be {tp.__name__}, got {value!r}")


def build_config(cls, values: dict, source: str = "config"):
    """Instantiate `cls` from a dict, naming unknown keys and missing required ones."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise UserError(f"{source}: unknown option(s) {', '.join(unknown)}")
    kwargs = {k: _coerce(cls, fields[k], v, source) for k, v in values.items()}
    missing = [flag_name(n) for n, f in fields.items() if f.metadata.get("required") and kwargs.get(n) is None]
    if missing:
        raise UserError(f"missing required option {', '.join(missing)}")
    try:
        return cls(**kwargs)
    except ValueError as e:
        raise UserError(str(e)) from None


def from_args(cls, args: argparse.Namespace):
    """Config from parsed flags, on top of `--config FILE` if given. Flags override the file."""
    given = {k: v for k, v in vars(args).items() if k not in ("config", "command", "func")}
    values = {}
    if getattr(args, "config", None):
        values.update(load_config_file(args.config))
    values.update(given)
    return build_config(cls, values, source=args.config if getattr(args, "config", None) else "flags")


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def format_config(cfg) -> str:
    """The config as a short block of `name = value` lines, printed at start."""
    d = to_dict(cfg)
    width = max(map(len, d)) if d else 0
    return "\n".join(f"  {k:<{width}} = {v!r}" for k, v in d.items())
