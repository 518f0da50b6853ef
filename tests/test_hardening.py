"""Hardening: concurrent extraction, per-sample cache identity, kill -9, atomic checkpoints, checks
before epoch 1, epoch 0 as a candidate, rank limits, 16-bit images and one-line user errors (the 14
cases of the hardening issue)."""

import io
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import run_script
from PIL import Image

import compare_svd_nn
import qwenvl_dataloader
import svd_baseline
import train_real_data
import tune
import visualize_svd_nn
from lowrank import demo_set, encoders, feature_cache, images, model, runs, training
from lowrank.cli import UserError

ROOT = Path(__file__).resolve().parent.parent
ENV = dict(os.environ, OMP_NUM_THREADS="1")


cli = run_script


def one_line_error(r):
    """A user error: exit status != 0, one 'error:' line on stderr, no traceback."""
    assert r.returncode != 0, r.stdout[-1000:]
    assert "Traceback" not in r.stderr, r.stderr[-2000:]
    lines = [
        l for l in r.stderr.splitlines() if l.strip() and "it/s]" not in l and "img/s]" not in l
    ]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr[-2000:]
    return lines[0]


# 1. two extraction processes on one cache
# ----------------------------------------------------------------------


def test_two_processes_on_one_cache_lose_nothing(tiny_cache, tmp_path):
    cache = tmp_path / "c"
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                str(ROOT / "qwenvl_dataloader.py"),
                "--dataset_dir",
                str(tiny_cache / "data"),
                "--model",
                "tiny-random",
                "--cache_dir",
                str(cache),
                "--device",
                "cpu",
                "--extract_batch_size",
                "2",
                "--start",
                str(a),
                "--limit",
                "30",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=ENV,
        )
        for a in (0, 10)
    ]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [e[-2000:] for _, e in outs]
    m = feature_cache.load_manifest(cache)
    files = sorted(int(p.stem.split("_")[1]) for p in cache.glob("features_*.pt"))
    assert files == list(range(40))
    # every file listed, none lost to the other writer
    assert sorted(map(int, m["samples"])) == files
    ref = feature_cache.load_manifest(tiny_cache / "cache")
    assert m["samples"] == ref["samples"]  # with image_size and fingerprint
    assert not list(cache.glob(".*.tmp"))
    for i in (0, 15, 39):
        assert torch.equal(
            feature_cache.read_feature(feature_cache.feature_path(cache, i)),
            feature_cache.read_feature(feature_cache.feature_path(tiny_cache / "cache", i)),
        )


def test_temp_files_of_live_processes_are_left_alone(tiny_cache, tmp_path):
    cache = tmp_path / "c"
    shutil.copytree(tiny_cache / "cache", cache)
    # pytest's parent: alive
    live = cache / f".features_3.pt.{feature_cache.HOST}-{os.getppid()}.tmp"
    dead = cache / f".features_4.pt.{feature_cache.HOST}-{2**22 + 7}.tmp"  # no such pid
    # another machine's: not ours to judge
    other = cache / f".features_5.pt.otherhost-{2**22 + 7}.tmp"
    for p in (live, dead, other):
        p.write_bytes(b"partial")
    qwenvl_dataloader.extract(
        tiny_cache / "data", cache, encoders.TINY, "cpu", progress=False, limit=2
    )
    assert live.exists() and other.exists() and not dead.exists()


# 2. cache identity per sample
# ------------------------------------------------------------------------------------


def test_another_data_set_with_the_same_ids_is_refused(tiny_cache, tmp_path):
    other = tmp_path / "other"
    demo_set.write_parquet(demo_set.make_rows(40, seed=4), other, shards=2)  # same count, same ids
    ids = [r["dataset_id"] for r in demo_set.make_rows(40, seed=3)]
    assert ids == [r["dataset_id"] for r in demo_set.make_rows(40, seed=4)]
    cache = tmp_path / "c"
    shutil.copytree(tiny_cache / "cache", cache)
    before = {p.name: p.read_bytes() for p in cache.glob("features_*.pt")}
    with pytest.raises(UserError, match="other image bytes.*another data set"):
        qwenvl_dataloader.extract(other, cache, encoders.TINY, "cpu", progress=False)
    # nothing overwritten
    assert before == {p.name: p.read_bytes() for p in cache.glob("features_*.pt")}


