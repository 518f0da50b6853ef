"""Every script's --help: each flag has help text and a shown default; the flag reference is
generated from the parsers; train.sh passes its positionals to the parser, whose defaults are the
one source."""

import importlib
import importlib.util
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def load_gen_flags():
    spec = importlib.util.spec_from_file_location("gen_flags", ROOT / "docs" / "gen_flags.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    return gen


GEN = load_gen_flags()
SCRIPTS = GEN.SCRIPTS  # every script with flags


def test_every_flag_has_help_and_a_shown_default():
    for name in SCRIPTS:
        p = importlib.import_module(name).get_args_parser()
        for parser in [p, *GEN.subcommands(p).values()]:
            assert parser.formatter_class.__name__ == "HelpFormatter", name  # defaults shown
            for a in parser._actions:
                assert a.help and a.help.strip(), (name, a.option_strings)


def test_flag_reference_is_generated_from_the_parsers():
    """docs/flags.md is what docs/gen_flags.py makes from the parsers today (make docs rewrites
    it)."""
    assert (ROOT / "docs" / "flags.md").read_text() == GEN.render(), (
        "docs/flags.md is stale: run make docs"
    )


def test_readmes_link_the_flag_reference():
    for r in ("README.md", "README.zh-CN.md"):
        assert "docs/flags.md" in (ROOT / r).read_text(), r


def test_help_shows_defaults():
    out = subprocess.run(
        [sys.executable, str(ROOT / "compare_svd_nn.py"), "--help"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    out = " ".join(out.split())
    assert "(default: 64)" in out and "(default: test)" in out


def fake_python(tmp_path):
    f = tmp_path / "py"
    f.write_text('#!/bin/bash\necho "ARGS: $@"\n')
    f.chmod(0o755)
    return str(f)


def train_sh(tmp_path, *args):
    env = {"PYTHON": fake_python(tmp_path), "PATH": "/usr/bin:/bin"}
    return subprocess.run(
        [str(ROOT / "train.sh"), *args], capture_output=True, text=True, env=env, check=True
    ).stdout


def test_train_sh_flags_only_and_positionals_then_flags(tmp_path):
    # the parser's defaults apply
    out = train_sh(tmp_path, "--cache_dir", "X", "--arch", "subspace")
    assert "train_real_data.py --cache_dir X --arch subspace" in out and "--batch_size" not in out
    out = train_sh(tmp_path, "4", "2")
    assert "train_real_data.py --batch_size 4 --epochs 2\n" in out
    out = train_sh(tmp_path, "4", "2", "1e-3", "16", "0", "0", "--arch", "subspace")
    assert (
        "--batch_size 4 --epochs 2 --lr 1e-3 --rank 16 --lambda_B 0 --lambda_ortho 0 --arch subspace"
        in out
    )
    out = train_sh(tmp_path, "--help")
    assert out.startswith("usage: ./train.sh [batch_size]") and "ARGS:" in out and "--help" in out


def test_flag_reference_covers_every_script_that_runs():
    runs = {
        p.stem
        for p in ROOT.glob("*.py")
        if not p.stem.startswith("test_") and '__name__ == "__main__"' in p.read_text()
    }
    assert set(SCRIPTS) == runs
