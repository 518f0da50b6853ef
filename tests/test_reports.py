"""lowrank/reports.py: exported tables are safe to open in a spreadsheet."""

import csv

from lowrank import reports


def test_csv_cells_that_a_spreadsheet_would_run_are_quoted(tmp_path):
    rows = [
        {
            "q": '=HYPERLINK("http://x","click")',
            "a": "+1",
            "b": "-cmd",
            "c": "@SUM(A1)",
            "n": -3.5,
            "t": "ok",
        }
    ]
    reports.write_csv(tmp_path / "t.csv", rows)
    got = list(csv.DictReader((tmp_path / "t.csv").open()))[0]
    assert got == {"q": "'=HYPERLINK(\"http://x\",\"click\")", "a": "'+1", "b": "'-cmd", "c": "'@SUM(A1)", "n": "-3.5",
                   "t": "ok"}  # fmt: skip
