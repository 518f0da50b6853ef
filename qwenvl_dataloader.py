"""
Qwen vision-token features: image sources, the encoder (Qwen2-VL, Qwen2.5-VL, Qwen3-VL), the feature cache, the
Dataset and the split.

Run it to extract a cache (one features_<i>.pt of [T, D] per image, e.g. [256, 2048] for Qwen2.5-VL-3B at 448x448,
plus manifest.json, the one record of T, D and the token grid):

    python qwenvl_dataloader.py --dataset_dir data/textvqa --model Qwen/Qwen2.5-VL-3B-Instruct
    python qwenvl_dataloader.py --dataset_dir demo_data --model tiny-random --cache_dir feature_cache_real

Under torchrun each process takes the indices rank::world_size and merges its samples into the one manifest under
the cache's lock, as separate extraction processes do.
"""
import argparse
import fcntl
import hashlib
import io
import json
import math
import os
import socket
import time
import traceback
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

DEFAULT_IMAGE_SIZE = "448"  # --image_size: one side (square) or WxH; a multiple of the encoder's cell (28 or 32 px)
DEFAULT_MODEL = "Qwen/Qwen2.5-VL-3B-Instruct"
MANIFEST = "manifest.json"
IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"}

# Vision towers by the checkpoint's model_type: (transformers module, vision config class, vision model class, the
# config attribute that is the output (merger) dim). The tower's output is what the language model sees.
FAMILIES = {
    "qwen2_vl": ("qwen2_vl", "Qwen2VLVisionConfig", "Qwen2VisionTransformerPretrainedModel", "hidden_size"),
    "qwen2_5_vl": ("qwen2_5_vl", "Qwen2_5_VLVisionConfig", "Qwen2_5_VisionTransformerPretrainedModel", "out_hidden_size"),
    "qwen3_vl": ("qwen3_vl", "Qwen3VLVisionConfig", "Qwen3VLVisionModel", "out_hidden_size"),
    "qwen3_vl_moe": ("qwen3_vl_moe", "Qwen3VLMoeVisionConfig", "Qwen3VLMoeVisionModel", "out_hidden_size"),
}
# Image normalisation of each family's own processor (preprocessor_config.json); used when a checkpoint has none.
FAMILY_MEAN_STD = {"qwen3_vl": ([0.5] * 3, [0.5] * 3), "qwen3_vl_moe": ([0.5] * 3, [0.5] * 3)}

# Towers built in code with random weights (fixed seed), selected by name, never a fallback. tiny-*: small and
# fast, one per family with different output dims, so every family's path runs offline. random-*: the published
# vision configs at real size, for speed, parameter and memory figures only (bench_extract.py).
TINY = "tiny-random"
TINY_SEED = 0
_Q25 = dict(patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112, hidden_act="silu")
_Q25_TOWER = dict(_Q25, depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16,
                  fullatt_block_indexes=[7, 15, 23, 31])
_Q2_TOWER = dict(depth=32, embed_dim=1280, mlp_ratio=4, num_heads=16, patch_size=14, spatial_merge_size=2,
                 temporal_patch_size=2, hidden_act="quick_gelu")
_Q3_SMALL = dict(depth=24, hidden_size=1024, intermediate_size=4096, num_heads=16, deepstack_visual_indexes=[5, 11, 17])
_Q3_LARGE = dict(depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16, deepstack_visual_indexes=[8, 16, 24])
RANDOM_TOWERS = {
    TINY: ("qwen2_5_vl", dict(_Q25, depth=2, hidden_size=64, intermediate_size=128, num_heads=2, out_hidden_size=2048,
                              fullatt_block_indexes=[1])),
    "tiny-random-qwen2-vl": ("qwen2_vl", dict(_Q2_TOWER, depth=2, embed_dim=64, mlp_ratio=2, num_heads=2,
                                              hidden_size=1536)),
    "tiny-random-qwen3-vl": ("qwen3_vl", dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=2,
                                              out_hidden_size=1024, deepstack_visual_indexes=[0],
                                              num_position_embeddings=144)),
    "random-3b": ("qwen2_5_vl", dict(_Q25_TOWER, out_hidden_size=2048)),          # Qwen2.5-VL-3B's tower
    "random-qwen2.5-vl-7b": ("qwen2_5_vl", dict(_Q25_TOWER, out_hidden_size=3584)),
    "random-qwen2.5-vl-32b": ("qwen2_5_vl", dict(_Q25_TOWER, out_hidden_size=5120)),
    "random-qwen2.5-vl-72b": ("qwen2_5_vl", dict(_Q25_TOWER, out_hidden_size=8192)),
    "random-qwen2-vl-2b": ("qwen2_vl", dict(_Q2_TOWER, hidden_size=1536)),
    "random-qwen2-vl-7b": ("qwen2_vl", dict(_Q2_TOWER, hidden_size=3584)),
    "random-qwen2-vl-72b": ("qwen2_vl", dict(_Q2_TOWER, hidden_size=8192)),
    "random-qwen3-vl-2b": ("qwen3_vl", dict(_Q3_SMALL, out_hidden_size=2048)),
    "random-qwen3-vl-4b": ("qwen3_vl", dict(_Q3_SMALL, out_hidden_size=2560)),
    "random-qwen3-vl-8b": ("qwen3_vl", dict(_Q3_LARGE, out_hidden_size=4096)),
    "random-qwen3-vl-32b": ("qwen3_vl", dict(_Q3_LARGE, out_hidden_size=5120)),
}
RANDOM_3B = "random-3b"


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


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """--help of every script: the description as written, and each flag's default."""


