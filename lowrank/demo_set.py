"""
Build a small data set in the TextVQA grounding schema (image {bytes, path}, question, answer[10],
dataset_id, bbox [x, y, w, h] in original pixels) from real photos that scikit-image ships: random
crops, flips and scales of each photo with a word rendered on a sign, the sign's box as bbox, and
the photo's name as image_id (training splits by it, so no test image is a crop of a training
photo). No network needed.

demo_data.py writes it to disk; the tests build their data sets from it too.
"""

import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

PHOTOS = [
    "astronaut",
    "coffee",
    "chelsea",
    "rocket",
    "hubble_deep_field",
    "immunohistochemistry",
    "retina",
    "camera",
    "moon",
    "coins",
    "brick",
    "grass",
    "gravel",
    "clock",
    "page",
    "text",
    "cell",
    "colorwheel",
]
WORDS = [
    "STOP",
    "EXIT",
    "OPEN",
    "CAFE",
    "SALE",
    "PARK",
    "BUS 42",
    "HOTEL",
    "PIZZA",
    "BOOKS",
    "BANK",
    "TAXI",
    "MARKET",
    "NO ENTRY",
    "ONE WAY",
    "PHARMACY",
    "BAKERY",
    "GATE 7",
    "PLATFORM 3",
    "LIBRARY",
]


def photos(names=None):
    import skimage.data

    out = []
    for name in names or PHOTOS:
        a = getattr(skimage.data, name)()
        if a.dtype != np.uint8:
            a = (a * 255).astype(np.uint8) if a.max() <= 1 else a.astype(np.uint8)
        out.append((name, Image.fromarray(a).convert("RGB")))
    return out


def render_sample(photo, word, rng):
    """A crop of photo at a random size and aspect, maybe flipped, with word on a sign; returns
    image, bbox."""
    W, H = photo.size
    w = int(rng.integers(min(W, 160), W + 1))
    h = int(np.clip(w * rng.uniform(0.5, 1.6), min(H, 120), H))
    x0, y0 = int(rng.integers(0, W - w + 1)), int(rng.integers(0, H - h + 1))
    im = photo.crop((x0, y0, x0 + w, y0 + h))
    if rng.random() < 0.5:
        im = im.transpose(Image.FLIP_LEFT_RIGHT)
    scale = rng.uniform(0.6, 1.8)
    im = im.resize((max(32, int(w * scale)), max(32, int(h * scale))), Image.BICUBIC)
    font = ImageFont.load_default(size=int(np.clip(min(im.size) * rng.uniform(0.08, 0.2), 10, 80)))
    d = ImageDraw.Draw(im)
    left, t, r, b = d.textbbox((0, 0), word, font=font)
    pad = max(2, (b - t) // 4)
    bw, bh = r - left + 2 * pad, b - t + 2 * pad
    bx = int(rng.integers(0, max(1, im.size[0] - bw)))
    by = int(rng.integers(0, max(1, im.size[1] - bh)))
    colour = tuple(int(c) for c in rng.integers(0, 256, 3))
    d.rectangle((bx, by, bx + bw, by + bh), fill=colour)
    ink = (255, 255, 255) if sum(colour) < 380 else (0, 0, 0)
    d.text((bx + pad - left, by + pad - t), word, fill=ink, font=font)
    return im, [float(bx), float(by), float(bw), float(bh)]


def encode(im, fmt="JPEG"):
    buf = io.BytesIO()
    im.save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


def make_rows(num, seed=0, names=None):
    rng = np.random.default_rng(seed)
    ph = photos(names)
    rows = []
    for k in range(num):
        name, photo = ph[k % len(ph)]
        word = WORDS[int(rng.integers(len(WORDS)))]
        im, bbox = render_sample(photo, word, rng)
        rows.append(
            {
                "image": {"bytes": encode(im), "path": f"{name}_{k}.jpg"},
                "question": "what is written on the sign?",
                "answer": [word.lower()] * 10,
                "dataset_id": f"demo-{k:05d}",
                "bbox": bbox,
                "image_id": name,
            }
        )
    return rows


def write_parquet(rows, out_dir, shards=1):
    import pyarrow as pa
    import pyarrow.parquet as pq

    out_dir = Path(out_dir)
    (out_dir / "data").mkdir(parents=True, exist_ok=True)
    schema = pa.schema(
        [
            ("image", pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
            ("question", pa.string()),
            ("answer", pa.list_(pa.string())),
            ("dataset_id", pa.string()),
            ("bbox", pa.list_(pa.float64())),
            ("image_id", pa.string()),
        ]
    )
    per = -(-len(rows) // shards)
    for s in range(shards):
        part = rows[s * per : (s + 1) * per]
        table = pa.Table.from_pylist(part, schema=schema)
        pq.write_table(table, out_dir / "data" / f"train-{s:05d}-of-{shards:05d}.parquet")
    return out_dir
