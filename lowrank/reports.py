"""
Report files every script writes the same way: CSV tables safe to open in a spreadsheet (a cell that
starts with = + - @, a tab or a carriage return is prefixed with a quote, so '=HYPERLINK(...)' from
a question stays text).
"""

import csv
import numbers

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
