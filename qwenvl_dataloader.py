"""
The extraction script and the data loader. Run it to extract a cache of Qwen vision-token features (one
features_<i>.pt of [T, D] per image, e.g. [256, 2048] for Qwen2.5-VL-3B at 448x448, plus manifest.json, the one
record of T, D and the token grid); import it for FeatureDataset, the cached features as training and every report
read them.

    python qwenvl_dataloader.py --dataset_dir data/textvqa --model Qwen/Qwen2.5-VL-3B-Instruct
    python qwenvl_dataloader.py --dataset_dir demo_data --model tiny-random --cache_dir feature_cache_real

Under torchrun each process takes the indices rank::world_size and merges its samples into the one manifest under
the cache's lock, as separate extraction processes do.
"""

import argparse
import os
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from cli import BadFeature, HelpFormatter, UserError, dist_env, nonneg_int, positive_int, run_cli
from encoders import DEFAULT_IMAGE_SIZE, DEFAULT_MODEL, TINY, Encoder, attention_received, encoder_key
from feature_cache import (
    MANIFEST,
    SAMPLE_LOG,
    DamagedManifest,
    append_sample_log,
    atomic_save,
    cache_lock,
    cached_indices,
    cached_shape,
    check_compatible,
    check_feature_header,
    check_values,
    feature_path,
    info_size,
    key_string,
    load_manifest,
    merge_into_manifest,
    normalize,
    read_feature,
    read_manifest,
    read_sample_log,
    remove_stale_tmp,
    tensor_sha,
)
from feature_codecs import BASIS, SHARED_BASIS, decode, family
from images import Source, fingerprint, load_image, open_rgb
from metrics import principal_directions

# ----------------------------------------------------------------------------------------------------------------
# the data loader


class FeatureDataset(torch.utils.data.Dataset):
    """Cached features as float32 [T, D] (the manifest's shape), normalised. preload: True, False or 'auto' (into
    memory when the set takes under a quarter of the machine's RAM). Item: (features, cache index)."""

    def __init__(self, cache_dir, indices=None, normalization="layernorm", preload="auto"):
        self.cache_dir, self.normalization = Path(cache_dir), normalization
        manifest = load_manifest(cache_dir)  # read once: the shape, the codec and the listing all come from it
        self.indices = list(cached_indices(cache_dir, manifest) if indices is None else indices)
        self.shape = cached_shape(cache_dir, manifest)
        self.codec = manifest.get("codec")  # a compressed cache (compress.py): decoded on load
        self.basis = load_basis(self.cache_dir, self.codec, self.shape[1]) if self.codec else None
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
            try:
                x = decode(self.codec["name"], torch.load(path, weights_only=True), self.basis)
            except Exception as e:
                raise BadFeature(f"{path}: unreadable compressed feature file ({type(e).__name__}: {e})") from None
            if tuple(x.shape) != tuple(self.shape):
                raise BadFeature(f"{path}: decodes to {list(x.shape)}, the cache's features are {list(self.shape)}")
            return normalize(check_values(x, path), self.normalization)
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


def cached_image(cache_dir, sid):
    """The image a cached sample was extracted from, resized as the encoder saw it (a uint8 array), or None with a
    printed reason: the source moved, or holds other bytes for this sample now (its fingerprint differs), so what
    it holds would be drawn under features it did not make."""
    manifest = load_manifest(cache_dir)
    meta = manifest["samples"].get(str(sid), {})
    try:
        data = Source(manifest["source"]["path"]).image(sid)
        if meta.get("fingerprint") and fingerprint(data) != meta["fingerprint"]:
            print(
                f"the source's image for sample {sid} is not the one the cache was made from (fingerprint "
                f"differs); drawing the token maps only"
            )
            return None
        return np.asarray(load_image(data, info_size(manifest["encoder"])))
    except Exception as e:
        print(f"source image not reachable ({type(e).__name__}: {e}); drawing the token maps only")
        return None


