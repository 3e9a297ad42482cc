"""The one config loader: a pydantic model from YAML plus ``key.sub=value`` overrides.

Training (``TrainConfig``), serving (``ServeConfig``), evaluation's agents file
(``AgentPoolConfig``) and the OpenRLHF recipe (``OpenRLHFRecipe``) all load here,
with one override syntax. Everything runs before any model loads: a typo in a key
or an out-of-range value fails in milliseconds, with one message per bad field, e.g.

    unknown config key 'optim.lrr'; valid keys under 'optim': lr, warmup_steps, ...
    optim.lr: 0 is out of range; allowed: 0 < value <= 1

A YAML file must hold a mapping, and no mapping in it may repeat a key (the
message names the key and both lines).

An override's key is a dotted path through the model:

- a section (a nested model) or a mapping: the next segment is a key
  (``optim.lr=1e-6``, ``agents.agents.verify.kind=oracle``);
- a list: the next segment is an item's index (``servers.0.port=30001``); a list
  the file does not set starts from the model's default;
- a free-form mapping whose values cannot be mappings themselves (OpenRLHF's flags):
  the rest of the path is one key, dots included
  (``openrlhf.actor.adam.lr=1e-6`` sets the key ``actor.adam.lr``); the same holds
  in any mapping that already has the rest of the path as a key.

Override values, like the values in a file, are read as YAML: ``a.b=3`` (int),
``a.b=0.5``/``a.b=1e-6`` (float), ``a.b=true`` (bool), ``a.b=[1, 2]`` (list),
``a.b=null`` (None), anything else a string. Unlike plain YAML 1.1, ``1e-6``
(an exponent without a dot) is a float in files too.
"""

from __future__ import annotations

import collections.abc
import re
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

import annotated_types
import yaml
from pydantic import BaseModel, TypeAdapter, ValidationError

M = TypeVar("M", bound=BaseModel)

_RANGE_ERRORS = {"greater_than", "greater_than_equal", "less_than", "less_than_equal"}
_LIST_ORIGINS = (list, tuple, set, frozenset, collections.abc.Sequence, collections.abc.Set)
_DICT_ORIGINS = (dict, collections.abc.Mapping, collections.abc.MutableMapping)


class ConfigError(ValueError):
    """A config file or override is invalid; the message has one line per problem."""


#: Values that YAML aliases (``*name``) may add to a config by repeating what an anchor
#: holds. A config that reuses a section a few times stays far below; an alias bomb
#: (each list repeating the one before) goes far above in a few hundred bytes.
MAX_ALIAS_VALUES = 10_000


class _YAMLRefusal(Exception):
    """YAML the loader refuses (raised while composing or constructing, reworded by the caller).

    ``line`` is the 1-based line it concerns, when known.
    """

    def __init__(self, message: str, line: int | None = None) -> None:
        super().__init__(message)
        self.line = line


class _DuplicateKey(_YAMLRefusal):
    """A YAML mapping repeats a key."""


def _count_values(node: yaml.Node, limit: int) -> int:
    """Values under ``node`` (itself included) as its aliases expand, counted up to ``limit`` + 1."""
    count, stack = 0, [node]
    while stack and count <= limit:
        current = stack.pop()
        count += 1
        if isinstance(current, yaml.SequenceNode):
            stack.extend(current.value)
        elif isinstance(current, yaml.MappingNode):
            stack.extend(part for pair in current.value for part in pair)
    return count


