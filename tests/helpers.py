"""What several test files share: a script run in this process as a user's shell would see it, or
started as a real process; small trainings and answer runs; waits that time out with a message;
the one-line error checks."""

import contextlib
import importlib
import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import train_real_data
import vqa_eval
from lowrank import encoders, feature_cache
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


ENV = dict(os.environ, OMP_NUM_THREADS="1")


SMALL = ["--rank", "8", "--hidden", "16", "--batch_size", "8", "--device", "cpu"]


# a training that cannot finish before it is stopped
ENDLESS = ["--epochs", "1000000", "--patience", "1000000"]


def train(cache, out, *extra):
    return train_real_data.main(
        ["--cache_dir", str(cache), "--results_dir", str(out), *SMALL, *extra]
    )


def ctrl_c_as_a_terminal_sends_it():
    """The child starts with SIGINT at its default, as in a terminal, so Python turns it into
    KeyboardInterrupt: a suite started in the background of a shell without job control inherits
    SIGINT ignored, and the Ctrl-C below would never arrive."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start_script(name, *args, **kw):
    """Start a root script as a real process (signals, locks, kill -9 need one)."""
    return subprocess.Popen(
        [sys.executable, str(ROOT / name), *map(str, args)],
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=ctrl_c_as_a_terminal_sends_it,
        **kw,
    )


def error_line(stderr):
    """The last line of a process's stderr: one 'error:' line, no traceback."""
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    assert lines and lines[-1].startswith("error: ") and "Traceback" not in stderr, stderr[-2000:]
    return lines[-1]


def one_line_error(r):
    """A user error: exit status != 0, one 'error:' line on stderr, no traceback."""
    assert r.returncode != 0, r.stdout[-1000:]
    assert "Traceback" not in r.stderr, r.stderr[-2000:]
    lines = [
        l for l in r.stderr.splitlines() if l.strip() and "it/s]" not in l and "img/s]" not in l
    ]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr[-2000:]
    return lines[0]


def last_error_line(r):
    """A refusal: exit status != 0, no traceback, the last line an 'error:' one (argparse's
    prefixed with the script's name)."""
    lines = [line for line in r.stderr.strip().splitlines() if line.strip()]
    assert r.returncode != 0 and lines and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert lines[-1].startswith(("error: ", f"{Path(r.args[1]).name}: error: ")), r.stderr[-2000:]
    return lines[-1]


def wait_until(done, proc, what, timeout=300):
    """Poll done() until it holds; fails with what was awaited (and the process's output if it
    ended) rather than hang. The processes these tests race cannot finish on their own before the
    event (an epoch count they cannot reach, a holder that sleeps until killed), so only the timeout
    depends on the machine's speed."""
    t = time.time()
    while time.time() - t < timeout:
        if done():
            return
        assert proc.poll() is None, (
            f"the process ended before {what}: " + "".join(proc.communicate())[-3000:]
        )
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def wait_for_lock(folder, proc, timeout=300):
    """Until the process holding folder's lock has written its PID there."""
    lock = Path(folder) / feature_cache.LOCK
    wait_until(
        lambda: lock.exists() and lock.read_text().startswith(str(proc.pid)),
        proc,
        f"{proc.pid} to lock",
    )


def vqa_run(trained, out, *extra):
    return vqa_eval.main(
        [
            "--results_dir",
            str(trained),
            "--model",
            encoders.TINY,
            "--limit",
            "2",
            "--max_new_tokens",
            "3",
            "--out_dir",
            str(out),
            "--device",
            "cpu",
            "--svd_ranks",
            "8",
            "--nn_ranks",
            "",
            "--rules",
            "random",
            "--keep",
            "16",
            *extra,
        ]
    )
