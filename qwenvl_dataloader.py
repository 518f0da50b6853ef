"""
Qwen2.5-VL vision-token features: image sources, the encoder, the feature cache, the Dataset and the split.

Run it to extract a cache (one features_<i>.pt of [256, 2048] per image, plus manifest.json):

    python qwenvl_dataloader.py --dataset_dir data/textvqa --model Qwen/Qwen2.5-VL-3B-Instruct
    python qwenvl_dataloader.py --dataset_dir demo_data --model tiny-random --cache_dir feature_cache_real

Under torchrun each process takes the indices rank::world_size and rank 0 merges the manifests.
"""
import argparse
import io
import json
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

IMAGE_SIZE = 448          # every image is resized to exactly this square
GRID = 16                 # 448 / 28: 14-px patches merged 2x2 -> one token per 28x28 cell
NUM_TOKENS = GRID * GRID  # 256
FEATURE_DIM = 2048        # Qwen2.5-VL-3B merger output
DEFAULT_MODEL = "Qwen/Qwen2.5-VL-3B-Instruct"
TINY = "tiny-random"
MANIFEST = "manifest.json"
IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"}

# The tiny offline Qwen2.5-VL vision tower (see NOTES-qwen2.5-vl.md): same classes, random weights, fixed seed.
TINY_VISION_CONFIG = dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=2, patch_size=14,
                          spatial_merge_size=2, temporal_patch_size=2, window_size=112, out_hidden_size=FEATURE_DIM,
                          fullatt_block_indexes=[1], hidden_act="silu")
TINY_SEED = 0
# Qwen2.5-VL-3B's own vision config, randomly initialised: real size and speed without weights (benchmarks only).
RANDOM_3B = "random-3b"
VISION_3B_CONFIG = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, patch_size=14,
                        spatial_merge_size=2, temporal_patch_size=2, window_size=112, out_hidden_size=FEATURE_DIM,
                        fullatt_block_indexes=[7, 15, 23, 31], hidden_act="silu")


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
            raise FileNotFoundError(f"--dataset_dir {path}: no such file or directory")
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
            raise ValueError(f"--dataset_dir {path}: expected a directory of parquet shards, a folder of images "
                             f"or a .jsonl list")
        if not self.meta:
            raise ValueError(f"--dataset_dir {path}: found no samples ({self.kind})")

    def __len__(self):
        return len(self.meta)

    def _read_jsonl(self):
        self.meta = []
        for n, line in enumerate(self.path.read_text().splitlines()):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                img = Path(rec["image"])
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ValueError(f"{self.path}:{n + 1}: expected {{\"image\": path, ...}}: {e}") from None
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
            pf = pq.ParquetFile(shard)
            cols = [c for c in ("question", "answer", "dataset_id", "bbox") if c in pf.schema_arrow.names]
            if "image" not in pf.schema_arrow.names:
                raise ValueError(f"{shard}: no 'image' column (TextVQA schema: image, question, answer, dataset_id, bbox)")
            t = pf.read(columns=cols).to_pylist()
            for r, row in enumerate(t):
                m = {"id": str(row.get("dataset_id", len(self.meta))), "shard": shard.name, "row": r}
                if row.get("question") is not None:
                    m["question"] = row["question"]
                if row.get("answer") is not None:
                    m["answers"] = list(row["answer"])
                if row.get("bbox") is not None:
                    m["bbox"] = [float(v) for v in row["bbox"]]
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


def open_rgb(data):
    """Bytes or path -> PIL RGB image at its own size, as qwen_vl_utils.fetch_image converts it: transparency
    pasted on white, any other mode (L, P, CMYK, I;16, ...) converted to RGB."""
    if data is None:
        raise ValueError("no image data")
    im = Image.open(io.BytesIO(data) if isinstance(data, (bytes, bytearray)) else data)
    im.load()
    if im.mode in ("RGBA", "LA") or (im.mode == "P" and "transparency" in im.info):
        im = im.convert("RGBA")
        white = Image.new("RGB", im.size, (255, 255, 255))
        white.paste(im, mask=im.split()[3])
        im = white
    else:
        im = im.convert("RGB")
    return im