class _ConfigYAMLLoader(yaml.SafeLoader):
    """PyYAML's safe loader that refuses repeated keys, alias bombs and unreadable integers,
    and reads ``1e-6`` as a float."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._alias_values = 0

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node | None:
        # Counted where an alias is met, before anything is built from it: the expansion
        # is what exhausts memory later (validating, dumping), not the shared nodes.
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            node = self.anchors.get(event.anchor)
            if node is not None:
                budget = MAX_ALIAS_VALUES - self._alias_values
                self._alias_values += _count_values(node, budget)
                if self._alias_values > MAX_ALIAS_VALUES:
                    raise _YAMLRefusal(
                        f"YAML aliases (*{event.anchor} and others) would repeat more than "
                        f"{MAX_ALIAS_VALUES} values; write the values out instead",
                        event.start_mark.line + 1,
                    )
        return super().compose_node(parent, index)

    def construct_yaml_int(self, node: yaml.ScalarNode) -> int:
        try:
            return super().construct_yaml_int(node)
        except ValueError:  # Python refuses to read integers of more than 4300 digits
            digits = sum(c.isdigit() for c in str(node.value))
            raise _YAMLRefusal(
                f"an integer of {digits} digits is too long to read; no setting needs one",
                node.start_mark.line + 1,
            ) from None

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # '<<' merges are meant to be overridden by the keys beside them
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            try:
                first = seen.setdefault(key, line)
            except TypeError:
                continue  # an unhashable key: the base class reports it
            if first != line:
                raise _DuplicateKey(f"duplicate key {key!r} on line {line} (first on line {first})")
        return super().construct_mapping(node, deep=deep)


_ConfigYAMLLoader.add_constructor("tag:yaml.org,2002:int", _ConfigYAMLLoader.construct_yaml_int)


# YAML 1.1 needs a dot in a float ("1e-6" is a string to PyYAML); accept exponent floats too.
_ConfigYAMLLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d+\.?\d*|\.\d+)[eE][-+]?\d+$"),
    list("-+0123456789."),
)


def _read_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_ConfigYAMLLoader)


def _yaml_position(exc: yaml.YAMLError) -> str:
    """``:LINE:COLUMN`` (1-based) of a YAML error, where PyYAML knows it."""
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    return f":{mark.line + 1}:{mark.column + 1}" if mark is not None else ""


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """PyYAML's description of the problem, on one line."""
    parts = [getattr(exc, "context", None), getattr(exc, "problem", None)]
    text = "; ".join(p for p in parts if p) or str(exc)
    return " ".join(text.split())