def test_features_without_manifest_are_not_adopted(tiny_cache, tmp_path):
    cache = tmp_path / "c"
    shutil.copytree(tiny_cache / "cache", cache)
    (cache / "manifest.json").unlink()
    with pytest.raises(UserError, match="no manifest.json.*--rebuild_manifest"):
        qwenvl_dataloader.extract(
            tiny_cache / "data", cache, encoders.TINY, "cpu", dtype="bfloat16", progress=False
        )
    # the sample log vouches for the files: a rebuild keeps them all (with their metadata) and
    # extracts nothing
    s = qwenvl_dataloader.extract(
        tiny_cache / "data", cache, encoders.TINY, "cpu", progress=False, rebuild_manifest=True
    )
    assert (s["extracted"], s["skipped"]) == (0, 40)
    assert (
        feature_cache.load_manifest(cache)["samples"]
        == feature_cache.load_manifest(tiny_cache / "cache")["samples"]
    )


def test_encoder_mismatch_is_found_before_loading(tiny_cache, tmp_path):
    # a checkpoint path that does not exist: if the encoder were loaded first, this would say 'could
    # not load'
    with pytest.raises(UserError, match="another encoder.*model"):
        qwenvl_dataloader.extract(
            tiny_cache / "data",
            tiny_cache / "cache",
            str(tmp_path / "Qwen2.5-VL-7B"),
            "cpu",
            progress=False,
        )


# 3. metadata survives kill -9 and a rebuild
# --------------------------------------------------------------------

KILLER = """
import os, signal, sys
sys.path.insert(0, {root!r})
from lowrank import encoders
import qwenvl_dataloader
enc = encoders.Encoder(encoders.TINY, "cpu")
calls = [0]
def dying(images):
    calls[0] += 1
    if calls[0] == 4:
        os.kill(os.getpid(), signal.SIGKILL)
    return enc(images)
dying.info = enc.info
qwenvl_dataloader.extract({data!r}, {cache!r}, encoder=dying, batch_size=4, progress=False)
"""


def test_metadata_survives_kill_9_and_rebuild(tiny_cache, tmp_path):
    cache = tmp_path / "c"
    r = subprocess.run(
        [
            sys.executable,
            "-c",
            KILLER.format(root=str(ROOT), data=str(tiny_cache / "data"), cache=str(cache)),
        ],
        env=ENV,
        capture_output=True,
    )
    assert r.returncode == -signal.SIGKILL
    assert len(list(cache.glob("features_*.pt"))) == 12  # 3 batches of 4 written, then killed
    s = qwenvl_dataloader.extract(tiny_cache / "data", cache, encoders.TINY, "cpu", progress=False)
    assert (s["extracted"], s["skipped"]) == (28, 12)
    ref = feature_cache.load_manifest(tiny_cache / "cache")["samples"]
    # image_size, bbox, question, answers of all 40
    assert feature_cache.load_manifest(cache)["samples"] == ref
    (cache / "manifest.json").unlink()
    qwenvl_dataloader.extract(
        tiny_cache / "data", cache, encoders.TINY, "cpu", progress=False, rebuild_manifest=True
    )
    assert feature_cache.load_manifest(cache)["samples"] == ref
    assert all("image_size" in m and "bbox" in m for m in ref.values())


# 4. best_model.pt is written atomically
# ------------------------------------------------------------------------

SMALL = ["--rank", "8", "--hidden", "16", "--batch_size", "8", "--device", "cpu"]


