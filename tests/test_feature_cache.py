"""lowrank/feature_cache.py: the manifest read into typed records, with the legacy defaults in one
place."""

import json
import shutil
import subprocess
import sys

import pytest
import torch
from helpers import ENV, ROOT, error_line, last_error_line, run_script, wait_for_lock

from lowrank import cli, encoders, feature_cache
from lowrank.cli import UserError


def write(cache, manifest):
    cache.mkdir(parents=True, exist_ok=True)
    (cache / feature_cache.MANIFEST).write_text(json.dumps(manifest))


def test_a_legacy_manifest_reads_with_the_defaults_of_its_time(tmp_path):
    """A cache from before --layer and before image_size was recorded: the tower's output at 448
    px; a sample's metadata keeps every field it had (--group_by reads any of them)."""
    write(
        tmp_path / "c",
        {
            "encoder": {"model": "m", "grid": [16, 16], "feature_dim": 2048, "unknown": 1},
            "source": {"kind": "textvqa", "path": "/data"},
            "samples": {"3": {"id": "a", "question": "q", "answers": ["x"], "shard": "s0"}},
        },
    )
    m = feature_cache.load_manifest(tmp_path / "c")
    assert (m.encoder.layer, m.encoder.size, m.shape, m.grid) == (
        "merger",
        (448, 448),
        (256, 2048),
        (16, 16),
    )
    assert (m.source_kind, m.source_path, m.failed, m.codec, m.synthetic) == (
        "textvqa",
        "/data",
        {},
        None,
        False,
    )
    s = m.sample(3)
    assert (s.id, s.question, s.answers, s.bbox, s.fields["shard"]) == (
        "a",
        "q",
        ("x",),
        None,
        "s0",
    )
    assert m.sample(4) == feature_cache.SampleRecord()  # not extracted: nothing known of it


def test_a_non_square_cache_and_a_manifest_without_a_grid(tmp_path):
    write(
        tmp_path / "w", {"encoder": {"image_size": [448, 896], "grid": [32, 16], "feature_dim": 8}}
    )
    m = feature_cache.load_manifest(tmp_path / "w")
    assert m.encoder.size == (448, 896) and m.shape == (512, 8)
    write(tmp_path / "g", {"encoder": {"model": "m"}})
    with pytest.raises(UserError, match="records no token grid / feature dim"):
        feature_cache.load_manifest(tmp_path / "g").shape


def test_a_torn_sample_log_line_never_glues_onto_the_next(tmp_path):
    log = tmp_path / feature_cache.SAMPLE_LOG
    log.write_text('{"i": 0, "id": "a"}\n{"i": 1, "id"')
    feature_cache.append_sample_log(tmp_path, [{"i": 2, "id": "c"}])
    assert set(feature_cache.read_sample_log(tmp_path)) == {0, 2}


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
        assert r.returncode == 1 and f"in use by PID {holder.pid} (hung)" in error_line(r.stderr)
    finally:
        holder.kill()


def test_an_all_zero_feature_map_is_named(tiny_cache, tmp_path):
    cache = tmp_path / "cache"
    shutil.copytree(tiny_cache / "cache", cache)
    x = torch.load(cache / "features_3.pt", weights_only=True)
    torch.save(torch.zeros_like(x), cache / "features_3.pt")
    with pytest.raises(cli.BadFeature, match="features_3.pt: all values are 0"):
        feature_cache.read_feature(cache / "features_3.pt")


def test_constant_features_are_named(tiny_cache, tmp_path):
    cache = tmp_path / "c"
    import shutil

    shutil.copytree(tiny_cache / "cache", cache)
    x = feature_cache.read_feature(feature_cache.feature_path(cache, 5))
    torch.save(torch.full_like(x, 0.5), feature_cache.feature_path(cache, 5))
    r = run_script("svd_baseline.py", "--cache_dir", cache, "--rank", "8", "--device", "cpu")
    assert "features_5.pt: all values are 0.5" in last_error_line(r)
