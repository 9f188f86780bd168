"""Plain-text and Markdown tables: the one formatter every report and script uses."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def format_table(header: Sequence[str], rows: Sequence[Sequence[Any]], markdown: bool = False) -> str:
    """Columns of numbers right-aligned, text left-aligned; a rule under the header (``|---|`` in Markdown)."""
    cells = [[str(h) for h in header]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    numeric = [len(cells) > 1 and all(_is_number(r[i]) for r in cells[1:]) for i in range(len(header))]
    lines = []
    for r, row in enumerate(cells):
        parts = [c.rjust(w) if numeric[i] else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))]
        if markdown:
            lines.append("| " + " | ".join(parts) + " |")
        else:
            lines.append("  ".join(parts).rstrip())
        if r == 0:
            if markdown:
                # Markdown wants at least one '-' in every rule cell, so a one-character column gets "-:".
                rules = ["-" * max(w - 1, 1) + ":" if numeric[i] else "-" * w for i, w in enumerate(widths)]
                lines.append("| " + " | ".join(rules) + " |")
            else:
                lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _is_number(text: str) -> bool:
    """``1,234``, ``0.5``, ``12%``, ``555.42 M``, ``-`` count as numbers for alignment."""
    stripped = text.replace(",", "").rstrip("%").removesuffix(" M").removesuffix(" G").removesuffix(" k")
    if stripped in ("-", ""):
        return True
    try:
        float(stripped)
    except ValueError:
        return False
    return True