def test_best_model_write_is_atomic(tiny_cache, tmp_path, monkeypatch):
    train_real_data.main(
        [
            "--cache_dir",
            str(tiny_cache / "cache"),
            "--results_dir",
            str(tmp_path),
            *SMALL,
            "--epochs",
            "1",
        ]
    )
    good = (tmp_path / "best_model.pt").read_bytes()
    real_save = torch.save

    def killed_midway(obj, f, *a, **k):  # the process dies while writing the next best model
        if "best_model" in str(f):
            Path(f).write_bytes(b"PK\x03\x04 partial")
            raise KeyboardInterrupt
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", killed_midway)
    with pytest.raises(KeyboardInterrupt):
        train_real_data.main(
            [
                "--cache_dir",
                str(tiny_cache / "cache"),
                "--results_dir",
                str(tmp_path),
                *SMALL,
                "--epochs",
                "1",
                "--overwrite",
            ]
        )
    monkeypatch.setattr(torch, "save", real_save)
    assert (tmp_path / "best_model.pt").read_bytes() == good  # the previous best is intact
    stray = list(tmp_path.glob(".best_model.pt.*.tmp"))
    assert stray  # what a kill leaves ...
    for p in stray:  # ... as a dead process's temp file
        p.rename(p.with_name(f".best_model.pt.{feature_cache.HOST}-{2**22 + 7}.tmp"))
    compare_svd_nn.main(["--results_dir", str(tmp_path), "--device", "cpu"])  # compare loads it
    train_real_data.main(
        [
            "--cache_dir",
            str(tiny_cache / "cache"),
            "--results_dir",
            str(tmp_path),
            *SMALL,
            "--epochs",
            "1",
            "--overwrite",
        ]
    )
    assert not list(tmp_path.glob(".*.tmp"))  # cleaned by the next run


# 5. every split checked before epoch 1
# --------------------------------------------------------------------------


