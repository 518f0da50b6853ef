"""Where in the tower: every layer's tokens in raster order (Qwen2.5-VL's window order undone,
checked with a one-patch probe on real pixels), the merger's output equal to the features a cache
holds, the layer statistics against NumPy, layers.py end to end and any layer as a feature cache."""

import json

import numpy as np
import pytest
import torch

import layers
import qwenvl_dataloader
import train_real_data
import vqa_eval
from lowrank import demo_set, encoders, images, metrics
from lowrank.cli import UserError
from lowrank.encoders import EncoderSpec
from lowrank.extraction import Part


def photos(n=2, seed=1):
    return [
        images.load_image(r["image"]["bytes"], (448, 448)) for r in demo_set.make_rows(n, seed=seed)
    ]


def run_layers(enc, ims):
    inp = enc.processor(images=ims, return_tensors="pt")
    return encoders.tower_layers(enc.tower, inp["pixel_values"], inp["image_grid_thw"])


def changed(a, b):
    """Raster indices of the tokens that differ between two [T, D] maps."""
    return set(((a - b).abs().amax(1) > 1e-6).nonzero().squeeze(1).tolist())


@pytest.mark.parametrize("r, c", [(0, 0), (13, 22), (31, 9)])
def test_one_patch_probe_finds_its_patch_and_its_window(r, c):
    """Paint one 14-px patch of a photo: the patch embedding changes at exactly that raster
    position; block 0 (window attention, 112-px windows = 8 x 8 patches) changes exactly the 64
    patches of its window; block 1 (full attention) changes beyond it. A wrong un-permutation would
    put the changes elsewhere."""
    enc = encoders.Encoder(encoders.TINY, "cpu")
    image = photos(1)[0]
    probe = np.asarray(image).copy()
    probe[14 * r : 14 * r + 14, 14 * c : 14 * c + 14] = [255, 0, 0]
    from PIL import Image

    _, a = run_layers(enc, [image])
    _, b = run_layers(enc, [Image.fromarray(probe)])
    assert changed(a["patch_embed"][0], b["patch_embed"][0]) == {r * 32 + c}
    window = {(8 * (r // 8) + i) * 32 + 8 * (c // 8) + j for i in range(8) for j in range(8)}
    assert changed(a["block_0"][0], b["block_0"][0]) == window
    assert len(changed(a["block_1"][0], b["block_1"][0])) > 64


def test_qwen2_vl_has_no_windows():
    """The same probe on the tiny Qwen2-VL tower (every block full attention): block 0 changes
    beyond 8 x 8."""
    from PIL import Image

    enc = encoders.Encoder("tiny-random-qwen2-vl", "cpu")
    image = photos(1)[0]
    probe = np.asarray(image).copy()
    probe[14 * 5 : 14 * 6, 14 * 5 : 14 * 6] = 0
    _, a = run_layers(enc, [image])
    _, b = run_layers(enc, [Image.fromarray(probe)])
    assert changed(a["patch_embed"][0], b["patch_embed"][0]) == {5 * 32 + 5}
    assert len(changed(a["block_0"][0], b["block_0"][0])) > 64


@pytest.mark.parametrize("model", [encoders.TINY, "tiny-random-qwen2-vl", "tiny-random-qwen3-vl"])
def test_the_merger_is_todays_features(model):
    """The merger's output (raster order) is bit for bit what Encoder gives a cache; the last
    block's raster map, grouped back into 2 x 2 units and put through the merger, gives the same
    tokens; Qwen3-VL's deepstack taps are layers of merged tokens."""
    enc = encoders.Encoder(model, "cpu")
    ims = photos(2)
    out, maps = run_layers(enc, ims)
    feats = enc(ims)
    assert torch.equal(maps["merger"], feats) and torch.equal(out.reshape(feats.shape), feats)
    last = maps[f"block_{len(enc.tower.blocks) - 1}"]
    m = enc.tower.config.spatial_merge_size
    H, W = last.shape[1] ** 0.5, last.shape[1] ** 0.5
    H, W = int(H), int(W)
    units = (
        last.reshape(2, H // m, m, W // m, m, -1)
        .permute(0, 1, 3, 2, 4, 5)
        .reshape(-1, last.shape[-1])
    )
    with torch.no_grad():
        torch.testing.assert_close(
            enc.tower.merger(units).reshape(feats.shape), feats, rtol=1e-5, atol=1e-5
        )
    if model.endswith("qwen3-vl"):
        assert "deepstack_0" in maps and maps["deepstack_0"].shape == feats.shape


def test_spectrum_statistics_against_numpy():
    X = np.random.default_rng(0).standard_normal((50, 20)) @ np.diag(np.linspace(3, 0.1, 20))
    s = np.linalg.svd(X, compute_uv=False)
    got = metrics.spectrum_stats(torch.from_numpy(s), [4, 30])
    p = s / s.sum()
    assert got["effective_rank"] == pytest.approx(np.exp(-(p * np.log(p)).sum()))
    assert got["stable_rank"] == pytest.approx((s**2).sum() / s[0] ** 2)
    assert got["participation_ratio"] == pytest.approx((s**2).sum() ** 2 / (s**4).sum())
    assert (
        got["energy_4"] == pytest.approx((s[:4] ** 2).sum() / (s**2).sum())
        and got["energy_30"] == 1.0
    )
    U, S, Vt = np.linalg.svd(X, full_matrices=False)
    Xr = (U[:, :4] * S[:4]) @ Vt[:4]
    assert got["cosine_4"] == pytest.approx((X * Xr).sum() / np.linalg.norm(X) / np.linalg.norm(Xr))


def test_layers_script_end_to_end(trained):
    rows = layers.main(
        ["--results_dir", str(trained), "--num_samples", "3", "--ranks", "4,16", "--device", "cpu"]
    )
    assert [r["layer"] for r in rows] == ["patch_embed", "block_0", "block_1", "merger"]
    assert [(r["tokens"], r["cell_px"], r["dim"]) for r in rows] == [(1024, 14, 64)] * 3 + [
        (256, 28, 2048)
    ]
    for r in rows:
        assert (
            0 < r["energy_4"] < r["energy_16"] <= 1 and 1 <= r["stable_rank"] <= r["effective_rank"]
        )
        assert 0 < r["shared_64"] <= 1
    d = json.loads((trained / "layers_test.json").read_text())
    assert d["full_attention_blocks"] == [1] and len(d["rows"]) == 4
    assert (trained / "layers_test.png").stat().st_size > 0 and (
        trained / "layers_test.csv"
    ).exists()


def test_a_layer_as_a_cache(tiny_cache, tmp_path):
    """--layer block_0: the cache holds that layer's raster map ([1024, 64], 32 x 32 grid of 14-px
    cells), equal to tower_layers'; another layer into the same cache is refused; vqa_eval refuses a
    cache that is not the tower's output."""
    qwenvl_dataloader.extract(
        tiny_cache / "data",
        tmp_path / "b0",
        EncoderSpec(encoders.TINY, "cpu", layer="block_0"),
        part=Part(limit=3),
        progress=False,
    )
    m = json.loads((tmp_path / "b0" / "manifest.json").read_text())["encoder"]
    assert (m["layer"], m["grid"], m["cell"], m["feature_dim"]) == ("block_0", [32, 32], 14, 64)
    enc = encoders.Encoder(encoders.TINY, "cpu")
    source = images.Source(tiny_cache / "data")
    image = images.load_image(source.image(0), (448, 448))
    _, maps = run_layers(enc, [image])
    torch.testing.assert_close(
        torch.load(tmp_path / "b0" / "features_0.pt").float(), maps["block_0"][0]
    )
    with pytest.raises(UserError, match="layer: cache has 'block_0', this run 'block_1'"):
        qwenvl_dataloader.extract(
            tiny_cache / "data",
            tmp_path / "b0",
            EncoderSpec(encoders.TINY, "cpu", layer="block_1"),
            part=Part(limit=3),
            progress=False,
        )
    with pytest.raises(UserError, match="layer: cache has 'merger'"):
        qwenvl_dataloader.extract(
            tiny_cache / "data",
            tiny_cache / "cache",
            EncoderSpec(encoders.TINY, "cpu", layer="block_0"),
            part=Part(limit=3),
            progress=False,
        )


def test_training_runs_on_a_layer_cache_and_vqa_eval_refuses_it(tiny_cache, tmp_path):
    qwenvl_dataloader.extract(
        tiny_cache / "data",
        tmp_path / "b1",
        EncoderSpec(encoders.TINY, "cpu", layer="block_1"),
        progress=False,
    )
    run = tmp_path / "run"
    train_real_data.main(
        [
            "--cache_dir",
            str(tmp_path / "b1"),
            "--results_dir",
            str(run),
            "--rank",
            "8",
            "--epochs",
            "1",
            "--arch",
            "subspace",
        ]
        + ["--device", "cpu", "--batch_size", "8"]
    )
    assert json.loads((run / "history.json").read_text())[-1]["val_cosine"] > 0.5
    with pytest.raises(UserError, match="holds the tower's block_1, not its output"):
        vqa_eval.main(
            ["--results_dir", str(run), "--model", encoders.TINY, "--out_dir", str(tmp_path)]
        )