def cache_encoder(cache_dir, device="cpu"):
    """The Encoder that made a cache of real images (same model, revision, dtype, size and layer)."""
    manifest = load_manifest(cache_dir)
    enc = manifest["encoder"]
    if manifest["source"].get("kind") == "synthetic" or enc.get("family") == "synthetic":
        raise UserError(f"{cache_dir} holds synthetic features: there is no vision tower to run")
    if enc.get("family") == "vit-onnx":
        raise UserError(f"{cache_dir} holds a plain ViT's tokens (vit_features.py): there is no Qwen tower to run")
    size = enc.get("image_size", DEFAULT_IMAGE_SIZE)
    size = "x".join(map(str, size)) if isinstance(size, list) else size
    return Encoder(enc["model"], device, enc.get("dtype"), enc.get("revision"), size, enc.get("layer"))


def rerun_tower(encoder, cache_dir, idx, run, desc="tower", progress=True):
    """Yield (sample, what run(tower, pixel_values, grid_thw) gives beside the tower's output) for each sample, the
    tower run again on its image; the output must be the cached features (else the image or the model is another
    one than the cache's, and whatever run measured would belong to other tokens)."""
    for i in tqdm(idx, desc=desc, disable=not progress):
        image = cached_image(cache_dir, i)
        if image is None:
            raise UserError(f"sample {i}: its image is not reachable, and the tower has to run on it again")
        inputs = encoder.processor(images=[Image.fromarray(image)], return_tensors="pt")
        pixels = inputs["pixel_values"].to(encoder.device, encoder.dtype)
        out, extra = run(encoder.tower, pixels, inputs["image_grid_thw"].to(encoder.device))
        X = read_feature(feature_path(cache_dir, i)).float()
        if (out.float().cpu() - X).norm() > 1e-2 * X.norm():
            raise UserError(f"sample {i}: the tower's output is not the cached features (another image or model)")
        yield i, extra


def tower_attention(cache_dir, idx, device="cpu", progress=True):
    """{sample: [T]} the attention each token receives in the cache's vision tower (encoders.attention_received)."""
    encoder = cache_encoder(cache_dir, device)
    if encoder.layer != "merger":
        raise UserError(f"{cache_dir} holds the tower's {encoder.layer}: visionzip ranks the merger's output tokens")
    runs = rerun_tower(encoder, cache_dir, idx, attention_received, "tower attention", progress)
    return {i: att[0].cpu() for i, att in runs}


def load_basis(cache_dir, codec, dim):
    """The shared basis [D, r] of a compressed cache whose codec has one (pca_*, omega_*), checked against the
    fingerprint the manifest recorded: a missing, truncated or swapped basis.pt is named, never decoded."""
    if family(codec["name"]) not in SHARED_BASIS:
        return None
    path = Path(cache_dir) / BASIS
    if not path.exists():
        raise BadFeature(f"{path} is missing: the {codec['name']} cache cannot be decoded without it")
    try:
        basis = torch.load(path, weights_only=True)
    except Exception as e:
        raise BadFeature(f"{path}: unreadable ({type(e).__name__}: {e})") from None
    if not isinstance(basis, torch.Tensor) or basis.dim() != 2 or basis.shape[0] != dim:
        raise BadFeature(f"{path}: expected a [{dim}, r] basis, got {list(getattr(basis, 'shape', []))}")
    if codec.get("basis_sha") and tensor_sha(basis) != codec["basis_sha"]:
        raise BadFeature(f"{path} is not the basis this cache was written with (its fingerprint differs)")
    return check_values(basis, path)


def make_loader(dataset, batch_size, shuffle=False, num_workers=0, sampler=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle and sampler is None,
        sampler=sampler,
        num_workers=num_workers,
        generator=g,
        pin_memory=torch.cuda.is_available(),
        drop_last=False,
    )


