"""lowrank/images.py: image sources and their metadata schema, relative paths, missing images, every
PIL mode decoded as qwen-vl-utils does."""

import io
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import ROOT
from PIL import Image

import qwenvl_dataloader
from lowrank import demo_set, encoders, images
from lowrank.cli import UserError


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


def reference_to_rgb(im):
    """qwen-vl-utils' documented rule (fetch_image -> to_rgb), written out here: RGBA on white, else
    convert."""
    if im.mode == "RGBA":
        white = Image.new("RGB", im.size, (255, 255, 255))
        white.paste(im, mask=im.split()[3])
        return white
    return im.convert("RGB")


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


def test_an_image_gone_from_the_source_is_reported_missing(tmp_path, capsys):
    rows = []
    for k in range(3):
        Image.fromarray((np.random.default_rng(k).random((40, 40, 3)) * 255).astype(np.uint8)).save(
            tmp_path / f"{k}.png"
        )
        rows.append({"image": f"{k}.png", "question": "q", "answers": ["a"]})
    (tmp_path / "list.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    enc = encoders.Encoder(encoders.TINY, "cpu")
    qwenvl_dataloader.extract(tmp_path / "list.jsonl", tmp_path / "cache", enc, progress=False)
    os.remove(tmp_path / "1.png")
    s = qwenvl_dataloader.extract(tmp_path / "list.jsonl", tmp_path / "cache", enc, progress=False)
    assert "images of 1 cached samples are missing from the source" in capsys.readouterr().out
    assert s["skipped"] == 3 and s["extracted"] == 0


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
