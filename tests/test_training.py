"""lowrank/training.py (through train_real_data.py): a run folder has one owner, Ctrl-C and a full
disk end in one line, resume refuses changed settings, atomic checkpoints, every split checked
before epoch 1, epoch 0 as a candidate, the non-finite stop."""

import errno
import json
import shutil
import signal
from pathlib import Path

import pytest
import torch
from helpers import (
    ENDLESS,
    SMALL,
    error_line,
    one_line_error,
    run_script,
    start_script,
    train,
    wait_for_lock,
    wait_until,
)

import compare_svd_nn
import train_real_data
from lowrank import cli, feature_cache, model, runs, training
from lowrank.cli import UserError


def copy_cache(tiny_cache, tmp_path):
    cache = tmp_path / "cache"
    shutil.copytree(tiny_cache / "cache", cache)
    return cache


def test_second_training_into_a_running_folder_is_refused_and_ctrl_c_is_one_line(
    tiny_cache, tmp_path
):
    first = start_script(
        "train_real_data.py",
        "--cache_dir",
        tiny_cache / "cache",
        "--results_dir",
        tmp_path,
        *SMALL,
        *ENDLESS,
    )
    wait_for_lock(tmp_path, first)
    second = start_script(
        "train_real_data.py",
        "--cache_dir",
        tiny_cache / "cache",
        "--results_dir",
        tmp_path,
        *SMALL,
        "--overwrite",
    )
    _, err = second.communicate(timeout=300)
    assert second.returncode == 1 and f"in use by PID {first.pid}" in error_line(err)
    wait_until(lambda: (tmp_path / "last.pt").exists(), first, "an epoch to finish")  # then Ctrl-C
    first.send_signal(signal.SIGINT)
    _, err = first.communicate(timeout=300)
    assert first.returncode == 130 and "interrupted" in error_line(err), err[-3000:]
    torch.load(tmp_path / "last.pt", weights_only=True)  # what it had written is intact
    assert not list(tmp_path.glob(".*.tmp"))


def test_a_finished_run_is_not_replaced_without_asking(tiny_cache, tmp_path):
    train(tiny_cache / "cache", tmp_path, "--epochs", "1")
    best = (tmp_path / "best_model.pt").read_bytes()
    with pytest.raises(
        UserError, match="holds a trained run .*--resume continues it, --overwrite replaces it"
    ):
        train(tiny_cache / "cache", tmp_path, "--epochs", "1")
    assert (tmp_path / "best_model.pt").read_bytes() == best
    with pytest.raises(UserError, match="give one of them"):
        train(tiny_cache / "cache", tmp_path, "--epochs", "1", "--resume", "--overwrite")
    train(tiny_cache / "cache", tmp_path, "--epochs", "1", "--overwrite")


def test_resume_refuses_changed_settings(tiny_cache, tmp_path):
    train(tiny_cache / "cache", tmp_path, "--epochs", "1")
    for flag, value in (
        ("--lr", "0.01"),
        ("--normalize", "none"),
        ("--batch_size", "4"),
        ("--cache_dir", str(tmp_path)),
    ):
        argv = [
            "--cache_dir",
            str(tiny_cache / "cache"),
            "--results_dir",
            str(tmp_path),
            *SMALL,
            "--epochs",
            "2",
            "--resume",
        ]
        argv += [flag, value]
        with pytest.raises(UserError, match=f"these flags differ: {flag} "):
            train_real_data.main(argv)
    # the same flags: it continues
    train(tiny_cache / "cache", tmp_path, "--epochs", "2", "--resume")


def test_resume_from_a_compressed_checkpoint_is_refused(tiny_cache, tmp_path):
    train(tiny_cache / "cache", tmp_path, "--epochs", "1")
    ck = torch.load(tmp_path / "last.pt", weights_only=True)
    ck["config"]["compressed"] = "int8"
    torch.save(ck, tmp_path / "last.pt")
    with pytest.raises(UserError, match="not a training state"):
        train(tiny_cache / "cache", tmp_path, "--epochs", "2", "--resume")


@pytest.mark.parametrize(
    "argv",
    [
        ["--batch_size", "0"],
        ["--lr", "nan"],
        ["--lr", "-1"],
        ["--grad_clip", "0"],
        ["--epochs", "-2"],
        ["--lambda_B", "inf"],
    ],
)
def test_bad_training_numbers_are_refused_by_the_parser(tiny_cache, tmp_path, argv):
    with pytest.raises(SystemExit) as e:
        train(tiny_cache / "cache", tmp_path / "r", *argv)
    assert e.value.code == 2 and not (tmp_path / "r").exists()


def test_a_full_disk_is_one_line_and_leaves_the_last_checkpoint(
    tiny_cache, tmp_path, monkeypatch, capsys
):
    train(tiny_cache / "cache", tmp_path, "--epochs", "1")
    best = (tmp_path / "best_model.pt").read_bytes()
    real_save = torch.save

    def full(obj, f, *a, **k):
        real_save(obj, f, *a, **k)
        Path(f).write_bytes(Path(f).read_bytes()[:100])
        raise RuntimeError("[enforce fail at inline_container.cc] unexpected pos 1536 vs 1430")

    monkeypatch.setattr(torch, "save", full)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9, 0))
    argv = [
        "--cache_dir",
        str(tiny_cache / "cache"),
        "--results_dir",
        str(tmp_path),
        *SMALL,
        "--epochs",
        "1",
        "--overwrite",
    ]
    with pytest.raises(
        SystemExit, match="^error: no space left on the device: cannot write .*best_model.pt"
    ):
        cli.run_cli(train_real_data.main, argv)
    assert (tmp_path / "best_model.pt").read_bytes() == best and not list(tmp_path.glob(".*.tmp"))
    e = OSError(errno.EROFS, "Read-only file system", str(tmp_path / "x.json"))
    with pytest.raises(SystemExit, match="^error: read-only file system: cannot write .*x.json"):
        cli.run_cli(lambda argv: (_ for _ in ()).throw(e))


