"""
Image sources (TextVQA parquet shards, a folder of images, a JSONL list), decoding as Qwen's own preprocessing does,
and the content fingerprint that ties a cached feature to its image bytes.
"""

import hashlib
import io
import json
from pathlib import Path

import numpy as np
from PIL import Image

from cli import UserError

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"}


def parse_image_size(spec):
    """'448' -> (448, 448); '448x896' -> (W 448, H 896)."""
    try:
        w, _, h = str(spec).lower().partition("x")
        size = (int(w), int(h or w))
    except ValueError:
        raise UserError(f"--image_size {spec}: expected a number of pixels (448) or WxH (448x896)") from None
    if min(size) <= 0:
        raise UserError(f"--image_size {spec}: sides must be positive")
    return size


class Source:
    """A list of images with stable indices. kind: 'textvqa' (parquet shards), 'folder' or 'jsonl'.
    meta[i] holds what the source knows of sample i (id, question, answers, bbox); image(i) returns bytes or a path."""

    def __init__(self, path):
        self.path = Path(path)
        if not self.path.exists():
            raise UserError(f"--dataset_dir {path}: no such file or directory")
        if self.path.is_file() and self.path.suffix in (".jsonl", ".json"):
            self.kind = "jsonl"
            self._read_jsonl()
        elif self.path.is_dir() and sorted(self.path.rglob("*.parquet")):
            self.kind = "textvqa"
            self._read_parquet()
        elif self.path.is_dir():
            self.kind = "folder"
            files = sorted(p for p in self.path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTS)
            self.meta = [{"id": str(p.relative_to(self.path)), "path": str(p)} for p in files]
        else:
            raise UserError(
                f"--dataset_dir {path}: expected a directory of parquet shards, a folder of images or a .jsonl list"
            )
        if not self.meta:
            raise UserError(
                f"--dataset_dir {path}: found no samples ({self.kind}"
                + (f": no {', '.join(sorted(IMAGE_EXTS))} files)" if self.kind == "folder" else ")")
            )

    def __len__(self):
        return len(self.meta)

    def _read_jsonl(self):
        self.meta = []
        try:
            lines = self.path.read_text().splitlines()
        except UnicodeDecodeError as e:
            raise UserError(f"{self.path}: not a text JSONL file ({e})") from None
        for n, line in enumerate(lines):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                img = Path(rec["image"])
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise UserError(
                    f'{self.path}:{n + 1}: expected {{"image": path, ...}}: {type(e).__name__}: {e}'
                ) from None
            if not img.is_absolute():
                img = self.path.parent / img
            m = {"id": str(rec.get("id", len(self.meta))), "path": str(img)}
            for k in ("question", "answers", "bbox"):
                if k in rec:
                    m[k] = rec[k]
            self.meta.append(m)

    def _read_parquet(self):
        import pyarrow.parquet as pq

        self.shards = sorted(self.path.rglob("*.parquet"))
        self.meta, self._where = [], []
        for s, shard in enumerate(self.shards):
            try:
                pf = pq.ParquetFile(shard)
                names = pf.schema_arrow.names
                if "image" not in names:
                    raise UserError(
                        f"{shard}: no 'image' column (TextVQA schema: image, question, answer, "
                        f"dataset_id, bbox; this file has {names or 'no columns'})"
                    )
                t = pf.read(
                    columns=[c for c in ("question", "answer", "dataset_id", "bbox", "image_id") if c in names]
                ).to_pylist()
            except (OSError, ValueError) as e:  # pyarrow: not a parquet file, truncated, ...
                raise UserError(f"{shard}: unreadable parquet file ({type(e).__name__}: {e})") from None
            for r, row in enumerate(t):
                m = {"id": str(row.get("dataset_id", len(self.meta))), "shard": shard.name, "row": r}
                if row.get("question") is not None:
                    m["question"] = row["question"]
                if row.get("answer") is not None:
                    m["answers"] = list(row["answer"])
                if row.get("bbox") is not None:
                    m["bbox"] = [float(v) for v in row["bbox"]]
                if row.get("image_id") is not None:  # TextVQA's image id; the demo's source photo
                    m["image_id"] = str(row["image_id"])
                self.meta.append(m)
                self._where.append((s, r))

    def iter_images(self, indices):
        """Yield (index, bytes or path) for the given indices in order, reading parquet shards sequentially."""
        indices = sorted(indices)
        if self.kind != "textvqa":
            for i in indices:
                yield i, self.meta[i]["path"]
            return
        import pyarrow.parquet as pq

        want = set(indices)
        base = 0
        for shard in self.shards:
            pf = pq.ParquetFile(shard)
            n = pf.metadata.num_rows
            if want & set(range(base, base + n)):
                r = base
                for batch in pf.iter_batches(batch_size=64, columns=["image"]):
                    for img in batch.column(0).to_pylist():
                        if r in want:
                            yield r, (img or {}).get("bytes") or (img or {}).get("path")
                        r += 1
            base += n

    def image(self, i):
        """Random access to one image (bytes or path); used by the visualisation."""
        if self.kind != "textvqa":
            return self.meta[i]["path"]
        import pyarrow.parquet as pq

        s, r = self._where[i]
        img = pq.read_table(self.shards[s], columns=["image"]).column(0)[r].as_py()
        return (img or {}).get("bytes") or (img or {}).get("path")


