"""Reliability round 3, the hostile cases: a run folder has one owner, files read back are what they
claim, metadata means one thing, logs survive a tear, compressed caches get the plain checks,
degenerate input is refused at the start, signals and full disks end in one line, a damaged or
locked cache is named."""

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

import compare_svd_nn
import compress
import qwenvl_dataloader
import tokens
import train_real_data
import vqa_eval
from lowrank import (
    cli,
    dataset,
    downstream,
    encoders,
    feature_cache,
    images,
    model,
    runs,
    transforms,
)
from lowrank.cli import UserError

ROOT = Path(__file__).resolve().parent.parent
ENV = dict(os.environ, OMP_NUM_THREADS="1")
SMALL = ["--rank", "8", "--hidden", "16", "--batch_size", "8", "--device", "cpu"]


def train(cache, out, *extra):
    return train_real_data.main(
        ["--cache_dir", str(cache), "--results_dir", str(out), *SMALL, *extra]
    )


def ctrl_c_as_a_terminal_sends_it():
    """The child starts with SIGINT at its default, as in a terminal, so Python turns it into
    KeyboardInterrupt: a suite started in the background of a shell without job control inherits
    SIGINT ignored, and the Ctrl-C below would never arrive."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def script(name, *args, **kw):
    return subprocess.Popen(
        [sys.executable, str(ROOT / name), *map(str, args)],
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=ctrl_c_as_a_terminal_sends_it,
        **kw,
    )


def one_line(stderr):
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    assert lines and lines[-1].startswith("error: ") and "Traceback" not in stderr, stderr[-2000:]
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


# a training that cannot finish before it is stopped
ENDLESS = ["--epochs", "1000000", "--patience", "1000000"]


# 1. a run folder has one owner
# ------------------------------------------------------------------------------------


def test_second_training_into_a_running_folder_is_refused_and_ctrl_c_is_one_line(
    tiny_cache, tmp_path
):
    first = script(
        "train_real_data.py",
        "--cache_dir",
        tiny_cache / "cache",
        "--results_dir",
        tmp_path,
        *SMALL,
        *ENDLESS,
    )
    wait_for_lock(tmp_path, first)
    second = script(
        "train_real_data.py",
        "--cache_dir",
        tiny_cache / "cache",
        "--results_dir",
        tmp_path,
        *SMALL,
        "--overwrite",
    )
    _, err = second.communicate(timeout=300)
    assert second.returncode == 1 and f"in use by PID {first.pid}" in one_line(err)
    wait_until(lambda: (tmp_path / "last.pt").exists(), first, "an epoch to finish")  # then Ctrl-C
    first.send_signal(signal.SIGINT)
    _, err = first.communicate(timeout=300)
    assert first.returncode == 130 and "interrupted" in one_line(err), err[-3000:]
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


def test_reports_of_other_splits_and_checkpoints_have_their_own_names(trained, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    compare_svd_nn.main(["--results_dir", str(run), "--device", "cpu"])
    test = (run / "compare_rank16.json").read_bytes()
    compare_svd_nn.main(["--results_dir", str(run), "--device", "cpu", "--split", "val"])
    shutil.copy(run / "best_model.pt", run / "other.pt")
    compare_svd_nn.main(
        ["--results_dir", str(run), "--device", "cpu", "--checkpoint", str(run / "other.pt")]
    )
    assert (run / "compare_rank16.json").read_bytes() == test
    assert json.loads((run / "compare_rank16_val.json").read_text())["split"] == "val"
    assert (run / "compare_rank16_other.json").exists()


# 2. every file read back is what it claims
# --------------------------------------------------------------------------


def test_a_checkpoint_of_another_split_is_refused(tiny_cache, trained, tmp_path):
    # another seed: another split
    train(tiny_cache / "cache", tmp_path, "--epochs", "1", "--seed", "7")
    with pytest.raises(UserError, match="trained on another split"):
        compare_svd_nn.main(
            [
                "--results_dir",
                str(trained),
                "--checkpoint",
                str(tmp_path / "best_model.pt"),
                "--device",
                "cpu",
            ]
        )


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


def test_relative_image_paths_in_parquet_are_the_shards_folder(tmp_path):
    photo = Image.fromarray((np.random.default_rng(0).random((40, 60, 3)) * 255).astype(np.uint8))
    (tmp_path / "data" / "imgs").mkdir(parents=True)
    photo.save(tmp_path / "data" / "imgs" / "a.png")
    table = pa.table(
        {"image": [{"bytes": None, "path": "imgs/a.png"}], "question": ["q?"], "answer": [["a"]]}
    )
    pq.write_table(table, tmp_path / "data" / "train.parquet")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    os.chdir(elsewhere)  # the working directory must not matter
    try:
        src = images.Source(tmp_path / "data")
        ((_, data),) = src.iter_images([0])
        assert images.fingerprint(data) == images.fingerprint(
            (tmp_path / "data" / "imgs" / "a.png").read_bytes()
        )
        assert images.fingerprint(src.image(0)) == images.fingerprint(data)
    finally:
        os.chdir(ROOT)


def test_a_regenerated_image_is_not_drawn_under_old_features(trained, tmp_path, capsys):
    cfg = json.loads((trained / "config.json").read_text())
    cache = tmp_path / "cache"
    shutil.copytree(cfg["cache_dir"], cache)
    manifest = json.loads((cache / "manifest.json").read_text())
    sid = next(iter(manifest["samples"]))
    # the source now holds other bytes for this sample
    manifest["samples"][sid]["fingerprint"] = "0" * 20
    (cache / "manifest.json").write_text(json.dumps(manifest))
    assert dataset.cached_image(cache, int(sid)) is None
    assert "not the one the cache was made from" in capsys.readouterr().out
    assert dataset.cached_image(cfg["cache_dir"], int(sid)).shape == (448, 448, 3)


# 3. metadata means one thing
# ----------------------------------------------------------------------------------------


def test_metadata_schema(tmp_path):
    img = tmp_path / "a.png"
    Image.new("RGB", (32, 32), (10, 20, 30)).save(img)
    rows = [
        {"image": str(img), "question": "q", "answers": "EXIT"},
        {"image": str(img), "answers": ["a", 7], "bbox": [1, 2, float("nan"), 4]},
        {"image": str(img), "bbox": ["x", 2, 3, 4]},
        {"image": str(img), "bbox": [1, 2, None, 4]},
        {"image": str(img), "bbox": [1, 2, 3, 4], "answers": []},
    ]
    (tmp_path / "list.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    src = images.Source(tmp_path / "list.jsonl")
    assert src.meta[0]["answers"] == ["EXIT"]  # one answer, not four letters
    assert src.meta[1]["answers"] == ["a", "7"] and "bbox" not in src.meta[1]
    assert "bbox" not in src.meta[2] and "bbox" not in src.meta[3]
    assert src.meta[4]["bbox"] == [1.0, 2.0, 3.0, 4.0] and "answers" not in src.meta[4]
    assert sum(src.notes.values()) == 4
    (tmp_path / "bad.jsonl").write_text(json.dumps({"image": str(img), "question": 3}) + "\n")
    with pytest.raises(UserError, match="sample 0 .*question must be a string"):
        images.Source(tmp_path / "bad.jsonl")


# the cost fields of an answer's record (downstream.Asker.ask), for answers made up by hand
COST = dict(
    vision_tokens=256, prompt_tokens=300, prefill_flops=1e9, kv_bytes=1e6, batch=2, transform_ms=0.1
)
COST.update(prefill_ms=5.0, decode_ms=1.0, generate_ms=9.0, peak_mib=None)


def test_a_sample_without_answers_is_left_out_of_the_accuracy():
    conds = [transforms.Spec("original"), transforms.Spec("zeros")]
    samples = {"0": {"question": "q", "answers": ["a"] * 10}, "1": {"question": "q"}}
    done = {
        (i, str(c)): {"answer": "a" if c.kind == "original" else "b", **COST}
        for i in (0, 1)
        for c in conds
    }
    _, summary = downstream.score([0, 1], conds, done, samples)
    assert summary[0]["vqa_acc"] == 1.0 and summary[1]["vqa_acc"] == 0.0
    assert summary[0]["n"] == 1 and summary[0]["n_without_answers"] == 1
    assert summary[0]["ms_per_sample"] == 0.1 + 9.0 / 2 and summary[0]["prefill_flops"] == 1e9


def test_an_image_gone_from_the_source_is_reported_missing(tmp_path, capsys):
    rows = []
    for k in range(3):
        Image.fromarray((np.random.default_rng(k).random((40, 40, 3)) * 255).astype(np.uint8)).save(
            tmp_path / f"{k}.png"
        )
        rows.append({"image": f"{k}.png", "question": "q", "answers": ["a"]})
    (tmp_path / "list.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    enc = encoders.Encoder(encoders.TINY, "cpu")
    qwenvl_dataloader.extract(
        tmp_path / "list.jsonl", tmp_path / "cache", encoder=enc, progress=False
    )
    os.remove(tmp_path / "1.png")
    s = qwenvl_dataloader.extract(
        tmp_path / "list.jsonl", tmp_path / "cache", encoder=enc, progress=False
    )
    assert "images of 1 cached samples are missing from the source" in capsys.readouterr().out
    assert s["skipped"] == 3 and s["extracted"] == 0


# 4. preprocessing equals the real model's:
# tests/test_hardening.py::test_every_pil_mode_decodes_as_qwen_vl_utils


# 5. logs survive a tear and refuse strangers
# ------------------------------------------------------------------------


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


def test_vqa_log_torn_tail_strangers_and_reproducible_random_rule(trained, tmp_path, capsys):
    whole = vqa_run(trained, tmp_path / "a")
    log = tmp_path / "a" / "vqa_test.jsonl"
    lines = log.read_text().splitlines(keepends=True)
    # killed while writing: the last answers are gone, torn
    log.write_text("".join(lines[:-2]) + lines[-2][:15])
    resumed = vqa_run(trained, tmp_path / "a")
    assert "cut off by an interrupted write" in capsys.readouterr().out
    assert [s["vqa_acc"] for s in resumed] == [s["vqa_acc"] for s in whole]
    again = [json.loads(line) for line in log.read_text().splitlines()[1:]]
    first = [json.loads(line) for line in lines[1:]]
    key = lambda r: (r["sample"], r["condition"])  # noqa: E731
    # random rule too
    assert {key(r): r["answer"] for r in again} == {key(r): r["answer"] for r in first}
    other = tmp_path / "b"
    vqa_run(trained, other, "--seed", "5")
    log.write_text(
        log.read_text()
        + "".join((other / "vqa_test.jsonl").read_text().splitlines(keepends=True)[1:])
    )
    with pytest.raises(UserError, match="comes from a run with other settings"):
        vqa_run(trained, tmp_path / "a")
    log.write_text("")  # an empty log starts again
    vqa_run(trained, tmp_path / "a")


def test_a_torn_sample_log_line_never_glues_onto_the_next(tmp_path):
    log = tmp_path / feature_cache.SAMPLE_LOG
    log.write_text('{"i": 0, "id": "a"}\n{"i": 1, "id"')
    feature_cache.append_sample_log(tmp_path, [{"i": 2, "id": "c"}])
    assert set(feature_cache.read_sample_log(tmp_path)) == {0, 2}


def test_vqa_settings_include_lrcp_rank_and_the_checkpoint(trained, tmp_path):
    vqa_run(trained, tmp_path)
    with pytest.raises(UserError, match="other settings"):
        vqa_run(trained, tmp_path, "--lrcp_rank", "4")


# 6. compressed caches get the plain checks
# --------------------------------------------------------------------------


def test_compressed_cache_basis_is_checked(trained, tmp_path):
    out = tmp_path / "pca"
    compress.main(
        [
            "cache",
            "--results_dir",
            str(trained),
            "--codec",
            "pca_int8",
            "--rank",
            "32",
            "--out",
            str(out),
        ]
    )
    assert json.loads((out / "manifest.json").read_text())["codec"]["basis_sha"]
    dataset.FeatureDataset(out, preload=False)[0]
    basis = torch.load(out / "basis.pt", weights_only=True)
    torch.save(torch.linalg.qr(torch.randn_like(basis))[0], out / "basis.pt")  # swapped
    with pytest.raises(cli.BadFeature, match="not the basis this cache was written with"):
        dataset.FeatureDataset(out, preload=False)
    os.remove(out / "basis.pt")
    with pytest.raises(cli.BadFeature, match="basis.pt is missing"):
        dataset.FeatureDataset(out, preload=False)
    torch.save(basis, out / "basis.pt")
    f = out / f"features_{dataset.FeatureDataset(out, preload=False).indices[0]}.pt"
    p = torch.load(f, weights_only=True)
    p["C"]["scale"][0] = float("nan")
    torch.save(p, f)
    with pytest.raises(cli.BadFeature, match="NaN"):
        dataset.FeatureDataset(out, preload=False)[0]


# 7. degenerate input is refused at the start
# ------------------------------------------------------------------------


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


def test_an_all_zero_feature_map_is_named(tiny_cache, tmp_path):
    cache = tmp_path / "cache"
    shutil.copytree(tiny_cache / "cache", cache)
    x = torch.load(cache / "features_3.pt", weights_only=True)
    torch.save(torch.zeros_like(x), cache / "features_3.pt")
    with pytest.raises(cli.BadFeature, match="features_3.pt: all values are 0"):
        feature_cache.read_feature(cache / "features_3.pt")


def test_an_absurd_checkpoint_config_is_refused_before_allocating(trained, tmp_path):
    ck = torch.load(trained / "best_model.pt", weights_only=True)
    for change in (
        {"rank": 200000},
        {"dim": "2048"},
        {"arch_options": {"oversample": "x"}},
        {"arch": 3},
    ):
        bad = dict(ck, config=dict(ck["config"], **change))
        torch.save(bad, tmp_path / "bad.pt")
        with pytest.raises(UserError, match="do not build a model"):
            model.load_checkpoint(tmp_path / "bad.pt")


def test_bench_on_a_symmetric_run(tiny_cache, tmp_path):
    import bench

    train(tiny_cache / "cache", tmp_path, "--epochs", "1")
    rows = bench.main(
        ["--results_dir", str(tmp_path), "--ranks", "8", "--device", "cpu", "--batch_size", "4"]
    )
    assert any(r["method"] == "symmetric (NN)" and "cosine" in r for r in rows)
    with pytest.raises(UserError, match="serves only its trained rank 8"):
        bench.main(["--results_dir", str(tmp_path), "--ranks", "4", "--device", "cpu"])


# 8. signals and disks: Ctrl-C in the first test above
# ----------------------------------------------------------------


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


# 9. stuck or damaged cache state
# --------------------------------------------------------------------------------------


def test_a_truncated_manifest_is_named_and_extraction_rebuilds_it(tiny_cache, tmp_path, capsys):
    cache = tmp_path / "cache"
    shutil.copytree(tiny_cache / "cache", cache)
    (cache / "manifest.json").write_text((cache / "manifest.json").read_text()[:500])
    with pytest.raises(UserError, match="manifest.json is damaged"):
        train(cache, tmp_path / "r", "--epochs", "1")
    s = qwenvl_dataloader.extract(tiny_cache / "data", cache, encoders.TINY, "cpu", progress=False)
    assert "rebuilding it from the sample log" in capsys.readouterr().out
    assert s["extracted"] == 0 and s["skipped"] == 40


def test_a_held_cache_lock_is_named_after_the_timeout(tiny_cache, tmp_path):
    cache = tmp_path / "cache"
    shutil.copytree(tiny_cache / "cache", cache)
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"import sys, time; sys.path.insert(0, {str(ROOT)!r}); "
            f"from lowrank import feature_cache as fc\nwith fc.folder_lock({str(cache)!r}, what='hung'):\n"
            f"    time.sleep(100000)",  # until killed below
        ],
        env=ENV,
    )
    try:
        wait_for_lock(cache, holder)
        r = subprocess.run(
            [
                sys.executable,
                str(ROOT / "qwenvl_dataloader.py"),
                "--dataset_dir",
                tiny_cache / "data",
                "--cache_dir",
                cache,
                "--model",
                encoders.TINY,
            ],
            env=dict(ENV, LOWRANK_LOCK_TIMEOUT="1"),
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert r.returncode == 1 and f"in use by PID {holder.pid} (hung)" in one_line(r.stderr)
    finally:
        holder.kill()


def test_runs_output_stem():
    assert runs.output_stem("compare_rank16") == "compare_rank16"
    assert (
        runs.output_stem("compare_rank16", "val", "r/model_int8.pt")
        == "compare_rank16_val_model_int8"
    )
    assert runs.output_stem("x", "test", "r/best_model.pt") == "x"


def test_consistency_and_bootstrap_intervals_by_hand():
    conds = [transforms.Spec("original"), transforms.Spec("zeros")]
    samples = {str(i): {"question": "q", "answers": ["yes"] * 10} for i in range(4)}
    # (original, zeros)
    said = {0: ("Yes", "yes."), 1: ("yes", "no"), 2: ("no", "No"), 3: ("no", "yes")}
    done = {
        (i, str(c)): {"answer": said[i][k], **COST} for i in range(4) for k, c in enumerate(conds)
    }
    _, (orig, zeros) = downstream.score(list(range(4)), conds, done, samples)
    assert orig["consistency"] == 1.0 and zeros["consistency"] == 0.5  # "yes." ~ "Yes", "No" ~ "no"
    assert zeros["consistency_se"] == pytest.approx(np.std([1, 0, 1, 0], ddof=1) / 2)
    assert orig["vqa_acc"] == 0.5 and zeros["vqa_acc"] == 0.5 and zeros["changed"] == 1.0
    lo, hi = zeros["vqa_acc_ci95"]
    assert 0 <= lo <= 0.5 <= hi <= 1 and orig["delta_ci95"] == [0.0, 0.0]
