"""Any Qwen vision encoder, any resolution: each family's tiny encoder and two resolutions run
extract -> train (both archs) -> compare -> visualise, the token layout holds on a non-square grid,
and shapes never mix."""

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

import compare_svd_nn
import qwenvl_dataloader
import train_real_data
import visualize_svd_nn
from lowrank import demo_set, encoders, feature_cache, images
from lowrank.cli import UserError
from lowrank.encoders import EncoderSpec

MATRIX = {
    ("tiny-random", "448"): ((16, 16), 2048),
    ("tiny-random-qwen2-vl", "448"): ((16, 16), 1536),
    ("tiny-random-qwen3-vl", "448"): ((14, 14), 1024),  # 32-px cells
    ("tiny-random", "672"): ((24, 24), 2048),
    ("tiny-random", "448x896"): ((32, 16), 2048),  # W 448, H 896: 32 rows of 16 tokens
}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("enc_data")
    return demo_set.write_parquet(demo_set.make_rows(12, seed=5), root / "data")


@pytest.mark.parametrize("model,size", list(MATRIX))
def test_family_and_resolution_end_to_end(data, tmp_path, model, size):
    (h, w), dim = MATRIX[(model, size)]
    cache = tmp_path / "cache"
    s = qwenvl_dataloader.extract(
        data, cache, EncoderSpec(model, "cpu", image_size=size), batch_size=4, progress=False
    )
    assert s["extracted"] == 12
    m = feature_cache.load_manifest(cache).encoder
    assert (
        m.grid == [h, w] and m.feature_dim == dim and m.family == encoders.RANDOM_TOWERS[model][0]
    )
    assert feature_cache.cached_shape(cache) == (h * w, dim)
    x = feature_cache.read_feature(feature_cache.feature_path(cache, 0))
    assert x.shape == (h * w, dim) and torch.isfinite(x).all() and x.std() > 0
    for arch in ("subspace", "symmetric"):
        out = tmp_path / arch
        res = train_real_data.main(
            [
                "--cache_dir",
                str(cache),
                "--results_dir",
                str(out),
                "--device",
                "cpu",
                "--rank",
                "8",
                "--arch",
                arch,
                "--epochs",
                "1",
                "--batch_size",
                "4",
            ]
            # an option of the symmetric arch alone
            + (["--hidden", "16"] if arch == "symmetric" else [])
        )
        cfg = json.loads((out / "config.json").read_text())
        assert (cfg["tokens"], cfg["dim"], cfg["grid"]) == (h * w, dim, [h, w])
        assert res["nn"]["cosine"]["n"] == 1  # 12 images: 10 train, 1 val, 1 test
        c = compare_svd_nn.main(["--results_dir", str(out), "--device", "cpu", "--batch_size", "4"])
        assert c["svd"]["cosine"]["mean"] >= c["nn"]["cosine"]["mean"] - 1e-9
    d, paths = visualize_svd_nn.main(
        [
            "--results_dir",
            str(tmp_path / "subspace"),
            "--out",
            str(tmp_path / "vis"),
            "--channels",
            f"0,{dim - 1}",
        ]
    )
    assert d["hw"] == (h, w) and all(p.exists() for p in paths)
    page = paths[-1].read_text()
    assert f"repeat({w}," in page and f'"rows": {h}, "cols": {w}' in page


def test_token_layout_on_a_non_square_grid():
    """Token t covers the cell at row t // W, column t % W: invert one 28x28 cell, see which token
    moves most."""
    enc = encoders.Encoder(encoders.TINY, "cpu", image_size="448x896")
    assert enc.grid == [32, 16]
    base = images.load_image(
        demo_set.encode(dict(demo_set.photos(["astronaut"]))["astronaut"]), (448, 896)
    )
    x0 = enc([base])[0]
    for r, c in [(0, 0), (0, 15), (31, 0), (20, 7), (31, 15)]:
        a = np.array(base).copy()
        a[r * 28 : (r + 1) * 28, c * 28 : (c + 1) * 28] = (
            255 - a[r * 28 : (r + 1) * 28, c * 28 : (c + 1) * 28]
        )
        change = (enc([Image.fromarray(a)])[0] - x0).norm(dim=1)
        assert int(change.argmax()) == r * 16 + c, (r, c)