class UserError(SystemExit):
    """A mistake the user can fix (bad input, a missing file): printed as one line 'error: ...', exit status 1,
    no traceback. LOWRANK_DEBUG=1 prints the traceback too."""

    def __init__(self, msg):
        super().__init__(f"error: {msg}")


class BadFeature(ValueError):
    """A cached feature file that is unreadable, mis-shaped or non-finite; the message names the file."""


def run_cli(main, argv=None):
    """Run a script's main(): user errors and bad cache files end as one 'error:' line (exit 1), no traceback."""
    try:
        return main(argv)
    except (UserError, BadFeature) as e:
        if os.environ.get("LOWRANK_DEBUG"):
            traceback.print_exc()
        raise SystemExit(str(e) if isinstance(e, UserError) else f"error: {e}") from None


def extract_command(cache_dir="feature_cache_real"):
    return (f"python qwenvl_dataloader.py --dataset_dir <parquet dir | image folder | list.jsonl> "
            f"--cache_dir {cache_dir}   (add --model tiny-random to run offline)")


# ----------------------------------------------------------------------------------------------------------------
# image sources

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
            raise UserError(f"--dataset_dir {path}: expected a directory of parquet shards, a folder of images "
                            f"or a .jsonl list")
        if not self.meta:
            raise UserError(f"--dataset_dir {path}: found no samples ({self.kind}"
                            + (f": no {', '.join(sorted(IMAGE_EXTS))} files)" if self.kind == "folder" else ")"))

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
                raise UserError(f"{self.path}:{n + 1}: expected {{\"image\": path, ...}}: "
                                f"{type(e).__name__}: {e}") from None
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
                    raise UserError(f"{shard}: no 'image' column (TextVQA schema: image, question, answer, "
                                    f"dataset_id, bbox; this file has {names or 'no columns'})")
                t = pf.read(columns=[c for c in ("question", "answer", "dataset_id", "bbox", "image_id")
                                     if c in names]).to_pylist()
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
    import numpy as np
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
    im = data if isinstance(data, Image.Image) else Image.open(io.BytesIO(data) if isinstance(data, (bytes, bytearray))
                                                                else data)
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


# ----------------------------------------------------------------------------------------------------------------
# the encoder: a Qwen vision tower (Qwen2-VL, Qwen2.5-VL, Qwen3-VL) and its own image processor

def default_dtype(device):
    return "bfloat16" if str(device).startswith("cuda") else "float32"


def encoder_key(model, revision=None, dtype=None, device="cpu", image_size=DEFAULT_IMAGE_SIZE):
    """What identifies a cache's encoder, known before loading it (Encoder.info adds family, grid and dim)."""
    w, h = parse_image_size(image_size)
    return {"model": str(model), "revision": revision, "dtype": dtype or default_dtype(device),
            "image_size": w if w == h else [w, h]}


def family_classes(family):
    import importlib
    if family not in FAMILIES:
        raise UserError(f"model type '{family}' is not a supported vision-language family "
                        f"({', '.join(FAMILIES)})")
    mod, cfg_cls, model_cls, out_attr = FAMILIES[family]
    try:
        cfg_mod = importlib.import_module(f"transformers.models.{mod}.configuration_{mod}")
        model_mod = importlib.import_module(f"transformers.models.{mod}.modeling_{mod}")
    except ImportError:
        import transformers
        raise UserError(f"{family} needs a newer transformers than {transformers.__version__} "
                        f"(pip install -U transformers)") from None
    return getattr(cfg_mod, cfg_cls), getattr(model_mod, model_cls), out_attr


def hub_reachable(timeout=2.0):
    """False when the hub cannot be reached: HF_HUB_OFFLINE is set, or a TCP connection to the hub (HF_ENDPOINT's
    host if set) fails within timeout seconds. Checked once, before transformers would spend its retries."""
    from urllib.parse import urlparse
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() not in ("0", "", "false", "no"):
        return False
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout).close()
        return True
    except OSError:
        return False


def checkpoint_family(model, revision=None):
    """The model_type in a checkpoint's config.json (local directory or hub id): qwen2_vl, qwen2_5_vl, qwen3_vl..."""
    from transformers import AutoConfig
    advice = ("Give --model a local checkpoint directory (e.g. a ModelScope download: modelscope download --model "
              "Qwen/Qwen2.5-VL-3B-Instruct --local_dir ckpt/Qwen2.5-VL-3B-Instruct), use a pre-filled hub cache "
              "with HF_HUB_OFFLINE=1, or a mirror via HF_ENDPOINT. For an offline run without weights: "
              "--model tiny-random.")
    offline = not Path(model).is_dir() and not hub_reachable()
    try:
        return AutoConfig.from_pretrained(model, revision=revision, local_files_only=offline).model_type
    except (OSError, ValueError) as e:  # not found / no network; 4.x: HFValidationError for a bad path
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        if offline:
            raise UserError(f"'{model}' is not a local directory, the hub is unreachable (offline) and the model is "
                            f"not in the local hub cache. {advice}") from None
        raise UserError(f"could not load '{model}': {first}. {advice}") from None


