"""
The cached features as training and every report read them: FeatureDataset (normalised float32 [T,
D], decoded from a compressed cache), loaders, the principal basis of a split, and a cache's tower
run again on its images.
"""

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from lowrank.cli import BadFeature, UserError
from lowrank.encoders import Encoder, attention_received
from lowrank.feature_cache import (
    cached_indices,
    cached_shape,
    check_feature_header,
    check_values,
    feature_path,
    load_manifest,
    normalize,
    read_feature,
    tensor_sha,
)
from lowrank.feature_codecs import BASIS, SHARED_BASIS, decode, family
from lowrank.images import Source, fingerprint, load_image
from lowrank.metrics import principal_directions


class FeatureDataset(torch.utils.data.Dataset):
    """Cached features as float32 [T, D] (the manifest's shape), normalised. preload: True, False or
    'auto' (into memory when the set takes under a quarter of the machine's RAM). Item: (features,
    cache index)."""

    def __init__(self, cache_dir, indices=None, normalization="layernorm", preload="auto"):
        self.cache_dir, self.normalization = Path(cache_dir), normalization
        # read once: the shape, the codec and the listing all come from it
        manifest = load_manifest(cache_dir)
        self.indices = list(cached_indices(cache_dir, manifest) if indices is None else indices)
        self.shape = cached_shape(cache_dir, manifest)
        self.codec = manifest.codec  # a compressed cache (compress.py): decoded on load
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
                raise BadFeature(
                    f"{path}: unreadable compressed feature file ({type(e).__name__}: {e})"
                ) from None
            if tuple(x.shape) != tuple(self.shape):
                raise BadFeature(
                    f"{path}: decodes to {list(x.shape)}, the cache's features are {list(self.shape)}"
                )
            return normalize(check_values(x, path), self.normalization)
        x = read_feature(path, self.shape).float()  # checked: finite, and finite once squared
        y = normalize(x, self.normalization)
        # never hand out the memory-mapped file
        return y if y.data_ptr() != x.data_ptr() else y.clone()

    def verify(self, full=False):
        """Check every file before any work: full=False reads only the headers (memory-mapped:
        shape, dtype), full=True reads and normalises each file. Preloaded data was fully checked
        when it was loaded. Raises BadFeature naming the first bad file."""
        if self.data is not None:
            return
        for k in range(len(self.indices)):
            if self.codec:  # small files: decode each
                self._load(k)
                continue
            self._load(k) if full else check_feature_header(
                feature_path(self.cache_dir, self.indices[k]), self.shape
            )

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, k):
        x = self.data[k] if self.data is not None else self._load(k)
        return x, self.indices[k]


def cached_image(cache_dir, sid):
    """The image a cached sample was extracted from, resized as the encoder saw it (a uint8 array),
    or None with a printed reason: the source moved, or holds other bytes for this sample now (its
    fingerprint differs), so what it holds would be drawn under features it did not make."""
    manifest = load_manifest(cache_dir)
    meta = manifest.sample(sid)
    try:
        data = Source(manifest.source_path).image(sid)
        if meta.fingerprint and fingerprint(data) != meta.fingerprint:
            print(
                f"the source's image for sample {sid} is not the one the cache was made from (fingerprint "
                f"differs); drawing the token maps only"
            )
            return None
        return np.asarray(load_image(data, manifest.encoder.size))
    except Exception as e:
        print(f"source image not reachable ({type(e).__name__}: {e}); drawing the token maps only")
        return None


def cache_encoder(cache_dir, device="cpu"):
    """The Encoder that made a cache of real images (same model, revision, dtype, size and
    layer)."""
    manifest = load_manifest(cache_dir)
    enc = manifest.encoder
    if manifest.synthetic:
        raise UserError(f"{cache_dir} holds synthetic features: there is no vision tower to run")
    if enc.family == "vit-onnx":
        raise UserError(
            f"{cache_dir} holds a plain ViT's tokens (vit_features.py): there is no Qwen tower to run"
        )
    size = enc.image_size
    size = "x".join(map(str, size)) if isinstance(size, list) else size
    return Encoder(enc.model, device, enc.dtype, enc.revision, size, enc.layer)


def rerun_tower(encoder, cache_dir, idx, run, desc="tower", progress=True):
    """Yield (sample, what run(tower, pixel_values, grid_thw) gives beside the tower's output) for
    each sample, the tower run again on its image; the output must be the cached features (else the
    image or the model is another one than the cache's, and whatever run measured would belong to
    other tokens)."""
    for i in tqdm(idx, desc=desc, disable=not progress):
        image = cached_image(cache_dir, i)
        if image is None:
            raise UserError(
                f"sample {i}: its image is not reachable, and the tower has to run on it again"
            )
        inputs = encoder.processor(images=[Image.fromarray(image)], return_tensors="pt")
        pixels = inputs["pixel_values"].to(encoder.device, encoder.dtype)
        out, extra = run(encoder.tower, pixels, inputs["image_grid_thw"].to(encoder.device))
        X = read_feature(feature_path(cache_dir, i)).float()
        if (out.float().cpu() - X).norm() > 1e-2 * X.norm():
            raise UserError(
                f"sample {i}: the tower's output is not the cached features (another image or model)"
            )
        yield i, extra


def tower_attention(cache_dir, idx, device="cpu", progress=True):
    """{sample: [T]} the attention each token receives in the cache's vision tower
    (encoders.attention_received)."""
    encoder = cache_encoder(cache_dir, device)
    if encoder.layer != "merger":
        raise UserError(
            f"{cache_dir} holds the tower's {encoder.layer}: visionzip ranks the merger's output tokens"
        )
    runs = rerun_tower(encoder, cache_dir, idx, attention_received, "tower attention", progress)
    return {i: att[0].cpu() for i, att in runs}


def load_basis(cache_dir, codec, dim):
    """The shared basis [D, r] of a compressed cache whose codec has one (pca_*, omega_*), checked
    against the fingerprint the manifest recorded: a missing, truncated or swapped basis.pt is
    named, never decoded."""
    if family(codec["name"]) not in SHARED_BASIS:
        return None
    path = Path(cache_dir) / BASIS
    if not path.exists():
        raise BadFeature(
            f"{path} is missing: the {codec['name']} cache cannot be decoded without it"
        )
    try:
        basis = torch.load(path, weights_only=True)
    except Exception as e:
        raise BadFeature(f"{path}: unreadable ({type(e).__name__}: {e})") from None
    if not isinstance(basis, torch.Tensor) or basis.dim() != 2 or basis.shape[0] != dim:
        raise BadFeature(
            f"{path}: expected a [{dim}, r] basis, got {list(getattr(basis, 'shape', []))}"
        )
    if codec.get("basis_sha") and tensor_sha(basis) != codec["basis_sha"]:
        raise BadFeature(
            f"{path} is not the basis this cache was written with (its fingerprint differs)"
        )
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
    """Orthonormal [D, D] float64, columns descending: the principal directions (uncentred) of the
    tokens of the given samples, read lazily. The lrcp token rule and the PCA codecs fit it on a
    run's training split."""
    loader = make_loader(FeatureDataset(cache_dir, indices, normalization, preload=False), 32)
    return principal_directions(X for X, _ in loader)