def to_8bit(im):
    """High-bit-depth greyscale (PIL modes I;16*, I, F) -> mode L, scaled, not clipped: 16-bit ranges
    (I;16*, and I with values in 0..65535, as 16-bit PNGs open) map 0..65535 -> 0..255 (v / 257, so an 8-bit image
    stored as v * 257 comes back exactly); F in 0..1 maps to 0..255; anything else is stretched min..max."""
    a = np.asarray(im, dtype=np.float64)
    if im.mode.startswith("I;16") or (im.mode == "I" and a.size and a.min() >= 0 and a.max() <= 65535):
        a = a / 257.0
    elif im.mode == "F" and a.size and a.min() >= 0 and a.max() <= 1:
        a = a * 255.0
    else:
        lo, hi = (a.min(), a.max()) if a.size else (0.0, 1.0)
        a = (a - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(a)
    return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "L")


def open_rgb(data):
    """Bytes, path or PIL image -> PIL RGB image at its own size, as qwen_vl_utils.fetch_image converts it: transparency
    pasted on white, any other mode (L, P, CMYK, ...) converted to RGB; 16-bit and float images scaled to 8 bit
    first (PIL's own convert would clip them to 255)."""
    if data is None:
        raise ValueError("no image data")
    im = (
        data
        if isinstance(data, Image.Image)
        else Image.open(io.BytesIO(data) if isinstance(data, (bytes, bytearray)) else data)
    )
    im.load()
    if im.mode in ("I", "F") or im.mode.startswith("I;16"):
        im = to_8bit(im)
    if im.mode in ("RGBA", "LA") or (im.mode == "P" and "transparency" in im.info):
        im = im.convert("RGBA")
        white = Image.new("RGB", im.size, (255, 255, 255))
        white.paste(im, mask=im.split()[3])
        im = white
    else:
        im = im.convert("RGB")
    return im


def load_image(data, size=(448, 448)):
    """Bytes or path -> PIL RGB image of exactly size (W, H), as fetch_image(resized_width=W, resized_height=H)."""
    return open_rgb(data).resize(tuple(size), Image.BICUBIC)


def fingerprint(data):
    """Content hash of one sample's input image (its bytes, or the file's bytes): the cache's per-sample identity."""
    if data is None:
        return None
    if not isinstance(data, (bytes, bytearray)):
        data = Path(data).read_bytes()
    return hashlib.sha256(data).hexdigest()[:20]
