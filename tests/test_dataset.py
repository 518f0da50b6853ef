"""lowrank/dataset.py: a cached sample's image is drawn only if it is the one the features came
from; a compressed cache's basis is checked."""

import json
import os
import shutil

import pytest
import torch

import compress
from lowrank import cli, dataset


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
