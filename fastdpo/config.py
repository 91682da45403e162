"""Command configs as flat dataclasses that validate themselves; CLI flags are generated from them.

Each command declares its whole config in its own module (`fastdpo.recipes.train.TrainConfig`, ...):
one dataclass, no base class, every field written out there. A field is declared with
`opt(default, help, choices=..., ge=..., group=...)`, and that one declaration gives:

- the flag (`max_length` -> `--max-length`, bools -> `--x/--no-x`, lists -> comma-separated values,
  `positional=True` -> a positional argument), its help text and its `--help` group (`add_arguments`);
- the check, run by `check_fields` whatever the values came from (flags, a `--config` YAML or JSON
  file, or the Python API): the type, `choices` (for lists: each item), bounds (`ge`/`gt`/`le`/`lt`;
  float values must also be finite) and `required`. A failure is one line naming the key and what is
  allowed, raised before any model loads;
- the printed config and `fastdpo_config.json` (`to_dict`).

A config's `__post_init__` is its one validation function: `check_fields(self)`, then the shared
rules it needs as plain functions (`loop.check_run_options(self)`, `modeling.check_scoring_options(self)`),
then its own cross-field rules.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import types
import typing
from typing import Any

from .errors import UserError

_MISSING = dataclasses.MISSING


def opt(default=_MISSING, help: str = "", *, choices=None, metavar=None, required: bool = False,
        group: str | None = None, ge=None, gt=None, le=None, lt=None, positional: bool = False,
        default_factory=_MISSING):
    """A config field: default, one-line help, allowed values and `--help` group."""
    meta = {"help": help, "choices": choices, "metavar": metavar, "required": required, "group": group,
            "bounds": {k: v for k, v in (("ge", ge), ("gt", gt), ("le", le), ("lt", lt)) if v is not None},
            "positional": positional}
    if default_factory is not _MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


@dataclasses.dataclass(frozen=True)
class Kind:
    """What a field holds: `base` (bool, int, float, str), a list of them, None allowed, or a scalar-or-list."""

    base: type
    is_list: bool = False
    optional: bool = False
    scalar_or_list: bool = False  # e.g. beta: float | list[float] (one run, or a sweep)


@functools.cache
def _type_hints(cls) -> dict:
    return typing.get_type_hints(cls)


def field_kind(cls, f: dataclasses.Field) -> Kind:
    tp = _type_hints(cls)[f.name]
    args = list(typing.get_args(tp)) if typing.get_origin(tp) in (typing.Union, types.UnionType) else [tp]
    optional = type(None) in args
    args = [a for a in args if a is not type(None)]
    lists = [typing.get_args(a)[0] for a in args if typing.get_origin(a) in (list, tuple)]
    if lists:
        return Kind(lists[0], True, optional, scalar_or_list=len(args) > 1)
    return Kind(args[0], False, optional)


def _describe_bounds(bounds: dict) -> str:
    words = {"ge": "at least", "gt": "greater than", "le": "at most", "lt": "less than"}
    return " and ".join(f"{words[k]} {v:g}" for k, v in bounds.items())


def _in_bounds(x, bounds: dict) -> bool:
    return all({"ge": x >= v, "gt": x > v, "le": x <= v, "lt": x < v}[k] for k, v in bounds.items())


def _check_scalar(kind: Kind, meta, value, label: str):
    """The value, converted (int -> float), or a UserError naming `label` and what is allowed."""
    tp = kind.base
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    ok = isinstance(value, tp) and not (tp is int and isinstance(value, bool))
    if not ok and tp is not typing.Any:
        shown = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(tp, tp.__name__)
        raise UserError(f"{label} must be {shown}, got {value!r}")
    choices = meta.get("choices")
    if choices and value not in choices:
        raise UserError(f"{label} {value!r} is not one of: {', '.join(map(str, choices))}")
    if tp is float and not math.isfinite(value):
        raise UserError(f"{label} must be a finite number, got {value!r}")
    bounds = meta.get("bounds") or {}
    if tp in (int, float) and bounds and not _in_bounds(value, bounds):
        raise UserError(f"{label} must be {_describe_bounds(bounds)}, got {value!r}")
    return value


def check_value(cls, f: dataclasses.Field, value, label: str | None = None):
    """Check one field's value (type, choices, bounds); returns it normalised. `label` names it in errors."""
    kind = field_kind(cls, f)
    label = label or f.name
    if value is None:
        if kind.optional or f.default is None:
            return None
        raise UserError(f"{label} must not be null")
    if kind.is_list:
        if isinstance(value, list | tuple):
            items = [_check_scalar(kind, f.metadata, v, label) for v in value]
            if kind.scalar_or_list:  # one value, or several (a sweep)
                if not items:
                    raise UserError(f"{label} is empty")
                return items[0] if len(items) == 1 else items
            return items
        if kind.scalar_or_list:
            return _check_scalar(kind, f.metadata, value, label)
        raise UserError(f"{label} must be a list, got {value!r}")
    return _check_scalar(kind, f.metadata, value, label)