def random_tower(name):
    """One of RANDOM_TOWERS, built in code with random weights from TINY_SEED: the same weights every time (vqa_eval.py
    puts the tiny one inside a full tiny Qwen2.5-VL, so its answers use the very features a tiny-random cache holds).
    -> (tower, family)"""
    family, cfg_kw = RANDOM_TOWERS[name]
    cfg_cls, model_cls, _ = family_classes(family)
    torch.manual_seed(TINY_SEED)
    return model_cls._from_config(cfg_cls(**cfg_kw), attn_implementation="sdpa"), family


def image_processor(vision_config, family, size, model=None, revision=None):
    """The family's image processor, fixed to exactly size = (W, H) pixels in (min_pixels = max_pixels = W·H, after
    the toolkit's own resize to W x H): (H/cell)·(W/cell) tokens, cell = patch x merge. A checkpoint's own
    preprocessor settings (mean/std) are used where it has them."""
    try:  # transformers 5.x: the slow processor is the *Pil class; 4.x: Qwen2VLImageProcessor is the PIL one
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil as Proc
    except ImportError:
        from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor as Proc
    cfg = vision_config
    cell = cfg.patch_size * cfg.spatial_merge_size
    w, h = size
    if w % cell or h % cell:
        raise UserError(f"--image_size {w}x{h}: each side must be a multiple of {cell} px for {family} "
                        f"({cfg.patch_size}-px patches merged {cfg.spatial_merge_size}x{cfg.spatial_merge_size})")
    proc_kw = dict(min_pixels=w * h, max_pixels=w * h, patch_size=cfg.patch_size, merge_size=cfg.spatial_merge_size,
                   temporal_patch_size=cfg.temporal_patch_size)
    if family in FAMILY_MEAN_STD:
        proc_kw["image_mean"], proc_kw["image_std"] = FAMILY_MEAN_STD[family]
    if model is not None and model not in RANDOM_TOWERS:
        try:
            return Proc.from_pretrained(model, revision=revision, **proc_kw)
        except OSError:
            pass
    return Proc(**proc_kw)


class Encoder:
    """A Qwen vision tower + its processor. __call__(list of PIL RGB images of image_size) -> [N, T, D] features,
    T = (H / cell) * (W / cell) tokens in raster order, cell = patch_size * spatial_merge_size (28 px for Qwen2-VL
    and Qwen2.5-VL, 32 px for Qwen3-VL), D = the merger's output dim (what the language model sees)."""

    def __init__(self, model=DEFAULT_MODEL, device="cpu", dtype=None, revision=None, image_size=DEFAULT_IMAGE_SIZE):
        self.device = torch.device(device)
        key = encoder_key(model, revision, dtype, device, image_size)
        self.dtype = getattr(torch, key["dtype"])
        self.size = parse_image_size(image_size)
        if model in RANDOM_TOWERS:
            self.tower, family = random_tower(model)
            self.tower.to(self.dtype)
        else:
            family = checkpoint_family(model, revision)
            cfg_cls, model_cls, out_attr = family_classes(family)
            self.tower, info = model_cls.from_pretrained(
                model, revision=revision, key_mapping={r"^(?:model\.)?visual\.": "model."}, dtype=self.dtype,
                attn_implementation="sdpa", output_loading_info=True)
            if info["missing_keys"]:
                raise UserError(f"'{model}': {len(info['missing_keys'])} vision-tower weights are missing from the "
                                f"checkpoint (e.g. {sorted(info['missing_keys'])[:3]}); refusing random weights.")
        self.tower.eval().to(self.device)
        cfg = self.tower.config
        self.processor = image_processor(cfg, family, self.size, model, revision)
        cell = cfg.patch_size * cfg.spatial_merge_size
        w, h = self.size
        self.grid = [h // cell, w // cell]  # rows, columns
        self.dim = getattr(cfg, family_classes(family)[2])
        self.info = dict(key, family=family, cell=cell, grid=self.grid, feature_dim=self.dim,
                         tiny_seed=TINY_SEED if model in RANDOM_TOWERS else None)

    @torch.no_grad()
    def __call__(self, images):
        inputs = self.processor(images=images, return_tensors="pt")
        pv = inputs["pixel_values"].to(self.device, self.dtype)
        out = self.tower(pv, grid_thw=inputs["image_grid_thw"].to(self.device))
        out = getattr(out, "pooler_output", out)  # 5.x returns an output object, 4.x the merged tokens
        if isinstance(out, tuple):  # 4.x Qwen3-VL: (merged tokens, deepstack features)
            out = out[0]
        return out.reshape(len(images), self.grid[0] * self.grid[1], self.dim)


# ----------------------------------------------------------------------------------------------------------------
# the feature cache

SAMPLE_LOG = "samples.jsonl"  # append-only, one line per extracted sample: survives kill -9 and manifest rebuilds
LOCK = ".lock"
HOST = socket.gethostname().replace(".", "_").replace("-", "_")


def feature_path(cache_dir, i):
    return Path(cache_dir) / f"features_{i}.pt"


def atomic_save(obj, path):
    """Write to .<name>.<host>-<pid>.tmp, then rename: a killed run never leaves a half-written file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{HOST}-{os.getpid()}.tmp")
    if isinstance(obj, (dict, list)) and path.suffix == ".json":
        tmp.write_text(json.dumps(obj, indent=1))
    else:
        torch.save(obj, tmp)
    os.replace(tmp, path)


def pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_tmp(folder, pattern=".*.tmp"):
    """Delete temp files left by killed processes of this host; those of live processes (another extraction or
    training on the same folder) and of other hosts are left alone."""
    for tmp in Path(folder).glob(pattern):
        owner = tmp.name[:-len(".tmp")].rsplit(".", 1)[-1]
        host, _, pid = owner.rpartition("-")
        if host in (HOST, "") and (not pid.isdigit() or not pid_alive(int(pid))):
            tmp.unlink(missing_ok=True)


@contextmanager
def cache_lock(cache_dir):
    """Exclusive lock on a cache directory (flock on <cache>/.lock), held while the manifest is read, merged and
    written: any number of processes may extract into one cache."""
    fd = os.open(Path(cache_dir) / LOCK, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def fingerprint(data):
    """Content hash of one sample's input image (its bytes, or the file's bytes): the cache's per-sample identity."""
    if data is None:
        return None
    if not isinstance(data, (bytes, bytearray)):
        data = Path(data).read_bytes()
    return hashlib.sha256(data).hexdigest()[:20]


