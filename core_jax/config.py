"""Frozen-dataclass configs loaded from YAML with `--set a.b=value` overrides, validated at load time.

One loader serves every package: a config is a tree of frozen dataclasses, a YAML file fills any subset of its
fields, and command-line overrides win over the file. Unknown keys, ill-typed values and values outside a key's
allowed range are errors that name the key, so a typo never silently trains the wrong model.

Ranges are declared, not scattered: a config dataclass may define `config_rules(section) -> [(dotted key, Rule)]`,
where `section` is its own fully populated section as a nested dict (defaults filled in, values already of the
right type), so a rule may depend on other keys (`model.width` a multiple of `model.heads`). The loader checks
every section's rules top-down before any dataclass is built, and every float without a rule must be finite.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence, TypeVar

import yaml

from core_jax.cli import decode_text

T = TypeVar("T")


class ConfigError(ValueError):
    """A config file or override that does not fit the config's schema."""


class UnknownConfigKey(ConfigError):
    """A config file or override names a key the config does not have."""


def _decoded(data: bytes, what: str) -> str:
    try:
        return decode_text(data, what)
    except ValueError as e:
        raise ConfigError(str(e)) from None


@dataclasses.dataclass(frozen=True)
class Rule:
    """What one config key may hold: `ok(value)` is True for allowed values; `allowed` says which, in words."""

    ok: Callable[[Any], bool]
    allowed: str


def at_least(lo: float) -> Rule:
    """A number >= lo (finite)."""
    return Rule(lambda v: _finite(v) and v >= lo, f">= {lo}")


def between(lo: float, hi: float) -> Rule:
    """A number in [lo, hi] (finite)."""
    return Rule(lambda v: _finite(v) and lo <= v <= hi, f"in [{lo}, {hi}]")


def positive() -> Rule:
    """A finite number > 0."""
    return Rule(lambda v: _finite(v) and v > 0, "a finite number > 0")


def one_of(choices: Sequence[Any]) -> Rule:
    return Rule(lambda v: v in choices, f"one of {list(choices)}")


def each(rule: Rule) -> Rule:
    """Every item of a list satisfies `rule`."""
    return Rule(lambda v: all(rule.ok(x) for x in v), f"a list of items each {rule.allowed}")


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def from_dict(cls: type[T], data: Mapping[str, Any] | None, where: str = "") -> T:
    """Builds dataclass `cls` from a (possibly partial) nested mapping; missing fields keep their defaults.

    Types are checked and coerced first, then every section's `config_rules` (see the module docstring), and only
    then are the dataclasses built, so no `__post_init__` ever sees a value outside its range.
    """
    tree = _coerce_section(cls, data, where)
    _check_rules(cls, tree, where)
    return _build(cls, tree, where)


def validate(cfg: Any, where: str = "") -> None:
    """Checks an already built config (e.g. made with `dataclasses.replace` in Python) against the same rules
    the loader applies; `where` prefixes the keys in the message (e.g. "train." for a TrainConfig)."""
    def tree(v):
        return {f.name: tree(getattr(v, f.name)) for f in dataclasses.fields(v) if f.init} \
            if dataclasses.is_dataclass(v) else v
    _check_rules(type(cfg), tree(cfg), where)


def _init_fields(cls) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls) if f.init}


def _coerce_section(cls: type, data: Mapping[str, Any] | None, where: str) -> dict:
    """{field: coerced value} for every init field of `cls` (nested dataclasses as such dicts), defaults filled."""
    data = dict(data or {})
    fields = _init_fields(cls)
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise UnknownConfigKey(
            f"unknown config key {where + unknown[0]!r}; valid keys here: {', '.join(sorted(fields))}")
    hints = typing.get_type_hints(cls)
    tree = {}
    for name, f in fields.items():
        if name in data:
            value = data[name]
        elif f.default is not dataclasses.MISSING:
            value = f.default
        elif f.default_factory is not dataclasses.MISSING:
            value = f.default_factory()
        else:
            raise ConfigError(f"config key {where + name!r} has no default; give it a value")
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            value = to_dict(value)
        tree[name] = _coerce(hints[name], value, where + name)
    return tree


def _coerce(tp: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            value = to_dict(value)
        if not isinstance(value, Mapping):
            raise ConfigError(f"config key {key!r} is a section; give a mapping, not {value!r}")
        return _coerce_section(tp, value, key + ".")
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"bad value for {key!r}: {value!r}")
    if origin is typing.Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"config key {key!r} must be one of {list(choices)}, got {value!r}")
        return value
    if origin in (tuple, list, Sequence):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key {key!r} expects a list, got {value!r}")
        (item,) = typing.get_args(tp)[:1] or (Any,)
        return tuple(_coerce(item, v, key) for v in value)
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"config key {key!r} expects true/false, got {value!r}")
    if tp is int:
        if isinstance(value, str):
            value = _number(value)
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"config key {key!r} expects an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):
            value = _number(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config key {key!r} expects a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"config key {key!r} expects a string, got {value!r}")
        return value
    return value


# decimal numbers as people type them: 3, -2, 1e-3, 1E3, .5, 5., -2.5e+4, inf, -Infinity, nan, YAML's .inf (no YAML
# 1.1 octal, sexagesimal or underscores: "010" is ten)
_INT_RE = re.compile(r"[+-]?\d+")
_FLOAT_RE = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")
_SPECIAL_RE = re.compile(r"([+-]?)\.?(inf|infinity|nan)", re.IGNORECASE)