def check_fields(cfg) -> None:
    """Check and normalise every field of the dataclass `cfg` (type, choices, bounds, required); the first
    line of each command config's `__post_init__`."""
    for f in dataclasses.fields(cfg):
        value = check_value(type(cfg), f, getattr(cfg, f.name))
        if f.metadata.get("required") and value is None:
            raise UserError(f"missing required option {flag_name(f.name)}")
        setattr(cfg, f.name, value)


# ----------------------------------------------------------------------------------------------
# Flags


def _parse_scalar(tp, name):
    def parse(text: str):
        if text.lower() in ("none", "null") and tp is not str:
            return None
        try:
            return tp(text)
        except (TypeError, ValueError):
            raise argparse.ArgumentTypeError(f"{flag_name(name)} expects {tp.__name__}, got {text!r}") from None

    return parse


def _parse_list(tp, name):
    scalar = _parse_scalar(tp, name)
    return lambda text: [scalar(x.strip()) for x in text.split(",") if x.strip()]


# `--help` shows groups in this order (ungrouped options first, as argparse does); others follow
GROUP_ORDER = ("model", "data", "loss", "optimisation", "layout", "logging and checkpoints", "distributed", "lora",
               "generation")


def add_arguments(parser: argparse.ArgumentParser, cls) -> None:
    """One flag per field, in `--help` groups from `opt(group=...)` (titles renamed by `cls.GROUP_TITLES`).

    Defaults are suppressed so that `from_args` can tell what was given from what a file gave.
    """
    titles = getattr(cls, "GROUP_TITLES", {})
    order = {g: i for i, g in enumerate(GROUP_ORDER)}
    fields = sorted(dataclasses.fields(cls), key=lambda f: (f.metadata.get("group") is not None,
                                                            order.get(f.metadata.get("group"), len(order))))
    groups = {}
    for f in fields:
        meta = f.metadata
        group = titles.get(meta.get("group"), meta.get("group"))
        target = groups.setdefault(group, parser.add_argument_group(group)) if group else parser
        kind = field_kind(cls, f)
        default = f.default if f.default is not _MISSING else (
            f.default_factory() if f.default_factory is not _MISSING else None)
        help_text = meta.get("help", "")
        if meta.get("required"):
            help_text += " (required)"
        elif default not in (None, "", []) and kind.base is not bool:
            shown = ",".join(map(str, default)) if isinstance(default, list | tuple) else default
            help_text += f" (default: {shown})"
        kw: dict[str, Any] = dict(default=argparse.SUPPRESS, help=help_text.replace("%", "%%"))
        if meta.get("positional"):  # a list takes any number of values; a scalar exactly one
            target.add_argument(f.name, nargs="*" if kind.is_list else None, metavar=meta.get("metavar") or
                                f.name.upper(), **kw)
            continue
        if kind.base is bool and not kind.is_list:
            kw["action"] = argparse.BooleanOptionalAction
            if default:
                kw["help"] += " (default: on)"
        else:
            kw["type"] = _parse_list(kind.base, f.name) if kind.is_list else _parse_scalar(kind.base, f.name)
            if meta.get("choices"):
                kw["metavar"] = "{" + ",".join(map(str, meta["choices"])) + "}"
            if meta.get("metavar"):
                kw["metavar"] = meta["metavar"]
        target.add_argument(flag_name(f.name), dest=f.name, **kw)


# ----------------------------------------------------------------------------------------------
# Config files and merging


