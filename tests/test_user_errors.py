"""Every script, end to end: bad input is one `error:` line before any work (names, ranks, devices,
degenerate flags), and names keep their dots."""

import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from helpers import one_line_error, run_script, train, vqa_run

import bench
import bench_vqa
import compare_svd_nn
import compress
import layers
import qwenvl_dataloader
import svd_baseline
import tokens
import train_real_data
import tune
import visualize_svd_nn
import vqa_eval
from lowrank import cli, model
from lowrank.cli import UserError


def test_degenerate_flags_are_one_line(tiny_cache, trained, tmp_path):
    with pytest.raises(SystemExit) as e:
        qwenvl_dataloader.main(
            ["--dataset_dir", str(tiny_cache / "data"), "--extract_batch_size", "0"]
        )
    assert e.value.code == 2
    with pytest.raises(UserError, match="--ks 8,a: expected a comma list of integers"):
        tokens.main(["--results_dir", str(trained), "--ks", "8,a"])
    with pytest.raises(UserError, match="--draw_k 300: a rank must be between 1 and"):
        tokens.main(["--results_dir", str(trained), "--draw_k", "300"])
    with pytest.raises(UserError, match="--prompt .*only {question}"):
        vqa_run(trained, tmp_path, "--prompt", "{question} {image}")
    with pytest.raises(UserError, match="leave the .* split empty"):
        train(tiny_cache / "cache", tmp_path / "few", "--max_samples", "4", "--group_by", "none")


def test_bench_on_a_symmetric_run(tiny_cache, tmp_path):
    train(tiny_cache / "cache", tmp_path, "--epochs", "1")
    rows = bench.main(
        ["--results_dir", str(tmp_path), "--ranks", "8", "--device", "cpu", "--batch_size", "4"]
    )
    assert any(r["method"] == "symmetric (NN)" and "cosine" in r for r in rows)
    with pytest.raises(UserError, match="serves only its trained rank 8"):
        bench.main(["--results_dir", str(tmp_path), "--ranks", "4", "--device", "cpu"])


@pytest.mark.parametrize("rank", ["0", "300"])
def test_rank_out_of_range_is_refused_everywhere(tiny_cache, trained, tmp_path, rank):
    cache = str(tiny_cache / "cache")
    calls = [
        lambda: train_real_data.main(
            ["--cache_dir", cache, "--results_dir", str(tmp_path / "t"), "--rank", rank]
        ),
        lambda: svd_baseline.main(["--cache_dir", cache, "--rank", rank]),
        lambda: svd_baseline.main(
            ["--cache_dir", cache, "--ranks", f"16,{rank}", "--results_dir", str(tmp_path)]
        ),
        lambda: compare_svd_nn.main(["--results_dir", str(trained), "--rank", rank]),
        lambda: visualize_svd_nn.main(
            ["--results_dir", str(trained), "--rank", rank, "--out", str(tmp_path)]
        ),
        lambda: tune.main(
            ["--cache_dir", cache, "--results_dir", str(tmp_path / "tune"), "--rank", rank]
        ),
    ]
    for call in calls:
        with pytest.raises(
            UserError,
            match=f"{rank}: a rank must be between 1 and min.tokens, dim. of the "
            r"cache's features \(256\)",
        ):
            call()
    assert not (tmp_path / "t").exists()

    with pytest.raises(
        UserError,
        match=f"--ranks {rank}: (the model .* serves ranks 1..16|a rank must be between 1)",
    ):
        bench.main(["--results_dir", str(trained), "--ranks", rank, "--device", "cpu"])
    with pytest.raises(ValueError, match="ranks 1..8"):
        model.Subspace(rank=8).factors(torch.randn(1, 256, 2048), rank=int(rank))


def test_user_errors_are_one_line(tmp_path, trained):
    (tmp_path / "empty").mkdir()
    pq.write_table(
        pa.table(
            {"image": pa.array([], pa.struct([("bytes", pa.binary()), ("path", pa.string())]))}
        ),
        tmp_path / "empty" / "a.parquet",
    )
    (tmp_path / "schemaless").mkdir()
    pq.write_table(pa.table({"question": ["q?"]}), tmp_path / "schemaless" / "a.parquet")
    (tmp_path / "notparquet").mkdir()
    (tmp_path / "notparquet" / "a.parquet").write_text("not parquet")
    (tmp_path / "noimages").mkdir()
    (tmp_path / "noimages" / "readme.txt").write_text("hi")
    (tmp_path / "bad.jsonl").write_text('{"image": "a.png"}\n{"image": \n')
    cases = {
        "empty": "found no samples",
        "schemaless": "no 'image' column",
        "notparquet": "unreadable parquet",
        "noimages": "found no samples",
        "bad.jsonl": "bad.jsonl:2",
    }
    for name, want in cases.items():
        cache = tmp_path / f"cache_{name}"
        line = one_line_error(
            run_script(
                "qwenvl_dataloader.py",
                "--dataset_dir",
                tmp_path / name,
                "--model",
                "tiny-random",
                "--cache_dir",
                cache,
            )
        )
        assert want in line, (name, line)
        assert not cache.exists(), name  # a failed run leaves no empty cache directory
    line = one_line_error(
        run_script(
            "train_real_data.py",
            "--cache_dir",
            tmp_path / "nowhere",
            "--results_dir",
            tmp_path / "r",
        )
    )
    assert "does not exist" in line and "qwenvl_dataloader.py --dataset_dir" in line
    (tmp_path / "junk.pt").write_text("not a checkpoint")
    line = one_line_error(
        run_script(
            "compare_svd_nn.py", "--results_dir", trained, "--checkpoint", tmp_path / "junk.pt"
        )
    )
    assert "junk.pt is not a readable checkpoint" in line

    class Evil:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    torch.save({"config": {}, "model": Evil()}, tmp_path / "evil.pt")
    r = run_script(
        "visualize_svd_nn.py", "--results_dir", trained, "--checkpoint", tmp_path / "evil.pt"
    )
    line = one_line_error(r)
    assert (
        "evil.pt is refused: it is not plain data" in line
        and "weights_only=False" not in r.stderr + r.stdout
    )
    assert not (tmp_path / "pwned").exists()


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
        r = run_script(*argv)
        assert r.returncode == 2 and "a run's name is a plain name" in r.stderr, (
            argv,
            r.stderr[-500:],
        )
    assert list(tmp_path.iterdir()) == []


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
        r = run_script(*argv)
        assert (
            r.returncode == 2 and "error: argument --d" in r.stderr and "Traceback" not in r.stderr
        ), argv


def test_every_flag_is_checked_before_the_work(trained, vit_cache, tmp_path, capsys):

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
