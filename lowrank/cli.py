"""
What every script shares on the command line: the error a user can fix (one `error:` line, no
traceback), the help formatter, the checks of flags that several scripts take, and the launch
environment (torchrun). Imports nothing of the project.
"""

import argparse
import errno
import math
import os
import re
import sys
import traceback
from pathlib import Path
from typing import NamedTuple

import torch


class UserError(Exception):
    """A mistake the user can fix (bad input, a missing file). An ordinary exception, so a notebook,
    a sweep or lmms-eval can catch it; a script's run_cli prints it as one line 'error: ...', exit
    status 1, no traceback (LOWRANK_DEBUG=1 prints the traceback too)."""


class BadFeature(ValueError):
    """A cached feature file that is unreadable, mis-shaped or non-finite; the message names the
    file."""


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """--help of every script: the description as written, and each flag's default (as its help
    states it, where the parser's default is a 'not given' marker)."""

    def _get_help_string(self, action):
        return (
            action.help if "(default:" in (action.help or "") else super()._get_help_string(action)
        )


DISK_ERRORS = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "not permitted",
}


def run_cli(main, argv=None):
    """Run a script's main(): user errors, bad cache files, Ctrl-C and a full or read-only disk end
    as one 'error:' line, no traceback (exit 1; 130 for Ctrl-C). Every write is atomic, so nothing
    half-written is left behind."""
    try:
        return main(argv)
    except (UserError, BadFeature, KeyboardInterrupt, OSError) as e:
        if isinstance(e, OSError) and e.errno not in DISK_ERRORS:
            raise
        if os.environ.get("LOWRANK_DEBUG"):
            traceback.print_exc()
        if isinstance(e, KeyboardInterrupt):
            print(
                "error: interrupted; what was finished is kept (a rerun of the same command resumes: training "
                "with --resume)",
                file=sys.stderr,
            )
            # every finally block has run by now; leave without interpreter shutdown, where a daemon
            # thread still writing (tqdm's monitor) can abort the process with SIGABRT instead of
            # exit status 130
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(130)
        if isinstance(e, OSError):
            raise SystemExit(
                f"error: {DISK_ERRORS[e.errno]}: cannot write {e.filename or 'a file'}; the files "
                f"written before are intact"
            ) from None
        raise SystemExit(f"error: {e}") from None


def parse_ints(spec, flag="a list"):
    """'16,32, 64' -> [16, 32, 64]; '' -> []; anything else is one UserError naming the flag."""
    try:
        return [int(v) for v in str(spec).split(",") if v.strip()]
    except ValueError:
        raise UserError(
            f"{flag} {spec}: expected a comma list of integers, e.g. 16,32,64"
        ) from None


def parse_ranks(spec, limit, flag="--ranks"):
    """A comma list of ranks, none empty, each in 1..limit -> [int]; else one UserError naming the
    flag."""
    ranks = parse_ints(spec, flag)
    if not ranks:
        raise UserError(f"{flag} is empty: give at least one rank, e.g. 16,64")
    for r in ranks:
        check_rank(r, limit, flag)
    return ranks


def out_file(path, flag):
    """An output file's path, checked before any work: not a folder, its folder writable."""
    p = Path(path)
    if p.is_dir():
        raise UserError(f"{flag} {p} is a folder; give a file path")
    parent = p.parent if str(p.parent) else Path(".")
    if parent.exists() and not os.access(parent, os.W_OK):
        raise UserError(f"{flag} {p}: its folder is not writable")
    return p


