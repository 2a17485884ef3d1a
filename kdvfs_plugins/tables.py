"""One table formatter for the terminal and the docs: aligned plain text, or Markdown.

    table = Table(["granularity", "energy"], [["pass", "-0.92%"], ["kernel", "-1.01%"]],
                  title="model prediction (simulated H100): planned vs executed")
    print(table.text())       # title, then columns padded to their widths (numbers right-aligned)
    print(table.markdown())   # title as a paragraph, then a GitHub table: what the docs show

Plain text has no colours, box characters or terminal codes, so output piped to a file or a log
reads the same as on a terminal. The docs' figure tables are this formatter's Markdown output,
and ``scripts/build_docs.py`` checks them against the command that prints them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence


@dataclass
class Table:
    """``columns``: header names. ``rows``: cells, already formatted as text. ``align``: one of
    "l"/"r" per column (default: the first left, the others right). ``title``: a line above."""

    columns: Sequence[str]
    rows: Sequence[Sequence[object]]
    title: Optional[str] = None
    align: Optional[str] = None
    notes: Sequence[str] = field(default_factory=tuple)

    def _align(self) -> str:
        return self.align or "l" + "r" * (len(self.columns) - 1)

    def _cells(self) -> list[list[str]]:
        return [[str(c) for c in row] for row in self.rows]

    def text(self, indent: str = "  ") -> str:
        """The title, then the header and the rows, each column padded to its widest cell."""
        cells = self._cells()
        widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(self.columns)]

        def line(values) -> str:
            padded = [v.ljust(w) if a == "l" else v.rjust(w) for v, w, a in zip(values, widths, self._align())]
            return (indent + "  ".join(padded)).rstrip()

        out = [self.title] if self.title else []
        out += [line(self.columns)] + [line(r) for r in cells] + [indent + n for n in self.notes]
        return "\n".join(out)

    def markdown(self) -> str:
        """The title as a paragraph, then a GitHub table (``|`` in a cell escaped)."""
        def line(values) -> str:
            return "| " + " | ".join(str(v).replace("|", "\\|") for v in values) + " |"

        rule = "|" + "|".join("---:" if a == "r" else "---" for a in self._align()) + "|"
        out = [self.title, ""] if self.title else []
        out += [line(self.columns), rule] + [line(r) for r in self._cells()]
        if self.notes:
            out += [""] + list(self.notes)
        return "\n".join(out)

    def render(self, fmt: str = "text") -> str:
        """``fmt``: "text" or "markdown"."""
        if fmt == "markdown":
            return self.markdown()
        if fmt == "text":
            return self.text()
        raise ValueError(f"table format {fmt!r}: allowed text | markdown")
