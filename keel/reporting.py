"""Tables and plots for reports: markdown for Dagster metadata, HTML pages, PNG figures.

Shared by the evaluation and monitoring reports so that a value is formatted, a table escaped
and a figure rendered the same way everywhere. matplotlib is imported only when a figure is
made; figures are plain ``Figure`` objects on the Agg canvas (no pyplot state, nothing to close).
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Iterable, Mapping, Sequence
from typing import Any


def format_value(value: Any) -> str:
    """A table cell as text: ``n/a`` for None, yes/no for booleans, 4 decimals for floats."""
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:,.4f}" if abs(value) < 1000 else f"{value:,.0f}"
    return str(value)


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A GitHub-flavoured markdown table (a ``|`` inside a cell becomes ``/``)."""
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join("---" for _ in headers) + " |"]
    lines += [
        "| " + " | ".join(format_value(v).replace("|", "/") for v in row) + " |" for row in rows
    ]
    return "\n".join(lines)


def html_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """An HTML table with every header and cell escaped."""
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in headers)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(format_value(v))}</td>" for v in row) + "</tr>"
        for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def html_facts(facts: Mapping[str, Any]) -> str:
    """A bulleted list of ``name: value`` lines, escaped."""
    items = "".join(
        f"<li><b>{html.escape(str(k))}</b>: {html.escape(str(v))}</li>" for k, v in facts.items()
    )
    return f"<ul>{items}</ul>"


def new_figure(width: float, height: float, **kwargs: Any) -> Any:
    """A matplotlib ``Figure`` drawn on the Agg canvas (thread-safe, no pyplot state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), **kwargs)
    FigureCanvasAgg(figure)
    return figure


def png_bytes(figure: Any, *, dpi: int = 80, tight: bool = True) -> bytes:
    """The figure as PNG bytes."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight" if tight else None)
    return buffer.getvalue()


def data_uri(png: bytes) -> str:
    """A PNG as a ``data:`` URI, for pages and metadata that must stand alone."""
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def markdown_image(png: bytes, alt: str) -> str:
    """A PNG inlined in markdown, which the Dagster UI renders in asset metadata."""
    return f"![{alt}]({data_uri(png)})"