def out_folder(path, flag):
    """An output folder, checked before any work: not an existing file."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise UserError(f"{flag} {p} is a file; give a folder")
    return p


def _number(kind, lowest, strict):
    """An argparse type: a finite number of kind, at least (strict: above) lowest."""

    def check(text):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{text!r} is not {'an integer' if kind is int else 'a number'}"
            ) from None
        if not math.isfinite(v) or v < lowest or (strict and v == lowest):
            raise argparse.ArgumentTypeError(
                f"{text}: must be a finite number {'above' if strict else 'at least'} {lowest}"
            )
        return v

    check.__name__ = f"{'positive' if strict else 'non-negative'} {kind.__name__}"
    return check


# sizes and counts: 0 would mean an empty batch, an empty run
positive_int = _number(int, 0, strict=True)
nonneg_int = _number(int, 0, strict=False)
positive_float = _number(float, 0.0, strict=True)  # --lr, --grad_clip
nonneg_float = _number(float, 0.0, strict=False)  # loss weights, weight decay


DTYPES = ("float32", "bfloat16", "float16")


def device_arg(text):
    """argparse type of --device: a device this machine has (cpu, cuda, cuda:1), refused at parse
    time."""
    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a device (cpu, cuda, cuda:1)") from None
    if dev.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"{text!r}: the toolkit runs on cpu or cuda")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{text}: this machine has no CUDA device (use cpu)")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(
            f"{text}: this machine has {torch.cuda.device_count()} CUDA devices"
        )
    return text


def add_checkpoint(ap):
    """--rank, --results_dir, --checkpoint: which trained factoriser a report reads (runs.load_run)."""
    ap.add_argument(
        "--rank",
        type=int,
        default=None,
        help="must match the checkpoint's rank (default: its rank)",
    )
    ap.add_argument(
        "--results_dir", default="results", help="a training run's folder (checkpoint, split.json)"
    )
    ap.add_argument("--checkpoint", default=None, help="default: <results_dir>/best_model.pt")


def add_device(ap, what="where it runs"):
    """--device, one definition for every script: default cuda if the machine has one, else cpu
    (under torchrun each process takes cuda:<its local rank>)."""
    ap.add_argument(
        "--device",
        type=device_arg,
        default=None,
        help=f"{what}: cpu, cuda, cuda:1 (default: cuda if available, else cpu)",
    )


def add_dtype(ap, what="model dtype"):
    ap.add_argument(
        "--dtype",
        choices=DTYPES,
        default=None,
        help=f"{what} (default: bfloat16 on CUDA, float32 on CPU)",
    )


def pick_device(name, local_rank=0):
    """--device as given, else cuda:<local rank> when the machine has CUDA, else cpu."""
    return torch.device(name or (f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"))


def check_rank(rank, limit, flag="--rank"):
    """A rank must lie in 1..min(T, D), the largest rank a [T, D] feature matrix can have."""
    if not isinstance(rank, int) or not 1 <= rank <= limit:
        raise UserError(
            f"{flag} {rank}: a rank must be between 1 and min(tokens, dim) of the cache's features ({limit})"
        )


NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]{0,99}")


def run_name(name, flag="--name"):
    """A run's name is a name: letters, digits and _ . + - (at most 100), starting with a letter or
    digit, no path separator, no '..', no pattern characters, and not ending in .rank<N> (a torchrun
    process's log). Output files are built by appending to it, never by replacing a suffix."""
    if name is None:
        return None
    if not NAME.fullmatch(name) or ".." in name or re.search(r"\.rank\d+$", name):
        raise UserError(
            f"{f'{flag} ' if flag else ''}{name!r}: a run's name is a plain name of letters, digits and _ . + - "
            f"(starting with a letter or digit; no '/', '..', wildcards, or a .rank<N> ending)"
        )
    return name


def name_arg(text):
    """An argparse type for a run's name (--name, --study_name): refused at parse time, before any
    work."""
    try:
        return run_name(text, "")
    except UserError as e:
        raise argparse.ArgumentTypeError(str(e).strip()) from None


class Dist(NamedTuple):
    """This process under torchrun: its rank, the number of processes, its rank on this machine."""

    rank: int
    world: int
    local_rank: int


def dist_env():
    """Dist from torchrun's environment; initialises the process group (nccl on CUDA, else gloo)
    when world > 1. Without torchrun: Dist(0, 1, 0)."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world == 1:
        return Dist(0, 1, 0)
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return Dist(dist.get_rank(), world, int(os.environ.get("LOCAL_RANK", 0)))
