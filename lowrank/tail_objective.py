"""
The downstream objective of a factoriser trained for what the network computes (train_real_data.py
--tail_weight): on a block cache of the shipped ViT (vit_features.py), the tokens rebuilt from A·B
finish the forward pass through the network's frozen tail in torch (vit.Tail), and their final
tokens and saliency map are compared with the unmodified network's on the same crop.
"""

import torch
from PIL import Image

from lowrank.cli import UserError
from lowrank.feature_cache import denormalize, feature_path, load_manifest, read_feature
from lowrank.images import Source
from lowrank.metrics import pearson, row_cosine
from lowrank.vit import Tail, ViT


def cut_block(cache_dir, manifest=None):
    """The block a vit_features.py block cache was cut after; anything else is refused."""
    enc = (manifest or load_manifest(cache_dir)).encoder
    if enc.family != "vit-onnx" or not enc.layer.startswith("block_"):
        raise UserError(
            f"--tail_weight trains through the shipped ViT's tail: {cache_dir} is not a block cache "
            f"of vit_features.py (encoder {enc.model}, layer {enc.layer})"
        )
    return int(enc.layer.split("_")[1])


class TailTarget:
    """The unmodified network on the given samples of a block cache: each crop's cached tokens, its
    CLS token at the cut (from the image: the cache holds patch tokens only) and the tail's final
    tokens and saliency map on them; loss() scores a batch of reconstructions against those."""

    def __init__(self, cache_dir, indices, normalization, device, batch_size=16):
        manifest = load_manifest(cache_dir)
        self.block = cut_block(cache_dir, manifest)
        self.normalization, self.device = normalization, device
        self.tail = Tail(self.block).to(device)
        source, vit = Source(manifest.source_path), ViT([f"block_{self.block}"])
        self.row = {i: n for n, i in enumerate(indices)}
        tokens, cls, finals, maps = [], [], [], []
        for b in range(0, len(indices), batch_size):
            ids = indices[b : b + batch_size]
            X = torch.stack([read_feature(feature_path(cache_dir, i)) for i in ids])
            tap = vit([Image.open(source.image(i)) for i in ids])[f"block_{self.block}"]
            if not torch.allclose(X, tap[:, 1:], atol=1e-3, rtol=1e-3):
                raise UserError(
                    f"{cache_dir}: the cached tokens of samples {ids} are not the ViT's output on "
                    f"their images"
                )
            with torch.no_grad():
                final, saliency = self.tail(torch.cat([tap[:, :1], X], 1).to(device))
            tokens.append(X)
            cls.append(tap[:, :1])
            finals.append(final[:, 1:].cpu())
            maps.append(saliency.cpu())
        self.tokens, self.cls = torch.cat(tokens), torch.cat(cls)
        self.final, self.saliency = torch.cat(finals), torch.cat(maps)

    def loss(self, Xhat, idx):
        """Xhat [B, T, D] normalised reconstructions of samples idx -> the batch's mean of
        (1 - cosine of the final patch tokens) + (1 - Pearson r of the saliency maps), each paired
        with the unmodified network's on the same crop."""
        rows = torch.tensor([self.row[int(i)] for i in idx])
        X = self.tokens[rows].to(self.device)
        Xd = denormalize(Xhat.float(), X, self.normalization)
        final, saliency = self.tail(torch.cat([self.cls[rows].to(self.device), Xd], 1))
        ref_final = self.final[rows].to(self.device)
        cos = row_cosine(final[:, 1:].flatten(0, 1), ref_final.flatten(0, 1))
        r = pearson(saliency, self.saliency[rows].to(self.device))
        return (1 - cos).mean() + (1 - r).mean()
