"""Settings declared once: a dataclass field carries its default, help, flag and validation.

A job's settings are one dataclass whose fields are made with `option(...)`. From it come the
command-line flags (`add_arguments`), the checks (`check_settings`), YAML loading
(`load_settings_yaml`) and Ray Tune's search-space names, so a hyperparameter is written once
(a field without a default is a required flag):

    @dataclass
    class Settings:
        lr: float = option(1e-3, "peak learning rate", group="optimisation", minimum=0,
                           exclusive=True)
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

HIDDEN = "hidden"  # group of fields that are settings but no flags (e.g. test callbacks)


def option(
    default: Any = dataclasses.MISSING,
    help: str = "",
    *,
    group: str = "options",
    choices: Sequence[Any] | None = None,
    minimum: float | None = None,
    maximum: float | None = None,
    exclusive: bool = False,
    aliases: Sequence[str] = (),
    metavar: str | None = None,
    const: Any = None,
    default_factory: Callable[[], Any] | None = None,
) -> Any:
    """A settings field with its flag's help and its rules (`minimum`/`maximum` inclusive,
    or exclusive with `exclusive=True`; None values are never range-checked). With `const`,
    the flag's value is optional: a bare flag means `const`."""
    metadata = {
        "help": help,
        "group": group,
        "choices": tuple(choices) if choices is not None else None,
        "minimum": minimum,
        "maximum": maximum,
        "exclusive": exclusive,
        "aliases": tuple(aliases),
        "metavar": metavar,
        "const": const,
    }
    if default_factory is not None:
        return dataclasses.field(default_factory=default_factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def flag_name(name: str) -> str:
    """The flag of a field: `img_size` -> `--img-size`."""
    return "--" + name.replace("_", "-")


def settings_fields(cls: type) -> list[dataclasses.Field]:
    """Fields that are user settings (everything except the hidden group)."""
    return [f for f in dataclasses.fields(cls) if f.metadata.get("group") != HIDDEN]


def _value_type(cls: type, name: str) -> tuple[type, bool, bool]:
    """(scalar type, is optional, is a list) of a field, from its annotation."""
    hint = typing.get_type_hints(cls)[name]
    optional = False
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        optional = len(args) < len(typing.get_args(hint))
        hint = args[0]
    if typing.get_origin(hint) is list:
        return typing.get_args(hint)[0], optional, True
    return hint, optional, False


def add_arguments(
    parser: argparse.ArgumentParser,
    cls: type,
    *,
    skip: Iterable[str] = (),
    defaults: Any = None,
) -> dict[str, argparse._ArgumentGroup]:
    """Add one flag per settings field of `cls`, grouped as the fields say; returns the groups.

    `defaults` (an instance) overrides the dataclass defaults shown and used.
    """
    skipped = set(skip)
    groups: dict[str, argparse._ArgumentGroup] = {}
    for f in settings_fields(cls):
        if f.name in skipped:
            continue
        meta = f.metadata
        group = groups.setdefault(meta["group"], parser.add_argument_group(meta["group"]))
        kind, _, is_list = _value_type(cls, f.name)
        default = getattr(defaults, f.name) if defaults is not None else _default(f)
        kwargs: dict[str, Any] = {"dest": f.name, "default": default, "help": meta["help"]}
        if defaults is None and _required(f):
            kwargs.update(required=True, default=argparse.SUPPRESS)  # no "(default: None)"
        if kind is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = kind
            if meta["choices"] is not None:
                kwargs["choices"] = meta["choices"]
            if is_list:
                kwargs["nargs"] = "+"
            elif meta.get("const") is not None:
                kwargs["nargs"] = "?"
                kwargs["const"] = meta["const"]
            if meta["metavar"]:
                kwargs["metavar"] = meta["metavar"]
        group.add_argument(flag_name(f.name), *meta["aliases"], **kwargs)
    return groups


def _required(f: dataclasses.Field) -> bool:
    """A field without a default is a required flag."""
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


def _default(f: dataclasses.Field) -> Any:
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None if f.default is dataclasses.MISSING else f.default


def from_namespace(cls: type, namespace: argparse.Namespace, **extra: Any) -> Any:
    """The settings instance of the parsed flags (flags that are not fields are ignored)."""
    names = {f.name for f in dataclasses.fields(cls)}
    values = {k: v for k, v in vars(namespace).items() if k in names}
    return cls(**{**values, **extra})


def check_settings(settings: Any) -> None:
    """Check every field against its declared choices and range; one error names all flags."""
    problems = []
    for f in settings_fields(type(settings)):
        value = getattr(settings, f.name)
        meta = f.metadata
        values = value if isinstance(value, list) else [value]
        flag = flag_name(f.name)
        for item in values:
            if item is None:
                continue
            if meta["choices"] is not None and item not in meta["choices"]:
                problems.append(f"{flag} must be one of {list(meta['choices'])}, got {item!r}")
            low, high, strict = meta["minimum"], meta["maximum"], meta["exclusive"]
            if low is not None and (item <= low if strict else item < low):
                problems.append(f"{flag} {'>' if strict else '>='} {low} (got {item})")
            if high is not None and (item >= high if strict else item > high):
                problems.append(f"{flag} {'<' if strict else '<='} {high} (got {item})")
    if problems:
        raise ValueError("invalid settings, need: " + "; ".join(problems))


def load_settings_yaml(path: str | Path, cls: type) -> dict[str, Any]:
    """Settings values from YAML (e.g. jobs/tune.py's best_config.yaml), checked by name."""
    import yaml

    with open(path) as f:
        values = yaml.safe_load(f) or {}
    if not isinstance(values, dict):
        raise ValueError(f"{path}: expected a mapping of setting names to values")
    known = {f.name for f in settings_fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"{path}: unknown settings {unknown}; valid: {sorted(known)}")
    return values


def plain_settings(settings: Any) -> dict[str, Any]:
    """A settings dataclass as plain values (hidden fields such as callbacks left out)."""
    return {f.name: getattr(settings, f.name) for f in settings_fields(type(settings))}
