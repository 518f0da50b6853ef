"""
JSON-lines logs (the feature cache's sample log, the downstream answer log) and the one policy for a
torn last line, the half-written line a killed process leaves: it is never read as a record.

- Readers take the complete lines only (`complete_text`): a last line without its newline is dropped
  (the sample it held is extracted or asked again).
- A log with one writer (each process's answer log) cuts a torn tail off before appending
  (`cut_torn_tail`), so the file stays whole JSON lines and any other bad line is a real defect.
- A log many processes append to at once (the cache's sample log) closes a torn tail with a newline
  instead (`append_lines`): cutting could drop a line another process is writing; its readers skip
  the closed fragment.
"""

import json
import os


def complete_text(path):
    """(the text of path up to its last newline, whether a torn last line was dropped); ("", False)
    for a missing file."""
    text = path.read_text() if path.exists() else ""
    if text and not text.endswith("\n"):
        return text[: text.rfind("\n") + 1], True
    return text, False


def cut_torn_tail(path):
    """One writer: drop a torn last line from the file itself before appending to it."""
    text, torn = complete_text(path)
    if torn:
        path.write_text(text)


def append_lines(path, records):
    """Append records as JSON lines with one write() under O_APPEND: concurrent writers never
    interleave within a line. A torn last line is closed first, so the new lines never glue onto
    it."""
    if not records:
        return
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        size = os.fstat(fd).st_size
        torn = size > 0 and os.pread(fd, 1, size - 1) != b"\n"
        os.write(
            fd,
            ("\n" if torn else "").encode()
            + "".join(json.dumps(r) + "\n" for r in records).encode(),
        )
    finally:
        os.close(fd)
