"""lowrank/runs.py: the split (by source photo, identical images together), reports named by split
and checkpoint, a checkpoint of another split refused, a folder a training holds is not read,
damaged run files named, the checkpoint hashed from the bytes loaded."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import ENV, ROOT, last_error_line, run_script, train

import compare_svd_nn
import qwenvl_dataloader
from lowrank import demo_set, encoders, runs
from lowrank.cli import UserError
from lowrank.encoders import EncoderSpec


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


def test_runs_output_stem():
    assert runs.output_stem("compare_rank16") == "compare_rank16"
    assert (
        runs.output_stem("compare_rank16", "val", "r/model_int8.pt")
        == "compare_rank16_val_model_int8"
    )
    assert runs.output_stem("x", "test", "r/best_model.pt") == "x"


def test_demo_split_is_disjoint_by_photo(tmp_path):
    rows = demo_set.make_rows(36, seed=2)
    data = demo_set.write_parquet(rows, tmp_path / "data")
    qwenvl_dataloader.extract(
        data, tmp_path / "c", EncoderSpec(encoders.TINY, "cpu"), progress=False, batch_size=12
    )
    s = runs.load_or_make_split(tmp_path / "r", tmp_path / "c", seed=0)
    photo = {i: r["image_id"] for i, r in enumerate(rows)}
    parts = {k: {photo[i] for i in s[k]} for k in ("train", "val", "test")}
    assert s["grouped_by"] == "image_id" and s["shared_groups"] == 0 and s["shared_images"] == 0
    assert (
        not (parts["train"] & parts["test"])
        and not (parts["train"] & parts["val"])
        and parts["test"]
    )
    flat = runs.load_or_make_split(tmp_path / "r2", tmp_path / "c", seed=0, group_by="none")
    assert flat["grouped_by"] == "none" and sorted(
        flat["train"] + flat["val"] + flat["test"]
    ) == list(range(36))
    # 18 photos x 2 crops: most straddle
    assert runs.shared_between_splits(tmp_path / "c", flat, "image_id") > 0


def test_groups_keep_identical_images_together():
    # 5 images, 4 questions each
    s = runs.make_split(list(range(20)), seed=1, groups={i: i // 4 for i in range(20)})
    where = {i: k for k, v in s.items() for i in v}
    assert all(len({where[i] for i in range(g * 4, g * 4 + 4)}) == 1 for g in range(5))
    assert runs.make_split(list(range(10)), seed=3) == runs.make_split(
        list(range(10)), seed=3, groups={i: i for i in range(10)}
    )


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
            line = last_error_line(run_script(*argv))
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
    # read, never written
    saved = torch.load(trained / "best_model.pt", weights_only=True)
    assert run.checkpoint_sha not in [v for v in saved.values() if isinstance(v, str)]


def test_a_truncated_config_is_named(trained, tmp_path):
    run = tmp_path / "r"
    run.mkdir()
    (run / "split.json").write_bytes((trained / "split.json").read_bytes())
    (run / "config.json").write_text((trained / "config.json").read_text()[:40])
    for argv in (
        ["vqa_eval.py", "--results_dir", run, "--device", "cpu"],
        ["tokens.py", "--results_dir", run],
    ):
        assert "config.json is not readable JSON" in last_error_line(run_script(*argv))
