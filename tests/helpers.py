"""What several test files share: a script run in this process, as a user's shell would see it."""

import contextlib
import importlib
import io
import subprocess
import sys
from pathlib import Path

from lowrank.cli import run_cli

ROOT = Path(__file__).resolve().parent.parent


def run_script(name, *args):
    """Run a root script's main() through run_cli, as `python <name> <args>` would, in this process
    (an interpreter start costs 2-3 s of imports; the suite runs dozens of refusals) ->
    CompletedProcess with the exit status, stdout and stderr a shell would see: a SystemExit message
    lands on stderr, as Python prints it. For what needs a real process (signals, locks, kill -9,
    torchrun), tests start one."""
    argv = [str(a) for a in args]
    module = importlib.import_module(Path(name).stem)
    out, err, argv0 = io.StringIO(), io.StringIO(), sys.argv[0]
    sys.argv[0] = str(ROOT / name)  # argparse names the program from it ("vqa_eval.py: error: ...")
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                run_cli(module.main, argv)
                code = 0
            except SystemExit as e:
                if isinstance(e.code, str):
                    print(e.code, file=sys.stderr)
                code = 1 if isinstance(e.code, str) else e.code or 0
    finally:
        sys.argv[0] = argv0
    return subprocess.CompletedProcess(
        [sys.executable, name, *argv], code, out.getvalue(), err.getvalue()
    )