def copy_cache(tiny_cache, tmp_path):
    cache = tmp_path / "cache"
    shutil.copytree(tiny_cache / "cache", cache)
    return cache


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
        train_real_data.main(
            [
                "--cache_dir",
                str(cache),
                "--results_dir",
                str(tmp_path / "r"),
                *SMALL,
                "--epochs",
                "2",
            ]
        )
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
    r = cli(
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


# 6. the starting point is a candidate
# -------------------------------------------------------------------------


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


# 7. the non-finite stop names only checkpoints that exist
# ----------------------------------------------------------


def test_nonfinite_message_names_existing_checkpoints(tiny_cache, tmp_path, monkeypatch, capsys):
    real = model.loss_terms

    def poisoned(*a, **k):
        t = real(*a, **k)
        t["total"] = t["total"] * float("nan")
        return t

    monkeypatch.setattr(training, "loss_terms", poisoned)
    with pytest.raises(SystemExit):
        train_real_data.main(
            [
                "--cache_dir",
                str(tiny_cache / "cache"),
                "--results_dir",
                str(tmp_path),
                *SMALL,
                "--epochs",
                "2",
            ]
        )
    line = [l for l in capsys.readouterr().out.splitlines() if "NaN/Inf" in l][0]
    named = [w.strip("(),.") for w in line.split() if w.strip("(),.").endswith(".pt")]
    assert named and all(Path(p).exists() for p in named), line
    assert torch.load(tmp_path / "best_model.pt", weights_only=True)["epoch"] == 0


# 8. rank limits in every script
# -----------------------------------------------------------------------------------


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
    import bench

    with pytest.raises(
        UserError,
        match=f"--ranks {rank}: (the model .* serves ranks 1..16|a rank must be between 1)",
    ):
        bench.main(["--results_dir", str(trained), "--ranks", rank, "--device", "cpu"])
    with pytest.raises(ValueError, match="ranks 1..8"):
        model.Subspace(rank=8).factors(torch.randn(1, 256, 2048), rank=int(rank))


# 9. 16-bit images are scaled, not clipped
# ------------------------------------------------------------------------


def reference_to_rgb(im):
    """qwen-vl-utils' documented rule (fetch_image -> to_rgb), written out here: RGBA on white, else
    convert."""
    if im.mode == "RGBA":
        white = Image.new("RGB", im.size, (255, 255, 255))
        white.paste(im, mask=im.split()[3])
        return white
    return im.convert("RGB")


def odd_modes():
    """A real photo in every PIL mode a data set may hold, as encoded files where the format keeps
    the mode."""
    photo = dict(demo_set.photos(["astronaut"]))["astronaut"].resize((64, 48))
    grey = np.array(photo.convert("L"))
    alpha = Image.fromarray((np.arange(64 * 48).reshape(48, 64) % 256).astype(np.uint8))
    rgba = photo.convert("RGBA")
    rgba.putalpha(alpha)
    la = photo.convert("LA")
    la.putalpha(alpha)
    p = photo.convert("P")
    p.info["transparency"] = 0
    out = {
        "RGBA": rgba,
        "LA": la,
        "P+transparency": p,
        "CMYK": photo.convert("CMYK"),
        "I;16": Image.fromarray(grey.astype(np.uint16) * 257),
        "F": Image.fromarray(grey.astype(np.float32) / 255),
    }
    for name in ("RGBA", "LA", "P+transparency"):
        buf = io.BytesIO()
        out[name].save(buf, "PNG", **({"transparency": 0} if name == "P+transparency" else {}))
        out[name + " (png)"] = buf.getvalue()
    return out


@pytest.mark.parametrize("mode", list(odd_modes()))
def test_every_pil_mode_decodes_as_qwen_vl_utils(mode):
    data = odd_modes()[mode]
    im = data if isinstance(data, Image.Image) else Image.open(io.BytesIO(data))
    want = np.array(reference_to_rgb(im))
    assert np.array_equal(np.array(images.open_rgb(data)), want), mode
    try:  # the reference itself, where it imports (it needs torchvision)
        from qwen_vl_utils.vision_process import to_rgb
    except Exception:
        return
    assert np.array_equal(np.array(images.open_rgb(data)), np.array(to_rgb(im)))


# 10. user errors are one line
# --------------------------------------------------------------------------------------


def test_user_errors_are_one_line(tmp_path, trained):
    import pyarrow as pa
    import pyarrow.parquet as pq

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
            cli(
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
        cli(
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
        cli("compare_svd_nn.py", "--results_dir", trained, "--checkpoint", tmp_path / "junk.pt")
    )
    assert "junk.pt is not a readable checkpoint" in line

    class Evil:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    torch.save({"config": {}, "model": Evil()}, tmp_path / "evil.pt")
    r = cli("visualize_svd_nn.py", "--results_dir", trained, "--checkpoint", tmp_path / "evil.pt")
    line = one_line_error(r)
    assert (
        "evil.pt is refused: it is not plain data" in line
        and "weights_only=False" not in r.stderr + r.stdout
    )
    assert not (tmp_path / "pwned").exists()


# splits by source photo (the honest-baselines issue)
# ---------------------------------------------------------------


def test_demo_split_is_disjoint_by_photo(tmp_path):
    rows = demo_set.make_rows(36, seed=2)
    data = demo_set.write_parquet(rows, tmp_path / "data")
    qwenvl_dataloader.extract(
        data, tmp_path / "c", encoders.TINY, "cpu", progress=False, batch_size=12
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


def test_offline_hub_id_fails_at_once_with_advice(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty_hf_home"))
    assert not encoders.hub_reachable()
    with pytest.raises(
        UserError, match="hub is unreachable.*not in the local hub cache.*tiny-random"
    ):
        encoders.Encoder("Qwen/Qwen2.5-VL-3B-Instruct", "cpu")