def principal_basis(cache_dir, indices, normalization):
    """Orthonormal [D, D] float64, columns descending: the principal directions (uncentred) of the tokens of the
    given samples, read lazily. The lrcp token rule and the PCA codecs fit it on a run's training split."""
    loader = make_loader(FeatureDataset(cache_dir, indices, normalization, preload=False), 32)
    return principal_directions(X for X, _ in loader)


# ----------------------------------------------------------------------------------------------------------------
# extraction


def open_cache(cache_dir, src, key, rebuild_manifest):
    """Every identity check of an existing cache that can be made before the encoder is loaded -> (its manifest,
    whether to rebuild it from the sample log: asked for, or the manifest is damaged)."""
    if not cache_dir.exists():
        return {}, rebuild_manifest
    try:
        manifest = read_manifest(cache_dir)
    except DamagedManifest:
        print(f"note: {cache_dir / MANIFEST} is damaged: rebuilding it from the sample log ({SAMPLE_LOG})")
        return {}, True
    if not manifest and not rebuild_manifest and any(cache_dir.glob("features_*.pt")):
        raise UserError(
            f"'{cache_dir}' holds features_*.pt files but no {MANIFEST}: nothing says which encoder "
            f"and images made them. Rerun with --rebuild_manifest (keeps the files its sample log "
            f"vouches for, re-extracts the rest) or use a fresh --cache_dir."
        )
    check_compatible(manifest, key, src, cache_dir)
    if manifest.get("codec"):
        raise UserError(f"'{cache_dir}' is a compressed cache (compress.py); extract into another --cache_dir")
    return manifest, rebuild_manifest


def still_valid(cache_dir, src, listed, mine, shape):
    """The indices of mine whose cached file is listed, valid, and made from the image bytes the source still holds.
    A listed sample made from other bytes means another data set: refused. A listed sample whose image is gone
    from the source keeps its features (they are its image's) and is reported as missing."""
    check = [i for i in mine if str(i) in listed and feature_path(cache_dir, i).exists()]
    current, changed, missing = {}, [], []
    for i, data in src.iter_images(check):
        try:
            current[i] = fingerprint(data)
        except OSError:
            current[i] = None
        if current[i] is None:
            missing.append(i)
            current[i] = listed[str(i)].get("fingerprint")
        elif listed[str(i)].get("fingerprint") not in (None, current[i]):
            changed.append(i)
    if missing:
        print(
            f"note: the images of {len(missing)} cached samples are missing from the source now (e.g. sample "
            f"{missing[0]}, id '{src.meta[missing[0]]['id']}'); their cached features are kept"
        )
    if changed:
        i = changed[0]
        raise UserError(
            f"cache '{cache_dir}': {len(changed)} of {len(check)} cached samples in this range were made "
            f"from other image bytes than the source now holds (e.g. sample {i}, id "
            f"'{src.meta[i]['id']}'): this is another data set. Use another --cache_dir."
        )
    valid = set()
    for i in current:
        if listed[str(i)].get("fingerprint") == current[i]:
            try:
                read_feature(feature_path(cache_dir, i), shape)
                valid.add(i)
            except BadFeature:
                pass  # invalid or partial: extract again
    return valid


class CacheWriter:
    """Writes batches of features into the cache: each file atomically, a sample-log line per sample at once, the
    manifest at most every 10 s (a killed run loses nothing: the sample log has it) and at close."""

    def __init__(self, cache_dir, enc, source_info, samples):
        self.cache_dir, self.enc, self.source_info, self.samples = cache_dir, enc, source_info, samples
        self.done, self.failed, self.last_write = {}, {}, time.time()

    def write(self, batch, bar):
        """-> how many samples were written."""
        if not batch:
            return 0
        feats = self.enc([im for _, im in batch]).cpu()
        recs = []
        for (i, _), f in zip(batch, feats):
            atomic_save(f.clone(), feature_path(self.cache_dir, i))
            self.done[i] = self.samples[i]
            recs.append({"i": i, "encoder": key_string(self.enc.info), **self.samples[i]})
        append_sample_log(self.cache_dir, recs)
        bar.update(len(batch))
        if time.time() - self.last_write >= 10:
            self.close()
        return len(batch)

    def close(self):
        self.last_write = time.time()
        merge_into_manifest(self.cache_dir, self.enc.info, self.source_info, self.done, self.failed)