def load_image(data):
    """Bytes or path -> PIL RGB image of exactly 448x448, as fetch_image(resized_height=resized_width=448)."""
    return open_rgb(data).resize((IMAGE_SIZE, IMAGE_SIZE), Image.BICUBIC)


# ----------------------------------------------------------------------------------------------------------------
# the encoder: the Qwen2.5-VL vision tower and its own image processor

def default_dtype(device):
    return "bfloat16" if str(device).startswith("cuda") else "float32"


class Encoder:
    """Qwen2.5-VL vision tower + processor. __call__(list of PIL 448x448 RGB) -> [N, 256, 2048] features."""

    def __init__(self, model=DEFAULT_MODEL, device="cpu", dtype=None, revision=None):
        from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLVisionConfig
        from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel
        try:  # transformers 5.x: the slow processor is the *Pil class; 4.x: Qwen2VLImageProcessor is the PIL one
            from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil as Proc
        except ImportError:
            from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor as Proc
        self.device = torch.device(device)
        dtype = dtype or default_dtype(device)
        self.dtype = getattr(torch, dtype)
        pixels = IMAGE_SIZE * IMAGE_SIZE
        self.processor = Proc(min_pixels=pixels, max_pixels=pixels)
        if model in (TINY, RANDOM_3B):
            cfg = Qwen2_5_VLVisionConfig(**(TINY_VISION_CONFIG if model == TINY else VISION_3B_CONFIG))
            torch.manual_seed(TINY_SEED)
            self.tower = Qwen2_5_VisionTransformerPretrainedModel._from_config(cfg, attn_implementation="sdpa")
            self.tower.to(self.dtype)
        else:
            try:
                self.tower, info = Qwen2_5_VisionTransformerPretrainedModel.from_pretrained(
                    model, revision=revision, key_mapping={r"^visual\.": "model."}, dtype=self.dtype,
                    attn_implementation="sdpa", output_loading_info=True)
            except (OSError, ValueError) as e:  # not found / no network; 4.x: HFValidationError for a bad path
                raise SystemExit(
                    f"could not load Qwen2.5-VL from '{model}': {e}\n"
                    f"Give --model a local checkpoint directory (e.g. a ModelScope download: modelscope download "
                    f"--model Qwen/Qwen2.5-VL-3B-Instruct --local_dir ckpt/Qwen2.5-VL-3B-Instruct), use a "
                    f"pre-filled hub cache with HF_HUB_OFFLINE=1, or a mirror via HF_ENDPOINT. "
                    f"For an offline run without weights: --model tiny-random.") from None
            if info["missing_keys"]:
                raise SystemExit(f"'{model}': {len(info['missing_keys'])} vision-tower weights are missing from the "
                                 f"checkpoint (e.g. {sorted(info['missing_keys'])[:3]}); refusing random weights.")
        self.tower.eval().to(self.device)
        cfg = self.tower.config
        grid = IMAGE_SIZE // (cfg.patch_size * cfg.spatial_merge_size)
        if grid != GRID or cfg.out_hidden_size != FEATURE_DIM:
            raise SystemExit(f"'{model}' gives a {grid}x{grid} grid of {cfg.out_hidden_size}-d tokens; this toolkit "
                             f"expects {GRID}x{GRID} x {FEATURE_DIM} (Qwen2.5-VL-3B)")
        self.info = {"model": str(model), "revision": revision, "dtype": dtype,
                     "image_size": IMAGE_SIZE, "grid": [GRID, GRID], "feature_dim": FEATURE_DIM,
                     "tiny_seed": TINY_SEED if model in (TINY, RANDOM_3B) else None}

    @torch.no_grad()
    def __call__(self, images):
        inputs = self.processor(images=images, return_tensors="pt")
        pv = inputs["pixel_values"].to(self.device, self.dtype)
        out = self.tower(pv, grid_thw=inputs["image_grid_thw"].to(self.device))
        out = getattr(out, "pooler_output", out)  # 5.x returns an output object, 4.x the merged tokens
        return out.reshape(len(images), NUM_TOKENS, FEATURE_DIM)


# ----------------------------------------------------------------------------------------------------------------
# the feature cache

def feature_path(cache_dir, i):
    return Path(cache_dir) / f"features_{i}.pt"