def test_best_model_write_is_atomic(tiny_cache, tmp_path, monkeypatch):
    train(tiny_cache / "cache", tmp_path, "--epochs", "1")
    good = (tmp_path / "best_model.pt").read_bytes()
    real_save = torch.save

    def killed_midway(obj, f, *a, **k):  # the process dies while writing the next best model
        if "best_model" in str(f):
            Path(f).write_bytes(b"PK\x03\x04 partial")
            raise KeyboardInterrupt
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", killed_midway)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_cache / "cache", tmp_path, "--epochs", "1", "--overwrite")
    monkeypatch.setattr(torch, "save", real_save)
    assert (tmp_path / "best_model.pt").read_bytes() == good  # the previous best is intact
    stray = list(tmp_path.glob(".best_model.pt.*.tmp"))
    assert stray  # what a kill leaves ...
    for p in stray:  # ... as a dead process's temp file
        p.rename(p.with_name(f".best_model.pt.{feature_cache.HOST}-{2**22 + 7}.tmp"))
    compare_svd_nn.main(["--results_dir", str(tmp_path), "--device", "cpu"])  # compare loads it
    train(tiny_cache / "cache", tmp_path, "--epochs", "1", "--overwrite")
    assert not list(tmp_path.glob(".*.tmp"))  # cleaned by the next run


@pytest.mark.parametrize("damage", ["truncated", "nan", "huge"])
def test_bad_test_split_file_stops_before_epoch_1(tiny_cache, tmp_path, damage, capsys):
    cache = copy_cache(tiny_cache, tmp_path)
    split = runs.make_split(feature_cache.cached_indices(cache), 42)
    (tmp_path / "r").mkdir()
    i = split["test"][1]
    p = feature_cache.feature_path(cache, i)
    if damage == "truncated":
        p.write_bytes(p.read_bytes()[:5000])
    else:
        x = torch.load(p, weights_only=True)
        x[3, 5] = float("nan") if damage == "nan" else 3e38
        torch.save(x, p)
    with pytest.raises(
        ValueError,
        match={"truncated": "unreadable", "nan": "NaN", "huge": "overflow float32"}[damage],
    ) as e:
        train(cache, tmp_path / "r", "--epochs", "2")
    assert f"features_{i}.pt" in str(e.value)
    assert (
        "epoch   1" not in capsys.readouterr().out
        and not (tmp_path / "r" / "history.json").exists()
    )


def test_huge_value_in_training_split_is_named(tiny_cache, tmp_path):
    cache = copy_cache(tiny_cache, tmp_path)
    i = runs.make_split(feature_cache.cached_indices(cache), 42)["train"][0]
    x = torch.load(feature_cache.feature_path(cache, i), weights_only=True)
    x[0, 0] = 3e38
    torch.save(x, feature_cache.feature_path(cache, i))
    r = run_script(
        "train_real_data.py",
        "--cache_dir",
        cache,
        "--results_dir",
        tmp_path / "r",
        *SMALL,
        "--epochs",
        "1",
    )
    line = one_line_error(r)
    assert f"features_{i}.pt" in line and "overflow" in line and "NaN/Inf" not in r.stdout


def test_epoch_0_is_kept_when_training_makes_it_worse(tiny_cache, tmp_path, capsys):
    train_real_data.main(
        [
            "--cache_dir",
            str(tiny_cache / "cache"),
            "--results_dir",
            str(tmp_path),
            "--arch",
            "subspace",
            "--rank",
            "8",
            "--batch_size",
            "8",
            "--device",
            "cpu",
            "--epochs",
            "2",
            "--lr",
            "1e9",
        ]
    )
    out = capsys.readouterr().out
    h = json.loads((tmp_path / "history.json").read_text())
    assert h[0]["epoch"] == 0 and "train_recon" not in h[0]
    best = min(h, key=lambda r: r["val_mse"])
    ck = torch.load(tmp_path / "best_model.pt", weights_only=True)
    assert ck["epoch"] == best["epoch"] and ck["best_val_mse"] == best["val_mse"]
    # lr 1e9 wrecks it
    assert best["epoch"] == 0 and max(r["val_mse"] for r in h[1:]) > h[0]["val_mse"]
    assert "no epoch improved on the starting point" in out and "best epoch 0" in out


def test_nonfinite_message_names_existing_checkpoints(tiny_cache, tmp_path, monkeypatch, capsys):
    real = model.loss_terms

    def poisoned(*a, **k):
        t = real(*a, **k)
        t["total"] = t["total"] * float("nan")
        return t

    monkeypatch.setattr(training, "loss_terms", poisoned)
    with pytest.raises(SystemExit):
        train(tiny_cache / "cache", tmp_path, "--epochs", "2")
    line = [l for l in capsys.readouterr().out.splitlines() if "NaN/Inf" in l][0]
    named = [w.strip("(),.") for w in line.split() if w.strip("(),.").endswith(".pt")]
    assert named and all(Path(p).exists() for p in named), line
    assert torch.load(tmp_path / "best_model.pt", weights_only=True)["epoch"] == 0
