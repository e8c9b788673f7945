"""Bytes for the app's downloads: figures as PNG/SVG, numbers as CSV/NPZ/JSON (no streamlit here)."""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Mapping, Sequence
from types import ModuleType
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from matplotlib.figure import Figure

FIGURE_DPI = 150
MIME = {
    "png": "image/png",
    "svg": "image/svg+xml",
    "csv": "text/csv",
    "npz": "application/octet-stream",
    "json": "application/json",
}


def paper_figures() -> ModuleType:
    """`vitviz.plots.paper`, imported on first use. It brings matplotlib (most of a second of CPU to import),
    which pages need only to render a download, so a page is drawn without it."""
    from vitviz.plots import paper

    return paper


def figure_bytes(fig: Figure, fmt: str) -> bytes:
    """A matplotlib figure rendered as PNG or SVG, the way `vitviz.plots.paper.save_figure` writes it."""
    if fmt not in ("png", "svg"):
        raise ValueError(f"figures are exported as png or svg, not {fmt!r}")
    buffer = io.BytesIO()
    fig.savefig(buffer, format=fmt, dpi=FIGURE_DPI, bbox_inches="tight", facecolor="white")
    return buffer.getvalue()


def npz_bytes(arrays: Mapping[str, Any]) -> bytes:
    """Arrays as a compressed .npz; every value must be a plain numeric or string array (no objects)."""
    clean = {}
    for name, value in arrays.items():
        array = np.asarray(value)
        if array.dtype == object:
            raise ValueError(f"{name}: object arrays would need pickle to load; convert them first")
        clean[_array_name(name)] = array
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **clean)
    return buffer.getvalue()


def csv_bytes(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> bytes:
    """Rows as UTF-8 CSV with a header line; floats keep full precision."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    for row in rows:
        writer.writerow([_cell(value) for value in row])
    return buffer.getvalue().encode("utf-8")


def records_csv_bytes(records: Sequence[Mapping[str, Any]]) -> bytes:
    """Dict records (e.g. metrics.jsonl) as CSV: the union of their keys as columns, in first-seen order."""
    columns = list(dict.fromkeys(key for record in records for key in record))
    return csv_bytes(columns, [[record.get(column, "") for column in columns] for record in records])


def matrix_csv_bytes(matrix: np.ndarray, row_name: str, column_names: Sequence[str]) -> bytes:
    """A 2-D table with 1-based row numbers in the first column."""
    matrix = np.asarray(matrix)
    rows = [[index + 1, *values] for index, values in enumerate(matrix.tolist())]
    return csv_bytes([row_name, *column_names], rows)


def json_bytes(document: Any) -> bytes:
    return (json.dumps(document, indent=2, default=_json_default) + "\n").encode("utf-8")


def safe_stem(text: str, limit: int = 60) -> str:
    """A file-name stem made of letters, digits, '.', '_' and '-' from any text (e.g. a model key)."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-.")
    return (stem or "vitviz")[:limit]


def _array_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_]+", "_", name).strip("_") or "array"


def _cell(value: Any) -> Any:
    if isinstance(value, (float, np.floating)):
        return repr(float(value))
    if isinstance(value, np.integer):
        return int(value)
    return "" if value is None else value


def _json_default(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    return str(value)
