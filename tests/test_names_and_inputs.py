"""Reliability round 4: a run's name is a name (never a path or a pattern), a run folder a training
holds is not read, a checkpoint is hashed from the bytes that were loaded, every flag is checked
before work, constant features are named, damaged files are named, the lmms-eval path gets
vqa_eval's checks, exported tables are safe to open."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import run_script

import vqa_eval
from lowrank import answer_log, cli, feature_cache, model, reports, runs
from lowrank.cli import UserError

ROOT = Path(__file__).resolve().parent.parent
ENV = dict(os.environ, OMP_NUM_THREADS="1")


script = run_script


def one_line(r):
    lines = [line for line in r.stderr.strip().splitlines() if line.strip()]
    assert r.returncode != 0 and lines and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert lines[-1].startswith(("error: ", f"{Path(r.args[1]).name}: error: ")), r.stderr[-2000:]
    return lines[-1]


# 1. a run's name is a name
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["x/../../../y", "*", "tr[a]in", "tr?in", "train.rank9", "..", ".hidden", ""]
)
def test_a_name_with_a_separator_pattern_or_rank_ending_is_refused(name):
    with pytest.raises(UserError, match="a run's name is a plain name"):
        cli.run_name(name)


def test_every_name_flag_is_refused_at_parse_time(tmp_path):
    for argv in (
        ["vqa_eval.py", "--results_dir", tmp_path, "--name", "x/../y"],
        ["tokens.py", "--results_dir", tmp_path, "--name", "*"],
        ["layers.py", "--results_dir", tmp_path, "--name", "a/b"],
        ["compress.py", "study", "--results_dir", tmp_path, "--name", ".."],
        ["tune.py", "--results_dir", tmp_path, "--study_name", "t?"],
        ["vit_downstream.py", "--results_dir", tmp_path, "--name", "a/b"],
    ):
        r = script(*argv)
        assert r.returncode == 2 and "a run's name is a plain name" in r.stderr, (
            argv,
            r.stderr[-500:],
        )
    assert list(tmp_path.iterdir()) == []


def test_answer_logs_are_found_by_exact_name_and_restart_removes_only_its_own(tmp_path):
    """exp.a and exp.b are two runs; train's torchrun logs belong to train alone."""
    names = [
        "vqa_exp.a.jsonl",
        "vqa_exp.b.jsonl",
        "vqa_train.rank0.jsonl",
        "vqa_train.rank1.jsonl",
        "vqa_tr.jsonl",
    ]
    for n in names:
        (tmp_path / n).write_text("")

    def paths(stem):
        return [p.name for p in answer_log.AnswerLog(tmp_path, stem, {}).paths()]

    assert paths("vqa_exp.a") == ["vqa_exp.a.jsonl"]
    assert paths("vqa_train") == ["vqa_train.rank0.jsonl", "vqa_train.rank1.jsonl"]
    assert paths("vqa_tr") == ["vqa_tr.jsonl"] and paths("vqa_t") == []
    answer_log.AnswerLog(tmp_path, "vqa_exp.a", {}).remove()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names[1:])


def test_a_dotted_name_keeps_its_dots_in_every_file(trained, tmp_path):
    common = [
        "--results_dir",
        str(trained),
        "--model",
        "tiny-random",
        "--limit",
        "1",
        "--max_new_tokens",
        "2",
    ]
    common += [
        "--svd_ranks",
        "",
        "--nn_ranks",
        "",
        "--rules",
        "",
        "--device",
        "cpu",
        "--out_dir",
        str(tmp_path),
    ]
    vqa_eval.main(common + ["--name", "exp.a"])
    vqa_eval.main(common + ["--name", "exp.b", "--zeros"])
    for name in ("exp.a", "exp.b"):
        for ext in (".jsonl", ".json", ".csv", "_summary.csv", ".png", "_cost.png"):
            assert (tmp_path / f"vqa_{name}{ext}").exists(), (name, ext)
    assert [
        s["condition"] for s in json.loads((tmp_path / "vqa_exp.a.json").read_text())["summary"]
    ] == ["original"]
    assert not list(tmp_path.glob("vqa_exp.json*"))


# 2. a run folder in use
# -------------------------------------------------------------------------------------------