def test_qwen3_layout_uses_32_px_cells():
    enc = encoders.Encoder("tiny-random-qwen3-vl", "cpu")
    base = images.load_image(
        demo_set.encode(dict(demo_set.photos(["coffee"]))["coffee"]), (448, 448)
    )
    x0 = enc([base])[0]
    for r, c in [(0, 13), (6, 9)]:
        a = np.array(base).copy()
        a[r * 32 : (r + 1) * 32, c * 32 : (c + 1) * 32] = (
            255 - a[r * 32 : (r + 1) * 32, c * 32 : (c + 1) * 32]
        )
        assert int((enc([Image.fromarray(a)])[0] - x0).norm(dim=1).argmax()) == r * 14 + c


def test_image_size_must_fit_the_cells(data, tmp_path):
    with pytest.raises(UserError, match="multiple of 28"):
        encoders.Encoder(encoders.TINY, "cpu", image_size="450")
    with pytest.raises(UserError, match="multiple of 32"):
        encoders.Encoder("tiny-random-qwen3-vl", "cpu", image_size="700")  # 672 = 21 x 32 fits
    with pytest.raises(UserError, match="WxH"):
        images.parse_image_size("big")


def test_shapes_never_mix(data, tmp_path):
    a, b = tmp_path / "a448", tmp_path / "b672"
    qwenvl_dataloader.extract(data, a, EncoderSpec(encoders.TINY, "cpu"), progress=False)
    qwenvl_dataloader.extract(
        data, b, EncoderSpec(encoders.TINY, "cpu", image_size="672"), progress=False
    )
    # before loading the encoder
    with pytest.raises(UserError, match="another encoder.*image_size"):
        qwenvl_dataloader.extract(
            data, a, EncoderSpec(encoders.TINY, "cpu", image_size="672"), progress=False
        )
    train_real_data.main(
        [
            "--cache_dir",
            str(a),
            "--results_dir",
            str(tmp_path / "r"),
            "--device",
            "cpu",
            "--rank",
            "8",
            "--arch",
            "subspace",
            "--epochs",
            "1",
            "--batch_size",
            "4",
        ]
    )
    with pytest.raises(UserError, match=r"trained on \[256, 2048\].*holds \[576, 2048\]"):
        compare_svd_nn.main(["--results_dir", str(tmp_path / "r"), "--cache_dir", str(b)])
    with pytest.raises(UserError, match=r"trained on \[256, 2048\].*holds \[576, 2048\]"):
        visualize_svd_nn.main(["--results_dir", str(tmp_path / "r"), "--cache_dir", str(b)])


def write_checkpoint(d, family, tiny):
    """A checkpoint laid out as the hub's are: Qwen2-VL and Qwen2.5-VL keep the tower under
    visual.*, Qwen3-VL under model.visual.*; the language model's weights are never loaded."""
    import transformers
    from safetensors.torch import save_file

    top = {"qwen2_vl": transformers.Qwen2VLConfig, "qwen3_vl": transformers.Qwen3VLConfig}[family]
    text = dict(
        hidden_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        vocab_size=128,
        intermediate_size=64,
    )
    if family == "qwen2_vl":
        text["rope_scaling"] = {"type": "mrope", "mrope_section": [8, 4, 4]}
    top(vision_config=encoders.RANDOM_TOWERS[tiny][1], text_config=text).save_pretrained(d)
    prefix = "model.visual." if family == "qwen3_vl" else "visual."
    enc = encoders.Encoder(tiny, "cpu")
    sd = {prefix + k: v.contiguous() for k, v in enc.tower.state_dict().items()}
    sd[
        "model.language_model.embed_tokens.weight"
        if family == "qwen3_vl"
        else "model.embed_tokens.weight"
    ] = torch.zeros(8, 8)
    save_file(sd, os.path.join(d, "model.safetensors"), metadata={"format": "pt"})
    return enc


