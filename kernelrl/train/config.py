"""One flat dataclass per trainer entry point, mirrored one to one by its command line.

A trainer declares its settings once:

    @dataclass
    class SFTConfig:
        model: str = field(metadata={"help": "Hugging Face model name or local folder"})
        lr: float = field(default=2e-5, metadata={"help": "peak learning rate"})
        packing: bool = field(default=True, metadata={"help": "pack short examples"})
        keep: Optional[int] = field(default=2, metadata={"help": "checkpoints kept"})
        loss_type: Literal["sigmoid", "ipo"] = "sigmoid"

and ``config_from_args(SFTConfig, argv)`` gives one flag per field (``--loss-type``;
``--packing/--no-packing`` for a bool; ``none`` unsets an Optional field), the help and
default of each in ``--help``, and ``--config FILE.toml`` with the same field names,
flags given explicitly overriding the file. Why flat: every setting then has exactly one
name, the same in the flag, the TOML file and the code. ``save_config`` writes the
settings a run used as TOML beside its outputs, which ``--config`` reads back.

Field types: int, float, str, bool, pathlib.Path, ``Literal[...]`` of those, and
``Optional[...]`` of any of them. Anything else is refused when the parser is built.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import math
import os
import sys
import tomllib
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Sequence, Union

CONFIG_DEST = "config_file"
_BASES = (int, float, str, bool, Path)
_TYPE_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "true or false",
               Path: "a path (string)"}
_METAVARS = {int: "INT", float: "FLOAT", str: "STR", Path: "PATH"}


class ConfigError(ValueError):
    """A setting that cannot be used; the message names the field (and file)."""


@dataclass(frozen=True)
class _Kind:
    """What a field accepts: a base type, whether None is allowed, the Literal choices."""

    base: type
    optional: bool
    choices: tuple | None


def _kind_of(cls: type, name: str, tp: Any) -> _Kind:
    origin = typing.get_origin(tp)
    optional = False
    if origin is Union or origin is types.UnionType:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) != 1 or len(typing.get_args(tp)) != 2:
            raise TypeError(f"{cls.__name__}.{name}: type {tp} is not supported; a union "
                            f"must be Optional[X] of one type")
        optional, tp = True, args[0]
        origin = typing.get_origin(tp)
    if origin is Literal:
        choices = typing.get_args(tp)
        bases = {type(c) for c in choices}
        if len(bases) != 1 or bases.pop() not in (int, str):
            raise TypeError(f"{cls.__name__}.{name}: Literal choices must all be str or all "
                            f"be int, got {choices}")
        return _Kind(type(choices[0]), optional, choices)
    if tp in _BASES:
        return _Kind(tp, optional, None)
    raise TypeError(f"{cls.__name__}.{name}: type {tp} is not supported; config fields are "
                    f"int, float, str, bool, Path, Literal[...] or Optional[...] of those")


def _fields(cls: type) -> list[tuple[dataclasses.Field, _Kind]]:
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls!r} is not a dataclass")
    hints = typing.get_type_hints(cls)
    return [(f, _kind_of(cls, f.name, hints[f.name])) for f in dataclasses.fields(cls)
            if f.init]


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _default_of(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def _describe(kind: _Kind) -> str:
    text = (f"one of {', '.join(map(str, kind.choices))}" if kind.choices
            else _TYPE_NAMES[kind.base])
    return text + (" or none" if kind.optional else "")


def _show(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


# ----------------------------------------------------------------------------------------
# Values: one converter for command-line strings, one check for TOML values


def _from_string(kind: _Kind, text: str) -> Any:
    if kind.optional and text.strip().lower() == "none":
        return None
    try:
        if kind.choices:
            for choice in kind.choices:
                if str(choice) == text:
                    return choice
            raise ValueError
        if kind.base is bool:
            lowered = text.strip().lower()
            if lowered in ("true", "1", "yes", "on"):
                return True
            if lowered in ("false", "0", "no", "off"):
                return False
            raise ValueError
        return kind.base(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {_describe(kind)}, got {text!r}") from None


def _converter(kind: _Kind):
    def convert(text: str) -> Any:
        return _from_string(kind, text)
    convert.__name__ = _describe(kind)
    return convert


def _check_value(kind: _Kind, name: str, value: Any, where: str) -> Any:
    """A TOML value for field ``name``, converted to the field's type or refused."""
    def fail() -> ConfigError:
        return ConfigError(f"{where}: field {name!r} expects {_describe(kind)}, got "
                           f"{type(value).__name__} {value!r}")

    if kind.optional and isinstance(value, str) and value.lower() == "none":
        return None        # TOML has no null; "none" unsets, as on the command line
    if kind.choices:
        if value in kind.choices and type(value) is kind.base:
            return value
        raise fail()
    if kind.base is bool:
        if isinstance(value, bool):
            return value
        raise fail()
    if kind.base is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise fail()
    if kind.base is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise fail()
    if isinstance(value, str):
        return kind.base(value)
    raise fail()


# ----------------------------------------------------------------------------------------
# The parser