def test_readers_refuse_a_folder_a_training_holds(tiny_cache, trained, tmp_path):
    run = tmp_path / "r"
    run.mkdir()
    for f in ("split.json", "config.json", "best_model.pt"):
        (run / f).write_bytes((trained / f).read_bytes())
    holder = subprocess.Popen(
        [sys.executable, "-c", f"import sys, time; sys.path.insert(0, {str(ROOT)!r})\n"
         f"from lowrank import feature_cache as fc\nwith fc.folder_lock({str(run)!r}, wait=0, what='training: x'):\n"
         f"    print('held', flush=True); time.sleep(100000)"],
        env=ENV, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        for argv in (
            ["compare_svd_nn.py", "--results_dir", run, "--device", "cpu"],
            ["vqa_eval.py", "--results_dir", run, "--model", "tiny-random", "--device", "cpu"],
            ["tokens.py", "--results_dir", run],
        ):
            line = one_line(script(*argv))
            assert f"in use by PID {holder.pid} (training: x)" in line, line
    finally:
        holder.kill()
        holder.wait()
    assert runs.read_run(run)[0].rank == 16  # free again once the holder is gone


def test_the_checkpoint_hash_is_of_the_bytes_that_were_loaded(trained, monkeypatch):
    """The file is read once: replacing it after the read cannot change the recorded hash."""
    import hashlib

    data = (trained / "best_model.pt").read_bytes()
    reads = []
    real = Path.read_bytes

    def counting(self):
        reads.append(self.name)
        return real(self)

    monkeypatch.setattr(Path, "read_bytes", counting)
    run = runs.load_run(trained)
    assert (
        reads.count("best_model.pt") == 1
        and run.checkpoint_sha == hashlib.sha256(data).hexdigest()[:16]
    )
    # never written
    assert model.SHA_KEY not in torch.load(trained / "best_model.pt", weights_only=True)


# 4. every flag checked before work
# --------------------------------------------------------------------------------


def test_a_device_or_dtype_that_is_not_there_is_one_line(trained):
    for argv in (
        ["vqa_eval.py", "--results_dir", trained, "--device", "foo"],
        ["compare_svd_nn.py", "--results_dir", trained, "--device", "cuda:7"],
        ["train_real_data.py", "--device", "cuda"]
        if not torch.cuda.is_available()
        else ["bench.py", "--device", "x"],
        ["vqa_eval.py", "--results_dir", trained, "--dtype", "int8"],
        ["bench_vqa.py", "--dtype", "foo"],
    ):
        r = script(*argv)
        assert (
            r.returncode == 2 and "error: argument --d" in r.stderr and "Traceback" not in r.stderr
        ), argv


# 5. degenerate features, 6. damaged files
# ------------------------------------------------------------------------


def test_constant_features_are_named(tiny_cache, tmp_path):
    cache = tmp_path / "c"
    import shutil

    shutil.copytree(tiny_cache / "cache", cache)
    x = feature_cache.read_feature(feature_cache.feature_path(cache, 5))
    torch.save(torch.full_like(x, 0.5), feature_cache.feature_path(cache, 5))
    r = script("svd_baseline.py", "--cache_dir", cache, "--rank", "8", "--device", "cpu")
    assert "features_5.pt: all values are 0.5" in one_line(r)


def test_a_truncated_config_is_named(trained, tmp_path):
    run = tmp_path / "r"
    run.mkdir()
    (run / "split.json").write_bytes((trained / "split.json").read_bytes())
    (run / "config.json").write_text((trained / "config.json").read_text()[:40])
    for argv in (
        ["vqa_eval.py", "--results_dir", run, "--device", "cpu"],
        ["tokens.py", "--results_dir", run],
    ):
        assert "config.json is not readable JSON" in one_line(script(*argv))


# 7. exported tables are safe to open
# ------------------------------------------------------------------------------


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


# 3. the lmms-eval path gets vqa_eval's checks
# ---------------------------------------------------------------------


def test_lmms_eval_inputs_are_checked_before_the_model_loads(
    tiny_cache, trained, tmp_path, monkeypatch
):
    pytest.importorskip("lmms_eval")
    import lmms_eval_lowrank

    def no_model(*a, **k):
        raise AssertionError("the model was loaded before the inputs were checked")

    monkeypatch.setattr(lmms_eval_lowrank, "LowRankQwen", no_model)
    base = ["--model", "tiny-random", "--device", "cpu", "--out_dir", str(tmp_path / "o")]
    data = ["--parquet_dir", str(tiny_cache / "data")]
    for extra, msg in (
        (["--transforms", "svd:99999"] + data, "a rank must be between 1"),
        (["--transforms", "svd:-1"] + data, "a rank must be between 1"),
        (["--transforms", "keep:norm:99999"] + data, "a rank must be between 1"),
        (["--transforms", "merge:tome:0"] + data, "a rank must be between 1"),
        (["--transforms", ""] + data, "--transforms is empty"),
        (["--transforms", "nn:64", "--results_dir", str(trained)] + data, "serves ranks 1..16"),
        (["--tasks", "no_such_task"], "not an lmms-eval task"),
        (["--parquet_dir", str(tmp_path)], "no TextVQA-schema parquet rows"),
    ):
        with pytest.raises(UserError, match=msg):
            lmms_eval_lowrank.main(base + extra)
    out = tmp_path / "o"
    out.mkdir(exist_ok=True)
    (out / "lmms_eval.json").write_text(
        json.dumps({"settings": {"model": "another"}, "transforms": {}})
    )
    with pytest.raises(UserError, match="holds the results of a run with other settings"):
        lmms_eval_lowrank.main(base + data + ["--transforms", "original"])
    # not replaced
    assert json.loads((out / "lmms_eval.json").read_text())["settings"] == {"model": "another"}


def test_every_flag_is_checked_before_the_work(trained, vit_cache, tmp_path, capsys):
    import bench
    import bench_vqa
    import compress
    import layers
    import tokens
    import tune

    run = ["--results_dir", str(trained)]
    cases = [
        (lambda: bench.main(run + ["--ranks", ""]), "--ranks is empty"),
        (lambda: bench.main(run + ["--out", str(tmp_path)]), "--out .* is a folder"),
        (
            lambda: bench.main(run + ["--ranks", "16", "--symmetric_dir", str(trained)]),
            "holds a subspace run",
        ),
        (
            lambda: bench.main(run + ["--ranks", "16", "--eval_cache", str(vit_cache / "block_3")]),
            r"holds \[256, 384\] features",
        ),
        (lambda: bench_vqa.main(["--transforms", "", "--device", "cpu"]), "--transforms is empty"),
        (
            lambda: bench_vqa.main(["--transforms", "codec:int8:16", "--device", "cpu"]),
            "takes no rank",
        ),
        (lambda: compress.main(["study"] + run + ["--ranks=-4"]), "a rank must be between 1"),
        (lambda: compress.main(["study"] + run + ["--ranks", "0"]), "a rank must be between 1"),
        (lambda: compress.main(["study"] + run + ["--ranks", "99999"]), "a rank must be between 1"),
        (
            lambda: layers.main(run + ["--ranks", "99999", "--device", "cpu"]),
            "a rank must be between 1",
        ),
        (
            lambda: layers.main(run + ["--shared_rank", "99999", "--device", "cpu"]),
            "--shared_rank 99999",
        ),
        (lambda: vqa_eval.main(run + ["--prompt", "Answer briefly."]), r"name \{question\}"),
        (
            lambda: vqa_eval.main(run + ["--out_dir", str(trained / "config.json")]),
            "is a file; give a folder",
        ),
        (
            lambda: vqa_eval.main(
                run
                + [
                    "--max_new_tokens",
                    "100000",
                    "--limit",
                    "1",
                    "--device",
                    "cpu",
                    "--out_dir",
                    str(tmp_path),
                ]
            ),
            "passes the model's context of 32768",
        ),
    ]
    for call, msg in cases:
        with pytest.raises(UserError, match=msg):
            call()
    (tmp_path / "j").mkdir()
    (tmp_path / "j" / "optuna_journal.log").write_text("garbage\n{not json\n")
    with pytest.raises(UserError, match="optuna_journal.log cannot be read"):
        tune.main(
            ["--cache_dir", str(json.loads((trained / "config.json").read_text())["cache_dir"])]
            # fmt: skip
            + ["--results_dir", str(tmp_path / "j"), "--n_trials", "1", "--rank", "8"]
        )
    tokens.main(run + ["--ks", "16", "--rules", "norm", "--draw_idx", "999", "--lrcp_rank", "8"])
    assert "--draw_idx 999 is past the" in capsys.readouterr().out