def load_yaml(path: str | Path) -> dict[str, Any]:
    """The mapping a YAML config file holds (``{}`` for an empty file).

    Raises:
        FileNotFoundError: there is no such file.
        ConfigError: the file is not valid YAML, repeats a key in a mapping (the
            message names the key and its lines), or does not hold a mapping.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} not found")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise ConfigError(
            f"{path}:{line}: not UTF-8 text (byte 0x{data[exc.start]:02x}); save the file as UTF-8"
        ) from None
    try:
        loaded = _read_yaml(text)
    except _DuplicateKey as exc:
        raise ConfigError(f"{path}: {exc}") from None
    except _YAMLRefusal as exc:
        raise ConfigError(f"{path}:{exc.line}: {exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(
            f"{path}{_yaml_position(exc)}: not valid YAML: {_yaml_problem(exc)}"
        ) from None
    if loaded is not None and not isinstance(loaded, dict):
        raise ConfigError(f"{path}: expected a YAML mapping at the top level, got {loaded!r}")
    return loaded or {}


def parse_value(text: str) -> Any:
    """An override value parsed as a YAML scalar or flow collection (text if it is not YAML)."""
    try:
        return _parse_value(text)
    except _YAMLRefusal as exc:  # a duplicate key, an alias bomb, an unreadable integer
        raise ConfigError(f"value {_clip(text)}: {exc}") from None


def _parse_value(text: str) -> Any:
    """:func:`parse_value`, raising :class:`_YAMLRefusal` for what the loader refuses."""
    if not text.strip():
        return ""
    try:
        return _read_yaml(text)
    except yaml.YAMLError:
        return text


def _clip(text: str, width: int = 40) -> str:
    """``text`` for a one-line message: at most ``width`` characters, then its length."""
    return text if len(text) <= width else f"{text[:width]}... ({len(text)} characters)"


# ---------------------------------------------------------------------------
# The shape of a model, as an override path or a validation error walks it.


def _strip(annotation: Any) -> Any:
    """``annotation`` without ``Annotated`` and ``| None``; a union of several types stays."""
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _strip(typing.get_args(annotation)[0])
    if origin is typing.Union or origin is types.UnionType:
        members = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(members) == 1:
            return _strip(members[0])
    return annotation


def _is_model(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def _shape(annotation: Any) -> tuple[str, Any]:
    """``("model", cls)``, ``("list", item)``, ``("dict", value)`` or ``("leaf", annotation)``.

    In a union of several types a model wins, then a list or mapping.
    """
    annotation = _strip(annotation)
    origin = typing.get_origin(annotation)
    if origin is typing.Union or origin is types.UnionType:
        shapes = [_shape(member) for member in typing.get_args(annotation)]
        for wanted in ("model", "list", "dict"):
            for shape in shapes:
                if shape[0] == wanted:
                    return shape
        return ("leaf", annotation)
    if _is_model(annotation):
        return ("model", annotation)
    args = typing.get_args(annotation)
    if origin in _LIST_ORIGINS or annotation in _LIST_ORIGINS:
        return ("list", args[0] if args else Any)
    if origin in _DICT_ORIGINS or annotation in _DICT_ORIGINS:
        return ("dict", args[1] if len(args) == 2 else Any)
    return ("leaf", annotation)


def _may_hold_mapping(annotation: Any) -> bool:
    """Whether a value of ``annotation`` can be a mapping (so a dotted path may go inside it)."""
    annotation = _strip(annotation)
    origin = typing.get_origin(annotation)
    if origin is typing.Union or origin is types.UnionType:
        return any(_may_hold_mapping(member) for member in typing.get_args(annotation))
    if annotation is Any or annotation is object or isinstance(annotation, typing.TypeVar):
        return True
    return _shape(annotation)[0] in ("model", "dict")


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


def _check_keys(annotation: Any, data: Any, prefix: str, errors: list[str]) -> None:
    """Collect an error for every key of ``data`` that its model does not define, and every
    true/false given for a number.

    Walks sections, list items and mapping values, so a typo anywhere is named by its
    full dotted path with the valid keys at that level.
    """
    kind, inner = _shape(annotation)
    if kind == "leaf" and isinstance(data, bool) and inner in (int, float):
        # pydantic would read true as 1: a switch where a count belongs is a mistake.
        errors.append(
            f"{prefix[:-1]}: {str(data).lower()} is not a number; expected {inner.__name__}"
        )
        return
    if kind == "list" and isinstance(data, list):
        for index, item in enumerate(data):
            _check_keys(inner, item, f"{prefix}{index}.", errors)
        return
    if not isinstance(data, dict):
        return
    if kind == "dict":
        for key, value in data.items():
            _check_keys(inner, value, f"{prefix}{key}.", errors)
        return
    if kind != "model" or _extra_allowed(inner):
        return
    names = _field_names(inner)
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if key not in names:
            where = f"under '{prefix[:-1]}'" if prefix else "at the top level"
            errors.append(
                f"unknown config key '{dotted}'; valid keys {where}: "
                + ", ".join(inner.model_fields)
            )
            continue
        _check_keys(inner.model_fields[names[key]].annotation, value, dotted + ".", errors)


# ---------------------------------------------------------------------------
# Overrides.


def _list_default(model_cls: type[BaseModel] | None, key: str, where: str, override: str) -> list:
    """The default of the list field ``key`` of ``model_cls``, as the data a file would hold."""
    name = _field_names(model_cls).get(key) if model_cls is not None else None
    info = model_cls.model_fields[name] if model_cls is not None and name else None
    if info is None or info.is_required():
        raise ConfigError(
            f"override {override!r}: '{where}' is not set, so it has no items to address; "
            "set the list in the config file"
        )
    default = info.get_default(call_default_factory=True)
    return list(TypeAdapter(info.annotation).dump_python(default, mode="json") or [])


def _list_index(node: list, part: str, where: str, override: str) -> int:
    if not part.isdigit():
        raise ConfigError(
            f"override {override!r}: '{where}' is a list; address its items by index, "
            f"e.g. '{where}.0'"
        )
    index = int(part)
    if index >= len(node):
        held = f"0..{len(node) - 1}" if node else "none, it is empty"
        raise ConfigError(
            f"override {override!r}: '{where}' has {len(node)} item(s); index {index} is out "
            f"of range (valid: {held})"
        )
    return index


def apply_override(data: dict[str, Any], override: str, model_cls: type[BaseModel]) -> None:
    """Apply ``"a.b.c=value"`` to the raw config ``data`` of ``model_cls``, in place.

    The path is read against the model's shape (see the module docstring): keys of
    sections and mappings, indices of lists, and the rest of the path as one key in a
    free-form mapping of flags. Unknown keys are set anyway; :func:`load_config`
    reports them all together with the valid keys.
    """
    key, sep, raw = override.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {override!r} is not of the form key.sub=value")
    parts = key.split(".")
    try:
        value = _parse_value(raw)
    except _YAMLRefusal as exc:
        raise ConfigError(f"override {key}={_clip(raw.strip())}: {exc}") from None
    node: Any = data
    annotation: Any = model_cls
    depth = 0
    while True:
        part = parts[depth]
        where = ".".join(parts[: depth + 1])
        kind, inner = _shape(annotation)
        rest = ".".join(parts[depth:])
        if isinstance(node, dict) and kind == "dict" and depth < len(parts) - 1:
            if not _may_hold_mapping(inner) or rest in node:
                node[rest] = value  # a flag name with dots is one key
                return
        last = depth == len(parts) - 1
        if isinstance(node, list):
            index = _list_index(node, part, ".".join(parts[:depth]), override)
            if last:
                node[index] = value
                return
            child_annotation = inner if kind == "list" else Any
            child = node[index]
        else:
            if kind == "model":
                name = _field_names(inner).get(part)
                child_annotation = inner.model_fields[name].annotation if name else Any
            else:
                child_annotation = inner if kind == "dict" else Any
            if last:
                node[part] = value
                return
            child = node.get(part)
            if child is None:
                if _shape(child_annotation)[0] == "list":
                    child = _list_default(inner if kind == "model" else None, part, where, override)
                else:
                    child = {}
                node[part] = child
        if not isinstance(child, (dict, list)):
            raise ConfigError(
                f"override {override!r}: '{where}' holds {child!r}, not a section with sub-keys"
            )
        node, annotation, depth = child, child_annotation, depth + 1


# ---------------------------------------------------------------------------
# Validation errors, reworded.


def _field_at(model_cls: type[BaseModel], loc: tuple[Any, ...]):
    """The ``FieldInfo`` at a validation error location, if it resolves to one."""
    annotation: Any = model_cls
    info = None
    for part in loc:
        kind, inner = _shape(annotation)
        if kind == "model" and isinstance(part, str):
            name = _field_names(inner).get(part)
            if name is None:
                return None
            info = inner.model_fields[name]
            annotation = info.annotation
        elif (kind == "list" and isinstance(part, int)) or kind == "dict":
            annotation, info = inner, None
        else:
            return None
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


def _reword(model_cls: type[BaseModel], exc: ValidationError) -> dict[str, str]:
    """One message per field (dotted path; ``(config)`` for a whole-model check)."""
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
            shown = "" if isinstance(value, (dict, list)) else f" (got {_clip(repr(value))})"
            messages[field] = f"{field}: {msg}{shown}"
    return messages


def _override_of(field: str, set_by: dict[str, str]) -> str | None:
    """The override that set ``field`` (or a key inside it, or the section holding it), if any."""
    for key in sorted(set_by, key=len, reverse=True):
        if field == key or field.startswith(key + ".") or key.startswith(field + "."):
            return set_by[key]
    return None


def load_config(model_cls: type[M], path: str | Path | None, overrides: Sequence[str] = ()) -> M:
    """Validate ``model_cls`` from the YAML file ``path`` (optional) with ``overrides`` applied.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ConfigError: the file is not a YAML mapping or repeats a key, an override is
            malformed, a key is unknown (the message names its full dotted key and the
            valid keys at that level), or a value is invalid (the message names the
            field and, for a range, the allowed range). All problems are reported
            together.
    """
    data: dict[str, Any] = load_yaml(path) if path is not None else {}
    set_by: dict[str, str] = {}  # dotted key -> the override that set it
    for override in overrides:
        apply_override(data, override, model_cls)
        set_by[override.partition("=")[0].strip()] = override.strip()
    errors: list[str] = []
    _check_keys(model_cls, data, "", errors)
    if errors:
        raise ConfigError("\n".join(errors))
    try:
        return model_cls.model_validate(data)
    except ValidationError as exc:
        messages = _reword(model_cls, exc)
    # The heading says where the bad values came from: the file, the overrides, or both.
    blamed = {field: _override_of(field, set_by) for field in messages if field != "(config)"}
    culprits = list(dict.fromkeys(o for o in blamed.values() if o is not None))
    sources = []
    if path is not None and (len(blamed) < len(messages) or None in blamed.values()):
        sources.append(f"in {path}")
    if culprits:
        noun = "override" if len(culprits) == 1 else "overrides"
        sources.append(f"from {noun} " + ", ".join(_clip(o) for o in culprits))
    heading = " ".join(["invalid config", " and ".join(sources)]).rstrip()
    raise ConfigError(f"{heading}:\n" + "\n".join(messages.values()))
