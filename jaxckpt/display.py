"""How jaxckpt shows things to people: byte counts, times, shortened text,
HTML tables for notebooks. Pure functions over plain values; every module that
prints or renders uses these, so a size or a time reads the same everywhere.
"""

from __future__ import annotations

import datetime
import html
import math
from typing import Any

_UNITS = ("B", "KiB", "MiB", "GiB", "TiB")


def format_bytes(n: float) -> str:
    """``56 B``, ``256.0 KiB``, ``1.2 GiB``."""
    n, i = float(n), 0
    while n >= 1024 and i < len(_UNITS) - 1:
        n, i = n / 1024, i + 1
    return f"{n:.0f} B" if i == 0 else f"{n:.1f} {_UNITS[i]}"


def format_rate(gbps: float) -> str:
    """A throughput in GB/s: ``1.25 GB/s``, ``312.5 MB/s``."""
    return f"{gbps:.2f} GB/s" if gbps >= 1 else f"{gbps * 1000:.1f} MB/s"


def local_time(timestamp: float, sep: str = " ", invalid: str | None = None) -> str:
    """Local time of a Unix timestamp, to the second (``2026-12-03 08:19:49``;
    ``sep="T"``: ISO 8601). A timestamp read from disk may be anything (NaN,
    a year past 9999): one that is not a valid time is shown as ``invalid``,
    by default the raw number."""
    try:
        return datetime.datetime.fromtimestamp(timestamp).isoformat(sep=sep, timespec="seconds")
    except (OverflowError, OSError, ValueError, TypeError):
        return repr(timestamp) if invalid is None else invalid


def shorten(text: str, n: int) -> str:
    """``text`` cut to at most ``n`` characters, ending in ``...`` when cut."""
    return text if len(text) <= n else text[:n - 3] + "..."


def html_table(header: tuple[str, ...] | None, rows: list[tuple[str, ...]], footer: str | None = None) -> str:
    """An HTML table of plain-text cells (each escaped here); ``header=None``:
    the first cell of each row is its heading (a key/value table)."""
    left = 'style="text-align: left"'
    out = ["<table>"]
    if header is not None:
        out.append("<tr>" + "".join(f"<th {left}>{html.escape(h)}</th>" for h in header) + "</tr>")
    for row in rows:
        cells = [f"<td {left}>{html.escape(c)}</td>" for c in row]
        if header is None:
            cells[0] = f"<th {left}>{html.escape(row[0])}</th>"
        out.append("<tr>" + "".join(cells) + "</tr>")
    if footer is not None:
        width = len(header) if header is not None else max((len(r) for r in rows), default=1)
        out.append(f'<tr><td colspan="{width}" {left}>{html.escape(footer)}</td></tr>')
    out.append("</table>")
    return "\n".join(out)


def jsonable(v: Any) -> Any:
    """Plain JSON: bytes as hex, complex as [re, im], NaN/inf as strings (strict parsers reject them)."""
    if isinstance(v, float) and not math.isfinite(v):
        return "NaN" if math.isnan(v) else ("Infinity" if v > 0 else "-Infinity")
    if isinstance(v, complex):
        return [jsonable(v.real), jsonable(v.imag)]
    if isinstance(v, (bytes, bytearray)):
        return bytes(v).hex()
    if isinstance(v, dict):
        return {str(k): jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [jsonable(x) for x in v]
    return v


def text_table(rows: list[list[str]], out: Any) -> None:
    """Print ``rows`` as left-aligned columns."""
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    for r in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip(), file=out)