@pytest.mark.parametrize(
    "family,tiny", [("qwen2_vl", "tiny-random-qwen2-vl"), ("qwen3_vl", "tiny-random-qwen3-vl")]
)
def test_checkpoint_family_is_read_from_its_config(tmp_path, family, tiny):
    ref = write_checkpoint(tmp_path, family, tiny)
    enc = encoders.Encoder(str(tmp_path), "cpu")
    assert enc.info["family"] == family and enc.info["feature_dim"] == ref.dim
    for (k, a), b in zip(ref.tower.state_dict().items(), enc.tower.state_dict().values()):
        assert torch.equal(a, b), k
    ims = [images.load_image(demo_set.encode(im)) for _, im in demo_set.photos()[:2]]
    assert torch.equal(enc(ims), ref(ims))


def test_repeated_cells_are_found_in_the_pixels():
    """PixelPrune's test: a cell whose pixels equal (or, with a tolerance, nearly equal) a kept cell
    earlier in raster order is dropped; against a loop written here over the cells."""
    photo = images.load_image(demo_set.make_rows(1, seed=2)[0]["image"]["bytes"], (112, 112))
    a = np.array(photo)
    a[0:28, 28:56] = a[0:28, 0:28]  # cell 1 repeats cell 0
    a[56:84, 56:84] = a[0:28, 0:28]  # cell 10 too
    a[84:112, 84:112] = np.clip(a[0:28, 0:28].astype(int) + 3, 0, 255)  # cell 15: within 3
    image = Image.fromarray(a)
    keep = encoders.repeated_cells(image, 28)
    assert keep.tolist() == [i not in (1, 10) for i in range(16)]
    near = encoders.repeated_cells(image, 28, tol=3)
    cells = [
        a[r : r + 28, c : c + 28].astype(int) for r in range(0, 112, 28) for c in range(0, 112, 28)
    ]
    want = []
    for i, c in enumerate(cells):
        want.append(all(np.abs(c - cells[j]).max() > 3 for j in range(i) if want[j]))
    assert near.tolist() == want and not want[15]


@pytest.mark.parametrize("model", ["tiny-random", "tiny-random-qwen2-vl", "tiny-random-qwen3-vl"])
def test_the_pruned_tower_keeps_each_patch_at_its_own_place(model):
    """pixelprune before the tower: keeping every cell gives the tower's own output exactly; with
    Qwen2.5-VL's blocks all windowed, removing one whole window leaves every other token exactly as
    the whole image's (the positions and windows are the kept patches' own); Qwen3-VL's deepstack
    features come for the kept cells only."""
    enc = encoders.Encoder(model, "cpu")
    image = images.load_image(demo_set.make_rows(1, seed=0)[0]["image"]["bytes"], (448, 448))
    inputs = enc.processor(images=[image], return_tensors="pt")
    pv, grid = inputs["pixel_values"], inputs["image_grid_thw"]
    rows, cols = enc.grid
    with torch.no_grad():
        full = enc.tower(pv, grid_thw=grid)
        keep = torch.ones(rows * cols, dtype=torch.bool)
        same = encoders.pruned_tower(enc.tower, pv, grid, keep)
        assert torch.equal(same.pooler_output, full.pooler_output)
        keep[[5, 100]] = False
        part = encoders.pruned_tower(enc.tower, pv, grid, keep)
        assert part.pooler_output.shape == (rows * cols - 2, enc.dim)
        if model == "tiny-random-qwen3-vl":
            assert encoders.deepstack_of(part).shape == (1, rows * cols - 2, enc.dim)
        if model == "tiny-random":
            enc.tower.fullatt_block_indexes = []  # every block windowed (4 x 4 cells)
            full = enc.tower(pv, grid_thw=grid).pooler_output
            keep = torch.ones(rows, cols, dtype=torch.bool)
            keep[4:8, 8:12] = False
            part = encoders.pruned_tower(enc.tower, pv, grid, keep.flatten()).pooler_output
            assert torch.equal(part, full[keep.flatten()])