def _number(text: str) -> Any:
    """`text` as an int or float when it spells a decimal number (or inf/nan), else unchanged."""
    t = text.strip()
    if _INT_RE.fullmatch(t):
        return int(t)
    if _FLOAT_RE.fullmatch(t):
        return float(t)
    special = _SPECIAL_RE.fullmatch(t)
    if special:
        return float(special.group(1) + special.group(2))
    return text


class _Loader(yaml.SafeLoader):
    """Safe YAML whose plain-scalar numbers are the decimal spellings above (config files and --set values)."""


_NUMBER_TAG = "tag:core_jax,2026:number"
_Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag not in ("tag:yaml.org,2002:int", "tag:yaml.org,2002:float")]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Loader.add_implicit_resolver(
    _NUMBER_TAG, re.compile(f"^(?:{_INT_RE.pattern}|{_FLOAT_RE.pattern}|{_SPECIAL_RE.pattern})$", re.IGNORECASE),
    list("+-0123456789.iInN"))
_Loader.add_constructor(_NUMBER_TAG, lambda loader, node: _number(loader.construct_scalar(node)))


def _load_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - _Loader is a SafeLoader


def _get(tree: Mapping, key: str) -> Any:
    node: Any = tree
    for k in key.split("."):
        node = node[k]
    return node


def _check_rules(cls: type, tree: dict, where: str, ruled: frozenset = frozenset()) -> None:
    """Checks `cls`'s own rules on its section, then every float without a rule is finite, then the subsections.

    `ruled`: the full keys a rule of an enclosing section already decided (they may allow inf).
    """
    rules = list(cls.config_rules(tree)) if hasattr(cls, "config_rules") else []
    for key, rule in rules:
        value = _get(tree, key)
        if value is not None and not rule.ok(value):
            raise ConfigError(f"config key {where + key!r} must be {rule.allowed}, got {value!r}")
    hints = typing.get_type_hints(cls)
    ruled = ruled | {where + key for key, _ in rules}
    for name in _init_fields(cls):
        tp, value = hints[name], tree[name]
        if dataclasses.is_dataclass(tp):
            _check_rules(tp, value, where + name + ".", ruled)
        elif where + name not in ruled and isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"config key {where + name!r} must be a finite number, got {value!r}")
        elif where + name not in ruled and isinstance(value, tuple) and any(
                isinstance(v, float) and not math.isfinite(v) for v in value):
            raise ConfigError(f"config key {where + name!r} must hold finite numbers, got {list(value)!r}")


def _build(cls: type[T], tree: dict, where: str) -> T:
    hints = typing.get_type_hints(cls)
    kwargs = {name: _build(hints[name], value, where + name + ".") if dataclasses.is_dataclass(hints[name])
              else value for name, value in tree.items()}
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except ValueError as e:  # a dataclass's own cross-field check; name the section it came from
        section = where.rstrip(".")
        raise ConfigError(f"{section}: {e}" if section and section + "." not in str(e) else str(e)) from None


def to_dict(cfg: Any) -> dict:
    """Plain nested dict (tuples as lists) for YAML/JSON, the inverse of `from_dict`."""
    def conv(v):
        if dataclasses.is_dataclass(v):
            return {f.name: conv(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, tuple):
            return [conv(x) for x in v]
        return v
    return conv(cfg)


def apply_overrides(data: dict, overrides: Sequence[str]) -> dict:
    """Applies `a.b.c=value` strings to a nested dict, returning a new dict.

    Values are YAML (`true`, `[a, b]`, `{k: v}`, `null`) whose numbers are decimal spellings as people type them
    (`1e-3`, `.5`, `inf`; `010` is ten), unlike YAML 1.1, which reads `1e-3` as a string and `010` as octal.
    """
    out = _deepcopy(data)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key.path=value")
        path, raw = item.split("=", 1)
        keys = path.strip().split(".")
        if not all(keys):
            raise ConfigError(f"override {item!r} has an empty key")
        try:
            value = _load_yaml(raw)
        except yaml.YAMLError as e:
            raise ConfigError(f"override {item!r}: cannot parse value ({e.__class__.__name__})") from None
        node = out
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {k!r} is not a section")
        node[keys[-1]] = value
    return out


def _deepcopy(d):
    return {k: _deepcopy(v) if isinstance(v, dict) else v for k, v in d.items()}


def load_config(cls: type[T], path: str | Path | None = None, overrides: Sequence[str] = ()) -> T:
    """Loads `cls` from a YAML file (optional) plus overrides; errors name the file and key."""
    data: dict = {}
    if path is not None:
        path = Path(path)
        if path.is_dir():
            raise ConfigError(f"config {str(path)!r} is a folder; give a YAML file (see configs/ for the shipped "
                              f"ones)")
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} not found; see configs/ for the shipped ones")
        try:
            data = _load_yaml(_decoded(path.read_bytes(), f"config file {str(path)!r}"))
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {str(path)!r} is not valid YAML: {' '.join(str(e).split())}") \
                from None
        except OSError as e:
            raise ConfigError(f"cannot read config file {str(path)!r}: {e.strerror}") from None
        if data is None:
            raise ConfigError(f"config file {str(path)!r} is empty; give at least its name and the sections "
                              f"you change (see configs/)")
        if not isinstance(data, dict):
            raise ConfigError(f"config file {str(path)!r} must hold a mapping at top level")
    data = apply_overrides(data, overrides)
    return from_dict(cls, data)


def replace(cfg: T, **changes) -> T:
    """`dataclasses.replace` that also accepts dotted keys: replace(cfg, **{'model.width': 64})."""
    data = to_dict(cfg)
    for key, value in changes.items():
        node = data
        *parents, last = key.split(".")
        for k in parents:
            node = node[k]
        node[last] = to_dict(value) if dataclasses.is_dataclass(value) else value
    return from_dict(type(cfg), data)
