"""lowrank/extraction.py: two processes on one cache, temp files of live processes, per-sample cache
identity, the encoder checked before loading, metadata through kill -9 and a rebuild, a truncated
manifest rebuilt, an offline hub id."""

import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch
from helpers import ENV, ROOT, train

import qwenvl_dataloader
from lowrank import demo_set, encoders, feature_cache
from lowrank.cli import UserError
from lowrank.encoders import EncoderSpec
from lowrank.extraction import Part

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
qwenvl_dataloader.extract({data!r}, {cache!r}, dying, batch_size=4, progress=False)
"""


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
    assert sorted(m.samples) == files
    ref = feature_cache.load_manifest(tiny_cache / "cache")
    assert m.samples == ref.samples  # with image_size and fingerprint
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
        tiny_cache / "data",
        cache,
        EncoderSpec(encoders.TINY, "cpu"),
        part=Part(limit=2),
        progress=False,
    )
    assert live.exists() and other.exists() and not dead.exists()


def test_another_data_set_with_the_same_ids_is_refused(tiny_cache, tmp_path):
    other = tmp_path / "other"
    demo_set.write_parquet(demo_set.make_rows(40, seed=4), other, shards=2)  # same count, same ids
    ids = [r["dataset_id"] for r in demo_set.make_rows(40, seed=3)]
    assert ids == [r["dataset_id"] for r in demo_set.make_rows(40, seed=4)]
    cache = tmp_path / "c"
    shutil.copytree(tiny_cache / "cache", cache)
    before = {p.name: p.read_bytes() for p in cache.glob("features_*.pt")}
    with pytest.raises(UserError, match="other image bytes.*another data set"):
        qwenvl_dataloader.extract(other, cache, EncoderSpec(encoders.TINY, "cpu"), progress=False)
    # nothing overwritten
    assert before == {p.name: p.read_bytes() for p in cache.glob("features_*.pt")}


def test_features_without_manifest_are_not_adopted(tiny_cache, tmp_path):
    cache = tmp_path / "c"
    shutil.copytree(tiny_cache / "cache", cache)
    (cache / "manifest.json").unlink()
    with pytest.raises(UserError, match="no manifest.json.*--rebuild_manifest"):
        qwenvl_dataloader.extract(
            tiny_cache / "data",
            cache,
            EncoderSpec(encoders.TINY, "cpu", dtype="bfloat16"),
            progress=False,
        )
    # the sample log vouches for the files: a rebuild keeps them all (with their metadata) and
    # extracts nothing
    s = qwenvl_dataloader.extract(
        tiny_cache / "data",
        cache,
        EncoderSpec(encoders.TINY, "cpu"),
        progress=False,
        rebuild_manifest=True,
    )
    assert (s["extracted"], s["skipped"]) == (0, 40)
    assert (
        feature_cache.load_manifest(cache).samples
        == feature_cache.load_manifest(tiny_cache / "cache").samples
    )


def test_encoder_mismatch_is_found_before_loading(tiny_cache, tmp_path):
    # a checkpoint path that does not exist: if the encoder were loaded first, this would say 'could
    # not load'
    with pytest.raises(UserError, match="another encoder.*model"):
        qwenvl_dataloader.extract(
            tiny_cache / "data",
            tiny_cache / "cache",
            EncoderSpec(str(tmp_path / "Qwen2.5-VL-7B"), "cpu"),
            progress=False,
        )


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
    s = qwenvl_dataloader.extract(
        tiny_cache / "data", cache, EncoderSpec(encoders.TINY, "cpu"), progress=False
    )
    assert (s["extracted"], s["skipped"]) == (28, 12)
    ref = feature_cache.load_manifest(tiny_cache / "cache").samples
    # image_size, bbox, question, answers of all 40
    assert feature_cache.load_manifest(cache).samples == ref
    (cache / "manifest.json").unlink()
    qwenvl_dataloader.extract(
        tiny_cache / "data",
        cache,
        EncoderSpec(encoders.TINY, "cpu"),
        progress=False,
        rebuild_manifest=True,
    )
    assert feature_cache.load_manifest(cache).samples == ref
    assert all(m.image_size and m.bbox for m in ref.values())


def test_a_truncated_manifest_is_named_and_extraction_rebuilds_it(tiny_cache, tmp_path, capsys):
    cache = tmp_path / "cache"
    shutil.copytree(tiny_cache / "cache", cache)
    (cache / "manifest.json").write_text((cache / "manifest.json").read_text()[:500])
    with pytest.raises(UserError, match="manifest.json is damaged"):
        train(cache, tmp_path / "r", "--epochs", "1")
    s = qwenvl_dataloader.extract(
        tiny_cache / "data", cache, EncoderSpec(encoders.TINY, "cpu"), progress=False
    )
    assert "rebuilding it from the sample log" in capsys.readouterr().out
    assert s["extracted"] == 0 and s["skipped"] == 40


def test_offline_hub_id_fails_at_once_with_advice(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty_hf_home"))
    assert not encoders.hub_reachable()
    with pytest.raises(
        UserError, match="hub is unreachable.*not in the local hub cache.*tiny-random"
    ):
        encoders.Encoder("Qwen/Qwen2.5-VL-3B-Instruct", "cpu")