def add_dataclass_args(parser: argparse.ArgumentParser, cls: type, *,
                       config_flag: bool = True) -> argparse.ArgumentParser:
    """Add one ``--field-name`` flag per field of ``cls`` (and ``--config FILE``).

    Flags carry no argparse default: only flags given on the command line appear in the
    parsed namespace, so that ``config_from_namespace`` lets them, and only them,
    override the TOML file. The default shown in ``--help`` is the field's.
    """
    if config_flag:
        parser.add_argument("--config", dest=CONFIG_DEST, metavar="FILE.toml",
                            default=argparse.SUPPRESS,
                            help="read settings from a TOML file with the same field "
                                 "names (flags given here override it)")
    for f, kind in _fields(cls):
        if config_flag and f.name in ("config", CONFIG_DEST):
            raise TypeError(f"{cls.__name__}.{f.name}: the name is reserved for --config")
        help_text = str(f.metadata.get("help", "")).replace("%", "%%")
        default = _default_of(f)
        if default is dataclasses.MISSING:
            shown = "required"
        else:
            shown = "default: " + _show(default).replace("%", "%%")
        unsettable = default is not None and default is not dataclasses.MISSING
        if kind.optional and kind.base is not bool and unsettable:
            shown += "; none unsets it"
        help_text = f"{help_text} ({shown})" if help_text else f"({shown})"
        if kind.base is bool and not kind.choices:
            parser.add_argument(_flag(f.name), dest=f.name, default=argparse.SUPPRESS,
                                action=argparse.BooleanOptionalAction, help=help_text)
            continue
        metavar = ("{" + ",".join(map(str, kind.choices)) + "}" if kind.choices
                   else _METAVARS[kind.base])
        parser.add_argument(_flag(f.name), dest=f.name, default=argparse.SUPPRESS,
                            type=_converter(kind), metavar=metavar, help=help_text)
    return parser


def load_config_file(cls: type, path: str | os.PathLike) -> dict[str, Any]:
    """The settings in a flat TOML file, checked against the fields of ``cls``."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    kinds = {f.name: kind for f, kind in _fields(cls)}
    values = {}
    for key, value in data.items():
        if isinstance(value, dict):
            raise ConfigError(f"config file {path}: {key!r} is a table; the config is "
                              f"flat, one `name = value` per field")
        if key not in kinds:
            close = difflib.get_close_matches(key.replace("-", "_"), kinds, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"config file {path}: unknown key {key!r}{hint}; the valid "
                              f"fields of {cls.__name__} are: {', '.join(kinds)}")
        values[key] = _check_value(kinds[key], key, value, f"config file {path}")
    return values


def config_from_namespace(cls: type, namespace: argparse.Namespace) -> Any:
    """Build ``cls`` from a namespace parsed with ``add_dataclass_args``: field
    defaults, then the ``--config`` file, then the flags given."""
    values: dict[str, Any] = {}
    config_file = getattr(namespace, CONFIG_DEST, None)
    if config_file is not None:
        values.update(load_config_file(cls, config_file))
    for f, _ in _fields(cls):
        if hasattr(namespace, f.name):
            values[f.name] = getattr(namespace, f.name)
    missing = [f.name for f, _ in _fields(cls)
               if f.name not in values and _default_of(f) is dataclasses.MISSING]
    if missing:
        raise ConfigError("missing required settings: " + ", ".join(
            f"{_flag(name)} (or {name} in --config)" for name in missing))
    return cls(**values)


def build_parser(cls: type, *, prog: str | None = None,
                 description: str | None = None) -> argparse.ArgumentParser:
    """A parser with ``cls``'s flags and ``--config``; the description defaults to the
    dataclass's docstring."""
    doc = cls.__doc__ or ""
    if doc.startswith(cls.__name__ + "("):      # dataclass's generated signature
        doc = ""
    parser = argparse.ArgumentParser(prog=prog, description=description or doc.strip() or None,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    return add_dataclass_args(parser, cls)


def config_from_args(cls: type, argv: Sequence[str] | None = None, *, prog: str | None = None,
                     description: str | None = None) -> Any:
    """Parse ``argv`` (default: ``sys.argv[1:]``) into a ``cls``. Bad flags, a bad config
    file or a ``ValueError`` from the dataclass's own checks (``__post_init__``) exit
    with status 2 and a message, as argparse does."""
    parser = build_parser(cls, prog=prog, description=description)
    namespace = parser.parse_args(sys.argv[1:] if argv is None else list(argv))
    try:
        return config_from_namespace(cls, namespace)
    except ValueError as exc:
        parser.error(str(exc))


# ----------------------------------------------------------------------------------------
# Writing TOML (flat scalars only)

_ESCAPES = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f",
            "\r": "\\r"}


def _toml_string(text: str) -> str:
    out = []
    for ch in text:
        if ch in _ESCAPES:
            out.append(_ESCAPES[ch])
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04X}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        text = repr(value)
        return text if ("." in text or "e" in text) else text + ".0"
    if isinstance(value, (str, Path)):
        return _toml_string(str(value))
    raise TypeError(f"cannot write a {type(value).__name__} as a flat TOML value")


def config_to_toml(cfg: Any) -> str:
    """The TOML text for a config dataclass instance. TOML has no null: a None field whose
    default is None is left out (as a comment); one whose default is not None is written
    ``name = "none"``, which reads back as None."""
    if not dataclasses.is_dataclass(cfg) or isinstance(cfg, type):
        raise TypeError(f"expected a dataclass instance, got {cfg!r}")
    lines = [f"# {type(cfg).__name__}, written by kernelrl; read back with --config"]
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if value is None and _default_of(f) is None:
            lines.append(f"# {f.name} is unset (none)")
            continue
        if value is None:
            lines.append(f'{f.name} = "none"')
            continue
        try:
            lines.append(f"{f.name} = {_toml_value(value)}")
        except TypeError as exc:
            raise TypeError(f"{type(cfg).__name__}.{f.name}: {exc}") from None
    return "\n".join(lines) + "\n"


def save_config(cfg: Any, path: str | os.PathLike) -> Path:
    """Write ``cfg`` as TOML to ``path`` (replaced atomically); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(config_to_toml(cfg), encoding="utf-8")
    os.replace(tmp, path)
    return path
