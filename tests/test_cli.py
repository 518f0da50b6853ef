"""Every script's --help: each flag has help text and a shown default, and both READMEs list every flag."""
import argparse
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ["qwenvl_dataloader", "train_real_data", "compare_svd_nn", "visualize_svd_nn", "svd_baseline", "bench",
           "bench_extract", "tune", "demo_data", "tokens", "compress", "synth_features", "vqa_eval"]


class Captured(Exception):
    pass


def parser_of(name, monkeypatch):
    """The script's ArgumentParser, caught when its main() parses the arguments."""
    import importlib
    mod = importlib.import_module(name)
    got = {}

    def grab(self, *a, **k):
        got["p"] = self
        raise Captured
    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", grab)
    with pytest.raises(Captured):
        mod.main([])
    return got["p"]


@pytest.mark.parametrize("name", SCRIPTS)
def test_every_flag_has_help_and_is_in_both_readmes(name, monkeypatch):
    p = parser_of(name, monkeypatch)
    assert p.formatter_class.__name__ in ("HelpFormatter", "ArgumentDefaultsHelpFormatter"), name  # defaults shown
    flags = []
    for a in p._actions:
        if isinstance(a, argparse._HelpAction):
            continue
        assert a.help and a.help.strip(), (name, a.option_strings)
        flags += [f for f in a.option_strings if f.startswith("--")]
    for r in ("README.md", "README.zh-CN.md"):
        text = section(r, f"`{name}.py`")
        missing = [f for f in flags if not re.search(re.escape(f) + r"(?![a-zA-Z_])", text)]
        assert not missing, f"{r}'s section on {name}.py does not list {missing}"


def section(readme, title_part):
    """The text of the README section whose heading names the script, up to the next heading of any level."""
    lines, out, inside = (ROOT / readme).read_text().splitlines(), [], False
    for line in lines:
        if line.startswith("#"):
            inside = title_part in line
        elif inside:
            out.append(line)
    assert out, f"{readme} has no section headed with {title_part}"
    return "\n".join(out)


def test_help_shows_defaults():
    out = subprocess.run([sys.executable, str(ROOT / "compare_svd_nn.py"), "--help"], capture_output=True, text=True,
                         check=True).stdout
    out = " ".join(out.split())
    assert "(default: 64)" in out and "(default: test)" in out


def fake_python(tmp_path):
    f = tmp_path / "py"
    f.write_text("#!/bin/bash\necho \"ARGS: $@\"\n")
    f.chmod(0o755)
    return str(f)


def train_sh(tmp_path, *args):
    env = {"PYTHON": fake_python(tmp_path), "PATH": "/usr/bin:/bin"}
    return subprocess.run([str(ROOT / "train.sh"), *args], capture_output=True, text=True, env=env, check=True).stdout


def test_train_sh_flags_only_and_positionals_then_flags(tmp_path):
    out = train_sh(tmp_path, "--cache_dir", "X", "--arch", "subspace")
    assert "--batch_size 8 --epochs 20 --lr 0.001 --rank 128" in out and "--cache_dir X --arch subspace" in out
    out = train_sh(tmp_path, "4", "2", "1e-3", "16", "0", "0", "--arch", "subspace")
    assert "--batch_size 4 --epochs 2 --lr 1e-3 --rank 16 --lambda_B 0 --lambda_ortho 0 --results_dir results " \
           "--arch subspace" in out
    out = train_sh(tmp_path, "--help")
    assert out.startswith("usage: ./train.sh [batch_size]") and "ARGS:" in out and "--help" in out