def _check_shape(x, path, shape):
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() != 2 or (
            shape is not None and tuple(x.shape) != tuple(shape)):
        want = f"[{shape[0]}, {shape[1]}]" if shape is not None else "2-d"
        raise BadFeature(f"{path}: expected a floating {want} tensor (the cache's tokens x dim), got "
                         f"{type(x).__name__} {list(getattr(x, 'shape', []))} {getattr(x, 'dtype', '')}")


def read_feature(path, shape=None):
    """Load one cached tensor (memory-mapped: no copy until it is converted or normalised); raises BadFeature naming
    the file if it is unreadable, not of shape (T, D) (when given), non-finite, or so large that squaring it
    overflows float32 (the layer norm's variance and the loss square it: a finite 3e38 would). One pass over the
    data (aminmax) does all the value checks."""
    try:
        x = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:
        raise BadFeature(f"{path}: unreadable feature file ({type(e).__name__}: {e})") from None
    _check_shape(x, path, shape)
    lo, hi = (float(v) for v in torch.aminmax(x))
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise BadFeature(f"{path}: contains NaN or Inf values; re-extract it (delete the file and rerun "
                         f"qwenvl_dataloader.py)")
    if max(-lo, hi) ** 2 * x.shape[-1] >= torch.finfo(torch.float32).max:
        raise BadFeature(f"{path}: finite values (largest |x| {max(-lo, hi):.3g}) overflow float32 once squared "
                         f"in the normalisation and the loss; re-extract it (delete the file and rerun "
                         f"qwenvl_dataloader.py)")
    return x


def check_feature_header(path, shape=None):
    """Cheap check of one cached file without reading its data (memory-mapped): a tensor of the right shape."""
    try:
        x = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:
        raise BadFeature(f"{path}: unreadable feature file ({type(e).__name__}: {e})") from None
    _check_shape(x, path, shape)


def read_manifest(cache_dir):
    p = Path(cache_dir) / MANIFEST
    return json.loads(p.read_text()) if p.exists() else {}


def load_manifest(cache_dir):
    if not Path(cache_dir).is_dir():
        raise UserError(f"feature cache directory '{cache_dir}' does not exist. Build it with: "
                        + extract_command(cache_dir))
    if not (Path(cache_dir) / MANIFEST).exists():
        raise UserError(f"'{cache_dir}' is not a feature cache ({MANIFEST} missing). Build it with: "
                        + extract_command(cache_dir))
    return read_manifest(cache_dir)


def read_sample_log(cache_dir):
    """{index: record} from samples.jsonl (later lines win; a torn last line from a kill is ignored)."""
    p, out = Path(cache_dir) / SAMPLE_LOG, {}
    if p.exists():
        for line in p.read_text().splitlines():
            try:
                rec = json.loads(line)
                out[int(rec["i"])] = rec
            except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                continue
    return out


def append_sample_log(cache_dir, records):
    """One write() of whole lines with O_APPEND: concurrent writers never interleave within a line."""
    if records:
        fd = os.open(Path(cache_dir) / SAMPLE_LOG, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, "".join(json.dumps(r) + "\n" for r in records).encode())
        finally:
            os.close(fd)


def key_string(info):
    return "|".join(str(info.get(k)) for k in ("model", "revision", "dtype", "image_size"))


def check_compatible(manifest, encoder_info, source_info, cache_dir):
    old = manifest.get("encoder", {})
    diff = {k: (old.get(k), v) for k, v in encoder_info.items() if k in old and old.get(k) != v}
    if diff:
        raise UserError(f"cache '{cache_dir}' was made by another encoder: "
                        + ", ".join(f"{k}: cache has {a!r}, this run {b!r}" for k, (a, b) in diff.items())
                        + ". Use another --cache_dir (or delete this one).")
    src = manifest.get("source", {})
    if src and source_info and src.get("kind") != source_info["kind"]:
        raise UserError(f"cache '{cache_dir}' was made from another source ({src.get('kind')} at "
                        f"{src.get('path')}); this run reads {source_info['kind']} at {source_info['path']}. "
                        f"Use another --cache_dir.")


