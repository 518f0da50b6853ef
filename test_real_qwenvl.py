"""
Data-loader test (the original's test_real_qwenvl.py): real image bytes in a TextVQA-schema parquet,
the real Qwen2.5-VL classes and processor with the tiny offline encoder. Runs under pytest and as
`python test_real_qwenvl.py`.
"""

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import qwenvl_dataloader
from lowrank import demo_set, encoders, feature_cache, images, runs
from lowrank.cli import UserError
from lowrank.encoders import EncoderSpec
from lowrank.extraction import Part

HERE = Path(__file__).resolve().parent


def odd_images():
    """Non-square, alpha, grayscale, CMYK, tiny and corrupt images, all from real photo pixels."""
    ph = dict(demo_set.photos())
    wide = ph["rocket"].resize((1000, 300))
    rgba = ph["chelsea"].convert("RGBA")
    a = np.array(rgba)
    a[:, : a.shape[1] // 2, 3] = 0  # left half transparent: must come out white
    rgba = Image.fromarray(a)
    return [
        ("wide.jpg", demo_set.encode(wide), [100.0, 50.0, 300.0, 100.0]),
        ("alpha.png", demo_set.encode(rgba, "PNG"), None),
        ("gray.png", demo_set.encode(ph["camera"].convert("L"), "PNG"), None),
        ("cmyk.jpg", demo_set.encode(ph["coffee"].convert("CMYK")), None),
        ("small.png", demo_set.encode(ph["astronaut"].resize((20, 20)), "PNG"), None),
        ("corrupt.jpg", demo_set.encode(ph["coins"])[:300], None),
    ]


def build_parquet(path, n_demo=6):
    rows = demo_set.make_rows(n_demo, seed=1)
    for k, (name, data, bbox) in enumerate(odd_images()):
        rows.append(
            {
                "image": {"bytes": data, "path": name},
                "question": f"q{k}",
                "answer": [f"a{k}"] * 10,
                "dataset_id": f"odd-{k}",
                "bbox": bbox,
            }
        )
    return demo_set.write_parquet(rows, path, shards=2), rows


CORRUPT = 6 + 5  # index of corrupt.jpg


@pytest.fixture(scope="module")
def encoder():
    return encoders.Encoder(encoders.TINY, "cpu")


@pytest.fixture(scope="module")
def cache(tmp_path_factory, encoder):
    root = tmp_path_factory.mktemp("extract")
    src, rows = build_parquet(root / "parquet")
    summary = qwenvl_dataloader.extract(src, root / "cache", encoder, batch_size=4, progress=False)
    return src, root / "cache", rows, summary


def test_shapes_and_summary(cache):
    src, cache_dir, rows, s = cache
    assert (s["extracted"], s["skipped"], s["failed"]) == (len(rows) - 1, 0, 1)
    for i in range(len(rows)):
        p = feature_cache.feature_path(cache_dir, i)
        if i == CORRUPT:
            assert not p.exists()
            continue
        x = torch.load(p, weights_only=True)
        assert x.shape == (256, 2048) and x.dtype == torch.float32 and torch.isfinite(x).all()
        assert x.std() > 0


def test_manifest(cache):
    src, cache_dir, rows, _ = cache
    m = json.loads((cache_dir / "manifest.json").read_text())
    assert m["encoder"]["model"] == "tiny-random" and m["encoder"]["dtype"] == "float32"
    assert m["encoder"]["image_size"] == 448 and m["encoder"]["grid"] == [16, 16]
    assert m["source"]["kind"] == "textvqa" and m["source"]["num_samples"] == len(rows)
    assert sorted(map(int, m["samples"])) == [i for i in range(len(rows)) if i != CORRUPT]
    for i, r in enumerate(rows):
        if i == CORRUPT:
            continue
        e = m["samples"][str(i)]
        assert (
            e["id"] == r["dataset_id"]
            and e["question"] == r["question"]
            and e["answers"] == r["answer"]
        )
        assert e.get("bbox") == r["bbox"]
        assert e["image_size"] == list(Image.open(io.BytesIO(r["image"]["bytes"])).size)
    assert m["samples"]["6"]["image_size"] == [1000, 300]


def test_failure_record(cache):
    _, cache_dir, _, _ = cache
    m = json.loads((cache_dir / "manifest.json").read_text())
    assert list(m["failed"]) == [str(CORRUPT)]
    # exception type and message, e.g. UnidentifiedImageError / OSError
    assert "Error" in m["failed"][str(CORRUPT)]


def test_rerun_extracts_nothing(cache, encoder):
    src, cache_dir, rows, _ = cache
    before = {p.name: p.stat().st_mtime_ns for p in cache_dir.glob("features_*.pt")}
    s = qwenvl_dataloader.extract(src, cache_dir, encoder, batch_size=4, progress=False)
    assert (s["extracted"], s["skipped"], s["failed"]) == (0, len(rows) - 1, 1)
    assert before == {p.name: p.stat().st_mtime_ns for p in cache_dir.glob("features_*.pt")}


class Interrupt(Exception):
    pass


def test_resume_after_interrupt(tmp_path, encoder):
    src, rows = build_parquet(tmp_path / "parquet", n_demo=6)
    cache_dir = tmp_path / "cache"
    calls = {"n": 0}

    def dying(images):  # the second forward call dies, as a killed run would
        calls["n"] += 1
        if calls["n"] == 2:
            raise Interrupt
        return encoder(images)

    dying.info = encoder.info
    with pytest.raises(Interrupt):
        qwenvl_dataloader.extract(src, cache_dir, dying, batch_size=4, progress=False)
    written = sorted(int(p.stem.split("_")[1]) for p in cache_dir.glob("features_*.pt"))
    assert written == [0, 1, 2, 3]
    assert not list(cache_dir.glob(".*tmp"))  # no partial file left
    m = json.loads((cache_dir / "manifest.json").read_text())
    assert sorted(map(int, m["samples"])) == [0, 1, 2, 3]
    assert all("image_size" in m["samples"][str(i)] for i in range(4))
    # a file truncated by a crash outside our control is redone, valid ones are not touched
    p3 = feature_cache.feature_path(cache_dir, 3)
    p3.write_bytes(p3.read_bytes()[:1000])
    stamp = feature_cache.feature_path(cache_dir, 0).stat().st_mtime_ns
    s = qwenvl_dataloader.extract(src, cache_dir, encoder, batch_size=4, progress=False)
    assert (s["extracted"], s["skipped"], s["failed"]) == (len(rows) - 1 - 3, 3, 1)
    assert feature_cache.feature_path(cache_dir, 0).stat().st_mtime_ns == stamp
    assert feature_cache.read_feature(p3).shape == (256, 2048)


def test_refuses_mismatched_cache(cache):
    src, cache_dir, _, _ = cache
    with pytest.raises(UserError, match="another encoder.*dtype"):
        qwenvl_dataloader.extract(
            src, cache_dir, EncoderSpec(encoders.TINY, "cpu", dtype="bfloat16"), progress=False
        )


def test_batch_equals_single(encoder):
    ims = [images.load_image(demo_set.encode(im)) for _, im in demo_set.photos()[:4]]
    batch = encoder(ims)
    for k, im in enumerate(ims):
        torch.testing.assert_close(encoder([im])[0], batch[k], rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", ["wide.jpg", "alpha.png", "gray.png", "cmyk.jpg", "small.png"])
def test_preprocessing_gives_256_tokens(name, encoder):
    data = dict((n, d) for n, d, _ in odd_images())[name]
    im = images.load_image(data)
    assert im.size == (448, 448) and im.mode == "RGB"
    inputs = encoder.processor(images=[im], return_tensors="pt")
    assert inputs["pixel_values"].shape == (1024, 1176)
    assert inputs["image_grid_thw"].tolist() == [[1, 32, 32]]
    if name == "alpha.png":  # transparent half pasted on white, as qwen_vl_utils does
        assert np.array(im)[:, :200].min() >= 250


def test_preprocessing_matches_qwen_vl_utils():
    try:
        from qwen_vl_utils import fetch_image
    # it imports torchvision, which does not import beside the CPU torch build
    except Exception as e:
        pytest.skip(f"qwen_vl_utils not importable here: {type(e).__name__}")
    for name, data, _ in odd_images()[:5]:
        im = Image.open(io.BytesIO(data))
        ref = fetch_image({"image": im, "resized_height": 448, "resized_width": 448})
        assert np.array_equal(np.array(ref), np.array(images.load_image(data))), name


def test_token_layout(encoder):
    """Token t covers the 28x28 cell at row t // 16, column t % 16: change one cell, see which token
    moves most."""
    base = images.load_image(demo_set.encode(dict(demo_set.photos())["astronaut"]))
    x0 = encoder([base])[0]
    for r, c in [(0, 0), (0, 15), (3, 7), (10, 2), (15, 15)]:
        a = np.array(base).copy()
        a[r * 28 : (r + 1) * 28, c * 28 : (c + 1) * 28] = (
            255 - a[r * 28 : (r + 1) * 28, c * 28 : (c + 1) * 28]
        )
        x1 = encoder([Image.fromarray(a)])[0]
        change = (x1 - x0).norm(dim=1)
        assert int(change.argmax()) == r * 16 + c, (r, c)


def test_dataset_and_normalisation(cache):
    _, cache_dir, _, _ = cache
    ds = qwenvl_dataloader.FeatureDataset(cache_dir)
    assert len(ds) == len(feature_cache.cached_indices(cache_dir))
    x, i = ds[0]
    assert x.dtype == torch.float32 and x.shape == (256, 2048)
    raw = torch.load(feature_cache.feature_path(cache_dir, i), weights_only=True).double()
    ref = (raw - raw.mean(1, keepdim=True)) / torch.sqrt(
        raw.var(1, unbiased=False, keepdim=True) + 1e-5
    )
    torch.testing.assert_close(x.double(), ref, rtol=1e-5, atol=1e-5)
    lazy = qwenvl_dataloader.FeatureDataset(cache_dir, preload=False)
    assert torch.equal(lazy[3][0], ds[3][0])
    raw_ds = qwenvl_dataloader.FeatureDataset(cache_dir, normalization="none")
    assert torch.equal(raw_ds[0][0], raw.float())


def test_nan_feature_is_named(tmp_path):
    (tmp_path / "manifest.json").write_text(
        json.dumps(
            {"encoder": {"grid": [16, 16], "feature_dim": 2048}, "samples": {"0": {"id": "x"}}}
        )
    )
    x = torch.randn(256, 2048)
    x[5, 7] = float("nan")
    torch.save(x, tmp_path / "features_0.pt")
    with pytest.raises(ValueError, match="features_0.pt.*NaN"):
        qwenvl_dataloader.FeatureDataset(tmp_path)
    torch.save(torch.randn(255, 2048), tmp_path / "features_0.pt")
    with pytest.raises(ValueError, match=r"features_0.pt.*\[256, 2048\]"):
        qwenvl_dataloader.FeatureDataset(tmp_path)


def test_missing_cache_names_command(tmp_path):
    with pytest.raises(UserError, match="does not exist.*qwenvl_dataloader.py --dataset_dir"):
        qwenvl_dataloader.FeatureDataset(tmp_path / "nothing")


def test_split_is_seeded_disjoint_and_saved(cache, tmp_path):
    _, cache_dir, _, _ = cache
    idx = list(range(100))
    s1, s2 = runs.make_split(idx, seed=3), runs.make_split(idx, seed=3)
    assert s1 == s2 and s1 != runs.make_split(idx, seed=4)
    assert (len(s1["train"]), len(s1["val"]), len(s1["test"])) == (80, 10, 10)
    assert sorted(s1["train"] + s1["val"] + s1["test"]) == idx
    s = runs.load_or_make_split(tmp_path, cache_dir, seed=0)
    assert json.loads((tmp_path / "split.json").read_text())["test"] == s["test"]
    # the saved one is reused
    assert runs.load_or_make_split(tmp_path, cache_dir, seed=0)["test"] == s["test"]
    # never silently, when settings differ
    with pytest.raises(UserError, match="seed 0.*seed 999.*--resplit"):
        runs.load_or_make_split(tmp_path, cache_dir, seed=999)
    with pytest.raises(UserError, match="max_samples None.*max_samples 5"):
        runs.load_or_make_split(tmp_path, cache_dir, seed=0, max_samples=5)
    s2 = runs.load_or_make_split(tmp_path, cache_dir, seed=999, resplit=True)
    assert (
        s2["seed"] == 999
        and json.loads((tmp_path / "split.json").read_text())["test"] == s2["test"]
    )


def test_folder_and_jsonl_sources(tmp_path, encoder):
    ph = demo_set.photos()[:3]
    for k, (name, im) in enumerate(ph):
        (tmp_path / "imgs" / f"d{k}").mkdir(parents=True)
        im.save(tmp_path / "imgs" / f"d{k}" / f"{name}.png")
    s = qwenvl_dataloader.extract(tmp_path / "imgs", tmp_path / "c1", encoder, progress=False)
    assert s["extracted"] == 3
    m = feature_cache.load_manifest(tmp_path / "c1")
    assert [m.samples[k].id for k in range(3)] == [f"d{k}/{n}.png" for k, (n, _) in enumerate(ph)]
    lines = [
        json.dumps({"image": f"imgs/d{k}/{n}.png", "question": "q?", "bbox": [1, 2, 3, 4]})
        for k, (n, _) in enumerate(ph)
    ]
    (tmp_path / "list.jsonl").write_text("\n".join(lines))
    s = qwenvl_dataloader.extract(
        tmp_path / "list.jsonl",
        tmp_path / "c2",
        encoder,
        part=Part(start=1, limit=1),
        progress=False,
    )
    assert s["extracted"] == 1 and feature_cache.cached_indices(tmp_path / "c2") == [1]
    torch.testing.assert_close(
        feature_cache.read_feature(feature_cache.feature_path(tmp_path / "c2", 1)),
        feature_cache.read_feature(feature_cache.feature_path(tmp_path / "c1", 1)),
    )


def write_original_layout_checkpoint(d, drop=None):
    """A checkpoint laid out as Qwen/Qwen2.5-VL-3B-Instruct is (tower under visual.*, text under
    model.*), holding the tiny tower's weights."""
    from safetensors.torch import save_file
    from transformers import Qwen2_5_VLConfig

    tiny = encoders.Encoder(encoders.TINY, "cpu").tower
    Qwen2_5_VLConfig(
        vision_config=encoders.RANDOM_TOWERS[encoders.TINY][1],
        text_config=dict(
            hidden_size=2048,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            vocab_size=1024,
            intermediate_size=64,
            rope_scaling={"type": "mrope", "mrope_section": [256, 128, 128]},
        ),
    ).save_pretrained(d)
    sd = {"visual." + k: v.contiguous() for k, v in tiny.state_dict().items() if k != drop}
    sd["model.embed_tokens.weight"] = torch.zeros(8, 8)  # text weights: never loaded
    save_file(sd, os.path.join(d, "model.safetensors"), metadata={"format": "pt"})
    return tiny


def test_real_checkpoint_path_loads_only_the_tower(tmp_path, encoder):
    tiny = write_original_layout_checkpoint(tmp_path)
    enc = encoders.Encoder(str(tmp_path), "cpu")
    for (k, a), b in zip(tiny.state_dict().items(), enc.tower.state_dict().values()):
        assert torch.equal(a, b), k
    ims = [images.load_image(demo_set.encode(im)) for _, im in demo_set.photos()[:2]]
    assert torch.equal(enc(ims), encoder(ims))


def test_checkpoint_with_missing_weights_is_refused(tmp_path):
    write_original_layout_checkpoint(tmp_path, drop="merger.mlp.0.weight")
    with pytest.raises(UserError, match="missing"):
        encoders.Encoder(str(tmp_path), "cpu")


def test_unloadable_model_says_what_to_do(tmp_path):
    with pytest.raises(UserError, match="tiny-random"):
        encoders.Encoder(str(tmp_path / "no_such_checkpoint"), "cpu")


def test_cli_help_and_run(tmp_path):
    out = subprocess.run(
        [sys.executable, str(HERE / "qwenvl_dataloader.py"), "--help"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "--dataset_dir" in out and "--extract_batch_size" in out and "tiny-random" in out
    src, rows = build_parquet(tmp_path / "p", n_demo=2)
    r = subprocess.run(
        [
            sys.executable,
            str(HERE / "qwenvl_dataloader.py"),
            "--dataset_dir",
            str(src),
            "--model",
            "tiny-random",
            "--cache_dir",
            str(tmp_path / "c"),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert f"extracted {len(rows) - 1}, skipped 0 (already cached), failed 1" in r.stdout


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-v"]))
