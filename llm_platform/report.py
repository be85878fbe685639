"""Plain-text tables and JSON output shared by every command that reports figures."""

from __future__ import annotations

import json
from pathlib import Path


def format_table(rows: list[dict], columns: list[str] | None = None, floatfmt: str = ".3g") -> str:
    """A fixed-width table of ``rows`` (dicts), one column per key, in first-seen order."""
    columns = columns or list(dict.fromkeys(key for row in rows for key in row))

    def cell(value) -> str:
        return format(value, floatfmt) if isinstance(value, float) else str(value)

    cells = [[cell(row.get(col, "")) for col in columns] for row in rows]
    widths = [max([len(col)] + [len(r[i]) for r in cells]) for i, col in enumerate(columns)]
    line = "  ".join(col.ljust(w) for col, w in zip(columns, widths))
    rule = "  ".join("-" * w for w in widths)
    body = ["  ".join(c.rjust(w) if _numeric(c) else c.ljust(w) for c, w in zip(r, widths)) for r in cells]
    return "\n".join([line, rule, *body])


def write_json(path: str | Path, payload: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")


def _numeric(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True