def merge_into_manifest(cache_dir, info, source_info, done=(), failed=None, log=None):
    """Under the cache lock: read manifest.json as it is now, add this process's done samples {i: meta} and
    failures {i: reason} (and records of the sample log whose features exist), write it back atomically."""
    with cache_lock(cache_dir):
        m = read_manifest(cache_dir)
        m["encoder"], m["source"] = info, source_info
        samples = {int(k): v for k, v in m.get("samples", {}).items()}
        fails = {int(k): v for k, v in m.get("failed", {}).items()}
        for i, rec in (log or {}).items():  # recovery: samples written by a killed run, or --rebuild_manifest
            if i not in samples and rec.get("encoder") == key_string(info) and feature_path(cache_dir, i).exists():
                samples[i] = {k: v for k, v in rec.items() if k not in ("i", "encoder")}
                fails.pop(i, None)
        for i, meta in dict(done).items():
            samples[i] = meta
            fails.pop(i, None)
        for i, why in (failed or {}).items():
            fails[i] = why
            samples.pop(i, None)
        m["samples"] = {str(k): samples[k] for k in sorted(samples)}
        m["failed"] = {str(k): fails[k] for k in sorted(fails)}
        atomic_save(m, Path(cache_dir) / MANIFEST)
        return m


def extract(dataset_dir, cache_dir="feature_cache_real", model=DEFAULT_MODEL, device=None, dtype=None,
            batch_size=8, start=0, limit=None, revision=None, rank=0, world_size=1, progress=True, encoder=None,
            rebuild_manifest=False, image_size=DEFAULT_IMAGE_SIZE):
    """Extract features for samples [start, start+limit) of the source into cache_dir. Returns a summary dict.
    Any number of processes may run on one cache_dir (the manifest is merged under a lock); a sample already
    cached is skipped only if its image bytes still hash to the fingerprint recorded for it."""
    from tqdm import tqdm
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    cache_dir = Path(cache_dir)
    src = Source(dataset_dir)
    source_info = {"kind": src.kind, "path": str(Path(dataset_dir).resolve()), "num_samples": len(src)}
    key = encoder.info if encoder is not None else encoder_key(model, revision, dtype, device, image_size)
    existed = cache_dir.exists()
    manifest = {}
    if existed:  # every identity check happens before the encoder is loaded
        manifest = read_manifest(cache_dir)
        if not manifest and not rebuild_manifest and any(cache_dir.glob("features_*.pt")):
            raise UserError(f"'{cache_dir}' holds features_*.pt files but no {MANIFEST}: nothing says which encoder "
                            f"and images made them. Rerun with --rebuild_manifest (keeps the files its sample log "
                            f"vouches for, re-extracts the rest) or use a fresh --cache_dir.")
        check_compatible(manifest, key, source_info, cache_dir)
        if manifest.get("codec"):
            raise UserError(f"'{cache_dir}' is a compressed cache (compress.py); extract into another --cache_dir")
    enc = encoder or Encoder(model, device, dtype, revision, image_size)
    shape = (enc.info["grid"][0] * enc.info["grid"][1], enc.info["feature_dim"])
    check_compatible(manifest, enc.info, source_info, cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_tmp(cache_dir)
    log = read_sample_log(cache_dir)
    if rebuild_manifest:
        with cache_lock(cache_dir):
            (cache_dir / MANIFEST).unlink(missing_ok=True)
    manifest = merge_into_manifest(cache_dir, enc.info, source_info, log=log)
    listed = manifest["samples"]

    stop = len(src) if limit is None else min(len(src), start + limit)
    mine = list(range(start + rank, stop, world_size))
    # a listed sample is kept only if the source still holds the same image bytes for it
    check = [i for i in mine if str(i) in listed and feature_path(cache_dir, i).exists()]
    current, changed = {}, []
    for i, data in src.iter_images(check):
        try:
            current[i] = fingerprint(data)
        except OSError:  # the image is gone: extract again (and record why it fails)
            current[i] = None
        if listed[str(i)].get("fingerprint") not in (None, current[i]):
            changed.append(i)
    if changed:
        i = changed[0]
        raise UserError(f"cache '{cache_dir}': {len(changed)} of {len(check)} cached samples in this range were made "
                        f"from other image bytes than the source now holds (e.g. sample {i}, id "
                        f"'{src.meta[i]['id']}'): this is another data set. Use another --cache_dir.")
    todo, skipped = [], 0
    for i in mine:
        if i in current and listed[str(i)].get("fingerprint") == current[i]:
            try:
                read_feature(feature_path(cache_dir, i), shape)
                skipped += 1
                continue
            except BadFeature:
                pass  # invalid or partial: extract again
        todo.append(i)

    samples = {i: dict(src.meta[i]) for i in todo}
    failed, done = {}, {}
    last_write = [time.time()]

    def write_manifest(force=True):
        if not force and time.time() - last_write[0] < 10:  # a killed run loses nothing: the sample log has it
            return
        last_write[0] = time.time()
        merge_into_manifest(cache_dir, enc.info, source_info, done, failed)

    t0, extracted = time.time(), 0
    bar = tqdm(total=len(todo), desc=f"extract{'' if world_size == 1 else f' rank {rank}'}", unit="img",
               disable=not progress)
    batch = []

    def flush():
        nonlocal extracted
        if not batch:
            return
        feats = enc([im for _, im in batch]).cpu()
        recs = []
        for (i, _), f in zip(batch, feats):
            atomic_save(f.clone(), feature_path(cache_dir, i))
            done[i] = samples[i]
            recs.append({"i": i, "encoder": key_string(enc.info), **samples[i]})
        append_sample_log(cache_dir, recs)
        extracted += len(batch)
        bar.update(len(batch))
        batch.clear()
        write_manifest(force=False)

    try:
        for i, data in src.iter_images(todo):
            try:
                fp = fingerprint(data)
                im = open_rgb(data)
                samples[i].update(image_size=list(im.size), fingerprint=fp)
                im = im.resize(info_size(enc.info), Image.BICUBIC)
            except Exception as e:
                failed[i] = f"{type(e).__name__}: {e}"
                bar.write(f"sample {i} ({src.meta[i]['id']}) failed: {failed[i]}")
                bar.update(1)
                continue
            batch.append((i, im))
            if len(batch) == batch_size:
                flush()
        flush()
    finally:  # Ctrl-C or an error: what was extracted is listed before leaving
        bar.close()
        write_manifest()
    dt = time.time() - t0
    return {"extracted": extracted, "skipped": skipped, "failed": len(failed), "seconds": dt,
            "images_per_second": extracted / dt if dt > 0 and extracted else 0.0, "cache_dir": str(cache_dir)}


# ----------------------------------------------------------------------------------------------------------------
# reading the cache: normalisation, Dataset, split, loaders

NORMALIZATIONS = ("layernorm", "none")


def normalize(x, mode="layernorm"):
    """The one normalisation used everywhere: layer norm over the D feature dims, no affine (eps 1e-5)."""
    if mode == "layernorm":
        return F.layer_norm(x, x.shape[-1:])
    if mode == "none":
        return x
    raise ValueError(f"unknown normalisation '{mode}' (choose from {NORMALIZATIONS})")


def denormalize(xn, x, mode="layernorm"):
    """normalize's inverse for features xn made from x: each token's own mean and standard deviation restored."""
    if mode == "layernorm":
        return xn * (x.var(-1, unbiased=False, keepdim=True) + 1e-5).sqrt() + x.mean(-1, keepdim=True)
    return normalize(xn, mode)


def cached_indices(cache_dir):
    """Sorted indices of the samples whose features the manifest lists as extracted."""
    m = load_manifest(cache_dir)
    idx = sorted(int(i) for i in m.get("samples", {}) if feature_path(cache_dir, int(i)).exists())
    if not idx:
        raise UserError(f"the feature cache '{cache_dir}' is empty. Build it with: " + extract_command(cache_dir))
    return idx


def cache_grid(cache_dir):
    """(rows H, columns W) of a cache's token grid, from its manifest: token t sits at row t // W, column t % W."""
    enc = load_manifest(cache_dir).get("encoder", {})
    if "grid" not in enc or "feature_dim" not in enc:
        raise UserError(f"{Path(cache_dir) / MANIFEST} records no token grid / feature dim: re-extract with "
                        f"--rebuild_manifest")
    return tuple(enc["grid"])


def cached_shape(cache_dir):
    """(tokens T, dim D) of a cache's features, from its manifest: the one source of the feature shape."""
    h, w = cache_grid(cache_dir)
    return h * w, read_manifest(cache_dir)["encoder"]["feature_dim"]  # cache_grid checked it is there


def cache_image_size(cache_dir):
    """(W, H) in pixels that the cache's images were resized to."""
    return info_size(load_manifest(cache_dir)["encoder"])


def info_size(info):
    """(W, H) from an encoder record: image_size is one int (square) or [W, H]."""
    v = info.get("image_size", 448)
    return (v, v) if isinstance(v, int) else tuple(v)


def check_rank(rank, limit, flag="--rank"):
    """A rank must lie in 1..min(T, D), the largest rank a [T, D] feature matrix can have."""
    if not isinstance(rank, int) or not 1 <= rank <= limit:
        raise UserError(f"{flag} {rank}: a rank must be between 1 and min(tokens, dim) of the cache's features "
                        f"({limit})")


def answer_box_masks(cache_dir, indices):
    """{index: bool [T] mask of the tokens overlapping the sample's answer box, or None (no bbox, no original image
    size, or a box outside the image)}; the box is scaled from the original image to the cache's image size."""
    import svd_baseline as sb
    samples, grid, size = load_manifest(cache_dir).get("samples", {}), cache_grid(cache_dir), cache_image_size(cache_dir)
    out = {}
    for i in indices:
        m = samples.get(str(i), {})
        ok = m.get("bbox") and m.get("image_size") and len(m["bbox"]) == 4
        out[i] = sb.box_mask(m["bbox"], m["image_size"], grid, size) if ok else None
    return out


def lossy_note(cache_dir):
    """'' for a cache of encoder features; for a compressed cache (compress.py) a note every report prints: the codec
    and its measured cosine to the source features."""
    c = read_manifest(cache_dir).get("codec")
    if not c:
        return ""
    return (f" [LOSSY: compressed cache, codec {c['name']}{f' rank ' + str(c['rank']) if c.get('rank') else ''}, "
            f"cosine to the source {c['cosine_mean']:.5f} ± {c['cosine_std']:.5f}]")


class FeatureDataset(torch.utils.data.Dataset):
    """Cached features as float32 [T, D] (the manifest's shape), normalised. preload: True, False or 'auto' (into
    memory when the set takes under a quarter of the machine's RAM). Item: (features, cache index)."""

    def __init__(self, cache_dir, indices=None, normalization="layernorm", preload="auto"):
        self.cache_dir, self.normalization = Path(cache_dir), normalization
        self.indices = list(cached_indices(cache_dir) if indices is None else indices)
        self.shape = cached_shape(cache_dir)
        self.codec = read_manifest(cache_dir).get("codec")  # a compressed cache (compress.py): decoded on load
        self.basis = None
        if self.codec and (self.cache_dir / "basis.pt").exists():
            self.basis = torch.load(self.cache_dir / "basis.pt", weights_only=True)
        normalize(torch.zeros(1, 4), normalization)  # fail early on a bad mode
        if preload == "auto":
            ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
            preload = len(self.indices) * self.shape[0] * self.shape[1] * 4 < ram / 4
        self.data = None
        if preload:
            self.data = torch.empty(len(self.indices), *self.shape)
            for k in range(len(self.indices)):
                self.data[k] = self._load(k)

    def _load(self, k):
        path = feature_path(self.cache_dir, self.indices[k])
        if self.codec:
            import compress
            try:
                x = compress.decode(self.codec["name"], torch.load(path, weights_only=True), self.basis)
            except Exception as e:
                raise BadFeature(f"{path}: unreadable compressed feature file ({type(e).__name__}: {e})") from None
            return normalize(x, self.normalization)
        x = read_feature(path, self.shape).float()  # checked: finite, and finite once squared
        y = normalize(x, self.normalization)
        return y if y.data_ptr() != x.data_ptr() else y.clone()  # never hand out the memory-mapped file

    def verify(self, full=False):
        """Check every file before any work: full=False reads only the headers (memory-mapped: shape, dtype),
        full=True reads and normalises each file. Preloaded data was fully checked when it was loaded.
        Raises BadFeature naming the first bad file."""
        if self.data is not None:
            return
        for k in range(len(self.indices)):
            if self.codec:  # small files: decode each
                self._load(k)
                continue
            self._load(k) if full else check_feature_header(feature_path(self.cache_dir, self.indices[k]), self.shape)

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, k):
        x = self.data[k] if self.data is not None else self._load(k)
        return x, self.indices[k]


