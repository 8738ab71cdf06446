"""Quoting names and text into SQL text where DuckDB cannot take them as parameters.

Column names come from files that others deliver and paths from configuration; DuckDB binds
values (``?``) but not identifiers, nor the file names of ``COPY ... TO`` and of table
functions in every position, so those are quoted here and nowhere else.
"""

from __future__ import annotations

import os


class UnsafeSqlText(ValueError):
    """A name or text that cannot be put into SQL safely (it holds a NUL character)."""


def _checked(text: str) -> str:
    if "\0" in text:
        raise UnsafeSqlText(f"{text!r} holds a NUL character, which SQL text cannot carry")
    return text


def quote_identifier(name: str) -> str:
    """``name`` as a double-quoted SQL identifier: ``a"b`` becomes ``"a""b"``."""
    return '"' + _checked(str(name)).replace('"', '""') + '"'


def quote_literal(text: str | os.PathLike[str]) -> str:
    """``text`` (a path, say) as a single-quoted SQL string: ``it's`` becomes ``'it''s'``."""
    return "'" + _checked(os.fspath(text)).replace("'", "''") + "'"