def atomic_save(obj, path):
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    if isinstance(obj, (dict, list)) and path.suffix == ".json":
        tmp.write_text(json.dumps(obj, indent=1))
    else:
        torch.save(obj, tmp)
    os.replace(tmp, path)


def read_feature(path):
    """Load one cached tensor; raises ValueError naming the file if it is unreadable, mis-shaped or non-finite."""
    try:
        x = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{path}: unreadable feature file ({type(e).__name__}: {e})") from None
    if not isinstance(x, torch.Tensor) or tuple(x.shape) != (NUM_TOKENS, FEATURE_DIM):
        raise ValueError(f"{path}: expected a [{NUM_TOKENS}, {FEATURE_DIM}] tensor, "
                         f"got {type(x).__name__} {tuple(getattr(x, 'shape', ()))}")
    if not torch.isfinite(x).all():
        raise ValueError(f"{path}: contains NaN or Inf values; re-extract it (delete the file and rerun "
                         f"qwenvl_dataloader.py)")
    return x


def load_manifest(cache_dir):
    p = Path(cache_dir) / MANIFEST
    if not p.exists():
        raise FileNotFoundError(f"no feature cache in '{cache_dir}' ({MANIFEST} missing). Build it with:\n  "
                                + extract_command(cache_dir))
    return json.loads(p.read_text())


def check_compatible(manifest, encoder_info, source_info, cache_dir):
    old = manifest.get("encoder", {})
    diff = {k: (old.get(k), v) for k, v in encoder_info.items() if old.get(k) != v}
    if diff:
        raise SystemExit(f"cache '{cache_dir}' was made by another encoder: "
                         + ", ".join(f"{k}: cache has {a!r}, this run {b!r}" for k, (a, b) in diff.items())
                         + ". Use another --cache_dir (or delete this one).")
    src = manifest.get("source", {})
    if src and (src.get("kind"), src.get("num_samples")) != (source_info["kind"], source_info["num_samples"]):
        raise SystemExit(f"cache '{cache_dir}' was made from another source ({src.get('kind')}, "
                         f"{src.get('num_samples')} samples at {src.get('path')}); this run reads "
                         f"{source_info['kind']}, {source_info['num_samples']} samples. Use another --cache_dir.")


def extract(dataset_dir, cache_dir="feature_cache_real", model=DEFAULT_MODEL, device=None, dtype=None,
            batch_size=8, start=0, limit=None, revision=None, rank=0, world_size=1, progress=True, encoder=None):
    """Extract features for samples [start, start+limit) of the source into cache_dir. Returns a summary dict."""
    from tqdm import tqdm
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    src = Source(dataset_dir)
    source_info = {"kind": src.kind, "path": str(Path(dataset_dir).resolve()), "num_samples": len(src)}
    enc = encoder or Encoder(model, device, dtype, revision)
    manifest = json.loads((cache_dir / MANIFEST).read_text()) if (cache_dir / MANIFEST).exists() else {}
    if manifest:
        check_compatible(manifest, enc.info, source_info, cache_dir)
        for i, m in manifest.get("samples", {}).items():
            if int(i) < len(src) and m.get("id") != src.meta[int(i)]["id"]:
                raise SystemExit(f"cache '{cache_dir}': sample {i} was '{m.get('id')}', the source now has "
                                 f"'{src.meta[int(i)]['id']}' there. Use another --cache_dir.")
    for tmp in cache_dir.glob(".features_*.tmp"):  # leftovers of a killed run
        tmp.unlink(missing_ok=True)

    stop = len(src) if limit is None else min(len(src), start + limit)
    todo, skipped = [], 0
    for i in range(start + rank, stop, world_size):
        p = feature_path(cache_dir, i)
        if p.exists():
            try:
                read_feature(p)
                skipped += 1
                continue
            except ValueError:
                pass  # invalid or partial: extract again
        todo.append(i)

    samples = {i: src.meta[i] for i in range(start + rank, stop, world_size)}
    failed, written = {}, set()
    part = cache_dir / (MANIFEST if world_size == 1 else f"manifest.rank{rank}.json")

    last_write = [0.0]

    def write_manifest(force=True):
        if not force and time.time() - last_write[0] < 10:  # a killed run loses no feature: a rerun re-lists them
            return
        last_write[0] = time.time()
        m = dict(manifest)
        m["encoder"], m["source"] = enc.info, source_info
        old_samples = {int(k): v for k, v in m.get("samples", {}).items()}
        old_failed = {int(k): v for k, v in m.get("failed", {}).items()}
        done = {i: samples[i] for i in samples if i not in failed and (i in written or (
            i not in old_samples and feature_path(cache_dir, i).exists()))}
        old_samples.update(done)
        for i in done:
            old_failed.pop(i, None)
        old_failed.update(failed)
        for i in failed:
            old_samples.pop(i, None)
        m["samples"] = {str(k): old_samples[k] for k in sorted(old_samples)}
        m["failed"] = {str(k): old_failed[k] for k in sorted(old_failed)}
        atomic_save(m, part)

    t0, extracted = time.time(), 0
    bar = tqdm(total=len(todo), desc=f"extract{'' if world_size == 1 else f' rank {rank}'}", unit="img",
               disable=not progress)
    batch = []

    def flush():
        nonlocal extracted
        if not batch:
            return
        feats = enc([im for _, im in batch]).cpu()
        for (i, _), f in zip(batch, feats):
            atomic_save(f.clone(), feature_path(cache_dir, i))
            written.add(i)
        extracted += len(batch)
        bar.update(len(batch))
        batch.clear()
        write_manifest(force=False)

    try:
        for i, data in src.iter_images(todo):
            try:
                im = open_rgb(data)
                samples[i] = dict(samples[i], image_size=list(im.size))
                im = im.resize((IMAGE_SIZE, IMAGE_SIZE), Image.BICUBIC)
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