def make_split(indices, seed=42, fractions=(0.8, 0.1, 0.1), groups=None):
    """Seeded split of sample indices into train/val/test (80/10/10 by default). groups: {index: key}; samples with
    one key (one photo, one image asked several questions) always land in the same split. Without groups every
    sample is its own group."""
    indices = sorted(indices)
    keys = [groups[i] if groups else i for i in indices]
    order = list(dict.fromkeys(keys))  # group keys by first appearance
    members = {k: [] for k in order}
    for i, k in zip(indices, keys):
        members[k].append(i)
    perm = torch.randperm(len(order), generator=torch.Generator().manual_seed(seed)).tolist()
    n_train = int(round(fractions[0] * len(indices)))
    n_val = int(round(fractions[1] * len(indices)))
    out = {"train": [], "val": [], "test": []}
    for g in perm:
        part = "train" if len(out["train"]) < n_train else "val" if len(out["val"]) < n_val else "test"
        out[part] += members[order[g]]
    return {k: sorted(v) for k, v in out.items()}


GROUP_AUTO = "auto"


def split_groups(cache_dir, indices, group_by=GROUP_AUTO):
    """{index: group key} from the manifest: group_by a per-sample field (image_id: the photo a sample was made
    from), 'fingerprint' (identical image bytes), 'none', or 'auto' = image_id where the source has it, else
    fingerprint. Returns (groups or None, the field used)."""
    samples = load_manifest(cache_dir).get("samples", {})
    meta = [samples.get(str(i), {}) for i in indices]
    if group_by == GROUP_AUTO:
        group_by = next((f for f in ("image_id", "fingerprint") if meta and all(f in m for m in meta)), "none")
    if group_by == "none":
        return None, "none"
    missing = [i for i, m in zip(indices, meta) if group_by not in m]
    if missing:
        raise UserError(f"--group_by {group_by}: the manifest of '{cache_dir}' has no '{group_by}' for sample "
                        f"{missing[0]} ({len(missing)} samples); use another field or --group_by none")
    return {i: json.dumps(m[group_by]) for i, m in zip(indices, meta)}, group_by


