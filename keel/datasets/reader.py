"""Reading a dataset.yaml: typed access to its mappings, every error naming the file and key."""

from __future__ import annotations

import re
from typing import Any

NAME = re.compile(r"^[a-z][a-z0-9_]*$")
# MLflow experiments and registered models may also carry hyphens (``team-risk``).
MODEL_NAME = re.compile(r"^[a-z][a-z0-9_-]*$")


class SpecError(ValueError):
    """A dataset specification Keel cannot build a dataset from."""


def fail(where: str, message: str) -> SpecError:
    """The error of the value under ``where`` (``file.key.subkey``), to raise."""
    return SpecError(f"{where}: {message}")


class Reader:
    """Typed access to one mapping of the YAML file, naming the key path in every error."""

    def __init__(self, data: Any, where: str) -> None:
        if not isinstance(data, dict):
            raise fail(where, f"expected a mapping, got {type(data).__name__}")
        self.data, self.where = data, where
        self.used: set[str] = set()

    def _at(self, key: str) -> str:
        return f"{self.where}.{key}"

    def get(self, key: str, kind: type | tuple[type, ...], default: Any = ...) -> Any:
        self.used.add(key)
        if key not in self.data or self.data[key] is None:
            if default is ...:
                raise fail(self._at(key), "is required")
            return default
        value = self.data[key]
        if not isinstance(value, kind) or (isinstance(value, bool) and bool not in _kinds(kind)):
            names = " or ".join(k.__name__ for k in _kinds(kind))
            raise fail(self._at(key), f"expected {names}, got {value!r}")
        return value

    def choice(self, key: str, options: tuple[str, ...], default: Any = ...) -> str:
        value = self.get(key, str, default)
        if value is None and default is None:
            return value
        if value not in options:
            raise fail(self._at(key), f"{value!r} is not one of {', '.join(options)}")
        return value

    def name(self, key: str, default: Any = ...) -> str:
        value = self.get(key, str, default)
        if value is not None and not NAME.match(value):
            raise fail(self._at(key), f"{value!r} must be lower_snake_case")
        return value

    def model_name(self, key: str, default: Any = ...) -> str:
        value = self.get(key, str, default)
        if not MODEL_NAME.match(value):
            raise fail(self._at(key), f"{value!r} must be lower case: letters, digits, _ and -")
        return value

    def names(self, key: str, default: Any = ...) -> tuple[str, ...]:
        values = self.get(key, list, default)
        if values is None:
            return ()
        for value in values:
            if not isinstance(value, str) or not NAME.match(value):
                raise fail(self._at(key), f"{value!r} must be a lower_snake_case name")
        return tuple(values)

    def sub(self, key: str, default: Any = ...) -> Reader:
        return Reader(self.get(key, dict, {} if default is ... else default), self._at(key))

    def done(self) -> None:
        unknown = sorted(set(self.data) - self.used)
        if unknown:
            raise fail(self.where, f"unknown keys {', '.join(unknown)}")


def _kinds(kind: type | tuple[type, ...]) -> tuple[type, ...]:
    return kind if isinstance(kind, tuple) else (kind,)
