"""Settings declared once: each is a dataclass field whose metadata says what it means.

    size: int | None = setting(None, "workers in the pool", minimum=1, maximum=64,
                               none="one per NeuronCore on neuron, else 2")

The field gives the name, the type and the default; `setting()` adds the help, the unit,
the bounds and what 0 or "unset" mean. Everything else is derived from that one place:
the command-line flag (`--pool-size`), the environment variable (`EXECUTOR_POOL_SIZE`),
conversion of flag and environment strings, the bounds check with a message that names
the setting, and the reference table in docs/configuration.md (a test keeps it current).

Precedence when the service builds its config: a flag wins over the environment
variable, which wins over the default.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

ENV_PREFIX = "EXECUTOR_"
_METADATA_KEY = "warm_pool.setting"
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


class ConfigError(ValueError):
    """A setting is invalid; the message names the setting, its flag and its variable."""


@dataclass(frozen=True)
class Spec:
    """What `setting()` records about a field beyond its name, type and default."""

    help: str
    unit: str | None = None
    minimum: float | None = None
    maximum: float | None = None
    choices: tuple[str, ...] | None = None
    zero: str | None = None    # what 0 means, when 0 means something of its own
    none: str | None = None    # what leaving it unset means, when the default is None
    flag: bool = True          # False: environment only (secrets never go on a command line)
    repeat: bool = False       # a list whose flag may be given several times (values add up)
    separator: str = ","       # what separates a list's items in its environment variable
    secret: bool = False       # never shown in docs defaults or logs


def setting(default: Any = dataclasses.MISSING, help: str = "", *,  # noqa: A002 - the natural name
            default_factory: Any = dataclasses.MISSING, **spec: Any) -> Any:
    """A dataclass field that is also an operator setting (see the module docstring)."""
    metadata = {_METADATA_KEY: Spec(help=help, **spec)}
    shown = not spec.get("secret", False)  # a secret's value stays out of the object's repr
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=metadata, repr=shown)
    return dataclasses.field(default=default, metadata=metadata, repr=shown)


@dataclass(frozen=True)
class Setting:
    """One declared setting, resolved from its field."""

    name: str
    kind: type            # int, float, str, bool, Path, or tuple (of str or int)
    item: type | None     # the element type when kind is tuple
    optional: bool        # None is a valid value
    default: Any
    spec: Spec

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.name.upper()

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def label(self) -> str:
        """How a message names it: `pool_size (--pool-size / EXECUTOR_POOL_SIZE)`."""
        where = f"{self.flag} / {self.env}" if self.spec.flag else self.env
        return f"{self.name} ({where})"

    def convert(self, raw: Any, source: str) -> Any:
        """A flag or environment string as this setting's type; ConfigError naming `source`."""
        if not isinstance(raw, str):
            return raw
        text = raw.strip()
        if text == "" and self.optional:
            return None
        if self.kind is bool:
            if text.lower() in _TRUE:
                return True
            if text.lower() in _FALSE or text == "":
                return False
            raise ConfigError(f"{self.name} ({source}) must be true or false, not {raw!r}")
        if self.kind is tuple:
            parts = [p.strip() for p in text.split(self.spec.separator) if p.strip()]
            return tuple(self._scalar(self.item or str, p, source) for p in parts)
        return self._scalar(self.kind, text, source)

    def _scalar(self, kind: type, text: str, source: str) -> Any:
        try:
            return kind(text)
        except (TypeError, ValueError):
            words = {int: "a whole number", float: "a number"}.get(kind, kind.__name__)
            raise ConfigError(f"{self.name} ({source}) must be {words}, not {text!r}") from None

    def check(self, value: Any) -> None:
        """Raise ConfigError naming this setting when `value` is out of its bounds."""
        if value is None:
            if not self.optional:
                raise ConfigError(f"{self.label} must be set")
            return
        values = value if self.kind is tuple else (value,)
        for v in values:
            self._check_one(v)

    def _check_one(self, value: Any) -> None:
        spec = self.spec
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{self.label} must be a finite number, not {value!r}")
        if spec.choices is not None and str(value) not in spec.choices:
            raise ConfigError(f"{self.label} must be one of {', '.join(spec.choices)}, not {value!r}")
        low, high = spec.minimum, spec.maximum
        if low is not None and value < low:
            rule = f"between {low:g} and {high:g}" if high is not None else f"at least {low:g}"
            raise ConfigError(f"{self.label} must be {rule}, not {value!r}")
        if high is not None and value > high:
            rule = f"between {low:g} and {high:g}" if low is not None else f"at most {high:g}"
            raise ConfigError(f"{self.label} must be {rule}, not {value!r}")

    def describe_default(self) -> str:
        """The default as the docs show it."""
        if self.spec.secret or self.default is None:
            return self.spec.none or "unset"
        if isinstance(self.default, bool):
            return "true" if self.default else "false"
        if isinstance(self.default, tuple):
            return self.spec.separator.join(map(str, self.default)) or self.spec.none or "(empty)"
        if isinstance(self.default, float) and self.default.is_integer():
            text = str(int(self.default))
        else:
            text = str(self.default)
        return f"{text} {self.spec.unit}" if self.spec.unit else text


