"""
The answer log of a downstream run (vqa_eval.py): <out_dir>/<stem>.jsonl, and one log per process
under torchrun (<stem>.rank<r>.jsonl). Whole JSON lines, appended; the first line holds the run's
settings, every line their hash, so answers of other settings are never taken as this run's. Each
log has one writer (its process): a torn last line is cut off before appending (jsonl.py's policy).
"""

import hashlib
import json
import re
from pathlib import Path

from lowrank.cli import UserError
from lowrank.jsonl import complete_text, cut_torn_tail


def settings_hash(settings):
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]


class AnswerLog:
    """The logs of one run, named by its stem (e.g. vqa_test): found by exact names, never by a
    pattern built from user text."""

    def __init__(self, out_dir, stem, settings):
        self.dir, self.stem, self.settings = Path(out_dir), stem, settings
        self.h = settings_hash(settings)

    def path(self, rank=None):
        """The log a process appends to: <stem>.jsonl, or <stem>.rank<r>.jsonl under torchrun."""
        return self.dir / (
            f"{self.stem}.jsonl" if rank is None else f"{self.stem}.rank{rank}.jsonl"
        )

    def paths(self):
        """Every log of this run that exists: the single-process log, then the per-process ones."""
        own = re.compile(re.escape(self.stem) + r"\.rank\d+\.jsonl")
        ranks = (
            sorted(p for p in self.dir.iterdir() if own.fullmatch(p.name))
            if self.dir.is_dir()
            else []
        )
        return ([self.path()] if self.path().exists() else []) + ranks

    def read(self, talk=True):
        """{(sample, condition): record} of every answer in the run's logs. A log of other settings,
        or lines of another run glued on, are refused. A torn last line (a killed write) is not an
        answer: it is asked again."""
        done = {}
        for path in self.paths():
            text, torn = complete_text(path)
            if torn:
                if talk:
                    print(
                        f"note: {path}: its last line was cut off by an interrupted write; that answer is asked again"
                    )
            recs = []
            for n, line in enumerate(text.splitlines(), 1):
                try:
                    recs.append(json.loads(line))
                except ValueError:
                    raise UserError(
                        f"{path}:{n} is not a JSON line; use another --name, or --restart"
                    ) from None
            if recs and recs[0].get("settings") != self.settings:
                raise UserError(
                    f"{path} holds answers made with other settings ({recs[0].get('settings')}); "
                    f"use another --name, or --restart to discard them"
                )
            stranger = next((n for n, r in enumerate(recs[1:], 2) if r.get("h") != self.h), None)
            if stranger:
                raise UserError(
                    f"{path}:{stranger} comes from a run with other settings (logs joined together?); use "
                    f"another --name, or --restart"
                )
            done.update({(r["sample"], r["condition"]): r for r in recs[1:]})
        return done

    def start(self, path):
        """Make path ready for appending: a torn last line cut off, the settings line written to a
        new log."""
        cut_torn_tail(path)
        if not complete_text(path)[0].strip():
            path.write_text(json.dumps({"settings": self.settings, "h": self.h}) + "\n")

    def remove(self):
        """--restart: this run's logs only."""
        for path in self.paths():
            path.unlink()