def merge_manifests(cache_dir, world_size):
    """After a sharded run: fold manifest.rank<r>.json into manifest.json (rank 0 calls this)."""
    cache_dir = Path(cache_dir)
    out = json.loads((cache_dir / MANIFEST).read_text()) if (cache_dir / MANIFEST).exists() else {}
    samples, failed = dict(out.get("samples", {})), dict(out.get("failed", {}))
    for r in range(world_size):
        p = cache_dir / f"manifest.rank{r}.json"
        part = json.loads(p.read_text())
        out["encoder"], out["source"] = part["encoder"], part["source"]
        for k, v in part["samples"].items():
            samples[k] = v
            failed.pop(k, None)
        for k, v in part["failed"].items():
            failed[k] = v
            samples.pop(k, None)
    out["samples"] = {k: samples[k] for k in sorted(samples, key=int)}
    out["failed"] = {k: failed[k] for k in sorted(failed, key=int)}
    atomic_save(out, cache_dir / MANIFEST)
    for r in range(world_size):
        (cache_dir / f"manifest.rank{r}.json").unlink()
    return out


# ----------------------------------------------------------------------------------------------------------------
# reading the cache: normalisation, Dataset, split, loaders

NORMALIZATIONS = ("layernorm", "none")


def normalize(x, mode="layernorm"):
    """The one normalisation used everywhere: layer norm over the 2048 feature dims, no affine (eps 1e-5)."""
    if mode == "layernorm":
        return F.layer_norm(x, x.shape[-1:])
    if mode == "none":
        return x
    raise ValueError(f"unknown normalisation '{mode}' (choose from {NORMALIZATIONS})")


def cached_indices(cache_dir):
    """Sorted indices of the samples whose features the manifest lists as extracted."""
    m = load_manifest(cache_dir)
    idx = sorted(int(i) for i in m.get("samples", {}) if feature_path(cache_dir, int(i)).exists())
    if not idx:
        raise FileNotFoundError(f"the feature cache '{cache_dir}' is empty. Build it with:\n  "
                                + extract_command(cache_dir))
    return idx