def shared_between_splits(cache_dir, split, field):
    """How many distinct values of a manifest field (e.g. the image fingerprint) occur in more than one split."""
    samples = load_manifest(cache_dir).get("samples", {})
    seen = {}
    for part in ("train", "val", "test"):
        for i in split[part]:
            v = samples.get(str(i), {}).get(field)
            if v is not None:
                seen.setdefault(json.dumps(v), set()).add(part)
    return sum(len(parts) > 1 for parts in seen.values())


def load_or_make_split(results_dir, cache_dir, seed=42, max_samples=None, group_by=GROUP_AUTO, resplit=False):
    """split.json in results_dir: read it if present (so every script sees the same test set), else make and save.
    A saved split made from another seed, sample count, cache or grouping is refused (resplit=True replaces it)."""
    p = Path(results_dir) / "split.json"
    made_from = {"seed": seed, "max_samples": max_samples, "cache_dir": str(Path(cache_dir).resolve()),
                 "group_by": group_by}
    if p.exists() and not resplit:
        s = json.loads(p.read_text())
        old = dict(s, cache_dir=str(Path(s["cache_dir"]).resolve())) if "cache_dir" in s else s
        diff = {k: (old[k], v) for k, v in made_from.items() if k in old and old[k] != v}
        if diff:
            raise UserError(f"{p} was made with " + ", ".join(f"{k} {a!r}" for k, (a, _) in diff.items())
                            + "; this run asks for " + ", ".join(f"{k} {b!r}" for k, (_, b) in diff.items())
                            + ". Pass --resplit to replace it (its test set then changes), or use another "
                              "--results_dir")
        missing = [i for k in ("train", "val", "test") for i in s[k] if not feature_path(cache_dir, i).exists()]
        if missing:
            raise UserError(f"{p} names samples that are not in cache '{cache_dir}' (e.g. {missing[:5]}): "
                            f"was it made for another cache?")
        return s
    idx = cached_indices(cache_dir)
    if max_samples:
        idx = idx[:max_samples]
    if len(idx) < 3:
        raise UserError(f"cache '{cache_dir}' holds {len(idx)} samples; a train/val/test split needs at least 3")
    groups, field = split_groups(cache_dir, idx, group_by)
    s = make_split(idx, seed, groups=groups)
    s.update(made_from, grouped_by=field, num_samples=len(idx),
             shared_images=shared_between_splits(cache_dir, s, "fingerprint"),
             shared_image_ids=shared_between_splits(cache_dir, s, "image_id"),  # source photos / image ids
             **({"shared_groups": shared_between_splits(cache_dir, s, field)} if groups else {}))
    Path(results_dir).mkdir(parents=True, exist_ok=True)
    atomic_save(s, p)
    return s


