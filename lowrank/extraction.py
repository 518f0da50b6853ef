"""
Extraction: one features_<i>.pt of [T, D] per image (e.g. [256, 2048] for Qwen2.5-VL-3B at 448x448)
written into a cache atomically, with manifest.json (the one record of T, D and the token grid) and
the sample log. Under torchrun each process takes the indices rank::world_size and merges its
samples into the one manifest under the cache's lock.
"""

import time
from dataclasses import dataclass
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from lowrank.cli import BadFeature, UserError
from lowrank.encoders import EncoderSpec
from lowrank.feature_cache import (
    MANIFEST,
    SAMPLE_LOG,
    DamagedManifest,
    append_sample_log,
    atomic_save,
    cache_lock,
    check_compatible,
    feature_path,
    info_size,
    key_string,
    merge_into_manifest,
    read_feature,
    read_manifest,
    read_sample_log,
    remove_stale_tmp,
)
from lowrank.images import Source, fingerprint, open_rgb


def open_cache(cache_dir, src, key, rebuild_manifest):
    """Every identity check of an existing cache that can be made before the encoder is loaded ->
    (its manifest, whether to rebuild it from the sample log: asked for, or the manifest is
    damaged)."""
    if not cache_dir.exists():
        return {}, rebuild_manifest
    try:
        manifest = read_manifest(cache_dir)
    except DamagedManifest:
        print(
            f"note: {cache_dir / MANIFEST} is damaged: rebuilding it from the sample log ({SAMPLE_LOG})"
        )
        return {}, True
    if not manifest and not rebuild_manifest and any(cache_dir.glob("features_*.pt")):
        raise UserError(
            f"'{cache_dir}' holds features_*.pt files but no {MANIFEST}: nothing says which encoder "
            f"and images made them. Rerun with --rebuild_manifest (keeps the files its sample log "
            f"vouches for, re-extracts the rest) or use a fresh --cache_dir."
        )
    check_compatible(manifest, key, src, cache_dir)
    if manifest.get("codec"):
        raise UserError(
            f"'{cache_dir}' is a compressed cache (compress.py); extract into another --cache_dir"
        )
    return manifest, rebuild_manifest


def still_valid(cache_dir, src, listed, mine, shape):
    """The indices of mine whose cached file is listed, valid, and made from the image bytes the
    source still holds. A listed sample made from other bytes means another data set: refused. A
    listed sample whose image is gone from the source keeps its features (they are its image's) and
    is reported as missing."""
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
    """Writes batches of features into the cache: each file atomically, a sample-log line per sample
    at once, the manifest at most every 10 s (a killed run loses nothing: the sample log has it) and
    at close."""

    def __init__(self, cache_dir, enc, source_info, samples):
        self.cache_dir, self.enc, self.source_info, self.samples = (
            cache_dir,
            enc,
            source_info,
            samples,
        )
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


def write_all(src, todo, writer, batch_size, desc, progress):
    """Read, fingerprint and resize the todo samples' images and write their features a batch at a
    time; an unreadable image is recorded as failed. -> how many were extracted."""
    extracted, batch = 0, []
    bar = tqdm(total=len(todo), desc=desc, unit="img", disable=not progress)
    try:
        for i, data in src.iter_images(todo):
            try:
                fp = fingerprint(data)
                im = open_rgb(data)
                writer.samples[i].update(image_size=list(im.size), fingerprint=fp)
                batch.append((i, im.resize(info_size(writer.enc.info), Image.BICUBIC)))
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
    return extracted


@dataclass(frozen=True)
class Part:
    """The samples one process extracts: every world_size-th of [start, start + limit) of the
    source, from its rank on (torchrun: each process its own)."""

    start: int = 0
    limit: int | None = None
    rank: int = 0
    world_size: int = 1


def extract(
    dataset_dir,
    cache_dir,
    encoder,
    *,
    batch_size=8,
    part=Part(),
    progress=True,
    rebuild_manifest=False,
):
    """Extract features of the source's samples (part: which) into cache_dir with encoder: an
    EncoderSpec, loaded once the cache is found compatible, or a loaded Encoder. Returns a summary
    dict. Any number of processes may run on one cache_dir (the manifest is merged under a lock); a
    sample already cached is skipped only if its image bytes still hash to the fingerprint recorded
    for it."""
    cache_dir = Path(cache_dir)
    src = Source(dataset_dir)
    source_info = {
        "kind": src.kind,
        "path": str(Path(dataset_dir).resolve()),
        "num_samples": len(src),
    }
    for what, n in src.notes.items():  # the metadata schema's coercions (images.Source.clean)
        print(f"note: {n} samples: {what}")
    spec = encoder if isinstance(encoder, EncoderSpec) else None
    key = spec.key() if spec else encoder.info
    manifest, rebuild_manifest = open_cache(cache_dir, source_info, key, rebuild_manifest)
    enc = spec.build() if spec else encoder
    check_compatible(manifest, enc.info, source_info, cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_tmp(cache_dir)
    log = read_sample_log(cache_dir)
    if rebuild_manifest:
        with cache_lock(cache_dir):
            (cache_dir / MANIFEST).unlink(missing_ok=True)
    listed = merge_into_manifest(cache_dir, enc.info, source_info, log=log)["samples"]

    stop = len(src) if part.limit is None else min(len(src), part.start + part.limit)
    mine = list(range(part.start + part.rank, stop, part.world_size))
    shape = (enc.info["grid"][0] * enc.info["grid"][1], enc.info["feature_dim"])
    valid = still_valid(cache_dir, src, listed, mine, shape)
    todo = [i for i in mine if i not in valid]
    writer = CacheWriter(cache_dir, enc, source_info, {i: dict(src.meta[i]) for i in todo})
    t0 = time.time()
    desc = f"extract{'' if part.world_size == 1 else f' rank {part.rank}'}"
    extracted = write_all(src, todo, writer, batch_size, desc, progress)
    dt = time.time() - t0
    return {
        "extracted": extracted,
        "skipped": len(valid),
        "failed": len(writer.failed),
        "seconds": dt,
        "images_per_second": extracted / dt if dt > 0 and extracted else 0.0,
        "cache_dir": str(cache_dir),
    }