class FeatureDataset(torch.utils.data.Dataset):
    """Cached features as float32 [256, 2048], normalised. preload: True, False or 'auto' (into memory when the
    set takes under a quarter of the machine's RAM). Item: (features, cache index)."""

    def __init__(self, cache_dir, indices=None, normalization="layernorm", preload="auto"):
        self.cache_dir, self.normalization = Path(cache_dir), normalization
        self.indices = list(cached_indices(cache_dir) if indices is None else indices)
        normalize(torch.zeros(1, 4), normalization)  # fail early on a bad mode
        if preload == "auto":
            ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
            preload = len(self.indices) * NUM_TOKENS * FEATURE_DIM * 4 < ram / 4
        self.data = None
        if preload:
            self.data = torch.empty(len(self.indices), NUM_TOKENS, FEATURE_DIM)
            for k in range(len(self.indices)):
                self.data[k] = self._load(k)

    def _load(self, k):
        return normalize(read_feature(feature_path(self.cache_dir, self.indices[k])).float(), self.normalization)

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, k):
        x = self.data[k] if self.data is not None else self._load(k)
        return x, self.indices[k]


def make_split(indices, seed=42, fractions=(0.8, 0.1, 0.1)):
    """Seeded split of sample indices into train/val/test (80/10/10 by default)."""
    indices = sorted(indices)
    perm = torch.randperm(len(indices), generator=torch.Generator().manual_seed(seed)).tolist()
    n_train = int(round(fractions[0] * len(indices)))
    n_val = int(round(fractions[1] * len(indices)))
    pick = lambda ks: sorted(indices[k] for k in ks)
    return {"train": pick(perm[:n_train]), "val": pick(perm[n_train:n_train + n_val]),
            "test": pick(perm[n_train + n_val:])}


def load_or_make_split(results_dir, cache_dir, seed=42, max_samples=None):
    """split.json in results_dir: read it if present (so every script sees the same test set), else make and save."""
    p = Path(results_dir) / "split.json"
    if p.exists():
        s = json.loads(p.read_text())
        missing = [i for k in ("train", "val", "test") for i in s[k] if not feature_path(cache_dir, i).exists()]
        if missing:
            raise SystemExit(f"{p} names samples that are not in cache '{cache_dir}' (e.g. {missing[:5]}): "
                             f"was it made for another cache?")
        return s
    idx = cached_indices(cache_dir)
    if max_samples:
        idx = idx[:max_samples]
    if len(idx) < 3:
        raise SystemExit(f"cache '{cache_dir}' holds {len(idx)} samples; a train/val/test split needs at least 3")
    s = make_split(idx, seed)
    s.update(seed=seed, cache_dir=str(cache_dir), num_samples=len(idx))
    Path(results_dir).mkdir(parents=True, exist_ok=True)
    atomic_save(s, p)
    return s


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
    ap = argparse.ArgumentParser(description="Extract and cache Qwen2.5-VL vision-token features "
                                             "([256, 2048] per 448x448 image).")
    ap.add_argument("--dataset_dir", "--source", dest="dataset_dir", required=True,
                    help="TextVQA parquet directory, a folder of images (recursive), or a .jsonl list")
    ap.add_argument("--cache_dir", default="feature_cache_real", help="where features_<i>.pt go")
    ap.add_argument("--model", default=DEFAULT_MODEL,
                    help=f"hub id or local checkpoint dir, or '{TINY}' for the tiny offline encoder (random weights); "
                         f"'{RANDOM_3B}' = the real-size tower with random weights, for speed measurements only")
    ap.add_argument("--revision", default=None, help="hub revision of --model")
    ap.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda if available)")
    ap.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                    help="default bfloat16 on CUDA, float32 on CPU")
    ap.add_argument("--extract_batch_size", type=int, default=8, help="images per forward call")
    ap.add_argument("--start", type=int, default=0, help="first sample index")
    ap.add_argument("--limit", type=int, default=None, help="at most this many samples")
    args = ap.parse_args(argv)

    rank, world, local_rank = dist_env()
    device = args.device
    if device is None and torch.cuda.is_available():
        device = f"cuda:{local_rank}"
    s = extract(args.dataset_dir, args.cache_dir, args.model, device, args.dtype, args.extract_batch_size,
                args.start, args.limit, args.revision, rank, world)
    if world > 1:
        import torch.distributed as dist
        totals = torch.tensor([s["extracted"], s["skipped"], s["failed"]], dtype=torch.float64)
        dist.all_reduce(totals)
        dist.barrier()
        if rank == 0:
            merge_manifests(args.cache_dir, world)
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
    main()