def read_run(results_dir):
    """(config, split) of a training run's folder: the cache, normalisation and test set every later script uses."""
    out = Path(results_dir)
    if not (out / "config.json").exists() or not (out / "split.json").exists():
        raise UserError(f"{out} has no config.json / split.json: train first (python train_real_data.py "
                        f"--results_dir {out})")
    return json.loads((out / "config.json").read_text()), json.loads((out / "split.json").read_text())


def make_loader(dataset, batch_size, shuffle=False, num_workers=0, sampler=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=shuffle and sampler is None,
                                       sampler=sampler, num_workers=num_workers, generator=g,
                                       pin_memory=torch.cuda.is_available(), drop_last=False)


# ----------------------------------------------------------------------------------------------------------------
# CLI

def dist_env():
    """(rank, world_size, local_rank) from torchrun's environment; initialises the process group (nccl on CUDA,
    else gloo) when world_size > 1. Without torchrun: (0, 1, 0)."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world == 1:
        return 0, 1, 0
    import torch.distributed as dist
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), world, int(os.environ.get("LOCAL_RANK", 0))


def main(argv=None):
    ap = argparse.ArgumentParser(description="Extract and cache Qwen vision-token features (Qwen2-VL, Qwen2.5-VL, "
                                             "Qwen3-VL): one [T, D] tensor per image, e.g. [256, 2048] for "
                                             "Qwen2.5-VL-3B at 448x448.",
                                 formatter_class=HelpFormatter)
    ap.add_argument("--dataset_dir", "--source", dest="dataset_dir", required=True,
                    help="TextVQA parquet directory, a folder of images (recursive), or a .jsonl list")
    ap.add_argument("--cache_dir", default="feature_cache_real", help="where features_<i>.pt go")
    ap.add_argument("--model", default=DEFAULT_MODEL,
                    help=f"hub id or local checkpoint dir of any Qwen2-VL / Qwen2.5-VL / Qwen3-VL model (the family is "
                         f"read from its config); '{TINY}' (Qwen2.5-VL), 'tiny-random-qwen2-vl', "
                         f"'tiny-random-qwen3-vl' = tiny offline encoders with random weights; 'random-3b', "
                         f"'random-qwen3-vl-8b', ... = real-size towers with random weights, for speed measurements only")
    ap.add_argument("--image_size", default=DEFAULT_IMAGE_SIZE,
                    help="resize every image to this: one side (448) or WxH (448x896); each side a multiple of the "
                         "encoder's cell (28 px for Qwen2/2.5-VL, 32 px for Qwen3-VL); tokens = (H/cell) x (W/cell)")
    ap.add_argument("--revision", default=None, help="hub revision of --model")
    ap.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda if available)")
    ap.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                    help="default bfloat16 on CUDA, float32 on CPU")
    ap.add_argument("--extract_batch_size", type=int, default=8, help="images per forward call")
    ap.add_argument("--start", type=int, default=0, help="first sample index")
    ap.add_argument("--limit", type=int, default=None, help="at most this many samples")
    ap.add_argument("--rebuild_manifest", action="store_true",
                    help=f"rebuild {MANIFEST} from the cache's sample log ({SAMPLE_LOG}): files it vouches for "
                         f"(same encoder, same image bytes) are kept, the rest re-extracted")
    args = ap.parse_args(argv)

    rank, world, local_rank = dist_env()
    device = args.device
    if device is None and torch.cuda.is_available():
        device = f"cuda:{local_rank}"
    s = extract(args.dataset_dir, args.cache_dir, args.model, device, args.dtype, args.extract_batch_size,
                args.start, args.limit, args.revision, rank, world, rebuild_manifest=args.rebuild_manifest,
                image_size=args.image_size)
    if world > 1:
        import torch.distributed as dist
        totals = torch.tensor([s["extracted"], s["skipped"], s["failed"]], dtype=torch.float64)
        dist.all_reduce(totals)
        dist.barrier()
        s["extracted"], s["skipped"], s["failed"] = (int(v) for v in totals.tolist())
        dist.destroy_process_group()
    if rank == 0:
        rate = (f"{s['images_per_second']:.1f} images/s{' on rank 0' if world > 1 else ''}" if s["extracted"]
                else "nothing to extract")
        print(f"extracted {s['extracted']}, skipped {s['skipped']} (already cached), failed {s['failed']}; "
              f"{rate}; cache: {args.cache_dir}")
        if s["failed"]:
            print(f"failures and their reasons are listed under 'failed' in {Path(args.cache_dir) / MANIFEST}")


if __name__ == "__main__":
    run_cli(main)
