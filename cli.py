"""
What every script shares on the command line: the error a user can fix (one `error:` line, no traceback), the help
formatter, the checks of flags that several scripts take, and the launch environment (torchrun). Imports nothing
of the project.
"""

import argparse
import os
import traceback

import torch


class UserError(SystemExit):
    """A mistake the user can fix (bad input, a missing file): printed as one line 'error: ...', exit status 1,
    no traceback. LOWRANK_DEBUG=1 prints the traceback too."""

    def __init__(self, msg):
        super().__init__(f"error: {msg}")


class BadFeature(ValueError):
    """A cached feature file that is unreadable, mis-shaped or non-finite; the message names the file."""


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """--help of every script: the description as written, and each flag's default."""


def run_cli(main, argv=None):
    """Run a script's main(): user errors and bad cache files end as one 'error:' line (exit 1), no traceback."""
    try:
        return main(argv)
    except (UserError, BadFeature) as e:
        if os.environ.get("LOWRANK_DEBUG"):
            traceback.print_exc()
        raise SystemExit(str(e) if isinstance(e, UserError) else f"error: {e}") from None


def parse_ints(spec):
    """'16,32, 64' -> [16, 32, 64]; '' -> []."""
    return [int(v) for v in str(spec).split(",") if v.strip()]


def check_rank(rank, limit, flag="--rank"):
    """A rank must lie in 1..min(T, D), the largest rank a [T, D] feature matrix can have."""
    if not isinstance(rank, int) or not 1 <= rank <= limit:
        raise UserError(
            f"{flag} {rank}: a rank must be between 1 and min(tokens, dim) of the cache's features ({limit})"
        )


def dist_env():
    """(rank, world_size, local_rank) from torchrun's environment; initialises the process group (nccl on CUDA,
    else gloo) when world_size > 1. Without torchrun: (0, 1, 0)."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world == 1:
        return 0, 1, 0
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), world, int(os.environ.get("LOCAL_RANK", 0))
