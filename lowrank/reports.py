"""
Reports every script writes the same way: CSV tables safe to open in a spreadsheet (a cell that
starts with = + - @, a tab or a carriage return is prefixed with a quote, so '=HYPERLINK(...)' from
a question stays text), and tables printed in aligned columns.
"""

import csv
import numbers
from dataclasses import dataclass

FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def safe_cell(value):
    """A spreadsheet shows the value as text, never runs it. Numbers are left as they are (a
    negative number is a number, not a formula)."""
    if isinstance(value, str) and value.startswith(FORMULA_START):
        return "'" + value
    return value if isinstance(value, (numbers.Number, type(None))) else str(value)


def write_csv(path, rows, header=None):
    """rows: dicts (header: their keys, those of the first row unless given) or lists (header
    given)."""
    rows = list(rows)
    if header is None:
        header = list(rows[0]) if rows else []
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow([safe_cell(h) for h in header])
        for r in rows:
            cells = [r.get(k) for k in header] if isinstance(r, dict) else r
            w.writerow([safe_cell(v) for v in cells])


@dataclass(frozen=True)
class Column:
    """A printed table's column: its header, its width, and the text of a row's cell (row -> str).
    The first column is aligned left, the others right."""

    header: str
    width: int
    cell: object


def table_line(columns, cells):
    return "".join(
        f"{c:<{col.width}}" if i == 0 else f"{c:>{col.width}}"
        for i, (c, col) in enumerate(zip(cells, columns))
    )


def print_table(columns, rows):
    """The header, then one line per row."""
    print(table_line(columns, [c.header for c in columns]))
    for r in rows:
        print(table_line(columns, [c.cell(r) for c in columns]))
