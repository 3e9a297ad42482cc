"""Load a pydantic config from YAML plus ``key.sub=value`` overrides, with clear errors.

Everything here runs before any model loads: a typo in a config key or an
out-of-range value fails in milliseconds, with one message per bad field, e.g.

    unknown config key 'optim.lrr'; valid keys under 'optim': lr, warmup_steps, ...
    optim.lr: 0 is out of range; allowed: 0 < value <= 1

Override values are parsed as YAML scalars or flow lists: ``a.b=3`` (int),
``a.b=0.5``/``a.b=1e-6`` (float), ``a.b=true`` (bool), ``a.b=[1, 2]`` (list),
``a.b=null`` (None), anything else a string.
"""

from __future__ import annotations

import os
import re
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import annotated_types
import yaml
from pydantic import BaseModel, ValidationError

M = TypeVar("M", bound=BaseModel)

_RANGE_ERRORS = {"greater_than", "greater_than_equal", "less_than", "less_than_equal"}
# YAML 1.1 needs a dot in a float ("1e-6" is a string to PyYAML); accept exponent floats too.
_EXP_FLOAT = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$")


class ConfigError(ValueError):
    """A config file or override is invalid; the message has one line per problem."""


def parse_value(text: str) -> Any:
    """An override value parsed as a YAML scalar or flow collection."""
    if _EXP_FLOAT.match(text.strip()):
        return float(text)
    try:
        return yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        return text


def _model_in(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model class inside ``annotation`` (``Model``, ``Model | None``), if any."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    origin = typing.get_origin(annotation)
    if origin is typing.Union or origin is types.UnionType or origin is typing.Annotated:
        for arg in typing.get_args(annotation):
            found = _model_in(arg)
            if found is not None:
                return found
    return None


def _field_names(model_cls: type[BaseModel]) -> dict[str, str]:
    """Accepted key (name or alias) -> field name."""
    names = {}
    for name, info in model_cls.model_fields.items():
        names[name] = name
        if info.alias:
            names[info.alias] = name
    return names


def _extra_allowed(model_cls: type[BaseModel]) -> bool:
    return model_cls.model_config.get("extra") == "allow"


def _check_keys(model_cls: type[BaseModel], data: Any, prefix: str, errors: list[str]) -> None:
    """Collect an error for every key of ``data`` that ``model_cls`` does not define."""
    if not isinstance(data, dict) or _extra_allowed(model_cls):
        return
    names = _field_names(model_cls)
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if key not in names:
            where = f"under '{prefix[:-1]}'" if prefix else "at the top level"
            errors.append(
                f"unknown config key '{dotted}'; valid keys {where}: "
                + ", ".join(model_cls.model_fields)
            )
            continue
        sub = _model_in(model_cls.model_fields[names[key]].annotation)
        if sub is not None:
            _check_keys(sub, value, dotted + ".", errors)


def apply_override(data: dict[str, Any], override: str) -> None:
    """Set ``data[a][b][c] = value`` for the override ``"a.b.c=value"``."""
    key, sep, raw = override.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {override!r} is not of the form key.sub=value")
    parts = key.split(".")
    node = data
    for depth, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        elif not isinstance(child, dict):
            raise ConfigError(
                f"override {override!r}: '{'.'.join(parts[: depth + 1])}' holds {child!r}, "
                "not a section with sub-keys"
            )
        node = child
    node[parts[-1]] = parse_value(raw)


def _field_at(model_cls: type[BaseModel], loc: tuple[Any, ...]):
    """The ``FieldInfo`` at a validation error location, if it resolves to one."""
    current: type[BaseModel] | None = model_cls
    info = None
    for part in loc:
        if current is None or not isinstance(part, str):
            return None
        name = _field_names(current).get(part)
        if name is None:
            return None
        info = current.model_fields[name]
        current = _model_in(info.annotation)
    return info


def _allowed_range(info) -> str | None:
    lower = upper = None
    for meta in getattr(info, "metadata", []):
        if isinstance(meta, annotated_types.Gt):
            lower = f"{meta.gt} < value"
        elif isinstance(meta, annotated_types.Ge):
            lower = f"{meta.ge} <= value"
        elif isinstance(meta, annotated_types.Lt):
            upper = f"value < {meta.lt}"
        elif isinstance(meta, annotated_types.Le):
            upper = f"value <= {meta.le}"
    if lower and upper:
        return lower + upper[len("value") :]
    return lower or upper


def _reword(model_cls: type[BaseModel], exc: ValidationError) -> list[str]:
    messages: dict[str, str] = {}
    for err in exc.errors():
        loc = tuple(err["loc"])
        field = ".".join(str(p) for p in loc) or "(config)"
        if field in messages:  # one message per field (unions report each member)
            continue
        value = err.get("input")
        if err["type"] in _RANGE_ERRORS:
            info = _field_at(model_cls, loc)
            allowed = _allowed_range(info) if info is not None else None
            if allowed is None:
                allowed = err["msg"].lower()
            messages[field] = f"{field}: {value!r} is out of range; allowed: {allowed}"
        elif err["type"] == "extra_forbidden":
            messages[field] = f"unknown config key '{field}'"
        elif err["type"] == "missing":
            messages[field] = f"{field}: required but not set"
        else:
            msg = err["msg"]
            if msg.startswith("Value error, "):
                msg = msg[len("Value error, ") :]
            if not loc:  # a whole-model check: its message names the fields itself
                messages[field] = msg
                continue
            shown = "" if isinstance(value, dict) else f" (got {value!r})"
            messages[field] = f"{field}: {msg}{shown}"
    return list(messages.values())


def load_config(model_cls: type[M], path: str | Path | None, overrides: list[str]) -> M:
    """Validate ``model_cls`` from the YAML file ``path`` (optional) with ``overrides`` applied.

    Raises:
        ConfigError: the file is not a YAML mapping, an override is malformed, a key is
            unknown (the message names its full dotted key and the valid keys at that
            level), or a value is invalid (the message names the field and, for a
            range, the allowed range). All problems are reported together.
    """
    data: dict[str, Any] = {}
    if path is not None:
        loaded = yaml.safe_load(Path(path).read_text())
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a YAML mapping at the top level, got {loaded!r}")
        data = loaded or {}
    for override in overrides:
        apply_override(data, override)
    errors: list[str] = []
    _check_keys(model_cls, data, "", errors)
    if errors:
        raise ConfigError("\n".join(errors))
    try:
        return model_cls.model_validate(data)
    except ValidationError as exc:
        source = f" in {path}" if path is not None else ""
        lines = _reword(model_cls, exc)
        raise ConfigError(f"invalid config{source}:\n" + "\n".join(lines)) from None


def dump_config(cfg: BaseModel, path: str | Path) -> Path:
    """Write ``cfg`` as YAML (field order kept) that :func:`load_config` reads back."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    os.replace(tmp, path)
    return path
