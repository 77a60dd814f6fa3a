"""Typed job configs: a dataclass per job, defaults in YAML, ``key=value`` overrides.

Every job does the same three things with its config, so they live here once::

    cfg = load_config(PretrainConfig, argv)      # --config file.yaml key=value key.sub=value
    log.info("config:\\n%s", dump_yaml(cfg))      # the resolved config is logged ...
    save_config(cfg, out_dir / "config.yaml")   # ... and saved beside the outputs

Fields carry their help text in ``field(metadata={"help": ...})``; ``--help`` prints them.
Values given on the command line are parsed as YAML scalars (``lr=3e-4`` is a float,
``towers=[visual,text]`` a list) and then coerced to the field's annotated type, so a typo in
a key or a value of the wrong type fails loudly before any work starts.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A config file or override that does not fit the job's config dataclass."""


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Coerce a YAML-parsed value to the annotated type ``tp`` (or raise ConfigError)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{key}: {value!r} fits none of {tp}: {errors}")
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{key}: {value!r} is not one of {list(args)}")
        return value
    if origin in (list, tuple):
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()] if value else []
        if not isinstance(value, (list, tuple)):
            value = [value]
        inner = args[0] if args else Any
        out = [_coerce(v, inner, f"{key}[]") for v in value]
        return out if origin is list else tuple(out)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping for {tp.__name__}, got {value!r}")
        return _from_dict(tp, value, prefix=f"{key}.")
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        try:
            f = float(value)
        except ValueError as e:
            raise ConfigError(f"{key}: expected an integer, got {value!r}") from e
        if f != int(f):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return int(f)
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{key}: expected a number, got {value!r}") from e
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return "" if value is None else str(value)
    return value


def _with_field_default(f: dataclasses.Field, value: Any) -> Any:
    """A partial mapping for a nested dataclass field is laid over that field's default
    (``default_factory``), not over the nested class's own defaults: a job whose default
    raters differ from ``RaterSettings()`` keeps them when one nested key is overridden."""
    if not isinstance(value, dict) or f.default_factory is dataclasses.MISSING:
        return value
    default = f.default_factory()
    if not dataclasses.is_dataclass(default):
        return value
    base = {k.name: getattr(default, k.name) for k in dataclasses.fields(default)}
    return {**base, **value}


def _from_dict(cls: type[T], data: dict[str, Any], prefix: str = "") -> T:
    hints = _field_types(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise ConfigError(
            f"unknown config key(s) {sorted(prefix + u for u in unknown)}; "
            f"{cls.__name__} has {sorted(names)}"
        )
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {k: _coerce(_with_field_default(fields[k], v), hints[k], prefix + k)
              for k, v in data.items()}
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{cls.__name__}: {e}") from e


def to_dict(cfg: Any) -> dict[str, Any]:
    """The config as plain Python data (for YAML/JSON manifests)."""
    return dataclasses.asdict(cfg)


def _set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = data
    for k in keys[:-1]:
        nxt = node.get(k)
        if nxt is None:
            nxt = node[k] = {}
        elif not isinstance(nxt, dict):
            raise ConfigError(f"{dotted}: {k} is not a section")
        node = nxt
    node[keys[-1]] = value


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """Parse ``key=value`` / ``a.b=value`` items into a nested dict (values as YAML scalars)."""
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not key=value")
        key, raw = item.split("=", 1)
        key = key.strip().lstrip("-")
        if not key:
            raise ConfigError(f"override {item!r} has no key")
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        _set_dotted(out, key, value)
    return out


def _merge(base: dict[str, Any], upd: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in upd.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def build_config(cls: type[T], yaml_path: str | Path | None, overrides: list[str]) -> T:
    """Dataclass defaults <- YAML file <- ``key=value`` overrides, then type-checked."""
    data: dict[str, Any] = {}
    if yaml_path is not None:
        path = Path(yaml_path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        loaded = yaml.safe_load(path.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {path} must hold a mapping")
        data = loaded
    data = _merge(data, parse_overrides(overrides))
    return _from_dict(cls, data)


def field_rows(cls: type, prefix: str = "") -> list[tuple[str, str, Any, str]]:
    """``(dotted key, type name, default, help)`` for every leaf field, nested ones included."""
    rows = []
    hints = _field_types(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            rows += field_rows(tp, prefix + f.name + ".")
            continue
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = f.default_factory()  # type: ignore[misc]
        else:
            default = "(required)"
        if dataclasses.is_dataclass(default):
            default = dataclasses.asdict(default)
        tname = getattr(tp, "__name__", str(tp)).replace("typing.", "")
        rows.append((prefix + f.name, tname, default, f.metadata.get("help", "")))
    return rows


def help_text(cls: type, prefix: str = "") -> str:
    """One line per field: name, type, default and its help."""
    return "\n".join(f"  {k} ({t}, default {d!r}): {h}" for k, t, d, h in field_rows(cls, prefix))


def markdown_reference(cls: type, title: str, command: str = "") -> str:
    """A Markdown section listing every field of a config: key, type, default, help."""
    doc = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""
    lines = [f"## {title}", "", doc, ""]
    if command:
        lines += [f"`{command}`", ""]
    lines += ["| key | type | default | what it does |", "|---|---|---|---|"]
    for key, tname, default, help_ in field_rows(cls):
        cell = yaml.safe_dump(default, default_flow_style=True, width=10_000).strip()
        cell = cell.removesuffix("\n...").removesuffix("...").strip()
        tname = tname.replace(" | ", " or ")
        lines.append(f"| `{key}` | {tname} | `{cell}` | {help_.replace('|', '/')} |")
    return "\n".join(lines) + "\n"


def load_config(
    cls: type[T], argv: list[str] | None, default_yaml: str | Path | None = None, prog: str = ""
) -> T:
    """Parse ``[--config FILE] [key=value ...]`` for a job; ``--help`` lists the fields."""
    parser = argparse.ArgumentParser(
        prog=prog or None,
        description=(cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else None,
        epilog="fields (override with key=value):\n" + help_text(cls),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--config",
        default=str(default_yaml) if default_yaml else None,
        help=f"YAML defaults (default: {default_yaml})",
    )
    parser.add_argument("overrides", nargs="*", help="key=value overrides")
    args = parser.parse_args(argv)
    return build_config(cls, args.config, args.overrides)


def dump_yaml(cfg: Any) -> str:
    """The resolved config as YAML text."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def save_config(cfg: Any, path: str | Path) -> None:
    """Write the resolved config beside a job's outputs."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(dump_yaml(cfg))
