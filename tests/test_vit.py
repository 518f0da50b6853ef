"""lowrank/vit.py: the shipped ViT in onnxruntime, its cut after a block, and its tail in torch."""

import pytest
import torch
from PIL import Image

from lowrank import vit


def photos():
    from skimage import data

    return [
        Image.fromarray(getattr(data, name)()).convert("RGB").resize((vit.SIZE, vit.SIZE))
        for name in ("astronaut", "coffee", "chelsea")
    ]


@pytest.mark.parametrize("block", [3, 8])
def test_the_torch_tail_equals_onnxruntime_on_the_real_weights(block):
    """Block-k tokens of real photos (CLS first) through the torch tail: its final-norm tokens and
    saliency maps equal the unmodified onnxruntime graph's to 1e-4, and so do Cut's rest() on
    tokens the ViT never produced (a rank-8 SVD of them)."""
    out = vit.ViT([f"block_{block}", "final_norm", vit.SALIENCY])(photos())
    tail = vit.Tail(block)
    with torch.no_grad():
        final, saliency = tail(out[f"block_{block}"])
    assert (final - out["final_norm"]).abs().max() <= 1e-4
    assert (saliency - out[vit.SALIENCY][:, 0]).abs().max() <= 1e-4
    X = out[f"block_{block}"]
    U, S, Vh = torch.linalg.svd(X[:, 1:], full_matrices=False)
    Xh = torch.cat([X[:, :1], (U[..., :8] * S[:, None, :8]) @ Vh[:, :8]], 1)
    cut = vit.Cut(block)
    with torch.no_grad():
        final_h, saliency_h = tail(Xh)
    assert (final_h - cut.rest(Xh)).abs().max() <= 1e-4
    assert (saliency_h - cut.head(final_h)).abs().max() <= 1e-4
    assert (saliency_h - saliency).abs().max() > 1e-2  # the rank-8 tokens do change the map


def test_the_tail_passes_gradients_to_its_input_and_not_its_weights():
    tail = vit.Tail(10)
    X = vit.ViT(["block_10"])(photos()[:1])["block_10"].requires_grad_(True)
    final, saliency = tail(X)
    (final.square().mean() + saliency.mean()).backward()
    assert X.grad is not None and X.grad.abs().sum() > 0
    assert all(not p.requires_grad for p in tail.parameters())