def extract(
    dataset_dir,
    cache_dir="feature_cache_real",
    model=DEFAULT_MODEL,
    device=None,
    dtype=None,
    batch_size=8,
    start=0,
    limit=None,
    revision=None,
    rank=0,
    world_size=1,
    progress=True,
    encoder=None,
    rebuild_manifest=False,
    image_size=DEFAULT_IMAGE_SIZE,
    layer=None,
):
    """Extract features for samples [start, start+limit) of the source into cache_dir. Returns a summary dict.
    Any number of processes may run on one cache_dir (the manifest is merged under a lock); a sample already
    cached is skipped only if its image bytes still hash to the fingerprint recorded for it."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    cache_dir = Path(cache_dir)
    src = Source(dataset_dir)
    source_info = {"kind": src.kind, "path": str(Path(dataset_dir).resolve()), "num_samples": len(src)}
    for what, n in src.notes.items():  # the metadata schema's coercions (images.Source.clean)
        print(f"note: {n} samples: {what}")
    key = encoder.info if encoder is not None else encoder_key(model, revision, dtype, device, image_size, layer)
    manifest, rebuild_manifest = open_cache(cache_dir, source_info, key, rebuild_manifest)
    enc = encoder or Encoder(model, device, dtype, revision, image_size, layer)
    check_compatible(manifest, enc.info, source_info, cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_tmp(cache_dir)
    log = read_sample_log(cache_dir)
    if rebuild_manifest:
        with cache_lock(cache_dir):
            (cache_dir / MANIFEST).unlink(missing_ok=True)
    listed = merge_into_manifest(cache_dir, enc.info, source_info, log=log)["samples"]

    stop = len(src) if limit is None else min(len(src), start + limit)
    mine = list(range(start + rank, stop, world_size))
    shape = (enc.info["grid"][0] * enc.info["grid"][1], enc.info["feature_dim"])
    valid = still_valid(cache_dir, src, listed, mine, shape)
    todo = [i for i in mine if i not in valid]
    writer = CacheWriter(cache_dir, enc, source_info, {i: dict(src.meta[i]) for i in todo})
    t0, extracted, batch = time.time(), 0, []
    bar = tqdm(
        total=len(todo), desc=f"extract{'' if world_size == 1 else f' rank {rank}'}", unit="img", disable=not progress
    )
    try:
        for i, data in src.iter_images(todo):
            try:
                fp = fingerprint(data)
                im = open_rgb(data)
                writer.samples[i].update(image_size=list(im.size), fingerprint=fp)
                batch.append((i, im.resize(info_size(enc.info), Image.BICUBIC)))
            except Exception as e:
                writer.failed[i] = f"{type(e).__name__}: {e}"
                bar.write(f"sample {i} ({src.meta[i]['id']}) failed: {writer.failed[i]}")
                bar.update(1)
            if len(batch) == batch_size:
                extracted += writer.write(batch, bar)
                batch = []
        extracted += writer.write(batch, bar)
    finally:  # Ctrl-C or an error: what was extracted is listed before leaving
        bar.close()
        writer.close()
    dt = time.time() - t0
    return {
        "extracted": extracted,
        "skipped": len(valid),
        "failed": len(writer.failed),
        "seconds": dt,
        "images_per_second": extracted / dt if dt > 0 and extracted else 0.0,
        "cache_dir": str(cache_dir),
    }


# ----------------------------------------------------------------------------------------------------------------
# CLI


def get_args_parser():
    ap = argparse.ArgumentParser(
        description="Extract and cache Qwen vision-token features (Qwen2-VL, Qwen2.5-VL, "
        "Qwen3-VL): one [T, D] tensor per image, e.g. [256, 2048] for "
        "Qwen2.5-VL-3B at 448x448.",
        formatter_class=HelpFormatter,
    )
    ap.add_argument(
        "--dataset_dir",
        "--source",
        dest="dataset_dir",
        required=True,
        help="TextVQA parquet directory, a folder of images (recursive), or a .jsonl list",
    )
    ap.add_argument("--cache_dir", default="feature_cache_real", help="where features_<i>.pt go")
    ap.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help=f"hub id or local checkpoint dir of any Qwen2-VL / Qwen2.5-VL / Qwen3-VL model (the family is "
        f"read from its config); '{TINY}' (Qwen2.5-VL), 'tiny-random-qwen2-vl', "
        f"'tiny-random-qwen3-vl' = tiny offline encoders with random weights; 'random-3b', "
        f"'random-qwen3-vl-8b', ... = real-size towers with random weights, for speed measurements only",
    )
    ap.add_argument(
        "--image_size",
        default=DEFAULT_IMAGE_SIZE,
        help="resize every image to this: one side (448) or WxH (448x896); each side a multiple of the "
        "encoder's cell (28 px for Qwen2/2.5-VL, 32 px for Qwen3-VL); tokens = (H/cell) x (W/cell)",
    )
    ap.add_argument("--revision", default=None, help="hub revision of --model")
    ap.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda if available)")
    ap.add_argument(
        "--dtype",
        default=None,
        choices=["float32", "bfloat16", "float16"],
        help="default bfloat16 on CUDA, float32 on CPU",
    )
    ap.add_argument(
        "--layer",
        default="merger",
        help="where along the tower: merger (its output, what the language model sees), patch_embed or block_<i> "
        "(one token per patch, raster order; the last block is the merger's input), deepstack_<i> (Qwen3-VL); "
        "layers.py reports every one",
    )
    ap.add_argument("--extract_batch_size", type=positive_int, default=8, help="images per forward call")
    ap.add_argument("--start", type=nonneg_int, default=0, help="first sample index")
    ap.add_argument("--limit", type=positive_int, default=None, help="at most this many samples")
    ap.add_argument(
        "--rebuild_manifest",
        action="store_true",
        help=f"rebuild {MANIFEST} from the cache's sample log ({SAMPLE_LOG}): files it vouches for "
        f"(same encoder, same image bytes) are kept, the rest re-extracted",
    )
    return ap


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    rank, world, local_rank = dist_env()
    device = args.device
    if device is None and torch.cuda.is_available():
        device = f"cuda:{local_rank}"
    s = extract(
        args.dataset_dir,
        args.cache_dir,
        args.model,
        device,
        args.dtype,
        batch_size=args.extract_batch_size,
        start=args.start,
        limit=args.limit,
        revision=args.revision,
        rank=rank,
        world_size=world,
        rebuild_manifest=args.rebuild_manifest,
        image_size=args.image_size,
        layer=args.layer,
    )
    if world > 1:
        import torch.distributed as dist

        totals = torch.tensor([s["extracted"], s["skipped"], s["failed"]], dtype=torch.float64)
        dist.all_reduce(totals)
        dist.barrier()
        s["extracted"], s["skipped"], s["failed"] = (int(v) for v in totals.tolist())
        dist.destroy_process_group()
    if rank == 0:
        rate = (
            f"{s['images_per_second']:.1f} images/s{' on rank 0' if world > 1 else ''}"
            if s["extracted"]
            else "nothing to extract"
        )
        print(
            f"extracted {s['extracted']}, skipped {s['skipped']} (already cached), failed {s['failed']}; "
            f"{rate}; cache: {args.cache_dir}"
        )
        if s["failed"]:
            print(f"failures and their reasons are listed under 'failed' in {Path(args.cache_dir) / MANIFEST}")


if __name__ == "__main__":
    run_cli(main)