def declared(cls: type) -> tuple[Setting, ...]:
    """The settings a dataclass declares, in field order."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        spec = f.metadata.get(_METADATA_KEY)
        if spec is None:
            continue
        kind, item, optional = _resolve(hints[f.name])
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        out.append(Setting(f.name, kind, item, optional, default, spec))
    return tuple(out)


def label(cls: type, name: str) -> str:
    """How messages name setting `name` of `cls`: `pool_size (--pool-size / EXECUTOR_POOL_SIZE)`."""
    found = next((s for s in declared(cls) if s.name == name), None)
    if found is None:
        raise KeyError(f"{cls.__name__} declares no setting {name!r}")
    return found.label


def _resolve(hint: Any) -> tuple[type, type | None, bool]:
    """(kind, tuple item type, optional) for a field's type hint."""
    optional = False
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        optional = len(args) < len(typing.get_args(hint))
        hint = args[0]
    if typing.get_origin(hint) is tuple:
        return tuple, typing.get_args(hint)[0], optional
    return hint, None, optional


def check_all(obj: Any) -> None:
    """Check every declared setting of a config object against its bounds."""
    for s in declared(type(obj)):
        s.check(getattr(obj, s.name))


def add_arguments(parser: argparse.ArgumentParser, classes: Iterable[type]) -> None:
    """One flag per setting; their defaults stay None so the environment can fill in."""
    for cls in classes:
        for s in declared(cls):
            if not s.spec.flag:
                continue
            if s.kind is bool:
                parser.add_argument(s.flag, dest=s.name, action=argparse.BooleanOptionalAction,
                                    default=None, help=f"{s.spec.help} [env {s.env}, default "
                                                       f"{s.describe_default()}]")
            else:
                parser.add_argument(s.flag, dest=s.name, default=None, metavar=s.name.upper(),
                                    action="append" if s.spec.repeat else "store",
                                    help=f"{s.spec.help} [env {s.env}, default {s.describe_default()}]")


def from_sources(cls: type, args: argparse.Namespace | None, environ: Mapping[str, str],
                 **given: Any) -> dict[str, Any]:
    """The values of cls's settings: flag, else environment variable, else default.

    `given` overrides all three (values computed by the caller, not settings).
    """
    values: dict[str, Any] = {}
    for s in declared(cls):
        if s.name in given:
            continue
        raw = getattr(args, s.name, None) if args is not None else None
        if isinstance(raw, list):  # a repeated flag: its values add up
            raw = s.spec.separator.join(raw)
        if raw is not None:
            values[s.name] = s.convert(raw, s.flag)
        elif s.env in environ:
            values[s.name] = s.convert(environ[s.env], s.env)
    values.update(given)
    return values


def markdown_table(classes: Iterable[type], names: Iterable[str] | None = None) -> str:
    """The reference table of the classes' settings (those named, or all) for the docs."""
    wanted = None if names is None else set(names)
    rows = ["| flag | environment variable | default | meaning |", "| --- | --- | --- | --- |"]
    for cls in classes:
        for s in declared(cls):
            if wanted is not None and s.name not in wanted:
                continue
            flag = f"`{s.flag}`" if s.spec.flag else "(environment only)"
            meaning = s.spec.help
            if s.spec.choices:
                meaning += f" ({', '.join(f'`{c}`' for c in s.spec.choices)})"
            if s.spec.zero:
                meaning += f"; 0: {s.spec.zero}"
            rows.append(f"| {flag} | `{s.env}` | {s.describe_default()} | {meaning} |")
    return "\n".join(rows) + "\n"
