"""
Image sources (TextVQA parquet shards, a folder of images, a JSONL list), decoding as Qwen's own
preprocessing does, and the content fingerprint that ties a cached feature to its image bytes.
"""

import hashlib
import io
import json
import math
from collections import Counter
from pathlib import Path

from PIL import Image

from lowrank.cli import UserError

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"}


def parse_image_size(spec):
    """'448' -> (448, 448); '448x896' -> (W 448, H 896)."""
    try:
        w, _, h = str(spec).lower().partition("x")
        size = (int(w), int(h or w))
    except ValueError:
        raise UserError(
            f"--image_size {spec}: expected a number of pixels (448) or WxH (448x896)"
        ) from None
    if min(size) <= 0:
        raise UserError(f"--image_size {spec}: sides must be positive")
    return size


class Source:
    """A list of images with stable indices. kind: 'textvqa' (parquet shards), 'folder' or 'jsonl'.
    meta[i] holds what the source knows of sample i (id, question, answers, bbox); image(i) returns
    bytes or a path."""

    def __init__(self, path):
        self.path = Path(path)
        self.notes = Counter()
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
            files = sorted(
                p for p in self.path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTS
            )
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
            self.meta.append(
                self.clean(m, rec.get("question"), rec.get("answers"), rec.get("bbox"))
            )

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
                    columns=[
                        c
                        for c in ("question", "answer", "dataset_id", "bbox", "image_id")
                        if c in names
                    ]
                ).to_pylist()
            except (OSError, ValueError) as e:  # pyarrow: not a parquet file, truncated, ...
                raise UserError(
                    f"{shard}: unreadable parquet file ({type(e).__name__}: {e})"
                ) from None
            for r, row in enumerate(t):
                m = {
                    "id": str(row.get("dataset_id", len(self.meta))),
                    "shard": shard.name,
                    "row": r,
                }
                if row.get("image_id") is not None:  # TextVQA's image id; the demo's source photo
                    m["image_id"] = str(row["image_id"])
                self.meta.append(
                    self.clean(m, row.get("question"), row.get("answer"), row.get("bbox"))
                )
                self._where.append((s, r))

    def clean(self, m, question, answers, bbox):
        """One schema for what a source says of a sample. question: a string (anything else is
        refused, naming the sample); answers: a list of strings (one string is one answer; numbers
        become strings; none or empty: no answers); bbox: [x, y, w, h], four finite numbers with w,
        h > 0, else no box. Each coercion and each dropped box is counted in self.notes, which
        extraction reports."""
        where = f"{self.path}: sample {len(self.meta)} (id {m['id']})"
        if question is not None:
            if not isinstance(question, str):
                raise UserError(
                    f"{where}: the question must be a string, got {type(question).__name__}"
                )
            m["question"] = question
        if isinstance(answers, str):
            answers = [answers]
            self.notes["answers given as one string, kept as one answer"] += 1
        if answers is not None:
            if not isinstance(answers, (list, tuple)) or not all(
                isinstance(a, (str, int, float)) for a in answers
            ):
                raise UserError(
                    f"{where}: answers must be a list of strings, got {str(answers)[:80]}"
                )
            if answers:
                m["answers"] = [str(a) for a in answers]
        if bbox is not None:
            box = bbox_or_none(bbox)
            if box is None:
                self.notes["bbox not four finite numbers with a positive size: no box"] += 1
            else:
                m["bbox"] = box
        return m

    def iter_images(self, indices):
        """Yield (index, bytes or path) for the given indices in order, reading parquet shards
        sequentially."""
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
                            yield r, struct_image(img, shard)
                        r += 1
            base += n

    def image(self, i):
        """Random access to one image (bytes or path); used by the visualisation."""
        if self.kind != "textvqa":
            return self.meta[i]["path"]
        import pyarrow.parquet as pq

        s, r = self._where[i]
        img = pq.read_table(self.shards[s], columns=["image"]).column(0)[r].as_py()
        return struct_image(img, self.shards[s])


def struct_image(img, shard):
    """A parquet image struct {bytes, path} -> its bytes, else its path (a relative one is relative
    to the shard's folder, as the data set was written), else None."""
    img = img or {}
    if img.get("bytes"):
        return img["bytes"]
    if img.get("path"):
        path = Path(img["path"])
        return str(path if path.is_absolute() else Path(shard).parent / path)
    return None


def bbox_or_none(bbox):
    """[x, y, w, h] as floats when bbox is four finite numbers with w, h > 0; else None."""
    try:
        box = [float(v) for v in bbox]
    except (TypeError, ValueError):
        return None
    ok = len(box) == 4 and all(math.isfinite(v) for v in box) and box[2] > 0 and box[3] > 0
    return box if ok else None


def open_rgb(data):
    """Bytes, path or PIL image -> PIL RGB image at its own size, exactly as
    qwen_vl_utils.fetch_image converts it (its to_rgb): RGBA pasted on white by its alpha, every
    other mode (L, LA, P, CMYK, I;16, F, ...) through PIL's convert("RGB"), which drops LA's and P's
    transparency and clips 16-bit and float values to 0..255."""
    if data is None:
        raise ValueError("no image data")
    im = (
        data
        if isinstance(data, Image.Image)
        else Image.open(io.BytesIO(data) if isinstance(data, (bytes, bytearray)) else data)
    )
    im.load()
    if im.mode != "RGBA":
        return im.convert("RGB")
    white = Image.new("RGB", im.size, (255, 255, 255))
    white.paste(im, mask=im.split()[3])
    return white


def load_image(data, size=(448, 448)):
    """Bytes or path -> PIL RGB image of exactly size (W, H), as fetch_image(resized_width=W,
    resized_height=H)."""
    return open_rgb(data).resize(tuple(size), Image.BICUBIC)


def fingerprint(data):
    """Content hash of one sample's input image (its bytes, or the file's bytes): the cache's
    per-sample identity."""
    if data is None:
        return None
    if not isinstance(data, (bytes, bytearray)):
        data = Path(data).read_bytes()
    return hashlib.sha256(data).hexdigest()[:20]