def load_config_file(path: str) -> dict:
    """Parse a YAML or JSON config file as plain data (never executes anything). A key given twice (also as
    `max-steps` and `max_steps`) is refused naming it and its lines: one of the two would be dropped."""
    if not os.path.isfile(path):
        raise UserError(f"config file not found: {path}")
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except UnicodeDecodeError as e:
        raise UserError(f"config file {path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise UserError(f"cannot read config file {path}: {e.strerror}") from None
    try:
        data = _load_yaml(text, path) if path.endswith((".yaml", ".yml")) else _load_json(text, path)
    except UserError:
        raise
    except Exception as e:  # yaml and json raise different types
        from .errors import first_line

        raise UserError(f"cannot parse config file {path}: {first_line(e)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"config file {path} must hold a mapping of option: value")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def _given_twice(path: str, key, first: int, second: int) -> UserError:
    return UserError(f"config file {path}: {key!s} is given twice (lines {first} and {second}); keep one")


def _load_yaml(text: str, path: str):
    import yaml

    class Loader(yaml.SafeLoader):
        """safe_load's loader, refusing a mapping that repeats a key (PyYAML keeps the last one)."""

    def mapping(loader, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *defaults`: overriding a merged key is the point
                continue
            key = loader.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            name = str(key).replace("-", "_")
            if name in seen:
                raise _given_twice(path, key, seen[name], line)
            seen[name] = line
        return loader.construct_mapping(node, deep=deep)

    Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, mapping)
    return yaml.load(text, Loader=Loader)  # noqa: S506 (a SafeLoader)


def _load_json(text: str, path: str):
    def pairs(items):
        seen = {}
        for key, _ in items:
            name = key.replace("-", "_")
            if name in seen:  # json keeps the last; the decoder gives no positions: find the key's lines
                lines = sorted(set(_json_key_lines(text, seen[name]) + _json_key_lines(text, key)))
                raise _given_twice(path, key, *(lines + ["?", "?"])[:2])
            seen[name] = key
        return dict(items)

    return json.loads(text, object_pairs_hook=pairs)


def _json_key_lines(text: str, key: str) -> list[int]:
    """The lines where `key` appears as a JSON object key."""
    import re

    return [text.count("\n", 0, m.start()) + 1 for m in re.finditer(re.escape(json.dumps(key)) + r"\s*:", text)]


def _from_file(kind: Kind, value):
    """A config file may write a list as a comma-separated string, as on the command line, and a number as a
    string (YAML reads `1e-5` as one); what does not convert is left for `check_value` to name."""
    def number(x):
        try:
            return kind.base(x) if kind.base in (int, float) and isinstance(x, str) else x
        except ValueError:
            return x

    if kind.is_list and isinstance(value, str):
        return [number(x.strip()) for x in value.split(",") if x.strip()]
    if kind.is_list and isinstance(value, list | tuple):
        return [number(x) for x in value]
    return number(value)


def build_config(cls, values: dict, labels: dict[str, str] | None = None):
    """Instantiate `cls` from a dict; each key is checked and named by `labels[key]` in errors."""
    labels = labels or {}
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        where = {labels.get(k, "").split(":")[0] for k in unknown} - {""}
        raise UserError(f"{', '.join(sorted(where)) + ': ' if where else ''}unknown option(s) {', '.join(unknown)}")
    kwargs = {k: check_value(cls, fields[k], _from_file(field_kind(cls, fields[k]), v), labels.get(k, k))
              for k, v in values.items()}
    return cls(**kwargs)


def from_args(cls, args: argparse.Namespace):
    """Config from parsed flags, on top of `--config FILE` if given. Flags override the file."""
    given = {k: v for k, v in vars(args).items() if k not in ("config", "command", "func")}
    values, labels = {}, {}
    path = getattr(args, "config", None)
    if path:
        values.update(load_config_file(path))
        labels.update({k: f"{path}: {k}" for k in values})
    values.update(given)
    labels.update({k: flag_name(k) for k in given})
    return build_config(cls, values, labels)


def make(cls, config=None, **kwargs):
    """The Python API's config: `config` with `kwargs` replaced, or `cls(**kwargs)`; checked either way."""
    if config is None:
        return build_config(cls, kwargs)
    return dataclasses.replace(config, **kwargs) if kwargs else config


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def _default(f: dataclasses.Field):
    return f.default_factory() if f.default_factory is not _MISSING else f.default


def format_config(cfg) -> str:
    """The options that differ from their defaults, as `name = value` lines, printed at start (the whole
    config is saved with the outputs)."""
    changed = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if getattr(cfg, f.name) != _default(f)}
    width = max(map(len, changed)) if changed else 0
    return "\n".join(f"  {k:<{width}} = {v!r}" for k, v in changed.items())
